"""Position-embedding structure: did the learned table become a map of the patch grid?

Since a ViT adds ``pos_i`` to patch ``i`` (``X_i = patch_i + pos_i``), the gradient on
``pos_i`` is the gradient on ``X_i``; training pulls neighbouring positions towards similar
directions until the table "looks like an (x, y) plane" (Dosovitskiy et al. 2021, Fig. 7,
centre). The metrics here make that measurable for one table.

All metrics are pure functions over a ``(grid_h, grid_w, dim)`` table (raster order over the
first two dims) and a :class:`~workers.analysis.grid.Grid`; similarity metrics take the
``(N, N)`` cosine-similarity matrix from :func:`cosine_similarity_matrix`. Inputs are never
modified. :func:`analyse_table` runs them all; :func:`position_embedding_section` reads the
table out of a timm model and returns the report section. The table is judged *as stored*:
on the grid the checkpoint's table covers, never after resampling it to the audit's grid
(bicubic resampling smooths i.i.d. noise into something that looks locally like a map).

Two questions are kept apart: *local topography* (are a patch's most similar embeddings
its grid neighbours: neighbour recall, shuffled-fold decodability) and *global linear
layout* (does one linear readout carry (row, col) into rows and columns it never saw:
blocked-fold decodability). A smooth random field has the first without the second.

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
# Blocked folds hold out a third of the rows (columns) at a time. Measured on planted 7x7 to
# 20x20 tables (dim 64): with 3 bands a 2-D sin-cos table keeps R^2 0.88 (7x7) to 1.00, while
# Gaussian-filtered noise (sigma 1-2 patches) falls to <= 0.18; with 5 narrower bands the
# sigma-2 field still reaches 0.90 (it is readable by interpolation across a thin band), and
# with 2 bands sin-cos itself fails (-0.71 at 7x7: extrapolating over half the grid).
BLOCKED_FOLDS = 3
# Ridge penalties relative to a table rescaled to unit RMS; the low end lets ridge use the
# nearly linear low-frequency channels of a sin-cos table, the high end shrinks a random
# table to its mean (R^2 ~ 0 out of fold).
RIDGE_ALPHAS = np.logspace(-6, 6, 25)
# Leave-one-out over the penalties through one SVD of each training matrix. scikit-learn's
# default for more patches than channels ("cov") recomputes an N x D^2 product per
# penalty: the 22 ridge fits of a 37x37x384 table (DINOv2) took 25 s that way and 11 s
# with "svd" on a 2-core machine at load ~11. Both are exact leave-one-out: same choice.
GCV_MODE = "svd"
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


def similarity_distance_spearman_shuffled(
    similarity: Tensor, grid: Grid, *, draws: int = SHUFFLE_DRAWS, seed: int = 0
) -> tuple[float, float]:
    """Mean and standard deviation of :func:`similarity_distance_spearman` under shuffling.

    The same embeddings assigned to ``draws`` seeded random permutations of the grid
    positions: the Spearman a table with this similarity structure scores when its layout
    carries no grid information. About 0 with a spread of order 1/N (N patches); NaN when
    all similarities are equal. Computed on ranks: permuting positions permutes the distance
    ranks of the pairs, so each draw is one Pearson correlation of fixed similarity ranks
    with gathered distance ranks (no re-ranking).
    """
    from scipy.stats import rankdata

    sim = _check_similarity(similarity, grid)
    if draws < 2:
        raise ValueError(f"draws must be at least 2, got {draws}")
    n = grid.num_patches
    iu = torch.triu_indices(n, n, offset=1)
    s = np.round(sim[iu[0], iu[1]].numpy(), _TIE_DECIMALS)
    if np.ptp(s) == 0:
        return float("nan"), float("nan")
    s_rank = rankdata(s)
    s_rank = (s_rank - s_rank.mean()) / np.linalg.norm(s_rank - s_rank.mean())
    d_rank_pairs = rankdata(grid.distances[iu[0], iu[1]].numpy())
    d_rank = np.zeros((n, n))
    d_rank[iu[0], iu[1]] = d_rank_pairs
    d_rank = d_rank + d_rank.T
    rows, cols = iu[0].numpy(), iu[1].numpy()
    gen = torch.Generator().manual_seed(seed)
    values = []
    for _ in range(draws):
        # Pair (a, b) of embeddings lands on positions (q_a, q_b); its distance rank is
        # the rank of that position pair. The multiset of ranks is unchanged, so only
        # the centring below is needed.
        q = torch.randperm(n, generator=gen).numpy()
        d = d_rank[q[rows], q[cols]]
        d = d - d.mean()
        values.append(float(s_rank @ d) / float(np.linalg.norm(d)))
    return float(np.mean(values)), float(np.std(values, ddof=1))


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


def _unit_rms(flat: np.ndarray) -> np.ndarray:
    """Centred (N, D) copy rescaled to unit RMS, so ridge penalties do not depend on scale."""
    x = flat - flat.mean(axis=0)
    rms = float(np.sqrt((x**2).mean()))
    return x / rms if rms > 0 else x


def _ridge() -> RidgeCV:
    return RidgeCV(alphas=RIDGE_ALPHAS, alpha_per_target=True, gcv_mode=GCV_MODE)


def decodability(table: Tensor, grid: Grid, *, seed: int = 0, folds: int = CV_FOLDS) -> dict:
    """Cross-validated R^2 of a linear (ridge) map from embedding to (row, col), shuffled folds.

    The table is centred and rescaled to unit RMS (so the result does not depend on the
    table's scale); ``RidgeCV`` picks the penalty per coordinate inside each training
    split; predictions for every patch come from the fold that held it out (``folds``
    shuffled, seeded folds over patches). Returns ``{"r2", "row_r2", "col_r2"}``: R^2 of
    the held-out predictions per coordinate and their mean. At most 1 (perfect map); about
    0 for a table without grid structure (slightly negative is normal: predicting the
    training mean out of fold does a little worse than the true mean).

    Shuffled folds leave every held-out patch surrounded by training patches, so a table
    that is merely *locally smooth* scores well too: the readout interpolates between
    neighbours (Gaussian-filtered noise scores 0.9 to 1.0). It measures "position can be
    read out near where it was seen"; :func:`decodability_blocked` asks for a global layout.
    """
    flat = _check_table(table, grid).numpy()
    if folds < 2:
        raise ValueError(f"folds must be at least 2, got {folds}")
    x = _unit_rms(flat)
    y = grid.coords.numpy()
    splitter = KFold(n_splits=min(folds, grid.num_patches), shuffle=True, random_state=seed)
    pred = np.empty_like(y)
    for train, test in splitter.split(x):
        pred[test] = _ridge().fit(x[train], y[train]).predict(x[test])
    per_coord = r2_score(y, pred, multioutput="raw_values")
    return {
        "r2": float(per_coord.mean()),
        "row_r2": float(per_coord[0]),
        "col_r2": float(per_coord[1]),
    }


def band_folds(lines: int, folds: int) -> list[np.ndarray]:
    """``min(folds, lines)`` contiguous bands of line indices 0 .. lines - 1 (sizes differ by <= 1)."""
    if folds < 2:
        raise ValueError(f"folds must be at least 2, got {folds}")
    if lines < 2:
        raise ValueError(f"bands need at least 2 lines, got {lines}")
    return np.array_split(np.arange(lines), min(folds, lines))


def decodability_blocked(table: Tensor, grid: Grid, *, folds: int = BLOCKED_FOLDS) -> dict:
    """Out-of-sample R^2 of a linear (ridge) map from embedding to (row, col) on held-out bands.

    Spatially blocked folds: the grid's rows are cut into ``folds`` contiguous bands
    (:func:`band_folds`); each band is held out whole, the ridge map is fit on the other
    rows and predicts the *row* of the held-out patches. The columns likewise give the
    column R^2. A held-out patch has no training patch in its band, so interpolating
    between neighbours does not help: only a table whose embedding carries (row, col) the
    same way across the grid (a global linear layout, as a 2-D sin-cos table does) scores
    high. Outer bands ask for extrapolation by one band width. Deterministic (no shuffling).

    The R^2 is out-of-sample in the sense of Campbell & Thompson (2008, Rev. Fin. Stud.
    21(4)): ``1 - SSE(ridge) / SSE(training mean)``, each held-out band measured against
    the mean coordinate of the rows it was *not* in. With blocked folds the ordinary R^2
    (against the mean of all patches) puts chance far below 0 (predicting the training
    mean scores about -1.1 with 3 bands, since a held-out outer band's mean is a third of
    the grid away), so 0 would not mean "nothing learned"; here it does.

    Returns ``{"r2", "row_r2", "col_r2"}``. At most 1; about 0 for a table without grid
    structure (random or shuffled tables; slightly negative is normal); near or far below
    0 when the readout is confidently wrong away from its training rows, as for locally
    smooth tables without a layout (Gaussian-filtered noise, sigma 1-2 patches on 14x14:
    -28 .. +0.23) and 1-D raster tables. Such a field keeps a blocked R^2 when its
    correlation length approaches a band (sigma 1 on 7x7: 0.48-0.64).
    """
    flat = _check_table(table, grid).numpy()
    x = _unit_rms(flat)
    coords = grid.coords.numpy()
    per_coord = []
    for axis, lines in ((0, grid.height), (1, grid.width)):
        y = coords[:, axis]
        sse, sse_mean = 0.0, 0.0
        for band in band_folds(lines, folds):
            test = np.isin(y, band)
            pred = _ridge().fit(x[~test], y[~test]).predict(x[test])
            sse += float(((y[test] - pred) ** 2).sum())
            sse_mean += float(((y[test] - y[~test].mean()) ** 2).sum())
        per_coord.append(1.0 - sse / sse_mean)
    return {"r2": float(np.mean(per_coord)), "row_r2": per_coord[0], "col_r2": per_coord[1]}


def decodability_folds(grid: Grid, *, seed: int = 0) -> dict:
    """The cross-validation scheme behind each decodability number, as report data."""
    return {
        "decodability_r2": {
            "scheme": "shuffled",
            "folds": min(CV_FOLDS, grid.num_patches),
            "seed": seed,
            "detail": "seeded random folds over patches; held-out patches sit between "
            "training patches, so local smoothness alone is rewarded (interpolation)",
        },
        "decodability_r2_blocked": {
            "scheme": "blocked",
            "folds": [
                len(band_folds(grid.height, BLOCKED_FOLDS)),
                len(band_folds(grid.width, BLOCKED_FOLDS)),
            ],
            "detail": "contiguous bands of rows held out whole for the row R^2, bands of "
            "columns for the column R^2; a readout must carry position into rows/columns "
            "it never saw (global layout)",
        },
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
    decodability_r2_blocked: float,
    recall_k4: float,
    recall_k4_random: float,
    recall_k8: float,
    recall_k8_random: float,
) -> float:
    """One number for "is this table a map of the grid", in [0, 1]; two halves.

    ``0.5 * clip(decodability_r2_blocked, 0, 1) + 0.25 * lift_k4 + 0.25 * lift_k8`` where
    ``lift_k = (recall_k - baseline_k) / (1 - baseline_k)`` clipped to [0, 1].

    - *Global linear layout* (first half): can (row, col) be read out linearly in whole
      bands of rows / columns the readout never saw (:func:`decodability_blocked`)? Only a
      table that codes position the same way across the grid passes.
    - *Local topography* (second half): are each patch's most similar embeddings its grid
      neighbours (:func:`neighbour_recall`)? Any locally smooth table passes.

    The global half uses the blocked R^2, not the shuffled-fold one (:func:`decodability`),
    because shuffled folds reward interpolation between neighbours, i.e. local topography a
    second time. Measured on planted 14x14 tables (dim 64, seeds 0-2): Gaussian-filtered
    noise with sigma 1 patch scores 0.93-0.95 with shuffled folds and 0.48-0.60 with blocked
    ones (about its local half only); 2-D sin-cos scores 1.00 either way, random and shuffled
    tables 0.00-0.01. A 1-D raster table scores 0.17-0.20 (left/right neighbours found,
    up/down not, no 2-D layout; 0.36 on a 48-patch 8x6 grid). About 0 for a table without grid structure, 1 for a
    perfect map. The similarity-distance Spearman is left out: it rewards any smooth
    fall-off, including one along the raster index only.
    """
    layout = (
        float(np.clip(decodability_r2_blocked, 0.0, 1.0))
        if np.isfinite(decodability_r2_blocked)
        else 0.0
    )
    return (
        0.5 * layout
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
    blocked = decodability_blocked(table, grid)
    blocked_shuffled = decodability_blocked(shuffled, grid)
    spearman_random, spearman_random_std = similarity_distance_spearman_shuffled(
        sim, grid, seed=seed
    )
    distance, profile = similarity_distance_profile(sim, grid)
    band_low, band_high = shuffled_profile_band(sim, grid, seed=seed)
    offsets, same_row, same_col = row_col_profiles(sim, grid)
    spectrum = _spectrum_from_variances(variances)
    spectrum_random = gaussian_spectrum_baseline(grid, flat.shape[1], seed=seed)
    score = grid_structure_score(
        decodability_r2_blocked=blocked["r2"],
        recall_k4=recall["k4"],
        recall_k4_random=recall["k4_random"],
        recall_k8=recall["k8"],
        recall_k8_random=recall["k8_random"],
    )
    data = {
        "grid_structure_score": finite_or_none(score),
        "grid_structure_score_parts": {
            "layout": finite_or_none(np.clip(blocked["r2"], 0.0, 1.0)),
            "recall_lift_k4": recall_lift(recall["k4"], recall["k4_random"]),
            "recall_lift_k8": recall_lift(recall["k8"], recall["k8_random"]),
        },
        "decodability_r2": finite_or_none(decod["r2"]),
        "decodability_r2_row": finite_or_none(decod["row_r2"]),
        "decodability_r2_col": finite_or_none(decod["col_r2"]),
        "decodability_r2_shuffled": finite_or_none(decod_shuffled["r2"]),
        "decodability_r2_blocked": finite_or_none(blocked["r2"]),
        "decodability_r2_blocked_row": finite_or_none(blocked["row_r2"]),
        "decodability_r2_blocked_col": finite_or_none(blocked["col_r2"]),
        "decodability_r2_blocked_shuffled": finite_or_none(blocked_shuffled["r2"]),
        "decodability_folds": decodability_folds(grid, seed=seed),
        "similarity_distance_spearman": finite_or_none(similarity_distance_spearman(sim, grid)),
        "similarity_distance_spearman_random": finite_or_none(spearman_random),
        "similarity_distance_spearman_random_std": finite_or_none(spearman_random_std),
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
            "spearman *_random (+ _std): mean (std) over shuffled positions; "
            "*_random spectrum: one i.i.d. Gaussian table of the same shape; "
            "profile random_baseline/band: shuffled positions (mean, 5-95%); "
            "anisotropy: 0 at chance"
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


RESAMPLE_METHOD = "bicubic, antialiased (timm.layers.resample_abs_pos_embed)"
# A resampling recomputed from the stored table follows the loader's exact path (same dtype,
# same op), so it matches bit for bit on one machine; this leaves room for float32 rounding
# on another BLAS / CPU (relative to the table's largest entry).
RESAMPLE_MATCH_TOLERANCE = 1e-5


@dataclass(frozen=True)
class PositionTable:
    """The absolute position table of a model, as stored, and how the model uses it.

    ``grid`` is the audit's grid (the model's ``patch_embed``); ``table`` is (H, W, D) on
    ``table_grid``, the grid the *stored* table covers (None when the model has none):
    prefix rows stripped, never resampled. When the two grids differ (``resampled``),
    ``resample_method`` says how the table the model adds at ``grid`` was made from the
    stored one, and ``table_grid_note`` says when the stored grid had other readings.
    ``kind`` is one of ``learned_absolute``, ``fixed_sincos``, ``fixed_absolute``,
    ``none``, ``rotary``, ``relative_bias``; ``detail`` says why.
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
    resample_method: str | None = None
    table_grid_note: str | None = None

    @property
    def resampled(self) -> bool:
        return self.table_grid is not None and self.table_grid != self.grid.shape

    @property
    def stored_grid(self) -> Grid:
        """The :class:`Grid` the analysed table lies on (``table_grid``; ``grid`` if none)."""
        if self.table_grid is None:
            return self.grid
        return Grid(*self.table_grid, self.grid.patch_size)


def pretrained_grid(model: torch.nn.Module) -> tuple[int, int] | None:
    """The grid timm's loader takes a checkpoint of this architecture to be trained on.

    ``img_size`` of ``model.pretrained_model_args``, else the ``input_size`` of
    ``model.pretrained_cfg``, divided by the patch size (timm's ``get_pretrained_grid_size``).
    None when the model carries neither.
    """
    args = getattr(model, "pretrained_model_args", None) or {}
    size = args.get("img_size")
    if size is None:
        cfg = getattr(model, "pretrained_cfg", None) or {}
        size = (cfg.get("input_size") or (None,))[-2:]
    if isinstance(size, int):
        size = (size, size)
    patch = getattr(getattr(model, "patch_embed", None), "patch_size", None)
    if patch is None or size is None or len(size) != 2 or None in size:
        return None
    patch = (patch, patch) if isinstance(patch, int) else tuple(patch)
    return (int(size[0]) // int(patch[0]), int(size[1]) // int(patch[1]))


def stored_grid_candidates(
    rows: int, *, grid: Grid, pretrained: tuple[int, int] | None = None
) -> list[tuple[int, int]]:
    """The grids a stored table of ``rows`` patch rows can cover, most likely first.

    A checkpoint stores a flat list of rows, so its grid must be inferred: the
    architecture's pretrained grid (``pretrained``, see :func:`pretrained_grid`), a square
    grid, or a grid with the audit grid's aspect ratio, each only when it has exactly
    ``rows`` patches; duplicates removed. Empty when no reading fits; more than one entry
    means the stored grid is ambiguous from the checkpoint alone.
    """
    if rows < 1:
        raise ValueError(f"a stored table needs at least one patch row, got {rows}")
    found: list[tuple[int, int]] = []
    if pretrained is not None and pretrained[0] * pretrained[1] == rows:
        found.append((int(pretrained[0]), int(pretrained[1])))
    side = round(rows**0.5)
    if side * side == rows:
        found.append((side, side))
    # (h, w) with h * w = rows and h / w = H / W: h = sqrt(rows * H / W)
    h = round((rows * grid.height / grid.width) ** 0.5)
    if h > 0 and rows % h == 0 and h * grid.width == (rows // h) * grid.height:
        found.append((h, rows // h))
    return list(dict.fromkeys(found))


def loader_grid(rows: int, model: torch.nn.Module) -> tuple[int, int] | None:
    """The stored grid timm's ``checkpoint_filter_fn`` assumes: the pretrained grid when it
    has ``rows`` patches, else a square one (None when ``rows`` is no square either: timm
    then fails to load the checkpoint)."""
    pretrained = pretrained_grid(model)
    if pretrained is not None and pretrained[0] * pretrained[1] == rows:
        return pretrained
    side = round(rows**0.5)
    return (side, side) if side * side == rows else None


def _table_prefix_rows(model: torch.nn.Module) -> int:
    """Rows before the patch rows in a (1, rows, D) ``pos_embed`` of this model (timm's rule)."""
    if getattr(model, "no_embed_class", False):
        return 0
    return int(getattr(model, "num_prefix_tokens", 0) or 0)


def prepare_stored_pos_embed(
    state_dict: dict[str, Tensor], model: torch.nn.Module
) -> dict[str, Tensor]:
    """The state dict with a non-square stored ``pos_embed`` already on the model's grid.

    timm's ``checkpoint_filter_fn`` reads a stored table for another grid as the
    architecture's pretrained grid or else as a square, and fails on any other table. When
    exactly one reading of :func:`stored_grid_candidates` fits and it is not the one timm
    would take, the table is resampled from it here (the same bicubic
    ``resample_abs_pos_embed`` timm uses) so that loading succeeds and reads it right.
    Otherwise the state dict is returned as given. Never modifies its input.
    """
    from timm.layers import resample_abs_pos_embed

    pos = state_dict.get("pos_embed")
    own = getattr(model, "pos_embed", None)
    if not isinstance(pos, Tensor) or not isinstance(own, Tensor) or pos.ndim != 3:
        return state_dict
    n_prefix = _table_prefix_rows(model)
    rows = pos.shape[1] - n_prefix
    grid = grid_from_model(model)
    if rows < 1 or rows == grid.num_patches:
        return state_dict
    candidates = stored_grid_candidates(rows, grid=grid, pretrained=pretrained_grid(model))
    if len(candidates) != 1 or candidates[0] == loader_grid(rows, model):
        return state_dict
    resampled = resample_abs_pos_embed(
        pos, new_size=list(grid.shape), old_size=list(candidates[0]), num_prefix_tokens=n_prefix
    )
    return {**state_dict, "pos_embed": resampled}


def _resampling_reproduces(
    stored: Tensor, old: tuple[int, int], model_patches: Tensor, grid: Grid
) -> bool:
    """True when timm's bicubic resampling of ``stored`` (1, rows, D), read as ``old``, gives
    the model's patch rows (1, N, D) within ``RESAMPLE_MATCH_TOLERANCE``."""
    from timm.layers import resample_abs_pos_embed

    remade = resample_abs_pos_embed(
        stored, new_size=list(grid.shape), old_size=list(old), num_prefix_tokens=0
    ).to(torch.float64)
    if remade.shape != model_patches.shape:
        return False
    scale = float(model_patches.abs().max()) or 1.0
    return bool((remade - model_patches).abs().max() <= RESAMPLE_MATCH_TOLERANCE * scale)


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


def _stored_reading(
    stored_pos_embed: Tensor, n_skip: int, model_patches: Tensor, model: torch.nn.Module
) -> tuple[Tensor, tuple[int, int], str, str | None]:
    """(patch rows (1, rows, D) float64, stored grid, resample_method, note) of a checkpoint's
    own ``pos_embed`` that loading resampled to the model's grid."""
    grid = grid_from_model(model)
    stored = stored_pos_embed.detach().to("cpu")
    if stored.ndim != 3 or stored.shape[0] != 1 or stored.shape[2] != model_patches.shape[2]:
        raise ValueError(
            f"the checkpoint's pos_embed has shape {tuple(stored.shape)}; expected (1, rows, "
            f"{model_patches.shape[2]})"
        )
    patches = stored[:, n_skip:]
    rows = int(patches.shape[1])
    pretrained = pretrained_grid(model)
    candidates = stored_grid_candidates(rows, grid=grid, pretrained=pretrained)
    if not candidates:
        raise ValueError(
            f"the checkpoint's pos_embed has {rows} patch rows after {n_skip} prefix rows: "
            f"no grid fits them (not square, not the architecture's pretrained grid "
            f"{pretrained}, not the {grid.height}:{grid.width} aspect of the audit grid)"
        )
    matching = [c for c in candidates if _resampling_reproduces(patches, c, model_patches, grid)]
    if matching:
        table_grid = matching[0]
        method = (
            f"{RESAMPLE_METHOD} from {table_grid[0]}x{table_grid[1]} to "
            f"{grid.height}x{grid.width} when the checkpoint was loaded (as timm's "
            "checkpoint_filter_fn does); checked: resampling the stored table again gives "
            "the model's table"
        )
    elif len(candidates) == 1:
        table_grid = candidates[0]
        method = (
            f"unknown: the model's {grid.height}x{grid.width} table is not the bicubic "
            f"resampling of the stored table read as {table_grid[0]}x{table_grid[1]}"
        )
    else:
        raise ValueError(
            f"the checkpoint's pos_embed has {rows} patch rows, which fit several grids "
            f"({', '.join(f'{h}x{w}' for h, w in candidates)}), and the model's table is "
            "the resampling of none of them: the stored grid is ambiguous"
        )
    others = [c for c in candidates if c != table_grid]
    note = None
    if others:
        note = (
            f"{rows} stored rows also fit {', '.join(f'{h}x{w}' for h, w in others)}; read "
            f"as {table_grid[0]}x{table_grid[1]}, the reading the model's table was "
            "resampled from. If the checkpoint was trained on another of these grids, the "
            "model and this section both misread it"
        )
    return patches.to(torch.float64), table_grid, method, note


def _own_reading(
    patches: Tensor, model: torch.nn.Module, n_skip: int
) -> tuple[tuple[int, int], str]:
    """(stored grid, resample_method) of a model whose own table covers another grid."""
    grid = grid_from_model(model)
    rows = int(patches.shape[1])
    candidates = stored_grid_candidates(rows, grid=grid, pretrained=pretrained_grid(model))
    if len(candidates) != 1:
        fits = (
            f"fit {', '.join(f'{h}x{w}' for h, w in candidates)}" if candidates else "fit no grid"
        )
        raise ValueError(
            f"pos_embed has {rows} patch rows after {n_skip} prefix rows: not the model grid "
            f"{grid.height}x{grid.width}, and they {fits}"
        )
    h, w = candidates[0]
    return candidates[0], (
        f"none: the model's own pos_embed covers {h}x{w}, not its {grid.height}x{grid.width} "
        "patch grid; it must be resampled before the model can add it to its tokens"
    )


def extract_position_table(
    model: torch.nn.Module, *, stored_pos_embed: Tensor | None = None
) -> PositionTable:
    """Read the patch-token position table of a timm ViT *as stored*, on its stored grid.

    - The audit grid comes from ``patch_embed.grid_size`` (non-square grids included).
    - Prefix rows (class, distillation, register tokens: ``num_prefix_tokens``) are dropped;
      with ``no_embed_class=True`` the table covers patch tokens only.
    - ``stored_pos_embed``: the checkpoint's own ``pos_embed`` when loading resampled it to
      the model's grid (``LoadedModel.stored_pos_embed``). Then *that* table is analysed on
      the grid it was stored for (:func:`stored_grid_candidates`; the reading whose bicubic
      resampling reproduces the model's table), and ``resample_method`` says how the
      model's table was made from it. Without it the model's own ``pos_embed`` is analysed;
      if it covers another grid than the model's, it is read on that grid, never resampled.
    - ``kind``: ``fixed_sincos`` when the stored table matches the 2-D sin-cos
      construction; ``fixed_absolute`` when ``pos_embed.requires_grad`` is False while other
      parameters train (a frozen table; a model frozen as a whole says nothing); otherwise
      ``learned_absolute``. Without a table: ``rotary``, ``relative_bias`` or ``none``.

    Raises ValueError for a model without ``patch_embed.grid_size`` or a table whose grid
    cannot be derived (or is ambiguous); never modifies the model.
    """
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
    method = note = None
    if raw.ndim == 4 and raw.shape[0] == 1:  # NHWC table, patch tokens only
        table_grid = (int(raw.shape[1]), int(raw.shape[2]))
        patches = raw.reshape(1, table_grid[0] * table_grid[1], raw.shape[3])
        if table_grid != grid.shape:
            method = f"none: the model's own pos_embed covers {table_grid[0]}x{table_grid[1]}"
    elif raw.ndim == 3 and raw.shape[0] == 1:
        prefix_in_table = not getattr(model, "no_embed_class", False) and num_prefix > 0
        n_skip = num_prefix if prefix_in_table else 0
        patches = raw[:, n_skip:]
        if stored_pos_embed is not None:
            patches, table_grid, method, note = _stored_reading(
                stored_pos_embed, n_skip, patches, model
            )
        elif patches.shape[1] == grid.num_patches:
            table_grid = grid.shape
        else:
            table_grid, method = _own_reading(patches, model, n_skip)
    else:
        raise ValueError(f"unsupported pos_embed shape {tuple(raw.shape)}")

    table = patches.reshape(*table_grid, -1).clone()
    native_grid = Grid(*table_grid, grid.patch_size)
    is_sincos = matches_sincos(table, native_grid) if min(table_grid) >= 2 else False

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
        resample_method=method,
        table_grid_note=note,
    )


def position_embedding_section(
    model: torch.nn.Module, *, seed: int = 0, stored_pos_embed: Tensor | None = None
) -> SectionResult:
    """The ``position_embedding`` report section of a timm ViT, judged on the stored table.

    ``stored_pos_embed``: the checkpoint's own ``pos_embed`` when loading resampled it
    (``LoadedModel.stored_pos_embed``); see :func:`extract_position_table`.

    ``data`` holds ``available``, ``kind`` and ``kind_detail``, the grid facts (``grid``:
    the audit's; ``table_grid``: the stored table's, on which every number is measured;
    ``resampled``: the two differ; ``resample_method``: how the model's table was made
    from the stored one; ``resample_note`` and ``table_grid_note`` in words;
    ``num_prefix_tokens``, ``prefix_in_table``, ``trainable``, ``matches_sincos``,
    ``embed_dim``) and every number of :func:`analyse_table` with its baseline.
    ``arrays["pos_similarity"]``: the (N, N) float32 cosine-similarity matrix on
    ``table_grid``. Figures: ``pos_similarity_grid`` and ``pos_similarity_profile``. A
    model without an absolute table gives ``available: False`` with ``kind`` and the
    ``reason``.
    """
    try:
        extracted = extract_position_table(model, stored_pos_embed=stored_pos_embed)
    except ValueError as err:
        return unavailable(f"position table cannot be analysed: {err}", kind="unknown")
    return position_table_section(extracted, seed=seed)


def position_table_section(extracted: PositionTable, *, seed: int = 0) -> SectionResult:
    """The ``position_embedding`` section of an extracted table (see
    `position_embedding_section`); shared by the PyTorch and the ONNX Runtime paths."""
    from workers.analysis import plots_posembed
    from workers.analysis.figures import figure

    grid = extracted.grid
    facts = {
        "kind": extracted.kind,
        "kind_detail": extracted.detail,
        "grid": [grid.height, grid.width],
        "num_prefix_tokens": extracted.num_prefix_tokens,
    }
    if extracted.table is None:
        return unavailable(extracted.detail, **facts)
    stored = extracted.stored_grid
    if stored.height < 2 or stored.width < 2:
        return unavailable(f"grid {stored.height}x{stored.width} is too small to measure", **facts)

    analysis = analyse_table(extracted.table, stored, seed=seed)
    table_grid = [stored.height, stored.width]
    note = None
    if extracted.resampled:
        note = (
            f"every number here is measured on the table as stored, on its "
            f"{stored.height}x{stored.width} grid; the model adds a "
            f"{grid.height}x{grid.width} table made from it ({extracted.resample_method})"
        )
    data = {
        "available": True,
        **facts,
        "table_grid": table_grid,
        "resampled": extracted.resampled,
        "resample_method": extracted.resample_method,
        "resample_note": note,
        "table_grid_note": extracted.table_grid_note,
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
        "pos_similarity_grid": figure(
            plots_posembed.similarity_grid_png, analysis.similarity, stored
        ),
        "pos_similarity_profile": figure(
            plots_posembed.similarity_profile_png,
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
