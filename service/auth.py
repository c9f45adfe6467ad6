"""API keys -> tenants. Keys are compared by their sha256; the service never stores a key.

Programs send the key in a header. A browser cannot, so `/login` (service.pages) checks the
key and opens a server-side session (service.sessions): the cookie (``SESSION_COOKIE``,
``SECURE_SESSION_COOKIE`` over HTTPS; HttpOnly, SameSite=Strict) holds a random token that
Redis maps to the key's hash until it expires or `/logout` revokes it; every route accepts
it too. Every write a browser can make with that cookie (POST, DELETE, and /login and
/logout themselves) must carry an ``Origin`` header naming this service (`request_origin`),
else 403. SameSite=Strict already keeps the cookie off cross-site requests; the origin check
is the second lock, and the only one for /login, where a forged sign-in would put the
victim's browser into the attacker's tenant.
"""

from __future__ import annotations

import hashlib
from typing import Any

from litestar import Request
from litestar.di import NamedDependency

from service.errors import Forbidden, Unauthorized
from service.queue import AuditQueue
from service.sessions import session_tenant
from service.settings import Settings

LOCAL_TENANT = "local"
SESSION_COOKIE = "vitaudit_session"
# Over HTTPS the cookie is "__Host-" prefixed: browsers accept such a cookie only from this
# host itself (Secure, Path=/, no Domain), so a sibling subdomain cannot plant one. Over HTTPS
# only that name is read.
SECURE_SESSION_COOKIE = "__Host-vitaudit_session"
_SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def sends_header_key(request: Request[Any, Any, Any]) -> bool:
    """Whether the request carries credentials in a header (X-API-Key or Authorization), as
    programs do; a browser signed in by the session cookie sends neither."""
    return "x-api-key" in request.headers or "authorization" in request.headers


def tenant_for_key(key: str, settings: Settings) -> str | None:
    """The tenant an API key belongs to, or None for an unknown key."""
    return settings.api_key_hashes.get(hash_key(key))


def _first(value: str | None) -> str:
    """The first entry of a comma-separated proxy header, trimmed and lower-cased."""
    return (value or "").split(",")[0].strip().lower()


def request_origin(request: Request[Any, Any, Any], settings: Settings) -> str:
    """``scheme://host[:port]`` as a browser on this service names it in ``Origin``:
    VITAUDIT_PUBLIC_ORIGIN when set; else the first X-Forwarded-Proto and X-Forwarded-Host
    (what a proxy says it rewrote), falling back to the request's own scheme and Host. A
    page on another site cannot set these headers on a request it forges."""
    if settings.public_origin:
        return settings.public_origin
    scheme = _first(request.headers.get("x-forwarded-proto")) or request.url.scheme.lower()
    host = _first(request.headers.get("x-forwarded-host")) or _first(request.headers.get("host"))
    return f"{scheme}://{host}"


def is_https(request: Request[Any, Any, Any], settings: Settings) -> bool:
    return request_origin(request, settings).startswith("https://")


def session_cookie_name(request: Request[Any, Any, Any], settings: Settings) -> str:
    """The session cookie this request's scheme uses (see ``SECURE_SESSION_COOKIE``)."""
    return SECURE_SESSION_COOKIE if is_https(request, settings) else SESSION_COOKIE


def check_same_origin(request: Request[Any, Any, Any], settings: Settings) -> None:
    """403 unless the request's ``Origin`` is this service (`request_origin`)."""
    origin = (request.headers.get("origin") or "").strip().rstrip("/").lower()
    if origin != request_origin(request, settings):
        raise Forbidden(
            "a browser write must come from this service's own pages (its Origin header "
            f"names {origin or 'nothing'}, not {request_origin(request, settings)}); "
            "programs send the API key in X-API-Key"
        )


def tenant_of(request: Request[Any, Any, Any], settings: Settings, queue: AuditQueue) -> str:
    """The tenant a request acts for; 401 without a valid key or session unless in local
    mode (403 for a cross-origin write that only a session cookie authenticates)."""
    if settings.local_mode:
        return LOCAL_TENANT
    key = request.headers.get("x-api-key")
    auth = request.headers.get("authorization", "")
    if not key and auth.lower().startswith("bearer "):
        key = auth[7:].strip()
    if key:
        tenant = tenant_for_key(key, settings)
        if tenant is None:
            raise Unauthorized("the API key is not valid")
        return tenant
    token = request.cookies.get(session_cookie_name(request, settings))
    if not token:
        raise Unauthorized(
            "send an API key in the X-API-Key header (or Authorization: Bearer), "
            "or sign in at /login in a browser"
        )
    tenant = session_tenant(queue.redis, token, settings)
    if tenant is None:
        raise Unauthorized("the session has ended (signed out or expired); sign in again at /login")
    if request.method not in _SAFE_METHODS:
        check_same_origin(request, settings)
    return tenant


def provide_tenant(
    request: Request[Any, Any, Any],
    settings: NamedDependency[Settings],
    queue: NamedDependency[AuditQueue],
) -> str:
    """The ``tenant`` dependency of every handler that acts for a tenant: `tenant_of`, resolved
    before the handler runs (so a request without a valid key is answered 401 before its
    body is read)."""
    return tenant_of(request, settings, queue)


def provide_page_tenant(
    request: Request[Any, Any, Any],
    settings: NamedDependency[Settings],
    queue: NamedDependency[AuditQueue],
) -> str | None:
    """The ``page_tenant`` dependency of the HTML pages: the tenant, or None for a browser
    that is not signed in (the page then sends it to /login). A request that sent a key in
    a header gets the API's 401 for a bad one, not a redirect."""
    try:
        return tenant_of(request, settings, queue)
    except Unauthorized:
        if sends_header_key(request):
            raise
        return None
