"""Patch-grid geometry shared by every analysis.

A ViT cuts an image into a ``height x width`` grid of patches and numbers them in raster
order (row by row). Every analysis that talks about "neighbours" or "distance" uses the
coordinates, offsets, distances and distance bins defined here, so a 14x14 grid and a
14x10 grid are measured the same way.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch
from torch import Tensor


@dataclass(frozen=True)
class Grid:
    """A ``height x width`` patch grid; patches are numbered in raster order.

    ``patch_size`` is the side of one patch in pixels and only matters for values
    reported in pixels.
    """

    height: int
    width: int
    patch_size: int = 16

    def __post_init__(self) -> None:
        if self.height < 1 or self.width < 1:
            raise ValueError(f"grid must be at least 1x1, got {self.height}x{self.width}")
        if self.patch_size < 1:
            raise ValueError(f"patch_size must be positive, got {self.patch_size}")

    @property
    def num_patches(self) -> int:
        return self.height * self.width

    @property
    def shape(self) -> tuple[int, int]:
        return (self.height, self.width)

    def transposed(self) -> Grid:
        return Grid(self.width, self.height, self.patch_size)

    @cached_property
    def coords(self) -> Tensor:
        """(N, 2) float64 (row, col) of every patch, raster order."""
        rows = torch.arange(self.height, dtype=torch.float64)
        cols = torch.arange(self.width, dtype=torch.float64)
        rr, cc = torch.meshgrid(rows, cols, indexing="ij")
        return torch.stack([rr.reshape(-1), cc.reshape(-1)], dim=1)

    @cached_property
    def row_offsets(self) -> Tensor:
        """(N, N) signed row offset ``row_j - row_i`` in patches."""
        r = self.coords[:, 0]
        return r[None, :] - r[:, None]

    @cached_property
    def col_offsets(self) -> Tensor:
        """(N, N) signed column offset ``col_j - col_i`` in patches."""
        c = self.coords[:, 1]
        return c[None, :] - c[:, None]

    @cached_property
    def distances(self) -> Tensor:
        """(N, N) Euclidean distance between patch centres, in patches."""
        return torch.sqrt(self.row_offsets**2 + self.col_offsets**2)

    @cached_property
    def chebyshev(self) -> Tensor:
        """(N, N) Chebyshev (king-move) distance in patches: 1 for the 8-neighbourhood."""
        return torch.maximum(self.row_offsets.abs(), self.col_offsets.abs())

    def neighbour_mask(self, k: int = 4) -> Tensor:
        """(N, N) bool: True where j is one of i's grid neighbours (excluding i itself).

        ``k=4`` is the von Neumann neighbourhood (up, down, left, right); ``k=8`` adds the
        diagonals (the 3x3 block around a patch).
        """
        if k == 4:
            return self.distances == 1.0
        if k == 8:
            return self.chebyshev == 1.0
        raise ValueError(f"k must be 4 or 8, got {k}")

    @cached_property
    def distance_bins(self) -> Tensor:
        """(N, N) long: the bin of each pair's Euclidean distance, ``round(distance)``.

        Bin 0 holds self-pairs only, bin 1 the 4-neighbours (distance 1) and the
        diagonals (1.41 rounds to 1), and so on up to ``num_distance_bins - 1``.
        """
        return torch.floor(self.distances + 0.5).long()

    @property
    def num_distance_bins(self) -> int:
        return int(self.distance_bins.max().item()) + 1

    @cached_property
    def bin_centres(self) -> Tensor:
        """(num_distance_bins,) mean Euclidean distance of the pairs in each bin."""
        return bin_mean(self.distances, self.distance_bins, self.num_distance_bins)

    def bin_mean(self, values: Tensor, *, include_self: bool = True) -> Tensor:
        """Mean of ``values`` (..., N, N) per distance bin -> (..., num_distance_bins).

        With ``include_self=False`` bin 0 (the self-pairs) is NaN.
        """
        out = bin_mean(values, self.distance_bins, self.num_distance_bins)
        if not include_self:
            out = out.clone()
            out[..., 0] = float("nan")
        return out

    @cached_property
    def uniform_mean_distance(self) -> float:
        """Mean distance (patches) of a query's attention if it were uniform over all patches.

        The chance level for mean attention distance on this grid, averaged over queries.
        """
        return float(self.distances.mean().item())


def bin_mean(values: Tensor, bins: Tensor, num_bins: int) -> Tensor:
    """Mean of ``values`` (..., N, N) over the pairs in each bin of ``bins`` (N, N).

    Returns (..., num_bins); an empty bin is NaN. Batched: one scatter over the last two
    dims, no Python loop over pairs.
    """
    if values.shape[-2:] != bins.shape:
        raise ValueError(f"values {tuple(values.shape)} do not end in bins {tuple(bins.shape)}")
    flat = values.reshape(*values.shape[:-2], -1)
    index = bins.reshape(-1).to(flat.device)
    sums = torch.zeros(*flat.shape[:-1], num_bins, dtype=flat.dtype, device=flat.device)
    sums.index_add_(-1, index, flat)
    counts = torch.bincount(index, minlength=num_bins).to(flat.dtype)
    return sums / counts.where(counts > 0, torch.full_like(counts, float("nan")))


def grid_from_model(model: torch.nn.Module) -> Grid:
    """The patch grid of a timm ViT, read from ``patch_embed`` (never from sqrt(tokens))."""
    patch_embed = getattr(model, "patch_embed", None)
    if patch_embed is None or getattr(patch_embed, "grid_size", None) is None:
        raise ValueError("model has no patch_embed.grid_size; is it a timm Vision Transformer?")
    h, w = (int(x) for x in patch_embed.grid_size)
    ps = patch_embed.patch_size
    patch = int(ps[0] if isinstance(ps, (tuple, list)) else ps)
    return Grid(h, w, patch)
