"""Matplotlib without a display: every figure of a report becomes PNG bytes here.

Importing this module selects the Agg backend before pyplot is loaded, so the plotting
modules import ``plt`` from here rather than choosing a backend each.

Rendering cost, measured single-threaded on a shared 2-core machine: a layout engine
(``bbox_inches="tight"``, constrained layout) measures every text label and costs a tenth to
half a second per figure; each axes costs ~5-10 ms, each tick or legend entry ~1-2 ms; zlib at
its default level 6 takes ~1.5-3x as long as level 1 for files only 5-13% smaller. So the
report's figures are laid out with fixed margins in inches
(:func:`new_figure`, :func:`add_axes`), keep their tick counts small, set their axes titles
with ``y=1.0`` (which turns off the title's auto-placement, another measurement of the tick
labels), and are encoded as RGB at compression level 1 (:func:`figure_png`).

Even so a figure costs ~0.1 s of single-threaded Python, 10 figures a tenth of a vit_tiny
audit. Sections therefore make their figures through :func:`figure`: called directly, it
draws at once; inside :func:`deferred_figures` (the audit pipelines) it returns a
:class:`PendingFigure`, and the pipeline draws them all at the end, several at a time
(`workers.audit_common.draw_figures`).
"""

from __future__ import annotations

import functools
import io
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: E402
from matplotlib.colorbar import Colorbar  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.ticker import MaxNLocator, StrMethodFormatter  # noqa: E402
from PIL import Image  # noqa: E402

DPI = 100
PNG_COMPRESS_LEVEL = 1  # zlib level: 1 is ~2x faster than the default 6, files ~10% larger


@dataclass(frozen=True)
class PendingFigure:
    """A figure not drawn yet: ``draw()`` returns its PNG bytes."""

    draw: Callable[[], bytes]


_deferring: ContextVar[bool] = ContextVar("deferring_figures", default=False)


def figure(draw: Callable[..., bytes], *args, **kwargs) -> bytes | PendingFigure:
    """``draw(*args, **kwargs)``: its PNG bytes now, or inside `deferred_figures` a
    `PendingFigure` that draws it later (the arguments are kept as they are, so pass
    values that do not change afterwards)."""
    if _deferring.get():
        return PendingFigure(functools.partial(draw, *args, **kwargs))
    return draw(*args, **kwargs)


@contextmanager
def deferred_figures() -> Iterator[None]:
    """Inside, `figure` returns `PendingFigure` instead of drawing."""
    token = _deferring.set(True)
    try:
        yield
    finally:
        _deferring.reset(token)


def figure_png(fig: plt.Figure, *, dpi: int = DPI, tight: bool = False) -> bytes:
    """The figure as PNG bytes (RGB, no alpha); the figure is closed either way.

    ``tight=True`` trims the margins (bbox_inches="tight"); it measures every text label,
    which costs a few tenths of a second per figure, so the report's figures use fixed
    margins instead.
    """
    buffer = io.BytesIO()
    try:
        if tight:
            fig.savefig(
                buffer,
                format="png",
                dpi=dpi,
                bbox_inches="tight",
                pil_kwargs={"compress_level": PNG_COMPRESS_LEVEL},
            )
        else:
            fig.set_dpi(dpi)
            canvas = fig.canvas if isinstance(fig.canvas, FigureCanvasAgg) else None
            canvas = canvas or FigureCanvasAgg(fig)
            canvas.draw()
            pixels = np.asarray(canvas.buffer_rgba())[..., :3]
            Image.fromarray(pixels).save(buffer, format="png", compress_level=PNG_COMPRESS_LEVEL)
    finally:
        plt.close(fig)
    return buffer.getvalue()


def new_figure(width: float, height: float) -> Figure:
    """A figure of ``width`` x ``height`` inches outside pyplot's registry (no global state);
    lay it out with :func:`add_axes` and render it with :func:`figure_png`."""
    return Figure(figsize=(width, height), dpi=DPI)


def add_axes(
    fig: Figure, left: float, bottom: float, width: float, height: float, **kwargs
) -> plt.Axes:
    """An axes at a fixed place given in inches from the figure's bottom-left corner."""
    fig_w, fig_h = fig.get_size_inches()
    return fig.add_axes((left / fig_w, bottom / fig_h, width / fig_w, height / fig_h), **kwargs)


def few_ticks(count: int = 5, *, integer: bool = False) -> MaxNLocator:
    """A tick locator for at most ``count`` + 1 ticks at round steps (1, 2, 2.5, 5 x 10^k);
    each tick costs a Tick artist and a text layout."""
    return MaxNLocator(nbins=count, steps=[1, 2, 2.5, 5, 10], integer=integer)


def colorbar(
    fig: Figure,
    mappable,
    cax: plt.Axes,
    *,
    label: str = "",
    ticks: Sequence[float] = (),
    fmt: str = "{x:.2g}",
    orientation: str = "vertical",
) -> Colorbar:
    """A colorbar drawn into ``cax`` with only those ``ticks`` inside the colour scale
    (default, or when none is inside: its low end, middle and high end), so that it adds
    three to five tick labels rather than eight or more."""
    bar = fig.colorbar(mappable, cax=cax, orientation=orientation)
    low, high = mappable.norm.vmin, mappable.norm.vmax
    ticks = [t for t in ticks if low <= t <= high] or [low, (low + high) / 2, high]
    bar.set_ticks(ticks)
    bar.formatter = StrMethodFormatter(fmt)
    bar.ax.tick_params(labelsize=8)
    if label:
        bar.set_label(label, fontsize=9)
    return bar


__all__ = [
    "DPI",
    "PendingFigure",
    "add_axes",
    "colorbar",
    "deferred_figures",
    "few_ticks",
    "figure",
    "figure_png",
    "new_figure",
    "plt",
]
