"""The `trajectory` section: headline numbers of a training run against the training step.

Pure: it reads the per-checkpoint reports (plain dicts) and returns series; a number a
report does not have (an analysis that was not run or does not apply) is None in its series.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from workers.analysis.figures import figure_png, plt
from workers.analysis.heads import LABELS
from workers.analysis.plots_heads import LABEL_COLOURS
from workers.analysis.results import SectionResult

#: headline number -> its path in a report
HEADLINES: dict[str, tuple[str, ...]] = {
    "grid_structure_score": ("position_embedding", "grid_structure_score"),
    "decodability_r2": ("position_embedding", "decodability_r2"),
    "similarity_distance_spearman": ("position_embedding", "similarity_distance_spearman"),
    "neighbour_recall_k4": ("position_embedding", "neighbour_recall", "k4"),
    "pos_pressure_spearman": ("gradients", "position_embedding", "spearman_distance"),
    "loss": ("gradients", "loss"),
    "qk_alignment_gap_mean": ("qk_geometry", "alignment_gap_mean"),
    "qk_aligned_heads": ("qk_geometry", "aligned_heads"),
    "qk_position_aligned_heads": ("qk_geometry", "alignment_source_counts", "position"),
}


def lookup(report: dict[str, Any], path: Sequence[str]) -> Any:
    value: Any = report
    for key in path:
        if not isinstance(value, dict) or key not in value:
            return None
        value = value[key]
    return value


def trajectory_section(steps: Sequence[int], reports: Sequence[dict[str, Any]]) -> SectionResult:
    """Headline numbers per step, head label counts per step, mean attention distance per layer."""
    if len(steps) != len(reports) or not steps:
        raise ValueError("give one report per step, at least one")
    series = {name: [_number(lookup(r, path)) for r in reports] for name, path in HEADLINES.items()}
    series["logit_pressure_spearman"] = [_mean_layer_spearman(r) for r in reports]
    counts = {
        label: [_number(lookup(r, ("heads", "counts", label))) for r in reports] for label in LABELS
    }
    distance = [
        [
            _number(layer.get("mean_distance_patches"))
            for layer in (lookup(r, ("heads", "layers")) or [])
        ]
        for r in reports
    ]
    data = {
        "available": True,
        "steps": list(steps),
        "headlines": series,
        "head_label_counts": counts,
        "mean_attention_distance_per_layer": distance,
        "uniform_mean_distance_patches": _number(
            lookup(reports[-1], ("heads", "uniform_mean_distance_patches"))
        ),
    }
    return SectionResult(data, figures={"trajectory": plot_trajectory(data)})


def _mean_layer_spearman(report: dict[str, Any]) -> float | None:
    """Mean over layers of the Spearman correlation of logit pressure with grid distance.

    In [-1, 1]; negative when the loss pushes near logits up and far ones down (the story).
    """
    values = [
        _number(layer.get("spearman_distance"))
        for layer in lookup(report, ("gradients", "layers")) or []
    ]
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def plot_trajectory(data: dict[str, Any]) -> bytes:
    """Three panels: position-embedding structure, head label counts, attention distance per layer."""
    steps = data["steps"]
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
    ax = axes[0]
    for name in (
        "grid_structure_score",
        "decodability_r2",
        "neighbour_recall_k4",
        "qk_alignment_gap_mean",
    ):
        values = data["headlines"][name]
        if any(v is not None for v in values):
            ax.plot(
                steps, [float("nan") if v is None else v for v in values], marker="o", label=name
            )
    ax.set(title="position embedding", xlabel="training step", ylim=(-0.05, 1.05))
    ax.legend(fontsize=7)
    ax = axes[1]
    # Stacked bars, one per checkpoint: every head is counted once, and no label's line
    # hides behind another's.
    positions = list(range(len(steps)))
    bottom = [0.0] * len(steps)
    for label, colour in LABEL_COLOURS.items():
        values = [v or 0.0 for v in data["head_label_counts"].get(label, [])]
        if any(values):
            ax.bar(positions, values, bottom=bottom, width=0.8, color=colour, label=label)
            bottom = [b + v for b, v in zip(bottom, values, strict=True)]
    ax.set_xticks(positions, [str(s) for s in steps], fontsize=7, rotation=45)
    ax.set(title="heads per label", xlabel="training step (checkpoint)", ylabel="heads")
    ax.set_ylim(0, max(max(bottom, default=0.0), 1.0) * 1.3)  # headroom for the legend
    ax.legend(fontsize=7, loc="upper center", ncol=4)
    ax = axes[2]
    per_step = data["mean_attention_distance_per_layer"]
    num_layers = max((len(x) for x in per_step), default=0)
    for layer in range(num_layers):
        values = [
            row[layer] if layer < len(row) and row[layer] is not None else float("nan")
            for row in per_step
        ]
        ax.plot(steps, values, marker=".", label=f"layer {layer}")
    if data["uniform_mean_distance_patches"] is not None:
        ax.axhline(
            data["uniform_mean_distance_patches"], color="grey", ls="--", lw=1, label="uniform"
        )
    ax.set(title="mean attention distance (patches)", xlabel="training step")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return figure_png(fig)
