"""What passes share during one compile: a frozen config and a mutable state.

``CompileConfig`` is what the caller asked for (example inputs, calibration data, the
backend, hooks) and does not change while passes run. ``CompileState`` is what the run
builds: the report, the passes done so far, the outputs backends verify against, and the
figures to draw. Values one pass leaves on the graph for another live in declared graph
slots (``fxcomp.ir.meta.GraphSlot``), not here.

Example::

    ctx = CompileContext.from_inputs((torch.randn(1, 3, 224, 224),))
    result = my_pass(gm, ctx)
    ctx.state.report.notes
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from matplotlib.figure import Figure
from torch.fx import Node

from fxcomp.ir.graph import source_of
from fxcomp.pipeline.report import Note, Report

__all__ = ["CompileConfig", "CompileContext", "CompileState", "FigureFn", "Hook"]

FigureFn = Callable[[], Figure]
# before_pass(pass, gm, ctx) and after_pass(record, gm, ctx); see fxcomp.pipeline.pass_manager
Hook = Callable[[Any, Any, "CompileContext"], None]


@dataclass(frozen=True)
class CompileConfig:
    """What one compile was asked to do; fixed for the whole run.

    ``calibration_data`` is what passes calibrate or train on when they are given none of
    their own; ``backend`` names the backend the result goes to (None: the GraphModule).
    """

    example_inputs: tuple[Any, ...]
    calibration_data: Iterable[Any] | None = None
    backend: str | None = None
    before_pass: tuple[Hook, ...] = ()
    after_pass: tuple[Hook, ...] = ()


@dataclass(eq=False)
class CompileState:
    """What the run builds as passes go.

    ``history`` lists the qualified names of the passes that have finished, in order;
    ``current_pass`` is the one running now. ``float_outputs`` are the traced float model's
    outputs on the example inputs (set by ``compile`` when a backend will verify against
    them), ``reference_outputs`` the reference quantized graph's (set by ``freeze``).
    ``figures`` maps a figure's name to a function that draws it: ``compile`` renders them
    as PNG files once every pass has succeeded.
    """

    report: Report = field(default_factory=Report)
    history: list[str] = field(default_factory=list)
    current_pass: str = ""
    float_outputs: Any = None
    reference_outputs: Any = None
    figures: dict[str, FigureFn] = field(default_factory=dict)


@dataclass(eq=False)
class CompileContext:
    """The config and the state of one compile, handed to every pass.

    Example::

        ctx = CompileContext(CompileConfig(example_inputs=(x,)))
        ctx.config.example_inputs, ctx.state.report
    """

    config: CompileConfig
    state: CompileState = field(default_factory=CompileState)

    @classmethod
    def from_inputs(cls, example_inputs: tuple[Any, ...], **config: Any) -> CompileContext:
        """A fresh context for ``example_inputs`` (other ``CompileConfig`` fields by name).

        Example::

            ctx = CompileContext.from_inputs((x,), calibration_data=batches)
        """
        return cls(CompileConfig(tuple(example_inputs), **config))

    def explain(self, node: Node, rule: str, reason: str) -> None:
        """Record why ``rule`` did not apply at ``node``; ``fxcomp dump --explain`` shows it."""
        note = Note(self.state.current_pass, node.name, rule, reason, source_of(node))
        self.state.report.notes.append(note)
