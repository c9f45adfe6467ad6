"""Figures of the position-embedding section, returned as PNG bytes (never files).

Fixed layouts in inches (no tight bbox, no constrained layout): see ``figures``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from torch import Tensor

from workers.analysis.figures import add_axes, colorbar, few_ticks, figure_png, new_figure, plt
from workers.analysis.grid import Grid

_DPI = 100


def _png(fig: plt.Figure) -> bytes:
    return figure_png(fig, dpi=_DPI)


def similarity_mosaic(similarity: Tensor, grid: Grid) -> np.ndarray:
    """The per-patch similarity maps laid out on the grid as one image.

    Tile (r, c) is the (H, W) map of cosine similarity between patch (r, c) and every
    patch; tiles are separated by one NaN pixel. Shape (H * (H + 1) - 1, W * (W + 1) - 1).
    """
    h, w = grid.shape
    n = grid.num_patches
    if tuple(similarity.shape) != (n, n):
        raise ValueError(f"similarity must be ({n}, {n}) for grid {grid.shape}")
    maps = similarity.detach().cpu().double().numpy().reshape(h, w, h, w)
    padded = np.full((h, w, h + 1, w + 1), np.nan)
    padded[:, :, :h, :w] = maps
    # (tile_row, tile_col, y, x) -> (tile_row, y, tile_col, x)
    mosaic = padded.transpose(0, 2, 1, 3).reshape(h * (h + 1), w * (w + 1))
    return mosaic[:-1, :-1]


def similarity_grid_png(similarity: Tensor, grid: Grid) -> bytes:
    """Per-patch similarity maps on the grid, as in the ViT paper (Fig. 7, centre).

    ``grid`` is the grid of the table as stored (the title names it), which may differ from
    the audit's when loading resampled the table.

    Tile (r, c) shows how similar patch (r, c)'s embedding is to every other patch's; one
    colour scale (lowest similarity to 1) for all tiles. Every tile is labelled up to 10
    rows/columns, every 2nd (3rd, ...) tile beyond.
    """
    h, w = grid.shape
    mosaic = similarity_mosaic(similarity, grid)
    side = float(np.clip(0.45 * max(h, w), 4.0, 12.0))
    # Inches: tick labels and axis labels left and below, the title above, the colorbar
    # with its labels to the right.
    left, bottom, top, right = 0.55, 0.5, 0.35, 1.05
    rows_px, cols_px = mosaic.shape  # square pixels: the map's box has the mosaic's shape
    map_w, map_h = side * cols_px / max(mosaic.shape), side * rows_px / max(mosaic.shape)
    fig = new_figure(left + map_w + right, bottom + map_h + top)
    ax = add_axes(fig, left, bottom, map_w, map_h)
    cmap = plt.get_cmap("viridis").with_extremes(bad="white")
    # One colour scale for all tiles, spanning the data: learned tables often keep every
    # similarity above 0, and a fixed [-1, 1] scale would wash their maps out.
    low = min(float(np.nanmin(mosaic)), 0.999)
    image = ax.imshow(
        np.ma.masked_invalid(mosaic),
        cmap=cmap,
        vmin=low,
        vmax=1.0,
        interpolation="nearest",
        aspect="auto",
    )
    cols = range(0, w, math.ceil(w / 10))
    rows = range(0, h, math.ceil(h / 10))
    ax.set_xticks([c * (w + 1) + (w - 1) / 2 for c in cols], [str(c + 1) for c in cols])
    ax.set_yticks([r * (h + 1) + (h - 1) / 2 for r in rows], [str(r + 1) for r in rows])
    ax.tick_params(labelsize=7, length=0)
    ax.set_xlabel("input patch column")
    ax.set_ylabel("input patch row")
    ax.set_title(f"Position embedding similarity (stored table, {h}x{w})", y=1.0)
    cax = add_axes(fig, left + map_w + 0.2, bottom, 0.18, map_h)
    colorbar(fig, image, cax, label="cosine similarity", ticks=few_ticks(5).tick_values(low, 1.0))
    return _png(fig)


def _arr(values: Sequence[float | None]) -> np.ndarray:
    return np.array([np.nan if v is None else v for v in values], dtype=float)


def similarity_profile_png(
    *,
    distance: Sequence[float | None],
    mean_similarity: Sequence[float | None],
    baseline: float | None,
    band_low: Sequence[float | None],
    band_high: Sequence[float | None],
    offsets: Sequence[float | None] = (),
    same_row: Sequence[float | None] = (),
    same_col: Sequence[float | None] = (),
) -> bytes:
    """Mean similarity vs grid distance, with the shuffled-position baseline and band.

    Same-row and same-column curves (equal offsets) show row/column anisotropy.
    """
    d = _arr(distance)
    fig = new_figure(6.0, 4.0)
    ax = add_axes(fig, 0.85, 0.55, 5.0, 3.1)
    ax.fill_between(
        d, _arr(band_low), _arr(band_high), color="0.85", label="shuffled positions (5-95%)"
    )
    if baseline is not None:
        ax.axhline(
            baseline, color="0.5", linestyle="--", linewidth=1, label="shuffled positions (mean)"
        )
    ax.plot(d, _arr(mean_similarity), "o-", color="C0", label="all pairs")
    if len(offsets):
        ax.plot(_arr(offsets), _arr(same_row), "s:", color="C1", markersize=3, label="same row")
        ax.plot(_arr(offsets), _arr(same_col), "^:", color="C2", markersize=3, label="same column")
    ax.xaxis.set_major_locator(few_ticks(6))
    ax.yaxis.set_major_locator(few_ticks(6))
    ax.tick_params(labelsize=9)
    ax.set_xlabel("grid distance (patches)")
    ax.set_ylabel("mean cosine similarity")
    ax.set_title("Similarity vs distance", y=1.0)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return _png(fig)
