"""Retention: delete ended audits (finished or failed) older than VITAUDIT_RETENTION_S.

Run by `vitaudit cleanup` (from cron, a Kubernetes CronJob, or by hand). An audit's age is the
time since its last file was written (its report or its error), so a long audit is kept for
the whole retention period after it ended. Queued and running audits are never deleted.
"""

from __future__ import annotations

import time

from redis import Redis

from service.queue import TENANT_INDEX, AuditQueue
from service.quotas import TenantQuota
from service.settings import Settings
from service.store import ArtifactStore
from service.store_factory import open_store


def expired_audits(store: ArtifactStore, retention_s: int, now: float) -> list[str]:
    """Ids of ended audits whose report or error is older than ``retention_s`` seconds."""
    if retention_s <= 0:
        return []
    expired = []
    for audit_id in store.audit_ids():
        ended = store.ended_at(audit_id)
        if ended is not None and now - ended > retention_s:
            expired.append(audit_id)
    return expired


def delete_expired(settings: Settings, redis: Redis, *, now: float | None = None) -> list[str]:
    """Delete expired audits with their files, jobs and tenant bookkeeping; return their ids."""
    from rq.job import Job
    from rq.serializers import JSONSerializer

    store = open_store(settings)
    quota = TenantQuota(AuditQueue(settings, connection=redis), store, settings)
    deleted = []
    for audit_id in expired_audits(
        store, settings.retention_s, time.time() if now is None else now
    ):
        record = store.read_json(audit_id, "request.json") or {}
        tenant = record.get("tenant")
        store.delete_audit(audit_id)
        if tenant:
            redis.zrem(TENANT_INDEX.format(tenant=tenant), audit_id)
            quota.release(tenant, audit_id)
        Job(audit_id, connection=redis, serializer=JSONSerializer).delete(remove_from_queue=True)
        deleted.append(audit_id)
    return deleted
