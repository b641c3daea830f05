"""Saving HNSW graphs (engine/rag/hnsw_index.py, "Persistence"): patches are saved at most
`hnsw_save_delay_s` later or at a flush, not per ingest; a graph behind SQLite (a file
saved before a crash, a process that missed another's writes) is brought up to date
rather than rebuilt; a graph too far behind is rebuilt."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
from api_helpers import running_server
from polling import until
from structlog.testing import capture_logs
from test_rag_hnsw import PER_DOC, exact_store, fill, queries, recall

from engine.rag.exact_index import HNSW
from engine.rag.store import RagStore
from engine.store import Store

DOCS = 8  # 800 vectors: quick to build, big enough for the "more than half" rule


def saved(tmp_path: Path) -> list[str]:
    return sorted(p.name for p in (tmp_path / "rag-index").glob("*.usearch"))


def built_from(logs: list[dict[str, object]]) -> list[object]:
    return [
        e["source"] for e in logs if e["event"] == "rag vector index built" and e["kind"] == HNSW
    ]


def assert_agrees(rag: RagStore, store: Store, name: str) -> None:
    exact = exact_store(store)
    for query in queries(10):
        assert recall(rag.knn(name, query, 10), exact.knn(name, query, 10)) >= 0.9
    info = rag.index_info(name)
    chunks = store.query(
        "SELECT count(*) FROM chunks WHERE collection_id ="
        " (SELECT id FROM collections WHERE name = ?)",
        (name,),
    )[0][0]
    assert (info.kind, info.vectors) == (HNSW, chunks)


def test_patches_are_saved_at_the_flush_not_per_ingest(tmp_path: Path) -> None:
    with Store(tmp_path / "rag.sqlite3") as store:
        rag = RagStore(store, hnsw_save_delay_s=3600)
        fill(rag, "a", DOCS, seed=1)
        rag.knn("a", queries(1)[0], 10)  # built, and saved at once: a build is costly
        first = rag.index_info("a").generation
        assert saved(tmp_path) == [f"1-{first}.usearch"]
        fill(rag, "a", 1, seed=2, start=DOCS)
        rag.delete_document("a", "a-0")
        now = rag.index_info("a").generation
        assert now == first + 2
        assert saved(tmp_path) == [f"1-{first}.usearch"]  # not yet
        rag.flush_index()
        assert saved(tmp_path) == [f"1-{now}.usearch"]
        rag.flush_index()  # nothing pending: nothing written
        assert saved(tmp_path) == [f"1-{now}.usearch"]


async def test_the_timer_saves_after_the_delay(tmp_path: Path) -> None:
    with Store(tmp_path / "rag.sqlite3") as store:
        rag = RagStore(store, hnsw_save_delay_s=0.05)
        fill(rag, "a", DOCS, seed=3)
        rag.knn("a", queries(1)[0], 10)
        fill(rag, "a", 1, seed=4, start=DOCS)
        now = rag.index_info("a").generation
        await until(lambda: saved(tmp_path) == [f"1-{now}.usearch"], "the timer saved")
        assert rag.hnsw_saver.pending() == []


def test_a_stale_file_is_brought_up_to_date_on_restart(tmp_path: Path) -> None:
    path = tmp_path / "rag.sqlite3"
    with Store(path) as store:
        rag = RagStore(store, hnsw_save_delay_s=3600)
        fill(rag, "a", DOCS, seed=5)
        rag.knn("a", queries(1)[0], 10)
        old = saved(tmp_path)
        # Changes the file never sees: a crash before the save.
        fill(rag, "a", 2, seed=6, start=DOCS)
        rag.delete_document("a", "a-1")
        rag.hnsw_saver.discard(1)
    assert saved(tmp_path) == old
    with Store(path) as store:
        rag = RagStore(store, hnsw_save_delay_s=3600)
        with capture_logs() as logs:
            assert_agrees(rag, store, "a")
        assert built_from(logs) == ["file"]
        updates = [e for e in logs if e["event"] == "rag hnsw index reconciled with sqlite"]
        assert [(e["added"], e["removed"]) for e in updates] == [(2 * PER_DOC, PER_DOC)]
        # A deleted chunk is out of the graph itself, not only filtered from results.
        gone = {
            r
            for (r,) in store.query(
                "SELECT id FROM chunks WHERE document_id IN"
                " (SELECT id FROM documents WHERE document_id = 'a-2')"
            )
        }
        rag.delete_document("a", "a-2")
        assert not gone & {r for r, _ in rag.knn("a", queries(1)[0], 700)}
        rag.flush_index()
        generation = rag.index_info("a").generation
    assert saved(tmp_path) == [f"1-{generation}.usearch"]


def test_a_file_too_far_behind_is_rebuilt(tmp_path: Path) -> None:
    path = tmp_path / "rag.sqlite3"
    with Store(path) as store:
        rag = RagStore(store, hnsw_save_delay_s=3600)
        fill(rag, "a", 2, seed=7)
        rag.knn("a", queries(1)[0], 10)
        fill(rag, "a", DOCS, seed=8, start=2)  # 4x the saved graph
        rag.hnsw_saver.discard(1)
    with Store(path) as store:
        rag = RagStore(store, hnsw_save_delay_s=3600)
        with capture_logs() as logs:
            assert_agrees(rag, store, "a")
        assert built_from(logs) == ["sqlite"]
        assert not [e for e in logs if e["event"] == "rag hnsw index reconciled with sqlite"]


def test_an_unreadable_newest_file_falls_back_to_an_older_one(tmp_path: Path) -> None:
    path = tmp_path / "rag.sqlite3"
    with Store(path) as store:
        rag = RagStore(store, hnsw_save_delay_s=3600)
        fill(rag, "a", DOCS, seed=9)
        rag.knn("a", queries(1)[0], 10)
        generation = rag.index_info("a").generation
    (tmp_path / "rag-index" / f"1-{generation + 5}.usearch").write_bytes(b"not a graph")
    with Store(path) as store:
        rag = RagStore(store, hnsw_save_delay_s=0)
        with capture_logs() as logs:
            assert_agrees(rag, store, "a")
        assert built_from(logs) == ["file"]
        assert any(e["event"] == "rag hnsw index unreadable" for e in logs)


def test_a_deleted_collection_is_not_saved_later(tmp_path: Path) -> None:
    with Store(tmp_path / "rag.sqlite3") as store:
        rag = RagStore(store, hnsw_save_delay_s=3600)
        fill(rag, "a", DOCS, seed=10)
        rag.knn("a", queries(1)[0], 10)
        fill(rag, "a", 1, seed=11, start=DOCS)
        assert rag.hnsw_saver.pending() == [1]
        rag.delete_collection("a")
        rag.flush_index()
        assert saved(tmp_path) == []


@pytest.mark.parametrize("delay", [0, 3600])
def test_searches_after_patches_match_exact_search(tmp_path: Path, delay: float) -> None:
    with Store(tmp_path / "rag.sqlite3") as store:
        rag = RagStore(store, hnsw_save_delay_s=delay)
        fill(rag, "a", DOCS, seed=12)
        rag.knn("a", queries(1)[0], 10)
        for step in range(3):
            fill(rag, "a", 1, seed=20 + step, start=DOCS + step)
            rag.delete_document("a", f"a-{step}")
        assert_agrees(rag, store, "a")


def test_the_server_saves_pending_graphs_when_it_stops(
    tmp_path: Path, tiny_embedder_dir: Path
) -> None:
    models = [
        {"model_path": str(tiny_embedder_dir), "model_type": "embeddings"},
        {"model_path": "echo", "model_type": "echo", "model_id": "echo"},
    ]
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa".split()

    def text(n: int) -> bytes:
        return " ".join(words[(n + i) % len(words)] for i in range(40)).encode()

    def ingest(client: httpx.Client, n: int) -> None:
        response = client.post(
            "/api/rag/ingest",
            data={"collection": "g", "index": "hnsw", "chunk_size": "16", "overlap": "0"},
            files=[("files", (f"d{n}.txt", text(n), "text/plain"))],
        )
        assert response.status_code == 200, response.text

    with running_server(tmp_path, startup_models=models, rag_hnsw_save_delay_s=3600) as client:
        ingest(client, 0)
        query = {"collection": "g", "query": "alpha", "model_id": "echo"}
        response = client.post("/api/rag/query", json=query)
        assert response.status_code == 200, response.text
        built = client.get("/api/rag/collections/g").json()["index"]["generation"]
        assert saved(tmp_path) == [f"1-{built}.usearch"]
        ingest(client, 1)
        now = client.get("/api/rag/collections/g").json()["index"]["generation"]
        assert now > built
        assert saved(tmp_path) == [f"1-{built}.usearch"]
    assert saved(tmp_path) == [f"1-{now}.usearch"]
