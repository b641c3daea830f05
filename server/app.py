"""The Litestar application factory.

`uvicorn --factory server.app:create_app` builds the app from `Settings.load()`; tests and
the CLI pass their own Settings.

What the running app exposes on `app.state`:
    settings   the Settings it was built with
    engine     the running engine.services.Engine (from startup to shutdown)
    store      its engine.store.Store
    services   name -> engine service object; services started by the lifespan register
               here ("fusion", "rag", "mcp", ...) and /health reports them
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from importlib.metadata import PackageNotFoundError, version

from litestar import Litestar
from litestar.datastructures import State
from litestar.openapi import OpenAPIConfig
from litestar.types import ControllerRouterHandler

from engine.config import Settings
from engine.logging import configure_logging, get_logger
from engine.services import Engine
from server import diagnostics, metrics
from server.auth import ApiKeyMiddleware
from server.deps import DEPENDENCIES
from server.disconnect import CancelOnDisconnectMiddleware
from server.errors import exception_handlers
from server.guards import EdgeGuardMiddleware, cors_config
from server.metrics import MetricsMiddleware
from server.openapi_docs import ClosedStructSchemaPlugin
from server.ratelimit import RateLimitMiddleware
from server.request_id import RequestIdMiddleware, set_request_id_header
from server.routes import fusion as fusion_routes
from server.routes import mcp as mcp_routes
from server.routes import models as model_routes
from server.routes import openai as openai_routes
from server.routes import rag as rag_routes
from server.routes import runs_list
from server.routes.health import health
from server.ui import ROUTES as UI_ROUTES
from server.versioning import ApiVersionMiddleware

log = get_logger("server.app")


def _fusion_version() -> str:
    try:
        return version("fusion")
    except PackageNotFoundError:
        return "0.0.0"


def create_app(
    settings: Settings | None = None,
    *,
    extra_routes: Sequence[ControllerRouterHandler] = (),
) -> Litestar:
    """Build the Fusion app.

    settings: defaults to Settings.load() (fusion.yaml, FUSION_* environment).
    extra_routes: route handlers, controllers or routers mounted beside the built-in ones,
        with the same error envelope, request ids and OpenAPI; for embedding and tests.
    """
    settings = settings if settings is not None else Settings.load()
    configure_logging(settings.log_format, settings.log_level)

    @asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        engine = await Engine.start(settings, run_body=fusion_routes.run_body)
        app.state.engine = engine
        app.state.store = engine.store
        app.state.services["rag"] = engine.rag
        app.state.services["fusion"] = engine.fusion
        if engine.jobs is not None:
            app.state.services["mcp"] = engine.jobs
            engine.jobs.queue.on_event(observe=diagnostics.job_failures(app.state))
        log.info("engine started", db=str(engine.store.path), models=len(engine.models.entries()))
        try:
            yield
        finally:
            app.state.store = None
            app.state.engine = None
            app.state.services.clear()
            await engine.stop()
            log.info("engine stopped")

    return Litestar(
        route_handlers=[
            health,
            *model_routes.ROUTES,
            *openai_routes.ROUTES,
            *fusion_routes.ROUTES,
            *runs_list.ROUTES,
            *rag_routes.ROUTES,
            # jobs_enabled false: /api/mcp/* answers 404, as for any unknown path.
            *(mcp_routes.ROUTES if settings.jobs_enabled else []),
            *metrics.ROUTES,
            *diagnostics.ROUTES,
            *UI_ROUTES,
            *extra_routes,
        ],
        lifespan=[lifespan],
        dependencies=DEPENDENCIES,
        exception_handlers=exception_handlers(),
        # In this order: the request id is bound for every later log line; metrics see
        # every answer, refusals included; a request without a valid key is refused before
        # it counts against a rate limit; a refused request never starts a handler task.
        middleware=[
            RequestIdMiddleware(),
            MetricsMiddleware(settings),
            ApiKeyMiddleware(settings),
            RateLimitMiddleware(settings),
            ApiVersionMiddleware(settings),
            EdgeGuardMiddleware(settings),
            CancelOnDisconnectMiddleware(),
        ],
        cors_config=cors_config(settings),
        before_send=[set_request_id_header],
        state=State({"settings": settings, "engine": None, "store": None, "services": {}}),
        # Logging is configured above through structlog; Litestar's own config would add a
        # second, differently formatted handler.
        logging_config=None,
        openapi_config=OpenAPIConfig(title="Fusion", version=_fusion_version()),
        # Bodies that refuse unknown fields are documented closed (server/openapi_docs.py).
        plugins=[ClosedStructSchemaPlugin()],
    )
