"""Faults with real processes: a killed work-horse, a Redis restart, a job over its timeout,
a full disk, and retention. Each test runs its own stack so that it can break it."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from redis import Redis

from tests.conftest import (
    Stack,
    audit_folders,
    free_port,
    poll_until,
    stack_env,
    start_stack,
    stop_stack,
)
from tests.planted.models import TINY_ARCH, TINY_ARGS, TINY_OPTIONS, save_safetensors, tiny_vit

pytestmark = pytest.mark.e2e

# A job that runs for many seconds on 2 cores (a 14x14 grid, 12 blocks, 12 images), so a
# test can kill it mid-run or let a 1 s timeout expire; it never runs to the end here.
SLOW_ARGS = {
    **TINY_ARGS,
    "img_size": 224,
    "patch_size": 16,
    "embed_dim": 192,
    "depth": 12,
    "num_heads": 3,
}
SLOW_OPTIONS = {"num_images": 12, "batch_size": 4, "model_args": SLOW_ARGS}


def submit(stack: Stack, checkpoint: Path, options: dict) -> str:
    with stack.client() as http:
        response = http.post(
            "/v1/audits",
            data={"arch": TINY_ARCH, "options": json.dumps(options)},
            files={"checkpoint": (checkpoint.name, checkpoint.read_bytes())},
        )
    assert response.status_code == 202, response.text
    return response.json()["id"]


def status(stack: Stack, audit_id: str) -> dict:
    with stack.client() as http:
        return http.get(f"/v1/audits/{audit_id}").json()


def children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(p) for p in path.read_text().split()] if path.exists() else []


@pytest.fixture()
def tiny(tmp_path: Path) -> Path:
    return save_safetensors(tiny_vit(), tmp_path / "tiny.safetensors")


def start_running(stack: Stack, checkpoint: Path, options: dict) -> tuple[str, list[int]]:
    """Submit an audit, wait until it runs, and return its id and the worker's children
    (the work-horse running it)."""
    audit_id = submit(stack, checkpoint, options)
    poll_until(
        lambda: status(stack, audit_id)["status"] == "running",
        timeout=60,
        interval=0.05,
        what="running",
    )
    horses = poll_until(
        lambda: children(stack.processes[0].pid), timeout=10, interval=0.05, what="the work-horse"
    )
    return audit_id, horses


def test_sigkill_of_the_work_horse_fails_the_audit_with_a_reason(
    redis_url: str, tmp_path: Path, tiny: Path
) -> None:
    slow = save_safetensors(tiny_vit(**SLOW_ARGS), tmp_path / "slow.safetensors")
    stack = start_stack(stack_env(redis_url, tmp_path), tmp_path, tmp_path / "logs")
    try:
        worker = stack.processes[0]
        audit_id, horses = start_running(stack, slow, SLOW_OPTIONS)
        os.kill(horses[0], signal.SIGKILL)
        killed_at = time.monotonic()
        state = stack.wait_for_audit(audit_id, timeout=60)
        assert time.monotonic() - killed_at < 60
        assert state["status"] == "failed"
        assert state["error"] == {
            "code": "worker_killed",
            "detail": "the worker process running the audit was killed by signal 9 (out of memory, or killed by an operator)",
        }
        # The worker survived its horse and takes the next audit.
        assert worker.poll() is None
        assert (
            stack.wait_for_audit(submit(stack, tiny, TINY_OPTIONS), timeout=120)["status"]
            == "finished"
        )
    finally:
        stop_stack(stack)


def test_sigkill_of_the_whole_worker_fails_the_audit_within_a_minute(
    redis_url: str, tmp_path: Path, tiny: Path
) -> None:
    """Worker and work-horse die together (OOM kill of a container, lost node): no RQ handler
    runs, and only the job's heartbeat tells the API that nothing will finish it."""
    slow = save_safetensors(tiny_vit(**SLOW_ARGS), tmp_path / "slow.safetensors")
    stack = start_stack(stack_env(redis_url, tmp_path), tmp_path, tmp_path / "logs")
    try:
        worker = stack.processes[0]
        audit_id, horses = start_running(stack, slow, SLOW_OPTIONS)
        for pid in [worker.pid, *horses]:
            os.kill(pid, signal.SIGKILL)
        killed_at = time.monotonic()
        state = stack.wait_for_audit(audit_id, timeout=60)
        assert time.monotonic() - killed_at < 60
        assert state["status"] == "failed"
        assert state["error"]["code"] == "worker_lost"
        assert state["error"]["detail"].startswith(
            "the worker running the audit stopped (no heartbeat for 20 s)"
        )
        # The reason is in the store too: the audit stays failed after RQ expires the job.
        stored = json.loads((tmp_path / "audits" / audit_id / "error.json").read_text())
        assert stored == state["error"]
    finally:
        stop_stack(stack)


def test_deleting_a_running_audit_stops_its_job(redis_url: str, tmp_path: Path, tiny: Path) -> None:
    slow = save_safetensors(tiny_vit(**SLOW_ARGS), tmp_path / "slow.safetensors")
    stack = start_stack(stack_env(redis_url, tmp_path), tmp_path, tmp_path / "logs")
    try:
        worker = stack.processes[0]
        # 64 texture probes through a 12-block model: far longer than the 5 s allowed below.
        longer = {**SLOW_OPTIONS, "num_images": 64, "probe_set": "texture-v1"}
        audit_id, _horses = start_running(stack, slow, longer)  # the work-horse is running
        with stack.client() as http:
            assert http.delete(f"/v1/audits/{audit_id}").status_code == 204
        # The work-horse is stopped at once, the worker takes the next audit, and the deleted
        # audit's folder is not written again.
        poll_until(
            lambda: not children(worker.pid),
            timeout=5,
            interval=0.05,
            what="the work-horse to stop",
        )
        next_state = stack.wait_for_audit(submit(stack, tiny, TINY_OPTIONS), timeout=60)
        assert next_state["status"] == "finished"
        assert worker.poll() is None
        assert not (tmp_path / "audits" / audit_id).exists()
    finally:
        stop_stack(stack)


def test_job_over_its_timeout_fails_and_the_worker_keeps_serving(
    redis_url: str, tmp_path: Path, tiny: Path
) -> None:
    env = stack_env(redis_url, tmp_path, VITAUDIT_JOB_TIMEOUT_S="1")
    slow = save_safetensors(tiny_vit(**SLOW_ARGS), tmp_path / "slow.safetensors")
    stack = start_stack(env, tmp_path, tmp_path / "logs")
    try:
        expected = {
            "code": "job_timeout",
            "detail": "the audit ran longer than the limit of 1 s (VITAUDIT_JOB_TIMEOUT_S); "
            "audit fewer images or a smaller model",
        }
        for _ in range(2):  # the second one proves the worker is still taking jobs
            state = stack.wait_for_audit(submit(stack, slow, SLOW_OPTIONS), timeout=60)
            assert state["status"] == "failed" and state["error"] == expected, state
        assert stack.processes[0].poll() is None
    finally:
        stop_stack(stack)


def _redis_server(port: int, folder: Path) -> subprocess.Popen[bytes]:
    server = subprocess.Popen(
        [
            shutil.which("redis-server") or "redis-server",
            "--port",
            str(port),
            "--appendonly",
            "yes",
            "--appendfsync",
            "always",
            "--save",
            "",
            "--dir",
            str(folder),
        ],
        stdout=subprocess.DEVNULL,
    )
    poll_until(lambda: _pings(port), timeout=10, what="redis-server")
    return server


def _pings(port: int) -> bool:
    try:
        return bool(Redis(port=port, socket_connect_timeout=0.5).ping())
    except Exception:
        return False


def _burst_worker(env: dict[str, str], log: Path) -> None:
    with log.open("ab") as out:
        subprocess.run(
            [sys.executable, "-m", "service.cli", "worker", "--burst"],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            timeout=180,
            check=True,
        )


def test_a_timeout_hidden_behind_a_clearer_error_is_still_a_timeout() -> None:
    """RQ's alarm can fire inside code that rewraps its errors (model building raises
    CheckpointError from None); the failure must still say job_timeout (seen on a loaded
    machine: a 1 s limit expired inside timm.create_model and read 'checkpoint_rejected')."""
    from rq.timeouts import JobTimeoutException

    from workers.analysis.loading import CheckpointError
    from workers.tasks import timed_out

    def build() -> None:
        try:
            raise JobTimeoutException("Task exceeded maximum timeout value (1 seconds)")
        except Exception as exc:
            raise CheckpointError(f"cannot build the model: {exc}") from None

    with pytest.raises(CheckpointError) as caught:
        build()
    assert timed_out(caught.value)
    assert not timed_out(CheckpointError("the state dict does not fit"))
    assert not timed_out(ValueError("bad"))


def test_queued_and_finished_audits_survive_a_redis_restart(tmp_path: Path, tiny: Path) -> None:
    port = free_port()
    (tmp_path / "redis").mkdir()
    server = _redis_server(port, tmp_path / "redis")
    env = stack_env(f"redis://127.0.0.1:{port}/0", tmp_path)
    stack = start_stack(env, tmp_path, tmp_path / "logs", workers=0)
    try:
        finished = submit(stack, tiny, TINY_OPTIONS)
        _burst_worker(env, tmp_path / "logs" / "burst.log")
        assert status(stack, finished)["status"] == "finished"
        queued = submit(
            stack, save_safetensors(tiny_vit(seed=1), tmp_path / "other.safetensors"), TINY_OPTIONS
        )

        server.terminate()
        server.wait(20)
        server = _redis_server(port, tmp_path / "redis")

        def answers() -> dict | None:
            with stack.client() as http:
                response = http.get(f"/v1/audits/{queued}")
            return response.json() if response.status_code == 200 else None

        assert (
            poll_until(answers, timeout=30, what="the API to reach the restarted Redis")["status"]
            == "queued"
        )
        assert status(stack, finished)["status"] == "finished"
        assert (
            Redis(port=port).llen(f"rq:queue:{env['VITAUDIT_QUEUE']}") == 1
        )  # the job itself, not a re-enqueue
        _burst_worker(env, tmp_path / "logs" / "burst.log")
        assert status(stack, queued)["status"] == "finished"
    finally:
        stop_stack(stack)
        server.kill()


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root")
def test_full_disk_is_a_507_and_nothing_is_kept(redis_url: str, tmp_path: Path) -> None:
    data_dir = tmp_path / "store"
    data_dir.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(data_dir)], check=True)
    try:
        # /readyz refuses a store with under VITAUDIT_MIN_FREE_BYTES free; 0 lets this one
        # serve, so that an upload meets the full disk (test_edge_hardening covers readiness).
        env = stack_env(redis_url, data_dir, VITAUDIT_MIN_FREE_BYTES="0")
        stack = start_stack(env, data_dir, tmp_path / "logs", workers=0)
        try:
            with stack.client() as http:
                response = http.post(
                    "/v1/audits",
                    data={"arch": TINY_ARCH},
                    files={"checkpoint": ("big.safetensors", os.urandom(600_000))},
                )
                assert response.status_code == 507, response.text
                assert response.json() == {
                    "status": 507,
                    "title": "Insufficient storage",
                    "detail": "the artifact store is full; try again later",
                }
                assert http.get("/healthz").status_code == 200
            assert list((data_dir / "audits").iterdir()) == []
        finally:
            stop_stack(stack)
    finally:
        subprocess.run(["umount", str(data_dir)], check=False)


def test_a_failed_report_write_leaves_no_report(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Disk full while the worker writes: artifacts may be partial, but no report.json appears."""
    import errno

    import numpy as np

    from service import store as store_module
    from workers import tasks
    from workers.pipeline import AuditOutput

    real_write_bytes = Path.write_bytes

    def write_until_full(self: Path, data: bytes) -> int:
        if self.name.startswith(".report.json"):
            real_write_bytes(self, data[: len(data) // 2])  # half written, then the disk is full
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write_bytes(self, data)

    monkeypatch.setattr(Path, "write_bytes", write_until_full)
    from tests.planted.reports import minimal_report

    output = AuditOutput(report=minimal_report(), arrays={"a": np.zeros(3)})
    store = store_module.LocalStore(tmp_path)
    audit_id = store_module.new_audit_id()
    store.create_audit(audit_id)
    with pytest.raises(OSError, match="No space left"):
        tasks.write_output(store, audit_id, output)
    assert sorted(p.name for p in store.audit_dir(audit_id).iterdir()) == ["a.npy", "inputs"]


def _run_cleanup(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """`vitaudit cleanup` as a real process; its output as text (raises if it fails)."""
    return subprocess.run(
        [sys.executable, "-m", "service.cli", "cleanup"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )


def test_cleanup_deletes_ended_audits_older_than_the_retention(
    redis_url: str, tmp_path: Path, tiny: Path
) -> None:
    env = stack_env(redis_url, tmp_path, VITAUDIT_RETENTION_S="3600")
    stack = start_stack(env, tmp_path, tmp_path / "logs", workers=0)
    try:
        old = submit(stack, tiny, TINY_OPTIONS)
        _burst_worker(env, tmp_path / "logs" / "burst.log")
        recent = submit(
            stack, save_safetensors(tiny_vit(seed=1), tmp_path / "b.safetensors"), TINY_OPTIONS
        )
        _burst_worker(env, tmp_path / "logs" / "burst.log")
        queued = submit(
            stack, save_safetensors(tiny_vit(seed=2), tmp_path / "c.safetensors"), TINY_OPTIONS
        )
        two_hours_ago = time.time() - 7200
        for path in (tmp_path / "audits" / old).iterdir():
            os.utime(path, (two_hours_ago, two_hours_ago))
        result = _run_cleanup(env)
        assert result.stdout.split() == [
            "deleted",
            "1",
            "audits",
            "older",
            "than",
            "3600",
            "s",
            old,
        ]
        assert not (tmp_path / "audits" / old).exists()
        with stack.client() as http:
            assert http.get(f"/v1/audits/{old}").status_code == 404
            assert http.get(f"/v1/audits/{recent}").json()["status"] == "finished"
            assert http.get(f"/v1/audits/{queued}").json()["status"] == "queued"
            assert old not in [a["id"] for a in http.get("/v1/audits").json()]
    finally:
        stop_stack(stack)


def test_a_failure_past_the_jobs_own_deadline_is_a_timeout(monkeypatch: pytest.MonkeyPatch) -> None:
    """torch turns the alarm into RuntimeError text (no chain to follow): the deadline
    decides, from the job's own timeout, and only when that timeout is a real one."""
    from datetime import UTC, datetime, timedelta
    from types import SimpleNamespace

    from workers import tasks

    lost = RuntimeError("Error(s) in loading state_dict: ('Task exceeded maximum timeout value',)")

    def job(timeout: int | None, seconds_ago: float) -> SimpleNamespace:
        return SimpleNamespace(
            timeout=timeout, started_at=datetime.now(UTC) - timedelta(seconds=seconds_ago)
        )

    for current, expected in [
        (job(1, 1.5), True),  # past a 1 s limit
        (job(60, 1.5), False),  # well inside the limit
        (job(-1, 1e6), False),  # -1: RQ sets no alarm at all
        (job(None, 1e6), False),  # no timeout recorded on the job
        (None, False),  # not inside an RQ job
    ]:
        monkeypatch.setattr(tasks, "get_current_job", lambda current=current: current)
        assert tasks.timed_out(lost) is expected, current


def _partial_upload(stack: Stack, key: str) -> socket.socket:
    """A submission whose body stops part-way (the client is still sending)."""
    port = int(stack.url.rsplit(":", 1)[1])
    head = (
        f"POST /v1/audits HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nX-API-Key: {key}\r\n"
        "Content-Type: multipart/form-data; boundary=B\r\nContent-Length: 10000000\r\n\r\n"
    )
    body = (
        f'--B\r\nContent-Disposition: form-data; name="arch"\r\n\r\n{TINY_ARCH}\r\n'
        '--B\r\nContent-Disposition: form-data; name="checkpoint"; filename="c.safetensors"\r\n\r\n'
    ).encode() + b"\0" * 1000
    connection = socket.create_connection(("127.0.0.1", port))
    connection.sendall(head.encode() + body)
    return connection


def test_an_api_killed_mid_upload_leaves_no_slot_held_and_cleanup_reclaims_it(
    redis_url: str, tmp_path: Path
) -> None:
    from service.upload_lease import LEASE_KEY

    key = f"orphans-key-{uuid.uuid4().hex}"
    env = stack_env(
        redis_url,
        tmp_path,
        VITAUDIT_MAX_CONCURRENT_AUDITS="2",
        VITAUDIT_API_KEYS=f"orphans-{uuid.uuid4().hex[:8]}:{hashlib.sha256(key.encode()).hexdigest()}",
    )
    env["VITAUDIT_LOCAL_MODE"] = "0"
    form = {"data": {"arch": TINY_ARCH}, "headers": {"X-API-Key": key}}

    def submit_one(stack: Stack) -> int:
        with stack.client() as http:
            files = {"checkpoint": ("c.safetensors", os.urandom(100))}
            return http.post("/v1/audits", files=files, **form).status_code

    first = start_stack(env, tmp_path, tmp_path / "logs", workers=0)
    uploads = [_partial_upload(first, key), _partial_upload(first, key)]
    try:
        orphans = sorted(
            poll_until(
                lambda: len(audit_folders(first)) == 2 and audit_folders(first),
                timeout=30,
                what="both uploads to start",
            )
        )
        assert submit_one(first) == 429  # both slots held while the uploads go on
        first.processes[0].send_signal(signal.SIGKILL)  # the API dies mid-upload
        first.processes[0].wait(10)
    finally:
        for connection in uploads:
            connection.close()
        stop_stack(first)
    second = start_stack(env, tmp_path, tmp_path / "logs2", workers=0)
    try:
        redis = Redis.from_url(redis_url)
        # The dead API no longer refreshes their leases; they lapse within a minute
        # (UPLOAD_LEASE_TTL_S), deleted here instead of waited for.
        redis.delete(*(LEASE_KEY.format(audit_id=a) for a in orphans))
        with second.client(**{"X-API-Key": key}) as http:
            assert http.delete(f"/v1/audits/{orphans[0]}").status_code == 204
        assert audit_folders(second) == {orphans[1]}
        result = _run_cleanup(env)
        assert result.stdout.splitlines()[1:] == [
            "deleted 1 orphaned uploads (their API stopped while receiving them)",
            f"  {orphans[1]}",
        ]
        assert audit_folders(second) == set()
        assert [submit_one(second), submit_one(second)] == [202, 202]  # both slots are free
    finally:
        stop_stack(second)
