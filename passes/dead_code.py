"""Dead-code elimination: ``y = f(x)`` with ``y`` unused is dropped, then unused modules.

A node that mutates an input (in-place methods and functions such as ``x.add_(1)``,
``operator.setitem``, ``F.relu(x, inplace=True)``, a module built with ``inplace=True``) or
has other side effects stays even when nothing uses its value.
"""

from __future__ import annotations

import operator

from torch.fx import GraphModule, Node

from fxcomp.ir.graph import drop_unused
from fxcomp.pipeline.context import CompileContext
from fxcomp.pipeline.pass_manager import Pass, PassResult

__all__ = ["dce", "eliminate_dead_code", "has_side_effects"]

_MUTATING_OPERATORS = {
    operator.setitem,
    operator.delitem,
    operator.iadd,
    operator.isub,
    operator.imul,
    operator.itruediv,
    operator.ifloordiv,
    operator.imod,
    operator.ipow,
    operator.iand,
    operator.ior,
    operator.ixor,
    operator.ilshift,
    operator.irshift,
    operator.imatmul,
}


def _is_inplace_name(name: str) -> bool:
    return name.endswith("_") and not name.endswith("__")


def has_side_effects(node: Node) -> bool:
    """True when ``node`` must run even if its value is unused (side effects, mutation).

    Example::

        [n for n in gm.graph.nodes if has_side_effects(n)]
    """
    if node.is_impure():
        return True
    if node.op == "call_method":
        return _is_inplace_name(str(node.target))
    if node.op == "call_function":
        if node.target in _MUTATING_OPERATORS or node.kwargs.get("inplace") is True:
            return True
        return _is_inplace_name(getattr(node.target, "__name__", ""))
    if node.op == "call_module":
        module = node.graph.owning_module.get_submodule(str(node.target))
        return getattr(module, "inplace", False) is True
    return False


def eliminate_dead_code(gm: GraphModule, ctx: CompileContext) -> PassResult:
    """Remove nodes whose values are unused and free of side effects, then unused modules."""
    modules_before = sum(1 for _ in gm.named_modules())
    removed = gm.graph.eliminate_dead_code(is_impure_node=has_side_effects)
    drop_unused(gm)
    return PassResult(gm, removed or sum(1 for _ in gm.named_modules()) != modules_before)


def _no_dead_nodes(gm: GraphModule, ctx: CompileContext) -> str | None:
    dead = [n.name for n in gm.graph.nodes if not n.users and not has_side_effects(n)]
    return f"unused nodes left: {dead}" if dead else None


def dce() -> Pass:
    """Dead-code elimination: drop unused side-effect-free nodes and unused submodules.

    Example::

        fxcomp.compile(model, x, passes=[fxcomp.passes.dce()])
    """
    return Pass("dce", eliminate_dead_code, postcondition=_no_dead_nodes)
