"""Structured JSON logs with the audit id, and Prometheus metrics, on the real stack."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from service.logs import AuditIdFilter, JsonFormatter, audit_context
from service.metrics import JOB_DURATION_BUCKETS_S, job_families, job_fields
from tests.conftest import Stack, poll_until
from tests.planted.models import TINY_ARCH, TINY_ARGS, TINY_OPTIONS, save_safetensors, tiny_vit

EXPECTED_METRICS = {
    "vitaudit_http_requests",
    "vitaudit_http_request_duration_seconds",
    "vitaudit_queue_depth",
    "vitaudit_jobs_running",
    "vitaudit_jobs",
    "vitaudit_job_duration_seconds",
    "vitaudit_redis_up",
}


def format_record(message: str, **extra: object) -> dict:
    record = logging.LogRecord("vitaudit.test", logging.INFO, __file__, 1, message, None, None)
    record.__dict__.update(extra)
    AuditIdFilter().filter(record)
    return json.loads(JsonFormatter().format(record))


def test_json_line_carries_the_bound_audit_id_and_extra_fields() -> None:
    with audit_context("a" * 32):
        entry = format_record("stage \x1b[32mcapture\x1b[0m", stage="capture")
    assert set(entry) == {"timestamp", "level", "logger", "message", "audit_id", "stage"}
    assert (entry["level"], entry["logger"], entry["audit_id"]) == (
        "INFO",
        "vitaudit.test",
        "a" * 32,
    )
    assert entry["message"] == "stage capture"  # RQ's colour escapes are stripped
    assert entry["timestamp"].endswith("+00:00")
    assert "audit_id" not in format_record("no audit bound")


def test_job_histogram_is_cumulative_and_counts_by_error_code() -> None:
    fields: dict[str, float] = {}
    for outcome, code, seconds in [
        ("finished", "", 0.5),
        ("finished", "", 45.0),
        ("failed", "job_timeout", 9999.0),
    ]:
        counts, sums = job_fields(outcome, code, seconds)
        for field, amount in {**counts, **sums}.items():
            fields[field] = fields.get(field, 0) + amount
    jobs, durations = job_families({k: str(v) for k, v in fields.items()})
    assert {(s.labels["outcome"], s.labels["error_code"]): s.value for s in jobs.samples} == {
        ("finished", ""): 2.0,
        ("failed", "job_timeout"): 1.0,
    }
    finished = {
        s.labels["le"]: s.value
        for s in durations.samples
        if s.name.endswith("_bucket") and s.labels["outcome"] == "finished"
    }
    assert (
        finished["1.0"] == 1.0
        and finished["30.0"] == 1.0
        and finished["60.0"] == 2.0
        and finished["+Inf"] == 2.0
    )
    failed = {
        s.labels["le"]: s.value
        for s in durations.samples
        if s.name.endswith("_bucket") and s.labels["outcome"] == "failed"
    }
    assert failed[repr(JOB_DURATION_BUCKETS_S[-1])] == 0.0 and failed["+Inf"] == 1.0
    sums = {s.labels["outcome"]: s.value for s in durations.samples if s.name.endswith("_sum")}
    assert sums == {"finished": 45.5, "failed": 9999.0}


def scrape(stack: Stack) -> dict[tuple[str, tuple], float]:
    """Every sample of /metrics, keyed by (sample name, sorted labels)."""
    with stack.client() as http:
        response = http.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    families = list(text_string_to_metric_families(response.text))
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value for f in families for s in f.samples
    }
    samples[("__families__", ())] = {f.name for f in families}  # type: ignore[assignment]
    return samples


def job_count(samples: dict, outcome: str, code: str) -> float:
    return samples.get(("vitaudit_jobs_total", (("error_code", code), ("outcome", outcome))), 0.0)


def json_lines(path: Path) -> list[dict]:
    # One JSON object per "\n"-ended line. Not splitlines(): it also splits at U+2028, \x85
    # and \x1c-\x1e, which JSON strings may hold unescaped (a logged request path can).
    lines = [line for line in path.read_text().split("\n") if line.strip()]
    return [json.loads(line) for line in lines]


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_safetensors(tiny_vit(), tmp_path_factory.mktemp("obs") / "tiny.safetensors")


def submit(stack: Stack, checkpoint: Path, options: dict) -> str:
    data = {"arch": TINY_ARCH, "options": json.dumps(options), "cache": "false"}
    with stack.client() as http, checkpoint.open("rb") as handle:
        created = http.post(
            "/v1/audits", data=data, files={"checkpoint": (checkpoint.name, handle)}
        )
    assert created.status_code == 202, created.text
    return created.json()["id"]


@pytest.mark.e2e
def test_audit_logs_and_metrics(stack: Stack, tiny_checkpoint: Path) -> None:
    before = scrape(stack)
    assert before[("__families__", ())] >= EXPECTED_METRICS
    assert before[("vitaudit_redis_up", ())] == 1.0

    audit_id = submit(stack, tiny_checkpoint, TINY_OPTIONS)
    assert stack.wait_for_audit(audit_id)["status"] == "finished"
    # A state dict for another architecture (one block fewer): the job fails with an error code.
    deeper = {**TINY_OPTIONS, "model_args": {**TINY_ARGS, "depth": 3}}
    failing_id = submit(stack, tiny_checkpoint, deeper)
    failed = stack.wait_for_audit(failing_id)
    assert failed["status"] == "failed"
    code = failed["error"]["code"]

    after = poll_until(
        lambda: (
            (s := scrape(stack))
            and job_count(s, "finished", "") >= job_count(before, "finished", "") + 1
            and job_count(s, "failed", code) >= job_count(before, "failed", code) + 1
            and s
        ),
        timeout=30,
        what="the job counters to count both audits",
    )
    assert after[("vitaudit_job_duration_seconds_count", (("outcome", "finished"),))] >= 1
    assert after[("vitaudit_queue_depth", (("queue", stack.env["VITAUDIT_QUEUE"]),))] >= 0
    status_route = (
        "vitaudit_http_requests_total",
        (("method", "GET"), ("route", "/v1/audits/{audit_id}"), ("status", "200")),
    )
    assert after[status_route] >= 2  # the polls above, counted under the route template

    with stack.client() as http:
        assert http.get("/no/such/path").status_code == 404
    unmatched = (
        "vitaudit_http_requests_total",
        (("method", "GET"), ("route", "unmatched"), ("status", "404")),
    )
    assert scrape(stack)[unmatched] == after.get(unmatched, 0.0) + 1

    logs = stack.data_dir / "logs"
    worker_lines = json_lines(logs / "worker0.log")
    assert all({"timestamp", "level", "logger", "message"} <= set(line) for line in worker_lines)
    mine = [line for line in worker_lines if line.get("audit_id") == audit_id]
    messages = [line["message"] for line in mine]
    assert any(m.startswith("audit started") for m in messages), messages
    assert any(m.startswith("audit finished in") for m in messages), messages
    assert any("Job OK" in m for m in messages), messages  # RQ's own line, in the worker parent
    assert {line["logger"] for line in mine} >= {"vitaudit.worker", "rq.worker"}
    failure = [
        line
        for line in worker_lines
        if line.get("audit_id") == failing_id and line["level"] == "WARNING"
    ]
    assert failure and failure[0]["error_code"] == code

    def api_line(method: str, path: str) -> dict | None:
        found = [
            line
            for line in json_lines(logs / "api.log")
            if line.get("path") == path and line["method"] == method
        ]
        return found[-1] if found else None

    posted = poll_until(
        lambda: [
            line
            for line in json_lines(logs / "api.log")
            if line.get("method") == "POST" and line.get("audit_id") == audit_id
        ],
        timeout=10,
        what="the POST's log line",
    )
    assert posted[0]["status"] == 202 and posted[0]["route"] == "/v1/audits"
    status_line = poll_until(
        lambda: api_line("GET", f"/v1/audits/{audit_id}"), timeout=10, what="a status log line"
    )
    assert status_line["audit_id"] == audit_id and status_line["status"] == 200
    assert status_line["logger"] == "vitaudit.access" and status_line["duration_ms"] >= 0
