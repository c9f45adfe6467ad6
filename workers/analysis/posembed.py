"""Position-embedding structure: did the learned table become a map of the patch grid?

Since a ViT adds ``pos_i`` to patch ``i`` (``X_i = patch_i + pos_i``), the gradient on
``pos_i`` is the gradient on ``X_i``; training pulls neighbouring positions towards similar
directions until the table "looks like an (x, y) plane" (Dosovitskiy et al. 2021, Fig. 7,
centre). The metrics here make that measurable for one table.

All metrics are pure functions over a ``(grid_h, grid_w, dim)`` table (raster order over the
first two dims) and a :class:`~workers.analysis.grid.Grid`; similarity metrics take the
``(N, N)`` cosine-similarity matrix from :func:`cosine_similarity_matrix`. Inputs are never
modified. :func:`analyse_table` runs them all; :func:`position_embedding_section` reads the
table out of a timm model and returns the report section.

Chance levels are stated per metric. "Random" means one of two things, and each number says
which: a *shuffled* baseline keeps the table's embeddings but assigns them to random grid
positions (what a table with the same similarity structure but no grid layout scores); a
*Gaussian* baseline draws an i.i.d. Gaussian table of the same shape.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from scipy.linalg import orthogonal_procrustes
from scipy.stats import spearmanr
from sklearn.linear_model import RidgeCV
from sklearn.metrics import r2_score
from sklearn.model_selection import KFold
from threadpoolctl import threadpool_limits
from torch import Tensor

from workers.analysis.grid import Grid, bin_mean, grid_from_model
from workers.analysis.results import SectionResult, finite_or_none, unavailable

NEIGHBOURHOODS = (4, 8)
# Similarities live in [-1, 1]; values this close are one tie (float noise from symmetric
# positions of a sin-cos table), so recall does not depend on the order of equal values.
TIE_TOLERANCE = 1e-9
_TIE_DECIMALS = 9
CV_FOLDS = 5
# Ridge penalties relative to a table rescaled to unit RMS; the low end lets ridge use the
# nearly linear low-frequency channels of a sin-cos table, the high end shrinks a random
# table to its mean (R^2 ~ 0 out of fold).
RIDGE_ALPHAS = np.logspace(-6, 6, 25)
SHUFFLE_DRAWS = 32  # shuffled-position draws for the profile band and projection baseline
SHUFFLE_BAND_QUANTILES = (0.05, 0.95)
# bf16 storage rounds values in [-1, 1] by up to 2**-8 ~ 4e-3; fp32 sin-cos tables match to 1e-6.
SINCOS_MATCH_TOLERANCE = 1e-2
SINCOS_TEMPERATURE = 10000.0
# Pairs per chunk when batching shuffled similarity matrices (keeps memory ~40 MB at float64).
_SHUFFLE_CHUNK_ELEMENTS = 5_000_000


# ----------------------------------------------------------------------------- validation


def _check_table(table: Tensor, grid: Grid) -> Tensor:
    """(H, W, D) table -> (N, D) float64 copy, raster order; ValueError on bad input."""
    if not isinstance(table, Tensor):
        raise ValueError(f"table must be a torch.Tensor, got {type(table).__name__}")
    if table.ndim != 3:
        raise ValueError(f"table must be (grid_h, grid_w, dim), got shape {tuple(table.shape)}")
    if tuple(table.shape[:2]) != grid.shape:
        raise ValueError(f"table grid {tuple(table.shape[:2])} does not match grid {grid.shape}")
    if table.shape[2] < 1:
        raise ValueError("table has no embedding dimensions")
    if grid.height < 2 or grid.width < 2:
        raise ValueError(f"grid metrics need at least 2 rows and 2 columns, got {grid.shape}")
    flat = table.detach().to("cpu", torch.float64).reshape(grid.num_patches, -1)
    if not torch.isfinite(flat).all():
        raise ValueError("table contains NaN or infinite values")
    return flat


def _check_similarity(similarity: Tensor, grid: Grid) -> Tensor:
    if not isinstance(similarity, Tensor):
        raise ValueError(f"similarity must be a torch.Tensor, got {type(similarity).__name__}")
    n = grid.num_patches
    if tuple(similarity.shape) != (n, n):
        raise ValueError(
            f"similarity must be ({n}, {n}) for grid {grid.shape}, got {tuple(similarity.shape)}"
        )
    if grid.height < 2 or grid.width < 2:
        raise ValueError(f"grid metrics need at least 2 rows and 2 columns, got {grid.shape}")
    return similarity.detach().to("cpu", torch.float64)


# ----------------------------------------------------------------------------- similarity


def cosine_similarity_matrix(table: Tensor, grid: Grid) -> Tensor:
    """(N, N) float64 cosine similarity between the embeddings of every pair of patches.

    Raw (uncentred) cosine, as in the ViT paper's Fig. 7. Values in [-1, 1]; 1 on the
    diagonal (0 for an all-zero embedding). Invariant to scaling the table.
    """
    flat = _check_table(table, grid)
    norms = flat.norm(dim=1, keepdim=True)
    unit = flat / norms.clamp_min(torch.finfo(torch.float64).tiny)
    return (unit @ unit.T).clamp(-1.0, 1.0)


def _off_diagonal(grid: Grid) -> Tensor:
    return ~torch.eye(grid.num_patches, dtype=torch.bool)


def mean_off_diagonal_similarity(similarity: Tensor, grid: Grid) -> float:
    """Mean similarity over all pairs of distinct patches.

    This is the value every distance bin has in expectation when the same embeddings are
    assigned to random positions: the flat line of the shuffled baseline.
    """
    sim = _check_similarity(similarity, grid)
    return float(sim[_off_diagonal(grid)].mean())


def similarity_distance_profile(similarity: Tensor, grid: Grid) -> tuple[Tensor, Tensor]:
    """Mean similarity per grid-distance bin, self-pairs excluded.

    Returns ``(distance, mean_similarity)``, both (num_distance_bins - 1,): the mean
    Euclidean distance (patches) of the pairs in bins 1, 2, ... (see
    ``Grid.distance_bins``) and their mean cosine similarity. A map of the grid falls with
    distance; a table without grid structure is flat at
    :func:`mean_off_diagonal_similarity`.
    """
    sim = _check_similarity(similarity, grid)
    return grid.bin_centres[1:].clone(), grid.bin_mean(sim)[1:]


def shuffled_profile_band(
    similarity: Tensor, grid: Grid, *, draws: int = SHUFFLE_DRAWS, seed: int = 0
) -> tuple[Tensor, Tensor]:
    """(low, high) per distance bin of the profile when positions are shuffled.

    The 5th and 95th percentiles over ``draws`` random assignments of the same embeddings
    to grid positions: how far a bin can stray from the flat baseline by chance alone.
    """
    sim = _check_similarity(similarity, grid)
    if draws < 2:
        raise ValueError(f"draws must be at least 2, got {draws}")
    n = grid.num_patches
    gen = torch.Generator().manual_seed(seed)
    perms = torch.stack([torch.randperm(n, generator=gen) for _ in range(draws)])
    chunk = max(1, _SHUFFLE_CHUNK_ELEMENTS // (n * n))
    profiles = []
    for start in range(0, draws, chunk):
        p = perms[start : start + chunk]
        shuffled = sim[p[:, :, None], p[:, None, :]]  # (chunk, N, N)
        profiles.append(grid.bin_mean(shuffled)[:, 1:])
    stacked = torch.cat(profiles)
    q = torch.tensor(SHUFFLE_BAND_QUANTILES, dtype=torch.float64)
    band = torch.quantile(stacked, q, dim=0)
    return band[0], band[1]


def similarity_distance_spearman(similarity: Tensor, grid: Grid) -> float:
    """Spearman rank correlation between similarity and grid distance over all pairs i < j.

    In [-1, 1]; strongly negative for a map of the grid (near patches are more similar),
    0 in expectation for a table without grid structure. NaN when all similarities are
    equal. Similarities equal to within ``TIE_TOLERANCE`` count as ties.
    """
    sim = _check_similarity(similarity, grid)
    iu = torch.triu_indices(grid.num_patches, grid.num_patches, offset=1)
    # Round to the tie tolerance: equal similarities (symmetric positions) must tie
    # whatever float noise the table's scale adds, or their ranks would follow the noise.
    s = np.round(sim[iu[0], iu[1]].numpy(), _TIE_DECIMALS)
    d = grid.distances[iu[0], iu[1]].numpy()
    if np.ptp(s) == 0:
        return float("nan")
    return float(spearmanr(s, d).statistic)


def neighbour_recall(similarity: Tensor, grid: Grid, *, k: int = 4) -> float:
    """Fraction of each patch's grid neighbours found among its most similar embeddings.

    For patch i with n_i grid neighbours (``Grid.neighbour_mask(k)``: n_i = k inside the
    grid, fewer on edges and corners) take the n_i other patches whose embeddings are most
    similar to i's; the recall is the fraction of those that are grid neighbours, averaged
    over patches. Ties at the cut-off count fractionally (the expected value over a random
    order of tied patches). In [0, 1]: 1.0 for a perfect map, about
    :func:`neighbour_recall_baseline` for a table without grid structure.
    """
    sim = _check_similarity(similarity, grid).clone()
    nbr = grid.neighbour_mask(k)
    sim.fill_diagonal_(float("-inf"))
    n_i = nbr.sum(dim=1)
    cutoff = sim.sort(dim=1, descending=True).values.gather(1, (n_i - 1)[:, None])
    above = sim > cutoff + TIE_TOLERANCE
    tied = (sim - cutoff).abs() <= TIE_TOLERANCE
    still_needed = n_i - above.sum(dim=1)
    hits = (above & nbr).sum(dim=1).double() + still_needed.double() * (tied & nbr).sum(
        dim=1
    ).double() / tied.sum(dim=1).double()
    return float((hits / n_i.double()).mean())


def neighbour_recall_baseline(grid: Grid, *, k: int = 4) -> float:
    """Expected :func:`neighbour_recall` when the similarity order ignores the grid.

    Mean over patches of n_i / (N - 1): the chance that a random other patch is one of i's
    n_i neighbours. Exact for any table whose embeddings are assigned to random positions
    (and for i.i.d. random tables).
    """
    if grid.num_patches < 2:
        raise ValueError("neighbour recall needs at least 2 patches")
    n_i = grid.neighbour_mask(k).sum(dim=1).double()
    return float((n_i / (grid.num_patches - 1)).mean())


def row_col_profiles(similarity: Tensor, grid: Grid) -> tuple[Tensor, Tensor, Tensor]:
    """Mean similarity of same-row and same-column pairs at each offset d.

    Returns ``(d, same_row, same_col)`` for d = 1 .. min(H, W) - 1 (offsets that exist along
    both axes): ``same_row[d]`` averages pairs in one row ``d`` columns apart,
    ``same_col[d]`` pairs in one column ``d`` rows apart.
    """
    sim = _check_similarity(similarity, grid)
    max_d = min(grid.height, grid.width) - 1
    overflow = max_d + 1  # bin for every pair that is not counted
    dr, dc = grid.row_offsets.abs().long(), grid.col_offsets.abs().long()
    row_bins = torch.where((dr == 0) & (dc >= 1) & (dc <= max_d), dc, overflow)
    col_bins = torch.where((dc == 0) & (dr >= 1) & (dr <= max_d), dr, overflow)
    same_row = bin_mean(sim, row_bins, overflow + 1)[1:overflow]
    same_col = bin_mean(sim, col_bins, overflow + 1)[1:overflow]
    return torch.arange(1, max_d + 1, dtype=torch.float64), same_row, same_col


def row_col_anisotropy(similarity: Tensor, grid: Grid) -> float:
    """Mean over d of (same-row similarity - same-column similarity) at equal offset d.

    See :func:`row_col_profiles`. In [-2, 2], in cosine units; 0 for a table that treats
    rows and columns alike (a 2-D sin-cos table gives exactly 0) and 0 in expectation for a
    table without grid structure. Positive: patches in the same row are more alike than
    patches in the same column (row structure: the embedding changes slowly along a row
    and jumps between rows, as a 1-D raster table does); negative: column structure.
    """
    _, same_row, same_col = row_col_profiles(similarity, grid)
    return float((same_row - same_col).mean())


# ----------------------------------------------------------------------------- geometry


def decodability(table: Tensor, grid: Grid, *, seed: int = 0, folds: int = CV_FOLDS) -> dict:
    """Cross-validated R^2 of a linear (ridge) map from embedding to (row, col).

    The table is centred and rescaled to unit RMS (so the result does not depend on the
    table's scale); ``RidgeCV`` picks the penalty per coordinate inside each training
    split; predictions for every patch come from the fold that held it out (``folds``
    shuffled, seeded folds: contiguous folds over the raster order would ask a different
    question, extrapolation to unseen rows). Returns ``{"r2", "row_r2", "col_r2"}``:
    R^2 of the held-out predictions per coordinate and their mean. At most 1 (perfect
    map); about 0 for a table without grid structure (slightly negative is normal:
    predicting the training mean out of fold does a little worse than the true mean).
    """
    flat = _check_table(table, grid).numpy()
    if folds < 2:
        raise ValueError(f"folds must be at least 2, got {folds}")
    x = flat - flat.mean(axis=0)
    rms = float(np.sqrt((x**2).mean()))
    if rms > 0:
        x = x / rms
    y = grid.coords.numpy()
    splitter = KFold(n_splits=min(folds, grid.num_patches), shuffle=True, random_state=seed)
    pred = np.empty_like(y)
    for train, test in splitter.split(x):
        model = RidgeCV(alphas=RIDGE_ALPHAS, alpha_per_target=True).fit(x[train], y[train])
        pred[test] = model.predict(x[test])
    per_coord = r2_score(y, pred, multioutput="raw_values")
    return {
        "r2": float(per_coord.mean()),
        "row_r2": float(per_coord[0]),
        "col_r2": float(per_coord[1]),
    }


def centred_pca(flat: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Top-2 principal-component scores (N, 2) and all PCA variances of an (N, D) matrix.

    Eigen-decomposes the smaller Gram matrix (N x N or D x D), which is what a 196 x 768
    table needs to stay fast. Variances are sums of squares (not divided by N): only their
    ratios are used. Scores of missing components (D = 1) are 0.
    """
    x = flat - flat.mean(axis=0)
    n, d = x.shape
    if n <= d:
        evals, evecs = np.linalg.eigh(x @ x.T)
        evals, evecs = evals[::-1].clip(min=0.0), evecs[:, ::-1]
        scores = evecs[:, :2] * np.sqrt(evals[:2])
    else:
        evals, evecs = np.linalg.eigh(x.T @ x)
        evals, evecs = evals[::-1].clip(min=0.0), evecs[:, ::-1]
        scores = x @ evecs[:, :2]
    if scores.shape[1] < 2:
        scores = np.pad(scores, ((0, 0), (0, 2 - scores.shape[1])))
    return scores, evals


def _procrustes_r2(points: np.ndarray, target: np.ndarray) -> float:
    """R^2 of the best rotation/reflection + uniform scale of ``points`` onto ``target``.

    Both (N, 2) and centred. 1 when ``points`` is a similar copy of ``target``.
    """
    denom = float((points**2).sum())
    total = float((target**2).sum())
    if denom == 0 or total == 0:
        return 0.0
    rotation, sv_sum = orthogonal_procrustes(points, target)
    fitted = (sv_sum / denom) * points @ rotation
    return 1.0 - float(((target - fitted) ** 2).sum()) / total


def _centred_coords(grid: Grid) -> np.ndarray:
    coords = grid.coords.numpy()
    return coords - coords.mean(axis=0)


def _spectrum_from_variances(var: np.ndarray) -> dict:
    total = float(var.sum())
    if total <= 0:
        nan = float("nan")
        return {"effective_dim": nan, "top2_variance_share": nan, "top10_variance_share": nan}
    return {
        "effective_dim": total**2 / float((var**2).sum()),
        "top2_variance_share": float(var[:2].sum()) / total,
        "top10_variance_share": float(var[:10].sum()) / total,
    }


def _shuffled_procrustes_r2(points: np.ndarray, grid: Grid, *, draws: int, seed: int) -> float:
    target = _centred_coords(grid)
    rng = np.random.default_rng(seed)
    return float(
        np.mean(
            [_procrustes_r2(points, target[rng.permutation(len(target))]) for _ in range(draws)]
        )
    )


def projection_r2(table: Tensor, grid: Grid) -> float:
    """R^2 of the best 2-D projection of the table onto the grid coordinates.

    The top two principal components of the centred table, rotated/reflected (orthogonal
    Procrustes, ``scipy.linalg.orthogonal_procrustes``) and uniformly scaled onto the
    centred (row, col) coordinates. In [0, 1]; 1 when the table's main plane *is* the grid
    up to rotation and scale. Not cross-validated and two directions are chosen freely, so a
    table without grid structure scores above 0: compare with
    :func:`projection_r2_shuffled`.
    """
    scores, _ = centred_pca(_check_table(table, grid).numpy())
    return _procrustes_r2(scores, _centred_coords(grid))


def projection_r2_shuffled(
    table: Tensor, grid: Grid, *, draws: int = SHUFFLE_DRAWS, seed: int = 0
) -> float:
    """Mean :func:`projection_r2` over ``draws`` random assignments of positions (chance)."""
    scores, _ = centred_pca(_check_table(table, grid).numpy())
    return _shuffled_procrustes_r2(scores, grid, draws=draws, seed=seed)


def spectrum_stats(table: Tensor, grid: Grid) -> dict:
    """Effective dimensionality and variance concentration of the centred table.

    ``effective_dim``: participation ratio (sum lambda)^2 / sum lambda^2 of the PCA
    variances lambda, in [1, min(N - 1, D)] (1 when one direction carries everything; a
    2-D sin-cos table is low, an i.i.d. Gaussian table is high, see
    :func:`gaussian_spectrum_baseline`). ``top2_variance_share`` and
    ``top10_variance_share``: fraction of the variance in the top 2 / 10 components, in
    [0, 1]. NaN for a table with zero variance (all positions equal).
    """
    _, var = centred_pca(_check_table(table, grid).numpy())
    return _spectrum_from_variances(var)


def gaussian_spectrum_baseline(grid: Grid, dim: int, *, seed: int = 0) -> dict:
    """:func:`spectrum_stats` of one seeded i.i.d. Gaussian table of the same shape."""
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn(grid.height, grid.width, dim, generator=gen, dtype=torch.float64)
    return spectrum_stats(noise, grid)


# ----------------------------------------------------------------------------- summary


def recall_lift(recall: float, baseline: float) -> float:
    """(recall - baseline) / (1 - baseline), clipped to [0, 1]: 0 at chance, 1 perfect."""
    if baseline >= 1:
        return 0.0
    return float(np.clip((recall - baseline) / (1.0 - baseline), 0.0, 1.0))


def grid_structure_score(
    *,
    decodability_r2: float,
    recall_k4: float,
    recall_k4_random: float,
    recall_k8: float,
    recall_k8_random: float,
) -> float:
    """One number for "is this table a map of the grid", in [0, 1].

    ``0.5 * clip(decodability_r2, 0, 1) + 0.25 * lift_k4 + 0.25 * lift_k8`` where
    ``lift_k = (recall_k - baseline_k) / (1 - baseline_k)`` clipped to [0, 1]. Half of it
    asks whether (row, col) can be read out of the embedding linearly (global layout), half
    whether each patch's nearest embeddings are its grid neighbours (local layout).
    About 0 for a table without grid structure (random or shuffled: R^2 <= 0 and recall at
    chance), about 1 for a perfect map (2-D sin-cos scores ~0.95 to 1); a 1-D raster table
    sits in between (rows decodable, columns not; left/right neighbours found, up/down not).
    The similarity-distance Spearman is left out: it rewards any smooth fall-off, including
    one along the raster index only.
    """
    decod = float(np.clip(decodability_r2, 0.0, 1.0)) if np.isfinite(decodability_r2) else 0.0
    return (
        0.5 * decod
        + 0.25 * recall_lift(recall_k4, recall_k4_random)
        + 0.25 * recall_lift(recall_k8, recall_k8_random)
    )


@dataclass
class TableAnalysis:
    """Everything :func:`analyse_table` measured: JSON-ready ``data`` plus the matrix."""

    data: dict[str, Any]
    similarity: Tensor


def _json_list(values: Tensor) -> list[float | None]:
    return [finite_or_none(v) for v in values.tolist()]


def analyse_table(table: Tensor, grid: Grid, *, seed: int = 0) -> TableAnalysis:
    """All position-embedding metrics of one (H, W, D) table, with their baselines.

    ``data`` is JSON-ready (None for undefined values). Seeded: the same table and seed
    give the same numbers. BLAS runs single-threaded inside (restored on exit): the
    matrices are small, and on a loaded 2-core machine OpenBLAS threads made a 14x14x768
    table ten times slower (1-2 s instead of ~0.15 s).
    """
    with threadpool_limits(limits=1, user_api="blas"):
        return _analyse_table(table, grid, seed=seed)


def _analyse_table(table: Tensor, grid: Grid, *, seed: int) -> TableAnalysis:
    flat = _check_table(table, grid)
    scores, variances = centred_pca(flat.numpy())
    sim = cosine_similarity_matrix(table, grid)
    recall = {f"k{k}": neighbour_recall(sim, grid, k=k) for k in NEIGHBOURHOODS}
    recall.update({f"k{k}_random": neighbour_recall_baseline(grid, k=k) for k in NEIGHBOURHOODS})
    decod = decodability(table, grid, seed=seed)
    gen = torch.Generator().manual_seed(seed)
    shuffled = flat[torch.randperm(grid.num_patches, generator=gen)].reshape(table.shape)
    decod_shuffled = decodability(shuffled, grid, seed=seed)
    distance, profile = similarity_distance_profile(sim, grid)
    band_low, band_high = shuffled_profile_band(sim, grid, seed=seed)
    offsets, same_row, same_col = row_col_profiles(sim, grid)
    spectrum = _spectrum_from_variances(variances)
    spectrum_random = gaussian_spectrum_baseline(grid, flat.shape[1], seed=seed)
    score = grid_structure_score(
        decodability_r2=decod["r2"],
        recall_k4=recall["k4"],
        recall_k4_random=recall["k4_random"],
        recall_k8=recall["k8"],
        recall_k8_random=recall["k8_random"],
    )
    data = {
        "grid_structure_score": finite_or_none(score),
        "grid_structure_score_parts": {
            "decodability": finite_or_none(np.clip(decod["r2"], 0.0, 1.0)),
            "recall_lift_k4": recall_lift(recall["k4"], recall["k4_random"]),
            "recall_lift_k8": recall_lift(recall["k8"], recall["k8_random"]),
        },
        "decodability_r2": finite_or_none(decod["r2"]),
        "decodability_r2_row": finite_or_none(decod["row_r2"]),
        "decodability_r2_col": finite_or_none(decod["col_r2"]),
        "decodability_r2_shuffled": finite_or_none(decod_shuffled["r2"]),
        "decodability_folds": min(CV_FOLDS, grid.num_patches),
        "similarity_distance_spearman": finite_or_none(similarity_distance_spearman(sim, grid)),
        "similarity_distance_spearman_random": 0.0,
        "neighbour_recall": {key: finite_or_none(v) for key, v in recall.items()},
        "projection_r2": finite_or_none(_procrustes_r2(scores, _centred_coords(grid))),
        "projection_r2_shuffled": finite_or_none(
            _shuffled_procrustes_r2(scores, grid, draws=SHUFFLE_DRAWS, seed=seed)
        ),
        "row_col_anisotropy": finite_or_none(row_col_anisotropy(sim, grid)),
        "row_col_profile": {
            "offset": _json_list(offsets),
            "same_row": _json_list(same_row),
            "same_col": _json_list(same_col),
        },
        "similarity_profile": {
            "distance": _json_list(distance),
            "mean_similarity": _json_list(profile),
            "random_baseline": finite_or_none(mean_off_diagonal_similarity(sim, grid)),
            "random_band_low": _json_list(band_low),
            "random_band_high": _json_list(band_high),
        },
        "effective_dim": finite_or_none(spectrum["effective_dim"]),
        "top2_variance_share": finite_or_none(spectrum["top2_variance_share"]),
        "top10_variance_share": finite_or_none(spectrum["top10_variance_share"]),
        "effective_dim_random": finite_or_none(spectrum_random["effective_dim"]),
        "top2_variance_share_random": finite_or_none(spectrum_random["top2_variance_share"]),
        "top10_variance_share_random": finite_or_none(spectrum_random["top10_variance_share"]),
        "baselines": (
            "*_random recall: expected under random positions (exact); "
            "*_shuffled: same embeddings at random positions; "
            "*_random spectrum: one i.i.d. Gaussian table of the same shape; "
            "profile random_baseline/band: shuffled positions (mean, 5-95%); "
            "spearman and anisotropy: 0 at chance"
        ),
    }
    return TableAnalysis(data=data, similarity=sim)


# ----------------------------------------------------------------------------- timm models


def sincos_2d_reference(grid: Grid, dim: int) -> Tensor:
    """(N, dim) float64 2-D sin-cos table (MAE / timm ``build_sincos2d_pos_embed``)."""
    from timm.layers import build_sincos2d_pos_embed

    return build_sincos2d_pos_embed(
        [grid.height, grid.width], dim=dim, temperature=SINCOS_TEMPERATURE, dtype=torch.float64
    ).to(torch.float64)


def matches_sincos(table: Tensor, grid: Grid, *, tolerance: float = SINCOS_MATCH_TOLERANCE) -> bool:
    """True when every channel of the table is a channel of the standard 2-D sin-cos table.

    Compares channels as sets (each table channel, over all positions, must lie within
    ``tolerance`` in max-abs of some reference channel), so any channel order (MAE's
    width-first halves, timm's height-first, interleaved sin/cos) matches. Needs
    ``dim % 4 == 0``; other tables never match.
    """
    flat = _check_table(table, grid)
    dim = flat.shape[1]
    if dim % 4:
        return False
    reference = sincos_2d_reference(grid, dim)
    dist = torch.cdist(flat.T.contiguous(), reference.T.contiguous(), p=float("inf"))
    return bool((dist.min(dim=1).values <= tolerance).all())


@dataclass(frozen=True)
class PositionTable:
    """The absolute position table of a model as the analysis sees it.

    ``table`` is (H, W, D) on the model's grid (None when the model has none); ``kind`` is
    one of ``learned_absolute``, ``fixed_sincos``, ``fixed_absolute``, ``none``,
    ``rotary``, ``relative_bias``; ``detail`` says why. ``table_grid`` is the grid the
    stored table covers; when it differs from ``grid`` the table was resampled to it.
    """

    grid: Grid
    kind: str
    detail: str
    table: Tensor | None = None
    table_grid: tuple[int, int] | None = None
    num_prefix_tokens: int = 0
    prefix_in_table: bool = False
    trainable: bool | None = None
    matches_sincos: bool | None = None

    @property
    def resampled(self) -> bool:
        return self.table_grid is not None and self.table_grid != self.grid.shape


def _no_table_kind(model: torch.nn.Module) -> tuple[str, str]:
    for name, module in model.named_modules():
        cls = type(module).__name__.lower()
        if "rope" in cls or "rotary" in cls or name.split(".")[-1] == "rope":
            return "rotary", (
                f"no absolute position table; position enters through rotary embeddings "
                f"('{name}', {type(module).__name__}) inside attention"
            )
    for name, _ in model.named_parameters():
        if "relative_position" in name or "rel_pos" in name:
            return "relative_bias", (
                f"no absolute position table; position enters through a relative position "
                f"bias ('{name}') inside attention"
            )
    return "none", (
        "model.pos_embed is None and no rotary or relative-position module was found: the "
        "model adds no position information to its tokens"
    )


def extract_position_table(model: torch.nn.Module) -> PositionTable:
    """Read the patch-token position table of a timm ViT onto its patch grid.

    - The grid comes from ``patch_embed.grid_size`` (non-square grids included).
    - Prefix rows (class, distillation, register tokens: ``num_prefix_tokens``) are dropped;
      with ``no_embed_class=True`` the table covers patch tokens only.
    - A table stored for another grid (its patch rows are not H*W) is resampled the way
      timm loads such checkpoints: the stored grid is taken as square and
      ``timm.layers.resample_abs_pos_embed`` (bicubic, antialias) maps it to (H, W).
    - ``kind``: ``fixed_sincos`` when the table matches the 2-D sin-cos construction;
      ``fixed_absolute`` when ``pos_embed.requires_grad`` is False while other parameters
      train (a frozen table; a model frozen as a whole says nothing); otherwise
      ``learned_absolute``. Without a table: ``rotary``, ``relative_bias`` or ``none``.

    Raises ValueError for a model without ``patch_embed.grid_size`` or a table that cannot
    be laid on a grid; never modifies the model.
    """
    from timm.layers import resample_abs_pos_embed

    grid = grid_from_model(model)
    num_prefix = int(getattr(model, "num_prefix_tokens", 0) or 0)
    pos = getattr(model, "pos_embed", None)
    if pos is None:
        kind, detail = _no_table_kind(model)
        return PositionTable(grid=grid, kind=kind, detail=detail, num_prefix_tokens=num_prefix)
    if not isinstance(pos, Tensor):
        raise ValueError(f"model.pos_embed is a {type(pos).__name__}, not a tensor")

    raw = pos.detach().to("cpu", torch.float64)
    prefix_in_table = False
    if raw.ndim == 4 and raw.shape[0] == 1:  # NHWC table, patch tokens only
        table_grid = (int(raw.shape[1]), int(raw.shape[2]))
        patches = raw.reshape(1, table_grid[0] * table_grid[1], raw.shape[3])
    elif raw.ndim == 3 and raw.shape[0] == 1:
        prefix_in_table = not getattr(model, "no_embed_class", False) and num_prefix > 0
        n_skip = num_prefix if prefix_in_table else 0
        patches = raw[:, n_skip:]
        n_tab = patches.shape[1]
        if n_tab == grid.num_patches:
            table_grid = grid.shape
        else:
            side = int(round(n_tab**0.5))
            if side * side != n_tab:
                raise ValueError(
                    f"pos_embed has {n_tab} patch rows after {n_skip} prefix rows: neither the "
                    f"model grid {grid.height}x{grid.width} nor a square grid"
                )
            table_grid = (side, side)
    else:
        raise ValueError(f"unsupported pos_embed shape {tuple(raw.shape)}")

    native = patches.reshape(*table_grid, -1)
    native_grid = Grid(*table_grid, grid.patch_size)
    is_sincos = matches_sincos(native, native_grid) if min(table_grid) >= 2 else False
    if table_grid != grid.shape:
        resampled = resample_abs_pos_embed(
            patches.float(),
            new_size=list(grid.shape),
            old_size=list(table_grid),
            num_prefix_tokens=0,
        )
        table = resampled.to(torch.float64).reshape(grid.height, grid.width, -1)
    else:
        table = native.clone()

    others_train = any(p.requires_grad for p in model.parameters() if p is not pos)
    frozen = not pos.requires_grad and others_train
    if is_sincos:
        kind = "fixed_sincos"
        detail = "the table equals the standard 2-D sin-cos construction (fixed, not learned)"
        if pos.requires_grad:
            detail += "; it is marked trainable but still holds its sin-cos values"
    elif frozen:
        kind = "fixed_absolute"
        detail = "pos_embed.requires_grad is False while other parameters train: a frozen table"
    else:
        kind = "learned_absolute"
        detail = "a learned absolute position table (model.pos_embed)"
    other_kind, other_detail = _no_table_kind(model)
    if other_kind != "none":
        detail += f"; the model also has {other_kind.replace('_', ' ')} position information ({other_detail.split('; ', 1)[-1]})"
    return PositionTable(
        grid=grid,
        kind=kind,
        detail=detail,
        table=table,
        table_grid=table_grid,
        num_prefix_tokens=num_prefix,
        prefix_in_table=prefix_in_table,
        trainable=bool(pos.requires_grad),
        matches_sincos=is_sincos,
    )


def position_embedding_section(model: torch.nn.Module, *, seed: int = 0) -> SectionResult:
    """The ``position_embedding`` report section of a timm ViT.

    ``data`` holds ``available``, ``kind`` and ``kind_detail``, the grid facts
    (``grid``, ``table_grid``, ``resampled`` and ``resample_note``, ``num_prefix_tokens``,
    ``prefix_in_table``, ``trainable``, ``matches_sincos``, ``embed_dim``) and every
    number of :func:`analyse_table` with its baseline. ``arrays["pos_similarity"]``: the
    (N, N) float32 cosine-similarity matrix. Figures: ``pos_similarity_grid`` and
    ``pos_similarity_profile``. A model without an absolute table gives
    ``available: False`` with ``kind`` and the ``reason``.
    """
    try:
        extracted = extract_position_table(model)
    except ValueError as err:
        return unavailable(f"position table cannot be analysed: {err}", kind="unknown")
    return position_table_section(extracted, seed=seed)


def position_table_section(extracted: PositionTable, *, seed: int = 0) -> SectionResult:
    """The ``position_embedding`` section of an extracted table (see
    `position_embedding_section`); shared by the PyTorch and the ONNX Runtime paths."""
    from workers.analysis import plots_posembed

    grid = extracted.grid
    facts = {
        "kind": extracted.kind,
        "kind_detail": extracted.detail,
        "grid": [grid.height, grid.width],
        "num_prefix_tokens": extracted.num_prefix_tokens,
    }
    if extracted.table is None:
        return unavailable(extracted.detail, **facts)
    if grid.height < 2 or grid.width < 2:
        return unavailable(f"grid {grid.height}x{grid.width} is too small to measure", **facts)

    # A table handed over as stored (ONNX: read before the graph resamples it) is analysed on
    # the grid it covers, not on the model's.
    stored = tuple(extracted.table.shape[:2]) != grid.shape
    on = (
        Grid(extracted.table.shape[0], extracted.table.shape[1], grid.patch_size)
        if stored
        else grid
    )
    analysis = analyse_table(extracted.table, on, seed=seed)
    table_grid = list(extracted.table_grid) if extracted.table_grid else None
    note = None
    if stored:
        note = (
            f"the stored table covers a {on.height}x{on.width} grid and is analysed as stored; "
            f"the model resamples it to its {grid.height}x{grid.width} grid"
        )
    elif extracted.resampled:
        note = (
            f"the stored table covers a {table_grid[0]}x{table_grid[1]} grid; it was resampled "
            f"to the model's {grid.height}x{grid.width} grid with "
            "timm.layers.resample_abs_pos_embed (bicubic, antialias), as timm does on load"
        )
    data = {
        "available": True,
        **facts,
        "table_grid": table_grid,
        "resampled": extracted.resampled,
        "resample_note": note,
        "prefix_in_table": extracted.prefix_in_table,
        "trainable": extracted.trainable,
        "matches_sincos": extracted.matches_sincos,
        "embed_dim": int(extracted.table.shape[-1]),
        "seed": seed,
        **analysis.data,
    }
    profile = analysis.data["similarity_profile"]
    rowcol = analysis.data["row_col_profile"]
    figures = {
        "pos_similarity_grid": plots_posembed.similarity_grid_png(analysis.similarity, on),
        "pos_similarity_profile": plots_posembed.similarity_profile_png(
            distance=profile["distance"],
            mean_similarity=profile["mean_similarity"],
            baseline=profile["random_baseline"],
            band_low=profile["random_band_low"],
            band_high=profile["random_band_high"],
            offsets=rowcol["offset"],
            same_row=rowcol["same_row"],
            same_col=rowcol["same_col"],
        ),
    }
    arrays = {"pos_similarity": analysis.similarity.numpy().astype(np.float32)}
    return SectionResult(data=data, arrays=arrays, figures=figures)
