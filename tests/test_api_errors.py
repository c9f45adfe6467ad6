"""Bad requests get the right 4xx with a problem body that names the problem; nothing is kept."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from tests.conftest import Stack, audit_folders, poll_until, problem

pytestmark = pytest.mark.e2e

CHECKPOINT = ("tiny.safetensors", b"not really a checkpoint, never read by the API")


def post(stack: Stack, *, data=None, files=None, **kwargs) -> httpx.Response:
    with stack.client() as http:
        return http.post("/v1/audits", data=data, files=files, **kwargs)


@pytest.mark.parametrize(
    ("data", "files", "status", "detail"),
    [
        (
            {"arch": "vit_small_patch16_224"},
            {"other": ("x.bin", b"x")},
            400,
            "unexpected file field 'other'; file fields are 'checkpoint', 'images' and 'config'",
        ),
        (
            {"arch": "vit_small_patch16_224"},
            None,
            415,
            "send the audit as multipart/form-data, not 'application/x-www-form-urlencoded'",
        ),
        (
            {},
            {"checkpoint": CHECKPOINT},
            400,
            "the 'arch' field is missing; name a timm ViT, e.g. 'vit_small_patch16_224'",
        ),
        (
            {"arch": "vit_smal_patch16_224"},
            {"checkpoint": CHECKPOINT},
            422,
            "arch 'vit_smal_patch16_224' is not a timm Vision Transformer that vitaudit supports; "
            "did you mean 'vit_small_patch16_224'?",
        ),
        (
            {"arch": "vit_small_patch16_224"},
            {"checkpoint": ("weights.txt", b"abc")},
            422,
            "checkpoint 'weights.txt' has an unsupported file type; expected one of "
            ".safetensors, .pth, .pt, .bin, .onnx, .zip, .tar",
        ),
        (
            {"arch": "vit_small_patch16_224"},
            {"checkpoint": ("empty.safetensors", b"")},
            422,
            "checkpoint 'empty.safetensors' is empty",
        ),
        (
            {"arch": "vit_small_patch16_224", "options": "{not json"},
            {"checkpoint": CHECKPOINT},
            400,
            None,
        ),
        (
            {"arch": "vit_small_patch16_224", "options": '{"colour": "red"}'},
            {"checkpoint": CHECKPOINT},
            400,
            "options: Object contains unknown field `colour`",
        ),
        (
            {"arch": "vit_small_patch16_224", "options": '{"batch_size": 0}'},
            {"checkpoint": CHECKPOINT},
            400,
            "options: options.batch_size must be between 1 and 256",
        ),
        (
            {"arch": "vit_small_patch16_224", "labels": '{"a": 1}'},
            {"checkpoint": CHECKPOINT},
            400,
            "labels must be a JSON list of non-negative integers (class indices)",
        ),
        (
            {"arch": "vit_small_patch16_224", "labels": "[1, -2]"},
            {"checkpoint": CHECKPOINT},
            400,
            "labels must be a JSON list of non-negative integers (class indices)",
        ),
        (
            {"arch": "vit_small_patch16_224", "colour": "red"},
            {"checkpoint": CHECKPOINT},
            400,
            "unexpected form field 'colour'; fields are checkpoint, images, arch, options, labels",
        ),
        (
            {"arch": "vit_small_patch16_224"},
            {"checkpoint": CHECKPOINT, "images": ("notes.txt", b"hello")},
            422,
            "image 'notes.txt' has an unsupported file type; expected an image (.png, .jpg, .jpeg, .bmp, "
            ".webp, .tif, .tiff) or one archive (.zip, .tar, .tar.gz, .tgz)",
        ),
    ],
)
def test_bad_submissions_are_refused_with_a_clear_problem(
    stack: Stack, data, files, status, detail
) -> None:
    before = audit_folders(stack)
    response = post(stack, data=data, files=files)
    body = problem(response)
    assert response.status_code == status and body["status"] == status
    if detail is None:
        assert body["detail"].startswith("options: JSON is malformed")
    else:
        assert body["detail"].startswith(detail), body["detail"]
    assert audit_folders(stack) == before  # nothing half-stored


def test_upload_over_the_limit_is_refused_while_streaming(redis_url: str, tmp_path: Path) -> None:
    from tests.conftest import stack_env, start_stack, stop_stack

    limited = start_stack(
        stack_env(redis_url, tmp_path, VITAUDIT_MAX_UPLOAD_BYTES="100000"),
        tmp_path,
        tmp_path / "logs",
    )
    try:

        def body():
            boundary = b"XyZ"
            yield b'--XyZ\r\nContent-Disposition: form-data; name="arch"\r\n\r\nvit_small_patch16_224\r\n'
            yield b'--XyZ\r\nContent-Disposition: form-data; name="checkpoint"; filename="big.safetensors"\r\n\r\n'
            for _ in range(50):  # 50 x 64 KiB, no Content-Length: the server must count
                yield b"\0" * 65536
            yield b"\r\n--" + boundary + b"--\r\n"

        with limited.client() as http:
            response = http.post(
                "/v1/audits",
                content=body(),
                headers={"content-type": "multipart/form-data; boundary=XyZ"},
            )
        assert response.status_code == 413
        assert problem(response)["detail"] == "the request is larger than the limit of 100000 bytes"
        assert not any((tmp_path / "audits").iterdir())
        with limited.client() as http:
            assert http.get("/healthz").status_code == 200
    finally:
        stop_stack(limited)


def test_truncated_multipart_is_a_400(stack: Stack) -> None:
    content = b'--XyZ\r\nContent-Disposition: form-data; name="arch"\r\n\r\nvit_small'
    response = post(
        stack, content=content, headers={"content-type": "multipart/form-data; boundary=XyZ"}
    )
    assert response.status_code == 400
    assert (
        problem(response)["detail"]
        == "malformed multipart/form-data: Unexpected end of multipart stream (parser closed)"
    )


@pytest.mark.parametrize(
    "path",
    [
        "/v1/audits/0123456789abcdef0123456789abcdef",
        "/v1/audits/nope",
        "/v1/audits/0123456789abcdef0123456789abcdef/report",
        "/v1/audits/0123456789abcdef0123456789abcdef/artifacts/report.json",
    ],
)
def test_unknown_audit_is_404(stack: Stack, path: str) -> None:
    with stack.client() as http:
        response = http.get(path)
    assert response.status_code == 404
    assert problem(response)["title"] == "Not found"


def test_health_and_readiness(stack: Stack) -> None:
    with stack.client() as http:
        assert http.get("/healthz").json() == {"status": "ok", "checks": {}}
        # The stack is ready (200) before its worker registers; then it is "ok", not "degraded".
        ready = poll_until(
            lambda: (r := http.get("/readyz").json())["status"] == "ok" and r,
            timeout=60,
            what="the worker to register",
        )
        assert ready["checks"] == {
            "redis": True,
            "store": True,
            "store_space": True,
            "workers": True,
        }
        assert ready["live_workers"] == 1 and ready["store_free_bytes"] > 0


def test_readiness_fails_when_redis_is_gone(tmp_path: Path) -> None:
    import shutil
    import subprocess

    from tests.conftest import free_port, poll_until, stack_env, start_stack, stop_stack

    port = free_port()
    server = subprocess.Popen(
        [shutil.which("redis-server"), "--port", str(port), "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
    )
    url = f"redis://127.0.0.1:{port}/0"
    try:
        poll_until(lambda: _pings(url), timeout=10, what="redis-server")
        stack = start_stack(stack_env(url, tmp_path), tmp_path, tmp_path / "logs")
        try:
            server.terminate()
            server.wait(10)
            with stack.client() as http:
                response = http.get("/readyz")
                assert response.status_code == 503
                assert response.json()["checks"]["redis"] is False
                listed = http.get("/v1/audits")
                assert listed.status_code == 503
                assert problem(listed)["title"] == "Queue unavailable"
                assert problem(listed)["detail"].startswith("the job queue (Redis) is unavailable")
                assert http.get("/healthz").status_code == 200
        finally:
            stop_stack(stack)
    finally:
        if server.poll() is None:
            server.kill()


def _pings(url: str) -> bool:
    from redis import Redis

    try:
        return bool(Redis.from_url(url).ping())
    except Exception:
        return False
