"""What passes share during one compile.

Example::

    ctx = CompileContext(example_inputs=(torch.randn(1, 3, 224, 224),))
    result = my_pass(gm, ctx)
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from torch.fx import GraphModule, Node

from fxcomp.figures import FigureFn
from fxcomp.graph import source_of
from fxcomp.report import Note, PassRecord, Report

if TYPE_CHECKING:
    from fxcomp.pass_manager import PassLike

__all__ = ["AfterPassHook", "BeforePassHook", "CompileContext"]

BeforePassHook = Callable[["PassLike", GraphModule, "CompileContext"], None]
AfterPassHook = Callable[[PassRecord, GraphModule, "CompileContext"], None]


@dataclass(eq=False)
class CompileContext:
    """Example inputs, calibration data, target, report and hooks for one compile.

    ``history`` lists the qualified names of the passes that have finished, in order;
    ``current_pass`` is the one running now. ``float_outputs`` are the traced float model's
    outputs on the example inputs, and ``reference_outputs`` the reference quantized graph's
    (set by ``freeze``): backends verify their artifacts against both. ``figures`` maps a
    figure's name to a function that makes it: ``compile`` renders them as PNG files in its
    ``output_dir`` once every pass has succeeded.
    """

    example_inputs: tuple[Any, ...]
    calibration_data: Iterable[Any] | None = None
    backend: str | None = None
    engine: str | None = None
    report: Report = field(default_factory=Report)
    before_pass: list[BeforePassHook] = field(default_factory=list)
    after_pass: list[AfterPassHook] = field(default_factory=list)
    history: list[str] = field(default_factory=list)
    current_pass: str = ""
    float_outputs: Any = None
    reference_outputs: Any = None
    figures: dict[str, FigureFn] = field(default_factory=dict)

    def explain(self, node: Node, rule: str, reason: str) -> None:
        """Record why ``rule`` did not apply at ``node``; ``fxcomp dump --explain`` shows it."""
        self.report.notes.append(Note(self.current_pass, node.name, rule, reason, source_of(node)))
