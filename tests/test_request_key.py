"""The request cache key changes with everything that decides a report, the code included."""

from __future__ import annotations

from pathlib import Path

import pytest

from service import checkpoints
from service.checkpoints import request_key, source_digest

RECORD = {
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


def test_the_request_key_changes_with_the_code(monkeypatch: pytest.MonkeyPatch) -> None:
    key = request_key(RECORD)
    assert request_key(dict(RECORD)) == key
    assert request_key({**RECORD, "options": {"seed": 1}}) != key
    monkeypatch.setattr(checkpoints, "_code_version", lambda: "0.1.0+other-code")
    assert request_key(RECORD) != key


def test_the_running_code_version_covers_the_workers_package_and_the_policy(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    release, _, digest = checkpoints._code_version().partition("+")
    assert release and len(digest) == 16
    assert checkpoints._code_version() == f"{release}+{digest}"  # stable between calls
    real = checkpoints.source_digest
    monkeypatch.setattr(checkpoints, "source_digest", lambda root: real(root) + "edited")
    assert checkpoints._code_version() != f"{release}+{digest}"  # seen without a restart
