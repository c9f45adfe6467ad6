"""The smallest report that keeps the contract (`workers.report_schema`): every section
unavailable. For tests that need a report to store, not its numbers."""

from __future__ import annotations

from typing import Any

from workers.report_schema import SCHEMA_VERSION


def minimal_report() -> dict[str, Any]:
    unavailable = {"available": False, "reason": "not requested in options.analyses"}
    return {
        "schema_version": SCHEMA_VERSION,
        "model": {
            "arch": "vit_tiny_patch16_224",
            "format": "torch",
            "grid": [4, 4],
            "patch_size": 8,
            "num_prefix_tokens": 1,
            "num_layers": 2,
            "num_heads": 2,
            "checkpoint_sha256": "0" * 64,
        },
        "settings": {"probe_set": "natural-v1", "num_images": 2, "batch_size": 2, "seed": 0},
        "position_embedding": dict(unavailable),
        "heads": dict(unavailable),
        "gradients": dict(unavailable),
        "qk_geometry": dict(unavailable),
        "notes": [],
        "timings": {"total": 0.0},
        "versions": {"vitaudit": "0.1.0"},
    }
