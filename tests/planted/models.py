"""Small timm ViTs for the tests: random weights, saved the ways users save them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

# Arch name + overrides that the service accepts in options.model_args: a 4x4 grid of 8px
# patches, 2 blocks, small enough that an audit takes a few seconds on 2 cores.
TINY_ARCH = "vit_tiny_patch16_224"
TINY_ARGS: dict[str, Any] = {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2, "num_classes": 5}
# The quickest real audit of the tiny model: two probe images, the position table only.
TINY_OPTIONS: dict[str, Any] = {
    "num_images": 2,
    "batch_size": 2,
    "model_args": TINY_ARGS,
    "analyses": ["position_embedding"],
}


def tiny_vit(seed: int = 0, **overrides: Any) -> torch.nn.Module:
    import timm

    torch.manual_seed(seed)
    return timm.create_model(TINY_ARCH, pretrained=False, **{**TINY_ARGS, **overrides}).eval()


def save_safetensors(model: torch.nn.Module, path: Path) -> Path:
    from workers.analysis.loading import write_state_dict

    return write_state_dict(model.state_dict(), path)
