"""Small timm ViTs for the tests: random weights, saved the ways users save them."""

from __future__ import annotations

from pathlib import Path

import torch

# The reference tiny ViT (a 4x4 grid of 8px patches, 2 blocks) and its quickest audit's
# options live in the package, where the benchmark uses them too.
from workers.tiny_model import TINY_ARCH, TINY_ARGS, TINY_OPTIONS, tiny_vit

__all__ = ["TINY_ARCH", "TINY_ARGS", "TINY_OPTIONS", "save_safetensors", "tiny_vit"]


def save_safetensors(model: torch.nn.Module, path: Path) -> Path:
    from workers.analysis.loading import write_state_dict

    return write_state_dict(model.state_dict(), path)
