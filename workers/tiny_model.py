"""The reference tiny ViT: the smallest model the audit runs end to end in a few seconds.

A timm architecture name plus the constructor overrides the service accepts in
``options.model_args``: 32x32 images cut into a 4x4 grid of 8-pixel patches, 2 blocks of
2 heads, width 32, 5 classes, and the options of its quickest audit. The tests (`tests/planted/models.py`), the benchmark
(`bench/run.py`) and the throughput measurement (`deploy/measure_throughput.py`) all
build it from here, so they check and time the same model.
"""

from __future__ import annotations

from typing import Any

import torch

TINY_ARCH = "vit_tiny_patch16_224"
TINY_ARGS: dict[str, Any] = {
    "img_size": 32,
    "patch_size": 8,
    "embed_dim": 32,
    "depth": 2,
    "num_heads": 2,
    "num_classes": 5,
}


# The quickest real audit of the tiny model: two probe images, the position table only.
TINY_OPTIONS: dict[str, Any] = {
    "num_images": 2,
    "batch_size": 2,
    "model_args": dict(TINY_ARGS),
    "analyses": ["position_embedding"],
}


def tiny_vit(seed: int = 0, **overrides: Any) -> torch.nn.Module:
    """A randomly initialised tiny ViT in eval mode; ``torch.manual_seed(seed)`` is set
    first, so the same seed gives the same weights. ``overrides`` replace ``TINY_ARGS``."""
    import timm

    torch.manual_seed(seed)
    return timm.create_model(TINY_ARCH, pretrained=False, **{**TINY_ARGS, **overrides}).eval()
