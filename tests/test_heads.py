"""Head statistics and labels, checked on heads whose role was planted by hand."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import json  # noqa: E402
import math  # noqa: E402
from functools import cache  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from timm.models.vision_transformer import VisionTransformer  # noqa: E402
from torch import nn  # noqa: E402

from service.policy import lookup  # noqa: E402
from tests.planted.heads_models import (  # noqa: E402
    DEPTH_SIGMAS,
    MUST_NOT,
    PlantedHead,
    depth_model_heads,
    expected_label,
    label_model_heads,
    planted_vit,
    scale_model_heads,
)
from workers.analysis.bootstrap import percentile_interval, resample_weights  # noqa: E402
from workers.analysis.gradients import gradient_section  # noqa: E402
from workers.analysis.grid import Grid  # noqa: E402
from workers.analysis.heads import (  # noqa: E402
    LABEL_RULES,
    LABELS,
    THRESHOLDS,
    AttentionAccumulator,
    bootstrap_heads,
    flatten_patches,
    head_diversity,
    head_section,
    head_statistics,
    label_heads,
    label_index,
    lowpass,
    section_from_statistics,
    sink_keys,
    statistics_from_attention,
)
from workers.analysis.probes import natural_v1, normalize_for_model, texture_v1  # noqa: E402

torch.set_num_threads(1)

PATCH = 8
# 4x4 is gone from the label grids: a neighbour there is a quarter of the image, so a head
# attending its neighbour is not local in image fractions (the scale-free rule).
GRIDS = [(8, 8), (6, 10)]
# Batch size changes float32 kernel blocking in the forward; per-head means then differ
# by rounding only (measured ~1e-8 on these models).
STREAM_ATOL = 1e-6
# Planted positional heads ignore content entirely: their maps agree across images up to
# float32 rounding, and content_dependence (a difference of two float32 sums per batch:
# energy minus the mean map's) reads up to ~1.4e-6 on them instead of 0.
POSITIONAL_CONTENT_MAX = 1e-5
# Exact identities (uniform or one-hot attention): the maps are reduced in float32
# (`heads._patch_part`), so they hold to float32 rounding (measured 3.6e-8 on a flat head).
EXACT_ATOL = 1e-6
# Every per-head statistic that two passes over the same images must agree on.
STREAMED_STATISTICS = (
    "mean_distance_patches",
    "entropy",
    "local_mass",
    "self_mass",
    "horizontal",
    "prefix_mass",
    "content_dependence",
    "key_content_dependence",
    "sink_mass",
    "texture_lift",
    "texture_lift_flat",
    "lowpass_change",
    "mean_maps",
)
# Resamples in tests: enough for a stability of 0.5 to land within 0.1 (sd 0.025 at 400).
TEST_RESAMPLES = 400
STABILITY_ATOL = 0.1


def assert_same_statistics(a, b) -> None:
    """Two HeadStatistics of the same images agree on every streamed statistic."""
    for name in STREAMED_STATISTICS:
        torch.testing.assert_close(
            getattr(a, name), getattr(b, name), atol=STREAM_ATOL, rtol=0, msg=name
        )


@cache
def _probes(
    grid: tuple[int, int], probe_set: str = "natural-v1", count: int = 4, texture_count: int = 6
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Audited images (``probe_set``), texture images (both [0, 1]) and texture fractions."""
    size = (grid[0] * PATCH, grid[1] * PATCH)
    texture = texture_v1(size, Grid(*grid, PATCH), count=texture_count, seed=3)
    if probe_set == "texture-v1":  # the pipeline's texture-v1 probe set (its own seed)
        audited = texture_v1(size, Grid(*grid, PATCH), count=count, seed=0).images
    else:
        audited = natural_v1(size, count=count).images
    return audited, texture.images, texture.texture_fraction


def _planted_stats(heads, grid, *, batch_size: int = 4, with_texture: bool = True, **probes):
    model = planted_vit(heads, grid=grid, patch_size=PATCH)
    natural, texture, fraction = _probes(grid, **probes)
    kwargs = {}
    if with_texture:
        kwargs = {"texture_images": normalize_for_model(texture, model), "texture_masks": fraction}
    stats = head_statistics(
        model, normalize_for_model(natural, model), batch_size=batch_size, **kwargs
    )
    return model, stats


def _assert_labels(labels: list[list[str]], heads, expected: list[list[str]]) -> None:
    """Every head gets its label and none of the labels its kind must never get."""
    assert labels == expected
    for row_labels, row_heads in zip(labels, heads, strict=True):
        for label, head in zip(row_labels, row_heads, strict=True):
            assert label not in MUST_NOT.get(head.kind, frozenset()), (head, label)


@pytest.mark.parametrize("probe_set", ["natural-v1", "texture-v1"])
@pytest.mark.parametrize("grid", GRIDS, ids=lambda g: f"{g[0]}x{g[1]}")
def test_every_planted_head_gets_its_label(grid: tuple[int, int], probe_set: str) -> None:
    heads = label_model_heads(grid)
    _model, stats = _planted_stats(heads, grid, probe_set=probe_set)
    grey = probe_set == "texture-v1"
    expected = [[expected_label(h, grey_probes=grey) for h in row] for row in heads]
    _assert_labels(label_heads(stats), heads, expected)
    assert {lab for row in expected for lab in row} >= set(LABELS) - {"mixed", "content"} | (
        set() if grey else {"content"}
    )


def test_the_same_head_in_image_fractions_gets_the_same_label_on_14x14_and_28x28() -> None:
    labels = {}
    for side, count in ((14, 3), (28, 2)):
        heads, expected = scale_model_heads(side)
        _model, stats = _planted_stats(
            heads, (side, side), batch_size=2, count=count, texture_count=3
        )
        labels[side] = label_heads(stats)
        _assert_labels(labels[side], heads, expected)
    assert labels[14] == labels[28]


def test_planted_scores_point_the_right_way() -> None:
    heads = label_model_heads()
    _model, stats = _planted_stats(heads, (8, 8))
    local, horizontal, vertical, flat = ((0, h) for h in range(4))
    texture, prefix = (1, 0), (1, 1)
    corner, centre, bright, colour = ((2, h) for h in range(4))
    assert stats.local_score[local] > 0.95 and stats.self_mass[local] > 0.6
    assert stats.horizontal[horizontal] > 0.95 and stats.vertical[vertical] > 0.95
    assert abs(stats.distance_ratio[flat] - 1.0) < EXACT_ATOL
    assert abs(stats.entropy[flat] - 1.0) < EXACT_ATOL
    assert abs(stats.support_share[flat] - 1.0) < EXACT_ATOL
    assert stats.prefix_mass[prefix] > 0.99
    assert stats.texture_lift[texture] > 2.0 and stats.lowpass_change[texture] > 0.5
    # The control: flattening every patch removes a texture head's lift entirely ...
    assert abs(stats.texture_lift_flat[texture] - 1.0) < 0.05
    # ... and a brightness head's lift (a real false positive: >= 1.5) survives it whole.
    assert stats.texture_lift[bright] >= THRESHOLDS["texture_lift_min"]
    assert abs(stats.texture_lift_flat[bright] - stats.texture_lift[bright]) < 1e-6
    # Sinks: the same key for every query, far (corner) or not (centre), and narrow.
    assert stats.sink_mass[corner] > 0.95 and stats.sink_mass[centre] > 0.95
    assert stats.distance_ratio[corner] > 1.0  # the old rule (distance only) said "global"
    assert stats.support_share[corner] < 2 / 64
    # Content heads follow the keys' content; positional heads do not.
    assert stats.key_content_dependence[bright] > 0.5 and stats.key_content_dependence[colour] > 0.5
    # Positional heads: no content dependence, no reaction to blurring, lift of 1.
    positional = torch.ones(3, 4, dtype=torch.bool)
    positional[texture] = positional[bright] = positional[colour] = False
    assert stats.content_dependence[positional].max() < POSITIONAL_CONTENT_MAX
    assert stats.key_content_dependence[positional].max() < POSITIONAL_CONTENT_MAX
    assert stats.lowpass_change[positional].max() < POSITIONAL_CONTENT_MAX
    assert stats.content_dependence[texture] > 0.3
    # Local or flat heads put on textured patches what their area share predicts (1.0).
    for at in (local, flat, (1, 2)):
        assert abs(stats.texture_lift[at] - 1.0) < 0.1
    # Uniform, local and axis heads spread their key profile: sink mass about k / N.
    for at in (local, horizontal, vertical, flat):
        assert stats.sink_mass[at] < 3 * sink_keys(Grid(8, 8)) / 64


def test_without_texture_probes_no_head_is_texture() -> None:
    _model, stats = _planted_stats(label_model_heads(), (8, 8), with_texture=False)
    assert stats.texture_lift.isnan().all() and stats.lowpass_change.isnan().all()
    assert "texture" not in {lab for row in label_heads(stats) for lab in row}


def test_distance_grows_with_depth_as_planted() -> None:
    model = planted_vit(depth_model_heads(), grid=(8, 8), patch_size=PATCH)
    natural, _t, _f = _probes((8, 8))
    result = head_section(model, normalize_for_model(natural, model), batch_size=4)
    layers = result.data["layers"]
    distances = [[h["mean_distance_patches"] for h in layer["heads"]] for layer in layers]
    for shallow, deep in zip(distances, distances[1:], strict=False):
        assert max(shallow) < min(deep)
    assert [layer["mean_distance_patches"] for layer in layers] == sorted(
        layer["mean_distance_patches"] for layer in layers
    )
    assert math.isinf(DEPTH_SIGMAS[-1])
    assert [h["label"] for h in layers[-1]["heads"]] == ["global", "global"]
    assert [h["label"] for h in layers[0]["heads"]] == ["local", "local"]
    assert result.figures["head_distance_vs_depth"].startswith(b"\x89PNG")


def test_streaming_gives_the_same_statistics_for_batch_1_and_4() -> None:
    torch.manual_seed(0)
    model = VisionTransformer(
        img_size=(24, 40), patch_size=PATCH, embed_dim=32, depth=2, num_heads=4, num_classes=4
    ).eval()
    with torch.no_grad():
        for block in model.blocks:  # peaky, image-dependent maps
            block.attn.qkv.weight.normal_(0.0, 0.5)
    natural, _t, _f = _probes((3, 5))
    texture = texture_v1((24, 40), Grid(3, 5, PATCH), count=5, seed=1)
    x = normalize_for_model(natural, model)
    tx = normalize_for_model(texture.images, model)
    one = head_statistics(
        model,
        list(x),
        batch_size=1,
        texture_images=list(tx),
        texture_masks=texture.texture_fraction,
    )
    four = head_statistics(
        model, x, batch_size=4, texture_images=tx, texture_masks=texture.texture_fraction
    )
    assert one.num_images == four.num_images == 4
    for name in STREAMED_STATISTICS:
        assert not getattr(one, name).isnan().any(), name
    assert_same_statistics(one, four)
    assert one.content_dependence.min() > 0.01  # real content dependence: the check has teeth


@pytest.mark.parametrize("grid", [(4, 4), (6, 10), (7, 7)], ids=lambda g: f"{g[0]}x{g[1]}")
@pytest.mark.parametrize("num_prefix", [0, 1, 5])
def test_uniform_attention_gives_the_baselines(grid: tuple[int, int], num_prefix: int) -> None:
    g = Grid(*grid, PATCH)
    t = num_prefix + g.num_patches
    probs = torch.full((2, 3, 1, t, t), 1.0 / t, dtype=torch.float64)  # (layers, B, heads, T, T)
    stats = statistics_from_attention([probs], grid=g, num_prefix_tokens=num_prefix)
    ones = torch.ones(2, 1, dtype=torch.float64)
    torch.testing.assert_close(stats.distance_ratio, ones, atol=EXACT_ATOL, rtol=0)
    torch.testing.assert_close(stats.entropy, ones, atol=EXACT_ATOL, rtol=0)
    torch.testing.assert_close(stats.local_score, 0 * ones, atol=EXACT_ATOL, rtol=0)
    torch.testing.assert_close(stats.horizontal, 0 * ones, atol=EXACT_ATOL, rtol=0)
    torch.testing.assert_close(stats.self_mass, ones / g.num_patches, atol=EXACT_ATOL, rtol=0)
    torch.testing.assert_close(stats.prefix_mass, ones * num_prefix / t, atol=EXACT_ATOL, rtol=0)
    torch.testing.assert_close(stats.content_dependence, 0 * ones, atol=EXACT_ATOL, rtol=0)
    torch.testing.assert_close(stats.key_content_dependence, 0 * ones, atol=EXACT_ATOL, rtol=0)
    torch.testing.assert_close(stats.support_share, ones, atol=EXACT_ATOL, rtol=0)
    k_share = sink_keys(g) / g.num_patches
    torch.testing.assert_close(stats.sink_mass, ones * k_share, atol=EXACT_ATOL, rtol=0)
    assert label_heads(stats) == [["global"], ["global"]]


def test_self_attention_is_fully_local_with_zero_distance() -> None:
    g = Grid(5, 6, PATCH)
    probs = torch.eye(1 + g.num_patches, dtype=torch.float64).expand(1, 2, 1, -1, -1)
    stats = statistics_from_attention([probs], grid=g, num_prefix_tokens=1)
    assert stats.mean_distance_patches.abs().max() < EXACT_ATOL
    assert stats.entropy.abs().max() < EXACT_ATOL
    assert (stats.self_mass - 1).abs().max() < EXACT_ATOL
    assert (stats.local_score - 1).abs().max() < EXACT_ATOL
    assert stats.horizontal.abs().max() < EXACT_ATOL  # no spread either way: isotropic
    assert label_heads(stats) == [["local"]]


def _random_probs(seed: int, grid: Grid, num_prefix: int, heads: int = 3, images: int = 2):
    g = torch.Generator().manual_seed(seed)
    t = num_prefix + grid.num_patches
    scale = torch.rand(1, 1, heads, 1, 1, generator=g, dtype=torch.float64) * 8
    logits = torch.randn(1, images, heads, t, t, generator=g, dtype=torch.float64) * scale
    return logits.softmax(-1)


@settings(max_examples=25, deadline=None)
@given(
    h=st.integers(2, 6),
    w=st.integers(2, 6),
    num_prefix=st.integers(0, 2),
    seed=st.integers(0, 2**16),
)
def test_scores_stay_in_their_documented_ranges(h: int, w: int, num_prefix: int, seed: int) -> None:
    grid = Grid(h, w, PATCH)
    stats = statistics_from_attention(
        [_random_probs(seed, grid, num_prefix)], grid=grid, num_prefix_tokens=num_prefix
    )
    eps = 1e-12
    for name in (
        "entropy",
        "local_mass",
        "self_mass",
        "prefix_mass",
        "content_dependence",
        "key_content_dependence",
        "support_share",
    ):
        value = getattr(stats, name)
        assert value.min() >= -eps and value.max() <= 1 + eps, name
    assert stats.sink_mass.min() >= sink_keys(grid) / grid.num_patches - eps
    assert stats.sink_mass.max() <= 1 + eps
    assert stats.horizontal.abs().max() <= 1 + eps
    assert (stats.local_mass + stats.self_mass).max() <= 1 + eps
    max_distance = grid.distances.max()
    assert stats.mean_distance_patches.min() >= 0
    assert stats.mean_distance_patches.max() <= max_distance + eps
    local_score = stats.local_score
    if h <= 2 and w <= 2:  # every patch is a neighbour: no local score (documented NaN)
        assert local_score.isnan().all()
    else:
        assert local_score.max() <= 1 + eps
    rows_sum = stats.mean_maps.sum(-1)
    torch.testing.assert_close(rows_sum, torch.ones_like(rows_sum), atol=EXACT_ATOL, rtol=0)


@settings(max_examples=15, deadline=None)
@given(h=st.integers(2, 6), w=st.integers(2, 6), seed=st.integers(0, 2**16))
def test_transposing_the_grid_swaps_horizontal_and_vertical(h: int, w: int, seed: int) -> None:
    grid = Grid(h, w, PATCH)
    probs = _random_probs(seed, grid, 1)
    # Patch (r, c) is r * w + c on the grid and c * h + r on the transposed grid.
    rr, cc = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    order = torch.empty(h * w, dtype=torch.long)
    order[(cc * h + rr).reshape(-1)] = torch.arange(h * w)
    index = torch.cat([torch.zeros(1, dtype=torch.long), 1 + order])
    transposed = probs[..., index, :][..., index]
    a = statistics_from_attention([probs], grid=grid, num_prefix_tokens=1)
    b = statistics_from_attention([transposed], grid=grid.transposed(), num_prefix_tokens=1)
    torch.testing.assert_close(b.horizontal, -a.horizontal, atol=EXACT_ATOL, rtol=0)
    for name in ("mean_distance_patches", "entropy", "local_mass", "self_mass", "prefix_mass"):
        torch.testing.assert_close(getattr(b, name), getattr(a, name), atol=EXACT_ATOL, rtol=0)


def test_head_diversity_is_zero_for_equal_heads_and_one_for_disjoint_heads() -> None:
    same = torch.rand(1, 1, 9, 9, generator=torch.Generator().manual_seed(0)).expand(2, 3, 9, 9)
    assert head_diversity(same).abs().max() < 1e-7
    disjoint = torch.zeros(1, 3, 9, 9)
    for head in range(3):
        disjoint[0, head, :, head] = 1.0  # every query attends to key `head`
    assert abs(float(head_diversity(disjoint)[0]) - 1.0) < 1e-12
    assert head_diversity(torch.ones(2, 1, 4, 4)).isnan().all()


def test_lowpass_keeps_flat_images_and_removes_fine_texture() -> None:
    flat = torch.full((1, 3, 16, 16), 0.7)
    assert torch.allclose(lowpass(flat, sigma_px=2.0), flat, atol=1e-6)
    checker = ((torch.arange(16)[:, None] + torch.arange(16)[None, :]) % 2).float()
    image = checker.expand(1, 3, 16, 16).clone()
    copy = image.clone()
    blurred = lowpass(image, sigma_px=2.0)
    assert torch.equal(image, copy)
    assert blurred.std() < 0.05 * image.std()
    with pytest.raises(ValueError, match="sigma_px"):
        lowpass(image, sigma_px=0.0)


def test_head_section_keeps_the_report_contract() -> None:
    heads = label_model_heads()
    model = planted_vit(heads, grid=(8, 8), patch_size=PATCH)
    natural, texture, fraction = _probes((8, 8))
    result = head_section(
        model,
        normalize_for_model(natural, model),
        texture_images=normalize_for_model(texture, model),
        texture_masks=fraction,
        batch_size=3,
        probe_set="natural-v1",
        texture_probe_set="texture-v1",
    )
    data = json.loads(json.dumps(result.data, allow_nan=False))
    assert data["available"] is True
    assert data["probe_set"] == "natural-v1" and data["texture_probe_set"] == "texture-v1"
    assert data["grid"] == [8, 8] and data["num_images"] == 4 and data["num_texture_images"] == 6
    assert data["thresholds"] == THRESHOLDS and data["label_rules"] == LABEL_RULES
    assert data["uniform_mean_distance_patches"] == pytest.approx(Grid(8, 8).uniform_mean_distance)
    assert set(data["counts"]) == set(LABELS) == set(data["counts_ci95"])
    assert data["counts"] == {
        "local": 2,
        "horizontal": 1,
        "vertical": 1,
        "global": 2,
        "texture": 1,
        "content": 2,
        "sink": 2,
        "prefix": 1,
        "mixed": 0,
    }
    for label, (lo, hi) in data["counts_ci95"].items():
        assert lo <= data["counts"][label] <= hi
    assert data["bootstrap"]["resamples"] >= 200 and data["bootstrap"]["level"] == 0.95
    required = {
        "head",
        "label",
        "mean_distance_px",
        "mean_distance_patches",
        "entropy",
        "local_mass",
        "self_mass",
        "horizontal",
        "vertical",
        "prefix_mass",
        "content_dependence",
        "texture_lift",
        "texture_lift_flat",
        "sink_mass",
        "key_content_dependence",
        "support_share",
        "label_rule",
        "label_scores",
        "label_stability",
        "mean_distance_patches_ci95",
    }
    for layer_index, layer in enumerate(data["layers"]):
        assert layer["layer"] == layer_index
        assert {"distance_spread_patches", "head_diversity"} <= set(layer)
        lo, hi = layer["mean_distance_patches_ci95"]
        assert lo <= layer["mean_distance_patches"] <= hi and 0 <= layer["label_stability"] <= 1
        for head_index, head in enumerate(layer["heads"]):
            assert required <= set(head) and head["head"] == head_index
            assert head["label"] == expected_label(heads[layer_index][head_index])
            assert head["mean_distance_px"] == pytest.approx(head["mean_distance_patches"] * PATCH)
            lo, hi = head["mean_distance_patches_ci95"]
            assert lo <= head["mean_distance_patches"] <= hi
            assert 0 <= head["label_stability"] <= 1
            assert set(head["label_scores"]) >= {"sink_mass", "texture_lift_flat", "support_share"}
    maps = result.arrays["attention_mean_maps"]
    assert maps.dtype == np.float16 and maps.shape == (3, 4, 64, 64)  # every query on 8x8
    np.testing.assert_array_equal(result.arrays["attention_mean_map_queries"], np.arange(64))
    assert result.data["mean_map_queries"] == 64
    assert set(result.figures) == {"head_distance_vs_depth", "head_label_map"}
    assert all(png.startswith(b"\x89PNG") for png in result.figures.values())


def test_the_gradient_pass_feeds_the_same_head_statistics_as_their_own_pass() -> None:
    """The audit runs one forward for heads and gradients: the heads reduce the attention
    of the gradient pass (timm's explicit path, with grad enabled) instead of capturing
    their own. Planted roles keep their labels and every number matches the own pass."""
    heads = label_model_heads()
    model = planted_vit(heads, grid=(8, 8), patch_size=PATCH)
    natural, texture, fraction = _probes((8, 8))
    x = normalize_for_model(natural, model)
    texture_kwargs = {
        "texture_images": normalize_for_model(texture, model),
        "texture_masks": fraction,
    }
    own = head_statistics(model, x, batch_size=3, **texture_kwargs)

    accumulator = AttentionAccumulator.for_model(model)
    gradient_section(model, [(x[:3], None), (x[3:], None)], on_attention=accumulator.natural)
    assert accumulator.num_images == len(x)
    shared = head_statistics(model, None, batch_size=3, accumulated=accumulator, **texture_kwargs)

    assert label_heads(shared) == [[expected_label(h) for h in row] for row in heads]
    assert_same_statistics(shared, own)
    with pytest.raises(ValueError, match="exactly one of images and an accumulated pass"):
        head_statistics(model, x, accumulated=accumulator)
    with pytest.raises(ValueError, match="exactly one of images and an accumulated pass"):
        head_statistics(model, None)


def test_head_section_is_unavailable_for_models_it_cannot_capture() -> None:
    result = head_section(nn.Linear(3, 3), torch.zeros(1, 3, 8, 8))
    assert result.data["available"] is False and "blocks" in result.data["reason"]


def test_bad_texture_masks_are_rejected() -> None:
    model = planted_vit([[PlantedHead.flat()]], grid=(4, 4), patch_size=PATCH)
    natural, texture, fraction = _probes((4, 4))
    with pytest.raises(ValueError, match=r"texture_masks must be \(M, 16\)"):
        head_statistics(model, natural, texture_images=texture, texture_masks=fraction[:, :5])
    with pytest.raises(ValueError, match="need texture_masks"):
        head_statistics(model, natural, texture_images=texture)
    with pytest.raises(ValueError, match="more texture images"):
        head_statistics(model, natural, texture_images=texture, texture_masks=fraction[:2])


# --- label rules at their thresholds ---------------------------------------------------------


def _scores(**changes: float) -> dict[str, torch.Tensor]:
    """Rule scores (one head) that match no rule, with ``changes`` applied."""
    base = {
        "prefix_mass": 0.0,
        "texture_lift": math.nan,
        "texture_lift_flat": math.nan,
        "sink_mass": 0.02,
        "distance_ratio": 0.5,
        "horizontal": 0.0,
        "vertical": 0.0,
        "key_content_dependence": 0.0,
        "support_share": 0.5,
    } | changes
    return {k: torch.tensor([v], dtype=torch.float64) for k, v in base.items()}


def _label(**changes: float) -> str:
    return list(LABEL_RULES)[int(label_index(_scores(**changes))[0])]


BELOW = 1e-9  # one step to the failing side of a threshold (exact float thresholds)


@pytest.mark.parametrize(
    ("label", "at", "beyond"),
    [
        ("prefix", {"prefix_mass": 0.5}, {"prefix_mass": 0.5 - BELOW}),
        ("sink", {"sink_mass": 0.5}, {"sink_mass": 0.5 - BELOW}),
        # excess lift 0.5, half of it kept under flattening: still texture; a hair more: not
        (
            "texture",
            {"texture_lift": 1.5, "texture_lift_flat": 1.25},
            {"texture_lift": 1.5, "texture_lift_flat": 1.25 + BELOW},
        ),
        (
            "texture",
            {"texture_lift": 1.5, "texture_lift_flat": 1.0},
            {"texture_lift": 1.5 - BELOW, "texture_lift_flat": 1.0},
        ),
        ("local", {"distance_ratio": 0.3}, {"distance_ratio": 0.3 + BELOW}),
        (
            "horizontal",
            {"horizontal": 0.5, "vertical": -0.5},
            {"horizontal": 0.5 - BELOW, "vertical": -0.5 + BELOW},
        ),
        (
            "vertical",
            {"horizontal": -0.5, "vertical": 0.5},
            {"horizontal": -0.5 + BELOW, "vertical": 0.5 - BELOW},
        ),
        ("content", {"key_content_dependence": 0.2}, {"key_content_dependence": 0.2 - BELOW}),
        (
            "global",
            {"distance_ratio": 0.75, "support_share": 0.25},
            {"distance_ratio": 0.75 - BELOW, "support_share": 0.25},
        ),
        (
            "global",
            {"distance_ratio": 0.75, "support_share": 0.25},
            {"distance_ratio": 0.75, "support_share": 0.25 - BELOW},
        ),
    ],
)
def test_each_rule_holds_at_its_threshold_and_fails_just_beyond(label, at, beyond) -> None:
    assert _label() == "mixed"
    assert _label(**at) == label
    assert _label(**beyond) == "mixed"


def test_a_far_narrow_head_is_not_global_and_a_texture_lift_kept_flat_is_not_texture() -> None:
    # The two real-model failures: a head parked far away (distance at the uniform value,
    # one patch of support) and a lift that flattening does not remove.
    assert _label(distance_ratio=1.4, support_share=0.005) == "mixed"
    assert _label(distance_ratio=1.0, support_share=0.59) == "global"  # entropy 0.9 on 14x14
    assert _label(texture_lift=2.0, texture_lift_flat=2.0, key_content_dependence=0.6) == "content"


# --- bootstrap ---------------------------------------------------------------------------------


def test_resample_weights_are_seeded_draws_that_sum_to_one() -> None:
    w = resample_weights(5, 300, seed=7)
    assert w.shape == (300, 5) and torch.equal(w, resample_weights(5, 300, seed=7))
    assert not torch.equal(w, resample_weights(5, 300, seed=8))
    torch.testing.assert_close(w.sum(-1), torch.ones(300, dtype=torch.float64))
    assert torch.equal(w * 5, (w * 5).round())  # counts of draws
    torch.testing.assert_close(
        w.mean(0), torch.full((5,), 0.2, dtype=torch.float64), atol=0.02, rtol=0
    )
    lo, hi = percentile_interval(torch.arange(1001, dtype=torch.float64)[:, None])
    assert float(lo) == pytest.approx(25.0) and float(hi) == pytest.approx(975.0)
    with pytest.raises(ValueError, match="level"):
        percentile_interval(w, level=1.0)


def _two_kinds_of_images(grid: Grid) -> torch.Tensor:
    """(1 layer, 2 images, 1 head, 1 + N, 1 + N): image 0 self-attention (local), image 1
    uniform (global). The mean (distance ratio 0.5) is mixed."""
    t = 1 + grid.num_patches
    probs = torch.zeros(1, 2, 1, t, t, dtype=torch.float64)
    probs[0, 0, 0] = torch.eye(t, dtype=torch.float64)
    probs[0, 1, 0] = 1.0 / t
    return probs


def test_label_stability_is_the_share_of_resamples_that_keep_the_label() -> None:
    grid = Grid(6, 6, PATCH)
    stats = statistics_from_attention([_two_kinds_of_images(grid)], grid=grid, num_prefix_tokens=1)
    assert label_heads(stats) == [["mixed"]]
    boot = bootstrap_heads(stats, resamples=TEST_RESAMPLES, seed=0)
    labels = [list(LABEL_RULES)[i] for i in boot.labels[:, 0, 0].tolist()]
    # two images: both self (1/4: local), both uniform (1/4: global), one each (1/2: mixed)
    assert set(labels) == {"local", "global", "mixed"}
    assert labels.count("mixed") / TEST_RESAMPLES == pytest.approx(0.5, abs=STABILITY_ATOL)
    result = section_from_statistics(stats, resamples=TEST_RESAMPLES, seed=0)
    head = result.data["layers"][0]["heads"][0]
    assert head["label_stability"] == pytest.approx(0.5, abs=STABILITY_ATOL)
    lo, hi = head["mean_distance_patches_ci95"]
    assert lo == pytest.approx(0.0) and hi == pytest.approx(grid.uniform_mean_distance)
    assert result.data["layers"][0]["label_stability"] == pytest.approx(0.5, abs=STABILITY_ATOL)


def test_the_vectorised_bootstrap_equals_recomputing_on_the_drawn_images() -> None:
    """A resample weighted by draw counts gives the statistics of the drawn images."""
    torch.manual_seed(0)
    grid = Grid(3, 4, PATCH)
    probs = _random_probs(3, grid, 1, heads=2, images=5)
    stats = statistics_from_attention([probs], grid=grid, num_prefix_tokens=1)
    weights = resample_weights(5, 3, seed=11)
    boot = bootstrap_heads(stats, resamples=3, seed=11)
    for r in range(3):
        drawn = torch.repeat_interleave(torch.arange(5), (weights[r] * 5).round().long())
        again = statistics_from_attention([probs[:, drawn]], grid=grid, num_prefix_tokens=1)
        torch.testing.assert_close(
            boot.mean_distance_patches[r], again.mean_distance_patches, atol=EXACT_ATOL, rtol=0
        )
        expected = label_index(again.rule_scores())
        assert torch.equal(boot.labels[r], expected)


def test_positional_heads_have_collapsed_intervals_and_full_stability() -> None:
    heads = [[PlantedHead.local(), PlantedHead.flat()]]
    model = planted_vit(heads, grid=(6, 6), patch_size=PATCH)
    natural, _t, _f = _probes((6, 6))
    data = head_section(model, normalize_for_model(natural, model)).data
    for head in data["layers"][0]["heads"]:
        lo, hi = head["mean_distance_patches_ci95"]
        assert hi - lo < 1e-6 and head["label_stability"] == 1.0


def test_a_policy_can_gate_on_stability_and_interval_bounds() -> None:
    heads = label_model_heads()
    model = planted_vit(heads, grid=(8, 8), patch_size=PATCH)
    natural, _t, _f = _probes((8, 8))
    report = {"heads": head_section(model, normalize_for_model(natural, model)).data}
    head = report["heads"]["layers"][0]["heads"][3]
    assert lookup(report, "heads.layers.0.heads.3.label_stability") == head["label_stability"]
    assert (
        lookup(report, "heads.layers.0.heads.3.mean_distance_patches_ci95.0")
        == (head["mean_distance_patches_ci95"][0])
    )
    assert (
        lookup(report, "heads.layers.1.mean_distance_patches_ci95.1")
        == (report["heads"]["layers"][1]["mean_distance_patches_ci95"][1])
    )
    assert lookup(report, "heads.counts_ci95.global.0") <= report["heads"]["counts"]["global"]


def test_flatten_patches_keeps_each_patch_mean_and_removes_the_rest() -> None:
    images = torch.rand(2, 3, 16, 24, generator=torch.Generator().manual_seed(0))
    copy = images.clone()
    flat = flatten_patches(images, patch_size=8)
    assert torch.equal(images, copy)
    patches = flat.reshape(2, 3, 2, 8, 3, 8)
    assert patches.std(dim=(3, 5)).max() == 0  # constant inside every patch
    torch.testing.assert_close(
        patches.mean(dim=(3, 5)), images.reshape(2, 3, 2, 8, 3, 8).mean(dim=(3, 5))
    )
    # 5 px patches cover 15x20 of 16x24: those patches are flattened, the edge is kept
    edge = flatten_patches(images, patch_size=5)
    assert edge[..., :15, :20].reshape(2, 3, 3, 5, 4, 5).std(dim=(3, 5)).max() < 1e-6
    assert torch.equal(edge[..., 15:, :], images[..., 15:, :])
    assert torch.equal(edge[..., :, 20:], images[..., :, 20:])
    with pytest.raises(ValueError, match="patch_size must be positive"):
        flatten_patches(images, patch_size=0)


def test_head_figures_draw_intervals_and_hatch_unstable_labels() -> None:
    from workers.analysis import plots_heads

    labels = [["local", "sink"], ["content", "global"]]
    distances = np.array([[1.0, 2.0], [3.0, 4.0]])
    png = plots_heads.distance_vs_depth(
        distances, labels, uniform_distance=3.0, intervals=(distances - 0.5, distances + 0.5)
    )
    assert png.startswith(b"\x89PNG")
    stable = plots_heads.label_map(labels, stability=np.ones((2, 2)))
    shaky = plots_heads.label_map(labels, stability=np.array([[1.0, 0.5], [1.0, 1.0]]))
    assert stable.startswith(b"\x89PNG") and shaky != stable
    with pytest.raises(ValueError, match="intervals"):
        plots_heads.distance_vs_depth(
            distances, labels, uniform_distance=3.0, intervals=(distances[0], distances[0])
        )
