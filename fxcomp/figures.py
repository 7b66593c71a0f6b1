"""Pictures passes draw: rendered off-screen to PNG bytes with matplotlib's Agg canvas.

Example::

    ctx.figures["prune_importance"] = lambda: importance_figure(plan)
    data = png_bytes(ctx.figures["prune_importance"])
"""

from __future__ import annotations

import io
from collections.abc import Callable

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

__all__ = ["FigureFn", "png_bytes"]

FigureFn = Callable[[], Figure]


def png_bytes(make: FigureFn) -> bytes:
    """Draw the figure ``make`` returns into PNG bytes (no display, no global pyplot state)."""
    figure = make()
    FigureCanvasAgg(figure)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    return buffer.getvalue()
