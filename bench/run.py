"""vitaudit benchmarks: every figure is a ratio or a rate measured in this one run.

    .venv/bin/python bench/run.py            # full sizes (vit_tiny + vit_small, 512 vs 64, 1,024)
    .venv/bin/python bench/run.py --quick    # reduced sizes, a few minutes on 2 cores
    .venv/bin/python bench/run.py --cost     # the audit-cost figures alone, merged
    .venv/bin/python bench/run.py --big-model  # the big-model memory figures alone, merged
    .venv/bin/python bench/run.py --gpu      # GPU figures on one CUDA device, merged as `gpu`

Prints a table and writes bench/results.json. What each key means:

- ``audit_cost_ratio``: wall time of a full audit (``workers.pipeline.audit_checkpoint``, the
  service's default sections and figures, checkpoint load included) over a bare timm
  forward + backward (cross entropy on the model's own predictions) on the same images at
  the same batch size, CPU; the worst arch (``audit_cost_ratio_per_arch`` has each). Bare
  passes and audits alternate ``cost_repeats`` times; each audit is timed against the bare
  passes either side of it, and the median of those ratios is the figure (``ratios`` has
  each).
  ``audit_cost.<arch>`` keeps the report's per-stage ``timings``, each stage's ``shares`` of
  the audit and the ratio of the analysis stages alone. Target <= 2.0.
  ``audit_cost_ratio_every_section``: the same with the opt-in Q/K geometry on too
  (``audit_cost.<arch>.every_section``). Target <= 2.0.
  ``audit_cost_ratio_fresh_job``: the every-section audit as the service runs a job: a new
  process warms up as ``vitaudit worker`` does (one thread, ``service.cli.warm_worker``) and
  forks a work-horse that runs the audit with its first-use costs; over that process's own
  bare passes afterwards, warm as a training loop's would be (``audit_cost.<arch>.fresh_job``).
  Target <= 2.0.
- ``memory_ratio_512_over_64``: peak RSS (VmHWM of a fresh child process) of an audit of
  many images over that of few images, same batch size; ``memory.images`` says which counts.
  Target <= 1.2.
- ``naive_memory_ratio`` / ``naive_time_ratio``: peak RSS and time of the store-every-map
  baseline (``bench/naive.py``) over ours (``workers.analysis.heads.head_section``), each in a
  fresh child. Target >= 4 and >= 1.
- ``polls_per_second``, ``poll_p50_ms``, ``poll_p99_ms``: GET /v1/audits/{id} on loopback
  against a real API process, driven by ``wrk`` (Debian package; one thread, bounded duration)
  when it is installed, else by a bounded asyncio + httpx load generator, which competes with
  the API for the same cores and understates it. Target >= 1,000/s, p99 < 50 ms.
- ``submit_to_start_s``: median time from sending POST /v1/audits to the job's ``started_at``
  with an idle, warm worker. Target < 0.5 s.
- ``upload_rss_growth_mb``: the API process's largest VmRSS while it receives a large
  checkpoint, streamed from a generator, minus its VmRSS just before. Target < 100 MB.
- ``big_model_heads_peak_mb``: peak RSS of the heads section (`head_section`: natural and
  texture probes, bootstrap, plots) of a ``vit_large_patch14_dinov2`` at 518 px (random
  weights, `BIG_MODEL`), minus the peak of the same child after loading the model and running
  one bare forward of one batch; so what the section adds beyond the model and one batch.
  Target <= 1,024 MB. ``big_model_artifacts_mb``: the bytes of that section's arrays and
  figures. Target <= 100 MB. ``--big-model`` measures these two alone (a few minutes on
  2 cores) and merges them into an existing results file.
- ``gpu`` (``--gpu``, one CUDA device; exits 2 with a message where there is none): the
  device's name and, for ``vit_base_patch16_224`` over 1,000 images at batch 64 in fp32 and
  bf16, images/s of a full audit and of its analysis stages beside images/s of a bare
  forward + backward (the floor), the batch that ran and the peak CUDA memory.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / "results.json"
SEED = 0

FULL = {
    "cost_archs": ["vit_tiny_patch16_224", "vit_small_patch16_224"],
    "cost_images": 64,
    "cost_repeats": 3,
    "batch_size": 16,
    "memory_images": [64, 512],
    "naive_images": 1024,
    "polls": 20_000,
    "poll_concurrency": 32,
    "poll_concurrency_more": [16],  # also measured, with its own verdicts
    "poll_time_limit_s": 60.0,
    "submits": 5,
    "upload_bytes": 1024**3,
}
QUICK = {
    "cost_archs": ["vit_tiny_patch16_224"],
    "cost_images": 32,
    "cost_repeats": 1,
    "batch_size": 16,
    "memory_images": [16, 128],
    "naive_images": 128,
    "polls": 3_000,
    "poll_concurrency": 16,
    "poll_concurrency_more": [],
    "poll_time_limit_s": 20.0,
    "submits": 3,
    "upload_bytes": 256 * 1024**2,
}
COST_KEYS = ("audit_cost_ratio", "audit_cost_ratio_every_section", "audit_cost_ratio_fresh_job")
TARGETS = {
    "audit_cost_ratio": ("<=", 2.0),
    "audit_cost_ratio_every_section": ("<=", 2.0),
    "audit_cost_ratio_fresh_job": ("<=", 2.0),
    "memory_ratio_512_over_64": ("<=", 1.2),
    "naive_memory_ratio": (">=", 4.0),
    "naive_time_ratio": (">=", 1.0),
    "polls_per_second": (">=", 1000.0),
    "poll_p99_ms": ("<", 50.0),
    "submit_to_start_s": ("<", 0.5),
    "upload_rss_growth_mb": ("<", 100.0),
    "big_model_heads_peak_mb": ("<=", 1024.0),
    "big_model_artifacts_mb": ("<=", 100.0),
}
# The heads section of a large ViT at its native resolution, random weights (memory only).
BIG_MODEL = {
    "arch": "vit_large_patch14_dinov2",
    "img_size": 518,  # 37 x 37 = 1,369 patches + 1 class token
    "num_images": 2,
    "texture_images": 1,  # each runs with its 2 controls: 3 images in one forward
    "batch_size": 2,
}


# GPU figures (`--gpu`, one CUDA device): full audits beside bare forward + backward passes.
GPU = {
    "arch": "vit_base_patch16_224",
    "num_images": 1000,
    "batch_size": 64,
    "precisions": ["fp32", "bf16"],
}
NO_CUDA = (
    "bench/run.py --gpu measures on a CUDA device, and torch sees none here "
    "(torch.cuda.is_available() is False); run it on a machine with a GPU"
)


# --- images ------------------------------------------------------------------------------


def augmented_natural_batches(count: int, batch_size: int, size: tuple[int, int]) -> Iterator:
    """``count`` images in [0, 1] at ``size``, in batches: the 12 natural-v1 probes repeated,
    repeat k flipped left-right when k is odd and shifted right by 8 * (k // 2) pixels
    (wrapping), so no two images are identical. Built batch by batch."""
    import torch

    from workers.analysis.probes import natural_v1

    if count < 1:
        raise ValueError(f"need at least one image, got {count}")
    base = natural_v1(size).images
    batch: list[torch.Tensor] = []
    for index in range(count):
        repeat, image = divmod(index, len(base))
        picture = base[image]
        if repeat % 2:
            picture = picture.flip(-1)
        if repeat // 2:
            picture = picture.roll(8 * (repeat // 2), dims=-1)
        batch.append(picture)
        if len(batch) == batch_size:
            yield torch.stack(batch)
            batch = []
    if batch:
        yield torch.stack(batch)


def stage_audit(
    root: Path,
    arch: str,
    num_images: int,
    batch_size: int,
    analyses: list[str] | None = None,
) -> tuple[dict[str, Any], Path]:
    """An audit folder as the service writes it: a seeded random-weight checkpoint of ``arch``
    and ``num_images`` uploaded PNG images; returns the request record and the folder.
    ``analyses`` defaults to the service's default sections (`service.models.ALL_ANALYSES`)."""
    import numpy as np
    import timm
    import torch
    from PIL import Image

    from service.models import ALL_ANALYSES
    from workers.analysis.loading import write_state_dict

    inputs = root / "inputs"
    inputs.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(SEED)
    model = timm.create_model(arch, pretrained=False)
    checkpoint = inputs / "checkpoint.safetensors"
    write_state_dict(model.state_dict(), checkpoint)
    images = []
    for batch in augmented_natural_batches(num_images, 64, (224, 224)):
        for picture in batch:
            name = f"image-{len(images):05d}.png"
            pixels = (picture.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
            Image.fromarray(pixels).save(inputs / name)
            images.append({"filename": name, "path": f"inputs/{name}"})
    request = {
        "arch": arch,
        "options": {
            "analyses": list(analyses or ALL_ANALYSES),
            "probe_set": "natural-v1",
            "num_images": num_images,
            "batch_size": batch_size,
            "seed": SEED,
        },
        "labels": None,
        "checkpoint": {
            "filename": checkpoint.name,
            "path": "inputs/checkpoint.safetensors",
            "bytes": checkpoint.stat().st_size,
            "sha256": "0" * 64,
            "format": "torch",
        },
        "images": images,
        "max_images": num_images,
    }
    return request, root


# --- 1. audit cost -----------------------------------------------------------------------


def staged_model_and_images(request: dict[str, Any], root: Path) -> tuple[Any, Any]:
    """The staged audit's model (CPU, as the worker loads it) and its images, as model
    inputs: what a bare forward + backward runs over."""
    from workers.analysis.loading import load_checkpoint
    from workers.pipeline import prepare_images

    loaded = load_checkpoint(root / request["checkpoint"]["path"], request["arch"], {})
    images, _, _ = prepare_images(request, root, loaded.model)
    return loaded.model, images


def bare_forward_backward_s(model, images, batch_size: int) -> float:
    """Seconds for forward + cross-entropy (on the model's own predictions) + backward over
    ``images`` in batches; the reference an audit's cost is measured against."""
    import torch

    model.eval()
    started = time.perf_counter()
    for batch in images.split(batch_size):
        model.zero_grad(set_to_none=True)
        logits = model(batch)
        torch.nn.functional.cross_entropy(logits, logits.argmax(-1)).backward()
    model.zero_grad(set_to_none=True)
    return time.perf_counter() - started


def _timed_audit(request: dict[str, Any], root: Path) -> tuple[float, dict[str, float]]:
    """Wall seconds of one `audit_checkpoint` of the staged request, and its stage timings."""
    from workers.pipeline import audit_checkpoint

    started = time.perf_counter()
    report = audit_checkpoint(
        request, request["checkpoint"], root, progress=lambda stage, fraction: None
    ).report
    return time.perf_counter() - started, report["timings"]


def _section_shares(timings: dict[str, float]) -> dict[str, float]:
    """Each stage's share of the audit's total (the report's ``timings``)."""
    total = timings["total"]
    return {k: round(v / total, 3) for k, v in timings.items() if k != "total"}


def _run_summary(
    request: dict[str, Any], runs: list[tuple[float, dict[str, float], float]]
) -> dict[str, Any]:
    """One configuration's repeated audits: ``runs`` holds (audit s, stage timings, the bare
    pass seconds it is measured against) per repeat; the headline is the median ratio's
    repeat."""
    ratios = [seconds / around for seconds, _, around in runs]
    middle = sorted(range(len(runs)), key=lambda i: ratios[i])[len(runs) // 2]
    seconds, timings, around = runs[middle]
    ratio = ratios[middle]
    return {
        "analyses": list(request["options"]["analyses"]),
        "median_repeat": middle,
        "ratio": round(ratio, 3),
        "ratios": [round(r, 3) for r in ratios],
        "audit_s": round(seconds, 3),
        "audits_s": [round(s, 3) for s, _, _ in runs],
        "bare_around_s": round(around, 3),
        "timings": {k: round(v, 3) for k, v in timings.items()},
        "shares": _section_shares(timings),
    }


def audit_cost(request: dict[str, Any], root: Path, repeats: int = 3) -> dict[str, Any]:
    """The staged audit (`stage_audit`) against a bare forward + backward on its images.

    Bare passes and audits alternate in this process, ``repeats`` times: bare, audit with
    the default sections, bare, audit with every section (Q/K geometry too), bare, and so
    on. Each audit's ratio is over the mean of the two bare passes either side of it, so a
    machine that slows down or speeds up moves both sides alike; a configuration's
    ``ratio`` is the median of its ``repeats`` ratios (``ratios`` has each), which one
    passing spike on a shared machine (consecutive bare passes here differ by up to 20 %)
    cannot move. These audits run after warm-up passes: they leave out the first-use costs
    every job of the service pays, which `fresh_job_cost` keeps.
    """
    from service.cli import warm_worker
    from workers.audit_common import RUN_ORDER

    if repeats < 1:
        raise ValueError(f"repeats must be at least 1, got {repeats}")
    warm_worker()  # what the worker does before it forks a job

    arch, batch_size = request["arch"], request["options"]["batch_size"]
    every = {**request, "options": {**request["options"], "analyses": list(RUN_ORDER)}}
    model, images = staged_model_and_images(request, root)
    # warm-up: one untimed pass over every image (after a one-batch warm-up the first timed
    # pass still ran 10-30 % slower than the later ones, which flattered the first ratio)
    bare_forward_backward_s(model, images, batch_size)
    bare = [bare_forward_backward_s(model, images, batch_size)]
    runs: dict[str, list[tuple[float, dict[str, float], float]]] = {"default": [], "every": []}
    for _ in range(repeats):
        for name, staged in (("default", request), ("every", every)):
            seconds, timings = _timed_audit(staged, root)
            bare.append(bare_forward_backward_s(model, images, batch_size))
            runs[name].append((seconds, timings, (bare[-2] + bare[-1]) / 2))
    default = _run_summary(request, runs["default"])
    analyses = ("position_embedding", "heads", "gradients")
    return {
        "arch": arch,
        "num_images": len(images),
        "batch_size": batch_size,
        "repeats": repeats,
        "bare_forward_backward_s": [round(b, 3) for b in bare],
        **default,
        "analyses_only_ratio": round(
            sum(default["timings"].get(k, 0.0) for k in analyses) / default["bare_around_s"], 3
        ),
        "every_section": _run_summary(every, runs["every"]),
    }


def fresh_job_cost(request: dict[str, Any], root: Path, repeats: int = 3) -> dict[str, Any]:
    """The staged audit (`stage_audit`) with every section as the service runs a job,
    ``repeats`` times, each in a new
    `child_fresh_job` (a work-horse forked from a warmed-up worker process) and over that
    process's own bare passes; the median ratio, as `audit_cost`.

    Run these before this process runs any pass of its own: a new process's audit ran
    10-20 % slower here while this process held a model it had run passes with (even 5 s
    later, and with OMP_WAIT_POLICY=PASSIVE; the cause was not found)."""
    from workers.audit_common import RUN_ORDER

    every = {**request, "options": {**request["options"], "analyses": list(RUN_ORDER)}}
    (root / "request.json").write_text(json.dumps(every))  # what child_fresh_job audits
    fresh = [run_child("fresh_job", {"root": str(root)}) for _ in range(repeats)]
    return {
        **_run_summary(every, [(f["seconds"], f["timings"], sum(f["bare_s"]) / 2) for f in fresh]),
        "bare_forward_backward_s": [[round(b, 3) for b in f["bare_s"]] for f in fresh],
    }


# --- children: peak memory in a fresh process ---------------------------------------------


def _proc_status_mb(pid: int, field: str) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise KeyError(field)


def _peak_rss_mb() -> float:
    """Peak RSS of this process since it started: VmHWM, the high-water mark of its own
    memory map. Not ``ru_maxrss``: on Linux that keeps the parent's high-water mark across
    fork + exec (exec folds the old map's peak into it), so every child of a parent that
    had grown to 3.1 GB reported 3.1 GB, whatever it did itself."""
    try:
        return _proc_status_mb(os.getpid(), "VmHWM")
    except (OSError, KeyError):  # not Linux: ru_maxrss (KiB) is the best there is
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _current_rss_mb() -> float:
    try:
        return _proc_status_mb(os.getpid(), "VmRSS")
    except (OSError, KeyError):
        return float("nan")


def child_audit(spec: dict[str, Any]) -> dict[str, Any]:
    """Run one staged audit; peak RSS of this process."""
    from workers.pipeline import audit_checkpoint

    root = Path(spec["root"])
    request = json.loads((root / "request.json").read_text())
    before = _current_rss_mb()
    started = time.perf_counter()
    audit_checkpoint(request, request["checkpoint"], root, progress=lambda stage, fraction: None)
    return {
        "seconds": time.perf_counter() - started,
        "rss_before_mb": before,
        "peak_rss_mb": _peak_rss_mb(),
    }


def child_fresh_job(spec: dict[str, Any]) -> dict[str, Any]:
    """One audit of ``root/request.json`` as the service runs a job, and the bare passes it
    is measured against. This process does what ``vitaudit worker`` does before it takes
    jobs (one thread, `service.cli.warm_worker`), then forks a work-horse that raises the
    thread count (as `workers.tasks` does) and times the audit (seconds and stage timings
    come back through a pipe). Once the horse has ended, this process times the bare
    forward + backward: one warm-up pass over every image, then two timed (``bare_s``), warm
    as a training loop's would be."""
    import torch

    from service.cli import warm_worker

    torch.set_num_threads(1)
    warm_worker()
    root = Path(spec["root"])
    request = json.loads((root / "request.json").read_text())
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the work-horse
        code = 1
        try:
            os.close(read)
            torch.set_num_threads(max(1, os.cpu_count() or 1))
            seconds, timings = _timed_audit(request, root)
            os.write(write, json.dumps({"seconds": seconds, "timings": timings}).encode())
            code = 0
        finally:
            os._exit(code)
    os.close(write)
    with os.fdopen(read, "rb") as pipe:
        answer = pipe.read()
    _, status = os.waitpid(pid, 0)
    if status != 0:
        raise RuntimeError(f"the work-horse ended with status {status}")
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    model, images = staged_model_and_images(request, root)
    batch_size = request["options"]["batch_size"]
    bare_forward_backward_s(model, images, batch_size)  # warm-up
    bare = [bare_forward_backward_s(model, images, batch_size) for _ in range(2)]
    return {**json.loads(answer), "bare_s": bare}


def child_heads(spec: dict[str, Any]) -> dict[str, Any]:
    """Head statistics over generated images, ours or the naive baseline; time and peak RSS."""
    import timm
    import torch

    from workers.analysis.probes import normalize_for_model

    torch.manual_seed(SEED)
    model = timm.create_model(spec["arch"], pretrained=False).eval()
    size = (224, 224)

    def batches():
        for batch in augmented_natural_batches(spec["num_images"], spec["batch_size"], size):
            yield normalize_for_model(batch, model)

    next(iter(batches()))  # build the probe cache outside the timed part
    before = _current_rss_mb()
    started = time.perf_counter()
    if spec["method"] == "naive":
        from bench.naive import naive_head_statistics

        naive_head_statistics(model, batches())
        split = {}
    else:
        from workers.analysis.heads import head_statistics, section_from_statistics

        stats = head_statistics(model, batches(), batch_size=spec["batch_size"])
        reduced = time.perf_counter()
        section_from_statistics(stats)
        split = {"statistics_s": reduced - started, "section_s": time.perf_counter() - reduced}
    seconds = time.perf_counter() - started
    return {"seconds": seconds, **split, "rss_before_mb": before, "peak_rss_mb": _peak_rss_mb()}


def _reset_peak_rss() -> None:
    """Start VmHWM again from the current RSS (Linux: ``5`` into ``/proc/self/clear_refs``)."""
    Path("/proc/self/clear_refs").write_text("5")


def child_big_heads(spec: dict[str, Any]) -> dict[str, Any]:
    """The heads section of a big ViT: the peak RSS it adds over the model plus one bare
    forward of one batch, and the size of its artifacts."""
    import timm
    import torch

    from workers.analysis.grid import grid_from_model
    from workers.analysis.heads import head_section
    from workers.analysis.probes import natural_set, normalize_for_model, texture_v1

    torch.manual_seed(SEED)
    side = spec["img_size"]
    model = timm.create_model(spec["arch"], pretrained=False, img_size=side).eval()
    grid = grid_from_model(model)
    images = normalize_for_model(natural_set((side, side), spec["num_images"]).images, model)
    textures = texture_v1((side, side), grid, count=spec["texture_images"], seed=SEED)
    texture_images = normalize_for_model(textures.images, model)
    with torch.no_grad():
        model(images[: spec["batch_size"]])
    floor = _peak_rss_mb()  # the model, the images and one forward of one batch
    _reset_peak_rss()
    started = time.perf_counter()
    result = head_section(
        model,
        images,
        texture_images=texture_images,
        texture_masks=textures.texture_fraction,
        batch_size=spec["batch_size"],
    )
    peak = _peak_rss_mb()
    artifact_bytes = sum(a.nbytes for a in result.arrays.values()) + sum(
        len(f) for f in result.figures.values()
    )
    return {
        "seconds": time.perf_counter() - started,
        "model_and_batch_peak_mb": floor,
        "heads_peak_rss_mb": peak,
        "heads_added_mb": peak - floor,
        "artifacts_mb": artifact_bytes / 1024**2,
        "mean_map_shape": list(result.arrays["attention_mean_maps"].shape),
        "tokens": grid.num_patches + int(model.num_prefix_tokens),
    }


def big_model_heads() -> dict[str, Any]:
    run = run_child("big_heads", BIG_MODEL)
    return {
        **BIG_MODEL,
        **{k: (round(v, 1) if isinstance(v, float) else v) for k, v in run.items()},
        "note": "random weights; heads_added_mb = peak RSS during head_section minus the peak "
        "after loading the model and one bare forward of one batch (VmHWM reset in between)",
    }


def run_child(kind: str, spec: dict[str, Any]) -> dict[str, Any]:
    command = [sys.executable, str(Path(__file__).resolve()), "--child", kind, json.dumps(spec)]
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO))
    done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=REPO, timeout=3600)
    if done.returncode != 0:
        raise RuntimeError(f"child {kind} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def memory_scaling(counts: list[int], batch_size: int, work: Path) -> dict[str, Any]:
    arch = "vit_tiny_patch16_224"
    runs = {}
    for count in counts:
        request, root = stage_audit(work / f"memory-{count}", arch, count, batch_size)
        (root / "request.json").write_text(json.dumps(request))
        runs[count] = run_child("audit", {"root": str(root)})
    few, many = counts
    return {
        "arch": arch,
        "images": counts,
        "batch_size": batch_size,
        "runs": {str(k): {key: round(v, 1) for key, v in r.items()} for k, r in runs.items()},
        "ratio": round(runs[many]["peak_rss_mb"] / runs[few]["peak_rss_mb"], 3),
    }


def naive_comparison(num_images: int, batch_size: int) -> dict[str, Any]:
    spec = {"arch": "vit_tiny_patch16_224", "num_images": num_images, "batch_size": batch_size}
    ours = run_child("heads", {**spec, "method": "ours"})
    naive = run_child("heads", {**spec, "method": "naive"})
    return {
        **spec,
        "ours": {k: round(v, 2) for k, v in ours.items()},
        "naive": {k: round(v, 2) for k, v in naive.items()},
        "memory_ratio": round(naive["peak_rss_mb"] / ours["peak_rss_mb"], 3),
        "time_ratio": round(naive["seconds"] / ours["seconds"], 3),
        "time_ratio_statistics_only": round(naive["seconds"] / ours["statistics_s"], 3),
        "note": "ours = head_statistics + section_from_statistics (= head_section: labels, "
        "summaries, plots) without texture probes; naive = hooks on attn_drop storing every map "
        "(explicit attention), then the same statistics. Peak RSS includes the torch import.",
    }


# --- GPU --------------------------------------------------------------------------------


def _synced_seconds(run) -> float:
    """Wall seconds of ``run()`` with the CUDA queue drained before and after."""
    import torch

    torch.cuda.synchronize()
    started = time.perf_counter()
    run()
    torch.cuda.synchronize()
    return time.perf_counter() - started


def _bare_seconds_cuda(request: dict[str, Any], root: Path, batch: int, device) -> dict[str, float]:
    """Seconds of a bare forward + backward over the request's images on ``device``, per
    precision of `GPU` (after one warm-up batch each)."""
    from workers.analysis.precision import forward_precision

    model, images = staged_model_and_images(request, root)
    model, images = model.to(device), images.to(device)
    seconds = {}
    for precision in GPU["precisions"]:
        with forward_precision(model, precision, device):
            bare_forward_backward_s(model, images[:batch], batch)  # warm-up (kernels, cuDNN)
            seconds[precision] = _synced_seconds(
                lambda: bare_forward_backward_s(model, images, batch)
            )
    return seconds


def gpu_benchmark(work: Path) -> dict[str, Any]:
    """On one CUDA device, `GPU`'s architecture (random weights) over its uploaded images:
    images/s of a full audit (`audit_checkpoint`: load, images, position embedding, heads,
    gradients, figures) and of its analysis stages alone, beside images/s of a bare forward +
    backward (the floor), each in every precision of `GPU`."""
    import torch

    from workers.pipeline import audit_checkpoint

    device = torch.device("cuda")
    arch, count, batch = GPU["arch"], GPU["num_images"], GPU["batch_size"]
    request, root = stage_audit(work / "gpu", arch, count, batch)
    bare = _bare_seconds_cuda(request, root, batch, device)
    torch.cuda.empty_cache()  # the audits load their own model: the peak below is theirs
    runs: dict[str, Any] = {}
    for precision in GPU["precisions"]:
        request["options"]["precision"] = precision
        torch.cuda.reset_peak_memory_stats(device)
        started = time.perf_counter()
        report = audit_checkpoint(
            request, request["checkpoint"], root, progress=lambda stage, fraction: None
        ).report
        torch.cuda.synchronize()
        audit_s = time.perf_counter() - started
        analyses = sum(
            report["timings"].get(k, 0.0) for k in ("position_embedding", "heads", "gradients")
        )
        runs[precision] = {
            "bare_forward_backward_images_per_s": round(count / bare[precision], 1),
            "audit_images_per_s": round(count / audit_s, 1),
            "analyses_images_per_s": round(count / analyses, 1),
            "audit_over_bare": round(audit_s / bare[precision], 3),
            "batch_size_used": report["settings"].get("batch_size_used"),
            "peak_cuda_allocated_mb": round(torch.cuda.max_memory_allocated(device) / 2**20, 1),
            "timings": {k: round(v, 3) for k, v in report["timings"].items()},
        }
    properties = torch.cuda.get_device_properties(device)
    return {
        "device": torch.cuda.get_device_name(device),
        "memory_gib": round(properties.total_memory / 2**30, 1),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        **GPU,
        "runs": runs,
        "measured_at": datetime.now(UTC).isoformat(),
    }


# --- service ------------------------------------------------------------------------------


def _tiny_checkpoint(path: Path) -> Path:
    from workers.analysis.loading import write_state_dict
    from workers.tiny_model import tiny_vit

    return write_state_dict(tiny_vit(seed=SEED).state_dict(), path)


def _submit(client, checkpoint: Path, seed: int) -> str:
    from workers.tiny_model import TINY_ARCH, TINY_OPTIONS

    options = {**TINY_OPTIONS, "seed": seed}
    with checkpoint.open("rb") as handle:
        response = client.post(
            "/v1/audits",
            data={"arch": TINY_ARCH, "options": json.dumps(options), "cache": "false"},
            files={"checkpoint": (checkpoint.name, handle)},
        )
    response.raise_for_status()
    return response.json()["id"]


def _wait(
    client, audit_id: str, done, timeout: float = 120, interval: float = 0.1
) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        state = client.get(f"/v1/audits/{audit_id}").json()
        if done(state):
            return state
        if time.monotonic() > deadline:
            raise RuntimeError(f"audit {audit_id} did not get there in {timeout} s: {state}")
        time.sleep(interval)


def _epoch(iso: str) -> float:
    moment = datetime.fromisoformat(iso)
    return (moment if moment.tzinfo else moment.replace(tzinfo=UTC)).timestamp()


def submit_to_start(client, checkpoint: Path, count: int) -> dict[str, Any]:
    """Warm the worker with one audit, then time POST -> started_at for ``count`` audits, each
    sent when the worker is idle."""
    first = _submit(client, checkpoint, seed=1000)
    _wait(client, first, lambda s: s["status"] in ("finished", "failed"))
    delays = []
    for index in range(count):
        sent = time.time()
        audit_id = _submit(client, checkpoint, seed=1001 + index)
        state = _wait(
            client,
            audit_id,
            lambda s: s["started_at"] is not None or s["status"] == "failed",
            interval=0.01,
        )
        if state["started_at"] is None:
            raise RuntimeError(f"audit {audit_id} failed before it started: {state}")
        delays.append(_epoch(state["started_at"]) - sent)
        _wait(client, audit_id, lambda s: s["status"] in ("finished", "failed"))
    return {
        "samples_s": [round(d, 4) for d in delays],
        "median_s": round(statistics.median(delays), 4),
        "last_id": audit_id,
    }


WRK_DURATION_S = 8
WRK_LATENCY = re.compile(r"^\s*(50|99)(?:\.0+)?%\s+([\d.]+)(us|ms|s)\s*$")
WRK_UNITS_MS = {"us": 0.001, "ms": 1.0, "s": 1000.0}


def poll_load_wrk(url: str, audit_id: str, concurrency: int) -> dict[str, Any] | None:
    """Polls per second and latency percentiles from ``wrk`` (one thread, ``concurrency``
    connections, WRK_DURATION_S seconds); None when wrk is not installed.

    wrk is a C load generator: it takes a fraction of the CPU that a Python client needs per
    request, so on a 2-core machine it measures the API rather than the generator.
    """
    import shutil
    import subprocess

    wrk = shutil.which("wrk")
    if wrk is None:
        return None
    command = [
        wrk,
        "-t1",
        f"-c{concurrency}",
        f"-d{WRK_DURATION_S}s",
        "--latency",
        f"{url}/v1/audits/{audit_id}",
    ]
    out = subprocess.run(
        command, capture_output=True, text=True, timeout=WRK_DURATION_S + 30, check=True
    ).stdout
    percentiles = {}
    for line in out.splitlines():
        match = WRK_LATENCY.match(line)
        if match:
            percentiles[match.group(1)] = round(
                float(match.group(2)) * WRK_UNITS_MS[match.group(3)], 2
            )
    total = re.search(r"(\d+) requests in", out)
    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    rate = re.search(r"Requests/sec:\s+([\d.]+)", out)
    return {
        "generator": "wrk -t1",
        "polls": int(total.group(1)) if total else 0,
        "errors": int(non_2xx.group(1)) if non_2xx else 0,
        "concurrency": concurrency,
        "wall_s": WRK_DURATION_S,
        "polls_per_second": float(rate.group(1)) if rate else float("nan"),
        "p50_ms": percentiles.get("50", float("nan")),
        "p99_ms": percentiles.get("99", float("nan")),
    }


def poll_load(
    url: str, audit_id: str, total: int, concurrency: int, time_limit_s: float
) -> dict[str, Any]:
    """GET the audit's status ``total`` times from ``concurrency`` asyncio tasks (or until
    ``time_limit_s``); polls per second and latency percentiles of the successful ones.

    The fallback when wrk is missing: the Python client competes with the API for the same
    cores, so it understates what the API serves."""
    import asyncio

    import httpx

    latencies: list[float] = []
    errors = {"count": 0}

    async def main() -> float:
        remaining = {"n": total}
        deadline = time.perf_counter() + time_limit_s
        limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
        async with httpx.AsyncClient(base_url=url, limits=limits, timeout=10) as client:

            async def runner() -> None:
                while remaining["n"] > 0 and time.perf_counter() < deadline:
                    remaining["n"] -= 1
                    started = time.perf_counter()
                    response = await client.get(f"/v1/audits/{audit_id}")
                    if response.status_code == 200:
                        latencies.append(time.perf_counter() - started)
                    else:
                        errors["count"] += 1

            started = time.perf_counter()
            await asyncio.gather(*(runner() for _ in range(concurrency)))
            return time.perf_counter() - started

    wall = asyncio.run(main())
    ordered = sorted(latencies)

    def pct(q: float) -> float:
        return (
            round(1000 * ordered[min(len(ordered) - 1, int(q * len(ordered)))], 2)
            if ordered
            else float("nan")
        )

    return {
        "generator": "httpx asyncio",
        "polls": len(latencies),
        "errors": errors["count"],
        "concurrency": concurrency,
        "wall_s": round(wall, 3),
        "polls_per_second": round(len(latencies) / wall, 1),
        "p50_ms": pct(0.50),
        "p99_ms": pct(0.99),
    }


def upload_growth(url: str, api_pid: int, num_bytes: int) -> dict[str, Any]:
    """Stream a ``num_bytes`` checkpoint (a valid safetensors header, then zero bytes) from a
    generator; sample the API process's VmRSS every 20 ms while it receives it."""
    import httpx

    boundary = uuid.uuid4().hex
    header = json.dumps(
        {"junk": {"dtype": "U8", "shape": [num_bytes], "data_offsets": [0, num_bytes]}}
    ).encode()
    header += b" " * (-len(header) % 8)
    options = json.dumps({"analyses": ["position_embedding"], "num_images": 1, "batch_size": 1})
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="arch"\r\n\r\nvit_tiny_patch16_224\r\n'
        f'--{boundary}\r\nContent-Disposition: form-data; name="options"\r\n\r\n{options}\r\n'
        f'--{boundary}\r\nContent-Disposition: form-data; name="cache"\r\n\r\nfalse\r\n'
        f'--{boundary}\r\nContent-Disposition: form-data; name="checkpoint"; filename="big.safetensors"\r\n'
        "Content-Type: application/octet-stream\r\n\r\n"
    ).encode()
    tail = f"\r\n--{boundary}--\r\n".encode()
    prefix = len(header).to_bytes(8, "little") + header
    chunk = bytes(1024 * 1024)

    def body() -> Iterator[bytes]:
        yield head + prefix
        left = num_bytes
        while left > 0:
            piece = chunk[: min(left, len(chunk))]
            left -= len(piece)
            yield piece
        yield tail

    length = len(head) + len(prefix) + num_bytes + len(tail)
    before = _proc_status_mb(api_pid, "VmRSS")
    hwm_before = _proc_status_mb(api_pid, "VmHWM")
    samples: list[float] = []
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            samples.append(_proc_status_mb(api_pid, "VmRSS"))
            stop.wait(0.02)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    started = time.perf_counter()
    try:
        response = httpx.post(
            f"{url}/v1/audits",
            content=body(),
            headers={
                "content-type": f"multipart/form-data; boundary={boundary}",
                "content-length": str(length),
            },
            timeout=600,
        )
    finally:
        stop.set()
        sampler.join()
    seconds = time.perf_counter() - started
    peak = max(samples + [_proc_status_mb(api_pid, "VmRSS")])
    return {
        "bytes": num_bytes,
        "status_code": response.status_code,
        "audit_id": response.json().get("id") if response.status_code < 300 else None,
        "seconds": round(seconds, 2),
        "mb_per_second": round(num_bytes / 1024**2 / seconds, 1),
        "rss_before_mb": round(before, 1),
        "rss_peak_mb": round(peak, 1),
        "vmhwm_before_mb": round(hwm_before, 1),
        "vmhwm_after_mb": round(_proc_status_mb(api_pid, "VmHWM"), 1),
        "growth_mb": round(peak - before, 1),
        "samples": len(samples),
    }


def service_benchmarks(sizes: dict[str, Any], work: Path) -> dict[str, Any]:
    import httpx

    from service.stack import LocalStack, free_port

    data_dir = work / "service-data"
    env = {
        "REDIS_URL": os.environ.get("VITAUDIT_BENCH_REDIS_URL", "redis://127.0.0.1:6379/0"),
        "VITAUDIT_DATA_DIR": str(data_dir),
        "VITAUDIT_QUEUE": f"bench-{uuid.uuid4().hex[:12]}",
        "HF_HUB_OFFLINE": "1",
        "PYTHONUNBUFFERED": "1",
    }
    stack = LocalStack("127.0.0.1", free_port(), env=env, log_dir=data_dir / "logs")
    try:
        stack.start()
        upload = upload_growth(stack.url, stack.api.pid, sizes["upload_bytes"])
        with httpx.Client(base_url=stack.url, timeout=60) as client:
            if upload["audit_id"]:  # the zero-filled checkpoint fails to load: let it end first
                _wait(client, upload["audit_id"], lambda s: s["status"] in ("finished", "failed"))
            checkpoint = _tiny_checkpoint(work / "tiny.safetensors")
            start = submit_to_start(client, checkpoint, sizes["submits"])
        polls = poll_load_wrk(stack.url, start["last_id"], sizes["poll_concurrency"]) or poll_load(
            stack.url,
            start["last_id"],
            sizes["polls"],
            sizes["poll_concurrency"],
            sizes["poll_time_limit_s"],
        )
        more = [
            poll_load_wrk(stack.url, start["last_id"], c) for c in sizes["poll_concurrency_more"]
        ]
        polls["more_concurrency"] = [m for m in more if m is not None]
    finally:
        stack.stop()
    return {"upload": upload, "submit_to_start": start, "polls": polls}


# --- driver -------------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if "model name" in line
        ),
        platform.processor(),
    )
    mem_kb = next(
        int(x.split()[1])
        for x in Path("/proc/meminfo").read_text().splitlines()
        if x.startswith("MemTotal")
    )
    return {
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "ram_gib": round(mem_kb / 1024**2, 1),
        "python": platform.python_version(),
    }


def verdict(name: str, value: float) -> str:
    op, target = TARGETS[name]
    ok = {"<=": value <= target, ">=": value >= target, "<": value < target}[op]
    return f"{'met' if ok else 'MISSED'} ({op} {target:g})"


def run_all(quick: bool) -> dict[str, Any]:
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    sizes = QUICK if quick else FULL
    results: dict[str, Any] = {
        "mode": "quick" if quick else "full",
        "sizes": sizes,
        "machine": machine(),
        "started_at": datetime.now(UTC).isoformat(),
        "device": "cpu",
        "gpu": "not measured: "
        + ("no CUDA device" if not torch.cuda.is_available() else "run bench/run.py --gpu"),
    }
    with tempfile.TemporaryDirectory(prefix="vitaudit-bench-") as tmp:
        work = Path(tmp)
        batch = sizes["batch_size"]
        results.update(audit_cost_keys(sizes, work))
        results["memory"] = memory_scaling(sizes["memory_images"], batch, work)
        results["memory_ratio_512_over_64"] = results["memory"]["ratio"]
        results["naive"] = naive_comparison(sizes["naive_images"], batch)
        results["naive_memory_ratio"] = results["naive"]["memory_ratio"]
        results["naive_time_ratio"] = results["naive"]["time_ratio"]
        results["service"] = service_benchmarks(sizes, work)
    results.update(_big_model_keys(big_model_heads()))
    service = results["service"]
    results["polls_per_second"] = service["polls"]["polls_per_second"]
    results["poll_p50_ms"] = service["polls"]["p50_ms"]
    results["poll_p99_ms"] = service["polls"]["p99_ms"]
    results["submit_to_start_s"] = service["submit_to_start"]["median_s"]
    results["upload_rss_growth_mb"] = service["upload"]["growth_mb"]
    results["verdicts"] = {name: verdict(name, float(results[name])) for name in TARGETS}
    results["finished_at"] = datetime.now(UTC).isoformat()
    return results


def _big_model_keys(big: dict[str, Any]) -> dict[str, Any]:
    return {
        "big_model": big,
        "big_model_heads_peak_mb": big["heads_added_mb"],
        "big_model_artifacts_mb": big["artifacts_mb"],
    }


def audit_cost_keys(sizes: dict[str, Any], work: Path) -> dict[str, Any]:
    """`audit_cost` and `fresh_job_cost` of every arch of ``sizes``, and the headline keys."""
    staged = {
        arch: stage_audit(work / f"cost-{arch}", arch, sizes["cost_images"], sizes["batch_size"])
        for arch in sizes["cost_archs"]
    }
    repeats = sizes["cost_repeats"]
    # the fresh jobs first, before this process runs a pass (see fresh_job_cost)
    fresh = {arch: fresh_job_cost(*staged[arch], repeats) for arch in staged}
    costs = {
        arch: {**audit_cost(*staged[arch], repeats), "fresh_job": fresh[arch]} for arch in staged
    }
    return {
        "audit_cost": costs,
        "audit_cost_ratio_per_arch": {a: r["ratio"] for a, r in costs.items()},
        "audit_cost_ratio": max(r["ratio"] for r in costs.values()),
        "audit_cost_ratio_every_section": max(r["every_section"]["ratio"] for r in costs.values()),
        "audit_cost_ratio_fresh_job": max(r["fresh_job"]["ratio"] for r in costs.values()),
    }


def merge_audit_cost(output: Path, quick: bool) -> dict[str, Any]:
    """Measure the audit-cost figures alone and merge them into ``output`` (if it exists)."""
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    results = json.loads(output.read_text()) if output.exists() else {}
    with tempfile.TemporaryDirectory(prefix="vitaudit-bench-cost-") as tmp:
        results.update(audit_cost_keys(QUICK if quick else FULL, Path(tmp)))
    results["audit_cost_machine"] = machine()
    results["audit_cost_measured_at"] = datetime.now(UTC).isoformat()
    results["verdicts"] = {
        **results.get("verdicts", {}),
        **{name: verdict(name, float(results[name])) for name in COST_KEYS},
    }
    return results


def cost_table(results: dict[str, Any]) -> str:
    """The audit-cost lines of `table`: the two headline ratios, then per arch."""
    lines = []
    for name in COST_KEYS:
        lines.append(f"{name:<32} {results[name]:>7}  {verdict(name, float(results[name]))}")
    lines.append(f"  per arch (default sections): {results['audit_cost_ratio_per_arch']}")
    for arch, cost in results["audit_cost"].items():
        for label, run in (
            ("default sections", cost),
            ("every section", cost["every_section"]),
            ("every section, fresh job", cost["fresh_job"]),
        ):
            shares = ", ".join(f"{k} {v:.0%}" for k, v in run["shares"].items())
            lines.append(
                f"  {arch}, {label}: ratio {run['ratio']} (median of {run['ratios']}), "
                f"audit {run['audit_s']} s (of {run['audits_s']}); {shares}"
            )
        lines.append(f"  {arch}: bare forward+backward {cost['bare_forward_backward_s']} s")
    return "\n".join(lines)


def merge_big_model(output: Path) -> dict[str, Any]:
    """Measure the big-model figures alone and merge them into ``output`` (if it exists)."""
    results = json.loads(output.read_text()) if output.exists() else {}
    results.update(_big_model_keys(big_model_heads()))
    results["verdicts"] = {
        **results.get("verdicts", {}),
        **{
            name: verdict(name, float(results[name]))
            for name in ("big_model_heads_peak_mb", "big_model_artifacts_mb")
        },
    }
    return results


def table(results: dict[str, Any]) -> str:
    sizes = results["sizes"]
    few, many = sizes["memory_images"]
    notes = {
        "audit_cost_ratio": f"worst of {results['audit_cost_ratio_per_arch']}, default sections, {sizes['cost_images']} images, batch {sizes['batch_size']}",
        "audit_cost_ratio_every_section": "worst arch, Q/K geometry on too",
        "audit_cost_ratio_fresh_job": "worst arch, every section, in a forked work-horse",
        "memory_ratio_512_over_64": f"{many} over {few} images, batch {sizes['batch_size']}",
        "naive_memory_ratio": f"{sizes['naive_images']} images, vit_tiny 224",
        "naive_time_ratio": f"{sizes['naive_images']} images, vit_tiny 224",
        "polls_per_second": f"{results['service']['polls']['polls']} polls, {sizes['poll_concurrency']} concurrent, {results['service']['polls']['generator']}",
        "poll_p99_ms": f"p50 {results['poll_p50_ms']} ms",
        "submit_to_start_s": f"median of {sizes['submits']}",
        "upload_rss_growth_mb": f"{sizes['upload_bytes'] // 1024**2} MiB checkpoint",
        "big_model_heads_peak_mb": f"{BIG_MODEL['arch']} {BIG_MODEL['img_size']} px, added",
        "big_model_artifacts_mb": "heads arrays + figures of that audit",
    }
    lines = [f"{'figure':<26} {'value':>10}  {'verdict':<20} measured on", "-" * 96]
    for name in TARGETS:
        lines.append(
            f"{name:<26} {results[name]:>10}  {results['verdicts'][name]:<20} {notes[name]}"
        )
    lines += cost_table(results).splitlines()[len(COST_KEYS) :]
    for more in results["service"]["polls"].get("more_concurrency", []):
        lines.append(
            f"  polls at {more['concurrency']} concurrent: {more['polls_per_second']}/s "
            f"[{verdict('polls_per_second', more['polls_per_second'])}], p50 {more['p50_ms']} ms, "
            f"p99 {more['p99_ms']} ms [{verdict('poll_p99_ms', more['p99_ms'])}]"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick", action="store_true", help="reduced sizes (a few minutes on 2 cores)"
    )
    parser.add_argument("--child", nargs=2, metavar=("KIND", "SPEC"), help=argparse.SUPPRESS)
    parser.add_argument("--output", type=Path, default=RESULTS)
    parser.add_argument(
        "--gpu",
        action="store_true",
        help="only the GPU figures (one CUDA device), merged into --output as `gpu`",
    )
    parser.add_argument(
        "--cost",
        action="store_true",
        help="only the audit-cost figures (with --quick: reduced sizes), merged into --output",
    )
    parser.add_argument(
        "--big-model",
        action="store_true",
        help="only the big-model heads memory figures, merged into --output",
    )
    args = parser.parse_args(argv)
    if args.child:
        import torch

        torch.set_num_threads(os.cpu_count() or 1)
        kind, spec = args.child
        children = {
            "audit": child_audit,
            "fresh_job": child_fresh_job,
            "heads": child_heads,
            "big_heads": child_big_heads,
        }
        print(json.dumps(children[kind](json.loads(spec))))
        return 0
    if args.gpu:
        import torch

        if not torch.cuda.is_available():
            print(NO_CUDA, file=sys.stderr)
            return 2
        results = json.loads(args.output.read_text()) if args.output.exists() else {}
        with tempfile.TemporaryDirectory(prefix="vitaudit-bench-gpu-") as tmp:
            results["gpu"] = gpu_benchmark(Path(tmp))
        args.output.write_text(json.dumps(results, indent=2) + "\n")
        print(json.dumps(results["gpu"], indent=2))
        print(f"\nwrote {args.output}")
        return 0
    if args.cost:
        results = merge_audit_cost(args.output, args.quick)
        args.output.write_text(json.dumps(results, indent=2) + "\n")
        print(cost_table(results))
        print(f"\nwrote {args.output}")
        return 0
    if args.big_model:
        results = merge_big_model(args.output)
        args.output.write_text(json.dumps(results, indent=2) + "\n")
        print(json.dumps(results["big_model"], indent=2))
        print(f"\nwrote {args.output}")
        return 0
    results = run_all(args.quick)
    args.output.write_text(json.dumps(results, indent=2) + "\n")
    print(table(results))
    print(f"\nwrote {args.output}")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.path.insert(0, str(REPO))
    raise SystemExit(main())
