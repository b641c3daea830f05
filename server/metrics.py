"""Prometheus /metrics (spec §6.1) and the per-request series (issue #11).

The instruments live in the engine (engine/metrics.py: one CollectorRegistry per engine,
so apps in one process never share a series); this module records the HTTP series through
them and serves them with the gauges of the engine's current state, which
`EngineStateCollector` reads at scrape time. docs/api.md lists every series.

Labels stay bounded: `route`/`endpoint` is the matched route's template (Litestar runs
middleware only for matched routes, so an unknown path is never counted), `method` one of
the route's methods, `model` the ids of loaded models the request looked up (engine.metrics
.tracking_models: a request naming an unknown model adds none), `key` a configured API
key's name ("" without one)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from dataclasses import dataclass

from litestar import Request, Response, get
from litestar.enums import ScopeType
from litestar.exceptions import HTTPException
from litestar.middleware import ASGIMiddleware
from litestar.types import ASGIApp, ControllerRouterHandler, Message, Receive, Scope, Send
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.metrics_core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from engine.config import Settings
from engine.errors import FusionError
from engine.jobs.types import JobStatus
from engine.metrics import tracking_models
from engine.models.memory import GIB
from engine.services import Engine
from server.auth import KEY_NAME_STATE_KEY

# The classic text format (generate_latest writes it); Litestar appends "; charset=utf-8".
MEDIA_TYPE = "text/plain; version=0.0.4"
# nginx's code for a request whose client went away before any response was sent.
CLIENT_CLOSED = 499


@dataclass
class ModelReading:
    model: str
    memory_gb: float
    queue_depth: int
    load_time_s: float


@dataclass
class StateReading:
    """The engine's current state, read once per scrape."""

    models: list[ModelReading]
    jobs: dict[str, int] | None  # None: the job queue is not running
    webhook_deliveries: dict[str, int] | None
    rag: dict[str, int]


async def read_state(engine: Engine) -> StateReading:
    """Model readings on the loop (the registry is the loop's); the database counts on a
    thread, so a writer holding the lock never stalls the loop."""
    models = [
        ModelReading(e.id, e.memory_bytes / GIB, e.slots.waiting, e.load_time_ms / 1000)
        for e in engine.models.entries()
    ]

    def counts() -> tuple[dict[str, int] | None, dict[str, int] | None, dict[str, int]]:
        jobs = None if engine.jobs is None else engine.jobs.queue.counts()
        deliveries = None if engine.webhooks is None else engine.webhooks.delivery_counts()
        return (
            None if jobs is None else {str(s): n for s, n in jobs.items()},
            deliveries,
            engine.rag.totals(),
        )

    jobs, deliveries, rag = await asyncio.to_thread(counts)
    return StateReading(models, jobs, deliveries, rag)


class EngineStateCollector(Collector):
    """The gauges of one scrape's StateReading; every status has a sample, 0 included, so
    a series does not vanish when its count drops to nothing."""

    def __init__(self, reading: StateReading) -> None:
        self.reading = reading

    def collect(self) -> Iterator[Metric]:
        r = self.reading
        vram = GaugeMetricFamily(
            "mlx_vram_usage_gb", "Measured memory of each loaded model in GiB", labels=["model"]
        )
        queue = GaugeMetricFamily(
            "mlx_queue_depth", "Requests waiting in each loaded model's queue", labels=["model"]
        )
        load = GaugeMetricFamily(
            "mlx_model_load_time_seconds",
            "How long each loaded model took to load",
            labels=["model"],
        )
        for m in r.models:
            vram.add_metric([m.model], m.memory_gb)
            queue.add_metric([m.model], m.queue_depth)
            load.add_metric([m.model], m.load_time_s)
        yield from (vram, queue, load)
        if r.jobs is not None:
            jobs = GaugeMetricFamily(
                "fusion_jobs", "Jobs in the job queue by status", labels=["status"]
            )
            for status in JobStatus:
                jobs.add_metric([str(status)], r.jobs.get(str(status), 0))
            yield jobs
        if r.webhook_deliveries is not None:
            deliveries = GaugeMetricFamily(
                "fusion_webhook_deliveries",
                "Webhook deliveries kept in the outbox by status",
                labels=["status"],
            )
            for outcome, n in r.webhook_deliveries.items():
                deliveries.add_metric([outcome], n)
            yield deliveries
        for name, what in (
            ("collections", "RAG collections"),
            ("documents", "Documents in all RAG collections"),
            ("chunks", "Chunks in all RAG collections"),
        ):
            yield GaugeMetricFamily(f"fusion_rag_{name}", what, value=r.rag.get(name, 0))


class _Exposition(Collector):
    """What one scrape writes: the engine's instruments, then the state gauges."""

    def __init__(self, registry: CollectorRegistry, state: Collector) -> None:
        self.registry = registry
        self.state = state

    def collect(self) -> Iterator[Metric]:
        yield from self.registry.collect()
        yield from self.state.collect()


@get("/metrics", media_type=MEDIA_TYPE, summary="Prometheus metrics", tags=["observability"])
async def metrics(request: Request) -> Response[bytes]:
    """The text exposition format, version 0.0.4 (spec §6.1); docs/api.md lists the series."""
    engine: Engine = request.app.state.engine
    reading = await read_state(engine)
    body = generate_latest(
        _Exposition(engine.models.metrics.registry, EngineStateCollector(reading))
    )
    return Response(body, media_type=MEDIA_TYPE)


ROUTES: list[ControllerRouterHandler] = [metrics]


def error_status(exc: Exception) -> int:
    """The status server/errors.py answers an exception with."""
    if isinstance(exc, FusionError):
        return exc.status
    if isinstance(exc, HTTPException):
        return exc.status_code
    return 500


def route_template(scope: Scope) -> str:
    return str(scope.get("path_template") or "")


class MetricsMiddleware(ASGIMiddleware):
    """Records every matched request: fusion_http_* by route template, method, status and
    key name; mlx_requests_total and mlx_request_latency_seconds once for each loaded model
    the request used. The latency runs to the end of the response (a whole stream)."""

    scopes = (ScopeType.HTTP,)

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    async def handle(self, scope: Scope, receive: Receive, send: Send, next_app: ASGIApp) -> None:
        engine: Engine | None = scope["app"].state.get("engine")
        if engine is None:  # starting or stopping: nothing to record into
            await next_app(scope, receive, send)
            return
        status = 0

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        started = time.perf_counter()
        with tracking_models() as used:
            try:
                await next_app(scope, receive, send_status)
            except asyncio.CancelledError:
                status = status or CLIENT_CLOSED
                raise
            except Exception as exc:
                # Raised by a middleware below this one (a refused key, a rate limit): the
                # app's exception handlers, outside, turn it into this status.
                status = status or error_status(exc)
                raise
            finally:
                engine.models.metrics.observe_http(
                    route=route_template(scope),
                    method=str(scope.get("method", "")),
                    status=status or 500,
                    key=str(scope.get("state", {}).get(KEY_NAME_STATE_KEY) or ""),
                    models=sorted(used),
                    seconds=time.perf_counter() - started,
                )
