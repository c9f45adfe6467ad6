"""The pure gradient formulas against autograd and finite differences."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from workers.analysis.gradient_formula import (
    FORMULA_MIN_COSINE,
    agreement,
    agreement_sums,
    cosine_change_rate,
    logit_gradient,
    mean_pairwise_cosine,
    summed_cosine_change_rate,
)

torch.set_num_threads(1)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), rows=st.integers(1, 5), cols=st.integers(1, 7))
def test_logit_gradient_is_autograd_of_softmax(seed, rows, cols):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(2, rows, cols, generator=g, dtype=torch.float64, requires_grad=True)
    weights = torch.randn(2, rows, cols, generator=g, dtype=torch.float64)
    probs = s.softmax(-1)
    (grad_s,) = torch.autograd.grad((probs * weights).sum(), s)
    G = logit_gradient(probs.detach(), weights)  # dL/dP = weights for L = sum(weights * P)
    torch.testing.assert_close(G, grad_s, rtol=1e-10, atol=1e-12)
    buffer = weights.clone()  # the form the analysis hook runs: G written into dP's buffer
    assert logit_gradient(probs.detach(), buffer, in_place=True) is buffer
    torch.testing.assert_close(buffer, grad_s, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(
        G.sum(-1), torch.zeros(2, rows, dtype=torch.float64), atol=1e-12, rtol=0
    )


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), n=st.integers(1, 6), m=st.integers(1, 6), d=st.integers(2, 5))
def test_cosine_change_rate_matches_finite_difference(seed, n, m, d):
    g = torch.Generator().manual_seed(seed)
    a, b = (torch.randn(3, k, d, generator=g, dtype=torch.float64) for k in (n, m))
    ga, gb = torch.randn_like(a), torch.randn_like(b)

    def cos(x, y):
        return F.normalize(x, dim=-1) @ F.normalize(y, dim=-1).transpose(-1, -2)

    h = 1e-6
    fd = (cos(a - h * ga, b - h * gb) - cos(a + h * ga, b + h * gb)) / (2 * h)
    torch.testing.assert_close(cosine_change_rate(a, b, ga, gb), fd, rtol=1e-5, atol=1e-6)


@given(seed=st.integers(0, 2**16), s=st.integers(1, 4), n=st.integers(1, 6), d=st.integers(2, 5))
@settings(max_examples=25, deadline=None)
def test_summed_cosine_change_rate_equals_the_sum_of_per_image_rates(seed, s, n, d):
    g = torch.Generator().manual_seed(seed)
    a, b, ga, gb = (torch.randn(s, 2, n, d, generator=g, dtype=torch.float64) for _ in range(4))
    expected = cosine_change_rate(a, b, ga, gb).sum(0)
    torch.testing.assert_close(
        summed_cosine_change_rate(a, b, ga, gb), expected, rtol=1e-10, atol=1e-12
    )


def test_cosine_change_rate_is_zero_for_radial_steps():
    # Scaling every vector leaves every cosine unchanged: a purely radial step moves nothing.
    a = torch.randn(5, 4, dtype=torch.float64)
    rate = cosine_change_rate(a, a, 0.3 * a, 0.3 * a)
    torch.testing.assert_close(rate, torch.zeros(5, 5, dtype=torch.float64), atol=1e-12, rtol=0)


def test_mean_pairwise_cosine_known_values():
    assert mean_pairwise_cosine(torch.tensor([[1.0, 0.0], [2.0, 0.0]])) == pytest.approx(1.0)
    assert mean_pairwise_cosine(torch.tensor([[1.0, 0.0], [0.0, 3.0]])) == pytest.approx(0.0)
    assert mean_pairwise_cosine(torch.tensor([[1.0, 0.0], [-1.0, 0.0]])) == pytest.approx(-1.0)
    with pytest.raises(ValueError):
        mean_pairwise_cosine(torch.zeros(3))


def test_the_formula_check_needs_float64_sums():
    """Why `agreement_sums` squares and sums in float64: two float32 gradients that agree to
    float32 rounding (what autograd and the formula produce on a ViT-S/16 batch of 16) have
    a cosine of 1 - 1e-14; summed in float32 over a batch the cosine reads 1 - ~1e-7, a
    tenth of the check's tolerance (FORMULA_MIN_COSINE = 1 - 1e-6) on a small model, and the
    floor grows with the number of summed elements. Measured with `gradient_section` on
    random timm models (16 images): 1 - min cosine 3e-8 (6-layer toy), 6.6e-8 (vit_tiny),
    1.2e-7 (vit_small) with float32 sums; 1e-15 to 7e-15 with float64."""
    g = torch.Generator().manual_seed(0)
    auto = torch.randn(16, 6, 197, 64, generator=g)  # (B, H, T, d) float32
    recon = auto * (1 + 1e-7 * torch.randn(auto.shape, generator=g))  # float32 rounding apart

    def one_minus_cosine(sums: torch.Tensor) -> float:
        cos_h, _, _, _ = agreement(sums)
        return float(1 - cos_h.min())

    dims = (0, 2, 3)
    float32_sums = torch.stack(
        [
            (auto * recon).sum(dims),
            (auto * auto).sum(dims),
            (recon * recon).sum(dims),
            ((auto - recon) ** 2).sum(dims),
        ]
    ).double()
    assert one_minus_cosine(agreement_sums(auto, recon)) < 1e-12
    assert one_minus_cosine(float32_sums) > 1e-9  # float32 cannot see below this
    assert FORMULA_MIN_COSINE == 1 - 1e-6
