"""create_app(settings) -> Litestar: the HTTP edge of vitaudit."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from litestar import Litestar, Response, get
from litestar.datastructures import State
from litestar.di import Provide
from litestar.openapi import OpenAPIConfig

from service.audits import AuditController
from service.checkpoints import CheckpointController
from service.errors import EXCEPTION_HANDLERS
from service.models import Health
from service.pages import PageController
from service.queue import AuditQueue
from service.settings import Settings
from service.store import LocalStore

VERSION = "0.1.0"


@get("/healthz", summary="The process is up", tags=["health"])
async def healthz() -> Health:
    return Health(status="ok")


@get("/readyz", summary="Redis answers and the store is writable", tags=["health"])
async def readyz(store: LocalStore, queue: AuditQueue) -> Response[Health]:
    checks = {"redis": queue.ping(), "store": store.writable()}
    ready = all(checks.values())
    return Response(Health(status="ok" if ready else "unavailable", checks=checks), status_code=200 if ready else 503)


def create_app(settings: Settings | None = None) -> Litestar:
    settings = settings or Settings.from_env()
    store = LocalStore(settings.data_dir)
    queue = AuditQueue(settings)

    @asynccontextmanager
    async def lifespan(_: Litestar) -> AsyncIterator[None]:
        store.ensure()
        try:
            yield
        finally:
            queue.redis.close()

    return Litestar(
        route_handlers=[healthz, readyz, AuditController, CheckpointController, PageController],
        dependencies={
            "settings": Provide(lambda: settings, use_cache=True, sync_to_thread=False),
            "store": Provide(lambda: store, use_cache=True, sync_to_thread=False),
            "queue": Provide(lambda: queue, use_cache=True, sync_to_thread=False),
        },
        exception_handlers=EXCEPTION_HANDLERS,  # type: ignore[arg-type]
        lifespan=[lifespan],
        openapi_config=OpenAPIConfig(
            title="vitaudit",
            version=VERSION,
            description="Audits Vision Transformer checkpoints: position-embedding structure, "
            "head specialization and gradient alignment.",
        ),
        state=State({"settings": settings}),
        logging_config=None,
    )


logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
app = create_app()
