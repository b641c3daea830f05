"""Metadata filters on retrieval (engine/rag/filters.py, docs/rag.md "Filters") on a real
database, sqlite-vec and usearch: each operator against a reference evaluator written from
the documented semantics; filtered top-k on every index kind (exact matrix, HNSW graph,
sqlite-vec) against numpy over the matching rows, for broad and very selective filters;
BM25 restricted by a filter; and the filter through the API (a real server, the echo
model) and the `vector_search` step."""

from __future__ import annotations

import json
import math
import re
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import pytest_asyncio
from api_helpers import running_server
from step_helpers import compile_workflow, run_workflow, start_engine

from engine.dsl.issues import WorkflowInvalid
from engine.errors import InvalidRequest
from engine.rag.exact_index import EXACT, HNSW, SQLITE_VEC
from engine.rag.filters import FilterLimits, SqlFilter, compile_filter
from engine.rag.service import Upload
from engine.rag.store import FILTER_EXACT_ROWS, RagStore
from engine.rag.types import Chunk, NewDocument
from engine.services import Engine
from engine.store import Store

# -- a reference evaluator, written from the documented semantics ----------------------------

_MISSING = object()


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _same(a: Any, b: Any) -> bool:
    """Equal without coercion: numbers with numbers, booleans with booleans."""
    if _is_number(a) and _is_number(b):
        return bool(a == b)
    return type(a) is type(b) and a == b


def _elements(value: Any) -> list[Any]:
    if value is _MISSING or isinstance(value, dict):
        return []
    return value if isinstance(value, list) else [value]


def _equal(value: Any, wanted: Any) -> bool:
    if wanted is None and value is _MISSING:
        return True
    return any(_same(element, wanted) for element in _elements(value))


def _compare(value: Any, op: str, bound: Any) -> bool:
    check = {
        "$gt": lambda a: a > bound,
        "$gte": lambda a: a >= bound,
        "$lt": lambda a: a < bound,
        "$lte": lambda a: a <= bound,
    }[op]
    for element in _elements(value):
        comparable = (isinstance(bound, str) and isinstance(element, str)) or (
            _is_number(bound) and _is_number(element)
        )
        if comparable and check(element):
            return True
    return False


def _holds(value: Any, op: str, operand: Any) -> bool:
    if op == "$eq":
        return _equal(value, operand)
    if op == "$ne":
        return not _equal(value, operand)
    if op == "$in":
        return any(_equal(value, v) for v in operand)
    if op == "$nin":
        return not any(_equal(value, v) for v in operand)
    if op == "$exists":
        return (value is not _MISSING) == operand
    return _compare(value, op, operand)


def reference(meta: dict[str, Any], spec: dict[str, Any]) -> bool:
    for key, value in spec.items():
        if key == "$and":
            ok = all(reference(meta, item) for item in value)
        elif key == "$or":
            ok = any(reference(meta, item) for item in value)
        else:
            found = meta.get(key, _MISSING)
            operators = value if isinstance(value, dict) else {"$eq": value}
            ok = all(_holds(found, op, operand) for op, operand in operators.items())
        if not ok:
            return False
    return True


# -- a collection with varied metadata ---------------------------------------------------------

DIMENSION = 16
MODEL = "test-embedder"

# One document each; every shape of value a filter must handle.
METADATA: list[dict[str, Any]] = [
    {"year": 2019, "lang": "en", "tags": ["news", "eu"], "draft": False, "score": 0.5},
    {"year": 2020, "lang": "fr", "tags": ["news"], "draft": True, "score": 1.5},
    {"year": 2021, "lang": "de", "tags": [], "draft": False, "score": 2},
    {"year": 2021.0, "lang": "en", "tags": ["eu", 7], "score": -1.0},  # a real year, no draft
    {"year": "2021", "lang": "EN", "draft": 1},  # a string year, 1 is not true
    {"year": 2024, "lang": None, "tags": ["blog"], "draft": True},
    {"lang": "fr", "nested": {"year": 2021, "lang": "fr"}, "tags": [["news"]]},
    {"year": 2023, "lang": "es", "a.b": "dotted", "file": "spoofed.txt", "ünï": "cödé"},
    {"year": 2022, "lang": "it", "tags": ["eu", None], "draft": False, "date": "2022-03-01"},
    {"date": "2021-12-31", "lang": "en", "score": 3.25},
]
PAGES = [1, 2, None]
HEADINGS = ["Intro", "Intro > Setup", None]


def metadata_document(
    number: int, meta: dict[str, Any], rows: np.ndarray, prefix: str = ""
) -> NewDocument:
    """Document ids are unique across collections, so each collection gives a prefix."""
    name = f"doc{number}"
    return NewDocument(
        document_id=prefix + name,
        filename=f"{name}.txt",
        content_hash=prefix + name,
        format="text",
        title=None,
        metadata=meta,
        chunks=[
            Chunk(
                index=i,
                text=f"{name} passage {i} about {'rivers' if i % 2 else 'mountains'}",
                token_count=4,
                page=PAGES[i % len(PAGES)],
                heading=HEADINGS[i % len(HEADINGS)],
            )
            for i in range(len(rows))
        ],
        vectors=rows,
    )


def unit_rows(rng: np.random.Generator, n: int) -> np.ndarray:
    rows = rng.standard_normal((n, DIMENSION))
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    with Store(tmp_path / "rag.sqlite3") as opened:
        yield opened


@pytest.fixture
def varied(store: Store) -> RagStore:
    rag = RagStore(store)
    rng = np.random.default_rng(3)
    rag.ingest(
        "varied",
        embedding_model=MODEL,
        dimension=DIMENSION,
        chunk_size=64,
        overlap=0,
        collection_metadata={},
        documents=[metadata_document(i, m, unit_rows(rng, 3)) for i, m in enumerate(METADATA)],
    )
    return rag


def where(spec: dict[str, Any]) -> SqlFilter:
    compiled = compile_filter(spec)
    assert compiled is not None
    return compiled


def every_hit(rag: RagStore, collection: str) -> dict[int, dict[str, Any]]:
    """rowid -> the hit's metadata, for every chunk of the collection."""
    rowids = rag.matching_rowids(collection, where({"file": {"$exists": True}}))
    hits = rag.hits(rowids.tolist(), {})
    assert len(hits) == len(rowids)
    return {int(r): hit.metadata for r, hit in zip(rowids.tolist(), hits, strict=True)}


FILTERS: list[dict[str, Any]] = [
    {"lang": "en"},
    {"lang": {"$eq": "en"}},
    {"lang": {"$ne": "en"}},
    {"year": 2021},
    {"year": {"$eq": 2021.0}},
    {"year": "2021"},
    {"year": {"$gt": 2020}},
    {"year": {"$gte": 2021, "$lt": 2024}},
    {"year": {"$lte": 2019.5}},
    {"year": {"$gt": "2020"}},
    {"date": {"$gte": "2022-01-01"}},
    {"date": {"$lt": "2022"}},
    {"score": {"$gt": 0.5}},
    {"score": {"$gte": 0.5, "$lte": 2}},
    {"year": {"$in": [2019, "2021", 2024]}},
    {"year": {"$nin": [2019, 2021]}},
    {"lang": {"$in": []}},
    {"lang": {"$nin": []}},
    {"lang": {"$in": ["fr", None]}},
    {"draft": True},
    {"draft": False},
    {"draft": 1},
    {"draft": {"$ne": True}},
    {"draft": {"$in": [True, 1]}},
    {"draft": {"$exists": True}},
    {"draft": {"$exists": False}},
    {"lang": None},
    {"lang": {"$ne": None}},
    {"lang": {"$exists": True}},
    {"tags": "eu"},
    {"tags": 7},
    {"tags": {"$in": ["blog", "news"]}},
    {"tags": {"$nin": ["eu"]}},
    {"tags": None},
    {"tags": {"$gt": "m"}},
    {"nested": {"$exists": True}},
    {"year": {"$exists": False}},
    {"a.b": "dotted"},
    {"ünï": "cödé"},
    {"file": "doc3.txt"},
    {"file": "spoofed.txt"},
    {"file": {"$in": ["doc1.txt", "doc7.txt"]}},
    {"document_id": {"$ne": "doc0"}},
    {"page": 2},
    {"page": None},
    {"page": {"$gte": 2}},
    {"page": {"$exists": True}},
    {"heading": "Intro"},
    {"heading": {"$gt": "Intro"}},
    {"heading": {"$in": [None, "Intro"]}},
    {"lang": "en", "page": 1},
    {"$and": [{"lang": "en"}, {"year": {"$gte": 2020}}]},
    {"$or": [{"lang": "fr"}, {"draft": True}]},
    {"$or": [{"lang": "de"}, {"$and": [{"year": {"$gte": 2023}}, {"page": {"$ne": None}}]}]},
    {"$and": [{"$or": [{"tags": "eu"}, {"tags": "news"}]}, {"draft": {"$ne": True}}]},
    {"lang": "en", "$or": [{"page": 1}, {"heading": None}]},
    {"missing_everywhere": {"$exists": False}},
    {"missing_everywhere": 1},
]


@pytest.mark.parametrize("spec", FILTERS, ids=[str(f) for f in FILTERS])
def test_operators_match_the_reference(varied: RagStore, spec: dict[str, Any]) -> None:
    hits = every_hit(varied, "varied")
    got = set(varied.matching_rowids("varied", where(spec)).tolist())
    expected = {rowid for rowid, meta in hits.items() if reference(meta, spec)}
    assert got == expected


def test_the_reference_is_not_trivial(varied: RagStore) -> None:
    """Most filters above match some chunks and leave out others."""
    hits = every_hit(varied, "varied")
    sizes = [sum(reference(m, spec) for m in hits.values()) for spec in FILTERS]
    # The rest are edge cases: $in [], $nin [], the store keys that always exist, ...
    assert sum(0 < size < len(hits) for size in sizes) >= len(FILTERS) - 8


def test_empty_or_absent_filter_is_no_filter() -> None:
    assert compile_filter(None) is None
    assert compile_filter({}) is None


BAD_FILTERS: list[tuple[Any, str]] = [
    ("lang", "must be an object"),
    ([{"lang": "en"}], "must be an object"),
    ({"lang": {"$regex": "e.*"}}, "unknown operator '$regex'"),
    ({"$not": {"lang": "en"}}, "unknown operator '$not'"),
    ({"lang": {"inner": 1}}, "unknown operator 'inner'"),
    ({"lang": {}}, "needs at least one operator"),
    ({"lang": ["en", "fr"]}, "must be a string, number, boolean or null"),
    ({"year": {"$gt": True}}, "compares a string or a number"),
    ({"year": {"$lt": None}}, "compares a string or a number"),
    ({"year": {"$in": "2021"}}, "must be a list"),
    ({"year": {"$in": [[2021]]}}, "filter.year.$in[0]"),
    ({"year": {"$exists": 1}}, "must be true or false"),
    ({"$and": []}, "non-empty list"),
    ({"$or": {"lang": "en"}}, "non-empty list"),
    ({"$or": [{}]}, "non-empty filter object"),
    ({"$or": ["x"]}, "non-empty filter object"),
    ({"": 1}, "1 to 256 characters"),
    ({'a"b': 1}, "quotes"),
    ({"year": 2**64}, "64 bits"),
    ({"year": math.nan}, "finite"),
    ({"lang": "x" * 1025}, "at most 1024 characters"),
    ({"lang": {"$eq": object()}}, "must be a string, number"),
    ({"lang": "\ud800"}, "valid Unicode"),
    ({"\udfff": 1}, "valid Unicode"),
]


@pytest.mark.parametrize(("spec", "message"), BAD_FILTERS, ids=[m for _, m in BAD_FILTERS])
def test_malformed_filters_are_refused(spec: Any, message: str) -> None:
    with pytest.raises(InvalidRequest) as raised:
        compile_filter(spec)
    assert raised.value.param == "filter"
    assert message in raised.value.message


def test_filters_are_bounded() -> None:
    limits = FilterLimits(max_terms=4, max_values=3)
    compile_filter({"a": 1, "b": {"$gt": 1, "$lt": 5}, "c": {"$in": [1, 2, 3]}}, limits)
    with pytest.raises(InvalidRequest, match="at most 4 conditions"):
        compile_filter({"$or": [{"a": 1}, {"b": 2}, {"c": 3}, {"d": 4}, {"e": 5}]}, limits)
    with pytest.raises(InvalidRequest, match="at most 3 values"):
        compile_filter({"c": {"$nin": [1, 2, 3, 4]}}, limits)
    deep: dict[str, Any] = {"a": 1}
    for _ in range(8):
        deep = {"$and": [deep]}
    compile_filter(deep)
    with pytest.raises(InvalidRequest, match="at most 8 deep"):
        compile_filter({"$or": [deep]})


def test_values_are_never_sql(varied: RagStore) -> None:
    spec = {"lang": "en' OR 1=1 --", "x'); DROP TABLE chunks; --": {"$exists": False}}
    compiled = where(spec)
    assert "DROP" not in compiled.sql
    assert "OR 1=1" not in compiled.sql
    assert len(varied.matching_rowids("varied", compiled)) == 0
    assert varied.counts("varied")["chunks"] == 3 * len(METADATA)


# -- filtered top-k on every index kind ------------------------------------------------------

DOCUMENTS, PER_DOCUMENT = 400, 50  # 20,000 vectors
QUERIES = 12
K = 10


def group_metadata(d: int) -> dict[str, Any]:
    return {"group": d % 10, "even": d % 2 == 0, "rare": d == 123, "name": f"n{d:04d}"}


@pytest.fixture(scope="module")
def big(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Store, np.ndarray]]:
    """20,000 chunks in three collections (the same vectors) of each index kind, and the
    vectors in chunk order."""
    rng = np.random.default_rng(11)
    matrix = unit_rows(rng, DOCUMENTS * PER_DOCUMENT)
    with Store(tmp_path_factory.mktemp("filters") / "rag.sqlite3") as store:
        rag = RagStore(store)
        for collection, kind in (("exact", EXACT), ("hnsw", HNSW), ("scan", EXACT)):
            rag.ingest(
                collection,
                embedding_model=MODEL,
                dimension=DIMENSION,
                chunk_size=64,
                overlap=0,
                collection_metadata={},
                documents=[
                    metadata_document(
                        d,
                        group_metadata(d),
                        matrix[d * PER_DOCUMENT : (d + 1) * PER_DOCUMENT],
                        prefix=f"{collection}-",
                    )
                    for d in range(DOCUMENTS)
                ],
                index_kind=kind,
            )
        yield store, matrix


def searcher(store: Store, collection: str) -> RagStore:
    # `scan`: no memory for an index, so sqlite-vec searches it.
    return RagStore(store, index_max_bytes=0) if collection == "scan" else RagStore(store)


def chunk_position(chunk_id: str) -> int:
    found = re.fullmatch(r".*doc(\d+)_chunk_(\d+)", chunk_id)
    assert found is not None
    return int(found[1]) * PER_DOCUMENT + int(found[2])


def brute_force(
    matrix: np.ndarray, query: np.ndarray, keep: Callable[[int, int], bool], k: int
) -> list[tuple[int, float]]:
    """(position, cosine) of the `k` nearest rows whose (document, chunk index) `keep`
    accepts: numpy over the matching rows."""
    positions = np.array(
        [p for p in range(len(matrix)) if keep(p // PER_DOCUMENT, p % PER_DOCUMENT)],
        dtype=np.int64,
    )
    if not len(positions):
        return []
    scores = matrix[positions] @ (query / np.linalg.norm(query))
    order = np.argsort(-scores, kind="stable")[:k]
    return [(int(positions[i]), float(scores[i])) for i in order]


def filtered_search(
    rag: RagStore, collection: str, query: np.ndarray, spec: dict[str, Any], k: int
) -> list[tuple[int, float]]:
    found = rag.knn(collection, query.tolist(), k, compile_filter(spec))
    hits = rag.hits([r for r, _ in found], dict(found))
    assert len(hits) == len(found)
    return [(chunk_position(hit.chunk_id), hit.score) for hit in hits]


# (filter, the same as a predicate on (document, chunk index)): from almost everything to
# a handful of chunks among 20,000.
SELECTIONS: list[tuple[dict[str, Any], Callable[[int, int], bool]]] = [
    ({"group": {"$ne": 3}}, lambda d, i: d % 10 != 3),  # 90%
    ({"even": True}, lambda d, i: d % 2 == 0),  # 50%
    ({"group": {"$in": [1, 2]}, "page": 1}, lambda d, i: d % 10 in (1, 2) and i % 3 == 0),
    ({"group": 4}, lambda d, i: d % 10 == 4),  # 10%: 2,000
    ({"name": {"$gte": "n0100", "$lt": "n0104"}}, lambda d, i: 100 <= d < 104),  # 200
    ({"rare": True}, lambda d, i: d == 123),  # 50
    ({"rare": True, "heading": "Intro"}, lambda d, i: d == 123 and i % 3 == 0),  # 17
    ({"file": "doc7.txt", "page": {"$gte": 2}}, lambda d, i: d == 7 and i % 3 == 1),  # 16
    ({"$or": [{"file": "doc9.txt"}, {"file": "doc390.txt"}]}, lambda d, i: d in (9, 390)),
    (
        {"file": "doc5.txt", "heading": "Intro > Setup", "page": 2},
        lambda d, i: d == 5 and i % 3 == 1,
    ),
    ({"group": 99}, lambda d, i: False),  # nothing
]


@pytest.mark.parametrize("collection", ["exact", "scan"])
@pytest.mark.parametrize("selection", range(len(SELECTIONS)))
def test_exact_kinds_give_the_exact_filtered_top_k(
    big: tuple[Store, np.ndarray], collection: str, selection: int
) -> None:
    store, matrix = big
    spec, keep = SELECTIONS[selection]
    rag = searcher(store, collection)
    rag.knn(collection, matrix[0].tolist(), 1)  # the index is resident (or refused) now
    for query in np.random.default_rng(selection).standard_normal((QUERIES, DIMENSION)):
        got = filtered_search(rag, collection, query, spec, K)
        expected = brute_force(matrix, query, keep, K)
        assert [p for p, _ in got] == [p for p, _ in expected]
        assert [s for _, s in got] == pytest.approx([s for _, s in expected], abs=1e-5)
    assert rag.index_info(collection).kind == (EXACT if collection == "exact" else SQLITE_VEC)


@pytest.mark.parametrize("selection", range(len(SELECTIONS)))
def test_hnsw_gives_the_filtered_top_k(big: tuple[Store, np.ndarray], selection: int) -> None:
    store, matrix = big
    spec, keep = SELECTIONS[selection]
    rag = searcher(store, "hnsw")
    rag.knn("hnsw", matrix[0].tolist(), 1)  # the graph is resident now
    recalls = []
    for query in np.random.default_rng(selection).standard_normal((QUERIES, DIMENSION)):
        got = filtered_search(rag, "hnsw", query, spec, K)
        expected = brute_force(matrix, query, keep, K)
        assert len(got) == len(expected)
        assert all(keep(p // PER_DOCUMENT, p % PER_DOCUMENT) for p, _ in got)
        assert [s for _, s in got] == sorted((s for _, s in got), reverse=True)
        by_position = dict(expected)
        for position, score in got:
            if position in by_position:
                assert score == pytest.approx(by_position[position], abs=5e-3)  # f16 vectors
        if expected:
            recalls.append(len({p for p, _ in got} & set(by_position)) / len(expected))
    assert not recalls or np.mean(recalls) >= 0.95
    assert rag.index_info("hnsw").kind == HNSW


def test_the_hnsw_cases_cover_both_paths() -> None:
    """The graph is searched wider for the large selections, the set scored exactly for the
    small ones: both paths are exercised above."""
    sizes = [
        sum(keep(p // PER_DOCUMENT, p % PER_DOCUMENT) for p in range(DOCUMENTS * PER_DOCUMENT))
        for _, keep in SELECTIONS
    ]
    assert any(size > FILTER_EXACT_ROWS for size in sizes)
    assert any(0 < size <= FILTER_EXACT_ROWS for size in sizes)


@pytest.mark.parametrize("collection", ["exact", "hnsw", "scan"])
def test_a_selective_filter_still_fills_top_k(
    big: tuple[Store, np.ndarray], collection: str
) -> None:
    """17 matching chunks among 20,000, and a query far from all of them: a top-k taken
    before filtering holds none of them; the filtered search still returns k."""
    store, matrix = big
    rag = searcher(store, collection)
    spec = {"document_id": f"{collection}-doc17", "page": 1}
    keep: Callable[[int, int], bool] = lambda d, i: d == 17 and i % 3 == 0  # noqa: E731
    matching = set(rag.matching_rowids(collection, where(spec)).tolist())
    assert len(matching) == 17
    far = -matrix[17 * PER_DOCUMENT : 18 * PER_DOCUMENT : 3].sum(axis=0)
    assert not {r for r, _ in rag.knn(collection, far.tolist(), 50)} & matching
    got = filtered_search(rag, collection, far, spec, K)
    expected = brute_force(matrix, far, keep, K)
    assert len(got) == K
    assert all(keep(p // PER_DOCUMENT, p % PER_DOCUMENT) for p, _ in got)
    overlap = len({p for p, _ in got} & {p for p, _ in expected})
    assert overlap >= (K - 1 if collection == "hnsw" else K)  # f16 may swap a near tie
    everything = filtered_search(rag, collection, far, spec, 40)
    assert {p for p, _ in everything} == {p for p, _ in brute_force(matrix, far, keep, 40)}


def test_lexical_matches_are_restricted_by_the_filter(big: tuple[Store, np.ndarray]) -> None:
    store, _ = big
    rag = searcher(store, "exact")
    spec = {"group": 4, "page": {"$ne": 1}}
    compiled = where(spec)
    allowed = set(rag.matching_rowids("exact", compiled).tolist())
    # "rivers" is in every odd chunk: 10,000 matches, ranked by BM25.
    everything = rag.lexical("exact", "rivers", 20_000)
    got = rag.lexical("exact", "rivers", 25, compiled)
    assert len(got) == 25
    assert {r for r, _ in got} <= allowed
    expected = [(r, s) for r, s in everything if r in allowed]
    assert [s for _, s in got] == pytest.approx([s for _, s in expected[:25]])
    assert {r for r, _ in got} <= {r for r, _ in expected}
    assert rag.lexical("exact", "rivers", 25, compile_filter({"group": 99})) == []


def test_similarities_take_any_number_of_rowids(big: tuple[Store, np.ndarray]) -> None:
    """Beyond SQLite's parameter limit on the sqlite-vec path (lexical-only hybrid matches)."""
    store, matrix = big
    rag = searcher(store, "scan")
    rowids = rag.matching_rowids("scan", where({"even": {"$exists": True}}))
    query = matrix[5]
    got = rag.similarities("scan", rowids.tolist(), query.tolist())
    assert len(got) == DOCUMENTS * PER_DOCUMENT
    assert got[int(rowids[5])] == pytest.approx(1.0, abs=1e-5)


# -- through the API and the vector_search step ------------------------------------------------

ECHO = {"model_path": "echo", "model_type": "echo"}
# (file, text, the metadata of its ingest request)
PASSAGES = [
    (
        "danube.txt",
        "The Danube river flows through Vienna and Budapest.",
        {"lang": "en", "year": 2020},
    ),
    ("loire.txt", "The Loire river flows through Orleans and Tours.", {"lang": "fr", "year": 2023}),
    ("alps.txt", "The Alps rise above Vienna and the river valleys.", {"lang": "en", "year": 2024}),
    ("rhine.txt", "The Rhine river flows past Basel and Cologne.", {"lang": "de", "year": 2021}),
]


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[httpx.Client]:
    with running_server(tmp_path_factory.mktemp("filters-api"), startup_models=[ECHO]) as client:
        for name, text, meta in PASSAGES:
            response = client.post(
                "/api/rag/ingest",
                data={"collection": "rivers", "metadata": json.dumps(meta)},
                files=[("files", (name, text.encode(), "text/plain"))],
            )
            assert response.status_code == 200, response.text
        yield client


def ask(client: httpx.Client, **body: Any) -> httpx.Response:
    return client.post(
        "/api/rag/query",
        json={
            "query": "Which river flows through Vienna?",
            "collection": "rivers",
            "model_id": "echo",
            "similarity_threshold": 0.0,
            "top_k": 4,
            **body,
        },
    )


def source_files(response: httpx.Response) -> list[str]:
    assert response.status_code == 200, response.text
    return [source["metadata"]["file"] for source in response.json()["sources"]]


def test_query_api_filters_sources(api: httpx.Client) -> None:
    assert sorted(source_files(ask(api))) == sorted(p[0] for p in PASSAGES)
    assert source_files(ask(api, filter={"lang": "fr"})) == ["loire.txt"]
    assert sorted(
        source_files(ask(api, filter={"year": {"$gte": 2021}, "lang": {"$ne": "de"}}))
    ) == [
        "alps.txt",
        "loire.txt",
    ]
    assert source_files(ask(api, filter={"file": {"$in": ["rhine.txt", "nile.txt"]}})) == [
        "rhine.txt"
    ]
    assert source_files(ask(api, filter={"lang": "sv"})) == []
    assert source_files(ask(api, filter={})) == source_files(ask(api))
    # The unfiltered first source is the Danube; without English ones it is not there.
    assert source_files(ask(api, top_k=1))[0] == "danube.txt"
    assert source_files(ask(api, top_k=1, filter={"lang": {"$nin": ["en"]}}))[0] != "danube.txt"


def test_query_api_filters_hybrid_and_threshold(api: httpx.Client) -> None:
    hybrid = source_files(ask(api, rerank=True, filter={"$or": [{"lang": "de"}, {"year": 2020}]}))
    assert sorted(hybrid) == ["danube.txt", "rhine.txt"]
    assert all(
        s["metadata"]["lang"] == "en"
        for s in ask(api, rerank=True, filter={"lang": "en"}).json()["sources"]
    )
    # The threshold still applies to the filtered chunks.
    assert source_files(ask(api, similarity_threshold=0.99, filter={"lang": "fr"})) == []


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ({"lang": {"$regex": "^e"}}, "unknown operator '$regex'"),
        ({"year": {"$gt": [2020]}}, "must be a string, number, boolean or null"),
        ({"$or": []}, "non-empty list"),
        ({"year": {"$in": list(range(2000))}}, "at most 1024 values"),
        ({f"k{i}": i for i in range(65)}, "at most 64 conditions"),
    ],
)
def test_query_api_refuses_bad_filters(api: httpx.Client, bad: Any, message: str) -> None:
    response = ask(api, filter=bad)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert error["param"] == "filter"
    assert error["code"] == "invalid_request"
    assert message in error["message"]


def test_query_api_refuses_a_filter_that_is_not_an_object(api: httpx.Client) -> None:
    response = ask(api, filter=["lang", "en"])
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert error["param"] == "filter"


def test_query_api_filter_on_unknown_collection_is_404(api: httpx.Client) -> None:
    response = ask(api, collection="nowhere", filter={"lang": "en"})
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "collection_not_found"


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def engine(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Engine]:
    engine = await start_engine(
        tmp_path_factory.mktemp("filters-step"), {"echo": (Path("echo"), "echo")}
    )
    try:
        for name, text, meta in PASSAGES:
            await engine.rag.ingest(
                "rivers",
                [Upload(name, text.encode(), "text/plain")],
                embedding_model="echo",
                metadata=meta,
            )
        yield engine
    finally:
        await engine.stop()


STEP = """
steps:
  - step_id: search
    type: vector_search
    collection: rivers
    query: "{{ input.q }}"
    top_k: 4
"""


@pytest.mark.asyncio(loop_scope="module")
async def test_vector_search_step_filter_written_out(engine: Engine) -> None:
    workflow = STEP + '    filter: {lang: en, year: {"$lt": 2024}}\n'
    run = await run_workflow(engine, workflow, {"q": "Which river flows through Vienna?"})
    assert run.status == "completed", run.result.error
    assert [h["metadata"]["file"] for h in run.output["search"]] == ["danube.txt"]


@pytest.mark.asyncio(loop_scope="module")
async def test_vector_search_step_filter_templated(engine: Engine) -> None:
    by_parts = STEP + '    filter: {lang: "{{ input.lang }}", year: {"$gte": "{{ input.year }}"}}\n'
    whole = STEP + '    filter: "{{ input.filter }}"\n'
    question = "Which river flows through Vienna?"
    run = await run_workflow(engine, by_parts, {"q": question, "lang": "en", "year": 2021})
    assert run.status == "completed", run.result.error
    assert [h["metadata"]["file"] for h in run.output["search"]] == ["alps.txt"]
    run = await run_workflow(
        engine, whole, {"q": question, "filter": {"$or": [{"lang": "fr"}, {"lang": "de"}]}}
    )
    assert run.status == "completed", run.result.error
    assert sorted(h["metadata"]["file"] for h in run.output["search"]) == ["loire.txt", "rhine.txt"]
    # A bad filter arriving at run time fails the step with the API's error.
    run = await run_workflow(engine, whole, {"q": question, "filter": {"lang": {"$like": "e%"}}})
    assert run.status == "failed"
    assert "unknown operator '$like'" in str(run.result.error)


def test_vector_search_step_filter_checked_at_validation() -> None:
    with pytest.raises(WorkflowInvalid, match=r"unknown operator '\$regex'"):
        compile_workflow(STEP + '    filter: {lang: {"$regex": "^e"}}\n')
    with pytest.raises(WorkflowInvalid, match="filter"):
        compile_workflow(STEP + "    filter: [lang, en]\n")
    compile_workflow(STEP + '    filter: {lang: "{{ input.lang }}"}\n')


def test_matching_rowids_of_documents_whose_chunks_are_not_one_run(
    store: Store, varied: RagStore
) -> None:
    """A document's chunks are one run of rowids when ingested; a chunk added to it later
    (by another writer) breaks the run, and the filter still finds every chunk."""
    with store.transaction() as conn:
        conn.execute(
            "INSERT INTO chunks (chunk_id, document_id, collection_id, idx, text, token_count)"
            " SELECT 'doc1_chunk_99', id, collection_id, 99, 'late', 1 FROM documents"
            " WHERE document_id = 'doc1'"
        )
    hits = every_hit(varied, "varied")
    assert len(hits) == 3 * len(METADATA) + 1
    for spec in ({"lang": "fr"}, {"document_id": "doc1"}, {"lang": "fr", "page": None}):
        got = varied.matching_rowids("varied", where(spec)).tolist()
        assert got == sorted(r for r, meta in hits.items() if reference(meta, spec))
    assert max(varied.matching_rowids("varied", where({"document_id": "doc1"}))) == max(hits)
