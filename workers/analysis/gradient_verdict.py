"""The verdict of the gradient section, from bootstrap intervals over images.

Every judged quantity is a margin whose sign is the story's answer:

- a layer's margin ``min(near, -far)`` of its head-mean logit pressure profile
  (`gradient_pressure.sign_pattern`): > 0 exactly when pressure is positive near and
  negative far;
- the logit margin: the ``k``-th largest layer margin among the judged layers, ``k =
  floor(J / 2) + 1`` of ``J``, so it is > 0 exactly when a strict majority of the judged
  layers hold;
- the position margin: ``min(near, -far)`` of the position cosine-change rate profile.

Each profile is a mean over images of per-image profiles, so a bootstrap over images
(`BOOTSTRAP_RESAMPLES` seeded resamples of the per-image profiles; no extra forward or
backward pass) gives each margin a 95 % percentile interval. A verdict is ``True`` only when
its interval lies above 0, ``False`` only when it lies below 0, and otherwise ``None`` with
an ``undecided_reason`` (never a point estimate). A failed formula check makes every
verdict ``None``: the rebuilt attention is then not the one the model differentiated.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from workers.analysis.gradient_pressure import DistanceBins
from workers.analysis.results import finite_or_none

# Bootstrap resamples per interval: the 2.5 / 97.5 percentiles of 1000 resamples move by
# about 1 % of the interval's width between seeds, far below what flips a sign decision
# except when the interval touches 0 (then the verdict is null anyway).
BOOTSTRAP_RESAMPLES = 1000
# Below this many images a percentile bootstrap has too few distinct resamples to be an
# interval (with 1 image every resample is the same): verdicts are null.
BOOTSTRAP_MIN_IMAGES = 8
CI_LEVEL = 0.95


def bootstrap_weights(n: int, *, resamples: int = BOOTSTRAP_RESAMPLES, seed: int) -> np.ndarray:
    """(resamples, n) weights, each row the multiplicities of one resample of ``n`` images
    drawn with replacement, divided by ``n`` (rows sum to 1). Seeded."""
    if n < 1:
        raise ValueError(f"need at least one image, got {n}")
    rng = np.random.default_rng(seed)
    return rng.multinomial(n, np.full(n, 1.0 / n), size=resamples).astype(np.float64) / n


def margins(profiles: np.ndarray, bins: DistanceBins) -> np.ndarray:
    """``min(near, -far)`` of each profile (..., num_bins) -> (...); NaN without far bins."""
    if not bins.near or not bins.far:
        return np.full(profiles.shape[:-1], np.nan)
    near = _pooled(profiles, bins, bins.near)
    far = _pooled(profiles, bins, bins.far)
    return np.minimum(near, -far)


def _pooled(profiles: np.ndarray, bins: DistanceBins, which: tuple[int, ...]) -> np.ndarray:
    idx = list(which)
    w = bins.counts[idx].astype(np.float64)
    return (profiles[..., idx] * w).sum(-1) / w.sum()


def interval(samples: np.ndarray) -> list[float] | None:
    """The central `CI_LEVEL` percentile interval of bootstrap samples, or None."""
    samples = samples[np.isfinite(samples)]
    if samples.size == 0:
        return None
    tail = 100 * (1 - CI_LEVEL) / 2
    lo, hi = np.percentile(samples, [tail, 100 - tail])
    return [float(lo), float(hi)]


def decide(ci: list[float] | None, num_images: int) -> tuple[bool | None, str | None]:
    """True when the interval is above 0, False when below, else None and the reason."""
    if num_images < BOOTSTRAP_MIN_IMAGES:
        return None, (
            f"{num_images} images are too few for an interval (at least "
            f"{BOOTSTRAP_MIN_IMAGES}); audit more images"
        )
    if ci is None:
        return None, "no interval"
    lo, hi = ci
    if lo > 0:
        return True, None
    if hi < 0:
        return False, None
    return None, (
        f"the 95% interval of the margin [{lo:.3g}, {hi:.3g}] includes 0 at {num_images} "
        "images: audit more images to decide"
    )


def majority_margin(layer_margins: np.ndarray) -> np.ndarray:
    """(..., J) margins of the judged layers -> (...): the ``floor(J/2)+1``-th largest,
    positive exactly when a strict majority of the layers have a positive margin."""
    J = layer_margins.shape[-1]
    k = J // 2 + 1
    return -np.sort(-layer_margins, axis=-1)[..., k - 1]


def judge_layers(
    image_profiles: np.ndarray, bins: DistanceBins, weights: np.ndarray, judgeable: list[bool]
) -> tuple[list[dict[str, Any]], np.ndarray]:
    """Per layer: ``margin_ci95``, ``story_holds``, ``undecided_reason``.

    ``image_profiles`` (n, L, num_bins) per-image head-mean logit pressure; ``weights`` from
    `bootstrap_weights`; ``judgeable[i]`` False for layers no verdict applies to (their
    reason is given by the caller). Returns the rows and the (R, L) bootstrap margins.
    """
    n, L, nb = image_profiles.shape
    resampled = (weights @ image_profiles.reshape(n, L * nb)).reshape(-1, L, nb)
    samples = margins(resampled, bins)  # (R, L)
    rows = []
    for i in range(L):
        if not judgeable[i]:
            rows.append({"margin_ci95": None, "story_holds": None, "undecided_reason": None})
            continue
        ci = interval(samples[:, i])
        holds, reason = decide(ci, n)
        rows.append({"margin_ci95": ci, "story_holds": holds, "undecided_reason": reason})
    return rows, samples


def verdict(
    layers: list[dict[str, Any]],
    logit_samples: np.ndarray,
    pos: dict[str, Any],
    formula: dict[str, Any],
    num_images: int,
) -> dict[str, Any]:
    """The section's ``verdict``: the logit part (a strict majority of the judged layers
    hold, by interval) and, when a learned table exists, the position part.

    ``layers`` are the section's layer rows (``margin``, ``story_holds``,
    ``undecided_reason``, ``judged``), ``logit_samples`` (R, L) their bootstrap margins,
    ``pos`` the position part (``margin``, ``margin_ci95``, ``story_holds``).
    """
    judged = [r for r in layers if r["judged"]]
    idx = [r["layer"] for r in judged]
    margin = ci = None
    logit_holds: bool | None = None
    if judged:
        margin = float(majority_margin(np.array([r["margin"] for r in judged])))
        ci = interval(majority_margin(logit_samples[:, idx]))
        logit_holds, logit_reason = decide(ci, num_images)
    else:
        logit_reason = (
            "no layer could be judged (grid too small, or the loss reaches no patch-to-patch logit)"
        )
    pos_holds = pos.get("story_holds") if pos.get("available") else None
    reasons = []
    if not formula["passed"]:
        story: bool | None = None
        logit_holds = pos_holds = None
        reasons.append("the formula check failed: the pressures are not the model's gradient")
    else:
        if logit_holds is False or pos_holds is False:
            story = False
        elif logit_holds is True and (pos_holds is True or not pos.get("available")):
            story = True
        else:
            story = None
        if story is None:
            if logit_holds is None:
                reasons.append(f"logit pressure: {logit_reason}")
            if pos.get("available") and pos_holds is None:
                reasons.append(f"position embedding: {pos.get('undecided_reason')}")

    holding = sum(1 for r in judged if r["story_holds"] is True)
    failing = [r for r in judged if r["story_holds"] is False]
    parts = []
    if judged:
        text = (
            f"in {holding} of {len(judged)} judged layers the loss raises patch-to-patch "
            "attention logits for neighbours and lowers them far away (head-mean pressure "
            f"near > 0 > far, 95% interval above 0); majority margin {margin:.3g}"
        )
        if ci is not None:
            text += f" [{ci[0]:.3g}, {ci[1]:.3g}]"
        if failing:
            text += f"; the interval is below 0 in layer(s) {', '.join(str(r['layer']) for r in failing)}"
        parts.append(text)
    else:
        parts.append(logit_reason)
    if pos.get("available"):
        pci = pos.get("margin_ci95")
        pci_txt = f" [{pci[0]:.3g}, {pci[1]:.3g}]" if pci else ""
        state = {True: "pulls", False: "does NOT pull", None: "may or may not pull"}[pos_holds]
        parts.append(
            f"the gradient {state} neighbouring position embeddings together while pushing "
            f"distant ones apart (margin {pos['margin']:.3g}{pci_txt})"
        )
    else:
        parts.append(f"position embedding not analysed ({pos.get('reason')})")
    lead = {
        True: "The story holds: ",
        False: "The story does not hold here: ",
        None: "Undecided: ",
    }[story]
    summary = lead + "; ".join(parts) + "."
    if reasons:
        summary += " Undecided because " + "; ".join(reasons) + "."
    return {
        "story_holds": story,
        "undecided_reason": "; ".join(reasons) if story is None else None,
        "margin": finite_or_none(margin) if margin is not None else None,
        "margin_ci95": ci,
        "margin_definition": (
            "the floor(J/2)+1-th largest layer margin min(near, -far) of head-mean logit "
            "pressure among the J judged layers: > 0 exactly when a strict majority holds"
        ),
        "logit_pressure_holds": logit_holds,
        "layers_holding": holding,
        "layers_judged": len(judged),
        "num_layers": len(layers),
        "position_embedding_holds": pos_holds,
        "position_embedding_margin": pos.get("margin"),
        "position_embedding_margin_ci95": pos.get("margin_ci95"),
        "layer_margins": [r["margin"] for r in layers],
        "layer_margins_ci95": [r["margin_ci95"] for r in layers],
        "num_images": num_images,
        "bootstrap_resamples": int(logit_samples.shape[0]),
        "summary": summary,
    }
