"""Per-tenant limits: audits in flight (queued or running) and bytes kept in the store.

Both live in Redis, beside the jobs, so every API process sees the same numbers:

    vitaudit:tenant:{tenant}:active   set of audit ids admitted and not yet ended
    vitaudit:tenant:{tenant}:bytes    hash audit id -> bytes that audit keeps in the store

An audit is admitted before its body is read (so a tenant at its limit is refused at once),
charged for its uploads once they are stored, charged again by the worker for the artifacts
it writes, and released when it is deleted (by a user or by retention). Admission adds first
and checks after, so two racing submissions can both be refused but never both over-admitted.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from service.errors import LimitExceeded
from service.queue import AuditQueue
from service.settings import Settings
from service.store import ArtifactStore
from service.upload_lease import uploading
from service.uploads import StoredFile

ACTIVE_KEY = "vitaudit:tenant:{tenant}:active"
BYTES_KEY = "vitaudit:tenant:{tenant}:bytes"
RETRY_AFTER_CONCURRENT_S = 30  # a tiny audit takes seconds, a large one minutes
RETRY_AFTER_BYTES_S = 3600  # space comes back only when audits are deleted or expire


def folder_bytes(folder: Path) -> int:
    """Bytes of the regular files under ``folder`` (0 when it does not exist)."""
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) if folder.is_dir() else 0


def submitted_bytes(staging: Path, files: Iterable[StoredFile]) -> int:
    """Bytes a submission adds to the store: its staged files, plus the inputs reused from
    the store without being staged (``StoredFile.in_store``; S3 copies them in the bucket)."""
    return folder_bytes(staging) + sum(f.size for f in files if f.in_store)


class TenantQuota:
    def __init__(self, queue: AuditQueue, store: ArtifactStore, settings: Settings) -> None:
        self.redis = queue.redis
        self.queue = queue
        self.store = store
        self.settings = settings

    def _in_flight(self, audit_id: str) -> bool:
        """Queued, running, or still uploading (a live API holds its upload lease)."""
        job = self.queue.state(audit_id)
        if job is not None:
            return job.status in ("queued", "running")
        if not self.store.exists(audit_id):
            # No request yet: in flight while its upload lease lives; an upload whose API
            # died (an orphan, see service.upload_lease) holds no slot.
            return uploading(self.redis, audit_id)
        return (
            self.store.read_json(audit_id, "report.json") is None
            and self.store.read_json(audit_id, "error.json") is None
        )

    def in_flight(self, tenant: str, *, admitting: str | None = None) -> int:
        """Audits of ``tenant`` in flight (``admitting`` counts without a folder yet); ended
        ones are dropped from the set on the way."""
        key = ACTIVE_KEY.format(tenant=tenant)
        members = [raw for raw in self.redis.smembers(key) if raw.decode() != admitting]
        ended = [raw for raw in members if not self._in_flight(raw.decode())]
        if ended:
            self.redis.srem(key, *ended)
        return int(self.redis.scard(key))

    def stored_bytes(self, tenant: str) -> int:
        return sum(int(v) for v in self.redis.hvals(BYTES_KEY.format(tenant=tenant)))

    def admit(self, tenant: str, audit_id: str) -> None:
        """Count ``audit_id`` as in flight, or raise 429 when the tenant is at a limit."""
        limit_bytes = self.settings.max_tenant_bytes
        if limit_bytes and (used := self.stored_bytes(tenant)) >= limit_bytes:
            raise LimitExceeded(
                f"tenant '{tenant}' keeps {used} bytes in the store, the limit is {limit_bytes}; "
                "delete finished audits to make room",
                headers={"Retry-After": str(RETRY_AFTER_BYTES_S)},
            )
        limit = self.settings.max_concurrent_audits
        if not limit:
            return
        key = ACTIVE_KEY.format(tenant=tenant)
        self.redis.sadd(key, audit_id)
        if self.in_flight(tenant, admitting=audit_id) > limit:
            self.redis.srem(key, audit_id)
            raise LimitExceeded(
                f"tenant '{tenant}' has {limit} audits queued or running, the limit is {limit}; "
                "wait for one to end",
                headers={"Retry-After": str(RETRY_AFTER_CONCURRENT_S)},
            )

    def charge(self, tenant: str, audit_id: str, nbytes: int) -> None:
        """Record the bytes an audit keeps; 429 when that takes the tenant over its limit."""
        key = BYTES_KEY.format(tenant=tenant)
        self.redis.hincrby(key, audit_id, nbytes)
        limit_bytes = self.settings.max_tenant_bytes
        if limit_bytes and (used := self.stored_bytes(tenant)) > limit_bytes:
            self.redis.hdel(key, audit_id)
            raise LimitExceeded(
                f"this upload of {nbytes} bytes takes tenant '{tenant}' to {used} bytes in the store, "
                f"over the limit of {limit_bytes}; delete finished audits to make room",
                headers={"Retry-After": str(RETRY_AFTER_BYTES_S)},
            )

    def release(self, tenant: str, audit_id: str) -> None:
        """Forget an audit that was refused or deleted."""
        self.redis.srem(ACTIVE_KEY.format(tenant=tenant), audit_id)
        self.redis.hdel(BYTES_KEY.format(tenant=tenant), audit_id)
