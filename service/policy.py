"""Policy gate over audit reports: thresholds on report fields, regressions against a baseline.

A policy is a TOML file holding a list of rules::

    [[rule]]
    path = "position_embedding.grid_structure_score"   # dotted path into report.json
    min = 0.6                                           # value >= min

    [[rule]]
    path = "position_embedding.decodability_r2"
    max_drop = 0.05                                     # baseline - value <= max_drop

Bounds: ``min``, ``max`` (absolute), ``max_drop``, ``max_rise`` (against a baseline report).
A path segment that is an integer indexes a list (``heads.layers.0.heads.1.entropy``).
A path that is not in the report, or does not lead to a number, is an error, never a pass.

Pure: no HTTP, no torch; the client, the service and the worker all call it.
"""

from __future__ import annotations

import math
import tomllib
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from typing import Any

from workers.report_schema import major

BOUNDS = ("min", "max", "max_drop", "max_rise")
RELATIVE_BOUNDS = ("max_drop", "max_rise")
RULE_KEYS = ("path", "name", *BOUNDS)
PASS, FAIL, ERROR = "pass", "fail", "error"
# Sections whose numbers differ between identical runs (wall-clock) or describe the software.
DIFF_IGNORED_PREFIXES = ("timings", "versions")


class PolicyError(ValueError):
    """The policy file is invalid; the message names the rule and what to fix."""


class PathError(KeyError):
    """A rule's path does not lead to a number in the report."""

    def __str__(self) -> str:
        return str(self.args[0])


@dataclass(frozen=True)
class Rule:
    """One threshold: ``path`` into the report and at least one bound."""

    index: int  # 1-based position in the file, used in messages
    path: str
    name: str | None = None
    min: float | None = None
    max: float | None = None
    max_drop: float | None = None
    max_rise: float | None = None

    @property
    def label(self) -> str:
        return self.name or self.path

    @property
    def needs_baseline(self) -> bool:
        return self.max_drop is not None or self.max_rise is not None

    def bounds(self) -> dict[str, float]:
        return {b: getattr(self, b) for b in BOUNDS if getattr(self, b) is not None}


def parse_policy(text: str) -> list[Rule]:
    """Parse policy TOML text into rules; raise PolicyError naming the faulty rule."""
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise PolicyError(f"policy is not valid TOML: {exc}") from None
    except RecursionError:  # tomllib parses nested arrays and tables recursively
        raise PolicyError("policy is not valid TOML: its values are nested too deeply") from None
    extra = sorted(set(document) - {"rule"})
    if extra:
        raise PolicyError(
            f"unknown top-level key(s) {', '.join(map(repr, extra))}; a policy is a list of [[rule]] tables"
        )
    raw_rules = document.get("rule", [])
    if not isinstance(raw_rules, list) or not raw_rules:
        raise PolicyError("the policy has no rules; add [[rule]] tables with a 'path' and a bound")
    return [_parse_rule(i, raw) for i, raw in enumerate(raw_rules, start=1)]


def _parse_rule(index: int, raw: Any) -> Rule:
    where = f"rule {index}"
    if not isinstance(raw, dict):
        raise PolicyError(f"{where} is not a table; write it as [[rule]]")
    path = raw.get("path")
    if isinstance(path, str) and path.strip():
        where = f"rule {index} ({path})"
    unknown = sorted(set(raw) - set(RULE_KEYS))
    if unknown:
        raise PolicyError(
            f"{where}: unknown key(s) {', '.join(map(repr, unknown))}; allowed: {', '.join(RULE_KEYS)}"
        )
    if not isinstance(path, str) or not path.strip():
        raise PolicyError(
            f"{where}: 'path' is missing; give a dotted path into the report, e.g. 'heads.counts.global'"
        )
    if any(not part for part in path.split(".")):
        raise PolicyError(f"{where}: 'path' has an empty segment")
    name = raw.get("name")
    if name is not None and not isinstance(name, str):
        raise PolicyError(f"{where}: 'name' must be a string")
    bounds: dict[str, float] = {}
    for key in BOUNDS:
        if key not in raw:
            continue
        value = raw[key]
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not math.isfinite(value)
        ):
            raise PolicyError(f"{where}: '{key}' must be a finite number, got {value!r}")
        if key in RELATIVE_BOUNDS and value < 0:
            raise PolicyError(f"{where}: '{key}' must be >= 0, got {value}")
        bounds[key] = float(value)
    if not bounds:
        raise PolicyError(f"{where}: no bound; give at least one of {', '.join(BOUNDS)}")
    if "min" in bounds and "max" in bounds and bounds["min"] > bounds["max"]:
        raise PolicyError(f"{where}: min {bounds['min']} is above max {bounds['max']}")
    return Rule(index=index, path=path, name=name, **bounds)


def lookup(report: Any, path: str) -> float:
    """The number at dotted ``path`` in ``report``; PathError when absent or not a number."""
    node = report
    walked: list[str] = []
    for part in path.split("."):
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif (
            isinstance(node, list)
            and part.lstrip("-").isdigit()
            and -len(node) <= int(part) < len(node)
        ):
            node = node[int(part)]
        else:
            at = ".".join(walked) or "the report"
            keys = sorted(node)[:12] if isinstance(node, dict) else None
            hint = f"; keys there: {', '.join(keys)}" if keys else ""
            if isinstance(node, dict) and node.get("available") is False:
                hint = f"; that section is not available: {node.get('reason', 'no reason given')}"
            raise PathError(f"'{path}' is not in the report: no '{part}' under {at}{hint}")
        walked.append(part)
    if isinstance(node, bool) or not isinstance(node, int | float):
        kind = type(node).__name__ if node is not None else "null"
        raise PathError(f"'{path}' is a {kind}, not a number")
    if not math.isfinite(node):
        raise PathError(f"'{path}' is {node}, not a finite number")
    return float(node)


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.6g}"


def evaluate_rule(
    rule: Rule, report: dict[str, Any], baseline: dict[str, Any] | None = None
) -> dict[str, Any]:
    """One rule's verdict: pass, fail, or error (path missing, baseline missing)."""
    result: dict[str, Any] = {
        "rule": rule.index,
        "name": rule.label,
        "path": rule.path,
        **rule.bounds(),
        "value": None,
        "baseline": None,
        "verdict": ERROR,
        "message": "",
    }
    try:
        value = lookup(report, rule.path)
    except PathError as exc:
        result["message"] = str(exc)
        return result
    result["value"] = value
    if rule.needs_baseline:
        if baseline is None:
            result["message"] = (
                f"max_drop/max_rise compare with a baseline report, and none was given (rule {rule.index})"
            )
            return result
        try:
            result["baseline"] = lookup(baseline, rule.path)
        except PathError as exc:
            result["message"] = f"baseline: {exc}"
            return result
    problems, checks = [], []
    if rule.min is not None:
        (checks if value >= rule.min else problems).append(
            f"{_fmt(value)} {'>=' if value >= rule.min else '<'} min {_fmt(rule.min)}"
        )
    if rule.max is not None:
        (checks if value <= rule.max else problems).append(
            f"{_fmt(value)} {'<=' if value <= rule.max else '>'} max {_fmt(rule.max)}"
        )
    if result["baseline"] is not None:
        change = value - result["baseline"]
        result["change"] = change
        if rule.max_drop is not None:
            ok = -change <= rule.max_drop
            (checks if ok else problems).append(
                f"{'dropped' if change < 0 else 'rose'} by {_fmt(abs(change))} from baseline {_fmt(result['baseline'])} "
                f"({'within' if ok else 'more than'} max_drop {_fmt(rule.max_drop)})"
            )
        if rule.max_rise is not None:
            ok = change <= rule.max_rise
            (checks if ok else problems).append(
                f"{'rose' if change > 0 else 'dropped'} by {_fmt(abs(change))} from baseline {_fmt(result['baseline'])} "
                f"({'within' if ok else 'more than'} max_rise {_fmt(rule.max_rise)})"
            )
    result["verdict"] = FAIL if problems else PASS
    result["message"] = f"{rule.path}: " + "; ".join(problems or checks)
    return result


def evaluate(
    rules: list[Rule], report: dict[str, Any], baseline: dict[str, Any] | None = None
) -> dict[str, Any]:
    """All rules' verdicts; ``passed`` only when every rule passed (an error is not a pass)."""
    results = [evaluate_rule(rule, report, baseline) for rule in rules]
    return {
        "rules": results,
        "passed": all(r["verdict"] == PASS for r in results),
        "failures": sum(r["verdict"] == FAIL for r in results),
        "errors": sum(r["verdict"] == ERROR for r in results),
    }


def numeric_leaves(node: Any, prefix: str = "") -> dict[str, float]:
    """Every finite number in a JSON document by dotted path (list items by index)."""
    items: list[tuple[str, Any]]
    if isinstance(node, dict):
        items = [(str(k), v) for k, v in node.items()]
    elif isinstance(node, list):
        items = [(str(i), v) for i, v in enumerate(node)]
    else:
        if isinstance(node, int | float) and not isinstance(node, bool) and math.isfinite(node):
            return {prefix: float(node)}
        return {}
    leaves: dict[str, float] = {}
    for key, value in items:
        leaves.update(numeric_leaves(value, f"{prefix}.{key}" if prefix else key))
    return leaves


def diff_reports(
    a: dict[str, Any],
    b: dict[str, Any],
    tolerance: float = 1e-6,
    *,
    ignore: tuple[str, ...] = DIFF_IGNORED_PREFIXES,
) -> list[dict[str, Any]]:
    """Numeric fields whose value changed by more than ``tolerance`` (absolute) from a to b.

    A field present in only one report is listed with None on the other side. Fields under
    ``ignore`` (timings, versions by default) are left out: they differ between identical runs.
    Reports of different major schema versions are refused (ValueError): their fields do not
    mean the same.
    """
    if tolerance < 0:
        raise ValueError("tolerance must be >= 0")
    versions = [report.get("schema_version") for report in (a, b)]
    try:
        majors = [major(str(v)) for v in versions]
    except ValueError:
        raise ValueError(
            f"reports carry schema_version {versions[0]!r} and {versions[1]!r}; a report without "
            "a version number cannot be compared"
        ) from None
    if majors[0] != majors[1]:
        raise ValueError(
            f"the reports follow schema {versions[0]} and {versions[1]}: a major version changes "
            "what fields mean, so their numbers are not comparable; re-audit the older "
            "checkpoint with this service"
        )
    left, right = numeric_leaves(a), numeric_leaves(b)

    def ignored(path: str) -> bool:
        return any(path == p or path.startswith(p + ".") for p in ignore)

    changes = []
    for path in sorted(set(left) | set(right)):
        if ignored(path):
            continue
        va, vb = left.get(path), right.get(path)
        if va is not None and vb is not None:
            if abs(vb - va) <= tolerance:
                continue
            changes.append({"path": path, "a": va, "b": vb, "change": vb - va})
        else:
            changes.append({"path": path, "a": va, "b": vb, "change": None})
    return changes


def format_diff(changes: list[dict[str, Any]]) -> str:
    if not changes:
        return "no numeric field changed beyond the tolerance"
    width = max(len(c["path"]) for c in changes)
    lines = [f"{'field':<{width}}  {'A':>12}  {'B':>12}  {'B - A':>12}"]
    for c in changes:
        lines.append(
            f"{c['path']:<{width}}  {_fmt(c['a']):>12}  {_fmt(c['b']):>12}  {_fmt(c['change']):>12}"
        )
    return "\n".join(lines)


def _threshold_text(result: dict[str, Any]) -> str:
    parts = []
    if "min" in result:
        parts.append(f">= {_fmt(result['min'])}")
    if "max" in result:
        parts.append(f"<= {_fmt(result['max'])}")
    if "max_drop" in result:
        parts.append(f"drop <= {_fmt(result['max_drop'])}")
    if "max_rise" in result:
        parts.append(f"rise <= {_fmt(result['max_rise'])}")
    return ", ".join(parts)


def to_junit(
    evaluation: dict[str, Any], *, suite: str = "vitaudit policy", timestamp: str | None = None
) -> bytes:
    """JUnit XML: one testcase per rule; a failed rule is <failure>, an erroring rule <error>."""
    rules = evaluation["rules"]
    root = ET.Element("testsuites", name="vitaudit")
    attributes = {
        "name": suite,
        "tests": str(len(rules)),
        "failures": str(sum(r["verdict"] == FAIL for r in rules)),
        "errors": str(sum(r["verdict"] == ERROR for r in rules)),
        "skipped": "0",
    }
    if timestamp:
        attributes["timestamp"] = timestamp
    suite_element = ET.SubElement(root, "testsuite", attributes)
    for r in rules:
        case = ET.SubElement(
            suite_element, "testcase", classname="vitaudit.policy", name=r["name"], time="0"
        )
        if r["verdict"] == FAIL:
            ET.SubElement(case, "failure", message=r["message"], type="PolicyViolation").text = r[
                "message"
            ]
        elif r["verdict"] == ERROR:
            ET.SubElement(case, "error", message=r["message"], type="PolicyError").text = r[
                "message"
            ]
        else:
            ET.SubElement(case, "system-out").text = r["message"]
    ET.indent(root)
    return ET.tostring(root, encoding="utf-8", xml_declaration=True)


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def to_markdown(
    evaluation: dict[str, Any] | None,
    *,
    title: str = "vitaudit",
    audit_id: str | None = None,
    report_url: str | None = None,
    plots: dict[str, str] | None = None,
) -> str:
    """A summary for a pull-request comment: verdict, a table of rules, links to the plots.

    ``plots`` maps a plot's name to its link (a URL, or a path relative to the comment).
    """
    lines = [f"### {title}", ""]
    if audit_id:
        lines.append(f"Audit `{audit_id}`" + (f" ([report]({report_url}))" if report_url else ""))
        lines.append("")
    if evaluation is None:
        lines.append("No policy was given: nothing was gated.")
    else:
        rules = evaluation["rules"]
        if evaluation["passed"]:
            verdict = f"**Policy passed**: {len(rules)} of {len(rules)} rules hold."
        else:
            verdict = (
                f"**Policy violated**: {evaluation['failures']} failed, {evaluation['errors']} in error, "
                f"of {len(rules)} rules."
            )
        lines += [
            verdict,
            "",
            "| rule | value | baseline | threshold | verdict | detail |",
            "|---|---:|---:|---|---|---|",
        ]
        marks = {PASS: "pass", FAIL: "**FAIL**", ERROR: "**ERROR**"}
        for r in rules:
            lines.append(
                f"| `{_cell(r['name'])}` | {_fmt(r['value'])} | {_fmt(r['baseline'])} | {_cell(_threshold_text(r))} "
                f"| {marks[r['verdict']]} | {_cell(r['message'])} |"
            )
    if plots:
        lines += [
            "",
            "Plots: " + " · ".join(f"[{name}]({link})" for name, link in sorted(plots.items())),
        ]
    return "\n".join(lines) + "\n"
