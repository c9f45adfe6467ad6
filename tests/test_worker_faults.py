"""Worker faults: a Redis outage during an audit, and a job that resumes after the API
declared it lost. The outage test runs its own redis-server (never the shared one)."""

from __future__ import annotations

import signal
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from rq.job import Job, JobStatus
from rq.serializers import JSONSerializer

from service.queue import HEARTBEAT_TTL_S, LOST_CONFIRM_S, SUSPECT_KEY, AuditQueue
from service.settings import Settings
from service.store import new_audit_id
from service.store_factory import open_store
from tests.conftest import poll_until, stack_env, start_stack, stop_stack
from tests.planted.models import TINY_ARCH, TINY_ARGS, TINY_OPTIONS, save_safetensors, tiny_vit
from tests.test_faults import _redis_server, free_port, start_running, status, submit
from workers import tasks
from workers.pipeline import AuditOutput

pytestmark = pytest.mark.e2e


@pytest.fixture()
def started_job(
    redis_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> tuple[str, AuditQueue, Job]:
    """An audit whose job is `started` longer ago than the heartbeat lasts, with no heartbeat:
    what the API sees while the work-horse running it is paused (SIGSTOP, a frozen VM)."""
    env = stack_env(redis_url, tmp_path)
    for name in ("REDIS_URL", "VITAUDIT_DATA_DIR", "VITAUDIT_QUEUE"):
        monkeypatch.setenv(name, env[name])
    settings = Settings.from_env()
    store = open_store(settings)
    audit_id = new_audit_id()
    store.create_audit(audit_id)
    store.write_json(
        audit_id, "request.json", {"arch": TINY_ARCH, "tenant": "t", "options": TINY_OPTIONS}
    )
    queue = AuditQueue(settings)
    queue.enqueue(audit_id)
    job = Job.fetch(audit_id, connection=queue.redis, serializer=JSONSerializer)
    job.started_at = datetime.now(UTC) - timedelta(seconds=HEARTBEAT_TTL_S + 5)
    job.save()
    job.set_status(JobStatus.STARTED)
    # ... and has seen it missing for longer than the confirmation window.
    queue.redis.set(SUSPECT_KEY.format(audit_id=audit_id), time.time() - LOST_CONFIRM_S - 1)
    monkeypatch.setattr(tasks, "get_current_job", lambda: job)
    return audit_id, queue, job


def _finished_output() -> AuditOutput:
    return AuditOutput(report={"versions": {}, "notes": []})


def test_a_job_declared_lost_cannot_publish_its_report(
    started_job: tuple[str, AuditQueue, Job], monkeypatch: pytest.MonkeyPatch
) -> None:
    audit_id, queue, _job = started_job

    def paused(request: dict, folder: Path, progress: object) -> AuditOutput:
        # While the work-horse was paused the API saw no heartbeat and failed the audit.
        assert queue.state(audit_id).status == "failed"
        return _finished_output()

    monkeypatch.setattr(tasks, "run_pipeline", paused)
    with pytest.raises(Exception) as caught:
        tasks._run_audit(audit_id)
    assert getattr(caught.value, "code", None) == "worker_lost"
    store = open_store(Settings.from_env())
    assert not store.has_artifact(audit_id, "report.json")
    state = queue.state(audit_id)
    assert state.status == "failed" and state.error["code"] == "worker_lost", state


def test_a_resumed_job_stops_at_its_next_stage_and_keeps_the_failure(
    started_job: tuple[str, AuditQueue, Job], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The resumed work-horse does not write its stale progress over the API's error."""
    audit_id, queue, _job = started_job
    reached: list[str] = []

    def paused(request: dict, folder: Path, progress: object) -> AuditOutput:
        assert queue.state(audit_id).status == "failed"
        progress("heads", 0.5)  # type: ignore[operator]
        reached.append("after the stage")
        return _finished_output()

    monkeypatch.setattr(tasks, "run_pipeline", paused)
    with pytest.raises(Exception) as caught:
        tasks._run_audit(audit_id)
    assert getattr(caught.value, "code", None) == "worker_lost" and reached == []
    state = queue.state(audit_id)
    assert state.error["code"] == "worker_lost" and state.stage != "heads", state


def test_a_job_that_claimed_its_end_is_not_declared_lost(
    started_job: tuple[str, AuditQueue, Job], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The converse: once the work-horse claimed the end, a late heartbeat check keeps it."""
    audit_id, queue, _job = started_job
    tasks.claim_finished(audit_id)
    assert queue.state(audit_id).status == "running"


def test_the_worker_survives_a_redis_outage_during_an_audit(tmp_path: Path) -> None:
    port = free_port()
    (tmp_path / "redis").mkdir()
    server = _redis_server(port, tmp_path / "redis")
    env = stack_env(f"redis://127.0.0.1:{port}/0", tmp_path)
    stack = start_stack(env, tmp_path, tmp_path / "logs")
    try:
        worker = stack.processes[0]
        # A few seconds of work: still running when Redis stops right after it started.
        medium_args = {**TINY_ARGS, "img_size": 96, "depth": 4, "embed_dim": 64}
        medium = save_safetensors(tiny_vit(**medium_args), tmp_path / "medium.safetensors")
        options = {
            "num_images": 4,
            "batch_size": 2,
            "model_args": medium_args,
            "analyses": ["position_embedding"],
        }
        audit_id, _horses = start_running(stack, medium, options)
        server.send_signal(signal.SIGTERM)
        server.wait(20)
        log = tmp_path / "logs" / "worker0.log"
        # The audit ends while Redis is down: the work-horse waits to record it; today's
        # worker instead failed the audit on its next Redis call and then quit.
        poll_until(
            lambda: (
                worker.poll() is not None
                or "waiting for Redis to record that the audit finished" in log.read_text()
            ),
            timeout=180,
            interval=0.2,
            what="the audit to end while Redis is down",
        )
        assert worker.poll() is None, log.read_text()[-3000:]
        server = _redis_server(port, tmp_path / "redis")
        state = stack.wait_for_audit(audit_id, timeout=120)
        assert state["status"] == "finished", (state, log.read_text()[-4000:])
        tiny = save_safetensors(tiny_vit(), tmp_path / "tiny.safetensors")
        assert stack.wait_for_audit(submit(stack, tiny, TINY_OPTIONS), timeout=120)["status"] == (
            "finished"
        )
        assert worker.poll() is None
        assert status(stack, audit_id)["status"] == "finished"
        # ... and it still stops when asked (SIGTERM: RQ's warm shutdown), not restarted.
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(timeout=30) == 0
    finally:
        stop_stack(stack)
        server.kill()
        server.wait(10)
