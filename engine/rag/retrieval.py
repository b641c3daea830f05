"""Retrieval: vector search over a collection, optionally reordered by a reranker.

- ``rerank=False``: the ``top_k`` nearest chunks by cosine similarity with at least
  ``threshold`` similarity.
- ``rerank=True`` with a ``rerank_model`` (a loaded ``lm``): ``4 * top_k`` candidates above
  the threshold, ordered by the model's P(yes) that the chunk answers the query.
- ``rerank=True`` without one: hybrid search; the vector candidates and the best lexical
  (FTS5 BM25) matches are fused by reciprocal rank fusion, 1 / (60 + rank) summed over both
  lists; every result still needs ``threshold`` cosine similarity.
``score`` is always the cosine similarity; ``rerank_score`` is the reranker's.

A metadata filter (``where``, engine/rag/filters.py) restricts every mode to the chunks it
matches: the vector candidates are the nearest *matching* chunks and the lexical ones the
best-matching *matching* chunks, so a filter never leaves fewer results than an unfiltered
search would over just those chunks.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import replace
from typing import TYPE_CHECKING

from engine.rag.types import Hit

if TYPE_CHECKING:  # both need the server extra (metrics, apsw); validation loads this module
    from engine.models.registry import ModelRegistry
    from engine.rag.filters import SqlFilter
    from engine.rag.store import RagStore

RRF_K = 60
CANDIDATES_PER_RESULT = 4
MAX_K = 4096
RERANK_INSTRUCTION = "Given a question, judge whether the passage helps answer it"


async def rank_by_relevance(
    models: ModelRegistry,
    model_id: str,
    query: str,
    texts: Sequence[str],
    instruction: str = RERANK_INSTRUCTION,
) -> list[tuple[int, float]]:
    """(index, relevance in [0, 1]) of each text by a language model's judgement, most
    relevant first; equal scores keep the input order."""
    if not texts:
        return []
    scores = await models.relevance(model_id, query, list(texts), instruction)
    return sorted(enumerate(scores), key=lambda pair: -pair[1])


def reciprocal_rank_fusion(rankings: Sequence[Sequence[int]], k: int = RRF_K) -> dict[int, float]:
    fused: dict[int, float] = {}
    for ranking in rankings:
        for rank, item in enumerate(ranking, start=1):
            fused[item] = fused.get(item, 0.0) + 1.0 / (k + rank)
    return fused


class Retriever:
    def __init__(self, db: RagStore, models: ModelRegistry) -> None:
        self.db = db
        self.models = models

    async def retrieve(
        self,
        collection: str,
        query: str,
        embedder: str,
        *,
        top_k: int,
        threshold: float,
        rerank: bool = False,
        rerank_model: str | None = None,
        where: SqlFilter | None = None,
    ) -> list[Hit]:
        if top_k < 1:
            return []
        vector = (await self.models.embed(embedder, [query])).vectors[0]
        if not rerank:
            return await self.by_vector(
                collection, vector, top_k=top_k, threshold=threshold, where=where
            )
        pool = min(top_k * CANDIDATES_PER_RESULT, MAX_K)
        nearest = await asyncio.to_thread(self.db.knn, collection, vector, pool, where)
        similar = {rowid: score for rowid, score in nearest if score >= threshold}
        if rerank_model:
            return await self._judged(query, rerank_model, similar, top_k)
        return await self._hybrid(collection, query, vector, nearest, pool, top_k, threshold, where)

    async def by_vector(
        self,
        collection: str,
        vector: Sequence[float],
        *,
        top_k: int,
        threshold: float,
        where: SqlFilter | None = None,
    ) -> list[Hit]:
        """The ``top_k`` chunks nearest to ``vector`` (of those ``where`` matches) with at
        least ``threshold`` cosine similarity (the vector must have the collection's
        dimension)."""
        if top_k < 1:
            return []
        nearest = await asyncio.to_thread(self.db.knn, collection, vector, min(top_k, MAX_K), where)
        similar = {rowid: score for rowid, score in nearest if score >= threshold}
        return await asyncio.to_thread(self.db.hits, list(similar), similar)

    async def _judged(
        self, query: str, model: str, similar: dict[int, float], top_k: int
    ) -> list[Hit]:
        hits = await asyncio.to_thread(self.db.hits, list(similar), similar)
        ranked = await rank_by_relevance(self.models, model, query, [h.text for h in hits])
        return [replace(hits[i], rerank_score=score) for i, score in ranked[:top_k]]

    async def _hybrid(
        self,
        collection: str,
        query: str,
        vector: list[float],
        nearest: list[tuple[int, float]],
        pool: int,
        top_k: int,
        threshold: float,
        where: SqlFilter | None,
    ) -> list[Hit]:
        lexical = await asyncio.to_thread(self.db.lexical, collection, query, pool, where)
        fused = reciprocal_rank_fusion([[r for r, _ in nearest], [r for r, _ in lexical]])
        cosine = dict(nearest)
        missing = [r for r in fused if r not in cosine]
        if missing:  # lexical-only matches: their similarity decides the threshold too
            cosine.update(
                await asyncio.to_thread(self.db.similarities, collection, missing, vector)
            )
        ranked = [
            r for r in sorted(fused, key=lambda r: -fused[r]) if cosine.get(r, -1.0) >= threshold
        ]
        return await asyncio.to_thread(self.db.hits, ranked[:top_k], cosine, fused)
