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

from service import policy

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
        arch: str,
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
        data = {"arch": arch}
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
            line = f"{self.label}: {state['status']} {stage} {progress:.0%}"
            if line != self.last:
                self.stream.write(line + "\n")
                self.last = line
        self.stream.flush()


def _images_of(spec: str | None) -> list[Path] | None:
    """A folder's image files (sorted by name), or one archive / image file as given."""
    if not spec:
        return None
    path = Path(spec)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith("."))
        if not files:
            raise ValueError(f"--images folder '{spec}' holds no files")
        return files
    if not path.is_file():
        raise ValueError(f"--images '{spec}' is neither a folder nor a file")
    return [path]


def _read_json_file(path: str, what: str) -> Any:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ValueError(f"{what} '{path}' does not exist") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"{what} '{path}' is not JSON: {exc}") from None


def _load_policy(args: Any) -> tuple[list[policy.Rule] | None, dict[str, Any] | None]:
    """The policy's rules and the baseline report; ValueError (a usage error) when invalid."""
    baseline = _read_json_file(args.baseline, "--baseline report") if args.baseline else None
    if baseline is not None and not isinstance(baseline, dict):
        raise ValueError(f"--baseline report '{args.baseline}' is not a JSON object")
    if not args.policy:
        if baseline is not None:
            raise ValueError(
                "--baseline needs --policy: the policy's max_drop/max_rise rules compare with it"
            )
        return None, None
    try:
        rules = policy.parse_policy(Path(args.policy).read_text())
    except FileNotFoundError:
        raise ValueError(f"--policy file '{args.policy}' does not exist") from None
    except policy.PolicyError as exc:
        raise ValueError(f"policy {args.policy}: {exc}") from None
    relative = [r for r in rules if r.needs_baseline]
    if relative and baseline is None:
        raise ValueError(
            f"policy {args.policy}: rule {relative[0].index} ({relative[0].path}) uses max_drop/max_rise; "
            "give the report to compare with as --baseline REPORT"
        )
    return rules, baseline


def _write_outputs(
    args: Any, evaluation: dict[str, Any] | None, audit_id: str, client: AuditClient, out: Path
) -> None:
    if args.junit:
        junit = policy.to_junit(
            evaluation or {"rules": []}, suite=f"vitaudit policy ({args.checkpoint})"
        )
        Path(args.junit).parent.mkdir(parents=True, exist_ok=True)
        Path(args.junit).write_bytes(junit)
    if args.markdown:
        markdown_path = Path(args.markdown).resolve()
        plots = {}
        for png in sorted(out.glob("*.png")):
            try:
                plots[png.stem] = str(png.resolve().relative_to(markdown_path.parent))
            except ValueError:
                plots[png.stem] = f"{client.base_url}/v1/audits/{audit_id}/artifacts/{png.name}"
        text = policy.to_markdown(
            evaluation,
            title=f"vitaudit: {Path(args.checkpoint).name} ({args.arch})",
            audit_id=audit_id,
            report_url=f"{client.base_url}/v1/audits/{audit_id}/report",
            plots=plots,
        )
        markdown_path.parent.mkdir(parents=True, exist_ok=True)
        markdown_path.write_text(text)


def gradient_verdict_line(report: dict[str, Any]) -> str | None:
    """The gradient verdict in three states, one line: holds, does not hold, undecided."""
    verdict = (report.get("gradients") or {}).get("verdict")
    if not isinstance(verdict, dict) or "story_holds" not in verdict:
        return None
    holds = verdict["story_holds"]
    ci = verdict.get("margin_ci95")
    interval = f", 95% interval of the margin [{ci[0]:.3g}, {ci[1]:.3g}]" if ci else ""
    if holds is None:
        return f"gradients: UNDECIDED ({verdict.get('undecided_reason')}){interval}"
    return f"gradients: the story {'HOLDS' if holds else 'DOES NOT HOLD'}{interval}"


def _print_verdicts(evaluation: dict[str, Any]) -> None:
    for rule in evaluation["rules"]:
        print(f"  {rule['verdict'].upper():5} {rule['message']}")
    if evaluation["passed"]:
        print(f"policy passed: {len(evaluation['rules'])} rules hold")
    else:
        print(f"policy violated: {evaluation['failures']} failed, {evaluation['errors']} in error")


def _audit_command(args: Any) -> int:
    """Submit (or reuse), wait, download, gate: 0 policy holds, 1 violated, 2 usage/service error."""
    try:
        rules, baseline = _load_policy(args)
        options = json.loads(args.options) if args.options else None
        images = _images_of(args.images)
        labels = _read_json_file(args.labels, "--labels file") if args.labels else None
        checkpoint = Path(args.checkpoint)
        if not checkpoint.is_file():
            raise ValueError(f"checkpoint '{checkpoint}' does not exist")
    except (ValueError, OSError) as exc:
        print(f"vitaudit: {exc}", file=sys.stderr)
        return EXIT_ERROR
    client = AuditClient(args.server)
    try:
        sha256 = file_sha256(checkpoint)
        known = client.has_checkpoint(sha256)
        created = client.submit(
            checkpoint,
            args.arch,
            images=images,
            labels=labels,
            options=options,
            checkpoint_sha256=sha256 if known else None,
            reuse=not args.no_cache,
        )
        audit_id = created["id"]
        how = (
            "cached: an identical request was already answered"
            if created.get("cached")
            else "submitted"
        )
        uploaded = (
            "checkpoint already on the service, not uploaded" if known else "checkpoint uploaded"
        )
        print(f"audit {audit_id}: {how} ({uploaded})", file=sys.stderr)
        state = client.wait(
            audit_id, timeout=args.timeout, on_progress=ProgressPrinter(audit_id[:8])
        )
        if state["status"] == "failed":
            error = state.get("error") or {}
            print(
                f"vitaudit: audit {audit_id} failed: {error.get('detail', 'no reason given')}",
                file=sys.stderr,
            )
            return EXIT_ERROR
        out = Path(args.out or f"vitaudit-{audit_id[:8]}")
        client.download(audit_id, out)
        report = json.loads((out / "report.json").read_text())
        print(f"report: {out / 'report.json'}")
        line = gradient_verdict_line(report)
        if line:
            print(line)
        evaluation = policy.evaluate(rules, report, baseline) if rules is not None else None
        if evaluation is not None:
            (out / "policy-verdict.json").write_text(json.dumps(evaluation, indent=2))
        _write_outputs(args, evaluation, audit_id, client, out)
    except (ServiceError, OSError, json.JSONDecodeError) as exc:
        print(f"vitaudit: {exc}", file=sys.stderr)
        return EXIT_ERROR
    finally:
        client.close()
    if evaluation is None:
        return EXIT_OK
    _print_verdicts(evaluation)
    if evaluation["errors"]:
        print(
            "vitaudit: the policy names fields the report does not have as numbers; fix the policy",
            file=sys.stderr,
        )
        return EXIT_ERROR
    return EXIT_OK if evaluation["passed"] else EXIT_POLICY_VIOLATED


def _diff_command(args: Any) -> int:
    """0 when no numeric field changed beyond the tolerance, 1 when some did, 2 on bad input."""
    try:
        a = _read_json_file(args.report_a, "report")
        b = _read_json_file(args.report_b, "report")
        changes = policy.diff_reports(a, b, args.tolerance)
    except ValueError as exc:
        print(f"vitaudit: {exc}", file=sys.stderr)
        return EXIT_ERROR
    print(json.dumps(changes, indent=2) if args.json else policy.format_diff(changes))
    return 1 if changes else 0


def add_commands(commands: Any) -> None:
    audit = commands.add_parser("audit", help="submit a checkpoint, wait, download the report")
    audit.add_argument("checkpoint")
    audit.add_argument("--arch", required=True, help="timm model name, e.g. vit_small_patch16_224")
    audit.add_argument("--images", help="a folder of images or one .zip/.tar archive")
    audit.add_argument("--labels", help="a JSON file with a list of class indices, one per image")
    audit.add_argument("--options", help='JSON options, e.g. \'{"analyses": ["heads"]}\'')
    audit.add_argument("--server", help="API URL (default: $VITAUDIT_URL or http://127.0.0.1:8000)")
    audit.add_argument("--out", help="folder for the report and artifacts (default vitaudit-ID)")
    audit.add_argument(
        "--policy", help="TOML policy: [[rule]] tables with path and min/max/max_drop/max_rise"
    )
    audit.add_argument(
        "--baseline", help="a report.json to compare with (for max_drop/max_rise rules)"
    )
    audit.add_argument(
        "--junit", help="write the policy verdicts as JUnit XML here (one test case per rule)"
    )
    audit.add_argument(
        "--markdown", help="write a Markdown summary here (for a pull-request comment)"
    )
    audit.add_argument(
        "--no-cache",
        action="store_true",
        help="run a new audit even when an identical request was answered",
    )
    audit.add_argument(
        "--timeout", type=float, default=3600, help="seconds to wait for the audit (default 3600)"
    )
    audit.set_defaults(run=_audit_command)
    diff = commands.add_parser("diff", help="numeric fields that changed between two reports")
    diff.add_argument("report_a")
    diff.add_argument("report_b")
    diff.add_argument(
        "--tolerance",
        type=float,
        default=1e-6,
        help="absolute change below which a field counts as equal",
    )
    diff.add_argument("--json", action="store_true", help="print the changes as JSON")
    diff.set_defaults(run=_diff_command)
    demo = commands.add_parser("demo", help="train a small ViT here and audit its trajectory")
    demo.add_argument("--out", default="vitaudit-demo", help="folder for reports and plots")
    demo.add_argument("--port", type=int, default=8765, help="port of the stack the demo starts")
    demo.add_argument("--server", help="use a running service at this URL instead of starting one")
    demo.add_argument(
        "--schedule", choices=("default", "quick"), default="default", help="training schedule"
    )
    demo.set_defaults(run=_demo_command)


def _demo_command(args: Any) -> int:
    from workers.demo import run  # imports torch: only the demo needs it on the client side

    return run(args)
