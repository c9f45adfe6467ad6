"""What every HTTP exchange passes through before routing: security headers on every
response, HEAD answered like GET, and, in local mode, the checks that keep a web page the
user visits from driving the service (SECURITY.md, "Local mode").

Local mode (`vitaudit up`) needs no key, so the browser is the only thing between another
site and the API. Two checks stand in for the key:

- ``Host`` must name this service: ``localhost`` or an IP literal (``127.0.0.1``, ``[::1]``,
  the address of a host that serves it on a network) with the port the server listens on, or
  the host of VITAUDIT_PUBLIC_ORIGIN. A DNS-rebinding page reaches the service under its own
  domain name, so its requests carry that name and are refused (421).
- A state-changing request (POST, PUT, PATCH, DELETE) that carries ``Origin`` must carry this
  service's own origin (403). Programs send no ``Origin``; browsers always do on such requests,
  ``null`` included, which is refused too.
"""

from __future__ import annotations

import ipaddress
import json
from typing import Any

from litestar.types import ASGIApp, Message, Receive, Scope, Send

from service.errors import PROBLEM_JSON, redact
from service.settings import Settings

STATE_CHANGING = frozenset({"POST", "PUT", "PATCH", "DELETE"})
LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})
# Sent with every response. Pages set their own Content-Security-Policy; everything else
# (JSON, problems, artifacts) gets DEFAULT_CSP, so an artifact opened in a tab runs nothing.
# "same-origin", not "no-referrer": under the latter a browser sends "Origin: null" with the
# pages' own form posts, which the origin checks must refuse.
SECURITY_HEADERS = {
    "x-content-type-options": "nosniff",
    "x-frame-options": "DENY",
    "referrer-policy": "same-origin",
}
DEFAULT_CSP = "default-src 'none'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'"
FRAME_ANCESTORS = "frame-ancestors 'none'"
FILE_EXTENSIONS = frozenset({"http.response.pathsend", "http.response.zerocopysend"})


def split_host(host: str) -> tuple[str, int | None]:
    """``("example.org", 8000)`` for ``"example.org:8000"``, ``("::1", None)`` for ``"[::1]"``;
    lower-cased; the port is None when absent and -1 when not a number."""
    host = host.strip().lower()
    if host.startswith("["):
        name, _, rest = host[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else ""
    elif host.count(":") == 1:
        name, _, port = host.partition(":")
    else:
        name, port = host, ""
    if not port:
        return name, None
    return name, int(port) if port.isdigit() else -1


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def host_is_local(host: str, bound: tuple[str, int | None] | None, public_origin: str) -> bool:
    """Whether a local-mode request's ``Host`` names this service (see the module doc):
    ``bound`` is the (address, port) the connection reached, as ASGI's ``server`` gives it."""
    if public_origin and host.strip().lower() == public_origin.partition("://")[2]:
        return True
    name, port = split_host(host)
    if bound is not None and bound[1] is not None and (80 if port is None else port) != bound[1]:
        return False  # local mode is plain HTTP: no port means 80
    return name in LOOPBACK_NAMES or _is_ip(name)


def origin_is_local(origin: str, scheme: str, host: str, public_origin: str) -> bool:
    """Whether ``Origin`` is this service as the request reached it (``scheme://host``) or
    its public origin."""
    origin = origin.strip().rstrip("/").lower()
    return origin in {f"{scheme}://{host.strip().lower()}", public_origin} - {""}


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope["headers"]:
        if key.lower() == name:
            return value.decode("latin-1")
    return None


async def _refuse(send: Send, status: int, title: str, detail: str) -> None:
    body = json.dumps({"status": status, "title": title, "detail": redact(detail)}).encode()
    headers = [
        (b"content-type", PROBLEM_JSON.encode()),
        (b"content-length", str(len(body)).encode()),
    ]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def local_mode_refusal(scope: Scope, settings: Settings) -> tuple[int, str, str] | None:
    """(status, title, detail) when a local-mode request must be refused, else None."""
    host = _header(scope, b"host") or ""
    server = scope.get("server")
    if not host_is_local(host, server, settings.public_origin):
        return (
            421,
            "Misdirected request",
            f"this service runs in local mode and answers only to its own address, not to "
            f"Host '{host}'; use http://127.0.0.1 or http://localhost with its port, or set "
            "VITAUDIT_PUBLIC_ORIGIN",
        )
    origin = _header(scope, b"origin")
    scheme = scope.get("scheme", "http")
    foreign = origin is not None and not origin_is_local(
        origin, scheme, host, settings.public_origin
    )
    if scope["method"] in STATE_CHANGING and foreign:
        return (
            403,
            "Forbidden",
            f"a write from another site (Origin '{origin}') is refused: this service "
            "runs in local mode, without an API key",
        )
    return None


def _with_security_headers(headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    present = {key.lower(): i for i, (key, _) in enumerate(headers)}
    out = list(headers)
    for name, value in SECURITY_HEADERS.items():
        if name.encode() not in present:
            out.append((name.encode(), value.encode()))
    csp_index = present.get(b"content-security-policy")
    if csp_index is None:
        out.append((b"content-security-policy", DEFAULT_CSP.encode()))
    elif b"frame-ancestors" not in out[csp_index][1]:
        out[csp_index] = (out[csp_index][0], out[csp_index][1] + f"; {FRAME_ANCESTORS}".encode())
    return out


def harden(app: ASGIApp, settings: Settings) -> ASGIApp:
    """Wrap an ASGI app (outside routing, so unknown paths are covered too) with the local-mode
    checks, the security headers, and HEAD served as a GET without its body."""

    async def hardened(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await app(scope, receive, send)
            return
        head = scope["method"] == "HEAD"

        async def send_hardened(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": _with_security_headers(list(message["headers"]))}
            elif head and message["type"] == "http.response.body":
                message = {**message, "body": b""}
            await send(message)

        refusal = local_mode_refusal(scope, settings) if settings.local_mode else None
        if refusal is not None:
            await _refuse(send_hardened, *refusal)
            return
        if not head:
            await app(scope, receive, send_hardened)
            return
        # Without the extensions that send a file by path: every body must pass send_hardened.
        extensions = {
            k: v for k, v in (scope.get("extensions") or {}).items() if k not in FILE_EXTENSIONS
        }
        inner: dict[str, Any] = {**scope, "method": "GET", "extensions": extensions}
        try:
            await app(inner, receive, send_hardened)  # type: ignore[arg-type]
        finally:  # what routing learnt, for the request log outside
            for key in ("path_template", "path_params"):
                if key in inner:
                    scope[key] = inner[key]  # type: ignore[literal-required]

    return hardened  # type: ignore[return-value]
