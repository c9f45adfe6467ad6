"""The client side of `vitaudit`: submit a checkpoint, follow the audit, fetch its files.

Talks to the API over HTTP only (httpx), so it runs anywhere the CLI is installed.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

DEFAULT_URL = "http://127.0.0.1:8000"
TERMINAL = {"finished", "failed"}
EXIT_OK, EXIT_POLICY_VIOLATED, EXIT_ERROR = 0, 1, 2


RETRY_STATUSES = (502, 503, 504)  # transient: a proxy or the API restarting; never a 4xx
ATTEMPTS = 4  # backoff 0.5, 1, 2 s between them


class ServiceError(Exception):
    """The service refused the request or could not be reached; the message says why."""

    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


class AuditClient:
    def __init__(
        self, base_url: str | None = None, api_key: str | None = None, *, timeout: float = 60
    ) -> None:
        self.base_url = (base_url or os.environ.get("VITAUDIT_URL") or DEFAULT_URL).rstrip("/")
        key = api_key if api_key is not None else os.environ.get("VITAUDIT_API_KEY")
        headers = {"X-API-Key": key} if key else {}
        self.http = httpx.Client(base_url=self.base_url, headers=headers, timeout=timeout)

    def close(self) -> None:
        self.http.close()

    def _call(
        self,
        method: str,
        path: str,
        *,
        files: Callable[[], list[tuple[str, tuple[str | None, Any]]]] | None = None,
        **kwargs: Any,
    ) -> httpx.Response:
        """One request; transport errors and 502/503/504 are retried with backoff, a 4xx never.

        ``files`` opens the upload's files afresh for every attempt (a retried upload must
        start from the first byte).
        """
        for attempt in range(ATTEMPTS):
            handles = files() if files else None
            try:
                response = self.http.request(method, path, files=handles, **kwargs)
            except httpx.TransportError as exc:
                if attempt == ATTEMPTS - 1:
                    raise ServiceError(f"cannot reach vitaudit at {self.base_url}: {exc}") from None
                time.sleep(0.5 * 2**attempt)
                continue
            finally:
                for _, (_, handle) in handles or []:
                    if hasattr(handle, "close"):
                        handle.close()
            if response.status_code in RETRY_STATUSES and attempt < ATTEMPTS - 1:
                time.sleep(0.5 * 2**attempt)
                continue
            if response.status_code >= 400:
                try:
                    body = response.json()
                    detail = f"{body.get('title', 'error')}: {body.get('detail', '')}"
                except ValueError:
                    detail = response.text[:200]
                raise ServiceError(
                    f"{method} {path} -> {response.status_code} {detail}",
                    status=response.status_code,
                )
            return response
        raise AssertionError("unreachable")

    def has_checkpoint(self, sha256: str) -> bool:
        """Whether the service already holds a checkpoint with this sha256 (for this tenant)."""
        try:
            self._call("GET", f"/v1/checkpoints/{sha256}")
        except ServiceError as exc:
            if exc.status == 404:
                return False
            raise
        return True

    def submit(
        self,
        checkpoint: Path | list[Path],
        arch: str | None,
        *,
        images: list[Path] | None = None,
        labels: list[int] | None = None,
        options: dict[str, Any] | None = None,
        steps: list[int] | None = None,
        policy: str | None = None,
        checkpoint_sha256: str | None = None,
        reuse: bool = True,
    ) -> dict[str, Any]:
        """Upload one checkpoint, or the checkpoints of one training run (with their steps).

        With ``checkpoint_sha256`` (of a file the service already holds) the checkpoint is not
        uploaded again. The answer has ``cached: true`` when an identical earlier request
        answered it (no new job).
        """
        checkpoints = checkpoint if isinstance(checkpoint, list) else [checkpoint]
        data = {"arch": arch} if arch else {}  # a transformers folder's config names the model
        if checkpoint_sha256:
            data["checkpoint_sha256"] = checkpoint_sha256
            checkpoints = []
        if policy:
            data["policy"] = policy
        if not reuse:
            data["cache"] = "false"
        if steps is not None:
            data["steps"] = json.dumps(steps)
        if options:
            data["options"] = json.dumps(options)
        if labels is not None:
            data["labels"] = json.dumps(labels)

        def files() -> list[tuple[str, tuple[str | None, Any]]]:
            handles = [("checkpoint", (p.name, p.open("rb"))) for p in checkpoints]
            return handles + [("images", (p.name, p.open("rb"))) for p in images or []]

        if not checkpoints and not images:
            # Without a file httpx would send a urlencoded body; the API reads multipart only,
            # so the text fields go as file-less parts.
            return self._call(
                "POST", "/v1/audits", files=lambda: [(k, (None, v)) for k, v in data.items()]
            ).json()
        return self._call("POST", "/v1/audits", data=data, files=files).json()

    def status(self, audit_id: str) -> dict[str, Any]:
        return self._call("GET", f"/v1/audits/{audit_id}").json()

    def wait(
        self,
        audit_id: str,
        *,
        timeout: float = 3600,
        on_progress: Callable[[dict[str, Any]], None] | None = None,
    ) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        delay = 0.2
        while True:
            state = self.status(audit_id)
            if on_progress:
                on_progress(state)
            if state["status"] in TERMINAL:
                return state
            if time.monotonic() > deadline:
                raise ServiceError(f"audit {audit_id} did not finish within {timeout:.0f} s")
            time.sleep(delay)
            delay = min(delay * 1.5, 2.0)

    def report(self, audit_id: str) -> dict[str, Any]:
        return self._call("GET", f"/v1/audits/{audit_id}/report").json()

    def report_page(self, audit_id: str) -> str:
        """The audit's self-contained HTML report (every plot inlined)."""
        return self._call("GET", f"/v1/audits/{audit_id}/report.html").text

    def download(self, audit_id: str, out: Path) -> list[Path]:
        out.mkdir(parents=True, exist_ok=True)
        names = self._call("GET", f"/v1/audits/{audit_id}/artifacts").json()["artifacts"]
        paths = []
        for name in names:
            path = out / name
            path.write_bytes(self._call("GET", f"/v1/audits/{audit_id}/artifacts/{name}").content)
            paths.append(path)
        return paths


class ProgressPrinter:
    """A one-line progress bar on a terminal; plain lines (on change only) elsewhere."""

    def __init__(self, label: str, stream: Any = None) -> None:
        self.label = label
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.last = ""

    def __call__(self, state: dict[str, Any]) -> None:
        progress = float(state.get("progress") or 0.0)
        stage = state.get("stage") or state["status"]
        if self.tty:
            filled = int(progress * 30)
            self.stream.write(
                f"\r{self.label} [{'#' * filled}{'.' * (30 - filled)}] {progress:4.0%} {stage:<22}"
            )
            if state["status"] in TERMINAL:
                self.stream.write("\n")
        else:
            status = state["status"]
            line = (
                f"{self.label}: {status}{'' if stage == status else f' ({stage})'} {progress:.0%}"
            )
            if line != self.last:
                self.stream.write(line + "\n")
                self.last = line
        self.stream.flush()
