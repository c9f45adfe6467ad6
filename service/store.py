"""Artifact store: one folder per audit under a root directory shared by API and workers.

Layout of an audit folder::

    request.json        what was asked (tenant, arch, options, input hashes)
    inputs/             the uploaded checkpoint, images and labels
    report.json         written last by the worker (atomically): its presence means finished
    error.json          written by the worker when the job failed
    *.png, *.npy, ...   artifacts the job wrote

The service and the workers only go through this class, so an object-store backend can take
its place with the same interface.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Any

AUDIT_ID_PATTERN = re.compile(r"^[0-9a-f]{32}$")
ARTIFACT_NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
RESERVED_NAMES = {"request.json", "inputs"}


def new_audit_id() -> str:
    return uuid.uuid4().hex


class LocalStore:
    """The artifact store on a local (or shared, mounted) directory."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.audits = self.root / "audits"

    def ensure(self) -> None:
        self.audits.mkdir(parents=True, exist_ok=True)

    def audit_dir(self, audit_id: str) -> Path:
        if not AUDIT_ID_PATTERN.match(audit_id):
            raise KeyError(audit_id)
        return self.audits / audit_id

    def create_audit(self, audit_id: str) -> Path:
        path = self.audit_dir(audit_id)
        (path / "inputs").mkdir(parents=True)
        return path

    def exists(self, audit_id: str) -> bool:
        try:
            return (self.audit_dir(audit_id) / "request.json").is_file()
        except KeyError:
            return False

    def write_json(self, audit_id: str, name: str, data: Any) -> None:
        write_atomic(self.audit_dir(audit_id) / name, json.dumps(data, indent=2, allow_nan=False).encode())

    def read_json(self, audit_id: str, name: str) -> Any | None:
        try:
            return json.loads((self.audit_dir(audit_id) / name).read_bytes())
        except (FileNotFoundError, KeyError):
            return None

    def artifact_path(self, audit_id: str, name: str) -> Path | None:
        """The path of artifact ``name`` of an audit, or None when there is no such artifact."""
        if not ARTIFACT_NAME_PATTERN.match(name) or name in RESERVED_NAMES:
            return None
        path = self.audit_dir(audit_id) / name
        return path if path.is_file() else None

    def list_artifacts(self, audit_id: str) -> list[str]:
        folder = self.audit_dir(audit_id)
        if not folder.is_dir():
            return []
        return sorted(
            p.name
            for p in folder.iterdir()
            if p.is_file() and p.name not in RESERVED_NAMES and not p.name.startswith(".")
        )

    def delete_audit(self, audit_id: str) -> None:
        shutil.rmtree(self.audit_dir(audit_id), ignore_errors=True)

    def writable(self) -> bool:
        try:
            self.ensure()
            with tempfile.NamedTemporaryFile(dir=self.root, prefix=".probe-"):
                pass
            return True
        except OSError:
            return False


def write_atomic(path: Path, data: bytes) -> None:
    """Write to a temporary name beside ``path`` and rename, so readers never see half a file."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
