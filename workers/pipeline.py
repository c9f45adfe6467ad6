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

from workers.analysis.batching import device_batch_size, release_cached, run_halving
from workers.analysis.grid import Grid, grid_from_model
from workers.analysis.loading import LoadedModel, load_checkpoint
from workers.analysis.precision import DEFAULT_PRECISION, forward_precision
from workers.analysis.probes import (
    natural_count_notes,
    natural_set,
    normalize_for_model,
    texture_v1,
)
from workers.analysis.report import assemble_report, json_safe
from workers.analysis.results import SectionResult, unavailable
from workers.analysis.trajectory import trajectory_section
from workers.inputs import images_to_pixels, load_images, unit_pixels

Progress = Callable[[str, float], None]


class AuditInputError(Exception):
    """The request cannot be audited as asked; the message says what to change."""

    code = "invalid_input"


@dataclass
class AuditOutput:
    report: dict[str, Any]
    arrays: dict[str, np.ndarray] = field(default_factory=dict)
    figures: dict[str, bytes] = field(default_factory=dict)
    documents: dict[str, dict[str, Any]] = field(default_factory=dict)  # extra NAME.json files


@dataclass
class AuditContext:
    """What every analysis of one audit shares."""

    loaded: LoadedModel
    grid: Grid
    # (M, 3, H, W) as decoded: uint8 for uploads, float32 in [0, 1] for the probe sets;
    # normalised for the model one batch at a time (`batches`), so an audit of many images
    # holds them at a quarter of their float32 size
    pixels: Tensor
    labels: Tensor | None
    options: dict[str, Any]
    device: torch.device
    probe_set: str
    # Head statistics of the audited images, fed by the gradient pass's forward when both
    # analyses run (see `_gradients`); None until then, and when heads run their own pass.
    head_attention: Any = None

    @property
    def model(self) -> torch.nn.Module:
        return self.loaded.model

    def inputs(self, start: int, stop: int) -> Tensor:
        """Images ``start:stop`` as model inputs, on the audit's device."""
        return normalize_for_model(unit_pixels(self.pixels[start:stop]), self.model).to(self.device)

    def batches(self) -> Iterator[tuple[Tensor, Tensor | None]]:
        size = int(self.options["batch_size"])
        for start in range(0, len(self.pixels), size):
            labels = (
                None if self.labels is None else self.labels[start : start + size].to(self.device)
            )
            yield self.inputs(start, start + size), labels


def pick_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def _input_size(model: torch.nn.Module) -> tuple[int, int]:
    size = model.patch_embed.img_size
    return (
        (int(size[0]), int(size[1])) if isinstance(size, (tuple, list)) else (int(size), int(size))
    )


def prepare_images(
    request: dict[str, Any], audit_dir: Path, model: torch.nn.Module
) -> tuple[Tensor, str, int]:
    """The images to audit with, normalised: uploaded ones, or the named probe set."""
    pixels, probe_set = probe_pixels(request, audit_dir, _input_size(model), grid_from_model(model))
    return normalize_for_model(unit_pixels(pixels), model), probe_set, len(pixels)


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


def _labels(request: dict[str, Any], num_images: int, num_classes: int) -> Tensor | None:
    labels = request.get("labels")
    if labels is None:
        return None
    if len(labels) != num_images:
        raise AuditInputError(
            f"{len(labels)} labels were given for {num_images} images; give one label per image"
        )
    bad = [x for x in labels if x >= num_classes]
    if bad:
        raise AuditInputError(
            f"label {bad[0]} is out of range: the model has {num_classes} classes (0..{num_classes - 1})"
        )
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


def _heads(ctx: AuditContext) -> SectionResult:
    from workers.analysis.heads import head_section

    textures = texture_v1(_input_size(ctx.model), ctx.grid, seed=int(ctx.options["seed"]))
    shared = ctx.head_attention is not None
    return head_section(
        ctx.model,
        None if shared else (batch for batch, _ in ctx.batches()),
        accumulated=ctx.head_attention,
        texture_images=normalize_for_model(textures.images, ctx.model).to(ctx.device),
        texture_masks=textures.texture_fraction.to(ctx.device),
        batch_size=int(ctx.options["batch_size"]),
        probe_set=ctx.probe_set,
        texture_probe_set=textures.name,
        seed=int(ctx.options["seed"]),
    )


def _position_embedding(ctx: AuditContext) -> SectionResult:
    from workers.analysis.posembed import position_embedding_section

    return position_embedding_section(ctx.model, seed=int(ctx.options["seed"]))


def _head_accumulator(model: torch.nn.Module) -> Any:
    """An empty `AttentionAccumulator` for ``model``, or None where heads cannot capture it
    (their own section then says why)."""
    from workers.analysis.heads import AttentionAccumulator

    try:
        return AttentionAccumulator.for_model(model)
    except ValueError:
        return None


def _gradients(ctx: AuditContext) -> SectionResult:
    from workers.analysis.gradients import gradient_section

    if ctx.loaded.non_finite_parameters:
        names = ", ".join(ctx.loaded.non_finite_parameters[:5])
        return unavailable(
            f"the checkpoint has NaN/Inf weights ({names}); gradients would be meaningless"
        )
    # One forward for both analyses: the heads reduce this pass's attention maps.
    accumulator = _head_accumulator(ctx.model) if "heads" in ctx.options["analyses"] else None
    result = gradient_section(
        ctx.model,
        ctx.batches(),
        grid=ctx.grid,
        seed=int(ctx.options["seed"]),
        on_attention=None if accumulator is None else accumulator.natural,
    )
    if accumulator is not None and result.data.get("available", True):
        ctx.head_attention = accumulator
    return result


def _qk_geometry(ctx: AuditContext) -> SectionResult:
    from workers.analysis.qk_geometry import qk_geometry_section

    return qk_geometry_section(
        ctx.model,
        (batch for batch, _ in ctx.batches()),
        seed=int(ctx.options["seed"]),
        batch_size=int(ctx.options["batch_size"]),
    )


def _run_fitting(ctx: AuditContext, name: str) -> SectionResult:
    """Run section ``name``; after an out-of-memory error again from the start at half the
    batch (`run_halving`). Later sections start from the size that ran."""

    def attempt(size: int) -> SectionResult:
        ctx.options = {**ctx.options, "batch_size": size}
        return SECTIONS[name](ctx)

    size = int(ctx.options["batch_size"])
    result, _ran = run_halving(attempt, size, on_retry=release_cached(ctx.device))
    return result


SECTIONS: dict[str, Callable[[AuditContext], SectionResult]] = {
    "position_embedding": _position_embedding,
    "heads": _heads,
    "gradients": _gradients,
    "qk_geometry": _qk_geometry,
}
# Sections run in this order whatever the request's order: gradients before heads, so the
# heads can reuse the gradient pass's forward (`AuditContext.head_attention`).
RUN_ORDER: tuple[str, ...] = ("position_embedding", "gradients", "heads", "qk_geometry")


def audit_checkpoint(
    request: dict[str, Any],
    checkpoint: dict[str, Any],
    audit_dir: Path,
    *,
    progress: Progress,
    span: tuple[float, float] = (0.0, 1.0),
) -> AuditOutput:
    """Audit one checkpoint of the request; progress is reported inside ``span`` of 0..1."""
    timings: dict[str, float] = {}
    options = request["options"]
    seed = int(options["seed"])
    torch.manual_seed(seed)
    device = pick_device()
    low, high = span

    def stage(name: str, fraction: float) -> float:
        progress(name, low + (high - low) * fraction)
        return time.perf_counter()

    started = stage("load", 0.02)
    if checkpoint["format"] == "onnx":
        from workers.onnx_pipeline import audit_onnx

        return audit_onnx(request, checkpoint, audit_dir, stage=stage, started=started)
    loaded = load_checkpoint(
        audit_dir / checkpoint["path"],
        request["arch"],
        options.get("model_args") or {},
        batch_size=int(options["batch_size"]),
    )
    loaded.model.to(device)
    grid = grid_from_model(loaded.model)
    timings["load"] = time.perf_counter() - started

    started = stage("images", 0.1)
    pixels, probe_set = probe_pixels(request, audit_dir, _input_size(loaded.model), grid)
    num_images = len(pixels)
    labels = _labels(request, num_images, loaded.num_classes)
    timings["images"] = time.perf_counter() - started

    ctx = AuditContext(loaded, grid, pixels, labels, options, device, probe_set)
    fitted = device_batch_size(loaded.model, int(options["batch_size"]), device)
    ctx.options = {**options, "batch_size": fitted}
    output = AuditOutput(report={})
    precision = options.get("precision", DEFAULT_PRECISION)
    with forward_precision(ctx.model, precision, device):
        sections = run_sections(
            options["analyses"], lambda name: _run_fitting(ctx, name), stage, output, timings
        )

    from workers.analysis.plots_extra import extra_figures

    started = stage("figures", 0.96)
    output.figures.update(extra_figures(ctx.model, ctx.inputs(0, 1), sections))
    timings["figures"] = time.perf_counter() - started

    output.report = finish_report(
        output,
        model=_model_facts(loaded, grid, checkpoint),
        settings=run_settings(
            options,
            probe_set,
            num_images,
            labels,
            str(device),
            precision=precision,
            batch_size_used=int(ctx.options["batch_size"]),
        ),
        sections=sections,
        timings=timings,
        notes=[*loaded.notes, *natural_count_notes(request)],
        images_sha256=request.get("images_sha256"),
    )
    return output


def run_sections(
    requested: list[str],
    run: Callable[[str], SectionResult],
    stage: Callable[[str, float], float],
    output: AuditOutput,
    timings: dict[str, float],
) -> dict[str, dict[str, Any]]:
    """Run every requested analysis in `RUN_ORDER`, collecting arrays and figures into
    ``output`` and seconds into ``timings``; returns each section's report data."""
    sections: dict[str, dict[str, Any]] = {}
    for index, name in enumerate(sorted(requested, key=RUN_ORDER.index)):
        started = stage(name, 0.15 + 0.8 * index / len(requested))
        result = run(name)
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
    **extra: Any,
) -> dict[str, Any]:
    """The report's ``settings``: what was run, on what, with which seed."""
    return {
        "probe_set": probe_set,
        "num_images": num_images,
        "batch_size": int(options["batch_size"]),
        "seed": int(options["seed"]),
        "labels_source": "given" if labels is not None else "model_predictions",
        "analyses": list(options["analyses"]),
        "device": device,
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


def run_pipeline(
    request: dict[str, Any], audit_dir: Path, *, progress: Progress | None = None
) -> AuditOutput:
    """Audit the checkpoint described by ``request`` (the stored request.json).

    A trajectory request (several checkpoints of one run) audits every checkpoint with the
    same images and settings; the report is the last checkpoint's, plus a `trajectory`
    section with the headline numbers against the training step, and each step's own
    report as the artifact ``step-<step>.json``.
    """
    report_progress = progress or (lambda stage, fraction: None)
    trajectory = request.get("trajectory")
    if not trajectory:
        output = audit_checkpoint(
            request, request["checkpoint"], audit_dir, progress=report_progress, span=(0.0, 0.97)
        )
        report_progress("report", 0.97)
        return output
    reports: list[dict[str, Any]] = []
    output = AuditOutput(report={})
    started = time.perf_counter()
    for index, checkpoint in enumerate(trajectory):
        step = int(checkpoint["step"])

        def step_progress(stage: str, fraction: float, step: int = step) -> None:
            report_progress(f"step {step}: {stage}", fraction)

        span = (0.95 * index / len(trajectory), 0.95 * (index + 1) / len(trajectory))
        output = audit_checkpoint(request, checkpoint, audit_dir, progress=step_progress, span=span)
        output.report["model"]["training_step"] = step
        reports.append(output.report)
    report_progress("trajectory", 0.96)
    section = trajectory_section([int(c["step"]) for c in trajectory], reports)
    final = output  # the last checkpoint's arrays and figures
    final.documents = {
        f"step-{int(c['step']):06d}": r for c, r in zip(trajectory, reports, strict=True)
    }
    final.report = json_safe({**reports[-1], "trajectory": section.data})
    final.report["timings"] = {
        **reports[-1]["timings"],
        "trajectory_total": round(time.perf_counter() - started, 4),
    }
    final.figures.update(section.figures)
    return final
