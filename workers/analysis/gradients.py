"""Gradient alignment: how the loss pushes queries, keys and the position embedding.

The textbook story this section checks, for one checkpoint and one image set: with
``s_ij = Q_i . K_j * scale`` (``scale = 1/sqrt(d)``) and ``A = softmax(s)``, the gradient is
``dL/dQ_i = scale * sum_j G_ij K_j`` with ``G_ij = dL/ds_ij``. Gradient descent then raises
``s_ij`` for neighbouring patches and lowers it for distant ones, and because
``X_i = patch_i + pos_i`` the same gradient reaches ``pos_i``, so neighbouring position
embeddings are pulled together. Every number here says whether that holds, and where not.

Conventions used throughout:

- Loss: cross-entropy of every image against its label (``labels_source="labels"``) or, when
  no labels are given, against the model's own argmax prediction (``"predictions"``); for an
  embedding model (no classifier head, or a CLIP-style projection) the proxy objective of
  `workers.analysis.objectives`. ``objective`` names the one used.
- "Per image": logit, angle and formula statistics are computed from the gradient of each
  image's own loss and averaged over images. The position-embedding and head gradients are
  gradients of the mean loss over all images (the sum of per-image gradients divided by the
  number of images). Both are sums over images at heart, so the analysis streams: one
  forward and ONE backward pass per batch feed every statistic, and memory depends on the
  batch size, not on the number of images.
- Pressure: ``-G_ij``, the rate at which one gradient-descent step on ``s`` raises the
  attention logit of query ``i`` on key ``j``. Positive = the loss wants more attention there.
  Each row of ``G`` sums to zero over all keys (prefix tokens included), so pressure is a
  redistribution: what one key gains, others lose. Patch-to-patch pairs only; prefix keys
  are reported separately as ``prefix_key_pressure``.
- Distances and bins come from :class:`workers.analysis.grid.Grid` (bin ``b`` holds the
  pairs whose Euclidean grid distance rounds to ``b``; bin 0 = the patch itself).
  "Near" is bin 1 (4- and 8-neighbours); "far" is every bin from
  ``max(2, ceil(num_bins / 2))`` on. The story predicts pressure > 0 near and < 0 far.

Mechanics: during the analysis each block's ``attn.fused_attn`` is switched off so that
``attn.attn_drop`` (identity in eval mode) sees the attention probabilities ``P``; forward
hooks on ``attn.q_norm`` / ``attn.k_norm`` give Q and K as they enter the product (after
any q/k norm) and ``attn_drop`` gives ``P``. One ``torch.autograd.grad`` call per batch
returns dL/dQ, dL/dK, dL/dP, dL/d pos_embed and dL/d qkv.weight; ``G`` is rebuilt from
``P`` and ``dL/dP`` (softmax Jacobian), never by a second backward pass. The model is put
back exactly as found (flags, train/eval modes, ``requires_grad``; ``.grad`` is never
written because ``autograd.grad`` does not accumulate into it).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from scipy import stats
from torch import Tensor, nn

from workers.analysis.capture import BatchAttentionCallback, evaluating
from workers.analysis.grid import Grid, grid_from_model
from workers.analysis.objectives import ClassifierObjective, InstanceDiscrimination
from workers.analysis.results import SectionResult, finite_or_none, unavailable

# The formula check compares autograd's dL/dQ with scale * G K formed in the model's
# precision (float32 products, float64 sums); the only differences are float32 rounding
# inside the two computations (~1e-7 relative per op, a few ops deep). A relative error of
# at most 1e-4 and a cosine of at least 1 - 1e-6 leave orders of magnitude of headroom and
# still fail on any real mismatch (wrong scale: error ~0.3; pre-norm Q: cosine ~0.5-0.9).
FORMULA_MIN_COSINE = 1.0 - 1e-6
FORMULA_MAX_REL_ERROR = 1e-4

# The SGD self-check steps the position table by this fraction of its norm when no eta is
# given. The gradient can lie mostly outside the span of the table (channels the table does
# not use): that part changes cosines only at second order (~ratio^2, through the norms)
# while the first-order change comes from the small in-span part, so the ratio must be
# tiny: at 1e-6 second-order terms are ~1e-12, and float64 rounding of cosines (~1e-16) is
# still far below changes of ~1e-6 * (in-span fraction).
SGD_CHECK_STEP_RATIO = 1e-6
# The self-check correlation that counts as "the first-order prediction is right".
SGD_CHECK_MIN_CORRELATION = 0.99

# Norms below this are treated as zero when normalising vectors (avoids 0/0 for a zero query).
_EPS = 1e-12


# --------------------------------------------------------------------------------------
# Pure formulas (tested against autograd and finite differences)
# --------------------------------------------------------------------------------------


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
    na = a.norm(dim=-1, keepdim=True).clamp_min(_EPS)
    nb = b.norm(dim=-1, keepdim=True).clamp_min(_EPS)
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
    likewise for ``b``; so the sum over the leading dim is two accumulating matmuls per
    item into one (..., N, M) buffer, with no (S, ..., N, M) temporaries.
    """
    if a.shape != grad_a.shape or b.shape != grad_b.shape:
        raise ValueError("each tensor and its gradient must have the same shape")
    if a.shape[-1] != b.shape[-1] or a.shape[:-2] != b.shape[:-2] or a.ndim < 3:
        raise ValueError(f"a {tuple(a.shape)} and b {tuple(b.shape)} do not pair up")
    na = a.norm(dim=-1, keepdim=True).clamp_min(_EPS)
    nb = b.norm(dim=-1, keepdim=True).clamp_min(_EPS)
    ua, ub = a / na, b / nb
    x = (grad_a - (ua * grad_a).sum(-1, keepdim=True) * ua) / na
    y = (grad_b - (ub * grad_b).sum(-1, keepdim=True) * ub) / nb
    lead = a.shape[1:-2]
    out = torch.zeros((math.prod(lead), a.shape[-2], b.shape[-2]), dtype=a.dtype, device=a.device)
    for s in range(a.shape[0]):
        x_s, ua_s = x[s].reshape(-1, *x.shape[-2:]), ua[s].reshape(-1, *ua.shape[-2:])
        ub_s, y_s = ub[s].reshape(-1, *ub.shape[-2:]), y[s].reshape(-1, *y.shape[-2:])
        out.baddbmm_(x_s, ub_s.transpose(-1, -2)).baddbmm_(ua_s, y_s.transpose(-1, -2))
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
    unit = vectors / vectors.norm(dim=-1, keepdim=True).clamp_min(_EPS)
    sim = unit @ unit.T
    off = ~torch.eye(h, dtype=torch.bool, device=sim.device)
    return float(sim[off].mean().item())


def pairwise_cosine(vectors: Tensor) -> Tensor:
    """(H, H) cosine between the rows of ``vectors`` (H, F)."""
    unit = vectors / vectors.norm(dim=-1, keepdim=True).clamp_min(_EPS)
    return unit @ unit.T


# --------------------------------------------------------------------------------------
# Near / far summaries of a per-bin profile
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Bins:
    """The grid's distance bins as this section uses them."""

    centres: np.ndarray  # (num_bins,) mean distance per bin, patches
    counts: np.ndarray  # (num_bins,) number of (i, j) pairs per bin
    near: tuple[int, ...]
    far: tuple[int, ...]

    @classmethod
    def of(cls, grid: Grid) -> _Bins:
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
        return _spearman(self.centres[keep], profile[keep])


def _spearman(x: np.ndarray, y: np.ndarray) -> float:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # constant input -> NaN, reported as None
        return float(stats.spearmanr(x, y).statistic)


def sign_pattern(profile: np.ndarray, bins: _Bins) -> dict[str, Any]:
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


def _jsonable(values: np.ndarray) -> list[float | None]:
    return [finite_or_none(v) for v in np.asarray(values, dtype=np.float64).reshape(-1)]


# --------------------------------------------------------------------------------------
# Capture: hooks, flags and their restoration
# --------------------------------------------------------------------------------------


@dataclass
class _BlockTaps:
    q_pre: Tensor | None = None
    k_pre: Tensor | None = None
    q: Tensor | None = None
    k: Tensor | None = None
    probs: Tensor | None = None
    calls: int = 0


@dataclass
class _Capture:
    attns: list[nn.Module]
    taps: list[_BlockTaps] = field(default_factory=list)

    def reset(self) -> None:
        self.taps = [_BlockTaps() for _ in self.attns]


def _attention_modules(model: nn.Module) -> list[nn.Module] | str:
    """The timm ``Attention`` of every block, or the reason the model is not supported."""
    blocks = getattr(model, "blocks", None)
    if blocks is None or len(blocks) == 0:
        return "model has no `blocks`; is it a timm Vision Transformer?"
    attns = []
    needed = ("qkv", "q_norm", "k_norm", "attn_drop", "num_heads", "head_dim", "scale")
    for i, blk in enumerate(blocks):
        attn = getattr(blk, "attn", None)
        missing = [n for n in needed if attn is None or not hasattr(attn, n)]
        if missing:
            return (
                f"block {i} attention lacks {', '.join(missing)}: only timm `Attention` "
                "(fused qkv, q_norm/k_norm/attn_drop) is supported"
            )
        if not isinstance(attn.qkv, nn.Linear):
            return f"block {i} attention qkv is not a Linear layer"
        attns.append(attn)
    return attns


@contextmanager
def _instrumented(
    model: nn.Module, attns: list[nn.Module], params: list[nn.Parameter]
) -> Iterator[_Capture]:
    """Eval mode, manual attention path, hooks and requires_grad; all undone on exit."""
    capture = _Capture(attns)
    capture.reset()
    fused = [(a, a.__dict__.get("fused_attn", None), hasattr(a, "fused_attn")) for a in attns]
    grad_flags = [(p, p.requires_grad) for p in params]
    handles = []
    with evaluating(model):  # eval mode; every module's own mode comes back
        try:
            for attn in attns:
                if hasattr(attn, "fused_attn"):
                    attn.fused_attn = False
            for p in params:
                p.requires_grad_(True)
            for i, attn in enumerate(attns):

                def q_hook(_m, inputs, output, i=i):
                    capture.taps[i].q_pre, capture.taps[i].q = inputs[0], output

                def k_hook(_m, inputs, output, i=i):
                    capture.taps[i].k_pre, capture.taps[i].k = inputs[0], output

                def p_hook(_m, _inputs, output, i=i):
                    capture.taps[i].probs = output
                    capture.taps[i].calls += 1

                handles.append(attn.q_norm.register_forward_hook(q_hook))
                handles.append(attn.k_norm.register_forward_hook(k_hook))
                handles.append(attn.attn_drop.register_forward_hook(p_hook))
            yield capture
        finally:
            for h in handles:
                h.remove()
            for p, flag in grad_flags:
                p.requires_grad_(flag)
            for attn, value, had in fused:
                if not had:
                    continue
                if value is None:  # the flag lived on the class; drop our instance override
                    attn.__dict__.pop("fused_attn", None)
                else:
                    attn.fused_attn = value


# --------------------------------------------------------------------------------------
# Streaming accumulators
# --------------------------------------------------------------------------------------


class _Accumulator:
    """Per-batch sums; every statistic of the section is a function of these at the end."""

    def __init__(self, num_layers: int, num_heads: list[int], num_bins: int) -> None:
        z = torch.zeros
        self.n = 0
        self.loss_sum = 0.0
        self.pressure = [z(h, num_bins, dtype=torch.float64) for h in num_heads]
        self.angle = [z(h, num_bins, dtype=torch.float64) for h in num_heads]
        self.prefix_pressure = [z(h, dtype=torch.float64) for h in num_heads]
        # formula check sums per head: <auto, recon>, |auto|^2, |recon|^2, |auto - recon|^2
        self.fq = [z(4, h, dtype=torch.float64) for h in num_heads]
        self.fk = [z(4, h, dtype=torch.float64) for h in num_heads]
        self.fq_pre = [z(4, h, dtype=torch.float64) for h in num_heads]
        self.fk_pre = [z(4, h, dtype=torch.float64) for h in num_heads]
        self.qkv_grad: list[Tensor | None] = [None] * num_layers
        self.pos_grad: Tensor | None = None


def _agreement_sums(auto: Tensor, recon: Tensor) -> Tensor:
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


def _agreement(sums: Tensor) -> tuple[np.ndarray, np.ndarray, float, float]:
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


# --------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------


def gradient_section(
    model: nn.Module,
    batches: Iterable[tuple[Tensor, Tensor | None]],
    *,
    grid: Grid | None = None,
    eta: float | None = None,
    seed: int = 0,
    on_attention: BatchAttentionCallback | None = None,
    objective: ClassifierObjective | InstanceDiscrimination | None = None,
) -> SectionResult:
    """The ``gradients`` report section for a timm ViT and a stream of image batches.

    ``batches`` yields ``(images (B, C, H, W), labels (B,) long or None)``; either every
    batch has labels or none does. ``grid`` defaults to ``patch_embed.grid_size``. ``eta`` is
    the step size of the position-embedding SGD self-check and of the reported first-order
    cosine changes; ``None`` picks the step whose norm is ``SGD_CHECK_STEP_RATIO`` of the
    table's norm (reported as ``sgd_step_check.eta``). ``seed`` seeds torch's RNG for the
    duration of the analysis (the model runs in eval mode; this only matters for models
    that draw random numbers at inference). ``on_attention(layer, probs, start)``, when
    given, receives every layer's attention probabilities of every batch (B, heads, T, T),
    detached, with the index of the batch's first image, right after the forward: another
    analysis of the same images (head statistics) reduces them instead of running its own
    forward pass. ``objective`` is the loss (`workers.analysis.objectives`; default:
    cross-entropy against the labels or the model's predictions), named in ``objective``.

    Returns ``available: false`` with a reason for models it cannot instrument (no timm
    ``Attention`` blocks, no classifier head). The model is left exactly as it was.
    """
    if eta is not None and not (eta > 0 and math.isfinite(eta)):
        raise ValueError(f"eta must be a positive finite step size, got {eta}")
    found = _attention_modules(model)
    if isinstance(found, str):
        return unavailable(found)
    attns = found
    if objective is None and getattr(model, "num_classes", None) == 0:
        return unavailable("model has no classifier head (num_classes=0): no loss to differentiate")
    objective = objective or ClassifierObjective()
    if grid is None:
        grid = grid_from_model(model)
    num_prefix = int(getattr(model, "num_prefix_tokens", 0))
    pos_param, pos_offset, pos_reason = _patch_position_table(model, grid, num_prefix)

    qkv_weights = [a.qkv.weight for a in attns]
    params = qkv_weights + ([pos_param] if pos_param is not None else [])
    bins = _Bins.of(grid)
    heads = [int(a.num_heads) for a in attns]
    acc = _Accumulator(len(attns), heads, grid.num_distance_bins)
    has_norm = [
        not isinstance(a.q_norm, nn.Identity) or not isinstance(a.k_norm, nn.Identity)
        for a in attns
    ]
    labels_source: str | None = None
    first = next(model.parameters())
    device, dtype = first.device, first.dtype

    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        with _instrumented(model, attns, params) as capture, torch.enable_grad():
            for images, labels in batches:
                source = _check_batch(images, labels)
                if labels_source is None:
                    labels_source = source
                elif source != labels_source:
                    raise ValueError(
                        "batches mix labelled and unlabelled images; give labels "
                        "for every batch or for none"
                    )
                _process_batch(
                    model,
                    capture,
                    images.to(device=device, dtype=dtype),
                    labels,
                    on_attention,
                    acc,
                    grid,
                    bins,
                    num_prefix,
                    params,
                    pos_param,
                    has_norm,
                    objective,
                )
    if acc.n == 0:
        raise ValueError("no images: `batches` yielded nothing")
    result = _assemble(
        acc,
        attns,
        grid,
        bins,
        num_prefix,
        has_norm,
        labels_source,
        pos_param,
        pos_offset,
        pos_reason,
        eta,
    )
    result.data["objective"] = objective.describe()
    if not isinstance(objective, ClassifierObjective):  # an embedding has no classes to label
        result.data["labels_source"] = None
    return result


def _check_batch(images: Tensor, labels: Tensor | None) -> str:
    if not isinstance(images, Tensor) or images.ndim != 4:
        shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
        raise ValueError(f"images must be a (B, C, H, W) tensor, got {shape}")
    if labels is None:
        return "predictions"
    if not isinstance(labels, Tensor) or labels.ndim != 1 or labels.shape[0] != images.shape[0]:
        shape = tuple(labels.shape) if isinstance(labels, Tensor) else type(labels).__name__
        raise ValueError(f"labels must be a ({images.shape[0]},) tensor, got {shape}")
    if labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise ValueError(f"labels must be integer class indices, got {labels.dtype}")
    return "labels"


def _patch_position_table(
    model: nn.Module, grid: Grid, num_prefix: int
) -> tuple[nn.Parameter | None, int, str | None]:
    """The learned pos_embed, the row where the patch part starts, or why there is none."""
    pos = getattr(model, "pos_embed", None)
    if not isinstance(pos, nn.Parameter):
        return None, 0, "model has no learned position embedding (pos_embed is None or fixed)"
    offset = 0 if getattr(model, "no_embed_class", False) else num_prefix
    if pos.ndim != 3 or pos.shape[1] - offset != grid.num_patches:
        return (
            None,
            0,
            (
                f"pos_embed {tuple(pos.shape)} does not cover the {grid.height}x"
                f"{grid.width} grid after {offset} prefix rows"
            ),
        )
    return pos, offset, None


def _process_batch(
    model: nn.Module,
    capture: _Capture,
    images: Tensor,
    labels: Tensor | None,
    on_attention: BatchAttentionCallback | None,
    acc: _Accumulator,
    grid: Grid,
    bins: _Bins,
    num_prefix: int,
    params: list[nn.Parameter],
    pos_param: nn.Parameter | None,
    has_norm: list[bool],
    objective: ClassifierObjective | InstanceDiscrimination,
) -> None:
    capture.reset()
    logits = model(images)
    if not isinstance(logits, Tensor) or logits.ndim != 2:
        raise ValueError("model output is not (B, num_classes) logits")
    for i, taps in enumerate(capture.taps):
        if taps.calls != 1 or taps.q is None or taps.k is None or taps.probs is None:
            raise RuntimeError(
                f"block {i}: attention probabilities were not seen exactly once (saw "
                f"{taps.calls}); the attention does not run timm's manual path"
            )
        tokens = taps.probs.shape[-1]
        if tokens - num_prefix != grid.num_patches:
            raise ValueError(
                f"block {i} attends over {tokens} tokens = {num_prefix} prefix + "
                f"{tokens - num_prefix} patches, but the grid {grid.height}x{grid.width} has "
                f"{grid.num_patches} patches"
            )
    if on_attention is not None:
        with torch.no_grad():
            for i, taps in enumerate(capture.taps):
                on_attention(i, taps.probs.detach(), acc.n)
    loss = objective.loss(logits, labels)

    L = len(capture.taps)
    pending: list[dict[str, Tensor]] = [{} for _ in range(L)]
    finished = [False] * L
    needed = [
        ("q", "k", "p", "q_pre", "k_pre") if has_norm[i] else ("q", "k", "p") for i in range(L)
    ]

    def finish(i: int) -> None:
        got = pending[i]
        with torch.no_grad():
            _layer_stats(
                i,
                capture,
                acc,
                grid,
                num_prefix,
                got["G"],
                got["q"],
                got["k"],
                got.get("q_pre"),
                got.get("k_pre"),
            )
        pending[i] = {}
        finished[i] = True
        taps = capture.taps[i]  # the graph keeps what backward still needs
        taps.q = taps.k = taps.probs = taps.q_pre = taps.k_pre = None

    def on_grad(i: int, name: str) -> Any:
        def hook(grad: Tensor) -> None:
            if finished[i]:
                return
            got = pending[i]
            if name == "p":  # rebuild G now and drop dL/dP
                with torch.no_grad():
                    # G in the model's precision, as autograd's own softmax backward forms
                    # it; one new (B, H, T, T) buffer
                    buffer = grad.detach().clone()
                    got["G"] = logit_gradient(capture.taps[i].probs.detach(), buffer, in_place=True)
                got["p"] = grad.new_empty(0)
            else:
                got[name] = grad.detach()
            if all(k in got for k in needed[i]):
                finish(i)

        return hook

    # Every layer's statistics are computed inside backward as soon as its dL/dP, dL/dQ and
    # dL/dK exist, so at most a layer or two of attention gradients live at any time; the
    # single autograd.grad call only returns the parameter gradients.
    for i, taps in enumerate(capture.taps):
        taps.probs.register_hook(on_grad(i, "p"))
        taps.q.register_hook(on_grad(i, "q"))
        taps.k.register_hook(on_grad(i, "k"))
        if has_norm[i]:
            taps.q_pre.register_hook(on_grad(i, "q_pre"))
            taps.k_pre.register_hook(on_grad(i, "k_pre"))
    grads = torch.autograd.grad(loss, list(params), allow_unused=True)
    grads = [torch.zeros_like(x) if g is None else g for x, g in zip(params, grads, strict=True)]
    # A tensor the loss does not reach gets no hook call: its gradient is zero.
    for i in range(L):
        if finished[i]:
            continue
        taps, got = capture.taps[i], pending[i]
        if "p" not in got:
            got["G"] = torch.zeros_like(taps.probs)
        for name in ("q", "k", "q_pre", "k_pre"):
            if name in needed[i] and name not in got:
                got[name] = torch.zeros_like(getattr(taps, name))
        finish(i)

    g_qkv = grads[:L]
    g_pos = grads[L] if pos_param is not None else None
    with torch.no_grad():
        acc.n += images.shape[0]
        acc.loss_sum += float(loss.item())
        if g_pos is not None:
            g = g_pos.detach().double()
            acc.pos_grad = g if acc.pos_grad is None else acc.pos_grad + g
        for i in range(L):
            g = g_qkv[i].detach().double()
            acc.qkv_grad[i] = g if acc.qkv_grad[i] is None else acc.qkv_grad[i] + g
    del grads


def _layer_stats(
    i: int,
    capture: _Capture,
    acc: _Accumulator,
    grid: Grid,
    num_prefix: int,
    G: Tensor,
    g_q: Tensor,
    g_k: Tensor,
    g_q_pre: Tensor | None,
    g_k_pre: Tensor | None,
) -> None:
    """Add layer ``i``'s sums for one batch; ``G`` (B, H, T, T) is dL/ds.

    The (B, H, T, T) products run in the model's precision (float32: the same arithmetic as
    autograd's own backward); every sum is accumulated in float64.
    """
    taps = capture.taps[i]
    scale = float(capture.attns[i].scale)
    Q, K = taps.q.detach(), taps.k.detach()
    gQ, gK = g_q, g_k
    Gt = G.transpose(-1, -2)
    acc.fq[i] += _agreement_sums(gQ, scale * G @ K)
    acc.fk[i] += _agreement_sums(gK, scale * Gt @ Q)
    if g_q_pre is not None:
        Qp, Kp = taps.q_pre.detach(), taps.k_pre.detach()
        acc.fq_pre[i] += _agreement_sums(g_q_pre, scale * G @ Kp)
        acc.fk_pre[i] += _agreement_sums(g_k_pre, scale * Gt @ Qp)

    p = num_prefix
    pressure = G[:, :, p:, p:].sum(0).neg_()  # (H, N, N), summed over images
    acc.pressure[i] += grid.bin_mean(pressure.double()).cpu()  # bins sum thousands of pairs
    if p:
        acc.prefix_pressure[i] += (-G[:, :, p:, :p].sum(-1)).mean(-1).sum(0).cpu()
    del Gt, pressure
    rate = summed_cosine_change_rate(Q[:, :, p:], K[:, :, p:], gQ[:, :, p:], gK[:, :, p:])
    acc.angle[i] += grid.bin_mean(rate.double()).cpu()


# --------------------------------------------------------------------------------------
# Assembly
# --------------------------------------------------------------------------------------


def _assemble(
    acc: _Accumulator,
    attns: list[nn.Module],
    grid: Grid,
    bins: _Bins,
    num_prefix: int,
    has_norm: list[bool],
    labels_source: str | None,
    pos_param: nn.Parameter | None,
    pos_offset: int,
    pos_reason: str | None,
    eta: float | None,
) -> SectionResult:
    n = acc.n
    L = len(attns)
    formula = _formula_section(acc, attns, has_norm)

    layers = []
    pressure_arr = np.full(
        (L, max(int(a.num_heads) for a in attns), grid.num_distance_bins), np.nan
    )
    angle_arr = np.full_like(pressure_arr, np.nan)
    layers_holding = 0
    for i in range(L):
        pres = (acc.pressure[i] / n).numpy()
        ang = (acc.angle[i] / n).numpy()
        H = pres.shape[0]
        pressure_arr[i, :H] = pres
        angle_arr[i, :H] = ang
        head_rows = []
        for h in range(H):
            pattern = sign_pattern(pres[h], bins)
            head_rows.append(
                {
                    "head": h,
                    "logit_pressure_per_bin": _jsonable(pres[h]),
                    "spearman_distance": finite_or_none(bins.spearman(pres[h])),
                    "near": pattern["near"],
                    "far": pattern["far"],
                    "sign_pattern": pattern["holds"],
                    "margin": pattern["margin"],
                    "prefix_key_pressure": (
                        finite_or_none(float(acc.prefix_pressure[i][h]) / n) if num_prefix else None
                    ),
                    "angle_pressure_per_bin": _jsonable(ang[h]),
                    "angle_spearman_distance": finite_or_none(bins.spearman(ang[h])),
                }
            )
        mean_pres = pres.mean(0)
        mean_ang = ang.mean(0)
        pattern = sign_pattern(mean_pres, bins)
        holds = pattern["holds"]
        layers_holding += int(bool(holds))
        n_yes = sum(1 for r in head_rows if r["sign_pattern"])
        layers.append(
            {
                "layer": i,
                "num_heads": H,
                "logit_pressure_per_bin": _jsonable(mean_pres),
                "spearman_distance": finite_or_none(bins.spearman(mean_pres)),
                "near": pattern["near"],
                "far": pattern["far"],
                "near_minus_far": pattern["near_minus_far"],
                "story_holds": holds,
                "undecided_reason": pattern.get("reason"),
                "margin": pattern["margin"],
                "heads_with_sign_pattern": n_yes,
                "angle_pressure_per_bin": _jsonable(mean_ang),
                "angle_spearman_distance": finite_or_none(bins.spearman(mean_ang)),
                "angle_pattern": sign_pattern(mean_ang, bins)["holds"],
                "heads": head_rows,
            }
        )

    divergence, div_q, div_k = _head_divergence(acc, attns)
    pos, pos_arrays, sgd = _position_section(
        acc, grid, bins, pos_param, pos_offset, pos_reason, eta
    )
    verdict = _verdict(layers, layers_holding, pos, formula)

    data: dict[str, Any] = {
        "available": True,
        "loss": acc.loss_sum / n,
        "labels_source": labels_source,
        "num_images": n,
        "grid": [grid.height, grid.width],
        "num_prefix_tokens": num_prefix,
        "distance_bins": {
            "centres_patches": _jsonable(bins.centres),
            "pair_counts": [int(c) for c in bins.counts],
            "near_bins": list(bins.near),
            "far_bins": list(bins.far),
        },
        "units": (
            "logit pressure = -dL/ds per image (dL/ds of that image's own loss), mean "
            "over images and over the pairs of a bin; angle pressure = d cos(Q_i, K_j) "
            "per unit gradient step on the image's Q and K"
        ),
        "formula_check": formula,
        "sgd_step_check": sgd,
        "layers": layers,
        "position_embedding": pos,
        "head_divergence": divergence,
        "verdict": verdict,
    }
    arrays = {
        "gradient_logit_pressure": pressure_arr,
        "gradient_angle_pressure": angle_arr,
        "gradient_distance_bin_centres": bins.centres.astype(np.float64),
        "gradient_head_divergence_q": div_q,
        "gradient_head_divergence_k": div_k,
        **pos_arrays,
    }
    from workers.analysis import plots_gradients

    figures = {
        "gradient_logit_pressure": plots_gradients.plot_logit_pressure(
            pressure_arr, bins.centres, near_bins=bins.near, far_bins=bins.far
        ),
    }
    if "gradient_pos_cos_change_rate" in pos_arrays:
        figures["gradient_pos_pressure"] = plots_gradients.plot_pos_pressure(
            pos_arrays["gradient_pos_cos_change_rate"], grid
        )
    return SectionResult(data=data, arrays=arrays, figures=figures)


def _formula_section(
    acc: _Accumulator, attns: list[nn.Module], has_norm: list[bool]
) -> dict[str, Any]:
    rows = []
    cos_q_all, cos_k_all, err_q_all, err_k_all = [], [], [], []
    for i, attn in enumerate(attns):
        cq_h, eq_h, cq, eq = _agreement(acc.fq[i])
        ck_h, ek_h, ck, ek = _agreement(acc.fk[i])
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
            _, _, pq, peq = _agreement(acc.fq_pre[i])
            _, _, pk, pek = _agreement(acc.fk_pre[i])
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
        "scale * G K and scale * G^T Q, per head, over all images and tokens."
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
        "tolerance": {"min_cosine": FORMULA_MIN_COSINE, "max_rel_error": FORMULA_MAX_REL_ERROR},
        "qk_location": "post-norm" if any_norm else "projection (no q/k norm)",
        "note": note,
        "layers": rows,
    }


def _head_divergence(
    acc: _Accumulator, attns: list[nn.Module]
) -> tuple[dict[str, Any], np.ndarray, np.ndarray]:
    L = len(attns)
    H = max(int(a.num_heads) for a in attns)
    div_q = np.full((L, H, H), np.nan)
    div_k = np.full((L, H, H), np.nan)
    rows = []
    for i, attn in enumerate(attns):
        h, d = int(attn.num_heads), int(attn.head_dim)
        g = acc.qkv_grad[i] / acc.n  # gradient of the mean loss, (3 * h * d, C)
        gq = g[: h * d].reshape(h, -1).cpu()
        gk = g[h * d : 2 * h * d].reshape(h, -1).cpu()
        div_q[i, :h, :h] = pairwise_cosine(gq).numpy()
        div_k[i, :h, :h] = pairwise_cosine(gk).numpy()
        rows.append(
            {
                "layer": i,
                "mean_pairwise_cosine_q": finite_or_none(mean_pairwise_cosine(gq)),
                "mean_pairwise_cosine_k": finite_or_none(mean_pairwise_cosine(gk)),
                "grad_norm_per_head_q": _jsonable(gq.norm(dim=-1).numpy()),
                "grad_norm_per_head_k": _jsonable(gk.norm(dim=-1).numpy()),
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


def _cosine_matrix(table: Tensor) -> Tensor:
    unit = table / table.norm(dim=-1, keepdim=True).clamp_min(_EPS)
    return unit @ unit.T


def _position_section(
    acc: _Accumulator,
    grid: Grid,
    bins: _Bins,
    pos_param: nn.Parameter | None,
    offset: int,
    reason: str | None,
    eta: float | None,
) -> tuple[dict[str, Any], dict[str, np.ndarray], dict[str, Any]]:
    if pos_param is None or acc.pos_grad is None:
        why = reason or "no gradient reached the position embedding"
        return (
            {"available": False, "reason": why},
            {},
            {"available": False, "reason": why, "correlation": None, "eta": None},
        )
    N = grid.num_patches
    table = pos_param.detach()[0, offset : offset + N].double().cpu()  # a copy, float64
    g = (acc.pos_grad[0, offset : offset + N] / acc.n).cpu()  # gradient of the mean loss
    g_norm, p_norm = float(g.norm()), float(table.norm())
    if g_norm == 0.0:
        why = "the loss gradient on the position embedding is exactly zero"
        return (
            {"available": False, "reason": why},
            {},
            {"available": False, "reason": why, "correlation": None, "eta": None},
        )
    if eta is None:
        eta = SGD_CHECK_STEP_RATIO * p_norm / g_norm
    if not (eta > 0 and math.isfinite(eta)):
        raise ValueError(f"eta must be a positive finite step size, got {eta}")

    rate = cosine_change_rate(table, table, g, g)  # (N, N), per unit eta
    predicted = eta * rate
    before = _cosine_matrix(table)
    after = _cosine_matrix(table - eta * g)  # one SGD step on a copy of the table only
    real = after - before
    off = ~torch.eye(N, dtype=torch.bool)
    if N > 2:
        corr = float(np.corrcoef(real[off].numpy(), predicted[off].numpy())[0, 1])
    else:
        corr = float("nan")
    sgd = {
        "available": True,
        "correlation": finite_or_none(corr),
        "eta": eta,
        "step_ratio": eta * g_norm / p_norm,
        "max_abs_real_change": float(real[off].abs().max()) if N > 1 else 0.0,
        "passed": bool(np.isfinite(corr) and corr > SGD_CHECK_MIN_CORRELATION),
        "min_correlation": SGD_CHECK_MIN_CORRELATION,
        "description": (
            "Pearson correlation, over patch pairs i != j, between the real change "
            "of cos(pos_i, pos_j) after one SGD step of size eta on a copy of the "
            "position table and the first-order prediction; near 1 for a small "
            "step"
        ),
    }

    rate_bins = grid.bin_mean(rate, include_self=False).numpy()
    grad_sim = grid.bin_mean(_cosine_matrix(g), include_self=False).numpy()
    dist = grid.distances
    rho = _spearman(dist[off].numpy(), rate[off].numpy()) if N > 2 else float("nan")
    pattern = sign_pattern(np.nan_to_num(rate_bins, nan=0.0), bins)
    per_patch_pull = (rate * grid.neighbour_mask(4)).sum(-1) / grid.neighbour_mask(4).sum(-1)
    pos = {
        "available": True,
        "rows": f"pos_embed[0, {offset}:{offset + N}] (patch tokens; prefix rows excluded)",
        "grad_norm": g_norm,
        "table_norm": p_norm,
        "eta": eta,
        "cos_change_rate_per_bin": _jsonable(rate_bins),
        "cos_change_per_bin": _jsonable(eta * rate_bins),
        "spearman_distance": finite_or_none(rho),
        "near": pattern["near"],
        "far": pattern["far"],
        "story_holds": pattern["holds"],
        "margin": pattern["margin"],
        "grad_cosine_per_bin": _jsonable(grad_sim),
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
    return pos, arrays, sgd


def _verdict(
    layers: list[dict[str, Any]], layers_holding: int, pos: dict[str, Any], formula: dict[str, Any]
) -> dict[str, Any]:
    """Plain-language verdict: the logit part holds in a strict majority of the layers whose
    patch-to-patch logits the loss reaches, and (when a learned table exists) the position
    part holds too. ``story_holds`` is None when no layer could be judged."""
    L = len(layers)
    decided = [r for r in layers if r["story_holds"] is not None]
    undecided = [r["layer"] for r in layers if r["story_holds"] is None]
    logit_holds: bool | None = (layers_holding * 2 > len(decided)) if decided else None
    parts = []
    if decided:
        failing = [r for r in decided if not r["story_holds"]]
        text = (
            f"in {layers_holding} of {len(decided)} layers the loss raises patch-to-patch "
            "attention logits for neighbours and lowers them far away (head-mean pressure "
            "near > 0 > far)"
        )
        if failing:
            worst = min(failing, key=lambda r: r["margin"])
            text += (
                f", not in layer(s) {', '.join(str(r['layer']) for r in failing)} (worst: layer "
                f"{worst['layer']}, near {worst['near']:.3g}, far {worst['far']:.3g})"
            )
        parts.append(text)
    else:
        parts.append(
            "no layer could be judged (grid too small, or the loss reaches no patch-to-patch logit)"
        )
    if undecided and decided:
        parts.append(f"layer(s) {', '.join(map(str, undecided))} not judged (see undecided_reason)")
    pos_holds: bool | None = None
    if pos.get("available"):
        pos_holds = pos["story_holds"]
        rho = pos["spearman_distance"]
        rho_txt = f"{rho:.2f}" if rho is not None else "n/a"
        parts.append(
            (
                "neighbouring position embeddings are pulled together and distant ones pushed "
                if pos_holds
                else "the gradient does NOT pull neighbouring position embeddings together while "
                "pushing distant ones "
            )
            + f"apart (cosine-change vs distance Spearman {rho_txt})"
        )
    else:
        parts.append(f"position embedding not analysed ({pos.get('reason')})")
    story: bool | None = None if logit_holds is None else (logit_holds and pos_holds is not False)
    if story is None:
        lead = "The story cannot be judged here: "
    else:
        lead = "The story holds: " if story else "The story does not hold here: "
    summary = lead + "; ".join(parts) + "."
    if not formula["passed"]:
        summary += " Warning: the formula check failed, so these numbers are suspect."
    return {
        "story_holds": story,
        "logit_pressure_holds": logit_holds,
        "layers_holding": layers_holding,
        "layers_judged": len(decided),
        "num_layers": L,
        "position_embedding_holds": pos_holds,
        "position_embedding_margin": pos.get("margin"),
        "layer_margins": [r["margin"] for r in layers],
        "summary": summary,
    }
