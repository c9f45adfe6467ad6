"""The gradient formula of attention and its check against autograd.

With ``s_ij = Q_i . K_j * scale`` and ``A = softmax(s)``: ``dL/dQ_i = scale * sum_j G_ij K_j``
and ``dL/dK_j = scale * sum_i G_ij Q_i``, with ``G = dL/ds`` rebuilt from the probabilities and
their gradient (`logit_gradient`). `formula_check` compares autograd's dL/dQ, dL/dK with
these products, summed per head over a stream of batches (`agreement_sums`). Also the
first-order cosine change rates that the pressures are made of.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from workers.analysis.results import finite_or_none

# The formula check compares autograd's dL/dQ with scale * G K formed in the model's
# precision (float32 products, float64 sums); the only differences are float32 rounding
# inside the two computations (~1e-7 relative per op, a few ops deep). A relative error of
# at most 1e-4 and a cosine of at least 1 - 1e-6 leave orders of magnitude of headroom and
# still fail on any real mismatch (wrong scale: error ~0.3; pre-norm Q: cosine ~0.5-0.9).
FORMULA_MIN_COSINE = 1.0 - 1e-6
FORMULA_MAX_REL_ERROR = 1e-4

# Norms below this are treated as zero when normalising vectors (avoids 0/0 for a zero query).
EPS = 1e-12


def logit_gradient(probs: Tensor, probs_grad: Tensor, *, in_place: bool = False) -> Tensor:
    """``G = dL/ds`` from softmax probabilities ``P = softmax(s)`` and ``dP = dL/dP``.

    ``G = P * (dP - sum_k(dP * P))`` over the last dim (the softmax Jacobian applied to dP).
    Shapes (..., Tq, Tk), same for both; each row of the result sums to zero.
    ``in_place=True`` writes G into ``probs_grad`` (no full-size temporaries; the analysis
    hook passes a buffer it owns); otherwise neither input is modified.
    """
    if probs.shape != probs_grad.shape:
        raise ValueError(
            f"probs {tuple(probs.shape)} and probs_grad {tuple(probs_grad.shape)} differ"
        )
    row = torch.linalg.vecdot(probs_grad, probs).unsqueeze(-1)
    if in_place:
        return probs_grad.sub_(row).mul_(probs)
    return probs * (probs_grad - row)


def cosine_change_rate(a: Tensor, b: Tensor, grad_a: Tensor, grad_b: Tensor) -> Tensor:
    """First-order change of ``cos(a_i, b_j)`` per unit step of gradient descent.

    ``a`` (..., N, D), ``b`` (..., M, D) and their gradients of the same shapes. Returns
    (..., N, M): ``d/d eta cos(a_i - eta * grad_a_i, b_j - eta * grad_b_j)`` at ``eta = 0``.
    Positive = the step brings ``a_i`` and ``b_j`` closer in angle. Multiply by ``eta`` for
    the predicted change under a step of size ``eta``. For one table (``a is b``) pass the
    same gradient twice.
    """
    if a.shape != grad_a.shape or b.shape != grad_b.shape:
        raise ValueError("each tensor and its gradient must have the same shape")
    if a.shape[-1] != b.shape[-1] or a.shape[:-2] != b.shape[:-2]:
        raise ValueError(f"a {tuple(a.shape)} and b {tuple(b.shape)} do not pair up")
    na = a.norm(dim=-1, keepdim=True).clamp_min(EPS)
    nb = b.norm(dim=-1, keepdim=True).clamp_min(EPS)
    ua, ub = a / na, b / nb
    cos = ua @ ub.transpose(-1, -2)
    # d cos / d a_i = (ub_j - cos * ua_i) / |a_i|, and the step moves a_i by -grad_a_i.
    da = (grad_a / na) @ ub.transpose(-1, -2) - cos * ((ua * grad_a).sum(-1, keepdim=True) / na)
    db = ua @ (grad_b / nb).transpose(-1, -2) - cos * (
        (ub * grad_b).sum(-1, keepdim=True) / nb
    ).transpose(-1, -2)
    return -(da + db)


def summed_cosine_change_rate(a: Tensor, b: Tensor, grad_a: Tensor, grad_b: Tensor) -> Tensor:
    """``cosine_change_rate(a, b, grad_a, grad_b).sum(0)`` without the per-image maps.

    ``a`` (S, ..., N, D), ``b`` (S, ..., M, D) and their gradients; returns (..., N, M).
    The rate is bilinear: ``-(x_i . ub_j + ua_i . y_j)`` with ``u = v / |v|`` and
    ``x = (grad_a - (ua . grad_a) ua) / |a|`` (the part of the step that turns ``a``), ``y``
    likewise for ``b``. Summed over the leading dim that is two accumulating products per
    ``...`` item, ``x (N, S*D) @ ub (M, S*D)^T + ua @ y^T`` (the images laid side by side
    along the feature dim: one permuted copy each), so no (S, ..., N, M) temporary and no
    loop over S (2.7x faster than one product per image on ViT-Ti/16 shapes).
    """
    if a.shape != grad_a.shape or b.shape != grad_b.shape:
        raise ValueError("each tensor and its gradient must have the same shape")
    if a.shape[-1] != b.shape[-1] or a.shape[:-2] != b.shape[:-2] or a.ndim < 3:
        raise ValueError(f"a {tuple(a.shape)} and b {tuple(b.shape)} do not pair up")
    na = a.norm(dim=-1, keepdim=True).clamp_min(EPS)
    nb = b.norm(dim=-1, keepdim=True).clamp_min(EPS)
    ua, ub = a / na, b / nb
    x = (grad_a - (ua * grad_a).sum(-1, keepdim=True) * ua) / na
    y = (grad_b - (ub * grad_b).sum(-1, keepdim=True) * ub) / nb
    lead = a.shape[1:-2]

    def side_by_side(t: Tensor) -> Tensor:  # (S, ..., R, D) -> (prod(...), R, S*D)
        rows = t.movedim(0, -2)  # (..., R, S, D)
        return rows.reshape(math.prod(lead), t.shape[-2], -1)

    out = torch.bmm(side_by_side(x), side_by_side(ub).transpose(1, 2))
    out.baddbmm_(side_by_side(ua), side_by_side(y).transpose(1, 2))
    return out.neg_().reshape(*lead, a.shape[-2], b.shape[-2])


def mean_pairwise_cosine(vectors: Tensor) -> float:
    """Mean cosine over all pairs of different rows of ``vectors`` (H, F).

    Range [-1, 1]; 1 when every row points the same way, about 0 for unrelated
    high-dimensional rows (the chance level). NaN for fewer than two rows.
    """
    if vectors.ndim != 2:
        raise ValueError(f"vectors must be (H, F), got {tuple(vectors.shape)}")
    h = vectors.shape[0]
    if h < 2:
        return float("nan")
    unit = vectors / vectors.norm(dim=-1, keepdim=True).clamp_min(EPS)
    sim = unit @ unit.T
    off = ~torch.eye(h, dtype=torch.bool, device=sim.device)
    return float(sim[off].mean().item())


def pairwise_cosine(vectors: Tensor) -> Tensor:
    """(H, H) cosine between the rows of ``vectors`` (H, F)."""
    unit = vectors / vectors.norm(dim=-1, keepdim=True).clamp_min(EPS)
    return unit @ unit.T


def agreement_sums(auto: Tensor, recon: Tensor) -> Tensor:
    """(4, H) float64 sums over batch, tokens, dims of (B, H, T, d) tensors (squared in
    float64: a cosine of 1 - 1e-6 must stay resolvable)."""
    dims = (0, 2, 3)
    auto, recon = auto.double(), recon.double()
    return torch.stack(
        [
            (auto * recon).sum(dims),
            (auto * auto).sum(dims),
            (recon * recon).sum(dims),
            ((auto - recon) ** 2).sum(dims),
        ]
    ).cpu()


def agreement(sums: Tensor) -> tuple[np.ndarray, np.ndarray, float, float]:
    """Per-head cosine, per-head relative error, and both over all heads."""
    dot, aa, rr, diff = sums.numpy()
    with np.errstate(invalid="ignore", divide="ignore"):
        cos_h = dot / np.sqrt(aa * rr)
        err_h = np.sqrt(diff / aa)
        cos = dot.sum() / math.sqrt(aa.sum() * rr.sum())
        err = math.sqrt(diff.sum() / aa.sum()) if aa.sum() > 0 else float("nan")
    # An all-zero gradient on both sides (a block the loss does not reach) agrees exactly.
    zero = (aa == 0) & (rr == 0)
    cos_h = np.where(zero, 1.0, cos_h)
    err_h = np.where(zero, 0.0, err_h)
    if aa.sum() == 0 and rr.sum() == 0:
        cos, err = 1.0, 0.0
    return cos_h, err_h, float(cos), float(err)


def formula_check(
    fq: list[Tensor],
    fk: list[Tensor],
    fq_pre: list[Tensor],
    fk_pre: list[Tensor],
    attns: list[nn.Module],
    has_norm: list[bool],
    *,
    num_images: int,
) -> dict[str, Any]:
    """The report's ``formula_check``: does autograd's dL/dQ (dL/dK) equal ``scale * G K``
    (``scale * G^T Q``) on the hooked tensors of every layer?

    ``fq``/``fk`` (and ``*_pre`` for the projection outputs of q/k-norm layers) are each
    layer's (4, heads) `agreement_sums` over ``num_images`` images (reported). ``passed`` when every head's
    cosine is at least `FORMULA_MIN_COSINE` and its relative error at most
    `FORMULA_MAX_REL_ERROR`; a failure means the rebuilt attention is not the one the model
    differentiated, and every pressure built on it is suspect.
    """
    rows = []
    cos_q_all, cos_k_all, err_q_all, err_k_all = [], [], [], []
    for i, attn in enumerate(attns):
        cq_h, eq_h, cq, eq = agreement(fq[i])
        ck_h, ek_h, ck, ek = agreement(fk[i])
        row: dict[str, Any] = {
            "layer": i,
            "qk_norm": has_norm[i],
            "scale": float(attn.scale),
            "cosine_q": finite_or_none(cq),
            "cosine_k": finite_or_none(ck),
            "rel_error_q": finite_or_none(eq),
            "rel_error_k": finite_or_none(ek),
            "min_head_cosine_q": finite_or_none(np.nanmin(cq_h)),
            "min_head_cosine_k": finite_or_none(np.nanmin(ck_h)),
            "max_head_rel_error_q": finite_or_none(np.nanmax(eq_h)),
            "max_head_rel_error_k": finite_or_none(np.nanmax(ek_h)),
        }
        if has_norm[i]:
            _, _, pq, peq = agreement(fq_pre[i])
            _, _, pk, pek = agreement(fk_pre[i])
            row["pre_norm"] = {
                "cosine_q": finite_or_none(pq),
                "cosine_k": finite_or_none(pk),
                "rel_error_q": finite_or_none(peq),
                "rel_error_k": finite_or_none(pek),
            }
        rows.append(row)
        cos_q_all.append(np.nanmin(cq_h))
        cos_k_all.append(np.nanmin(ck_h))
        err_q_all.append(np.nanmax(eq_h))
        err_k_all.append(np.nanmax(ek_h))
    min_q, min_k = float(np.min(cos_q_all)), float(np.min(cos_k_all))
    max_eq, max_ek = float(np.max(err_q_all)), float(np.max(err_k_all))
    passed = bool(
        min(min_q, min_k) >= FORMULA_MIN_COSINE and max(max_eq, max_ek) <= FORMULA_MAX_REL_ERROR
    )
    any_norm = any(has_norm)
    note = (
        "Q and K are taken where they enter the product s = Q K^T * scale (timm's "
        "attn.q_norm / attn.k_norm outputs); autograd's dL/dQ, dL/dK are compared with "
        "scale * G K and scale * G^T Q, per head, over all tokens of the first "
        f"{num_images} images (the hooked tensors are the same code path on every image)."
    )
    if any_norm:
        note += (
            " This model has a q/k norm between the qkv projection and the product, so "
            "the check is on the post-norm Q/K: for the projection outputs the formula "
            "does not hold, because the gradient also passes through the norm's Jacobian "
            "(see layers[].pre_norm for how far apart they are)."
        )
    if not passed:
        note += (
            f" The check FAILED (min cosine {min(min_q, min_k):.6g}, max relative error "
            f"{max(max_eq, max_ek):.3g}): the rebuilt attention is not the one the model "
            "differentiated (custom attention, masks or a non-standard scale)."
        )
    return {
        "min_cosine_q": finite_or_none(min_q),
        "min_cosine_k": finite_or_none(min_k),
        "max_rel_error_q": finite_or_none(max_eq),
        "max_rel_error_k": finite_or_none(max_ek),
        "passed": passed,
        "num_images": num_images,
        "tolerance": {"min_cosine": FORMULA_MIN_COSINE, "max_rel_error": FORMULA_MAX_REL_ERROR},
        "qk_location": "post-norm" if any_norm else "projection (no q/k norm)",
        "note": note,
        "layers": rows,
    }
