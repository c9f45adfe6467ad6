"""Q/K geometry: did the queries and keys themselves become spatial?

The position embedding (``position_embedding``) is the state of the table, the heads'
attention (``heads``) is behaviour, the loss gradient on Q/K (``gradients``) is pressure.
This module measures the *state of Q and K* in one checkpoint, two ways:

**Alignment vs distance** (on the probe images). For every layer and head, the cosine
between the query of patch i and the key of patch j, as they enter the logits (the outputs of
``attn.q_norm`` / ``attn.k_norm``, before ``attn.scale``), averaged per image over the pairs
in each grid-distance bin (`Grid.distance_bins`). The same vectors with the patch positions
shuffled (one seeded permutation per image) give the baseline: shuffling keeps every cosine
and destroys only its relation to distance. Per head: ``alignment_near`` (bin 1: the 8
neighbours), ``alignment_far`` (bins from half the largest distance on), their difference
``alignment_gap`` and ``alignment_spearman`` (rank correlation of the per-bin mean cosine
with distance; negative when alignment falls with distance), each with a bootstrap interval
over images. Streaming: per batch and layer the (B, heads, N, N) cosines are reduced to
(B, heads, bins) before the next layer runs.

Alignment on images mixes two causes: position, and content that is similar in
neighbouring patches (natural images are smooth). A head that compares colours shows a
near > far gap with no position in it at all. Hence the second measurement:

**Positional kernel** (position alone). The model runs once on a sequence in which every
patch token carries the same content, the probe-set mean of the patch embedding's output
(mean over images and patches), plus its own position embedding; prefix tokens are as usual.
Every difference between tokens is then positional by construction. At layer 0 the logits
are those of ``mean content + pos_i``; at a deeper layer they are the logits of what the
earlier blocks make of the position signal at the mean content (the position's effect at
the model's average operating point, not an average of per-image effects). We chose the
mean patch embedding over the per-position mean input of each block because the latter
keeps the content statistics of each place (sky at the top, ground at the bottom), which is
content, not position.

From those logits s_ij (scaled, as the softmax sees them), the kernel k(dr, dc) is the
least-squares fit ``s_ij ~ k(r_j - r_i, c_j - c_i) + f(i)``: translation-invariant in the
offset, up to a per-query shift f(i) that the softmax ignores (backfitting,
`KERNEL_FIT_ITERATIONS`). A (2H-1) x (2W-1) kernel per head, centred so that its mean over
all (i, j) pairs is 0; ``kernel_r2`` says how much of the within-query logit variance the
offset alone explains (1 for a pure relative-position head).

The kernel's label comes from the attention it would produce on its own grid,
``P_ij = softmax_j k(offset_ij)``, measured with the head-label rules and thresholds of
`workers.analysis.heads` (relative to uniform attention on the same grid, so a planted head
gets the same label on 8x8 and 14x14). Without an absolute position table (``pos_embed`` is
None) the kernel is ``available: false`` with the reason.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from workers.analysis.bootstrap import CI_LEVEL, resample_weights
from workers.analysis.capture import attention_sites, evaluating, iter_batches, qk_capture
from workers.analysis.grid import Grid, grid_from_model
from workers.analysis.heads import (
    AXIS_SCORE_MIN,
    GLOBAL_DISTANCE_RATIO_MIN,
    GLOBAL_SUPPORT_SHARE_MIN,
    LOCAL_DISTANCE_RATIO_MAX,
    GridBaselines,
)
from workers.analysis.results import SectionResult, finite_or_none, unavailable

KERNEL_LABELS: tuple[str, ...] = ("local", "horizontal", "vertical", "global", "mixed")
# First matching rule wins, in this order; the scores are those of `heads` computed on the
# kernel's own attention P_ij = softmax_j k(offset_ij), with the same thresholds.
KERNEL_LABEL_RULES: dict[str, str] = {
    "local": f"distance_ratio <= {LOCAL_DISTANCE_RATIO_MAX}",
    "horizontal": f"horizontal >= {AXIS_SCORE_MIN}",
    "vertical": f"vertical >= {AXIS_SCORE_MIN}",
    "global": (
        f"distance_ratio >= {GLOBAL_DISTANCE_RATIO_MIN} and "
        f"support_share >= {GLOBAL_SUPPORT_SHARE_MIN}"
    ),
    "mixed": "no rule above matched",
}
ALIGNMENT_SOURCES: tuple[str, ...] = ("position", "content", "none")

BOOTSTRAP_RESAMPLES = 200
# Backfitting of k(offset) + f(query): the residual shrinks ~30x per 5 sweeps (measured on
# random kernels of 8x8, 6x10 and 14x14 grids), so 20 sweeps leave ~1e-7 of the logit scale
# in float32 (0.4 s for 72 heads on 14x14, one core).
KERNEL_FIT_ITERATIONS = 20
# Position-only alignment gap (cosine, near minus far) that counts as positional. The gap of
# i.i.d. random position vectors is ~1/sqrt(head_dim * pairs) (< 0.02 on a 8x8 grid with
# head_dim 4); a 2-D sin-cos code read by W_Q = W_K scores ~0.3 or more.
POSITIONAL_GAP_MIN = 0.05
# Kernel cells within this share of the kernel's range from its maximum tie for the peak
# (float32 fitting noise is ~1e-7 of the range).
PEAK_TIE_TOLERANCE = 1e-4
_NORM_EPS = 1e-12  # F.normalize floor: a zero Q or K has cosine 0 with everything


# ------------------------------------------------------------------------------ geometry


@dataclass(frozen=True)
class DistanceBins:
    """The grid's distance bins as this section pools them.

    ``near`` is bin 1 (the 8 neighbours: distances 1 and 1.41); ``far`` the non-empty bins
    from ``max(2, ceil(num_bins / 2))`` on. ``near_weights`` / ``far_weights`` pool a
    per-bin mean profile pair-weighted (each bin counts with its number of pairs).
    """

    grid: Grid
    counts: Tensor  # (num_bins,) pairs per bin
    centres: Tensor  # (num_bins,) mean distance per bin
    near: tuple[int, ...]
    far: tuple[int, ...]

    @classmethod
    def of(cls, grid: Grid) -> DistanceBins:
        nb = grid.num_distance_bins
        counts = torch.bincount(grid.distance_bins.reshape(-1), minlength=nb).double()
        near = tuple(b for b in (1,) if b < nb and counts[b] > 0)
        far = tuple(b for b in range(max(2, math.ceil(nb / 2)), nb) if counts[b] > 0)
        return cls(grid, counts, grid.bin_centres.double(), near, far)

    def weights(self, bins: tuple[int, ...]) -> Tensor:
        w = torch.zeros_like(self.counts)
        if bins:
            w[list(bins)] = self.counts[list(bins)]
            w /= w.sum()
        return w

    @property
    def ranked(self) -> Tensor:
        """Bins that enter the Spearman correlation: non-empty, self-pairs excluded."""
        return torch.nonzero((self.counts > 0) & (torch.arange(len(self.counts)) >= 1))[:, 0]


def _ranks(values: Tensor) -> Tensor:
    """Ranks along the last dim (1 = smallest); exact ties get consecutive ranks in index
    order, which only a constant profile (handled by the caller) or degenerate heads have."""
    return values.argsort(-1).argsort(-1).to(values.dtype) + 1


def spearman_with_distance(profiles: Tensor, bins: DistanceBins) -> Tensor:
    """Spearman correlation of per-bin profiles (..., num_bins) with bin distance, bins >= 1.

    In [-1, 1]; negative when the value falls with distance; NaN for a constant profile or
    fewer than 3 bins. Vectorised over the leading dims (the bootstrap calls it on every
    resample at once).
    """
    keep = bins.ranked
    if len(keep) < 3:
        return torch.full(profiles.shape[:-1], math.nan, dtype=torch.float64)
    values = profiles[..., keep].double()
    y = _ranks(values)
    x = torch.arange(len(keep), dtype=torch.float64)  # bin centres increase with the bin
    x, y = x - x.mean(), y - y.mean(-1, keepdim=True)
    rho = (y * x).sum(-1) / (x.norm() * y.norm(dim=-1))
    constant = values.amax(-1) == values.amin(-1)
    return torch.where(constant, math.nan, rho)


def _offset_index(grid: Grid) -> Tensor:
    """(N * N,) long: the kernel cell of each (query, key) pair, row-major over
    (dr + H - 1, dc + W - 1)."""
    dr = grid.row_offsets.long() + grid.height - 1
    dc = grid.col_offsets.long() + grid.width - 1
    return (dr * (2 * grid.width - 1) + dc).reshape(-1)


# ------------------------------------------------------------------------------ alignment


def pair_cosines(q: Tensor, k: Tensor, num_prefix: int) -> Tensor:
    """(B, H, T, d) Q and K -> (B, H, N, N) float32 cosines between patch queries and keys."""
    if q.shape != k.shape or q.ndim != 4:
        raise ValueError(
            f"q and k must both be (B, H, T, d), got {tuple(q.shape)}, {tuple(k.shape)}"
        )
    qn = F.normalize(q[:, :, num_prefix:].float(), dim=-1, eps=_NORM_EPS)
    kn = F.normalize(k[:, :, num_prefix:].float(), dim=-1, eps=_NORM_EPS)
    return qn @ kn.transpose(-2, -1)


class AlignmentAccumulator:
    """Per-image, per-bin mean Q/K cosine of every layer and head, and the same with the
    patch positions shuffled; memory (images, layers, heads, bins), never N x N x images.

    ``shuffle(start, b)`` must be set for each batch (`stream_qk` does): image ``m`` of the
    stream always gets the permutation ``torch.randperm(N)`` of a generator seeded with
    ``(seed, m)``, so the baseline does not depend on the batch size.
    """

    def __init__(self, grid: Grid, num_prefix: int, num_layers: int, *, seed: int = 0):
        self.grid, self.num_prefix, self.num_layers, self.seed = grid, num_prefix, num_layers, seed
        n, nb = grid.num_patches, grid.num_distance_bins
        self.bin_of = grid.distance_bins.reshape(-1)  # (N*N,) bin of each (query, key) pair
        self.counts = torch.bincount(self.bin_of, minlength=nb).double()
        self.real: list[list[Tensor]] = [[] for _ in range(num_layers)]
        self.shuffled: list[list[Tensor]] = [[] for _ in range(num_layers)]
        self._shuffled_bin_of: Tensor | None = None
        self._n = n

    def start_batch(self, start: int, size: int) -> None:
        """Draw the shuffles of images ``start .. start + size - 1``: image m's shuffled
        pair (i, j) is its real pair (perm[i], perm[j]), so the real cosine at (a, b) counts
        in the bin of (perm^-1[a], perm^-1[b]) (``_shuffled_bin_of``, (B, N*N))."""
        n = self._n
        perms = []
        for m in range(start, start + size):
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + m)
            perms.append(torch.randperm(n, generator=generator))
        perm = torch.stack(perms)  # (B, N)
        flat_perm = (perm[:, :, None] * n + perm[:, None, :]).reshape(size, -1)
        self._shuffled_bin_of = torch.empty_like(flat_perm).scatter_(
            1, flat_perm, self.bin_of.expand_as(flat_perm)
        )

    def _bin_means(self, flat: Tensor, bin_of: Tensor) -> Tensor:
        """(B, H, N*N) values and their bins (N*N or B, 1, N*N) -> (B, H, bins) float64
        per-image bin means (sums in float32: at most N*N terms per image and head)."""
        b, h, _ = flat.shape
        sums = flat.new_zeros(b, h, len(self.counts))
        if bin_of.ndim == 1:
            sums.index_add_(2, bin_of.to(flat.device), flat)
        else:
            sums.scatter_add_(2, bin_of.to(flat.device).expand(b, h, -1), flat)
        return sums.double().cpu() / self.counts.clamp_min(1)

    def __call__(self, layer: int, q: Tensor, k: Tensor) -> None:
        if self._shuffled_bin_of is None or self._shuffled_bin_of.shape[0] != q.shape[0]:
            raise RuntimeError("start_batch(start, size) was not called for this batch")
        cos = pair_cosines(q, k, self.num_prefix)
        b, h, n, _ = cos.shape
        if n != self._n:
            raise ValueError(
                f"{n} patch tokens after {self.num_prefix} prefix tokens do not match the "
                f"{self.grid.height}x{self.grid.width} grid; were the images the model's input size?"
            )
        flat = cos.reshape(b, h, n * n)
        self.real[layer].append(self._bin_means(flat, self.bin_of))
        self.shuffled[layer].append(self._bin_means(flat, self._shuffled_bin_of[:, None, :]))

    def per_image(self) -> tuple[Tensor, Tensor]:
        """(images, layers, heads, bins) float64 profiles: real and shuffled."""
        if not self.real[0]:
            raise ValueError("no images given")
        real = torch.stack([torch.cat(x) for x in self.real], dim=1)
        shuffled = torch.stack([torch.cat(x) for x in self.shuffled], dim=1)
        return real, shuffled


@dataclass
class AlignmentStatistics:
    """Alignment summaries, each (layers, heads) float64 unless stated; NaN where undefined.

    ``near``, ``far``: pair-weighted mean cosine over the near / far bins, in [-1, 1];
    ``gap = near - far``: positive when neighbours' queries and keys point alike more than
    distant ones'; the shuffled baseline scores ~0. ``spearman``: rank correlation of the
    per-bin mean cosine with distance, in [-1, 1]; shuffled ~0. ``*_ci`` are (layers,
    heads, 2) percentile intervals over image resamples. ``profile``: (layers, heads, bins).
    """

    bins: DistanceBins
    num_images: int
    profile: Tensor
    profile_shuffled: Tensor
    values: dict[str, Tensor]  # near, far, gap, spearman, and *_shuffled
    intervals: dict[str, Tensor]  # the same keys -> (layers, heads, 2)


def _summaries(profiles: Tensor, bins: DistanceBins) -> dict[str, Tensor]:
    near = profiles @ bins.weights(bins.near) if bins.near else profiles[..., 0] * math.nan
    far = profiles @ bins.weights(bins.far) if bins.far else profiles[..., 0] * math.nan
    return {
        "near": near,
        "far": far,
        "gap": near - far,
        "spearman": spearman_with_distance(profiles, bins),
    }


def alignment_statistics(
    real: Tensor,
    shuffled: Tensor,
    grid: Grid,
    *,
    resamples: int = BOOTSTRAP_RESAMPLES,
    seed: int = 0,
) -> AlignmentStatistics:
    """Summaries and bootstrap intervals from per-image profiles (images, layers, heads, bins)
    (`AlignmentAccumulator.per_image`); the resamples draw whole images (seeded)."""
    if real.shape != shuffled.shape or real.ndim != 4 or real.shape[0] == 0:
        raise ValueError(
            f"profiles must be two equal (images, L, H, bins) tensors, got {tuple(real.shape)}"
        )
    bins = DistanceBins.of(grid)
    m = real.shape[0]
    weights = resample_weights(m, resamples, seed=seed)
    values, intervals = {}, {}
    tail = (1 - CI_LEVEL) / 2
    q = torch.tensor([tail, 1 - tail], dtype=torch.float64)
    for suffix, per_image in (("", real), ("_shuffled", shuffled)):
        mean = per_image.mean(0)
        resampled = torch.einsum("rm,m...->r...", weights, per_image)  # (R, L, H, bins)
        point, boot = _summaries(mean, bins), _summaries(resampled, bins)
        for key in point:
            values[key + suffix] = point[key]
            intervals[key + suffix] = torch.nanquantile(boot[key], q, dim=0).movedim(0, -1)
    return AlignmentStatistics(bins, m, real.mean(0), shuffled.mean(0), values, intervals)


def alignment_verdicts(
    stats: AlignmentStatistics,
) -> tuple[list[list[bool | None]], list[list[str | None]]]:
    """Per head: is the near-minus-far gap above what shuffled positions give?

    ``True`` when the gap's interval lies entirely above the shuffled gap's interval;
    ``False`` when its upper end does not reach above the shuffled interval's upper end;
    ``None`` (undecided) when the interval straddles it, with the reason.
    """
    gap, shuffled = stats.intervals["gap"], stats.intervals["gap_shuffled"]
    verdicts, reasons = [], []
    for layer in range(gap.shape[0]):
        row, why = [], []
        for head in range(gap.shape[1]):
            lo, hi = (float(x) for x in gap[layer, head])
            s_hi = float(shuffled[layer, head, 1])
            if not all(math.isfinite(x) for x in (lo, hi, s_hi)):
                row.append(None)
                why.append("no near or far bins on this grid")
            elif lo > s_hi:
                row.append(True)
                why.append(None)
            elif hi <= s_hi:
                row.append(False)
                why.append(None)
            else:
                row.append(None)
                why.append("the gap's interval overlaps the shuffled baseline's upper end")
        verdicts.append(row)
        reasons.append(why)
    return verdicts, reasons


def alignment_source(above_shuffled: bool | None, positional_gap: float | None) -> str | None:
    """Where a head's alignment comes from: ``position`` when the gap on images is above the
    shuffled baseline and position alone gives a gap of at least `POSITIONAL_GAP_MIN`;
    ``content`` when it is above the baseline but position alone does not give it (e.g. a
    head that compares colours on smooth images); ``none`` when it is not above; None when
    undecided or when position alone could not be measured."""
    if above_shuffled is None:
        return None
    if not above_shuffled:
        return "none"
    if positional_gap is None or not math.isfinite(positional_gap):
        return None
    return "position" if positional_gap >= POSITIONAL_GAP_MIN else "content"


# ------------------------------------------------------------------------------ kernels


@contextmanager
def _mean_content(model: nn.Module, content: Tensor) -> Iterator[None]:
    """Every forward inside sees ``content`` (dim,) as the output of every patch token of
    ``model.patch_embed`` (position embedding and prefix tokens are added as usual)."""

    def hook(_module: nn.Module, _inputs: tuple, output: Tensor) -> Tensor:
        return content.to(output.device, output.dtype).expand_as(output).clone()

    handle = model.patch_embed.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def positional_logits(model: nn.Module, content: Tensor) -> tuple[Tensor, Tensor]:
    """Patch-to-patch logits and Q/K cosines of every layer and head with the content held at
    ``content`` (dim,): (layers, heads, N, N) float64 logits (scaled, as the softmax sees
    them) and float32 cosines. One forward of a single sequence; the model is left as found."""
    sites = attention_sites(model)
    num_prefix = int(getattr(model, "num_prefix_tokens", 0))
    logits: dict[int, Tensor] = {}
    cosines: dict[int, Tensor] = {}
    scales = {s.layer: float(s.module.scale) for s in sites}

    def collect(layer: int, q: Tensor, k: Tensor) -> None:
        qp, kp = q[0, :, num_prefix:].double(), k[0, :, num_prefix:].double()
        logits[layer] = (qp @ kp.transpose(-2, -1)) * scales[layer]
        cosines[layer] = pair_cosines(q[:1], k[:1], num_prefix)[0]

    device = next(model.parameters()).device
    size = model.patch_embed.img_size
    h, w = (size, size) if isinstance(size, int) else size
    channels = int(model.patch_embed.proj.in_channels)
    blank = torch.zeros(1, channels, int(h), int(w), device=device)
    with (
        evaluating(model),
        _mean_content(model, content),
        qk_capture(model, collect),
        torch.no_grad(),
    ):
        model.forward_features(blank)
    order = sorted(logits)
    return torch.stack([logits[i].cpu() for i in order]), torch.stack(
        [cosines[i].cpu() for i in order]
    )


def offset_kernel(
    logits: Tensor, grid: Grid, *, iterations: int = KERNEL_FIT_ITERATIONS
) -> tuple[Tensor, Tensor]:
    """Fit ``logits[..., i, j] ~ k(r_j - r_i, c_j - c_i) + f(i)`` by least squares.

    Returns the kernels (..., 2H - 1, 2W - 1) float64, centred so that the mean of
    ``k(offset_ij)`` over all pairs is 0, and ``r2`` (...,): the share of the within-query
    logit variance the kernel explains, in [0, 1] (1 for a purely relative-position head;
    NaN for logits that do not vary within a query). f(i) is free because the softmax
    ignores a per-query shift. Backfitting: alternate the two exact partial updates
    (`KERNEL_FIT_ITERATIONS` sweeps).
    """
    n = grid.num_patches
    if logits.shape[-2:] != (n, n):
        raise ValueError(f"logits {tuple(logits.shape)} do not end in ({n}, {n})")
    lead = logits.shape[:-2]
    # (N, N, heads), contiguous: every sweep indexes pairs along dim 0
    s = logits.reshape(-1, n, n).permute(1, 2, 0).to(torch.float32).contiguous()
    index = _offset_index(grid)
    cells = (2 * grid.height - 1) * (2 * grid.width - 1)
    counts = torch.bincount(index, minlength=cells).clamp_min(1).to(s.dtype)[:, None]
    shift = s.mean(1, keepdim=True)
    kernel = torch.zeros(cells, s.shape[-1], dtype=s.dtype)
    for _ in range(iterations):
        kernel = (
            torch.zeros_like(kernel).index_add_(0, index, (s - shift).reshape(n * n, -1)) / counts
        )
        shift = (s - kernel[index].reshape(n, n, -1)).mean(1, keepdim=True)
    fitted = kernel[index].reshape(n, n, -1)
    centred = s - s.mean(1, keepdim=True)
    residual = s - shift - fitted
    total = centred.pow(2).sum((0, 1)).double()
    r2 = 1 - residual.pow(2).sum((0, 1)).double() / total.clamp_min(1e-300)
    r2 = torch.where(total > 1e-12 * n * n, r2.clamp(0.0, 1.0), math.nan)
    kernel = kernel.double() - fitted.double().mean((0, 1))
    shape = (*lead, 2 * grid.height - 1, 2 * grid.width - 1)
    return kernel.T.reshape(shape), r2.reshape(lead)


@dataclass
class KernelScores:
    """Scores of the attention a kernel produces on its grid, P_ij = softmax_j k(offset_ij);
    each (...,) float64, with the meaning and range of the same names in
    `workers.analysis.heads.HeadStatistics` (relative to uniform attention on the grid)."""

    local_score: Tensor
    horizontal: Tensor
    distance_ratio: Tensor
    spread_along_rows_patches: Tensor  # attention-weighted mean |d_col|: extent along a row
    spread_along_cols_patches: Tensor  # attention-weighted mean |d_row|: extent along a column
    support_share: Tensor  # exp(entropy) / N: share of patches effectively attended

    @property
    def vertical(self) -> Tensor:
        return -self.horizontal


def kernel_scores(kernels: Tensor, grid: Grid) -> KernelScores:
    """Scores of kernels (..., 2H - 1, 2W - 1) on ``grid`` (see `KernelScores`)."""
    shape = (2 * grid.height - 1, 2 * grid.width - 1)
    if kernels.shape[-2:] != shape:
        raise ValueError(f"kernels {tuple(kernels.shape)} do not end in {shape} for this grid")
    lead = kernels.shape[:-2]
    n = grid.num_patches
    flat = kernels.reshape(-1, shape[0] * shape[1]).double()
    probs = flat[:, _offset_index(grid)].reshape(-1, n, n).softmax(-1)
    base = GridBaselines.of(grid)
    # (N, N, 4) per-pair weights, reduced against every row in one contraction
    weights = torch.stack(
        [
            grid.distances,
            grid.col_offsets.abs(),
            grid.row_offsets.abs(),
            (grid.chebyshev <= 1).double(),
        ],
        dim=-1,
    )
    dist, cols, rows, local = torch.einsum("xij,ijk->kx", probs, weights) / n
    u = base.local_mass + base.self_mass
    local_score = (local - u) / (1 - u) if u < 1 else torch.full_like(local, math.nan)
    c = cols / base.abs_col_offset if base.abs_col_offset > 0 else torch.full_like(cols, math.nan)
    r = rows / base.abs_row_offset if base.abs_row_offset > 0 else torch.full_like(rows, math.nan)
    denom = c + r
    horizontal = torch.where(denom > 1e-12, (c - r) / denom.clamp_min(1e-12), 0.0)
    horizontal = torch.where(denom.isnan(), math.nan, horizontal)
    # normalised entropy (0..1) per query, averaged, as `heads` does; N ** (h - 1) = exp(H) / N
    entropy = -(probs * probs.clamp_min(1e-300).log()).sum(-1).mean(-1) / math.log(n)
    return KernelScores(
        support_share=(float(n) ** (entropy - 1.0)).reshape(lead),
        local_score=local_score.reshape(lead),
        horizontal=horizontal.reshape(lead),
        distance_ratio=(dist / base.mean_distance_patches).reshape(lead),
        spread_along_rows_patches=cols.reshape(lead),
        spread_along_cols_patches=rows.reshape(lead),
    )


def label_kernels(scores: KernelScores) -> list[Any]:
    """A label per kernel from `KERNEL_LABEL_RULES` (first match wins; NaN fails a rule);
    nested lists shaped like the scores."""
    rules = [
        scores.distance_ratio <= LOCAL_DISTANCE_RATIO_MAX,
        scores.horizontal >= AXIS_SCORE_MIN,
        scores.vertical >= AXIS_SCORE_MIN,
        (scores.distance_ratio >= GLOBAL_DISTANCE_RATIO_MIN)
        & (scores.support_share >= GLOBAL_SUPPORT_SHARE_MIN),
    ]
    index = torch.full(scores.local_score.shape, len(rules), dtype=torch.long)
    for i in reversed(range(len(rules))):
        index = torch.where(rules[i], i, index)
    names = np.array(KERNEL_LABELS, dtype=object)
    return names[index.numpy()].tolist()


def kernel_peaks(kernels: Tensor) -> Tensor:
    """(..., 2) long (dr, dc) offset of each kernel's maximum; among cells within
    `PEAK_TIE_TOLERANCE` of the kernel's range from the maximum (a ridge along a row, a flat
    kernel) the one nearest the zero offset."""
    rows, cols = kernels.shape[-2:]
    flat = kernels.reshape(*kernels.shape[:-2], -1).double()
    dr = torch.arange(rows).repeat_interleave(cols) - (rows - 1) // 2
    dc = torch.arange(cols).repeat(rows) - (cols - 1) // 2
    top, low = flat.max(-1, keepdim=True).values, flat.min(-1, keepdim=True).values
    near_top = flat >= top - PEAK_TIE_TOLERANCE * (top - low)
    radius = (dr**2 + dc**2).double()
    best = torch.where(near_top, radius, math.inf).argmin(-1)
    return torch.stack([dr[best], dc[best]], dim=-1)


# ------------------------------------------------------------------------------ section


def _position_table_problem(model: nn.Module) -> str | None:
    """Why the model has no absolute position table to hold content against, or None."""
    from workers.analysis.posembed import extract_position_table

    try:
        extracted = extract_position_table(model)
    except ValueError as error:
        return str(error)
    return None if extracted.table is not None else extracted.detail


class QKObserver:
    """Q/K alignment and the probe-set mean content, fed from any forward over the audited
    images: its own pass (`stream_qk`) or another analysis's (the gradient pass hands each
    layer's Q and K over, so an audit with both runs one forward, not two).

    Inside `watching` a hook on ``model.patch_embed`` keeps the last batch's patch
    embeddings; calling ``observer(layer, q, k, start)`` for layer 0 of a batch (images
    ``start .. start + B - 1``) adds them to the content sum, and every call feeds the
    `AlignmentAccumulator`. Forwards that never call the observer (the gradient section's
    SGD step) add nothing.
    """

    def __init__(self, model: nn.Module, *, seed: int = 0) -> None:
        self.grid = grid_from_model(model)
        self.num_prefix = int(getattr(model, "num_prefix_tokens", 0))
        self.num_layers = len(attention_sites(model))
        self.accumulator = AlignmentAccumulator(
            self.grid, self.num_prefix, self.num_layers, seed=seed
        )
        self.num_images = 0
        self._patches: Tensor | None = None
        self._content_sum: Tensor | None = None
        self._content_count = 0

    @contextmanager
    def watching(self, model: nn.Module) -> Iterator[None]:
        """Keep the patch embedding output of each forward inside (for the content mean)."""

        def on_patches(_module: nn.Module, _inputs: tuple, output: Tensor) -> None:
            self._patches = output.detach()

        handle = model.patch_embed.register_forward_hook(on_patches)
        try:
            yield
        finally:
            handle.remove()
            self._patches = None

    def __call__(self, layer: int, q: Tensor, k: Tensor, start: int) -> None:
        if layer == 0:
            if self._patches is None:
                raise RuntimeError("QKObserver called outside `watching` (no patch embedding)")
            flat = self._patches.reshape(-1, self._patches.shape[-1]).double()
            total = flat.sum(0)
            self._content_sum = total if self._content_sum is None else self._content_sum + total
            self._content_count += flat.shape[0]
            self.accumulator.start_batch(start, q.shape[0])
            self.num_images = max(self.num_images, start + q.shape[0])
        self.accumulator(layer, q.detach(), k.detach())

    def content(self) -> Tensor:
        """(dim,) float32 mean patch-embedding output over the observed images and patches."""
        if self._content_sum is None:
            raise ValueError("no images given")
        return (self._content_sum / self._content_count).float()


def stream_qk(
    model: nn.Module,
    images: Tensor | Iterable[Tensor],
    observer: QKObserver,
    *,
    batch_size: int,
) -> QKObserver:
    """Run ``model`` over ``images`` (model inputs), feeding every layer's Q and K to
    ``observer``; returns it."""
    device = next(model.parameters()).device
    total = 0
    with (
        evaluating(model),
        observer.watching(model),
        torch.no_grad(),
        qk_capture(model, lambda layer, q, k: observer(layer, q, k, total)),
    ):
        for batch in iter_batches(images, batch_size):
            model(batch.to(device))
            total += batch.shape[0]
    if total == 0:
        raise ValueError("no images given")
    return observer


def _f(x: Any) -> float | None:
    return finite_or_none(float(x))


def _interval(x: Tensor) -> list[float | None]:
    return [_f(x[0]), _f(x[1])]


def qk_geometry_section(
    model: nn.Module,
    images: Tensor | Iterable[Tensor] | None,
    *,
    observed: QKObserver | None = None,
    seed: int = 0,
    batch_size: int = 16,
    resamples: int = BOOTSTRAP_RESAMPLES,
) -> SectionResult:
    """The ``qk_geometry`` report section: alignment vs distance on ``images`` (model inputs,
    normalised) with its shuffled baseline and bootstrap intervals, and the positional
    kernel of every head with its label; arrays and the kernel figure. ``observed``: a
    `QKObserver` another pass over the same images already fed (then ``images`` is None
    and no forward over them runs here). A model whose blocks cannot be captured gives
    ``available: false``; one without an absolute position table has
    ``positional_kernel.available: false`` and alignment only."""
    try:
        sites = attention_sites(model)
        grid = grid_from_model(model)
    except ValueError as error:
        return unavailable(str(error))
    if grid.num_patches < 2:
        return unavailable("Q/K geometry needs at least 2 patches")
    num_prefix = int(getattr(model, "num_prefix_tokens", 0))
    if observed is None:
        if images is None:
            raise ValueError("give the images, or a QKObserver that has seen them")
        observed = stream_qk(model, images, QKObserver(model, seed=seed), batch_size=batch_size)
    num_images, content = observed.num_images, observed.content()
    real, shuffled = observed.accumulator.per_image()
    stats = alignment_statistics(real, shuffled, grid, resamples=resamples, seed=seed)
    verdicts, reasons = alignment_verdicts(stats)

    problem = _position_table_problem(model)
    kernels = scores = labels = peaks = r2 = positional_gap = None
    if problem is None:
        logits, cosines = positional_logits(model, content)
        kernels, r2 = offset_kernel(logits, grid)
        scores = kernel_scores(kernels, grid)
        labels = label_kernels(scores)
        peaks = kernel_peaks(kernels)
        positional_profile = grid.bin_mean(cosines.double())
        positional_gap = _summaries(positional_profile, stats.bins)["gap"]

    layers = []
    for layer in range(len(sites)):
        heads = []
        for head in range(real.shape[2]):
            at = (layer, head)
            entry: dict[str, Any] = {"head": head}
            for key in ("near", "far", "gap", "spearman"):
                entry[f"alignment_{key}"] = _f(stats.values[key][at])
                entry[f"alignment_{key}_ci95"] = _interval(stats.intervals[key][at])
                entry[f"alignment_{key}_shuffled"] = _f(stats.values[key + "_shuffled"][at])
                entry[f"alignment_{key}_shuffled_ci95"] = _interval(
                    stats.intervals[key + "_shuffled"][at]
                )
            entry["alignment_above_shuffled"] = verdicts[layer][head]
            if reasons[layer][head]:
                entry["undecided_reason"] = reasons[layer][head]
            pos_gap = None if positional_gap is None else _f(positional_gap[at])
            entry["alignment_positional_gap"] = pos_gap
            entry["alignment_source"] = alignment_source(verdicts[layer][head], pos_gap)
            if scores is not None:
                entry.update(
                    {
                        "positional_kernel_label": labels[layer][head],
                        "positional_kernel_rule": KERNEL_LABEL_RULES[labels[layer][head]],
                        "kernel_peak_offset": [int(x) for x in peaks[at]],
                        "kernel_range": _f(kernels[at].max() - kernels[at].min()),
                        "kernel_r2": _f(r2[at]),
                        "spread_along_rows_patches": _f(scores.spread_along_rows_patches[at]),
                        "spread_along_cols_patches": _f(scores.spread_along_cols_patches[at]),
                        "label_scores": {
                            "local_score": _f(scores.local_score[at]),
                            "horizontal": _f(scores.horizontal[at]),
                            "vertical": _f(scores.vertical[at]),
                            "distance_ratio": _f(scores.distance_ratio[at]),
                        },
                    }
                )
            heads.append(entry)
        layers.append(
            {
                "layer": layer,
                "alignment_gap_mean": _f(stats.values["gap"][layer].mean()),
                "alignment_spearman_mean": _f(torch.nanmean(stats.values["spearman"][layer])),
                "heads": heads,
            }
        )

    flat_verdicts = [v for row in verdicts for v in row]
    flat_sources = [h["alignment_source"] for layer in layers for h in layer["heads"]]
    data: dict[str, Any] = {
        "available": True,
        "num_images": num_images,
        "grid": [grid.height, grid.width],
        "num_prefix_tokens": num_prefix,
        "qk_definition": "outputs of attn.q_norm / attn.k_norm (before attn.scale), patch tokens",
        "distance_bins": {
            "centres_patches": [_f(x) for x in stats.bins.centres],
            "pairs": [int(x) for x in stats.bins.counts],
            "near": list(stats.bins.near),
            "far": list(stats.bins.far),
        },
        "bootstrap": {"resamples": resamples, "seed": seed, "level": CI_LEVEL, "over": "images"},
        "shuffle": "one seeded permutation of the patch positions per image",
        "alignment_gap_mean": _f(stats.values["gap"].mean()),
        "alignment_gap_shuffled_mean": _f(stats.values["gap_shuffled"].mean()),
        "aligned_heads": sum(v is True for v in flat_verdicts),
        "undecided_heads": sum(v is None for v in flat_verdicts),
        "alignment_source_counts": {s: flat_sources.count(s) for s in ALIGNMENT_SOURCES},
        "positional_gap_min": POSITIONAL_GAP_MIN,
        "positional_kernel": {
            "available": problem is None,
            **({"reason": problem} if problem else {}),
            "content": "probe-set mean of the patch embedding's output (images and patches)",
            "deeper_layers": "the blocks' own response to mean content + position (one forward)",
            "fit": "least squares k(dr, dc) + f(query), centred over all pairs",
            "label_rules": dict(KERNEL_LABEL_RULES),
        },
        "layers": layers,
    }
    arrays = {
        "qk_alignment_profiles": stats.profile.float().numpy(),
        "qk_alignment_profiles_shuffled": stats.profile_shuffled.float().numpy(),
    }
    figures = {}
    from workers.analysis import plots_qk
    from workers.analysis.figures import figure

    figures["qk_alignment_profile"] = figure(
        plots_qk.alignment_profile,
        stats.bins.centres.numpy(),
        stats.profile.numpy(),
        stats.profile_shuffled.numpy(),
    )
    if kernels is not None:
        flat_labels = [lab for row in labels for lab in row]
        data["positional_kernel"]["counts"] = {lab: flat_labels.count(lab) for lab in KERNEL_LABELS}
        arrays["qk_positional_kernels"] = kernels.float().numpy()
        figures["qk_positional_kernels"] = figure(plots_qk.kernel_grid, kernels.numpy(), labels)
    return SectionResult(data=data, arrays=arrays, figures=figures)


__all__ = [
    "ALIGNMENT_SOURCES",
    "KERNEL_LABELS",
    "KERNEL_LABEL_RULES",
    "AlignmentAccumulator",
    "AlignmentStatistics",
    "DistanceBins",
    "KernelScores",
    "QKObserver",
    "alignment_source",
    "alignment_statistics",
    "alignment_verdicts",
    "kernel_peaks",
    "kernel_scores",
    "label_kernels",
    "offset_kernel",
    "pair_cosines",
    "positional_logits",
    "qk_geometry_section",
    "spearman_with_distance",
    "stream_qk",
]
