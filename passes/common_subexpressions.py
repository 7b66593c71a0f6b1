"""Common-subexpression elimination: ``a = f(x); b = f(x)`` becomes ``a = f(x)``, b -> a.

Two nodes merge when they run the same op with the same arguments (graph values by
identity, constants by value). Only deterministic, side-effect-free nodes merge: random ops
and dropout, in-place ops, and modules that keep state (BatchNorm running statistics) or
draw random numbers are left alone, since merging them would change training behaviour.
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import Any

import torch
from torch import nn
from torch.fx import GraphModule, Node

from fxcomp.nn.fused import FusedModule
from fxcomp.passes.dead_code import has_side_effects
from fxcomp.pipeline.context import CompileContext
from fxcomp.pipeline.pass_manager import Pass, PassResult

__all__ = ["cse", "eliminate_common_subexpressions"]

_RANDOM_NAMES = {
    "bernoulli",
    "multinomial",
    "normal",
    "poisson",
    "rand",
    "rand_like",
    "randint",
    "randint_like",
    "randn",
    "randn_like",
    "randperm",
    "empty",
    "empty_like",
    "new_empty",
    "empty_strided",
    "native_dropout",
    "rrelu",
}
_STATEFUL = (nn.modules.dropout._DropoutNd, nn.RReLU, nn.modules.batchnorm._NormBase)


def _unmergeable_module(module: nn.Module) -> bool:
    if not isinstance(module, FusedModule) and not type(module).__module__.startswith("torch.nn"):
        return True
    for sub in module.modules():
        if isinstance(sub, _STATEFUL) and (
            not isinstance(sub, nn.modules.batchnorm._NormBase) or sub.track_running_stats
        ):
            return True
    return isinstance(getattr(module, "dropout", None), float) and module.dropout > 0


def _freeze(value: Any) -> Hashable:
    if isinstance(value, (list, tuple)):
        return (type(value).__name__, *(_freeze(v) for v in value))
    if isinstance(value, dict):
        return ("dict", *sorted((k, _freeze(v)) for k, v in value.items()))
    if isinstance(value, slice):
        return ("slice", _freeze(value.start), _freeze(value.stop), _freeze(value.step))
    if isinstance(value, torch.Tensor):
        raise TypeError("tensor constants are not compared")
    hash(value)
    return (type(value).__name__, value)


def _key(gm: GraphModule, node: Node) -> Hashable | None:
    if node.op not in {"call_function", "call_method", "call_module", "get_attr"}:
        return None
    if has_side_effects(node) or node.is_impure(impure_random=True):
        return None
    name = str(node.target) if node.op != "call_function" else getattr(node.target, "__name__", "")
    if name in _RANDOM_NAMES or "dropout" in name:
        return None
    if node.op == "call_module" and _unmergeable_module(gm.get_submodule(str(node.target))):
        return None
    try:
        return (node.op, node.target, _freeze(node.args), _freeze(node.kwargs))
    except TypeError:
        return None


def eliminate_common_subexpressions(gm: GraphModule, ctx: CompileContext) -> PassResult:
    """Merge nodes that compute the same deterministic value from the same inputs."""
    seen: dict[Hashable, Node] = {}
    merged = 0
    for node in list(gm.graph.nodes):
        key = _key(gm, node)
        if key is None:
            continue
        if key in seen:
            node.replace_all_uses_with(seen[key])
            gm.graph.erase_node(node)
            merged += 1
        else:
            seen[key] = node
    return PassResult(gm, modified=merged > 0)


def cse() -> Pass:
    """Common-subexpression elimination for deterministic, side-effect-free nodes.

    Example::

        fxcomp.compile(model, x, passes=[fxcomp.passes.cse(), fxcomp.passes.dce()])
    """
    return Pass("cse", eliminate_common_subexpressions)
