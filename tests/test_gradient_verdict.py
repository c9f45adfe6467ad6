"""The gradient verdict: bootstrap intervals decide, a failed formula check voids."""

from __future__ import annotations

import numpy as np
import pytest

from workers.analysis.gradient_pressure import DistanceBins
from workers.analysis.gradient_verdict import (
    BOOTSTRAP_MIN_IMAGES,
    bootstrap_weights,
    decide,
    interval,
    judge_layers,
    majority_margin,
    margins,
    verdict,
)
from workers.analysis.grid import Grid

BINS = DistanceBins.of(Grid(6, 6, 2))  # bins 0..7, near (1,), far (4, 5, 6, 7)


def _profiles(n: int, near: float, far: float, noise: float, seed: int) -> np.ndarray:
    """(n, num_bins) per-image profiles: ``near`` in bin 1, ``far`` in far bins, plus noise."""
    rng = np.random.default_rng(seed)
    base = np.zeros(len(BINS.counts))
    base[1] = near
    base[list(BINS.far)] = far
    return base + noise * rng.standard_normal((n, len(BINS.counts)))


def test_bootstrap_weights_are_resamples_of_the_images():
    w = bootstrap_weights(10, resamples=50, seed=0)
    assert w.shape == (50, 10)
    np.testing.assert_allclose(w.sum(1), 1.0)
    assert np.allclose(w * 10, np.round(w * 10))  # multiplicities
    assert np.array_equal(w, bootstrap_weights(10, resamples=50, seed=0))  # seeded
    with pytest.raises(ValueError):
        bootstrap_weights(0, seed=0)


@pytest.mark.parametrize(
    ("near", "far", "expected"), [(1.0, -1.0, True), (-1.0, 1.0, False), (0.0, 0.0, None)]
)
def test_an_interval_decides_only_when_it_excludes_zero(near, far, expected):
    n = 64
    profiles = _profiles(n, near, far, noise=1.0, seed=1)
    ci = interval(margins(bootstrap_weights(n, seed=0) @ profiles, BINS))
    holds, reason = decide(ci, n)
    assert holds is expected
    assert (reason is None) == (expected is not None)
    if expected is None:
        assert ci[0] < 0 < ci[1] and "includes 0" in reason


def test_too_few_images_never_decide():
    holds, reason = decide([1.0, 2.0], BOOTSTRAP_MIN_IMAGES - 1)
    assert holds is None and "too few" in reason


def test_majority_margin_is_positive_exactly_for_a_strict_majority():
    assert majority_margin(np.array([0.3, 0.2, -0.1])) == pytest.approx(0.2)
    assert majority_margin(np.array([0.3, -0.2, -0.1])) == pytest.approx(-0.1)
    assert majority_margin(np.array([0.3, -0.2])) == pytest.approx(-0.2)  # a tie is no majority
    assert majority_margin(np.array([0.3])) == pytest.approx(0.3)


def _section(near: float, far: float, *, formula_passed: bool = True) -> dict:
    n = 32
    image = np.stack([_profiles(n, near, far, 0.5, seed=s) for s in range(3)], axis=1)
    weights = bootstrap_weights(n, seed=0)
    rows, samples = judge_layers(image, BINS, weights, [True, True, True])
    mean = image.mean(0)
    layers = [
        {"layer": i, "judged": True, "margin": float(margins(mean[i], BINS)), **rows[i]}
        for i in range(3)
    ]
    pos = {"available": False, "reason": "no table"}
    return verdict(layers, samples, pos, {"passed": formula_passed}, n)


def test_a_clear_story_holds_with_an_interval_above_zero():
    v = _section(1.0, -1.0)
    assert v["story_holds"] is True and v["margin_ci95"][0] > 0
    assert v["layers_holding"] == 3 and v["summary"].startswith("The story holds")


def test_a_reversed_story_does_not_hold_and_a_flat_one_is_undecided():
    assert _section(-1.0, 1.0)["story_holds"] is False
    flat = _section(0.0, 0.0)
    assert flat["story_holds"] is None and "includes 0" in flat["undecided_reason"]
    assert flat["summary"].startswith("Undecided")


def test_a_failed_formula_check_makes_the_verdict_null():
    v = _section(1.0, -1.0, formula_passed=False)
    assert v["story_holds"] is None and v["logit_pressure_holds"] is None
    assert "formula check failed" in v["undecided_reason"]
