"""Figures of the ``heads`` section, returned as PNG bytes (matplotlib, Agg backend).

Fixed layouts in inches (no tight bbox, no constrained layout): see ``figures``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from matplotlib.colors import ListedColormap
from matplotlib.patches import Patch, Rectangle

from workers.analysis.figures import add_axes, few_ticks, figure_png, new_figure

# One fixed colour per label so that figures of two reports read the same way.
LABEL_COLOURS: dict[str, str] = {
    "local": "#1f77b4",
    "horizontal": "#ff7f0e",
    "vertical": "#2ca02c",
    "global": "#d62728",
    "texture": "#9467bd",
    "content": "#e377c2",
    "sink": "#17becf",
    "prefix": "#8c564b",
    "mixed": "#7f7f7f",
}
_DPI = 110
# Label map cells whose label held in fewer bootstrap resamples than this are hatched.
UNSTABLE_BELOW = 0.8


def _check(distances: np.ndarray | None, labels: Sequence[Sequence[str]]) -> tuple[int, int]:
    num_layers = len(labels)
    num_heads = len(labels[0]) if num_layers else 0
    if num_layers == 0 or num_heads == 0 or any(len(row) != num_heads for row in labels):
        raise ValueError("labels must be a non-empty (layers x heads) table")
    unknown = {lab for row in labels for lab in row} - set(LABEL_COLOURS)
    if unknown:
        raise ValueError(f"unknown labels {sorted(unknown)}")
    if distances is not None and distances.shape != (num_layers, num_heads):
        raise ValueError(
            f"distances {distances.shape} do not match labels {(num_layers, num_heads)}"
        )
    return num_layers, num_heads


def _label_patches(labels: Sequence[Sequence[str]]) -> list[Patch]:
    """One legend patch per label present, in the order of ``LABEL_COLOURS``."""
    present = {lab for row in labels for lab in row}
    return [Patch(color=c, label=lab) for lab, c in LABEL_COLOURS.items() if lab in present]


def _layer_ticks(num_layers: int) -> range:
    """Every layer up to 16 layers, then every 2nd, 3rd, ... so labels never collide."""
    return range(0, num_layers, math.ceil(num_layers / 16))


def distance_vs_depth(
    distances: np.ndarray,
    labels: Sequence[Sequence[str]],
    *,
    uniform_distance: float,
    unit: str = "patches",
    intervals: tuple[np.ndarray, np.ndarray] | None = None,
) -> bytes:
    """Mean attention distance (layers, heads) against layer, one dot per head coloured by
    its label, with the uniform-attention distance as a dashed line (ViT paper, Fig. 7) and,
    given ``intervals`` (lower, upper bounds of the same shape), a bar per head."""
    distances = np.asarray(distances, dtype=float)
    num_layers, num_heads = _check(distances, labels)
    fig = new_figure(6.0, 4.0)
    ax = add_axes(fig, 0.75, 0.55, 5.1, 3.1)
    # Spread the heads of one layer a little sideways so that equal distances stay visible.
    jitter = np.linspace(-0.15, 0.15, num_heads) if num_heads > 1 else np.zeros(1)
    xs = np.arange(num_layers)[:, None] + jitter[None, :]
    colours = [LABEL_COLOURS[lab] for row in labels for lab in row]
    if intervals is not None:
        lo, hi = (np.asarray(b, dtype=float) for b in intervals)
        if lo.shape != distances.shape or hi.shape != distances.shape:
            raise ValueError(f"intervals must be two arrays of shape {distances.shape}")
        ax.vlines(xs.ravel(), lo.ravel(), hi.ravel(), colors="black", linewidth=0.8)
    ax.scatter(xs.ravel(), distances.ravel(), c=colours, s=28, edgecolors="black", linewidths=0.3)
    line = ax.axhline(
        uniform_distance, color="black", linestyle="--", linewidth=1, label="uniform attention"
    )
    ax.legend(handles=[*_label_patches(labels), line], fontsize=8, loc="best")
    ax.set_xlabel("layer")
    ax.set_ylabel(f"mean attention distance ({unit})")
    ax.set_xticks(_layer_ticks(num_layers))
    ax.yaxis.set_major_locator(few_ticks(6))
    ax.set_title("Mean attention distance per head", y=1.0)
    return figure_png(fig, dpi=_DPI)


def label_map(labels: Sequence[Sequence[str]], *, stability: np.ndarray | None = None) -> bytes:
    """A layer x head table of labels as coloured cells; given ``stability`` (layers, heads)
    in [0, 1], cells below `UNSTABLE_BELOW` are hatched."""
    stability = None if stability is None else np.asarray(stability, dtype=float)
    num_layers, num_heads = _check(stability, labels)
    names = list(LABEL_COLOURS)
    table = np.array([[names.index(lab) for lab in row] for row in labels])
    # Inches: tick labels and axis label on the left, the legend (~1.3 in) on the right.
    cell_w, cell_h = 0.45, 0.35
    left, bottom, top, legend = 0.6, 0.5, 0.35, 1.3
    width, height = cell_w * max(num_heads, 2), cell_h * max(num_layers, 2)
    fig = new_figure(left + width + legend, bottom + height + top)
    ax = add_axes(fig, left, bottom, width, height)
    ax.imshow(
        table,
        cmap=ListedColormap(list(LABEL_COLOURS.values())),
        vmin=-0.5,
        vmax=len(names) - 0.5,
        aspect="auto",
    )
    handles = _label_patches(labels)
    if stability is not None:
        hatch = {"fill": False, "hatch": "///", "edgecolor": "white", "linewidth": 0}
        for layer, head in zip(*np.nonzero(stability < UNSTABLE_BELOW), strict=True):
            ax.add_patch(Rectangle((head - 0.5, layer - 0.5), 1, 1, **hatch))
        handles.append(
            Patch(facecolor="#7f7f7f", hatch="///", label=f"stability < {UNSTABLE_BELOW}")
        )
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    ax.set_xticks(range(0, num_heads, math.ceil(num_heads / 16)))
    ax.set_yticks(_layer_ticks(num_layers))
    ax.legend(handles=handles, fontsize=8, bbox_to_anchor=(1.02, 1), loc="upper left")
    ax.set_title("Head labels", y=1.0)
    return figure_png(fig, dpi=_DPI)
