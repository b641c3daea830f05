"""Documents with random unit vectors for the RAG store tests, and the crash-test child.

As a script (the crash test's subprocess):

    python tests/rag_store_helpers.py DB COLLECTION DIMENSION DOCUMENTS CHUNKS_PER_DOCUMENT

ingests one large request and prints "mid" once half of it is written inside the
transaction; on the last document it waits on stdin, so the transaction never commits and
the parent's SIGKILL always lands mid-transaction.
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

import numpy as np

from engine.rag.store import RagStore
from engine.rag.types import Chunk, NewDocument
from engine.store import Store

MODEL = "test-embedder"

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


if __name__ == "__main__":
    crash_child(sys.argv[1:])
