"""The steps every audit shares, whichever runtime runs the model (PyTorch or ONNX).

`workers.pipeline` (the entry point; PyTorch) and `workers.onnx_pipeline` both import
from here and never from each other's internals: images, labels, the isolated run of each
section, the settings and the report.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rq.timeouts import BaseTimeoutException
from torch import Tensor
from torch.profiler import record_function

from workers.analysis.grid import Grid
from workers.analysis.normalization import Normalization
from workers.analysis.probes import natural_set, texture_v1
from workers.analysis.report import assemble_report
from workers.analysis.results import SectionResult
from workers.inputs import images_to_pixels, load_images

Progress = Callable[[str, float], None]
Stage = Callable[[str, float], float]
log = logging.getLogger(__name__)

# Sections run in this order whatever the request's order: gradients before heads, so the
# heads can reuse the gradient pass's forward (`workers.pipeline.AuditContext.head_attention`).
RUN_ORDER: tuple[str, ...] = ("position_embedding", "gradients", "heads", "qk_geometry")


class AuditInputError(Exception):
    """The request cannot be audited as asked; the message says what to change."""

    code = "invalid_input"


@dataclass
class AuditOutput:
    report: dict[str, Any]
    arrays: dict[str, np.ndarray] = field(default_factory=dict)
    figures: dict[str, bytes] = field(default_factory=dict)
    documents: dict[str, dict[str, Any]] = field(default_factory=dict)  # extra NAME.json files


def probe_pixels(
    request: dict[str, Any], audit_dir: Path, size: tuple[int, int], grid: Grid
) -> tuple[Tensor, str]:
    """The images to audit with at ``size``: uploaded ones (uint8 pixels), or the named probe
    set (float32 in [0, 1]); `workers.inputs.unit_pixels` maps either to [0, 1]."""
    options = request["options"]
    uploads = request.get("images") or []
    if uploads:
        images = load_images(
            [audit_dir / item["path"] for item in uploads],
            [item["filename"] for item in uploads],
            max_images=int(request.get("max_images") or options.get("max_images", 4096)),
        )
        pixels, probe_set = images_to_pixels(images, size), "uploaded"
    elif options["probe_set"] == "texture-v1":
        pixels = texture_v1(
            size, grid, count=int(options["num_images"]), seed=int(options["seed"])
        ).images
        probe_set = "texture-v1"
    else:
        probes = natural_set(size, int(options["num_images"]))
        pixels, probe_set = probes.images, probes.name
    return pixels, probe_set


def check_labels(request: dict[str, Any], num_images: int, num_classes: int) -> Tensor | None:
    """The request's labels as a tensor, or None; `AuditInputError` when they do not fit."""
    labels = request.get("labels")
    if labels is None:
        return None
    if len(labels) != num_images:
        raise AuditInputError(
            f"{len(labels)} labels were given for {num_images} images; give one label per image"
        )
    if num_classes < 1:
        raise AuditInputError("labels were given, but the model has no classifier head")
    bad = [x for x in labels if x >= num_classes]
    if bad:
        raise AuditInputError(
            f"label {bad[0]} is out of range: the model has {num_classes} classes (0..{num_classes - 1})"
        )
    return torch.tensor(labels, dtype=torch.long)


def section_failed(error: Exception) -> SectionResult:
    """The report of a section that raised: unavailable, with the message and the class."""
    message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return SectionResult(
        {
            "available": False,
            "reason": f"the analysis failed: {message}",
            "error": type(error).__name__,
        }
    )


def run_sections(
    requested: list[str],
    run: Callable[[str], SectionResult],
    stage: Stage,
    output: AuditOutput,
    timings: dict[str, float],
) -> dict[str, dict[str, Any]]:
    """Run every requested analysis in `RUN_ORDER`, collecting arrays and figures into
    ``output`` and seconds into ``timings``; returns each section's report data.

    Sections fail alone: an exception inside one becomes its ``available: false`` with the
    reason and the exception's class (`section_failed`), and the others still run. Only a
    job timeout (RQ's alarm) goes through.
    """
    sections: dict[str, dict[str, Any]] = {}
    for index, name in enumerate(sorted(requested, key=RUN_ORDER.index)):
        started = stage(name, 0.15 + 0.8 * index / len(requested))
        try:
            with record_function(f"section.{name}"):
                result = run(name)
        except BaseTimeoutException:
            raise
        except Exception as error:  # noqa: BLE001 - one section's failure is reported, not fatal
            log.exception("section %s failed", name)
            result = section_failed(error)
        sections[name] = result.data
        output.arrays.update(result.arrays)
        output.figures.update(result.figures)
        timings[name] = time.perf_counter() - started
    return sections


def run_settings(
    options: dict[str, Any],
    probe_set: str,
    num_images: int,
    labels: Tensor | None,
    device: str,
    normalization: Normalization,
    **extra: Any,
) -> dict[str, Any]:
    """The report's ``settings``: what was run, on what, with which seed and normalisation."""
    return {
        "probe_set": probe_set,
        "num_images": num_images,
        "batch_size": int(options["batch_size"]),
        "seed": int(options["seed"]),
        "labels_source": "given" if labels is not None else "model_predictions",
        "analyses": list(options["analyses"]),
        "device": device,
        "normalization": normalization.report(),
        **extra,
    }


def finish_report(
    output: AuditOutput, *, images_sha256: str | None, timings: dict[str, float], **parts: Any
) -> dict[str, Any]:
    """The report from its parts (`assemble_report`), with the total time and the images'
    digest filled in."""
    timings["total"] = sum(timings.values())
    report = assemble_report(timings=timings, **parts)
    report["model"]["images_sha256"] = images_sha256
    return report
