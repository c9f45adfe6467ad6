"""The common approach to head statistics, kept as a baseline for the benchmarks.

What people usually write: switch timm's attention to its explicit path, put a forward hook
on every block's ``attn.attn_drop`` (its input and output are the attention probabilities),
keep every map of every image, and compute the statistics once at the end over the stored
maps. Memory grows with the number of images (layers x heads x tokens^2 floats per image);
``workers.analysis.heads`` reduces each layer's maps inside the hook instead.

The statistics are written here from their definitions, independently of
``workers.analysis.heads``, so that the smoke test comparing the two is a real check.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import Tensor, nn

from workers.analysis.grid import Grid, grid_from_model

NAIVE_STATISTICS: tuple[str, ...] = (
    "mean_distance_patches",
    "entropy",
    "local_mass",
    "self_mass",
    "prefix_mass",
    "horizontal",
    "content_dependence",
)


def store_all_attention(model: nn.Module, batches: Iterable[Tensor]) -> list[Tensor]:
    """Every attention map of every image: one (M, heads, T, T) float32 tensor per layer."""
    stored: list[list[Tensor]] = [[] for _ in model.blocks]
    handles, flags = [], []
    for layer, block in enumerate(model.blocks):
        flags.append(block.attn.fused_attn)
        block.attn.fused_attn = False

        def hook(_module: nn.Module, _inputs: tuple, output: Tensor, layer: int = layer) -> None:
            stored[layer].append(output.detach().clone())

        handles.append(block.attn.attn_drop.register_forward_hook(hook))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for batch in batches:
                model(batch)
    finally:
        for handle in handles:
            handle.remove()
        for block, flag in zip(model.blocks, flags, strict=True):
            block.attn.fused_attn = flag
        model.train(was_training)
    return [torch.cat(maps) for maps in stored]


def statistics_from_stored(maps: list[Tensor], grid: Grid, num_prefix: int) -> dict[str, Tensor]:
    """Per-head statistics (layers, heads) float64 from stored maps, by their definitions:
    patch queries only, patch-to-patch part renormalised to sum to 1 per query, averaged over
    queries and images. ``horizontal`` is (col - row) / (col + row) of the mean absolute column
    and row offsets, each relative to uniform attention's; ``content_dependence`` is the
    across-image variance of the maps over their mean energy."""
    n = grid.num_patches
    distance = grid.distances.double()
    abs_col, abs_row = grid.col_offsets.abs().double(), grid.row_offsets.abs().double()
    neighbours = grid.neighbour_mask(8).double()
    uniform_col, uniform_row = float(abs_col.mean()), float(abs_row.mean())
    out: dict[str, list[Tensor]] = {name: [] for name in NAIVE_STATISTICS}
    for layer_maps in maps:
        rows = layer_maps[:, :, num_prefix:, :].double()  # (M, H, N, T)
        patch = rows[..., num_prefix:]
        patch = patch / patch.sum(-1, keepdim=True).clamp_min(1e-30)
        out["prefix_mass"].append(rows[..., :num_prefix].sum(-1).mean((0, 2)))
        out["mean_distance_patches"].append((patch * distance).sum(-1).mean((0, 2)))
        out["local_mass"].append((patch * neighbours).sum(-1).mean((0, 2)))
        out["self_mass"].append(patch.diagonal(dim1=-2, dim2=-1).mean((0, 2)))
        logs = torch.where(patch > 0, patch.log(), torch.zeros_like(patch))
        out["entropy"].append((-(patch * logs).sum(-1) / math.log(n)).mean((0, 2)))
        col = (patch * abs_col).sum(-1).mean((0, 2)) / uniform_col
        row = (patch * abs_row).sum(-1).mean((0, 2)) / uniform_row
        out["horizontal"].append((col - row) / (col + row))
        mean_map = patch.mean(0)
        energy = (patch * patch).mean(0).sum((-2, -1))
        variance = ((patch - mean_map) ** 2).mean(0).sum((-2, -1))
        out["content_dependence"].append((variance / energy).clamp(0.0, 1.0))
    return {name: torch.stack(values) for name, values in out.items()}


def naive_head_statistics(model: nn.Module, batches: Iterable[Tensor]) -> dict[str, Tensor]:
    """Store every map of every image, then compute the statistics: the common approach."""
    grid = grid_from_model(model)
    maps = store_all_attention(model, batches)
    return statistics_from_stored(maps, grid, int(getattr(model, "num_prefix_tokens", 0)))
