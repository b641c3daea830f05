"""Model types, priorities and the load request."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from engine.config import Settings

MODEL_TYPES = ("lm", "multimodal", "embeddings", "whisper", "image-generation", "image-edit")
PRIORITY_RANK = {"low": 0, "normal": 1, "high": 2}


@dataclass(frozen=True)
class LoadSpec:
    model_path: str
    model_type: str
    model_id: str | None = None
    context_length: int | None = None
    priority: str = "normal"
    metadata: dict[str, Any] = field(default_factory=dict)
    pinned: bool = False
    max_concurrency: int | None = None
    max_queue: int | None = None

    def with_id(self, model_id: str) -> LoadSpec:
        return replace(self, model_id=model_id)

    def same_model(self, other: LoadSpec) -> bool:
        return (self.model_path, self.model_type) == (other.model_path, other.model_type)


@dataclass(frozen=True)
class ModelLimits:
    """Bounds on what a request may ask of a model; engine/config.py documents each."""

    id_max_chars: int
    max_prompt_chars: int
    warmup_max_tokens: int

    @classmethod
    def from_settings(cls, settings: Settings) -> ModelLimits:
        return cls(
            id_max_chars=settings.model_id_max_chars,
            max_prompt_chars=settings.model_max_prompt_chars,
            warmup_max_tokens=settings.model_warmup_max_tokens,
        )
