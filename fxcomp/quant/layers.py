"""What each layer of a lowered or reference graph computes in: its weight and output grids,
or float.

Example::

    for layer in layer_schemes(lowered_gm):
        layer["name"], layer["precision"], layer.get("output")
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.fx import GraphModule

from fxcomp.ir.graph import module_of
from fxcomp.quant.reference import QuantDequant, QuantizedWeightLayer

__all__ = ["layer_schemes"]

_FLOAT_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


def _grid(scale: Any, zero_point: Any, dtype: Any) -> dict[str, Any]:
    return {
        "dtype": str(dtype).removeprefix("torch."),
        "scale": float(scale),
        "zero_point": int(zero_point),
    }


def _weight(weight: torch.Tensor) -> dict[str, Any]:
    scheme = str(weight.qscheme()).removeprefix("torch.")
    figures: dict[str, Any] = {"dtype": str(weight.dtype).removeprefix("torch."), "qscheme": scheme}
    if scheme.startswith("per_channel"):
        figures["axis"] = int(weight.q_per_channel_axis())
        figures["channels"] = int(weight.q_per_channel_scales().numel())
    return figures


def _reference_layer(gm: GraphModule, node: Any, layer: QuantizedWeightLayer) -> dict[str, Any]:
    """A reference graph's quantized Conv/Linear: its weight scheme and, when one Q/DQ step
    reads it, its output grid."""
    scale = layer.weight_scale
    weight: dict[str, Any] = {
        "dtype": str(layer.scheme.dtype).removeprefix("torch."),
        "qscheme": "per_channel_symmetric" if scale.dim() else "per_tensor_symmetric",
    }
    if scale.dim():
        weight.update(axis=layer.scheme.axis, channels=int(scale.numel()))
    entry = {"name": str(node.target), "op": type(layer.weighted).__name__, "precision": "int8"}
    entry["weight"] = weight
    users = list(node.users)
    step = module_of(gm, users[0]) if len(users) == 1 else None
    if isinstance(step, QuantDequant):
        entry["output"] = _grid(step.scale, step.zero_point, step.scheme.dtype)
    return entry


def layer_schemes(gm: GraphModule) -> list[dict[str, Any]]:
    """One entry per quantize step, quantized kernel (a reference graph's quantized
    Conv/Linear) and float Conv/Linear, in graph order: ``name``, ``op``, ``precision``
    (``int8`` or ``float``) and, for quantized ones, the ``output`` grid (dtype, scale,
    zero point) and the ``weight`` scheme.

    Example::

        [layer["name"] for layer in layer_schemes(gm) if layer["precision"] == "float"]
    """
    layers = []
    for node in gm.graph.nodes:
        module = module_of(gm, node)
        entry: dict[str, Any] | None = None
        if module is not None and type(module).__module__.startswith("torch.ao.nn"):
            entry = {"name": str(node.target), "op": type(module).__name__, "precision": "int8"}
            entry["output"] = _grid(module.scale, module.zero_point, torch.quint8)
            weight = getattr(module, "weight", None)
            if callable(weight):
                entry["weight"] = _weight(weight())
        elif isinstance(module, QuantizedWeightLayer):
            entry = _reference_layer(gm, node, module)
        elif isinstance(module, _FLOAT_LAYERS):
            entry = {"name": str(node.target), "op": type(module).__name__, "precision": "float"}
        elif node.op == "call_function" and node.target is torch.quantize_per_tensor:
            entry = {"name": node.name, "op": "quantize", "precision": "int8"}
            entry["output"] = _grid(*node.args[1:4])
        elif node.op == "call_function" and str(node.target).startswith("quantized."):
            op = str(node.target).removeprefix("quantized.").split(".")[0]
            entry = {"name": node.name, "op": op, "precision": "int8"}
            entry["output"] = _grid(node.args[-2], node.args[-1], torch.quint8)
        if entry is not None:
            layers.append(entry)
    return layers
