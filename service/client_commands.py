"""The client-side subcommands of `vitaudit`: audit (submit, wait, gate), diff and demo.

They talk to the API through `service.client` only; `demo` imports the training code lazily.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from service import policy
from service.client import (
    EXIT_ERROR,
    EXIT_OK,
    EXIT_POLICY_VIOLATED,
    AuditClient,
    ProgressPrinter,
    ServiceError,
    file_sha256,
)
from service.folder_zip import zip_folder


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
            title=f"vitaudit: {Path(args.checkpoint).name} ({args.arch or 'transformers'})",
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
    scratch: tempfile.TemporaryDirectory[str] | None = None
    try:
        rules, baseline = _load_policy(args)
        options = json.loads(args.options) if args.options else None
        images = _images_of(args.images)
        labels = _read_json_file(args.labels, "--labels file") if args.labels else None
        checkpoint = Path(args.checkpoint)
        if checkpoint.is_dir():  # a transformers save_pretrained folder, zipped as it is
            scratch = tempfile.TemporaryDirectory(prefix="vitaudit-")
            checkpoint = zip_folder(
                checkpoint, Path(scratch.name) / f"{checkpoint.resolve().name}.zip"
            )
        if not checkpoint.is_file():
            raise ValueError(f"checkpoint '{checkpoint}' does not exist")
    except (ValueError, OSError) as exc:
        print(f"vitaudit: {exc}", file=sys.stderr)
        if scratch is not None:
            scratch.cleanup()
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
        if scratch is not None:
            scratch.cleanup()
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


CLIENT_ENVIRONMENT = """environment:
  VITAUDIT_URL       the API to talk to (default http://127.0.0.1:8000; --server overrides it)
  VITAUDIT_API_KEY   the key sent as X-API-Key (not needed against `vitaudit up`)"""


def add_client_commands(command: Callable[..., argparse.ArgumentParser]) -> None:
    """Add audit, diff and demo through ``command(name, summary, description, epilog)``."""
    audit = command(
        "audit",
        "submit a checkpoint, wait, download the report, gate on a policy",
        "Upload CHECKPOINT (or reuse the service's copy of it), wait for the audit, download "
        "report.json and the artifacts into --out, and evaluate --policy against the report.",
        "exit codes:\n  0  the audit finished and the policy holds (or no policy was given)\n"
        "  1  the policy is violated\n  2  usage or service error: bad policy or options, "
        "unknown architecture,\n     service unreachable, failed audit, or a rule whose path "
        "is not a number\n\n" + CLIENT_ENVIRONMENT,
    )
    audit.add_argument(
        "checkpoint",
        help=".safetensors, .pth/.pt/.bin state dict or .onnx file, or a transformers "
        "save_pretrained folder (zipped as it is)",
    )
    audit.add_argument(
        "--arch",
        help="timm model name, e.g. vit_small_patch16_224 (not needed for a transformers folder)",
    )
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
    audit.add_argument("--timeout", type=float, default=3600, help="seconds to wait for the audit")
    audit.set_defaults(run=_audit_command)
    diff = command(
        "diff",
        "numeric fields that changed between two reports",
        "Compare every numeric field of two report.json files and print those that changed "
        "by more than --tolerance.",
        "exit codes:\n  0  no numeric field changed beyond the tolerance\n  1  some did\n"
        "  2  a file is missing or not a JSON report",
    )
    diff.add_argument("report_a", help="the earlier report.json")
    diff.add_argument("report_b", help="the later report.json")
    diff.add_argument(
        "--tolerance",
        type=float,
        default=1e-6,
        help="absolute change below which a field counts as equal",
    )
    diff.add_argument("--json", action="store_true", help="print the changes as JSON")
    diff.set_defaults(run=_diff_command)
    demo = command(
        "demo",
        "train a small ViT here and audit its trajectory (about 2 minutes on 2 cores)",
        "Start a private stack (API + worker on a free port, logs under OUT/logs), train a "
        "small ViT on a generated task and the same model on patch-shuffled images (the "
        "control), audit both training runs through the API, and write reports, HTML pages, "
        "plots and summary.json under --out.",
        "exit codes:\n  0  both runs were trained and audited\n  2  the stack or an audit "
        "failed (the message names the log folder)\n\n" + CLIENT_ENVIRONMENT,
    )
    demo.add_argument("--out", default="vitaudit-demo", help="folder for reports and plots")
    demo.add_argument(
        "--port",
        type=int,
        default=None,
        help="port of the stack the demo starts (default: a free one)",
    )
    demo.add_argument("--server", help="use a running service at this URL instead of starting one")
    demo.add_argument(
        "--schedule", choices=("default", "quick"), default="default", help="training schedule"
    )
    demo.set_defaults(run=_demo_command)


def _demo_command(args: Any) -> int:
    from workers.demo import run  # imports torch: only the demo needs it on the client side

    return run(args)
