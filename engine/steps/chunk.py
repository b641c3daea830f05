"""The `chunk` step type: split a text into pieces of at most `chunk_size` tokens, the
way RAG ingest chunks documents."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any, ClassVar

from engine.errors import InvalidRequest
from engine.models.backends import serving
from engine.models.types import Operation
from engine.rag.chunking import Tokenize, chunk_sections, word_offsets
from engine.rag.types import Section
from engine.steps.base import CheckContext, StepContext, StepPlugin

TOKENIZER_TYPES = serving(Operation.TOKENIZE)


class ChunkStep(StepPlugin):
    type_name = "chunk"
    description = (
        "Split `text` into chunks of at most `chunk_size` tokens, at paragraph, then "
        "sentence boundaries, carrying up to `overlap` tokens of whole sentences into the "
        "next chunk. Tokens are those of `model_id`'s tokenizer (an lm, multimodal or "
        "embeddings model; special tokens not counted); without `model_id`, "
        "whitespace-separated words. Outputs the chunk texts."
    )
    params_schema: ClassVar[dict[str, Any]] = {
        "type": "object",
        "properties": {
            "text": {"type": "string"},
            "chunk_size": {"type": "integer", "minimum": 1, "description": "Tokens per chunk."},
            "overlap": {
                "type": "integer",
                "minimum": 0,
                "default": 0,
                "description": "Tokens of whole sentences repeated from the previous chunk; "
                "below chunk_size.",
            },
            "model_id": {
                "type": "string",
                "minLength": 1,
                "description": "The model whose tokenizer counts tokens (default: words).",
            },
        },
        "required": ["text", "chunk_size"],
    }
    model_param = "model_id"
    output_schema: ClassVar[dict[str, Any]] = {"type": "array", "items": {"type": "string"}}

    def check(self, params: Mapping[str, Any], ctx: CheckContext) -> None:
        size, overlap = params.get("chunk_size"), params.get("overlap", 0)
        if isinstance(size, int) and isinstance(overlap, int) and overlap >= size:
            ctx.report(f"overlap ({overlap}) must be below chunk_size ({size})", ("overlap",))

    async def run(self, params: dict[str, Any], ctx: StepContext, prepared: Any = None) -> Any:
        size, overlap = params["chunk_size"], params.get("overlap", 0)
        if overlap >= size:
            raise InvalidRequest(
                f"overlap ({overlap}) must be below chunk_size ({size})", param="overlap"
            )
        tokenize: Tokenize = word_offsets
        if params.get("model_id"):
            models = ctx.models
            entry = models.require(params["model_id"], TOKENIZER_TYPES, "chunk")
            tokenize = entry.model.token_offsets
        # Tokenizers are not MLX work: a thread, not the model worker.
        chunks = await asyncio.to_thread(
            chunk_sections, [Section(params["text"])], tokenize, size, overlap
        )
        return [chunk.text for chunk in chunks]
