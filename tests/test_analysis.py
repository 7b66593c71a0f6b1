"""Per-layer analysis and mixed precision on real digits: the layer that hurts most is
ranked first (checked by quantizing each layer alone through ``quantize(skip=...)``), its
statistics show why, and ``target_sqnr`` / ``max_accuracy_drop`` keep the fewest float
layers the greedy search finds that meet the target."""

from __future__ import annotations

import copy
import json

import pytest
import torch

import fxcomp
from fxcomp.cli.digits import accuracy
from fxcomp.ir.errors import InputError, PassError
from fxcomp.passes import fuse, quantize
from fxcomp.quant.reference import QuantizedWeightLayer
from fxcomp.runtime.parity import sqnr
from tests.conftest import outlier_model

LAYERS = ["stem.0", "conv", "down.0", "fc"]


@pytest.fixture(scope="module")
def digits(digits_calibrated):
    return digits_calibrated


def quantized_alone(model, data, calibration, layer):
    """The output SQNR with ``layer`` the only op quantized, by the ordinary pipeline."""
    others = [name for name in LAYERS if name != layer] + ["add_relu"]
    passes = [fuse(), quantize(calibration, skip=others, lower=False, progress=False)]
    gm = fxcomp.compile(model, data.test_x[:1], passes=passes).module
    x = torch.cat(calibration)
    with torch.no_grad():
        return sqnr(model(x), gm(x))


@pytest.mark.parametrize("factor", [1.0, 50.0], ids=["digits", "outlier-channel"])
def test_the_layer_that_hurts_most_comes_first(digits, factor):
    data, model, calibration = digits
    model = outlier_model(model, factor) if factor != 1 else model
    before = copy.deepcopy(model.state_dict())
    analysis = fxcomp.analyze(model, data.test_x[:1], calibration)
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key])
    ranked = [layer.name for layer in analysis.layers]
    assert sorted(ranked) == sorted(LAYERS)
    alone = {name: quantized_alone(model, data, calibration, name) for name in LAYERS}
    for layer in analysis.layers:
        assert layer.sqnr_alone == pytest.approx(alone[layer.name], abs=0.05), layer.name
    assert ranked[0] == min(alone, key=alone.get)
    figures = [layer.sqnr_alone for layer in analysis.layers]
    assert figures == sorted(figures)
    assert all(layer.sqnr_without >= analysis.model_sqnr - 0.5 for layer in analysis.layers)
    data_out = json.loads(json.dumps(analysis.to_dict()))
    assert [layer["name"] for layer in data_out["layers"]] == ranked
    if factor != 1:
        # the outliers: down.0 writes them (its output grid is 100x too coarse for the rest)
        worst = analysis.layers[0]
        assert worst.name == "down.0" and worst.sqnr_alone < 10
        assert worst.output.max > 50 * worst.input.max
        assert analysis.model_sqnr < 10
    table = analysis.table()
    assert table.splitlines()[0].startswith("model SQNR") and ranked[0] in table.splitlines()[3]


def test_statistics_describe_the_weights_and_activations(digits):
    data, model, calibration = digits
    analysis = fxcomp.analyze(model, data.test_x[:1], calibration)
    stem = next(layer for layer in analysis.layers if layer.name == "stem.0")
    weight = model.stem[0].weight.detach()  # folded with BN: same sign pattern, other scale
    assert stem.kind == "Conv2d" and stem.weight.std > 0 and stem.weight_sqnr > 35
    assert stem.input.min == pytest.approx(float(torch.cat(calibration).min()))
    assert stem.input.max == pytest.approx(float(torch.cat(calibration).max()))
    assert stem.input.grid_min <= stem.input.min and stem.input.grid_max >= stem.input.max
    assert stem.input.clipped == 0.0 and 0 <= stem.weight.outliers < 0.01
    assert stem.output.min >= 0  # a ConvReLU
    assert weight.shape[0] == 16


def test_target_sqnr_keeps_the_fewest_layers_float(digits):
    data, model, calibration = digits
    hard = outlier_model(model, 50.0)
    x = torch.cat(calibration)
    passes = [fuse(), quantize(calibration, target_sqnr=30.0, latency_rounds=3, progress=False)]
    result = fxcomp.compile(hard, data.test_x[:1], passes=passes)
    rows = result.report.tables["mixed_precision"]
    timed = result.report.tables["mixed_precision_latency"]  # frozen TorchScript, interleaved
    assert [row["model"] for row in timed] == ["float", "all INT8", "2 float"]
    assert all(float(row["latency_ms"]) > 0 for row in timed) and timed[0]["speed-up"] == "1.00x"
    assert [row["float layers and ops"] for row in rows] == ["-", "down.0", "down.0, fc"]
    assert float(rows[0]["sqnr_db"]) < 10 and float(rows[-1]["sqnr_db"]) >= 30
    assert rows[-1]["extra_weight_bytes"] == 3 * (16 * 32 * 9 + 32 * 10)
    gm = result.module  # lowered: those two float, the rest INT8 kernels
    assert type(gm.get_submodule("fc")) is torch.nn.Linear
    assert type(gm.get_submodule("conv")).__module__.startswith("torch.ao.nn.quantized")
    with torch.no_grad():
        assert sqnr(hard(x), gm(x)) >= 30
    # greedy and minimal: either layer alone in float misses the target
    for alone in ("down.0", "fc"):
        passes = [fuse(), quantize(calibration, skip=[alone], lower=False, progress=False)]
        with torch.no_grad():
            partial = fxcomp.compile(hard, data.test_x[:1], passes=passes).module(x)
        assert sqnr(hard(x), partial) < 30
    assert accuracy(gm, data.test_x, data.test_y) >= accuracy(hard, data.test_x, data.test_y) - 0.5


def test_max_accuracy_drop_with_eval_fn(digits):
    data, model, calibration = digits
    hard = outlier_model(model, 50.0)

    def evaluate(m):
        return accuracy(m, data.test_x, data.test_y)

    passes = [
        fuse(),
        quantize(calibration, max_accuracy_drop=0.5, eval_fn=evaluate, lower=False, progress=False),
    ]
    result = fxcomp.compile(hard, data.test_x[:1], passes=passes)
    rows = result.report.tables["mixed_precision"]
    assert float(rows[0]["accuracy"]) < evaluate(hard) - 0.5 <= float(rows[-1]["accuracy"])
    assert evaluate(result.module) == pytest.approx(float(rows[-1]["accuracy"]), abs=0.01)
    floats = [n for n, m in result.module.named_modules() if type(m) is QuantizedWeightLayer]
    assert len(floats) == 4 - len(rows[-1]["float layers and ops"].split(", "))
    # an easy model needs nothing in float
    easy = fxcomp.compile(model, data.test_x[:1], passes=passes).report.tables["mixed_precision"]
    assert [row["float layers and ops"] for row in easy] == ["-"]


def test_mixed_precision_options_are_checked(digits):
    data, model, calibration = digits
    with pytest.raises(InputError, match="one target"):
        quantize(calibration, target_sqnr=30.0, max_accuracy_drop=1.0)
    with pytest.raises(InputError, match="max_accuracy_drop needs eval_fn"):
        quantize(calibration, max_accuracy_drop=1.0)
    with pytest.raises(InputError, match="latency_rounds must be >= 0"):
        quantize(calibration, target_sqnr=30.0, latency_rounds=-1)
    with pytest.raises(InputError, match="engine 'tensorrt' has none here"):
        quantize(calibration, engine="tensorrt", target_sqnr=30.0, latency_rounds=5)
    with pytest.raises(PassError, match="not met even with all but one of the 5 quantized"):
        fxcomp.compile(
            model,
            data.test_x[:1],
            passes=[fuse(), quantize(calibration, target_sqnr=1000.0, progress=False)],
        )
