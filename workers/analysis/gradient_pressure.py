"""Pressures: where the loss gradient pushes attention logits, Q/K angles and positions.

- Logit pressure ``-G_ij = -dL/ds_ij``: positive = one descent step raises the attention
  logit of query ``i`` on key ``j``. Each row of ``G`` sums to zero over all keys (prefix
  included): pressure redistributes attention.
- Angle pressure: ``d cos(Q_i, K_j)`` per unit descent step on Q and K.
- Position pressure: ``d cos(pos_i, pos_j)`` per unit descent step on the position table.
- Head divergence: cosine between different heads' W_Q (W_K) gradients.

Profiles are means per grid-distance bin (`workers.analysis.grid.Grid`); "near" is bin 1,
"far" every bin from ``max(2, ceil(num_bins / 2))`` on, and the textbook story predicts
positive pressure near and negative far (`sign_pattern`).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from scipy import stats
from torch import Tensor, nn

from workers.analysis.gradient_formula import (
    EPS,
    cosine_change_rate,
    mean_pairwise_cosine,
    pairwise_cosine,
)
from workers.analysis.grid import Grid
from workers.analysis.results import finite_or_none


@dataclass(frozen=True)
class DistanceBins:
    """The grid's distance bins as this section uses them."""

    centres: np.ndarray  # (num_bins,) mean distance per bin, patches
    counts: np.ndarray  # (num_bins,) number of (i, j) pairs per bin
    near: tuple[int, ...]
    far: tuple[int, ...]

    @classmethod
    def of(cls, grid: Grid) -> DistanceBins:
        nb = grid.num_distance_bins
        counts = torch.bincount(grid.distance_bins.reshape(-1), minlength=nb).numpy()
        centres = grid.bin_centres.numpy()
        near = tuple(b for b in (1,) if b < nb and counts[b] > 0)
        start = max(2, math.ceil(nb / 2))
        far = tuple(b for b in range(start, nb) if counts[b] > 0)
        return cls(centres=centres, counts=counts, near=near, far=far)

    def pooled(self, profile: np.ndarray, bins: tuple[int, ...]) -> float:
        """Pair-weighted mean of a per-bin mean profile over ``bins``."""
        if not bins:
            return float("nan")
        idx = list(bins)
        w = self.counts[idx].astype(np.float64)
        return float((profile[idx] * w).sum() / w.sum())

    def spearman(self, profile: np.ndarray) -> float:
        """Spearman correlation of a per-bin profile with bin distance, bins >= 1."""
        keep = (np.arange(len(profile)) >= 1) & (self.counts > 0) & np.isfinite(profile)
        if keep.sum() < 3:
            return float("nan")
        return spearman(self.centres[keep], profile[keep])


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # constant input -> NaN, reported as None
        return float(stats.spearmanr(x, y).statistic)


def sign_pattern(profile: np.ndarray, bins: DistanceBins) -> dict[str, Any]:
    """The story's predicted pattern on a per-bin profile: positive near, negative far.

    ``holds`` is True when near > 0 and far < 0; ``margin`` = min(near, -far) is positive
    exactly when it holds and says by how much (same units as the profile). ``holds`` is
    ``None`` (undecided) when the grid is too small to have far bins, or when the profile is
    exactly zero: the loss does not reach these logits at all (e.g. patch queries of the last
    block of a class-token model), which is no evidence either way.
    """
    near = bins.pooled(profile, bins.near)
    far = bins.pooled(profile, bins.far)
    unreached = bool(np.all(np.nan_to_num(profile) == 0.0))
    if unreached or not (np.isfinite(near) and np.isfinite(far)):
        return {
            "near": finite_or_none(near),
            "far": finite_or_none(far),
            "holds": None,
            "reason": "loss does not reach these logits" if unreached else "no far bins",
            "margin": None,
            "near_minus_far": None,
        }
    margin = min(near, -far)
    return {
        "near": near,
        "far": far,
        "holds": bool(margin > 0),
        "margin": margin,
        "near_minus_far": near - far,
    }


def jsonable(values: np.ndarray) -> list[float | None]:
    return [finite_or_none(v) for v in np.asarray(values, dtype=np.float64).reshape(-1)]


def head_divergence(
    qkv_grad: list[Tensor], n: int, attns: list[nn.Module]
) -> tuple[dict[str, Any], np.ndarray, np.ndarray]:
    L = len(attns)
    H = max(int(a.num_heads) for a in attns)
    div_q = np.full((L, H, H), np.nan)
    div_k = np.full((L, H, H), np.nan)
    rows = []
    for i, attn in enumerate(attns):
        h, d = int(attn.num_heads), int(attn.head_dim)
        g = qkv_grad[i] / n  # gradient of the mean loss, (3 * h * d, C)
        gq = g[: h * d].reshape(h, -1).cpu()
        gk = g[h * d : 2 * h * d].reshape(h, -1).cpu()
        div_q[i, :h, :h] = pairwise_cosine(gq).numpy()
        div_k[i, :h, :h] = pairwise_cosine(gk).numpy()
        rows.append(
            {
                "layer": i,
                "mean_pairwise_cosine_q": finite_or_none(mean_pairwise_cosine(gq)),
                "mean_pairwise_cosine_k": finite_or_none(mean_pairwise_cosine(gk)),
                "grad_norm_per_head_q": jsonable(gq.norm(dim=-1).numpy()),
                "grad_norm_per_head_k": jsonable(gk.norm(dim=-1).numpy()),
            }
        )
    qs = [r["mean_pairwise_cosine_q"] for r in rows if r["mean_pairwise_cosine_q"] is not None]
    ks = [r["mean_pairwise_cosine_k"] for r in rows if r["mean_pairwise_cosine_k"] is not None]
    out = {
        "description": (
            "mean cosine between the gradients of different heads' W_Q (W_K) slices "
            "of attn.qkv.weight, gradient of the mean loss; 1 = every head is "
            "pushed the same way, about 0 = unrelated pushes (chance level), "
            "negative = heads pushed apart"
        ),
        "mean_pairwise_cosine_q": float(np.mean(qs)) if qs else None,
        "mean_pairwise_cosine_k": float(np.mean(ks)) if ks else None,
        "layers": rows,
    }
    return out, div_q, div_k


def cosine_matrix(table: Tensor) -> Tensor:
    """(N, N) cosine between the rows of ``table`` (N, D)."""
    unit = table / table.norm(dim=-1, keepdim=True).clamp_min(EPS)
    return unit @ unit.T


def position_pressure(
    table: Tensor, g: Tensor, grid: Grid, bins: DistanceBins, *, offset: int, eta: float | None
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """How one descent step on the patch rows of the position table moves their cosines.

    ``table`` (N, D) float64 patch rows of ``pos_embed`` (starting at row ``offset``), ``g``
    (N, D) the gradient of the mean loss on them, ``eta`` the step the reported changes are
    scaled to. ``cos_change_rate`` = d cos(pos_i, pos_j) per unit step: positive = pulled
    together; the story predicts positive near, negative far.
    """
    N = grid.num_patches
    g_norm, p_norm = float(g.norm()), float(table.norm())
    rate = cosine_change_rate(table, table, g, g)  # (N, N), per unit eta
    off = ~torch.eye(N, dtype=torch.bool)
    rate_bins = grid.bin_mean(rate, include_self=False).numpy()
    grad_sim = grid.bin_mean(cosine_matrix(g), include_self=False).numpy()
    dist = grid.distances
    rho = spearman(dist[off].numpy(), rate[off].numpy()) if N > 2 else float("nan")
    pattern = sign_pattern(np.nan_to_num(rate_bins, nan=0.0), bins)
    per_patch_pull = (rate * grid.neighbour_mask(4)).sum(-1) / grid.neighbour_mask(4).sum(-1)
    pos = {
        "available": True,
        "rows": f"pos_embed[0, {offset}:{offset + N}] (patch tokens; prefix rows excluded)",
        "grad_norm": g_norm,
        "table_norm": p_norm,
        "eta": eta,
        "cos_change_rate_per_bin": jsonable(rate_bins),
        "cos_change_per_bin": None if eta is None else jsonable(eta * rate_bins),
        "spearman_distance": finite_or_none(rho),
        "near": pattern["near"],
        "far": pattern["far"],
        "story_holds": pattern["holds"],
        "undecided_reason": pattern.get("reason"),
        "margin": pattern["margin"],
        "grad_cosine_per_bin": jsonable(grad_sim),
        "grad_cosine_spearman_distance": finite_or_none(bins.spearman(grad_sim)),
        "description": (
            "cos_change_rate: d cos(pos_i, pos_j) per unit step -eta * g of the "
            "mean-loss gradient g (positive = pulled together), mean per distance "
            "bin, bin 0 (i = j) null; spearman over all pairs i != j; "
            "grad_cosine: cos(g_i, g_j) per bin"
        ),
    }
    arrays = {
        "gradient_pos_grad": g.numpy(),
        "gradient_pos_cos_change_rate": rate.numpy(),
        "gradient_pos_neighbour_pull": per_patch_pull.reshape(grid.height, grid.width).numpy(),
    }
    return pos, arrays


def layer_pressure_rows(
    pressure: list[Tensor],
    angle: list[Tensor],
    prefix: list[Tensor] | None,
    bins: DistanceBins,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], np.ndarray, np.ndarray]:
    """The report's ``layers`` rows from each layer's mean per-head profiles.

    ``pressure[i]``/``angle[i]`` (heads, num_bins) mean logit/angle pressure per bin,
    ``prefix[i]`` (heads,) mean prefix-key pressure (None without prefix tokens). Each row
    has the head-mean profile, its near/far `sign_pattern` (``judged`` when one applies;
    the verdict's interval is added by the caller) and one row per head (``sign_pattern``
    there is the point estimate: descriptive, not a verdict). Returns the rows, each
    layer's head-mean pattern, and (L, max heads, num_bins) arrays of both pressures.
    """
    L = len(pressure)
    H_max = max(int(p.shape[0]) for p in pressure)
    pressure_arr = np.full((L, H_max, len(bins.counts)), np.nan)
    angle_arr = np.full_like(pressure_arr, np.nan)
    layers, patterns = [], []
    for i in range(L):
        pres, ang = pressure[i].numpy(), angle[i].numpy()
        H = pres.shape[0]
        pressure_arr[i, :H] = pres
        angle_arr[i, :H] = ang
        head_rows = []
        for h in range(H):
            pattern = sign_pattern(pres[h], bins)
            head_rows.append(
                {
                    "head": h,
                    "logit_pressure_per_bin": jsonable(pres[h]),
                    "spearman_distance": finite_or_none(bins.spearman(pres[h])),
                    "near": pattern["near"],
                    "far": pattern["far"],
                    "sign_pattern": pattern["holds"],
                    "margin": pattern["margin"],
                    "prefix_key_pressure": (
                        finite_or_none(float(prefix[i][h])) if prefix is not None else None
                    ),
                    "angle_pressure_per_bin": jsonable(ang[h]),
                    "angle_spearman_distance": finite_or_none(bins.spearman(ang[h])),
                }
            )
        mean_pres, mean_ang = pres.mean(0), ang.mean(0)
        pattern = sign_pattern(mean_pres, bins)
        patterns.append(pattern)
        layers.append(
            {
                "layer": i,
                "num_heads": H,
                "logit_pressure_per_bin": jsonable(mean_pres),
                "spearman_distance": finite_or_none(bins.spearman(mean_pres)),
                "near": pattern["near"],
                "far": pattern["far"],
                "near_minus_far": pattern["near_minus_far"],
                "margin": pattern["margin"],
                "judged": pattern["holds"] is not None,
                "heads_with_sign_pattern": sum(1 for r in head_rows if r["sign_pattern"]),
                "angle_pressure_per_bin": jsonable(mean_ang),
                "angle_spearman_distance": finite_or_none(bins.spearman(mean_ang)),
                "angle_pattern": sign_pattern(mean_ang, bins)["holds"],
                "prefix_key_pressure": (
                    finite_or_none(float(prefix[i].mean())) if prefix is not None else None
                ),
                "heads": head_rows,
            }
        )
    return layers, patterns, pressure_arr, angle_arr
