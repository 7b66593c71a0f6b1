"""Observer insertion: ``op(x) -> observe(op(observe(x)))`` on every quantizable edge.

Every node's quantization kind (``fxcomp.quant.ops``) is decided here and recorded in
``node.meta["fxcomp_quant"]``; ``freeze`` and ``lower`` follow that record. Inputs of
weighted, binary, cat, hardswish and fixed-grid ops get an observer (one per producing
edge, shared by its consumers), and so do their outputs; sigmoid-like ops get their
kernel's fixed grid directly. Ops that keep their input's grid (pooling, ReLU, reshapes)
stay quantized when their input is, and add nothing; on engines whose runtimes give
average pooling its own output grid (``ort``) it is observed as an own-grid op,
``pooled``. Fused units from ``fuse`` are single nodes, so no observer sits between a conv
and its ReLU.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch.fx import GraphModule, Node

from fxcomp.context import CompileContext
from fxcomp.errors import InputError
from fxcomp.pass_manager import Pass, PassResult
from fxcomp.quant.observers import OBSERVERS
from fxcomp.quant.ops import SkipSpec, is_clamp, kind_of, tensor_inputs
from fxcomp.quant.reference import QuantDequant
from fxcomp.quant.scheme import ENGINES, KERNEL_ENGINES, scheme_for

__all__ = ["FLOAT_LAYERS", "ObserverOptions", "insert_observers", "observe"]

# Layers that mixed precision chose to keep in float, skipped as ``skip`` names are.
FLOAT_LAYERS = "fxcomp_float_layers"

_OWN_GRID = ("weighted", "binary", "cat", "hardswish", "fixed", "pooled")
# Quantized sigmoid/hardsigmoid kernels output this grid on uint8 engines.
_FIXED_UINT8 = (torch.tensor(1.0 / 256), torch.tensor(0))


@dataclass(frozen=True)
class ObserverOptions:
    """Engine and observer choice for ``insert_observers``."""

    engine: str = "x86"
    observer: str = "mse"
    skip: tuple[SkipSpec, ...] = ()
    per_channel: bool = True
    reduce_range: bool | None = None
    observer_args: dict = field(default_factory=dict)
    only_nodes: frozenset[str] | None = None  # of the ops with own grids, only these


def _insert_after(gm: GraphModule, node: Node, name: str, module: torch.nn.Module, ctx) -> Node:
    gm.add_submodule(name, module)
    with gm.graph.inserting_after(node):
        new = gm.graph.call_module(name, (node,))
    new.meta = {
        "tensor_meta": node.meta.get("tensor_meta"),
        "stack_trace": node.meta.get("stack_trace"),
        "fxcomp_pass": ctx.current_pass,
        "fxcomp_quant": "observer",
    }
    return new


def insert_observers(
    gm: GraphModule, ctx: CompileContext, *, options: ObserverOptions = ObserverOptions()
) -> PassResult:
    """Insert observers on the quantizable edges of ``gm`` (module docstring)."""
    if options.observer not in OBSERVERS:
        raise InputError(
            f"unknown observer '{options.observer}'", hint=f"choose one of {', '.join(OBSERVERS)}"
        )
    activation, _ = scheme_for(
        options.engine, per_channel=options.per_channel, reduce_range=options.reduce_range
    )
    pools_on_own_grid = ENGINES[options.engine].pools_on_own_grid
    make = OBSERVERS[options.observer]
    skip = (*options.skip, *gm.meta.get(FLOAT_LAYERS, ()))
    qdq = options.engine not in KERNEL_ENGINES  # exported as Q/DQ pairs (ONNX)
    # Observers from an earlier run already make their edges quantized.
    quantized = {n for n in gm.graph.nodes if n.meta.get("fxcomp_quant") == "observer"}
    observed: dict[Node, Node] = {}

    def ensure_observed(value: Node) -> Node:
        if value in quantized:
            return value
        if value not in observed:
            obs = _insert_after(
                gm, value, f"{value.name}_observer", make(activation, **options.observer_args), ctx
            )
            quantized.add(obs)
            observed[value] = obs
        return observed[value]

    added = 0
    for node in list(gm.graph.nodes):
        if node in quantized:
            continue
        kind = kind_of(gm, node, skip)
        if kind == "requant" and pools_on_own_grid:
            kind = "pooled"
        if options.only_nodes is not None and node.name not in options.only_nodes:
            kind = "float" if kind in _OWN_GRID else kind  # grid-keeping ops follow inputs
        node.meta["fxcomp_quant"] = kind
        inputs = tensor_inputs(node)
        users = list(node.users)
        if kind in _OWN_GRID and users and all(u in quantized for u in users):
            observed[node] = users[0]  # already observed
        elif kind in _OWN_GRID:
            for value in inputs:
                before = len(observed)
                node.replace_input_with(value, ensure_observed(value))
                added += len(observed) - before
            if qdq and kind == "weighted" and len(users) == 1 and is_clamp(gm, users[0]):
                # Conv -> ReLU6 -> Q/DQ, not Conv -> Q/DQ -> ReLU6: QDQ runtimes fuse the
                # clamp into the Conv only when no Q/DQ step separates them
                node = users[0]
                node.meta["fxcomp_quant"] = "shared"
                quantized.add(node)
            if kind == "fixed" and activation.dtype == torch.quint8:
                out = _insert_after(
                    gm, node, f"{node.name}_fixed", QuantDequant(*_FIXED_UINT8, activation), ctx
                )
            else:
                out = _insert_after(
                    gm,
                    node,
                    f"{node.name}_observer",
                    make(activation, **options.observer_args),
                    ctx,
                )
            node.replace_all_uses_with(out, delete_user_cb=lambda user, out=out: user is not out)
            quantized.add(out)
            observed[node] = out
            added += 1
        elif kind in ("shared", "requant") and inputs and inputs[0] in quantized:
            quantized.add(node)
    return PassResult(gm, modified=added > 0)


def observe(
    *,
    engine: str = "x86",
    observer: str = "mse",
    skip: Sequence[SkipSpec] = (),
    per_channel: bool = True,
    reduce_range: bool | None = None,
) -> Pass:
    """Insert observers on every quantizable edge (the first step of ``quantize``).

    Example::

        fxcomp.compile(model, x, passes=[fuse(), observe(engine="x86")])
    """
    options = ObserverOptions(engine, observer, tuple(skip), per_channel, reduce_range)

    def run(gm: GraphModule, ctx: CompileContext) -> PassResult:
        return insert_observers(gm, ctx, options=options)

    return Pass("insert_observers", run, run_after=("fuse",))
