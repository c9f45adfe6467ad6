"""load -> images -> analyses -> report, for one audit. Callable without RQ or HTTP.

The pipeline reads the audit's inputs from its folder and returns the report and the files
to write; `workers.tasks` is the thin RQ adapter that stores them.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from workers.analysis.grid import Grid, grid_from_model
from workers.analysis.loading import LoadedModel, load_checkpoint
from workers.analysis.probes import natural_v1, normalize_for_model, texture_v1
from workers.analysis.report import assemble_report
from workers.analysis.results import SectionResult
from workers.inputs import images_to_tensor, load_images

Progress = Callable[[str, float], None]


class AuditInputError(Exception):
    """The request cannot be audited as asked; the message says what to change."""

    code = "invalid_input"


@dataclass
class AuditOutput:
    report: dict[str, Any]
    arrays: dict[str, np.ndarray] = field(default_factory=dict)
    figures: dict[str, bytes] = field(default_factory=dict)


@dataclass
class AuditContext:
    """What every analysis of one audit shares."""

    loaded: LoadedModel
    grid: Grid
    images: Tensor  # (M, 3, H, W), normalised for the model
    labels: Tensor | None
    options: dict[str, Any]
    device: torch.device

    @property
    def model(self) -> torch.nn.Module:
        return self.loaded.model

    def batches(self) -> Iterator[tuple[Tensor, Tensor | None]]:
        size = int(self.options["batch_size"])
        for start in range(0, len(self.images), size):
            labels = None if self.labels is None else self.labels[start : start + size].to(self.device)
            yield self.images[start : start + size].to(self.device), labels


def pick_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def _input_size(model: torch.nn.Module) -> tuple[int, int]:
    size = model.patch_embed.img_size
    return (int(size[0]), int(size[1])) if isinstance(size, (tuple, list)) else (int(size), int(size))


def prepare_images(request: dict[str, Any], audit_dir: Path, model: torch.nn.Module) -> tuple[Tensor, str, int]:
    """The images to audit with, normalised: uploaded ones, or the named probe set."""
    options = request["options"]
    size = _input_size(model)
    uploads = request.get("images") or []
    if uploads:
        images = load_images(
            [audit_dir / item["path"] for item in uploads],
            [item["filename"] for item in uploads],
            max_images=int(options.get("max_images", 4096)),
        )
        pixels, probe_set = images_to_tensor(images, size), "uploaded"
    elif options["probe_set"] == "texture-v1":
        grid = grid_from_model(model)
        pixels = texture_v1(size, grid, count=int(options["num_images"]), seed=int(options["seed"])).images
        probe_set = "texture-v1"
    else:
        count = min(int(options["num_images"]), 12)
        pixels, probe_set = natural_v1(size, count=count).images, "natural-v1"
    return normalize_for_model(pixels, model), probe_set, len(pixels)


def _labels(request: dict[str, Any], num_images: int, num_classes: int) -> Tensor | None:
    labels = request.get("labels")
    if labels is None:
        return None
    if len(labels) != num_images:
        raise AuditInputError(f"{len(labels)} labels were given for {num_images} images; give one label per image")
    bad = [x for x in labels if x >= num_classes]
    if bad:
        raise AuditInputError(f"label {bad[0]} is out of range: the model has {num_classes} classes (0..{num_classes - 1})")
    return torch.tensor(labels, dtype=torch.long)


def _model_facts(loaded: LoadedModel, grid: Grid, checkpoint: dict[str, Any]) -> dict[str, Any]:
    model = loaded.model
    return {
        "arch": loaded.arch,
        "model_args": loaded.model_args,
        "grid": [grid.height, grid.width],
        "patch_size": grid.patch_size,
        "img_size": list(_input_size(model)),
        "num_prefix_tokens": int(getattr(model, "num_prefix_tokens", 0)),
        "num_layers": len(model.blocks),
        "num_heads": int(model.blocks[0].attn.num_heads),
        "embed_dim": int(getattr(model, "embed_dim", 0)),
        "num_classes": loaded.num_classes,
        "num_parameters": sum(p.numel() for p in model.parameters()),
        "checkpoint_sha256": checkpoint["sha256"],
        "checkpoint_bytes": checkpoint["bytes"],
        "format": checkpoint["format"],
        "non_finite_parameters": loaded.non_finite_parameters,
    }


def _sections() -> dict[str, Callable[[AuditContext], SectionResult]]:
    from workers.analysis.posembed import position_embedding_section

    return {
        "position_embedding": lambda ctx: position_embedding_section(ctx.model, seed=int(ctx.options["seed"])),
    }


def run_pipeline(request: dict[str, Any], audit_dir: Path, *, progress: Progress | None = None) -> AuditOutput:
    """Audit the checkpoint described by ``request`` (the stored request.json)."""
    report_progress = progress or (lambda stage, fraction: None)
    timings: dict[str, float] = {}
    options = request["options"]
    seed = int(options["seed"])
    torch.manual_seed(seed)
    device = pick_device()

    def stage(name: str, fraction: float) -> float:
        report_progress(name, fraction)
        return time.perf_counter()

    started = stage("load", 0.05)
    checkpoint = request["checkpoint"]
    if checkpoint["format"] == "onnx":
        raise AuditInputError("ONNX checkpoints are not supported yet; upload a .safetensors or .pth state dict")
    loaded = load_checkpoint(audit_dir / checkpoint["path"], request["arch"], options.get("model_args") or {})
    loaded.model.to(device)
    grid = grid_from_model(loaded.model)
    timings["load"] = time.perf_counter() - started

    started = stage("images", 0.15)
    images, probe_set, num_images = prepare_images(request, audit_dir, loaded.model)
    labels = _labels(request, num_images, loaded.num_classes)
    timings["images"] = time.perf_counter() - started

    ctx = AuditContext(loaded, grid, images, labels, options, device)
    sections: dict[str, dict[str, Any]] = {}
    output = AuditOutput(report={})
    available = _sections()
    requested = list(options["analyses"])
    for index, name in enumerate(requested):
        started = stage(name, 0.2 + 0.75 * index / len(requested))
        if name not in available:
            sections[name] = {"available": False, "reason": f"the {name} analysis is not built yet"}
            continue
        result = available[name](ctx)
        sections[name] = result.data
        output.arrays.update(result.arrays)
        output.figures.update(result.figures)
        timings[name] = time.perf_counter() - started

    stage("report", 0.97)
    timings["total"] = sum(timings.values())
    output.report = assemble_report(
        model=_model_facts(loaded, grid, checkpoint),
        settings={
            "probe_set": probe_set,
            "num_images": num_images,
            "batch_size": int(options["batch_size"]),
            "seed": seed,
            "labels_source": "given" if labels is not None else "model_predictions",
            "analyses": requested,
            "device": str(device),
        },
        sections=sections,
        timings=timings,
        notes=list(loaded.notes),
    )
    output.report["model"]["images_sha256"] = request.get("images_sha256")
    return output
