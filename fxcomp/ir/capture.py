"""Capturing a model as a graph: symbolic tracing, or ``torch.export`` where that fails.

``capture(model, example_inputs, capture="auto")`` works on a deep copy of the model in eval
mode (the caller's model is never changed). ``"symbolic"`` traces it with torch.fx;
``"export"`` captures it with ``torch.export`` (non-strict) and lifts the ATen graph to the
same module-level form (``fxcomp.ir.lift``), so no pass needs to know which capture ran;
``"auto"`` tries symbolic tracing first and exports where it fails. Where both fail, the
one ``TraceError`` gives both causes with their source lines and the options that get past
them. Example inputs are a tensor, a tuple, or a dict of keyword inputs (``input_ids=``,
``attention_mask=``, ``pixel_values=``); the captured module takes them positionally, in the
order of ``forward``'s parameters. Outputs keep their structure (a Hugging Face
``ModelOutput``, a dict). With ``torch.export`` the batch axis of every input, and the
sequence axis of integer inputs (token ids, masks), stay dynamic where the model allows it
(``dynamic_shapes=`` overrides); an axis the capture had to fix is named. The graph slot
``CAPTURE`` records which capture ran, why, the input names and the axes kept static.

Example::

    captured = capture(bert, {"input_ids": ids, "attention_mask": mask})
    captured.module(*captured.inputs).last_hidden_state
    CAPTURE.get(captured.module)["capture"]        # "export"
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.export import Dim
from torch.fx import GraphModule

from fxcomp.ir.errors import InputError, TraceError
from fxcomp.ir.graph import LIBRARY_DIRS
from fxcomp.ir.lift import lift
from fxcomp.ir.meta import MADE_BY, GraphSlot
from fxcomp.ir.trace import LeafSpec, prepared_copy, propagate_shapes, symbolic_trace

__all__ = [
    "CAPTURE",
    "CAPTURES",
    "Captured",
    "capture",
    "is_token_input",
    "named_inputs",
    "trace",
]

CAPTURES = ("auto", "symbolic", "export")
CAPTURE: GraphSlot[dict] = GraphSlot(
    "fxcomp:capture",
    dict,
    "how the graph was captured: capture, reason, input names, input axes kept static",
)


@dataclass(frozen=True)
class Captured:
    """The captured graph, and the inputs (a tuple, in ``forward``'s order) it takes."""

    module: GraphModule
    inputs: tuple[Any, ...]


def capture(
    model: nn.Module,
    example_inputs: Any,
    *,
    capture: str = "auto",
    dynamic_shapes: Any = None,
    leaf_modules: Iterable[LeafSpec] = (),
    concrete_args: Mapping[str, Any] | None = None,
) -> Captured:
    """Capture a deep copy of ``model`` (module docstring) and record every node's shape.

    ``leaf_modules`` and ``concrete_args`` are symbolic tracing's (submodules kept opaque,
    forward arguments fixed); ``dynamic_shapes`` is ``torch.export``'s.

    Example::

        captured = capture(model, torch.randn(1, 3, 224, 224), capture="export")
    """
    if capture not in CAPTURES:
        raise InputError(f"unknown capture {capture!r}", hint=f"choose {', '.join(CAPTURES)}")
    if capture == "symbolic" and dynamic_shapes is not None:
        raise InputError("dynamic_shapes is torch.export's option", hint="use capture='export'")
    root = prepared_copy(model)
    bound = _bind(root, example_inputs)
    symbolic_error = None
    if capture != "export" and dynamic_shapes is None:
        try:
            gm = symbolic_trace(
                root, leaf_modules=leaf_modules, concrete_args=bound.fixed(concrete_args)
            )
            return _done(gm, bound.values, "symbolic", "symbolic tracing took it", bound.names)
        except TraceError as err:
            if capture == "symbolic":
                raise
            symbolic_error = err
    try:
        gm, static = _export(root, bound, dynamic_shapes)
    except TraceError as err:
        if symbolic_error is None:
            raise
        raise TraceError(
            f"symbolic tracing failed: {symbolic_error.message}\n"
            f"torch.export failed too: {err.message}",
            hint=f"for symbolic tracing: {symbolic_error.hint}; for torch.export: {err.hint}",
        ) from err
    reason = (
        f"symbolic tracing failed: {symbolic_error.message}"
        if symbolic_error is not None
        else f"capture={capture!r} was asked for"
    )
    settings = bound.settings()
    given = [n for n in bound.kwargs() if n not in settings] if bound.names else None
    inputs = tuple(v for n, v in bound.kwargs().items() if n not in settings)
    inputs = inputs if bound.names else bound.values
    return _done(gm, inputs, "export", reason, given, static)


def trace(model: nn.Module, example_inputs: Any, **options: Any) -> GraphModule:
    """The graph ``capture`` makes of a copy of ``model`` (same options), with shapes.

    Example::

        gm = fxcomp.trace(torchvision.models.resnet18(), torch.randn(1, 3, 224, 224))
        gm.graph.find_nodes(op="call_module")[0].meta["tensor_meta"].shape
    """
    return capture(model, example_inputs, **options).module


def named_inputs(gm: GraphModule, inputs: tuple[Any, ...]) -> Any:
    """``inputs`` as the structure ``gm`` was captured from: a dict where it was captured
    from keyword inputs (to capture another model, a teacher, the same way), else the tuple.

    Example::

        teacher_gm = trace(teacher, named_inputs(student_gm, ctx.config.example_inputs))
    """
    names = (CAPTURE.get(gm) or {}).get("inputs")
    return dict(zip(names, inputs, strict=True)) if names else inputs


@dataclass(frozen=True)
class _Bound:
    """Example inputs bound to ``forward``: ``names`` (None for positional inputs) and
    ``values`` of its parameters up to the last one given; ``given``: the keywords given."""

    names: tuple[str, ...] | None
    values: tuple[Any, ...]
    given: frozenset[str] = frozenset()

    def fixed(self, concrete_args: Mapping[str, Any] | None) -> dict[str, Any] | None:
        """Symbolic tracing's concrete arguments: the caller's, and the defaults of the
        parameters skipped between the keyword inputs."""
        skipped = {
            n: v for n, v in zip(self.names or (), self.values, strict=False) if n not in self.given
        }
        return {**skipped, **(concrete_args or {})} or None

    def kwargs(self) -> dict[str, Any]:
        """The keyword inputs given, in ``forward``'s order."""
        pairs = zip(self.names or (), self.values, strict=False)
        return {n: v for n, v in pairs if n in self.given}

    def settings(self) -> dict[str, Any]:
        """The keyword inputs given that are not tensors (``use_cache=False``): fixed in the
        graph, not inputs of it."""
        return {n: v for n, v in self.kwargs().items() if not isinstance(v, torch.Tensor)}


def _bind(root: nn.Module, example_inputs: Any) -> _Bound:
    if isinstance(example_inputs, torch.Tensor):
        return _Bound(None, (example_inputs,))
    if isinstance(example_inputs, tuple | list):
        return _Bound(None, tuple(example_inputs))
    if not isinstance(example_inputs, Mapping):
        raise InputError(
            "example_inputs must be a tensor, a tuple of inputs or a dict of keyword inputs, "
            f"got {type(example_inputs).__name__}",
            hint="pass torch.randn(1, 3, 224, 224), a tuple for several inputs, or "
            "{'input_ids': ids, 'attention_mask': mask}",
        )
    parameters = list(inspect.signature(root.forward).parameters.values())
    known = [p.name for p in parameters]
    unknown = [k for k in example_inputs if k not in known]
    if unknown:
        raise InputError(
            f"example input {unknown[0]!r} is not a parameter of {type(root).__name__}.forward",
            hint=f"its parameters: {', '.join(known)}",
        )
    last = max(known.index(k) for k in example_inputs)
    values = []
    for p in parameters[: last + 1]:
        if p.name not in example_inputs and p.default is inspect.Parameter.empty:
            raise InputError(f"forward's parameter {p.name!r} has no example input and no default")
        values.append(example_inputs.get(p.name, p.default))
    return _Bound(tuple(known[: last + 1]), tuple(values), frozenset(example_inputs))


def _export(root: nn.Module, bound: _Bound, dynamic_shapes: Any) -> tuple[GraphModule, list[str]]:
    """The model exported (non-strict) and lifted; the input axes that stayed static."""
    args, kwargs = ((), bound.kwargs()) if bound.names else (bound.values, {})
    if dynamic_shapes is not None:
        exported = _run_export(root, args, kwargs, dynamic_shapes)
        return lift(root, exported.module(), bound.settings()), []
    axes = _default_dynamic(args, kwargs)
    wide = _widened(kwargs or args, axes)
    try:
        exported = _run_export(root, () if kwargs else wide, wide if kwargs else {}, axes)
        if _static_axes(exported, axes):  # an axis fixed at the widened size: not the input's
            exported = _run_export(root, args, kwargs, axes)
    except TraceError:
        exported = _run_export(root, args, kwargs, None)
        return lift(root, exported.module(), bound.settings()), ["every input axis"]
    return lift(root, exported.module(), bound.settings()), _static_axes(exported, axes)


def is_token_input(value: object) -> bool:
    """An integer tensor of rank 2 or more: token ids or a mask, (batch, sequence, ...), whose
    axis 1 is the sequence.

    Example::

        is_token_input(torch.ones(2, 12, dtype=torch.long))  # True
    """
    return isinstance(value, torch.Tensor) and value.dim() >= 2 and not value.is_floating_point()


def _default_dynamic(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """Batch (axis 0) of every tensor input, and sequence (axis 1) of integer ones, in
    ``torch.export``'s ``dynamic_shapes`` form (a dict for keyword inputs, else a tuple)."""

    def axes(value: Any) -> Any:
        if not isinstance(value, torch.Tensor) or value.dim() == 0:
            return None
        dynamic = {0: Dim.AUTO}
        if is_token_input(value):
            dynamic[1] = Dim.AUTO
        return dynamic

    if kwargs:
        return {k: axes(v) for k, v in kwargs.items()}
    return tuple(axes(v) for v in args)


def _widened(values: Any, axes: Any) -> Any:
    """Inputs whose dynamic axes of size 1 are repeated to 2 (export fixes size-1 axes)."""

    def widen(value: Any, dynamic: Any) -> Any:
        for axis in dynamic or {}:
            if value.shape[axis] == 1:
                value = torch.cat([value, value], axis)
        return value

    if isinstance(values, dict):
        return {k: widen(v, axes[k]) for k, v in values.items()}
    return tuple(widen(v, a) for v, a in zip(values, axes, strict=True))


def _run_export(root: nn.Module, args: tuple, kwargs: dict, dynamic: Any) -> Any:
    try:
        with torch.no_grad():
            return torch.export.export(root, args, kwargs, dynamic_shapes=dynamic, strict=False)
    except Exception as err:
        raise _export_error(err) from err


def _static_axes(exported: Any, wanted: Any) -> list[str]:
    """``input axis N (size S)`` for each axis asked to be dynamic that the export fixed."""
    placeholders = [
        n
        for n in exported.graph.nodes
        if n.op == "placeholder" and n.name in _user_inputs(exported)
    ]
    asked = list(wanted.values()) if isinstance(wanted, dict) else list(wanted)
    fixed = []
    for node, axes in zip(placeholders, asked, strict=False):
        value = node.meta.get("val")
        for axis in axes or {}:
            if isinstance(value, torch.Tensor) and _fixed(exported, value.shape[axis]):
                fixed.append(f"{node.name} axis {axis} (size {int(value.shape[axis])})")
    return fixed


def _fixed(exported: Any, size: Any) -> bool:
    """Whether an exported input size is a constant: an int, a symbol the export resolved
    to a number, or one whose range holds a single value."""
    if isinstance(size, int):
        return True
    expr = size.node.expr
    if expr.is_number:
        return True
    bounds = exported.range_constraints.get(expr)
    return bounds is not None and bounds.lower == bounds.upper


def _user_inputs(exported: Any) -> set[str]:
    return {
        spec.arg.name
        for spec in exported.graph_signature.input_specs
        if spec.kind.name == "USER_INPUT"
    }


def _export_error(err: Exception) -> TraceError:
    """A ``TraceError`` naming the user's source line where ``torch.export`` stopped."""
    import traceback

    frames = [
        f
        for f in traceback.extract_tb(err.__traceback__)
        if not f.filename.startswith(LIBRARY_DIRS)
    ]
    where = (
        f" at {frames[-1].filename}:{frames[-1].lineno} `{(frames[-1].line or '').strip()}`"
        if frames
        else ""
    )
    reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    hint = (
        "a data-dependent shape or branch needs torch._check or torch.cond in the model, "
        "or dynamic_shapes that fix the axis it depends on"
    )
    if "in output, which is not a known type" in reason:  # a Hugging Face key/value cache
        hint = (
            "the model returns an object export cannot flatten; for a Hugging Face "
            "language model add use_cache=False to the example inputs"
        )
    return TraceError(
        f"torch.export cannot capture the model{where}: {type(err).__name__}: {reason}",
        hint=hint,
    )


def _done(
    gm: GraphModule,
    inputs: tuple[Any, ...],
    how: str,
    reason: str,
    names: Iterable[str] | None,
    static: Iterable[str] = (),
) -> Captured:
    for node in gm.graph.nodes:
        node.meta[MADE_BY] = "trace"
    info = {"capture": how, "reason": reason, "inputs": list(names) if names else None}
    CAPTURE.set(gm, {**info, "static_axes": list(static)})
    propagate_shapes(gm, inputs)
    return Captured(gm, inputs)
