"""Exit 0 when an RQ worker of this host is registered in Redis, 1 otherwise.

The container HEALTHCHECK of the worker images and the worker's Kubernetes liveness probe.
A worker keeps its registration alive with heartbeats (VITAUDIT_WORKER_TTL_S); it lapses
when the worker died or hung, or lost Redis for longer than that. Matching on the host name
works because a container (or pod) has its own host name and runs one worker.

    python worker_healthcheck.py      # REDIS_URL and VITAUDIT_QUEUE as the worker reads them
"""

from __future__ import annotations

import socket
import sys

from redis import Redis
from redis.exceptions import RedisError
from rq import Queue, Worker

from service.settings import Settings


def workers_on_this_host(settings: Settings, hostname: str) -> list[str]:
    """Names of the live workers of settings' queue that run on ``hostname``."""
    connection = Redis.from_url(settings.redis_url, socket_connect_timeout=3, socket_timeout=3)
    queue = Queue(settings.queue_name, connection=connection)
    return [w.name for w in Worker.all(queue=queue) if w.hostname == hostname]


def main() -> int:
    hostname = socket.gethostname()
    try:
        names = workers_on_this_host(Settings.from_env(), hostname)
    except RedisError as exc:
        print(f"unhealthy: Redis does not answer: {exc}", file=sys.stderr)
        return 1
    if not names:
        print(f"unhealthy: no worker of this host ({hostname}) is registered", file=sys.stderr)
        return 1
    print(f"healthy: {', '.join(names)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
