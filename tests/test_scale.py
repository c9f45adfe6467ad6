"""Scale-out on one machine: N worker processes on one Redis, M audits submitted at once.

Every audit must finish exactly once (one RQ result per job, every id in the finished
registry, none failed, one report each), whatever N is. Throughput is measured for N=1 and
N=2 and printed; on a shared 2-core box the test only checks a generous sanity bound, speed
targets belong in bench/. Also: a worker asked to stop (SIGTERM) finishes the audit it runs
(RQ's warm shutdown), and the worker health check finds a running worker.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from redis import Redis
from rq import Queue, Worker
from rq.job import Job
from rq.registry import FailedJobRegistry, FinishedJobRegistry
from rq.serializers import JSONSerializer

from tests.conftest import Stack, poll_until, stack_env, start_stack, stop_stack
from tests.planted.models import TINY_ARCH, TINY_ARGS, save_safetensors, tiny_vit

pytestmark = [pytest.mark.slow, pytest.mark.e2e]

ROOT = Path(__file__).resolve().parents[1]
AUDITS = 6  # M: submitted at once
OPTIONS = {
    "num_images": 2,
    "batch_size": 2,
    "model_args": TINY_ARGS,
    "analyses": ["position_embedding", "heads"],
}
# Two workers on two shared cores may gain little; they must not collapse (a lock, a worker
# that never takes a job). Half the single-worker rate is far below any healthy outcome.
SANITY_SPEEDUP_FLOOR = 0.5
AUDIT_TIMEOUT_S = 240


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_safetensors(tiny_vit(), tmp_path_factory.mktemp("scale-ckpt") / "tiny.safetensors")


def queue_of(stack: Stack) -> Queue:
    connection = Redis.from_url(stack.env["REDIS_URL"])
    return Queue(stack.env["VITAUDIT_QUEUE"], connection=connection, serializer=JSONSerializer)


def wait_for_workers(stack: Stack, count: int) -> None:
    queue = queue_of(stack)
    poll_until(
        lambda: len(Worker.all(queue=queue)) == count,
        timeout=60,
        what=f"{count} workers to register",
    )


def start(redis_url: str, tmp_path_factory: pytest.TempPathFactory, workers: int) -> Stack:
    data_dir = tmp_path_factory.mktemp(f"scale-{workers}w")
    stack = start_stack(
        stack_env(redis_url, data_dir), data_dir, data_dir / "logs", workers=workers
    )
    try:
        wait_for_workers(stack, workers)
    except BaseException:
        stop_stack(stack)
        raise
    return stack


def submit(stack: Stack, checkpoint: Path, seed: int) -> str:
    # A distinct seed per audit: the API answers an identical request from its cache.
    data = {"arch": TINY_ARCH, "options": json.dumps({**OPTIONS, "seed": seed})}
    with stack.client() as http, checkpoint.open("rb") as handle:
        response = http.post(
            "/v1/audits", data=data, files={"checkpoint": (checkpoint.name, handle)}
        )
    assert response.status_code == 202, response.text
    return response.json()["id"]


@pytest.fixture(scope="module")
def single_worker_stack(
    redis_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    stack = start(redis_url, tmp_path_factory, workers=1)
    try:
        yield stack
    finally:
        stop_stack(stack)


def run_batch(stack: Stack, checkpoint: Path, workers: int) -> dict:
    """Submit AUDITS audits at once, wait for all; check each ran exactly once; return figures."""
    salt = uuid.uuid4().int % 1_000_000 * 100
    submitted_at = datetime.now(UTC)
    ids = [submit(stack, checkpoint, salt + i) for i in range(AUDITS)]
    assert len(set(ids)) == AUDITS
    states = [stack.wait_for_audit(audit_id, timeout=AUDIT_TIMEOUT_S) for audit_id in ids]
    assert [s["status"] for s in states] == ["finished"] * AUDITS, [s.get("error") for s in states]

    queue = queue_of(stack)
    assert set(FinishedJobRegistry(queue=queue).get_job_ids()) == set(ids)
    assert FailedJobRegistry(queue=queue).get_job_ids() == []
    assert queue.count == 0
    ran_on = set()
    for audit_id in ids:
        job = Job.fetch(audit_id, connection=queue.connection, serializer=JSONSerializer)
        assert len(job.results()) == 1, f"audit {audit_id} ran {len(job.results())} times"
        assert (stack.data_dir / "audits" / audit_id / "report.json").is_file()
        ran_on.add(job.worker_name)
    assert len(ran_on) == workers, f"{workers} workers, but audits ran on {sorted(ran_on)}"

    last_end = max(datetime.fromisoformat(s["ended_at"]) for s in states)
    seconds = (last_end - submitted_at).total_seconds()
    return {
        "workers": workers,
        "audits": AUDITS,
        "seconds": round(seconds, 2),
        "per_minute": round(AUDITS / seconds * 60, 2),
    }


def test_n_workers_run_m_audits_exactly_once_and_throughput_is_reported(
    single_worker_stack: Stack,
    redis_url: str,
    tmp_path_factory: pytest.TempPathFactory,
    tiny_checkpoint: Path,
) -> None:
    one = run_batch(single_worker_stack, tiny_checkpoint, workers=1)
    two_workers = start(redis_url, tmp_path_factory, workers=2)
    try:
        two = run_batch(two_workers, tiny_checkpoint, workers=2)
    finally:
        stop_stack(two_workers)
    speedup = two["per_minute"] / one["per_minute"]
    print(f"\nscale: {json.dumps(one)}\nscale: {json.dumps(two)}\nscale: speedup x{speedup:.2f}")
    assert speedup >= SANITY_SPEEDUP_FLOOR, (one, two)


def test_worker_health_check_sees_the_running_worker_and_no_other(
    single_worker_stack: Stack,
) -> None:
    script = [sys.executable, str(ROOT / "deploy" / "worker_healthcheck.py")]
    found = subprocess.run(
        script, env=single_worker_stack.env, capture_output=True, text=True, timeout=60
    )
    assert found.returncode == 0, found.stderr
    (worker,) = Worker.all(queue=queue_of(single_worker_stack))
    assert found.stdout.strip() == f"healthy: {worker.name}"
    other_queue = dict(single_worker_stack.env, VITAUDIT_QUEUE=f"empty-{uuid.uuid4().hex[:8]}")
    missing = subprocess.run(script, env=other_queue, capture_output=True, text=True, timeout=60)
    assert missing.returncode == 1
    assert "no worker of this host" in missing.stderr


def test_a_worker_asked_to_stop_finishes_its_audit_first(
    single_worker_stack: Stack, tiny_checkpoint: Path
) -> None:
    """RQ's warm shutdown: SIGTERM (what Docker and Kubernetes send) lets the audit end."""
    worker_process = single_worker_stack.processes[0]
    audit_id = submit(single_worker_stack, tiny_checkpoint, uuid.uuid4().int % 1_000_000)
    with single_worker_stack.client() as http:
        poll_until(
            lambda: http.get(f"/v1/audits/{audit_id}").json()["status"] == "running",
            timeout=AUDIT_TIMEOUT_S,
            interval=0.05,
            what="the audit to start",
        )
    worker_process.send_signal(signal.SIGTERM)
    signalled_at = datetime.now(UTC)
    assert worker_process.wait(timeout=AUDIT_TIMEOUT_S) == 0
    state = single_worker_stack.wait_for_audit(audit_id, timeout=10)
    assert state["status"] == "finished", state
    # The audit was still running when the signal came, so the worker waited for it.
    assert datetime.fromisoformat(state["ended_at"]) > signalled_at
    job = Job.fetch(
        audit_id, connection=queue_of(single_worker_stack).connection, serializer=JSONSerializer
    )
    assert len(job.results()) == 1
    assert (single_worker_stack.data_dir / "audits" / audit_id / "report.json").is_file()
    assert Worker.all(queue=queue_of(single_worker_stack)) == []
