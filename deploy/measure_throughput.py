"""Single-worker throughput, the number deploy/SCALING.md sizes the worker pool from.

Starts the real stack (API + ONE worker, `service.stack.LocalStack`) on the Redis at
REDIS_URL, on its own queue and data directory, waits until the worker has registered,
submits COUNT audits of one randomly initialised checkpoint at once over HTTP (a distinct
seed each), and waits for all of them.

    audits/minute = COUNT / (last job's end, RQ's ended_at - first submit) * 60

Random weights are fine for timing: an audit's cost depends on the architecture and the
options, not on the values of the weights.

    .venv/bin/python deploy/measure_throughput.py --model tiny --count 6
    .venv/bin/python deploy/measure_throughput.py --model vit_small_patch16_224 --count 2
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def save_random_checkpoint(arch: str, model_args: dict, path: Path) -> Path:
    import timm
    import torch

    from workers.analysis.loading import write_state_dict

    torch.manual_seed(0)
    model = timm.create_model(arch, pretrained=False, **model_args)
    return write_state_dict(model.state_dict(), path)


def wait_for_a_worker(redis_url: str, queue_name: str, timeout: float = 120) -> None:
    """Until the worker has registered: its start-up (imports) is not part of the throughput."""
    from redis import Redis
    from rq import Queue, Worker

    queue = Queue(queue_name, connection=Redis.from_url(redis_url))
    deadline = time.monotonic() + timeout
    while not Worker.all(queue=queue):
        if time.monotonic() > deadline:
            raise SystemExit(f"no worker registered on queue {queue_name} within {timeout:.0f} s")
        time.sleep(0.2)


def measure(arch: str, model_args: dict, options: dict, count: int, port: int) -> dict:
    """Run COUNT audits through one worker; return the figures as plain data."""
    from service.stack import LocalStack, redis_answers
    from service.client import AuditClient
    from service.settings import Settings

    redis_url = Settings.from_env().redis_url
    if not redis_answers(redis_url):
        raise SystemExit(f"no Redis answers at {redis_url}: start one or set REDIS_URL")
    work = Path(tempfile.mkdtemp(prefix="vitaudit-throughput-"))
    checkpoint = save_random_checkpoint(arch, model_args, work / "model.safetensors")
    os.environ["VITAUDIT_DATA_DIR"] = str(work / "data")
    os.environ["VITAUDIT_QUEUE"] = f"throughput-{uuid.uuid4().hex[:8]}"
    request_options = {**options, "model_args": model_args} if model_args else options
    with LocalStack("127.0.0.1", port) as stack:
        wait_for_a_worker(redis_url, os.environ["VITAUDIT_QUEUE"])
        client = AuditClient(stack.url)
        submitted_at = datetime.now(UTC)
        # A distinct seed per audit: the API answers an identical request from its cache.
        ids = [
            client.submit(checkpoint, arch, options={**request_options, "seed": i})["id"]
            for i in range(count)
        ]
        if len(set(ids)) != count:
            raise SystemExit(f"the API answered {count} submissions with {len(set(ids))} audits")
        states = [client.wait(audit_id, timeout=3600) for audit_id in ids]
        client.close()
    failed = [s for s in states if s["status"] != "finished"]
    if failed:
        raise SystemExit(f"{len(failed)} audits failed: {failed[0].get('error')}")
    # RQ's own end times, not the client's polling, so the poll interval does not count.
    last_end = max(datetime.fromisoformat(s["ended_at"]).replace(tzinfo=UTC) for s in states)
    wall_s = (last_end - submitted_at).total_seconds()
    job_s = [float(s["timings"].get("total", 0.0)) for s in states]
    return {
        "arch": arch,
        "model_args": model_args,
        "options": options or "defaults",
        "count": count,
        "wall_s": round(wall_s, 2),
        "audits_per_minute": round(count / wall_s * 60, 2),
        "mean_pipeline_s": round(sum(job_s) / len(job_s), 2),
        "jobs": [{"started_at": s["started_at"], "ended_at": s["ended_at"]} for s in states],
        "submitted_at": submitted_at.isoformat(),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.platform()}",
        "python": sys.version.split()[0],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--model", default="tiny", help="'tiny' or a timm ViT name (default options)"
    )
    parser.add_argument("--count", type=int, default=4, help="audits submitted at once")
    parser.add_argument("--port", type=int, default=8791)
    args = parser.parse_args(argv)
    if args.model == "tiny":
        from workers.tiny_model import TINY_ARCH, TINY_ARGS

        arch, model_args = TINY_ARCH, dict(TINY_ARGS)
        options = {"num_images": 2, "batch_size": 2, "analyses": ["position_embedding", "heads"]}
    else:
        arch, model_args, options = args.model, {}, {}
    print(json.dumps(measure(arch, model_args, options, args.count, args.port), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
