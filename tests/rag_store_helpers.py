"""Documents with random unit vectors for the RAG store tests, a check that a collection's
search index agrees with SQLite, and the crash tests' children.

As a script (the crash tests' subprocess):

    python tests/rag_store_helpers.py DB COLLECTION DIMENSION DOCUMENTS CHUNKS_PER_DOCUMENT

ingests one large request and prints "mid" once half of it is written inside the
transaction; on the last document it waits on stdin, so the transaction never commits and
the parent's SIGKILL always lands mid-transaction.

    python tests/rag_store_helpers.py commit DB COLLECTION DIMENSION DELETE_DOCUMENT_ID

searches the (HNSW) collection, so its graph is resident, with saves of the patched graph
put off for an hour; then commits an ingest and the delete of one document, prints
"committed" and waits on stdin: the parent's SIGKILL lands after the commits and before any
save, so the graph file on disk is older than SQLite.
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path
from typing import Any

import numpy as np

from engine.rag.exact_index import HNSW, SQLITE_VEC
from engine.rag.store import RagStore, _vec_table
from engine.rag.types import Chunk, NewDocument
from engine.store import Store

MODEL = "test-embedder"
# Scores from the exact matrix and sqlite-vec (float32), and from the graph (f16 vectors).
EXACT_TOLERANCE = 1e-5
HNSW_TOLERANCE = 1e-3
# Saves of a patched graph put off past any test's end: the file stays as it was.
NEVER_SAVE_S = 3600.0

# Common words, so a rare word in a test chunk stands out to BM25.
WORDS = [
    *("apple", "river", "stone", "cloud", "engine", "garden", "silver", "window", "forest"),
    *("market", "candle", "harbor", "lantern", "meadow", "copper", "violin", "desert"),
    *("signal", "orchard", "bridge"),
]


def unit_vectors(rng: np.random.Generator, n: int, dimension: int) -> np.ndarray:
    matrix = rng.normal(size=(n, dimension))
    return matrix / np.linalg.norm(matrix, axis=1, keepdims=True)


def vector_document(name: str, rows: np.ndarray) -> NewDocument:
    """A document of one chunk per row of `rows` (unit vectors the test chose)."""
    return NewDocument(
        document_id=name,
        filename=f"{name}.txt",
        content_hash=name,
        format="text",
        title=None,
        metadata={},
        chunks=[
            Chunk(index=i, text=f"{name} passage {i}", token_count=3) for i in range(len(rows))
        ],
        vectors=rows,
    )


def make_documents(
    rng: np.random.Generator,
    *,
    prefix: str,
    documents: int,
    chunks: int,
    dimension: int,
    metadata: dict[str, object] | None = None,
) -> list[NewDocument]:
    """`documents` documents of `chunks` chunks each, with distinct content hashes."""
    result = []
    for d in range(documents):
        document_id = f"{prefix}-doc-{d}"
        texts = [
            " ".join(rng.choice(WORDS, size=12)) + f" {prefix} part {d} {c}" for c in range(chunks)
        ]
        result.append(
            NewDocument(
                document_id=document_id,
                filename=f"{document_id}.txt",
                content_hash=hashlib.sha256("\n".join(texts).encode()).hexdigest(),
                format="text",
                title=None,
                metadata=dict(metadata or {}),
                chunks=[
                    Chunk(index=c, text=t, token_count=len(t.split()), page=1, heading="Intro")
                    for c, t in enumerate(texts)
                ],
                vectors=unit_vectors(rng, chunks, dimension).tolist(),
            )
        )
    return result


def ingest(
    rag: RagStore, collection: str, documents: list[NewDocument], dimension: int, **kwargs: object
) -> list[str]:
    return rag.ingest(
        collection,
        embedding_model=str(kwargs.pop("embedding_model", MODEL)),
        dimension=dimension,
        chunk_size=512,
        overlap=64,
        collection_metadata={"source": "tests"},
        documents=documents,
        **kwargs,  # type: ignore[arg-type]
    )


def sqlite_vectors(rag: RagStore, name: str) -> tuple[np.ndarray, np.ndarray]:
    """The collection's chunk rowids (ascending) and unit vectors as SQLite stores them,
    read straight from its vec0 table: the truth any index must agree with."""
    ((collection_id, dimension, chunks),) = rag._store.query(
        "SELECT id, dimension, (SELECT count(*) FROM chunks WHERE collection_id = c.id)"
        " FROM collections c WHERE name = ?",
        (name,),
    )
    rows = rag._store.query(
        f"SELECT chunk_rowid, embedding FROM {_vec_table(dimension)}"
        " WHERE collection_id = ? ORDER BY chunk_rowid",
        (collection_id,),
    )
    assert len(rows) == chunks  # one vector per chunk
    ids = np.array([rowid for rowid, _ in rows], dtype=np.int64)
    matrix = np.array([np.frombuffer(blob, dtype="<f4") for _, blob in rows], dtype=np.float64)
    return ids, matrix.reshape(len(rows), dimension)


def index_sources(logs: list[dict[str, Any]], kind: str = HNSW) -> list[object]:
    """Where each index of `kind` built in `logs` came from: "sqlite" (built), "file" (a
    saved graph, brought up to date) or "memory" (a stale resident graph, the same)."""
    return [
        e["source"] for e in logs if e["event"] == "rag vector index built" and e["kind"] == kind
    ]


def sqlite_generation(rag: RagStore, name: str) -> int:
    rows = rag._store.query(
        "SELECT g.generation FROM rag_generations g JOIN collections c"
        " ON c.id = g.collection_id WHERE c.name = ?",
        (name,),
    )
    return int(rows[0][0]) if rows else 0


def assert_same_top(
    got: list[tuple[int, float]],
    ids: np.ndarray,
    matrix: np.ndarray,
    query: np.ndarray,
    k: int,
    tolerance: float,
) -> None:
    """`got` is the exact top-`k` of `query` over (ids, matrix) by numpy, best first, equal
    scores in rowid order. Above float32 tolerance (the graph's f16 vectors), two chunks
    whose scores differ by less than `tolerance` may swap places: each rank must still
    hold a chunk as similar as the exact search's chunk at that rank."""
    truth = matrix @ (query / np.linalg.norm(query))
    order = np.lexsort((ids, -truth))[: min(k, len(ids))]
    by_rowid = dict(zip(ids.tolist(), truth.tolist(), strict=True))
    assert len(got) == len(order)
    assert len({rowid for rowid, _ in got}) == len(got)
    for (rowid, score), expected in zip(got, order, strict=True):
        assert rowid in by_rowid, f"rowid {rowid} is not in SQLite"
        assert abs(score - by_rowid[rowid]) <= tolerance, (rowid, score, by_rowid[rowid])
        assert abs(by_rowid[rowid] - truth[expected]) <= tolerance, (rowid, int(ids[expected]))
    if tolerance <= EXACT_TOLERANCE:
        assert [rowid for rowid, _ in got] == ids[order].tolist()


def assert_index_agrees(
    rag: RagStore, name: str, kind: str, *, queries: int = 20, k: int = 10, seed: int = 0
) -> None:
    """`rag` searches `name` with an index of `kind` (EXACT, HNSW or SQLITE_VEC) at SQLite's
    current generation holding every chunk, and its top-`k` for random queries equals a
    numpy exact search over the vectors SQLite holds."""
    ids, matrix = sqlite_vectors(rag, name)
    tolerance = HNSW_TOLERANCE if kind == HNSW else EXACT_TOLERANCE
    for query in unit_vectors(np.random.default_rng(seed), queries, matrix.shape[1]):
        assert_same_top(rag.knn(name, query.tolist(), k), ids, matrix, query, k, tolerance)
    info = rag.index_info(name)
    vectors = 0 if kind == SQLITE_VEC else len(ids)
    assert (info.kind, info.vectors, info.generation) == (
        kind,
        vectors,
        sqlite_generation(rag, name),
    ), info


def crash_child(argv: list[str]) -> None:
    db, collection, dimension, n_docs, n_chunks = argv
    documents = make_documents(
        np.random.default_rng(99),
        prefix="crash",
        documents=int(n_docs),
        chunks=int(n_chunks),
        dimension=int(dimension),
    )

    def progress(done: int, total: int) -> None:
        if done == total // 2:
            sys.stdout.write("mid\n")
            sys.stdout.flush()
        if done == total:
            sys.stdin.readline()  # hold the transaction open until the parent kills us

    with Store(Path(db)) as store:
        ingest(RagStore(store), collection, documents, int(dimension), on_progress=progress)
    sys.stdout.write("committed\n")  # the test fails if it ever reads this


def committed_child(argv: list[str]) -> None:
    db, collection, dimension, gone = argv
    documents = make_documents(
        np.random.default_rng(98),
        prefix="committed",
        documents=2,
        chunks=5,
        dimension=int(dimension),
    )
    with Store(Path(db)) as store:
        rag = RagStore(store, hnsw_save_delay_s=NEVER_SAVE_S)
        rag.knn(collection, unit_vectors(np.random.default_rng(97), 1, int(dimension))[0], 5)
        assert rag.index_info(collection).kind == HNSW  # resident before the writes
        ingest(rag, collection, documents, int(dimension))
        rag.delete_document(collection, gone)
        assert rag.index_info(collection).kind == HNSW  # patched in memory, not dropped
        sys.stdout.write("committed\n")
        sys.stdout.flush()
        sys.stdin.readline()  # until the parent kills us, before any save


if __name__ == "__main__":
    if sys.argv[1] == "commit":
        committed_child(sys.argv[2:])
    else:
        crash_child(sys.argv[1:])
