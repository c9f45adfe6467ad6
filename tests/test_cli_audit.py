"""`vitaudit audit` as CI runs it: the real console command against the real stack.

Exit codes (0 policy holds, 1 violated, 2 usage/service error), JUnit and Markdown outputs,
baseline regressions, content-addressed uploads and cached identical requests.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import Stack, free_port
from tests.planted.models import TINY_ARCH, TINY_OPTIONS, save_safetensors, tiny_vit

pytestmark = pytest.mark.e2e

VITAUDIT = str(Path(sys.executable).parent / "vitaudit")
CLI_TIMEOUT_S = 240
PASSING_POLICY = """
[[rule]]
path = "position_embedding.grid_structure_score"
min = -1.0   # the score's range is [-1, 1]: holds for any table

[[rule]]
path = "position_embedding.decodability_r2"
max = 1.0    # R^2 is at most 1
"""


@dataclass
class Run:
    code: int
    stdout: str
    stderr: str

    @property
    def audit_id(self) -> str:
        match = re.search(r"audit ([0-9a-f]{32}):", self.stderr)
        assert match, self.stderr
        return match.group(1)


def vitaudit(*args: str | Path, server: str, cwd: Path) -> Run:
    env = dict(os.environ, VITAUDIT_URL=server)
    env.pop("VITAUDIT_API_KEY", None)
    done = subprocess.run(
        [VITAUDIT, *map(str, args)],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=CLI_TIMEOUT_S,
    )
    return Run(done.returncode, done.stdout, done.stderr)


def audit(
    stack: Stack, checkpoint: Path, cwd: Path, *extra: str | Path, arch: str = TINY_ARCH
) -> Run:
    return vitaudit(
        "audit",
        checkpoint,
        "--arch",
        arch,
        "--options",
        json.dumps(TINY_OPTIONS),
        *extra,
        server=stack.url,
        cwd=cwd,
    )


def audit_folders(stack: Stack) -> set[str]:
    return {p.name for p in (stack.data_dir / "audits").iterdir() if p.is_dir()}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cli")


@pytest.fixture(scope="module")
def checkpoint(workdir: Path) -> Path:
    return save_safetensors(tiny_vit(seed=7), workdir / "tiny.safetensors")


@pytest.fixture(scope="module")
def first(stack: Stack, checkpoint: Path, workdir: Path) -> tuple[Run, dict]:
    """The first audit of the checkpoint, gated by a policy that holds."""
    (workdir / "pass.toml").write_text(PASSING_POLICY)
    run = audit(
        stack,
        checkpoint,
        workdir,
        "--policy", "pass.toml",
        "--junit", "pass.xml",
        "--markdown", "pass.md",
        "--out", "first",
    )  # fmt: skip
    assert run.code == 0, run.stderr
    return run, json.loads((workdir / "first" / "report.json").read_text())


def test_policy_that_holds_exits_0_with_junit_and_markdown(
    first: tuple[Run, dict], workdir: Path
) -> None:
    run, report = first
    assert "checkpoint uploaded" in run.stderr and "submitted" in run.stderr
    assert "policy passed: 2 rules hold" in run.stdout
    suite = ET.parse(workdir / "pass.xml").getroot().find("testsuite")
    cases = suite.findall("testcase")
    assert [c.get("name") for c in cases] == [
        "position_embedding.grid_structure_score",
        "position_embedding.decodability_r2",
    ]
    assert all(c.find("failure") is None and c.find("error") is None for c in cases)
    markdown = (workdir / "pass.md").read_text()
    assert "**Policy passed**: 2 of 2 rules hold." in markdown
    plots = sorted(p.name for p in (workdir / "first").glob("*.png"))
    assert plots and all(f"(first/{name})" in markdown for name in plots)
    verdict = json.loads((workdir / "first" / "policy-verdict.json").read_text())
    assert verdict["passed"] is True
    assert verdict["rules"][0]["value"] == report["position_embedding"]["grid_structure_score"]


def test_violated_policy_exits_1_from_the_cached_audit(
    stack: Stack, first: tuple[Run, dict], checkpoint: Path, workdir: Path
) -> None:
    run, report = first
    score = report["position_embedding"]["grid_structure_score"]
    (workdir / "fail.toml").write_text(
        f'[[rule]]\npath = "position_embedding.grid_structure_score"\nmin = {score + 0.1}\n'
    )
    before = audit_folders(stack)
    again = audit(
        stack, checkpoint, workdir, "--policy", "fail.toml", "--junit", "fail.xml", "--out", "again"
    )
    assert again.code == 1, again.stderr
    # Content addressing: not uploaded again, and no new job for an identical request.
    assert "checkpoint already on the service, not uploaded" in again.stderr
    assert "cached: an identical request was already answered" in again.stderr
    assert again.audit_id == run.audit_id
    assert audit_folders(stack) == before
    assert json.loads((workdir / "again" / "report.json").read_text()) == report
    (case,) = ET.parse(workdir / "fail.xml").getroot().iter("testcase")
    assert case.find("failure").get("message") == (
        f"position_embedding.grid_structure_score: {score:.6g} < min {score + 0.1:.6g}"
    )
    assert "policy violated: 1 failed, 0 in error" in again.stdout


def test_baseline_regression_is_caught(
    stack: Stack, first: tuple[Run, dict], checkpoint: Path, workdir: Path
) -> None:
    _, report = first
    r2 = report["position_embedding"]["decodability_r2"]
    better = json.loads(json.dumps(report))
    better["position_embedding"]["decodability_r2"] = r2 + 0.2  # the baseline was better by 0.2
    (workdir / "baseline-better.json").write_text(json.dumps(better))
    (workdir / "drop.toml").write_text(
        '[[rule]]\npath = "position_embedding.decodability_r2"\nmax_drop = 0.05\n'
    )
    regressed = audit(
        stack,
        checkpoint,
        workdir,
        "--policy",
        "drop.toml",
        "--baseline",
        "baseline-better.json",
        "--junit",
        "drop.xml",
    )
    assert regressed.code == 1, regressed.stderr
    (case,) = ET.parse(workdir / "drop.xml").getroot().iter("testcase")
    assert "(more than max_drop 0.05)" in case.find("failure").get("message")
    same = audit(
        stack, checkpoint, workdir, "--policy", "drop.toml", "--baseline", "first/report.json"
    )
    assert same.code == 0, same.stderr
    missing = audit(stack, checkpoint, workdir, "--policy", "drop.toml")
    assert missing.code == 2
    assert "rule 1 (position_embedding.decodability_r2) uses max_drop/max_rise" in missing.stderr


def test_unknown_policy_path_is_an_error_not_a_pass(
    stack: Stack, first: tuple[Run, dict], checkpoint: Path, workdir: Path
) -> None:
    # heads were not computed (options.analyses): a rule on them cannot silently pass.
    (workdir / "unknown.toml").write_text('[[rule]]\npath = "heads.counts.global"\nmin = 0\n')
    run = audit(stack, checkpoint, workdir, "--policy", "unknown.toml", "--junit", "unknown.xml")
    assert run.code == 2, run.stderr
    assert "ERROR 'heads.counts.global' is not in the report" in run.stdout
    (case,) = ET.parse(workdir / "unknown.xml").getroot().iter("testcase")
    assert case.find("error") is not None


def test_invalid_policy_file_exits_2_naming_the_rule(
    stack: Stack, checkpoint: Path, workdir: Path
) -> None:
    (workdir / "bad.toml").write_text('[[rule]]\npath = "heads.counts.global"\nminimum = 2\n')
    run = audit(stack, checkpoint, workdir, "--policy", "bad.toml")
    assert run.code == 2
    assert run.stderr.strip() == (
        "vitaudit: policy bad.toml: rule 1 (heads.counts.global): unknown key(s) 'minimum'; "
        "allowed: path, name, min, max, max_drop, max_rise"
    )


def test_service_errors_exit_2_with_the_message(
    stack: Stack, checkpoint: Path, workdir: Path
) -> None:
    rejected = audit(stack, checkpoint, workdir, arch="vit_smal_patch16_224")
    assert rejected.code == 2
    assert (
        "POST /v1/audits -> 422" in rejected.stderr and "vit_small_patch16_224" in rejected.stderr
    )
    unreachable = vitaudit(
        "audit",
        checkpoint,
        "--arch",
        TINY_ARCH,
        server=f"http://127.0.0.1:{free_port()}",
        cwd=workdir,
    )
    assert unreachable.code == 2
    assert "cannot reach vitaudit at http://127.0.0.1:" in unreachable.stderr


def test_diff_lists_changed_fields(first: tuple[Run, dict], workdir: Path, stack: Stack) -> None:
    same = vitaudit("diff", "first/report.json", "again/report.json", server=stack.url, cwd=workdir)
    assert (same.code, same.stdout.strip()) == (0, "no numeric field changed beyond the tolerance")
    changed = vitaudit(
        "diff", "first/report.json", "baseline-better.json", "--json", server=stack.url, cwd=workdir
    )
    assert changed.code == 1
    assert [c["path"] for c in json.loads(changed.stdout)] == ["position_embedding.decodability_r2"]


def test_checkpoint_lookup_by_sha256(
    stack: Stack, first: tuple[Run, dict], checkpoint: Path
) -> None:
    sha = hashlib.sha256(checkpoint.read_bytes()).hexdigest()
    with stack.client() as http:
        known = http.get(f"/v1/checkpoints/{sha}")
        assert known.status_code == 200
        assert known.json() == {
            "sha256": sha,
            "bytes": checkpoint.stat().st_size,
            "format": "torch",
            "filename": "tiny.safetensors",
        }
        unknown = http.get(f"/v1/checkpoints/{'0' * 64}")
        assert (unknown.status_code, unknown.json()) == (
            404,
            {
                "status": 404,
                "title": "Not found",
                "detail": f"no checkpoint with sha256 {'0' * 64}",
            },
        )
        bad = http.get("/v1/checkpoints/xyz")
        assert bad.json() == {
            "status": 400,
            "title": "Invalid request",
            "detail": "'xyz' is not a sha256 (64 hexadecimal characters)",
        }


def test_the_service_evaluates_a_submitted_policy(
    stack: Stack, first: tuple[Run, dict], checkpoint: Path
) -> None:
    sha = hashlib.sha256(checkpoint.read_bytes()).hexdigest()
    options = json.dumps({**TINY_OPTIONS, "seed": 1})
    with stack.client() as http:
        bad = http.post(
            "/v1/audits",
            files=[
                ("arch", (None, TINY_ARCH)),
                ("checkpoint_sha256", (None, sha)),
                ("policy", (None, "[[rule]]\nmin = 1")),
            ],
        )
        assert (bad.status_code, bad.json()) == (
            400,
            {
                "status": 400,
                "title": "Invalid request",
                "detail": "policy: rule 1: 'path' is missing; give a dotted path into the report, e.g. 'heads.counts.global'",
            },
        )
        policy = PASSING_POLICY + '\n[[rule]]\npath = "heads.counts.global"\nmin = 0\n'
        fields = {"arch": TINY_ARCH, "checkpoint_sha256": sha, "options": options, "policy": policy}
        created = http.post("/v1/audits", files=[(k, (None, v)) for k, v in fields.items()])
        assert created.status_code == 202, created.text
        assert created.json()["cached"] is False
    state = stack.wait_for_audit(created.json()["id"])
    assert state["status"] == "finished", state
    with stack.client() as http:
        report = http.get(f"/v1/audits/{state['id']}/report").json()
    assert [r["verdict"] for r in report["policy"]["rules"]] == ["pass", "pass", "error"]
    assert report["policy"]["passed"] is False
    assert (
        report["position_embedding"]["grid_structure_score"]
        == report["policy"]["rules"][0]["value"]
    )


def test_cache_ignores_a_deleted_audit(
    stack: Stack, first: tuple[Run, dict], checkpoint: Path, workdir: Path
) -> None:
    run, _ = first
    with stack.client() as http:
        assert http.delete(f"/v1/audits/{run.audit_id}").status_code == 204
    rerun = audit(stack, checkpoint, workdir, "--out", "rerun")
    assert rerun.code == 0, rerun.stderr
    # A new job runs; the checkpoint is still held (linked) by the audit the service-policy test made.
    assert "submitted (checkpoint already on the service, not uploaded)" in rerun.stderr
    assert rerun.audit_id != run.audit_id
    assert rerun.audit_id in audit_folders(stack)
