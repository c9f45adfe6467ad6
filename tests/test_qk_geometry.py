"""Q/K geometry (`workers.analysis.qk_geometry`), checked on queries and keys set by hand."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import math  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from timm.models.vision_transformer import VisionTransformer  # noqa: E402

from tests.planted.heads_models import (  # noqa: E402
    PlantedHead,
    expected_label,
    label_model_heads,
    planted_vit,
)
from tests.planted.qk_models import (  # noqa: E402
    aligned_vit,
    colour_vit,
    noise_images,
    random_vit,
    smooth_images,
)
from workers.analysis.gradients import gradient_section  # noqa: E402
from workers.analysis.grid import Grid  # noqa: E402
from workers.analysis.qk_geometry import (  # noqa: E402
    AlignmentAccumulator,
    DistanceBins,
    QKObserver,
    alignment_statistics,
    kernel_peaks,
    offset_kernel,
    qk_geometry_section,
    spearman_with_distance,
    stream_qk,
)

torch.set_num_threads(1)

PATCH = 8
# float32 fitting of exact planted kernels: backfitting leaves ~1e-7 of the logit scale.
FIT_ATOL = 1e-4
# The gradient pass and the section's own pass compute the same Q and K (explicit vs fused
# attention does not change them); batches differ, so sums differ by float32 rounding.
SHARED_ATOL = 1e-5
# Per-image profiles of two passes with different batch sizes differ by float32 rounding.
STREAM_ATOL = 1e-6
# The planted 2-D sin-cos code gives a near-minus-far cosine gap of ~0.75 on 8x8.
PLANTED_GAP_MIN = 0.3
POSITIONAL_GAP_ATOL = 1e-6  # identical tokens: every positional cosine is the same


def _heads(section: dict) -> list[dict]:
    return [head for layer in section["layers"] for head in layer["heads"]]


# --------------------------------------------------------------------- positional kernel


@pytest.mark.parametrize("grid", [(8, 8), (14, 14), (6, 10)])
def test_planted_kernels_recover_their_labels_on_every_grid(grid: tuple[int, int]) -> None:
    heads = [
        [PlantedHead.local(), PlantedHead.horizontal(), PlantedHead.vertical(), PlantedHead.flat()]
    ]
    model = planted_vit(heads, grid=grid, patch_size=PATCH)
    images = noise_images(2, grid, patch_size=PATCH)
    section = qk_geometry_section(model, images, batch_size=2, resamples=20).data
    got = [h["positional_kernel_label"] for h in _heads(section)]
    assert got == [expected_label(h) for h in heads[0]]
    for head in _heads(section)[:3]:
        assert head["kernel_peak_offset"] == [0, 0]
        assert head["kernel_r2"] == pytest.approx(1.0, abs=1e-6)  # a relative-position head
    local, horizontal, vertical = _heads(section)[:3]
    assert horizontal["spread_along_rows_patches"] > 3 * horizontal["spread_along_cols_patches"]
    assert vertical["spread_along_cols_patches"] > 3 * vertical["spread_along_rows_patches"]
    assert local["spread_along_rows_patches"] < 1.0


def test_deeper_layer_kernels_and_content_heads_are_not_positional() -> None:
    """Block 1 of the label model: an offset local head keeps its offset; the texture head
    (logits from content) and the prefix head have flat patch kernels: global, not local."""
    model = planted_vit(label_model_heads(), grid=(8, 8), patch_size=PATCH)
    section = qk_geometry_section(model, noise_images(2, (8, 8)), batch_size=2, resamples=20).data
    texture, prefix, offset, flat = section["layers"][1]["heads"]
    assert offset["positional_kernel_label"] == "local"
    assert offset["kernel_peak_offset"] == [1, 0]
    for head in (texture, prefix, flat):
        assert head["positional_kernel_label"] == "global"
    assert [h["positional_kernel_label"] for h in section["layers"][0]["heads"]] == [
        "local",
        "horizontal",
        "vertical",
        "global",
    ]


@pytest.mark.parametrize("grid", [(5, 5), (4, 7)])
def test_offset_kernel_recovers_a_planted_kernel_under_query_shifts(grid: tuple[int, int]) -> None:
    g = Grid(*grid)
    generator = torch.Generator().manual_seed(0)
    kernel = torch.randn(
        3, 2 * g.height - 1, 2 * g.width - 1, generator=generator, dtype=torch.float64
    )
    dr = (g.row_offsets + g.height - 1).long()
    dc = (g.col_offsets + g.width - 1).long()
    shifts = 5 * torch.randn(3, g.num_patches, 1, generator=generator, dtype=torch.float64)
    logits = kernel[:, dr, dc] + shifts
    fitted, r2 = offset_kernel(logits, g)
    # Only the pair-weighted mean of the kernel is free (it trades against the shifts).
    planted = kernel - kernel[:, dr, dc].mean((-2, -1))[:, None, None]
    assert torch.allclose(fitted, planted, atol=FIT_ATOL)
    assert torch.allclose(r2, torch.ones(3, dtype=torch.float64), atol=1e-6)


def test_kernel_r2_is_low_for_absolute_position_logits() -> None:
    """Logits that depend on which key it is (a fixed bias per key patch, whatever the query)
    are no kernel: the offset explains little of them."""
    g = Grid(8, 8)
    bias = torch.randn(g.num_patches, generator=torch.Generator().manual_seed(0))
    logits = bias[None, :].expand(g.num_patches, -1)[None].double()
    _, r2 = offset_kernel(logits, g)
    assert float(r2[0]) < 0.5


def test_kernel_peak_prefers_the_zero_offset_on_a_ridge() -> None:
    ridge = torch.zeros(1, 5, 7)
    ridge[0, 2, :] = 1.0  # a horizontal ridge through the centre
    assert kernel_peaks(ridge).tolist() == [[0, 0]]
    spot = torch.zeros(1, 5, 7)
    spot[0, 3, 1] = 1.0
    assert kernel_peaks(spot).tolist() == [[1, -2]]


def test_model_without_position_table_reports_alignment_only() -> None:
    model = VisionTransformer(
        img_size=32, patch_size=PATCH, embed_dim=16, depth=1, num_heads=2, pos_embed="none"
    ).eval()
    result = qk_geometry_section(model, noise_images(2, (4, 4)), batch_size=2, resamples=20)
    kernel = result.data["positional_kernel"]
    assert kernel["available"] is False and "pos_embed is None" in kernel["reason"]
    assert "qk_positional_kernels" not in result.figures
    head = _heads(result.data)[0]
    assert head["alignment_gap_ci95"][0] is not None
    assert "positional_kernel_label" not in head and head["alignment_positional_gap"] is None


# ----------------------------------------------------------------------------- alignment


def test_planted_spatial_queries_and_keys_align_with_their_neighbours() -> None:
    model = aligned_vit((8, 8), patch_size=PATCH)
    section = qk_geometry_section(model, smooth_images(6, (8, 8)), batch_size=3, resamples=50).data
    for head in _heads(section):
        assert head["alignment_gap"] > PLANTED_GAP_MIN
        assert head["alignment_gap_ci95"][0] > head["alignment_gap_shuffled_ci95"][1]
        assert head["alignment_spearman_ci95"][1] < -0.9
        assert head["alignment_above_shuffled"] is True
        assert head["alignment_source"] == "position"
        assert head["alignment_positional_gap"] > PLANTED_GAP_MIN
    assert section["aligned_heads"] == 2


@pytest.mark.parametrize("make", [aligned_vit, colour_vit], ids=["aligned", "colour"])
def test_the_gradient_pass_feeds_the_same_qk_geometry_as_its_own_pass(make) -> None:
    """The audit runs one forward for gradients and Q/K geometry: the section reduces the Q
    and K of the gradient pass (explicit attention, grad enabled) instead of its own pass.
    The SGD step's second forward adds nothing; every number and verdict matches."""
    model = make((8, 8), patch_size=PATCH)
    images = smooth_images(6, (8, 8))
    own = qk_geometry_section(model, images, batch_size=3, resamples=50)

    observer = QKObserver(model)
    with observer.watching(model):
        gradient_section(model, [(images[:4], None), (images[4:], None)], on_qk=observer)
    assert observer.num_images == len(images)
    shared = qk_geometry_section(model, None, observed=observer, resamples=50)

    assert shared.data["num_images"] == own.data["num_images"] == len(images)
    for mine, theirs in zip(_heads(shared.data), _heads(own.data), strict=True):
        for key, value in theirs.items():
            if isinstance(value, (float, dict)) or key.endswith("ci95"):
                assert mine[key] == pytest.approx(value, abs=SHARED_ATOL), key
            else:
                assert mine[key] == value, key
    with pytest.raises(ValueError, match="give the images"):
        qk_geometry_section(model, None)


def test_content_alignment_is_not_taken_for_position() -> None:
    """The planted false positive: a colour-matching head on smooth images aligns near
    patches (the image metric alone would call it spatial), but position alone gives no
    gap and a flat kernel, so its source is content."""
    model = colour_vit((8, 8), patch_size=PATCH)
    section = qk_geometry_section(model, smooth_images(8, (8, 8)), batch_size=4, resamples=100).data
    (head,) = _heads(section)
    assert head["alignment_above_shuffled"] is True
    assert abs(head["alignment_positional_gap"]) < POSITIONAL_GAP_ATOL
    assert head["alignment_source"] == "content"
    assert head["positional_kernel_label"] == "global"
    # The same head on images whose patches do not resemble their neighbours: no alignment.
    noise = qk_geometry_section(model, noise_images(8, (8, 8)), batch_size=4, resamples=100).data
    assert _heads(noise)[0]["alignment_above_shuffled"] is not True


def test_random_queries_and_keys_are_not_spatial() -> None:
    model = random_vit((8, 8), patch_size=PATCH)
    section = qk_geometry_section(model, noise_images(8, (8, 8)), batch_size=4, resamples=200).data
    for head in _heads(section):
        assert head["positional_kernel_label"] in ("global", "mixed")
        lo, hi = head["alignment_gap_ci95"]
        s_lo, s_hi = head["alignment_gap_shuffled_ci95"]
        assert lo <= s_hi and s_lo <= hi  # the intervals overlap the shuffled baseline
        assert head["alignment_above_shuffled"] is not True
        assert head["alignment_source"] != "position"


def test_alignment_streams_the_same_whatever_the_batch_size() -> None:
    model = random_vit((6, 6), patch_size=PATCH)
    images = noise_images(5, (6, 6), patch_size=PATCH)
    grid = Grid(6, 6, PATCH)
    profiles = []
    for batch_size in (2, 5):
        observer = stream_qk(model, images, QKObserver(model, seed=3), batch_size=batch_size)
        assert observer.num_images == 5
        profiles.append(observer.accumulator.per_image())
    for a, b in zip(profiles[0], profiles[1], strict=True):
        assert a.shape == (5, 2, 2, grid.num_distance_bins)
        assert torch.allclose(a, b, atol=STREAM_ATOL)


def test_accumulator_bin_means_match_a_pair_by_pair_count() -> None:
    """Per image and head, the real profile is the mean cosine of the pairs in each distance
    bin and the shuffled one the same with the patch positions permuted by that image's
    seeded ``randperm``; counted here pair by pair, without the accumulator's indexing."""
    grid = Grid(3, 4, PATCH)
    n, prefix = grid.num_patches, 1
    acc = AlignmentAccumulator(grid, prefix, num_layers=1, seed=5)
    torch.manual_seed(0)
    q, k = torch.randn(2, 3, n + prefix, 4), torch.randn(2, 3, n + prefix, 4)
    acc.start_batch(7, 2)  # images 7 and 8 of a stream
    acc(0, q, k)
    real, shuffled = acc.per_image()
    bins = grid.distance_bins
    for b in range(2):
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(5 * 1_000_003 + 7 + b))
        for h in range(3):
            qn = torch.nn.functional.normalize(q[b, h, prefix:], dim=-1)
            kn = torch.nn.functional.normalize(k[b, h, prefix:], dim=-1)
            for which, order, got in (
                ("real", torch.arange(n), real),
                ("shuffled", perm, shuffled),
            ):
                sums = torch.zeros(grid.num_distance_bins, dtype=torch.float64)
                counts = torch.zeros(grid.num_distance_bins, dtype=torch.float64)
                for i in range(n):
                    for j in range(n):
                        sums[bins[i, j]] += float(qn[order[i]] @ kn[order[j]])
                        counts[bins[i, j]] += 1
                assert torch.allclose(got[b, 0, h], sums / counts, atol=STREAM_ATOL), which


def test_shuffled_baseline_is_flat_in_expectation() -> None:
    """Shuffled positions keep every cosine but not its distance: on the planted code the
    shuffled near and far means are both the mean off-diagonal cosine, so the gap is ~0."""
    model = aligned_vit((8, 8), patch_size=PATCH)
    grid = Grid(8, 8, PATCH)
    observer = stream_qk(model, smooth_images(16, (8, 8)), QKObserver(model), batch_size=8)
    stats = alignment_statistics(*observer.accumulator.per_image(), grid, resamples=50)
    assert float(stats.values["gap"].min()) > PLANTED_GAP_MIN
    assert float(stats.values["gap_shuffled"].abs().max()) < 0.05


# --------------------------------------------------------------------------- primitives


def test_spearman_with_distance_on_planted_profiles() -> None:
    bins = DistanceBins.of(Grid(8, 8))
    falling = -torch.arange(len(bins.counts), dtype=torch.float64)
    assert float(spearman_with_distance(falling, bins)) == pytest.approx(-1.0)
    assert float(spearman_with_distance(-falling, bins)) == pytest.approx(1.0)
    assert math.isnan(float(spearman_with_distance(torch.ones_like(falling), bins)))
    from scipy.stats import spearmanr

    noisy = torch.randn(len(bins.counts), generator=torch.Generator().manual_seed(0))
    expected = spearmanr(bins.centres[1:].numpy(), noisy[1:].numpy()).statistic
    assert float(spearman_with_distance(noisy.double(), bins)) == pytest.approx(expected)


def test_section_has_arrays_figures_and_is_json_ready() -> None:
    import json

    model = planted_vit(label_model_heads(), grid=(4, 4), patch_size=PATCH)
    result = qk_geometry_section(model, noise_images(2, (4, 4)), batch_size=2, resamples=20)
    json.dumps(result.data, allow_nan=False)
    layers = len(model.blocks)
    assert result.arrays["qk_positional_kernels"].shape == (layers, 4, 7, 7)
    assert result.arrays["qk_alignment_profiles"].shape[:2] == (layers, 4)
    for name in ("qk_positional_kernels", "qk_alignment_profile"):
        assert result.figures[name].startswith(b"\x89PNG")
    assert sum(result.data["positional_kernel"]["counts"].values()) == 4 * layers


# ------------------------------------------------------------------------------ pipeline


def test_pipeline_runs_the_section_when_asked_and_marks_it_otherwise(tmp_path) -> None:
    from tests.planted.audits import staged_audit
    from tests.planted.models import TINY_ARCH, TINY_ARGS, tiny_vit
    from workers.pipeline import run_pipeline

    request, _ = staged_audit(tmp_path, tiny_vit(), TINY_ARCH, TINY_ARGS, analyses=["qk_geometry"])
    output = run_pipeline(request, tmp_path)
    section = output.report["qk_geometry"]
    assert section["available"] is True and section["num_images"] == 2
    assert len(section["layers"]) == 2 and len(section["layers"][0]["heads"]) == 2
    assert "qk_positional_kernels" in output.figures and "qk_geometry" in output.report["timings"]
    assert output.report["heads"] == {
        "available": False,
        "reason": "not requested in options.analyses",
    }


def test_report_page_shows_the_section_and_its_kernel_grid() -> None:
    from service.pages import render_report_page

    model = planted_vit(label_model_heads(), grid=(4, 4), patch_size=PATCH)
    result = qk_geometry_section(model, noise_images(2, (4, 4)), batch_size=2, resamples=20)
    report = {"model": {"arch": "planted"}, "qk_geometry": result.data}
    html = render_report_page("a" * 32, report, result.figures)
    assert "<h3>Q/K geometry</h3>" in html and 'id="plots-qk_geometry"' in html
    assert 'data-figure="qk_positional_kernels"' in html
    counts = result.data["positional_kernel"]["counts"]
    assert (
        f'data-metric="qk_geometry.positional_kernel.counts.local" data-value="{counts["local"]}"'
        in html
    )
    assert 'data-metric="qk_geometry.aligned_heads"' in html
    unavailable = render_report_page("a" * 32, {"model": {}}, {})
    assert "Not measured: not requested" in unavailable
