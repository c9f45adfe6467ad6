"""One settings object, read from the environment."""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
QUEUE_NAME = "vitaudit"


def _int(env: dict[str, str], name: str, default: int) -> int:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"{name} must be an integer, got {raw!r}") from None


@dataclass(frozen=True)
class Settings:
    """Everything the service and the workers are configured by.

    Environment variables (all optional):
      REDIS_URL                   broker and job-state store (default redis://127.0.0.1:6379/0)
      VITAUDIT_DATA_DIR           artifact store root (default ./vitaudit-data); an s3:// URL
                                  here selects the S3 store like VITAUDIT_STORE_URL
      VITAUDIT_STORE_URL          s3://bucket/prefix: artifacts in an S3-compatible bucket that
                                  every node reaches (default: the VITAUDIT_DATA_DIR directory)
      VITAUDIT_S3_ENDPOINT_URL    the S3 endpoint (MinIO, Ceph, ...); AWS_ENDPOINT_URL also works;
                                  credentials come from boto3's chain (AWS_ACCESS_KEY_ID, ...)
      VITAUDIT_SCRATCH_DIR        local folder for staged uploads (API) and downloaded inputs
                                  (worker) when the store is S3 (default: the system temp dir)
      VITAUDIT_QUEUE              RQ queue name (default "vitaudit")
      VITAUDIT_LOCAL_MODE         "1": single-user mode, no API key needed (what `vitaudit up` uses)
      VITAUDIT_API_KEYS           "tenant:sha256hex,tenant2:sha256hex" (keys are stored hashed)
      VITAUDIT_API_KEYS_FILE      a file with one "tenant:sha256hex" per line
      VITAUDIT_PUBLIC_ORIGIN      scheme://host[:port] browsers reach the service at, for the
                                  origin check of signed-in writes, when a proxy rewrites Host
                                  without sending X-Forwarded-Host (default: from the request)
      VITAUDIT_MAX_UPLOAD_BYTES   largest accepted request body (default 2 GiB)
      VITAUDIT_MAX_IMAGES         most images per audit (default 512)
      VITAUDIT_JOB_TIMEOUT_S      RQ job timeout (default 3600)
      VITAUDIT_RESULT_TTL_S       how long RQ keeps a finished job (default 7 days)
      VITAUDIT_FAILURE_TTL_S      how long RQ keeps a failed job (default 7 days)
      VITAUDIT_MAX_CONCURRENT_AUDITS  queued + running audits per tenant (default 64; 0: no limit)
      VITAUDIT_MAX_TENANT_BYTES   bytes a tenant may keep in the store, uploads and artifacts
                                  (default 100 GiB; 0: no limit)
      VITAUDIT_RETENTION_S        finished or failed audits older than this are deleted by
                                  `vitaudit cleanup` and by workers (default 30 days; 0: keep)
      VITAUDIT_INSTANCE_ID        an identity /healthz answers with; the local stack sets a fresh
                                  one per launch to know that the API it talks to is its own
      VITAUDIT_MIN_FREE_BYTES     /readyz is 503 when the local store has less free space
                                  (default 1 GiB; 0: no check)
    """

    redis_url: str = DEFAULT_REDIS_URL
    data_dir: Path = Path("vitaudit-data")
    store_url: str = ""  # "" for the local directory, else s3://bucket/prefix
    s3_endpoint_url: str | None = None
    scratch_dir: Path = Path(tempfile.gettempdir()) / "vitaudit-scratch"
    queue_name: str = QUEUE_NAME
    local_mode: bool = False
    api_key_hashes: dict[str, str] = field(default_factory=dict)  # sha256(key) -> tenant
    public_origin: str = ""  # "" to take it from each request (see service.auth)
    max_upload_bytes: int = 2 * 1024**3
    max_images: int = 512
    max_form_field_bytes: int = 64 * 1024
    job_timeout_s: int = 3600
    result_ttl_s: int = 7 * 24 * 3600
    failure_ttl_s: int = 7 * 24 * 3600
    max_concurrent_audits: int = 64
    max_tenant_bytes: int = 100 * 1024**3
    retention_s: int = 30 * 24 * 3600
    instance_id: str = ""
    min_free_bytes: int = 1024**3

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> Settings:
        env = dict(os.environ if env is None else env)
        data_dir = env.get("VITAUDIT_DATA_DIR") or "vitaudit-data"
        store_url = env.get("VITAUDIT_STORE_URL") or (
            data_dir if data_dir.startswith("s3://") else ""
        )
        if store_url and not store_url.startswith("s3://"):
            raise ValueError(f"VITAUDIT_STORE_URL must be s3://bucket/prefix, got {store_url!r}")
        return cls(
            redis_url=env.get("REDIS_URL") or DEFAULT_REDIS_URL,
            data_dir=Path("vitaudit-data" if data_dir.startswith("s3://") else data_dir).resolve(),
            store_url=store_url,
            s3_endpoint_url=env.get("VITAUDIT_S3_ENDPOINT_URL")
            or env.get("AWS_ENDPOINT_URL")
            or None,
            scratch_dir=Path(
                env.get("VITAUDIT_SCRATCH_DIR") or Path(tempfile.gettempdir()) / "vitaudit-scratch"
            ).resolve(),
            queue_name=env.get("VITAUDIT_QUEUE") or QUEUE_NAME,
            local_mode=env.get("VITAUDIT_LOCAL_MODE", "") in {"1", "true", "yes"},
            api_key_hashes=_read_api_keys(env),
            public_origin=(env.get("VITAUDIT_PUBLIC_ORIGIN") or "").strip().rstrip("/").lower(),
            max_upload_bytes=_int(env, "VITAUDIT_MAX_UPLOAD_BYTES", 2 * 1024**3),
            max_images=_int(env, "VITAUDIT_MAX_IMAGES", 512),
            job_timeout_s=_int(env, "VITAUDIT_JOB_TIMEOUT_S", 3600),
            result_ttl_s=_int(env, "VITAUDIT_RESULT_TTL_S", 7 * 24 * 3600),
            failure_ttl_s=_int(env, "VITAUDIT_FAILURE_TTL_S", 7 * 24 * 3600),
            max_concurrent_audits=_int(env, "VITAUDIT_MAX_CONCURRENT_AUDITS", 64),
            max_tenant_bytes=_int(env, "VITAUDIT_MAX_TENANT_BYTES", 100 * 1024**3),
            retention_s=_int(env, "VITAUDIT_RETENTION_S", 30 * 24 * 3600),
            instance_id=env.get("VITAUDIT_INSTANCE_ID", ""),
            min_free_bytes=_int(env, "VITAUDIT_MIN_FREE_BYTES", 1024**3),
        )


def _read_api_keys(env: dict[str, str]) -> dict[str, str]:
    """Map sha256(api key) -> tenant from VITAUDIT_API_KEYS and VITAUDIT_API_KEYS_FILE."""
    entries: list[str] = []
    if env.get("VITAUDIT_API_KEYS"):
        entries += env["VITAUDIT_API_KEYS"].split(",")
    if env.get("VITAUDIT_API_KEYS_FILE"):
        entries += Path(env["VITAUDIT_API_KEYS_FILE"]).read_text().splitlines()
    hashes: dict[str, str] = {}
    for entry in entries:
        entry = entry.strip()
        if not entry or entry.startswith("#"):
            continue
        tenant, sep, digest = entry.partition(":")
        digest = digest.strip().lower()
        if not sep or len(digest) != 64 or not all(c in "0123456789abcdef" for c in digest):
            raise ValueError(f"API key entry {entry!r} must be 'tenant:<sha256 hex of the key>'")
        hashes[digest] = tenant.strip()
    return hashes
