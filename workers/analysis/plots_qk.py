"""Figures of the ``qk_geometry`` section, returned as PNG bytes (matplotlib, Agg backend).

Fixed layouts in inches (no tight bbox): see ``figures``. The kernel grid is one image (every
head's kernel tiled into a mosaic) in one axes, so a 24 x 16-head model costs one imshow,
not 384 axes.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from matplotlib.colors import to_rgba
from matplotlib.patches import Patch

from workers.analysis.figures import add_axes, colorbar, few_ticks, figure_png, new_figure
from workers.analysis.plots_heads import LABEL_COLOURS

_DPI = 110
_TILE_IN = 0.55  # inches per kernel tile, shrunk for large models (see `kernel_grid`)
_MAX_MOSAIC_IN = 11.0


def _strip(kh: int) -> int:
    """Rows of the label-colour strip above each tile."""
    return max(1, kh // 8)


def kernel_mosaic(kernels: np.ndarray) -> np.ndarray:
    """(layers, heads, kh, kw) kernels -> one image: each kernel divided by its own largest
    |value| (so every tile spans [-1, 1] whatever its logit scale), NaN (blank) rows above
    each tile for its label strip and one NaN separator between tiles."""
    if kernels.ndim != 4:
        raise ValueError(f"kernels must be (layers, heads, kh, kw), got {kernels.shape}")
    layers, heads, kh, kw = kernels.shape
    strip = _strip(kh)
    scale = np.abs(kernels).max(axis=(-2, -1), keepdims=True)
    tiles = np.divide(kernels, scale, out=np.zeros_like(kernels, dtype=float), where=scale > 0)
    step_r, step_c = kh + strip + 1, kw + 1
    mosaic = np.full((layers * step_r - 1, heads * step_c - 1), np.nan)
    for layer in range(layers):
        for head in range(heads):
            r, c = layer * step_r + strip, head * step_c
            mosaic[r : r + kh, c : c + kw] = tiles[layer, head]
    return mosaic


def _label_overlay(
    shape: tuple[int, int], labels: Sequence[Sequence[str]], kh: int, kw: int
) -> np.ndarray:
    """RGBA image, transparent except a strip in the label's colour above every tile."""
    overlay = np.zeros((*shape, 4))
    strip = _strip(kh)
    for layer, row in enumerate(labels):
        for head, label in enumerate(row):
            r, c = layer * (kh + strip + 1), head * (kw + 1)
            overlay[r : r + strip, c : c + kw] = to_rgba(LABEL_COLOURS.get(label, "#000000"))
    return overlay


def kernel_grid(kernels: np.ndarray, labels: Sequence[Sequence[str]]) -> bytes:
    """Every head's positional kernel, one row per layer and one column per head; each tile
    is the logit against the offset (dr down, dc right) from the query at its centre (the
    black dot), scaled to its own range; the strip above a tile is the kernel's label, in
    the head-label colours. Labels are drawn as image pixels, not text artists, so a large
    model costs no more to draw than a small one."""
    kernels = np.asarray(kernels, dtype=float)
    layers, heads, kh, kw = kernels.shape
    if len(labels) != layers or any(len(row) != heads for row in labels):
        raise ValueError(f"labels do not match kernels ({layers} x {heads})")
    mosaic = kernel_mosaic(kernels)
    strip = _strip(kh)
    tile = min(_TILE_IN, _MAX_MOSAIC_IN / max(heads, layers))
    width = max(tile * heads * kw / max(kh, kw), 3.0)
    height = max(tile * layers * (kh + strip) / max(kh, kw), 0.8)
    left, bottom, right, top = 0.6, 0.45, 0.9, 0.65
    fig = new_figure(left + width + right, bottom + height + top)
    ax = add_axes(fig, left, bottom, width, height)
    image = ax.imshow(
        mosaic, cmap="RdBu_r", vmin=-1, vmax=1, interpolation="nearest", aspect="auto"
    )
    ax.imshow(_label_overlay(mosaic.shape, labels, kh, kw), interpolation="nearest", aspect="auto")
    centres_r = np.arange(layers) * (kh + strip + 1) + strip + (kh - 1) / 2
    centres_c = np.arange(heads) * (kw + 1) + (kw - 1) / 2
    cc, rr = np.meshgrid(centres_c, centres_r)
    ax.scatter(cc.ravel(), rr.ravel(), s=4, c="black")
    step_h, step_l = max(1, -(-heads // 16)), max(1, -(-layers // 16))
    ax.set_xticks(centres_c[::step_h], [str(h) for h in range(0, heads, step_h)], fontsize=8)
    ax.set_yticks(centres_r[::step_l], [str(i) for i in range(0, layers, step_l)], fontsize=8)
    ax.set_xlabel("head", fontsize=8)
    ax.set_ylabel("layer")
    present = {lab for row in labels for lab in row}
    handles = [Patch(color=c, label=lab) for lab, c in LABEL_COLOURS.items() if lab in present]
    ax.legend(
        handles=handles,
        fontsize=7,
        ncol=len(handles),
        loc="lower center",
        bbox_to_anchor=(0.5, 1.0),
        frameon=False,
        handlelength=1.0,
    )
    cax = add_axes(fig, left + width + 0.15, bottom, 0.12, height)
    colorbar(fig, image, cax, label="logit / max |logit|", ticks=(-1, 0, 1))
    return figure_png(fig, dpi=_DPI)


def alignment_profile(centres: np.ndarray, profile: np.ndarray, shuffled: np.ndarray) -> bytes:
    """Mean Q/K cosine (over heads) against grid distance, one line per layer, and the
    shuffled-position baseline of the same vectors (dashed, mean over layers and heads)."""
    profile, shuffled = np.asarray(profile, dtype=float), np.asarray(shuffled, dtype=float)
    if profile.ndim != 3 or profile.shape != shuffled.shape or profile.shape[-1] != len(centres):
        raise ValueError("profile and shuffled must be equal (layers, heads, bins) arrays")
    fig = new_figure(6.0, 3.8)
    ax = add_axes(fig, 0.75, 0.55, 5.0, 2.9)
    x = np.asarray(centres, dtype=float)[1:]
    for layer in range(profile.shape[0]):
        ax.plot(x, profile[layer, :, 1:].mean(0), marker=".", linewidth=1, label=f"layer {layer}")
    ax.plot(x, shuffled[:, :, 1:].mean((0, 1)), "k--", linewidth=1, label="shuffled positions")
    if profile.shape[0] <= 12:
        ax.legend(fontsize=7, loc="best")
    ax.set_xlabel("grid distance (patches)")
    ax.set_ylabel("mean cos(Q_i, K_j)")
    ax.xaxis.set_major_locator(few_ticks(6))
    ax.yaxis.set_major_locator(few_ticks(5))
    ax.set_title("Q/K alignment against distance", y=1.0)
    return figure_png(fig, dpi=_DPI)
