"""Quantization-aware training on real digits: at least PTQ's accuracy, most of a hard case's
loss won back, the same reference graph as ``quantize`` (and the same kernels), BatchNorm
and observer freezing, learned ranges, a float teacher, and errors before training."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fxcomp
from fxcomp.cli.digits import DigitsNet, accuracy, load_digits_split, train
from fxcomp.ir.errors import InputError, PassError
from fxcomp.nn.fused import ConvBN
from fxcomp.passes import fuse, qat, quantize
from fxcomp.quant.fake_quant import FakeQuantize, QATWeight
from fxcomp.quant.reference import QuantDequant, QuantizedWeightLayer
from tests.conftest import outlier_model


@pytest.fixture(scope="module")
def digits():
    data = load_digits_split()
    torch.manual_seed(0)
    return data, train(DigitsNet(), data, progress=False)


def ptq(model, data, **options):
    calibration = [x for x, _ in data.batches()]
    passes = [fuse(), quantize(calibration, lower=False, progress=False, **options)]
    return fxcomp.compile(model, data.test_x[:1], passes=passes).module


def quantization_aware(model, data, passes=None, **options):
    passes = [fuse()] if passes is None else passes
    options.setdefault("progress", False)
    return fxcomp.compile(model, data.test_x[:1], passes=[*passes, qat(data.batches(), **options)])


def test_qat_is_at_least_ptq_on_the_digits_cnn(digits):
    data, model = digits
    floating = accuracy(model, data.test_x, data.test_y)
    post = accuracy(ptq(model, data), data.test_x, data.test_y)
    aware = accuracy(quantization_aware(model, data, lower=False).module, data.test_x, data.test_y)
    assert aware >= post, (aware, post, floating)
    assert aware >= floating - 0.5


def test_qat_wins_back_most_of_what_ptq_loses_on_an_outlier_channel(digits):
    data, model = digits
    hard = outlier_model(model, 50.0)
    floating = accuracy(hard, data.test_x, data.test_y)
    assert floating == pytest.approx(accuracy(model, data.test_x, data.test_y), abs=0.3)
    post = accuracy(ptq(hard, data), data.test_x, data.test_y)
    result = quantization_aware(hard, data, lower=False, lr=3e-3, epochs=6)
    aware = accuracy(result.module, data.test_x, data.test_y)
    # measured: float 98.2, PTQ 92.7, QAT 97.3
    assert floating - post > 3.0, (floating, post)
    assert floating - aware <= 0.25 * (floating - post), (floating, post, aware)


def _structure(gm):
    return [
        (n.op, n.name, type(gm.get_submodule(str(n.target))) if n.op == "call_module" else None)
        for n in gm.graph.nodes
    ]


def test_qat_ends_in_quantizes_reference_graph_which_equals_the_trained_graph(digits):
    data, model = digits
    last = {}

    def keep_outputs(epoch, gm, figures):
        assert any(isinstance(m, FakeQuantize) for m in gm.modules())
        assert any(isinstance(m, QATWeight) for m in gm.modules())
        with torch.no_grad():
            last["outputs"] = gm(data.test_x)

    result = quantization_aware(model, data, lower=False, callback=keep_outputs)
    reference = result.module
    assert _structure(reference) == _structure(ptq(model, data))
    assert not any(isinstance(m, (FakeQuantize, QATWeight, ConvBN)) for m in reference.modules())
    with torch.no_grad():
        torch.testing.assert_close(reference(data.test_x), last["outputs"], rtol=0, atol=1e-5)
    assert [r.name for r in result.report.find("qat").children] == [
        "group_batchnorm",
        "insert_observers",
        "train_qat",
        "freeze",
    ]


def test_qat_lowers_to_the_same_kernels_and_backends_take_it(digits, tmp_path):
    data, model = digits
    post = fxcomp.compile(
        model, data.test_x[:1], passes=[fuse(), quantize([data.test_x], progress=False)]
    ).module
    result = fxcomp.compile(
        model,
        data.test_x[:1],
        passes=[fuse(), qat(data.batches(), progress=False)],
        backend="torchscript",
        output_dir=tmp_path,
    )

    def kernels(gm):
        return [(name, type(m).__name__) for name, m in gm.named_modules() if name]

    assert kernels(result.module) == kernels(post)
    assert result.artifact.path.exists()
    assert accuracy(result.module, data.test_x, data.test_y) > 97


def test_batchnorm_trains_until_freeze_bn_after_then_is_folded(digits):
    data, model = digits
    stats = []

    def record(epoch, gm, figures):
        layer = gm.get_submodule("conv")
        assert isinstance(layer, QATWeight) and isinstance(layer.layer, ConvBN)
        stats.append(layer.layer.bn.running_mean.clone())

    result = quantization_aware(
        model, data, passes=(), lower=False, epochs=3, freeze_bn_after=1, callback=record
    )
    assert not torch.equal(stats[0], model.bn.running_mean)  # epoch 1: batch statistics
    torch.testing.assert_close(stats[1], stats[0], rtol=0, atol=0)  # epochs 2, 3: frozen
    torch.testing.assert_close(stats[2], stats[0], rtol=0, atol=0)
    gm = result.module
    assert not any(isinstance(m, nn.BatchNorm2d) for m in gm.modules())
    assert isinstance(gm.get_submodule("conv"), QuantizedWeightLayer)
    rows = result.report.tables["qat"]
    assert [row["batchnorm"] for row in rows] == ["training", "frozen", "frozen"]
    assert accuracy(gm, data.test_x, data.test_y) > 97


def test_observers_stop_after_freeze_observers_after(digits):
    data, model = digits
    ranges = []

    def record(epoch, gm, figures):
        fake = gm.get_submodule("conv_observer")
        ranges.append((*(float(v) for v in fake.observer.range()), float(fake.qparams()[0])))

    result = quantization_aware(
        model, data, lower=False, epochs=3, freeze_observers_after=1, lr=1e-3, callback=record
    )
    assert ranges[1] == ranges[0] == ranges[2]
    assert [row["ranges"] for row in result.report.tables["qat"]] == [
        "observed",
        "fixed",
        "fixed",
    ]
    lo, hi, scale = ranges[0]
    assert float(result.module.get_submodule("conv_qdq").scale) == scale
    assert scale == pytest.approx((hi - min(lo, 0.0)) / 127, rel=1e-5)  # x86: 7-bit range


def test_learned_ranges_train_the_scales(digits):
    data, model = digits
    start, end = {}, {}

    def record(epoch, gm, figures):
        for name, m in gm.named_modules():
            if isinstance(m, FakeQuantize):
                (start if epoch == 1 else end)[name] = float(m.qparams()[0])

    result = quantization_aware(
        model, data, lower=False, ranges="learned", lr=1e-3, epochs=2, callback=record
    )
    assert start.keys() == end.keys() and len(start) >= 5
    assert any(abs(end[k] - start[k]) > 1e-4 * start[k] for k in start)
    for name, m in result.module.named_modules():
        if isinstance(m, QuantDequant) and name.removesuffix("_qdq") + "_observer" in end:
            assert float(m.scale) == pytest.approx(end[name.removesuffix("_qdq") + "_observer"])
    assert accuracy(result.module, data.test_x, data.test_y) > 97


def test_a_qat_student_learns_from_a_float_teacher(digits):
    data, model = digits
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = quantization_aware(model, data, lower=False, teacher=model, lr=1e-3, epochs=3)
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key
    rows = result.report.tables["qat"]
    assert float(rows[-1]["kd"]) > 0 and float(rows[-1]["kd"]) < float(rows[0]["kd"])
    assert accuracy(result.module, data.test_x, data.test_y) >= 97.5


def test_qat_options_and_data_are_checked(digits):
    data, model = digits
    with pytest.raises(InputError, match="epochs must be a positive integer"):
        qat(data.batches(), epochs=0)
    with pytest.raises(InputError, match="observer must be one of moving_average, minmax"):
        qat(data.batches(), observer="mse")
    with pytest.raises(InputError, match="freeze_observers_after applies to observed ranges"):
        qat(data.batches(), ranges="learned", freeze_observers_after=1)
    with pytest.raises(InputError, match="unknown quantization engine"):
        qat(data.batches(), engine="tpu")
    with pytest.raises(PassError, match="qat data has no labels"):
        fxcomp.compile(
            model, data.test_x[:1], passes=[qat([x for x, _ in data.batches()], progress=False)]
        )
