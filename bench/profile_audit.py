"""Where an audit's time goes: torch.profiler over one full audit, by named range.

    .venv/bin/python bench/profile_audit.py                      # vit_small, 64 images
    .venv/bin/python bench/profile_audit.py --arch vit_tiny_patch16_224 --images 32

Stages an audit as the service writes it (`bench.run.stage_audit`: a seeded random-weight
checkpoint and uploaded PNGs), times a bare forward + backward over the same images
(`bench.run.bare_forward_backward_s`), then runs `workers.pipeline.audit_checkpoint` once
without the profiler (the wall times) and once under ``torch.profiler`` (CPU), and prints:

- each ``record_function`` range the audit opens (``section.<name>`` per section; inside
  the gradient pass ``gradients.forward``, ``gradients.backward`` (autograd, with the
  per-layer statistics computed in its hooks: ``gradients.rebuild_G``,
  ``gradients.layer_stats`` = ``formula_sums`` + ``pressure_sums`` + ``angle_sums``),
  ``gradients.heads_reduce``, ``gradients.per_image_sums``, ``gradients.sgd_step_check`` =
  ``sgd.second_forward`` + ``sgd.forward_mode``,
  ``gradients.assemble``) with its total CPU time, count, and its share of the profiled
  audit;
- the aten operators with the most self CPU time inside the audit.

Times under the profiler are inflated by its own bookkeeping (a few microseconds per op);
the shares are what to read. Writes ``bench/profile-<arch>.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent


def profile_audit(arch: str, num_images: int, batch_size: int, work: Path) -> dict[str, Any]:
    import torch
    from torch.profiler import ProfilerActivity, profile

    from bench.run import bare_forward_backward_s, stage_audit, staged_model_and_images
    from service.cli import warm_worker
    from workers.pipeline import audit_checkpoint

    warm_worker()
    request, root = stage_audit(work, arch, num_images, batch_size)
    model, images = staged_model_and_images(request, root)
    bare_forward_backward_s(model, images[:2], batch_size)  # warm-up
    bare = bare_forward_backward_s(model, images, batch_size)

    def audit() -> dict[str, Any]:
        quiet = lambda stage, fraction: None  # noqa: E731
        return audit_checkpoint(request, request["checkpoint"], root, progress=quiet).report

    started = time.perf_counter()
    timings = audit()["timings"]
    wall = time.perf_counter() - started
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        started = time.perf_counter()
        audit()
        profiled_wall = time.perf_counter() - started
    events = prof.key_averages()
    ranges = sorted(
        (e for e in events if e.key.startswith(("section.", "gradients.", "sgd."))),
        key=lambda e: -e.cpu_time_total,
    )
    operators = sorted(
        (e for e in events if e.key.startswith("aten::")), key=lambda e: -e.self_cpu_time_total
    )[:20]
    total_us = profiled_wall * 1e6
    return {
        "arch": arch,
        "num_images": num_images,
        "batch_size": batch_size,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "bare_forward_backward_s": round(bare, 3),
        "audit_s": round(wall, 3),
        "audit_over_bare": round(wall / bare, 3),
        "timings": {k: round(v, 3) for k, v in timings.items()},
        "profiled_audit_s": round(profiled_wall, 3),
        "ranges": [_row(e, "cpu_total_s", e.cpu_time_total, total_us) for e in ranges],
        "operators": [_row(e, "self_cpu_s", e.self_cpu_time_total, total_us) for e in operators],
    }


def _row(event: Any, key: str, micros: float, total_us: float) -> dict[str, Any]:
    """One profiler event: its name, calls, ``key`` seconds and share of the audit."""
    return {
        "name": event.key,
        "count": event.count,
        key: round(micros / 1e6, 3),
        "share_of_audit": round(micros / total_us, 4),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="vit_small_patch16_224")
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--output", type=Path)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="vitaudit-profile-") as tmp:
        result = profile_audit(args.arch, args.images, args.batch_size, Path(tmp))
    output = args.output or Path(__file__).with_name(f"profile-{args.arch}.json")
    output.write_text(json.dumps(result, indent=2) + "\n")
    print(
        f"{result['arch']}, {result['num_images']} images, batch {result['batch_size']}: "
        f"audit {result['audit_s']} s, bare forward+backward {result['bare_forward_backward_s']}"
        f" s ({result['audit_over_bare']}x); stages {result['timings']}"
    )
    print(f"\nunder the profiler: {result['profiled_audit_s']} s")
    for row in result["ranges"]:
        print(
            f"  {row['name']:<32} {row['cpu_total_s']:>8} s  {row['share_of_audit']:>7.1%}  x{row['count']}"
        )
    print("\naten operators by self CPU time:")
    for row in result["operators"]:
        print(
            f"  {row['name']:<32} {row['self_cpu_s']:>8} s  {row['share_of_audit']:>7.1%}  x{row['count']}"
        )
    print(f"\nwrote {output}")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.path.insert(0, str(REPO))
    raise SystemExit(main())
