"""The timm architectures vitaudit audits, known without importing timm (or torch).

`timm_vit_models.txt` is `timm.list_models(module=["vision_transformer", "deit"])` of the
installed timm; `tests/test_architectures.py` fails when it drifts from timm.
"""

from __future__ import annotations

import difflib
from functools import cache
from pathlib import Path

from service.errors import CheckpointError

MODELS_FILE = Path(__file__).with_name("timm_vit_models.txt")


@cache
def supported_architectures() -> frozenset[str]:
    return frozenset(line.strip() for line in MODELS_FILE.read_text().splitlines() if line.strip())


def check_architecture(arch: str) -> str:
    """Return ``arch`` when vitaudit can build it; raise CheckpointError with a suggestion otherwise."""
    arch = arch.strip()
    if not arch:
        raise CheckpointError(
            "the 'arch' field is empty; name a timm ViT, e.g. 'vit_small_patch16_224'"
        )
    if arch in supported_architectures():
        return arch
    close = difflib.get_close_matches(arch, sorted(supported_architectures()), n=1, cutoff=0.6)
    hint = (
        f"; did you mean '{close[0]}'?"
        if close
        else "; see timm.list_models(module='vision_transformer')"
    )
    raise CheckpointError(
        f"arch '{arch}' is not a timm Vision Transformer that vitaudit supports{hint}"
    )
