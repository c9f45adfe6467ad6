"""Retention: delete ended audits (finished or failed) older than VITAUDIT_RETENTION_S, and
orphaned uploads.

Run by `vitaudit cleanup` (from cron, a Kubernetes CronJob, or by hand). An audit's age is the
time since its last file was written (its report or its error), so a long audit is kept for
the whole retention period after it ended. Queued and running audits are never deleted.
An orphaned upload (its API process died while receiving it: no request and no live upload
lease, see service.upload_lease) is deleted at once, and its tenant's bookkeeping released.
"""

from __future__ import annotations

import time

from redis import Redis

from service.queue import TENANT_INDEX, AuditQueue
from service.quotas import TenantQuota
from service.settings import Settings
from service.store import ArtifactStore
from service.store_factory import open_store
from service.upload_lease import UPLOADS_KEY, upload_tenant, uploading


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


def reclaim_orphan(
    redis: Redis, store: ArtifactStore, quota: TenantQuota, audit_id: str, *, tenant: str | None
) -> bool:
    """Delete ``audit_id`` if it is an orphaned upload (of ``tenant``; of anyone when None):
    its files, its slot and bytes, its upload entry. Whether it was one."""
    owner = upload_tenant(redis, audit_id)
    if owner is None or tenant not in (None, owner) or uploading(redis, audit_id):
        return False
    if store.exists(audit_id):  # submitted; its API died before it forgot the upload
        redis.hdel(UPLOADS_KEY, audit_id)
        return False
    store.delete_audit(audit_id)
    quota.release(owner, audit_id)
    redis.hdel(UPLOADS_KEY, audit_id)
    return True


def delete_orphans(settings: Settings, redis: Redis) -> list[str]:
    """Delete every orphaned upload; return their ids. Also folders without a request that no
    upload entry names (left by an API that ran before upload leases, or whose entry Redis lost)."""
    store = open_store(settings)
    quota = TenantQuota(AuditQueue(settings, connection=redis), store, settings)
    deleted = [
        audit_id
        for audit_id in (raw.decode() for raw in redis.hkeys(UPLOADS_KEY))
        if reclaim_orphan(redis, store, quota, audit_id, tenant=None)
    ]
    for audit_id in store.audit_ids():
        if upload_tenant(redis, audit_id) is None and not store.exists(audit_id):
            store.delete_audit(audit_id)
            deleted.append(audit_id)
    return deleted
