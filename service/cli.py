"""The `vitaudit` command: serve, worker, up, cleanup (server side); audit, diff, demo (client
side, `service.client_commands`)."""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import textwrap
import time
from typing import Any

from service.client_commands import add_client_commands
from service.settings import Settings
from service.stack import LocalStack, stopped_by_sigterm

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
# on 2 cores). The benchmark warms the same way so that it times an audit as a job runs it.
WARM_MODULES: tuple[str, ...] = (
    "timm",
    # what the first torch.autograd.forward_ad.make_dual imports (the SGD check's forward-mode
    # pass): it jit-scripts torch's JVP decompositions, ~0.14 s per process
    "torch._decomp.decompositions_for_jvp",
    "workers.analysis.budget",
    "workers.analysis.gradients",
    "workers.analysis.heads",
    "workers.analysis.plots_extra",
    "workers.analysis.plots_gradients",
    "workers.analysis.plots_heads",
    "workers.analysis.plots_posembed",
    "workers.analysis.plots_qk",
    "workers.analysis.posembed",
    "workers.analysis.qk_geometry",
    "workers.analysis.trajectory",
    "workers.hf_checkpoint",
    "workers.onnx_pipeline",
    "onnx",  # ~0.5 s; onnxruntime is not imported here (see warm_worker)
    "workers.tasks",
)

# A ViT built once on the meta device: the first meta build of a process runs torch's Python
# meta kernels for the weight-initialisation ops (~0.3 s on 2 cores), which every audit's
# loading does (`workers.analysis.budget.meta_model`). Meta tensors have no storage, so this
# runs no CPU kernel and starts no thread pool before the fork.
WARM_META_ARCH = "vit_tiny_patch16_224"
# The natural-v1 probe images at the input size of most ViTs: decoding and resizing the 12
# photographs takes ~0.3 s per process (and imports scikit-image's readers).
WARM_PROBE_SIZE = (224, 224)


def warm_worker() -> None:
    """Do once, in the worker before it forks, the one-off work every job would otherwise
    repeat: import `WARM_MODULES` (torch comes with them) and every image decoder, build
    `WARM_META_ARCH` on the meta device, and cache the natural-v1 views at `WARM_PROBE_SIZE`.
    No torch kernel runs on the CPU (meta tensors, NumPy and scikit-image only), so the
    fork stays safe (see `_worker`). Not warmed: onnxruntime. Importing it starts a thread of
    its own, and a work-horse forked while it runs could inherit a lock it holds, so an ONNX
    job imports it itself (~0.16 s)."""
    for name in WARM_MODULES:
        importlib.import_module(name)
    from PIL import Image

    from workers.analysis import probes
    from workers.analysis.budget import meta_model

    Image.init()  # every PIL format plugin, as the first upload would import them
    meta_model(WARM_META_ARCH, {})
    probes.cache_natural_views(WARM_PROBE_SIZE)


def _worker(burst: bool) -> None:
    # Import torch and the analysis core once in the parent so every forked job starts warm,
    # but keep the parent single-threaded: a fork after a multithreaded torch op hangs the
    # child (NOTES.md); the job raises the thread count again.
    import torch

    from service.logs import configure_logging

    configure_logging()  # first: the warm-up's warnings go through the log handler too
    torch.set_num_threads(1)
    warm_worker()
    from redis import Redis
    from rq import Queue, SimpleWorker, Worker
    from rq.serializers import JSONSerializer

    from workers.tasks import logging_audit_id, record_killed_work_horse, serve

    settings = Settings.from_env()
    connection = Redis.from_url(settings.redis_url)
    queue = Queue(settings.queue_name, connection=connection, serializer=JSONSerializer)
    # CUDA cannot be used after a fork: on a GPU node, run jobs in this process.
    worker_class = logging_audit_id(SimpleWorker if torch.cuda.is_available() else Worker)
    serve(
        lambda: worker_class(
            [queue],
            connection=connection,
            serializer=JSONSerializer,
            worker_ttl=int(os.environ.get("VITAUDIT_WORKER_TTL_S", "60")),
            maintenance_interval=int(os.environ.get("VITAUDIT_MAINTENANCE_INTERVAL_S", "60")),
            work_horse_killed_handler=record_killed_work_horse,
        ),
        connection,
        burst=burst,
    )


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


def _up(host: str, port: int) -> None:
    stack = LocalStack(host, port)
    with stopped_by_sigterm():
        try:
            stack.start()
            print(
                f"vitaudit is up at {stack.url} (local single-user mode); Ctrl-C or SIGTERM stops it",
                flush=True,
            )
            while all(p.poll() is None for p in stack.processes):
                time.sleep(0.5)
        except KeyboardInterrupt:
            pass
        finally:
            stack.stop()


ENVIRONMENT_HELP = """environment:
  REDIS_URL            the broker (default redis://127.0.0.1:6379/0; `up` starts one if none answers)
  VITAUDIT_DATA_DIR    the artifact store (default ./vitaudit-data)
  VITAUDIT_URL         the API the client commands talk to (default http://127.0.0.1:8000)
  VITAUDIT_API_KEY     the key the client commands send (none in local mode)
  more server settings: see service/settings.py and the README"""


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults shown beside each option; descriptions and epilogs keep their line breaks."""


def build_parser() -> argparse.ArgumentParser:
    """The `vitaudit` command line: every subcommand with a description, its defaults, its
    exit codes and the environment it reads."""
    parser = argparse.ArgumentParser(
        prog="vitaudit",
        description="Audit Vision Transformer checkpoints for the spatial structure training put "
        "into them: a REST service (serve, worker, up), its client (audit, diff) and a demo.",
        epilog=ENVIRONMENT_HELP,
        formatter_class=_HelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, summary: str, description: str, epilog: str = ENVIRONMENT_HELP) -> Any:
        return commands.add_parser(
            name,
            help=summary,
            description=textwrap.fill(description, 88),
            epilog=epilog,
            formatter_class=_HelpFormatter,
        )

    for name, summary, description in (
        (
            "serve",
            "run the API only",
            "Run the HTTP API (Litestar under uvicorn). Audits are queued in Redis for "
            "`vitaudit worker` processes. Runs until stopped.",
        ),
        (
            "up",
            "run API + one worker (+ Redis when none answers), local single-user mode",
            "Start the API and one worker as child processes (and a private redis-server when "
            "none answers at REDIS_URL), in local single-user mode: no API key, reachable from "
            "this machine. Ctrl-C or SIGTERM stops every child. Exits 1 when the port is taken "
            "or the stack does not start.",
        ),
    ):
        sub = command(name, summary, description)
        sub.add_argument("--host", default=DEFAULT_HOST, help="address to listen on")
        sub.add_argument("--port", type=int, default=DEFAULT_PORT, help="port to listen on")
    worker = command(
        "worker",
        "run one RQ worker",
        "Run one RQ worker on the queue VITAUDIT_QUEUE (default vitaudit): it takes audits "
        "from Redis and runs them (on the GPU when one is present).",
    )
    worker.add_argument("--burst", action="store_true", help="exit when the queue is empty")
    command(
        "cleanup",
        "delete ended audits older than VITAUDIT_RETENTION_S, and orphaned uploads",
        "Delete finished or failed audits older than VITAUDIT_RETENTION_S (default 30 days) "
        "from the store and from Redis, and uploads whose API stopped while receiving them "
        "(their lease lapsed), and print what was deleted.",
    )
    add_client_commands(command)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
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
