"""The HTTP edge under attack, in process (the real app and the real Redis, no server):
secrets never echoed, local mode not a target (Host and Origin), security headers on every
response, HEAD where GET works, malformed text fields as 400s, server-side sessions revoked
at sign-out, and readiness that reports store space and live workers."""

from __future__ import annotations

import base64
import hashlib
import json
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from litestar.testing import TestClient
from redis import Redis

from service.app import create_app
from service.settings import Settings
from tests.conftest import free_port

BASE_URL = "http://127.0.0.1:8000"  # what the test client's requests reach (ASGI "server")
ARCH = "vit_tiny_patch16_224"
CHECKPOINT = ("checkpoint", ("c.safetensors", b"not read: the fields are refused first"))
RUN = uuid.uuid4().hex[:8]
KEY = f"edge-secret-key-{RUN}"
TENANT = f"edge-{RUN}"
SECURITY_HEADERS = {
    "x-content-type-options": "nosniff",
    "x-frame-options": "DENY",
    "referrer-policy": "same-origin",
}

Client = Callable[..., TestClient]


@pytest.fixture()
def client(redis_url: str, tmp_path: Path) -> Iterator[Client]:
    """``client(**settings)``: a test client of an app on its own queue and data directory,
    in local mode unless ``local_mode=False`` (then with one API key, ``KEY``)."""
    opened: list[TestClient] = []

    def make(**overrides: Any) -> TestClient:
        fields: dict[str, Any] = {
            "redis_url": redis_url,
            "data_dir": tmp_path / "data",
            "queue_name": f"edge-{uuid.uuid4().hex[:12]}",
            "local_mode": True,
            "api_key_hashes": {hashlib.sha256(KEY.encode()).hexdigest(): TENANT},
        }
        fields.update(overrides)
        test_client = TestClient(create_app(Settings(**fields)), base_url=BASE_URL)
        opened.append(test_client.__enter__())
        return test_client

    yield make
    for test_client in opened:
        test_client.__exit__(None, None, None)


def dead_redis_url(password: str) -> str:
    return f"redis://:{password}@127.0.0.1:{free_port()}/0"


# ------------------------------------------------------------------ secrets never echoed


def _stored_audit(data_dir: Path, **files: dict[str, Any]) -> str:
    """An audit written into the store as the API and a worker would (request.json and
    ``files``), of the local tenant; its id."""
    audit_id = uuid.uuid4().hex
    folder = data_dir / "audits" / audit_id
    folder.mkdir(parents=True)
    record = {
        "id": audit_id,
        "tenant": "local",
        "arch": ARCH,
        "created_at": "2026-01-01T00:00:00+00:00",
        "checkpoint": {"sha256": "0" * 64},
    }
    for name, content in {"request.json": record, **files}.items():
        (folder / name).write_text(json.dumps(content))
    return audit_id


def test_a_redis_outage_never_shows_the_redis_password(client: Client, tmp_path: Path) -> None:
    password = f"hunter2-{RUN}"
    http = client(redis_url=dead_redis_url(password))
    audit_id = _stored_audit(tmp_path / "data")
    responses = [
        http.get(f"/v1/audits/{audit_id}"),  # the job's state: RQ
        http.delete(f"/v1/audits/{audit_id}"),
        http.get("/v1/audits"),
        http.post("/v1/audits", data={"arch": ARCH}, files=[CHECKPOINT]),
        http.get("/readyz"),
    ]
    assert [r.status_code for r in responses] == [503] * 5
    assert responses[0].json()["detail"].startswith("the job queue at redis://***@127.0.0.1:")
    for response in responses:
        assert password not in response.text, response.text


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        (
            "the job queue at redis://:pw@10.0.0.5:6379/0 is unavailable",
            "the job queue at redis://***@10.0.0.5:6379/0 is unavailable",
        ),
        ("s3://AKIA:secret@bucket/x", "s3://***@bucket/x"),
        ("connect with password=hunter2&db=0", "connect with password=***&db=0"),
        (
            "FileNotFoundError: [Errno 2] No such file or directory: '/tmp/x/inputs/c.pth'",
            "FileNotFoundError: [Errno 2] No such file or directory: '<path>'",
        ),
        (
            "Command '['/usr/bin/gs', '-sDEVICE=png16m', '/tmp/a.ps']' returned non-zero exit status 1.",
            "a helper program returned non-zero exit status 1.",
        ),
        # The service's own URLs and plain words stay.
        ("poll /v1/audits/abc until it is finished", "poll /v1/audits/abc until it is finished"),
        ("sign in at /login", "sign in at /login"),
        ("https://example.org/docs/a", "https://example.org/docs/a"),
        ("3/4 of the tokens", "3/4 of the tokens"),
    ],
)
def test_redact_hides_credentials_paths_and_command_lines(text: str, shown: str) -> None:
    from service.errors import redact

    assert redact(text) == shown


def test_a_job_error_shows_no_local_path_or_credential(client: Client, tmp_path: Path) -> None:
    http = client()
    folder = tmp_path / "data" / "audits"
    leak = f"OSError: cannot open {folder}/x/inputs/checkpoint.pth via redis://:pw-{RUN}@db:6379"
    audit_id = _stored_audit(
        tmp_path / "data", **{"error.json": {"code": "internal_error", "detail": leak}}
    )
    state = http.get(f"/v1/audits/{audit_id}").json()
    assert state["status"] == "failed"
    assert state["error"]["detail"] == "OSError: cannot open <path> via redis://***@db:6379"


# ------------------------------------------------------------------ local mode is not a target


@pytest.mark.parametrize(
    "host",
    [
        "evil.example:8000",  # DNS rebinding: another name for 127.0.0.1
        "127.0.0.1.nip.io:8000",
        "localhost.evil.example:8000",
        "127.0.0.1:9000",  # another port: another service's origin
        "",
    ],
)
@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/v1/audits"),
        ("GET", "/"),
        ("GET", "/healthz"),
        ("DELETE", f"/v1/audits/{'0' * 32}"),
    ],
)
def test_local_mode_answers_only_to_its_own_host(
    client: Client, host: str, method: str, path: str
) -> None:
    response = client().request(method, path, headers={"host": host})
    assert response.status_code == 421, response.text
    assert response.headers["content-type"] == "application/problem+json"
    assert response.json()["detail"].startswith("this service runs in local mode")


@pytest.mark.parametrize(
    "host", ["127.0.0.1:8000", "localhost:8000", "[::1]:8000", "LOCALHOST:8000"]
)
def test_local_mode_answers_its_loopback_names(client: Client, host: str) -> None:
    assert client().get("/v1/audits", headers={"host": host}).status_code == 200


def test_local_mode_answers_its_public_origin(client: Client) -> None:
    http = client(public_origin="https://audits.example.org")
    assert http.get("/healthz", headers={"host": "audits.example.org"}).status_code == 200
    assert http.get("/healthz", headers={"host": "evil.example"}).status_code == 421


@pytest.mark.parametrize(
    "origin", ["http://evil.example", "null", "http://127.0.0.1:9000", "https://127.0.0.1:8000"]
)
def test_local_mode_refuses_writes_from_another_origin(client: Client, origin: str) -> None:
    http = client()
    created = http.post(
        "/v1/audits", data={"arch": ARCH}, files=[CHECKPOINT], headers={"origin": origin}
    )
    deleted = http.delete(f"/v1/audits/{'0' * 32}", headers={"origin": origin})
    for response in (created, deleted):
        assert response.status_code == 403, response.text
        assert response.json()["detail"].startswith("a write from another site")
    # Reads carry no Origin check: a page elsewhere cannot read the answer anyway (no CORS).
    assert http.get("/v1/audits", headers={"origin": origin}).status_code == 200


@pytest.mark.parametrize("origin", [None, BASE_URL, "http://localhost:8000"])
def test_local_mode_takes_writes_from_programs_and_its_own_pages(
    client: Client, origin: str | None
) -> None:
    host = "localhost:8000" if origin and "localhost" in origin else "127.0.0.1:8000"
    headers = {"host": host, **({"origin": origin} if origin else {})}
    response = client().delete(f"/v1/audits/{'0' * 32}", headers=headers)
    assert response.status_code == 404  # past the edge: no such audit


def test_with_api_keys_any_host_is_answered(client: Client) -> None:
    """Behind a proxy the Host is the operator's; keys, not the Host, protect the API."""
    http = client(local_mode=False)
    response = http.get("/v1/audits", headers={"host": "audits.example.org", "X-API-Key": KEY})
    assert response.status_code == 200


# ------------------------------------------------------------------ headers, HEAD, schema


@pytest.mark.parametrize(
    "path",
    ["/healthz", "/v1/audits", f"/v1/audits/{'0' * 32}", "/nowhere", "/", "/schema/openapi.json"],
)
def test_every_response_carries_the_security_headers(client: Client, path: str) -> None:
    response = client().get(path)
    for name, value in SECURITY_HEADERS.items():
        assert response.headers[name] == value, (path, name)
    assert "frame-ancestors 'none'" in response.headers["content-security-policy"]


def test_pages_keep_their_own_policy_and_cannot_be_framed(client: Client) -> None:
    page = client(local_mode=False).get("/login")
    policy = page.headers["content-security-policy"]
    assert "form-action 'self'" in policy and "frame-ancestors 'none'" in policy


def test_the_schema_is_served_without_pages_that_load_other_sites(client: Client) -> None:
    http = client()
    for path in ("/schema/swagger", "/schema/redoc", "/schema/elements", "/schema/rapidoc"):
        assert http.get(path).status_code == 404, path
    assert http.get("/schema/openapi.json").json()["info"]["title"] == "vitaudit"
    assert "title: vitaudit" in http.get("/schema/openapi.yaml").text


@pytest.mark.parametrize("path", ["/healthz", "/readyz", "/v1/audits", "/", "/schema/openapi.json"])
def test_head_answers_where_get_does(client: Client, path: str) -> None:
    http = client()
    got, head = http.get(path), http.head(path)
    assert head.status_code == got.status_code
    assert head.headers["content-type"] == got.headers["content-type"]
    assert head.content == b""


def test_head_of_an_artifact_sends_its_headers_only(client: Client, tmp_path: Path) -> None:
    http = client()
    audit_id = _stored_audit(tmp_path / "data")
    (tmp_path / "data" / "audits" / audit_id / "plot.png").write_bytes(b"\x89PNG" + b"0" * 1000)
    path = f"/v1/audits/{audit_id}/artifacts/plot.png"
    got, head = http.get(path), http.head(path)
    assert (got.status_code, len(got.content)) == (200, 1004)
    assert (head.status_code, head.content) == (200, b"")
    assert head.headers["content-length"] == "1004"
    assert head.headers["x-content-type-options"] == "nosniff"


# ------------------------------------------------------------------ malformed text fields


def _multipart(part_headers: str) -> bytes:
    return (
        f'--B\r\nContent-Disposition: form-data; name="arch"\r\n\r\n{ARCH}\r\n'
        f"--B\r\n{part_headers}\r\n\r\nxx\r\n--B--\r\n"
    ).encode()


DEEP = 20_000  # levels of nesting that fit in a 64 KiB field
MALFORMED_FIELDS = [
    (
        {"labels": "[" * DEEP + "]" * DEEP},
        "labels must be a JSON list of class indices: it is nested too deeply",
    ),
    (
        {"steps": "[" * DEEP + "]" * DEEP},
        "steps must be a JSON list of training steps: it is nested too deeply",
    ),
    (
        {"labels": "[" + "9" * 5000 + "]"},
        "labels must be a JSON list of class indices: a number is too long",
    ),
    ({"labels": f"[{10**30}]"}, "labels holds an integer over 9223372036854775807 (2**63 - 1)"),
    (
        {"options": '{"num_images": ' + "9" * 5000 + "}"},
        "options: Integer value out of range - at `$.num_images`",
    ),
    (
        {"options": '{"model_args": ' + "[" * DEEP + "]" * DEEP + "}"},
        "options: Expected `object",  # msgspec bounds its own recursion
    ),
    (
        {"policy": "a = " + "[" * DEEP + "]" * DEEP},
        "policy: policy is not valid TOML: its values are nested too deeply",
    ),
    (
        {"policy": "a = " + "{b=" * 3000 + "1" + "}" * 3000},
        "policy: policy is not valid TOML: its values are nested too deeply",
    ),
]


@pytest.mark.parametrize(("fields", "detail"), MALFORMED_FIELDS)
def test_malformed_text_fields_are_400s(
    client: Client, fields: dict[str, str], detail: str
) -> None:
    response = client().post("/v1/audits", data={"arch": ARCH, **fields}, files=[CHECKPOINT])
    assert response.status_code == 400, response.text
    assert response.json()["detail"].startswith(detail)


@pytest.mark.parametrize(
    ("part_headers", "reason"),
    [
        (
            'Content-Disposition: form-data; name="labels"\r\n'
            + "".join(f"X-H{i}: v\r\n" for i in range(50)).rstrip("\r\n"),
            "Maximum segment header count exceeded",
        ),
        (
            f'Content-Disposition: form-data; name="images"; filename="{"a" * 10_000}.png"',
            "Maximum segment header length exceeded",
        ),
    ],
)
def test_oversized_multipart_part_headers_are_400s(
    client: Client, part_headers: str, reason: str
) -> None:
    response = client().post(
        "/v1/audits",
        content=_multipart(part_headers),
        headers={"content-type": "multipart/form-data; boundary=B"},
    )
    assert response.status_code == 400, response.text
    assert response.json()["detail"] == (
        f"a multipart part is over the parser's limits ({reason}): at most 8 headers "
        "and 4224 bytes of headers per part, file name included"
    )


# ------------------------------------------------------------------ sessions


def _sign_in(http: TestClient) -> str:
    response = http.post(
        "/login", data={"key": KEY}, headers={"origin": BASE_URL}, follow_redirects=False
    )
    assert response.status_code == 303, response.text
    cookie = response.headers["set-cookie"]
    assert cookie.startswith("vitaudit_session=") and "Max-Age=" in cookie
    return cookie.split(";", 1)[0].split("=", 1)[1]


def test_the_session_cookie_is_a_token_not_the_key(client: Client) -> None:
    http = client(local_mode=False)
    token = _sign_in(http)
    assert KEY not in token
    assert KEY.encode() not in base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
    http.cookies.clear()
    listed = http.get("/v1/audits", headers={"cookie": f"vitaudit_session={token}"})
    assert listed.status_code == 200, listed.text


def test_sign_out_revokes_the_session_everywhere(client: Client) -> None:
    """A copy of the cookie (another tab, a stolen one) stops working at sign-out."""
    http = client(local_mode=False)
    token = _sign_in(http)
    http.cookies.clear()
    copy = {"cookie": f"vitaudit_session={token}"}
    assert http.get("/v1/audits", headers=copy).status_code == 200
    out = http.post("/logout", headers={**copy, "origin": BASE_URL}, follow_redirects=False)
    assert (out.status_code, out.headers["location"]) == (303, "/login")
    http.cookies.clear()
    after = http.get("/v1/audits", headers=copy)
    assert after.status_code == 401
    assert (
        after.json()["detail"]
        == "the session has ended (signed out or expired); sign in again at /login"
    )
    page = http.get("/", headers=copy, follow_redirects=False)
    assert (page.status_code, page.headers["location"]) == (303, "/login?next=/")


def test_a_forged_session_token_signs_nobody_in(client: Client) -> None:
    http = client(local_mode=False)
    old_style = base64.urlsafe_b64encode(KEY.encode()).decode().rstrip("=")  # the key itself
    for token in (old_style, "x" * 43, "y" * 10_000):
        response = http.get("/v1/audits", headers={"cookie": f"vitaudit_session={token}"})
        assert response.status_code == 401


# ------------------------------------------------------------------ readiness


def test_readiness_without_a_live_worker_is_degraded_but_up(client: Client) -> None:
    response = client().get("/readyz")
    assert response.status_code == 200
    body = response.json()
    assert body["status"] == "degraded" and body["live_workers"] == 0
    assert body["checks"] == {"redis": True, "store": True, "store_space": True, "workers": False}
    assert body["store_free_bytes"] > 0


def test_readiness_with_a_live_worker_is_ok(client: Client, redis_url: str) -> None:
    from rq import Queue, Worker
    from rq.serializers import JSONSerializer

    queue_name = f"edge-{uuid.uuid4().hex[:12]}"
    http = client(queue_name=queue_name)
    redis = Redis.from_url(redis_url)
    worker = Worker(
        [Queue(queue_name, connection=redis, serializer=JSONSerializer)],
        connection=redis,
        serializer=JSONSerializer,
    )
    worker.register_birth()  # registered as a live worker would be; runs nothing
    try:
        body = http.get("/readyz").json()
    finally:
        worker.register_death()
        redis.delete(worker.key)
    assert (body["status"], body["live_workers"], body["checks"]["workers"]) == ("ok", 1, True)
    assert http.get("/readyz").json()["live_workers"] == 0  # a dead worker does not count


def test_readiness_fails_when_the_store_is_nearly_full(client: Client) -> None:
    response = client(min_free_bytes=2**62).get("/readyz")
    assert response.status_code == 503
    body = response.json()
    assert body["status"] == "unavailable" and body["checks"]["store_space"] is False
