"""Weight-only int8/int4: the layer and its kernels, the three methods, the pass on a
Hugging Face Llama, saving, transplanting into the model for ``generate``, bad input.

Tolerances: a ``WeightOnlyLinear`` agrees with ``x @ dequantized_weight().T`` within 1e-4
relative (the kernels accumulate in another order); output cosine against float, on the
random-weight Llama, is above 0.999 at int8 and 0.98 at int4 g32.
"""

from __future__ import annotations

import copy
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxcomp
from fxcomp import InputError, PassError
from fxcomp.cli.zoo import text_inputs, transformer
from fxcomp.nn.weight_only import KERNEL_ROWS, WeightOnlyEmbedding, WeightOnlyLinear
from fxcomp.passes import quantize_weights
from fxcomp.quant.weight_grid import WeightGrid, awq_scale, clipped, gptq, rtn
from tests.conftest import relative_error


def _layer(rows: int = 64, columns: int = 256, seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(columns, rows)


@pytest.mark.parametrize(("bits", "rows", "kernel"), [(8, 48, True), (4, 64, True), (4, 40, False)])
def test_layer_computes_its_dequantized_weight(bits, rows, kernel):
    layer = _layer(rows)
    grid = WeightGrid(bits, 256 if bits == 8 else 64)
    new = WeightOnlyLinear.from_codes(
        layer, *rtn(layer.weight.detach(), grid), bits=bits, group_size=grid.group_size
    )
    assert new.kernel is kernel  # the int4 kernel packs output channels in blocks of 16
    x = torch.randn(2, KERNEL_ROWS // 2 + 1, 256)  # more rows than the kernels take: exact
    expected = x @ new.dequantized_weight().T + layer.bias
    assert relative_error(new(x), expected.detach()) < 1e-4
    few = x[0, :3]  # the kernels, on activations rounded to bfloat16
    assert relative_error(new(few), expected[0, :3].detach()) < 1e-2
    assert relative_error(new(x), layer(x).detach()) < (0.01 if bits == 8 else 0.15)
    stored = rows * 256 * bits // 8
    assert stored < new.storage_bytes() < stored + rows * 4 * (2 + 256 // 64 * 2) + 1


def test_int4_codes_survive_the_state_dict_in_a_portable_form():
    layer = _layer(64)
    codes, scale, minimum = rtn(layer.weight.detach(), WeightGrid(4, 128))
    new = WeightOnlyLinear.from_codes(layer, codes, scale, minimum, bits=4, group_size=128)
    assert torch.equal(new.codes(), codes)  # read back from the kernel's own layout
    state = new.state_dict()
    assert state["weight"].shape == (64, 128)  # two codes per byte, even input low
    assert torch.equal(state["weight"] & 15, codes[:, ::2])
    fresh = WeightOnlyLinear(256, 64, bits=4, group_size=128)
    fresh.load_state_dict(state)
    x = torch.randn(3, 256)
    torch.testing.assert_close(fresh(x), new(x), rtol=0, atol=0)


def _correlated_inputs(columns: int = 256, rows: int = 2048) -> torch.Tensor:
    """Activations as layers see them: a few directions carry most of the signal (rank 32
    plus noise), and some channels are far larger than others."""
    generator = torch.Generator().manual_seed(1)
    low_rank = torch.randn(rows, 32, generator=generator) @ torch.randn(
        32, columns, generator=generator
    )
    scales = torch.logspace(-1, 1, columns)
    return (low_rank + 0.1 * torch.randn(rows, columns, generator=generator)) * scales


def _output_error(x, weight, grid, codes, scale, minimum):
    return float((x @ weight.T - x @ grid.value(codes, scale, minimum).T).pow(2).mean())


@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_beats_rounding_on_correlated_inputs(act_order):
    x, weight = _correlated_inputs(), _layer().weight.detach()
    grid = WeightGrid(4, 64)
    hessian = 2 * x.double().T @ x.double() / len(x)
    nearest = _output_error(x, weight, grid, *rtn(weight, grid))
    searched = _output_error(x, weight, grid, *gptq(weight, hessian, grid, act_order=act_order))
    assert searched < 0.6 * nearest, (searched, nearest)  # GPTQ halves it


def test_awq_scale_protects_the_large_channels():
    x, weight = _correlated_inputs(), _layer().weight.detach()
    grid = WeightGrid(4, 128)
    s = awq_scale([weight], x, grid)
    assert s[-32:].mean() > s[:32].mean()  # the channels with large inputs are scaled up
    scaled = float(((x / s) @ grid.round(weight * s).T - x @ weight.T).pow(2).mean())
    nearest = float((x @ grid.round(weight).T - x @ weight.T).pow(2).mean())
    assert scaled < nearest


def test_awq_clipping_trades_outliers_for_a_finer_grid():
    torch.manual_seed(0)
    weight = torch.distributions.StudentT(3.0).sample((64, 256))  # heavy tails: outliers
    x, held_out = torch.randn(512, 256), torch.randn(512, 256)
    grid = WeightGrid(4, 128)
    codes, scale, minimum = clipped(weight, x, grid)
    full, _ = grid.params(weight)
    assert torch.all(scale <= full) and torch.all(scale > 0.5 * full)  # ranges shrunk, by < 2
    assert (scale < full).float().mean() > 0.5  # most groups clip their outliers
    searched = _output_error(held_out, weight, grid, codes, scale, minimum)
    nearest = _output_error(held_out, weight, grid, *rtn(weight, grid))
    assert searched < 0.95 * nearest, (searched, nearest)  # about 10% lower


def test_symmetric_int4_puts_the_codes_around_zero():
    weight = _layer().weight.detach()
    grid = WeightGrid(4, 64, symmetric=True)
    codes, scale, minimum = rtn(weight, grid)
    assert torch.equal(minimum, -8 * scale)  # codes - 8 in -8..7, no zero point
    value = grid.value(codes, scale, minimum)
    assert torch.equal(value[codes == 8], torch.zeros_like(value[codes == 8]))  # zero is exact
    groups = weight.reshape(64, 4, 64)
    covered = (groups.amin(-1) >= minimum - 1e-6) & (groups.amax(-1) <= 7 * scale + 1e-6)
    assert covered.all()  # the grid spans each group's range, no clipping
    asymmetric = rtn(weight, WeightGrid(4, 64))
    error = (value - weight).pow(2).mean()
    assert (WeightGrid(4, 64).value(*asymmetric) - weight).pow(2).mean() < error < 1e-3


@pytest.fixture(scope="module")
def llama():
    model, inputs = transformer("llama")  # inputs: input_ids, attention_mask, use_cache=False
    calibration = [(text_inputs(4, 16, seed=i)["input_ids"],) for i in range(4)]
    return model, {"input_ids": inputs["input_ids"], "use_cache": False}, calibration


def _cosine(a, b):
    return float(F.cosine_similarity(a.flatten(), b.flatten(), dim=0))


def _logits(output):
    return output.logits if hasattr(output, "logits") else output[0]


@pytest.mark.parametrize(
    ("bits", "method", "floor", "symmetric"),
    [
        (8, "rtn", 0.999, False),
        (4, "rtn", 0.98, False),
        (4, "gptq", 0.98, False),
        (4, "awq", 0.98, False),
        (4, "gptq", 0.98, True),
    ],
)
def test_pass_quantizes_every_linear_but_the_head(llama, bits, method, floor, symmetric):
    model, inputs, calibration = llama
    options = {"method": method, "data": calibration, "symmetric": symmetric, "progress": False}
    passes = [quantize_weights(bits=bits, group_size=32, **options)]
    result = fxcomp.compile(model, inputs, passes=passes)
    gm = result.module
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    kept = [n for n in linears if type(gm.get_submodule(n)) is nn.Linear]
    assert kept == ["lm_head"]  # the head stays float unless lm_head=True
    rows = result.report.tables["quantize_weights"]
    assert [r["layer"] for r in rows] == [n for n in linears if n != "lm_head"]
    assert all(r["compute"] == "kernel" for r in rows)
    if symmetric:  # GPTQ's grids, read as the error is fed back, stay around zero too
        layers = [m for m in gm.modules() if isinstance(m, WeightOnlyLinear)]
        assert all(torch.equal(m.minimum, -8 * m.scale) for m in layers)
    with torch.no_grad():
        expected = _logits(model(**inputs))
        actual = _logits(gm(inputs["input_ids"]))
    assert _cosine(actual, expected) > floor
    again = fxcomp.compile(gm, inputs["input_ids"], passes=passes[:1])
    assert not again.report.find("quantize_weights").modified  # nothing left to quantize


def test_compressed_layers_generate_in_the_model_and_save_without_pickle(llama, tmp_path):
    model, inputs, _ = llama
    result = fxcomp.compile(
        model, inputs, passes=[quantize_weights(bits=4, group_size=32, progress=False)]
    )
    small = fxcomp.transplant(model, result.module, inputs)
    assert isinstance(small.model.layers[0].mlp.down_proj, WeightOnlyLinear)
    assert type(model.model.layers[0].mlp.down_proj) is nn.Linear  # the caller's model is untouched
    ids = inputs["input_ids"][:1, :6]
    generated = small.generate(ids, max_new_tokens=8, do_sample=False, use_cache=True)
    uncached = small.generate(ids, max_new_tokens=8, do_sample=False, use_cache=False)
    assert generated.shape == (1, 14) and torch.equal(generated, uncached)
    path = tmp_path / "llama.fxgraph"
    fxcomp.save(result.module, path)
    torch.save(inputs["input_ids"], tmp_path / "ids.pt")
    code = (
        "import torch, fxcomp;"
        f"m = fxcomp.load({str(path)!r});"
        f"ids = torch.load({str(tmp_path / 'ids.pt')!r}, weights_only=True);"
        f"torch.save(m(ids)[0], {str(tmp_path / 'out.pt')!r})"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
    with torch.no_grad():
        expected = _logits(result.module(inputs["input_ids"]))
    torch.testing.assert_close(
        torch.load(tmp_path / "out.pt", weights_only=True), expected, rtol=0, atol=0
    )


def test_bad_input_is_refused_before_any_work(llama):
    model, inputs, _ = llama
    with pytest.raises(InputError, match="bits=8 or bits=4"):
        quantize_weights(bits=3)
    with pytest.raises(InputError, match="group_size 100 is not one the int4 kernel takes"):
        quantize_weights(bits=4, group_size=100)
    with pytest.raises(InputError, match="unknown method 'hqq'"):
        quantize_weights(method="hqq")
    # the pass checks the graph before it quantizes anything; the error names the pass
    with pytest.raises(PassError, match="quantize_weights.*group size 128 does not divide the 64"):
        fxcomp.compile(model, inputs, passes=[quantize_weights(bits=4, group_size=128)])
    with pytest.raises(PassError, match="method 'gptq' needs data"):
        fxcomp.compile(
            model, inputs, passes=[quantize_weights(bits=4, group_size=32, method="gptq")]
        )
    with pytest.raises(PassError, match="did you mean model.layers.0.mlp.up_proj"):
        fxcomp.compile(model, inputs, passes=[quantize_weights(skip=["model.layers.0.mlp.upproj"])])


def test_composes_with_prune(llama):
    model, inputs, calibration = llama
    passes = [
        fxcomp.passes.prune(0.25, round_to=32),
        quantize_weights(bits=4, group_size=32, method="gptq", data=calibration, progress=False),
    ]
    result = fxcomp.compile(model, inputs, passes=passes)
    pruned = result.report.find("prune")
    assert pruned.parameters_after < pruned.parameters_before
    rows = result.report.tables["quantize_weights"]
    assert rows and all(r["compute"] == "kernel" for r in rows)
    with torch.no_grad():
        assert _logits(result.module(inputs["input_ids"])).shape == _logits(model(**inputs)).shape


@pytest.mark.parametrize(("bits", "floor_db"), [(8, 40), (4, 15)])
def test_an_embedding_table_dequantizes_the_rows_it_looks_up(bits, floor_db):
    torch.manual_seed(0)
    table = nn.Embedding(50, 64)
    grid = WeightGrid(bits, 64 if bits == 8 else 32)
    new = WeightOnlyEmbedding.from_codes(
        table, *rtn(table.weight.detach(), grid), bits=bits, group_size=grid.group_size
    )
    ids = torch.tensor([[3, 7, 3], [49, 0, 12]])
    looked_up = new(ids)
    assert looked_up.shape == (2, 3, 64)
    assert torch.equal(looked_up, new.dequantized_weight()[ids])  # row by row, exactly
    error = (looked_up - table(ids)).pow(2).mean() / table(ids).pow(2).mean()
    assert -10 * torch.log10(error) > floor_db
    assert new.storage_bytes() < table.weight.numel() * 4 * (0.3 if bits == 8 else 0.2)


def test_head_and_embeddings_too_generate_and_save(llama, tmp_path):
    model, inputs, _ = llama
    step = quantize_weights(bits=4, group_size=32, lm_head=True, embeddings=True, progress=False)
    result = fxcomp.compile(model, inputs, passes=[step])
    gm = result.module
    assert isinstance(gm.get_submodule("model.embed_tokens"), WeightOnlyEmbedding)
    assert isinstance(gm.get_submodule("lm_head"), WeightOnlyLinear)
    rows = {r["layer"]: r for r in result.report.tables["quantize_weights"]}
    assert rows["model.embed_tokens"]["compute"] == "lookup"
    assert rows["model.embed_tokens"]["bytes"] < rows["model.embed_tokens"]["float32_bytes"] / 5
    with torch.no_grad():
        expected = _logits(model(**inputs))
        assert _cosine(_logits(gm(inputs["input_ids"])), expected) > 0.97
    small = fxcomp.transplant(model, gm, inputs)
    ids = inputs["input_ids"][:1, :6]
    assert small.generate(ids, max_new_tokens=4, do_sample=False).shape == (1, 10)
    path = tmp_path / "llama.fxgraph"
    fxcomp.save(gm, path)
    loaded = fxcomp.load(path)
    assert isinstance(loaded.get_submodule("model.embed_tokens"), WeightOnlyEmbedding)
    with torch.no_grad():
        torch.testing.assert_close(
            _logits(loaded(inputs["input_ids"])), _logits(gm(inputs["input_ids"])), rtol=0, atol=0
        )
    with pytest.raises(PassError, match="skip names 'model.embed', which is not a Linear or"):
        fxcomp.compile(
            model, inputs, passes=[quantize_weights(embeddings=True, skip=["model.embed"])]
        )


def test_composes_with_distill():
    """prune, distill, then int8 weights on the digits CNN: the weight-only layers keep the
    distilled accuracy within half a point."""
    from fxcomp.cli.digits import DigitsNet, accuracy, load_digits_split, train

    data = load_digits_split()
    torch.manual_seed(0)
    teacher = train(DigitsNet(width=32), data, progress=False)
    steps = [
        fxcomp.passes.prune(0.5),
        fxcomp.passes.distill(teacher, data.batches(32), progress=False),
    ]
    distilled = fxcomp.compile(teacher, data.test_x[:2], passes=steps).module
    steps.append(quantize_weights(bits=8, lm_head=True, progress=False))
    result = fxcomp.compile(teacher, data.test_x[:2], passes=steps)
    assert any(isinstance(m, WeightOnlyLinear) for m in result.module.modules())
    float_accuracy = accuracy(distilled, data.test_x, data.test_y)
    assert accuracy(result.module, data.test_x, data.test_y) >= float_accuracy - 0.5


def _output_sqnr(model, gm, calibration):
    with torch.no_grad():
        expected = torch.cat([_logits(model(ids)).flatten() for (ids,) in calibration])
        actual = torch.cat([_logits(gm(ids)).flatten() for (ids,) in calibration])
    return float(10 * torch.log10(expected.pow(2).sum() / (expected - actual).pow(2).sum()))


def test_target_sqnr_puts_the_most_sensitive_layers_at_int8(llama):
    model, inputs, calibration = llama
    whole = {
        bits: fxcomp.compile(model, inputs, passes=[quantize_weights(bits, 32, progress=False)])
        for bits in (4, 8)
    }
    ends = {bits: _output_sqnr(model, result.module, calibration) for bits, result in whole.items()}
    target = (ends[4] + ends[8]) / 2
    step = quantize_weights(4, 32, data=calibration, target_sqnr=target, progress=False)
    result = fxcomp.compile(model, inputs, passes=[step])
    table = result.report.tables["weight_bits"]
    alone = [float(row["output_sqnr_db_alone_at_int4"]) for row in table]
    assert alone == sorted(alone)  # most sensitive first
    bits = [row["bits"] for row in table]
    assert 0 < bits.count(8) < len(bits) and bits == sorted(bits, reverse=True)
    stored = {r["layer"]: r["bits"] for r in result.report.tables["quantize_weights"]}
    assert stored == {row["layer"]: row["bits"] for row in table}
    assert _output_sqnr(model, result.module, calibration) >= target
    assert not [n for n in result.report.notes if n.rule == "target_sqnr"]

    out_of_reach = quantize_weights(4, 32, data=calibration, target_sqnr=200.0, progress=False)
    result = fxcomp.compile(model, inputs, passes=[out_of_reach])
    assert {row["bits"] for row in result.report.tables["weight_bits"]} == {8}
    (note,) = [n for n in result.report.notes if n.rule == "target_sqnr"]
    assert "below the target 200.0 dB: all layers take int8" in note.reason
    with pytest.raises(InputError, match="target_sqnr chooses each layer's bits between 4 and 8"):
        quantize_weights(bits=8, target_sqnr=30.0)
    with pytest.raises(PassError, match="target_sqnr needs data"):
        fxcomp.compile(model, inputs, passes=[quantize_weights(4, 32, target_sqnr=30.0)])


def test_a_bfloat16_model_transplants_and_generates(llama):
    """In bfloat16 the graph and the model compute the same layers in another order of ops,
    which alone costs about 40 dB: transplant checks such a model to 30 dB."""
    model, inputs, _ = llama
    half = copy.deepcopy(model).to(torch.bfloat16)
    step = quantize_weights(bits=4, group_size=32, lm_head=True, progress=False)
    result = fxcomp.compile(half, inputs, passes=[step])
    small = fxcomp.transplant(half, result.module, inputs)
    assert small.lm_head.weight.dtype == torch.uint8 and small.dtype == torch.bfloat16
    ids = inputs["input_ids"][:1, :6]
    assert small.generate(ids, max_new_tokens=4, do_sample=False).shape == (1, 10)
