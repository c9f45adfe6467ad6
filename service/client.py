"""The client side of `vitaudit`: submit a checkpoint, follow the audit, fetch its files.

Talks to the API over HTTP only (httpx), so it runs anywhere the CLI is installed.
"""

from __future__ import annotations

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


class ServiceError(Exception):
    """The service refused the request or could not be reached; the message says why."""


class AuditClient:
    def __init__(self, base_url: str | None = None, api_key: str | None = None, *, timeout: float = 60) -> None:
        self.base_url = (base_url or os.environ.get("VITAUDIT_URL") or DEFAULT_URL).rstrip("/")
        key = api_key if api_key is not None else os.environ.get("VITAUDIT_API_KEY")
        headers = {"X-API-Key": key} if key else {}
        self.http = httpx.Client(base_url=self.base_url, headers=headers, timeout=timeout)

    def close(self) -> None:
        self.http.close()

    def _call(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        attempts = 4
        for attempt in range(attempts):
            try:
                response = self.http.request(method, path, **kwargs)
            except httpx.TransportError as exc:
                if attempt == attempts - 1 or "files" in kwargs:
                    raise ServiceError(f"cannot reach vitaudit at {self.base_url}: {exc}") from None
                time.sleep(0.5 * 2**attempt)
                continue
            if response.status_code in (502, 503, 504) and attempt < attempts - 1 and "files" not in kwargs:
                time.sleep(0.5 * 2**attempt)
                continue
            if response.status_code >= 400:
                try:
                    body = response.json()
                    detail = f"{body.get('title', 'error')}: {body.get('detail', '')}"
                except ValueError:
                    detail = response.text[:200]
                raise ServiceError(f"{method} {path} -> {response.status_code} {detail}")
            return response
        raise AssertionError("unreachable")

    def submit(
        self,
        checkpoint: Path | list[Path],
        arch: str,
        *,
        images: list[Path] | None = None,
        labels: list[int] | None = None,
        options: dict[str, Any] | None = None,
        steps: list[int] | None = None,
    ) -> dict[str, Any]:
        """Upload one checkpoint, or the checkpoints of one training run (with their steps)."""
        checkpoints = checkpoint if isinstance(checkpoint, list) else [checkpoint]
        data = {"arch": arch}
        if steps is not None:
            data["steps"] = json.dumps(steps)
        if options:
            data["options"] = json.dumps(options)
        if labels is not None:
            data["labels"] = json.dumps(labels)
        handles = [("checkpoint", (p.name, p.open("rb"))) for p in checkpoints]
        handles += [("images", (p.name, p.open("rb"))) for p in images or []]
        try:
            return self._call("POST", "/v1/audits", data=data, files=handles).json()
        finally:
            for _, (_, handle) in handles:
                handle.close()

    def status(self, audit_id: str) -> dict[str, Any]:
        return self._call("GET", f"/v1/audits/{audit_id}").json()

    def wait(
        self, audit_id: str, *, timeout: float = 3600, on_progress: Callable[[dict[str, Any]], None] | None = None
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
            self.stream.write(f"\r{self.label} [{'#' * filled}{'.' * (30 - filled)}] {progress:4.0%} {stage:<22}")
            if state["status"] in TERMINAL:
                self.stream.write("\n")
        else:
            line = f"{self.label}: {state['status']} {stage} {progress:.0%}"
            if line != self.last:
                self.stream.write(line + "\n")
                self.last = line
        self.stream.flush()


def _audit_command(args: Any) -> int:
    client = AuditClient(args.server)
    try:
        options = json.loads(args.options) if args.options else None
        images = sorted(p for p in Path(args.images).iterdir() if p.is_file()) if args.images and Path(args.images).is_dir() else (
            [Path(args.images)] if args.images else None
        )
        labels = json.loads(Path(args.labels).read_text()) if args.labels else None
        created = client.submit(Path(args.checkpoint), args.arch, images=images, labels=labels, options=options)
        state = client.wait(created["id"], on_progress=ProgressPrinter(created["id"][:8]))
        if state["status"] == "failed":
            error = state.get("error") or {}
            print(f"audit {created['id']} failed: {error.get('detail', 'no reason given')}", file=sys.stderr)
            return EXIT_ERROR
        out = Path(args.out or f"vitaudit-{created['id'][:8]}")
        client.download(created["id"], out)
        print(f"report: {out / 'report.json'}")
        return EXIT_OK
    except (ServiceError, OSError, json.JSONDecodeError) as exc:
        print(f"vitaudit: {exc}", file=sys.stderr)
        return EXIT_ERROR
    finally:
        client.close()


def add_commands(commands: Any) -> None:
    audit = commands.add_parser("audit", help="submit a checkpoint, wait, download the report")
    audit.add_argument("checkpoint")
    audit.add_argument("--arch", required=True, help="timm model name, e.g. vit_small_patch16_224")
    audit.add_argument("--images", help="a folder of images or one .zip/.tar archive")
    audit.add_argument("--labels", help="a JSON file with a list of class indices, one per image")
    audit.add_argument("--options", help="JSON options, e.g. '{\"analyses\": [\"heads\"]}'")
    audit.add_argument("--server", help="API URL (default: $VITAUDIT_URL or http://127.0.0.1:8000)")
    audit.add_argument("--out", help="folder for the report and artifacts")
    audit.set_defaults(run=_audit_command)
    demo = commands.add_parser("demo", help="train a small ViT here and audit its trajectory")
    demo.add_argument("--out", default="vitaudit-demo", help="folder for reports and plots")
    demo.add_argument("--port", type=int, default=8765, help="port of the stack the demo starts")
    demo.add_argument("--server", help="use a running service at this URL instead of starting one")
    demo.add_argument("--schedule", choices=("default", "quick"), default="default", help="training schedule")
    demo.set_defaults(run=_demo_command)


def _demo_command(args: Any) -> int:
    from workers.demo import run  # imports torch: only the demo needs it on the client side

    return run(args)
