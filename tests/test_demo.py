"""`vitaudit demo --schedule quick`, end to end: the real command starts its own API and
worker (on the test Redis, a private queue and data folder), trains the task and the
shuffled-patch control, audits both trajectories through the API on uploaded task images,
and writes summary.json.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import stack_env
from workers.demo import positional_head_count
from workers.training import QUICK_CONFIG

pytestmark = [pytest.mark.slow, pytest.mark.e2e]

# Measured on the quick schedule (seed 0, task images uploaded): grid_structure_score 0.00
# at step 0 -> 0.63 at step 1000 for the trained run, 0.00 throughout for the control; head
# labels {global: 8} -> one horizontal and one vertical head in block 1 (trained), all 8
# global throughout (control).
STRUCTURE_GAIN_MARGIN = 0.3  # final - initial score, trained run
CHANCE_SCORE_TOLERANCE = 0.1  # a table without grid structure scores ~0
DEMO_TIMEOUT_S = 170  # the budget is 3 minutes for the default schedule


@pytest.fixture(scope="module")
def demo(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    root = tmp_path_factory.mktemp("demo")
    out = root / "out"
    env = stack_env(redis_url, root / "data")
    vitaudit = Path(sys.executable).with_name("vitaudit")  # the installed console script
    command = [str(vitaudit), "demo", "--schedule", "quick"]
    command += ["--out", str(out)]  # no --port: the demo picks a free one
    result = subprocess.run(
        command, env=env, capture_output=True, text=True, timeout=DEMO_TIMEOUT_S, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return out, result.stdout


def test_summary_lists_the_structure_score_along_both_trajectories(demo):
    out, _ = demo
    summary = json.loads((out / "summary.json").read_text())
    steps = list(QUICK_CONFIG.checkpoint_steps)
    assert set(summary["runs"]) == {"trained", "shuffled"}
    for points in summary["runs"].values():
        assert [p["step"] for p in points] == steps
        assert all(set(p) == {"step", "grid_structure_score"} for p in points)
        assert all(-1.0 <= p["grid_structure_score"] <= 1.0 for p in points)
    # Head labels and attention distance per layer ride along, one entry per step.
    num_layers = QUICK_CONFIG.model["depth"]
    for run in ("trained", "shuffled"):
        heads = summary["heads"][run]
        assert [h["step"] for h in heads] == steps
        for entry in heads:
            assert len(entry["labels"]) == len(entry["mean_distance_patches"]) == num_layers


def test_grid_structure_emerges_in_the_trained_run_only(demo):
    out, _ = demo
    runs = json.loads((out / "summary.json").read_text())["runs"]
    trained = [p["grid_structure_score"] for p in runs["trained"]]
    shuffled = [p["grid_structure_score"] for p in runs["shuffled"]]
    assert trained[0] < CHANCE_SCORE_TOLERANCE
    assert trained[-1] - trained[0] >= STRUCTURE_GAIN_MARGIN
    assert max(abs(s) for s in shuffled) < CHANCE_SCORE_TOLERANCE
    assert trained[-1] - shuffled[-1] >= STRUCTURE_GAIN_MARGIN


def test_heads_take_positional_roles_in_the_trained_run_only(demo):
    out, stdout = demo
    heads = json.loads((out / "summary.json").read_text())["heads"]
    trained = [positional_head_count(entry["labels"]) for entry in heads["trained"]]
    shuffled = [positional_head_count(entry["labels"]) for entry in heads["shuffled"]]
    assert trained[0] == 0 and trained[-1] >= 1
    assert shuffled == [0] * len(shuffled)
    assert "head labels" in stdout


def test_audits_ran_on_the_uploaded_task_images_with_their_labels(demo):
    out, _ = demo
    for run in ("trained", "shuffled"):
        report = json.loads((out / run / "report.json").read_text())
        assert report["settings"]["probe_set"] == "uploaded"
        assert report["settings"]["labels_source"] == "given"
        assert report["settings"]["num_images"] == len(
            list((out / "audit-images" / run).glob("*.png"))
        )
        assert report["trajectory"]["steps"] == list(QUICK_CONFIG.checkpoint_steps)
    assert (out / "trajectory_contrast.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_demo_prints_where_the_reports_are(demo):
    out, stdout = demo
    assert f"{out}/summary.json" in stdout
    assert "grid_structure_score" in stdout


def test_the_demo_writes_each_runs_html_report_and_its_stack_logs(demo):
    out, _ = demo
    for run in ("trained", "shuffled"):
        page = (out / run / "report.html").read_text()
        assert page.startswith("<!DOCTYPE html>") or page.lstrip().lower().startswith("<!doctype")
        assert "trajectory" in page.lower()
    assert (out / "logs" / "api.log").exists() and (out / "logs" / "worker.log").exists()


def test_the_demo_refuses_a_taken_port_and_says_so(tmp_path: Path, redis_url: str) -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        vitaudit = Path(sys.executable).with_name("vitaudit")
        result = subprocess.run(
            [str(vitaudit), "demo", "--schedule", "quick", "--out", str(tmp_path / "out")]
            + ["--port", str(port)],
            env=stack_env(redis_url, tmp_path / "data"),
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    assert result.returncode == 2, result.stdout + result.stderr
    assert f"port {port} on 127.0.0.1 is taken by another program" in result.stderr


# Measured on the quick schedule (seed 0, the 32 task images, `workers.analysis.qk_geometry`
# on the checkpoints directly): mean near-minus-far Q/K cosine -0.01 at step 0 -> 0.52 at step
# 1000 with 7 of 8 heads aligned from position (trained); about 0 and none (control).
QK_GAP_GAIN_MARGIN = 0.2
QK_CHANCE_GAP = 0.05


def test_queries_and_keys_become_spatial_in_the_trained_run_only(demo):
    out, stdout = demo
    qk = json.loads((out / "summary.json").read_text())["qk"]
    trained, shuffled = qk["trained"], qk["shuffled"]
    assert [e["step"] for e in trained] == list(QUICK_CONFIG.checkpoint_steps)
    assert trained[0]["position_aligned_heads"] == 0
    assert trained[-1]["position_aligned_heads"] >= 1
    assert (
        trained[-1]["alignment_gap_mean"] - trained[0]["alignment_gap_mean"] >= QK_GAP_GAIN_MARGIN
    )
    assert all(e["position_aligned_heads"] == 0 for e in shuffled)
    assert all(abs(e["alignment_gap_mean"]) < QK_CHANCE_GAP for e in shuffled)
    assert "Q/K near-far cosine gap" in stdout
