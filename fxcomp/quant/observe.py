"""Observer insertion: ``op(x) -> observe(op(observe(x)))`` on every quantizable edge.

The graph's ``QuantConfig`` is stored on it here (``QUANT_CONFIG``), once; the steps after
(calibrate, freeze, lower) and the backends read it from there.

Every node's quantization kind (``fxcomp.quant.ops``) is decided here and recorded in
``node.meta[QUANT_KIND]``; ``freeze`` and ``lower`` follow that record. Inputs of
weighted, binary, cat, hardswish and fixed-grid ops get an observer (one per producing
edge, shared by its consumers), and so do their outputs; sigmoid-like ops get their
kernel's fixed grid directly. Ops that keep their input's grid (pooling, ReLU, reshapes)
stay quantized when their input is, and add nothing; on engines whose runtimes give
average pooling its own output grid (``ort``) it is observed as an own-grid op,
``pooled``. Fused units from ``fuse`` are single nodes, so no observer sits between a conv
and its ReLU. On engines whose runtime fuses a convolution into the residual add it feeds
(``tensorrt``), a convolution whose only user is an add keeps a float output: only the add's
other input is quantized, the placement TensorRT's guide gives for Conv + Add (+ ReLU) to
run as one INT8 kernel (``_residual_convs``); a convolution's activation (SiLU, GELU,
hardswish, a sigmoid) likewise takes no Q/DQ step before it where the runtime fuses it
(``Engine.fuses_activations``: ``openvino``). Kinds of op an engine's runtime runs in float
(``Engine.float_kinds``: hardswish and the sigmoids on ``xnnpack``) stay float.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
from torch import nn
from torch.fx import GraphModule, Node

from fxcomp.ir.errors import InputError
from fxcomp.ir.meta import MADE_BY
from fxcomp.nn.fused import add_relu
from fxcomp.pipeline.context import CompileContext
from fxcomp.pipeline.pass_manager import PassResult
from fxcomp.quant.config import FLOAT_LAYERS, QUANT_CONFIG, QuantConfig
from fxcomp.quant.observers import OBSERVERS
from fxcomp.quant.ops import (
    QUANT_KIND,
    check_skip,
    is_activation,
    is_clamp,
    kind_of,
    tensor_inputs,
)
from fxcomp.quant.reference import QuantDequant

__all__ = ["ObserveOptions", "insert_observers"]

_OWN_GRID = ("weighted", "binary", "cat", "hardswish", "fixed", "pooled")
# Quantized sigmoid/hardsigmoid kernels output this grid on uint8 engines.
_FIXED_UINT8 = (torch.tensor(1.0 / 256), torch.tensor(0))
_ADDS = (operator.add, torch.add, add_relu)
_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


@dataclass(frozen=True)
class ObserveOptions:
    """The graph's quantization config, and (for the per-layer analysis) the only ops with
    their own grid to observe."""

    config: QuantConfig = QuantConfig()
    only_nodes: frozenset[str] | None = None  # of the ops with own grids, only these


def _insert_after(gm: GraphModule, node: Node, name: str, module: torch.nn.Module, ctx) -> Node:
    gm.add_submodule(name, module)
    with gm.graph.inserting_after(node):
        new = gm.graph.call_module(name, (node,))
    new.meta = {
        "tensor_meta": node.meta.get("tensor_meta"),
        "stack_trace": node.meta.get("stack_trace"),
        MADE_BY: ctx.state.current_pass,
        QUANT_KIND: "observer",
    }
    return new


def _residual_convs(gm: GraphModule, skip: tuple, only: frozenset[str] | None) -> set[Node]:
    """For each quantized add of two tensors, the first of its inputs that is a plain
    convolution (no ReLU grouped in) read by nothing else: the one the runtime fuses the add
    into."""
    found = set()
    for add in gm.graph.nodes:
        if add.op != "call_function" or add.target not in _ADDS:
            continue
        if kind_of(gm, add, skip) == "float" or (only is not None and add.name not in only):
            continue
        conv = next(
            (
                value
                for value in tensor_inputs(add)
                if value.op == "call_module"
                and type(gm.get_submodule(str(value.target))) in _CONVS
                and kind_of(gm, value, skip) == "weighted"
                and len(value.users) == 1
            ),
            None,
        )
        if conv is not None and len(set(tensor_inputs(add))) == 2:
            found.add(conv)
    return found


def insert_observers(
    gm: GraphModule, ctx: CompileContext, *, options: ObserveOptions = ObserveOptions()
) -> PassResult:
    """Insert observers on the quantizable edges of ``gm`` (module docstring)."""
    config = options.config
    stored = QUANT_CONFIG.get(gm)
    if stored is not None and stored != config:
        raise InputError(
            f"the graph is already quantized for {stored}; one graph takes one config",
            hint=f"quantize it again from the float model, or keep {stored}",
        )
    activation, _ = config.schemes()
    pools_on_own_grid = config.target.pools_on_own_grid
    make = OBSERVERS[config.observer]
    check_skip(gm, config.skip)
    skip = (*config.skip, *FLOAT_LAYERS.get(gm, ()))
    qdq = not config.target.kernels  # exported as Q/DQ pairs (ONNX)
    # Observers from an earlier run already make their edges quantized.
    quantized = {n for n in gm.graph.nodes if n.meta.get(QUANT_KIND) == "observer"}
    observed: dict[Node, Node] = {}
    fused = qdq and config.target.fuses_residual_add

    def fused_after(user: Node) -> bool:  # an activation the runtime fuses into its producer
        fuses = is_activation if config.target.fuses_activations else is_clamp
        return fuses(gm, user)

    residual = _residual_convs(gm, skip, options.only_nodes) if fused else set()

    def ensure_observed(value: Node) -> Node:
        if value in quantized:
            return value
        if value not in observed:
            obs = _insert_after(gm, value, f"{value.name}_observer", make(activation), ctx)
            quantized.add(obs)
            observed[value] = obs
        return observed[value]

    added = 0
    for node in list(gm.graph.nodes):
        if node in quantized:
            continue
        kind = kind_of(gm, node, skip)
        if kind in config.target.float_kinds:
            kind = "float"
        if kind == "requant" and pools_on_own_grid:
            kind = "pooled"
        if options.only_nodes is not None and node.name not in options.only_nodes:
            kind = "float" if kind in _OWN_GRID else kind  # grid-keeping ops follow inputs
        node.meta[QUANT_KIND] = kind
        inputs = tensor_inputs(node)
        users = list(node.users)
        if kind in _OWN_GRID and users and all(u in quantized for u in users):
            observed[node] = users[0]  # already observed
        elif kind in _OWN_GRID:
            for value in inputs:
                if value in residual:
                    continue  # fused with this add: its output stays float
                before = len(observed)
                node.replace_input_with(value, ensure_observed(value))
                added += len(observed) - before
            if qdq and kind == "weighted" and len(users) == 1 and fused_after(users[0]):
                # Conv -> ReLU6 -> Q/DQ, not Conv -> Q/DQ -> ReLU6: QDQ runtimes fuse the
                # clamp (OpenVINO any activation) into the Conv only when no Q/DQ step
                # separates them
                node = users[0]
                node.meta[QUANT_KIND] = "shared"
                quantized.add(node)
            if node in residual:
                continue
            if kind == "fixed" and activation.dtype == torch.quint8:
                out = _insert_after(
                    gm, node, f"{node.name}_fixed", QuantDequant(*_FIXED_UINT8, activation), ctx
                )
            else:
                out = _insert_after(gm, node, f"{node.name}_observer", make(activation), ctx)
            node.replace_all_uses_with(out, delete_user_cb=lambda user, out=out: user is not out)
            quantized.add(out)
            observed[node] = out
            added += 1
        elif kind in ("shared", "requant") and inputs and inputs[0] in quantized:
            quantized.add(node)
    if added:
        QUANT_CONFIG.set(gm, config)
    return PassResult(gm, modified=added > 0)
