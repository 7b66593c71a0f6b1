"""Pictures passes draw: rendered off-screen to PNG bytes with matplotlib's Agg canvas.

Example::

    ctx.state.figures["prune_importance"] = lambda: importance_figure(plan)
    data = png_bytes(ctx.state.figures["prune_importance"])
"""

from __future__ import annotations

import io

from matplotlib.backends.backend_agg import FigureCanvasAgg

from fxcomp.pipeline.context import FigureFn

__all__ = ["png_bytes"]


def png_bytes(make: FigureFn) -> bytes:
    """Draw the figure ``make`` returns into PNG bytes (no display, no global pyplot state)."""
    figure = make()
    FigureCanvasAgg(figure)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    return buffer.getvalue()
