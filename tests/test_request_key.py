"""The request cache key changes with everything that decides a report, the code included."""

from __future__ import annotations

from pathlib import Path

import pytest

from service import code_version
from service.checkpoints import request_key
from service.code_version import (
    analysis_code_version,
    code_skew_note,
    report_is_reusable,
    source_digest,
)

RECORD = {
    "analysis_code": "0.1.0+0123456789abcdef",
    "arch": "vit_tiny_patch16_224",
    "checkpoint": {"sha256": "a" * 64},
    "images_sha256": None,
    "labels": None,
    "options": {"seed": 0},
}


def test_the_source_digest_follows_every_python_file(tmp_path: Path) -> None:
    (tmp_path / "analysis").mkdir()
    (tmp_path / "analysis" / "heads.py").write_text("THRESHOLD = 0.5\n")
    (tmp_path / "notes.txt").write_text("not code")
    before = source_digest(tmp_path)
    assert source_digest(tmp_path) == before  # deterministic
    (tmp_path / "notes.txt").write_text("still not code")
    assert source_digest(tmp_path) == before
    (tmp_path / "analysis" / "heads.py").write_text("THRESHOLD = 0.6\n")
    changed = source_digest(tmp_path)
    assert changed != before
    (tmp_path / "analysis" / "heads.py").rename(tmp_path / "analysis" / "labels.py")
    assert source_digest(tmp_path) not in (before, changed)  # the path counts too


def test_the_request_key_changes_with_the_code() -> None:
    key = request_key(RECORD)
    assert request_key(dict(RECORD)) == key
    assert request_key({**RECORD, "options": {"seed": 1}}) != key
    assert request_key({**RECORD, "analysis_code": "0.1.0+fedcba9876543210"}) != key


def test_the_running_code_version_covers_the_workers_package_and_the_policy(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    release, _, digest = analysis_code_version().partition("+")
    assert release and len(digest) == 16
    assert analysis_code_version() == f"{release}+{digest}"  # stable between calls
    real = code_version.source_digest
    monkeypatch.setattr(code_version, "source_digest", lambda root: real(root) + "edited")
    assert analysis_code_version() != f"{release}+{digest}"  # seen without a restart


def test_a_worker_on_other_code_says_so_in_a_note() -> None:
    assert code_skew_note("0.1.0+aaaa", "0.1.0+aaaa") is None
    assert code_skew_note(None, "0.1.0+aaaa") is None  # recorded before the API wrote it
    note = code_skew_note("0.1.0+aaaa", "0.1.0+bbbb")
    assert note is not None and "0.1.0+aaaa" in note and "0.1.0+bbbb" in note


def test_only_a_report_from_the_recorded_code_is_reused() -> None:
    def stamped(code: str | None) -> dict:
        return {"versions": {"analysis_code": code} if code else {"vitaudit": "0.1.0"}}

    assert report_is_reusable(RECORD, stamped(RECORD["analysis_code"]))
    assert not report_is_reusable(RECORD, stamped("0.1.0+fedcba9876543210"))
    assert report_is_reusable(RECORD, stamped(None))  # written before workers stamped it
    assert report_is_reusable({**RECORD, "analysis_code": None}, stamped("0.1.0+ffff"))
