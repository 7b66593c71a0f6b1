"""Static INT8 quantization: observers, the passes, the reference graph and lowering.

Tolerances: the reference graph is within quantization noise of float (SQNR >= 25 dB on the
small residual net); the lowered kernels are closer to the reference than the reference is
to float (the backend's verification rule), and at most 2 output steps away on this net.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fxcomp
from fxcomp import PassError, PassManager
from fxcomp.nn.fused import ConvReLU, add_relu
from fxcomp.passes import calibrate, freeze, fuse, lower, observe, quantize
from fxcomp.quant import OBSERVERS, HistogramObserver, MinMaxObserver, MSEObserver, scheme_for
from fxcomp.quant.observers import Observer
from fxcomp.quant.reference import QuantDequant, QuantizedWeightLayer
from fxcomp.runtime.parity import sqnr

ACTIVATION, WEIGHT = scheme_for("x86", reduce_range=False)


def batches(n=6, shape=(4, 3, 16, 16), seed=2):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=gen) for _ in range(n)]


# --- observers and schemes -------------------------------------------------------------


def test_minmax_and_scheme_qparams():
    obs = MinMaxObserver(ACTIVATION)
    obs(torch.tensor([-1.0, 0.5]))
    obs(torch.tensor([3.0]))
    lo, hi = obs.range()
    assert (lo.item(), hi.item()) == (-1.0, 3.0)
    scale, zero_point = obs.qparams()
    assert scale.item() == pytest.approx(4.0 / 255) and zero_point.item() == 64
    reduced = scheme_for("x86")[0]  # 7-bit scale, full 8-bit storage
    assert reduced.qparams(lo, hi)[0].item() == pytest.approx(4.0 / 127)
    trt = scheme_for("tensorrt")[0]
    scale, zero_point = trt.qparams(lo, hi)
    assert zero_point.item() == 0 and scale.item() == pytest.approx(3.0 / 127.5)


def test_histogram_percentile_clips_an_outlier_and_mse_beats_minmax():
    gen = torch.Generator().manual_seed(0)
    data = [torch.randn(10_000, generator=gen) for _ in range(5)] + [torch.tensor([50.0])]
    observers = {name: cls(ACTIVATION) for name, cls in OBSERVERS.items()}
    for obs in observers.values():
        for x in data:
            obs(x)
    assert observers["minmax"].range()[1].item() == 50.0
    assert observers["histogram"].range()[1].item() < 5.0  # the outlier is clipped
    assert observers["moving_average"].range()[1].item() < 10.0

    def mse(obs: Observer) -> float:
        scale, zp = obs.qparams()
        x = torch.cat(data)
        q = torch.fake_quantize_per_tensor_affine(x, scale.item(), int(zp), 0, 255)
        return (q - x).pow(2).mean().item()

    assert mse(observers["mse"]) <= mse(observers["minmax"])
    assert mse(observers["mse"]) <= mse(observers["histogram"]) * 1.01


def test_histogram_rebins_when_the_range_grows():
    obs = HistogramObserver(ACTIVATION, bins=64)
    obs(torch.linspace(0, 1, 1000))
    obs(torch.linspace(0, 4, 1000))
    assert obs.histogram.sum().item() == 2000
    assert obs.range()[1].item() == pytest.approx(4.0, rel=0.02)


def test_mse_observer_on_a_symmetric_scheme_keeps_zero_point_zero():
    obs = MSEObserver(scheme_for("tensorrt")[0])
    obs(torch.randn(5000, generator=torch.Generator().manual_seed(0)))
    assert obs.qparams()[1].item() == 0


def test_a_grid_signed_by_range_is_uint8_from_0_or_int8_symmetric():
    """The openvino engine's activations: zero point 0 always, all 256 levels on [0, hi]
    where nothing is negative."""
    scheme = scheme_for("openvino")[0]
    relu, signed = MinMaxObserver(scheme), MinMaxObserver(scheme)
    relu(torch.tensor([0.0, 2.55]))
    signed(torch.tensor([-1.0, 2.55]))
    scale, zero_point, grid = relu.grid()
    assert grid.dtype == torch.quint8 and (grid.qmin, grid.qmax) == (0, 255)
    assert zero_point.item() == 0 and scale.item() == pytest.approx(0.01)
    scale, zero_point, grid = signed.grid()
    assert grid.dtype == torch.qint8 and grid.symmetric and zero_point.item() == 0
    assert scale.item() == pytest.approx(2.55 / 127.5)
    assert signed.qparams() == signed.grid()[:2]
    assert scheme_for("ort")[0].for_range(torch.tensor(-1.0)) == scheme_for("ort")[0]


# --- the passes --------------------------------------------------------------------------


def observed(model, x, **options):
    return fxcomp.compile(model, x, passes=[fuse(), observe(**options)])


class TwoAdds(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 3, 1), nn.Conv2d(3, 3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.a(x) + x
        return self.b(x) + x


def test_skip_takes_one_op_by_its_node_name_and_names_the_closest_to_a_typo(image):
    torch.manual_seed(0)
    model = TwoAdds().eval()

    def grid_after(gm, name):
        (node,) = [n for n in gm.graph.nodes if n.name == name]
        return [type(gm.get_submodule(u.target)) for u in node.users if u.op == "call_module"]

    step = quantize(batches(), skip=["add_1"], lower=False, progress=False)
    gm = fxcomp.compile(model, image, passes=[step]).module
    assert grid_after(gm, "add") == [QuantDequant] and grid_after(gm, "add_1") == []
    assert isinstance(gm.get_submodule("b"), QuantizedWeightLayer)
    with pytest.raises(PassError, match=r"(?s)skip names 'add_2'.*hint: did you mean add_1, add\?"):
        fxcomp.compile(model, image, passes=[quantize(batches(), skip=["add_2"])])


def test_insert_observers_structure(residual_net, image):
    result = observed(residual_net, image)
    gm = result.module
    observers = [
        n
        for n in gm.graph.find_nodes(op="call_module")
        if isinstance(gm.get_submodule(n.target), Observer)
    ]
    # input, stem, conv, add_relu, fc, out: one per edge; none between conv and relu
    assert [n.args[0].name for n in observers] == ["x", "stem", "conv", "add_relu", "fc", "out"]
    assert result.report.find("insert_observers").modified
    stem = gm.graph.find_nodes(op="call_module", target="stem")[0]
    assert isinstance(gm.get_submodule("stem"), ConvReLU)
    assert next(iter(stem.users)).target == "stem_observer"


def test_insert_observers_second_run_and_nothing_to_quantize(residual_net, image, ctx):
    gm = observed(residual_net, image).module
    before = gm.code
    _, records = PassManager([observe()]).run(gm, ctx)
    assert not records[0].modified and gm.code == before
    plain = fxcomp.compile(nn.Sequential(nn.Softplus(), nn.Tanh()), image, passes=[observe()])
    assert not plain.report.find("insert_observers").modified


def test_skip_keeps_layers_float(residual_net, image):
    quantized_add = torch.ops.quantized.add_relu
    for skip in (["conv"], [nn.Conv2d], ["add_relu"]):
        gm = fxcomp.compile(
            residual_net, image, passes=[fuse(), quantize(batches(), skip=skip, progress=False)]
        ).module
        stem = type(gm.get_submodule("stem"))
        conv = type(gm.get_submodule("conv"))
        adds = gm.graph.find_nodes(op="call_function", target=quantized_add)
        if skip == ["add_relu"]:
            assert conv.__name__ == "Conv2d" and "quantized" in conv.__module__
            assert not adds and gm.graph.find_nodes(op="call_function", target=add_relu)
        else:
            assert conv is nn.Conv2d and len(adds) == 1, skip  # float conv, quantized add
        assert (stem is ConvReLU) if skip == [nn.Conv2d] else stem.__name__ == "ConvReLU2d"
        assert sqnr(residual_net(image), gm(image)) > 20


def test_reference_graph_structure_and_numerics(residual_net, image):
    data = batches()
    result = fxcomp.compile(
        residual_net, image, passes=[fuse(), quantize(data, lower=False, progress=False)]
    )
    gm = result.module
    kinds = {type(m) for m in gm.modules()}
    assert QuantizedWeightLayer in kinds and QuantDequant in kinds
    assert not [m for m in gm.modules() if isinstance(m, Observer)]
    assert len(gm.graph.find_nodes(op="call_function", target=add_relu)) == 1
    # the mean keeps its input's grid and rounds again: a Q/DQ with the same grid follows
    mean = gm.graph.find_nodes(op="call_method", target="mean")[0]
    after = gm.get_submodule(next(iter(mean.users)).target)
    before = gm.get_submodule(mean.args[0].target)
    assert (after.scale, after.zero_point) == (before.scale, before.zero_point)
    assert sqnr(residual_net(image), gm(image)) >= 25


def test_lowered_graph_uses_quantized_kernels_and_matches_the_reference(residual_net, image):
    data = batches()
    passes = [fuse(), observe(), calibrate(data, progress=False), freeze()]
    reference = fxcomp.compile(residual_net, image, passes=passes).module
    result = fxcomp.compile(residual_net, image, passes=[*passes, lower()])
    gm = result.module
    types = {type(m).__name__ for m in gm.modules()}
    assert {"ConvReLU2d", "Conv2d", "LinearReLU", "Linear"} <= types
    assert not [m for m in gm.modules() if isinstance(m, (QuantDequant, Observer))]
    assert len(gm.graph.find_nodes(op="call_function", target=torch.quantize_per_tensor)) == 1
    assert len(gm.graph.find_nodes(op="call_method", target="dequantize")) == 1
    assert len(gm.graph.find_nodes(op="call_function", target=torch.ops.quantized.add_relu)) == 1
    ref, out = reference(image), gm(image)
    step = reference.get_submodule("out_qdq").scale.item()
    assert (ref - out).abs().max().item() <= 2 * step
    assert sqnr(ref, out) > sqnr(residual_net(image), ref)


def test_float_ops_run_between_dequantize_and_quantize(image):
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Softplus(), nn.Conv2d(4, 4, 3)).eval()
    gm = fxcomp.compile(model, image, passes=[quantize(batches(), progress=False)]).module
    softplus = gm.graph.find_nodes(op="call_module", target="1")[0]
    assert softplus.args[0].target == "dequantize"
    assert next(iter(softplus.users)).target is torch.quantize_per_tensor
    assert len(gm.graph.find_nodes(op="call_function", target=torch.quantize_per_tensor)) == 2
    assert len(gm.graph.find_nodes(op="call_method", target="dequantize")) == 2
    assert sqnr(model(image), gm(image)) > 25


# --- bad input ---------------------------------------------------------------------------


def test_calibration_data_of_the_wrong_shape(residual_net, image, tmp_path):
    bad = [torch.randn(4, 1, 16, 16)]
    out = tmp_path / "out"
    with pytest.raises(PassError) as info:
        fxcomp.compile(
            residual_net,
            image,
            passes=[fuse(), quantize(bad, progress=False)],
            backend="torchscript",
            output_dir=out,
        )
    message = str(info.value)
    assert "pass 'quantize/calibrate' failed" in message
    assert "calibration batch 0, input 0: got (4, 1, 16, 16)" in message
    assert "example input is (2, 3, 16, 16)" in message
    assert not out.exists()


def test_freezing_without_calibration(residual_net, image, tmp_path):
    with pytest.raises(
        PassError, match=r"pass 'freeze' failed.*observer 'x_observer' has seen no data"
    ):
        fxcomp.compile(
            residual_net, image, passes=[fuse(), observe(), freeze()], output_dir=tmp_path / "out"
        )
    assert not (tmp_path / "out").exists()


def test_unknown_and_missing_engines(residual_net, image, monkeypatch, tmp_path):
    with pytest.raises(fxcomp.InputError, match="unknown quantization engine 'arm'"):
        quantize(batches(), engine="arm")
    monkeypatch.setattr(fxcomp.quant.scheme, "available_engines", lambda: ["x86", "fbgemm"])
    with pytest.raises(PassError, match=r"'quantize/lower' failed.*no 'qnnpack' quantized engine"):
        fxcomp.compile(
            residual_net,
            image,
            passes=[quantize(batches(), engine="qnnpack", progress=False)],
            backend="torchscript",
            output_dir=tmp_path / "out",
        )
    assert not (tmp_path / "out").exists()


def test_calibration_accepts_loader_style_tuples(residual_net, image):
    labelled = [(x, torch.zeros(len(x), dtype=torch.long)) for x in batches(3)]
    gm = fxcomp.compile(residual_net, image, passes=[quantize(labelled, progress=False)]).module
    assert sqnr(residual_net(image), gm(image)) > 20
    with pytest.raises(PassError, match="calibration data is empty"):
        fxcomp.compile(residual_net, image, passes=[quantize([], progress=False)])


def test_shape_queries_read_the_quantized_tensor(image):
    class Shuffle(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 1)

        def forward(self, x):
            y = self.conv(x)
            n, c, h, w = y.size()
            return y.view(n, 2, c // 2, h, w).transpose(1, 2).reshape(n, c, h, w)

    model = Shuffle().eval()
    gm = fxcomp.compile(model, image, passes=[quantize(batches(), progress=False)]).module
    assert len(gm.graph.find_nodes(op="call_method", target="dequantize")) == 1  # the output
    assert sqnr(model(image), gm(image)) > 25


@pytest.mark.parametrize(
    ("engine", "per_channel"),
    [("x86", False), ("fbgemm", True), ("qnnpack", True), ("qnnpack", False)],
)
def test_each_engine_emits_verified_torchscript(residual_net, image, tmp_path, engine, per_channel):
    from fxcomp.backends import BACKENDS

    passes = [fuse(), quantize(batches(), engine=engine, per_channel=per_channel, progress=False)]
    result = fxcomp.compile(residual_net, image, passes, "torchscript", tmp_path)
    assert result.artifact.manifest["engine"] == engine
    assert result.artifact.manifest["specialised_for"] == [list(image.shape)]
    conv = result.module.get_submodule("conv")
    weight = conv.weight()
    assert weight.qscheme() == (
        torch.per_channel_affine if per_channel else torch.per_tensor_affine
    )
    if engine == "qnnpack":
        assert weight.int_repr().min() >= -127  # qnnpack's narrow weight range
    loaded = BACKENDS["torchscript"].load(result.artifact.path, input_shapes=[[5, 3, 16, 16]])
    other = torch.randn(5, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(loaded(other), result.module(other), rtol=0, atol=1e-5)
    parity = result.artifact.parity
    assert parity["sqnr_db_vs_float"] > 20 and parity["top1_agreement_vs_float"] == 1.0


def test_an_artifact_loads_under_the_engine_it_was_packed_for(
    residual_net, image, tmp_path, monkeypatch
):
    """torch packs the weights again when a file loads, for the engine set then: qnnpack's
    full-range activations on x86 kernels saturate on CPUs without VNNI."""
    from fxcomp.backends import BACKENDS, torchscript
    from fxcomp.quant.scheme import packing_engine

    passes = [fuse(), quantize(batches(), engine="qnnpack", progress=False)]
    path = fxcomp.compile(residual_net, image, passes, "torchscript", tmp_path).artifact.path
    used = []

    def recording(engine):
        used.append(engine)
        return packing_engine(engine)

    monkeypatch.setattr(torchscript, "packing_engine", recording)
    before = torch.backends.quantized.engine
    BACKENDS["torchscript"].load(path)
    assert used == ["qnnpack"] and torch.backends.quantized.engine == before


def test_loading_a_corrupt_artifact_is_a_backend_error(tmp_path):
    from fxcomp.backends import BACKENDS

    bad = tmp_path / "model.pt"
    bad.write_bytes(b"not a TorchScript archive")
    with pytest.raises(fxcomp.BackendError, match=f"cannot load {bad}"):
        BACKENDS["torchscript"].load(bad)


def test_quantize_calibrates_on_the_compile_calibration_data(residual_net, image):
    result = fxcomp.compile(
        residual_net,
        image,
        passes=[fuse(), quantize(progress=False)],
        calibration_data=batches(3),
    )
    names = {name for name, m in result.module.named_modules() if type(m).__name__ == "ConvReLU2d"}
    assert names == {"stem"}
    assert sqnr(residual_net(image), result.module(image)) > 20
    with pytest.raises(PassError, match="no calibration data"):
        fxcomp.compile(residual_net, image, passes=[quantize(progress=False)])


def test_frozen_steps_are_named_qdq(residual_net, image):
    gm = fxcomp.compile(
        residual_net, image, passes=[fuse(), quantize(batches(3), lower=False, progress=False)]
    ).module
    steps = [name for name, m in gm.named_modules() if isinstance(m, QuantDequant)]
    assert "x_qdq" in steps and "mean_requant" in steps
    assert not [name for name in steps if name.endswith("_observer")]
