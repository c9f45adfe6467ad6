"""Planted position-embedding tables whose grid structure is known by construction.

Every builder returns a ``(height, width, dim)`` float64 tensor (raster order over the
first two dims). They are written independently of ``workers.analysis.posembed`` (plain
numpy, following the published constructions) so the tests check the metrics against an
answer that does not come from the code under test.

- ``sincos_2d_table``: the 2-D sin-cos table of MAE (He et al. 2021,
  ``util/pos_embed.py: get_2d_sincos_pos_embed``): half the channels encode one grid axis,
  half the other, each as sin/cos at geometrically spaced frequencies. A perfect map.
- ``random_table``: i.i.d. Gaussian entries. No structure at all.
- ``shuffled_table``: a 2-D sin-cos table whose rows (one embedding per position) are
  permuted across positions: the embeddings still form a map of *some* grid, but not of
  this one's layout.
- ``raster_sincos_table``: the 1-D sin-cos table of the original Transformer over the
  raster index ``t = row * width + col``: neighbours along a row are close, neighbours
  along a column are ``width`` steps apart. Row structure without column structure.
- ``smooth_random_table``: i.i.d. Gaussian noise per channel, blurred over the grid with a
  Gaussian kernel (``scipy.ndimage.gaussian_filter``, ``sigma`` in patches). Locally smooth
  (neighbours have similar embeddings) but with no global layout: which direction "row"
  goes differs from place to place, so nothing linear reads (row, col) in a region it was
  not fit on. The control that fakes a map to metrics that reward interpolation.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.ndimage import gaussian_filter
from torch import Tensor

SINCOS_TEMPERATURE = 10000.0  # the constant of Vaswani et al. and MAE


def _sincos_1d(dim: int, positions: np.ndarray) -> np.ndarray:
    """MAE ``get_1d_sincos_pos_embed_from_grid``: (M,) positions -> (M, dim)."""
    if dim % 2:
        raise ValueError(f"1-D sin-cos needs an even dim, got {dim}")
    omega = np.arange(dim // 2, dtype=np.float64) / (dim / 2.0)
    omega = 1.0 / SINCOS_TEMPERATURE**omega
    out = np.einsum("m,d->md", positions.reshape(-1).astype(np.float64), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def sincos_2d_table(height: int, width: int, dim: int) -> Tensor:
    """MAE 2-D sin-cos table, (height, width, dim); ``dim`` must be a multiple of 4."""
    if dim % 4:
        raise ValueError(f"2-D sin-cos needs dim divisible by 4, got {dim}")
    rows, cols = np.meshgrid(
        np.arange(height, dtype=np.float64), np.arange(width, dtype=np.float64), indexing="ij"
    )
    # MAE puts the width coordinate in the first half and the height one in the second.
    emb = np.concatenate([_sincos_1d(dim // 2, cols), _sincos_1d(dim // 2, rows)], axis=1)
    return torch.from_numpy(emb.reshape(height, width, dim))


def random_table(height: int, width: int, dim: int, *, seed: int = 0) -> Tensor:
    """I.i.d. standard Gaussian table, (height, width, dim)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(height, width, dim, generator=gen, dtype=torch.float64)


def shuffled_table(height: int, width: int, dim: int, *, seed: int = 0) -> Tensor:
    """A 2-D sin-cos table with its embeddings permuted across grid positions."""
    table = sincos_2d_table(height, width, dim).reshape(height * width, dim)
    gen = torch.Generator().manual_seed(seed)
    perm = torch.randperm(height * width, generator=gen)
    return table[perm].reshape(height, width, dim)


def raster_sincos_table(height: int, width: int, dim: int) -> Tensor:
    """1-D sin-cos over the raster index ``row * width + col``, (height, width, dim)."""
    t = np.arange(height * width, dtype=np.float64)
    return torch.from_numpy(_sincos_1d(dim, t).reshape(height, width, dim))


def smooth_random_table(
    height: int, width: int, dim: int, *, sigma: float = 2.0, seed: int = 0
) -> Tensor:
    """Gaussian-filtered i.i.d. noise, (height, width, dim): a smooth field without layout.

    Each channel is an independent (height, width) Gaussian noise image blurred with a
    Gaussian of ``sigma`` patches (edges reflected), then the table is scaled to unit RMS.
    """
    if sigma <= 0:
        raise ValueError(f"sigma must be positive, got {sigma}")
    rng = np.random.default_rng(seed)
    noise = rng.standard_normal((height, width, dim))
    field = gaussian_filter(noise, sigma=(sigma, sigma, 0), mode="reflect")
    return torch.from_numpy(field / np.sqrt((field**2).mean()))


def as_timm_pos_embed(table: Tensor, *, num_prefix: int = 0, seed: int = 0) -> Tensor:
    """A ``(1, num_prefix + H*W, dim)`` float32 tensor laid out like timm's ``pos_embed``.

    The prefix rows (class / register tokens) are random, so a section that fails to strip
    them sees garbage on the first patches.
    """
    h, w, d = table.shape
    gen = torch.Generator().manual_seed(seed)
    prefix = torch.randn(num_prefix, d, generator=gen, dtype=torch.float64)
    flat = torch.cat([prefix, table.reshape(h * w, d)], dim=0)
    return flat.unsqueeze(0).float()
