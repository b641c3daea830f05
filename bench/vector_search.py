"""Top-10 vector search latency through the RAG store (SQLite + sqlite-vec) versus numpy
exact search on the same vectors, in the same run:

- p50/p95 of `RagStore.knn(collection, query, 10)` at 10k and 100k 384-dimensional unit
  vectors, each size its own collection (partition) in one temporary database, built
  through `RagStore.ingest` in batches, one collection after the other;
- numpy exact search on the same float32 matrix (`matrix @ query`, `argpartition`);
- recall@10 of the store against numpy's exact top 10.

    .venv/bin/python bench/vector_search.py [--sizes 10000 100000] [--queries 200]

sqlite-vec scans on one thread; run with OPENBLAS_NUM_THREADS=1 for a one-thread numpy
baseline too.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from harness import machine

from engine.rag.store import RagStore
from engine.rag.types import Chunk, NewDocument
from engine.store import Store

DIMENSION = 384
K = 10
CHUNKS_PER_DOCUMENT = 100
BATCH_CHUNKS = 10_000  # chunks per ingest request (one transaction each)
WARMUP_QUERIES = 5


def unit_rows(rng: np.random.Generator, n: int) -> np.ndarray:
    matrix = rng.standard_normal((n, DIMENSION), dtype=np.float32)
    matrix /= np.linalg.norm(matrix, axis=1, keepdims=True)
    return matrix


def batch_documents(name: str, matrix: np.ndarray, start: int, stop: int) -> list[NewDocument]:
    """Documents of CHUNKS_PER_DOCUMENT chunks for rows start..stop of `matrix`."""
    documents = []
    for first in range(start, stop, CHUNKS_PER_DOCUMENT):
        rows = range(first, min(first + CHUNKS_PER_DOCUMENT, stop))
        document_id = f"{name}-{first}"
        documents.append(
            NewDocument(
                document_id=document_id,
                filename=f"{document_id}.txt",
                content_hash=document_id,
                format="text",
                title=None,
                metadata={},
                chunks=[Chunk(index=i - first, text=f"passage {i}", token_count=2) for i in rows],
                vectors=matrix[first : rows.stop].tolist(),
            )
        )
    return documents


def build(rag: RagStore, name: str, matrix: np.ndarray) -> tuple[float, np.ndarray]:
    """Ingest `matrix` as collection `name`; returns seconds taken and row -> chunk rowid."""
    started = time.perf_counter()
    for start in range(0, len(matrix), BATCH_CHUNKS):
        stop = min(start + BATCH_CHUNKS, len(matrix))
        rag.ingest(
            name,
            embedding_model="bench",
            dimension=DIMENSION,
            chunk_size=512,
            overlap=0,
            collection_metadata={},
            documents=batch_documents(name, matrix, start, stop),
        )
    seconds = time.perf_counter() - started
    rowid_of = dict(
        rag._store.query(
            "SELECT chunk_id, id FROM chunks WHERE collection_id ="
            " (SELECT id FROM collections WHERE name = ?)",
            (name,),
        )
    )
    rowids = np.array(
        [
            rowid_of[f"{name}-{i - i % CHUNKS_PER_DOCUMENT}_chunk_{i % CHUNKS_PER_DOCUMENT}"]
            for i in range(len(matrix))
        ]
    )
    return seconds, rowids


def numpy_top(matrix: np.ndarray, query: np.ndarray) -> np.ndarray:
    """Row indexes of the K most similar rows, best first (exact)."""
    similarities = matrix @ query
    top = np.argpartition(-similarities, K)[:K]
    return top[np.argsort(-similarities[top])]


def timed(fn: Callable[[np.ndarray], object], queries: np.ndarray) -> tuple[list[float], list]:
    """Per-query latencies in ms and the results, after a few untimed warm-up calls."""
    for query in queries[-WARMUP_QUERIES:]:
        fn(query)
    latencies, results = [], []
    for query in queries:
        started = time.perf_counter()
        results.append(fn(query))
        latencies.append((time.perf_counter() - started) * 1000)
    return latencies, results


def percentile(samples: list[float], q: int) -> float:
    return statistics.quantiles(samples, n=100, method="inclusive")[q - 1]


def measure(rag: RagStore, name: str, matrix: np.ndarray, queries: np.ndarray) -> None:
    build_s, rowids = build(rag, name, matrix)
    store_ms, store_results = timed(lambda q: rag.knn(name, q.tolist(), K), queries)
    numpy_ms, numpy_results = timed(lambda q: numpy_top(matrix, q), queries)
    recalls, errors = [], []
    for got, exact, query in zip(store_results, numpy_results, queries, strict=True):
        recalls.append(len({r for r, _ in got} & set(rowids[exact].tolist())) / K)
        by_rowid = dict(got)
        errors += [
            abs(by_rowid[rowids[i]] - float(matrix[i] @ query))
            for i in exact
            if rowids[i] in by_rowid
        ]
    report(len(matrix), build_s, store_ms, numpy_ms, statistics.mean(recalls), max(errors))


def report(
    n: int,
    build_s: float,
    store_ms: list[float],
    numpy_ms: list[float],
    recall: float,
    max_error: float,
) -> None:
    print(f"\n{n:,} vectors x {DIMENSION} (one collection's partition), {len(store_ms)} queries")
    print(f"  build through RagStore.ingest: {build_s:.1f} s ({n / build_s:,.0f} chunks/s)")
    for q in (50, 95):
        store, exact = percentile(store_ms, q), percentile(numpy_ms, q)
        print(
            f"  p{q} top-{K}: store {store:7.2f} ms | numpy exact {exact:6.2f} ms"
            f" | store/numpy {store / exact:5.1f}x"
        )
    print(f"  recall@{K} of the store vs numpy exact: {recall:.4f} (baseline 1.0)")
    print(f"  max |cosine(store) - cosine(numpy)|: {max_error:.2e}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = np.random.default_rng(args.seed)
    # The load average says whether other processes shared the cores during the run.
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"machine: {machine()}; load average at start {load}")
    # sqlite-vec scans on one thread; OPENBLAS_NUM_THREADS=1 makes the baseline do the same.
    threads = os.environ.get("OPENBLAS_NUM_THREADS", "default")
    print(
        f"numpy {np.__version__} (OPENBLAS_NUM_THREADS={threads}); "
        "float32 matrix @ query + argpartition, same vectors"
    )
    with tempfile.TemporaryDirectory() as tmp, Store(Path(tmp) / "bench.sqlite3") as store:
        rag = RagStore(store)
        print(f"sqlite-vec {store.ping()}; vectors unit-norm, L2 KNN with a partition key")
        for n in args.sizes:
            matrix = unit_rows(rng, n)
            queries = unit_rows(rng, args.queries)
            measure(rag, f"c{n}", matrix, queries)


if __name__ == "__main__":
    main()
