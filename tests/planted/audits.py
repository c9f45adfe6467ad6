"""Audit folders as the service writes them, for tests that call the pipeline directly."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from tests.planted.models import save_safetensors

ALL_ANALYSES = ["position_embedding", "heads", "gradients"]


def audit_request(
    root: Path, checkpoint: Path, arch: str, options: dict[str, Any], *, filename: str = ""
) -> dict[str, Any]:
    """The request.json of an audit whose checkpoint already lies under ``root/inputs``
    (``filename``: the name it was uploaded as; default its own)."""
    record = {
        "filename": filename or checkpoint.name,
        "path": str(checkpoint.relative_to(root)),
        "bytes": checkpoint.stat().st_size,
        "sha256": "0" * 64,
        "format": "onnx" if checkpoint.suffix == ".onnx" else "torch",
    }
    return {"arch": arch, "options": options, "labels": None, "checkpoint": record, "images": []}


def staged_audit(
    root: Path, model: torch.nn.Module, arch: str, model_args: dict[str, Any], **options: Any
) -> tuple[dict[str, Any], Path]:
    """``model``'s weights saved as ``root/inputs/checkpoint.safetensors`` and the request
    that audits them as ``arch`` built with ``model_args`` (2 probe images, every analysis,
    unless ``options`` say otherwise)."""
    (root / "inputs").mkdir(parents=True, exist_ok=True)
    path = save_safetensors(model, root / "inputs" / "checkpoint.safetensors")
    settings = {
        "analyses": list(ALL_ANALYSES),
        "probe_set": "natural-v1",
        "num_images": 2,
        "batch_size": 2,
        "seed": 0,
        "model_args": dict(model_args),
        **options,
    }
    return audit_request(root, path, arch, settings), root
