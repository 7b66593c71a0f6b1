"""Shared test helpers: small models with the patterns fxcomp rewrites."""

from __future__ import annotations

import builtins
import copy
import ctypes
import gc
import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.fx import GraphModule
from torch.fx.passes.shape_prop import TensorMetadata

import fxcomp
from fxcomp import CompileContext
from fxcomp.cli.zoo import randomize_batchnorm
from fxcomp.ir.trace import propagate_shapes
from fxcomp.passes import prune
from fxcomp.pruning.plan import PruneOptions, pruning_plan, zero_channels

_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:  # pytest -n N: each worker takes its share of the cores, as do the
    # processes its tests start (OpenMP threads outnumbering the cores stall each other)
    _THREADS = max(1, (os.cpu_count() or 1) // _WORKERS)
    torch.set_num_threads(_THREADS)
    os.environ["OMP_NUM_THREADS"] = str(_THREADS)

try:
    _LIBC = ctypes.CDLL("libc.so.6")
except OSError:  # not glibc
    _LIBC = None


@pytest.fixture(autouse=True)
def _give_memory_back():
    """After each test, hand the memory its tensors freed back to the system. glibc keeps
    freed heap pages: without this the sweeps' large models leave the process at the sum of
    their peaks (24 GB by the torchvision prune sweep), not the largest one (8 GB)."""
    yield
    gc.collect()
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


@pytest.fixture(scope="module")
def digits_calibrated():
    """The digits split, DigitsNet trained on it, and its training images as batches."""
    from fxcomp.cli.digits import DigitsNet, load_digits_split, train

    data = load_digits_split()
    torch.manual_seed(0)
    model = train(DigitsNet(), data, progress=False)
    return data, model, [x for x, _ in data.batches()]


def outlier_model(model: nn.Module, factor: float) -> nn.Module:
    """The same function, with four channels of ``down``'s output ``factor`` times larger
    (and ``fc`` reading them ``factor`` times smaller): one per-tensor activation grid must
    cover the outliers, and the other channels lose their resolution."""
    model = copy.deepcopy(model)
    with torch.no_grad():
        bn = model.down[1]
        bn.weight[:4] *= factor
        bn.bias[:4] *= factor
        model.fc.weight[:, :4] /= factor
    return model


def oracle(
    model: nn.Module, x: torch.Tensor, ratio: float = 0.5, passes=(), **options
) -> fxcomp.CompileResult:
    """Prune ``model`` and check the result against the zeroed model (every parameter slice
    of the channels about to go set to zero): equal within 1e-5 relative."""
    base = fxcomp.compile(model, x, passes=list(passes)).module
    plan = pruning_plan(base, PruneOptions(ratio, **options))
    assert plan.removed(), "nothing to prune"
    zeroed = copy.deepcopy(base)
    zero_channels(zeroed, plan)
    result = fxcomp.compile(model, x, passes=[*passes, prune(ratio, **options)])
    with torch.no_grad():
        assert relative_error(result.module(x), zeroed(x)) < 1e-5
    assert shapes(result.module) == shapes(result.module, rerun=x)  # the pass left true shapes
    return result


def shapes(gm: GraphModule, rerun: torch.Tensor | None = None) -> dict[str, object]:
    """Every node's recorded shape (shapes of tuple items too); with ``rerun``, recorded
    anew by running it through a copy of ``gm``."""
    if rerun is not None:
        gm = copy.deepcopy(gm)
        propagate_shapes(gm, (rerun,))

    def shape_of(meta: object) -> object:
        if isinstance(meta, TensorMetadata):
            return tuple(meta.shape)
        return [shape_of(m) for m in meta] if isinstance(meta, tuple | list) else None

    return {n.name: shape_of(n.meta.get("tensor_meta")) for n in gm.graph.nodes}


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| / max |expected|: the tolerance measure the tests state."""
    return ((actual - expected).abs().max() / expected.abs().max()).item()


class ResidualNet(nn.Module):
    """conv-bn-relu stem, a residual block with add+relu, and a linear-bn1d-relu head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.stem_bn = nn.BatchNorm2d(8)
        self.conv = nn.Conv2d(8, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 6)
        self.fc_bn = nn.BatchNorm1d(6)
        self.out = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.stem_bn(self.stem(x)))
        y = self.bn(self.conv(x))
        x = torch.relu(x + y)
        x = x.mean(dim=(2, 3))
        return self.out(self.fc_bn(self.fc(x)).relu())


@pytest.fixture
def residual_net() -> nn.Module:
    torch.manual_seed(0)
    return randomize_batchnorm(ResidualNet()).eval()


@pytest.fixture
def image() -> torch.Tensor:
    return torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))


@pytest.fixture
def ctx(image: torch.Tensor) -> CompileContext:
    return CompileContext.from_inputs((image,))


@pytest.fixture
def without_module(monkeypatch):
    """``without_module(prefix)``: importing any module whose name starts with ``prefix``
    fails from then on in the test, as if the package were not installed."""
    real_import = builtins.__import__

    def hide(prefix: str) -> None:
        def fake_import(name, *args, **kwargs):
            if name.startswith(prefix):
                raise ImportError(f"No module named '{name}'")
            return real_import(name, *args, **kwargs)

        monkeypatch.setattr(builtins, "__import__", fake_import)

    return hide
