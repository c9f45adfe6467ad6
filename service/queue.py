"""Enqueue audits and read their job state through RQ. Ids only; JSON serializer; no torch."""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from redis import Redis
from redis.exceptions import RedisError
from rq import Queue
from rq.command import send_stop_job_command
from rq.exceptions import InvalidJobOperation, NoSuchJobError
from rq.job import Job, JobStatus
from rq.registry import FailedJobRegistry, StartedJobRegistry
from rq.serializers import JSONSerializer

from service.errors import QueueUnavailable
from service.settings import Settings

log = logging.getLogger("vitaudit.service")

JOB_FUNCTION = "workers.tasks.run_audit"
# A tenant's audits by submit time (a sorted set): the list endpoint and the landing page.
TENANT_INDEX = "vitaudit:tenant:{tenant}:audits"
# A running job refreshes this key (workers.tasks.heartbeat); when it has expired, the job's
# worker is gone (killed with its work-horse, node lost) and the job will never end by itself.
HEARTBEAT_KEY = "vitaudit:heartbeat:{audit_id}"
HEARTBEAT_INTERVAL_S = 5
HEARTBEAT_TTL_S = 20
# Who ended a started job first: "finished" (its work-horse, just before it writes the
# report) or "lost" (the API, when the heartbeat expired). Set once (SET NX): a work-horse
# that was paused past its heartbeat and then resumes cannot publish over its failure.
OUTCOME_KEY = "vitaudit:outcome:{audit_id}"
OUTCOME_TTL_S = 7 * 24 * 3600
# A missing heartbeat is confirmed for this long before the job is declared lost: after a
# Redis outage (keys expired, or Redis restarted) a live work-horse beats again within
# HEARTBEAT_INTERVAL_S, and its audit goes on.
SUSPECT_KEY = "vitaudit:lost-since:{audit_id}"
LOST_CONFIRM_S = 2 * HEARTBEAT_INTERVAL_S

_STATUS = {
    "queued": "queued",
    "deferred": "queued",
    "scheduled": "queued",
    "started": "running",
    "finished": "finished",
    "failed": "failed",
    "stopped": "failed",
    "canceled": "failed",
}


@dataclass
class JobState:
    """What RQ knows of an audit's job."""

    status: str
    progress: float = 0.0
    stage: str | None = None
    started_at: str | None = None
    ended_at: str | None = None
    timings: dict[str, float] = field(default_factory=dict)
    error: dict[str, str] | None = None


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value else None


class AuditQueue:
    def __init__(self, settings: Settings, connection: Redis | None = None) -> None:
        self.settings = settings
        self.redis = connection or Redis.from_url(settings.redis_url, socket_timeout=5)
        self.queue = Queue(settings.queue_name, connection=self.redis, serializer=JSONSerializer)

    def ping(self) -> bool:
        try:
            return bool(self.redis.ping())
        except RedisError:
            return False

    def enqueue(self, audit_id: str) -> None:
        try:
            self.queue.enqueue(
                JOB_FUNCTION,
                audit_id,
                job_id=audit_id,
                job_timeout=self.settings.job_timeout_s,
                result_ttl=self.settings.result_ttl_s,
                failure_ttl=self.settings.failure_ttl_s,
                description=f"audit {audit_id}",
            )
        except RedisError as exc:
            raise QueueUnavailable(
                f"the job queue at {self.settings.redis_url} is unavailable: {exc}"
            ) from exc

    def state(self, audit_id: str) -> JobState | None:
        """The job state, or None when RQ no longer (or never) knew the job."""
        try:
            job = Job.fetch(audit_id, connection=self.redis, serializer=JSONSerializer)
            status = job.get_status(refresh=False)
        except NoSuchJobError:
            return None
        except RedisError as exc:
            raise QueueUnavailable(
                f"the job queue at {self.settings.redis_url} is unavailable: {exc}"
            ) from exc
        if status == JobStatus.STARTED and self._lost(job):
            try:
                if self._fail_lost(job):
                    status = JobStatus.FAILED
            except (RedisError, ValueError, NoSuchJobError):
                log.exception("could not mark lost job %s failed", audit_id)
        meta: dict[str, Any] = job.meta or {}
        state = JobState(
            status=_STATUS.get(str(status.value if status else "queued"), "queued"),
            progress=float(meta.get("progress", 0.0)),
            stage=meta.get("stage"),
            started_at=_iso(job.started_at),
            ended_at=_iso(job.ended_at),
            timings=dict(meta.get("timings", {})),
            error=meta.get("error"),
        )
        if state.status == "failed" and state.error is None:
            state.error = {"code": "job_failed", "detail": _last_line(job)}
        return state

    def _lost(self, job: Job) -> bool:
        """A started job whose heartbeat has expired: nothing is running it any more."""
        started = job.started_at
        if started is None:
            return False
        if started.tzinfo is None:
            started = started.replace(tzinfo=UTC)
        age = (datetime.now(UTC) - started).total_seconds()
        if age <= HEARTBEAT_TTL_S:
            return False
        suspect = SUSPECT_KEY.format(audit_id=job.id)
        if self.redis.exists(HEARTBEAT_KEY.format(audit_id=job.id)):
            self.redis.delete(suspect)
            return False
        self.redis.set(suspect, time.time(), nx=True, ex=HEARTBEAT_TTL_S * 3)
        since = self.redis.get(suspect)
        return since is not None and time.time() - float(since) >= LOST_CONFIRM_S

    def _fail_lost(self, job: Job) -> bool:
        """Fail a lost job, unless its work-horse already claimed to finish it (False)."""
        if claim_outcome(self.redis, job.id, "lost") != "lost":
            return False
        detail = (
            f"the worker running the audit stopped (no heartbeat for {HEARTBEAT_TTL_S} s): it was "
            "killed, ran out of memory, or lost its node; submit the audit again"
        )
        job.meta["error"] = {"code": "worker_lost", "detail": detail}
        job.save_meta()
        started = StartedJobRegistry(queue=self.queue)
        # Entries are "<job id>:<execution id>"; the execution records may have expired with
        # the dead worker, so match on the job id rather than asking RQ for its executions.
        entries = [
            e
            for e in self.redis.zrange(started.key, 0, -1)
            if e.decode().partition(":")[0] == job.id
        ]
        if entries:
            self.redis.zrem(started.key, *entries)
        FailedJobRegistry(queue=self.queue).add(
            job, ttl=self.settings.failure_ttl_s, exc_string=detail
        )
        job.set_status(JobStatus.FAILED)
        return True

    def cancel(self, audit_id: str) -> None:
        try:
            job = Job.fetch(audit_id, connection=self.redis, serializer=JSONSerializer)
        except NoSuchJobError:
            return
        except RedisError as exc:
            raise QueueUnavailable(
                f"the job queue at {self.settings.redis_url} is unavailable: {exc}"
            ) from exc
        status = job.get_status()
        if status in (JobStatus.QUEUED, JobStatus.DEFERRED, JobStatus.SCHEDULED):
            job.cancel()
        elif status == JobStatus.STARTED:
            # Stop the work-horse, so it does not write into the audit being deleted.
            with contextlib.suppress(InvalidJobOperation, RedisError):
                send_stop_job_command(self.redis, audit_id, serializer=JSONSerializer)
        job.delete()


def claim_outcome(redis: Redis, audit_id: str, outcome: str) -> str:
    """Record ``outcome`` as how the audit's job ended unless one is recorded already;
    return the one that holds (``OUTCOME_KEY``)."""
    key = OUTCOME_KEY.format(audit_id=audit_id)
    if redis.set(key, outcome, nx=True, ex=OUTCOME_TTL_S):
        return outcome
    held = redis.get(key)
    return held.decode() if held is not None else outcome


def _last_line(job: Job) -> str:
    """The reason RQ recorded for a failure without our meta (timeout, killed work-horse)."""
    result = job.latest_result()
    text = (result.exc_string if result else None) or "the job failed without a reason"
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else text
