"""Tenants: API keys, isolation (another tenant's audit is 404 everywhere) and per-tenant limits
(429 with Retry-After). The stack runs without a worker so that audits stay queued."""

from __future__ import annotations

import hashlib
import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import httpx
import pytest

from tests.conftest import Stack, stack_env, start_stack, stop_stack

pytestmark = pytest.mark.e2e

RUN = uuid.uuid4().hex[:8]  # tenant state lives in the shared Redis: fresh tenants per run
KEYS = {f"{name}-{RUN}": f"{name}-secret-key-{RUN}" for name in ("alice", "bob", "carol", "dave")}
ALICE, BOB, CAROL, DAVE = KEYS
MAX_CONCURRENT = 2
MAX_BYTES = 300_000
FORM = {"arch": "vit_tiny_patch16_224"}


@pytest.fixture(scope="module")
def tenants(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    data_dir = tmp_path_factory.mktemp("tenants-data")
    keys_file = data_dir / "keys.txt"
    # Two tenants from a file, two from the environment: both sources are read.
    keys_file.write_text(
        "# tenant:sha256(key)\n"
        + "".join(
            f"{t}:{hashlib.sha256(k.encode()).hexdigest()}\n" for t, k in list(KEYS.items())[:2]
        )
    )
    env = stack_env(
        redis_url,
        data_dir,
        VITAUDIT_API_KEYS_FILE=str(keys_file),
        VITAUDIT_API_KEYS=",".join(
            f"{t}:{hashlib.sha256(k.encode()).hexdigest()}" for t, k in list(KEYS.items())[2:]
        ),
        VITAUDIT_MAX_CONCURRENT_AUDITS=str(MAX_CONCURRENT),
        VITAUDIT_MAX_TENANT_BYTES=str(MAX_BYTES),
    )
    env["VITAUDIT_LOCAL_MODE"] = "0"
    running = start_stack(env, data_dir, data_dir / "logs", workers=0)
    try:
        yield running
    finally:
        stop_stack(running)


def as_tenant(stack: Stack, tenant: str) -> httpx.Client:
    return stack.client(**{"X-API-Key": KEYS[tenant]})


def submit(http: httpx.Client, nbytes: int = 1000) -> httpx.Response:
    """A distinct upload each time (identical requests would be answered from the cache)."""
    return http.post(
        "/v1/audits", data=FORM, files={"checkpoint": ("c.safetensors", os.urandom(nbytes))}
    )


def test_no_key_is_401(tenants: Stack) -> None:
    with tenants.client() as http:
        response = http.post("/v1/audits", data=FORM, files={"checkpoint": ("c.safetensors", b"x")})
        listed = http.get("/v1/audits")
    for r in (response, listed):
        assert r.status_code == 401
        assert r.json() == {
            "status": 401,
            "title": "Unauthorized",
            "detail": "send an API key in the X-API-Key header (or Authorization: Bearer), "
            "or sign in at /login in a browser",
        }
    assert not (tenants.data_dir / "audits").exists() or not any(
        (tenants.data_dir / "audits").iterdir()
    )


@pytest.mark.parametrize(
    "headers",
    [
        {"X-API-Key": "wrong"},
        {"Authorization": "Bearer wrong"},
        {"X-API-Key": hashlib.sha256(KEYS[ALICE].encode()).hexdigest()},
    ],
)
def test_bad_key_is_401(tenants: Stack, headers: dict[str, str]) -> None:
    """Also the stored hash itself is not a key."""
    with tenants.client(**headers) as http:
        response = http.get("/v1/audits")
    assert response.status_code == 401
    assert response.json() == {
        "status": 401,
        "title": "Unauthorized",
        "detail": "the API key is not valid",
    }


def test_bearer_token_works(tenants: Stack) -> None:
    with tenants.client(Authorization=f"Bearer {KEYS[ALICE]}") as http:
        assert http.get("/v1/audits").status_code == 200


def test_another_tenants_audit_is_404_everywhere(tenants: Stack) -> None:
    with as_tenant(tenants, ALICE) as alice, as_tenant(tenants, BOB) as bob:
        created = submit(alice)
        assert created.status_code == 202, created.text
        audit_id = created.json()["id"]
        base = f"/v1/audits/{audit_id}"
        for method, path in [
            ("GET", base),
            ("GET", f"{base}/report"),
            ("GET", f"{base}/artifacts"),
            ("GET", f"{base}/artifacts/report.json"),
            ("DELETE", base),
        ]:
            response = bob.request(method, path)
            assert response.status_code == 404, (method, path, response.text)
            assert response.json() == {
                "status": 404,
                "title": "Not found",
                "detail": f"no audit '{audit_id}'",
            }
        assert audit_id not in [a["id"] for a in bob.get("/v1/audits").json()]
        # Bob's delete removed nothing: Alice still sees her audit, and can delete it.
        assert alice.get(base).json()["status"] == "queued"
        assert alice.delete(base).status_code == 204
        assert alice.get(base).status_code == 404


def test_concurrent_audits_over_the_limit_get_429_with_retry_after(tenants: Stack) -> None:
    with as_tenant(tenants, CAROL) as carol, as_tenant(tenants, DAVE) as dave:
        ids = [submit(carol).json()["id"] for _ in range(MAX_CONCURRENT)]
        refused = submit(carol)
        assert refused.status_code == 429
        assert refused.headers["retry-after"] == "30"
        assert refused.json() == {
            "status": 429,
            "title": "Limit exceeded",
            "detail": f"tenant '{CAROL}' has {MAX_CONCURRENT} audits queued or running, the limit is "
            f"{MAX_CONCURRENT}; wait for one to end",
        }
        assert submit(dave).status_code == 202  # the limit is per tenant
        assert carol.delete(f"/v1/audits/{ids[0]}").status_code == 204
        again = submit(carol)
        assert again.status_code == 202, again.text
        for audit_id in ids[1:] + [again.json()["id"]]:
            carol.delete(f"/v1/audits/{audit_id}")


def test_stored_bytes_over_the_limit_get_429_and_nothing_is_kept(tenants: Stack) -> None:
    with as_tenant(tenants, BOB) as bob:
        first = submit(bob, 200_000)
        assert first.status_code == 202, first.text
        before = {p.name for p in (tenants.data_dir / "audits").iterdir()}
        refused = submit(bob, 200_000)
        assert refused.status_code == 429
        assert refused.headers["retry-after"] == "3600"
        detail = refused.json()["detail"]
        assert detail.startswith("this upload of 2") and detail.endswith(
            f"bytes in the store, over the limit of {MAX_BYTES}; delete finished audits to make room"
        )
        assert {p.name for p in (tenants.data_dir / "audits").iterdir()} == before
        assert bob.delete(f"/v1/audits/{first.json()['id']}").status_code == 204
        accepted = submit(bob, 200_000)
        assert accepted.status_code == 202, accepted.text
        bob.delete(f"/v1/audits/{accepted.json()['id']}")


# ------------------------------------------------------------------ browsers: /login and the cookie


@contextmanager
def signed_in(stack: Stack, tenant: str) -> Iterator[httpx.Client]:
    """A client that signed in through the form, as a browser does: it holds only the cookie."""
    with stack.client() as http:
        response = http.post(
            "/login",
            data={"key": KEYS[tenant], "next": "/v1/audits"},
            headers={"Origin": stack.url},
        )
        assert response.status_code == 303, response.text
        assert response.headers["location"] == "/v1/audits"
        yield http


def test_pages_send_a_browser_without_a_key_to_sign_in(tenants: Stack) -> None:
    report_page = f"/v1/audits/{'0' * 32}/report.html"
    with tenants.client() as http:
        landing, report = http.get("/"), http.get(report_page)
        form = http.get("/login")
        api = http.get("/v1/audits")
    assert (landing.status_code, landing.headers["location"]) == (303, "/login?next=/")
    assert (report.status_code, report.headers["location"]) == (303, f"/login?next={report_page}")
    assert form.status_code == 200 and form.headers["content-type"].startswith("text/html")
    assert (
        'name="key"' in form.text
        and "form-action 'self'" in form.headers["content-security-policy"]
    )
    assert api.status_code == 401  # the JSON API answers, it does not redirect


def test_a_wrong_key_at_sign_in_is_401_and_sets_no_cookie(tenants: Stack) -> None:
    with tenants.client() as http:
        response = http.post("/login", data={"key": "wrong"}, headers={"Origin": tenants.url})
    assert response.status_code == 401
    assert "That API key is not valid." in response.text
    assert "set-cookie" not in response.headers


@pytest.mark.parametrize("origin", [None, "http://evil.example", "null"])
def test_a_sign_in_or_out_from_another_site_is_403(tenants: Stack, origin: str | None) -> None:
    """A forged sign-in would put the victim's browser into the attacker's tenant."""
    headers = {"Origin": origin} if origin else {}
    with tenants.client() as http:
        login = http.post("/login", data={"key": KEYS[ALICE]}, headers=headers)
        logout = http.post("/logout", headers=headers)
    for response in (login, logout):
        assert response.status_code == 403
        assert "set-cookie" not in response.headers


def test_behind_an_https_proxy_the_cookie_is_host_only_and_the_origin_https(
    tenants: Stack,
) -> None:
    """Over HTTPS the session is a "__Host-" cookie (Secure, Path=/, no Domain), and only that
    name is read: a plain one, as a sibling subdomain could plant, signs nobody in."""
    proxy = {"X-Forwarded-Proto": "HTTPS", "X-Forwarded-Host": "audits.example.org"}
    origin = {"Origin": "https://audits.example.org"}
    with tenants.client(**proxy) as http:
        plain = http.post("/login", data={"key": KEYS[ALICE]}, headers={"Origin": tenants.url})
        response = http.post("/login", data={"key": KEYS[ALICE]}, headers=origin)
        cookie = response.headers["set-cookie"]
        value = cookie.split(";", 1)[0].split("=", 1)[1]
        with tenants.client(**proxy, Cookie=f"vitaudit_session={value}") as planting:
            planted = planting.get("/")
        with tenants.client(**proxy, Cookie=f"__Host-vitaudit_session={value}") as host:
            host_only = host.get("/")
        logout = http.post("/logout", headers=origin)
    assert plain.status_code == 403  # the browser is on https://audits.example.org, not on host
    assert response.status_code == 303
    assert cookie.startswith("__Host-vitaudit_session=")
    assert "secure" in cookie.lower() and "Path=/" in cookie and "domain" not in cookie.lower()
    assert planted.status_code == 303 and host_only.status_code == 200
    cleared = logout.headers.get_list("set-cookie")
    assert {c.split("=", 1)[0] for c in cleared} == {"vitaudit_session", "__Host-vitaudit_session"}
    assert all("Max-Age=0" in c for c in cleared)


def test_a_bad_header_key_on_a_page_is_401_not_a_redirect(tenants: Stack) -> None:
    with tenants.client(**{"X-API-Key": "wrong"}) as http:
        response = http.get("/")
    assert response.status_code == 401


def test_the_session_cookie_acts_for_its_tenant_only(tenants: Stack) -> None:
    with signed_in(tenants, ALICE) as alice, as_tenant(tenants, BOB) as bob:
        (session,) = [c for c in alice.cookies.jar if c.name == "vitaudit_session"]
        assert KEYS[ALICE] not in session.value  # a session token, not the key
        assert session.has_nonstandard_attr("HttpOnly") and session.path == "/"
        assert session.get_nonstandard_attr("SameSite").lower() == "strict"
        landing = alice.get("/")
        assert (
            landing.status_code == 200 and ALICE in landing.text and 'id="sign-out"' in landing.text
        )
        created = alice.post(
            "/v1/audits",
            data=FORM,
            files={"checkpoint": ("c.safetensors", os.urandom(1000))},
            headers={"Origin": tenants.url},
        )
        assert created.status_code == 202, created.text
        audit_id = created.json()["id"]
        assert audit_id in [a["id"] for a in alice.get("/v1/audits").json()]
        assert bob.get(f"/v1/audits/{audit_id}").status_code == 404
        assert (
            alice.delete(f"/v1/audits/{audit_id}", headers={"Origin": tenants.url}).status_code
            == 204
        )


def _other_origins(stack: Stack) -> list[str | None]:
    port = int(stack.url.rsplit(":", 1)[1])
    return [
        None,
        "null",
        "http://evil.example",
        stack.url.replace("http://", "https://"),  # the scheme counts
        stack.url.replace(f":{port}", f":{port + 1}"),  # and the port
    ]


def test_a_cookie_write_from_another_origin_is_403(tenants: Stack) -> None:
    with signed_in(tenants, ALICE) as alice:
        kept = alice.post(
            "/v1/audits",
            data=FORM,
            files={"checkpoint": ("c.safetensors", os.urandom(1000))},
            headers={"Origin": tenants.url},
        ).json()["id"]
        before = len(alice.get("/v1/audits").json())
        for origin in _other_origins(tenants):
            headers = {"Origin": origin} if origin else {}
            created = alice.post(
                "/v1/audits",
                data=FORM,
                files={"checkpoint": ("c.safetensors", os.urandom(1000))},
                headers=headers,
            )
            deleted = alice.delete(f"/v1/audits/{kept}", headers=headers)
            for response in (created, deleted):
                assert response.status_code == 403, (origin, response.text)
                assert response.json()["detail"].startswith("a browser write must come from")
        assert len(alice.get("/v1/audits").json()) == before
        assert (
            alice.delete(f"/v1/audits/{kept}", headers={"Origin": tenants.url}).status_code == 204
        )


def test_sign_out_forgets_the_cookie(tenants: Stack) -> None:
    with signed_in(tenants, ALICE) as alice:
        response = alice.post("/logout", headers={"Origin": tenants.url})
        assert (response.status_code, response.headers["location"]) == (303, "/login")
        assert "Max-Age=0" in response.headers["set-cookie"]
        assert alice.get("/").status_code == 303


@pytest.mark.parametrize("target", ["//evil.example/", "https://evil.example/", "/\\evil.example"])
def test_sign_in_returns_only_to_pages_of_this_service(tenants: Stack, target: str) -> None:
    with tenants.client() as http:
        response = http.post(
            "/login", data={"key": KEYS[ALICE], "next": target}, headers={"Origin": tenants.url}
        )
    assert (response.status_code, response.headers["location"]) == (303, "/")
