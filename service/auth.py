"""API keys -> tenants. Keys are compared by their sha256; the service never stores a key.

Programs send the key in a header. A browser cannot, so `/login` (service.pages) puts it in
a session cookie (``SESSION_COOKIE``, HttpOnly, SameSite=Strict, base64url of the key; gone
when the browser closes), which every route then accepts too. A write (POST, DELETE)
authenticated by that cookie alone must come from this origin: its ``Origin`` header must
name this host, else 403. SameSite=Strict already keeps the cookie off cross-site requests;
the origin check is the second lock.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from typing import Any
from urllib.parse import urlsplit

from litestar import Request
from litestar.di import NamedDependency

from service.errors import Forbidden, Unauthorized
from service.settings import Settings

LOCAL_TENANT = "local"
SESSION_COOKIE = "vitaudit_session"
_SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def encode_session(key: str) -> str:
    """The cookie value for an API key: base64url, so any key is a valid cookie value."""
    return base64.urlsafe_b64encode(key.encode()).decode()


def decode_session(value: str) -> str | None:
    try:
        return base64.urlsafe_b64decode(value.encode()).decode()
    except (binascii.Error, UnicodeDecodeError, ValueError):
        return None


def tenant_for_key(key: str, settings: Settings) -> str | None:
    """The tenant an API key belongs to, or None for an unknown key."""
    return settings.api_key_hashes.get(hash_key(key))


def _same_origin(request: Request[Any, Any, Any]) -> bool:
    origin = request.headers.get("origin")
    return bool(origin) and urlsplit(origin).netloc == request.headers.get("host")


def tenant_of(request: Request[Any, Any, Any], settings: Settings) -> str:
    """The tenant a request acts for; 401 without a valid key unless in local mode (403 for
    a cross-origin write that only a session cookie authenticates)."""
    if settings.local_mode:
        return LOCAL_TENANT
    key = request.headers.get("x-api-key")
    auth = request.headers.get("authorization", "")
    if not key and auth.lower().startswith("bearer "):
        key = auth[7:].strip()
    from_cookie = False
    if not key and SESSION_COOKIE in request.cookies:
        key = decode_session(request.cookies[SESSION_COOKIE])
        from_cookie = True
    if not key:
        raise Unauthorized(
            "send an API key in the X-API-Key header (or Authorization: Bearer), "
            "or sign in at /login in a browser"
        )
    tenant = tenant_for_key(key, settings)
    if tenant is None:
        raise Unauthorized("the API key is not valid")
    if from_cookie and request.method not in _SAFE_METHODS and not _same_origin(request):
        raise Forbidden(
            "a write signed in by the browser session must come from this service's own "
            "pages (Origin header); programs send the API key in X-API-Key"
        )
    return tenant


def provide_tenant(request: Request[Any, Any, Any], settings: NamedDependency[Settings]) -> str:
    """The ``tenant`` dependency of every handler that acts for a tenant: `tenant_of`, resolved
    before the handler runs (so a request without a valid key is answered 401 before its
    body is read)."""
    return tenant_of(request, settings)


def provide_page_tenant(
    request: Request[Any, Any, Any], settings: NamedDependency[Settings]
) -> str | None:
    """The ``page_tenant`` dependency of the HTML pages: the tenant, or None where the API
    would answer 401 (the page then sends the browser to /login)."""
    try:
        return tenant_of(request, settings)
    except Unauthorized:
        return None
