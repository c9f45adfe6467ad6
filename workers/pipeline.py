"""load -> images -> analyses -> report, for one audit. Callable without RQ or HTTP.

The pipeline reads the audit's inputs from its folder and returns the report and the files
to write; `workers.tasks` is the thin RQ adapter that stores them. `audit_checkpoint` is the
one entry for a checkpoint: PyTorch here, ONNX in `workers.onnx_pipeline`; the steps both
share (images, labels, sections that fail alone, settings, report) live in
`workers.audit_common`, which imports neither.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from workers.analysis.batching import device_batch_size, release_cached, run_halving
from workers.analysis.figures import deferred_figures
from workers.analysis.grid import Grid
from workers.analysis.loading import LoadedModel, load_checkpoint
from workers.analysis.normalization import Normalization, resolve_normalization
from workers.analysis.precision import DEFAULT_PRECISION, forward_precision
from workers.analysis.probes import natural_count_notes, texture_v1
from workers.analysis.report import json_safe
from workers.analysis.results import SectionResult, unavailable
from workers.analysis.trajectory import trajectory_section
from workers.analysis.vit_facts import VitFacts, vit_facts
from workers.audit_common import (  # noqa: F401 - re-exported: the pipeline's public names
    RUN_ORDER,
    AuditInputError,
    AuditOutput,
    Progress,
    Stage,
    check_labels,
    draw_figures,
    finish_report,
    probe_pixels,
    run_sections,
    run_settings,
)
from workers.inputs import unit_pixels


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
    normalization: Normalization
    facts: VitFacts
    # Head statistics and Q/K alignment of the audited images, fed by the gradient pass's
    # forward when they run beside it (see `_gradients`); None until then, and when those
    # sections run their own pass.
    head_attention: Any = None
    qk_observed: Any = None

    @property
    def model(self) -> torch.nn.Module:
        return self.loaded.model

    def inputs(self, start: int, stop: int) -> Tensor:
        """Images ``start:stop`` as model inputs, on the audit's device."""
        return self.normalization.apply(unit_pixels(self.pixels[start:stop])).to(self.device)

    def batches(self) -> Iterator[tuple[Tensor, Tensor | None]]:
        size = int(self.options["batch_size"])
        for start in range(0, len(self.pixels), size):
            labels = (
                None if self.labels is None else self.labels[start : start + size].to(self.device)
            )
            yield self.inputs(start, start + size), labels


def pick_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def prepare_images(
    request: dict[str, Any], audit_dir: Path, model: torch.nn.Module
) -> tuple[Tensor, str, int]:
    """The images to audit with, normalised: uploaded ones, or the named probe set."""
    facts = vit_facts(model)
    pixels, probe_set = probe_pixels(request, audit_dir, facts.img_size, facts.grid)
    normalization = _normalization(request, facts)
    return normalization.apply(unit_pixels(pixels)), probe_set, len(pixels)


def _normalization(
    request: dict[str, Any], facts: VitFacts, loaded: LoadedModel | None = None
) -> Normalization:
    """The request's normalisation, else the checkpoint's own (a transformers folder's
    preprocessor config), else the arch's pretrained config, for the model's input channels."""
    own = (loaded.source.get("normalization") if loaded is not None else None) or None
    if own and not request["options"].get("normalization") and len(own["mean"]) == facts.in_chans:
        return Normalization(tuple(own["mean"]), tuple(own["std"]), str(own["source"]))
    try:
        return resolve_normalization(
            request["options"].get("normalization"), request.get("arch"), channels=facts.in_chans
        )
    except ValueError as error:
        raise AuditInputError(str(error)) from None


def _model_facts(
    loaded: LoadedModel, facts: VitFacts, checkpoint: dict[str, Any]
) -> dict[str, Any]:
    model = loaded.model
    return {
        "arch": loaded.arch,
        "model_args": loaded.model_args,
        **facts.report(),
        "num_classes": loaded.num_classes,
        "num_parameters": sum(p.numel() for p in model.parameters()),
        "checkpoint_sha256": checkpoint["sha256"],
        "checkpoint_bytes": checkpoint["bytes"],
        "format": checkpoint["format"],
        "non_finite_parameters": loaded.non_finite_parameters,
        **loaded.source,
    }


def _heads(ctx: AuditContext) -> SectionResult:
    from workers.analysis.heads import head_section

    textures = texture_v1(ctx.facts.img_size, ctx.grid, seed=int(ctx.options["seed"]))
    shared = ctx.head_attention is not None
    return head_section(
        ctx.model,
        None if shared else (batch for batch, _ in ctx.batches()),
        accumulated=ctx.head_attention,
        texture_images=ctx.normalization.apply(textures.images).to(ctx.device),
        texture_masks=textures.texture_fraction.to(ctx.device),
        batch_size=int(ctx.options["batch_size"]),
        probe_set=ctx.probe_set,
        texture_probe_set=textures.name,
        seed=int(ctx.options["seed"]),
    )


def _position_embedding(ctx: AuditContext) -> SectionResult:
    from workers.analysis.posembed import position_embedding_section

    return position_embedding_section(
        ctx.model, seed=int(ctx.options["seed"]), stored_pos_embed=ctx.loaded.stored_pos_embed
    )


def _head_accumulator(model: torch.nn.Module) -> Any:
    """An empty `AttentionAccumulator` for ``model``, or None where heads cannot capture it
    (their own section then says why)."""
    from workers.analysis.heads import AttentionAccumulator

    try:
        return AttentionAccumulator.for_model(model)
    except ValueError:
        return None


def _qk_observer(model: torch.nn.Module, seed: int) -> Any:
    """An empty `QKObserver` for ``model``, or None where Q/K geometry cannot capture it
    (its own section then says why)."""
    from workers.analysis.qk_geometry import QKObserver

    try:
        return QKObserver(model, seed=seed)
    except ValueError:
        return None


def _gradients(ctx: AuditContext) -> SectionResult:
    from workers.analysis.gradients import gradient_section
    from workers.analysis.objectives import choose_objective

    if ctx.loaded.non_finite_parameters:
        names = ", ".join(ctx.loaded.non_finite_parameters[:5])
        return unavailable(
            f"the checkpoint has NaN/Inf weights ({names}); gradients would be meaningless"
        )
    facts = ctx.facts
    if facts.attention_type != "Attention" or facts.attentions_per_block != 1:
        return unavailable(
            "gradient alignment reads Q, K and the attention probabilities of one timm "
            f"`Attention` module per block; this model's blocks are {facts.block_type} with "
            f"{facts.attentions_per_block} {facts.attention_type} attention(s) each"
        )
    # One forward for every analysis of the audited images: the heads reduce this pass's
    # attention maps, the Q/K geometry its Q and K.
    analyses, seed = ctx.options["analyses"], int(ctx.options["seed"])
    accumulator = _head_accumulator(ctx.model) if "heads" in analyses else None
    observer = _qk_observer(ctx.model, seed) if "qk_geometry" in analyses else None
    with observer.watching(ctx.model) if observer is not None else nullcontext():
        result = gradient_section(
            ctx.model,
            ctx.batches,  # read twice: the SGD step check runs the same images again
            grid=ctx.grid,
            seed=seed,
            on_attention=None if accumulator is None else accumulator.natural,
            on_qk=observer,
            objective=choose_objective(ctx.model, ctx.loaded.arch),
        )
    if result.data.get("available", True):
        ctx.head_attention, ctx.qk_observed = accumulator, observer
    return result


def _qk_geometry(ctx: AuditContext) -> SectionResult:
    from workers.analysis.qk_geometry import qk_geometry_section

    shared = ctx.qk_observed is not None
    return qk_geometry_section(
        ctx.model,
        None if shared else (batch for batch, _ in ctx.batches()),
        observed=ctx.qk_observed,
        seed=int(ctx.options["seed"]),
        batch_size=int(ctx.options["batch_size"]),
    )


# Sections that always run in float32 whatever `options.precision` says: the formula check
# compares autograd with the formula on the hooked tensors, and the real SGD step compares a
# measured change with a first-order prediction; under bf16 autocast both fail on a planted
# tiny ViT (formula check failed; layer logit-change correlations 0.004 and 0.012 instead of
# 0.81 and 0.999), so their verdicts would be noise.
FP32_SECTIONS = frozenset({"gradients"})


def _run_fitting(ctx: AuditContext, name: str) -> SectionResult:
    """Run section ``name`` in the audit's precision (float32 for `FP32_SECTIONS`); after an
    out-of-memory error again from the start at half the batch (`run_halving`). Later
    sections start from the size that ran."""
    precision = ctx.options.get("precision", DEFAULT_PRECISION)
    precision = "fp32" if name in FP32_SECTIONS else precision

    def attempt(size: int) -> SectionResult:
        ctx.options = {**ctx.options, "batch_size": size}
        with forward_precision(ctx.model, precision, ctx.device):
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


def audit_checkpoint(
    request: dict[str, Any],
    checkpoint: dict[str, Any],
    audit_dir: Path,
    *,
    progress: Progress,
    span: tuple[float, float] = (0.0, 1.0),
) -> AuditOutput:
    """Audit one checkpoint of the request; progress is reported inside ``span`` of 0..1.

    The one audit entry: an ONNX checkpoint goes to `workers.onnx_pipeline.audit_onnx`, a
    PyTorch one to `audit_torch`. Either fails as a whole only when the model cannot be
    loaded or the request does not fit it; a section that raises is reported unavailable
    (`workers.audit_common.run_sections`).
    """
    torch.manual_seed(int(request["options"]["seed"]))
    low, high = span

    def stage(name: str, fraction: float) -> float:
        progress(name, low + (high - low) * fraction)
        return time.perf_counter()

    started = stage("load", 0.02)
    if checkpoint["format"] == "onnx":
        from workers.onnx_pipeline import audit_onnx

        return audit_onnx(request, checkpoint, audit_dir, stage=stage, started=started)
    return audit_torch(request, checkpoint, audit_dir, stage=stage, started=started)


def audit_torch(
    request: dict[str, Any],
    checkpoint: dict[str, Any],
    audit_dir: Path,
    *,
    stage: Stage,
    started: float,
) -> AuditOutput:
    """Audit one PyTorch checkpoint (see `audit_checkpoint`)."""
    timings: dict[str, float] = {}
    options = request["options"]
    device = pick_device()
    if checkpoint["format"] == "transformers":
        from workers.hf_checkpoint import load_transformers

        config = checkpoint.get("config_path")
        loaded = load_transformers(
            audit_dir / checkpoint["path"],
            options.get("model_args") or {},
            config_path=audit_dir / config if config else None,
            batch_size=int(options["batch_size"]),
        )
    else:
        loaded = load_checkpoint(
            audit_dir / checkpoint["path"],
            request["arch"],
            options.get("model_args") or {},
            batch_size=int(options["batch_size"]),
        )
    loaded.model.to(device)
    try:
        facts = vit_facts(loaded.model)
    except ValueError as error:
        raise AuditInputError(f"'{loaded.arch}' cannot be audited: {error}") from None
    timings["load"] = time.perf_counter() - started

    started = stage("images", 0.1)
    pixels, probe_set = probe_pixels(request, audit_dir, facts.img_size, facts.grid)
    num_images = len(pixels)
    labels = check_labels(request, num_images, loaded.num_classes)
    normalization = _normalization(request, facts, loaded)
    timings["images"] = time.perf_counter() - started

    ctx = AuditContext(
        loaded, facts.grid, pixels, labels, options, device, probe_set, normalization, facts
    )
    fitted = device_batch_size(loaded.model, int(options["batch_size"]), device)
    ctx.options = {**options, "batch_size": fitted}
    output = AuditOutput(report={})
    precision = options.get("precision", DEFAULT_PRECISION)
    with deferred_figures():  # sections hand their figures over undrawn; drawn below
        sections = run_sections(
            options["analyses"], lambda name: _run_fitting(ctx, name), stage, output, timings
        )

    from workers.analysis.plots_extra import extra_figures

    started = stage("figures", 0.96)
    notes = list(loaded.notes)
    if precision != "fp32" and FP32_SECTIONS & set(options["analyses"]):
        notes.append(
            f"precision {precision}: the gradients section ran in fp32 (its formula and SGD "
            "checks need float32 gradients), and the heads and Q/K geometry reused that pass"
        )
    try:
        with deferred_figures():
            output.figures.update(
                extra_figures(
                    ctx.model,
                    ctx.inputs(0, 1),
                    sections,
                    stored_pos_embed=loaded.stored_pos_embed,
                    normalization=ctx.normalization,
                )
            )
    except (ValueError, RuntimeError) as error:  # figures are extras; the sections stand
        notes.append(f"the overview figures could not be drawn: {error}")
    output.figures = draw_figures(output.figures, notes)
    timings["figures"] = time.perf_counter() - started

    output.report = finish_report(
        output,
        model=_model_facts(loaded, facts, checkpoint),
        settings=run_settings(
            options,
            probe_set,
            num_images,
            labels,
            str(device),
            normalization,
            precision=precision,
            batch_size_used=int(ctx.options["batch_size"]),
        ),
        sections=sections,
        timings=timings,
        notes=[*notes, *natural_count_notes(request)],
        images_sha256=request.get("images_sha256"),
    )
    return output


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
