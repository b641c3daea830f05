"""What route handlers take from the running app, through Litestar's dependency injection:
a handler names `engine`, `registry`, `rag`, `fusion`, `jobs`, `webhooks` or `settings` as
a parameter and gets the running engine's service (503 `engine_not_running` outside the
lifespan: before start-up or during shutdown)."""

from __future__ import annotations

from litestar.datastructures import State
from litestar.di import Provide

from engine.config import Settings
from engine.errors import ErrorCode, ServiceUnavailable
from engine.fusion.service import FusionService
from engine.jobs.service import JobService
from engine.jobs.webhooks import WebhookStore
from engine.models.registry import ModelRegistry
from engine.rag.service import RagService
from engine.services import Engine


def _not_running() -> ServiceUnavailable:
    return ServiceUnavailable("the engine is not running", code=ErrorCode.ENGINE_NOT_RUNNING)


def _engine(state: State) -> Engine:
    engine: Engine | None = getattr(state, "engine", None)
    if engine is None:
        raise _not_running()
    return engine


def _registry(state: State) -> ModelRegistry:
    return _engine(state).models


def _rag(state: State) -> RagService:
    return _engine(state).rag


def _fusion(state: State) -> FusionService:
    service = _engine(state).fusion
    if service is None:  # between the engine's start and its fusion service's
        raise _not_running()
    return service


def _jobs(state: State) -> JobService:
    service = _engine(state).jobs
    if service is None:
        raise _not_running()
    return service


def _webhooks(state: State) -> WebhookStore:
    webhooks = _engine(state).webhooks
    if webhooks is None:
        raise _not_running()
    return webhooks


def _settings(state: State) -> Settings:
    settings: Settings = state.settings
    return settings


DEPENDENCIES = {
    "engine": Provide(_engine, sync_to_thread=False),
    "registry": Provide(_registry, sync_to_thread=False),
    "rag": Provide(_rag, sync_to_thread=False),
    "fusion": Provide(_fusion, sync_to_thread=False),
    "jobs": Provide(_jobs, sync_to_thread=False),
    "webhooks": Provide(_webhooks, sync_to_thread=False),
    "settings": Provide(_settings, sync_to_thread=False),
}
