"""The approximate HNSW index (engine/rag/hnsw_index.py) on a real database, sqlite-vec and
usearch: recall against exact search, deletions never served, the saved graph rebuilt from
SQLite when missing or stale, and `auto` choosing by size."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from rag_store_helpers import vector_document

from engine.errors import InvalidRequest
from engine.rag.exact_index import EXACT, HNSW
from engine.rag.store import RagStore
from engine.store import Store

DIMENSION = 64
DOCS, PER_DOC = 20, 100  # 2,000 vectors
SCORE_TOLERANCE = 5e-3  # the graph stores f16 vectors


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    with Store(tmp_path / "rag.sqlite3") as opened:
        yield opened


def fill(
    rag: RagStore, collection: str, docs: int, seed: int, index_kind: str = "hnsw", start: int = 0
) -> None:
    rng = np.random.default_rng(seed)
    rag.ingest(
        collection,
        embedding_model="test",
        dimension=DIMENSION,
        chunk_size=64,
        overlap=0,
        collection_metadata={},
        documents=[
            vector_document(f"{collection}-{d}", rng.standard_normal((PER_DOC, DIMENSION)))
            for d in range(start, start + docs)
        ],
        index_kind=index_kind,
    )


def queries(n: int, seed: int = 99) -> list[list[float]]:
    return np.random.default_rng(seed).standard_normal((n, DIMENSION)).tolist()


def exact_store(store: Store) -> RagStore:
    """The same database searched exactly, whatever the collection's setting."""
    rag = RagStore(store)
    rag.index_kind = lambda setting, vectors: EXACT  # type: ignore[method-assign]
    return rag


def recall(got: list[tuple[int, float]], expected: list[tuple[int, float]]) -> float:
    return len({r for r, _ in got} & {r for r, _ in expected}) / len(expected)


def test_recall_and_scores_match_exact_search(store: Store) -> None:
    rag, exact = RagStore(store), exact_store(store)
    fill(rag, "a", DOCS, seed=1)
    found = []
    for query in queries(50):
        got, expected = rag.knn("a", query, 10), exact.knn("a", query, 10)
        found.append(recall(got, expected))
        by_rowid = dict(expected)
        for rowid, score in got:
            if rowid in by_rowid:
                assert score == pytest.approx(by_rowid[rowid], abs=SCORE_TOLERANCE)
        assert [s for _, s in got] == sorted((s for _, s in got), reverse=True)
    assert np.mean(found) >= 0.95
    info = rag.index_info("a")
    assert (info.kind, info.vectors, info.setting) == (HNSW, DOCS * PER_DOC, "hnsw")
    assert info.bytes > 0
    assert exact.index_info("a").kind == EXACT
    # Hybrid search's similarities of lexical matches come from the graph's vectors too.
    some = [r for r, _ in exact.knn("a", queries(1, seed=5)[0], 30)]
    query = queries(1, seed=6)[0]
    approx, exactly = rag.similarities("a", some, query), exact.similarities("a", some, query)
    assert approx.keys() == exactly.keys()
    for rowid, score in exactly.items():
        assert approx[rowid] == pytest.approx(score, abs=SCORE_TOLERANCE)


def test_deleted_documents_are_never_returned(store: Store) -> None:
    rag = RagStore(store)
    fill(rag, "a", DOCS, seed=2)
    query = queries(1)[0]
    before = {r for r, _ in rag.knn("a", query, 200)}
    deleted = set()
    for d in range(0, DOCS, 2):
        deleted |= {
            rowid
            for (rowid,) in store.query(
                "SELECT id FROM chunks WHERE document_id ="
                " (SELECT id FROM documents WHERE document_id = ?)",
                (f"a-{d}",),
            )
        }
        rag.delete_document("a", f"a-{d}")
    assert before & deleted  # the search did return some of them before
    info = rag.index_info("a")
    # Patched after each commit, not rebuilt.
    assert (info.kind, info.vectors) == (HNSW, DOCS * PER_DOC // 2)
    for q in queries(20):
        got = rag.knn("a", q, 100)
        assert len(got) == 100
        assert not deleted & {r for r, _ in got}
    # An ingest by this process is added to the graph after its commit.
    fill(rag, "a", 1, seed=3, start=DOCS)
    assert rag.index_info("a").vectors == DOCS * PER_DOC // 2 + PER_DOC


def test_a_missing_index_file_is_rebuilt_on_restart(tmp_path: Path) -> None:
    path = tmp_path / "rag.sqlite3"
    with Store(path) as store:
        rag = RagStore(store)
        fill(rag, "a", DOCS, seed=4)
        first = [rag.knn("a", q, 10) for q in queries(10)]
        files = list((tmp_path / "rag-index").glob("*.usearch"))
        assert len(files) == 1
    # A restart with the file: loaded, same results.
    with Store(path) as store:
        rag = RagStore(store)
        assert [rag.knn("a", q, 10) for q in queries(10)] == first
    files[0].unlink()
    with Store(path) as store:
        rag = RagStore(store)
        again = [rag.knn("a", q, 10) for q in queries(10)]
        assert rag.index_info("a").kind == HNSW
        exact = exact_store(store)
        expected = [exact.knn("a", q, 10) for q in queries(10)]
    # Rebuilt from SQLite, not loaded: the graph's shape depends on the (multi-threaded)
    # insertion order, so results are compared with exact search, as the first ones were;
    # the same chunks come back apart from an occasional near-tie at rank 10.
    assert np.mean([recall(g, e) for g, e in zip(again, expected, strict=True)]) >= 0.95
    assert np.mean([recall(g, e) for g, e in zip(first, expected, strict=True)]) >= 0.95
    assert np.mean([recall(g, f) for g, f in zip(again, first, strict=True)]) >= 0.95
    assert list((tmp_path / "rag-index").glob("*.usearch"))


def test_a_change_through_another_connection_updates_the_stale_graph(tmp_path: Path) -> None:
    path = tmp_path / "shared.sqlite3"
    with Store(path) as ours_store, Store(path) as theirs_store:
        ours, theirs = RagStore(ours_store), RagStore(theirs_store)
        fill(ours, "a", DOCS, seed=5)
        query = queries(1)[0]
        ours.knn("a", query, 10)
        built = ours.index_info("a").generation
        gone = {
            rowid
            for (rowid,) in ours_store.query(
                "SELECT id FROM chunks WHERE document_id ="
                " (SELECT id FROM documents WHERE document_id = 'a-0')"
            )
        }
        # "Another process": ours learns of it only through the generation in SQLite.
        theirs.delete_document("a", "a-0")
        got = ours.knn("a", query, 300)
        assert not gone & {r for r, _ in got}
        info = ours.index_info("a")
        assert (info.kind, info.vectors, info.generation) == (
            HNSW,
            (DOCS - 1) * PER_DOC,
            built + 1,
        )
        # Saved at the next flush (the server's stop; a timer after `hnsw_save_delay_s`),
        # the stale file replaced by the current generation's.
        ours.flush_index()
        names = [p.name for p in (tmp_path / "rag-index").glob("*.usearch")]
        assert len(names) == 1
        assert names[0].endswith(f"-{built + 1}.usearch")
        theirs.delete_collection("a")
        assert not list((tmp_path / "rag-index").glob("*.usearch"))


def test_auto_switches_at_the_threshold(store: Store) -> None:
    rag = RagStore(store, hnsw_min_vectors=1_000)
    fill(rag, "small", 5, seed=6, index_kind="auto")
    fill(rag, "large", 10, seed=7, index_kind="auto")
    fill(rag, "forced", 5, seed=8, index_kind="exact")
    query = queries(1)[0]
    for name in ("small", "large", "forced"):
        rag.knn(name, query, 10)
    kinds = {name: (i.kind, i.setting) for name, i in rag.index_usage().items()}
    assert kinds == {
        "small": (EXACT, "auto"),
        "large": (HNSW, "auto"),
        "forced": (EXACT, "exact"),
    }
    # The default threshold keeps small collections exact.
    assert RagStore(store).index_kind("auto", 2_000) == EXACT
    with pytest.raises(InvalidRequest, match="index must be one of"):
        fill(rag, "bad", 1, seed=9, index_kind="ivf")


def test_mlx_still_compiles_after_an_hnsw_index_is_used(tmp_path: Path) -> None:
    """usearch loaded before MLX breaks MLX's compiled kernels (see hnsw_index._new_index);
    a fresh process, as a server that searches before its first compiled model call."""
    pytest.importorskip("mlx.core")
    script = (
        "import threading\n"
        "import numpy as np\n"
        "from pathlib import Path\n"
        "from engine.rag import hnsw_index\n"
        "v = np.eye(4, dtype='float32')\n"
        "saver = hnsw_index.Saver(0, lambda _: threading.Lock())\n"
        f"hnsw_index.build(Path({str(tmp_path)!r}), 1, 1, np.arange(4), v, saver)\n"
        "import mlx.core as mx\n"
        "print(mx.compile(lambda a: mx.exp(a) * 2 + 1)(mx.ones((2,))).tolist())\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr[-2000:]
