"""Prometheus metrics: HTTP requests (counted in the API process) and jobs (counted in Redis).

The API and the workers are separate processes, so job outcomes cannot live in the API's
memory: each worker adds its job's outcome and duration to one Redis hash per queue
(`record_job`), and the API reads that hash, the queue's length and RQ's registry of running
jobs when Prometheus scrapes `GET /metrics` (`JobCollector`).
"""

from __future__ import annotations

import bisect
import logging
import time
from collections.abc import Iterable, Iterator
from typing import Any

from litestar.types import ASGIApp, Message, Receive, Scope, Send
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from redis import Redis
from redis.exceptions import RedisError

from service.logs import AUDIT_ID

JOB_METRICS_KEY = "vitaudit:metrics:{queue}:jobs"
# Upper bounds, in seconds, of the job-duration histogram: a tiny model audits in seconds,
# a ViT-L with gradients on CPU in tens of minutes.
JOB_DURATION_BUCKETS_S = (1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0)
# Upper bounds, in seconds, of the request-latency histogram: reads take milliseconds,
# checkpoint uploads up to minutes.
REQUEST_DURATION_BUCKETS_S = (
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    120.0,
)
UNMATCHED_ROUTE = "unmatched"
# Label values for methods outside this set collapse to "other", so a client cannot grow the
# number of time series by inventing methods.
KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})

access_log = logging.getLogger("vitaudit.access")


def _le(bound: float) -> str:
    return "+Inf" if bound == float("inf") else repr(float(bound))


def job_fields(
    outcome: str, error_code: str, seconds: float
) -> tuple[dict[str, int], dict[str, float]]:
    """The hash increments for one ended job: (integer fields, float fields).

    `count:{outcome}:{error_code}` counts jobs; `bucket:{outcome}:{le}` counts jobs whose
    duration fell in that bucket only (made cumulative when read); `sum:{outcome}` adds seconds.
    """
    index = bisect.bisect_left(JOB_DURATION_BUCKETS_S, seconds)
    bound = JOB_DURATION_BUCKETS_S[index] if index < len(JOB_DURATION_BUCKETS_S) else float("inf")
    counts = {f"count:{outcome}:{error_code}": 1, f"bucket:{outcome}:{_le(bound)}": 1}
    return counts, {f"sum:{outcome}": float(seconds)}


def record_job(
    redis: Redis, queue_name: str, *, outcome: str, error_code: str = "", seconds: float
) -> None:
    """Add one ended job (outcome 'finished' or 'failed') to the queue's job metrics."""
    counts, sums = job_fields(outcome, error_code, max(0.0, seconds))
    key = JOB_METRICS_KEY.format(queue=queue_name)
    pipe = redis.pipeline(transaction=True)
    for field, amount in counts.items():
        pipe.hincrby(key, field, amount)
    for field, amount in sums.items():
        pipe.hincrbyfloat(key, field, amount)
    pipe.execute()


def job_families(fields: dict[str, str]) -> list[Metric]:
    """Prometheus families from the job-metrics hash: a counter of ended jobs by outcome and
    error code, and a histogram of their durations by outcome."""
    jobs = CounterMetricFamily(
        "vitaudit_jobs",
        "Audit jobs that ended, by outcome and error code",
        labels=["outcome", "error_code"],
    )
    buckets: dict[str, dict[float, int]] = {}
    sums: dict[str, float] = {}
    for field, value in sorted(fields.items()):
        kind, _, rest = field.partition(":")
        if kind == "count":
            outcome, _, code = rest.partition(":")
            jobs.add_metric([outcome, code], float(value))
        elif kind == "bucket":
            outcome, _, le = rest.partition(":")
            buckets.setdefault(outcome, {})[float(le)] = int(value)
        elif kind == "sum":
            sums[rest] = float(value)
    durations = HistogramMetricFamily(
        "vitaudit_job_duration_seconds", "Run time of audit jobs, by outcome", labels=["outcome"]
    )
    for outcome in sorted(buckets):
        cumulative, rows = 0, []
        for bound in (*JOB_DURATION_BUCKETS_S, float("inf")):
            cumulative += buckets[outcome].get(bound, 0)
            rows.append((_le(bound), float(cumulative)))
        durations.add_metric([outcome], rows, sum_value=sums.get(outcome, 0.0))
    return [jobs, durations]


class HttpMetrics:
    """Requests counted by method, route template (never the raw path) and status, and their
    latency in seconds."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.requests = Counter(
            "vitaudit_http_requests",
            "HTTP requests answered, by method, route template and status",
            ["method", "route", "status"],
            registry=registry,
        )
        self.latency = Histogram(
            "vitaudit_http_request_duration_seconds",
            "Time from request to the end of the response, by method and route template",
            ["method", "route"],
            buckets=REQUEST_DURATION_BUCKETS_S,
            registry=registry,
        )


def observe_requests(app: ASGIApp, metrics: HttpMetrics) -> ASGIApp:
    """Wrap an ASGI app (outside routing, so 404s for unknown paths count too): count and time
    each HTTP request and log it with method, path, status, duration and the audit id (the
    path's `audit_id`, or the one the handler bound, e.g. a new audit's)."""

    async def observed(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await app(scope, receive, send)
            return
        started = time.perf_counter()
        status = {"code": 500}  # an exception that escapes before a response is a 500

        async def send_with_status(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = int(message["status"])
            await send(message)

        token = AUDIT_ID.set(None)
        try:
            await app(scope, receive, send_with_status)
        finally:
            seconds = time.perf_counter() - started
            method = scope["method"] if scope["method"] in KNOWN_METHODS else "other"
            route = scope.get("path_template") or UNMATCHED_ROUTE
            audit_id = (scope.get("path_params") or {}).get("audit_id") or AUDIT_ID.get()
            metrics.requests.labels(method, route, str(status["code"])).inc()
            metrics.latency.labels(method, route).observe(seconds)
            access_log.info(
                "%s %s %d %.1f ms",
                scope["method"],
                scope["path"],
                status["code"],
                seconds * 1000,
                extra={
                    "method": scope["method"],
                    "path": scope["path"],
                    "route": route,
                    "status": status["code"],
                    "duration_ms": round(seconds * 1000, 2),
                    "audit_id": audit_id,
                },
            )
            AUDIT_ID.reset(token)

    return observed  # type: ignore[return-value]


class JobCollector(Collector):
    """Reads queue depth, running jobs and job outcomes from Redis at scrape time."""

    def __init__(self, queue: Any) -> None:  # service.queue.AuditQueue
        self.queue = queue

    def collect(self) -> Iterator[Metric]:
        name = self.queue.settings.queue_name
        up = GaugeMetricFamily("vitaudit_redis_up", "1 when Redis answered this scrape, else 0")
        try:
            depth = self.queue.queue.count
            running = self.queue.queue.started_job_registry.count
            fields = {
                k.decode(): v.decode()
                for k, v in self.queue.redis.hgetall(JOB_METRICS_KEY.format(queue=name)).items()
            }
        except RedisError:
            up.add_metric([], 0.0)
            yield up
            return
        up.add_metric([], 1.0)
        yield up
        yield _gauge("vitaudit_queue_depth", "Audits waiting in the queue", name, depth)
        yield _gauge("vitaudit_jobs_running", "Audits a worker is running now", name, running)
        yield from job_families(fields)

    def describe(self) -> Iterable[Metric]:
        return []


def _gauge(metric: str, documentation: str, queue: str, value: float) -> GaugeMetricFamily:
    family = GaugeMetricFamily(metric, documentation, labels=["queue"])
    family.add_metric([queue], float(value))
    return family
