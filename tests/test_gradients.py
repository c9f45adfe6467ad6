"""Gradient-alignment section: formula check on ViTs, planted tasks, streaming, hygiene.

The pure formulas are tested in test_gradient_formula.py."""

from __future__ import annotations

import functools
import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from tests.planted.gradient_models import (  # noqa: E402
    batched,
    identical_heads_vit,
    marker_readout_vit,
    marker_task,
    prefix_readout_vit,
    small_vit,
)
from workers.analysis import gradients as gradients_module  # noqa: E402
from workers.analysis.gradient_formula import (  # noqa: E402
    FORMULA_MAX_REL_ERROR,
    FORMULA_MIN_COSINE,
)
from workers.analysis.gradient_sgd import (  # noqa: E402
    SGD_CHECK_MAX_REL_ERROR,
    SGD_CHECK_MIN_LOGIT_CORRELATION,
    stepped,
)
from workers.analysis.gradients import gradient_section  # noqa: E402
from workers.analysis.grid import Grid  # noqa: E402

torch.set_num_threads(1)

# Float32 forward passes of a batch of 4 and of 4 batches of 1 differ by matmul blocking
# (~1e-7 relative); sums over a few images keep that well under 1e-4.
STREAMING_RTOL = 1e-4
# The planted task's signal: 512 images keep the sampling noise of the non-target keys
# (random +-1 bits) several times below the target's pressure (checked over seeds 0-4).
PLANTED_IMAGES = 512
PLANTED_SEED = 1


def _images(n: int, seed: int = 0, size: int = 16) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _labels(n: int, classes: int = 4, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, classes, (n,), generator=torch.Generator().manual_seed(seed + 1))


# --- formula check on timm ViTs -----------------------------------------------------------

VARIANTS = {
    "cls": dict(),
    "qk_norm": dict(qk_norm=True),
    "registers_no_embed_class": dict(reg_tokens=2, no_embed_class=True, qk_norm=True),
    "avg_pool_no_prefix": dict(class_token=False, global_pool="avg"),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_formula_check_agrees_with_autograd(variant):
    model = small_vit(**VARIANTS[variant])
    result = gradient_section(model, [(_images(4), _labels(4))])
    fc = result.data["formula_check"]
    assert fc["passed"]
    assert fc["min_cosine_q"] >= FORMULA_MIN_COSINE
    assert fc["min_cosine_k"] >= FORMULA_MIN_COSINE
    assert fc["max_rel_error_q"] <= FORMULA_MAX_REL_ERROR
    assert fc["max_rel_error_k"] <= FORMULA_MAX_REL_ERROR
    assert len(fc["layers"]) == len(model.blocks)


def test_formula_with_qk_norm_holds_post_norm_and_says_why_not_pre_norm():
    model = small_vit(qk_norm=True)
    fc = gradient_section(model, [(_images(4), _labels(4))]).data["formula_check"]
    assert fc["qk_location"] == "post-norm"
    assert "post-norm" in fc["note"] and "Jacobian" in fc["note"]
    for row in fc["layers"]:
        assert row["qk_norm"] is True
        # On the projection outputs the textbook formula misses the LayerNorm Jacobian.
        assert row["pre_norm"]["cosine_q"] < 0.99
        assert row["pre_norm"]["rel_error_q"] > 0.1
    plain = gradient_section(small_vit(), [(_images(4), _labels(4))]).data["formula_check"]
    assert "pre_norm" not in plain["layers"][0]
    assert "post-norm" not in plain["note"]


# --- SGD self-check -----------------------------------------------------------------------


@pytest.mark.parametrize("variant", ["cls", "registers_no_embed_class"])
def test_sgd_step_check_agrees_with_the_first_order_prediction(variant):
    model = small_vit(**VARIANTS[variant])
    x, y = _images(8), _labels(8)
    data = gradient_section(model, batched(x, y, 4)).data
    sgd = data["sgd_step_check"]
    assert sgd["available"] and sgd["passed"], sgd
    assert sgd["loss_before"] == pytest.approx(data["loss"], rel=1e-6)  # float64 vs float32 sum
    assert sgd["loss_change_real"] < 0  # a descent step lowers the loss
    assert sgd["relative_error"] <= SGD_CHECK_MAX_REL_ERROR
    assert sgd["loss_change_real"] == pytest.approx(
        sgd["loss_after"] - sgd["loss_before"], rel=1e-6
    )
    assert len(sgd["logit_change_correlation"]) == len(model.blocks)
    assert all(c >= SGD_CHECK_MIN_LOGIT_CORRELATION for c in sgd["logit_change_correlation"])
    assert sgd["eta"] == data["position_embedding"]["eta"]
    # The real step, checked independently: step a copy of the model and run it again.
    ref = small_vit(**VARIANTS[variant])
    with torch.no_grad():
        base = F.cross_entropy(ref(x), y)
    (g,) = torch.autograd.grad(F.cross_entropy(ref(x), y), ref.pos_embed)
    with torch.no_grad():
        ref.pos_embed -= sgd["eta"] * g
        after = F.cross_entropy(ref(x), y)
    # fused vs explicit attention path: ~1e-6 apart
    assert sgd["loss_change_real"] == pytest.approx(float(after - base), rel=1e-2)


def test_the_checks_run_on_the_first_images_and_the_sgd_prediction_is_their_own():
    """With more images than CHECK_IMAGES, the formula check sums the first batches only and
    the SGD step runs only those images again; its prediction -eta <g_S, g> is checked
    here against autograd on a fresh copy (g_S: the first 16 images' gradient)."""
    model = small_vit()
    x, y = _images(24), _labels(24)
    data = gradient_section(model, batched(x, y, 8)).data
    assert data["formula_check"]["num_images"] == gradients_module.CHECK_IMAGES == 16
    assert data["formula_check"]["passed"]
    sgd = data["sgd_step_check"]
    assert sgd["num_images"] == 16 and sgd["passed"], sgd

    ref = small_vit()
    (g,) = torch.autograd.grad(F.cross_entropy(ref(x), y), ref.pos_embed)
    (g_s,) = torch.autograd.grad(F.cross_entropy(ref(x[:16]), y[:16]), ref.pos_embed)
    predicted = -sgd["eta"] * float((g.double() * g_s.double()).sum())
    assert sgd["loss_change_predicted"] == pytest.approx(predicted, rel=1e-4)
    assert sgd["subset_gradient_cosine"] == pytest.approx(
        float(F.cosine_similarity(g.reshape(-1), g_s.reshape(-1), dim=0)), abs=1e-5
    )
    with torch.no_grad():
        before = F.cross_entropy(ref(x[:16]), y[:16])
        ref.pos_embed -= sgd["eta"] * g
        after = F.cross_entropy(ref(x[:16]), y[:16])
    # fused vs explicit attention path: ~1e-6 apart
    assert sgd["loss_change_real"] == pytest.approx(float(after - before), rel=1e-2)


def test_the_sgd_step_runs_every_image_when_the_first_ones_disagree_with_the_rest(monkeypatch):
    # Below SGD_SUBSET_MIN_COSINE the first images' prediction is ill-conditioned.
    monkeypatch.setattr(gradients_module, "SGD_SUBSET_MIN_COSINE", 1.5)  # never reached
    model = small_vit()
    x, y = _images(24), _labels(24)
    data = gradient_section(model, batched(x, y, 8)).data
    sgd = data["sgd_step_check"]
    assert sgd["num_images"] == 24 and sgd["passed"], sgd
    assert sgd["loss_before"] == pytest.approx(data["loss"], rel=1e-6)


def test_sgd_step_check_fails_for_a_step_out_of_the_linear_regime():
    # The check can fail: a step 100 times the default bends the loss away from the line.
    model = small_vit()
    x, y = _images(8), _labels(8)
    small = gradient_section(model, [(x, y)]).data["sgd_step_check"]
    big = gradient_section(model, [(x, y)], eta=100 * small["eta"]).data["sgd_step_check"]
    assert big["eta"] == pytest.approx(100 * small["eta"])
    assert big["relative_error"] > SGD_CHECK_MAX_REL_ERROR
    assert big["passed"] is False
    assert small["relative_error"] < big["relative_error"]


def test_sgd_step_restores_the_table_exactly_also_when_the_second_pass_fails():
    model = small_vit()
    before = model.pos_embed.detach().clone()
    calls = []

    def batches():
        calls.append(1)
        yield _images(4), _labels(4)
        if len(calls) == 2:  # the SGD check's pass
            raise RuntimeError("storage went away")

    with pytest.raises(RuntimeError, match="storage went away"):
        gradient_section(model, batches)
    assert len(calls) == 2
    assert torch.equal(model.pos_embed, before)
    with stepped(model.pos_embed, torch.full_like(before, 0.1)):
        assert not torch.equal(model.pos_embed, before)
    assert torch.equal(model.pos_embed, before)


def test_a_one_shot_iterator_is_refused():
    with pytest.raises(ValueError, match="one-shot"):
        gradient_section(small_vit(), iter([(_images(2), None)]))


@pytest.mark.parametrize("variant", ["cls", "registers_no_embed_class"])
def test_position_gradient_is_the_patch_rows_of_pos_embed_grad(variant):
    model = small_vit(**VARIANTS[variant])
    x, y = _images(6), _labels(6)
    result = gradient_section(model, [(x[:3], y[:3]), (x[3:], y[3:])])
    ref = small_vit(**VARIANTS[variant])
    loss = F.cross_entropy(ref(x), y)  # mean loss over all images
    (grad,) = torch.autograd.grad(loss, ref.pos_embed)
    offset = 0 if ref.no_embed_class else ref.num_prefix_tokens
    expected = grad[0, offset:].numpy()
    # The reference runs timm's fused attention, the analysis the manual path (~1e-6 apart).
    np.testing.assert_allclose(
        result.arrays["gradient_pos_grad"],
        expected,
        rtol=STREAMING_RTOL,
        atol=STREAMING_RTOL * np.abs(expected).max(),
    )


# --- planted tasks ------------------------------------------------------------------------


@functools.lru_cache(maxsize=2)  # each task's section is read by several tests, never changed
def _planted(kind: str):
    x, y = marker_task(kind, PLANTED_IMAGES, seed=PLANTED_SEED)
    return gradient_section(marker_readout_vit(seed=PLANTED_SEED), batched(x, y, 128))


def test_planted_near_task_pressure_peaks_at_neighbours_and_story_holds():
    result = _planted("near")
    data = result.data
    layer = data["layers"][0]
    profile = layer["logit_pressure_per_bin"]
    assert layer["near"] > 0 > layer["far"]
    assert layer["near"] > 3 * abs(layer["far"])
    assert int(np.nanargmax(profile)) == 1  # the neighbour bin gets the most pressure
    assert layer["spearman_distance"] < 0
    assert layer["story_holds"] is True and layer["margin"] > 0
    assert all(h["sign_pattern"] for h in layer["heads"])
    pos = data["position_embedding"]
    assert pos["story_holds"] is True  # neighbouring position embeddings pulled together
    assert pos["margin_ci95"][0] > 0
    assert layer["margin_ci95"][0] > 0
    verdict = data["verdict"]
    assert verdict["story_holds"] is True and verdict["undecided_reason"] is None
    assert 0 < verdict["margin_ci95"][0] <= verdict["margin"] <= verdict["margin_ci95"][1]
    assert verdict["position_embedding_holds"] is True
    assert verdict["position_embedding_margin_ci95"][0] > 0
    assert data["verdict"]["summary"].startswith("The story holds")
    assert data["labels_source"] == "labels"


def test_planted_far_task_reverses_pattern_and_story_does_not_hold():
    data = _planted("far").data
    layer = data["layers"][0]
    profile = layer["logit_pressure_per_bin"]
    assert layer["near"] < layer["far"]
    assert layer["far"] > 0 > layer["near"]
    assert int(np.nanargmax(profile)) == 4  # the target sits sqrt(18) = 4.24 patches away
    assert layer["story_holds"] is False and layer["margin"] < 0
    assert not any(h["sign_pattern"] for h in layer["heads"])
    assert data["position_embedding"]["story_holds"] is False
    assert data["position_embedding"]["margin_ci95"][1] < 0
    assert layer["margin_ci95"][1] < 0
    assert data["verdict"]["story_holds"] is False
    assert data["verdict"]["margin_ci95"][1] < 0
    assert data["verdict"]["summary"].startswith("The story does not hold here")


def test_angle_pressure_has_the_planted_sign_at_the_target_distance():
    # Descent on the marker's query and its target's key turns them towards each other:
    # the angle pressure of the target's distance bin is positive for the task that
    # rewards that target and negative for the other task.
    near = _planted("near").data["layers"][0]["angle_pressure_per_bin"]
    far = _planted("far").data["layers"][0]["angle_pressure_per_bin"]
    assert near[1] > 0 > far[1]  # bin 1: the near task's target
    assert far[4] > 0 > near[4]  # bin 4: the far task's target (4.24 patches)


@pytest.mark.parametrize(("label", "sign"), [(1, 1.0), (0, -1.0)])
def test_prefix_key_pressure_has_the_planted_sign(label, sign):
    # The planted output is the attention patches pay to the class token: label 1 asks for
    # more of it (pressure > 0), label 0 for less (< 0).
    model = prefix_readout_vit()
    x = torch.randn(8, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    data = gradient_section(model, [(x, torch.full((8,), label))]).data
    layer = data["layers"][0]
    assert sign * layer["prefix_key_pressure"] > 0
    assert all(sign * h["prefix_key_pressure"] > 0 for h in layer["heads"])
    # Pressure is a redistribution: what the prefix key gains, the patch keys lose.
    assert sign * layer["near"] < 0 and sign * layer["far"] < 0


def test_random_model_verdicts_do_not_contradict_each_other_across_probe_seeds():
    # A random-init model has no story to tell: each verdict is null or decided the same
    # way for three independent draws of the probe images, never true on one draw and
    # false on another.
    outcomes: dict[str, set] = {}
    for seed in range(3):
        model = small_vit(class_token=False, global_pool="avg")
        data = gradient_section(model, batched(_images(32, seed=100 + seed), None, 16)).data
        verdict = data["verdict"]
        if verdict["story_holds"] is not None:  # decided: its interval excludes 0
            lo, hi = (
                verdict["margin_ci95"]
                if verdict["logit_pressure_holds"] is not None
                else (verdict["position_embedding_margin_ci95"])
            )
            assert lo > 0 or hi < 0
        else:
            assert verdict["undecided_reason"]
        for key in ("story_holds", "logit_pressure_holds", "position_embedding_holds"):
            outcomes.setdefault(key, set()).add(verdict[key])
        for row in data["layers"]:
            outcomes.setdefault(f"layer {row['layer']}", set()).add(row["story_holds"])
    for key, seen in outcomes.items():
        assert not {True, False} <= seen, (key, seen)


def test_last_block_of_a_class_token_model_is_not_judged():
    # With class-token pooling, patch queries of the last block never reach the output:
    # their logit gradient is exactly zero, which is no evidence for or against the story.
    model = small_vit(depth=2, global_pool="token")
    data = gradient_section(model, [(_images(4), _labels(4))]).data
    last = data["layers"][-1]
    assert last["story_holds"] is None
    assert "does not reach" in last["undecided_reason"]
    assert all(v == 0.0 for v in last["logit_pressure_per_bin"])
    assert last["judged"] is False and last["margin_ci95"] is None
    assert data["layers"][0]["judged"] is True
    assert data["verdict"]["layers_judged"] == 1


def test_identical_heads_have_divergence_one_and_random_heads_do_not():
    x, y = _images(4), _labels(4, classes=3)
    same = gradient_section(identical_heads_vit(), [(x, y)]).data["head_divergence"]
    for row in same["layers"]:
        assert row["mean_pairwise_cosine_q"] == pytest.approx(1.0, abs=1e-5)
        assert row["mean_pairwise_cosine_k"] == pytest.approx(1.0, abs=1e-5)
    rand = gradient_section(small_vit(num_heads=4, num_classes=3), [(x, y)]).data
    assert rand["head_divergence"]["mean_pairwise_cosine_q"] < 0.9


# --- streaming ----------------------------------------------------------------------------


@pytest.mark.parametrize("with_labels", [True, False])
def test_streaming_batch_size_one_equals_batch_size_four(with_labels):
    model = small_vit(qk_norm=True)
    x = _images(4)
    y = _labels(4) if with_labels else None
    one = gradient_section(model, batched(x, y, 1))
    four = gradient_section(model, batched(x, y, 4))
    assert one.data["num_images"] == four.data["num_images"] == 4
    assert one.data["loss"] == pytest.approx(four.data["loss"], rel=STREAMING_RTOL)
    for name in (
        "gradient_logit_pressure",
        "gradient_angle_pressure",
        "gradient_pos_grad",
        "gradient_pos_cos_change_rate",
        "gradient_head_divergence_q",
        "gradient_head_divergence_k",
    ):
        a, b = one.arrays[name], four.arrays[name]
        scale = np.nanmax(np.abs(b))
        np.testing.assert_allclose(
            a, b, rtol=STREAMING_RTOL, atol=STREAMING_RTOL * scale, err_msg=name
        )
    assert one.data["labels_source"] == ("labels" if with_labels else "predictions")


@pytest.mark.parametrize("variant", ["cls", "registers_no_embed_class"])
def test_per_image_profiles_average_to_the_reported_profiles(variant):
    # The bootstrap resamples per-image numbers: their mean must be the section's own
    # profile (logit pressure per layer, position cos-change rate of the mean gradient).
    model = small_vit(**VARIANTS[variant])
    x, y = _images(6), _labels(6)
    result = gradient_section(model, batched(x, y, 4))
    image_logit = result.arrays["gradient_image_logit_pressure"]  # (n, L, bins)
    assert image_logit.shape[:2] == (6, len(model.blocks))
    for i, row in enumerate(result.data["layers"]):
        expected = np.array(row["logit_pressure_per_bin"], dtype=float)
        np.testing.assert_allclose(image_logit[:, i].mean(0), expected, rtol=1e-6, atol=1e-12)
    image_pos = result.arrays["gradient_image_pos_cos_change_rate"]  # (n, bins)
    expected = np.nan_to_num(
        np.array(result.data["position_embedding"]["cos_change_rate_per_bin"], dtype=float)
    )
    scale = np.abs(expected).max()
    np.testing.assert_allclose(image_pos.mean(0), expected, rtol=1e-4, atol=1e-4 * scale)


# --- the caller's model is left as it was -------------------------------------------------


def test_model_parameters_flags_and_hooks_are_unchanged():
    model = small_vit(qk_norm=True)
    model.train()
    model.blocks[1].eval()  # a mixed mode, to check modes are restored per module
    model.pos_embed.requires_grad_(False)
    model.head.weight.grad = torch.ones_like(model.head.weight)
    fused = [blk.attn.fused_attn for blk in model.blocks]
    modes = {name: m.training for name, m in model.named_modules()}
    grads_flags = {name: p.requires_grad for name, p in model.named_parameters()}
    state = {k: v.clone() for k, v in model.state_dict().items()}

    gradient_section(model, [(_images(4), _labels(4))])

    assert [blk.attn.fused_attn for blk in model.blocks] == fused
    assert {name: m.training for name, m in model.named_modules()} == modes
    assert {name: p.requires_grad for name, p in model.named_parameters()} == grads_flags
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k
    for name, p in model.named_parameters():
        if name == "head.weight":
            assert torch.equal(p.grad, torch.ones_like(p))
        else:
            assert p.grad is None, name
    for m in model.modules():
        assert not m._forward_hooks and not m._forward_pre_hooks


def test_model_is_restored_when_the_analysis_fails():
    model = small_vit()
    fused = [blk.attn.fused_attn for blk in model.blocks]
    bad_labels = torch.tensor([0, 1, 2, 99])
    with pytest.raises(ValueError, match="labels must lie"):
        gradient_section(model, [(_images(4), bad_labels)])
    assert [blk.attn.fused_attn for blk in model.blocks] == fused
    assert not any(m._forward_hooks for m in model.modules())


# --- contract: JSON, figures, unavailable, bad input --------------------------------------


def test_section_is_json_ready_and_has_the_contract_keys_and_figures():
    result = gradient_section(small_vit(), [(_images(4), None)])
    data = result.data
    json.dumps(data, allow_nan=False)
    for key in (
        "available",
        "loss",
        "labels_source",
        "formula_check",
        "sgd_step_check",
        "layers",
        "position_embedding",
        "head_divergence",
        "verdict",
    ):
        assert key in data
    assert data["labels_source"] == "predictions"
    assert set(result.figures) == {"gradient_logit_pressure", "gradient_pos_pressure"}
    for png in result.figures.values():
        assert png.startswith(b"\x89PNG")
    assert result.arrays["gradient_logit_pressure"].shape == (2, 2, 5)  # layers, heads, bins


def test_no_learned_position_embedding_is_reported_unavailable():
    model = small_vit(pos_embed="none")
    data = gradient_section(model, [(_images(2), _labels(2))]).data
    assert data["available"] is True
    assert data["position_embedding"]["available"] is False
    assert "position embedding" in data["position_embedding"]["reason"]
    assert data["sgd_step_check"]["available"] is False
    assert data["sgd_step_check"]["relative_error"] is None  # contract keys kept, null
    assert data["formula_check"]["passed"]
    json.dumps(data, allow_nan=False)


def test_unsupported_models_are_unavailable_not_errors():
    data = gradient_section(
        nn.Sequential(nn.Flatten(), nn.Linear(3 * 16 * 16, 2)), [(_images(2), None)]
    ).data
    assert data["available"] is False and "blocks" in data["reason"]
    headless = small_vit(num_classes=0)
    data = gradient_section(headless, [(_images(2), None)]).data
    assert data["available"] is False and "classifier" in data["reason"]


def test_bad_inputs_raise_value_errors():
    model = small_vit()
    with pytest.raises(ValueError, match="images"):
        gradient_section(model, [(torch.zeros(3, 16, 16), None)])
    with pytest.raises(ValueError, match="labels"):
        gradient_section(model, [(_images(4), torch.zeros(3, dtype=torch.long))])
    with pytest.raises(ValueError, match="mix"):
        gradient_section(model, [(_images(2), _labels(2)), (_images(2), None)])
    with pytest.raises(ValueError, match="no images"):
        gradient_section(model, [])
    with pytest.raises(ValueError, match="grid"):
        gradient_section(model, [(_images(2), None)], grid=Grid(3, 3, 4))
    with pytest.raises(ValueError, match="eta"):
        gradient_section(model, [(_images(2), None)], eta=-1.0)
