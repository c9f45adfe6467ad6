"""Domain errors, mapped to problem-details responses in one place."""

from __future__ import annotations

import errno
import logging
import re
from pathlib import Path

import msgspec
from litestar import Request, Response
from litestar.exceptions import HTTPException, ValidationException
from litestar.openapi.datastructures import ResponseSpec
from redis.exceptions import RedisError

log = logging.getLogger("vitaudit.service")

PROBLEM_JSON = "application/problem+json"

# What an error message must never show a client (SECURITY.md, "Secrets never echoed"):
# credentials in URLs ("redis://:secret@host" -> "redis://***@host") and in key=value pairs,
# the command lines of programs (subprocess's "Command '[...]' returned ..."), and local
# paths: an absolute path whose first directory exists on this machine ("/tmp/x/inputs",
# "/home/...") becomes "<path>", while the service's own URLs ("/v1/audits/...", "/login")
# stay, since no such directory exists at the root.
_URL_CREDENTIALS = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://)[^\s/@'\"]*@")
_KEY_VALUE_SECRETS = re.compile(
    r"(?i)\b(password|passwd|pwd|secret|token|api[_-]?key|access[_-]?key)(\s*=\s*)[^\s&,;'\"]+"
)
_COMMAND_LINE = re.compile(r"Command (['\"]).*?\1 (returned|died)")
_ABSOLUTE_PATH = re.compile(r"(?<![\w./:~-])/([\w.+@-]+)(?:/[\w.+@=-]*)*")


def _local_path(match: re.Match[str]) -> str:
    first = match.group(1)
    return "<path>" if first not in (".", "..") and Path("/", first).is_dir() else match.group(0)


def redact(text: str) -> str:
    """``text`` without credentials, command lines or local paths: what every problem
    detail and job error passes through before a client sees it."""
    text = _URL_CREDENTIALS.sub(r"\1***@", text)
    text = _KEY_VALUE_SECRETS.sub(r"\1\2***", text)
    text = _COMMAND_LINE.sub(r"a helper program \2", text)
    return _ABSOLUTE_PATH.sub(_local_path, text)


class ServiceError(Exception):
    """An error with an HTTP status and a message that says what to fix."""

    status_code = 400
    title = "Invalid request"

    def __init__(self, detail: str, *, headers: dict[str, str] | None = None) -> None:
        super().__init__(detail)
        self.detail = detail
        self.headers = headers or {}


class InvalidRequest(ServiceError):
    status_code, title = 400, "Invalid request"


class Unauthorized(ServiceError):
    status_code, title = 401, "Unauthorized"


class Forbidden(ServiceError):
    status_code, title = 403, "Forbidden"


class NotFound(ServiceError):
    status_code, title = 404, "Not found"


class NotReady(ServiceError):
    status_code, title = 409, "Report not ready"


class TooLarge(ServiceError):
    status_code, title = 413, "Upload too large"


class UnsupportedMediaType(ServiceError):
    status_code, title = 415, "Unsupported media type"


class CheckpointError(ServiceError):
    status_code, title = 422, "Checkpoint or architecture rejected"


class ImageError(ServiceError):
    status_code, title = 422, "Images rejected"


class LimitExceeded(ServiceError):
    status_code, title = 429, "Limit exceeded"


class QueueUnavailable(ServiceError):
    status_code, title = 503, "Queue unavailable"


class InsufficientStorage(ServiceError):
    status_code, title = 507, "Insufficient storage"


class Problem(msgspec.Struct):
    """The body of every error response (RFC 9457 problem details, media type application/problem+json)."""

    status: int
    title: str
    detail: str


# What each error status means here, for the OpenAPI contract.
PROBLEM_DESCRIPTIONS = {
    400: "Invalid request: the detail says what to fix",
    401: "No API key, or an unknown one",
    403: "A browser session's write came from another origin",
    404: "No such audit or file (also another tenant's)",
    409: "The report is not ready: the audit is queued, running or failed",
    413: "Upload too large",
    415: "Unsupported media type",
    422: "Checkpoint, architecture or images rejected",
    429: "Over a tenant limit; see Retry-After",
    500: "The service failed; the error is in its logs",
    503: "The job queue (Redis) is unavailable",
    507: "The artifact store is full",
}


def problem_responses(*statuses: int) -> dict[int, ResponseSpec]:
    """OpenAPI declarations of the problem-details responses a handler can give: the statuses
    named, plus 400, 401, 500 and 503, which any API route can answer."""
    codes = sorted({400, 401, 500, 503, *statuses})
    return {
        code: ResponseSpec(
            Problem,
            description=PROBLEM_DESCRIPTIONS[code],
            media_type=PROBLEM_JSON,
            generate_examples=False,
        )
        for code in codes
    }


def problem(
    status: int, title: str, detail: str, headers: dict[str, str] | None = None
) -> Response:
    return Response(
        {"status": status, "title": title, "detail": redact(detail)},
        status_code=status,
        media_type=PROBLEM_JSON,
        headers=headers,
    )


def service_error_handler(_: Request, exc: ServiceError) -> Response:
    return problem(exc.status_code, exc.title, exc.detail, exc.headers)


def http_exception_handler(_: Request, exc: HTTPException) -> Response:
    status = exc.status_code
    if isinstance(exc, ValidationException):
        extra = exc.extra if isinstance(exc.extra, list) else []
        parts = [
            f"{e.get('key', '')}: {e.get('message', '')}".strip(": ")
            for e in extra
            if isinstance(e, dict)
        ]
        detail = "; ".join(p for p in parts if p) or exc.detail
        return problem(400, "Invalid request", detail)
    titles = {404: "Not found", 405: "Method not allowed", 413: "Upload too large"}
    return problem(status, titles.get(status, "Request failed"), exc.detail, exc.headers)


def internal_error_handler(request: Request, exc: Exception) -> Response:
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return problem(
            507, InsufficientStorage.title, "the artifact store is full; try again later"
        )
    log.exception("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return problem(500, "Internal server error", "the service failed; the error is in its logs")


def redis_error_handler(_: Request, exc: RedisError) -> Response:
    log.warning("Redis unavailable: %s", exc)
    return problem(503, QueueUnavailable.title, f"the job queue (Redis) is unavailable: {exc}")


EXCEPTION_HANDLERS = {
    ServiceError: service_error_handler,
    HTTPException: http_exception_handler,
    RedisError: redis_error_handler,
    Exception: internal_error_handler,
}
