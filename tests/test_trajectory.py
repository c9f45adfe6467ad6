"""The `trajectory` section on hand-written per-step reports: every series is read from the
report it belongs to, a number a report lacks is None, and the figure is made."""

from __future__ import annotations

import io

import pytest
from PIL import Image

from workers.analysis.heads import LABELS
from workers.analysis.plots_heads import LABEL_COLOURS
from workers.analysis.trajectory import trajectory_section


def _report(score: float | None, counts: dict[str, int], distances: list[float]) -> dict:
    report: dict = {
        "heads": {
            "counts": counts,
            "layers": [{"mean_distance_patches": d} for d in distances],
            "uniform_mean_distance_patches": 4.14,
        },
        "gradients": {"layers": [{"spearman_distance": -0.4}, {"spearman_distance": -0.2}]},
    }
    if score is not None:
        report["position_embedding"] = {"grid_structure_score": score}
    return report


def test_series_follow_the_reports_step_by_step():
    reports = [
        _report(None, {"global": 8}, [4.1, 4.2]),
        _report(0.3, {"global": 6, "local": 2}, [3.9, 2.5]),
        _report(0.6, {"global": 4, "local": 2, "vertical": 1, "mixed": 1}, [3.7, 1.9]),
    ]
    data = trajectory_section([0, 100, 1000], reports).data
    assert data["steps"] == [0, 100, 1000]
    assert data["headlines"]["grid_structure_score"] == [None, 0.3, 0.6]
    assert data["headlines"]["decodability_r2"] == [None, None, None]  # no report has it
    assert data["headlines"]["logit_pressure_spearman"] == pytest.approx([-0.3] * 3)
    counts = data["head_label_counts"]
    assert counts["global"] == [8, 6, 4]
    assert counts["local"] == [None, 2, 2]  # absent from the first report's counts
    assert counts["vertical"] == [None, None, 1]
    assert data["mean_attention_distance_per_layer"] == [[4.1, 4.2], [3.9, 2.5], [3.7, 1.9]]
    assert data["uniform_mean_distance_patches"] == 4.14


def test_every_head_label_has_a_bar_colour():
    """The head panel stacks one bar per label in LABEL_COLOURS: a label without a colour
    would drop its heads from the figure."""
    assert set(LABEL_COLOURS) == set(LABELS)


def test_figure_is_a_png_of_three_panels():
    reports = [_report(0.1, {"global": 8}, [4.0, 4.0]), _report(0.5, {"local": 8}, [1.0, 1.0])]
    figure = trajectory_section([0, 1], reports).figures["trajectory"]
    image = Image.open(io.BytesIO(figure))
    assert image.format == "PNG" and image.width > 2 * image.height


@pytest.mark.parametrize("steps, reports", [([], []), ([0, 1], [{}])])
def test_rejects_steps_that_do_not_match_the_reports(steps, reports):
    with pytest.raises(ValueError):
        trajectory_section(steps, reports)
