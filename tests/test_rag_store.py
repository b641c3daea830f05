"""engine.rag.store against real SQLite files and the real sqlite-vec extension."""

from __future__ import annotations

import os
import selectors
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import apsw
import numpy as np
import pytest
from rag_store_helpers import (
    MODEL,
    assert_index_agrees,
    index_sources,
    ingest,
    make_documents,
    sqlite_generation,
    unit_vectors,
)
from structlog.testing import capture_logs

from engine.errors import InvalidRequest, NotFound
from engine.rag.exact_index import EXACT, HNSW
from engine.rag.store import MAX_K, RagStore, fts_expression
from engine.rag.types import Chunk, NewDocument
from engine.store import Store

DIM = 64
REPO = Path(__file__).resolve().parent.parent
CHILD_READY_TIMEOUT_S = 120.0


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "fusion.sqlite3"


@pytest.fixture
def rag(db: Path) -> Iterator[RagStore]:
    with Store(db) as store:
        yield RagStore(store)


def rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def assert_consistent(rag: RagStore, *collections: str) -> None:
    """Every collection's chunks have exactly one FTS row and one vector row, no orphans
    anywhere, and the FTS index matches its content table."""
    chunks = 0
    for name in collections:
        counts = rag.counts(name)
        assert counts["chunks"] == counts["fts_rows"] == counts["vector_rows"], counts
        assert counts["documents"] == rag.collection(name).document_count
        chunks += counts["chunks"]
    totals = rag.totals()
    assert totals["collections"] == len(collections)
    assert totals["chunks"] == totals["fts_rows"] == totals["vector_rows"] == chunks, totals
    conn = rag._store.connection()
    conn.execute("INSERT INTO chunks_fts (chunks_fts) VALUES ('integrity-check')")


def snapshot(rag: RagStore, name: str) -> tuple[object, ...]:
    """Everything observable about a collection, to compare before and after."""
    info = rag.collection(name)
    rows = rag._store.query(
        "SELECT id, chunk_id, text FROM chunks WHERE collection_id ="
        " (SELECT id FROM collections WHERE name = ?) ORDER BY id",
        (name,),
    )
    return info, rag.counts(name), rag.totals(), rag.documents(name), rows


def rowids_of_document(rag: RagStore, document_id: str) -> set[int]:
    rows = rag._store.query(
        "SELECT c.id FROM chunks c JOIN documents d ON d.id = c.document_id"
        " WHERE d.document_id = ?",
        (document_id,),
    )
    return {row[0] for row in rows}


def rowids_of(rag: RagStore, name: str) -> set[int]:
    rows = rag._store.query(
        "SELECT c.id FROM chunks c JOIN collections k ON k.id = c.collection_id WHERE k.name = ?",
        (name,),
    )
    return {row[0] for row in rows}


# -- vector search ----------------------------------------------------------------------------


def test_knn_matches_numpy_exact_search(rag: RagStore) -> None:
    docs = make_documents(rng(1), prefix="a", documents=20, chunks=50, dimension=DIM)
    ingest(rag, "a", docs, DIM)
    rows = rag._store.query("SELECT id, chunk_id FROM chunks ORDER BY id")
    rowid_of = {chunk_id: rowid for rowid, chunk_id in rows}
    rowids = np.array(
        [rowid_of[f"{d.document_id}_chunk_{c.index}"] for d in docs for c in d.chunks]
    )
    matrix = np.array([v for d in docs for v in d.vectors], dtype=np.float64)
    for query in unit_vectors(rng(2), 20, DIM):
        similarities = matrix @ query
        exact = np.argsort(-similarities)[:10]
        got = rag.knn("a", query.tolist(), 10)
        assert [rowid for rowid, _ in got] == rowids[exact].tolist()
        np.testing.assert_allclose([s for _, s in got], similarities[exact], atol=1e-5)


def test_knn_normalises_vectors_and_query(rag: RagStore) -> None:
    docs = make_documents(rng(3), prefix="n", documents=1, chunks=5, dimension=DIM)
    scaled = [replace(docs[0], vectors=[[x * 7 for x in v] for v in docs[0].vectors])]
    ingest(rag, "n", scaled, DIM)
    query = [x * 0.01 for x in docs[0].vectors[2]]
    (rowid, similarity), *_ = rag.knn("n", query, 3)
    assert similarity == pytest.approx(1.0, abs=1e-5)
    assert rag.hits([rowid], {rowid: similarity})[0].chunk_id == "n-doc-0_chunk_2"


def test_knn_partition_never_returns_other_collections(rag: RagStore) -> None:
    a = make_documents(rng(4), prefix="a", documents=5, chunks=20, dimension=DIM)
    b = make_documents(rng(5), prefix="b", documents=5, chunks=20, dimension=DIM)
    ingest(rag, "a", a, DIM)
    ingest(rag, "b", b, DIM)
    a_rowids, b_rowids = rowids_of(rag, "a"), rowids_of(rag, "b")
    for vector in [v for d in b for v in d.vectors][:20]:
        got = rag.knn("a", vector, 50)
        assert len(got) == 50
        assert {rowid for rowid, _ in got} <= a_rowids
        # The exact vector is B's best match but never leaks into A's results.
        assert rag.knn("b", vector, 1)[0][0] in b_rowids
    assert {rowid for rowid, _ in rag.knn("a", a[0].vectors[0], MAX_K * 3)} == a_rowids


def test_knn_errors(rag: RagStore) -> None:
    ingest(rag, "a", make_documents(rng(6), prefix="a", documents=1, chunks=3, dimension=DIM), DIM)
    with pytest.raises(NotFound) as missing:
        rag.knn("nope", [1.0] * DIM, 5)
    assert (missing.value.code, missing.value.param) == ("collection_not_found", "collection")
    with pytest.raises(InvalidRequest) as wrong:
        rag.knn("a", [1.0] * (DIM + 1), 5)
    assert wrong.value.code == "dimension_mismatch"
    with pytest.raises(InvalidRequest):
        rag.knn("a", [0.0] * DIM, 5)
    assert rag.knn("a", [1.0] * DIM, 0) == []


# -- lexical search ---------------------------------------------------------------------------


def text_document(document_id: str, texts: list[str], seed: int) -> NewDocument:
    return NewDocument(
        document_id=document_id,
        filename=f"{document_id}.md",
        content_hash=document_id,
        format="markdown",
        title=None,
        metadata={},
        chunks=[Chunk(index=i, text=t, token_count=len(t.split())) for i, t in enumerate(texts)],
        vectors=unit_vectors(rng(seed), len(texts), DIM).tolist(),
    )


def test_lexical_ranks_rare_term_first(rag: RagStore) -> None:
    docs = make_documents(rng(7), prefix="lex", documents=10, chunks=20, dimension=DIM)
    rare = text_document(
        "rare",
        [
            "the garden river and the apple market",
            "Photosynthesis converts light into chemical energy in the garden",
        ],
        8,
    )
    ingest(rag, "lex", [*docs, rare], DIM)
    # Another collection holding the rare word must not appear.
    ingest(rag, "other", [text_document("o", ["photosynthesis photosynthesis"], 9)], DIM)
    got = rag.lexical("lex", "How does PHOTOSYNTHESIS work in a garden?", 10)
    hits = rag.hits([rowid for rowid, _ in got], dict(got))
    assert hits[0].chunk_id == "rare_chunk_1"
    assert all(hit.document_id != "o" for hit in hits)
    scores = [score for _, score in got]
    assert scores == sorted(scores, reverse=True)
    # Porter stemming: an inflected form finds the chunk too.
    assert rag.lexical("lex", "converting", 1)[0][0] == got[0][0]


@pytest.mark.parametrize(
    "query",
    [
        '"foo',
        "a AND",
        "AND OR NOT",
        "NEAR(",
        "text:garden",
        "garden*",
        "^apple",
        "(((",
        "'; DROP TABLE chunks; --",
        '""""',
        "-",
        "",
        "   ",
        "ça garçon naïve 東京",
        "x" * 5000,
        " ".join(f"w{i}" for i in range(1000)),
    ],
)
def test_lexical_survives_hostile_queries(rag: RagStore, query: str) -> None:
    ingest(rag, "h", [text_document("h", ["apple garden naive garcon", "foo and a"], 10)], DIM)
    got = rag.lexical("h", query, 5)
    assert isinstance(got, list)
    assert rag.totals()["chunks"] == 2


def test_fts_expression_quotes_every_word() -> None:
    assert fts_expression('"foo NEAR bar') == '"foo" OR "near" OR "bar"'
    assert fts_expression("  --  ") is None
    assert fts_expression("a a A") == '"a"'  # only function words: they are kept


def test_fts_expression_drops_function_words() -> None:
    assert fts_expression("How does the sourdough rise?") == '"sourdough" OR "rise"'


# -- ingest ----------------------------------------------------------------------------------


def test_ingest_returns_ids_and_records_everything(rag: RagStore) -> None:
    docs = make_documents(
        rng(11), prefix="r", documents=3, chunks=4, dimension=DIM, metadata={"team": "x"}
    )
    progress: list[tuple[int, int]] = []
    ids = ingest(
        rag, "r", docs, DIM, on_progress=lambda done, total: progress.append((done, total))
    )
    assert ids == ["r-doc-0", "r-doc-1", "r-doc-2"]
    assert progress == [(1, 3), (2, 3), (3, 3)]
    info = rag.collection("r")
    assert (info.embedding_model, info.dimension, info.chunk_size, info.overlap) == (
        MODEL,
        DIM,
        512,
        64,
    )
    assert (info.document_count, info.chunk_count, info.metadata) == (3, 12, {"source": "tests"})
    assert info.created_at <= info.updated_at
    assert [c.name for c in rag.list_collections()] == ["r"]
    documents = rag.documents("r")
    assert [(d.document_id, d.chunk_count, d.metadata) for d in documents] == [
        (f"r-doc-{i}", 4, {"team": "x"}) for i in range(3)
    ]
    rowid, similarity = rag.knn("r", docs[1].vectors[3], 1)[0]
    (hit,) = rag.hits([rowid, 10**9], {rowid: similarity})
    assert hit.chunk_id == "r-doc-1_chunk_3"
    assert hit.text == docs[1].chunks[3].text
    assert hit.score == similarity
    assert hit.metadata == {
        "file": "r-doc-1.txt",
        "page": 1,
        "heading": "Intro",
        "document_id": "r-doc-1",
        "team": "x",
    }
    assert_consistent(rag, "r")


def test_dedupe_by_hash_returns_existing_id(rag: RagStore) -> None:
    docs = make_documents(rng(12), prefix="d", documents=2, chunks=5, dimension=DIM)
    ingest(rag, "d", docs, DIM)
    before = snapshot(rag, "d")
    again = [replace(d, document_id=f"new-{i}") for i, d in enumerate(docs)]
    assert ingest(rag, "d", again, DIM) == ["d-doc-0", "d-doc-1"]
    assert snapshot(rag, "d") == before  # not even updated_at moves
    # Within one request too, and a new document alongside is stored.
    fresh = make_documents(rng(13), prefix="f", documents=1, chunks=2, dimension=DIM)
    assert ingest(rag, "d", [fresh[0], again[0], fresh[0]], DIM) == [
        "f-doc-0",
        "d-doc-0",
        "f-doc-0",
    ]
    assert rag.counts("d")["documents"] == 3
    # The same content in another collection is a separate document.
    other = [replace(docs[0], document_id="other-0")]
    assert ingest(rag, "e", other, DIM) == ["other-0"]
    assert_consistent(rag, "d", "e")


@pytest.mark.parametrize(
    ("dimension", "model", "code"),
    [(DIM * 2, MODEL, "dimension_mismatch"), (DIM, "another-model", "embedding_model_mismatch")],
)
def test_model_or_dimension_mismatch_writes_nothing(
    rag: RagStore, dimension: int, model: str, code: str
) -> None:
    ingest(rag, "m", make_documents(rng(14), prefix="m", documents=2, chunks=3, dimension=DIM), DIM)
    before = snapshot(rag, "m")
    docs = make_documents(rng(15), prefix="x", documents=2, chunks=3, dimension=dimension)
    with pytest.raises(InvalidRequest) as error:
        ingest(rag, "m", docs, dimension, embedding_model=model)
    assert error.value.code == code
    assert snapshot(rag, "m") == before
    assert_consistent(rag, "m")


def bad_third_vector(docs: list[NewDocument]) -> list[NewDocument]:
    third = docs[2]
    vectors = [*third.vectors[:1], third.vectors[1][:-1], *third.vectors[2:]]
    return [*docs[:2], replace(third, vectors=vectors), *docs[3:]]


def failing_progress(done: int, total: int) -> None:
    if done == 3:
        raise RuntimeError("boom after the third document")


def duplicate_id_in_third(docs: list[NewDocument]) -> list[NewDocument]:
    # A document id taken by the first collection: the INSERT fails inside the transaction.
    return [*docs[:2], replace(docs[2], document_id="base-doc-0"), *docs[3:]]


@pytest.mark.parametrize("target", ["base", "new"])
@pytest.mark.parametrize("failure", ["bad_vector", "raise_in_progress", "constraint"])
def test_failure_mid_ingest_leaves_collection_as_before(
    rag: RagStore, target: str, failure: str
) -> None:
    base = make_documents(rng(16), prefix="base", documents=2, chunks=4, dimension=DIM)
    ingest(rag, "base", base, DIM)
    before = snapshot(rag, "base")
    dimension = DIM if target == "base" else DIM + 8  # "new" also creates a vec0 table
    docs = make_documents(rng(17), prefix="late", documents=5, chunks=6, dimension=dimension)
    kwargs: dict[str, object] = {}
    if failure == "bad_vector":
        docs, expected = bad_third_vector(docs), InvalidRequest
    elif failure == "raise_in_progress":
        kwargs["on_progress"], expected = failing_progress, RuntimeError
    else:
        docs, expected = duplicate_id_in_third(docs), apsw.ConstraintError
    with pytest.raises(expected):
        ingest(rag, target, docs, dimension, **kwargs)
    assert snapshot(rag, "base") == before
    if target == "new":
        with pytest.raises(NotFound):
            rag.collection("new")
        assert rag._store.query("SELECT name FROM sqlite_schema WHERE name LIKE 'vec_72%'") == []
    assert_consistent(rag, "base")
    # And the store is usable afterwards: the same request without the fault succeeds.
    clean = make_documents(rng(17), prefix="late", documents=5, chunks=6, dimension=dimension)
    assert len(ingest(rag, target, clean, dimension)) == 5
    assert_consistent(rag, *sorted({"base", target}))


# -- collections and deletes ------------------------------------------------------------------


def test_deletes_keep_counts_exact(rag: RagStore) -> None:
    ingest(rag, "a", make_documents(rng(18), prefix="a", documents=4, chunks=7, dimension=DIM), DIM)
    ingest(rag, "b", make_documents(rng(19), prefix="b", documents=3, chunks=5, dimension=DIM), DIM)
    ingest(rag, "c", make_documents(rng(20), prefix="c", documents=2, chunks=3, dimension=32), 32)
    assert_consistent(rag, "a", "b", "c")
    updated = rag.collection("a").updated_at

    assert rag.delete_document("a", "a-doc-1") == 7
    assert rag.counts("a") == {"documents": 3, "chunks": 21, "fts_rows": 21, "vector_rows": 21}
    assert rag.collection("a").updated_at >= updated
    assert [d.document_id for d in rag.documents("a")] == ["a-doc-0", "a-doc-2", "a-doc-3"]
    assert_consistent(rag, "a", "b", "c")
    assert all(hit[0] in rowids_of(rag, "a") for hit in rag.knn("a", [1.0] * DIM, 100))
    assert rag.lexical("a", "a part 1", 100)  # the deleted chunks are gone from FTS too
    assert all(
        not h.chunk_id.startswith("a-doc-1_")
        for h in rag.hits([r for r, _ in rag.lexical("a", "part 1", 100)], {})
    )

    with pytest.raises(NotFound) as missing_doc:
        rag.delete_document("a", "a-doc-1")
    assert missing_doc.value.code == "document_not_found"
    with pytest.raises(NotFound) as wrong_collection:
        rag.delete_document("b", "a-doc-0")  # exists, but not in b
    assert wrong_collection.value.code == "document_not_found"
    with pytest.raises(NotFound) as missing_coll:
        rag.delete_document("zzz", "a-doc-0")
    assert missing_coll.value.code == "collection_not_found"

    assert rag.delete_collection("b") == (3, 15)
    assert [c.name for c in rag.list_collections()] == ["a", "c"]
    for call in (rag.collection, rag.documents, rag.counts, rag.delete_collection):
        with pytest.raises(NotFound) as gone:
            call("b")
        assert gone.value.code == "collection_not_found"
    assert_consistent(rag, "a", "c")

    # A collection can be recreated under the same name, even with another dimension.
    ingest(rag, "b", make_documents(rng(21), prefix="b2", documents=1, chunks=2, dimension=32), 32)
    assert rag.delete_collection("c") == (2, 6)
    assert rag.delete_collection("a") == (3, 21)
    assert_consistent(rag, "b")
    assert rag.totals() == {
        "collections": 1,
        "documents": 1,
        "chunks": 2,
        "fts_rows": 2,
        "vector_rows": 2,
    }


def test_empty_collection_queries(rag: RagStore) -> None:
    ingest(rag, "e", make_documents(rng(22), prefix="e", documents=1, chunks=2, dimension=DIM), DIM)
    rag.delete_document("e", "e-doc-0")
    assert rag.knn("e", [1.0] * DIM, 10) == []
    assert rag.lexical("e", "apple", 10) == []
    assert rag.collection("e").chunk_count == 0
    assert_consistent(rag, "e")


def test_reads_from_another_thread(rag: RagStore) -> None:
    """The service calls the store from worker threads: each gets its own connection."""
    import threading

    docs = make_documents(rng(23), prefix="t", documents=2, chunks=3, dimension=DIM)
    ingest(rag, "t", docs, DIM)
    results: list[object] = []
    thread = threading.Thread(target=lambda: results.append(rag.knn("t", docs[0].vectors[0], 1)))
    thread.start()
    thread.join(30)
    assert results == [rag.knn("t", docs[0].vectors[0], 1)]


# -- crash safety -----------------------------------------------------------------------------


def wait_for_line(process: subprocess.Popen[bytes], expected: bytes, timeout: float) -> None:
    """Read the child's stdout until `expected` arrives; bounded, no sleeping."""
    assert process.stdout is not None
    deadline = time.monotonic() + timeout
    with selectors.DefaultSelector() as selector:
        selector.register(process.stdout, selectors.EVENT_READ)
        while True:
            remaining = deadline - time.monotonic()
            assert remaining > 0, f"child did not print {expected!r} in {timeout}s"
            if not selector.select(remaining):
                continue
            line = process.stdout.readline()
            assert line, f"child exited (rc={process.wait()}) before printing {expected!r}"
            if line.strip() == expected:
                return


def kill_child(command: list[str], ready: bytes, during: Callable[[], None] | None = None) -> int:
    """Run a helper child until it prints `ready`, run `during` (while the child waits),
    SIGKILL it; returns its pid."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    child = subprocess.Popen(
        [sys.executable, str(REPO / "tests" / "rag_store_helpers.py"), *command],
        cwd=REPO,
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    try:
        wait_for_line(child, ready, CHILD_READY_TIMEOUT_S)
        if during is not None:
            during()
        child.send_signal(signal.SIGKILL)
        assert child.wait(30) == -signal.SIGKILL
    finally:
        if child.poll() is None:
            child.kill()
            child.wait(30)
    return child.pid


def index_files(db: Path) -> list[Path]:
    return sorted((db.parent / "rag-index").glob("*.usearch"))


def build_index(rag: RagStore, name: str, kind: str) -> None:
    """Make `name`'s index resident (and an HNSW graph saved) before a crash test's child."""
    rag.knn(name, [1.0] * rag.collection(name).dimension, 1)
    assert rag.index_info(name).kind == kind
    if kind == HNSW:
        rag.flush_index()
        assert [p.name for p in index_files(rag._store.path)] == [
            f"{collection_rowid(rag, name)}-{sqlite_generation(rag, name)}.usearch"
        ]


def collection_rowid(rag: RagStore, name: str) -> int:
    return int(rag._store.query("SELECT id FROM collections WHERE name = ?", (name,))[0][0])


@pytest.mark.parametrize("kind", [EXACT, HNSW])
@pytest.mark.parametrize("target", ["base", "new"])
def test_sigkill_mid_ingest_leaves_collection_as_before(db: Path, target: str, kind: str) -> None:
    with Store(db) as store:
        rag = RagStore(store)
        base = make_documents(rng(24), prefix="base", documents=3, chunks=5, dimension=384)
        ingest(rag, "base", base, 384, index_kind=kind)
        build_index(rag, "base", kind)
        before = snapshot(rag, "base")
    # Closing the last connection checkpoints and removes the WAL: whatever it holds after
    # the kill was written by the child's open transaction.
    assert not Path(f"{db}-wal").exists()

    dimension = 384 if target == "base" else 256
    uncommitted = 0

    def measure_wal() -> None:
        nonlocal uncommitted
        uncommitted = Path(f"{db}-wal").stat().st_size

    # 200 documents x 20 chunks of 384 floats: far more than the page cache, so SQLite
    # spills uncommitted pages into the WAL before the kill.
    kill_child([str(db), target, str(dimension), "200", "20"], b"mid", measure_wal)
    assert uncommitted > 1_000_000  # the transaction had really reached the disk

    with Store(db) as store:
        rag = RagStore(store)
        assert store.query("PRAGMA integrity_check") == [("ok",)]
        assert snapshot(rag, "base") == before
        if target == "new":
            with pytest.raises(NotFound):
                rag.collection("new")
            assert store.query("SELECT name FROM sqlite_schema WHERE name LIKE 'vec_256%'") == []
        assert_consistent(rag, "base")
        with capture_logs() as logs:
            assert rag.knn("base", base[1].vectors[2], 1)[0][1] == pytest.approx(1.0, abs=2e-3)
        if kind == HNSW:  # the saved graph, loaded as it is: the kill changed nothing
            assert index_sources(logs) == ["file"]
        assert_index_agrees(rag, "base", kind)
        # The database takes the same request afterwards.
        docs = make_documents(rng(25), prefix="after", documents=2, chunks=3, dimension=dimension)
        ingest(rag, target, docs, dimension)
        assert_consistent(rag, *sorted({"base", target}))
        assert_index_agrees(rag, "base", kind)
        rag.flush_index()  # as the server's shutdown: no save left pending after the test


def test_sigkill_after_commits_before_the_graph_is_saved(db: Path) -> None:
    """A process whose resident graph took committed writes dies before saving it: the next
    process brings the older file up to SQLite (or rebuilds), and serves no deleted chunk
    and misses no new one; partial files of dead writers are cleared, a live one's kept."""
    with Store(db) as store:
        rag = RagStore(store)
        # 50 chunks, of which the child changes 15: few enough to bring the saved graph up
        # to date rather than rebuild it (more than half changed means a rebuild).
        base = make_documents(rng(26), prefix="base", documents=10, chunks=5, dimension=DIM)
        ingest(rag, "base", base, DIM, index_kind=HNSW)
        build_index(rag, "base", HNSW)
        (saved,) = index_files(db)
        coll = collection_rowid(rag, "base")
        gone = rowids_of_document(rag, "base-doc-1")

    pid = kill_child(["commit", str(db), "base", str(DIM), "base-doc-1"], b"committed")

    # The child committed (SQLite moved on twice) but never saved: the file is the old one.
    assert index_files(db) == [saved]
    # What a writer killed mid-save leaves, and what a live one (this test) is writing.
    dead = saved.with_name(f"{coll}-99.usearch.{pid}.12345.partial")
    alive = saved.with_name(f"{coll}-99.usearch.{os.getpid()}.12345.partial")
    for path in (dead, alive):
        path.write_bytes(b"half a graph")

    with Store(db) as store:
        rag = RagStore(store)
        assert_consistent(rag, "base")
        assert rag.collection("base").document_count == 11
        assert sqlite_generation(rag, "base") > int(saved.stem.split("-")[1])
        with capture_logs() as logs:
            assert_index_agrees(rag, "base", HNSW)
        assert index_sources(logs) == ["file"]
        (reconciled,) = [e for e in logs if e["event"] == "rag hnsw index reconciled with sqlite"]
        assert (reconciled["added"], reconciled["removed"]) == (10, 5)
        for query in unit_vectors(rng(27), 10, DIM):
            assert not gone & {rowid for rowid, _ in rag.knn("base", query.tolist(), 30)}
        assert not dead.exists()
        assert alive.exists()
        # Patched after this process's own commits, from the reconciled graph.
        more = make_documents(rng(28), prefix="more", documents=1, chunks=4, dimension=DIM)
        ingest(rag, "base", more, DIM)
        assert_index_agrees(rag, "base", HNSW)
        rag.delete_document("base", "committed-doc-0")
        assert_index_agrees(rag, "base", HNSW)
        rag.flush_index()
        assert [p.name for p in index_files(db)] == [
            f"{coll}-{sqlite_generation(rag, 'base')}.usearch"
        ]
    # The flushed file is current: the next process agrees again, from it.
    with Store(db) as store:
        rag = RagStore(store)
        assert_index_agrees(rag, "base", HNSW)
    assert alive.exists()
    alive.unlink()
