"""Small timm ViTs for the tests: random weights, saved the ways users save them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

# The reference tiny ViT (a 4x4 grid of 8px patches, 2 blocks) lives in the package, where
# the benchmark and the throughput measurement build it too.
from workers.tiny_model import TINY_ARCH, TINY_ARGS, tiny_vit

# The quickest real audit of the tiny model: two probe images, the position table only.
TINY_OPTIONS: dict[str, Any] = {
    "num_images": 2,
    "batch_size": 2,
    "model_args": dict(TINY_ARGS),
    "analyses": ["position_embedding"],
}

__all__ = ["TINY_ARCH", "TINY_ARGS", "TINY_OPTIONS", "save_safetensors", "tiny_vit"]


def save_safetensors(model: torch.nn.Module, path: Path) -> Path:
    from workers.analysis.loading import write_state_dict

    return write_state_dict(model.state_dict(), path)
