"""The backend for each model type."""

from __future__ import annotations

from pathlib import Path

from engine.config import Settings
from engine.errors import InvalidRequest
from engine.models.backends.base import Backend, LoadedModel
from engine.models.backends.embeddings import EmbeddingsBackend
from engine.models.backends.mlx_lm_backend import MlxLmBackend
from engine.models.backends.mlx_vlm_backend import MlxVlmBackend
from engine.models.backends.whisper import WhisperBackend


class MissingBackend(Backend):
    """A model type this server has no backend for: loads are refused with a 400 that
    names the package that would provide it, never faked."""

    def __init__(self, model_type: str, package: str) -> None:
        self.model_type = model_type
        self.package = package

    def unavailable_reason(self) -> str:
        return (
            f"this server has no '{self.model_type}' backend yet (it would be built on the "
            f"'{self.package}' package)"
        )

    def load(self, path: Path, context_length: int | None) -> LoadedModel:
        raise InvalidRequest(f"no backend for '{self.model_type}'", code="backend_unavailable")


def default_backends(settings: Settings) -> dict[str, Backend]:
    backends: list[Backend] = [
        MlxLmBackend(settings.model_prefill_step_tokens),
        MlxVlmBackend(settings.model_prefill_step_tokens),
        EmbeddingsBackend(),
        WhisperBackend(),
        MissingBackend("image-generation", "mflux"),
        MissingBackend("image-edit", "mflux"),
    ]
    return {b.model_type: b for b in backends}
