"""Every architecture the API accepts (`service/timm_vit_models.txt`) audits to the end.

A full audit of one tiny model costs 1-3 s on 2 cores (figures and three sections), so all
179 through the pipeline would take minutes. The sweep therefore has two layers:

- every listed name is built at a tiny size with random weights (width 32, 2 blocks of 2
  heads, a 4x4 grid of the arch's own patch size, or 4.5 patches where the arch's own image
  size does not tile), and its model facts, its forward pass and its attention capture (or
  the reason capture refuses it) are checked on one image;
- one representative per distinct build signature (`build_signature`: block class,
  attention class, prefix tokens, ``no_embed_class``, position-table kind, pooling, head
  kind, q/k norm, whether the arch's own size tiles) is audited through the pipeline with
  2 images and every section: each section is available or ``available: false`` with a
  reason, never a crash. `test_the_representatives_cover_every_build_signature` fails when
  timm grows a signature that `REPRESENTATIVES` does not cover.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from functools import cache  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import msgspec  # noqa: E402
import pytest  # noqa: E402
import timm  # noqa: E402
import torch  # noqa: E402

from service.architectures import supported_architectures  # noqa: E402
from service.models import ModelArgs  # noqa: E402
from tests.planted.audits import staged_audit  # noqa: E402
from workers.analysis.capture import attention_sites, stream_attention  # noqa: E402
from workers.analysis.objectives import projection_dims  # noqa: E402
from workers.analysis.vit_facts import vit_facts  # noqa: E402
from workers.pipeline import run_pipeline  # noqa: E402

ARCHS = sorted(supported_architectures())
WIDTH, DEPTH, HEADS, GRID = 32, 2, 2, 4
SECTIONS = ("position_embedding", "heads", "gradients")
REPRESENTATIVES = (
    "aimv2_1b_patch14_224",
    "beit3_base_patch16_224",
    "deit3_base_patch16_224",
    "deit_base_distilled_patch16_224",
    "deit_base_patch16_224",
    "test_vit3",
    "vit_base_patch14_dinov2",
    "vit_base_patch14_reg1_tipsv2",
    "vit_base_patch14_reg4_dinov2",
    "vit_base_patch16_18x2_224",
    "vit_base_patch16_clip_quickgelu_224",
    "vit_base_patch16_gap_224",
    "vit_base_patch16_radio_v3",
    "vit_base_patch16_reg4_gap_256",
    "vit_base_patch16_rpn_224",
    "vit_base_patch16_siglip_224",
    "vit_base_patch16_xp_224",
    "vit_betwixt_patch16_reg1_gap_256",
    "vit_dlittle_patch16_reg1_gap_256",
    "vit_dpwee_patch16_reg1_gap_256",
    "vit_huge_patch16_radio_v4",
    "vit_pwee_patch16_reg1_gap_256",
    "vit_so150m_patch16_reg4_gap_256",
    "vit_so150m_patch16_reg4_map_256",
    "vit_so400m_patch14_siglip_384",
    "vit_so400m_patch14_siglip_gap_384",
)


@cache
def tiny_args(arch: str) -> tuple[tuple[str, Any], ...]:
    """The model_args of the tiny ``arch``: its own patch size, a 4x4 grid (4.5 patches a
    side where its own image size does not tile, so the grid decides, not the size)."""
    own = timm.create_model(arch, pretrained=False, embed_dim=WIDTH, depth=1, num_heads=HEADS)
    patch = int(own.patch_embed.patch_size[0])
    tiles = int(own.patch_embed.img_size[0]) % patch == 0
    size = GRID * patch + (0 if tiles else patch // 2)
    return (("embed_dim", WIDTH), ("depth", DEPTH), ("num_heads", HEADS), ("img_size", size))


@cache
def build(arch: str) -> torch.nn.Module:
    """The tiny ``arch`` with seeded random weights; built once per session, never modified
    (the capture puts the model back as it found it; audits load their own copy)."""
    torch.manual_seed(0)
    return timm.create_model(arch, pretrained=False, **dict(tiny_args(arch))).eval()


def head_kind(model: torch.nn.Module, arch: str) -> str:
    if model.num_classes == 0:
        return "none"
    return "projection" if model.num_classes in projection_dims(arch) else "classifier"


def build_signature(arch: str) -> tuple:
    model = build(arch)
    block = model.blocks[0]
    attn = getattr(block, "attn", block)
    size = dict(tiny_args(arch))["img_size"]
    return (
        type(block).__name__,
        type(getattr(block, "attn", None)).__name__,
        int(model.num_prefix_tokens),
        bool(getattr(model, "no_embed_class", False)),
        model.pos_embed is None,
        model.global_pool,
        head_kind(model, arch),
        type(getattr(attn, "q_norm", None)).__name__,
        size % int(model.patch_embed.patch_size[0]) == 0,
    )


def test_the_representatives_cover_every_build_signature() -> None:
    covered = {build_signature(arch) for arch in REPRESENTATIVES}
    missing = {}
    for arch in ARCHS:
        signature = build_signature(arch)
        if signature not in covered:
            missing.setdefault(signature, arch)
    assert not missing, f"add a representative for: {sorted(missing.values())}"


@pytest.mark.parametrize("arch", ARCHS)
def test_every_listed_arch_builds_tiny_and_its_attention_is_captured_or_refused(
    arch: str,
) -> None:
    args = dict(tiny_args(arch))
    msgspec.convert(args, ModelArgs)  # the API accepts these model_args
    model = build(arch)
    facts = vit_facts(model)
    assert (facts.num_layers, facts.num_heads, facts.grid.shape) == (DEPTH, HEADS, (GRID, GRID))
    images = torch.rand(1, facts.in_chans, *facts.img_size)
    with torch.no_grad():
        assert model(images).shape[0] == 1
    try:
        attention_sites(model)
    except ValueError as refused:
        assert str(refused)
        return
    shapes: dict[int, tuple[int, ...]] = {}
    stream_attention(model, images, lambda i, p, _s: shapes.__setitem__(i, p.shape), batch_size=1)
    tokens = facts.num_prefix_tokens + GRID * GRID
    assert shapes == {i: (1, HEADS, tokens, tokens) for i in range(DEPTH)}


@pytest.mark.parametrize("arch", REPRESENTATIVES)
def test_a_representative_of_each_build_audits_to_the_end(arch: str, tmp_path: Path) -> None:
    args = dict(tiny_args(arch))
    model = build(arch)
    request, root = staged_audit(tmp_path, model, arch, args)
    report = run_pipeline(request, root).report
    facts = report["model"]
    assert (facts["num_layers"], facts["num_heads"], facts["grid"]) == (DEPTH, HEADS, [GRID, GRID])
    assert facts["img_size"] == [args["img_size"]] * 2
    for name in SECTIONS:
        section = report[name]
        assert "error" not in section, (name, section)
        assert section["available"] is True or section["reason"], (name, section)
    gradients = report["gradients"]
    if gradients["available"]:
        expected = (
            "predictions" if head_kind(model, arch) == "classifier" else "instance_discrimination"
        )
        assert gradients["objective"]["name"] == expected
    assert report["settings"]["normalization"]["source"]
