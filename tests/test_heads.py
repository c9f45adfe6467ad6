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

from tests.planted.heads_models import (  # noqa: E402
    DEPTH_SIGMAS,
    PlantedHead,
    depth_model_heads,
    expected_label,
    label_model_heads,
    planted_vit,
)
from workers.analysis.gradients import gradient_section  # noqa: E402
from workers.analysis.grid import Grid  # noqa: E402
from workers.analysis.heads import (  # noqa: E402
    LABELS,
    THRESHOLDS,
    AttentionAccumulator,
    head_diversity,
    head_section,
    head_statistics,
    label_heads,
    lowpass,
    statistics_from_attention,
)
from workers.analysis.probes import natural_v1, normalize_for_model, texture_v1  # noqa: E402

torch.set_num_threads(1)

PATCH = 8
GRIDS = [(8, 8), (4, 4), (6, 10)]
# Batch size changes float32 kernel blocking in the forward; per-head means then differ
# by rounding only (measured ~1e-8 on these models).
STREAM_ATOL = 1e-6
# Planted positional heads ignore content entirely: their maps agree across images up to
# float32 rounding of the logits.
POSITIONAL_CONTENT_MAX = 1e-9
# Exact identities (uniform or one-hot attention) computed in float64.
EXACT_ATOL = 1e-9
# Every per-head statistic that two passes over the same images must agree on.
STREAMED_STATISTICS = (
    "mean_distance_patches",
    "entropy",
    "local_mass",
    "self_mass",
    "horizontal",
    "prefix_mass",
    "content_dependence",
    "texture_lift",
    "lowpass_change",
    "mean_maps",
)


def assert_same_statistics(a, b) -> None:
    """Two HeadStatistics of the same images agree on every streamed statistic."""
    for name in STREAMED_STATISTICS:
        torch.testing.assert_close(
            getattr(a, name), getattr(b, name), atol=STREAM_ATOL, rtol=0, msg=name
        )


@cache
def _probes(grid: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Natural images, texture images (both [0, 1]) and texture fractions for a grid."""
    size = (grid[0] * PATCH, grid[1] * PATCH)
    texture = texture_v1(size, Grid(*grid, PATCH), count=6, seed=3)
    return natural_v1(size, count=4).images, texture.images, texture.texture_fraction


def _planted_stats(heads, grid, *, batch_size: int = 4, with_texture: bool = True):
    model = planted_vit(heads, grid=grid, patch_size=PATCH)
    natural, texture, fraction = _probes(grid)
    kwargs = {}
    if with_texture:
        kwargs = {"texture_images": normalize_for_model(texture, model), "texture_masks": fraction}
    stats = head_statistics(
        model, normalize_for_model(natural, model), batch_size=batch_size, **kwargs
    )
    return model, stats


@pytest.mark.parametrize("grid", GRIDS, ids=lambda g: f"{g[0]}x{g[1]}")
def test_every_planted_head_gets_its_label(grid: tuple[int, int]) -> None:
    heads = label_model_heads()
    _model, stats = _planted_stats(heads, grid)
    expected = [[expected_label(h) for h in row] for row in heads]
    assert label_heads(stats) == expected
    assert {lab for row in expected for lab in row} == set(LABELS) - {"mixed"}


def test_planted_scores_point_the_right_way() -> None:
    heads = label_model_heads()
    _model, stats = _planted_stats(heads, (8, 8))
    local, horizontal, vertical, flat = ((0, h) for h in range(4))
    texture, prefix = (1, 0), (1, 1)
    assert stats.local_score[local] > 0.95 and stats.self_mass[local] > 0.6
    assert stats.horizontal[horizontal] > 0.95 and stats.vertical[vertical] > 0.95
    assert abs(stats.distance_ratio[flat] - 1.0) < EXACT_ATOL
    assert abs(stats.entropy[flat] - 1.0) < EXACT_ATOL
    assert stats.prefix_mass[prefix] > 0.99
    assert stats.texture_lift[texture] > 2.0 and stats.lowpass_change[texture] > 0.5
    # Positional heads: no content dependence, no reaction to blurring, lift of 1.
    positional = torch.ones(2, 4, dtype=torch.bool)
    positional[texture] = False
    assert stats.content_dependence[positional].max() < POSITIONAL_CONTENT_MAX
    assert stats.lowpass_change[positional].max() < POSITIONAL_CONTENT_MAX
    assert stats.content_dependence[texture] > 0.3
    # Local or flat heads put on textured patches what their area share predicts (1.0).
    for at in (local, flat, (1, 2)):
        assert abs(stats.texture_lift[at] - 1.0) < 0.1


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
    for name in ("entropy", "local_mass", "self_mass", "prefix_mass", "content_dependence"):
        value = getattr(stats, name)
        assert value.min() >= -eps and value.max() <= 1 + eps, name
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
    model = planted_vit(heads, grid=(4, 4), patch_size=PATCH)
    natural, texture, fraction = _probes((4, 4))
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
    assert data["grid"] == [4, 4] and data["num_images"] == 4 and data["num_texture_images"] == 6
    assert data["thresholds"] == THRESHOLDS
    assert data["uniform_mean_distance_patches"] == pytest.approx(Grid(4, 4).uniform_mean_distance)
    assert set(data["counts"]) == set(LABELS)
    assert data["counts"] == {
        "local": 2,
        "horizontal": 1,
        "vertical": 1,
        "global": 2,
        "texture": 1,
        "prefix": 1,
        "mixed": 0,
    }
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
        "label_rule",
        "label_scores",
    }
    for layer_index, layer in enumerate(data["layers"]):
        assert layer["layer"] == layer_index
        assert {"distance_spread_patches", "head_diversity"} <= set(layer)
        for head_index, head in enumerate(layer["heads"]):
            assert required <= set(head) and head["head"] == head_index
            assert head["label"] == expected_label(heads[layer_index][head_index])
            assert head["mean_distance_px"] == pytest.approx(head["mean_distance_patches"] * PATCH)
    maps = result.arrays["attention_mean_maps"]
    assert maps.dtype == np.float32 and maps.shape == (2, 4, 16, 16)
    assert set(result.figures) == {"head_distance_vs_depth", "head_label_map"}
    assert all(png.startswith(b"\x89PNG") for png in result.figures.values())


def test_the_gradient_pass_feeds_the_same_head_statistics_as_their_own_pass() -> None:
    """The audit runs one forward for heads and gradients: the heads reduce the attention
    of the gradient pass (timm's explicit path, with grad enabled) instead of capturing
    their own. Planted roles keep their labels and every number matches the own pass."""
    heads = label_model_heads()
    model = planted_vit(heads, grid=(4, 4), patch_size=PATCH)
    natural, texture, fraction = _probes((4, 4))
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
