"""Per-head statistics and a label for every attention head.

The claim under test: because every head has its own W_Q and W_K, training drives heads to
different roles (local, horizontal, vertical, global, texture detectors). For every layer
and head this module measures, from attention probabilities captured by
`workers.analysis.capture` and reduced batch by batch (streaming):

- where a patch query's attention goes on the grid (distance, entropy, local and self
  mass, axis anisotropy), computed on the patch-to-patch part renormalised to sum to 1 per
  query, so that mass sent to prefix tokens (class token, registers) does not shrink them;
- how much goes to the prefix tokens (``prefix_mass``, reported separately);
- how much the maps depend on the image (``content_dependence``);
- on texture probes, whether attention lands on textured patches (``texture_lift``) and
  how much the maps change when high frequencies are removed (``lowpass_change``).

Only patch queries are measured (the class token's own attention is a different question).
Every number is an average over patch queries and images. Labels come from thresholds
relative to the uniform-attention baseline of the same grid (see `THRESHOLDS`), so a 14x14
and a 7x7 grid are judged on the same scale.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from workers.analysis.capture import attention_sites, stream_attention
from workers.analysis.grid import Grid, grid_from_model
from workers.analysis.results import SectionResult, finite_or_none, unavailable

LABELS: tuple[str, ...] = (
    "local",
    "horizontal",
    "vertical",
    "global",
    "texture",
    "prefix",
    "mixed",
)

# --- label thresholds (relative to the uniform-attention baseline of the same grid) -------
# Prefix: more than half of a patch query's attention goes to prefix tokens, so the head's
# output is mostly a function of the class/register tokens, not of the patches.
PREFIX_MASS_MIN = 0.5
# Texture: textured patches receive at least 1.5x their area share (uniform or purely
# positional heads score 1.0 on average) ...
TEXTURE_LIFT_MIN = 1.5
# ... and removing high frequencies moves at least 10 % of the attention mass (total
# variation distance); a positional head moves 0 %, so a lift that survives blurring is a
# brightness or colour preference, not a texture one.
LOWPASS_CHANGE_MIN = 0.1
# Local: the 3x3 neighbourhood (self included) holds at least half of the mass that
# uniform attention leaves outside it: local_score = (m - u) / (1 - u) >= 0.5 with u the
# uniform 3x3 mass of this grid (0.39 on 4x4, 0.044 on 14x14).
LOCAL_SCORE_MIN = 0.5
# Horizontal / vertical: spread along one axis, relative to the uniform spread along that
# axis, is at least 3x the spread along the other ((3 - 1) / (3 + 1) = 0.5).
AXIS_SCORE_MIN = 0.5
# Global: the mean attention distance is at least 75 % of uniform attention's; a Gaussian
# head reaches it only when its spread covers most of the grid.
GLOBAL_DISTANCE_RATIO_MIN = 0.75

THRESHOLDS: dict[str, float] = {
    "prefix_mass_min": PREFIX_MASS_MIN,
    "texture_lift_min": TEXTURE_LIFT_MIN,
    "lowpass_change_min": LOWPASS_CHANGE_MIN,
    "local_score_min": LOCAL_SCORE_MIN,
    "axis_score_min": AXIS_SCORE_MIN,
    "global_distance_ratio_min": GLOBAL_DISTANCE_RATIO_MIN,
}
# First matching rule wins, in this order.
LABEL_RULES: dict[str, str] = {
    "prefix": f"prefix_mass >= {PREFIX_MASS_MIN}",
    "texture": f"texture_lift >= {TEXTURE_LIFT_MIN} and lowpass_change >= {LOWPASS_CHANGE_MIN}",
    "local": f"local_score >= {LOCAL_SCORE_MIN}",
    "horizontal": f"horizontal >= {AXIS_SCORE_MIN}",
    "vertical": f"vertical >= {AXIS_SCORE_MIN}",
    "global": f"distance_ratio >= {GLOBAL_DISTANCE_RATIO_MIN}",
    "mixed": "no rule above matched",
}

# Queries whose patch-to-patch mass is below this (all attention on prefix tokens) are
# renormalised against this floor instead of 0, so they contribute ~0 rather than NaN.
_PATCH_MASS_FLOOR = 1e-30
_AXIS_EPS = 1e-12  # both axis spreads below this: no spread at all, anisotropy 0


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
    - ``content_dependence``: share of the maps' energy that varies across images,
      E||A_b - mean A||^2 / E||A_b||^2, in [0, 1]; 0 for a purely positional head. NaN for
      fewer than two images.
    - ``texture_lift``: attention mass on textured patches / their area share, in
      [0, 1 / share]; 1.0 for uniform or purely positional heads. NaN without texture probes.
    - ``lowpass_change``: total variation distance between a map and the map of the
      low-passed image, in [0, 1]; 0 for positional heads. NaN without texture probes.
    - ``mean_maps``: (layers, heads, N, N) mean renormalised patch-to-patch attention.
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
    content_dependence: Tensor
    texture_lift: Tensor
    lowpass_change: Tensor
    mean_maps: Tensor

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
    def local_score(self) -> Tensor:
        """(m - u) / (1 - u) with m the 3x3 mass (self included), u uniform's: 1 fully local,
        0 as local as uniform, negative when the head avoids its neighbourhood. NaN on
        grids of at most 2x2, where every patch is in every 3x3 neighbourhood."""
        u = self.baselines.local_mass + self.baselines.self_mass
        m = self.local_mass + self.self_mass
        return (m - u) / (1.0 - u) if u < 1.0 else torch.full_like(m, float("nan"))


def _patch_part(probs: Tensor, num_prefix: int, grid: Grid) -> tuple[Tensor, Tensor]:
    """(B, H, T, T) probs -> renormalised patch-to-patch maps (B, H, N, N) float64 and
    the prefix mass per patch query (B, H, N) float64.

    One new (B, H, N, N) tensor (the maps, renormalised in place); every later reduction
    reads it without further full-size copies. float64 keeps the renormalisation exact to
    ~1e-16 (uniform attention gives exactly uniform maps, whatever the float32 rounding of
    the probabilities).
    """
    n = grid.num_patches
    if probs.ndim != 4 or probs.shape[-1] != probs.shape[-2] or probs.shape[-1] != num_prefix + n:
        raise ValueError(
            f"attention {tuple(probs.shape)} does not match {num_prefix} prefix tokens + "
            f"{grid.height}x{grid.width} patches; were the images the model's input size?"
        )
    prefix = probs[:, :, num_prefix:, :num_prefix].double().sum(-1)
    # a copy even for float64 input: it is renormalised in place
    maps = probs[:, :, num_prefix:, num_prefix:].to(torch.float64, copy=True)
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


class AttentionAccumulator:
    """Streaming per-head sums over the audited images; memory (layers, heads, N, N), not
    images.

    Feed it every layer's probabilities with ``natural(layer, probs, start)``, from its own
    capture pass (`head_statistics`) or from another analysis's forward over the same images
    (the gradient pass hands over its attention, so an audit runs one forward, not two).
    Per layer and batch: one renormalised copy of the maps, one bmm against the stacked
    geometry, one entropy pass, and per-(image, head) reductions summed into float64.
    """

    def __init__(self, num_layers: int, grid: Grid, num_prefix: int, device: torch.device):
        self.grid, self.num_prefix, self.num_layers = grid, num_prefix, num_layers
        self.device = device
        self.sums: dict[str, Tensor] = {}
        self.weights: Tensor | None = None
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

    def _add(self, name: str, layer: int, value: Tensor) -> None:
        if name not in self.sums:
            self.sums[name] = torch.zeros(
                (self.num_layers, *value.shape), dtype=torch.float64, device=self.device
            )
        self.sums[name][layer] += value

    def natural(self, layer: int, probs: Tensor, _start: int) -> None:
        maps, prefix = _patch_part(probs, self.num_prefix, self.grid)
        if self.weights is None or self.weights.dtype != maps.dtype:
            self.weights = _row_weights(self.grid, maps.device, maps.dtype)
        f64 = torch.float64
        # (B, H, N, K) -> mean over queries, sum over images -> (H, K)
        geometry = _weighted_row_sums(maps, self.weights).to(f64).mean(-2).sum(0)
        for k, key in enumerate(_ROW_WEIGHTS):
            self._add(key, layer, geometry[:, k])
        self._add("self", layer, maps.diagonal(dim1=-2, dim2=-1).to(f64).mean(-1).sum(0))
        self._add("prefix", layer, prefix.to(f64).mean(-1).sum(0))
        self._add("map", layer, maps.sum(0, dtype=f64))
        # Only the total over (i, j) of sum_b maps^2 enters content_dependence.
        flat = maps.reshape(*maps.shape[:2], -1)
        self._add("map_sq_total", layer, torch.linalg.vecdot(flat, flat).to(f64).sum(0))
        entropy = torch.special.entr(maps).sum(-1, dtype=f64) / math.log(self.grid.num_patches)
        self._add("entropy", layer, entropy.mean(-1).sum(0))
        self.counts[layer] += probs.shape[0]


class _TextureAccumulator:
    """Streaming sums for texture lift and low-pass change over (image, low-passed) pairs."""

    def __init__(self, num_layers: int, grid: Grid, num_prefix: int, fraction: Tensor):
        self.grid, self.num_prefix, self.fraction = grid, num_prefix, fraction
        self.lift = None
        self.change = None
        self.num_layers = num_layers
        self.counts = torch.zeros(num_layers, dtype=torch.long)

    def __call__(self, layer: int, probs: Tensor, start: int) -> None:
        b = probs.shape[0] // 2
        maps, _ = _patch_part(probs, self.num_prefix, self.grid)
        orig, low = maps[:b], maps[b:]
        frac64 = self.fraction[start : start + b].to(maps.device, torch.float64)
        if frac64.shape[0] != b:
            raise ValueError(f"more texture images than texture_masks ({self.fraction.shape[0]})")
        share = frac64.mean(-1)  # (b,)
        keep = share > 0
        # textured mass per query: one batched matvec per image, (b, H, N)
        mass = (orig @ frac64.to(maps.dtype)[:, None, :, None]).squeeze(-1)
        mass = mass.to(torch.float64).mean(-1)  # (b, H)
        lift = (mass[keep] / share[keep, None]).sum(0)
        orig.sub_(low).abs_()  # in place: the natural half is not needed any more
        change = (0.5 * orig.sum(-1, dtype=torch.float64)).mean(-1)[keep].sum(0)
        if self.lift is None:
            shape = (self.num_layers, maps.shape[1])
            self.lift = torch.zeros(shape, dtype=torch.float64, device=maps.device)
            self.change = torch.zeros(shape, dtype=torch.float64, device=maps.device)
        self.lift[layer] += lift
        self.change[layer] += change
        self.counts[layer] += int(keep.sum())


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
    """Turn streaming sums into per-head statistics (all (layers, heads) at once)."""
    if num_images == 0:
        raise ValueError("no images given")
    grid = acc.grid
    n = acc.counts.to(torch.float64).view(-1, 1)
    s = {k: v.cpu() for k, v in acc.sums.items()}
    base = GridBaselines.of(grid)
    nan = torch.full_like(s["distance"], math.nan)
    # Axis spreads relative to uniform attention's on this grid (NaN for a 1-wide axis).
    col = s["abs_col"] / n / base.abs_col_offset if base.abs_col_offset > 0 else nan
    row = s["abs_row"] / n / base.abs_row_offset if base.abs_row_offset > 0 else nan
    denom = col + row
    horizontal = torch.where(denom > _AXIS_EPS, (col - row) / denom.clamp_min(_AXIS_EPS), 0.0)
    horizontal = torch.where(denom.isnan(), math.nan, horizontal)

    n4 = n.view(-1, 1, 1, 1)
    mean_map = s["map"] / n4
    energy = s["map_sq_total"] / n  # E_b sum_ij A_b^2
    variance = (energy - (mean_map**2).sum((-2, -1))).clamp_min(0.0)
    content = (variance / energy).clamp(0.0, 1.0) if num_images >= 2 else nan

    lift = change = nan
    if tex is not None and tex.lift is not None and int(tex.counts.min()) > 0:
        kept = tex.counts.to(torch.float64).view(-1, 1)
        lift = tex.lift.cpu() / kept
        change = tex.change.cpu() / kept

    return HeadStatistics(
        grid=grid,
        num_prefix_tokens=acc.num_prefix,
        num_images=num_images,
        num_texture_images=num_texture,
        baselines=base,
        mean_distance_patches=s["distance"] / n,
        entropy=s["entropy"] / n,
        local_mass=s["neighbour"] / n,
        self_mass=s["self"] / n,
        horizontal=horizontal,
        prefix_mass=s["prefix"] / n,
        content_dependence=content,
        texture_lift=lift,
        lowpass_change=change,
        mean_maps=mean_map,
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
    (layers, 2b, heads, T, T): b texture images followed by their low-passed copies (see
    `lowpass`), in the order of ``texture_masks`` (M, N); without them texture scores are NaN.
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
            if batch.ndim != 5 or batch.shape[0] != acc.num_layers or batch.shape[1] % 2:
                raise ValueError(
                    f"each texture batch must be ({acc.num_layers}, 2b, heads, T, T): b images "
                    f"then their low-passed copies, got {tuple(batch.shape)}"
                )
            for layer in range(batch.shape[0]):
                tex(layer, batch[layer], n_texture)
            n_texture += batch.shape[1] // 2
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
    runs, so memory holds one layer of one batch plus (layers, heads, N, N) sums.
    ``accumulated`` replaces ``images`` (pass None) when another pass over the images has
    already fed an `AttentionAccumulator` (`AttentionAccumulator.for_model`); only the
    texture probes then run here.
    ``texture_masks`` (M, N) bool or float in [0, 1] gives the textured fraction of each
    patch of each texture image; texture images run paired with their low-passed copy
    (Gaussian, ``lowpass_sigma_px``, default half a patch: it removes the within-patch
    frequencies that make a texture), so those batches are twice as large.
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
            batch_size=batch_size,
            prepare=lambda x: torch.cat([x, lowpass(x, sigma_px=sigma)]),
        )
        if n_texture != fraction.shape[0]:
            raise ValueError(f"{n_texture} texture images but {fraction.shape[0]} masks")
    return _finish(acc, tex, n_images, n_texture)


def label_heads(stats: HeadStatistics) -> list[list[str]]:
    """A label per (layer, head) from `LABEL_RULES` (first match wins); NaN scores fail
    their rule, so without texture probes no head is labelled ``texture``."""
    rules = {
        "prefix": stats.prefix_mass >= PREFIX_MASS_MIN,
        "texture": (stats.texture_lift >= TEXTURE_LIFT_MIN)
        & (stats.lowpass_change >= LOWPASS_CHANGE_MIN),
        "local": stats.local_score >= LOCAL_SCORE_MIN,
        "horizontal": stats.horizontal >= AXIS_SCORE_MIN,
        "vertical": stats.vertical >= AXIS_SCORE_MIN,
        "global": stats.distance_ratio >= GLOBAL_DISTANCE_RATIO_MIN,
    }
    order = [*rules, "mixed"]
    index = torch.full(stats.prefix_mass.shape, len(order) - 1, dtype=torch.long)
    # Assign from the lowest priority up so that earlier rules overwrite later ones.
    for i in reversed(range(len(rules))):
        index = torch.where(rules[order[i]], i, index)
    return [[order[i] for i in row] for row in index.tolist()]


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
) -> SectionResult:
    """The ``heads`` report section: per-head scores, labels, per-layer summaries, plots.

    ``images`` and ``texture_images`` are model inputs (already normalised, e.g. with
    `workers.analysis.probes.normalize_for_model`); ``texture_masks`` (M, N) is the textured
    fraction per patch (`TextureProbeSet.texture_fraction`). ``probe_set`` and
    ``texture_probe_set`` are recorded so two reports can be compared. A model whose blocks
    cannot be captured gives ``available: false`` with the reason.
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
    )


def section_from_statistics(
    stats: HeadStatistics,
    *,
    probe_set: str | None = None,
    texture_probe_set: str | None = None,
    lowpass_sigma_px: float | None = None,
) -> SectionResult:
    """The ``heads`` section (scores, labels, summaries, plots) from measured statistics;
    shared by the PyTorch path (`head_section`) and the ONNX Runtime path."""
    labels = label_heads(stats)
    grid, base = stats.grid, stats.baselines
    diversity = head_diversity(stats.mean_maps)
    dist = stats.mean_distance_patches
    local_score, ratio = stats.local_score, stats.distance_ratio

    layers = []
    for layer, layer_labels in enumerate(labels):
        heads = []
        for head, label in enumerate(layer_labels):
            at = (layer, head)
            scores = {
                "prefix_mass": _f(stats.prefix_mass[at]),
                "texture_lift": _f(stats.texture_lift[at]),
                "lowpass_change": _f(stats.lowpass_change[at]),
                "local_score": _f(local_score[at]),
                "horizontal": _f(stats.horizontal[at]),
                "vertical": _f(stats.vertical[at]),
                "distance_ratio": _f(ratio[at]),
            }
            heads.append(
                {
                    "head": head,
                    "label": label,
                    "label_rule": LABEL_RULES[label],
                    "label_scores": scores,
                    "mean_distance_px": _f(stats.mean_distance_px[at]),
                    "mean_distance_patches": _f(dist[at]),
                    "distance_ratio": scores["distance_ratio"],
                    "entropy": _f(stats.entropy[at]),
                    "local_mass": _f(stats.local_mass[at]),
                    "self_mass": _f(stats.self_mass[at]),
                    "local_score": scores["local_score"],
                    "horizontal": scores["horizontal"],
                    "vertical": scores["vertical"],
                    "prefix_mass": scores["prefix_mass"],
                    "content_dependence": _f(stats.content_dependence[at]),
                    "texture_lift": scores["texture_lift"],
                    "lowpass_change": scores["lowpass_change"],
                }
            )
        d = dist[layer]
        layers.append(
            {
                "layer": layer,
                "heads": heads,
                "mean_distance_patches": _f(d.mean()),
                "distance_spread_patches": _f(d.std(unbiased=False)),
                "min_distance_patches": _f(d.min()),
                "max_distance_patches": _f(d.max()),
                "head_diversity": _f(diversity[layer]),
            }
        )
    flat_labels = [lab for row in labels for lab in row]
    counts = {name: flat_labels.count(name) for name in LABELS}

    from workers.analysis import plots_heads

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
        "lowpass_sigma_px": (
            None
            if stats.num_texture_images == 0
            else float(lowpass_sigma_px if lowpass_sigma_px is not None else grid.patch_size / 2)
        ),
        "thresholds": dict(THRESHOLDS),
        "label_rules": dict(LABEL_RULES),
        "layers": layers,
        "counts": counts,
    }
    figures = {
        "head_distance_vs_depth": plots_heads.distance_vs_depth(
            dist.numpy(), labels, uniform_distance=base.mean_distance_patches
        ),
        "head_label_map": plots_heads.label_map(labels),
    }
    arrays = {"attention_mean_maps": stats.mean_maps.to(torch.float32).numpy()}
    return SectionResult(data=data, arrays=arrays, figures=figures)


__all__ = [
    "AttentionAccumulator",
    "LABELS",
    "LABEL_RULES",
    "THRESHOLDS",
    "GridBaselines",
    "HeadStatistics",
    "head_diversity",
    "head_section",
    "head_statistics",
    "statistics_from_attention",
    "section_from_statistics",
    "label_heads",
    "lowpass",
]
