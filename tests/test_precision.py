"""Option ``precision``: bf16 autocast of the model's passes keeps the planted heads' labels
and scores (CPU autocast runs the same bfloat16 path as CUDA's)."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from tests.planted.heads_models import expected_label, label_model_heads, planted_vit  # noqa: E402
from tests.test_heads import PATCH, _probes  # noqa: E402
from workers.analysis.heads import head_statistics, label_heads  # noqa: E402
from workers.analysis.precision import PRECISIONS, check_precision, forward_precision  # noqa: E402
from workers.analysis.probes import normalize_for_model  # noqa: E402

torch.set_num_threads(1)

CPU = torch.device("cpu")
# Scores on a unit scale (masses, shares, anisotropy, content dependence, lift): bf16 keeps
# 8 significant bits, so the model's Q and K are rounded by up to 2^-8 relative and the
# probabilities rebuilt from them move by a few per mille. Measured on these heads: at most
# 0.004; the tolerance leaves 5x.
BF16_SCORE_ATOL = 0.02
# Mean distance in patches relative to fp32's (measured at most 0.11 %).
BF16_DISTANCE_RTOL = 0.01
UNIT_SCORES = (
    "entropy",
    "local_mass",
    "horizontal",
    "prefix_mass",
    "sink_mass",
    "content_dependence",
    "key_content_dependence",
    "texture_lift",
    "texture_lift_flat",
    "distance_ratio",
    "support_share",
)


def _stats(model, precision: str):
    natural, texture, fraction = _probes((8, 8))
    with forward_precision(model, precision, CPU):
        return head_statistics(
            model,
            normalize_for_model(natural, model),
            texture_images=normalize_for_model(texture, model),
            texture_masks=fraction,
            batch_size=4,
        )


def test_bf16_keeps_planted_labels_and_scores_within_tolerance() -> None:
    heads = label_model_heads()
    model = planted_vit(heads, grid=(8, 8), patch_size=PATCH)
    full, half = _stats(model, "fp32"), _stats(model, "bf16")

    planted = [[expected_label(h) for h in row] for row in heads]
    assert label_heads(full) == planted
    assert label_heads(half) == planted
    for name in UNIT_SCORES:
        torch.testing.assert_close(
            getattr(half, name), getattr(full, name), atol=BF16_SCORE_ATOL, rtol=0, msg=name
        )
    torch.testing.assert_close(
        half.mean_distance_patches, full.mean_distance_patches, rtol=BF16_DISTANCE_RTOL, atol=0
    )
    # the control: bf16 really ran (otherwise the comparison above would hold trivially)
    assert not torch.equal(half.mean_distance_patches, full.mean_distance_patches)


def test_bf16_runs_the_model_in_bfloat16_and_puts_its_forward_back() -> None:
    model = planted_vit(label_model_heads(), grid=(8, 8), patch_size=PATCH)
    seen: list[torch.dtype] = []
    handle = model.blocks[0].attn.qkv.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    x = torch.randn(1, 3, 8 * PATCH, 8 * PATCH)
    with forward_precision(model, "bf16", CPU):
        model(x)
    model(x)
    with forward_precision(model, "fp32", CPU):
        model(x)
    handle.remove()
    assert seen == [torch.bfloat16, torch.float32, torch.float32]
    assert "forward" not in model.__dict__


def test_forward_is_put_back_when_the_block_raises() -> None:
    model = planted_vit(label_model_heads(), grid=(8, 8), patch_size=PATCH)
    with pytest.raises(RuntimeError, match="boom"), forward_precision(model, "bf16", CPU):
        raise RuntimeError("boom")
    assert "forward" not in model.__dict__


def test_unknown_precision_is_refused_with_the_choices() -> None:
    assert check_precision("bf16") == "bf16" and PRECISIONS == ("fp32", "bf16")
    with pytest.raises(ValueError, match="fp32, bf16; got 'fp16'"):
        check_precision("fp16")


def test_fp32_on_cuda_allows_tf32_inside_and_puts_the_flags_back() -> None:
    """Only flags change (no CUDA call), so the CUDA branch runs on a CPU-only machine too."""
    model = planted_vit(label_model_heads(), grid=(8, 8), patch_size=PATCH)
    matmul, cudnn = torch.backends.cuda.matmul, torch.backends.cudnn
    saved = (matmul.allow_tf32, cudnn.allow_tf32)
    matmul.allow_tf32 = cudnn.allow_tf32 = False
    try:
        with forward_precision(model, "fp32", torch.device("cuda")):
            assert matmul.allow_tf32 and cudnn.allow_tf32
        assert not matmul.allow_tf32 and not cudnn.allow_tf32
        with forward_precision(model, "fp32", CPU):  # the CPU has no TF32 to allow
            assert not matmul.allow_tf32
    finally:
        matmul.allow_tf32, cudnn.allow_tf32 = saved
