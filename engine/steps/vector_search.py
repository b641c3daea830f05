"""The `vector_search` step type: nearest chunks of a RAG collection, by query text or
by a query vector another step embedded."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

from engine.dsl.templating import is_template
from engine.errors import InvalidRequest
from engine.rag.filters import compile_filter
from engine.rag.retrieval import MAX_K
from engine.steps.base import CheckContext, StepContext, StepPlugin

# Workflows usually rerank or filter the hits in a later step, so the default keeps every
# nearest chunk (cosine >= 0) instead of the RAG query API's 0.7, which would often leave
# a reranker nothing to choose from.
DEFAULT_THRESHOLD = 0.0
DEFAULT_TOP_K = 5
# One hit (engine.rag.service.hit_json); rerank_score only after a rerank.
HIT_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "chunk_id": {"type": "string"},
        "text": {"type": "string"},
        "score": {"type": "number"},
        "rerank_score": {"type": "number"},
        "metadata": {"type": "object"},
    },
    "required": ["chunk_id", "text", "score", "metadata"],
    "additionalProperties": False,
}


class VectorSearchStep(StepPlugin):
    type_name = "vector_search"
    description = (
        "Search a RAG collection by `query` text (embedded with the collection's model; "
        "`hybrid` also fuses lexical matches) or by `query_embedding`. Outputs the hits, "
        "best first: [{chunk_id, text, score, metadata}]; score is the cosine similarity."
    )
    params_schema: ClassVar[dict[str, Any]] = {
        "type": "object",
        "properties": {
            "collection": {"type": "string", "minLength": 1},
            "query": {"type": "string", "minLength": 1, "description": "The query text."},
            "query_embedding": {
                "type": "array",
                "items": {"type": "number"},
                "minItems": 1,
                "description": "A query vector of the collection's dimension (e.g. a "
                "model_call embed step's output). Give this or `query`, not both.",
            },
            "model_id": {
                "type": "string",
                "minLength": 1,
                "description": "The embeddings model for `query` (default and only "
                "choice that compares: the collection's own).",
            },
            "top_k": {"type": "integer", "minimum": 1, "maximum": MAX_K, "default": DEFAULT_TOP_K},
            "similarity_threshold": {
                "type": "number",
                "minimum": -1,
                "maximum": 1,
                "default": DEFAULT_THRESHOLD,
                "description": "Minimum cosine similarity (default 0.0: later steps usually "
                "rerank or filter; the RAG query API's default is 0.7).",
            },
            "hybrid": {
                "type": "boolean",
                "default": False,
                "description": "Fuse BM25 lexical matches with the vector ranking (reciprocal "
                "rank fusion); needs `query`.",
            },
            "filter": {
                "type": "object",
                "description": 'Only chunks whose metadata match, e.g. {"year": {"$gte": '
                '2020}, "file": {"$in": ["a.pdf", "b.pdf"]}}: equality, $eq $ne $gt '
                '$gte $lt $lte $in $nin $exists, and $and/$or (docs/rag.md "Filters").',
            },
        },
        "required": ["collection"],
    }
    model_param = "model_id"
    output_schema: ClassVar[dict[str, Any]] = {"type": "array", "items": HIT_SCHEMA}

    def check(self, params: Mapping[str, Any], ctx: CheckContext) -> None:
        given = [k for k in ("query", "query_embedding") if k in params]
        if len(given) != 1:
            ctx.report(
                "give exactly one of 'query' (text) and 'query_embedding' (a vector)"
                + (", not both" if given else ""),
                (given[-1],) if given else (),
            )
        elif given == ["query_embedding"] and params.get("hybrid") is True:
            ctx.report("hybrid search matches the query's words: it needs 'query'", ("hybrid",))
        where = params.get("filter")
        # A filter written out in the workflow is judged now; one with templates when run.
        if isinstance(where, Mapping) and not _templated(where):
            try:
                compile_filter(where)
            except InvalidRequest as exc:
                ctx.report(exc.message, ("filter",))

    async def run(self, params: dict[str, Any], ctx: StepContext, prepared: Any = None) -> Any:
        # Here, not at the top: the RAG service needs numpy (the server extra), and
        # validation loads this module in the core install.
        from engine.rag.service import hit_json

        rag = ctx.rag
        hits = await rag.search(
            params["collection"],
            query=params.get("query"),
            vector=params.get("query_embedding"),
            embedding_model=params.get("model_id"),
            top_k=params.get("top_k", DEFAULT_TOP_K),
            threshold=params.get("similarity_threshold", DEFAULT_THRESHOLD),
            hybrid=params.get("hybrid", False),
            metadata_filter=params.get("filter"),
        )
        return [hit_json(hit) for hit in hits]


def _templated(value: Any) -> bool:
    if isinstance(value, Mapping):
        return any(_templated(k) or _templated(v) for k, v in value.items())
    if isinstance(value, list):
        return any(_templated(v) for v in value)
    return is_template(value)
