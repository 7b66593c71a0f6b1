"""Symbolic tracing of a copy of the user's model, and shape propagation.

``prepared_copy`` deep-copies the model, puts the copy in eval mode and drops its hooks (the
caller's model is never touched); ``symbolic_trace`` traces that copy with torch.fx, each
node carrying the user's source line; ``propagate_shapes`` runs example inputs through a
graph so that every node carries its output shape and dtype in ``node.meta["tensor_meta"]``
(torch's ``TensorMetadata``). ``fxcomp.ir.capture`` puts them together, with
``torch.export`` where symbolic tracing fails.

Example::

    gm = symbolic_trace(prepared_copy(model), leaf_modules=["gate"])
    propagate_shapes(gm, (torch.randn(1, 3, 224, 224),))
"""

from __future__ import annotations

import inspect
import linecache
import logging
import operator
import sys
import traceback
from collections.abc import Iterable, Mapping, Sequence
from itertools import chain
from typing import Any

import torch
from torch import nn
from torch.func import functional_call
from torch.fx import Graph, GraphModule, Interpreter, Node, Tracer
from torch.fx.node import map_aggregate
from torch.fx.passes.shape_prop import TensorMetadata
from torch.utils._pytree import tree_map

from fxcomp.ir.errors import InputError, TraceError, did_you_mean
from fxcomp.ir.graph import BATCHNORMS, ELEMENTWISE_MODULES, LIBRARY_DIRS, source_of
from fxcomp.ir.lift import lift_layers
from fxcomp.ir.module_copy import copy_module

__all__ = [
    "LeafSpec",
    "OpaqueModule",
    "prepared_copy",
    "propagate_shapes",
    "symbolic_trace",
    "tensor_metadata",
]

log = logging.getLogger(__name__)

_COMPUTING_OPS = frozenset({"call_module", "call_function", "call_method", "get_attr"})

LeafSpec = str | type[nn.Module]


class OpaqueModule(nn.Module):
    """A module fxcomp's tracer keeps as one node (the units passes create derive from it).

    Example::

        class MyUnit(OpaqueModule): ...   # trace() leaves MyUnit calls whole
    """


class _LeafTracer(Tracer):
    """A tracer that records each node's source line and keeps chosen modules opaque."""

    def __init__(self, leaf_names: frozenset[str], leaf_types: tuple[type, ...]) -> None:
        super().__init__()
        self._leaf_names = leaf_names
        self._leaf_types = leaf_types

    def create_node(self, kind: str, *args: Any, **kwargs: Any) -> Node:
        node = super().create_node(kind, *args, **kwargs)
        if kind in _COMPUTING_OPS:
            # Only the innermost frame outside torch and fxcomp: the line that made the node.
            frame = sys._getframe(1)
            while frame is not None and frame.f_code.co_filename.startswith(LIBRARY_DIRS):
                frame = frame.f_back
            if frame is not None:
                code = frame.f_code
                line = linecache.getline(code.co_filename, frame.f_lineno).strip()
                node.meta["stack_trace"] = (
                    f'  File "{code.co_filename}", line {frame.f_lineno}, in {code.co_name}\n'
                    f"    {line}\n"
                )
        return node

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if module_qualified_name in self._leaf_names or isinstance(m, self._leaf_types):
            return True
        return isinstance(m, OpaqueModule) or super().is_leaf_module(m, module_qualified_name)


def prepared_copy(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` in eval mode without its hooks: what fxcomp captures, so that
    the caller's model is never changed.

    Example::

        root = prepared_copy(model)
    """
    if not isinstance(model, nn.Module):
        raise InputError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    try:
        root = copy_module(model)
    except Exception as err:
        raise TraceError(
            f"cannot copy the model ({type(err).__name__}: {err})",
            hint="fxcomp works on a deep copy so that your model is never changed; make the "
            "model deep-copyable (no open files, locks or generators as attributes)",
        ) from err
    root.eval()
    _drop_hooks(root)
    return root


def symbolic_trace(
    root: nn.Module,
    *,
    leaf_modules: Iterable[LeafSpec] = (),
    concrete_args: Mapping[str, Any] | None = None,
) -> GraphModule:
    """``root`` (a ``prepared_copy``) traced with torch.fx; ``leaf_modules`` names submodules
    (qualified names or classes) to keep as single opaque nodes; ``concrete_args`` fixes
    forward arguments that drive control flow. A failure is a ``TraceError`` naming the
    submodule, the user's source line and the option that gets past it.

    Example::

        gm = symbolic_trace(prepared_copy(model), leaf_modules=["gate"])
    """
    names, types = _split_leaf_specs(root, leaf_modules)
    tracer = _LeafTracer(names, types)
    try:
        graph = tracer.trace(root, concrete_args=dict(concrete_args) if concrete_args else None)
    except Exception as err:
        raise _trace_error(err, tracer) from err
    if concrete_args:
        _default_to_concrete(root, graph, concrete_args)
    _drop_shape_checks(graph)
    gm = GraphModule(tracer.root, graph, type(root).__name__)
    lift_layers(tracer.root, gm)
    return gm


# the operators a shape check computes its condition with (none of them mutates)
_PURE_OPERATORS = frozenset(
    {operator.eq, operator.ne, operator.lt, operator.le, operator.gt, operator.ge}
    | {operator.and_, operator.or_, operator.not_, operator.truth, operator.getitem}
    | {operator.add, operator.sub, operator.mul, operator.floordiv, operator.mod}
)


def _drop_shape_checks(graph: Graph) -> None:
    """Remove ``torch._assert`` calls on a tensor's rank or sizes (timm's
    ``_assert(x.ndim == 4, f"... {x.ndim}")``), and reads of a rank or size nothing uses.
    The checks held for the example inputs; left in, each makes the layer whose output it
    reads look shared, and fusion would not fold it."""
    for check in list(graph.find_nodes(op="call_function", target=torch._assert)):
        if _checks_shapes_only(check):
            graph.erase_node(check)
    for node in reversed(list(graph.nodes)):
        if not node.users and (_reads_shape(node) or _is_operator(node)):
            graph.erase_node(node)


def _reads_shape(node: Node) -> bool:
    if node.op == "call_function" and node.target is getattr:
        return node.args[1] in ("ndim", "shape")
    return node.op == "call_method" and node.target in ("size", "dim")


def _is_operator(node: Node) -> bool:
    return node.op == "call_function" and node.target in _PURE_OPERATORS


def _checks_shapes_only(check: Node) -> bool:
    """Whether ``check``'s condition reads only ranks and sizes."""
    seen: set[Node] = set()
    stack = list(check.all_input_nodes)
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        if _is_operator(node):
            stack.extend(node.all_input_nodes)
        elif not _reads_shape(node):
            return False
    return True


def _drop_hooks(root: nn.Module) -> None:
    """Clear module hooks on the copy: a traced graph inlines most modules, so they would
    fire for some and not others, and after fusion would see different values."""
    hooked = []
    for name, m in root.named_modules():
        hooks = (m._forward_hooks, m._forward_pre_hooks, m._backward_hooks, m._backward_pre_hooks)
        if any(hooks):
            hooked.append(name or type(root).__name__)
            for hook_dict in hooks:
                hook_dict.clear()
    if hooked:
        log.warning("module hooks on %s are not part of the compiled graph", ", ".join(hooked))


def _default_to_concrete(root: nn.Module, graph: Graph, concrete_args: Mapping[str, Any]) -> None:
    """Make each concrete argument the default of its placeholder, so the module runs without it."""
    names = list(inspect.signature(root.forward).parameters)
    for name, node in zip(names, graph.find_nodes(op="placeholder"), strict=False):
        if name in concrete_args:
            node.args = (concrete_args[name],)


def _split_leaf_specs(
    root: nn.Module, specs: Iterable[LeafSpec]
) -> tuple[frozenset[str], tuple[type, ...]]:
    names: set[str] = set()
    types: list[type] = []
    known = dict(root.named_modules())
    for spec in specs:
        if isinstance(spec, type) and issubclass(spec, nn.Module):
            types.append(spec)
        elif isinstance(spec, str):
            if spec not in known:
                raise InputError(
                    f"leaf_modules names '{spec}', which is not a submodule of the model",
                    hint=did_you_mean(
                        spec, known, "list submodule names with model.named_modules()"
                    ),
                )
            names.add(spec)
        else:
            raise InputError(
                f"leaf_modules takes qualified names or nn.Module classes, got {spec!r}"
            )
    return frozenset(names), tuple(types)


def _user_frame(err: BaseException) -> traceback.FrameSummary | None:
    frames = traceback.extract_tb(err.__traceback__)
    for frame in reversed(frames):
        if not frame.filename.startswith(LIBRARY_DIRS):
            return frame
    return None


def _trace_error(err: Exception, tracer: _LeafTracer) -> TraceError:
    module_path = None
    if tracer.module_stack:
        # The innermost module being traced when the error struck: (qualified name, type).
        module_path = next(reversed(tracer.module_stack.values()))[0] or None
    frame = _user_frame(err)
    where = f" at {frame.filename}:{frame.lineno} `{(frame.line or '').strip()}`" if frame else ""
    reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    if module_path:
        subject = (
            f"submodule '{module_path}' ({type(tracer.root.get_submodule(module_path)).__name__})"
        )
        hint = (
            f"keep it as one opaque node: leaf_modules=['{module_path}'] "
            f"(CLI: --leaf {module_path}), or fix the value that drives the control flow "
            "with concrete_args={'name': value}"
        )
    else:
        subject = f"the model's own forward ({type(tracer.root).__name__})"
        hint = (
            "if a forward argument drives this code, fix its value with "
            "concrete_args={'name': value}; otherwise move the untraceable code into a "
            "submodule and list it in leaf_modules"
        )
    return TraceError(f"cannot trace {subject}{where}: {reason}", hint=hint)


def tensor_metadata(value: Any) -> Any:
    """``TensorMetadata`` of a tensor, or of each tensor in a tuple, list or dict."""

    def one(v: Any) -> Any:
        if not isinstance(v, torch.Tensor):
            return v
        return TensorMetadata(
            shape=v.shape,
            dtype=v.dtype,
            requires_grad=v.requires_grad,
            stride=v.stride() if v.layout == torch.strided else (),
            memory_format=None,
            is_quantized=v.is_quantized,
            qparams={},
        )

    return map_aggregate(value, one)


# Exact torch.nn types whose output has the shape and dtype of their input. On the meta
# device their kernels run as slow Python decompositions, so the recorder skips them there.
_SHAPE_PRESERVING = frozenset(
    {
        *ELEMENTWISE_MODULES,
        *BATCHNORMS,
        nn.LayerNorm,
        nn.GroupNorm,
    }
)


class _ShapeRecorder(Interpreter):
    def call_module(self, target: Any, args: Any, kwargs: Any) -> Any:
        first = args[0] if args else None
        if (
            isinstance(first, torch.Tensor)
            and first.is_meta
            and type(self.fetch_attr(target)) in _SHAPE_PRESERVING
        ):
            return torch.empty_like(first)
        return super().call_module(target, args, kwargs)

    def run_node(self, n: Node) -> Any:
        try:
            result = super().run_node(n)
        except Exception as err:
            where = source_of(n)
            location = f" ({where})" if where else ""
            raise TraceError(
                f"running the example inputs failed at node '{n.name}'{location}: "
                f"{type(err).__name__}: {str(err).strip().splitlines()[0] if str(err) else ''}",
                hint="check that example_inputs have the shape and dtype the model expects",
            ) from err
        n.meta["tensor_meta"] = tensor_metadata(result)
        return result


class _OnMeta(nn.Module):
    """Runs a graph's interpreter inside ``functional_call`` with meta-device state."""

    def __init__(self, gm: GraphModule) -> None:
        super().__init__()
        self.gm = gm

    def forward(self, *inputs: Any) -> Any:
        return _ShapeRecorder(self.gm).run(*inputs)


def _to_meta(value: Any) -> Any:
    return value.to("meta") if isinstance(value, torch.Tensor) else value


def propagate_shapes(gm: GraphModule, example_inputs: Sequence[Any]) -> None:
    """Store each node's ``tensor_meta`` from running ``example_inputs`` through ``gm``.

    Shapes are computed on the meta device (no arithmetic, no memory); a graph that needs
    real data for that (``.item()``, data-dependent shapes, tensors made on the CPU inside
    forward) is run for real instead.

    Example::

        propagate_shapes(gm, (torch.randn(1, 3, 224, 224),))
    """
    state = {
        f"gm.{name}": t.to("meta")
        for name, t in chain(
            gm.named_parameters(remove_duplicate=False), gm.named_buffers(remove_duplicate=False)
        )
    }
    with torch.no_grad():
        try:
            functional_call(_OnMeta(gm), state, tuple(tree_map(_to_meta, list(example_inputs))))
            return
        except Exception as err:
            log.debug("shape propagation on the meta device failed (%s); running for real", err)
        _ShapeRecorder(gm).run(*example_inputs)
