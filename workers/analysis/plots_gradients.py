"""Figures of the gradient-alignment section, returned as PNG bytes (never written to disk)."""

from __future__ import annotations

import math

import numpy as np  # noqa: E402
import torch  # noqa: E402

from workers.analysis.figures import figure_png, plt
from workers.analysis.grid import Grid  # noqa: E402


def _png(fig: plt.Figure) -> bytes:
    return figure_png(fig, tight=True)


def plot_logit_pressure(
    pressure: np.ndarray,
    centres: np.ndarray,
    *,
    near_bins: tuple[int, ...] = (1,),
    far_bins: tuple[int, ...] = (),
) -> bytes:
    """Logit pressure -dL/ds against grid distance: one panel per layer, heads as thin lines.

    ``pressure`` (layers, heads, bins) with NaN for heads a layer does not have; ``centres``
    (bins,) mean distance of each bin in patches. The thick line is the head mean; the shaded
    span marks the "far" bins.
    """
    if pressure.ndim != 3 or pressure.shape[-1] != len(centres):
        raise ValueError(f"pressure {pressure.shape} does not match {len(centres)} bins")
    L = pressure.shape[0]
    cols = min(L, 4)
    rows = math.ceil(L / cols)
    fig, axes = plt.subplots(
        rows, cols, figsize=(3.2 * cols, 2.6 * rows), squeeze=False, sharex=True
    )
    for i in range(rows * cols):
        ax = axes[i // cols][i % cols]
        if i >= L:
            ax.axis("off")
            continue
        layer = pressure[i]
        for h in range(layer.shape[0]):
            if np.all(np.isnan(layer[h])):
                continue
            ax.plot(centres, layer[h], lw=0.7, alpha=0.6)
        with np.errstate(all="ignore"):
            mean = np.nanmean(layer, axis=0)
        ax.plot(centres, mean, lw=2.2, color="black", label="head mean")
        ax.axhline(0.0, color="grey", lw=0.8, ls="--")
        if far_bins:
            ax.axvspan(
                centres[min(far_bins)] - 0.5,
                centres[max(far_bins)] + 0.5,
                color="tab:red",
                alpha=0.07,
            )
        if near_bins:
            for b in near_bins:
                ax.axvline(centres[b], color="tab:green", lw=0.8, alpha=0.5)
        ax.set_title(f"layer {i}", fontsize=9)
        ax.tick_params(labelsize=7)
        ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
        if i % cols == 0:
            ax.set_ylabel("-dL/ds (pressure)", fontsize=8)
        if i // cols == rows - 1:
            ax.set_xlabel("grid distance (patches)", fontsize=8)
    fig.suptitle("Logit pressure vs distance (> 0: loss wants more attention)", fontsize=10)
    return _png(fig)


def plot_pos_pressure(rate: np.ndarray, grid: Grid) -> bytes:
    """Position-embedding pressure: d cos(pos_i, pos_j) per unit gradient step.

    Three panels: every pair's change against distance (with the bin means), each patch's
    mean change towards its 4 neighbours as a map of the grid, and the change of every patch
    relative to the centre patch as a map.
    """
    N = grid.num_patches
    if rate.shape != (N, N):
        raise ValueError(
            f"rate {rate.shape} is not ({N}, {N}) for the {grid.height}x{grid.width} grid"
        )
    r = torch.as_tensor(rate, dtype=torch.float64)
    off = ~torch.eye(N, dtype=torch.bool)
    dist = grid.distances
    means = grid.bin_mean(r, include_self=False).numpy()
    nb4 = grid.neighbour_mask(4)
    pull = ((r * nb4).sum(-1) / nb4.sum(-1)).reshape(grid.height, grid.width).numpy()
    centre = (grid.height // 2) * grid.width + grid.width // 2
    to_centre = r[centre].clone()
    to_centre[centre] = float("nan")

    fig, axes = plt.subplots(1, 3, figsize=(12, 3.6))
    ax = axes[0]
    ax.scatter(dist[off].numpy(), r[off].numpy(), s=3, alpha=0.25, color="tab:blue")
    ax.plot(
        grid.bin_centres.numpy(), means, color="black", lw=2, marker="o", ms=3, label="bin mean"
    )
    ax.axhline(0.0, color="grey", lw=0.8, ls="--")
    ax.set_xlabel("grid distance (patches)")
    ax.set_ylabel("d cos(pos_i, pos_j) / d step")
    ax.set_title("pair pressure vs distance", fontsize=9)
    ax.legend(fontsize=7)

    vmax = float(np.nanmax(np.abs(pull))) or 1.0
    im = axes[1].imshow(pull, cmap="RdBu_r", vmin=-vmax, vmax=vmax)
    axes[1].set_title("pull towards 4-neighbours per patch", fontsize=9)
    fig.colorbar(im, ax=axes[1], fraction=0.046)

    tc = to_centre.reshape(grid.height, grid.width).numpy()
    vmax = float(np.nanmax(np.abs(tc))) if np.isfinite(tc).any() else 1.0
    im = axes[2].imshow(tc, cmap="RdBu_r", vmin=-(vmax or 1.0), vmax=vmax or 1.0)
    axes[2].set_title(f"pressure relative to centre patch {centre}", fontsize=9)
    fig.colorbar(im, ax=axes[2], fraction=0.046)
    for ax in axes[1:]:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle("Position-embedding pressure (> 0: pulled together)", fontsize=10)
    return _png(fig)
