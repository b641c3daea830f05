"""Retrieval: vector search over a collection, optionally reordered by a reranker.

- ``rerank=False``: the ``top_k`` nearest chunks by cosine similarity with at least
  ``threshold`` similarity.
- ``rerank=True`` with a ``rerank_model`` (a loaded ``lm``): ``4 * top_k`` candidates above
  the threshold, ordered by the model's P(yes) that the chunk answers the query.
- ``rerank=True`` without one: hybrid search; the vector candidates and the best lexical
  (FTS5 BM25) matches are fused by reciprocal rank fusion, 1 / (60 + rank) summed over both
  lists; every result still needs ``threshold`` cosine similarity.
``score`` is always the cosine similarity; ``rerank_score`` is the reranker's.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import replace

from engine.models.registry import ModelRegistry
from engine.rag.store import RagStore
from engine.rag.types import Hit

RRF_K = 60
CANDIDATES_PER_RESULT = 4
MAX_K = 4096
RERANK_INSTRUCTION = "Given a question, judge whether the passage helps answer it"


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
    ) -> list[Hit]:
        if top_k < 1:
            return []
        vector = (await self.models.embed(embedder, [query])).vectors[0]
        pool = min(top_k * CANDIDATES_PER_RESULT if rerank else top_k, MAX_K)
        nearest = await asyncio.to_thread(self.db.knn, collection, vector, pool)
        similar = {rowid: score for rowid, score in nearest if score >= threshold}
        if not rerank:
            return await asyncio.to_thread(self.db.hits, list(similar)[:top_k], similar)
        if rerank_model:
            return await self._judged(query, rerank_model, similar, top_k)
        return await self._hybrid(
            collection, query, vector, nearest, similar, pool, top_k, threshold
        )

    async def _judged(
        self, query: str, model: str, similar: dict[int, float], top_k: int
    ) -> list[Hit]:
        hits = await asyncio.to_thread(self.db.hits, list(similar), similar)
        if not hits:
            return []
        scores = await self.models.relevance(
            model, query, [h.text for h in hits], RERANK_INSTRUCTION
        )
        ranked = sorted(zip(scores, hits, strict=True), key=lambda pair: -pair[0])
        return [replace(hit, rerank_score=score) for score, hit in ranked[:top_k]]

    async def _hybrid(
        self,
        collection: str,
        query: str,
        vector: list[float],
        nearest: list[tuple[int, float]],
        similar: dict[int, float],
        pool: int,
        top_k: int,
        threshold: float,
    ) -> list[Hit]:
        lexical = await asyncio.to_thread(self.db.lexical, collection, query, pool)
        fused = reciprocal_rank_fusion([[r for r, _ in nearest], [r for r, _ in lexical]])
        missing = [r for r in fused if r not in dict(nearest)]
        cosine = dict(nearest)
        if missing:  # lexical-only matches: their similarity decides the threshold too
            cosine.update(
                await asyncio.to_thread(self.db.similarities, collection, missing, vector)
            )
        ranked = [
            r for r in sorted(fused, key=lambda r: -fused[r]) if cosine.get(r, -1.0) >= threshold
        ]
        hits = await asyncio.to_thread(self.db.hits, ranked[:top_k], cosine)
        return [replace(hit, rerank_score=fused[r]) for r, hit in zip(ranked, hits, strict=False)]
