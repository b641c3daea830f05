"""What route handlers take from the running app."""

from __future__ import annotations

from litestar.datastructures import State

from engine.errors import ServiceUnavailable
from engine.models.registry import ModelRegistry
from engine.rag.service import RagService


def model_registry(state: State) -> ModelRegistry:
    """The running engine's model registry; 503 outside the lifespan (before start-up or
    during shutdown)."""
    engine = getattr(state, "engine", None)
    if engine is None:
        raise ServiceUnavailable("the engine is not running", code="engine_not_running")
    registry: ModelRegistry = engine.models
    return registry


def rag_service(state: State) -> RagService:
    """The running engine's RAG service; 503 outside the lifespan."""
    engine = getattr(state, "engine", None)
    if engine is None:
        raise ServiceUnavailable("the engine is not running", code="engine_not_running")
    service: RagService = engine.rag
    return service
