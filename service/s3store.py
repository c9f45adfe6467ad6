"""The artifact store on an S3-compatible bucket: ``s3://bucket/prefix``.

Key layout mirrors the local folder layout (``LocalStore``)::

    {prefix}audits/{audit_id}/request.json
    {prefix}audits/{audit_id}/inputs/checkpoint.safetensors
    {prefix}audits/{audit_id}/report.json, *.png, *.npy, ...

A PUT replaces an object whole, so every write is atomic for readers without a rename.
Uploads reach the store in two steps: the API streams the multipart body to a local staging
folder (bounded memory, sha256 on the way, exactly as for LocalStore), then ``commit_inputs``
sends each file with boto3's managed transfer (multipart above ``MULTIPART_CHUNK_BYTES``).
Workers download an audit's request and inputs to a scratch folder, run on local paths, and
write artifacts back with PUTs. Nothing is shared between nodes but the bucket.
"""

from __future__ import annotations

import shutil
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any
from urllib.parse import urlparse

import boto3
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from service.store import (
    AUDIT_ID_PATTERN,
    INPUTS,
    RESERVED_NAMES,
    ArtifactStore,
    artifact_name_ok,
    check_audit_id,
)

# 16 MiB parts: a 2 GiB checkpoint is 128 parts (S3 allows 10,000), and a part is the most
# the transfer holds in memory per thread.
MULTIPART_CHUNK_BYTES = 16 * 1024**2
TRANSFER_THREADS = 4
MISSING_CODES = {"NoSuchKey", "404", "NotFound", "NoSuchBucket"}
# An unreachable endpoint fails a request (and /readyz) in seconds, not after botocore's
# default 60 s connect timeout times its retries.
CLIENT_CONFIG = Config(
    connect_timeout=5, read_timeout=60, retries={"max_attempts": 3, "mode": "standard"}
)


def parse_s3_url(url: str) -> tuple[str, str]:
    """``s3://bucket/some/prefix`` -> ("bucket", "some/prefix/"); the prefix may be empty."""
    parsed = urlparse(url)
    if parsed.scheme != "s3" or not parsed.netloc:
        raise ValueError(f"an S3 store URL looks like s3://bucket/prefix, got {url!r}")
    prefix = parsed.path.strip("/")
    return parsed.netloc, f"{prefix}/" if prefix else ""


def _missing(exc: ClientError) -> bool:
    return str(exc.response.get("Error", {}).get("Code")) in MISSING_CODES


class S3Store(ArtifactStore):
    """Audits as objects in one bucket under one prefix; see the module docstring."""

    def __init__(
        self, url: str, *, endpoint_url: str | None = None, scratch: Path | None = None
    ) -> None:
        self.url = url
        self.bucket, self.prefix = parse_s3_url(url)
        self.client = boto3.client("s3", endpoint_url=endpoint_url or None, config=CLIENT_CONFIG)
        self.scratch = Path(scratch or tempfile.gettempdir())
        self.transfer = TransferConfig(
            multipart_threshold=MULTIPART_CHUNK_BYTES,
            multipart_chunksize=MULTIPART_CHUNK_BYTES,
            max_concurrency=TRANSFER_THREADS,
        )
        self._staging: dict[str, Path] = {}
        self._bucket_checked = False

    # -- keys -------------------------------------------------------------------------------
    def _audit_prefix(self, audit_id: str) -> str:
        return f"{self.prefix}audits/{check_audit_id(audit_id)}/"

    def _key(self, audit_id: str, name: str) -> str:
        return self._audit_prefix(audit_id) + name

    def _objects(self, prefix: str, *, delimiter: str | None = None) -> Iterator[dict[str, Any]]:
        """Every page of ``list_objects_v2`` under ``prefix``."""
        kwargs: dict[str, Any] = {"Bucket": self.bucket, "Prefix": prefix}
        if delimiter:
            kwargs["Delimiter"] = delimiter
        yield from self.client.get_paginator("list_objects_v2").paginate(**kwargs)

    def _head(self, key: str) -> dict[str, Any] | None:
        try:
            return self.client.head_object(Bucket=self.bucket, Key=key)
        except ClientError as exc:
            if _missing(exc):
                return None
            raise

    # -- lifecycle --------------------------------------------------------------------------
    def ensure(self) -> None:
        """Create the bucket when it does not exist (MinIO, a test server); once per process."""
        if self._bucket_checked:
            return
        try:
            self.client.head_bucket(Bucket=self.bucket)
        except ClientError as exc:
            if not _missing(exc):
                raise
            self.client.create_bucket(Bucket=self.bucket)
        self._bucket_checked = True
        self.scratch.mkdir(parents=True, exist_ok=True)

    def create_audit(self, audit_id: str) -> Path:
        self.client.put_object(Bucket=self.bucket, Key=self._key(audit_id, ".created"), Body=b"")
        self.scratch.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f"upload-{audit_id}-", dir=self.scratch))
        (staging / INPUTS).mkdir()
        self._staging[audit_id] = staging
        return staging

    def commit_inputs(self, audit_id: str, staging: Path) -> None:
        """Upload every staged input file (multipart for large ones), then drop the staging."""
        for path in sorted((staging / INPUTS).rglob("*")):
            if path.is_file():
                key = self._key(audit_id, path.relative_to(staging).as_posix())
                self.client.upload_file(str(path), self.bucket, key, Config=self.transfer)
        self._drop_staging(audit_id)

    def _drop_staging(self, audit_id: str) -> None:
        staging = self._staging.pop(audit_id, None)
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)

    def has_audit(self, audit_id: str) -> bool:
        try:
            prefix = self._audit_prefix(audit_id)
        except KeyError:
            return False
        page = self.client.list_objects_v2(Bucket=self.bucket, Prefix=prefix, MaxKeys=1)
        return int(page.get("KeyCount", 0)) > 0

    def exists(self, audit_id: str) -> bool:
        try:
            return self._head(self._key(audit_id, "request.json")) is not None
        except KeyError:
            return False

    # -- files ------------------------------------------------------------------------------
    def write_bytes(self, audit_id: str, name: str, data: bytes) -> None:
        self.client.put_object(Bucket=self.bucket, Key=self._key(audit_id, name), Body=data)

    def read_bytes(self, audit_id: str, name: str) -> bytes | None:
        body = self._get(self._key(audit_id, name))
        if body is None:
            return None
        try:
            return body.read()
        finally:
            body.close()

    def _get(self, key: str) -> Any | None:
        try:
            return self.client.get_object(Bucket=self.bucket, Key=key)["Body"]
        except ClientError as exc:
            if _missing(exc):
                return None
            raise

    def open_artifact(self, audit_id: str, name: str) -> IO[bytes] | None:
        """botocore's StreamingBody: ``read(n)`` pulls from the open HTTP response."""
        if not artifact_name_ok(name):
            return None
        return self._get(self._key(audit_id, name))

    def has_artifact(self, audit_id: str, name: str) -> bool:
        """A HEAD request: the status page asks this on every poll."""
        return artifact_name_ok(name) and self._head(self._key(audit_id, name)) is not None

    def list_artifacts(self, audit_id: str) -> list[str]:
        prefix = self._audit_prefix(audit_id)
        names = [
            obj["Key"][len(prefix) :]
            for page in self._objects(prefix, delimiter="/")
            for obj in page.get("Contents", [])
        ]
        return sorted(n for n in names if n not in RESERVED_NAMES and not n.startswith("."))

    def input_size(self, audit_id: str, relative: str) -> int | None:
        head = self._head(self._key(audit_id, relative))
        return None if head is None else int(head["ContentLength"])

    def reuse_input(self, source_audit: str, relative: str, audit_id: str, target: str) -> bool:
        """A copy inside the bucket (CopyObject, or UploadPartCopy in parts for large objects):
        the bytes never leave the object store."""
        source = {"Bucket": self.bucket, "Key": self._key(source_audit, relative)}
        self.client.copy(source, self.bucket, self._key(audit_id, target), Config=self.transfer)
        return False

    @contextmanager
    def materialised(self, audit_id: str, scratch: Path) -> Iterator[Path]:
        """Download request.json and inputs/ to a fresh folder under ``scratch``; removed after."""
        scratch.mkdir(parents=True, exist_ok=True)
        folder = Path(tempfile.mkdtemp(prefix=f"audit-{audit_id}-", dir=scratch))
        try:
            prefix = self._audit_prefix(audit_id)
            keys = [prefix + "request.json"] + [
                obj["Key"]
                for page in self._objects(prefix + f"{INPUTS}/")
                for obj in page.get("Contents", [])
            ]
            for key in keys:
                target = folder / key[len(prefix) :]
                target.parent.mkdir(parents=True, exist_ok=True)
                try:
                    self.client.download_file(self.bucket, key, str(target), Config=self.transfer)
                except ClientError as exc:
                    if not _missing(exc):
                        raise
            yield folder
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    def audit_bytes(self, audit_id: str) -> int:
        return sum(
            int(obj["Size"])
            for page in self._objects(self._audit_prefix(audit_id))
            for obj in page.get("Contents", [])
        )

    def audit_ids(self) -> list[str]:
        root = f"{self.prefix}audits/"
        ids = [
            common["Prefix"][len(root) :].rstrip("/")
            for page in self._objects(root, delimiter="/")
            for common in page.get("CommonPrefixes", [])
        ]
        return sorted(i for i in ids if AUDIT_ID_PATTERN.match(i))

    def ended_at(self, audit_id: str) -> float | None:
        heads = [self._head(self._key(audit_id, name)) for name in ("report.json", "error.json")]
        times = [h["LastModified"].timestamp() for h in heads if h is not None]
        return max(times) if times else None

    def delete_audit(self, audit_id: str) -> None:
        self._drop_staging(audit_id)
        keys = [
            obj["Key"]
            for page in self._objects(self._audit_prefix(audit_id))
            for obj in page.get("Contents", [])
        ]
        for start in range(0, len(keys), 1000):  # DeleteObjects takes at most 1000 keys
            batch = [{"Key": k} for k in keys[start : start + 1000]]
            self.client.delete_objects(Bucket=self.bucket, Delete={"Objects": batch, "Quiet": True})

    def writable(self) -> bool:
        key = f"{self.prefix}.probe-{uuid.uuid4().hex}"
        try:
            self.ensure()
            self.client.put_object(Bucket=self.bucket, Key=key, Body=b"")
            self.client.delete_object(Bucket=self.bucket, Key=key)
            return True
        except (ClientError, BotoCoreError, OSError):
            return False
