"""Content addressing: checkpoints the service already holds, and finished identical requests.

Two Redis structures, both per tenant and both pointing into the artifact store (the store
stays the truth; an entry whose audit was deleted is dropped when it is read):

- ``vitaudit:checkpoints:{tenant}`` hash: checkpoint sha256 -> id of an audit holding the file.
  A client that asks ``GET /v1/checkpoints/{sha256}`` first can then submit the audit with a
  ``checkpoint_sha256`` field instead of uploading the file again.
- ``vitaudit:cache:{tenant}:{request_key}`` hash: ``audit_id`` -> the audit that answered the
  same request (same checkpoint(s), images, labels, options, policy, arch, and the code that
  computes the report: vitaudit's version and a digest of the `workers` package's source).
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any

import msgspec
from litestar import Controller, get
from litestar.di import NamedDependency
from litestar.params import FromPath
from redis import Redis

from service.errors import InvalidRequest, NotFound, problem_responses
from service.queue import AuditQueue
from service.store import INPUTS, ArtifactStore
from service.uploads import StoredFile

CHECKPOINT_INDEX = "vitaudit:checkpoints:{tenant}"
REQUEST_CACHE = "vitaudit:cache:{tenant}:{request_key}"
SHA256_PATTERN = re.compile(r"^[0-9a-f]{64}$")


class KnownCheckpoint(msgspec.Struct):
    sha256: str
    bytes: int
    format: str
    filename: str


def check_sha256(value: str) -> str:
    value = value.strip().lower()
    if not SHA256_PATTERN.match(value):
        raise InvalidRequest(f"'{value[:80]}' is not a sha256 (64 hexadecimal characters)")
    return value


def remember_checkpoints(redis: Redis, tenant: str, audit_id: str, record: dict[str, Any]) -> None:
    """Index every checkpoint of a submitted audit by its sha256."""
    checkpoints = record.get("trajectory") or [record["checkpoint"]]
    redis.hset(
        CHECKPOINT_INDEX.format(tenant=tenant), mapping={c["sha256"]: audit_id for c in checkpoints}
    )


def find_checkpoint(
    redis: Redis, store: ArtifactStore, tenant: str, sha256: str
) -> tuple[str, dict[str, Any]] | None:
    """The id of an audit holding the file with this sha256 for this tenant, and the file's
    record (its ``path`` is relative to that audit), or None."""
    key = CHECKPOINT_INDEX.format(tenant=tenant)
    raw = redis.hget(key, sha256)
    if raw is None:
        return None
    audit_id = raw.decode()
    record = store.read_json(audit_id, "request.json")
    if record is not None and record.get("tenant") == tenant:
        for checkpoint in record.get("trajectory") or [record["checkpoint"]]:
            if (
                checkpoint["sha256"] == sha256
                and store.input_size(audit_id, checkpoint["path"]) == checkpoint["bytes"]
            ):
                return audit_id, checkpoint
    redis.hdel(key, sha256)  # the audit holding it was deleted
    return None


def attach_known_checkpoint(
    redis: Redis, store: ArtifactStore, tenant: str, sha256: str, audit_id: str, inputs: Path
) -> StoredFile:
    """Make the stored checkpoint an input of the new audit ``audit_id`` (staged in
    ``inputs``), as if it was uploaded; the store copies it without sending it through here
    where it can (see `ArtifactStore.reuse_input`)."""
    found = find_checkpoint(redis, store, tenant, check_sha256(sha256))
    if found is None:
        raise NotFound(
            f"the service holds no checkpoint with sha256 {sha256}; upload the file as 'checkpoint'"
        )
    source_audit, record = found
    target = inputs / f"checkpoint{Path(record['path']).suffix}"
    local = store.reuse_input(source_audit, record["path"], audit_id, f"{INPUTS}/{target.name}")
    return StoredFile(
        "checkpoint", record["filename"], target, record["bytes"], record["sha256"], not local
    )


def request_key(record: dict[str, Any]) -> str:
    """sha256 over everything that decides a report's numbers."""
    checkpoints = record.get("trajectory") or [record["checkpoint"]]
    identity = {
        "arch": record["arch"],
        "checkpoints": [[c["sha256"], c.get("step")] for c in checkpoints],
        "images_sha256": record.get("images_sha256"),
        "labels": record.get("labels"),
        "options": record.get("options"),
        "policy_sha256": hashlib.sha256(record["policy"].encode()).hexdigest()
        if record.get("policy")
        else None,
        "vitaudit": record["analysis_code"],
        # a transformers .safetensors sent with its config: the config decides the model too
        **({"config_sha256": record["config"]["sha256"]} if record.get("config") else {}),
    }
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()


def cached_audit(redis: Redis, tenant: str, key: str) -> str | None:
    raw = redis.hget(REQUEST_CACHE.format(tenant=tenant, request_key=key), "audit_id")
    return raw.decode() if raw else None


def remember_request(redis: Redis, tenant: str, key: str, audit_id: str) -> None:
    redis.hset(REQUEST_CACHE.format(tenant=tenant, request_key=key), mapping={"audit_id": audit_id})


class CheckpointController(Controller):
    path = "/v1/checkpoints"
    tags = ["checkpoints"]

    @get(
        "/{sha256:str}",
        summary="Whether the service already holds a checkpoint with this sha256 (404 when not)",
        description="When it does, submit the audit with the form field `checkpoint_sha256` "
        "instead of uploading the `checkpoint` file again.",
        responses=problem_responses(404),
    )
    async def known(
        self,
        sha256: FromPath[str],
        tenant: NamedDependency[str],
        store: NamedDependency[ArtifactStore],
        queue: NamedDependency[AuditQueue],
    ) -> KnownCheckpoint:
        found = find_checkpoint(queue.redis, store, tenant, check_sha256(sha256))
        if found is None:
            raise NotFound(f"no checkpoint with sha256 {sha256.strip().lower()}")
        _, record = found
        return KnownCheckpoint(
            sha256=record["sha256"],
            bytes=record["bytes"],
            format=record["format"],
            filename=record["filename"],
        )
