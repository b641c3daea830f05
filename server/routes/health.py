"""GET /health (spec §6.3) with real readings only, and /health/live and /health/ready for
process managers.

The spec's sample also shows mongodb_connected and redis_connected; Fusion has neither,
so those keys are absent rather than faked (docs/decisions.md).

/health checks the database (a ping through SQLite and sqlite-vec's `vec_version()`, and a
real committed write), the model registry and, when the job queue is on, its workers.
Status: "ok" (200); "degraded" (200) when the database has less room to grow than
`store_min_free_mb`; "unhealthy" (503) when the database does not answer or cannot be
written (a real committed write fails, or its file system has no room for one more page),
when the engine is not running, or when the job workers stopped. A 503 keeps every
reading and adds `error`, the §7 error object naming what fails (every failing part, in
that order, in its message; the code of the first).

/health/live answers 200 while the process serves requests; it touches nothing else.
/health/ready answers 200 when the engine runs, the database takes a write and the job
workers (when on) run; otherwise 503 in the §7 envelope naming what is not ready. A
degraded store (little room left) is still ready.

None of them waits for a lock: the probe write gives up at once when another connection
holds the write lock (which shows the database is writable), so they stay prompt.
"""

from __future__ import annotations

from typing import Any

import msgspec
from litestar import Request, Response, Router, get
from litestar.openapi import ResponseSpec

from engine.clock import utc_iso
from engine.errors import ErrorCode
from engine.logging import get_logger
from engine.services import Engine
from engine.store import Store
from server import model_views as views
from server.errors import error_response
from server.openapi_docs import ErrorEnvelope

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


class JobsHealth(msgspec.Struct):
    # The job workers' dispatcher and reaper are alive.
    workers_running: bool


class HealthResponse(msgspec.Struct, omit_defaults=True):
    status: str  # ok | degraded (200) | unhealthy (503)
    timestamp: str
    models: ModelsHealth
    persistence: PersistenceHealth
    services: dict[str, bool]
    # Present when the job queue is on (`jobs_enabled`).
    jobs: JobsHealth | None = None
    # When unhealthy: the §7 error object naming the part that fails.
    error: dict[str, Any] | None = None


class LiveResponse(msgspec.Struct):
    status: str  # always "ok"


class ReadyResponse(msgspec.Struct):
    status: str  # "ready" (200); otherwise a 503 §7 error envelope


def _check_store(store: Store | None, min_free_bytes: int) -> tuple[str, PersistenceHealth, Any]:
    """(status, readings, the failure's error object or None) for the database."""
    if store is None:
        return _unhealthy("the database is not open", connected=False)
    try:
        store.ping()
    except Exception as exc:
        log.warning("store ping failed", error=str(exc))
        # The ping asks SQLite and sqlite-vec at once; name the one that failed.
        part = "the vector extension (sqlite-vec)" if _sqlite_answers(store) else "the database"
        return _unhealthy(f"{part} does not answer: {exc}", connected=False)
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


def _sqlite_answers(store: Store) -> bool:
    try:
        store.query("SELECT 1")
    except Exception:  # the caller reports the ping's own error
        return False
    return True


def _unhealthy(message: str, *, connected: bool) -> tuple[str, PersistenceHealth, Any]:
    readings = PersistenceHealth(
        vector_db_connected=connected, store_writable=False, store_free_bytes=None
    )
    return "unhealthy", readings, _error_object(message, ErrorCode.STORAGE_UNAVAILABLE)


def _error_object(message: str, code: ErrorCode) -> dict[str, Any]:
    return {"type": "service_unavailable_error", "message": message, "param": None, "code": code}


def _engine_failures(engine: Engine | None, jobs_enabled: bool) -> list[dict[str, Any]]:
    """Error objects for what fails beside the database: the engine, its job workers."""
    if engine is None:
        return [_error_object("the engine is not running", ErrorCode.ENGINE_NOT_RUNNING)]
    if jobs_enabled and not _workers_running(engine):
        log.warning("job workers not running")
        return [_error_object("the job workers are not running", ErrorCode.SERVICE_UNAVAILABLE)]
    return []


def _workers_running(engine: Engine | None) -> bool:
    return engine is not None and engine.jobs is not None and engine.jobs.workers_running


def _combined(failures: list[dict[str, Any]]) -> dict[str, Any] | None:
    """One error object for every failing part: the first one's code, all their messages."""
    if not failures:
        return None
    return {**failures[0], "message": "; ".join(f["message"] for f in failures)}


@get(
    "/",
    summary="Service health",
    tags=["observability"],
    responses={503: ResponseSpec(data_container=HealthResponse, description="Unhealthy")},
)
async def extended_health(request: Request[Any, Any, Any]) -> Response[HealthResponse]:
    state = request.app.state
    # One ping and one committed one-row write, never waiting for a lock: both run inline,
    # as the run inserts do (engine/fusion/runs.py).
    status, persistence, store_error = _check_store(
        getattr(state, "store", None), int(state.settings.store_min_free_mb * MIB)
    )
    services: dict[str, Any] = getattr(state, "services", {})
    engine: Engine | None = getattr(state, "engine", None)
    jobs_enabled: bool = state.settings.jobs_enabled
    failures = [*([store_error] if store_error else []), *_engine_failures(engine, jobs_enabled)]
    if failures:
        status = "unhealthy"
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
        jobs=JobsHealth(workers_running=_workers_running(engine)) if jobs_enabled else None,
        error=_combined(failures),
    )
    return Response(body, status_code=503 if status == "unhealthy" else 200)


@get("/live", summary="Liveness: the process serves requests", tags=["observability"])
async def live() -> LiveResponse:
    return LiveResponse(status="ok")


@get(
    "/ready",
    summary="Readiness: the engine runs, the database takes writes, the job workers run",
    tags=["observability"],
    responses={
        200: ResponseSpec(data_container=ReadyResponse, description="Ready"),
        503: ResponseSpec(data_container=ErrorEnvelope, description="Not ready: the §7 envelope"),
    },
)
async def ready(request: Request[Any, Any, Any]) -> Response[Any]:
    state = request.app.state
    # Only the store's failure counts: a store with little room left still takes requests.
    _, _, store_error = _check_store(
        getattr(state, "store", None), int(state.settings.store_min_free_mb * MIB)
    )
    failures = [
        *([store_error] if store_error else []),
        *_engine_failures(getattr(state, "engine", None), state.settings.jobs_enabled),
    ]
    error = _combined(failures)
    if error is not None:
        return error_response(503, f"not ready: {error['message']}", code=error["code"])
    return Response(ReadyResponse(status="ready"))


# One router, so the app mounts all three as `health`.
health = Router("/health", route_handlers=[extended_health, live, ready])
