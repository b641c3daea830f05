"""RAG Provider API (spec §4) end to end: a real uvicorn, the real app and engine, tiny MLX
models loaded through the real loaders, documents built here (text, Markdown, HTML, a PDF
written by pdfium), real multipart uploads over HTTP; and `fusion ingest` as a user runs it.

Counts are checked against the store's own tables after every operation: documents,
chunks, FTS5 index rows and vec0 rows (RagStore.counts / totals)."""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from documents import pdfium_pdf
from serverutil import serve_app

from engine.config import Settings
from engine.rag.store import RagStore
from engine.store import Store
from server.app import create_app

EMBED_ID = "tiny-embedder"
LM_ID = "tiny-lm"
LIMIT_BYTES = 50_000  # rag_max_file_mb=0.05
MAX_FILES = 250
GEN = {"max_tokens": 4}
CHUNK_ID = re.compile(r"^(doc-[0-9a-f]{12})_chunk_(\d+)$")
PNG = b"\x89PNG\r\n\x1a\n" + b"\x00" * 64

TEXT = "\n\n".join(
    f"Paragraph {i} is about the river {name}, its bridges and the towns along it."
    for i, name in enumerate(["Danube", "Rhine", "Loire", "Elbe", "Tagus", "Po", "Oder"])
).encode()
MARKDOWN = b"""# Volcanoes

## Formation

Volcanoes form where magma reaches the surface through the crust.

## Eruptions

Explosive eruptions throw ash high into the atmosphere.
"""
HTML = b"""<!doctype html><html><head><title>Bees</title><script>var x = 1;</script></head>
<body><nav>Home | About</nav><h1>Honey bees</h1>
<p>Honey bees live in colonies with one queen and thousands of workers.</p>
<h2>Pollination</h2><p>Bees pollinate many crops while collecting nectar.</p></body></html>
"""


PDF = pdfium_pdf(
    [
        ["Solar panels turn sunlight into electricity.", "Silicon cells are common."],
        ["Wind turbines turn moving air into electricity.", "Offshore farms are large."],
    ]
)
DOCS = {
    "rivers.txt": (TEXT, "text/plain"),
    "volcanoes.md": (MARKDOWN, "text/markdown"),
    "bees.html": (HTML, "text/html"),
    "energy.pdf": (PDF, "application/pdf"),
}


@dataclass
class Api:
    client: httpx.Client
    base_url: str
    db: RagStore

    def ingest(
        self, collection: str, files: dict[str, tuple[bytes, str]], **fields: Any
    ) -> httpx.Response:
        parts = [("files", (name, data, ctype)) for name, (data, ctype) in files.items()]
        data = {"collection": collection, **{k: str(v) for k, v in fields.items()}}
        return self.client.post("/api/rag/ingest", data=data, files=parts)

    def query(self, **body: Any) -> httpx.Response:
        return self.client.post("/api/rag/query", json={"generation_config": GEN, **body})

    def info(self, collection: str) -> dict[str, Any]:
        response = self.client.get(f"/api/rag/collections/{collection}")
        assert response.status_code == 200, response.text
        body: dict[str, Any] = response.json()
        return body

    def assert_counts(self, collection: str, documents: int, chunks: int) -> None:
        """The API's counts, the store's tables, the FTS index and the vectors agree."""
        info = self.info(collection)
        assert (info["document_count"], info["chunk_count"]) == (documents, chunks)
        assert len(info["documents"]) == documents
        assert sum(d["chunk_count"] for d in info["documents"]) == chunks
        assert self.db.counts(collection) == {
            "documents": documents,
            "chunks": chunks,
            "fts_rows": chunks,
            "vector_rows": chunks,
        }


def _settings(data_dir: Path, models: list[dict[str, Any]]) -> Settings:
    return Settings(
        data_dir=data_dir,
        startup_models=models,
        workflows_dir=data_dir / "wf",
        log_level="warning",
        rag_max_file_mb=LIMIT_BYTES / 1_000_000,
        rag_max_files=MAX_FILES,
        # The module makes more requests than one client may in a minute.
        rate_limit_enabled=False,
    )


@pytest.fixture(scope="module")
def api(
    tmp_path_factory: pytest.TempPathFactory, tiny_embedder_dir: Path, tiny_lm_dir: Path
) -> Iterator[Api]:
    models = [
        {"model_path": str(tiny_embedder_dir), "model_type": "embeddings", "model_id": EMBED_ID},
        {"model_path": str(tiny_lm_dir), "model_type": "lm", "model_id": LM_ID},
    ]
    app = create_app(_settings(tmp_path_factory.mktemp("rag-api"), models))
    with (
        serve_app(app) as server,
        httpx.Client(base_url=server.base_url, timeout=60.0) as client,
    ):
        yield Api(client, server.base_url, app.state.engine.rag.db)


@pytest.fixture(scope="module")
def corpus(api: Api) -> dict[str, Any]:
    """The four formats ingested into collection 'corpus'; the ingest response."""
    response = api.ingest("corpus", DOCS, metadata=json.dumps({"source": "tests"}))
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def _error(response: httpx.Response, status: int, param: str | None = None) -> dict[str, Any]:
    assert response.status_code == status, response.text
    error: dict[str, Any] = response.json()["error"]
    assert set(error) >= {"type", "message", "param", "code"}
    if param is not None:
        assert error["param"] == param, error
    return error


# -- ingest ------------------------------------------------------------------------------------
def test_ingest_every_format(api: Api, corpus: dict[str, Any]) -> None:
    assert corpus["collection"] == "corpus"
    assert corpus["status"] == "completed"
    assert corpus["documents_ingested"] == 4
    assert len(set(corpus["document_ids"])) == 4
    assert corpus["embedding_time_ms"] > 0
    assert corpus["embedding_model"] == EMBED_ID
    assert corpus["duplicates"] == []
    # The tiny embedder reads 128 tokens: 512 is clamped and the response says so.
    assert corpus["chunk_size"] < 512
    assert "clamped" in corpus["warnings"][0]
    info = api.info("corpus")
    by_name = {d["filename"]: d for d in info["documents"]}
    assert set(by_name) == set(DOCS)
    assert [by_name[n]["document_id"] for n in DOCS] == corpus["document_ids"]
    assert all(d["chunk_count"] >= 1 for d in info["documents"])
    assert info["embedding_model"] == EMBED_ID
    assert (info["chunk_size"], info["overlap"]) == (corpus["chunk_size"], corpus["overlap"])
    assert info["metadata"] == {"source": "tests"}
    api.assert_counts("corpus", 4, corpus["chunks_created"])


def test_reingest_is_deduplicated(api: Api, corpus: dict[str, Any]) -> None:
    before = api.db.counts("corpus")
    again = api.ingest("corpus", {"copy-of-rivers.txt": DOCS["rivers.txt"], **DOCS})
    assert again.status_code == 200, again.text
    body = again.json()
    assert body["documents_ingested"] == 0
    assert body["chunks_created"] == 0
    assert body["document_ids"] == [corpus["document_ids"][0], *corpus["document_ids"]]
    assert body["duplicates"] == ["copy-of-rivers.txt", *DOCS]
    assert api.db.counts("corpus") == before


def test_same_content_twice_in_one_request_is_stored_once(api: Api) -> None:
    response = api.client.post(
        "/api/rag/ingest",
        data={"collection": "twice"},
        # `files[]` (PHP-style) is accepted as well as `files`.
        files=[
            ("files[]", ("one.txt", TEXT, "text/plain")),
            ("files", ("two.txt", TEXT, "text/plain")),
        ],
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["documents_ingested"] == 1
    assert body["document_ids"][0] == body["document_ids"][1]
    assert body["duplicates"] == ["two.txt"]
    api.assert_counts("twice", 1, body["chunks_created"])


def test_unsupported_file_fails_the_whole_request(api: Api, corpus: dict[str, Any]) -> None:
    before = api.db.counts("corpus")
    files = {"new.txt": (b"A brand new text about glaciers.", "text/plain")}
    response = api.ingest("corpus", {**files, "photo.png": (PNG, "image/png")})
    error = _error(response, 400, "files")
    assert "photo.png" in error["message"]
    assert api.db.counts("corpus") == before
    # Into a new collection: the collection is not created either.
    response = api.ingest("fresh", {**files, "photo.png": (PNG, "image/png")})
    _error(response, 400)
    _error(api.client.get("/api/rag/collections/fresh"), 404)


def test_file_over_the_limit_is_413_and_nothing_is_stored(api: Api) -> None:
    small = {"ok.txt": (b"A small valid file.", "text/plain")}
    big = {"big.txt": (b"word " * 1_000_000, "text/plain")}  # 5 MB, the limit is 50 KB
    response = api.ingest("limits", {**small, **big})
    error = _error(response, 413, "files")
    assert error["type"] == "payload_too_large_error"
    assert "big.txt" in error["message"]
    assert "50 KB" in error["message"]
    _error(api.client.get("/api/rag/collections/limits"), 404)
    # Exactly at the limit is fine.
    response = api.ingest("limits", {"edge.txt": (b"a" * (LIMIT_BYTES - 1) + b"\n", "text/plain")})
    assert response.status_code == 200, response.text


def test_limit_is_enforced_while_reading(api: Api) -> None:
    """The 413 arrives while most of the announced body has not even been sent: the
    server neither waited for nor buffered the rest."""
    boundary = "fusionTestBoundary"
    head = (
        f"--{boundary}\r\n"
        'Content-Disposition: form-data; name="collection"\r\n\r\nstreamed\r\n'
        f"--{boundary}\r\n"
        'Content-Disposition: form-data; name="files"; filename="huge.txt"\r\n'
        "Content-Type: text/plain\r\n\r\n"
    ).encode()
    announced = len(head) + 200_000_000  # 200 MB announced; 60 KB sent
    request = (
        "POST /api/rag/ingest HTTP/1.1\r\n"
        f"Host: {api.base_url.removeprefix('http://')}\r\n"
        f"Content-Type: multipart/form-data; boundary={boundary}\r\n"
        f"Content-Length: {announced}\r\n\r\n"
    ).encode()
    host, port = api.base_url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(request + head + b"x" * 60_000)
        received = b""
        while b"\r\n\r\n" not in received:
            piece = sock.recv(65536)
            assert piece, f"connection closed without a response: {received!r}"
            received += piece
        status_line, _, rest = received.partition(b"\r\n")
        headers, _, body = rest.partition(b"\r\n\r\n")
        length = int(re.search(rb"(?i)content-length: (\d+)", headers).group(1))  # type: ignore[union-attr]
        while len(body) < length:
            body += sock.recv(65536)
    assert status_line.split()[1] == b"413", received
    error = json.loads(body)["error"]
    assert error["param"] == "files"
    assert "huge.txt" in error["message"]
    _error(api.client.get("/api/rag/collections/streamed"), 404)


def test_many_files_past_litestars_body_cap(api: Api) -> None:
    """Litestar caps request bodies at 10 MB by default; ingest is bounded per file and by
    the number of files instead, so 11 MB of files within those bounds is accepted."""
    # Padding keeps the embedding work small: the point is the bytes on the wire.
    text = b"Lighthouses guide ships along the coast." + b" " * (LIMIT_BYTES - 100) + b"\n"
    files = [("files", (f"copy-{i}.txt", text, "text/plain")) for i in range(220)]
    assert sum(len(f[1][1]) for f in files) > 10 * 1024 * 1024
    response = api.client.post("/api/rag/ingest", data={"collection": "many"}, files=files)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["documents_ingested"] == 1  # identical content: stored once
    assert len(set(body["document_ids"])) == 1
    assert len(body["duplicates"]) == 219
    api.assert_counts("many", 1, body["chunks_created"])
    # One file more than the bound: 413, nothing read past it.
    files = [("files", (f"f{i}.txt", b"tiny", "text/plain")) for i in range(MAX_FILES + 1)]
    response = api.client.post("/api/rag/ingest", data={"collection": "toomany"}, files=files)
    assert f"at most {MAX_FILES}" in _error(response, 413, "files")["message"]
    _error(api.client.get("/api/rag/collections/toomany"), 404)


def test_embedding_model_field(api: Api) -> None:
    files = {"a.txt": (b"Some text.", "text/plain")}
    error = _error(api.ingest("embedders", files, embedding_model="not-loaded"), 404)
    assert (error["param"], error["code"]) == ("embedding_model", "model_not_found")
    _error(api.ingest("embedders", files, embedding_model=LM_ID), 400, "embedding_model")
    response = api.ingest("embedders", files, embedding_model=EMBED_ID)
    assert response.status_code == 200, response.text


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"chunk_size": "many"}, "chunk_size"),
        ({"chunk_size": "4"}, "chunk_size"),
        ({"overlap": "-1"}, "overlap"),
        ({"chunk_size": "64", "overlap": "64"}, "overlap"),
        ({"metadata": "{not json"}, "metadata"),
        ({"metadata": "[1, 2]"}, "metadata"),
        ({"collection": ""}, "collection"),
        ({"collection": "bad name!"}, "collection"),
        ({"chunksize": "100"}, "chunksize"),
        ({"index": "ivf"}, "index"),
    ],
)
def test_bad_parameters_are_400(api: Api, fields: dict[str, str], param: str) -> None:
    data = {"collection": "params", **fields}
    files = [("files", ("a.txt", b"Some text.", "text/plain"))]
    response = api.client.post("/api/rag/ingest", data=data, files=files)
    _error(response, 400, param)
    _error(api.client.get("/api/rag/collections/params"), 404)


def test_malformed_uploads_are_400(api: Api) -> None:
    _error(api.client.post("/api/rag/ingest", data={"collection": "x"}), 400)
    # Multipart, but no file part.
    response = api.client.post(
        "/api/rag/ingest", data={"collection": "x"}, files=[("collection2", ("a", b"", ""))]
    )
    _error(response, 400)
    # A file part sent as a plain field.
    response = api.client.post(
        "/api/rag/ingest",
        content=b'--b\r\nContent-Disposition: form-data; name="files"\r\n\r\ntext\r\n--b--\r\n',
        headers={"Content-Type": "multipart/form-data; boundary=b"},
    )
    _error(response, 400, "files")
    # Not multipart at all.
    response = api.client.post("/api/rag/ingest", json={"collection": "x"})
    assert "multipart/form-data" in _error(response, 400)["message"]
    # Cut off before the closing boundary.
    response = api.client.post(
        "/api/rag/ingest",
        content=b'--b\r\nContent-Disposition: form-data; name="collection"\r\n\r\nx',
        headers={"Content-Type": "multipart/form-data; boundary=b"},
    )
    _error(response, 400)
    _error(api.client.get("/api/rag/collections/x"), 404)


def test_no_embedding_model_is_503(tmp_path: Path, tiny_lm_dir: Path) -> None:
    models = [{"model_path": str(tiny_lm_dir), "model_type": "lm", "model_id": LM_ID}]
    with (
        serve_app(create_app(_settings(tmp_path, models))) as server,
        httpx.Client(base_url=server.base_url, timeout=60.0) as client,
    ):
        files = [("files", ("a.txt", b"Some text.", "text/plain"))]
        response = client.post("/api/rag/ingest", data={"collection": "c"}, files=files)
        error = _error(response, 503, "embedding_model")
        assert error["type"] == "service_unavailable_error"


# -- query -------------------------------------------------------------------------------------
def test_query_answers_with_sources(api: Api, corpus: dict[str, Any]) -> None:
    response = api.query(
        query="Where do volcanoes come from?",
        collection="corpus",
        top_k=50,
        similarity_threshold=-1.0,
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert isinstance(body["answer"], str)
    sources = body["sources"]
    assert len(sources) == corpus["chunks_created"]  # threshold -1, top_k above the total
    ids = set(corpus["document_ids"])
    for source in sources:
        match = CHUNK_ID.match(source["chunk_id"])
        assert match, source["chunk_id"]
        assert match.group(1) == source["metadata"]["document_id"]
        assert source["metadata"]["document_id"] in ids
        assert -1.0 <= source["score"] <= 1.0
        assert source["metadata"]["file"] in DOCS
        assert source["metadata"]["source"] == "tests"  # the ingest's metadata
        assert source["text"]
        if source["metadata"]["file"] == "energy.pdf":
            assert source["metadata"]["page"] in (1, 2)
        else:
            assert source["metadata"]["page"] is None
    scores = [s["score"] for s in sources]
    assert scores == sorted(scores, reverse=True)
    pages = {s["metadata"]["page"] for s in sources if s["metadata"]["file"] == "energy.pdf"}
    assert pages == {1, 2}
    assert body["retrieval_latency_ms"] > 0
    assert body["generation_latency_ms"] > 0
    assert body["total_latency_ms"] >= max(
        body["retrieval_latency_ms"], body["generation_latency_ms"]
    )
    meta = body["metadata"]
    assert (meta["collection"], meta["top_k"]) == ("corpus", 50)
    assert (meta["model_id"], meta["embedding_model"]) == (LM_ID, EMBED_ID)


def test_query_without_sources_and_top_k(api: Api, corpus: dict[str, Any]) -> None:
    body = api.query(
        query="bees", collection="corpus", include_sources=False, similarity_threshold=-1
    ).json()
    assert "sources" not in body
    assert isinstance(body["answer"], str)
    body = api.query(query="bees", collection="corpus", top_k=2, similarity_threshold=-1).json()
    assert len(body["sources"]) == 2


def test_similarity_threshold_filters(api: Api, corpus: dict[str, Any]) -> None:
    every = api.query(query="rivers", collection="corpus", top_k=100, similarity_threshold=-1)
    scores = [s["score"] for s in every.json()["sources"]]
    threshold = sorted(scores)[len(scores) // 2]
    kept = api.query(query="rivers", collection="corpus", top_k=100, similarity_threshold=threshold)
    assert kept.status_code == 200, kept.text
    kept_scores = [s["score"] for s in kept.json()["sources"]]
    assert kept_scores
    assert all(score >= threshold - 1e-6 for score in kept_scores)
    assert len(kept_scores) == sum(1 for score in scores if score >= threshold - 1e-6)
    none = api.query(query="rivers", collection="corpus", similarity_threshold=1.0).json()
    assert len(none["sources"]) <= 1  # only an exact duplicate of the query could reach 1.0


def test_hybrid_rerank(api: Api, corpus: dict[str, Any]) -> None:
    response = api.query(
        query="Explosive eruptions ash",
        collection="corpus",
        top_k=5,
        rerank=True,
        similarity_threshold=-1,
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["metadata"]["rerank"] is True
    sources = body["sources"]
    assert len(sources) == 5
    fused = [s["rerank_score"] for s in sources]
    assert fused == sorted(fused, reverse=True)
    assert all(0 < f <= 2 / 61 for f in fused)  # reciprocal rank fusion, k = 60, two lists
    assert all(-1 <= s["score"] <= 1 for s in sources)
    # The one chunk that has the query's words ranks first in both lists.
    assert "Explosive eruptions" in sources[0]["text"]


def test_hnsw_collection_through_the_api(api: Api) -> None:
    """`index: hnsw` from the ingest form: collection info says so once searched, and
    vector and hybrid queries answer from the graph (docs/rag.md "Approximate search")."""
    docs = {name: DOCS[name] for name in ("rivers.txt", "volcanoes.md", "bees.html")}
    response = api.ingest("graph", docs, index="hnsw")
    assert response.status_code == 200, response.text
    for rerank in (False, True):
        response = api.query(
            query="Explosive eruptions ash",
            collection="graph",
            top_k=3,
            rerank=rerank,
            similarity_threshold=-1,
        )
        assert response.status_code == 200, response.text
        sources = response.json()["sources"]
        assert len(sources) == 3
        assert all(-1 <= s["score"] <= 1 for s in sources)
    # Hybrid (the last query): the one chunk with the query's words ranks first.
    assert "Explosive eruptions" in sources[0]["text"]
    info = api.info("graph")
    assert (info["index"]["kind"], info["index"]["setting"]) == ("hnsw", "hnsw")
    assert info["index"]["vectors"] == info["chunk_count"]


def test_model_rerank(api: Api, corpus: dict[str, Any]) -> None:
    response = api.query(
        query="honey bees",
        collection="corpus",
        top_k=3,
        rerank=True,
        rerank_model=LM_ID,
        similarity_threshold=-1,
    )
    assert response.status_code == 200, response.text
    sources = response.json()["sources"]
    assert len(sources) == 3
    judged = [s["rerank_score"] for s in sources]
    assert judged == sorted(judged, reverse=True)
    assert all(0 <= j <= 1 for j in judged)
    # Wrong uses of rerank_model name it.
    _error(
        api.query(query="q", collection="corpus", rerank=True, rerank_model="nope"),
        404,
        "rerank_model",
    )
    _error(
        api.query(query="q", collection="corpus", rerank=True, rerank_model=EMBED_ID),
        400,
        "rerank_model",
    )
    _error(api.query(query="q", collection="corpus", rerank_model=LM_ID), 400, "rerank_model")


def test_query_validation(api: Api, corpus: dict[str, Any]) -> None:
    _error(api.client.post("/api/rag/query", json={"collection": "corpus"}), 400, "query")
    _error(api.query(query="q", collection="corpus", top_k=0), 400, "top_k")
    _error(
        api.query(query="q", collection="corpus", similarity_threshold=1.5),
        400,
        "similarity_threshold",
    )
    _error(api.query(query="q", collection="corpus", topk=3), 400)
    _error(api.query(query="q", collection="corpus", model_id="nope"), 404, "model_id")
    bad_config = {"query": "q", "collection": "corpus", "generation_config": {"temp": 1}}
    _error(api.client.post("/api/rag/query", json=bad_config), 400, "generation_config")


def test_unknown_collection_is_404(api: Api) -> None:
    for response in (
        api.query(query="anything", collection="missing"),
        api.client.get("/api/rag/collections/missing"),
        api.client.delete("/api/rag/collections/missing"),
        api.client.delete("/api/rag/documents/missing/doc-000000000000"),
    ):
        error = _error(response, 404)
        assert error["code"] == "collection_not_found"
        assert error["type"] == "not_found_error"
    # The default collection is 'default', and it does not exist yet.
    assert _error(api.query(query="anything"), 404)["code"] == "collection_not_found"


# -- collections -------------------------------------------------------------------------------
def test_collection_lifecycle(api: Api) -> None:
    docs = {name: DOCS[name] for name in ("rivers.txt", "volcanoes.md", "bees.html")}
    response = api.ingest("life", docs, metadata='{"description": "lifecycle"}')
    assert response.status_code == 200, response.text
    ingested = response.json()
    total = ingested["chunks_created"]
    api.assert_counts("life", 3, total)

    listed = {c["name"]: c for c in api.client.get("/api/rag/collections").json()["collections"]}
    life = listed["life"]
    assert set(life) == {
        "name",
        "document_count",
        "chunk_count",
        "created_at",
        "updated_at",
        "metadata",
    }
    assert (life["document_count"], life["chunk_count"]) == (3, total)
    assert life["metadata"] == {"description": "lifecycle"}
    assert life["created_at"].endswith("Z")
    assert life["updated_at"] >= life["created_at"]

    first = api.info("life")["documents"][0]
    response = api.client.delete(f"/api/rag/documents/life/{first['document_id']}")
    assert response.status_code == 200, response.text
    assert response.json() == {
        "collection": "life",
        "document_id": first["document_id"],
        "chunks_deleted": first["chunk_count"],
        "status": "deleted",
    }
    remaining = total - first["chunk_count"]
    api.assert_counts("life", 2, remaining)
    assert first["document_id"] not in [d["document_id"] for d in api.info("life")["documents"]]
    # Its chunks are gone from search too.
    hits = api.query(query="rivers", collection="life", top_k=100, similarity_threshold=-1)
    assert first["document_id"] not in {
        s["metadata"]["document_id"] for s in hits.json()["sources"]
    }
    error = _error(api.client.delete(f"/api/rag/documents/life/{first['document_id']}"), 404)
    assert error["code"] == "document_not_found"

    # Re-ingesting the deleted document stores it again, under a new id.
    name = first["filename"]
    again = api.ingest("life", {name: docs[name]}).json()
    assert again["documents_ingested"] == 1
    assert again["document_ids"] != [first["document_id"]]
    api.assert_counts("life", 3, total)

    response = api.client.delete("/api/rag/collections/life")
    assert response.status_code == 200, response.text
    assert response.json() == {
        "collection": "life",
        "documents_deleted": 3,
        "chunks_deleted": total,
        "status": "deleted",
    }
    names = [c["name"] for c in api.client.get("/api/rag/collections").json()["collections"]]
    assert "life" not in names
    _error(api.client.get("/api/rag/collections/life"), 404)
    # Nothing orphaned anywhere: the index and the vectors match the chunks left.
    totals = api.db.totals()
    assert totals["fts_rows"] == totals["chunks"] == totals["vector_rows"]


# -- fusion ingest -----------------------------------------------------------------------------
def _fusion() -> list[str]:
    script = shutil.which("fusion", path=str(Path(sys.executable).parent))
    return [script] if script else [sys.executable, "-m", "engine.cli"]


def test_fusion_ingest_cli(tmp_path: Path, tiny_embedder_dir: Path) -> None:
    docs = tmp_path / "docs"
    (docs / "nested" / "deeper").mkdir(parents=True)
    (docs / ".git").mkdir()
    (docs / "rivers.txt").write_bytes(TEXT)
    (docs / "nested" / "volcanoes.md").write_bytes(MARKDOWN)
    (docs / "nested" / "deeper" / "energy.pdf").write_bytes(PDF)
    (docs / "nested" / "picture.png").write_bytes(PNG)  # not a document type: skipped
    (docs / ".git" / "notes.txt").write_text("hidden")  # hidden: skipped
    (tmp_path / "bees.html").write_bytes(HTML)
    data_dir = tmp_path / "data"
    common = ["--embedding-model", str(tiny_embedder_dir), "--data-dir", str(data_dir)]
    ok = subprocess.Popen(
        [
            *_fusion(),
            "ingest",
            "cli",
            str(docs),
            str(tmp_path / "bees.html"),
            *common,
            "--chunk-size",
            "64",
            "--overlap",
            "8",
            "--metadata",
            '{"origin": "cli"}',
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    # An unsupported file named explicitly fails the whole ingest (nothing stored).
    bad = subprocess.Popen(
        [
            *_fusion(),
            "ingest",
            "bad",
            str(docs / "rivers.txt"),
            str(docs / "nested" / "picture.png"),
            "--embedding-model",
            str(tiny_embedder_dir),
            "--data-dir",
            str(tmp_path / "bad-data"),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    out, err = ok.communicate(timeout=120)
    bad_out, bad_err = bad.communicate(timeout=120)
    assert ok.returncode == 0, err
    result = json.loads(out)
    assert result["documents_ingested"] == 4
    assert (result["chunk_size"], result["overlap"]) == (64, 8)
    for label in ("reading", "embedding", "storing"):
        assert re.search(rf"{label}\s+\[#{{30}}\] 100%", err), err
    assert f"{result['chunks_created']}/{result['chunks_created']} chunks" in err

    assert bad.returncode == 2, bad_err
    assert bad_out == ""
    assert "picture.png" in bad_err

    with Store(data_dir / "fusion.sqlite3") as store:
        db = RagStore(store)
        names = sorted(d.filename for d in db.documents("cli"))
        assert names == [
            "bees.html",
            "nested/deeper/energy.pdf",
            "nested/volcanoes.md",
            "rivers.txt",
        ]
        assert all(d.metadata == {"origin": "cli"} for d in db.documents("cli"))
        chunks = result["chunks_created"]
        assert db.counts("cli") == {
            "documents": 4,
            "chunks": chunks,
            "fts_rows": chunks,
            "vector_rows": chunks,
        }
    with Store(tmp_path / "bad-data" / "fusion.sqlite3") as store:
        assert RagStore(store).list_collections() == []
