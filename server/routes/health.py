"""GET /health (spec §6.3) with real readings only.

The spec's sample also shows mongodb_connected and redis_connected; Fusion has neither,
so those keys are absent rather than faked (docs/decisions.md).
"""

from __future__ import annotations

from typing import Any

import msgspec
from litestar import Request, get

from engine.clock import utc_iso
from engine.logging import get_logger
from engine.models import views
from engine.store import Store

log = get_logger("server.health")

# The spec's service flags, each true once the lifespan has registered that service in
# app.state.services under the key on the left.
_SPEC_SERVICES = {"fusion": "fusion_enabled", "rag": "rag_enabled", "mcp": "mcp_enabled"}


class ModelsHealth(msgspec.Struct):
    loaded_count: int
    models_healthy: bool
    models: list[dict[str, Any]]


class PersistenceHealth(msgspec.Struct):
    vector_db_connected: bool


class HealthResponse(msgspec.Struct):
    status: str
    timestamp: str
    models: ModelsHealth
    persistence: PersistenceHealth
    services: dict[str, bool]


def _store_connected(store: Store | None) -> bool:
    if store is None:
        return False
    try:
        store.ping()
    except Exception as exc:
        log.warning("store ping failed", error=str(exc))
        return False
    return True


@get("/health", summary="Service health", tags=["observability"])
async def health(request: Request[Any, Any, Any]) -> HealthResponse:
    state = request.app.state
    # The ping is one in-process SQLite statement (microseconds), so it runs inline.
    connected = _store_connected(getattr(state, "store", None))
    services: dict[str, Any] = getattr(state, "services", {})
    engine = getattr(state, "engine", None)
    loaded = [views.health(e) for e in engine.models.entries()] if engine is not None else []
    return HealthResponse(
        status="ok" if connected else "degraded",
        timestamp=utc_iso(timespec="seconds"),
        # Every listed model is loaded and serving; one being unloaded is no longer listed.
        models=ModelsHealth(
            loaded_count=len(loaded), models_healthy=engine is not None, models=loaded
        ),
        persistence=PersistenceHealth(vector_db_connected=connected),
        services={flag: name in services for name, flag in _SPEC_SERVICES.items()},
    )
