"""Exact vector search from a resident matrix (engine/rag/exact_index.py) against the
sqlite-vec path on the same real database: same chunks, order and scores; never a deleted
chunk, whoever deleted it; the memory bound falls back to sqlite-vec. Vector and hybrid
search give the same answers on every index kind (matrix, HNSW graph, sqlite-vec)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from rag_store_helpers import HNSW_TOLERANCE, assert_index_agrees, vector_document
from serverutil import serve_app
from step_helpers import start_engine

from engine.config import Settings
from engine.rag.exact_index import EXACT, HNSW, SQLITE_VEC, ExactIndex, Snapshot
from engine.rag.service import Upload
from engine.rag.store import RagStore
from engine.rag.types import Hit, NewDocument
from engine.store import Store
from server.app import create_app

DIMENSION = 24
SCORE_TOLERANCE = 1e-6  # float32 dot product versus sqlite-vec's float32 L2 distance


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    with Store(tmp_path / "rag.sqlite3") as opened:
        yield opened


def ingest(
    rag: RagStore, collection: str, documents: list[NewDocument], index_kind: str = "auto"
) -> None:
    rag.ingest(
        collection,
        embedding_model="test",
        dimension=DIMENSION,
        chunk_size=64,
        overlap=0,
        collection_metadata={},
        documents=documents,
        index_kind=index_kind,
    )


def fill(
    rag: RagStore, collection: str, docs: int, per_doc: int, seed: int, index_kind: str = "auto"
) -> None:
    rng = np.random.default_rng(seed)
    ingest(
        rag,
        collection,
        [
            vector_document(f"{collection}-{seed}-{d}", rng.standard_normal((per_doc, DIMENSION)))
            for d in range(docs)
        ],
        index_kind,
    )


def queries(n: int, seed: int = 99) -> list[list[float]]:
    return np.random.default_rng(seed).standard_normal((n, DIMENSION)).tolist()


def assert_same(got: list[tuple[int, float]], expected: list[tuple[int, float]]) -> None:
    assert [rowid for rowid, _ in got] == [rowid for rowid, _ in expected]
    for (_, a), (_, b) in zip(got, expected, strict=True):
        assert a == pytest.approx(b, abs=SCORE_TOLERANCE)


def test_exact_search_matches_sqlite_vec(store: Store) -> None:
    exact, vec = RagStore(store), RagStore(store, index_max_bytes=0)
    fill(exact, "a", docs=6, per_doc=50, seed=1)
    fill(exact, "b", docs=2, per_doc=30, seed=2)  # another partition must never leak in
    for query in queries(20):
        for k in (1, 10, 299, 300, 1000):
            assert_same(exact.knn("a", query, k), vec.knn("a", query, k))
    assert exact.index_info("a").kind == EXACT
    assert exact.index_info("a").vectors == 300
    assert vec.index_info("a").kind == SQLITE_VEC
    some = [*[rowid for rowid, _ in vec.knn("b", queries(1)[0], 60)][::3], 10**9]
    query = queries(1, seed=5)[0]
    by_exact, by_vec = exact.similarities("b", some, query), vec.similarities("b", some, query)
    assert by_exact.keys() == by_vec.keys()
    assert len(by_exact) == len(some) - 1
    for rowid, score in by_vec.items():
        assert by_exact[rowid] == pytest.approx(score, abs=SCORE_TOLERANCE)


@pytest.mark.parametrize("kind", [EXACT, HNSW, SQLITE_VEC])
def test_knn_on_every_index_kind_matches_numpy(store: Store, kind: str) -> None:
    """Top-k from each index kind equals numpy's exact search over the vectors read back
    from SQLite, before and after this process's own ingest and delete patch it. 120
    vectors: below the graph's search beam, so HNSW is exact too (up to f16 scores)."""
    rag = RagStore(store, index_max_bytes=0 if kind == SQLITE_VEC else 1 << 30)
    setting = EXACT if kind == SQLITE_VEC else kind
    fill(rag, "a", docs=4, per_doc=30, seed=21, index_kind=setting)
    fill(rag, "b", docs=1, per_doc=30, seed=22, index_kind=setting)  # never leaks into "a"
    for k in (1, 10, 120, 500):
        assert_index_agrees(rag, "a", kind, queries=5, k=k, seed=k)
    fill(rag, "a", docs=1, per_doc=7, seed=23)
    assert_index_agrees(rag, "a", kind)
    rag.delete_document("a", "a-21-2")
    assert_index_agrees(rag, "a", kind, k=200)
    assert_index_agrees(rag, "b", kind)
    rag.flush_index()  # as the server's shutdown: no save left pending after the test


def test_deleted_documents_and_collections_are_never_served(store: Store) -> None:
    rag, vec = RagStore(store), RagStore(store, index_max_bytes=0)
    fill(rag, "a", docs=4, per_doc=25, seed=3)
    query = queries(1)[0]
    before = rag.index_info("a").generation
    rag.knn("a", query, 10)  # builds the matrix
    gone = {
        rowid
        for (rowid,) in store.query(
            "SELECT id FROM chunks WHERE document_id ="
            " (SELECT id FROM documents WHERE document_id = 'a-3-1')"
        )
    }
    assert rag.delete_document("a", "a-3-1") == 25
    info = rag.index_info("a")
    # Patched in place after the commit, not rebuilt: still resident, one generation on.
    assert (info.kind, info.vectors, info.generation) == (EXACT, 75, before + 1)
    got = rag.knn("a", query, 100)
    assert len(got) == 75
    assert not gone & {rowid for rowid, _ in got}
    assert_same(got, vec.knn("a", query, 100))
    # An ingest by this process is appended after its commit.
    fill(rag, "a", docs=1, per_doc=10, seed=4)
    assert rag.index_info("a").vectors == 85
    assert_same(rag.knn("a", query, 100), vec.knn("a", query, 100))
    rag.delete_collection("a")
    assert rag.index.usage() == {}
    # Same name again (and possibly the same collection rowid): only the new vectors.
    fill(rag, "a", docs=1, per_doc=5, seed=6)
    assert_same(rag.knn("a", query, 100), vec.knn("a", query, 100))
    assert len(rag.knn("a", query, 100)) == 5


def test_changes_through_another_connection_are_seen(tmp_path: Path) -> None:
    path = tmp_path / "shared.sqlite3"
    with Store(path) as ours_store, Store(path) as theirs_store:
        ours, theirs = RagStore(ours_store), RagStore(theirs_store)
        vec = RagStore(ours_store, index_max_bytes=0)
        fill(ours, "a", docs=3, per_doc=20, seed=7)
        query = queries(1)[0]
        ours.knn("a", query, 5)
        built = ours.index_info("a").generation
        # "Another process": its own Store, connections and index; ours learns of the
        # change only through the generation in SQLite.
        theirs.delete_document("a", "a-7-0")
        fill(theirs, "a", docs=1, per_doc=7, seed=8)
        assert ours.index_info("a").kind == SQLITE_VEC  # stale until the next search
        got = ours.knn("a", query, 100)
        assert len(got) == 47
        assert_same(got, vec.knn("a", query, 100))
        assert ours.index_info("a").generation == built + 2
        theirs.delete_collection("a")
        fill(theirs, "a", docs=1, per_doc=4, seed=9)
        assert_same(ours.knn("a", query, 100), vec.knn("a", query, 100))
        assert len(ours.knn("a", query, 100)) == 4


def test_a_rolled_back_ingest_leaves_the_matrix_alone(store: Store) -> None:
    rag, vec = RagStore(store), RagStore(store, index_max_bytes=0)
    fill(rag, "a", docs=2, per_doc=10, seed=10)
    query = queries(1)[0]
    rag.knn("a", query, 5)
    before = rag.index_info("a")

    def fail_after_first(done: int, total: int) -> None:
        # Inside the transaction, after the first document's rows were written.
        raise RuntimeError("interrupted")

    rows = np.random.default_rng(11).standard_normal((3, DIMENSION))
    with pytest.raises(RuntimeError, match="interrupted"):
        rag.ingest(
            "a",
            embedding_model="test",
            dimension=DIMENSION,
            chunk_size=64,
            overlap=0,
            collection_metadata={},
            documents=[vector_document("x", rows), vector_document("y", rows + 1)],
            on_progress=fail_after_first,
        )
    assert rag.index_info("a") == before
    assert_same(rag.knn("a", query, 50), vec.knn("a", query, 50))
    assert len(rag.knn("a", query, 50)) == 20


def test_bound_falls_back_to_sqlite_vec_and_evicts_least_recent(store: Store) -> None:
    per_vector = DIMENSION * 4 + 8
    # Room for 100 vectors: "small" (40) and "mid" (50) fit together, "big" (150) never.
    rag = RagStore(store, index_max_bytes=100 * per_vector)
    vec = RagStore(store, index_max_bytes=0)
    fill(rag, "small", docs=1, per_doc=40, seed=11)
    fill(rag, "mid", docs=1, per_doc=50, seed=12)
    fill(rag, "big", docs=3, per_doc=50, seed=13)
    query = queries(1)[0]
    for name in ("small", "mid", "big"):
        assert_same(rag.knn(name, query, 20), vec.knn(name, query, 20))
    assert {name: i.kind for name, i in rag.index_usage().items()} == {
        "small": EXACT,
        "mid": EXACT,
    }
    big = rag.index_info("big")
    assert big.kind == SQLITE_VEC
    assert "rag_index_max_mb" in (big.reason or "")
    # Growing "mid" to 70 vectors evicts "small", the least recently searched.
    rag.knn("small", query, 1)
    rag.knn("mid", query, 1)
    fill(rag, "mid", docs=1, per_doc=20, seed=14)
    rag.knn("mid", query, 1)
    assert set(rag.index_usage()) == {"mid"}
    assert sum(rag.index.usage().values()) <= rag.index.max_bytes
    assert_same(rag.knn("small", query, 20), vec.knn("small", query, 20))


def test_concurrent_searches_during_writes_match_sqlite(store: Store) -> None:
    rag = RagStore(store)
    fill(rag, "a", docs=4, per_doc=30, seed=15)
    query = queries(1)[0]
    errors: list[BaseException] = []
    done = threading.Event()

    def search() -> None:
        try:
            while not done.is_set():
                got = rag.knn("a", query, 10)
                assert len(got) == 10
                assert [s for _, s in got] == sorted((s for _, s in got), reverse=True)
        except BaseException as exc:  # handed to the main thread
            errors.append(exc)

    threads = [threading.Thread(target=search) for _ in range(3)]
    for thread in threads:
        thread.start()
    try:
        for round_ in range(10):
            fill(rag, "a", docs=1, per_doc=5, seed=100 + round_)
            if round_ < 3:
                rag.delete_document("a", f"a-15-{round_}")
    finally:
        done.set()
        for thread in threads:
            thread.join()
    assert not errors, errors
    vec = RagStore(store, index_max_bytes=0)
    assert_same(rag.knn("a", query, 200), vec.knn("a", query, 200))


def test_index_object_rejects_stale_installs() -> None:
    index = ExactIndex(1 << 20)
    ids = np.arange(3, dtype=np.int64)
    rows = np.eye(3, DIMENSION, dtype=np.float32)
    index.put(1, Snapshot(5, ids, rows))
    kept = index.put(1, Snapshot(4, ids[:1], rows[:1]))  # a slower build of an older state
    assert kept.generation == 5
    assert index.current(1, 4) is None


# Picked so that no two chunks' cosines to a query, and no cosine and a threshold, are
# within HNSW_TOLERANCE (asserted below): the graph's f16 rounding may swap such a near-tie,
# which is no error but would move the chunks' RRF ranks. "matches river" has no word in
# the collection: hybrid search is then the vector ranking alone.
HYBRID_QUERIES = ("item 3", "about here 2", "matches river")
THRESHOLDS = (-1.0, 0.2)


@pytest.mark.asyncio
async def test_hybrid_search_is_the_same_on_every_index_kind(tmp_path: Path) -> None:
    """Vector and hybrid (BM25 + vector RRF) search through the service: a collection with
    a matrix and one with an HNSW graph (30 chunks: the graph's search is exhaustive) each
    answer as sqlite-vec does on the same collection, and the two agree with each other."""
    engine = await start_engine(tmp_path, {"echo": (tmp_path, "echo")})
    try:
        texts = {
            f"doc{i}.txt": f"topic {i} words about subject {i % 5} and item {i * 7} here"
            for i in range(30)
        }
        for kind in (EXACT, HNSW):
            await engine.rag.ingest(
                kind,
                [Upload(name, text.encode(), "text/plain") for name, text in texts.items()],
                index=kind,
            )
        resident = engine.rag.db.index
        searches = [
            (q, k, t, h)
            for q in HYBRID_QUERIES
            for k in (1, 5, 30)
            for t in THRESHOLDS
            for h in (False, True)
        ]
        results: dict[tuple[str, str], list[list[Hit]]] = {}
        for name in (EXACT, HNSW):
            for searched, index in ((name, resident), (SQLITE_VEC, ExactIndex(0))):
                engine.rag.db.index = index
                results[name, searched] = [
                    await engine.rag.search(name, query=q, top_k=k, threshold=t, hybrid=h)
                    for q, k, t, h in searches
                ]
                info = engine.rag.db.index_info(name)
                assert (info.kind, info.setting) == (searched, name)
        engine.rag.db.index = resident
        # The precondition above, on every chunk's cosine (sqlite-vec, top 30, no threshold).
        by_search = dict(zip(searches, results[HNSW, SQLITE_VEC], strict=True))
        for q in HYBRID_QUERIES:
            cosines = np.array(sorted(h.score for h in by_search[q, 30, -1.0, False]))
            assert len(cosines) == 30
            assert np.diff(cosines).min() > HNSW_TOLERANCE
            assert np.abs(cosines[:, None] - np.array(THRESHOLDS)).min() > HNSW_TOLERANCE
        assert len(by_search["matches river", 30, 0.2, True]) == 3  # the threshold applies
        for name, tolerance in ((EXACT, SCORE_TOLERANCE), (HNSW, HNSW_TOLERANCE)):
            for got, expected in zip(results[name, name], results[name, SQLITE_VEC], strict=True):
                assert_same_hits(got, expected, tolerance)
        # Across the two collections: the same passages, by file and text.
        for exact, graph in zip(results[EXACT, EXACT], results[HNSW, HNSW], strict=True):
            assert [(h.metadata["file"], h.text) for h in exact] == [
                (h.metadata["file"], h.text) for h in graph
            ]
            for a, b in zip(exact, graph, strict=True):
                assert a.score == pytest.approx(b.score, abs=HNSW_TOLERANCE)
                assert a.rerank_score == b.rerank_score
    finally:
        await engine.stop()


def assert_same_hits(got: list[Hit], expected: list[Hit], tolerance: float) -> None:
    assert [h.chunk_id for h in got] == [h.chunk_id for h in expected]
    for a, b in zip(got, expected, strict=True):
        assert a.score == pytest.approx(b.score, abs=tolerance)
        assert a.rerank_score == b.rerank_score  # the fused RRF score: the same ranks


@pytest.mark.e2e
def test_collection_info_and_diagnostics_report_the_index(tmp_path: Path) -> None:
    settings = Settings(
        data_dir=tmp_path,
        workflows_dir=tmp_path / "wf",
        startup_models=[{"model_path": str(tmp_path), "model_type": "echo", "model_id": "echo"}],
        log_level="warning",
        rate_limit_enabled=False,
    )
    app = create_app(settings)
    with serve_app(app) as server, httpx.Client(base_url=server.base_url, timeout=60) as client:
        files = [
            ("files", (f"d{i}.txt", f"note {i} about lamps and tables".encode(), "text/plain"))
            for i in range(3)
        ]
        ingested = client.post("/api/rag/ingest", data={"collection": "c"}, files=files)
        assert ingested.status_code == 200, ingested.text
        info = client.get("/api/rag/collections/c").json()
        assert info["index"]["kind"] == SQLITE_VEC  # lazily built: no search yet
        answered = client.post(
            "/api/rag/query",
            json={
                "query": "lamps",
                "collection": "c",
                "similarity_threshold": -1,
                "model_id": "echo",
            },
        )
        assert answered.status_code == 200, answered.text
        assert len(answered.json()["sources"]) == 3
        index = client.get("/api/rag/collections/c").json()["index"]
        assert index["kind"] == EXACT
        assert index["vectors"] == info["chunk_count"] == 3
        assert index["bytes"] == 3 * (info["dimension"] * 4 + 8)
        diagnostics = client.get("/internal/diagnostics").json()["rag_index"]
        assert diagnostics["max_bytes"] == settings.rag_index_max_mb * 1024 * 1024
        assert diagnostics["total_bytes"] == index["bytes"]
        assert diagnostics["collections"] == {"c": index}
        document = ingested.json()["document_ids"][0]
        deleted = client.delete(f"/api/rag/documents/c/{document}")
        assert deleted.status_code == 200, deleted.text
        after = client.post(
            "/api/rag/query",
            json={
                "query": "lamps",
                "collection": "c",
                "similarity_threshold": -1,
                "model_id": "echo",
            },
        ).json()
        assert {s["metadata"]["document_id"] for s in after["sources"]} == set(
            ingested.json()["document_ids"][1:]
        )
        assert client.get("/api/rag/collections/c").json()["index"]["vectors"] == 2
        assert client.delete("/api/rag/collections/c").status_code == 200
        assert client.get("/internal/diagnostics").json()["rag_index"]["collections"] == {}
