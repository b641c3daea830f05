"""Model types, what models can do, priorities and the load request."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import Any

from engine.config import Settings


class ModelType(StrEnum):
    """What a model is loaded as. Each type has one backend, registered in
    engine/models/backends/__init__.py, which declares what models of the type can do;
    every table of types (the DSL schema, capabilities, model_call, views) is derived from
    those declarations. A StrEnum, so the JSON, the API and stored runs keep the strings."""

    LM = "lm"
    MULTIMODAL = "multimodal"
    EMBEDDINGS = "embeddings"
    WHISPER = "whisper"
    IMAGE_GENERATION = "image-generation"
    IMAGE_EDIT = "image-edit"
    ECHO = "echo"  # a fake model for tests and demos (engine/models/backends/echo.py)


class Operation(StrEnum):
    """A request a loaded model may serve; a backend declares the ones its models serve
    and the registry and step plugins require a model of a type that serves theirs."""

    CHAT = "chat"
    VISION = "vision"
    EMBED = "embed"
    COUNT_TOKENS = "count_tokens"
    TOKENIZE = "tokenize"  # the token spans of a text, which chunking counts
    RELEVANCE = "relevance"  # rerank scores
    TRANSCRIBE = "transcribe"


class Capability(StrEnum):
    """The capabilities of spec §3.3 in the order it lists them: its six, then the two
    the remaining model types give."""

    CHAT = "chat"
    VISION = "vision"
    EMBEDDINGS = "embeddings"
    IMAGE_GENERATION = "image_generation"
    TOOL_CALLING = "tool_calling"
    LONG_CONTEXT = "long_context"
    TRANSCRIPTION = "transcription"
    IMAGE_EDIT = "image_edit"


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


@dataclass(frozen=True)
class BatchPolicy:
    """How concurrent requests share a model's passes: a language model's batch, and the
    texts an embeddings pass groups; engine/config.py documents each."""

    max_batch: int
    prompt_cache_bytes: int
    stream_backlog_chunks: int
    embed_max_texts: int

    @classmethod
    def from_settings(cls, settings: Settings) -> BatchPolicy:
        return cls(
            max_batch=settings.model_max_batch,
            prompt_cache_bytes=int(settings.model_prompt_cache_mb * 2**20),
            stream_backlog_chunks=settings.model_stream_backlog_chunks,
            embed_max_texts=settings.model_embed_batch_max_texts,
        )
