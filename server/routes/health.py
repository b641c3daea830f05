"""GET /health (spec §6.3) with real readings only.

The spec's sample also shows mongodb_connected and redis_connected; Fusion has neither,
so those keys are absent rather than faked (docs/decisions.md).

Status: "ok" (200); "degraded" (200) when the database has less room to grow than
`store_min_free_mb`; "unhealthy" (503) when the database does not answer or cannot be
written (a real committed write fails, or its file system has no room for one more page).
A 503 keeps every reading and adds `error`, the §7 error object naming what fails.
"""

from __future__ import annotations

from typing import Any

import msgspec
from litestar import Request, Response, get

from engine.clock import utc_iso
from engine.errors import ErrorCode
from engine.logging import get_logger
from engine.store import Store
from server import model_views as views

log = get_logger("server.health")

MIB = 1 << 20

# The spec's service flags, each true once the lifespan has registered that service in
# app.state.services under the key on the left.
_SPEC_SERVICES = {"fusion": "fusion_enabled", "rag": "rag_enabled", "mcp": "mcp_enabled"}


class ModelsHealth(msgspec.Struct):
    loaded_count: int
    models_healthy: bool
    models: list[dict[str, Any]]


class PersistenceHealth(msgspec.Struct):
    vector_db_connected: bool
    # A committed probe write went through and the database has room to grow.
    store_writable: bool
    # Bytes the database can still grow by (free space, capped by its size limit).
    store_free_bytes: int | None


class HealthResponse(msgspec.Struct, omit_defaults=True):
    status: str  # ok | degraded (200) | unhealthy (503)
    timestamp: str
    models: ModelsHealth
    persistence: PersistenceHealth
    services: dict[str, bool]
    # When unhealthy: the §7 error object naming the part that fails.
    error: dict[str, Any] | None = None


def _check_store(store: Store | None, min_free_bytes: int) -> tuple[str, PersistenceHealth, Any]:
    """(status, readings, the failure's error object or None) for the database."""
    if store is None:
        return _unhealthy("the database is not open", connected=False)
    try:
        store.ping()
    except Exception as exc:
        log.warning("store ping failed", error=str(exc))
        return _unhealthy(f"the database does not answer: {exc}", connected=False)
    try:
        check = store.write_check()
    except Exception as exc:
        log.warning("store write check failed", error=str(exc))
        return _unhealthy(f"the database cannot be checked for writing: {exc}", connected=True)
    readings = PersistenceHealth(
        vector_db_connected=True, store_writable=check.writable, store_free_bytes=check.free_bytes
    )
    if check.error is not None:
        log.warning("store not writable", code=check.error.code, error=check.error.message)
        return "unhealthy", readings, _error_object(check.error.message, check.error.code)
    return ("degraded" if check.free_bytes < min_free_bytes else "ok"), readings, None


def _unhealthy(message: str, *, connected: bool) -> tuple[str, PersistenceHealth, Any]:
    readings = PersistenceHealth(
        vector_db_connected=connected, store_writable=False, store_free_bytes=None
    )
    return "unhealthy", readings, _error_object(message, ErrorCode.STORAGE_UNAVAILABLE)


def _error_object(message: str, code: ErrorCode) -> dict[str, Any]:
    return {"type": "service_unavailable_error", "message": message, "param": None, "code": code}


@get("/health", summary="Service health", tags=["observability"])
async def health(request: Request[Any, Any, Any]) -> Response[HealthResponse]:
    state = request.app.state
    # One ping and one committed one-row write, never waiting for a lock: both run inline,
    # as the run inserts do (engine/fusion/runs.py).
    status, persistence, error = _check_store(
        getattr(state, "store", None), int(state.settings.store_min_free_mb * MIB)
    )
    services: dict[str, Any] = getattr(state, "services", {})
    engine = getattr(state, "engine", None)
    loaded = [views.health(e) for e in engine.models.entries()] if engine is not None else []
    body = HealthResponse(
        status=status,
        timestamp=utc_iso(timespec="seconds"),
        # Every listed model is loaded and serving; one being unloaded is no longer listed.
        models=ModelsHealth(
            loaded_count=len(loaded), models_healthy=engine is not None, models=loaded
        ),
        persistence=persistence,
        services={flag: name in services for name, flag in _SPEC_SERVICES.items()},
        error=error,
    )
    return Response(body, status_code=503 if status == "unhealthy" else 200)
