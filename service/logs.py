"""One logging setup for the API and the worker: one JSON object per line (or plain text).

Every record passes through `AuditIdFilter`, which stamps it with the audit id bound to the
current context (`audit_context`): the worker binds it for the whole job, the API for the
request that names an audit. `VITAUDIT_LOG_FORMAT=json|text` picks the format (json by default).
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Any

AUDIT_ID: ContextVar[str | None] = ContextVar("vitaudit_audit_id", default=None)
LOG_FORMATS = ("json", "text")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s [%(audit_id)s] %(message)s"

# Attributes every LogRecord has; anything else on a record came from `extra=` and is logged.
_RECORD_ATTRS = frozenset(vars(logging.makeLogRecord({}))) | {
    "message",
    "asctime",
    "taskName",
    "color_message",  # uvicorn repeats the message with terminal colours
    "audit_id",
}
# RQ colours parts of its messages with ANSI escapes; a log line is data, not a terminal.
_ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*m")


@contextmanager
def audit_context(audit_id: str) -> Iterator[None]:
    """Bind `audit_id` to every log record emitted in this context (and in a fork of it)."""
    token = AUDIT_ID.set(audit_id)
    try:
        yield
    finally:
        AUDIT_ID.reset(token)


def bind_audit_id(audit_id: str) -> None:
    """Bind `audit_id` for the rest of the current context (an API request's task)."""
    AUDIT_ID.set(audit_id)


class AuditIdFilter(logging.Filter):
    """Stamp each record with the bound audit id, unless the caller passed one in `extra`."""

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "audit_id", None) is None:
            record.audit_id = AUDIT_ID.get()
        return True


def log_entry(record: logging.LogRecord, exception_text: str | None = None) -> dict[str, Any]:
    """The JSON object for one record: timestamp (UTC, ISO 8601), level, logger, message,
    audit_id when one is bound, and the record's `extra` fields."""
    entry: dict[str, Any] = {
        "timestamp": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
        "level": record.levelname,
        "logger": record.name,
        "message": _ANSI_ESCAPE.sub("", record.getMessage()),
    }
    audit_id = getattr(record, "audit_id", None)
    if audit_id is not None:
        entry["audit_id"] = audit_id
    for key, value in vars(record).items():
        if key not in _RECORD_ATTRS and not key.startswith("_"):
            entry[key] = value
    if exception_text:
        entry["exception"] = exception_text
    return entry


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        exception_text = self.formatException(record.exc_info) if record.exc_info else None
        return json.dumps(log_entry(record, exception_text), default=str, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__(TEXT_FORMAT)

    def format(self, record: logging.LogRecord) -> str:
        if getattr(record, "audit_id", None) is None:
            record.audit_id = "-"
        return super().format(record)


def configure_logging(log_format: str | None = None, level: int | str = logging.INFO) -> None:
    """Send every logger's records (ours, uvicorn's, RQ's) to stderr through one handler."""
    chosen = (log_format or os.environ.get("VITAUDIT_LOG_FORMAT") or "json").strip().lower()
    if chosen not in LOG_FORMATS:
        raise SystemExit(
            f"VITAUDIT_LOG_FORMAT must be one of {', '.join(LOG_FORMATS)}, not '{chosen}'"
        )
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(AuditIdFilter())
    handler.setFormatter(JsonFormatter() if chosen == "json" else TextFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    # uvicorn and RQ attach their own handlers unless told otherwise; route theirs to ours.
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access", "rq.worker", "rq.job"):
        logger = logging.getLogger(name)
        logger.handlers.clear()
        logger.propagate = True
    logging.captureWarnings(True)
