"""Dynamic quantization: ``Linear(x) -> DynamicLinear(x)``, ``LSTM/GRU -> DynamicLSTM/GRU``.

Weights become int8 now (symmetric, per output channel unless ``per_channel=False``, in
[-127, 127]; for LSTM/GRU per gate matrix); activations are quantized on the fly, per
batch, by the kernel, so no calibration is needed. This is the usual compression for
Linear-heavy models (Transformers' projections, recurrent networks) whose activation
ranges vary from input to input. The layers lower directly to the fbgemm/qnnpack dynamic
kernels (``torch.ao.nn.quantized.dynamic``), packed for ``engine``, or, for
``engine="ort"``, to ``DynamicLinear`` (``fxcomp.quant.dynamic``), which the ONNX backend
writes as ONNX Runtime's ``DynamicQuantizeLinear``/``MatMulInteger`` (and for
``engine="xnnpack"`` the ExecuTorch backend as XNNPACK's dynamically quantized linear);
every Linear, LSTM and
GRU anywhere in the model is converted (inside fused units and leaf modules too) unless
its qualified name is in ``skip``. A ``TransformerEncoderLayer`` whose feed-forward layers
were converted runs its layer-by-layer path (its fused fast path reads float weights;
``torch.ao.quantization.quantize_dynamic`` leaves such a model failing). The attention's
own projections (``in_proj_weight``, ``out_proj``) are read as tensors by
``MultiheadAttention`` and stay float, as with ``torch.ao``, unless ``unpack_attention``
ran first: it makes each ``MultiheadAttention`` in the graph an ``Attention`` whose
``q_proj``, ``k_proj``, ``v_proj`` and ``out_proj`` are Linear layers, converted here
like any other.
``report.tables["quantize_dynamic"]`` lists the layers with their weight SQNR.

Example::

    result = fxcomp.compile(model, x, passes=[fxcomp.passes.quantize_dynamic()])
    vit = fxcomp.compile(vit, x, passes=[unpack_attention(), quantize_dynamic()])
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.ao.nn.quantized.dynamic as nnqd
from torch import nn
from torch.ao.nn.quantized.dynamic.modules.rnn import PackedParameter
from torch.fx import GraphModule

from fxcomp.ir.errors import InputError
from fxcomp.ir.graph import replace_module
from fxcomp.pipeline.context import CompileContext
from fxcomp.pipeline.pass_manager import Pass, PassResult
from fxcomp.quant.config import QUANT_CONFIG, QuantConfig
from fxcomp.quant.dynamic import DynamicLinear
from fxcomp.quant.reference import weight_qparams
from fxcomp.quant.scheme import ENGINES, QScheme, deprecated_apis, packing_engine
from fxcomp.runtime.parity import sqnr

__all__ = ["DynamicOptions", "quantize_dynamic", "quantize_dynamic_layers"]

_WEIGHT = QScheme(torch.qint8, -127, 127, symmetric=True, per_channel=True)
# runtimes that quantize a Linear's input on the fly themselves, from ``DynamicLinear``
_DYNAMIC_RUNTIMES = ("ort", "xnnpack")


@dataclass(frozen=True)
class DynamicOptions:
    """The graph's config: target engine, weight granularity and the layers (by name) left
    in float."""

    config: QuantConfig = QuantConfig()

    def check(self) -> None:
        """Raise ``InputError`` for an engine without dynamic kernels."""
        if not self.config.target.kernels and self.config.engine not in _DYNAMIC_RUNTIMES:
            kernels = [name for name, engine in ENGINES.items() if engine.kernels]
            raise InputError(
                f"quantize_dynamic runs fbgemm/qnnpack kernels, or ONNX Runtime's "
                f"(engine='ort') or XNNPACK's (engine='xnnpack'); {self.config.engine!r} has "
                "none",
                hint=f"use engine {' / '.join([*kernels, *_DYNAMIC_RUNTIMES])}",
            )


def _quantized(weight: torch.Tensor, per_channel: bool) -> torch.Tensor:
    scheme = _WEIGHT if per_channel else QScheme(torch.qint8, -127, 127, symmetric=True)
    scale, zero_point = weight_qparams(weight.detach().float(), scheme)
    if per_channel:
        return torch.quantize_per_channel(
            weight.detach().float(), scale.double(), zero_point, 0, torch.qint8
        )
    return torch.quantize_per_tensor(
        weight.detach().float(), float(scale), int(zero_point), torch.qint8
    )


def _linear(layer: nn.Linear, per_channel: bool) -> tuple[nn.Module, list[float]]:
    quantized = nnqd.Linear(
        layer.in_features, layer.out_features, bias_=layer.bias is not None, dtype=torch.qint8
    )
    weight = _quantized(layer.weight, per_channel)
    quantized.set_weight_bias(weight, layer.bias)
    return quantized, [sqnr(layer.weight, weight.dequantize())]


def _runtime_linear(name: str, layer: nn.Module, engine: str) -> tuple[nn.Module, list[float]]:
    """A Linear as ONNX Runtime or XNNPACK runs it dynamically (``DynamicLinear``)."""
    if not isinstance(layer, nn.Linear):
        raise InputError(
            f"'{name}' is a {type(layer).__name__}: quantize_dynamic(engine='{engine}') "
            "converts Linear layers; recurrent layers run on fbgemm/qnnpack's dynamic kernels",
            hint=f"skip=['{name}'], or engine='x86' with the TorchScript backend",
        )
    quantized = DynamicLinear(layer)
    return quantized, [sqnr(layer.weight, quantized.weight())]


def _recurrent(layer: nn.LSTM | nn.GRU, per_channel: bool) -> tuple[nn.Module, list[float]]:
    if not layer.bias:
        raise InputError(f"a {type(layer).__name__} without biases has no dynamic kernel")
    kind = nnqd.LSTM if isinstance(layer, nn.LSTM) else nnqd.GRU
    quantized = kind(
        layer.input_size,
        layer.hidden_size,
        layer.num_layers,
        layer.bias,
        layer.batch_first,
        layer.dropout,
        layer.bidirectional,
        torch.qint8,
    )
    cells, errors = [], []
    for index in range(layer.num_layers):
        for suffix in ("", "_reverse")[: 2 if layer.bidirectional else 1]:
            packed, biases = [], []
            for part in ("ih", "hh"):
                weight = getattr(layer, f"weight_{part}_l{index}{suffix}")
                bias = getattr(layer, f"bias_{part}_l{index}{suffix}")
                q = _quantized(weight, per_channel)
                errors.append(sqnr(weight, q.dequantize()))
                packed.append(torch.ops.quantized.linear_prepack(q, bias))
                biases.append(bias)
            params = torch.ops.quantized.make_quantized_cell_params_dynamic(*packed, *biases, True)
            cells.append(PackedParameter(params))
    quantized._all_weight_values = nn.ModuleList(cells)
    return quantized, errors


def quantize_dynamic_layers(
    gm: GraphModule, ctx: CompileContext, *, options: DynamicOptions = DynamicOptions()
) -> PassResult:
    """Convert every Linear, LSTM and GRU of ``gm`` (module docstring)."""
    options.check()
    config = options.config
    found = [
        (name, m)
        for name, m in gm.named_modules()
        if type(m) in (nn.Linear, nn.LSTM, nn.GRU) and name not in config.skip
    ]
    rows = []
    with packing_engine(config.engine if config.target.kernels else "x86"), deprecated_apis():
        for name, layer in found:
            if not config.target.kernels:  # the runtime's own dynamic Linear
                quantized, errors = _runtime_linear(name, layer, config.engine)
            else:
                convert = _linear if isinstance(layer, nn.Linear) else _recurrent
                quantized, errors = convert(layer, config.per_channel)
            replace_module(gm, name, quantized)
            rows.append(
                {
                    "layer": name,
                    "type": type(layer).__name__,
                    "weights": sum(p.numel() for n, p in layer.named_parameters() if "weight" in n),
                    "weight_sqnr_db": f"{min(errors):.2f}",
                }
            )
    for module in gm.modules():
        if isinstance(module, nn.TransformerEncoderLayer) and not isinstance(
            module.linear1, nn.Linear
        ):
            # its fused fast path reads linear1.weight as a float tensor; the layer-by-layer
            # path computes the same with the dynamic kernels
            module.activation_relu_or_gelu = 0
    if rows:
        ctx.state.report.tables["quantize_dynamic"] = rows
        QUANT_CONFIG.set(gm, config)
    return PassResult(gm, modified=bool(rows))


def quantize_dynamic(
    *, engine: str = "x86", per_channel: bool = True, skip: Sequence[str] = ()
) -> Pass:
    """Dynamic INT8 quantization of every Linear, LSTM and GRU (module docstring).

    Example::

        passes=[quantize_dynamic(engine="x86")]
    """
    options = DynamicOptions(QuantConfig(engine, per_channel=per_channel, skip=tuple(skip)))
    options.check()

    def run(gm: GraphModule, ctx: CompileContext) -> PassResult:
        return quantize_dynamic_layers(gm, ctx, options=options)

    after = ("fuse", "prune", "distill", "unpack_attention")
    return Pass("quantize_dynamic", run, run_after=after, options=options)
