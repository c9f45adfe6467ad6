"""The report a person reads: the extra plots, the HTML report page and the landing page.

Rendering is tested as a pure function (numbers shown equal the report's, hostile strings
escaped); the pages are then driven in headless Chromium over the Chrome DevTools Protocol
against the real stack (API server, Redis, worker).
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import shutil
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest

from service.pages import (
    fmt,
    gradient_headlines,
    lookup,
    render_index_page,
    render_report_page,
)
from tests.conftest import Stack, poll_until, stack_env, start_stack, stop_stack
from tests.planted.models import TINY_ARCH, TINY_ARGS, save_safetensors, tiny_vit

ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
SMALL_OPTIONS = {"num_images": 2, "batch_size": 2, "model_args": TINY_ARGS}


# ----------------------------------------------------------------------------- helpers


class _Collect(HTMLParser):
    """Tags with their attributes and text, for checking rendered pages."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.metric_text: dict[str, str] = {}
        self.metric_value: dict[str, str | None] = {}
        self._open_metric: str | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attributes = dict(attrs)
        self.tags.append((tag, attributes))
        if attributes.get("data-metric"):
            self._open_metric = attributes["data-metric"]
            self.metric_value[self._open_metric] = attributes.get("data-value")
            self.metric_text[self._open_metric] = ""

    def handle_endtag(self, tag: str) -> None:
        self._open_metric = None

    def handle_data(self, data: str) -> None:
        if self._open_metric:
            self.metric_text[self._open_metric] += data


def parse(html: str) -> _Collect:
    collected = _Collect()
    collected.feed(html)
    return collected


def planted_report() -> dict[str, Any]:
    """A report whose numbers are all different, so a misplaced one shows."""
    return {
        "schema_version": "1.0",
        "model": {
            "arch": "vit_small_patch16_224",
            "grid": [14, 14],
            "patch_size": 16,
            "num_layers": 12,
            "num_heads": 6,
            "num_prefix_tokens": 1,
            "checkpoint_sha256": "ab" * 32,
            "format": "torch",
        },
        "settings": {"probe_set": "natural-v1", "num_images": 16, "seed": 0},
        "position_embedding": {
            "available": True,
            "kind": "learned_absolute",
            "grid_structure_score": 0.8123456,
            "decodability_r2": 0.912345,
            "decodability_r2_shuffled": -0.0412,
            "similarity_distance_spearman": -0.734567,
            "similarity_distance_spearman_random": 0.0,
            "neighbour_recall": {
                "k4": 0.7712,
                "k8": 0.6634,
                "k4_random": 0.0205,
                "k8_random": 0.0410,
            },
            "projection_r2": 0.55511,
            "projection_r2_shuffled": 0.01234,
            "effective_dim": 23.456,
            "effective_dim_random": 140.2,
        },
        "heads": {
            "available": True,
            "uniform_mean_distance_patches": 6.1,
            "counts": {
                "local": 11,
                "horizontal": 3,
                "vertical": 2,
                "global": 40,
                "texture": 5,
                "prefix": 4,
                "mixed": 7,
            },
        },
        "gradients": {
            "available": True,
            "formula_check": {
                "min_cosine_q": 0.99999987654,
                "min_cosine_k": 0.9999995,
                "passed": True,
                "tolerance": {"min_cosine": 0.999999},
            },
            "sgd_step_check": {
                "available": True,
                "relative_error": 0.00276,
                "tolerance": {"max_relative_error": 0.2},
                "passed": True,
            },
            "verdict": {
                "story_holds": True,
                "margin_ci95": [1.2e-6, 3.4e-6],
                "position_embedding_holds": None,
                "position_embedding_margin_ci95": [-1e-4, 2e-4],
                "layers_holding": 9,
                "layers_judged": 11,
                "summary": "holds in 9 of 11",
            },
        },
        "timings": {"total": 12.5},
        "versions": {"vitaudit": "0.1.0"},
    }


# ----------------------------------------------------------------------------- rendering


def test_headline_numbers_shown_equal_the_report() -> None:
    report = planted_report()
    page = parse(render_report_page("a" * 32, report, {}))
    expected = {
        "position_embedding.grid_structure_score",
        "position_embedding.decodability_r2",
        "position_embedding.neighbour_recall.k4",
        "position_embedding.neighbour_recall.k8",
        "position_embedding.similarity_distance_spearman",
        "position_embedding.projection_r2",
        "gradients.formula_check.min_cosine_q",
        "gradients.formula_check.min_cosine_k",
        "gradients.sgd_step_check.relative_error",
        "gradients.verdict.story_holds",
        "gradients.verdict.position_embedding_holds",
    } | {f"heads.counts.{label}" for label in report["heads"]["counts"]}
    assert expected <= set(page.metric_value)
    for metric in expected:
        value = lookup(report, metric)
        assert json.loads(page.metric_value[metric].replace("True", "true")) == value, metric
        digits = 8 if "formula_check" in metric else 3
        assert page.metric_text[metric].strip() == (
            str(value) if metric.startswith("heads.") else fmt(value, digits)
        )
    assert page.metric_text["position_embedding.grid_structure_score"] == "0.812"
    assert page.metric_text["gradients.formula_check.min_cosine_q"] == "0.99999988"


def test_baselines_and_verdicts_follow_the_numbers() -> None:
    report = planted_report()
    html = render_report_page("a" * 32, report, {})
    assert "a map of the grid" in html and "random positions (k4_random) 0.0205" in html
    report["position_embedding"]["grid_structure_score"] = 0.01
    report["position_embedding"]["neighbour_recall"]["k4"] = 0.03
    report["gradients"]["formula_check"]["passed"] = False
    html = render_report_page("a" * 32, report, {})
    assert "no grid structure" in html and "disagrees" in html
    assert html.count("at chance") == 1  # recall@4 only: its lift is below the margin


def test_gradient_verdicts_have_three_states_and_undecided_is_not_red() -> None:
    report = planted_report()
    rows = {r.metric: r for r in gradient_headlines(report["gradients"])}
    story = rows["gradients.verdict.story_holds"]
    assert (story.verdict, story.tone) == ("holds", "good")
    assert "[1.2e-06, 3.4e-06]" in story.baseline_text
    pos = rows["gradients.verdict.position_embedding_holds"]
    assert (pos.verdict, pos.tone) == ("undecided", "neutral")
    report["gradients"]["verdict"].update(
        story_holds=None, undecided_reason="the interval includes 0 at 12 images"
    )
    story = {r.metric: r for r in gradient_headlines(report["gradients"])}[
        "gradients.verdict.story_holds"
    ]
    assert (story.verdict, story.tone) == ("undecided", "neutral")
    assert "includes 0 at 12 images" in story.baseline_text
    report["gradients"]["verdict"]["story_holds"] = False
    html = render_report_page("a" * 32, report, {})
    assert "does not hold" in html and "undecided" in html


def test_cli_prints_the_gradient_verdict_in_three_states() -> None:
    from service.client_commands import gradient_verdict_line

    report = planted_report()
    assert gradient_verdict_line(report) == (
        "gradients: the story HOLDS, 95% interval of the margin [1.2e-06, 3.4e-06]"
    )
    report["gradients"]["verdict"]["story_holds"] = False
    assert "DOES NOT HOLD" in gradient_verdict_line(report)
    report["gradients"]["verdict"].update(story_holds=None, undecided_reason="too few images")
    assert gradient_verdict_line(report).startswith("gradients: UNDECIDED (too few images)")
    assert gradient_verdict_line({"gradients": {"available": False}}) is None


def test_hostile_strings_from_the_report_are_escaped() -> None:
    report = planted_report()
    hostile = '"><script>alert(1)</script><img src=x onerror=alert(2)>'
    report["model"]["arch"] = hostile
    report["notes"] = [hostile]
    report["position_embedding"]["kind"] = hostile
    report["gradients"]["verdict"]["summary"] = hostile
    report["policy"] = {
        "passed": False,
        "rules": [{"rule": hostile, "value": 0.1, "threshold": 0.6, "verdict": "fail"}],
    }
    html = render_report_page("a" * 32, report, {hostile: PNG_MAGIC})
    page = parse(html)
    assert not any(tag == "script" for tag, _ in page.tags)
    assert not any("onerror" in attrs for _, attrs in page.tags)
    assert hostile not in html and "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    index = render_index_page(
        [
            {
                "id": "b" * 32,
                "arch": hostile,
                "status": "failed",
                "progress": 0.0,
                "stage": None,
                "created_at": "2026-01-01T00:00:00",
                "error": hostile,
                "report_url": "/x",
                "status_url": "/y",
            }
        ],
        tenant=hostile,
    )
    assert (
        hostile not in index and sum(tag == "script" for tag, _ in parse(index).tags) == 1
    )  # its own


def test_unavailable_sections_say_why_and_policy_is_shown() -> None:
    report = planted_report()
    report["position_embedding"] = {
        "available": False,
        "kind": "rotary",
        "reason": "rotary embeddings inside attention",
    }
    report["policy"] = {
        "passed": True,
        "rules": [
            {"rule": "heads.counts.global >= 2", "value": 40, "threshold": 2, "verdict": "pass"}
        ],
    }
    html = render_report_page("a" * 32, report, {})
    assert "Not measured: rotary embeddings inside attention" in html
    assert "heads.counts.global &gt;= 2" in html and ">passed<" in html
    assert "position_embedding.grid_structure_score" not in html


def test_figures_are_inline_with_captions_in_reading_order() -> None:
    pngs = {"zz_custom": b"Z", "pos_projection": b"P", "pos_similarity_grid": b"G"}
    page = parse(render_report_page("a" * 32, planted_report(), pngs))
    images = [attrs for tag, attrs in page.tags if tag == "img"]
    assert [i["data-figure"] for i in images] == [
        "pos_similarity_grid",
        "pos_projection",
        "zz_custom",
    ]
    assert images[1]["src"] == "data:image/png;base64," + base64.b64encode(b"P").decode()
    assert not any(attrs.get("href", "").startswith("http") for _, attrs in page.tags)


# ----------------------------------------------------------------------------- plots


def test_extra_figures_on_a_tiny_model_are_cheap_pngs() -> None:
    import torch

    from workers.analysis.plots_extra import choose_heads, extra_figures, head_maps

    model = tiny_vit()
    heads = {
        "available": True,
        "layers": [
            {
                "layer": 0,
                "heads": [
                    {"head": 0, "label": "global", "mean_distance_patches": 2.0},
                    {"head": 1, "label": "local", "mean_distance_patches": 0.9},
                ],
            },
            {
                "layer": 1,
                "heads": [
                    {"head": 0, "label": "vertical", "mean_distance_patches": 1.4},
                    {"head": 1, "label": "global", "mean_distance_patches": 2.2},
                ],
            },
        ],
    }
    chosen = choose_heads(heads)
    assert [(c.layer, c.head, c.reason) for c in chosen] == [
        (0, 1, "most local"),
        (1, 1, "most global"),
        (1, 0, "a vertical head"),
        (0, 0, "a global head"),
    ]
    image = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    maps = head_maps(model, image, chosen, query=5)
    assert maps["patch"].shape == (4, 16) and maps["prefix"].shape == (4, 16)
    assert bool((maps["patch"] >= 0).all()) and bool((maps["patch"].sum(-1) <= 1 + 1e-6).all())
    started = time.perf_counter()
    figures = extra_figures(
        model, image, {"position_embedding": {"available": True}, "heads": heads}
    )
    elapsed = time.perf_counter() - started
    assert set(figures) == {"pos_projection", "head_attention_maps"}
    assert all(png.startswith(PNG_MAGIC) for png in figures.values())
    assert elapsed < 5.0, f"extra figures took {elapsed:.2f} s"  # ~0.7 s here; 2 shared cores
    assert (
        extra_figures(
            model,
            image,
            {"position_embedding": {"available": False}, "heads": {"available": False}},
        )
        == {}
    )


def test_projection_of_a_planted_grid_table_is_the_grid() -> None:
    import numpy as np
    import torch

    from workers.analysis.grid import Grid
    from workers.analysis.plots_extra import position_projection

    grid = Grid(5, 7, 16)
    rows, cols = torch.meshgrid(torch.arange(5.0), torch.arange(7.0), indexing="ij")
    noise = 0.01 * torch.randn(5, 7, 6, generator=torch.Generator().manual_seed(0))
    table = torch.cat([torch.stack([3 * rows, 2 * cols], dim=-1), noise], dim=-1)
    points = position_projection(table, grid)
    assert points.shape == (5, 7, 2)
    # The two components are the row and column axes, up to sign and order.
    corr = np.corrcoef(
        np.stack([points[..., 0].ravel(), points[..., 1].ravel(), rows.ravel(), cols.ravel()])
    )
    assert (
        max(abs(corr[0, 2]), abs(corr[0, 3])) > 0.999
        and max(abs(corr[1, 2]), abs(corr[1, 3])) > 0.999
    )


# ----------------------------------------------------------------------------- HTTP


def _submit(stack: Stack, checkpoint: Path, *, seed: int = 0) -> str:
    """Submit an audit; a new seed makes a new request (identical requests are answered from cache)."""
    with stack.client() as http, checkpoint.open("rb") as handle:
        created = http.post(
            "/v1/audits",
            data={"arch": TINY_ARCH, "options": json.dumps({**SMALL_OPTIONS, "seed": seed})},
            files={"checkpoint": (checkpoint.name, handle)},
        )
    assert created.status_code == 202, created.text
    return created.json()["id"]


@pytest.fixture(scope="module")
def finished_audit(stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path]:
    checkpoint = save_safetensors(tiny_vit(), tmp_path_factory.mktemp("page") / "tiny.safetensors")
    audit_id = _submit(stack, checkpoint)
    assert stack.wait_for_audit(audit_id)["status"] == "finished"
    return audit_id, checkpoint


@pytest.mark.e2e
def test_report_page_answers_404_and_409_as_problems(
    stack: Stack, finished_audit: tuple[str, Path]
) -> None:
    with stack.client() as http:
        missing = http.get(f"/v1/audits/{'f' * 32}/report.html")
        assert missing.status_code == 404
        assert missing.json() == {
            "status": 404,
            "title": "Not found",
            "detail": f"no audit '{'f' * 32}'",
        }
        assert missing.headers["content-type"].startswith("application/problem+json")
        audit_id, checkpoint = finished_audit
        page = http.get(f"/v1/audits/{audit_id}/report.html")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        assert "default-src 'none'" in page.headers["content-security-policy"]
        pending = _submit(stack, checkpoint, seed=1)
        early = http.get(f"/v1/audits/{pending}/report.html")
        if early.status_code == 409:  # the worker may already have finished it on a fast machine
            assert early.json()["title"] == "Report not ready" and pending in early.json()["detail"]
        landing = http.get("/")
        assert landing.status_code == 200 and f"/v1/audits/{audit_id}/report.html" in landing.text


# ----------------------------------------------------------------------------- browser


CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--remote-debugging-port=0",
    "--window-size=1280,900",
]
BROWSER_TIMEOUT_S = 60


class DevTools:
    """A minimal Chrome DevTools Protocol client: one page, commands in order, events kept."""

    def __init__(self, socket: Any) -> None:
        self.socket = socket
        self.events: list[dict[str, Any]] = []
        self.next_id = 0
        self.session: str | None = None

    def send(
        self, method: str, params: dict[str, Any] | None = None, *, session: bool = True
    ) -> dict[str, Any]:
        self.next_id += 1
        message: dict[str, Any] = {"id": self.next_id, "method": method, "params": params or {}}
        if session and self.session:
            message["sessionId"] = self.session
        self.socket.send(json.dumps(message))
        while True:
            answer = json.loads(self.socket.recv(timeout=BROWSER_TIMEOUT_S))
            if answer.get("id") == self.next_id:
                if "error" in answer:
                    raise AssertionError(f"{method}: {answer['error']}")
                return answer["result"]
            if "method" in answer:
                self.events.append(answer)

    def wait_for_event(self, method: str) -> dict[str, Any]:
        deadline = time.monotonic() + BROWSER_TIMEOUT_S
        while time.monotonic() < deadline:
            for event in self.events:
                if event["method"] == method:
                    self.events.remove(event)
                    return event
            answer = json.loads(self.socket.recv(timeout=BROWSER_TIMEOUT_S))
            if "method" in answer:
                self.events.append(answer)
        raise AssertionError(f"timed out waiting for {method}")

    def evaluate(self, expression: str) -> Any:
        result = self.send(
            "Runtime.evaluate",
            {"expression": expression, "returnByValue": True, "awaitPromise": True},
        )
        if "exceptionDetails" in result:
            raise AssertionError(f"page script failed: {result['exceptionDetails']}")
        return result["result"].get("value")

    def navigate(self, url: str) -> None:
        self.events = [e for e in self.events if e["method"] != "Page.loadEventFired"]
        self.send("Page.navigate", {"url": url})
        self.wait_for_event("Page.loadEventFired")

    def problems(self) -> list[str]:
        """Console errors, uncaught exceptions, failed requests and HTTP errors seen so far."""
        found = []
        for event in self.events:
            params = event.get("params", {})
            if event["method"] == "Runtime.consoleAPICalled" and params.get("type") in (
                "error",
                "assert",
            ):
                found.append(f"console.{params['type']}: {params.get('args')}")
            elif event["method"] == "Runtime.exceptionThrown":
                found.append(f"exception: {params.get('exceptionDetails', {}).get('text')}")
            elif (
                event["method"] == "Log.entryAdded"
                and params.get("entry", {}).get("level") == "error"
            ):
                found.append(f"log: {params['entry'].get('text')} {params['entry'].get('url', '')}")
            elif event["method"] == "Network.loadingFailed":
                found.append(
                    f"request failed: {params.get('errorText')} ({params.get('requestId')})"
                )
            elif (
                event["method"] == "Network.responseReceived"
                and params.get("response", {}).get("status", 0) >= 400
            ):
                found.append(
                    f"HTTP {params['response']['status']}: {params['response'].get('url')}"
                )
        return found

    def screenshot(self, path: Path) -> None:
        shot = self.send("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True})
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(shot["data"]))


def _chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    pytest.fail(
        "the browser tests need Chromium: apt-get install -y chromium (`make test` installs it "
        "when run as root)"
    )


@pytest.fixture(scope="module")
def browser() -> Any:
    executable = _chromium()  # before the profile folder, so a missing browser leaves none
    profile = tempfile.mkdtemp(prefix="vitaudit-chromium-")
    process = subprocess.Popen(
        [executable, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "about:blank"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        url = None
        deadline = time.monotonic() + BROWSER_TIMEOUT_S
        while url is None and time.monotonic() < deadline:
            line = process.stderr.readline() if process.stderr else ""
            if not line and process.poll() is not None:
                raise AssertionError(f"chromium exited with {process.returncode}")
            match = re.search(r"DevTools listening on (ws://\S+)", line)
            url = match.group(1) if match else None
        assert url, "chromium did not print its DevTools address"
        from websockets.sync.client import connect

        with connect(url, max_size=None, open_timeout=BROWSER_TIMEOUT_S) as socket:
            devtools = DevTools(socket)
            target = devtools.send("Target.createTarget", {"url": "about:blank"}, session=False)
            devtools.session = devtools.send(
                "Target.attachToTarget",
                {"targetId": target["targetId"], "flatten": True},
                session=False,
            )["sessionId"]
            for domain in ("Page", "Runtime", "Log", "Network", "DOM"):
                devtools.send(f"{domain}.enable")
            yield devtools
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
        shutil.rmtree(profile, ignore_errors=True)


@pytest.mark.browser
@pytest.mark.e2e
def test_report_page_in_chromium(
    stack: Stack, finished_audit: tuple[str, Path], browser: DevTools
) -> None:
    audit_id, _ = finished_audit
    with stack.client() as http:
        report = http.get(f"/v1/audits/{audit_id}/report").json()
        artifacts = http.get(f"/v1/audits/{audit_id}/artifacts").json()["artifacts"]
    browser.events.clear()
    browser.navigate(f"{stack.url}/v1/audits/{audit_id}/report.html")

    images = browser.evaluate(
        "Array.from(document.images).map(i => ({name: i.dataset.figure, complete: i.complete, width: i.naturalWidth}))"
    )
    expected = {name[: -len(".png")] for name in artifacts if name.endswith(".png")}
    assert {
        "pos_projection",
        "head_attention_maps",
        "pos_similarity_grid",
        "gradient_logit_pressure",
    } <= expected
    assert {i["name"] for i in images} == expected
    assert all(i["complete"] and i["width"] > 0 for i in images), images

    shown = browser.evaluate(
        "Array.from(document.querySelectorAll('[data-metric][data-value]'))"
        ".map(e => [e.dataset.metric, e.dataset.value, e.textContent.trim()])"
    )
    metrics = {metric for metric, _, _ in shown}
    assert {
        "position_embedding.grid_structure_score",
        "position_embedding.neighbour_recall.k4",
        "gradients.formula_check.min_cosine_q",
        "heads.counts.global",
    } <= metrics
    for metric, exact, text in shown:
        value = lookup(report, metric)
        assert exact == ("null" if value is None else repr(value)), metric
        digits = 8 if "formula_check" in metric else 3
        assert text == (str(value) if metric.startswith("heads.") else fmt(value, digits)), metric
    assert (
        browser.evaluate("document.getElementById('json-link').getAttribute('href')")
        == f"/v1/audits/{audit_id}/report"
    )
    assert browser.problems() == []
    browser.screenshot(ARTIFACTS / "report-page-laptop.png")

    browser.send(
        "Emulation.setDeviceMetricsOverride",
        {"width": 390, "height": 844, "deviceScaleFactor": 2, "mobile": True},
    )
    try:
        browser.navigate(f"{stack.url}/v1/audits/{audit_id}/report.html")
        overflow = browser.evaluate("document.documentElement.scrollWidth - window.innerWidth")
        assert overflow <= 0, f"the page is {overflow} px wider than a phone screen"
        browser.screenshot(ARTIFACTS / "report-page-phone.png")
    finally:
        browser.send("Emulation.clearDeviceMetricsOverride")
    assert browser.problems() == []


def submit_through_the_form(browser: DevTools, checkpoint: Path, options: dict[str, Any]) -> str:
    """Fill the landing page's form, click Audit, and return the id the page shows."""
    document = browser.send("DOM.getDocument")
    node = browser.send(
        "DOM.querySelector", {"nodeId": document["root"]["nodeId"], "selector": "#checkpoint"}
    )
    browser.send("DOM.setFileInputFiles", {"nodeId": node["nodeId"], "files": [str(checkpoint)]})
    browser.evaluate(
        f"document.getElementById('arch').value = {json.dumps(TINY_ARCH)};"
        f"document.getElementById('options').value = {json.dumps(json.dumps(options))};"
        "document.querySelector('#submit-form button').click(); true"
    )
    return poll_until(
        lambda: browser.evaluate(
            "(document.getElementById('created-link') || {dataset: {}}).dataset.audit || ''"
        ),
        timeout=BROWSER_TIMEOUT_S,
        what="the form to show the created audit",
    )


@pytest.mark.browser
@pytest.mark.e2e
def test_landing_page_lists_audits_and_its_form_creates_one(
    stack: Stack, finished_audit: tuple[str, Path], browser: DevTools
) -> None:
    audit_id, checkpoint = finished_audit
    browser.events.clear()
    browser.navigate(f"{stack.url}/")
    link = browser.evaluate(
        f"document.querySelector('tr[data-audit=\"{audit_id}\"] a').getAttribute('href')"
    )
    assert link == f"/v1/audits/{audit_id}/report.html"

    created = submit_through_the_form(browser, checkpoint, {**SMALL_OPTIONS, "seed": 2})
    assert re.fullmatch(r"[0-9a-f]{32}", created) and created != audit_id
    with stack.client() as http:
        state = http.get(f"/v1/audits/{created}").json()
    assert state["arch"] == TINY_ARCH and state["status"] in ("queued", "running", "finished")
    assert browser.problems() == []
    browser.screenshot(ARTIFACTS / "landing-page.png")
    with stack.client() as http:
        assert http.delete(f"/v1/audits/{created}").status_code == 204


# ------------------------------------------------------------------ signed in with an API key

KEYED_TENANT = f"eve-{uuid.uuid4().hex[:8]}"
KEYED_SECRET = f"eve-secret-{uuid.uuid4().hex}"


@pytest.fixture(scope="module")
def keyed_stack(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """A stack with API keys (local mode off) and one worker."""
    data_dir = tmp_path_factory.mktemp("keyed-data")
    digest = hashlib.sha256(KEYED_SECRET.encode()).hexdigest()
    env = stack_env(redis_url, data_dir, VITAUDIT_API_KEYS=f"{KEYED_TENANT}:{digest}")
    env["VITAUDIT_LOCAL_MODE"] = "0"
    running = start_stack(env, data_dir, data_dir / "logs", workers=1)
    try:
        yield running
    finally:
        stop_stack(running)


def _click_and_wait_for_load(browser: DevTools, script: str) -> None:
    browser.events = [e for e in browser.events if e["method"] != "Page.loadEventFired"]
    browser.evaluate(script)
    browser.wait_for_event("Page.loadEventFired")


@pytest.mark.browser
@pytest.mark.e2e
def test_a_browser_signs_in_with_an_api_key_submits_and_reads_the_report(
    keyed_stack: Stack, finished_audit: tuple[str, Path], browser: DevTools
) -> None:
    _, checkpoint = finished_audit
    browser.events.clear()
    browser.navigate(f"{keyed_stack.url}/")
    assert browser.evaluate("location.pathname + location.search") == "/login?next=/"
    _click_and_wait_for_load(
        browser,
        f"document.getElementById('key').value = {json.dumps(KEYED_SECRET)};"
        "document.querySelector('#login-form button').click(); true",
    )
    assert browser.evaluate("location.pathname") == "/"
    assert KEYED_TENANT in browser.evaluate("document.querySelector('header').textContent")
    assert browser.evaluate("document.cookie") == ""  # HttpOnly: scripts cannot read the key

    created = submit_through_the_form(browser, checkpoint, SMALL_OPTIONS)
    key = {"X-API-Key": KEYED_SECRET}
    assert keyed_stack.wait_for_audit(created, headers=key)["status"] == "finished"
    browser.navigate(f"{keyed_stack.url}/v1/audits/{created}/report.html")
    assert browser.evaluate("location.pathname") == f"/v1/audits/{created}/report.html"
    images = browser.evaluate("Array.from(document.images).map(i => i.naturalWidth)")
    assert images and all(width > 0 for width in images)
    assert browser.problems() == []

    browser.navigate(f"{keyed_stack.url}/")
    _click_and_wait_for_load(browser, "document.getElementById('sign-out').click(); true")
    assert browser.evaluate("location.pathname") == "/login"
    browser.navigate(f"{keyed_stack.url}/v1/audits/{created}/report.html")
    assert browser.evaluate("location.pathname") == "/login"
    with keyed_stack.client(**key) as http:
        assert http.delete(f"/v1/audits/{created}").status_code == 204


def test_head_intervals_and_label_stability_are_shown() -> None:
    report = planted_report()
    report["heads"]["counts_ci95"] = {"global": [36, 43]}
    report["heads"]["bootstrap"] = {"resamples": 200, "seed": 0, "level": 0.95}
    stable = {"label": "global", "label_stability": 0.97}
    report["heads"]["layers"] = [
        {
            "layer": 0,
            "mean_distance_patches": 2.345,
            "mean_distance_patches_ci95": [2.125, 2.675],
            "label_stability": 0.615,
            "heads": [{"label": "local", "label_stability": 0.42}, stable],
        }
    ]
    html = render_report_page("a" * 32, report, {})
    page = parse(html)
    assert page.metric_text["heads.layers.0.label_stability"] == "0.61"
    assert "2.12–2.67" in html and "2.35" in html and "local x1, global x1" in html
    assert "36–43" in html  # the count's interval beside the count
    assert (
        "200 resamples); 1 head keeps its label in fewer than 80 %" in html
    )  # one head below the 0.8 stability cut


def test_the_overlay_undoes_the_audits_own_normalisation() -> None:
    """The attention-map figure shows the probe image as the audit normalised it: with a
    request's (or a transformers folder's) normalisation, not the arch default's; a
    1-channel model's image is shown grey."""
    import numpy as np
    import torch

    from tests.planted.models import tiny_vit
    from workers.analysis.normalization import Normalization
    from workers.analysis.plots_extra import display_image

    model = tiny_vit()
    picture = torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    own = Normalization((0.25, 0.5, 0.75), (0.25, 0.25, 0.25), "options.normalization")
    shown = display_image(own.apply(picture), model, own)
    np.testing.assert_allclose(shown, picture[0].permute(1, 2, 0).numpy(), atol=1e-6)
    # control: undoing the arch default instead gives other colours
    assert np.abs(display_image(own.apply(picture), model) - shown).max() > 0.1
    grey = Normalization((0.5,), (0.5,), "options.normalization")
    flat = display_image(grey.apply(picture), model, grey)
    assert flat.shape == (8, 8, 3) and np.allclose(flat[..., 0], flat[..., 2])
