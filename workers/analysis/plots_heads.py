"""Figures of the ``heads`` section, returned as PNG bytes (matplotlib, Agg backend)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np  # noqa: E402
from matplotlib.colors import ListedColormap  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402

from workers.analysis.figures import figure_png, plt

# One fixed colour per label so that figures of two reports read the same way.
LABEL_COLOURS: dict[str, str] = {
    "local": "#1f77b4",
    "horizontal": "#ff7f0e",
    "vertical": "#2ca02c",
    "global": "#d62728",
    "texture": "#9467bd",
    "prefix": "#8c564b",
    "mixed": "#7f7f7f",
}


def _png(fig: plt.Figure) -> bytes:
    return figure_png(fig, dpi=110, tight=True)


def _check(distances: np.ndarray | None, labels: Sequence[Sequence[str]]) -> tuple[int, int]:
    num_layers = len(labels)
    num_heads = len(labels[0]) if num_layers else 0
    if num_layers == 0 or num_heads == 0 or any(len(row) != num_heads for row in labels):
        raise ValueError("labels must be a non-empty (layers x heads) table")
    unknown = {lab for row in labels for lab in row} - set(LABEL_COLOURS)
    if unknown:
        raise ValueError(f"unknown labels {sorted(unknown)}")
    if distances is not None and distances.shape != (num_layers, num_heads):
        raise ValueError(
            f"distances {distances.shape} do not match labels {(num_layers, num_heads)}"
        )
    return num_layers, num_heads


def distance_vs_depth(
    distances: np.ndarray,
    labels: Sequence[Sequence[str]],
    *,
    uniform_distance: float,
    unit: str = "patches",
) -> bytes:
    """Mean attention distance (layers, heads) against layer, one dot per head coloured by
    its label, with the uniform-attention distance as a dashed line (ViT paper, Fig. 7)."""
    distances = np.asarray(distances, dtype=float)
    num_layers, num_heads = _check(distances, labels)
    fig, ax = plt.subplots(figsize=(6.0, 4.0))
    # Spread the heads of one layer a little sideways so that equal distances stay visible.
    jitter = np.linspace(-0.15, 0.15, num_heads) if num_heads > 1 else np.zeros(1)
    xs = np.arange(num_layers)[:, None] + jitter[None, :]
    colours = [[LABEL_COLOURS[lab] for lab in row] for row in labels]
    ax.scatter(
        xs.ravel(), distances.ravel(), c=sum(colours, []), s=28, edgecolors="black", linewidths=0.3
    )
    ax.axhline(
        uniform_distance, color="black", linestyle="--", linewidth=1, label="uniform attention"
    )
    present = [lab for lab in LABEL_COLOURS if any(lab in row for row in labels)]
    handles = [Patch(color=LABEL_COLOURS[lab], label=lab) for lab in present]
    handles.append(ax.get_legend_handles_labels()[0][0])
    ax.legend(handles=handles, fontsize=8, loc="best")
    ax.set_xlabel("layer")
    ax.set_ylabel(f"mean attention distance ({unit})")
    ax.set_xticks(range(num_layers))
    ax.set_title("Mean attention distance per head")
    return _png(fig)


def label_map(labels: Sequence[Sequence[str]]) -> bytes:
    """A layer x head table of labels as coloured cells."""
    num_layers, num_heads = _check(None, labels)
    names = list(LABEL_COLOURS)
    table = np.array([[names.index(lab) for lab in row] for row in labels])
    fig, ax = plt.subplots(figsize=(1.0 + 0.45 * num_heads, 1.0 + 0.35 * num_layers))
    ax.imshow(
        table,
        cmap=ListedColormap(list(LABEL_COLOURS.values())),
        vmin=-0.5,
        vmax=len(names) - 0.5,
        aspect="auto",
    )
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    ax.set_xticks(range(num_heads))
    ax.set_yticks(range(num_layers))
    present = [lab for lab in names if any(lab in row for row in labels)]
    ax.legend(
        handles=[Patch(color=LABEL_COLOURS[lab], label=lab) for lab in present],
        fontsize=8,
        bbox_to_anchor=(1.02, 1),
        loc="upper left",
    )
    ax.set_title("Head labels")
    return _png(fig)
