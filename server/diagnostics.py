"""GET /internal/diagnostics (spec §6.2) and the ring buffer of recent errors (issue #11).

Real readings only; a reading Fusion cannot take is absent, never made up.

uptime_seconds
    Seconds since the engine started (the server's start-up, models loaded).
resources
    cpu_usage_percent is the whole machine's CPU use since the previous reading (the
    first reading is primed when this module is imported, so it never blocks);
    memory_usage_gb is the machine's memory in use (total less available),
    process_memory_gb this process's resident set. vram_usage_gb (MLX's active memory)
    and vram_total_gb (the device's memory) only where MLX runs on a GPU (Metal).
models, queues
    The registry's loaded models: memory measured at load, request statistics, and each
    model's admission slots.
jobs
    Jobs per status; absent when the job queue is off (`jobs_enabled: false`).
rag
    Collections, documents and chunks in the database.
errors
    `last_24h` counts every recorded error of the last 24 hours (to the minute);
    `recent_errors` holds the newest of them, at most `diagnostics_max_errors`, newest
    first. Recorded: every error answer the exception handlers build (server/errors.py),
    except routing misses (404/405 for a path or method no route has: scanners' noise)
    and a client's own rate-limit refusals (429 rate_limit_exceeded). Each keeps the
    message the client got (a 500's is the generic one and the exception's class), the
    code, status, request id, route template and, for /v1/models/... routes, the loaded
    model it names. Failed jobs are recorded too where the app registers `job_failures`
    on the job queue (code "job.failed", status null, with the job's id and model). No
    request bodies, headers or exception texts.
"""

from __future__ import annotations

import asyncio
import platform
import subprocess
import sys
import threading
import time
from functools import cache
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as package_version
from typing import Any

import msgspec
import psutil
from litestar import Request, get
from litestar.datastructures import State
from litestar.di import NamedDependency
from litestar.types import ControllerRouterHandler, Scope

from engine.clock import utc_iso
from engine.jobs.queue import EventObserver
from engine.jobs.service import JobService
from engine.jobs.types import JobEvent, JobEventName, JobStatus
from engine.logging import get_logger
from engine.models.memory import active_bytes, gb
from engine.rag.service import RagService
from engine.recent_errors import RecentErrors, RecordedError
from engine.services import Engine
from server.request_id import request_id_for
from server.routes.rag import IndexDetail

log = get_logger("server.diagnostics")

PACKAGES = ("fusion", "litestar", "mlx", "mlx-lm", "mlx-vlm")
# A client's message can echo what it sent; the record keeps only its start.
MESSAGE_MAX_CHARS = 500
_MODEL_ROUTES = "/v1/models/"

# cpu_percent(interval=None) reports the use since its previous call; this first call
# sets the baseline so the first diagnostics reading is a real one.
psutil.cpu_percent(interval=None)

_STATE_KEY = "recent_errors"
_create_lock = threading.Lock()


# -- the ring buffer ---------------------------------------------------------------------


def recent_errors(state: State) -> RecentErrors:
    """The app's buffer, made on first use with the app's `diagnostics_max_errors`."""
    found = state.get(_STATE_KEY)
    if isinstance(found, RecentErrors):
        return found
    with _create_lock:
        found = state.get(_STATE_KEY)
        if not isinstance(found, RecentErrors):
            found = RecentErrors(state.settings.diagnostics_max_errors)
            state[_STATE_KEY] = found
        return found


def record_error(scope: Scope, status: int, code: str, message: str) -> None:
    """Remember an error answer of this request (the module doc says which are kept)."""
    state: State = scope["app"].state
    route = scope.get("path_template")
    recent_errors(state).record(
        message[:MESSAGE_MAX_CHARS],
        str(code),
        status,
        request_id=request_id_for(scope),
        route=route,
        model=_named_model(state, route, scope.get("path_params") or {}),
    )


def job_failures(state: State) -> EventObserver:
    """A job queue observer (`queue.on_event(observe=...)`) that records each failed job:
    its error, the model it ran on and its id; committed events only, from any thread."""
    errors = recent_errors(state)

    def observe(events: list[JobEvent]) -> None:
        for event in events:
            if event.name is JobEventName.FAILED:
                job = event.job
                errors.record(
                    (job.error or "failed")[:MESSAGE_MAX_CHARS],
                    JobEventName.FAILED.value,
                    None,
                    model=job.model_id,
                    job_id=job.id,
                )

    return observe


def _named_model(state: State, route: str | None, params: dict[str, Any]) -> str | None:
    """The loaded model a /v1/models/{rest:path} request is about (ids may hold '/')."""
    engine: Engine | None = state.get("engine")
    rest = params.get("rest")
    if engine is None or not isinstance(rest, str) or not (route or "").startswith(_MODEL_ROUTES):
        return None
    rest = rest.lstrip("/")  # a path parameter keeps its leading slash
    named = [e.id for e in engine.models.entries() if rest == e.id or rest.startswith(e.id + "/")]
    return max(named, key=len, default=None)


# -- the response ------------------------------------------------------------------------


class SystemInfo(msgspec.Struct):
    platform: str
    platform_version: str
    processor: str
    python_version: str
    mlx_version: str | None
    # Installed versions of Fusion and the packages it serves with; null when missing.
    packages: dict[str, str | None]


class Resources(msgspec.Struct, omit_defaults=True):
    cpu_usage_percent: float
    memory_usage_gb: float  # the machine's memory in use
    memory_total_gb: float
    process_memory_gb: float  # this process's resident set
    # Only where MLX runs on a GPU.
    vram_usage_gb: float | None = None
    vram_total_gb: float | None = None


class ModelDiagnostics(msgspec.Struct):
    id: str
    type: str
    status: str
    vram_usage_gb: float
    request_count: int
    error_count: int
    avg_latency_ms: float | None


class ModelsDiagnostics(msgspec.Struct):
    loaded_count: int
    total_vram_usage_gb: float
    models: list[ModelDiagnostics]


class QueueDiagnostics(msgspec.Struct):
    queue_size: int
    max_queue_size: int
    active_requests: int
    max_concurrency: int


class RagDiagnostics(msgspec.Struct):
    collections: int
    total_documents: int
    total_chunks: int


class RagIndexDiagnostics(msgspec.Struct):
    """Memory of exact vector search (extension; beside `rag`, whose keys are the spec's)."""

    max_bytes: int  # rag_index_max_mb
    total_bytes: int
    collections: dict[str, IndexDetail]  # those with a matrix in memory


class ErrorItem(msgspec.Struct):
    timestamp: str
    error: str
    code: str
    status: int | None  # null for a failed job
    request_id: str | None
    route: str | None
    model: str | None
    job_id: str | None


class ErrorsDiagnostics(msgspec.Struct):
    last_24h: int
    recent_errors: list[ErrorItem]


class Diagnostics(msgspec.Struct, omit_defaults=True):
    timestamp: str
    uptime_seconds: float
    system: SystemInfo
    resources: Resources
    models: ModelsDiagnostics
    queues: dict[str, QueueDiagnostics]
    rag: RagDiagnostics
    rag_index: RagIndexDiagnostics
    errors: ErrorsDiagnostics
    # Jobs per status; absent when the job queue is off.
    jobs: dict[str, int] | None = None


@cache
def system_info() -> SystemInfo:
    """Fixed for the process's life: read once (the processor's name may run a command)."""
    return SystemInfo(
        platform=sys.platform,
        platform_version=_platform_version(),
        processor=_processor(),
        python_version=platform.python_version(),
        mlx_version=_installed("mlx"),
        packages={name: _installed(name) for name in PACKAGES},
    )


def _installed(name: str) -> str | None:
    try:
        return package_version(name)
    except PackageNotFoundError:
        return None


def _platform_version() -> str:
    mac = platform.mac_ver()[0]
    return f"macOS {mac}" if mac else platform.platform(terse=True)


def _processor() -> str:
    try:
        if sys.platform == "darwin":
            return subprocess.run(
                ["sysctl", "-n", "machdep.cpu.brand_string"],
                capture_output=True,
                text=True,
                timeout=2,
                check=True,
            ).stdout.strip()
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except (OSError, subprocess.SubprocessError) as exc:
        log.info("processor name unreadable", error=str(exc))
    return platform.processor() or platform.machine()


def _resources() -> Resources:
    memory = psutil.virtual_memory()
    resources = Resources(
        cpu_usage_percent=float(psutil.cpu_percent(interval=None)),
        memory_usage_gb=gb(memory.total - memory.available),
        memory_total_gb=gb(memory.total),
        process_memory_gb=gb(psutil.Process().memory_info().rss),
    )
    import mlx.core as mx

    if mx.default_device().type == mx.DeviceType.gpu:
        resources.vram_usage_gb = gb(active_bytes())
        total = dict(mx.device_info()).get("memory_size")
        if isinstance(total, int) and total > 0:
            resources.vram_total_gb = gb(total)
    return resources


def _stored_readings(
    jobs: JobService | None, rag: RagService
) -> tuple[dict[str, int] | None, RagDiagnostics, RagIndexDiagnostics]:
    """The readings that query the database (run in a thread)."""
    per_status = None
    if jobs is not None:
        counts = jobs.queue.counts()
        per_status = {status.value: counts.get(status, 0) for status in JobStatus}
    counted = rag.totals()
    totals = RagDiagnostics(
        collections=counted["collections"],
        total_documents=counted["documents"],
        total_chunks=counted["chunks"],
    )
    held = rag.db.index_usage()
    index = RagIndexDiagnostics(
        max_bytes=rag.db.index.max_bytes,
        total_bytes=sum(info.bytes for info in held.values()),
        collections={name: IndexDetail.of(info) for name, info in held.items()},
    )
    return per_status, totals, index


def _error_item(error: RecordedError) -> ErrorItem:
    return ErrorItem(
        timestamp=utc_iso(error.at, timespec="seconds"),
        error=error.message,
        code=error.code,
        status=error.status,
        request_id=error.request_id,
        route=error.route,
        model=error.model,
        job_id=error.job_id,
    )


@get(
    "/internal/diagnostics",
    summary="System diagnostics (§6.2)",
    tags=["observability"],
)
async def diagnostics(
    request: Request[Any, Any, Any], engine: NamedDependency[Engine]
) -> Diagnostics:
    state = request.app.state
    system, resources, (jobs, totals, index) = await asyncio.gather(
        asyncio.to_thread(system_info),
        asyncio.to_thread(_resources),
        asyncio.to_thread(_stored_readings, engine.jobs, engine.rag),
    )
    entries = engine.models.entries()
    count, kept = recent_errors(state).snapshot()
    return Diagnostics(
        timestamp=utc_iso(timespec="seconds"),
        uptime_seconds=round(time.time() - engine.started_at, 3),
        system=system,
        resources=resources,
        models=ModelsDiagnostics(
            loaded_count=len(entries),
            total_vram_usage_gb=gb(sum(e.memory_bytes for e in entries)),
            models=[
                ModelDiagnostics(
                    id=e.id,
                    type=e.type,
                    status="loaded",
                    vram_usage_gb=gb(e.memory_bytes),
                    request_count=e.stats.request_count,
                    error_count=e.stats.error_count,
                    avg_latency_ms=e.stats.summary()["avg_latency_ms"],
                )
                for e in entries
            ],
        ),
        queues={
            e.id: QueueDiagnostics(
                queue_size=e.slots.waiting,
                max_queue_size=e.slots.max_queue,
                active_requests=e.slots.active,
                max_concurrency=e.slots.concurrency,
            )
            for e in entries
        },
        jobs=jobs,
        rag=totals,
        rag_index=index,
        errors=ErrorsDiagnostics(last_24h=count, recent_errors=[_error_item(e) for e in kept]),
    )


ROUTES: list[ControllerRouterHandler] = [diagnostics]
