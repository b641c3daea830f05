"""Model types, priorities and the load request."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

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
