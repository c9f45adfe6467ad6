"""Figures of the gradient-alignment section, returned as PNG bytes (never written to disk).

Fixed layouts in inches (no tight bbox, no constrained layout): see ``figures``.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from matplotlib.patches import Patch, Rectangle

from workers.analysis.figures import add_axes, colorbar, few_ticks, figure_png, new_figure, plt
from workers.analysis.grid import Grid

# Inches: the logit-pressure heatmap's column of per-layer scales and its colorbar.
_SCALE_COLUMN = 0.7
_COLORBAR = 0.15
_COLORBAR_LABELS = 0.75


def _bin_edges(centres: np.ndarray) -> np.ndarray:
    """(bins + 1,) cell edges of the distance bins: halfway between their centres, or around
    the bin index when the centres are not finite and increasing."""
    c = np.asarray(centres, dtype=float)
    if len(c) > 1 and np.isfinite(c).all() and (np.diff(c) > 0).all():
        mid = (c[1:] + c[:-1]) / 2
        return np.concatenate([[2 * c[0] - mid[0]], mid, [2 * c[-1] - mid[-1]]])
    return np.arange(len(c) + 1) - 0.5


def plot_logit_pressure(
    pressure: np.ndarray,
    centres: np.ndarray,
    *,
    near_bins: tuple[int, ...] = (1,),
    far_bins: tuple[int, ...] = (),
) -> bytes:
    """Logit pressure -dL/ds against grid distance as one heatmap: a row per layer, a cell
    per distance bin, coloured by the head mean of that layer scaled by the layer's largest
    |head mean| (printed beside the row), red > 0 (the loss wants more attention), blue < 0.

    ``pressure`` (layers, heads, bins) with NaN for heads a layer does not have; ``centres``
    (bins,) mean distance of each bin in patches. A green outline marks each "near" bin and a
    dashed black outline the "far" ones. The per-head curves of the former one-panel-per-layer
    figure are not drawn (12 axes cost ~0.5 s to render): they are in the report's
    ``gradient_logit_pressure`` array (layers, heads, bins).
    """
    if pressure.ndim != 3 or pressure.shape[-1] != len(centres):
        raise ValueError(f"pressure {pressure.shape} does not match {len(centres)} bins")
    num_layers = pressure.shape[0]
    with np.errstate(all="ignore"):
        mean = np.nanmean(pressure, axis=1)  # (layers, bins); NaN where no head has a value
    finite = np.isfinite(mean)
    scale = np.abs(np.where(finite, mean, 0.0)).max(axis=1)
    scaled = mean / np.where(scale > 0, scale, 1.0)[:, None]
    edges = _bin_edges(centres)

    row = 0.26
    heat_h = max(1.3, row * num_layers)
    left, bottom, top, width = 0.65, 0.55, 0.8, 9.0
    heat_w = width - left - _SCALE_COLUMN - 0.1 - _COLORBAR - _COLORBAR_LABELS
    fig = new_figure(width, bottom + heat_h + top)
    ax = add_axes(fig, left, bottom, heat_w, heat_h)
    cmap = plt.get_cmap("RdBu_r").with_extremes(bad="0.8")
    mesh = ax.pcolormesh(
        edges,
        np.arange(num_layers + 1) - 0.5,
        np.ma.masked_invalid(scaled),
        cmap=cmap,
        vmin=-1.0,
        vmax=1.0,
    )
    ax.set_ylim(num_layers - 0.5, -0.5)  # layer 0 on top
    ax.set_yticks(range(0, num_layers, math.ceil(num_layers / 16)))
    ax.xaxis.set_major_locator(few_ticks(8, integer=True))
    ax.tick_params(labelsize=8)
    ax.set_xlabel("grid distance (patches)", fontsize=9)
    ax.set_ylabel("layer", fontsize=9)

    handles = []
    outlines = [(b, b, {"edgecolor": "tab:green", "lw": 1.6}, "near bins") for b in near_bins]
    if far_bins:
        style = {"edgecolor": "black", "lw": 1.2, "ls": "--"}
        outlines.append((min(far_bins), max(far_bins), style, "far bins"))
    for first, last, style, label in outlines:
        span = (edges[first], -0.5), edges[last + 1] - edges[first], num_layers
        ax.add_patch(Rectangle(*span, fill=False, **style))
        if not any(h.get_label() == label for h in handles):
            handles.append(Patch(fill=False, label=label, **style))
    if handles:
        ax.legend(
            handles=handles,
            fontsize=8,
            ncols=len(handles),
            loc="lower left",
            bbox_to_anchor=(0.0, 1.0),
            frameon=False,
            borderaxespad=0.2,
        )

    # The scale of each row, right of the heatmap: x in axes fraction, y in layers.
    rows_at = ax.get_yaxis_transform()
    scale_x = 1 + 0.08 / heat_w
    ax.text(scale_x, -0.5, "max |mean|", transform=rows_at, fontsize=8, va="bottom")
    for layer in range(num_layers):
        text = f"{scale[layer]:.1e}" if scale[layer] > 0 else "0"
        text = text if finite[layer].any() else "n/a"
        ax.text(scale_x, layer, text, transform=rows_at, fontsize=7.5, va="center")

    cax = add_axes(fig, left + heat_w + _SCALE_COLUMN + 0.1, bottom, _COLORBAR, heat_h)
    colorbar(fig, mesh, cax, label="head mean / max |mean|", ticks=(-1.0, 0.0, 1.0))
    fig.text(
        0.08 / width,
        1 - 0.12 / fig.get_figheight(),
        "Logit pressure -dL/ds vs grid distance, head mean per layer",
        fontsize=10,
        va="top",
    )
    fig.text(
        0.08 / width,
        1 - 0.36 / fig.get_figheight(),
        "red > 0: the loss wants more attention at that distance; each row scaled by its "
        "max |mean|",
        fontsize=8,
        va="top",
        color="0.3",
    )
    return figure_png(fig)


def _bin_quantiles(values: torch.Tensor, bins: torch.Tensor, num_bins: int) -> np.ndarray:
    """(num_bins, 4) 5th, 25th, 75th and 95th percentile of ``values`` in each bin (NaN for an
    empty bin); ``values`` and ``bins`` are 1-D and aligned."""
    order = torch.argsort(bins, stable=True)
    sorted_bins, sorted_values = bins[order], values[order]
    counts = torch.bincount(sorted_bins, minlength=num_bins).tolist()
    q = torch.tensor([0.05, 0.25, 0.75, 0.95], dtype=values.dtype)
    out = np.full((num_bins, 4), np.nan)
    for b, chunk in enumerate(torch.split(sorted_values, counts)):
        if len(chunk):
            out[b] = torch.quantile(chunk, q).numpy()
    return out


def plot_pos_pressure(rate: np.ndarray, grid: Grid) -> bytes:
    """Position-embedding pressure: d cos(pos_i, pos_j) per unit gradient step.

    Three panels: the pairs' change against distance (bin mean, with the bands that hold the
    middle 50% and 90% of the pairs of each bin), each patch's mean change towards its 4
    neighbours as a map of the grid, and the change of every patch relative to the centre
    patch as a map.
    """
    N = grid.num_patches
    if rate.shape != (N, N):
        raise ValueError(
            f"rate {rate.shape} is not ({N}, {N}) for the {grid.height}x{grid.width} grid"
        )
    r = torch.as_tensor(rate, dtype=torch.float64)
    off = ~torch.eye(N, dtype=torch.bool)
    means = grid.bin_mean(r, include_self=False).numpy()
    bands = _bin_quantiles(r[off], grid.distance_bins[off], grid.num_distance_bins)
    nb4 = grid.neighbour_mask(4)
    pull = ((r * nb4).sum(-1) / nb4.sum(-1)).reshape(grid.height, grid.width).numpy()
    centre = (grid.height // 2) * grid.width + grid.width // 2
    to_centre = r[centre].clone()
    to_centre[centre] = float("nan")
    tc = to_centre.reshape(grid.height, grid.width).numpy()

    fig = new_figure(9.0, 3.5)
    top = 3.5 - 0.5  # inches: the title above
    ax = add_axes(fig, 0.8, 0.5, 2.55, top - 0.5)
    x = grid.bin_centres.numpy()
    for low, high, alpha, label in ((0, 3, 0.2, "5-95% of pairs"), (1, 2, 0.45, "25-75% of pairs")):
        ax.fill_between(
            x, bands[:, low], bands[:, high], color="tab:blue", alpha=alpha, lw=0, label=label
        )
    ax.plot(x, means, color="black", lw=1.8, marker="o", ms=3, label="bin mean")
    ax.axhline(0.0, color="grey", lw=0.8, ls="--")
    ax.xaxis.set_major_locator(few_ticks(5, integer=True))
    ax.yaxis.set_major_locator(few_ticks(5))
    ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))  # short labels: fixed margin
    ax.tick_params(labelsize=8)
    ax.set_xlabel("grid distance (patches)", fontsize=9)
    ax.set_ylabel("d cos(pos_i, pos_j) / d step", fontsize=9)
    ax.set_title("pair pressure vs distance", fontsize=9, y=1.0)
    ax.legend(fontsize=7, loc="lower right", framealpha=0.8)

    # Two maps of the grid's aspect in 2.1-inch slots, each with a colorbar underneath.
    cmap = plt.get_cmap("RdBu_r").with_extremes(bad="0.8")
    side = 2.1 / max(grid.height, grid.width)
    map_w, map_h = side * grid.width, side * grid.height
    maps = (
        (pull, 3.95, "pull towards 4-neighbours per patch"),
        (tc, 6.55, f"pressure relative to centre patch {centre}"),
    )
    for values, slot, title in maps:
        finite = np.isfinite(values)
        vmax = float(np.abs(values[finite]).max()) if finite.any() else 0.0
        vmax = vmax or 1.0
        map_ax = add_axes(fig, slot + (2.1 - map_w) / 2, top - map_h, map_w, map_h)
        image = map_ax.imshow(values, cmap=cmap, vmin=-vmax, vmax=vmax, aspect="auto")
        map_ax.set_xticks([])
        map_ax.set_yticks([])
        map_ax.set_title(title, fontsize=8.5, y=1.0)
        cax = add_axes(fig, slot + 0.15, top - map_h - 0.3, 1.8, 0.1)
        colorbar(fig, image, cax, orientation="horizontal")
    fig.suptitle("Position-embedding pressure (> 0: pulled together)", y=1 - 0.1 / 3.5, fontsize=10)
    return figure_png(fig)
