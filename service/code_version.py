"""Which analysis code decides a report: vitaudit's release plus a digest of its source.

The API puts it in the request cache key and in request.json; the worker stamps every
report with its own (``versions.analysis_code``). Where the two differ, the worker ran other
code than the API that accepted the request: the report says so in a note, and the API does
not answer a later identical request with that report.

No Litestar and no torch here: both the API and the worker import it.
"""

from __future__ import annotations

import hashlib
import importlib.util
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any


def source_digest(root: Path) -> str:
    """sha256 over the relative path and bytes of every ``.py`` file under ``root``, in
    sorted order: changes whenever any of that code changes."""
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        digest.update(path.relative_to(root).as_posix().encode() + b"\0")
        digest.update(path.read_bytes() + b"\0")
    return digest.hexdigest()


def analysis_code_version() -> str:
    """``RELEASE+DIGEST``: vitaudit's version plus 16 hex digits of a digest of the code that
    decides a report, the `workers` package (found without importing it) and
    `service/policy.py` (the worker evaluates the policy into the report). Read from disk at
    each call (a few milliseconds), so the API sees an edited editable install without a
    restart; the worker calls it once at start-up, for the code it has imported."""
    try:
        release = version("vitaudit")
    except PackageNotFoundError:  # pragma: no cover - running from a source tree
        release = "unknown"
    spec = importlib.util.find_spec("workers")
    locations = list(spec.submodule_search_locations or []) if spec else []
    digest = hashlib.sha256()
    digest.update(source_digest(Path(locations[0])).encode() if locations else b"no-workers")
    digest.update(Path(__file__).with_name("policy.py").read_bytes())
    return f"{release}+{digest.hexdigest()[:16]}"


def code_skew_note(requested: str | None, running: str) -> str | None:
    """The report note when the worker's code differs from the API's at submit, else None
    (also for requests recorded before the API wrote its version)."""
    if requested is None or requested == running:
        return None
    return (
        f"analysis code differs: the API accepted this request running {requested}, this "
        f"worker runs {running}; the numbers are this worker's"
    )


def report_is_reusable(record: dict[str, Any], report: dict[str, Any] | None) -> bool:
    """Whether a finished report may answer a later identical request: unless the worker
    that wrote it stamped other analysis code than the API recorded at submit."""
    written_by = ((report or {}).get("versions") or {}).get("analysis_code")
    requested = record.get("analysis_code")
    return written_by is None or requested is None or written_by == requested
