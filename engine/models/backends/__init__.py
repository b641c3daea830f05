"""The backend for each model type: the registration point. A new backend is a module
declaring its class (its type, capabilities and operations) and a line in BACKENDS; the
tables of types derive from these declarations."""

from __future__ import annotations

from engine.config import Settings
from engine.models.backends.base import Backend
from engine.models.backends.echo import EchoBackend
from engine.models.backends.embeddings import EmbeddingsBackend
from engine.models.backends.mflux import ImageEditBackend, ImageGenerationBackend
from engine.models.backends.mlx_lm_backend import MlxLmBackend
from engine.models.backends.mlx_vlm_backend import MlxVlmBackend
from engine.models.backends.whisper import WhisperBackend
from engine.models.types import Capability, ModelType, Operation

# One per ModelType, in the order types are listed (tests/test_model_types.py checks both).
BACKENDS: tuple[type[Backend], ...] = (
    MlxLmBackend,
    MlxVlmBackend,
    EmbeddingsBackend,
    WhisperBackend,
    ImageGenerationBackend,
    ImageEditBackend,
    EchoBackend,
)
_BY_TYPE: dict[str, type[Backend]] = {backend.model_type: backend for backend in BACKENDS}


def default_backends(settings: Settings) -> dict[str, Backend]:
    return {backend.model_type: backend.from_settings(settings) for backend in BACKENDS}


def serving(operation: Operation) -> tuple[ModelType, ...]:
    """The model types whose models serve ``operation``."""
    return tuple(backend.model_type for backend in BACKENDS if operation in backend.operations)


def type_capabilities(model_type: str) -> tuple[Capability, ...]:
    """What every model of ``model_type`` can do; nothing for a type no backend declares."""
    backend = _BY_TYPE.get(model_type)
    return backend.capabilities if backend is not None else ()


def type_tag(model_type: str) -> str:
    """The type's tag in model listings: its defining capability, written with hyphens
    like the other tags ("image-generation")."""
    found = type_capabilities(model_type)
    return found[0].replace("_", "-") if found else model_type
