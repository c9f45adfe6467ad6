"""run_audit(audit_id): the RQ entry point. Reads the request from the store, writes the report.

An expected failure (bad checkpoint, bad images, bad request) sets
``job.meta["error"] = {"code", "detail"}``, writes ``error.json`` beside the inputs, and
re-raises, so the API can explain it; anything else is recorded the same way with the
exception's type and message.
"""

from __future__ import annotations

import contextlib
import errno
import io
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import Any

import numpy as np
import torch
from redis.exceptions import RedisError
from rq import get_current_job
from rq.timeouts import JobTimeoutException

from service.code_version import analysis_code_version, code_skew_note
from service.logs import audit_context
from service.metrics import record_job
from service.policy import evaluate, parse_policy
from service.queue import (
    HEARTBEAT_INTERVAL_S,
    HEARTBEAT_KEY,
    HEARTBEAT_TTL_S,
    OUTCOME_KEY,
    claim_outcome,
)
from service.settings import Settings
from service.store import ArtifactStore
from service.store_factory import open_store
from workers.analysis.loading import CheckpointError
from workers.inputs import ImageInputError
from workers.pipeline import AuditInputError, AuditOutput, run_pipeline
from workers.report_schema import validate_report

log = logging.getLogger("vitaudit.worker")
# The analysis code this process imported: the worker imports this module before it forks
# a work-horse per job (service.cli.WARM_MODULES), so later edits on disk are not counted.
ANALYSIS_CODE = analysis_code_version()

EXPECTED_ERRORS = (CheckpointError, ImageInputError, AuditInputError)
CLAIM_WAIT_S = 120  # how long a finished audit waits for Redis to record that it finished


class AuditGone(Exception):
    code = "audit_deleted"


class DeclaredLost(Exception):
    """The API failed this job as ``worker_lost`` (its heartbeat stopped, e.g. the process
    was paused) before it could finish: its failure stands and no report is published."""

    code = "worker_lost"


def declared_lost(audit_id: str) -> bool:
    """Whether the API failed this job as lost (False when there is no job or no Redis)."""
    job = get_current_job()
    if job is None:
        return False
    try:
        return job.connection.get(OUTCOME_KEY.format(audit_id=audit_id)) == b"lost"
    except RedisError:
        return False


def claim_finished(audit_id: str) -> None:
    """Claim the job's outcome as finished before the report is written, or raise
    DeclaredLost when the API already declared it lost (`service.queue.claim_outcome`).
    Through a Redis outage it retries for up to ``CLAIM_WAIT_S``."""
    job = get_current_job()
    if job is None:
        return
    deadline = time.monotonic() + CLAIM_WAIT_S
    while True:
        try:
            held = claim_outcome(job.connection, audit_id, "finished")
            break
        except RedisError:
            if time.monotonic() > deadline:
                raise
            log.warning("waiting for Redis to record that the audit finished")
            time.sleep(1.0)
    if held != "finished":
        raise DeclaredLost(f"audit '{audit_id}' was declared lost before it finished")


def _save_meta(**values: Any) -> None:
    """Progress and errors in the job's meta; a Redis outage loses the update, not the audit."""
    job = get_current_job()
    if job is None:
        return
    job.meta.update(values)
    try:
        job.save_meta()
    except RedisError:
        log.warning("could not save the job's progress (Redis unavailable)", exc_info=True)


def write_output(store: ArtifactStore, audit_id: str, output: AuditOutput) -> None:
    """Artifacts first, report.json last, each atomically: a report means a finished audit.
    A report that breaks the contract (`workers.report_schema`) fails the audit unwritten."""
    validate_report(output.report)
    for name, array in output.arrays.items():
        buffer = io.BytesIO()
        np.save(buffer, array, allow_pickle=False)
        store.write_bytes(audit_id, f"{name}.npy", buffer.getvalue())
    for name, png in output.figures.items():
        store.write_bytes(audit_id, f"{name}.png", png)
    for name, document in output.documents.items():
        store.write_json(audit_id, f"{name}.json", document)
    store.write_json(audit_id, "report.json", output.report)


def _charge_tenant(store: ArtifactStore, request: dict[str, Any], audit_id: str) -> None:
    """Count the audit's files, artifacts included, against its tenant's storage limit."""
    from service.quotas import BYTES_KEY

    job = get_current_job()
    if job is not None and store.exists(audit_id):
        job.connection.hset(
            BYTES_KEY.format(tenant=request["tenant"]), audit_id, store.audit_bytes(audit_id)
        )


@contextlib.contextmanager
def heartbeat(audit_id: str) -> Iterator[None]:
    """Keep ``HEARTBEAT_KEY`` alive while the job runs, so the API can tell a lost job.

    RQ only notices a worker that died with its work-horse when the worker's own key expires
    (job monitoring interval + 60 s, then a maintenance pass); this key expires
    ``HEARTBEAT_TTL_S`` after the last beat.
    """
    job = get_current_job()
    if job is None:
        yield
        return
    key = HEARTBEAT_KEY.format(audit_id=audit_id)
    stop = threading.Event()

    def beat() -> None:
        while not stop.is_set():
            with contextlib.suppress(Exception):  # a Redis hiccup must not kill the job
                job.connection.set(key, "1", ex=HEARTBEAT_TTL_S)
            stop.wait(HEARTBEAT_INTERVAL_S)

    thread = threading.Thread(target=beat, name=f"heartbeat-{audit_id[:8]}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=5)
        with contextlib.suppress(Exception):
            job.connection.delete(key)


def timed_out(exc: BaseException) -> bool:
    """Whether RQ's job timeout caused ``exc``.

    The alarm fires wherever the job happens to be, and what it raises does not always
    surface as itself: code that turns its own errors into clear ones (``raise
    CheckpointError(...) from None`` around model building) keeps it only in
    ``__context__``, and torch's ``load_state_dict`` turns it into the text of a
    RuntimeError. So: a JobTimeoutException anywhere in the chain, or a failure at or after
    the current job's own deadline (``job.timeout`` seconds, when positive, after RQ's
    ``started_at``, which RQ sets just before it arms the alarm).
    """
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, JobTimeoutException):
            return True
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    job = get_current_job()
    limit = getattr(job, "timeout", None)
    if job is None or job.started_at is None or not isinstance(limit, (int, float)) or limit <= 0:
        return False
    started_at = job.started_at
    if started_at.tzinfo is None:  # older RQ: naive UTC
        started_at = started_at.replace(tzinfo=UTC)
    return (datetime.now(UTC) - started_at).total_seconds() >= limit


def _record_outcome(outcome: str, error_code: str, seconds: float) -> None:
    """Count the ended job in the queue's job metrics (read by the API's /metrics)."""
    job = get_current_job()
    if job is None:
        return
    try:
        record_job(
            job.connection, job.origin, outcome=outcome, error_code=error_code, seconds=seconds
        )
    except Exception:  # a metric must never fail an audit
        log.warning("could not record the job's outcome in the metrics", exc_info=True)


def logging_audit_id(worker_class: type[Any]) -> type[Any]:
    """The RQ worker class whose log lines, while it runs a job, carry that job's audit id
    (job ids are audit ids); the forked work-horse inherits the binding."""

    class AuditLoggingWorker(worker_class):  # type: ignore[misc, valid-type]
        def execute_job(self, job: Any, queue: Any) -> Any:
            with audit_context(job.id):
                return super().execute_job(job, queue)

        # While a work-horse runs, a Redis outage must not end the worker's watch over it:
        # a missed heartbeat is logged and the next one tried (RQ would quit the worker).
        def maintain_heartbeats(self, *args: Any, **kwargs: Any) -> Any:
            try:
                return super().maintain_heartbeats(*args, **kwargs)
            except RedisError:
                log.warning("worker heartbeat missed: Redis unavailable")
                return None

        def heartbeat(self, *args: Any, **kwargs: Any) -> Any:
            try:
                return super().heartbeat(*args, **kwargs)
            except RedisError:
                log.warning("worker heartbeat missed: Redis unavailable")
                return None

    AuditLoggingWorker.__name__ = f"AuditLogging{worker_class.__name__}"
    return AuditLoggingWorker


def serve(make_worker: Callable[[], Any], connection: Any, *, burst: bool) -> None:
    """Run RQ workers until one stops on request (or, in burst mode, runs out of jobs).

    RQ quits its work loop on any Redis error outside its dequeue (a status update, the
    registry maintenance, its own teardown); here the process waits until Redis answers
    again and starts a fresh worker (a new name: the old one's registration may linger),
    so a Redis outage pauses the service instead of ending it.
    """
    while True:
        worker = make_worker()
        try:
            worker.work(burst=burst, with_scheduler=False)
        except RedisError:
            log.warning("the worker lost Redis", exc_info=True)
        if burst or _stop_asked(worker):
            return
        wait = 1.0
        while not _stop_asked(worker):
            try:
                connection.ping()
                break
            except RedisError:  # the signal handler itself may need Redis: checked above
                time.sleep(wait)
                wait = min(wait * 2, 30.0)
        if _stop_asked(worker):
            return
        log.warning("Redis answers again: starting a new worker")


def _stop_asked(worker: Any) -> bool:
    """Whether the worker was asked to stop (SIGTERM/SIGINT: RQ's warm shutdown)."""
    return bool(getattr(worker, "_stop_requested", False)) or (
        getattr(worker, "_shutdown_requested_date", None) is not None
    )


def run_audit(audit_id: str) -> dict[str, str]:
    """The RQ job: every log line it emits carries the audit id."""
    with audit_context(audit_id), heartbeat(audit_id):
        return _run_audit(audit_id)


def _run_audit(audit_id: str) -> dict[str, str]:
    started = time.perf_counter()
    settings = Settings.from_env()
    store = open_store(settings)
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    request = store.read_json(audit_id, "request.json")
    if request is None:
        raise AuditGone(f"audit '{audit_id}' was deleted before it ran")
    # The service's image limit also bounds what an uploaded archive may unpack to.
    request["max_images"] = settings.max_images
    timings: dict[str, float] = {}
    last = {"stage": None, "at": time.perf_counter()}

    def progress(stage: str, fraction: float) -> None:
        now = time.perf_counter()
        if last["stage"] is not None:
            timings[str(last["stage"])] = round(now - float(last["at"]), 4)  # type: ignore[arg-type]
        last.update(stage=stage, at=now)
        log.info("stage %s (%.0f%%)", stage, fraction * 100, extra={"stage": stage})
        if declared_lost(audit_id):  # paused past its heartbeat: stop, the failure stands
            raise DeclaredLost(f"audit '{audit_id}' was declared lost while it ran")
        _save_meta(stage=stage, progress=round(fraction, 3), timings=dict(timings))

    log.info("audit started: %s", request.get("arch"), extra={"arch": request.get("arch")})
    try:
        # The inputs as local files: the audit's own folder (local store) or a download into
        # this worker's scratch folder (S3), removed when the audit ends.
        with store.materialised(audit_id, settings.scratch_dir) as folder:
            output = run_pipeline(request, folder, progress=progress)
        output.report["versions"]["analysis_code"] = ANALYSIS_CODE
        skew = code_skew_note(request.get("analysis_code"), ANALYSIS_CODE)
        if skew is not None:
            log.warning(skew)
            output.report["notes"].append(skew)
        if request.get("policy"):
            # Checked at submit; evaluated here so report.json alone says whether the gate holds.
            output.report["policy"] = evaluate(parse_policy(request["policy"]), output.report)
        claim_finished(audit_id)
        write_output(store, audit_id, output)
        _charge_tenant(store, request, audit_id)
    except Exception as exc:
        if isinstance(exc, DeclaredLost) or declared_lost(audit_id):
            # The API recorded the failure (meta, error.json); leave it as it stands.
            log.warning("audit %s ended after it was declared lost; nothing is published", audit_id)
            raise
        code = getattr(exc, "code", "internal_error")
        detail = (
            str(exc)
            if isinstance(exc, EXPECTED_ERRORS + (AuditGone,))
            else f"{type(exc).__name__}: {exc}"
        )
        if timed_out(exc):
            code = "job_timeout"
            detail = (
                f"the audit ran longer than the limit of {settings.job_timeout_s} s "
                "(VITAUDIT_JOB_TIMEOUT_S); audit fewer images or a smaller model"
            )
        if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
            code, detail = (
                "store_full",
                "the artifact store is full; the report was not written (free space and retry)",
            )
        log.warning("audit %s failed: %s", audit_id, detail, extra={"error_code": code})
        _record_outcome("failed", code, time.perf_counter() - started)
        error = {"code": code, "detail": detail}
        _save_meta(error=error, stage="failed")
        if store.exists(audit_id):
            with contextlib.suppress(OSError):  # a full disk may refuse error.json too; meta has it
                store.write_json(audit_id, "error.json", error)
        raise
    _save_meta(stage="finished", progress=1.0, timings=output.report.get("timings", {}))
    seconds = time.perf_counter() - started
    _record_outcome("finished", "", seconds)
    log.info("audit finished in %.1f s", seconds, extra={"duration_s": round(seconds, 3)})
    return {"report": "report.json"}


def record_killed_work_horse(job: Any, pid: int, status: int, rusage: Any) -> None:
    """RQ calls this in the worker when a job's work-horse died (OOM killer, SIGKILL)."""
    signal_number = os.WTERMSIG(status) if os.WIFSIGNALED(status) else None
    reason = (
        f"the worker process running the audit was killed by signal {signal_number}"
        if signal_number
        else f"the worker process running the audit exited with status {status}"
    )
    if signal_number == 9:
        reason += " (out of memory, or killed by an operator)"
    error = {"code": "worker_killed", "detail": reason}
    job.meta["error"] = error
    job.save_meta()
    log.warning(
        "audit %s failed: %s",
        job.id,
        reason,
        extra={"error_code": "worker_killed", "audit_id": job.id},
    )
    started = job.started_at.timestamp() if job.started_at else time.time()
    with contextlib.suppress(Exception):  # a metric must never hide the failure
        record_job(
            job.connection,
            job.origin,
            outcome="failed",
            error_code="worker_killed",
            seconds=time.time() - started,
        )
    store = open_store(Settings.from_env())
    if store.exists(job.id):
        store.write_json(job.id, "error.json", error)
