"""Running passes in order, checking each one, and recording what it did.

A pass is any callable ``(gm, ctx) -> PassResult``; user passes may also return the
``GraphModule`` or ``None`` (in place), and ``modified`` is then computed by comparing the
graph and its tensors before and after. ``Pass`` adds a name, ordering constraints and a
postcondition; ``Pipeline`` is a named sequence of passes and is itself a pass.

After every pass the manager lints the graph, recompiles it, checks that a pass claiming
``modified=False`` changed nothing, propagates shapes to nodes that lack them, runs the
postcondition, and records time, node counts, parameters and bytes.

A pass's ``options`` (a dataclass, for the built-in passes) are recorded on its report
entry.

Example::

    pm = PassManager([fxcomp.passes.fuse(), my_pass])
    result, records = pm.run(gm, CompileContext.from_inputs((x,)))
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import networkx as nx
import torch
from torch.fx import GraphModule

from fxcomp.ir.errors import FxcompError, InputError, PassError, PassOrderError, TraceError
from fxcomp.ir.graph import node_counts, state_size
from fxcomp.ir.meta import MADE_BY
from fxcomp.ir.trace import propagate_shapes
from fxcomp.pipeline.context import CompileContext
from fxcomp.pipeline.report import PassRecord, describe_options

__all__ = ["Pass", "PassLike", "PassManager", "PassResult", "Pipeline", "as_pass"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PassResult:
    """What a pass returns: the (possibly new) graph module and whether it changed anything."""

    graph_module: GraphModule
    modified: bool


PassFn = Callable[[GraphModule, CompileContext], PassResult | GraphModule | None]
Postcondition = Callable[[GraphModule, CompileContext], str | None]


@dataclass(frozen=True)
class Pass:
    """A named pass with its ordering constraints and postcondition.

    ``run_before``/``run_after`` name passes that, when present in the same pipeline, must
    come after/before this one. ``postcondition`` returns None when the returned module is
    as the pass promises, or a message saying what is wrong. ``options`` are what the pass
    was configured with (one dataclass, for the built-in passes), recorded in the report.

    Example::

        Pass("count_flops", count_flops, run_after=("fuse",))
    """

    name: str
    run: PassFn
    run_before: tuple[str, ...] = ()
    run_after: tuple[str, ...] = ()
    postcondition: Postcondition | None = None
    options: Any = None

    def __call__(self, gm: GraphModule, ctx: CompileContext) -> PassResult:
        result, _ = PassManager([self]).run(gm, ctx)
        return result


@dataclass(frozen=True)
class Pipeline:
    """A named sequence of passes, itself usable as a pass; its ordering is checked here.

    Example::

        cleanup = Pipeline("cleanup", [fxcomp.passes.cse(), fxcomp.passes.dce()])
    """

    name: str
    passes: Sequence[Any]
    run_before: tuple[str, ...] = ()
    run_after: tuple[str, ...] = ()
    postcondition: Postcondition | None = None
    options: Any = None
    _normalised: tuple[PassLike, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_normalised", tuple(as_pass(p) for p in self.passes))
        check_order(self._normalised)

    @property
    def children(self) -> tuple[PassLike, ...]:
        """The passes of this pipeline, each as a ``Pass`` or ``Pipeline``."""
        return self._normalised

    def __call__(self, gm: GraphModule, ctx: CompileContext) -> PassResult:
        result, _ = PassManager([self]).run(gm, ctx)
        return result


PassLike = Pass | Pipeline


def as_pass(obj: Any) -> PassLike:
    """Wrap a plain callable as a ``Pass`` named after it; ``Pass``/``Pipeline`` pass through."""
    if isinstance(obj, (Pass, Pipeline)):
        return obj
    if callable(obj):
        name = getattr(obj, "__name__", None) or type(obj).__name__
        return Pass(name, obj)
    raise InputError(
        f"a pass must be callable as pass(gm, ctx), got {type(obj).__name__}",
        hint="use a built-in pass such as fxcomp.passes.fuse(), or a function (gm, ctx)",
    )


@dataclass(frozen=True)
class _Leaf:
    names: frozenset[str]
    run_before: frozenset[tuple[str, str]]  # (other, declared_by)
    run_after: frozenset[tuple[str, str]]


def _leaves(passes: Iterable[PassLike], outer: _Leaf | None = None) -> Iterator[_Leaf]:
    outer = outer or _Leaf(frozenset(), frozenset(), frozenset())
    for p in passes:
        leaf = _Leaf(
            outer.names | {p.name},
            outer.run_before | {(other, p.name) for other in p.run_before},
            outer.run_after | {(other, p.name) for other in p.run_after},
        )
        if isinstance(p, Pipeline):
            yield from _leaves(p.children, leaf)
        else:
            yield leaf


def check_order(passes: Sequence[PassLike]) -> None:
    """Raise ``PassOrderError`` naming both passes if a declared ordering is violated."""
    leaves = list(_leaves(passes))
    present = set().union(*(leaf.names for leaf in leaves)) if leaves else set()
    constraints = nx.DiGraph()
    for leaf in leaves:
        for other, by in leaf.run_before:
            if other in present:
                constraints.add_edge(by, other, declared_by=by)
        for other, by in leaf.run_after:
            if other in present:
                constraints.add_edge(other, by, declared_by=by)
    try:
        cycle = nx.find_cycle(constraints)
    except nx.NetworkXNoCycle:
        cycle = []
    if cycle:
        path = " -> ".join([a for a, _ in cycle] + [cycle[0][0]])
        raise PassOrderError(
            f"ordering constraints form a cycle: {path} (each must run before the next)",
            pass_name=cycle[0][0],
            hint="drop one of the passes, or the constraint that one of them declares",
        )
    for i, early in enumerate(leaves):
        for late in leaves[i + 1 :]:
            for first, second in constraints.edges:
                if first in late.names and second in early.names and first not in early.names:
                    by = constraints.edges[first, second]["declared_by"]
                    raise PassOrderError(
                        f"pass '{first}' must run before '{second}' (declared by '{by}'), "
                        f"but '{second}' comes first in the pipeline",
                        pass_name=second,
                        hint=f"move '{first}' ahead of '{second}'",
                    )


class _Snapshot:
    """The graph text, module types and tensors of a module, to tell whether a pass changed it."""

    def __init__(self, gm: GraphModule) -> None:
        self.graph = str(gm.graph)
        self.modules = [(name, type(m)) for name, m in gm.named_modules()]
        self.tensors = {name: (t, t._version) for name, t in _tensors(gm)}

    def changed(self, gm: GraphModule) -> bool:
        if str(gm.graph) != self.graph:
            return True
        if [(name, type(m)) for name, m in gm.named_modules()] != self.modules:
            return True
        tensors = dict(_tensors(gm))
        if tensors.keys() != self.tensors.keys():
            return True
        for name, t in tensors.items():
            old, version = self.tensors[name]
            if t is old:
                if t._version != version:
                    return True
            elif old.shape != t.shape or old.dtype != t.dtype or not torch.equal(old, t):
                return True
        return False


def _tensors(gm: GraphModule) -> Iterator[tuple[str, torch.Tensor]]:
    yield from gm.named_parameters(remove_duplicate=False)
    yield from gm.named_buffers(remove_duplicate=False)


class PassManager:
    """Runs passes in order with checks and records; see the module docstring.

    Example::

        result, records = PassManager([fuse(), dce()]).run(gm, ctx)
    """

    def __init__(self, passes: Iterable[Any], *, prefix: str = "") -> None:
        self.passes = tuple(as_pass(p) for p in passes)
        self.prefix = prefix
        check_order(self.passes)

    def run(self, gm: GraphModule, ctx: CompileContext) -> tuple[PassResult, list[PassRecord]]:
        """Run every pass on ``gm``; return the final result and one record per pass."""
        records = []
        modified = False
        for p in self.passes:
            result, record = self._run_one(p, gm, ctx)
            gm = result.graph_module
            modified |= result.modified
            records.append(record)
        return PassResult(gm, modified), records

    def _run_one(
        self, p: PassLike, gm: GraphModule, ctx: CompileContext
    ) -> tuple[PassResult, PassRecord]:
        path = f"{self.prefix}{p.name}"
        state = ctx.state
        previous = tuple(state.history)
        for hook in ctx.config.before_pass:
            hook(p, gm, ctx)
        nodes_before, (params_before, bytes_before) = node_counts(gm), state_size(gm)
        outer_pass, state.current_pass = state.current_pass, path
        start = time.perf_counter()
        children: list[PassRecord] = []
        try:
            if isinstance(p, Pipeline):
                result, children = PassManager(p.children, prefix=f"{path}/").run(gm, ctx)
            else:
                snapshot = _Snapshot(gm)
                result = self._honest(p.run(gm, ctx), gm, snapshot, path, previous)
            self._check(result.graph_module, ctx, path, previous)
            failure = p.postcondition(result.graph_module, ctx) if p.postcondition else None
        except PassError:
            raise
        except Exception as err:
            node = getattr(err, "node", None)
            message = (
                err.message if isinstance(err, FxcompError) else f"{type(err).__name__}: {err}"
            )
            raise PassError(
                f"pass '{path}' failed{_after(previous)}: {message}",
                pass_name=path,
                previous=previous,
                node=getattr(node, "name", None),
                hint=getattr(err, "hint", None),
            ) from err
        finally:
            state.current_pass = outer_pass
        if failure:
            raise PassError(
                f"pass '{path}' broke its postcondition{_after(previous)}: {failure}",
                pass_name=path,
                previous=previous,
            )
        seconds = time.perf_counter() - start
        out = result.graph_module
        params_after, bytes_after = state_size(out)
        record = PassRecord(
            name=p.name,
            path=path,
            modified=result.modified,
            seconds=seconds,
            nodes_before=nodes_before,
            nodes_after=node_counts(out),
            parameters_before=params_before,
            parameters_after=params_after,
            bytes_before=bytes_before,
            bytes_after=bytes_after,
            options=describe_options(p.options),
            children=children,
        )
        log.info("pass %s: modified=%s in %.1f ms", path, result.modified, seconds * 1e3)
        state.history.append(path)
        for hook in ctx.config.after_pass:
            hook(record, out, ctx)
        return result, record

    @staticmethod
    def _honest(
        out: Any, gm: GraphModule, snapshot: _Snapshot, path: str, previous: tuple[str, ...]
    ) -> PassResult:
        if out is None:
            return PassResult(gm, snapshot.changed(gm))
        if isinstance(out, GraphModule):
            return PassResult(out, snapshot.changed(out))
        if not isinstance(out, PassResult):
            raise PassError(
                f"pass '{path}' returned {type(out).__name__}; expected PassResult, "
                "a GraphModule or None",
                pass_name=path,
                previous=previous,
            )
        if not out.modified and snapshot.changed(out.graph_module):
            raise PassError(
                f"pass '{path}' returned modified=False but changed the module",
                pass_name=path,
                previous=previous,
                hint="compute `modified` from what the pass did",
            )
        return out

    @staticmethod
    def _check(gm: GraphModule, ctx: CompileContext, path: str, previous: tuple[str, ...]) -> None:
        try:
            gm.graph.lint()
        except Exception as err:
            raise PassError(
                f"pass '{path}' left an invalid graph{_after(previous)}: {err}",
                pass_name=path,
                previous=previous,
            ) from err
        gm.recompile()
        stale = False
        for node in gm.graph.nodes:
            node.meta.setdefault(MADE_BY, path)
            stale |= "tensor_meta" not in node.meta
        if stale:
            try:
                propagate_shapes(gm, ctx.config.example_inputs)
            except TraceError as err:
                raise PassError(
                    f"the graph returned by pass '{path}' no longer runs: {err.message}",
                    pass_name=path,
                    previous=previous,
                ) from err


def _after(previous: tuple[str, ...]) -> str:
    return f" (after {', '.join(previous)})" if previous else " (first pass)"
