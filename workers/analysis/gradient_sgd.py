"""The SGD step check of the position-embedding gradient."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor

from workers.analysis.gradient_formula import cosine_change_rate
from workers.analysis.gradient_pressure import cosine_matrix
from workers.analysis.results import finite_or_none

# The SGD self-check steps the position table by this fraction of its norm when no eta is
# given. The gradient can lie mostly outside the span of the table (channels the table does
# not use): that part changes cosines only at second order (~ratio^2, through the norms)
# while the first-order change comes from the small in-span part, so the ratio must be
# tiny: at 1e-6 second-order terms are ~1e-12, and float64 rounding of cosines (~1e-16) is
# still far below changes of ~1e-6 * (in-span fraction).
SGD_CHECK_STEP_RATIO = 1e-6
# The self-check correlation that counts as "the first-order prediction is right".
SGD_CHECK_MIN_CORRELATION = 0.99


def sgd_self_check(table: Tensor, g: Tensor, eta: float) -> dict[str, Any]:
    """Real vs first-order change of the table's cosines after one step on a copy."""
    N = table.shape[0]
    g_norm, p_norm = float(g.norm()), float(table.norm())
    predicted = eta * cosine_change_rate(table, table, g, g)
    real = cosine_matrix(table - eta * g) - cosine_matrix(table)
    off = ~torch.eye(N, dtype=torch.bool)
    if N > 2:
        corr = float(np.corrcoef(real[off].numpy(), predicted[off].numpy())[0, 1])
    else:
        corr = float("nan")
    return {
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
