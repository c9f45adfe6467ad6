"""Head statistics in bounded memory: chunked reduction and mean maps of a query sub-grid
give the same labels and numbers as the all-at-once reduction of every query."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

import workers.analysis.heads as heads_module  # noqa: E402
from tests.planted.heads_models import expected_label, label_model_heads  # noqa: E402
from tests.test_heads import EXACT_ATOL, POSITIONAL_CONTENT_MAX, _planted_stats  # noqa: E402
from workers.analysis.grid import Grid  # noqa: E402
from workers.analysis.heads import head_diversity, label_heads, mean_map_queries  # noqa: E402

torch.set_num_threads(1)

# Per-image and per-head statistics do not read the mean maps: chunking and the query
# sub-grid change the summation order of their float32 reductions only.
CHUNKED_ATOL = 1e-6
PER_HEAD = (
    "mean_distance_patches",
    "entropy",
    "local_mass",
    "horizontal",
    "prefix_mass",
    "sink_mass",
    "key_content_dependence",
    "texture_lift",
    "texture_lift_flat",
    "lowpass_change",
)
# Head diversity from 9 of 64 query rows on the planted heads (measured within 0.002).
SUBGRID_DIVERSITY_ATOL = 0.02


def test_every_query_is_kept_when_the_grid_fits() -> None:
    torch.testing.assert_close(mean_map_queries(Grid(8, 8, 16), 64), torch.arange(64))


@pytest.mark.parametrize(("height", "width", "budget"), [(37, 37, 31), (8, 8, 9), (6, 10, 20)])
def test_a_large_grid_keeps_a_regular_subgrid_within_the_budget(height, width, budget) -> None:
    queries = mean_map_queries(Grid(height, width, 14), budget)
    rows, cols = queries // width, queries % width
    assert 1 <= len(queries) <= budget
    # a regular sub-grid: equal strides along both axes, spread over the whole image
    row_set, col_set = rows.unique(), cols.unique()
    assert len(queries) == len(row_set) * len(col_set)
    assert len(row_set.diff().unique()) <= 1 and len(col_set.diff().unique()) <= 1
    stride = int(row_set.diff()[0]) if len(row_set) > 1 else height
    assert int(row_set[-1]) >= height - stride and int(col_set[-1]) >= width - stride


def test_max_queries_below_one_is_refused() -> None:
    with pytest.raises(ValueError, match="max_queries must be at least 1"):
        mean_map_queries(Grid(4, 4, 16), 0)


def test_chunked_subgrid_statistics_keep_planted_labels_and_numbers(monkeypatch) -> None:
    heads = label_model_heads()
    _, full = _planted_stats(heads, (8, 8))
    # one (image, head) map per chunk, and mean maps for 9 of the 64 queries only
    monkeypatch.setattr(heads_module, "CHUNK_BYTES", 1)
    monkeypatch.setattr(heads_module, "MEAN_MAP_BUDGET_BYTES", 3 * 4 * 64 * 8 * 9)
    _, small = _planted_stats(heads, (8, 8))

    assert small.mean_maps.shape == (3, 4, 9, 64)
    assert (
        label_heads(small) == label_heads(full) == [[expected_label(h) for h in r] for r in heads]
    )
    for name in PER_HEAD:
        torch.testing.assert_close(
            getattr(small, name), getattr(full, name), atol=CHUNKED_ATOL, rtol=0, msg=name
        )
    # the kept rows are exactly the full maps' rows of those queries
    torch.testing.assert_close(
        small.mean_maps, full.mean_maps[:, :, small.mean_map_queries], atol=EXACT_ATOL, rtol=0
    )
    # content dependence from the sub-grid: positional heads stay at 0 (the control), the
    # planted content-reading heads stay far above it
    labels = label_heads(full)
    for layer, row in enumerate(labels):
        for head, label in enumerate(row):
            value = float(small.content_dependence[layer, head])
            if label in ("local", "horizontal", "vertical", "global"):
                assert value <= POSITIONAL_CONTENT_MAX, (layer, head, label)
            if label == "content":
                assert value >= 0.5 * float(full.content_dependence[layer, head]) > 0.1
    torch.testing.assert_close(
        head_diversity(small.mean_maps),
        head_diversity(full.mean_maps),
        atol=SUBGRID_DIVERSITY_ATOL,
        rtol=0,
    )
