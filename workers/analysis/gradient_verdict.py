"""The plain-language verdict of the gradient section."""

from __future__ import annotations

from typing import Any


def verdict(
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
