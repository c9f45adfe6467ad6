"""Figures drawn from the model after the sections are computed: the 2-D projection of the
position table, and the attention maps of a few chosen heads on one probe image.

Both are cheap (one PCA, one forward pass on one image) and returned as PNG bytes; the
analysis never touches files.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from matplotlib.collections import LineCollection
from matplotlib.patches import Rectangle
from threadpoolctl import threadpool_limits
from torch import Tensor

from workers.analysis.capture import attention_capture, evaluating
from workers.analysis.figures import (
    PendingFigure,
    add_axes,
    colorbar,
    few_ticks,
    figure,
    figure_png,
    new_figure,
    plt,
)
from workers.analysis.grid import Grid, grid_from_model
from workers.analysis.plots_heads import LABEL_COLOURS
from workers.analysis.posembed import centred_pca, extract_position_table

_DPI = 100
MAX_CHOSEN_HEADS = 4  # the most local, the most global, and up to two heads of other labels


def _png(fig: plt.Figure) -> bytes:
    # Fixed layouts in inches (no tight bbox, no constrained layout): see ``figures``.
    return figure_png(fig, dpi=_DPI)


# ------------------------------------------------------------------ position projection


def position_projection(table: Tensor, grid: Grid) -> np.ndarray:
    """(H, W, 2) top-2 principal-component scores of an (H, W, D) position table.

    The same centred PCA that ``projection_r2`` scores; a table that is a map of the grid
    lays its patches out as a (possibly rotated, bent) copy of the grid.
    """
    if table.ndim != 3 or tuple(table.shape[:2]) != grid.shape:
        raise ValueError(
            f"table must be ({grid.height}, {grid.width}, D), got {tuple(table.shape)}"
        )
    flat = table.detach().to("cpu", torch.float64).reshape(grid.num_patches, -1).numpy()
    # Single-threaded BLAS, as in ``posembed.analyse_table``: on a loaded 2-core machine the
    # two OpenBLAS threads made this ~200x200 eigh take 0.03-0.5 s instead of ~5 ms.
    with threadpool_limits(limits=1, user_api="blas"):
        scores, _ = centred_pca(flat)
    return scores.reshape(grid.height, grid.width, 2)


def position_projection_png(table: Tensor, grid: Grid) -> bytes:
    """Two panels of the table's 2-D PCA projection, one dot per patch: coloured by grid row
    (left) and by grid column (right). Thin lines join grid neighbours, so a table that maps
    the grid looks like a mesh and a random table like a tangle."""
    points = position_projection(table, grid)
    h, w = grid.shape
    rows, cols = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    # Every row and every column of the grid as one polyline; one collection per panel.
    mesh = [*points, *points.transpose(1, 0, 2)]
    fig = new_figure(9.0, 4.05)
    for left, values, name, count in ((0.75, rows, "row", h), (5.2, cols, "column", w)):
        ax = add_axes(fig, left, 0.5, 2.9, 2.9)
        ax.add_collection(LineCollection(mesh, colors="0.8", linewidths=0.6, zorder=1))
        dots = ax.scatter(
            points[:, :, 0].ravel(),
            points[:, :, 1].ravel(),
            c=values.ravel(),
            cmap="viridis",
            vmin=0,
            vmax=max(count - 1, 1),
            s=max(8.0, 400.0 / max(h, w)),
            edgecolors="black",
            linewidths=0.2,
            zorder=2,
        )
        ticks = sorted({0, (count - 1) // 2, max(count - 1, 1)})
        cax = add_axes(fig, left + 3.05, 0.7, 0.12, 2.5)
        colorbar(fig, dots, cax, label=f"grid {name}", ticks=ticks, fmt="{x:.0f}")
        ax.xaxis.set_major_locator(few_ticks(4))
        ax.yaxis.set_major_locator(few_ticks(4))
        ax.tick_params(labelsize=8)
        ax.set_title(f"coloured by {name}", fontsize=10, y=1.0)
        ax.set_xlabel("PC 1", fontsize=9)
        ax.set_ylabel("PC 2", fontsize=9)
        ax.set_aspect("equal", adjustable="datalim")
    fig.suptitle("Position embeddings, top-2 principal components", y=1 - 0.1 / 4.05)
    return _png(fig)


# ------------------------------------------------------------------ chosen heads


@dataclass(frozen=True)
class ChosenHead:
    """A head drawn in the attention-map figure and why it was chosen."""

    layer: int
    head: int
    label: str
    mean_distance_patches: float
    reason: str


def choose_heads(
    heads_section: Mapping[str, Any], *, limit: int = MAX_CHOSEN_HEADS
) -> list[ChosenHead]:
    """The most local head (smallest mean attention distance), the most global one (largest),
    then the most typical head of each other label present (horizontal, vertical, texture,
    sink, content, prefix first), up to ``limit`` distinct heads. Empty when the section has no heads."""
    rows = [
        (int(layer["layer"]), int(h["head"]), str(h["label"]), h.get("mean_distance_patches"))
        for layer in heads_section.get("layers", [])
        for h in layer.get("heads", [])
        if h.get("mean_distance_patches") is not None
    ]
    if not rows:
        return []
    chosen: list[ChosenHead] = []

    def add(row: tuple[int, int, str, float], reason: str) -> None:
        if len(chosen) < limit and all((c.layer, c.head) != row[:2] for c in chosen):
            chosen.append(ChosenHead(row[0], row[1], row[2], float(row[3]), reason))

    add(min(rows, key=lambda r: r[3]), "most local")
    add(max(rows, key=lambda r: r[3]), "most global")
    for label in (
        "horizontal",
        "vertical",
        "texture",
        "sink",
        "content",
        "prefix",
        "local",
        "global",
    ):
        of_label = [r for r in rows if r[2] == label]
        if of_label:
            add(min(of_label, key=lambda r: r[3]), f"a {label} head")
    return chosen


def head_maps(
    model: torch.nn.Module, image: Tensor, heads: Sequence[ChosenHead], query: int
) -> dict[str, Tensor]:
    """Attention probabilities of the chosen heads on one image (1, 3, H, W), two rows each:
    ``patch``: (heads, N) from patch token ``query`` (raster index over the grid) to every
    patch; ``prefix``: (heads, N) from the first prefix token to every patch (None without
    prefix tokens). Runs one forward pass in eval mode under ``no_grad``; the model's mode
    is restored."""
    grid = grid_from_model(model)
    num_prefix = int(getattr(model, "num_prefix_tokens", 0) or 0)
    if image.ndim != 4 or image.shape[0] != 1:
        raise ValueError(f"image must be (1, 3, H, W), got {tuple(image.shape)}")
    if not 0 <= query < grid.num_patches:
        raise ValueError(f"query patch {query} is outside the {grid.height}x{grid.width} grid")
    layers = sorted({h.layer for h in heads})
    captured: dict[int, Tensor] = {}

    def keep(layer: int, probs: Tensor) -> None:
        captured[layer] = probs[0].detach().cpu()

    with evaluating(model), torch.no_grad(), attention_capture(model, keep, layers=layers):
        model(image.to(next(model.parameters()).device))
    patch_rows, prefix_rows = [], []
    for h in heads:
        probs = captured[h.layer][h.head]  # (T, T)
        patch_rows.append(probs[num_prefix + query, num_prefix:])
        if num_prefix:
            prefix_rows.append(probs[0, num_prefix:])
    return {
        "patch": torch.stack(patch_rows),
        "prefix": torch.stack(prefix_rows) if prefix_rows else None,  # type: ignore[dict-item]
    }


def display_image(image: Tensor, model: torch.nn.Module, normalization: Any = None) -> np.ndarray:
    """(H, W, 3) in [0, 1] for display: the audit's normalisation (a
    `workers.analysis.normalization.Normalization`; default: the model's timm config)
    undone, then clipped; a 1-channel image is shown grey."""
    if normalization is None:
        from timm.data import resolve_data_config

        config = resolve_data_config({}, model=model)
        mean_values, std_values = config["mean"], config["std"]
    else:
        mean_values, std_values = normalization.mean, normalization.std
    channels = image.shape[1]
    mean = torch.tensor(mean_values, dtype=torch.float32)[:channels].view(channels, 1, 1)
    std = torch.tensor(std_values, dtype=torch.float32)[:channels].view(channels, 1, 1)
    pixels = image[0].detach().cpu().float() * std + mean
    return pixels.expand(3, -1, -1).clamp(0, 1).permute(1, 2, 0).numpy()


def _overlay(grey: np.ndarray, attention: np.ndarray, alpha: float = 0.7) -> np.ndarray:
    """(H, W, 3) uint8: ``attention`` (grid rows, grid cols) in the inferno colours, scaled to
    its own range, laid with opacity ``alpha`` over the (H, W) grey image in [0, 1]; each grid
    cell covers its block of pixels (nearest neighbour)."""
    height, width = grey.shape
    rows = np.arange(height) * attention.shape[0] // height
    cols = np.arange(width) * attention.shape[1] // width
    span = float(attention.max() - attention.min())
    scaled = (attention - attention.min()) / (span or 1.0)
    colours = plt.get_cmap("inferno")(scaled)[..., :3][rows][:, cols]
    blend = alpha * colours + (1 - alpha) * grey[..., None]
    return (blend * 255).round().astype(np.uint8)


def attention_maps_png(
    picture: np.ndarray,
    maps: Mapping[str, Tensor | None],
    heads: Sequence[ChosenHead],
    grid: Grid,
    query: int,
) -> bytes:
    """One row per chosen head: the image, the head's attention from the query patch (boxed
    in white), and, with a prefix token, the class token's attention, each over the image.

    Drawn as one image (the panels composed in numpy) in one axes without ticks: a dozen
    axes with an image each cost ~10x more to lay out and draw."""
    columns = [("patch", f"from patch ({query // grid.width}, {query % grid.width})")]
    if maps.get("prefix") is not None:
        columns.append(("prefix", "from the class token"))
    height, width = picture.shape[:2]
    picture = np.asarray(picture, dtype=float)[..., :3]
    grey = picture.mean(axis=2)
    gap = max(4, width // 28)  # white pixels between panels
    num_rows, num_cols = len(heads), 1 + len(columns)
    shape = (num_rows * (height + gap) - gap, num_cols * (width + gap) - gap, 3)
    mosaic = np.full(shape, 255, dtype=np.uint8)

    def at(i: int, j: int) -> tuple[int, int]:  # top-left pixel (y, x) of panel (i, j)
        return i * (height + gap), j * (width + gap)

    for i in range(num_rows):
        y, x = at(i, 0)
        mosaic[y : y + height, x : x + width] = (picture * 255).round()
        for j, (key, _) in enumerate(columns, start=1):
            attention = maps[key][i].reshape(grid.shape).numpy()  # type: ignore[index]
            y, x = at(i, j)
            mosaic[y : y + height, x : x + width] = _overlay(grey, attention)

    # Inches: head descriptions (turned 90 degrees) on the left, titles above.
    # A probe image of 160-260 pixels is drawn at one image pixel per figure pixel.
    left, top, bottom = 0.65, 0.65, 0.1
    scale = 1 / _DPI if 160 <= width <= 260 else 2.3 / width  # inches per image pixel
    mosaic_w, mosaic_h = mosaic.shape[1] * scale, mosaic.shape[0] * scale
    width_in = max(left + mosaic_w + 0.1, 6.0)  # at least the title's width
    fig = new_figure(width_in, bottom + mosaic_h + top)
    ax = add_axes(fig, (width_in - mosaic_w + left - 0.1) / 2, bottom, mosaic_w, mosaic_h)
    ax.imshow(mosaic, interpolation="nearest", aspect="auto")
    ax.set_axis_off()
    row_px, col_px = height / grid.height, width / grid.width
    r, c = divmod(query, grid.width)
    for j, title in enumerate(["probe image"] + [title for _, title in columns]):
        ax.text(at(0, j)[1] + width / 2, -gap, title, ha="center", va="bottom", fontsize=9)
    for i, head in enumerate(heads):
        y, x = at(i, 0)
        ax.text(
            -gap,
            y + height / 2,
            f"layer {head.layer} head {head.head}\n{head.label}, {head.reason}\n"
            f"{head.mean_distance_patches:.2f} patches",
            ha="right",
            va="center",
            rotation=90,
            multialignment="center",
            fontsize=8,
            color=LABEL_COLOURS.get(head.label, "black"),
        )
        y, x = at(i, 1)
        ax.add_patch(
            Rectangle(
                (x + c * col_px - 0.5, y + r * row_px - 0.5),
                col_px,
                row_px,
                fill=False,
                edgecolor="white",
                lw=1.5,
            )
        )
    fig.suptitle(
        "Attention of chosen heads on one probe image (brighter = more attention)",
        y=1 - 0.1 / fig.get_figheight(),
        fontsize=10,
    )
    return _png(fig)


# ------------------------------------------------------------------ pipeline adapter


def extra_figures(
    model: torch.nn.Module,
    probe_image: Tensor,
    sections: Mapping[str, Mapping[str, Any]],
    *,
    stored_pos_embed: Tensor | None = None,
    normalization: Any = None,
) -> dict[str, bytes | PendingFigure]:
    """The figures of this module that apply to an audit whose sections are ``sections``:
    ``pos_projection`` when the position section has a table (the table as stored, as the
    section reads it: ``stored_pos_embed`` is ``LoadedModel.stored_pos_embed``),
    ``head_attention_maps`` when the heads section has heads. ``probe_image`` is one
    normalised image (1, 3, H, W)."""
    figures: dict[str, bytes | PendingFigure] = {}
    if sections.get("position_embedding", {}).get("available"):
        extracted = extract_position_table(model, stored_pos_embed=stored_pos_embed)
        if extracted.table is not None:
            table = extracted.table.detach().to("cpu", copy=True)  # drawn later, maybe
            figures["pos_projection"] = figure(
                position_projection_png, table, extracted.stored_grid
            )
    heads_section = sections.get("heads", {})
    chosen = choose_heads(heads_section) if heads_section.get("available") else []
    if chosen:
        grid = grid_from_model(model)
        query = (grid.height // 2) * grid.width + grid.width // 2  # the centre patch
        maps = head_maps(model, probe_image, chosen, query)
        figures["head_attention_maps"] = figure(
            attention_maps_png,
            display_image(probe_image, model, normalization),
            maps,
            chosen,
            grid,
            query,
        )
    return figures
