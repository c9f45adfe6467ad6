"""The artifact store contract, run against both backends: the local directory and S3.

The S3 backend talks to a real S3-compatible server (moto in server mode) started on
127.0.0.1 for the session; boto3 itself is never mocked. The last test runs a whole audit
through the real stack with the store on S3: the API and the worker are separate processes
with separate local folders, sharing nothing but the bucket and Redis.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from service.settings import Settings
from service.store import ArtifactStore, LocalStore, new_audit_id
from service.store_factory import open_store
from tests.conftest import free_port, poll_until

moto_server = shutil.which("moto_server", path=str(Path(sys.executable).parent)) or shutil.which(
    "moto_server"
)
needs_s3_server = pytest.mark.skipif(
    moto_server is None, reason="moto[server] is not installed (dev extra)"
)
S3_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}
MIB = 1024**2


@pytest.fixture(scope="session")
def s3_endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real S3-compatible server (moto_server) on a free local port, for the session."""
    if moto_server is None:
        pytest.skip("moto[server] is not installed (dev extra)")
    port = free_port()
    log = (tmp_path_factory.mktemp("moto") / "moto.log").open("wb")
    process = subprocess.Popen(
        [moto_server, "-H", "127.0.0.1", "-p", str(port)], stdout=log, stderr=subprocess.STDOUT
    )
    url = f"http://127.0.0.1:{port}"

    def answers() -> bool:
        if process.poll() is not None:
            raise AssertionError("moto_server exited early")
        try:
            return httpx.get(f"{url}/moto-api/", timeout=1).status_code < 500
        except httpx.HTTPError:
            return False

    try:
        poll_until(answers, timeout=30, what="moto_server to answer")
        yield url
    finally:
        process.terminate()
        process.wait(10)


@pytest.fixture
def s3_env(s3_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """Credentials and endpoint in this process's environment (boto3 reads them there)."""
    for name, value in S3_ENV.items():
        monkeypatch.setenv(name, value)
    return {**S3_ENV, "VITAUDIT_S3_ENDPOINT_URL": s3_endpoint}


@pytest.fixture(params=["local", pytest.param("s3", marks=needs_s3_server)])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> ArtifactStore:
    """A fresh empty store of each backend, selected the way the service selects it."""
    env = {
        "VITAUDIT_DATA_DIR": str(tmp_path / "data"),
        "VITAUDIT_SCRATCH_DIR": str(tmp_path / "scratch"),
    }
    if request.param == "s3":
        env |= request.getfixturevalue("s3_env")
        env["VITAUDIT_STORE_URL"] = f"s3://bucket-{uuid.uuid4().hex[:12]}/some/prefix"
    chosen = open_store(Settings.from_env(env))
    assert type(chosen).__name__ == {"local": "LocalStore", "s3": "S3Store"}[request.param]
    chosen.ensure()
    return chosen


def submitted(store: ArtifactStore, checkpoint: bytes = b"weights" * 1000) -> str:
    """An audit as the API leaves it: inputs committed, then request.json."""
    audit_id = new_audit_id()
    staging = store.create_audit(audit_id)
    (staging / "inputs" / "checkpoint.safetensors").write_bytes(checkpoint)
    (staging / "inputs" / "images").mkdir()
    (staging / "inputs" / "images" / "00000.png").write_bytes(b"png")
    store.commit_inputs(audit_id, staging)
    store.write_json(
        audit_id,
        "request.json",
        {"tenant": "t", "checkpoint": {"path": "inputs/checkpoint.safetensors"}},
    )
    return audit_id


def test_an_audit_exists_once_its_request_is_written(store: ArtifactStore) -> None:
    audit_id = new_audit_id()
    assert not store.has_audit(audit_id) and not store.exists(audit_id)
    staging = store.create_audit(audit_id)
    assert (staging / "inputs").is_dir()
    assert store.has_audit(audit_id) and not store.exists(
        audit_id
    )  # uploading: in flight, not submitted
    (staging / "inputs" / "checkpoint.pth").write_bytes(b"x" * 123)
    store.commit_inputs(audit_id, staging)
    store.write_json(audit_id, "request.json", {"arch": "vit", "n": [1, 2.5]})
    assert store.exists(audit_id)
    assert store.read_json(audit_id, "request.json") == {"arch": "vit", "n": [1, 2.5]}
    assert store.input_size(audit_id, "inputs/checkpoint.pth") == 123
    assert store.input_size(audit_id, "inputs/other.pth") is None
    assert store.audit_ids() == [audit_id]


def test_files_round_trip_and_replace_whole(store: ArtifactStore) -> None:
    audit_id = submitted(store)
    payload = os.urandom(3 * MIB + 17)
    store.write_bytes(audit_id, "big.npy", payload)
    assert store.read_bytes(audit_id, "big.npy") == payload
    store.write_bytes(audit_id, "big.npy", b"short")
    assert store.read_bytes(audit_id, "big.npy") == b"short"
    assert store.read_bytes(audit_id, "absent.json") is None
    assert store.read_json(audit_id, "absent.json") is None
    with pytest.raises(ValueError):
        store.write_json(audit_id, "nan.json", {"x": float("nan")})  # reports are strict JSON
    assert store.read_bytes(audit_id, "nan.json") is None  # nothing half-written


def test_artifacts_stream_in_chunks(store: ArtifactStore) -> None:
    audit_id = submitted(store)
    payload = os.urandom(2 * MIB + 5)
    store.write_bytes(audit_id, "pos_similarity.npy", payload)
    stream = store.open_artifact(audit_id, "pos_similarity.npy")
    assert stream is not None
    chunks = []
    try:
        while chunk := stream.read(256 * 1024):
            assert len(chunk) <= 256 * 1024
            chunks.append(chunk)
    finally:
        stream.close()
    assert len(chunks) >= 9 and b"".join(chunks) == payload
    assert store.has_artifact(audit_id, "pos_similarity.npy")
    # inputs and the request are not artifacts; names are never paths
    for name in (
        "request.json",
        "inputs",
        "absent.png",
        "../request.json",
        "inputs/checkpoint.safetensors",
        ".hidden",
    ):
        assert store.open_artifact(audit_id, name) is None, name
        assert not store.has_artifact(audit_id, name), name


def test_artifacts_list_only_what_the_job_wrote(store: ArtifactStore) -> None:
    audit_id = submitted(store)
    assert store.list_artifacts(audit_id) == []
    for name in ("report.json", "b.png", "a.npy"):
        store.write_bytes(audit_id, name, b"1")
    assert store.list_artifacts(audit_id) == ["a.npy", "b.png", "report.json"]
    assert store.list_artifacts(new_audit_id()) == []


def test_materialised_inputs_are_local_copies(store: ArtifactStore, tmp_path: Path) -> None:
    checkpoint = os.urandom(20 * 1024)
    audit_id = submitted(store, checkpoint)
    with store.materialised(audit_id, tmp_path / "worker-scratch") as folder:
        assert (folder / "inputs" / "checkpoint.safetensors").read_bytes() == checkpoint
        assert (folder / "inputs" / "images" / "00000.png").read_bytes() == b"png"
        assert json.loads((folder / "request.json").read_bytes())["tenant"] == "t"


def test_a_stored_input_is_reused_inside_the_store(
    store: ArtifactStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Local: a hard link. S3: a copy inside the bucket; nothing is downloaded or uploaded.
    Deleting the audit the input came from leaves the copy whole."""
    checkpoint = os.urandom(20 * 1024)
    source = submitted(store, checkpoint)
    audit_id = new_audit_id()
    staging = store.create_audit(audit_id)
    if isinstance(store, LocalStore):
        staged = store.reuse_input(
            source, "inputs/checkpoint.safetensors", audit_id, "inputs/checkpoint.pt"
        )
        linked = staging / "inputs" / "checkpoint.pt"
        original = store.audit_dir(source) / "inputs" / "checkpoint.safetensors"
        assert staged and linked.stat().st_ino == original.stat().st_ino
    else:

        def no_transfer(*args: object, **kwargs: object) -> None:
            raise AssertionError("the bytes went through this process")

        for name in ("download_file", "upload_file", "get_object", "put_object"):
            monkeypatch.setattr(store.client, name, no_transfer)
        staged = store.reuse_input(
            source, "inputs/checkpoint.safetensors", audit_id, "inputs/checkpoint.pt"
        )
        monkeypatch.undo()
        assert not staged and not (staging / "inputs" / "checkpoint.pt").exists()
    store.commit_inputs(audit_id, staging)
    store.write_json(audit_id, "request.json", {"tenant": "t"})
    store.delete_audit(source)
    assert store.input_size(audit_id, "inputs/checkpoint.pt") == len(checkpoint)
    with store.materialised(audit_id, tmp_path / "worker-scratch") as folder:
        assert (folder / "inputs" / "checkpoint.pt").read_bytes() == checkpoint


def test_bytes_end_time_and_delete(store: ArtifactStore) -> None:
    audit_id = submitted(store, b"c" * 1000)
    request_bytes = len(store.read_bytes(audit_id, "request.json") or b"")
    assert store.audit_bytes(audit_id) == 1000 + 3 + request_bytes
    assert store.ended_at(audit_id) is None
    before = time.time()
    store.write_json(audit_id, "report.json", {"ok": True})
    ended = store.ended_at(audit_id)
    assert (
        ended is not None and before - 2 <= ended <= time.time() + 2
    )  # S3 times have 1 s resolution
    other = submitted(store)
    store.delete_audit(audit_id)
    store.delete_audit(audit_id)  # twice is fine
    assert not store.exists(audit_id) and not store.has_audit(audit_id)
    assert store.read_json(audit_id, "report.json") is None and store.list_artifacts(audit_id) == []
    assert store.audit_bytes(audit_id) == 0
    assert store.audit_ids() == [other] and store.exists(other)


def test_bad_audit_ids_are_never_found(store: ArtifactStore) -> None:
    assert store.writable()
    for audit_id in ("../etc", "A" * 32, ""):
        assert not store.exists(audit_id) and not store.has_audit(audit_id)
        assert store.read_json(audit_id, "request.json") is None


def test_the_local_directory_is_the_default() -> None:
    assert isinstance(open_store(Settings.from_env({})), LocalStore)
    with pytest.raises(ValueError, match="s3://bucket/prefix"):
        Settings.from_env({"VITAUDIT_STORE_URL": "ftp://host/x"})


@needs_s3_server
def test_a_checkpoint_larger_than_a_part_goes_up_in_parts(
    s3_env: dict[str, str], tmp_path: Path
) -> None:
    from service.s3store import MULTIPART_CHUNK_BYTES, S3Store

    store = S3Store(
        f"s3://big-{uuid.uuid4().hex[:12]}",
        endpoint_url=s3_env["VITAUDIT_S3_ENDPOINT_URL"],
        scratch=tmp_path,
    )
    store.ensure()
    checkpoint = os.urandom(MULTIPART_CHUNK_BYTES + MIB)
    audit_id = submitted(store, checkpoint)
    key = f"audits/{audit_id}/inputs/checkpoint.safetensors"
    head = store.client.head_object(Bucket=store.bucket, Key=key, PartNumber=1)
    assert head["PartsCount"] == 2  # a multipart upload, never one body held whole
    assert store.input_size(audit_id, "inputs/checkpoint.safetensors") == len(checkpoint)
    assert list(tmp_path.iterdir()) == []  # the staging folder is gone once committed
    with store.materialised(audit_id, tmp_path / "w") as folder:
        digest = hashlib.sha256(
            (folder / "inputs" / "checkpoint.safetensors").read_bytes()
        ).hexdigest()
    assert digest == hashlib.sha256(checkpoint).hexdigest()

    # Reused by another audit: copied inside the bucket, in parts too (UploadPartCopy).
    reuser = new_audit_id()
    staging = store.create_audit(reuser)
    relative = "inputs/checkpoint.safetensors"
    assert not store.reuse_input(audit_id, relative, reuser, relative)
    store.commit_inputs(reuser, staging)
    copied = store.client.head_object(
        Bucket=store.bucket, Key=f"audits/{reuser}/{relative}", PartNumber=1
    )
    assert copied["PartsCount"] == 2 and copied["ContentLength"] < len(checkpoint)
    assert store.input_size(reuser, relative) == len(checkpoint)


def _start(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "service.cli", *args],
        env=env,
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
    )


@pytest.mark.e2e
@needs_s3_server
def test_an_audit_through_api_and_worker_that_share_only_s3_and_redis(
    redis_url: str, s3_env: dict[str, str], tmp_path: Path
) -> None:
    from tests.conftest import stack_env
    from tests.planted.models import TINY_ARCH, TINY_ARGS, save_safetensors, tiny_vit

    checkpoint = save_safetensors(tiny_vit(), tmp_path / "tiny.safetensors")
    bucket_url = f"s3://audits-{uuid.uuid4().hex[:12]}/team-a"
    base = {**stack_env(redis_url, tmp_path / "unused", **s3_env), "VITAUDIT_DATA_DIR": bucket_url}
    # Separate local folders per process, as on separate nodes: nothing local is shared.
    api_env = {**base, "VITAUDIT_SCRATCH_DIR": str(tmp_path / "api-node")}
    worker_env = {**base, "VITAUDIT_SCRATCH_DIR": str(tmp_path / "worker-node")}
    port = free_port()
    processes = [
        _start(["worker"], worker_env, tmp_path / "worker.log"),
        _start(["serve", "--port", str(port)], api_env, tmp_path / "api.log"),
    ]
    url = f"http://127.0.0.1:{port}"
    try:

        def ready() -> bool:
            assert all(p.poll() is None for p in processes), "a stack process exited early"
            try:
                return httpx.get(f"{url}/readyz", timeout=1).status_code == 200
            except httpx.HTTPError:
                return False

        poll_until(ready, timeout=60, what="the API to be ready")
        with httpx.Client(base_url=url, timeout=30) as http, checkpoint.open("rb") as handle:
            options = {"num_images": 4, "batch_size": 2, "model_args": TINY_ARGS}
            created = http.post(
                "/v1/audits",
                data={"arch": TINY_ARCH, "options": json.dumps(options)},
                files={"checkpoint": (checkpoint.name, handle)},
            )
            assert created.status_code == 202, created.text
            audit_id = created.json()["id"]
            state = poll_until(
                lambda: (
                    (s := http.get(f"/v1/audits/{audit_id}").json())["status"]
                    in ("finished", "failed")
                    and s
                ),
                timeout=240,
                interval=0.2,
                what="the audit to end",
            )
            assert state["status"] == "finished", state
            report = http.get(f"/v1/audits/{audit_id}/report").json()
            assert (
                report["model"]["checkpoint_sha256"]
                == hashlib.sha256(checkpoint.read_bytes()).hexdigest()
            )
            artifacts = http.get(f"/v1/audits/{audit_id}/artifacts").json()["artifacts"]
            assert {"report.json", "pos_similarity.npy", "pos_similarity_grid.png"} <= set(
                artifacts
            )
            png = http.get(f"/v1/audits/{audit_id}/artifacts/pos_similarity_grid.png")
            assert png.status_code == 200 and png.headers["content-type"] == "image/png"
            assert png.content.startswith(b"\x89PNG")
            missing = http.get(f"/v1/audits/{audit_id}/artifacts/absent.png")
            assert missing.status_code == 404
            assert missing.headers["content-type"].startswith("application/problem+json")
            assert missing.json()["detail"] == f"audit '{audit_id}' has no artifact 'absent.png'"
            page = http.get(f"/v1/audits/{audit_id}/report.html")
            assert page.status_code == 200 and "data:image/png;base64," in page.text

            # What the HTTP API served is what the bucket holds, and nothing stayed on the nodes.
            bucket_store = open_store(
                Settings.from_env({**base, "VITAUDIT_SCRATCH_DIR": str(tmp_path / "reader")})
            )
            assert bucket_store.read_bytes(audit_id, "pos_similarity_grid.png") == png.content
            assert bucket_store.read_json(audit_id, "report.json") == report
            assert (
                bucket_store.input_size(audit_id, "inputs/checkpoint.safetensors")
                == checkpoint.stat().st_size
            )
            leftovers = [
                p
                for node in ("api-node", "worker-node")
                for p in (tmp_path / node).rglob("*")
                if p.is_file()
            ]
            assert leftovers == []

            # A later audit reuses the stored checkpoint by its sha256: copied out of the bucket.
            sha256 = report["model"]["checkpoint_sha256"]
            assert (
                http.get(f"/v1/checkpoints/{sha256}").json()["bytes"] == checkpoint.stat().st_size
            )
            fields = {
                "arch": TINY_ARCH,
                "options": json.dumps(options),
                "checkpoint_sha256": sha256,
                "cache": "false",
            }
            # multipart without a file part
            again = http.post("/v1/audits", files={k: (None, v) for k, v in fields.items()})
            assert again.status_code == 202, again.text
            second = again.json()["id"]
            poll_until(
                lambda: http.get(f"/v1/audits/{second}").json()["status"] == "finished",
                timeout=240,
                interval=0.2,
                what="the second audit to finish",
            )
            second_report = http.get(f"/v1/audits/{second}/report").json()
            assert second_report["position_embedding"] == report["position_embedding"]  # seeded

            assert http.delete(f"/v1/audits/{audit_id}").status_code == 204
            assert not bucket_store.has_audit(audit_id)
    finally:
        for p in processes:
            p.terminate()
        for p in processes:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()


def test_an_unreachable_bucket_is_not_writable_and_says_so_quickly(
    s3_env: dict[str, str], tmp_path: Path
) -> None:
    """What /readyz reports when the S3 endpoint is down: not ready, within seconds."""
    from service.s3store import S3Store

    store = S3Store(
        "s3://nowhere/x", endpoint_url=f"http://127.0.0.1:{free_port()}", scratch=tmp_path
    )
    started = time.monotonic()
    assert store.writable() is False
    assert time.monotonic() - started < 15


def test_a_submission_is_charged_its_staged_files_and_its_inputs_reused_in_the_store(
    tmp_path: Path,
) -> None:
    """A checkpoint reused on S3 is copied in the bucket, not staged: the tenant's byte
    quota must still count it."""
    from service.quotas import submitted_bytes
    from service.uploads import StoredFile

    (tmp_path / "inputs" / "images").mkdir(parents=True)
    (tmp_path / "inputs" / "images" / "a.png").write_bytes(b"p" * 300)
    staged = StoredFile("images", "a.png", tmp_path / "inputs" / "images" / "a.png", 300, "0")
    reused = StoredFile(
        "checkpoint", "c.pt", tmp_path / "inputs" / "checkpoint.pt", 5000, "1", True
    )
    assert submitted_bytes(tmp_path, [staged]) == 300
    assert submitted_bytes(tmp_path, [staged, reused]) == 5300
    linked = StoredFile("checkpoint", "c.pt", tmp_path / "inputs" / "checkpoint.pt", 5000, "1")
    (tmp_path / "inputs" / "checkpoint.pt").write_bytes(b"c" * 5000)  # a local link: staged
    assert submitted_bytes(tmp_path, [staged, linked]) == 5300
