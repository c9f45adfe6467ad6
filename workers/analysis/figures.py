"""Matplotlib without a display: every figure of a report becomes PNG bytes here.

Importing this module selects the Agg backend before pyplot is loaded, so the plotting
modules import ``plt`` from here rather than choosing a backend each.
"""

from __future__ import annotations

import io

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

DPI = 100


def figure_png(fig: plt.Figure, *, dpi: int = DPI, tight: bool = False) -> bytes:
    """The figure as PNG bytes; the figure is closed either way.

    ``tight=True`` trims the margins (bbox_inches="tight"); it measures every text label,
    which costs a few tenths of a second per figure.
    """
    buffer = io.BytesIO()
    try:
        fig.savefig(buffer, format="png", dpi=dpi, bbox_inches="tight" if tight else None)
    finally:
        plt.close(fig)
    return buffer.getvalue()


__all__ = ["DPI", "figure_png", "plt"]
