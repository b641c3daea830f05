"""The `rerank` step type: reorder documents (search hits or plain texts) by a language
model's judgement of their relevance to a query."""

from __future__ import annotations

from typing import Any, ClassVar

from engine.models.backends import serving
from engine.models.types import Operation
from engine.rag.retrieval import RERANK_INSTRUCTION, rank_by_relevance
from engine.steps.base import StepContext, StepPlugin


class RerankStep(StepPlugin):
    type_name = "rerank"
    description = (
        "Reorder `documents` (hit objects with `text`, e.g. vector_search's output, or "
        "strings) by an lm's relevance judgement, most relevant first, keeping `top_k`. "
        "Each hit gains `rerank_score` in [0, 1]; a string becomes {text, rerank_score}."
    )
    params_schema: ClassVar[dict[str, Any]] = {
        "type": "object",
        "properties": {
            "query": {"type": "string", "minLength": 1},
            "documents": {
                "type": "array",
                "items": {
                    "type": ["object", "string"],
                    "properties": {"text": {"type": "string"}},
                    "required": ["text"],
                },
            },
            "model_id": {
                "type": "string",
                "minLength": 1,
                "description": "An lm that judges relevance (a reranker such as "
                "Qwen3-Reranker judges best).",
            },
            "top_k": {"type": "integer", "minimum": 1, "description": "Keep this many."},
            "instruction": {
                "type": "string",
                "minLength": 1,
                "description": f"What relevance means (default: '{RERANK_INSTRUCTION}').",
            },
        },
        "required": ["query", "documents", "model_id"],
    }
    model_param = "model_id"
    # The documents given (hit objects keep their own fields), best first.
    output_schema: ClassVar[dict[str, Any]] = {
        "type": "array",
        "items": {
            "type": "object",
            "properties": {"text": {"type": "string"}, "rerank_score": {"type": "number"}},
            "required": ["text", "rerank_score"],
        },
    }

    async def run(self, params: dict[str, Any], ctx: StepContext, prepared: Any = None) -> Any:
        models = ctx.models
        model_id = params["model_id"]
        models.require(model_id, serving(Operation.RELEVANCE), "rerank")
        # The schema made every document a string or an object with a `text` string.
        documents = [d if isinstance(d, dict) else {"text": d} for d in params["documents"]]
        ranked = await rank_by_relevance(
            models,
            model_id,
            params["query"],
            [d["text"] for d in documents],
            params.get("instruction") or RERANK_INSTRUCTION,
        )
        top_k = params.get("top_k")
        return [
            {**documents[i], "rerank_score": round(score, 6)}
            for i, score in ranked[: top_k if top_k is not None else len(ranked)]
        ]
