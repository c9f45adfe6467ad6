"""Artifact store: one folder per audit under a root directory shared by API and workers.

Layout of an audit folder::

    request.json        what was asked (tenant, arch, options, input hashes)
    inputs/             the uploaded checkpoint, images and labels
    report.json         written last by the worker (atomically): its presence means finished
    error.json          written by the worker when the job failed
    *.png, *.npy, ...   artifacts the job wrote

The service and the workers only go through ``ArtifactStore``; two backends implement it:

- ``LocalStore``: a local (or shared, mounted) directory, the default.
- ``S3Store``: an S3-compatible bucket, selected by ``VITAUDIT_STORE_URL`` (or
  ``VITAUDIT_DATA_DIR``) set to ``s3://bucket/prefix``; the endpoint comes from
  ``VITAUDIT_S3_ENDPOINT_URL`` or ``AWS_ENDPOINT_URL`` (MinIO, Ceph, a cloud), the credentials
  from boto3's usual chain (``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, a role).

Uploads are staged on the API's local disk (``staging_dir``) as they stream in and handed to
the store once complete (``commit_inputs``); the worker reads an audit's inputs from a local
folder (``materialised``: the audit folder itself for LocalStore, a scratch download for S3)
and writes every artifact through ``write_bytes``, report.json last.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import uuid
from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

AUDIT_ID_PATTERN = re.compile(r"^[0-9a-f]{32}$")
ARTIFACT_NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
RESERVED_NAMES = {"request.json", "inputs"}
INPUTS = "inputs"
ENDED_MARKERS = ("report.json", "error.json")


def new_audit_id() -> str:
    return uuid.uuid4().hex


def artifact_name_ok(name: str) -> bool:
    """Whether ``name`` may be served as an artifact: a plain file name, not an input."""
    return bool(ARTIFACT_NAME_PATTERN.match(name)) and name not in RESERVED_NAMES


def check_audit_id(audit_id: str) -> str:
    if not AUDIT_ID_PATTERN.match(audit_id):
        raise KeyError(audit_id)
    return audit_id


class ArtifactStore(ABC):
    """One folder (or key prefix) per audit: request, inputs, artifacts, report."""

    @abstractmethod
    def ensure(self) -> None:
        """Create what the store needs (a root folder; nothing for a bucket that exists)."""

    @abstractmethod
    def create_audit(self, audit_id: str) -> Path:
        """Start an audit; the local folder whose ``inputs/`` the upload streams into."""

    @abstractmethod
    def commit_inputs(self, audit_id: str, staging: Path) -> None:
        """Make the staged ``inputs/`` of ``create_audit`` part of the audit."""

    @abstractmethod
    def has_audit(self, audit_id: str) -> bool:
        """Whether anything of the audit is stored (also while its upload is in progress)."""

    @abstractmethod
    def exists(self, audit_id: str) -> bool:
        """Whether the audit was submitted (its request.json is stored)."""

    @abstractmethod
    def write_bytes(self, audit_id: str, name: str, data: bytes) -> None:
        """Store ``name`` atomically: a reader sees the whole old file, the whole new one, or none."""

    @abstractmethod
    def read_bytes(self, audit_id: str, name: str) -> bytes | None:
        """The whole file ``name`` (small files: JSON, PNG), or None."""

    @abstractmethod
    def open_artifact(self, audit_id: str, name: str) -> IO[bytes] | None:
        """A binary stream of artifact ``name`` for reading in chunks, or None."""

    @abstractmethod
    def list_artifacts(self, audit_id: str) -> list[str]:
        """Names of the files the audit wrote (not its request or inputs), sorted."""

    @abstractmethod
    def input_size(self, audit_id: str, relative: str) -> int | None:
        """Bytes of input ``relative`` (e.g. ``inputs/checkpoint.safetensors``), or None."""

    @abstractmethod
    def reuse_input(self, source_audit: str, relative: str, audit_id: str, target: str) -> bool:
        """Make input ``relative`` of ``source_audit`` the input ``target`` (same form, e.g.
        ``inputs/checkpoint.safetensors``) of ``audit_id``, whose inputs are being staged
        (after `create_audit`, before `commit_inputs`), without passing the bytes through
        this process where the store can. True when the copy lies in the staging folder
        (and `commit_inputs` stores it with the rest), False when it is in the store already.
        """

    @abstractmethod
    def materialised(self, audit_id: str, scratch: Path) -> Any:
        """Context manager: a local folder holding the audit's request.json and inputs/."""

    @abstractmethod
    def audit_bytes(self, audit_id: str) -> int:
        """Bytes the audit keeps in the store: inputs and artifacts (0 when it has none)."""

    @abstractmethod
    def audit_ids(self) -> list[str]:
        """Ids of every audit the store holds, sorted."""

    @abstractmethod
    def ended_at(self, audit_id: str) -> float | None:
        """Unix time its report.json or error.json was last written; None while it runs."""

    @abstractmethod
    def delete_audit(self, audit_id: str) -> None:
        """Remove every file of the audit; deleting a missing audit is not an error."""

    @abstractmethod
    def writable(self) -> bool:
        """Whether a file can be written now (the readiness check)."""

    def write_json(self, audit_id: str, name: str, data: Any) -> None:
        self.write_bytes(audit_id, name, json.dumps(data, indent=2, allow_nan=False).encode())

    def read_json(self, audit_id: str, name: str) -> Any | None:
        try:
            data = self.read_bytes(audit_id, name)
        except KeyError:
            return None
        return None if data is None else json.loads(data)

    def has_artifact(self, audit_id: str, name: str) -> bool:
        stream = self.open_artifact(audit_id, name) if artifact_name_ok(name) else None
        if stream is None:
            return False
        stream.close()
        return True


class LocalStore(ArtifactStore):
    """The artifact store on a local (or shared, mounted) directory."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.audits = self.root / "audits"

    def ensure(self) -> None:
        self.audits.mkdir(parents=True, exist_ok=True)

    def audit_dir(self, audit_id: str) -> Path:
        return self.audits / check_audit_id(audit_id)

    def create_audit(self, audit_id: str) -> Path:
        path = self.audit_dir(audit_id)
        (path / INPUTS).mkdir(parents=True)
        return path

    def commit_inputs(self, audit_id: str, staging: Path) -> None:
        """Nothing to do: the upload streamed straight into the audit's folder."""

    def has_audit(self, audit_id: str) -> bool:
        try:
            return self.audit_dir(audit_id).is_dir()
        except KeyError:
            return False

    def exists(self, audit_id: str) -> bool:
        try:
            return (self.audit_dir(audit_id) / "request.json").is_file()
        except KeyError:
            return False

    def write_bytes(self, audit_id: str, name: str, data: bytes) -> None:
        write_atomic(self.audit_dir(audit_id) / name, data)

    def read_bytes(self, audit_id: str, name: str) -> bytes | None:
        try:
            return (self.audit_dir(audit_id) / name).read_bytes()
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            return None

    def artifact_path(self, audit_id: str, name: str) -> Path | None:
        """The path of artifact ``name`` of an audit, or None when there is no such artifact."""
        if not artifact_name_ok(name):
            return None
        path = self.audit_dir(audit_id) / name
        return path if path.is_file() else None

    def has_artifact(self, audit_id: str, name: str) -> bool:
        return self.artifact_path(audit_id, name) is not None

    def open_artifact(self, audit_id: str, name: str) -> IO[bytes] | None:
        path = self.artifact_path(audit_id, name)
        try:
            return path.open("rb") if path is not None else None
        except FileNotFoundError:
            return None

    def list_artifacts(self, audit_id: str) -> list[str]:
        folder = self.audit_dir(audit_id)
        if not folder.is_dir():
            return []
        return sorted(
            p.name
            for p in folder.iterdir()
            if p.is_file() and p.name not in RESERVED_NAMES and not p.name.startswith(".")
        )

    def input_size(self, audit_id: str, relative: str) -> int | None:
        path = self.audit_dir(audit_id) / relative
        return path.stat().st_size if path.is_file() else None

    def reuse_input(self, source_audit: str, relative: str, audit_id: str, target: str) -> bool:
        """A hard link (same file system: no copy, and deleting either audit keeps the other);
        a copy where links are not possible. The staging folder is the audit's own."""
        source = self.audit_dir(source_audit) / relative
        destination = self.audit_dir(audit_id) / target
        try:
            os.link(source, destination)
        except OSError:
            shutil.copyfile(source, destination)
        return True

    @contextmanager
    def materialised(self, audit_id: str, scratch: Path) -> Iterator[Path]:
        """The audit's own folder: nothing to download."""
        yield self.audit_dir(audit_id)

    def audit_bytes(self, audit_id: str) -> int:
        folder = self.audit_dir(audit_id)
        return (
            sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
            if folder.is_dir()
            else 0
        )

    def audit_ids(self) -> list[str]:
        if not self.audits.is_dir():
            return []
        return sorted(p.name for p in self.audits.iterdir() if AUDIT_ID_PATTERN.match(p.name))

    def ended_at(self, audit_id: str) -> float | None:
        folder = self.audit_dir(audit_id)
        times = [(folder / n).stat().st_mtime for n in ENDED_MARKERS if (folder / n).is_file()]
        return max(times) if times else None

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
