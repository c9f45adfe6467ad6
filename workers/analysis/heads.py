"""Per-head statistics, a label for every attention head, and how far to trust both.

The claim under test: because every head has its own W_Q and W_K, training drives heads to
different roles (local, horizontal, vertical, global, texture, content, sink). For every
layer and head this module measures, from attention probabilities captured by
`workers.analysis.capture` and reduced batch by batch (streaming):

- where a patch query's attention goes on the grid (distance, entropy, local and self
  mass, axis anisotropy), computed on the patch-to-patch part renormalised to sum to 1 per
  query, so that mass sent to prefix tokens (class token, registers) does not shrink them;
- how much goes to the prefix tokens (``prefix_mass``, reported separately);
- which keys receive the attention, whatever the query (the key profile: ``sink_mass``) and
  how much that profile follows the image (``key_content_dependence``);
- how much the maps depend on the image (``content_dependence``);
- on texture probes, whether attention lands on textured patches (``texture_lift``), whether
  that preference survives flattening every patch to its own mean colour
  (``texture_lift_flat``: a brightness or colour preference does, a texture one does not),
  and how much the maps change when high frequencies are removed (``lowpass_change``).

Only patch queries are measured (the class token's own attention is a different question).
Every number is an average over patch queries and images. The per-image values are kept
(a few scalars and one key profile per image and head), so a seeded bootstrap over the
probe images gives every head a 95 % interval on its mean distance and a label stability.
Labels come from scale-free rules (`LABEL_RULES`): each compares a share of the image or a
ratio to uniform attention on the same grid, so the same head drawn in image fractions gets
the same label on a 14x14 and a 28x28 grid.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from workers.analysis.bootstrap import (
    BOOTSTRAP_RESAMPLES,
    BOOTSTRAP_SEED,
    CI_LEVEL,
    percentile_interval,
    resample_weights,
)
from workers.analysis.capture import attention_sites, stream_attention
from workers.analysis.grid import Grid, grid_from_model
from workers.analysis.precision import full_precision
from workers.analysis.results import SectionResult, finite_or_none, unavailable

LABELS: tuple[str, ...] = (
    "local",
    "horizontal",
    "vertical",
    "global",
    "texture",
    "content",
    "sink",
    "prefix",
    "mixed",
)

# --- label thresholds (scale-free: shares of the image or ratios to uniform attention) -----
# Prefix: more than half of a patch query's attention goes to prefix tokens, so the head's
# output is mostly a function of the class/register tokens. A head that parks its attention
# on the class token or a register is a sink too; it keeps the older name `prefix`.
PREFIX_MASS_MIN = 0.5
# Sink: the keys a head attends to are the same for every query. Per image, the key profile
# (attention each key receives, averaged over queries) puts at least half its mass on the
# top 2 % of the keys (4 of 196 on 14x14, 16 of 784 on 28x28: the same share of the image).
# Uniform, local or axis heads spread the profile over every key and score about 0.02.
SINK_KEY_SHARE = 0.02
SINK_MASS_MIN = 0.5
# Texture: textured patches receive at least 1.5x their area share (uniform or purely
# positional heads score 1.0 on average) ...
TEXTURE_LIFT_MIN = 1.5
# ... and at most half of that excess lift survives flattening every patch to its own mean
# colour: (texture_lift_flat - 1) <= 0.5 (texture_lift - 1). A brightness or colour head
# keeps all of it (flattening keeps each patch's mean colour); a texture head keeps none.
TEXTURE_FLAT_RETAINED_MAX = 0.5
# Local: the mean attention distance is at most 30 % of uniform attention's (a Gaussian
# head of spread up to about 0.12 of the image side).
LOCAL_DISTANCE_RATIO_MAX = 0.3
# Horizontal / vertical: spread along one axis, relative to the uniform spread along that
# axis, is at least 3x the spread along the other ((3 - 1) / (3 + 1) = 0.5).
AXIS_SCORE_MIN = 0.5
# Content: at least 20 % of the key profile's energy varies from image to image (a purely
# positional head scores 0).
KEY_CONTENT_DEPENDENCE_MIN = 0.2
# Global: far on average (mean distance at least 75 % of uniform attention's) and broad
# (exp(entropy) covers at least a quarter of the patches; a sink covers one or two).
GLOBAL_DISTANCE_RATIO_MIN = 0.75
GLOBAL_SUPPORT_SHARE_MIN = 0.25

THRESHOLDS: dict[str, float] = {
    "prefix_mass_min": PREFIX_MASS_MIN,
    "sink_key_share": SINK_KEY_SHARE,
    "sink_mass_min": SINK_MASS_MIN,
    "texture_lift_min": TEXTURE_LIFT_MIN,
    "texture_flat_retained_max": TEXTURE_FLAT_RETAINED_MAX,
    "local_distance_ratio_max": LOCAL_DISTANCE_RATIO_MAX,
    "axis_score_min": AXIS_SCORE_MIN,
    "key_content_dependence_min": KEY_CONTENT_DEPENDENCE_MIN,
    "global_distance_ratio_min": GLOBAL_DISTANCE_RATIO_MIN,
    "global_support_share_min": GLOBAL_SUPPORT_SHARE_MIN,
}
# First matching rule wins, in this order.
LABEL_RULES: dict[str, str] = {
    "prefix": f"prefix_mass >= {PREFIX_MASS_MIN}",
    "texture": (
        f"texture_lift >= {TEXTURE_LIFT_MIN} and texture_lift_flat - 1 <= "
        f"{TEXTURE_FLAT_RETAINED_MAX} * (texture_lift - 1)"
    ),
    "sink": f"sink_mass >= {SINK_MASS_MIN} (mass on the top {SINK_KEY_SHARE:.0%} of keys)",
    "local": f"distance_ratio <= {LOCAL_DISTANCE_RATIO_MAX}",
    "horizontal": f"horizontal >= {AXIS_SCORE_MIN}",
    "vertical": f"vertical >= {AXIS_SCORE_MIN}",
    "content": f"key_content_dependence >= {KEY_CONTENT_DEPENDENCE_MIN}",
    "global": (
        f"distance_ratio >= {GLOBAL_DISTANCE_RATIO_MIN} and "
        f"support_share >= {GLOBAL_SUPPORT_SHARE_MIN}"
    ),
    "mixed": "no rule above matched",
}
# The scores the rules read, reported beside each label.
RULE_SCORES: tuple[str, ...] = (
    "prefix_mass",
    "texture_lift",
    "texture_lift_flat",
    "sink_mass",
    "distance_ratio",
    "horizontal",
    "vertical",
    "key_content_dependence",
    "support_share",
)

# Queries whose patch-to-patch mass is below this (all attention on prefix tokens) are
# renormalised against this floor instead of 0, so they contribute ~0 rather than NaN.
_PATCH_MASS_FLOOR = 1e-30
_AXIS_EPS = 1e-12  # both axis spreads below this: no spread at all, anisotropy 0
_ENERGY_FLOOR = 1e-300  # a key profile has energy >= 1 / N; this only guards 0 / 0

# --- memory bounds: what the streaming statistics hold at once, whatever the image count ---
# Working set of one reduction step: (image, head) maps are renormalised and reduced in
# chunks of at most this many bytes per copy, counted at 8 bytes a value (the maps are
# float32, so this is conservative; a few copies live at once), so a
# 1,369-token grid (DINOv2 at 518 px: 15 MB per map) is reduced 4 maps at a time instead of
# batch x heads maps at once.
CHUNK_BYTES = 64 * 2**20
# The mean maps are summed in float64 for the query patches `mean_map_queries` picks: every
# patch when (layers, heads, N, N) fits in this budget (ViT-B/16 at 224 px: 44 MB), else a
# regular sub-grid of query patches that fits. `content_dependence` and `head_diversity`
# read these rows; the `attention_mean_maps` artifact stores them in float16, so it is at
# most a quarter of the budget (32 MB).
MEAN_MAP_BUDGET_BYTES = 128 * 2**20


@dataclass(frozen=True)
class GridBaselines:
    """Uniform-attention values on a grid (averaged over patch queries)."""

    mean_distance_patches: float
    local_mass: float  # 3x3 excluding self
    self_mass: float
    abs_col_offset: float
    abs_row_offset: float

    @staticmethod
    def of(grid: Grid) -> GridBaselines:
        n = grid.num_patches
        return GridBaselines(
            mean_distance_patches=grid.uniform_mean_distance,
            local_mass=float(grid.neighbour_mask(8).double().sum().item()) / (n * n),
            self_mass=1.0 / n,
            abs_col_offset=float(grid.col_offsets.abs().mean().item()),
            abs_row_offset=float(grid.row_offsets.abs().mean().item()),
        )


def sink_keys(grid: Grid) -> int:
    """How many top keys `sink_mass` sums: `SINK_KEY_SHARE` of the patches, at least 1."""
    return max(1, math.ceil(SINK_KEY_SHARE * grid.num_patches - 1e-9))


# Per-image, per-head scalars kept for the bootstrap, in this order (last axis of
# `HeadSamples.natural`); each is a mean over patch queries.
_SAMPLES: tuple[str, ...] = (
    "distance",
    "abs_col",
    "abs_row",
    "neighbour",
    "self",
    "prefix",
    "entropy",
    "sink",
)
# Per texture image and head: lift, lift on the flattened image, low-pass change.
_TEXTURE_SAMPLES: tuple[str, ...] = ("lift", "lift_flat", "lowpass_change")


@dataclass(frozen=True)
class HeadSamples:
    """What every image contributes, for the bootstrap (no N x N maps).

    ``natural``: (M, layers, heads, len(_SAMPLES)) float64; ``profiles``: (M, layers, heads,
    N) float32 key profiles (attention each key receives, averaged over queries; 4 bytes
    per image, head and patch: 7 MB for 64 images of a ViT-B/16); ``texture``: (Mt, layers,
    heads, len(_TEXTURE_SAMPLES)) float64 over the texture images that hold any texture
    (Mt may be 0).
    """

    natural: Tensor
    profiles: Tensor
    texture: Tensor


def _anisotropy(abs_col: Tensor, abs_row: Tensor, base: GridBaselines) -> Tensor:
    """(c - r) / (c + r), c and r the mean |d_col|, |d_row| relative to uniform attention's."""
    nan = torch.full_like(abs_col, math.nan)
    col = abs_col / base.abs_col_offset if base.abs_col_offset > 0 else nan
    row = abs_row / base.abs_row_offset if base.abs_row_offset > 0 else nan
    denom = col + row
    horizontal = torch.where(denom > _AXIS_EPS, (col - row) / denom.clamp_min(_AXIS_EPS), 0.0)
    return torch.where(denom.isnan(), math.nan, horizontal)


def _weighted_means(samples: HeadSamples, weights: Tensor, texture_weights: Tensor | None):
    """Image-weighted means of every per-image quantity, for each row of ``weights`` (R, M):
    a dict of (R, layers, heads) float64 tensors; the key content dependence is
    1 - ||sum_i w_i p_i||^2 / sum_i w_i ||p_i||^2 over the key profiles p_i."""
    means = torch.einsum("rm,mlhs->rlhs", weights, samples.natural)
    out = {name: means[..., k] for k, name in enumerate(_SAMPLES)}
    num_layers = samples.profiles.shape[1]
    content = []
    for layer in range(num_layers):  # one layer of profiles in float64 at a time
        p = samples.profiles[:, layer].to(torch.float64)  # (M, H, N)
        mean_profile = torch.einsum("rm,mhn->rhn", weights, p)
        energy = weights @ (p * p).sum(-1)  # (R, H)
        spread = (energy - (mean_profile**2).sum(-1)).clamp_min(0.0)
        content.append((spread / energy.clamp_min(_ENERGY_FLOOR)).clamp(0.0, 1.0))
    out["key_content"] = torch.stack(content, dim=1)
    if samples.profiles.shape[0] < 2:
        out["key_content"] = torch.full_like(out["key_content"], math.nan)
    nan = torch.full_like(out["distance"], math.nan)
    for k, name in enumerate(_TEXTURE_SAMPLES):
        out[name] = (
            nan
            if texture_weights is None
            else torch.einsum("rm,mlh->rlh", texture_weights, samples.texture[..., k])
        )
    return out


def _rule_scores(means: dict[str, Tensor], grid: Grid, base: GridBaselines) -> dict[str, Tensor]:
    """The scores `LABEL_RULES` read, from image means (any leading shape)."""
    horizontal = _anisotropy(means["abs_col"], means["abs_row"], base)
    return {
        "prefix_mass": means["prefix"],
        "sink_mass": means["sink"],
        "texture_lift": means["lift"],
        "texture_lift_flat": means["lift_flat"],
        "distance_ratio": means["distance"] / base.mean_distance_patches,
        "horizontal": horizontal,
        "vertical": -horizontal,
        "key_content_dependence": means["key_content"],
        "support_share": float(grid.num_patches) ** (means["entropy"] - 1.0),
    }


def label_index(scores: dict[str, Tensor]) -> Tensor:
    """Index into `LABEL_RULES` (first match wins) for every head, any leading shape; NaN
    scores fail their rule, so without texture probes no head is labelled ``texture``."""
    lift, flat = scores["texture_lift"], scores["texture_lift_flat"]
    ratio = scores["distance_ratio"]
    rules = {
        "prefix": scores["prefix_mass"] >= PREFIX_MASS_MIN,
        "texture": (lift >= TEXTURE_LIFT_MIN)
        & (flat - 1 <= TEXTURE_FLAT_RETAINED_MAX * (lift - 1)),
        "sink": scores["sink_mass"] >= SINK_MASS_MIN,
        "local": ratio <= LOCAL_DISTANCE_RATIO_MAX,
        "horizontal": scores["horizontal"] >= AXIS_SCORE_MIN,
        "vertical": scores["vertical"] >= AXIS_SCORE_MIN,
        "content": scores["key_content_dependence"] >= KEY_CONTENT_DEPENDENCE_MIN,
        "global": (ratio >= GLOBAL_DISTANCE_RATIO_MIN)
        & (scores["support_share"] >= GLOBAL_SUPPORT_SHARE_MIN),
    }
    order = list(LABEL_RULES)
    index = torch.full(ratio.shape, len(order) - 1, dtype=torch.long)
    # Assign from the lowest priority up so that earlier rules overwrite later ones.
    for i in reversed(range(len(rules))):
        index = torch.where(rules[order[i]], i, index)
    return index


@dataclass
class HeadStatistics:
    """Per-head statistics, each (layers, heads) float64 unless stated; NaN where undefined.

    Ranges and chance levels (uniform attention over the patches of the grid):
    - ``mean_distance_patches``: >= 0; uniform gives ``baselines.mean_distance_patches``.
    - ``entropy``: attention entropy over patches / log(num_patches), in [0, 1]; uniform 1.
    - ``local_mass``: mass on the 8 neighbours (3x3 excluding self), in [0, 1].
    - ``self_mass``: mass on the query's own patch, in [0, 1]; uniform 1 / num_patches.
    - ``horizontal``: in [-1, 1]; +1 all spread along the row, -1 all along the column,
      0 as isotropic as uniform attention on this grid. ``vertical = -horizontal``.
      Computed as (c - r) / (c + r) with c, r the attention-weighted mean |d_col|, |d_row|
      each divided by uniform attention's on this grid; for very tight heads on a
      non-square grid that division tilts the (meaningless) score toward the short axis.
    - ``prefix_mass``: share of the full attention on prefix tokens, in [0, 1].
    - ``sink_mass``: per image, the key profile's mass on its `sink_keys` largest keys, in
      [k / N, 1]; uniform, local and axis heads score about k / N (0.02), a head parked on
      the same few keys for every query 1.
    - ``content_dependence``: share of the maps' energy that varies across images,
      E||A_b - mean A||^2 / E||A_b||^2, in [0, 1]; 0 for a purely positional head. NaN for
      fewer than two images.
    - ``key_content_dependence``: the same for the key profiles (which keys receive the
      attention), in [0, 1]; 0 for a positional head, high for a head drawn to bright,
      coloured or textured keys. NaN for fewer than two images.
    - ``texture_lift``: attention mass on textured patches / their area share, in
      [0, 1 / share]; 1.0 for uniform or purely positional heads. NaN without texture probes.
    - ``texture_lift_flat``: the same on the texture probes with every patch flattened to its
      own mean colour (`flatten_patches`): equal to ``texture_lift`` for a brightness or
      colour head, about 1.0 for a texture head. NaN without texture probes.
    - ``lowpass_change``: total variation distance between a map and the map of the
      low-passed image, in [0, 1]; 0 for positional heads. NaN without texture probes.
    - ``mean_maps``: (layers, heads, Q, N) mean renormalised patch-to-patch attention of the
      Q query patches ``mean_map_queries`` (every patch, Q = N, when the sums fit in
      `MEAN_MAP_BUDGET_BYTES`; else a regular sub-grid of queries). ``content_dependence``
      and `head_diversity` read these rows, so on large grids they are estimates from a
      sub-grid of queries spread over the whole image.
    - ``mean_map_queries``: (Q,) long, the query patches of ``mean_maps`` (raster order).
    - ``samples``: the per-image values behind the means, for `bootstrap_labels`.
    """

    grid: Grid
    num_prefix_tokens: int
    num_images: int
    num_texture_images: int
    baselines: GridBaselines
    mean_distance_patches: Tensor
    entropy: Tensor
    local_mass: Tensor
    self_mass: Tensor
    horizontal: Tensor
    prefix_mass: Tensor
    sink_mass: Tensor
    content_dependence: Tensor
    key_content_dependence: Tensor
    texture_lift: Tensor
    texture_lift_flat: Tensor
    lowpass_change: Tensor
    mean_maps: Tensor
    mean_map_queries: Tensor
    samples: HeadSamples

    @property
    def mean_distance_px(self) -> Tensor:
        return self.mean_distance_patches * self.grid.patch_size

    @property
    def vertical(self) -> Tensor:
        return -self.horizontal

    @property
    def distance_ratio(self) -> Tensor:
        """Mean distance / uniform mean distance: 1.0 for uniform, 0 for self-attention."""
        return self.mean_distance_patches / self.baselines.mean_distance_patches

    @property
    def support_share(self) -> Tensor:
        """Share of the patches the head effectively attends, N ** (entropy - 1) =
        exp(entropy in nats) / N, in [1 / N, 1]: 1 for uniform, 1 / N for one patch; the
        same for a head of the same spread in image fractions on any grid."""
        return float(self.grid.num_patches) ** (self.entropy - 1.0)

    @property
    def local_score(self) -> Tensor:
        """(m - u) / (1 - u) with m the 3x3 mass (self included), u uniform's: 1 fully local,
        0 as local as uniform, negative when the head avoids its neighbourhood. NaN on
        grids of at most 2x2, where every patch is in every 3x3 neighbourhood. Reported, not
        a label rule: a 3x3 neighbourhood is a different share of the image on each grid."""
        u = self.baselines.local_mass + self.baselines.self_mass
        m = self.local_mass + self.self_mass
        return (m - u) / (1.0 - u) if u < 1.0 else torch.full_like(m, float("nan"))

    def rule_scores(self) -> dict[str, Tensor]:
        """The (layers, heads) scores `LABEL_RULES` read."""
        return {name: getattr(self, name) for name in RULE_SCORES}


def _patch_part(probs: Tensor, num_prefix: int, grid: Grid) -> tuple[Tensor, Tensor]:
    """(B, H, T, T) probs -> renormalised patch-to-patch maps (B, H, N, N) and the prefix
    mass per patch query (B, H, N) float64.

    One new (B, H, N, N) tensor (the maps, renormalised in place); every later reduction
    reads it without further full-size copies. The maps keep the probabilities' precision,
    at least float32 (float64 stays float64): every statistic reduces a row or a map to a
    few numbers whose float32 rounding (~1e-7 relative) is far below any label threshold or
    bootstrap interval, and float32 halves the memory traffic of the section's largest
    tensors. Their small results are accumulated in float64.
    """
    n = grid.num_patches
    if probs.ndim != 4 or probs.shape[-1] != probs.shape[-2] or probs.shape[-1] != num_prefix + n:
        raise ValueError(
            f"attention {tuple(probs.shape)} does not match {num_prefix} prefix tokens + "
            f"{grid.height}x{grid.width} patches; were the images the model's input size?"
        )
    prefix = probs[:, :, num_prefix:, :num_prefix].double().sum(-1)
    # a copy even when the dtype stays: it is renormalised in place
    dtype = torch.promote_types(probs.dtype, torch.float32)
    maps = probs[:, :, num_prefix:, num_prefix:].to(dtype, copy=True)
    total = maps.sum(-1, keepdim=True).clamp_min(_PATCH_MASS_FLOOR)
    return maps.div_(total), prefix


# Per-pair weights reduced against every renormalised row in one batched matmul, in this
# order: sum_j maps[b, h, i, j] * weight[k, i, j] for every query i.
_ROW_WEIGHTS: tuple[str, ...] = ("distance", "abs_col", "abs_row", "neighbour")


def _row_weights(grid: Grid, device: torch.device, dtype: torch.dtype) -> Tensor:
    """(N, N, K) stacked per-pair weights, query-major, for `_weighted_row_sums`."""
    stacked = torch.stack(
        [
            grid.distances,
            grid.col_offsets.abs(),
            grid.row_offsets.abs(),
            grid.neighbour_mask(8).double(),
        ],
        dim=-1,
    )
    return stacked.to(device=device, dtype=dtype).contiguous()


def _weighted_row_sums(maps: Tensor, weights: Tensor) -> Tensor:
    """(B, H, N, N) maps and (N, N, K) weights -> (B, H, N, K): for every query row i,
    ``sum_j maps[..., i, j] * weights[i, j, k]`` (one bmm batched over queries)."""
    b, h, n, _ = maps.shape
    by_query = maps.permute(2, 0, 1, 3).reshape(n, b * h, n)  # (N, B*H, N), one copy
    return torch.bmm(by_query, weights).reshape(n, b, h, -1).permute(1, 2, 0, 3)


def _ordered(chunks: list[tuple[int, Tensor]], what: str) -> Tensor:
    """Concatenate (start, rows) chunks in image order; the starts must tile 0..M-1."""
    chunks = sorted(chunks, key=lambda c: c[0])
    expected = 0
    for start, rows in chunks:
        if start != expected:
            raise ValueError(f"{what}: images from {start} given, {expected} expected next")
        expected += rows.shape[0]
    return torch.cat([rows for _, rows in chunks])


def mean_map_queries(grid: Grid, max_queries: int) -> Tensor:
    """Patch indices (raster order, long) whose mean attention maps are kept.

    Every patch when the grid has at most ``max_queries``; otherwise every s-th row and
    column (centred on the grid), s the smallest stride that keeps at most ``max_queries``,
    so the kept queries cover the whole image evenly.
    """
    if max_queries < 1:
        raise ValueError(f"max_queries must be at least 1, got {max_queries}")
    if grid.num_patches <= max_queries:
        return torch.arange(grid.num_patches)
    stride = 2
    while True:
        rows = torch.arange(((grid.height - 1) % stride) // 2, grid.height, stride)
        cols = torch.arange(((grid.width - 1) % stride) // 2, grid.width, stride)
        if len(rows) * len(cols) <= max_queries:
            return (rows[:, None] * grid.width + cols[None, :]).reshape(-1)
        stride += 1


def _pairs_per_chunk(grid: Grid, copies: int = 1) -> int:
    """(image, head) maps reduced at once so that one float64 copy of ``copies`` maps each
    stays within `CHUNK_BYTES`."""
    return max(1, CHUNK_BYTES // (copies * 8 * grid.num_patches**2))


class AttentionAccumulator:
    """Streaming per-head sums over the audited images; memory: the float64 sums of the mean
    maps for the query patches `mean_map_queries` picks within `MEAN_MAP_BUDGET_BYTES`, a
    few scalars and one float32 key profile (N) per image and head, and per step one chunk
    of maps within `CHUNK_BYTES`; never per-image N x N maps.

    Feed it every layer's probabilities with ``natural(layer, probs, start)``, from its own
    capture pass (`head_statistics`) or from another analysis's forward over the same images
    (the gradient pass hands over its attention, so an audit runs one forward, not two);
    ``start`` is the index of the batch's first image. Per layer and batch: one
    renormalised copy of the maps, one bmm against the stacked geometry, one entropy pass,
    and per-(image, head) reductions.
    """

    def __init__(self, num_layers: int, grid: Grid, num_prefix: int, device: torch.device):
        self.grid, self.num_prefix, self.num_layers = grid, num_prefix, num_layers
        self.device = device
        self.sums: dict[str, Tensor] = {}
        self.per_image: list[list[tuple[int, Tensor]]] = [[] for _ in range(num_layers)]
        self.profiles: list[list[tuple[int, Tensor]]] = [[] for _ in range(num_layers)]
        self.weights: Tensor | None = None
        self.queries: Tensor | None = None  # set by the first batch (needs the head count)
        self.counts = torch.zeros(num_layers, dtype=torch.long)

    @classmethod
    def for_model(cls, model: nn.Module) -> AttentionAccumulator:
        """An empty accumulator shaped for ``model`` (its blocks, grid and prefix tokens)."""
        return cls(
            len(attention_sites(model)),
            grid_from_model(model),
            int(getattr(model, "num_prefix_tokens", 0)),
            next(model.parameters()).device,
        )

    @property
    def num_images(self) -> int:
        """Images seen by every layer (0 before the first batch)."""
        return int(self.counts.min())

    def _sums_for(self, num_heads: int, device: torch.device) -> Tensor:
        """Allocate the float64 sums once the head count is known (first batch); returns the
        kept query patches."""
        per_query = self.num_layers * num_heads * self.grid.num_patches * 8
        self.queries = mean_map_queries(self.grid, max(1, MEAN_MAP_BUDGET_BYTES // per_query))
        q, n, f64 = len(self.queries), self.grid.num_patches, torch.float64
        self.sums = {
            "map": torch.zeros(self.num_layers, num_heads, q, n, dtype=f64, device=device),
            "map_sq_total": torch.zeros(self.num_layers, num_heads, dtype=f64, device=device),
        }
        return self.queries

    def natural(self, layer: int, probs: Tensor, start: int) -> None:
        if probs.ndim != 4:
            raise ValueError(f"attention must be (B, heads, T, T), got {tuple(probs.shape)}")
        b, h = probs.shape[:2]
        queries = self.queries if self.queries is not None else self._sums_for(h, probs.device)
        with full_precision(probs.device):
            pairs = probs.reshape(b * h, 1, *probs.shape[-2:])  # (image, head) pairs
            step = _pairs_per_chunk(self.grid)
            per_image, profiles = [], []
            # this batch's sums per head in the maps' dtype (a sum of at most B maps), added
            # to the float64 totals once per batch
            dtype = torch.promote_types(probs.dtype, torch.float32)
            shape = (h, len(queries), self.grid.num_patches)
            batch = {
                "map": torch.zeros(shape, dtype=dtype, device=probs.device),
                "map_sq_total": torch.zeros(h, dtype=torch.float64, device=probs.device),
            }
            for first in range(0, b * h, step):
                chunk = pairs[first : first + step]
                heads = torch.arange(first, first + chunk.shape[0], device=probs.device) % h
                rows, profile = self._reduce(chunk, heads, queries, batch)
                per_image.append(rows)
                profiles.append(profile)
            for key, total in batch.items():
                self.sums[key][layer] += total.to(torch.float64)
        self.per_image[layer].append((start, torch.cat(per_image).view(b, h, -1).cpu()))
        self.profiles[layer].append((start, torch.cat(profiles).view(b, h, -1).cpu()))
        self.counts[layer] += b

    def _reduce(
        self, chunk: Tensor, heads: Tensor, queries: Tensor, batch: dict[str, Tensor]
    ) -> tuple[Tensor, Tensor]:
        """One chunk of (c, 1, T, T) (image, head) maps: their per-pair scalars (c, S) and
        key profiles (c, N) float32; their query rows and energies go into the ``batch``
        sums of their ``heads`` (c,)."""
        maps, prefix = _patch_part(chunk, self.num_prefix, self.grid)
        if self.weights is None or self.weights.dtype != maps.dtype:
            self.weights = _row_weights(self.grid, maps.device, maps.dtype)
        f64 = torch.float64
        # (c, 1, N, K) -> mean over queries -> (c, 1, K), one row per (image, head)
        geometry = _weighted_row_sums(maps, self.weights).to(f64).mean(-2)
        # Row reductions in the maps' dtype, results in float64 (``sum(dtype=float64)`` would
        # first copy the whole chunk to float64): (c, 1, N) attention each key receives ...
        profile = maps.mean(-2).to(f64)
        # ... and -sum p log p per query (3-6x faster than torch.special.entr)
        plogp = maps.clamp_min(torch.finfo(maps.dtype).tiny).log_().mul_(maps)  # p = 0 adds 0
        entropy = plogp.sum(-1).to(f64).neg_() / math.log(self.grid.num_patches)
        del plogp
        rows = torch.cat(
            [
                geometry,
                maps.diagonal(dim1=-2, dim2=-1).to(f64).mean(-1)[..., None],
                prefix.to(f64).mean(-1)[..., None],
                entropy.mean(-1)[..., None],
                profile.topk(sink_keys(self.grid), dim=-1).values.sum(-1)[..., None],
            ],
            dim=-1,
        )  # (c, 1, len(_SAMPLES)), in the order of _SAMPLES
        every_query = len(queries) == self.grid.num_patches
        kept = maps[:, 0] if every_query else maps[:, 0].index_select(1, queries.to(maps.device))
        batch["map"].index_add_(0, heads, kept)
        # Only the total over the kept (i, j) of sum_b maps^2 enters content_dependence:
        # one BLAS dot per map. content_dependence is a difference of the two sums (energy
        # minus the mean map's); in float32 it cancels to ~1e-6 (planted positional heads
        # read up to 1.4e-6 instead of 0), reported as a score, never a label rule.
        flat = kept.reshape(kept.shape[0], 1, -1)
        energy = torch.bmm(flat, flat.transpose(1, 2)).reshape(-1).to(f64)
        batch["map_sq_total"].index_add_(0, heads, energy)
        return rows[:, 0], profile[:, 0].to(torch.float32)

    def samples(self) -> tuple[Tensor, Tensor]:
        """(M, layers, heads, S) per-image scalars and (M, layers, heads, N) key profiles."""
        natural = [_ordered(chunks, f"layer {i}") for i, chunks in enumerate(self.per_image)]
        profiles = [_ordered(chunks, f"layer {i}") for i, chunks in enumerate(self.profiles)]
        return torch.stack(natural, dim=1), torch.stack(profiles, dim=1)


class _TextureAccumulator:
    """Per texture image and head: texture lift, lift on the flattened copy, low-pass change.

    Each batch is 3b images: b texture images, their low-passed copies, their flattened
    copies (`texture_controls`). Images without any texture are left out (no lift defined).
    """

    def __init__(self, num_layers: int, grid: Grid, num_prefix: int, fraction: Tensor):
        self.grid, self.num_prefix, self.fraction = grid, num_prefix, fraction
        self.num_layers = num_layers
        self.per_image: list[list[tuple[int, Tensor]]] = [[] for _ in range(num_layers)]
        self.counts = torch.zeros(num_layers, dtype=torch.long)

    def __call__(self, layer: int, probs: Tensor, start: int) -> None:
        b, h = probs.shape[0] // 3, probs.shape[1]
        frac64 = self.fraction[start : start + b].to(probs.device, torch.float64)
        if frac64.shape[0] != b:
            raise ValueError(f"more texture images than texture_masks ({self.fraction.shape[0]})")
        share = frac64.mean(-1)  # (b,)
        keep = share > 0
        step = _pairs_per_chunk(self.grid, copies=3)
        images = []
        with full_precision(probs.device):
            for i in range(b):  # image i, its low-passed (b + i) and flattened (2b + i) copy
                heads = [slice(first, first + step) for first in range(0, h, step)]
                chunks = [self._reduce(probs[i::b][:3, hs], frac64[i], share[i]) for hs in heads]
                images.append(torch.cat(chunks))
        per_image = torch.stack(images)[keep]  # (kept, H, len(_TEXTURE_SAMPLES))
        kept_before = int((self.fraction[:start].mean(-1) > 0).sum())
        self.per_image[layer].append((kept_before, per_image.cpu()))
        self.counts[layer] += int(keep.sum())

    def _reduce(self, probs: Tensor, fraction: Tensor, share: Tensor) -> Tensor:
        """(3, hc, T, T) (a view): one texture image, its low-passed and its flattened copy,
        a chunk of heads -> (hc, len(_TEXTURE_SAMPLES))."""
        orig, low, flat = (_patch_part(p[None], self.num_prefix, self.grid)[0][0] for p in probs)
        weights = fraction.to(orig.dtype)[None, :, None]

        def lift(m: Tensor) -> Tensor:  # textured mass per query / share -> (hc,)
            mass = (m @ weights).squeeze(-1).to(torch.float64).mean(-1)
            return mass / share.clamp_min(_PATCH_MASS_FLOOR)

        rows = [lift(orig), lift(flat)]
        orig.sub_(low).abs_()  # in place: the natural map is not needed any more
        rows.append((0.5 * orig.sum(-1).to(torch.float64)).mean(-1))
        return torch.stack(rows, dim=-1)

    def samples(self) -> Tensor:
        """(Mt, layers, heads, len(_TEXTURE_SAMPLES)) over the kept texture images."""
        return torch.stack(
            [_ordered(chunks, f"texture layer {i}") for i, chunks in enumerate(self.per_image)],
            dim=1,
        )


def flatten_patches(images: Tensor, *, patch_size: int) -> Tensor:
    """(M, C, H, W) images with every ``patch_size`` patch set to its own mean (per channel).

    The texture control: each patch keeps its mean colour and brightness and loses every
    within-patch variation. Affine per channel, so it commutes with normalisation. Returns
    a new tensor.
    """
    if images.ndim != 4:
        raise ValueError(f"images must be (M, C, H, W), got {tuple(images.shape)}")
    h, w = images.shape[-2:]
    if patch_size < 1:
        raise ValueError(f"patch_size must be positive, got {patch_size}")
    # Where the size is not a multiple of the patch (so400m/14 at 384 px: 27 patches cover
    # 378 px), the model reads only the covered part; the uncovered edge is left as it is.
    ch, cw = h - h % patch_size, w - w % patch_size
    means = torch.nn.functional.avg_pool2d(images[..., :ch, :cw], patch_size)
    out = images.clone()
    out[..., :ch, :cw] = means.repeat_interleave(patch_size, -2).repeat_interleave(patch_size, -1)
    return out


def texture_controls(images: Tensor, *, patch_size: int, sigma_px: float) -> Tensor:
    """(b, C, H, W) texture probes -> (3b, C, H, W): the images, their low-passed copies
    (`lowpass`) and their patch-flattened copies (`flatten_patches`), the batch layout the
    texture statistics read."""
    return torch.cat(
        [images, lowpass(images, sigma_px=sigma_px), flatten_patches(images, patch_size=patch_size)]
    )


def lowpass(images: Tensor, *, sigma_px: float) -> Tensor:
    """Gaussian blur of (M, C, H, W) images with std ``sigma_px`` pixels (edges replicated).

    Linear and constant-preserving, so it commutes with per-channel normalisation. Returns
    a new tensor.
    """
    if images.ndim != 4:
        raise ValueError(f"images must be (M, C, H, W), got {tuple(images.shape)}")
    if sigma_px <= 0:
        raise ValueError(f"sigma_px must be positive, got {sigma_px}")
    radius = max(1, math.ceil(3 * sigma_px))
    x = torch.arange(-radius, radius + 1, dtype=torch.float64)
    kernel = torch.exp(-0.5 * (x / sigma_px) ** 2)
    kernel = (kernel / kernel.sum()).to(images.dtype).to(images.device)
    c = images.shape[1]
    out = torch.nn.functional.pad(images, (radius, radius, radius, radius), mode="replicate")
    out = torch.nn.functional.conv2d(out, kernel.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    return torch.nn.functional.conv2d(out, kernel.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)


def _check_fraction(texture_masks: Tensor, grid: Grid) -> Tensor:
    fraction = texture_masks.to(torch.float64)
    if fraction.ndim != 2 or fraction.shape[1] != grid.num_patches:
        raise ValueError(
            f"texture_masks must be (M, {grid.num_patches}), got {tuple(texture_masks.shape)}"
        )
    if fraction.numel() and (fraction.min() < 0 or fraction.max() > 1):
        raise ValueError("texture_masks must lie in [0, 1]")
    return fraction


def _finish(
    acc: AttentionAccumulator, tex: _TextureAccumulator | None, num_images: int, num_texture: int
) -> HeadStatistics:
    """Turn streaming sums and per-image values into per-head statistics (all at once)."""
    if num_images == 0:
        raise ValueError("no images given")
    grid = acc.grid
    natural, profiles = acc.samples()
    texture = torch.zeros(0, acc.num_layers, natural.shape[2], len(_TEXTURE_SAMPLES))
    if tex is not None and int(tex.counts.min()) > 0:
        texture = tex.samples().to(torch.float64)
    samples = HeadSamples(natural=natural, profiles=profiles, texture=texture)
    full = _full_sample_means(samples)
    base = GridBaselines.of(grid)

    if acc.queries is None:
        raise ValueError("no images given")
    queries = acc.queries.cpu()
    s = {k: v.cpu() for k, v in acc.sums.items()}
    n = acc.counts.to(torch.float64).view(-1, 1)
    mean_map = s["map"] / n.view(-1, 1, 1, 1)
    energy = s["map_sq_total"] / n  # E_b sum_ij A_b^2
    variance = (energy - (mean_map**2).sum((-2, -1))).clamp_min(0.0)
    content = (variance / energy).clamp(0.0, 1.0)
    if num_images < 2:
        content = torch.full_like(content, math.nan)

    return HeadStatistics(
        grid=grid,
        num_prefix_tokens=acc.num_prefix,
        num_images=num_images,
        num_texture_images=num_texture,
        baselines=base,
        mean_distance_patches=full["distance"],
        entropy=full["entropy"],
        local_mass=full["neighbour"],
        self_mass=full["self"],
        horizontal=_anisotropy(full["abs_col"], full["abs_row"], base),
        prefix_mass=full["prefix"],
        sink_mass=full["sink"],
        content_dependence=content,
        key_content_dependence=full["key_content"],
        texture_lift=full["lift"],
        texture_lift_flat=full["lift_flat"],
        lowpass_change=full["lowpass_change"],
        mean_maps=mean_map,
        mean_map_queries=queries,
        samples=samples,
    )


def _uniform_weights(m: int) -> Tensor | None:
    return torch.full((1, m), 1.0 / m, dtype=torch.float64) if m else None


def _full_sample_means(samples: HeadSamples) -> dict[str, Tensor]:
    """Every image weighted equally: the full-sample (layers, heads) means."""
    means = _weighted_means(
        samples, _uniform_weights(samples.natural.shape[0]), _uniform_weights(len(samples.texture))
    )
    return {k: v[0] for k, v in means.items()}


@dataclass(frozen=True)
class HeadBootstrap:
    """Bootstrap over the probe images (natural and texture images resampled separately).

    ``labels``: (R, layers, heads) label indices into `LABEL_RULES` per resample;
    ``mean_distance_patches``: (R, layers, heads) per resample.
    """

    labels: Tensor
    mean_distance_patches: Tensor
    resamples: int
    seed: int


def bootstrap_heads(
    stats: HeadStatistics, *, resamples: int = BOOTSTRAP_RESAMPLES, seed: int = BOOTSTRAP_SEED
) -> HeadBootstrap:
    """Recompute every label rule and the mean distance on ``resamples`` bootstrap draws
    of the images (seeded; vectorised: one weighted mean per quantity for all resamples).

    Only per-image scalars and key profiles enter, so the cost is
    O(resamples x images x layers x heads x N), not the N x N maps'.
    """
    samples = stats.samples
    weights = resample_weights(samples.natural.shape[0], resamples, seed=seed)
    texture_weights = (
        resample_weights(len(samples.texture), resamples, seed=seed + 1)
        if len(samples.texture)
        else None
    )
    means = _weighted_means(samples, weights, texture_weights)
    scores = _rule_scores(means, stats.grid, stats.baselines)
    return HeadBootstrap(
        labels=label_index(scores),
        mean_distance_patches=means["distance"],
        resamples=resamples,
        seed=seed,
    )


def statistics_from_attention(
    batches: Iterable[Tensor],
    *,
    grid: Grid,
    num_prefix_tokens: int,
    texture_batches: Iterable[Tensor] | None = None,
    texture_masks: Tensor | None = None,
) -> HeadStatistics:
    """Per-head statistics from already captured attention, one batch at a time.

    Each batch is (layers, B, heads, tokens, tokens) probabilities (rows sum to 1) with
    ``tokens = num_prefix_tokens + grid.num_patches``. Same numbers as `head_statistics`
    (which feeds this reduction from live hooks). ``texture_batches`` (optional) are
    (layers, 3b, heads, T, T): b texture images, their low-passed copies, their flattened
    copies (`texture_controls`), in the order of ``texture_masks`` (M, N); without them
    texture scores are NaN.
    """
    if grid.num_patches < 2:
        raise ValueError("head statistics need at least 2 patches")
    acc: AttentionAccumulator | None = None
    total = 0
    for batch in batches:
        if batch.ndim != 5:
            raise ValueError(
                f"each batch must be (layers, B, heads, T, T), got {tuple(batch.shape)}"
            )
        if acc is None:
            acc = AttentionAccumulator(batch.shape[0], grid, num_prefix_tokens, batch.device)
        elif batch.shape[0] != acc.num_layers:
            raise ValueError(f"batch has {batch.shape[0]} layers, earlier ones {acc.num_layers}")
        for layer in range(batch.shape[0]):
            acc.natural(layer, batch[layer], total)
        total += batch.shape[1]
    if acc is None:
        raise ValueError("no images given")
    tex, n_texture = None, 0
    if texture_batches is not None:
        if texture_masks is None:
            raise ValueError("texture_batches need texture_masks (M, num_patches)")
        fraction = _check_fraction(texture_masks, grid)
        tex = _TextureAccumulator(acc.num_layers, grid, num_prefix_tokens, fraction)
        for batch in texture_batches:
            if batch.ndim != 5 or batch.shape[0] != acc.num_layers or batch.shape[1] % 3:
                raise ValueError(
                    f"each texture batch must be ({acc.num_layers}, 3b, heads, T, T): b images, "
                    f"their low-passed, then their flattened copies, got {tuple(batch.shape)}"
                )
            for layer in range(batch.shape[0]):
                tex(layer, batch[layer], n_texture)
            n_texture += batch.shape[1] // 3
        if n_texture != fraction.shape[0]:
            raise ValueError(f"{n_texture} texture images but {fraction.shape[0]} masks")
    return _finish(acc, tex, total, n_texture)


def head_statistics(
    model: nn.Module,
    images: Tensor | Iterable[Tensor] | None,
    *,
    batch_size: int = 16,
    texture_images: Tensor | Iterable[Tensor] | None = None,
    texture_masks: Tensor | None = None,
    lowpass_sigma_px: float | None = None,
    accumulated: AttentionAccumulator | None = None,
) -> HeadStatistics:
    """Stream ``images`` (model inputs, already normalised) through ``model`` and measure
    every head; see `HeadStatistics` for the meaning and range of each number.

    Each layer's probabilities are reduced inside the capture hook before the next layer
    runs, in chunks of (image, head) maps (`CHUNK_BYTES`), so memory holds one layer of one
    batch, one chunk, and the mean-map sums of `MEAN_MAP_BUDGET_BYTES` at most.
    ``accumulated`` replaces ``images`` (pass None) when another pass over the images has
    already fed an `AttentionAccumulator` (`AttentionAccumulator.for_model`); only the
    texture probes then run here.
    ``texture_masks`` (M, N) bool or float in [0, 1] gives the textured fraction of each
    patch of each texture image; texture images run with two controls (`texture_controls`):
    a low-passed copy (Gaussian, ``lowpass_sigma_px``, default half a patch: it removes the
    within-patch frequencies that make a texture) and a copy with every patch flattened to
    its mean colour; those batches run ``batch_size // 3`` images (at least 1) with their
    copies, so a forward never holds much more than ``batch_size`` images.
    """
    sites = attention_sites(model)
    grid = grid_from_model(model)
    if grid.num_patches < 2:
        raise ValueError("head statistics need at least 2 patches")
    num_prefix = int(getattr(model, "num_prefix_tokens", 0))
    if (images is None) == (accumulated is None):
        raise ValueError("give exactly one of images and an accumulated pass over them")
    if accumulated is not None:
        acc, n_images = accumulated, accumulated.num_images
        if n_images == 0 or int(acc.counts.max()) != n_images:
            raise ValueError(f"the accumulated pass saw {acc.counts.tolist()} images per layer")
    else:
        acc = AttentionAccumulator.for_model(model)
        n_images = stream_attention(model, images, acc.natural, batch_size=batch_size)

    tex, n_texture = None, 0
    if texture_images is not None:
        if texture_masks is None:
            raise ValueError("texture_images need texture_masks (M, num_patches)")
        fraction = _check_fraction(texture_masks, grid)
        sigma = lowpass_sigma_px if lowpass_sigma_px is not None else grid.patch_size / 2
        tex = _TextureAccumulator(len(sites), grid, num_prefix, fraction)
        n_texture = stream_attention(
            model,
            texture_images,
            tex,
            batch_size=max(1, batch_size // 3),  # each runs with 2 copies: batch_size or 3
            prepare=lambda x: texture_controls(x, patch_size=grid.patch_size, sigma_px=sigma),
        )
        if n_texture != fraction.shape[0]:
            raise ValueError(f"{n_texture} texture images but {fraction.shape[0]} masks")
    return _finish(acc, tex, n_images, n_texture)


def label_heads(stats: HeadStatistics) -> list[list[str]]:
    """A label per (layer, head) from `LABEL_RULES` (first match wins); NaN scores fail
    their rule, so without texture probes no head is labelled ``texture``."""
    order = list(LABEL_RULES)
    return [[order[i] for i in row] for row in label_index(stats.rule_scores()).tolist()]


def head_diversity(mean_maps: Tensor) -> Tensor:
    """(layers,) 1 - mean cosine similarity between the mean maps of two different heads.

    0 when all heads of a layer attend alike; toward 1 when they attend to disjoint
    patches. NaN for a single head.
    """
    flat = mean_maps.flatten(2).double()
    flat = flat / flat.norm(dim=-1, keepdim=True).clamp_min(1e-30)
    cos = flat @ flat.transpose(1, 2)  # (L, H, H)
    h = cos.shape[-1]
    if h < 2:
        return torch.full((cos.shape[0],), math.nan, dtype=cos.dtype)
    off = cos.sum((-2, -1)) - cos.diagonal(dim1=-2, dim2=-1).sum(-1)
    return 1.0 - off / (h * (h - 1))


def _f(x: Tensor) -> float | None:
    return finite_or_none(float(x))


def head_section(
    model: nn.Module,
    images: Tensor | Iterable[Tensor] | None,
    *,
    texture_images: Tensor | Iterable[Tensor] | None = None,
    texture_masks: Tensor | None = None,
    batch_size: int = 16,
    probe_set: str | None = None,
    texture_probe_set: str | None = None,
    lowpass_sigma_px: float | None = None,
    accumulated: AttentionAccumulator | None = None,
    resamples: int = BOOTSTRAP_RESAMPLES,
    seed: int = BOOTSTRAP_SEED,
) -> SectionResult:
    """The ``heads`` report section: per-head scores, labels, per-layer summaries, plots.

    ``images`` and ``texture_images`` are model inputs (already normalised, e.g. with
    `workers.analysis.probes.normalize_for_model`); ``texture_masks`` (M, N) is the textured
    fraction per patch (`TextureProbeSet.texture_fraction`). ``probe_set`` and
    ``texture_probe_set`` are recorded so two reports can be compared. ``resamples`` and
    ``seed`` set the bootstrap over images (`bootstrap_heads`). A model whose blocks cannot
    be captured gives ``available: false`` with the reason.
    """
    try:
        attention_sites(model)
        grid_from_model(model)
    except ValueError as error:
        return unavailable(str(error))
    stats = head_statistics(
        model,
        images,
        batch_size=batch_size,
        texture_images=texture_images,
        texture_masks=texture_masks,
        lowpass_sigma_px=lowpass_sigma_px,
        accumulated=accumulated,
    )
    return section_from_statistics(
        stats,
        probe_set=probe_set,
        texture_probe_set=texture_probe_set,
        lowpass_sigma_px=lowpass_sigma_px,
        resamples=resamples,
        seed=seed,
    )


def _interval(samples: Tensor) -> tuple[Tensor, Tensor]:
    return percentile_interval(samples, level=CI_LEVEL)


def _pair(lo: Tensor, hi: Tensor) -> list[float | None]:
    return [_f(lo), _f(hi)]


def section_from_statistics(
    stats: HeadStatistics,
    *,
    probe_set: str | None = None,
    texture_probe_set: str | None = None,
    lowpass_sigma_px: float | None = None,
    resamples: int = BOOTSTRAP_RESAMPLES,
    seed: int = BOOTSTRAP_SEED,
) -> SectionResult:
    """The ``heads`` section (scores, labels, intervals, summaries, plots) from measured
    statistics; shared by the PyTorch path (`head_section`) and the ONNX Runtime path.

    Labels and scores are the full-sample ones; ``*_ci95`` are bootstrap percentile
    intervals and ``label_stability`` the share of resamples that give the same label
    (per head) or the same label counts (per layer)."""
    order = list(LABEL_RULES)
    scores = stats.rule_scores()
    index = label_index(scores)
    labels = [[order[i] for i in row] for row in index.tolist()]
    boot = bootstrap_heads(stats, resamples=resamples, seed=seed)
    stability = (boot.labels == index).to(torch.float64).mean(0)
    dist_lo, dist_hi = _interval(boot.mean_distance_patches)
    layer_lo, layer_hi = _interval(boot.mean_distance_patches.mean(-1))
    counts_of = torch.nn.functional.one_hot(boot.labels, len(order)).sum(-2)  # (R, L, labels)
    full_counts = torch.nn.functional.one_hot(index, len(order)).sum(-2)  # (L, labels)
    layer_stability = (counts_of == full_counts).all(-1).to(torch.float64).mean(0)
    total_lo, total_hi = _interval(counts_of.sum(1).to(torch.float64))

    grid, base = stats.grid, stats.baselines
    diversity = head_diversity(stats.mean_maps)
    dist = stats.mean_distance_patches
    local_score = stats.local_score

    layers = []
    for layer, layer_labels in enumerate(labels):
        heads = []
        for head, label in enumerate(layer_labels):
            at = (layer, head)
            label_scores = {name: _f(value[at]) for name, value in scores.items()}
            heads.append(
                {
                    "head": head,
                    "label": label,
                    "label_stability": _f(stability[at]),
                    "label_rule": LABEL_RULES[label],
                    "label_scores": label_scores,
                    "mean_distance_px": _f(stats.mean_distance_px[at]),
                    "mean_distance_patches": _f(dist[at]),
                    "mean_distance_patches_ci95": _pair(dist_lo[at], dist_hi[at]),
                    "distance_ratio": label_scores["distance_ratio"],
                    "entropy": _f(stats.entropy[at]),
                    "support_share": label_scores["support_share"],
                    "local_mass": _f(stats.local_mass[at]),
                    "self_mass": _f(stats.self_mass[at]),
                    "local_score": _f(local_score[at]),
                    "horizontal": label_scores["horizontal"],
                    "vertical": label_scores["vertical"],
                    "prefix_mass": label_scores["prefix_mass"],
                    "sink_mass": label_scores["sink_mass"],
                    "content_dependence": _f(stats.content_dependence[at]),
                    "key_content_dependence": label_scores["key_content_dependence"],
                    "texture_lift": label_scores["texture_lift"],
                    "texture_lift_flat": label_scores["texture_lift_flat"],
                    "lowpass_change": _f(stats.lowpass_change[at]),
                }
            )
        d = dist[layer]
        layers.append(
            {
                "layer": layer,
                "heads": heads,
                "mean_distance_patches": _f(d.mean()),
                "mean_distance_patches_ci95": _pair(layer_lo[layer], layer_hi[layer]),
                "label_stability": _f(layer_stability[layer]),
                "distance_spread_patches": _f(d.std(unbiased=False)),
                "min_distance_patches": _f(d.min()),
                "max_distance_patches": _f(d.max()),
                "head_diversity": _f(diversity[layer]),
            }
        )
    flat_labels = [lab for row in labels for lab in row]
    counts = {name: flat_labels.count(name) for name in LABELS}
    counts_ci95 = {
        name: [int(total_lo[order.index(name)]), int(total_hi[order.index(name)])]
        for name in LABELS
    }

    from workers.analysis import plots_heads
    from workers.analysis.figures import figure

    data = {
        "available": True,
        "probe_set": probe_set,
        "texture_probe_set": texture_probe_set,
        "num_images": stats.num_images,
        "num_texture_images": stats.num_texture_images,
        "grid": [grid.height, grid.width],
        "patch_size": grid.patch_size,
        "num_prefix_tokens": stats.num_prefix_tokens,
        "uniform_mean_distance_patches": base.mean_distance_patches,
        "uniform_mean_distance_px": base.mean_distance_patches * grid.patch_size,
        "uniform_local_mass": base.local_mass,
        "uniform_self_mass": base.self_mass,
        "sink_keys": sink_keys(grid),
        "lowpass_sigma_px": (
            None
            if stats.num_texture_images == 0
            else float(lowpass_sigma_px if lowpass_sigma_px is not None else grid.patch_size / 2)
        ),
        "thresholds": dict(THRESHOLDS),
        "label_rules": dict(LABEL_RULES),
        "bootstrap": {
            "resamples": boot.resamples,
            "seed": boot.seed,
            "level": CI_LEVEL,
            "over": "probe images; texture images resampled on their own",
        },
        "mean_map_queries": len(stats.mean_map_queries),
        "layers": layers,
        "counts": counts,
        "counts_ci95": counts_ci95,
    }
    figures = {
        "head_distance_vs_depth": figure(
            plots_heads.distance_vs_depth,
            dist.numpy(),
            labels,
            uniform_distance=base.mean_distance_patches,
            intervals=(dist_lo.numpy(), dist_hi.numpy()),
        ),
        "head_label_map": figure(plots_heads.label_map, labels, stability=stability.numpy()),
    }
    arrays = {
        # (layers, heads, Q, N) float16, at most MEAN_MAP_BUDGET_BYTES / 4 (see README)
        "attention_mean_maps": stats.mean_maps.to(torch.float16).numpy(),
        "attention_mean_map_queries": stats.mean_map_queries.to(torch.int32).numpy(),
    }
    return SectionResult(data=data, arrays=arrays, figures=figures)


__all__ = [
    "AttentionAccumulator",
    "HeadBootstrap",
    "HeadSamples",
    "LABELS",
    "LABEL_RULES",
    "RULE_SCORES",
    "THRESHOLDS",
    "GridBaselines",
    "HeadStatistics",
    "bootstrap_heads",
    "flatten_patches",
    "head_diversity",
    "head_section",
    "head_statistics",
    "label_heads",
    "label_index",
    "lowpass",
    "mean_map_queries",
    "section_from_statistics",
    "sink_keys",
    "statistics_from_attention",
    "texture_controls",
]
