"""A compile's report on disk: every figure as PNG, ``report.json`` and ``report.html``, each
written atomically once every pass has succeeded.

Example::

    write_report(ctx.state.report, ctx.state.figures, Path("out"))
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

from fxcomp.ir.atomic import write_atomic
from fxcomp.pipeline.context import FigureFn
from fxcomp.pipeline.report import Report
from fxcomp.reporting.figures import png_bytes
from fxcomp.reporting.html import render_html

__all__ = ["write_report"]


def write_report(report: Report, figures: Mapping[str, FigureFn], out_dir: Path) -> None:
    """Draw ``figures`` into ``out_dir/NAME.png`` (their paths go in ``report.figures``), then
    write ``report.json`` and ``report.html`` with the pictures embedded.

    Example::

        write_report(result.report, {"layer_sqnr": analysis.figure}, Path("out"))
    """
    pictures = {}
    for name, draw in figures.items():
        path = out_dir / f"{name}.png"
        pictures[name] = png_bytes(draw)
        write_atomic(path, pictures[name])
        report.figures[name] = str(path)
    write_atomic(out_dir / "report.json", json.dumps(report.to_dict(), indent=2))
    write_atomic(out_dir / "report.html", render_html(report, pictures))
