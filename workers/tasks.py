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
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rq import get_current_job
from rq.timeouts import JobTimeoutException

from service.policy import evaluate, parse_policy
from service.settings import Settings
from service.store import LocalStore, write_atomic
from workers.analysis.loading import CheckpointError
from workers.inputs import ImageInputError
from workers.pipeline import AuditInputError, AuditOutput, run_pipeline

log = logging.getLogger("vitaudit.worker")

EXPECTED_ERRORS = (CheckpointError, ImageInputError, AuditInputError)


class AuditGone(Exception):
    code = "audit_deleted"


def _save_meta(**values: Any) -> None:
    job = get_current_job()
    if job is None:
        return
    job.meta.update(values)
    job.save_meta()


def write_output(folder: Path, output: AuditOutput) -> None:
    """Artifacts first, report.json last and atomically: a report means a finished audit."""
    import json

    for name, array in output.arrays.items():
        buffer = io.BytesIO()
        np.save(buffer, array, allow_pickle=False)
        write_atomic(folder / f"{name}.npy", buffer.getvalue())
    for name, png in output.figures.items():
        write_atomic(folder / f"{name}.png", png)
    for name, document in output.documents.items():
        write_atomic(folder / f"{name}.json", json.dumps(document, indent=2, allow_nan=False).encode())
    write_atomic(folder / "report.json", json.dumps(output.report, indent=2, allow_nan=False).encode())


def _charge_tenant(store: LocalStore, request: dict[str, Any], audit_id: str) -> None:
    """Count the audit's files, artifacts included, against its tenant's storage limit."""
    from service.quotas import BYTES_KEY, folder_bytes

    job = get_current_job()
    if job is not None and store.exists(audit_id):
        job.connection.hset(BYTES_KEY.format(tenant=request["tenant"]), audit_id, folder_bytes(store.audit_dir(audit_id)))


def run_audit(audit_id: str) -> dict[str, str]:
    settings = Settings.from_env()
    store = LocalStore(settings.data_dir)
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    request = store.read_json(audit_id, "request.json")
    if request is None:
        raise AuditGone(f"audit '{audit_id}' was deleted before it ran")
    # The service's image limit also bounds what an uploaded archive may unpack to.
    request["max_images"] = settings.max_images
    folder = store.audit_dir(audit_id)
    timings: dict[str, float] = {}
    last = {"stage": None, "at": time.perf_counter()}

    def progress(stage: str, fraction: float) -> None:
        now = time.perf_counter()
        if last["stage"] is not None:
            timings[str(last["stage"])] = round(now - float(last["at"]), 4)  # type: ignore[arg-type]
        last.update(stage=stage, at=now)
        _save_meta(stage=stage, progress=round(fraction, 3), timings=dict(timings))

    try:
        output = run_pipeline(request, folder, progress=progress)
        if request.get("policy"):
            # Checked at submit; evaluated here so report.json alone says whether the gate holds.
            output.report["policy"] = evaluate(parse_policy(request["policy"]), output.report)
        write_output(folder, output)
        _charge_tenant(store, request, audit_id)
    except Exception as exc:
        code = getattr(exc, "code", "internal_error")
        detail = str(exc) if isinstance(exc, EXPECTED_ERRORS + (AuditGone,)) else f"{type(exc).__name__}: {exc}"
        if isinstance(exc, JobTimeoutException):
            code = "job_timeout"
            detail = (
                f"the audit ran longer than the limit of {settings.job_timeout_s} s "
                "(VITAUDIT_JOB_TIMEOUT_S); audit fewer images or a smaller model"
            )
        if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
            code, detail = "store_full", "the artifact store is full; the report was not written (free space and retry)"
        log.warning("audit %s failed: %s", audit_id, detail)
        error = {"code": code, "detail": detail}
        _save_meta(error=error, stage="failed")
        if store.exists(audit_id):
            with contextlib.suppress(OSError):  # a full disk may refuse error.json too; meta has it
                store.write_json(audit_id, "error.json", error)
        raise
    _save_meta(stage="finished", progress=1.0, timings=output.report.get("timings", {}))
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
    store = LocalStore(Settings.from_env().data_dir)
    if store.exists(job.id):
        store.write_json(job.id, "error.json", error)
