"""The backend for each model type."""

from __future__ import annotations

from engine.config import Settings
from engine.models.backends.base import Backend
from engine.models.backends.embeddings import EmbeddingsBackend
from engine.models.backends.mlx_lm_backend import MlxLmBackend


def default_backends(settings: Settings) -> dict[str, Backend]:
    backends: list[Backend] = [MlxLmBackend(), EmbeddingsBackend()]
    return {b.model_type: b for b in backends}
