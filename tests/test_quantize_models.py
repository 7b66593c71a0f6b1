"""INT8 quantization on real data and on torchvision models, through the TorchScript backend.

Digits: the trained CNN loses at most 0.5 points of test accuracy with each observer.
Coverage: each model quantizes, lowers to quantized convolutions, emits TorchScript that
reloads and runs, and its output is at least 2 dB closer to the reference graph than the
reference is to float (SQNR, on the example batch; the backend itself refuses an artifact
more than 3 dB further).
Models with ops that stay float: efficientnet_b0 (SiLU has no quantized kernel) and
convnext_tiny (LayerNorm over permuted channels, GELU, layer scale).
"""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

import fxcomp
from fxcomp.backends import BACKENDS
from fxcomp.cli.digits import DigitsNet, accuracy, load_digits_split, train
from fxcomp.nn.batchnorm import reestimate_batchnorm
from fxcomp.passes import fuse, quantize

COVERAGE = [
    "resnet18",
    "resnet50",
    "resnext50_32x4d",
    "wide_resnet50_2",
    "mobilenet_v2",
    "mobilenet_v3_large",
    "shufflenet_v2_x1_0",
    "googlenet",
    "inception_v3",
    "mnasnet1_0",
    "efficientnet_b0",
    "regnet_x_400mf",
    "convnext_tiny",
]


@pytest.fixture(scope="module")
def digits():
    data = load_digits_split()
    torch.manual_seed(0)
    return data, train(DigitsNet(), data, progress=False)


@pytest.mark.parametrize("observer", ["minmax", "moving_average", "histogram", "mse"])
def test_digits_int8_loses_at_most_half_a_point(digits, observer, tmp_path):
    data, model = digits
    calibration = [x for x, _ in data.batches()]
    result = fxcomp.compile(
        model,
        data.test_x[:1],
        [fuse(), quantize(calibration, observer=observer, progress=False)],
        backend="torchscript",
        output_dir=tmp_path,
    )
    float_accuracy = accuracy(model, data.test_x, data.test_y)
    int8 = BACKENDS["torchscript"].load(result.artifact.path)
    assert float_accuracy > 95
    assert accuracy(int8, data.test_x, data.test_y) >= float_accuracy - 0.5
    assert accuracy(result.module, data.test_x, data.test_y) >= float_accuracy - 0.5


def reestimated(name: str, data: list[torch.Tensor]) -> nn.Module:
    """Random weights give degenerate activations; re-estimate BatchNorm on the inputs."""
    torch.manual_seed(0)
    return reestimate_batchnorm(torchvision.models.get_model(name, weights=None), data)


def inputs(name: str, count: int) -> list[torch.Tensor]:
    size = 299 if name == "inception_v3" else 224
    gen = torch.Generator().manual_seed(0)
    return [torch.randn(2, 3, size, size, generator=gen) for _ in range(count)]


@pytest.mark.slow
@pytest.mark.parametrize("name", COVERAGE)
def test_torchvision_model_quantizes_and_runs_as_torchscript(name, tmp_path):
    data = inputs(name, 4)
    model = reestimated(name, data[:2])
    result = fxcomp.compile(
        model, data[0], [fuse(), quantize(data[1:], progress=False)], "torchscript", tmp_path
    )
    gm = result.module
    quantized_convs = [
        m
        for m in gm.modules()
        if type(m).__module__.startswith("torch.ao.nn") and "Conv" in type(m).__name__
    ]
    assert len(quantized_convs) >= 20
    parity = result.artifact.parity
    # what the kernels add is well within the noise quantization added
    assert parity["sqnr_db_vs_reference"] >= parity["sqnr_db_reference_vs_float"] + 2
    loaded = BACKENDS["torchscript"].load(result.artifact.path)
    with torch.no_grad():
        torch.testing.assert_close(loaded(data[0]), gm(data[0]), rtol=0, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_int8_torchscript_is_at_least_3_9x_smaller(name, tmp_path):
    data = inputs(name, 2)
    model = torchvision.models.get_model(name, weights=None).eval()
    float_ts = fxcomp.compile(model, data[0], [fuse()], "torchscript", tmp_path / "float")
    int8_ts = fxcomp.compile(
        model, data[0], [fuse(), quantize(data, progress=False)], "torchscript", tmp_path / "int8"
    )
    ratio = float_ts.artifact.path.stat().st_size / int8_ts.artifact.path.stat().st_size
    assert ratio >= 3.9, ratio
