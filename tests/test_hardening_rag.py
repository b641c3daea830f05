"""Issue #8, findings 6 and 12b: RAG ingest cannot be frozen, exhausted or crashed by a
document or a form field.

Extraction is linear on adversarial Markdown, HTML and sniffed input (each case once took
seconds for kilobytes); every per-document budget answers 413 naming its setting with
nothing written; extraction runs in the sandbox under time and memory budgets; ingest
embeds in bounded batches, so a query answers during a long ingest, and a cancelled
ingest stops within one batch and leaves no trace; deep metadata is a 400, not a 500.
Real components throughout: the sandbox's worker processes, tiny MLX models, a real
SQLite store and, for the HTTP cases, a real uvicorn server."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx
import pytest
import pytest_asyncio
from api_helpers import wait_for
from documents import shared_stream_pdf
from serverutil import serve_app
from step_helpers import start_engine

from engine.config import Settings
from engine.errors import InvalidRequest, PayloadTooLarge
from engine.rag.extract import extract, extract_limits
from engine.rag.service import IngestLimits, RagService, Upload
from engine.services import Engine
from server.app import create_app

EMBED_ID = "tiny-embedder"
# A hang guard, not a measure of speed: each adversarial input below took from 17 s (50 KB)
# to days before the fix (hours to centuries at the sizes used here), and a fraction of a
# second now. The thread method ends a test stuck inside a C-level regex, which the default
# signal method cannot interrupt.
HANG_GUARD = pytest.mark.timeout(120, method="thread")
WAIT_S = 60.0  # upper bound of any wait on the engine; only reached when something is wrong


def _extract(name: str, data: bytes, **limits: int) -> Any:
    """The extraction, or the refusal it raised."""
    chosen = replace(extract_limits(Settings()), **limits)
    try:
        return extract(name, data, limits=chosen)
    except (InvalidRequest, PayloadTooLarge) as exc:
        return exc


# --- linear extraction -----------------------------------------------------------------

MARKDOWN_ATTACKS = [
    b"[",  # the link pattern: 50 KB took 17 s
    b"[a](",
    b"![",
    b"[a][",
    b"**a ",
    b"__a ",
    b"*a ",
    b"_a ",
    b"~~a ",
    b"<http:",
    b"`a ``",
    b"` ",
    b"#  ",
    b"a  \t",
]


@HANG_GUARD
@pytest.mark.parametrize("unit", MARKDOWN_ATTACKS, ids=repr)
def test_markdown_extraction_is_linear_on_adversarial_lines(unit: bytes) -> None:
    # One line of 2 MB (and a heading line of the same): quadratic time would be hours.
    line = unit * (2_000_000 // len(unit))
    for data in (b"x " + line + b" end", b"# " + line):
        result = _extract("attack.md", data)
        assert not isinstance(result, Exception) or result.code == "invalid_document"


def test_markdown_inline_markup_still_stripped() -> None:
    text = (
        b"A [link](https://x.org), ![alt](i.png), [ref][1], **bold *nested* text**, "
        b"__strong__, *em*, _em_, snake_case_name, ~~gone~~, <https://x.org>, "
        b"`a **raw** span`, ``code with ` tick``.\n\n## Title ##\n\nBody.\n"
    )
    result = extract("x.md", text)
    assert result.sections[0].text == (
        "A link, alt, ref, bold nested text, strong, em, em, snake_case_name, gone, "
        "https://x.org, a **raw** span, code with ` tick."
    )
    assert result.sections[1].heading == "Title"


def test_front_matter_title_must_be_a_scalar() -> None:
    # An alias-built list as the title: str() of it would expand every alias.
    bomb = b"---\na: &a [x, x, x, x, x, x, x, x]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a]\n"
    bomb += b"c: &c [*b, *b, *b, *b, *b, *b, *b, *b]\ntitle: [*c, *c, *c, *c, *c, *c, *c]\n"
    bomb += b"---\nBody text.\n"
    result = _extract("bomb.md", bomb)
    assert result.title is None  # a list is no title: never str()-ed, which expands it
    assert result.sections[0].text == "Body text."


@HANG_GUARD
def test_html_sniffing_is_linear_on_comments() -> None:
    # The sniffing pattern backtracked exponentially: 241 bytes took 125 s.
    data = b"<!--a-->" * 500 + b"X plain words"
    result = _extract("notes.txt", data)
    assert result.format == "text"
    assert extract(
        "page.txt", b"<!-- a --> <!--b-->\n<html><body><p>Hi</p></body></html>"
    ).format == ("html")


@HANG_GUARD
@pytest.mark.parametrize("depth", [200_000, 400_000])
def test_deeply_nested_html_is_refused_by_the_depth_limit(depth: int) -> None:
    # 200k nested <div> took 98 s in the parser (quadratic in the nesting); the depth limit
    # refuses it instead, and only the limit answers document_too_large naming its setting.
    for opener in (b"<div>", b"<div/>", b"<span><b>"):
        result = _extract("deep.html", opener * depth + b"x")
        assert isinstance(result, PayloadTooLarge)
        assert result.code == "document_too_large"
        assert "rag_max_html_depth" in result.message
        assert "deep.html" in result.message


def test_html_within_the_depth_limit_and_long_flat_markup_are_read() -> None:
    nested = b"<div>" * 400 + b"deep text" + b"</div>" * 400
    assert extract("ok.html", nested).sections[0].text == "deep text"
    # Unclosed <p>, <li> and table cells do not nest: 100,000 of them are flat.
    flat = b"<p>para" * 50_000 + b"<ol>" + b"<li>item" * 50_000 + b"</ol>"
    flat += b"<table>" + b"<tr><td>cell" * 20_000 + b"</table>"
    # Read whole, not refused by the depth limit: the unclosed tags did not nest.
    result = _extract("flat.html", flat)
    lines = result.sections[0].text.split("\n")
    assert "1. item" in lines
    assert "50000. item" in lines
    assert lines.count("cell") == 20_000


def test_depth_limit_is_a_setting() -> None:
    nested = b"<div>" * 50 + b"deep text"
    assert isinstance(_extract("x.html", nested, max_html_depth=40), PayloadTooLarge)
    assert _extract("x.html", nested, max_html_depth=60).sections


# --- extraction budgets ----------------------------------------------------------------


def test_pdf_sharing_one_content_stream_is_stopped_by_the_page_budget() -> None:
    # A 5 KB PDF of this shape produced 8.9 M characters.
    pdf = shared_stream_pdf(pages=3, line="amplified text ", repeat=2_000)
    result = _extract("shared.pdf", pdf, max_page_chars=20_000)
    assert isinstance(result, PayloadTooLarge)
    assert "page 1" in result.message
    assert "rag_max_pdf_page_chars" in result.message


def test_pdf_document_chars_and_pages_budgets() -> None:
    pdf = shared_stream_pdf(pages=40, line="amplified text ", repeat=200)  # 3,000 a page
    result = _extract("many.pdf", pdf, max_chars=50_000)
    assert isinstance(result, PayloadTooLarge)
    assert "rag_max_document_chars" in result.message
    result = _extract("many.pdf", pdf, max_pages=39)
    assert isinstance(result, PayloadTooLarge)
    assert "rag_max_pdf_pages" in result.message
    assert len(_extract("many.pdf", pdf, max_pages=40).sections) == 40


@pytest.mark.parametrize("name", ["big.txt", "big.md", "big.html"])
def test_document_chars_budget_for_text_formats(name: str) -> None:
    data = b"<p>" if name.endswith("html") else b""
    data += b"Plenty of words in one sentence. " * 2_000  # 66,000 characters
    result = _extract(name, data, max_chars=60_000)
    assert isinstance(result, PayloadTooLarge)
    assert result.status == 413
    assert result.details == {"file": name}
    assert "rag_max_document_chars" in result.message
    assert _extract(name, data, max_chars=70_000).sections


# --- the service: sandbox budgets, chunk budget, batches, cancellation -------------------


def _sentences(count: int) -> bytes:
    return " ".join(
        f"Sentence number {i} talks about rivers and towns." for i in range(count)
    ).encode()


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def engine(
    tmp_path_factory: pytest.TempPathFactory, tiny_embedder_dir: Path
) -> AsyncIterator[Engine]:
    engine = await start_engine(
        tmp_path_factory.mktemp("hardening-rag"), {EMBED_ID: (tiny_embedder_dir, "embeddings")}
    )
    try:
        await engine.rag.ingest("base", [Upload("base.txt", _sentences(20), "text/plain")])
        yield engine
    finally:
        await engine.stop()


def _service(engine: Engine, **changes: Any) -> RagService:
    limits = replace(IngestLimits.from_settings(Settings()), **changes)
    return RagService(engine.store, engine.models, limits)


async def _too_large(service: RagService, upload: Upload, collection: str) -> PayloadTooLarge:
    with pytest.raises(PayloadTooLarge) as caught:
        await service.ingest(collection, [upload], chunk_size=16, overlap=0)
    assert service.db.find_collection(collection) is None  # nothing written
    return caught.value


@pytest.mark.asyncio(loop_scope="module")
async def test_chunk_budget(engine: Engine) -> None:
    service = _service(engine, max_chunks=10)
    error = await _too_large(service, Upload("long.txt", _sentences(200)), "chunks")
    assert "more than 10 chunks" in error.message
    assert "rag_max_document_chunks" in error.message
    assert error.details == {"file": "long.txt"}


@pytest.mark.asyncio(loop_scope="module")
async def test_extraction_memory_budget_in_the_sandbox(engine: Engine) -> None:
    # Two million lines: their str objects alone need far more than 32 MB.
    service = _service(engine, extract_memory_mb=32)
    error = await _too_large(service, Upload("huge.md", b"word\n" * 2_000_000), "memory")
    assert "rag_extract_memory_mb" in error.message


@pytest.mark.asyncio(loop_scope="module")
async def test_extraction_time_budget_in_the_sandbox(engine: Engine) -> None:
    service = _service(engine, extract_timeout_s=0.05)
    # A started worker first: a fresh one is allowed its start-up time on top.
    await _service(engine).ingest("warm", [Upload("w.txt", b"Warm up the worker.")])
    slow = b"# Heading\n\n" + b"Some *emphasis* and a [link](u) on a line.\n" * 150_000
    error = await _too_large(service, Upload("slow.md", slow), "slow")
    assert "rag_extract_timeout_s" in error.message


def _embedding_progress() -> tuple[list[int], asyncio.Event, Callable[[str, int, int], None]]:
    """An ingest progress callback recording how many chunks were embedded after each
    model call, and an event set at the first."""
    steps: list[int] = []
    embedding = asyncio.Event()

    def progress(stage: str, done: int, total: int) -> None:
        if stage == "embed" and done:
            steps.append(done)
            embedding.set()

    return steps, embedding, progress


@pytest.mark.asyncio(loop_scope="module")
async def test_query_answers_during_a_long_ingest_and_batches_are_bounded(engine: Engine) -> None:
    service = _service(engine, embed_batch=2)
    steps, embedding, progress = _embedding_progress()

    ingest = asyncio.create_task(
        service.ingest(
            "long",
            [Upload("long.txt", _sentences(300))],
            chunk_size=16,
            overlap=0,
            on_progress=progress,
        )
    )
    await asyncio.wait_for(embedding.wait(), WAIT_S)
    hits = await asyncio.wait_for(service.search("base", query="rivers"), WAIT_S)
    assert hits
    assert not ingest.done()
    result = await asyncio.wait_for(ingest, WAIT_S)
    assert steps[-1] == result.chunks_created > 100
    # Each model call embedded at most `embed_batch` chunks.
    assert all(0 < b - a <= 2 for a, b in zip([0, *steps], steps, strict=False))


@pytest.mark.asyncio(loop_scope="module")
async def test_cancelled_ingest_stops_within_a_batch_and_writes_nothing(engine: Engine) -> None:
    service = _service(engine, embed_batch=2)
    steps, embedding, progress = _embedding_progress()

    before = service.db.counts("base")
    ingest = asyncio.create_task(
        service.ingest(
            "gone",
            [Upload("a.txt", _sentences(150)), Upload("b.txt", _sentences(160))],
            chunk_size=16,
            overlap=0,
            on_progress=progress,
        )
    )
    await asyncio.wait_for(embedding.wait(), WAIT_S)
    ingest.cancel()
    with pytest.raises(asyncio.CancelledError):
        await ingest
    seen = len(steps)
    # The model's queue is free at once, and the ingest makes no further calls: a search
    # goes through the same model after it.
    assert engine.models.get(EMBED_ID).slots.active == 0
    assert await asyncio.wait_for(service.search("base", query="towns"), WAIT_S)
    assert len(steps) == seen
    assert service.db.find_collection("gone") is None
    assert service.db.counts("base") == before


@pytest.mark.asyncio(loop_scope="module")
async def test_metadata_depth_and_size_are_bounded(engine: Engine) -> None:
    service = _service(engine, metadata_max_depth=4, metadata_max_bytes=100)
    upload = [Upload("m.txt", b"Metadata test.")]
    deep: Any = "leaf"
    for _ in range(5):
        deep = {"k": [deep]}
    with pytest.raises(InvalidRequest) as caught:
        await service.ingest("meta", upload, metadata=deep)
    assert caught.value.code == "metadata_too_deep"
    assert caught.value.param == "metadata"
    with pytest.raises(InvalidRequest) as caught:
        await service.ingest("meta", upload, metadata={"k": "v" * 200})
    assert "rag_metadata_max_bytes" in caught.value.message
    result = await service.ingest("meta", upload, metadata={"k": {"l": ["v"]}})
    assert result.documents_ingested == 1


# --- over HTTP: clear answers, and /health stays prompt --------------------------------


@pytest.fixture(scope="module")
def client(
    tmp_path_factory: pytest.TempPathFactory, tiny_embedder_dir: Path
) -> Iterator[httpx.Client]:
    data_dir = tmp_path_factory.mktemp("hardening-rag-http")
    settings = Settings(
        data_dir=data_dir,
        workflows_dir=data_dir / "wf",
        log_level="warning",
        startup_models=[
            {"model_path": str(tiny_embedder_dir), "model_type": "embeddings", "model_id": EMBED_ID}
        ],
        # The test polls model stats more often than one client may in a minute.
        rate_limit_enabled=False,
    )
    with (
        serve_app(create_app(settings)) as server,
        httpx.Client(base_url=server.base_url, timeout=WAIT_S) as client,
    ):
        yield client


def _ingest(client: httpx.Client, name: str, data: bytes, **fields: str) -> httpx.Response:
    return client.post(
        "/api/rag/ingest",
        data={"collection": "http", **fields},
        files=[("files", (name, data, "application/octet-stream"))],
    )


def test_http_metadata_nested_10000_deep_is_a_400(client: httpx.Client) -> None:
    body = _ingest(client, "a.txt", b"Some text.", metadata='{"a":' * 10_000 + "1" + "}" * 10_000)
    assert body.status_code == 400, body.text
    error = body.json()["error"]
    assert (error["param"], error["code"]) == ("metadata", "metadata_too_deep")
    assert "rag_metadata_max_depth" in error["message"]
    assert client.get("/health").status_code == 200  # the client's timeout is the hang guard


def test_http_adversarial_documents_answer_clearly_and_the_server_lives(
    client: httpx.Client,
) -> None:
    nested = _ingest(client, "deep.html", b"<div>" * 200_000 + b"x")
    assert nested.status_code == 413, nested.text
    assert nested.json()["error"]["code"] == "document_too_large"
    assert "rag_max_html_depth" in nested.json()["error"]["message"]
    links = _ingest(client, "links.md", b"[" * 100_000 + b"\n\nA sentence.")
    assert links.status_code == 200, links.text
    assert client.get("/health").status_code == 200
    assert json.loads(links.text)["documents_ingested"] == 1


def test_http_health_answers_during_a_long_ingest(client: httpx.Client) -> None:
    """Ordering, not speed: once the ingest is known to be embedding (its batches counted
    in the embedder's stats), /health answers before the ingest ends."""
    done = threading.Event()
    answer: list[httpx.Response] = []

    def embed_requests() -> int:
        count: int = client.get(f"/v1/models/{EMBED_ID}/stats").json()["request_count"]
        return count

    before = embed_requests()

    def ingest() -> None:
        try:
            answer.append(
                _ingest(client, "long.txt", _sentences(3_000), chunk_size="16", overlap="0")
            )
        finally:
            done.set()

    worker = threading.Thread(target=ingest)
    worker.start()
    try:
        wait_for(lambda: embed_requests() >= before + 2, WAIT_S, "the ingest embedding")
        assert client.get("/health").status_code == 200
        assert not done.is_set()  # /health overtook the ingest
    finally:
        worker.join(WAIT_S)
    assert answer[0].status_code == 200, answer[0].text
