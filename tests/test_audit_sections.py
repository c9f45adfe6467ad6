"""The audit as a whole: sections fail alone, model facts for every timm block type,
custom ViTs from model_args, and the normalisation the report records."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from pathlib import Path  # noqa: E402

import msgspec  # noqa: E402
import pytest  # noqa: E402
import timm  # noqa: E402
import torch  # noqa: E402
from rq.timeouts import JobTimeoutException  # noqa: E402

from service.models import AuditOptions, ModelArgs  # noqa: E402
from tests.planted.audits import staged_audit  # noqa: E402
from tests.planted.models import TINY_ARCH, TINY_ARGS, tiny_vit  # noqa: E402
from workers import pipeline  # noqa: E402
from workers.analysis.capture import attention_capture, attention_sites  # noqa: E402
from workers.analysis.normalization import resolve_normalization, to_channels  # noqa: E402
from workers.analysis.vit_facts import vit_facts  # noqa: E402

# Captured probabilities are rebuilt from Q and K in float32 and compared with the model's
# own explicit-path softmax: both are float32 with the same products, so they agree to
# rounding (~1e-7); 1e-5 leaves room and still fails on a transposed or rescaled product.
CAPTURE_TOLERANCE = 1e-5


def audit(tmp_path: Path, model: torch.nn.Module, arch: str, args: dict, **options) -> dict:
    request, root = staged_audit(tmp_path, model, arch, args, **options)
    return pipeline.run_pipeline(request, root).report


@pytest.mark.parametrize("broken", ["position_embedding", "gradients", "heads"])
def test_a_section_that_raises_is_reported_alone_and_the_others_finish(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, broken: str
) -> None:
    def planted(_ctx: pipeline.AuditContext) -> None:
        raise ZeroDivisionError("planted failure")

    monkeypatch.setitem(pipeline.SECTIONS, broken, planted)
    report = audit(tmp_path, tiny_vit(), TINY_ARCH, TINY_ARGS)
    assert report[broken] == {
        "available": False,
        "reason": "the analysis failed: planted failure",
        "error": "ZeroDivisionError",
    }
    for other in {"position_embedding", "gradients", "heads"} - {broken}:
        assert report[other]["available"] is True, (other, report[other].get("reason"))


def test_a_job_timeout_inside_a_section_still_stops_the_audit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def planted(_ctx: pipeline.AuditContext) -> None:
        raise JobTimeoutException("job exceeded its timeout")

    monkeypatch.setitem(pipeline.SECTIONS, "position_embedding", planted)
    with pytest.raises(JobTimeoutException):
        audit(tmp_path, tiny_vit(), TINY_ARCH, TINY_ARGS, analyses=["position_embedding"])


TINY = {"embed_dim": 32, "depth": 3, "num_heads": 2, "img_size": 32, "patch_size": 8}


@pytest.mark.parametrize(
    ("arch", "block_type", "attention_type", "per_block"),
    [
        ("vit_tiny_patch16_224", "Block", "Attention", 1),
        ("vit_base_patch16_rpn_224", "ResPostBlock", "Attention", 1),
        ("vit_base_patch16_xp_224", "ParallelScalingBlock", "ParallelScalingBlock", 1),
        ("vit_small_patch16_18x2_224", "ParallelThingsBlock", "Attention", 2),
    ],
)
def test_model_facts_know_every_block_type(
    arch: str, block_type: str, attention_type: str, per_block: int
) -> None:
    facts = vit_facts(timm.create_model(arch, pretrained=False, **TINY))
    assert (facts.num_layers, facts.num_heads, facts.attentions_per_block) == (3, 2, per_block)
    assert (facts.block_type, facts.attention_type) == (block_type, attention_type)
    assert (facts.grid.shape, facts.grid.patch_size, facts.img_size) == ((4, 4), 8, (32, 32))


def test_parallel_scaling_blocks_are_captured_as_their_own_softmax() -> None:
    torch.manual_seed(0)
    model = timm.create_model("vit_base_patch16_xp_224", pretrained=False, **TINY).eval()
    truth: dict[int, torch.Tensor] = {}
    handles = []
    for i, block in enumerate(model.blocks):
        block.fused_attn = False  # the explicit path hands the probabilities to attn_drop
        handles.append(
            block.attn_drop.register_forward_hook(
                lambda _m, _i, out, i=i: truth.__setitem__(i, out.detach())
            )
        )
    captured: dict[int, torch.Tensor] = {}
    images = torch.randn(2, 3, 32, 32)
    with attention_capture(model, captured.__setitem__), torch.no_grad():
        model(images)
    for handle in handles:
        handle.remove()
    assert [s.name for s in attention_sites(model)] == ["blocks.0", "blocks.1", "blocks.2"]
    for i in range(3):
        assert captured[i].shape == (2, 2, 17, 17)
        assert torch.allclose(captured[i], truth[i], atol=CAPTURE_TOLERANCE)
    # control: the maps differ between layers, so a wrong layer or a transposed q/k would show
    assert not torch.allclose(captured[0], captured[1], atol=CAPTURE_TOLERANCE)


def test_parallel_things_blocks_are_refused_with_the_reason(tmp_path: Path) -> None:
    arch, args = "vit_small_patch16_18x2_224", {**TINY, "depth": 2}
    torch.manual_seed(0)
    report = audit(tmp_path, timm.create_model(arch, pretrained=False, **args), arch, args)
    assert report["position_embedding"]["available"] is True
    assert "in parallel" in report["heads"]["reason"]
    assert "2 Attention attention(s)" in report["gradients"]["reason"]
    assert (report["model"]["num_layers"], report["model"]["num_heads"]) == (2, 2)


GRAYSCALE_ARGS = {
    "img_size": 28,
    "patch_size": 7,
    "in_chans": 1,
    "embed_dim": 32,
    "depth": 2,
    "num_heads": 2,
    "mlp_ratio": 2.0,
    "qkv_bias": False,
    "final_norm": False,
    "num_classes": 10,
}


def test_a_28px_grayscale_vit_from_model_args_audits_end_to_end(tmp_path: Path) -> None:
    args = msgspec.to_builtins(msgspec.convert(GRAYSCALE_ARGS, ModelArgs))  # the API takes them
    assert args == GRAYSCALE_ARGS
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, **args)
    report = audit(tmp_path, model, "vit_tiny_patch16_224", args)
    facts = report["model"]
    assert (facts["in_chans"], facts["grid"], facts["patch_size"], facts["img_size"]) == (
        1,
        [4, 4],
        7,
        [28, 28],
    )
    for name in ("position_embedding", "heads", "gradients"):
        assert report[name]["available"] is True, (name, report[name].get("reason"))
    assert report["gradients"]["objective"]["name"] == "predictions"
    # vit_tiny's pretrained config is mean = std = 0.5 on every channel: one channel of it
    assert report["settings"]["normalization"] == {
        "mean": [0.5],
        "std": [0.5],
        "source": "timm pretrained config of 'vit_tiny_patch16_224', averaged over channels "
        "for a 1-channel model",
    }


def test_a_backbone_without_head_loads_and_audits_with_the_embedding_objective(
    tmp_path: Path,
) -> None:
    args = {**TINY_ARGS, "num_classes": 0}
    msgspec.convert(args, ModelArgs)
    report = audit(tmp_path, tiny_vit(num_classes=0), TINY_ARCH, args, analyses=["gradients"])
    assert report["model"]["num_classes"] == 0
    assert report["gradients"]["objective"]["name"] == "instance_discrimination"
    assert report["gradients"]["labels_source"] is None


@pytest.mark.parametrize(
    "bad",
    [
        {"in_chans": 2},
        {"num_classes": -1},
        {"mlp_ratio": 100.0},
        {"qkv_bias": "yes"},
        {"act": "gelu"},
    ],
)
def test_invalid_model_args_are_refused(bad: dict) -> None:
    with pytest.raises(msgspec.ValidationError):
        msgspec.convert({**TINY_ARGS, **bad}, ModelArgs)


@pytest.mark.parametrize(
    "bad",
    [
        {"mean": [0.5, 0.5], "std": [0.5, 0.5]},
        {"mean": [0.5], "std": [0.0]},
        {"mean": [0.5, 0.5, 0.5], "std": [1.0]},
        {"mean": [0.5], "std": [1.0], "scale": 2},
    ],
)
def test_invalid_normalization_is_refused(bad: dict) -> None:
    with pytest.raises(msgspec.ValidationError):
        msgspec.convert({"normalization": bad}, AuditOptions)


def test_given_normalization_is_used_and_reported(tmp_path: Path) -> None:
    given = {"mean": [0.1, 0.2, 0.3], "std": [0.4, 0.5, 0.6]}
    report = audit(
        tmp_path, tiny_vit(), TINY_ARCH, TINY_ARGS, normalization=given, analyses=["heads"]
    )
    assert report["settings"]["normalization"] == {**given, "source": "options.normalization"}


def test_normalization_applies_per_channel_and_makes_grayscale_probes() -> None:
    images = torch.rand(2, 3, 4, 4)
    norm = resolve_normalization({"mean": [0.1, 0.2, 0.3], "std": [0.5, 0.25, 2.0]}, None)
    out = norm.apply(images)
    assert torch.allclose(out[:, 1], (images[:, 1] - 0.2) / 0.25)
    grey = to_channels(
        torch.ones(1, 3, 2, 2) * torch.tensor([1.0, 0.0, 0.0])[None, :, None, None], 1
    )
    assert grey.shape == (1, 1, 2, 2) and torch.allclose(grey, torch.full_like(grey, 0.299))
    with pytest.raises(ValueError, match="the model takes 1"):
        resolve_normalization({"mean": [0.1, 0.2, 0.3], "std": [1.0, 1.0, 1.0]}, None, channels=1)


@pytest.mark.parametrize(
    ("given", "source"),
    [
        (None, "timm pretrained config of 'vit_tiny_patch16_224'"),
        ({"mean": [0.1, 0.2, 0.3], "std": [0.4, 0.5, 0.6]}, "options.normalization"),
    ],
)
def test_the_onnx_path_reports_its_normalization_too(
    tmp_path: Path, given: dict | None, source: str
) -> None:
    from tests.test_onnx import export, stage_audit

    checkpoint = export(tiny_vit(seed=3), tmp_path / "tiny.onnx", fused=False)
    request, root = stage_audit(tmp_path / "audit", checkpoint, analyses=["heads"])
    request["options"]["normalization"] = given
    report = pipeline.run_pipeline(request, root).report
    assert report["settings"]["normalization"]["source"] == source
    assert report["heads"]["available"] is True
    if given:
        assert report["settings"]["normalization"] == {**given, "source": source}


def test_channels_and_a_missing_head_are_read_from_the_checkpoint(tmp_path: Path) -> None:
    from tests.planted.models import save_safetensors
    from workers.analysis.loading import load_checkpoint

    args = {k: v for k, v in GRAYSCALE_ARGS.items() if k not in ("in_chans", "num_classes")}
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, **args, in_chans=1)
    model.reset_classifier(0)  # a backbone: no head.weight in its state dict
    path = save_safetensors(model, tmp_path / "backbone.safetensors")
    loaded = load_checkpoint(path, "vit_tiny_patch16_224", args)
    assert loaded.num_classes == 0
    assert vit_facts(loaded.model).in_chans == 1


def test_qk_geometry_reads_parallel_scaling_blocks_heads_first() -> None:
    """ParallelScalingBlock normalises Q and K as (B, tokens, heads, d); the Q/K geometry
    section reads them heads-first, as the logits do, and gets the model's own Q.K."""
    from workers.analysis.capture import qk_capture

    torch.manual_seed(0)
    model = timm.create_model("vit_base_patch16_xp_224", pretrained=False, **TINY).eval()
    truth: dict[int, torch.Tensor] = {}
    for i, block in enumerate(model.blocks):
        block.fused_attn = False
        block.attn_drop.register_forward_hook(
            lambda _m, _i, out, i=i: truth.__setitem__(i, out.detach())
        )
    seen: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    with qk_capture(model, lambda layer, q, k: seen.__setitem__(layer, (q, k))), torch.no_grad():
        model(torch.randn(2, 3, 32, 32))
    for i, (q, k) in seen.items():
        assert q.shape == k.shape == (2, 2, 17, 16)
        probs = ((q @ k.transpose(-2, -1)) * model.blocks[i].scale).softmax(-1)
        assert torch.allclose(probs, truth[i], atol=CAPTURE_TOLERANCE)
