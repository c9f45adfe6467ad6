"""API keys -> tenants. Keys are compared by their sha256; the service never stores a key."""

from __future__ import annotations

import hashlib
from typing import Any

from litestar import Request
from litestar.di import NamedDependency

from service.errors import Unauthorized
from service.settings import Settings

LOCAL_TENANT = "local"


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def tenant_of(request: Request, settings: Settings) -> str:
    """The tenant a request acts for; 401 without a valid key unless in local mode."""
    if settings.local_mode:
        return LOCAL_TENANT
    key = request.headers.get("x-api-key")
    auth = request.headers.get("authorization", "")
    if not key and auth.lower().startswith("bearer "):
        key = auth[7:].strip()
    if not key:
        raise Unauthorized("send an API key in the X-API-Key header (or Authorization: Bearer)")
    tenant = settings.api_key_hashes.get(hash_key(key))
    if tenant is None:
        raise Unauthorized("the API key is not valid")
    return tenant


def provide_tenant(request: Request[Any, Any, Any], settings: NamedDependency[Settings]) -> str:
    """The ``tenant`` dependency of every handler that acts for a tenant: `tenant_of`, resolved
    before the handler runs (so a request without a valid key is answered 401 before its
    body is read)."""
    return tenant_of(request, settings)
