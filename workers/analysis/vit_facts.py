"""What a timm Vision Transformer is, read once from the built model.

Every block type timm's ``vision_transformer`` module builds is known here:

- ``Block`` and ``ResPostBlock``: one ``timm.layers.Attention`` at ``block.attn``;
- ``ParallelScalingBlock`` (ViT-XP / "pwee"): the block is its own attention (one fused
  ``in_proj`` for MLP and q/k/v; ``num_heads``, ``q_norm``, ``k_norm`` on the block);
- ``DiffParallelScalingBlock``: the same layout with differential attention;
- ``ParallelThingsBlock`` (ViT "18x2"): ``num_parallel`` attentions side by side at
  ``block.attns[i].attn``, their outputs summed.

The report's model facts (`num_layers`, `num_heads`, grid, prefix tokens, patch size) and
every section that needs them read them from `vit_facts`, so they agree with each other.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from workers.analysis.grid import Grid, grid_from_model


@dataclass(frozen=True)
class VitFacts:
    """The shape of a timm ViT: depth, heads, patch grid, prefix tokens, input size."""

    num_layers: int
    num_heads: int  # heads of one attention module (every block of a timm ViT has the same)
    attentions_per_block: int  # 2 for ParallelThingsBlock, else 1
    block_type: str
    attention_type: str
    grid: Grid
    num_prefix_tokens: int
    img_size: tuple[int, int]
    in_chans: int
    embed_dim: int

    def report(self) -> dict[str, Any]:
        return {
            "grid": [self.grid.height, self.grid.width],
            "patch_size": self.grid.patch_size,
            "img_size": list(self.img_size),
            "in_chans": self.in_chans,
            "num_prefix_tokens": self.num_prefix_tokens,
            "num_layers": self.num_layers,
            "num_heads": self.num_heads,
            "attentions_per_block": self.attentions_per_block,
            "block_type": self.block_type,
            "attention_type": self.attention_type,
            "embed_dim": self.embed_dim,
        }


def block_attentions(block: nn.Module) -> list[nn.Module]:
    """The attention module(s) of one timm ViT block, for every block type timm builds.

    Raises ``ValueError`` for a block with no attention module it recognises.
    """
    attn = getattr(block, "attn", None)
    if isinstance(attn, nn.Module):
        return [attn]
    attns = getattr(block, "attns", None)
    if isinstance(attns, nn.ModuleList):  # ParallelThingsBlock: Sequential(norm, attn, ls, ...)
        return [getattr(branch, "attn", branch) for branch in attns]
    if hasattr(block, "num_heads") and hasattr(block, "q_norm"):  # (Diff)ParallelScalingBlock
        return [block]
    raise ValueError(f"block type {type(block).__name__} has no attention module vitaudit knows")


def input_size(model: nn.Module) -> tuple[int, int]:
    """(height, width) in pixels of the images ``model`` takes (``patch_embed.img_size``)."""
    size = getattr(getattr(model, "patch_embed", None), "img_size", None)
    if size is None:
        raise ValueError("model has no patch_embed.img_size; is it a timm Vision Transformer?")
    return (int(size[0]), int(size[1])) if isinstance(size, (tuple, list)) else (int(size),) * 2


def vit_facts(model: nn.Module) -> VitFacts:
    """The facts of a timm ViT. Raises ``ValueError`` for a model without ``blocks`` or
    ``patch_embed``."""
    blocks = getattr(model, "blocks", None)
    if blocks is None or len(blocks) == 0:
        raise ValueError("model has no `blocks`; is it a timm Vision Transformer?")
    attns = block_attentions(blocks[0])
    proj = getattr(model.patch_embed, "proj", None)
    in_chans = int(proj.in_channels) if isinstance(proj, nn.Conv2d) else 3
    return VitFacts(
        num_layers=len(blocks),
        num_heads=int(attns[0].num_heads),
        attentions_per_block=len(attns),
        block_type=type(blocks[0]).__name__,
        attention_type=type(attns[0]).__name__,
        grid=grid_from_model(model),
        num_prefix_tokens=int(getattr(model, "num_prefix_tokens", 0)),
        img_size=input_size(model),
        in_chans=in_chans,
        embed_dim=int(getattr(model, "embed_dim", 0)),
    )
