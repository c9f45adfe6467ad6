"""Upload leases: which submissions are still being received, so that one whose API process
died mid-upload is known as an orphan (no request.json and no lease) instead of holding its
tenant's concurrency slot forever.

    vitaudit:upload:{audit_id}   the lease; expires UPLOAD_LEASE_TTL_S after the API last
                                 refreshed it (every UPLOAD_LEASE_REFRESH_S while it works)
    vitaudit:uploads             hash audit id -> tenant of every submission being received,
                                 so that `vitaudit cleanup` and DELETE know whose orphan it is

An upload holds the lease from before its admission until its request is written (or it is
refused); a killed API stops refreshing it, and within UPLOAD_LEASE_TTL_S the audit is an
orphan: not counted as in flight (service.quotas), deleted by DELETE and `vitaudit cleanup`
(service.retention).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from redis import Redis
from redis.exceptions import RedisError

LEASE_KEY = "vitaudit:upload:{audit_id}"
UPLOADS_KEY = "vitaudit:uploads"
# A live API refreshes every 15 s; four missed refreshes (a minute) mean it is gone. A
# stalled but live upload keeps its lease: the refresh does not depend on bytes arriving.
UPLOAD_LEASE_TTL_S = 60
UPLOAD_LEASE_REFRESH_S = 15


def uploading(redis: Redis, audit_id: str) -> bool:
    """Whether a live API process is still receiving this submission."""
    return bool(redis.exists(LEASE_KEY.format(audit_id=audit_id)))


def upload_tenant(redis: Redis, audit_id: str) -> str | None:
    """The tenant of a submission that was being received (None when it was not, or ended)."""
    tenant = redis.hget(UPLOADS_KEY, audit_id)
    return tenant.decode() if tenant else None


def end_upload(redis: Redis, audit_id: str) -> None:
    redis.delete(LEASE_KEY.format(audit_id=audit_id))
    redis.hdel(UPLOADS_KEY, audit_id)


async def _refresh(redis: Redis, audit_id: str) -> None:
    key = LEASE_KEY.format(audit_id=audit_id)
    while True:
        await asyncio.sleep(UPLOAD_LEASE_REFRESH_S)
        with contextlib.suppress(RedisError):  # a short outage: the next refresh may land
            redis.expire(key, UPLOAD_LEASE_TTL_S)


@contextlib.asynccontextmanager
async def upload_lease(redis: Redis, tenant: str, audit_id: str) -> AsyncIterator[None]:
    """Hold the lease of ``audit_id`` while the body runs (the API receiving a submission)."""
    redis.hset(UPLOADS_KEY, audit_id, tenant)
    redis.set(LEASE_KEY.format(audit_id=audit_id), tenant, ex=UPLOAD_LEASE_TTL_S)
    refresher = asyncio.get_running_loop().create_task(_refresh(redis, audit_id))
    try:
        yield
    finally:
        refresher.cancel()
        with contextlib.suppress(RedisError):  # left behind, it expires; cleanup drops the entry
            end_upload(redis, audit_id)
