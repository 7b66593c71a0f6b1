"""Quantization schemes: the integer grid a tensor is mapped to, per target engine.

``x86``/``fbgemm``: activations uint8 affine (7-bit, ``reduce_range``, so that fbgemm's
non-VNNI kernels cannot saturate), weights int8 symmetric per output channel.
``qnnpack``: activations uint8 affine over the full range, weights int8 symmetric per
output channel restricted to [-127, 127]. ``tensorrt``: activations int8 symmetric with
zero point 0, weights int8 symmetric per channel in [-127, 127]. ``ort`` (ONNX Runtime's
CPU kernels): activations uint8 affine over the full range, weights as ``tensorrt``, in
[-64, 64] (``reduce_range``, as ONNX Runtime's ``quantize_static`` means it) by default on
x86 CPUs without VNNI, where its uint8 x int8 kernels add pairs of products in 16 bits and
saturate on full-range weights. ``xnnpack`` (ExecuTorch's XNNPACK delegate, as PT2E's
``XNNPACKQuantizer`` targets it): activations int8 affine over the full range, weights int8
symmetric per output channel in [-127, 127], average pooling on a grid of its own (XNNPACK's
quantized mean takes input and output grids), hardswish and the sigmoids in float.
``openvino`` (OpenVINO's CPU plugin, reading Q/DQ ONNX): activations with zero point 0, uint8
where the calibrated range holds no negative value (a ReLU's output keeps all 256 levels)
and int8 symmetric elsewhere (a zero point would cost OpenVINO's INT8 convolutions a
compensation term), weights as ``ort`` (7-bit on CPUs without VNNI, as NNCF's overflow fix),
and no Q/DQ step between a convolution and the activation after it (SiLU, hardswish, a
sigmoid...), which OpenVINO fuses into the convolution only then.

Example::

    activation, weight = scheme_for("x86")
    scale, zero_point = activation.qparams(torch.tensor(-1.0), torch.tensor(3.0))
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace

import torch

from fxcomp.ir.errors import InputError

__all__ = [
    "ENGINES",
    "Engine",
    "QScheme",
    "available_engines",
    "deprecated_apis",
    "int8_dot_saturates",
    "packing_engine",
    "scheme_for",
]


@dataclass(frozen=True)
class QScheme:
    """An integer grid: dtype, [qmin, qmax], symmetric or affine, per tensor or per channel.

    With ``reduce_range`` the scale is chosen for half the grid (7 bits; a symmetric grid
    spans [-64, 64]), as non-VNNI int8 kernels need, while values are still stored, and
    clamped, on the whole grid. With ``signed_by_range`` the grid is chosen per tensor from
    its calibrated range (``for_range``): uint8 with zero point 0 where it holds no negative
    value, int8 symmetric where it does; zero points are then always 0.
    """

    dtype: torch.dtype
    qmin: int
    qmax: int
    symmetric: bool
    per_channel: bool = False
    axis: int = 0
    reduce_range: bool = False
    signed_by_range: bool = False

    def for_range(self, lo: torch.Tensor) -> QScheme:
        """The grid for a tensor whose calibrated range starts at ``lo``: this one, or with
        ``signed_by_range``, uint8 from 0 (for ``lo >= 0``) or int8 symmetric.

        Example::

            QScheme(torch.qint8, -128, 127, True, signed_by_range=True).for_range(torch.tensor(0.0))
        """
        if not self.signed_by_range:
            return self
        if bool((lo >= 0).all()):
            return _UINT8  # affine from 0: zero point 0, all 256 levels on [0, hi]
        return _INT8_SYMMETRIC

    def qparams(self, lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Scale (float32) and zero point (int64) that map [lo, hi] (widened to hold 0) onto
        the grid; elementwise for per-channel ranges.

        Example::

            QScheme(torch.quint8, 0, 255, False).qparams(torch.tensor(0.0), torch.tensor(1.0))
        """
        lo = torch.clamp(lo.double(), max=0.0)
        hi = torch.clamp(hi.double(), min=0.0)
        eps = torch.finfo(torch.float32).eps
        qmin, qmax = (
            (self.qmin // 2, self.qmax // 2) if self.reduce_range else (self.qmin, self.qmax)
        )
        if self.symmetric:
            bound = torch.maximum(-lo, hi)
            levels = (qmax - qmin) / 2
            if self.reduce_range:  # [-64, 64], as ONNX Runtime: 2 * 255 * 64 fits in 16 bits
                levels = math.ceil(levels)
            scale = torch.clamp(bound / levels, min=eps)
            centre = 0 if self.dtype == torch.qint8 else (qmin + qmax + 1) // 2
            zero_point = torch.full_like(scale, centre, dtype=torch.int64)
        else:
            scale = torch.clamp((hi - lo) / (qmax - qmin), min=eps)
            zero_point = torch.clamp(qmin - torch.round(lo / scale), qmin, qmax).to(torch.int64)
        return scale.float(), zero_point


@dataclass(frozen=True)
class Engine:
    """The schemes an engine's kernels expect for activations and weights, whether fxcomp
    lowers to its kernels itself (``kernels``: fbgemm/qnnpack, through ``lower``) or leaves
    the reference graph's Q/DQ steps for a runtime to fuse, and which backends take graphs
    quantized for it."""

    name: str
    activation: QScheme
    weight: QScheme
    kernels: bool
    backends: tuple[str, ...]
    # What ``reduce_range`` narrows: uint8 activations (fbgemm's meaning) or, as ONNX
    # Runtime's ``quantize_static`` means it, the weights, by default where
    # ``int8_dot_saturates``.
    narrows_weights: bool = False
    # Whether average pooling and mean get their own output grid (ONNX Runtime's
    # QLinearAveragePool/QLinearGlobalAveragePool take an output scale of their own) instead
    # of rounding again on their input's.
    pools_on_own_grid: bool = False
    # Whether the runtime fuses a convolution with the residual add it feeds (TensorRT:
    # Conv + Add (+ ReLU) as one INT8 kernel), which a Q/DQ pair between them would block.
    fuses_residual_add: bool = False
    # Kinds of op (``fxcomp.quant.ops``) the runtime runs in float between quantized ones,
    # which therefore get no grid of their own: ExecuTorch's XNNPACK delegate takes
    # hardswish and the sigmoids in float only (PT2E's XNNPACKQuantizer leaves them so too).
    float_kinds: frozenset[str] = frozenset()
    # Whether the runtime fuses every element-wise activation (SiLU, GELU, hardswish, the
    # sigmoids; ``fxcomp.quant.ops.is_activation``) into the convolution or linear before it
    # when no Q/DQ step separates them, as QDQ runtimes all do with ReLU and clamps: OpenVINO
    # runs them as post-ops of its INT8 convolutions, and in float between Q/DQ steps.
    fuses_activations: bool = False


_UINT8_7BIT = QScheme(torch.quint8, 0, 255, symmetric=False, reduce_range=True)
_UINT8 = QScheme(torch.quint8, 0, 255, symmetric=False)
_INT8_SYMMETRIC = QScheme(torch.qint8, -128, 127, symmetric=True)
_INT8 = QScheme(torch.qint8, -128, 127, symmetric=False)
_WEIGHT = QScheme(torch.qint8, -128, 127, symmetric=True, per_channel=True)
_WEIGHT_NARROW = QScheme(torch.qint8, -127, 127, symmetric=True, per_channel=True)
_SIGNED_BY_RANGE = QScheme(torch.qint8, -128, 127, symmetric=True, signed_by_range=True)

_TORCHSCRIPT, _MOBILE, _ONNX = ("torchscript",), ("torchscript", "mobile"), ("onnx",)
_EXECUTORCH, _OPENVINO = ("executorch",), ("openvino",)

ENGINES: dict[str, Engine] = {
    "x86": Engine("x86", _UINT8_7BIT, _WEIGHT, True, _TORCHSCRIPT),
    "fbgemm": Engine("fbgemm", _UINT8_7BIT, _WEIGHT, True, _TORCHSCRIPT),
    "qnnpack": Engine("qnnpack", _UINT8, _WEIGHT_NARROW, True, _MOBILE),
    "tensorrt": Engine(
        "tensorrt",
        _INT8_SYMMETRIC,
        _WEIGHT_NARROW,
        False,
        _ONNX + _OPENVINO,
        fuses_residual_add=True,
    ),
    "ort": Engine(
        "ort",
        _UINT8,
        _WEIGHT_NARROW,
        False,
        _ONNX + _OPENVINO,
        narrows_weights=True,
        pools_on_own_grid=True,
    ),
    "openvino": Engine(
        "openvino",
        _SIGNED_BY_RANGE,
        _WEIGHT_NARROW,
        False,
        _OPENVINO,
        narrows_weights=True,
        pools_on_own_grid=True,
        fuses_activations=True,
    ),
    "xnnpack": Engine(
        "xnnpack",
        _INT8,
        _WEIGHT_NARROW,
        False,
        _EXECUTORCH,
        pools_on_own_grid=True,
        float_kinds=frozenset({"hardswish", "fixed"}),
    ),
}


def int8_dot_saturates() -> bool:
    """Whether this CPU's uint8 x int8 dot products saturate: x86 without VNNI (AVX2 and
    AVX-512 ``vpmaddubsw`` add two products in 16 bits), where ONNX Runtime's and fbgemm's
    int8 kernels need 7-bit weights or activations."""
    caps = torch.cpu.get_capabilities()
    vnni = ("avx512_vnni", "avx_vnni", "amx_int8")
    return caps.get("architecture") == "x86_64" and not any(caps.get(k) for k in vnni)


def scheme_for(
    engine: str, *, per_channel: bool = True, reduce_range: bool | None = None
) -> tuple[QScheme, QScheme]:
    """(activation scheme, weight scheme) for ``engine``; options override the defaults.
    ``reduce_range`` is the 7-bit scale of uint8 activations, or of the weights for engines
    that ``narrows_weights`` (``ort``; by default on CPUs where ``int8_dot_saturates``).

    Example::

        activation, weight = scheme_for("qnnpack", per_channel=False)
    """
    if engine not in ENGINES:
        raise InputError(
            f"unknown quantization engine '{engine}'", hint=f"choose one of {', '.join(ENGINES)}"
        )
    chosen = ENGINES[engine]
    activation, weight = chosen.activation, chosen.weight
    if chosen.narrows_weights:
        narrow = int8_dot_saturates() if reduce_range is None else reduce_range
        weight = replace(weight, reduce_range=narrow)
    elif reduce_range is not None and activation.dtype == torch.quint8:
        activation = replace(activation, reduce_range=reduce_range)
    if not per_channel:
        weight = replace(weight, per_channel=False)
    return activation, weight


def available_engines() -> list[str]:
    """The quantized engines this torch build has (x86, fbgemm, qnnpack, onednn)."""
    return list(torch.backends.quantized.supported_engines)


@contextmanager
def packing_engine(engine: str) -> Iterator[None]:
    """Set torch's quantized engine while weights are packed for ``engine``, then restore it.

    Example::

        with packing_engine("qnnpack"):
            qconv.set_weight_bias(qweight, bias)
    """
    available = available_engines()
    if engine not in available:
        raise InputError(
            f"this torch build has no '{engine}' quantized engine",
            hint=f"available: {', '.join(available)}",
        )
    previous = torch.backends.quantized.engine
    torch.backends.quantized.engine = engine
    try:
        yield
    finally:
        torch.backends.quantized.engine = previous


@contextmanager
def deprecated_apis() -> Iterator[None]:
    """Silence torch's deprecation warnings for what the fbgemm/qnnpack path needs.

    Quantized tensors, TorchScript and the lite interpreter are deprecated upstream, but the
    fbgemm/qnnpack kernels take quantized tensors, and TorchScript and the lite interpreter
    are how they deploy.

    Example::

        with deprecated_apis():
            q = torch.quantize_per_tensor(x, 0.1, 0, torch.quint8)
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*quantized tensor creation functions.*")
        warnings.filterwarnings("ignore", message=r".*torch\.jit.* is deprecated.*")
        warnings.filterwarnings("ignore", message=".*Lite Interpreter is deprecated.*")
        yield
