"""Freezing: observers become fixed Q/DQ steps; the result is the reference quantized graph.

``observe(x) -> QuantDequant(scale, zero_point)(x)`` with the observer's qparams;
``Conv(x) -> QuantizedWeightLayer(Conv)(x)`` (weight quantized per output channel) where
the layer's input is quantized; and after ops that keep their input's grid but round again
(average pooling, mean) a Q/DQ on that grid, so that the reference rounds where the
quantized kernels do. The weight grid is the graph's ``QuantConfig``'s (stored by
``insert_observers``). An observer that saw no data is an error: calibrate first. Under
torchrun, every rank's observer statistics are merged before any is frozen.
"""

from __future__ import annotations

import torch
from torch.fx import GraphModule

from fxcomp.ir.errors import InputError
from fxcomp.ir.graph import drop_unused, module_of, replace_module
from fxcomp.ir.meta import MADE_BY
from fxcomp.pipeline.context import CompileContext
from fxcomp.pipeline.pass_manager import PassResult
from fxcomp.quant.config import QUANT_CONFIG
from fxcomp.quant.observers import Observer
from fxcomp.quant.ops import QUANT_KIND, tensor_inputs
from fxcomp.quant.reference import QuantDequant, QuantizedWeightLayer, grid_of
from fxcomp.runtime.distributed import average_buffers

__all__ = ["freeze_qparams"]


def freeze_qparams(gm: GraphModule, ctx: CompileContext) -> PassResult:
    """Turn the observed graph into the reference quantized graph (module docstring)."""
    config = QUANT_CONFIG.get(gm)
    weight_scheme = config.schemes()[1] if config is not None else None
    average_buffers(gm)  # under torchrun, every rank's observers merged first
    changed = False
    for node in list(gm.graph.nodes):
        module = module_of(gm, node)
        if isinstance(module, Observer):
            if not module.batches:
                raise InputError(
                    f"observer '{node.target}' has seen no data",
                    hint="run calibrate (or quantize(calibration_data)) before freeze",
                )
            name = str(node.target).removesuffix("_observer") + "_qdq"
            gm.add_submodule(name, QuantDequant(*module.grid()))
            node.target = name
            changed = True
    for node in list(gm.graph.nodes):
        kind = node.meta.get(QUANT_KIND)
        inputs = tensor_inputs(node)
        if kind == "weighted" and inputs and grid_of(gm, inputs[0]) is not None:
            layer = gm.get_submodule(str(node.target))
            if not isinstance(layer, QuantizedWeightLayer):  # a layer called twice: once
                replace_module(gm, str(node.target), QuantizedWeightLayer(layer, weight_scheme))
                changed = True
        elif kind == "requant" and inputs and (grid := grid_of(gm, inputs[0])) is not None:
            name = f"{node.name}_requant"
            gm.add_submodule(name, QuantDequant(grid.scale, grid.zero_point, grid.scheme))
            with gm.graph.inserting_after(node):
                new = gm.graph.call_module(name, (node,))
            new.meta = {
                **node.meta,
                QUANT_KIND: "observer",
                MADE_BY: ctx.state.current_pass,
            }
            node.replace_all_uses_with(new, delete_user_cb=lambda user, new=new: user is not new)
            changed = True
    drop_unused(gm)
    gm.recompile()
    with torch.no_grad():
        ctx.state.reference_outputs = gm(*ctx.config.example_inputs)
    return PassResult(gm, modified=changed)
