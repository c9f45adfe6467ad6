"""`vitaudit demo`: train a small ViT here, audit its training run through the API.

Two runs from the same initialisation on the same images: the real task, and the control
whose patch order is shuffled per image (position carries no information). Each run goes to
the service as one trajectory audit; the demo prints where the reports are and writes
``summary.json`` with the grid-structure score (and the head labels and mean attention
distance per layer, and the Q/K state of `qk_geometry`) along both trajectories.

The audits measure the models on the task's own images, not on the natural probe photos:
``AUDIT_IMAGES`` held-out images of the task (a seed the training never draws), written as
8-bit PNGs that the service's normalisation maps back exactly to the training inputs (see
`workers.training.LayoutDataset`), uploaded with their true labels so the gradient section
uses the task's loss. Each run is audited on the images as it saw them in training: the
control's copies have their patches shuffled (one fixed permutation per image).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

from service.client import AuditClient, ServiceError
from service.stack import LocalStack, StackError, free_port
from workers.analysis.figures import figure_png, plt

RUNS = {"trained": False, "shuffled": True}  # run name -> shuffle_patches
AUDIT_OPTIONS: dict[str, Any] = {
    "batch_size": 32,
    "seed": 0,
    "analyses": ["position_embedding", "gradients", "heads", "qk_geometry"],
}
#: Held-out task images per audit, and the dataset seed they come from (training uses the
#: run's seed, 0, and its own streams; 1_000 is never used for training).
AUDIT_IMAGES = 32
AUDIT_IMAGES_SEED = 1_000
MODEL_ARG_KEYS = (
    "img_size",
    "patch_size",
    "embed_dim",
    "depth",
    "num_heads",
    "mlp_ratio",
    "num_classes",
    "class_token",
    "global_pool",
    "pos_embed",
)


def _save_run(checkpoints: list[Any], folder: Path) -> list[Path]:
    from workers.analysis.loading import write_state_dict

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for checkpoint in checkpoints:
        path = folder / f"step-{checkpoint.step:05d}.safetensors"
        paths.append(write_state_dict(checkpoint.state_dict, path))
    return paths


def audit_pixels(config: Any, *, shuffle: bool) -> tuple[Any, list[int]]:
    """The ``AUDIT_IMAGES`` held-out task images a run is audited on, (N, 3, H, W) uint8, as
    the run saw them in training (patches shuffled, one fixed permutation per image, for the
    control), and their labels."""
    import torch

    from workers.training import config_dataset, shuffle_patch_order

    data = config_dataset(config, AUDIT_IMAGES, seed=AUDIT_IMAGES_SEED)
    pixels = data.pixels
    if shuffle:
        generator = torch.Generator().manual_seed(AUDIT_IMAGES_SEED)
        patch = int(config.model["patch_size"])
        pixels = shuffle_patch_order(data.pixels, patch_size=patch, generator=generator)
    return pixels, [int(x) for x in data.labels]


def write_audit_images(config: Any, folder: Path, *, shuffle: bool) -> tuple[list[Path], list[int]]:
    """Write `audit_pixels` as PNGs; return their paths and labels."""
    from PIL import Image

    pixels, labels = audit_pixels(config, shuffle=shuffle)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index, image in enumerate(pixels):
        path = folder / f"image-{index:03d}.png"
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(path)
        paths.append(path)
    return paths, labels


def _head_summary(
    trajectory: dict[str, Any], reports: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    """Per step: head labels per layer and mean attention distance per layer (patches)."""
    return [
        {
            "step": step,
            "labels": [[h["label"] for h in layer["heads"]] for layer in report["heads"]["layers"]],
            "mean_distance_patches": distances,
        }
        for step, report, distances in zip(
            trajectory["steps"],
            reports,
            trajectory["mean_attention_distance_per_layer"],
            strict=True,
        )
    ]


def qk_summary(trajectory: dict[str, Any], reports: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per step: the Q/K state (`qk_geometry`): mean near-minus-far Q/K cosine over heads,
    heads aligned above the shuffled baseline (and how many of them from position), and
    positional-kernel labels per layer."""
    out = []
    for step, report in zip(trajectory["steps"], reports, strict=True):
        section = report.get("qk_geometry") or {}
        layers = section.get("layers") or []
        out.append(
            {
                "step": step,
                "alignment_gap_mean": section.get("alignment_gap_mean"),
                "aligned_heads": section.get("aligned_heads"),
                "position_aligned_heads": (section.get("alignment_source_counts") or {}).get(
                    "position"
                ),
                "kernel_labels": [
                    [h.get("positional_kernel_label") for h in layer["heads"]] for layer in layers
                ],
            }
        )
    return out


#: Head labels that say where on the grid a head looks, whatever the image.
POSITIONAL_LABELS = ("local", "horizontal", "vertical")


def positional_head_count(labels: list[list[str]]) -> int:
    """Number of heads labelled local, horizontal or vertical in a (layers x heads) table."""
    return sum(label in POSITIONAL_LABELS for layer in labels for label in layer)


def plot_contrast(summary: dict[str, Any]) -> bytes:
    """Task against control, per step: the grid-structure score of the position embedding,
    and the number of heads with a positional label."""
    fig, (grid_ax, heads_ax) = plt.subplots(1, 2, figsize=(10, 3.6))
    for run, points in summary["runs"].items():
        steps = [p["step"] for p in points]
        grid_ax.plot(steps, [p["grid_structure_score"] for p in points], marker="o", label=run)
        counts = [positional_head_count(entry["labels"]) for entry in summary["heads"][run]]
        heads_ax.plot(steps, counts, marker="o", label=run)
    grid_ax.set(
        xlabel="training step",
        ylabel="grid_structure_score",
        ylim=(-0.05, 1.05),
        title="position embedding",
    )
    num_heads = max(
        (
            sum(len(layer) for layer in entry["labels"])
            for run in summary["heads"].values()
            for entry in run
        ),
        default=1,
    )
    heads_ax.set(
        xlabel="training step",
        ylabel="heads",
        ylim=(-0.3, num_heads + 0.3),
        title=f"local, horizontal or vertical heads (of {num_heads})",
    )
    for ax in (grid_ax, heads_ax):
        ax.legend()
    fig.suptitle("task vs shuffled-patch control")
    fig.tight_layout()
    return figure_png(fig, dpi=110)


def run(args: Any) -> int:
    from workers.training import MODEL_ARCH, SCHEDULES, train

    started = time.monotonic()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    config = SCHEDULES[getattr(args, "schedule", "default")]
    model_args = {k: v for k, v in dict(config.model).items() if k in MODEL_ARG_KEYS}
    stack = (
        None
        if getattr(args, "server", None)
        else LocalStack("127.0.0.1", args.port or free_port(), log_dir=out / "logs")
    )
    try:
        if stack:
            print(f"starting the stack at {stack.url} ...", flush=True)
            stack.start(quiet=True)
        client = AuditClient(args.server if stack is None else stack.url)
        audits: dict[str, str] = {}
        for name, shuffle in RUNS.items():
            t0 = time.monotonic()
            print(
                f"training '{name}' ({config.steps} steps{', patch order shuffled' if shuffle else ''}) ...",
                flush=True,
            )
            checkpoints = train(config, seed=0, shuffle_patches=shuffle)
            final = checkpoints[-1]
            print(
                f"  done in {time.monotonic() - t0:.0f} s: accuracy {final.train_accuracy:.2f} "
                f"(chance 0.25), loss {final.train_loss:.3f}",
                flush=True,
            )
            paths = _save_run(checkpoints, out / "checkpoints" / name)
            images, labels = write_audit_images(
                config, out / "audit-images" / name, shuffle=shuffle
            )
            created = client.submit(
                paths,
                MODEL_ARCH,
                images=images,
                labels=labels,
                options={**AUDIT_OPTIONS, "model_args": model_args},
                steps=[c.step for c in checkpoints],
            )
            audits[name] = created["id"]
            print(
                f"  submitted trajectory audit {audits[name]} ({len(paths)} checkpoints)",
                flush=True,
            )
        summary: dict[str, Any] = {
            "runs": {},
            "heads": {},
            "qk": {},
            "audits": audits,
            "schedule": getattr(args, "schedule", "default"),
            "audit_images": {
                "count": AUDIT_IMAGES,
                "dataset_seed": AUDIT_IMAGES_SEED,
                "labels": "given",
            },
        }
        for name, audit_id in audits.items():
            state = client.wait(audit_id, on_progress=_progress_line(name))
            if state["status"] != "finished":
                print(f"audit {audit_id} failed: {state['error']}", file=sys.stderr)
                return 2
            folder = out / name
            client.download(audit_id, folder)
            (folder / "report.html").write_text(client.report_page(audit_id))
            report = json.loads((folder / "report.json").read_text())
            trajectory = report["trajectory"]
            summary["runs"][name] = [
                {"step": step, "grid_structure_score": score}
                for step, score in zip(
                    trajectory["steps"],
                    trajectory["headlines"]["grid_structure_score"],
                    strict=True,
                )
            ]
            step_reports = [
                json.loads((folder / f"step-{step:06d}.json").read_text())
                for step in trajectory["steps"]
            ]
            summary["heads"][name] = _head_summary(trajectory, step_reports)
            summary["qk"][name] = qk_summary(trajectory, step_reports)
        summary["wall_seconds"] = round(time.monotonic() - started, 1)
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
        (out / "trajectory_contrast.png").write_bytes(plot_contrast(summary))
        for name, points in summary["runs"].items():
            print(
                f"{name:>9}: grid_structure_score {_score(points[0])} at step 0 -> "
                f"{_score(points[-1])} at step {points[-1]['step']}"
            )
            first, last = summary["heads"][name][0], summary["heads"][name][-1]
            print(
                f"{'':>9}  head labels {_count(first['labels'])} -> {_count(last['labels'])}; mean attention "
                f"distance per layer {_rounded(first['mean_distance_patches'])} -> "
                f"{_rounded(last['mean_distance_patches'])} patches"
            )
            qk_first, qk_last = summary["qk"][name][0], summary["qk"][name][-1]
            print(
                f"{'':>9}  Q/K near-far cosine gap {_gap(qk_first)} -> {_gap(qk_last)}; heads "
                f"aligned from position {qk_first['position_aligned_heads']} -> "
                f"{qk_last['position_aligned_heads']}"
            )
        print(
            f"reports and plots: {out}/trained/report.json (and report.html), "
            f"{out}/shuffled/report.json (and report.html), "
            f"{out}/trajectory_contrast.png, {out}/summary.json ({summary['wall_seconds']:.0f} s in all)"
        )
        return 0
    except (ServiceError, StackError) as exc:
        where = f" (the stack's logs: {out / 'logs'})" if stack else ""
        print(f"vitaudit demo: {exc}{where}", file=sys.stderr)
        return 2
    finally:
        if stack:
            stack.stop()


def _count(labels: list[list[str]]) -> dict[str, int]:
    flat = [label for layer in labels for label in layer]
    return {label: flat.count(label) for label in sorted(set(flat))}


def _rounded(values: list[float | None]) -> list[float | None]:
    return [None if v is None else round(v, 2) for v in values]


def _score(point: dict[str, Any]) -> str:
    """A score for the console: 'n/a' where the section had no number (None in JSON)."""
    value = point["grid_structure_score"]
    return "n/a" if value is None else f"{value:.2f}"


def _gap(entry: dict[str, Any]) -> str:
    value = entry["alignment_gap_mean"]
    return "n/a" if value is None else f"{value:.2f}"


def _progress_line(name: str):
    from service.client import ProgressPrinter

    return ProgressPrinter(f"audit {name}")
