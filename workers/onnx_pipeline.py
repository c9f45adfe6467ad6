"""The ONNX branch of `workers.pipeline.audit_checkpoint`: the same images, statistics,
labels and report as the PyTorch path, with ONNX Runtime running the model.

Gradients need autograd through the model, which an ONNX Runtime inference session does
not give, so that section is reported unavailable with the reason.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import torch

from workers.analysis.figures import deferred_figures
from workers.analysis.normalization import Normalization, resolve_normalization
from workers.analysis.onnx_model import (
    MAX_ONNX_BYTES,
    OnnxViT,
    attention_batches,
    load_onnx_model,
    position_table,
)
from workers.analysis.results import SectionResult, unavailable
from workers.audit_common import (
    AuditInputError,
    AuditOutput,
    Stage,
    check_labels,
    draw_figures,
    finish_report,
    probe_pixels,
    run_sections,
    run_settings,
)
from workers.inputs import unit_pixels

GRADIENTS_UNAVAILABLE = (
    "gradient alignment needs autograd through the model; ONNX Runtime runs inference only. "
    "Upload the PyTorch weights (.safetensors or .pth state dict) to audit gradients"
)
QK_GEOMETRY_UNAVAILABLE = (
    "Q/K geometry reads Q and K inside the attention blocks and reruns them with the content "
    "held at its mean; an ONNX graph exposes neither. Upload the PyTorch weights to audit it"
)


def _position_embedding(vit: OnnxViT, seed: int) -> SectionResult:
    from workers.analysis.posembed import position_table_section

    try:
        extracted = position_table(vit)
    except ValueError as err:
        return unavailable(f"position table cannot be analysed: {err}", kind="unknown")
    section = position_table_section(extracted, seed=seed)
    traced = vit.pos_table
    section.data["source"] = f"ONNX initializer '{traced.source}'" if traced else None
    if traced is not None and section.data.get("available"):
        section.data["onnx_path"] = [*traced.ops, "Add"]
        section.data["resampled_in_graph"] = traced.resampled_in_graph
    return section


def _heads(
    vit: OnnxViT,
    pixels: torch.Tensor,
    options: dict[str, Any],
    probe_set: str,
    normalization: Normalization,
) -> SectionResult:
    from workers.analysis.heads import (
        section_from_statistics,
        statistics_from_attention,
        texture_controls,
    )
    from workers.analysis.probes import texture_v1

    batch_size = int(options["batch_size"])
    textures = texture_v1(vit.img_size, vit.grid, seed=int(options["seed"]))
    sigma = vit.grid.patch_size / 2  # the PyTorch path's default: half a patch
    stats = statistics_from_attention(
        attention_batches(  # normalised one batch at a time: uploads stay 8-bit pixels
            vit,
            pixels,
            batch_size=batch_size,
            prepare=lambda x: normalization.apply(unit_pixels(x)),
        ),
        grid=vit.grid,
        num_prefix_tokens=vit.num_prefix_tokens,
        texture_batches=attention_batches(
            vit,
            normalization.apply(textures.images),
            # each texture image runs with its two controls: a third of the batch, as in torch
            batch_size=max(1, batch_size // 3),
            prepare=lambda x: texture_controls(x, patch_size=vit.grid.patch_size, sigma_px=sigma),
        ),
        texture_masks=textures.texture_fraction,
    )
    return section_from_statistics(
        stats,
        probe_set=probe_set,
        texture_probe_set=textures.name,
        seed=int(options["seed"]),
    )


def _model_facts(
    vit: OnnxViT, request: dict[str, Any], checkpoint: dict[str, Any]
) -> dict[str, Any]:
    return {
        "arch": request.get("arch"),
        "model_args": request["options"].get("model_args"),
        "grid": [vit.grid.height, vit.grid.width],
        "patch_size": vit.patch_size,
        "img_size": list(vit.img_size),
        "num_prefix_tokens": vit.num_prefix_tokens,
        "num_layers": vit.num_layers,
        "num_heads": vit.num_heads,
        "embed_dim": vit.embed_dim,
        "num_classes": vit.num_classes,
        "num_parameters": None,
        "num_initializer_values": vit.num_initializer_values,
        "checkpoint_sha256": checkpoint["sha256"],
        "checkpoint_bytes": checkpoint["bytes"],
        "format": "onnx",
        "onnx_opset": vit.opset,
        "onnx_providers": vit.providers,
        "onnx_patch_embed_node": vit.patch_embed_node,
        "onnx_attention_nodes": vit.attention_nodes,
        "non_finite_parameters": [],
    }


def audit_onnx(
    request: dict[str, Any],
    checkpoint: dict[str, Any],
    audit_dir: Path,
    *,
    stage: Stage,
    started: float,
) -> AuditOutput:
    """Audit one ONNX checkpoint; ``stage(name, fraction)`` reports progress and returns
    the time the stage started (as in `workers.pipeline.audit_checkpoint`)."""
    from workers.analysis.probes import natural_count_notes

    options = request["options"]
    seed = int(options["seed"])
    timings: dict[str, float] = {}
    path = audit_dir / checkpoint["path"]
    vit = load_onnx_model(
        path,
        allowed_root=path.parent,
        max_bytes=int(os.environ.get("VITAUDIT_MAX_ONNX_BYTES") or MAX_ONNX_BYTES),
        threads=torch.get_num_threads(),
    )
    timings["load"] = time.perf_counter() - started

    started = stage("images", 0.1)
    try:
        normalization = resolve_normalization(options.get("normalization"), request.get("arch"))
    except ValueError as error:
        raise AuditInputError(str(error)) from None
    pixels, probe_set = probe_pixels(request, audit_dir, vit.img_size, vit.grid)
    labels = check_labels(request, len(pixels), vit.num_classes)
    timings["images"] = time.perf_counter() - started

    def run(name: str) -> SectionResult:
        if name == "position_embedding":
            return _position_embedding(vit, seed)
        if name == "heads":
            return _heads(vit, pixels, options, probe_set, normalization)
        if name == "qk_geometry":
            return unavailable(QK_GEOMETRY_UNAVAILABLE)
        return unavailable(GRADIENTS_UNAVAILABLE)

    output = AuditOutput(report={})
    with deferred_figures():  # sections hand their figures over undrawn; drawn below
        sections = run_sections(options["analyses"], run, stage, output, timings)
    started = stage("figures", 0.96)
    notes = [
        *vit.notes,
        f"ONNX Runtime ran on {', '.join(vit.providers)}",
        *natural_count_notes(request),
    ]
    output.figures = draw_figures(output.figures, notes)
    timings["figures"] = time.perf_counter() - started
    device = "cuda" if vit.providers[0] == "CUDAExecutionProvider" else "cpu"
    output.report = finish_report(
        output,
        model=_model_facts(vit, request, checkpoint),
        settings=run_settings(options, probe_set, len(pixels), labels, device, normalization),
        sections=sections,
        timings=timings,
        notes=notes,
        images_sha256=request.get("images_sha256"),
    )
    return output
