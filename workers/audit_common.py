"""The steps every audit shares, whichever runtime runs the model (PyTorch or ONNX).

`workers.pipeline` (the entry point; PyTorch) and `workers.onnx_pipeline` both import
from here and never from each other's internals: images, labels, the isolated run of each
section, the settings and the report.
"""

from __future__ import annotations

import logging
import os
import signal
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rq.timeouts import BaseTimeoutException
from torch import Tensor
from torch.profiler import record_function

from workers.analysis.figures import PendingFigure
from workers.analysis.grid import Grid
from workers.analysis.normalization import Normalization
from workers.analysis.probes import natural_set, texture_v1
from workers.analysis.report import assemble_report
from workers.analysis.results import SectionResult
from workers.inputs import images_to_pixels, load_images

Progress = Callable[[str, float], None]
Stage = Callable[[str, float], float]
log = logging.getLogger(__name__)

# Sections run in this order whatever the request's order: gradients before heads, so the
# heads can reuse the gradient pass's forward (`workers.pipeline.AuditContext.head_attention`).
RUN_ORDER: tuple[str, ...] = ("position_embedding", "gradients", "heads", "qk_geometry")

# Pending figures are drawn by this process and up to this many forked children at once
# (`draw_figures`); a child that has not finished within the timeout is killed and its
# figures are drawn here instead.
FIGURE_PROCESSES = 4
FIGURE_CHILD_TIMEOUT_S = 120.0
FIGURE_QUEUE_MAX = 16_384  # 2 bytes a position: the queue fits a pipe's 64 KiB buffer


class AuditInputError(Exception):
    """The request cannot be audited as asked; the message says what to change."""

    code = "invalid_input"


@dataclass
class AuditOutput:
    report: dict[str, Any]
    arrays: dict[str, np.ndarray] = field(default_factory=dict)
    figures: dict[str, bytes | PendingFigure] = field(default_factory=dict)  # bytes once drawn
    documents: dict[str, dict[str, Any]] = field(default_factory=dict)  # extra NAME.json files


def probe_pixels(
    request: dict[str, Any], audit_dir: Path, size: tuple[int, int], grid: Grid
) -> tuple[Tensor, str]:
    """The images to audit with at ``size``: uploaded ones (uint8 pixels), or the named probe
    set (float32 in [0, 1]); `workers.inputs.unit_pixels` maps either to [0, 1]."""
    options = request["options"]
    uploads = request.get("images") or []
    if uploads:
        images = load_images(
            [audit_dir / item["path"] for item in uploads],
            [item["filename"] for item in uploads],
            max_images=int(request.get("max_images") or options.get("max_images", 4096)),
        )
        pixels, probe_set = images_to_pixels(images, size), "uploaded"
    elif options["probe_set"] == "texture-v1":
        pixels = texture_v1(
            size, grid, count=int(options["num_images"]), seed=int(options["seed"])
        ).images
        probe_set = "texture-v1"
    else:
        probes = natural_set(size, int(options["num_images"]))
        pixels, probe_set = probes.images, probes.name
    return pixels, probe_set


def check_labels(request: dict[str, Any], num_images: int, num_classes: int) -> Tensor | None:
    """The request's labels as a tensor, or None; `AuditInputError` when they do not fit."""
    labels = request.get("labels")
    if labels is None:
        return None
    if len(labels) != num_images:
        raise AuditInputError(
            f"{len(labels)} labels were given for {num_images} images; give one label per image"
        )
    if num_classes < 1:
        raise AuditInputError("labels were given, but the model has no classifier head")
    bad = [x for x in labels if x >= num_classes]
    if bad:
        raise AuditInputError(
            f"label {bad[0]} is out of range: the model has {num_classes} classes (0..{num_classes - 1})"
        )
    return torch.tensor(labels, dtype=torch.long)


def section_failed(error: Exception) -> SectionResult:
    """The report of a section that raised: unavailable, with the message and the class."""
    message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return SectionResult(
        {
            "available": False,
            "reason": f"the analysis failed: {message}",
            "error": type(error).__name__,
        }
    )


def run_sections(
    requested: list[str],
    run: Callable[[str], SectionResult],
    stage: Stage,
    output: AuditOutput,
    timings: dict[str, float],
) -> dict[str, dict[str, Any]]:
    """Run every requested analysis in `RUN_ORDER`, collecting arrays and figures into
    ``output`` and seconds into ``timings``; returns each section's report data.

    Sections fail alone: an exception inside one becomes its ``available: false`` with the
    reason and the exception's class (`section_failed`), and the others still run. Only a
    job timeout (RQ's alarm) goes through.
    """
    sections: dict[str, dict[str, Any]] = {}
    for index, name in enumerate(sorted(requested, key=RUN_ORDER.index)):
        started = stage(name, 0.15 + 0.8 * index / len(requested))
        try:
            with record_function(f"section.{name}"):
                result = run(name)
        except BaseTimeoutException:
            raise
        except Exception as error:  # noqa: BLE001 - one section's failure is reported, not fatal
            log.exception("section %s failed", name)
            result = section_failed(error)
        sections[name] = result.data
        output.arrays.update(result.arrays)
        output.figures.update(result.figures)
        timings[name] = time.perf_counter() - started
    return sections


def _error_text(error: Exception) -> str:
    """How a figure's error reads in its note, whichever process drew it."""
    return f"{type(error).__name__}: {error}"


def _not_drawn(name: str, error_text: str) -> str:
    return f"the figure {name} could not be drawn: {error_text}"


def _draw(name: str, pending: PendingFigure, notes: list[str]) -> bytes | None:
    try:
        return pending.draw()
    except Exception as error:  # noqa: BLE001 - a figure is an extra; the sections stand
        log.exception("figure %s failed", name)
        notes.append(_not_drawn(name, _error_text(error)))
        return None


def _take(queue: int) -> int | None:
    """The next figure's position from the work queue (a pipe), or None when it is empty."""
    taken = os.read(queue, 2)
    return int.from_bytes(taken, "little") if len(taken) == 2 else None


def _draw_taken(queue: int, pending: list[tuple[str, PendingFigure]], folder: Path) -> None:
    """In a forked child: draw figures off the queue into ``folder/<position>.png`` (or
    ``.err`` with the error) until the queue is empty."""
    torch.set_num_threads(1)  # the parent's OpenMP pool did not survive the fork
    while (position := _take(queue)) is not None:
        try:
            (folder / f"{position}.png").write_bytes(pending[position][1].draw())
        except Exception as error:  # noqa: BLE001 - reported by the parent
            (folder / f"{position}.err").write_text(_error_text(error))


def _can_fork() -> bool:
    # CUDA cannot be used in a forked child, and a child could not even free the parent's
    # CUDA tensors it inherited: draw in-process on GPU.
    return hasattr(os, "fork") and not torch.cuda.is_initialized()


def draw_figures(
    figures: dict[str, bytes | PendingFigure],
    notes: list[str],
    *,
    processes: int | None = None,
) -> dict[str, bytes]:
    """Every figure as PNG bytes: the `PendingFigure`s are drawn now by this process and
    forked children (``processes`` in all, default the CPU count up to `FIGURE_PROCESSES`;
    in-process only where forking is not safe, see `_can_fork`).

    Figures are single-threaded Python (matplotlib), so on 2 cores two processes draw the
    report's 8-10 figures in about half the time. Each process takes the next figure off a
    shared queue (a pipe holding the figures' positions), so a slow figure does not hold
    up the others. A child writes PNG files into a private temporary folder (no objects
    cross the process boundary); a figure it could not draw is reported as its error, and
    the figure it was drawing when it died (or ran past `FIGURE_CHILD_TIMEOUT_S`) is drawn
    here instead. A figure that fails here is left out, with a note in ``notes``.
    """
    pending = [(name, f) for name, f in figures.items() if isinstance(f, PendingFigure)]
    if len(pending) > FIGURE_QUEUE_MAX:
        raise ValueError(f"{len(pending)} figures to draw; at most {FIGURE_QUEUE_MAX} at once")
    count = processes or min(FIGURE_PROCESSES, os.cpu_count() or 1)
    count = min(count, len(pending)) if _can_fork() else 1
    drawn: dict[int, bytes | None] = {}
    with tempfile.TemporaryDirectory(prefix="vitaudit-figures-") as tmp:
        folder = Path(tmp)
        queue, filler = os.pipe()
        children: list[int] = []
        try:
            with os.fdopen(filler, "wb") as fill:  # every position, then end of queue
                fill.write(b"".join(i.to_bytes(2, "little") for i in range(len(pending))))
            for _ in range(count - 1):
                try:
                    pid = os.fork()
                except OSError:  # no process to spare: the ones running draw the rest
                    log.warning("could not fork a figure process", exc_info=True)
                    break
                if pid == 0:  # the child: draw, then leave without running the parent's exit code
                    code = 1
                    try:
                        signal.signal(signal.SIGALRM, signal.SIG_DFL)  # RQ's job timeout
                        _draw_taken(queue, pending, folder)
                        code = 0
                    finally:
                        os._exit(code)
                children.append(pid)
            while (position := _take(queue)) is not None:
                drawn[position] = _draw(*pending[position], notes)
            _wait(children, time.monotonic() + FIGURE_CHILD_TIMEOUT_S)
            children = []
        finally:
            os.close(queue)
            for pid in children:  # an exception here (a job timeout): leave no child behind
                _kill(pid)
        for position, (name, f) in enumerate(pending):
            if position in drawn:
                continue
            png, err = folder / f"{position}.png", folder / f"{position}.err"
            if png.exists():
                drawn[position] = png.read_bytes()
            elif err.exists():
                notes.append(_not_drawn(name, err.read_text()))
                drawn[position] = None
            else:  # its child died or timed out while drawing it
                drawn[position] = _draw(name, f, notes)
    out = {name: f for name, f in figures.items() if not isinstance(f, PendingFigure)}
    out.update({name: drawn[i] for i, (name, _) in enumerate(pending) if drawn[i] is not None})
    return {name: out[name] for name in figures if name in out}  # the sections' order


def _wait(children: list[int], deadline: float) -> None:
    """Reap ``children``; kill those still running at ``deadline`` (monotonic seconds)."""
    running = set(children)
    while running:
        for pid in list(running):
            finished, _ = os.waitpid(pid, os.WNOHANG)
            if finished:
                running.discard(pid)
        if running and time.monotonic() > deadline:
            for pid in running:
                _kill(pid)
            return
        if running:
            time.sleep(0.005)


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    except (ProcessLookupError, ChildProcessError):
        pass


def run_settings(
    options: dict[str, Any],
    probe_set: str,
    num_images: int,
    labels: Tensor | None,
    device: str,
    normalization: Normalization,
    **extra: Any,
) -> dict[str, Any]:
    """The report's ``settings``: what was run, on what, with which seed and normalisation."""
    return {
        "probe_set": probe_set,
        "num_images": num_images,
        "batch_size": int(options["batch_size"]),
        "seed": int(options["seed"]),
        "labels_source": "given" if labels is not None else "model_predictions",
        "analyses": list(options["analyses"]),
        "device": device,
        "normalization": normalization.report(),
        **extra,
    }


def finish_report(
    output: AuditOutput, *, images_sha256: str | None, timings: dict[str, float], **parts: Any
) -> dict[str, Any]:
    """The report from its parts (`assemble_report`), with the total time and the images'
    digest filled in."""
    timings["total"] = sum(timings.values())
    report = assemble_report(timings=timings, **parts)
    report["model"]["images_sha256"] = images_sha256
    return report
