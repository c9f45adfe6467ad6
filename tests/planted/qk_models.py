"""Small timm ViTs whose queries and keys are set by hand, for the ``qk_geometry`` tests.

- `aligned_vit`: the position table carries a low-frequency 2-D sin-cos code
  (sin, cos of w r and w c at two frequencies, every w * (grid - 1) < pi), and W_Q = W_K
  read exactly that code. So Q_i = K_i = code(i) and cos(Q_i, K_j) falls with grid
  distance for every image: the state "queries point at their neighbours' keys".
- `colour_vit`: the false positive. The patch embedding writes each patch's mean colour
  (three channels), the position table is all zeros, and W_Q = W_K read the colour. On
  smooth images neighbouring patches have similar colours, so cos(Q_i, K_j) is higher for
  neighbours, though position plays no part at all.
- `random_vit`: timm's ViT with its own random initialisation, Q/K weights rescaled to
  std 1 / sqrt(dim) so the logits are not tiny.

In the two planted models every norm before attention is an identity (a LayerNorm would mix
the channels per token) and nothing writes back into the residual stream, so the Q and K of
every block are exactly the planted ones.
"""

from __future__ import annotations

import math

import torch
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn

_CODE_CHANNELS = 8  # sin/cos x (row, col) x two frequencies
_COLOUR_CHANNELS = (0, 1, 2)
_EMBED_DIM = 16


def _transparent(model: VisionTransformer) -> VisionTransformer:
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        for block in model.blocks:
            block.norm1 = nn.Identity()
            block.norm2 = nn.Identity()
    return model


def _vit(grid: tuple[int, int], patch_size: int, depth: int, num_heads: int) -> VisionTransformer:
    gh, gw = grid
    return VisionTransformer(
        img_size=(gh * patch_size, gw * patch_size),
        patch_size=patch_size,
        embed_dim=_EMBED_DIM,
        depth=depth,
        num_heads=num_heads,
        num_classes=4,
        qkv_bias=True,
    )


def position_code(grid: tuple[int, int]) -> Tensor:
    """(H * W, 8) low-frequency 2-D sin-cos code of each patch, raster order."""
    gh, gw = grid
    w = 0.9 * math.pi / max(gh - 1, gw - 1, 1)
    rows, cols = torch.meshgrid(
        torch.arange(gh, dtype=torch.float32), torch.arange(gw, dtype=torch.float32), indexing="ij"
    )
    parts = []
    for omega in (w, w / 2):
        for coord in (rows, cols):
            parts += [torch.sin(omega * coord), torch.cos(omega * coord)]
    return torch.stack([p.reshape(-1) for p in parts], dim=1)


def aligned_vit(
    grid: tuple[int, int] = (8, 8), *, patch_size: int = 8, gain: float = 4.0
) -> VisionTransformer:
    """One block, two heads, both with Q_i = K_i = gain * code(i) (`position_code`);
    the patch embedding writes random content into channels the heads do not read."""
    model = _transparent(_vit(grid, patch_size, depth=1, num_heads=2))
    head_dim = _EMBED_DIM // 2
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        model.pos_embed[0, 1:, :_CODE_CHANNELS] = position_code(grid)
        content = model.patch_embed.proj.weight[_CODE_CHANNELS:]
        content.copy_(torch.randn(content.shape, generator=generator) * 0.1)
        w = model.blocks[0].attn.qkv.weight
        for h in range(2):
            for part in (0, 1):  # q rows, then k rows
                rows = slice(
                    part * _EMBED_DIM + h * head_dim, part * _EMBED_DIM + (h + 1) * head_dim
                )
                w[rows, :_CODE_CHANNELS] = gain * torch.eye(_CODE_CHANNELS)
    return model.eval()


def colour_vit(grid: tuple[int, int] = (8, 8), *, patch_size: int = 8) -> VisionTransformer:
    """One block, one head with Q_i = K_i = the mean colour of patch i (content only)."""
    model = _transparent(_vit(grid, patch_size, depth=1, num_heads=1))
    with torch.no_grad():
        weight = model.patch_embed.proj.weight  # (dim, 3, p, p)
        for channel in _COLOUR_CHANNELS:
            weight[channel, channel] = 1.0 / (patch_size * patch_size)
        w = model.blocks[0].attn.qkv.weight
        for part in (0, 1):
            for channel in _COLOUR_CHANNELS:
                w[part * _EMBED_DIM + channel, channel] = 1.0
    return model.eval()


def random_vit(
    grid: tuple[int, int] = (8, 8), *, patch_size: int = 8, seed: int = 0
) -> VisionTransformer:
    """Two blocks of two heads with timm's random initialisation; Q/K weights redrawn with
    std 1 / sqrt(dim)."""
    torch.manual_seed(seed)
    model = _vit(grid, patch_size, depth=2, num_heads=2)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for block in model.blocks:
            qk = block.attn.qkv.weight[: 2 * _EMBED_DIM]
            qk.copy_(torch.randn(qk.shape, generator=generator) / math.sqrt(_EMBED_DIM))
    return model.eval()


def smooth_images(
    count: int, grid: tuple[int, int], *, patch_size: int = 8, seed: int = 0
) -> Tensor:
    """(count, 3, H, W) random colour fields that vary slowly across the image (a 3x3 field
    upsampled bilinearly): neighbouring patches have similar colours."""
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.randn(count, 3, 3, 3, generator=generator)
    size = (grid[0] * patch_size, grid[1] * patch_size)
    return nn.functional.interpolate(coarse, size=size, mode="bilinear", align_corners=True)


def noise_images(
    count: int, grid: tuple[int, int], *, patch_size: int = 8, seed: int = 0
) -> Tensor:
    """(count, 3, H, W) i.i.d. Gaussian pixels: no patch resembles its neighbours more than
    any other patch."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(count, 3, grid[0] * patch_size, grid[1] * patch_size, generator=generator)
