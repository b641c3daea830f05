"""Top-10 vector search latency through the RAG store versus numpy exact search on the same
vectors, in the same run (issue #15's goal: ours within 1.3x of numpy, recall@10 = 1.0):

- p50/p95 of `RagStore.knn(collection, query, 10)`, the function retrieval calls, at 10k and
  100k 384-dimensional unit vectors, each size its own collection in one temporary
  database, built through `RagStore.ingest` in batches. The store searches its in-memory
  matrix (engine/rag/exact_index.py); the matrix is built by the first (warm-up) query,
  whose time is reported on its own;
- the same store with `index_max_bytes=0`, i.e. sqlite-vec's scan, for reference;
- numpy exact search on the same float32 matrix (`matrix @ query`, `argpartition`);
- recall@10 of the store against numpy's exact top 10;
- with `--hnsw N` (default 1M; 0 skips): a collection of N vectors with `index: hnsw`
  (engine/rag/hnsw_index.py): p50 top-10 and recall@10 against numpy exact search, the
  graph's build time (read from SQLite, build, save), its load time from the saved file on
  a "restart", its memory and file size. Its vectors are `--hnsw-data clustered` by
  default: 2,000 cluster centres in a 48-dimensional subspace plus isotropic noise, tuned
  so a query's best cosine is ~0.54 and its 10th ~0.45, as with MiniLM on a real corpus
  (synthetic, not real embeddings). `random` (uniform on the sphere, as the exact bench
  uses) is the worst case for any graph index: no neighbourhood structure, every cosine
  near 0; recall@10 at ef 128 measured 0.42 at 20k vectors there.

    .venv/bin/python bench/vector_search.py [--sizes 10000 100000] [--queries 200]
        [--hnsw 1000000] [--json P]

sqlite-vec scans on one thread; run with OPENBLAS_NUM_THREADS=1 for one-thread matrix
products in both the store and the baseline.
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
from harness import Goal, Row, add_json_option, machine, write_rows

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


class Clustered:
    """Embedding-like unit vectors (see the module doc); data and queries from one draw
    of centres and projection, so queries fall near the data as real ones do."""

    SUBSPACE = 48
    CENTRES = 2_000

    def __init__(self, rng: np.random.Generator) -> None:
        self.rng = rng
        self.centres = rng.standard_normal((self.CENTRES, self.SUBSPACE), dtype=np.float32)
        self.projection = rng.standard_normal((self.SUBSPACE, DIMENSION), dtype=np.float32)

    def rows(self, n: int) -> np.ndarray:
        out = np.empty((n, DIMENSION), dtype=np.float32)
        for start in range(0, n, 100_000):  # bounded temporaries at a million rows
            m = min(100_000, n - start)
            picked = self.centres[self.rng.integers(0, self.CENTRES, m)]
            z = picked + self.rng.standard_normal((m, self.SUBSPACE), dtype=np.float32)
            x = z @ self.projection + 5.0 * self.rng.standard_normal((m, DIMENSION), np.float32)
            out[start : start + m] = x / np.linalg.norm(x, axis=1, keepdims=True)
        return out


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


def build(
    rag: RagStore, name: str, matrix: np.ndarray, index_kind: str = "auto"
) -> tuple[float, np.ndarray]:
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
            index_kind=index_kind,
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


def timed(
    fns: list[Callable[[np.ndarray], object]], queries: np.ndarray, rounds: int = 2
) -> list[tuple[list[float], list]]:
    """Per-query latencies in ms and the results (of the first round) of each function.

    Each function runs over all queries in turn, after a few untimed warm-up calls, so it
    meets the cache as it leaves it; the order reverses every round, so a slow spell of the
    machine (other processes, clock frequency) falls on all of them alike."""
    out: list[tuple[list[float], list]] = [([], []) for _ in fns]
    for round_ in range(rounds):
        order = list(zip(fns, out, strict=True))
        for fn, (latencies, results) in order if round_ % 2 == 0 else order[::-1]:
            for query in queries[-WARMUP_QUERIES:]:
                fn(query)
            for query in queries:
                started = time.perf_counter()
                result = fn(query)
                latencies.append((time.perf_counter() - started) * 1000)
                if round_ == 0:
                    results.append(result)
    return out


NUMPY_EXACT = "numpy matrix @ query + argpartition"


def percentile(samples: list[float], q: int) -> float:
    return statistics.quantiles(samples, n=100, method="inclusive")[q - 1]


def quality(
    results: list[list[tuple[int, float]]],
    exact: list[np.ndarray],
    rowids: np.ndarray,
    matrix: np.ndarray,
    queries: np.ndarray,
) -> tuple[float, float]:
    """Mean recall@K against numpy's exact top K, and the largest cosine difference."""
    recalls, errors = [], []
    for got, top, query in zip(results, exact, queries, strict=True):
        recalls.append(len({r for r, _ in got} & set(rowids[top].tolist())) / K)
        by_rowid = dict(got)
        errors += [
            abs(by_rowid[rowids[i]] - float(matrix[i] @ query))
            for i in top
            if rowids[i] in by_rowid
        ]
    return statistics.mean(recalls), max(errors)


def measure(store: Store, name: str, matrix: np.ndarray, queries: np.ndarray) -> list[Row]:
    rag, scan = RagStore(store), RagStore(store, index_max_bytes=0)
    build_s, rowids = build(rag, name, matrix)
    first = time.perf_counter()
    rag.knn(name, queries[0].tolist(), K)  # builds the matrix from SQLite
    first_ms = (time.perf_counter() - first) * 1000
    # The API hands the store a list of floats, so converting the query is part of our path.
    (store_ms, store_results), (numpy_ms, numpy_results) = timed(
        [lambda q: rag.knn(name, q.tolist(), K), lambda q: numpy_top(matrix, q)], queries
    )
    ((scan_ms, scan_results),) = timed([lambda q: scan.knn(name, q.tolist(), K)], queries, 1)
    recall, max_error = quality(store_results, numpy_results, rowids, matrix, queries)
    scan_recall, _ = quality(scan_results, numpy_results, rowids, matrix, queries)
    n = len(matrix)
    info = rag.index_info(name)
    print(f"\n{n:,} vectors x {DIMENSION} (one collection), {len(queries)} queries x 2 rounds")
    print(f"  build through RagStore.ingest: {build_s:.1f} s ({n / build_s:,.0f} chunks/s)")
    print(
        f"  first query (reads the matrix from SQLite): {first_ms:.0f} ms;"
        f" index {info.kind}, {info.bytes / 2**20:.1f} MiB"
    )
    for q in (50, 95):
        ours, vec, exact = (percentile(ms, q) for ms in (store_ms, scan_ms, numpy_ms))
        print(
            f"  p{q} top-{K}: store {ours:7.3f} ms | numpy exact {exact:7.3f} ms"
            f" | store/numpy {ours / exact:5.2f}x | sqlite-vec scan {vec:7.2f} ms"
        )
    print(f"  recall@{K} vs numpy exact: store {recall:.4f}, sqlite-vec {scan_recall:.4f}")
    print(f"  max |cosine(store) - cosine(numpy)|: {max_error:.2e}")
    size = f"{n // 1000}k x {DIMENSION}"
    return [
        *search_rows("", size, store_ms, numpy_ms, recall, Goal("<=", 1.3), 1.0),
        Row(
            bench="vector_search",
            figure=f"top-{K} p50 at {size}, sqlite-vec fallback",
            ours=percentile(scan_ms, 50),
            unit="ms",
            baseline=percentile(numpy_ms, 50),
            baseline_name=NUMPY_EXACT,
        ),
    ]


def search_rows(
    prefix: str,
    size: str,
    store_ms: list[float],
    numpy_ms: list[float],
    recall: float,
    latency_goal: Goal,
    min_recall: float,
) -> list[Row]:
    """The p50 top-K and recall@K rows of one index against numpy exact search."""
    return [
        Row(
            bench="vector_search",
            figure=f"{prefix}top-{K} p50 at {size}",
            ours=percentile(store_ms, 50),
            unit="ms",
            baseline=percentile(numpy_ms, 50),
            baseline_name=NUMPY_EXACT,
            goal=latency_goal,
        ),
        Row(
            bench="vector_search",
            figure=f"{prefix}recall@{K} at {size}",
            ours=recall,
            baseline=1.0,
            baseline_name="numpy exact",
            goal=Goal(">=", min_recall, "ours"),
        ),
    ]


def measure_hnsw(store: Store, name: str, matrix: np.ndarray, queries: np.ndarray) -> list[Row]:
    # Bounds out of the way: this measures the graph, not the memory policy.
    rag = RagStore(store, index_max_bytes=1 << 40)
    ingest_s, rowids = build(rag, name, matrix, index_kind="hnsw")
    rss_before = _rss_mib()
    started = time.perf_counter()
    rag.knn(name, queries[0].tolist(), K)  # reads SQLite, builds the graph, saves it
    build_s = time.perf_counter() - started
    rss_after = _rss_mib()
    info = rag.index_info(name)
    files = list((Path(store.path).parent / "rag-index").glob("*.usearch"))
    file_mib = sum(f.stat().st_size for f in files) / 2**20
    reloaded = RagStore(store, index_max_bytes=1 << 40)
    started = time.perf_counter()
    reloaded.knn(name, queries[0].tolist(), K)  # a restart: loads the saved graph
    load_s = time.perf_counter() - started
    (store_ms, store_results), (numpy_ms, numpy_results) = timed(
        [lambda q: rag.knn(name, q.tolist(), K), lambda q: numpy_top(matrix, q)], queries
    )
    recall, max_error = quality(store_results, numpy_results, rowids, matrix, queries)
    n = len(matrix)
    print(f"HNSW: {n:,} vectors x {DIMENSION} (index: hnsw), {len(queries)} queries x 2 rounds")
    print(f"  ingest through RagStore.ingest: {ingest_s:.1f} s")
    print(
        f"  graph build (SQLite read + build + save, first query): {build_s:.1f} s;"
        f" reload from its file (restart): {load_s:.2f} s"
    )
    print(
        f"  memory: usearch {info.bytes / 2**20:.0f} MiB (process RSS +{rss_after - rss_before:.0f}"
        f" MiB over the build); file {file_mib:.0f} MiB"
    )
    for q in (50, 95):
        ours, exact = percentile(store_ms, q), percentile(numpy_ms, q)
        print(f"  p{q} top-{K}: store (hnsw) {ours:7.3f} ms | numpy exact {exact:7.3f} ms")
    print(f"  recall@{K} vs numpy exact: {recall:.4f}; max |cosine error| {max_error:.2e}")
    size = f"{n // 1000}k x {DIMENSION}" if n < 1_000_000 else f"{n / 1e6:g}M x {DIMENSION}"
    return [
        *search_rows("hnsw ", size, store_ms, numpy_ms, recall, Goal("<=", 5.0, "ours"), 0.95),
        Row(
            bench="vector_search",
            figure=f"hnsw build at {size}",
            ours=build_s,
            unit="s",
            baseline=ingest_s,
            baseline_name="ingest of the same vectors into SQLite",
        ),
        Row(
            bench="vector_search",
            figure=f"hnsw memory at {size}",
            ours=info.bytes / 2**20,
            unit="MiB",
            baseline=matrix.nbytes / 2**20,
            baseline_name="float32 matrix (exact index)",
        ),
    ]


def _rss_mib() -> float:
    """The process's resident memory now (Linux), in MiB."""
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument(
        "--hnsw", type=int, default=1_000_000, help="vectors in the HNSW collection; 0: skip"
    )
    parser.add_argument("--hnsw-data", choices=["clustered", "random"], default="clustered")
    parser.add_argument("--seed", type=int, default=0)
    add_json_option(parser)
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
    rows: list[Row] = []
    with tempfile.TemporaryDirectory() as tmp, Store(Path(tmp) / "bench.sqlite3") as store:
        print(f"sqlite-vec {store.ping()}; vectors unit-norm, L2 KNN with a partition key")
        for n in args.sizes:
            matrix = unit_rows(rng, n)
            queries = unit_rows(rng, args.queries)
            rows += measure(store, f"c{n}", matrix, queries)
        if args.hnsw:
            if args.hnsw_data == "clustered":
                clustered = Clustered(rng)
                matrix, queries = clustered.rows(args.hnsw), clustered.rows(args.queries)
            else:
                matrix, queries = unit_rows(rng, args.hnsw), unit_rows(rng, args.queries)
            print(f"\nHNSW vectors: {args.hnsw_data}")
            rows += measure_hnsw(store, f"h{args.hnsw}", matrix, queries)
    write_rows(args.json, rows)


if __name__ == "__main__":
    main()
