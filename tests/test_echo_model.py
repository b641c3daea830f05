"""The fake `echo` model: loaded through the registry like any model and over HTTP, its
chat, tokens and embeddings exactly as documented (docs/api.md), served by the
OpenAI-compatible endpoints, and a workflow's model_call steps run on it."""

from __future__ import annotations

import math
import threading
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest
from api_helpers import running_server, sse_payloads

from engine.config import Settings
from engine.models.backends import default_backends
from engine.models.backends.base import ChatChunk, ChatParams
from engine.models.backends.echo import DIMENSION, EchoModel, vector
from engine.models.registry import ModelRegistry
from engine.models.types import LoadSpec

MESSAGES = [
    {"role": "system", "content": "You repeat things."},
    {"role": "user", "content": "first question"},
    {"role": "assistant", "content": "first question"},
    {"role": "user", "content": "the quick brown fox jumps"},
]


@pytest.fixture
async def registry() -> AsyncIterator[ModelRegistry]:
    models = ModelRegistry(default_backends(Settings()), budget_bytes=2**30)
    yield models
    await models.close()


async def _chunks(registry: ModelRegistry, params: ChatParams) -> list[ChatChunk]:
    return [chunk async for chunk in registry.chat_stream("echo", MESSAGES, params)]


# -- through the registry ---------------------------------------------------------------
async def test_echo_loads_through_the_registry_with_no_files_and_no_memory(
    registry: ModelRegistry,
) -> None:
    entry = await registry.load(LoadSpec("echo", "echo"))
    assert (entry.id, entry.type, entry.memory_bytes) == ("echo", "echo", 0)
    assert entry.model.weight_bytes == 0
    # model_path is a label, never read: the id defaults to it like any path.
    other = await registry.load(LoadSpec("no/such/dir", "echo", context_length=128))
    assert (other.id, other.model.context_length) == ("no/such/dir", 128)
    freed, _ = await registry.unload("echo")
    assert freed == 0
    assert [e.id for e in registry.entries()] == ["no/such/dir"]


async def test_chat_streams_the_last_user_message_a_word_at_a_time(
    registry: ModelRegistry,
) -> None:
    await registry.load(LoadSpec("echo", "echo"))
    chunks = await _chunks(registry, ChatParams())
    assert [c.text for c in chunks] == ["the", " quick", " brown", " fox", " jumps", ""]
    last = chunks[-1]
    # Prompt tokens: the words of every message (3 + 2 + 2 + 5).
    assert (last.finish_reason, last.prompt_tokens, last.completion_tokens) == ("stop", 12, 5)
    stats = registry.get("echo").stats
    assert (stats.request_count, stats.total_tokens) == (1, 17)


async def test_max_tokens_counts_words_and_ends_with_length(registry: ModelRegistry) -> None:
    await registry.load(LoadSpec("echo", "echo"))
    result = await registry.chat("echo", MESSAGES, ChatParams(max_tokens=2))
    assert (result.content, result.finish_reason, result.completion_tokens) == (
        "the quick",
        "length",
        2,
    )
    whole = await registry.chat("echo", MESSAGES, ChatParams(max_tokens=5))
    assert (whole.content, whole.finish_reason) == ("the quick brown fox jumps", "stop")


async def test_a_stop_string_cuts_the_answer_before_it(registry: ModelRegistry) -> None:
    await registry.load(LoadSpec("echo", "echo"))
    result = await registry.chat("echo", MESSAGES, ChatParams(stop=["own f", "zzz"]))
    assert (result.content, result.finish_reason, result.completion_tokens) == (
        "the quick br",
        "stop",
        3,
    )


def test_a_set_stop_event_cancels_the_answer() -> None:
    stop = threading.Event()
    stop.set()
    chunks = list(EchoModel(None).chat_stream(MESSAGES, ChatParams(), stop))
    assert [(c.text, c.finish_reason) for c in chunks] == [("", "cancelled")]


async def test_words_are_tokens_with_their_spans(registry: ModelRegistry) -> None:
    await registry.load(LoadSpec("echo", "echo"))
    assert await registry.count_tokens("echo", "  one two\tthree\n") == 3
    model = registry.get("echo").model
    assert model.token_offsets("  one two\tthree\n") == [(2, 5), (6, 9), (10, 15)]


async def test_embeddings_are_deterministic_unit_vectors_near_for_shared_words(
    registry: ModelRegistry,
) -> None:
    await registry.load(LoadSpec("echo", "echo"))
    texts = ["red apples", "Apples red", "blue sky", ""]
    result = await registry.embed("echo", texts)
    assert result.prompt_tokens == 6
    assert result.truncated == [False] * 4
    assert all(len(v) == DIMENSION for v in result.vectors)
    assert all(math.isclose(sum(x * x for x in v), 1.0) for v in result.vectors)
    assert result.vectors[0] == result.vectors[1] == vector("red apples")  # a bag of words
    assert result.vectors[0] != result.vectors[2]
    again = await registry.embed("echo", texts)
    assert again.vectors == result.vectors


# -- over HTTP --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[httpx.Client]:
    with running_server(tmp_path_factory.mktemp("echo-api")) as client:
        response = client.post("/v1/models/load", json={"model_path": "echo", "model_type": "echo"})
        assert response.status_code == 200, response.text
        yield client


def test_http_load_lists_and_describes_echo(client: httpx.Client) -> None:
    [item] = client.get("/v1/models").json()["data"]
    assert {k: item[k] for k in ("id", "type", "family", "tags", "vram_usage_gb")} == {
        "id": "echo",
        "type": "echo",
        "family": "echo",
        "tags": ["local", "chat"],
        "vram_usage_gb": 0.0,
    }
    info = client.get("/v1/models/echo/info").json()
    assert info["capabilities"] == ["chat", "embeddings"]
    assert info["batch"] is None
    loaded = client.post(
        "/v1/models/load", json={"model_path": "spare", "model_type": "echo"}
    ).json()
    assert (loaded["model_id"], loaded["vram_usage_gb"]) == ("spare", 0.0)
    unloaded = client.delete("/v1/models/spare/unload")
    assert unloaded.status_code == 200, unloaded.text


def test_openai_chat_answers_with_the_last_user_message(client: httpx.Client) -> None:
    response = client.post(
        "/v1/chat/completions", json={"model": "echo", "messages": MESSAGES, "max_tokens": 4}
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["choices"][0]["message"]["content"] == "the quick brown fox"
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["usage"] == {
        "prompt_tokens": 12,
        "completion_tokens": 4,
        "total_tokens": 16,
        "prompt_tokens_details": {"cached_tokens": 0},
    }


def test_openai_chat_stream_sends_a_chunk_per_word(client: httpx.Client) -> None:
    body = {"model": "echo", "messages": MESSAGES, "stream": True}
    with client.stream("POST", "/v1/chat/completions", json=body) as response:
        assert response.status_code == 200
        payloads = sse_payloads(response.iter_lines())
    assert payloads[-1] == "[DONE]"
    deltas = [
        p["choices"][0]["delta"].get("content")
        for p in payloads[:-1]
        if p.get("choices") and p["choices"][0]["delta"].get("content")
    ]
    assert deltas == ["the", " quick", " brown", " fox", " jumps"]
    finishes = [p["choices"][0]["finish_reason"] for p in payloads[:-1] if p.get("choices")]
    assert finishes[-1] == "stop"


def test_openai_embeddings(client: httpx.Client) -> None:
    response = client.post("/v1/embeddings", json={"model": "echo", "input": ["a b c", "d"]})
    assert response.status_code == 200, response.text
    body = response.json()
    assert [d["embedding"] for d in body["data"]] == [
        pytest.approx(vector("a b c")),
        pytest.approx(vector("d")),
    ]
    assert body["usage"]["prompt_tokens"] == 4


GREETING: dict[str, Any] = {
    "id": "greeting",
    "name": "Greeting",
    "models": {"generation": {"type": "lm"}, "retrieval": {"type": "embeddings"}},
    "input_schema": {
        "type": "object",
        "properties": {"name": {"type": "string"}},
        "required": ["name"],
    },
    "steps": [
        {
            "step_id": "answer",
            "type": "model_call",
            "model_id": "{{ models.generation }}",
            "operation": "chat",
            "input": {"prompt": "Hello {{ input.name }}, nice to meet you", "max_tokens": 3},
        },
        {
            "step_id": "tokens",
            "type": "model_call",
            "model_id": "{{ models.generation }}",
            "operation": "count_tokens",
            "input": "{{ steps.answer.output.content }}",
        },
        {
            "step_id": "vector",
            "type": "model_call",
            "model_id": "{{ models.retrieval }}",
            "operation": "embed",
            "input": "{{ input.name }}",
        },
    ],
    "output": {
        "answer": "{{ steps.answer.output }}",
        "tokens": "{{ steps.tokens.output.tokens }}",
        "dimension": "{{ steps.vector.output | length }}",
    },
}


def test_a_workflow_runs_its_model_calls_on_echo(client: httpx.Client) -> None:
    """echo stands in for the lm and embeddings roles: the run's output is exact."""
    response = client.post(
        "/api/fusion/orchestrate",
        json={
            "workflow": "custom",
            "definition": GREETING,
            "input": {"name": "Ada"},
            "models": {"generation": "echo", "retrieval": "echo"},
        },
    )
    assert response.status_code == 200, response.text
    run = response.json()
    assert run["status"] == "completed", run
    assert run["result"] == {
        "answer": {
            "content": "Hello Ada, nice",
            "finish_reason": "length",
            "usage": {"prompt_tokens": 6, "completion_tokens": 3, "total_tokens": 9},
        },
        "tokens": 3,
        "dimension": DIMENSION,
    }
    assert [(t["step"], t["model"], t["status"]) for t in run["execution_trace"]] == [
        ("answer", "echo", "completed"),
        ("tokens", "echo", "completed"),
        ("vector", "echo", "completed"),
    ]


def test_rag_ingests_and_answers_on_echo(client: httpx.Client) -> None:
    """With no weights, retrieval finds the document sharing the query's words and the
    answer is the question (echo answers with the last user message)."""
    files = [
        ("files", ("apples.txt", b"Red apples grow in the orchard.", "text/plain")),
        ("files", ("sky.txt", b"The blue sky is clear today.", "text/plain")),
    ]
    ingested = client.post(
        "/api/rag/ingest", data={"collection": "fruit", "embedding_model": "echo"}, files=files
    )
    assert ingested.status_code == 200, ingested.text
    assert ingested.json()["chunks_created"] == 2
    response = client.post(
        "/api/rag/query",
        json={
            "collection": "fruit",
            "query": "red apples",
            "model_id": "echo",
            # About shared words / sqrt(words of each): 2 / sqrt(2 * 5) here.
            "similarity_threshold": 0.3,
        },
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["answer"] == "red apples"
    [source] = body["sources"]
    assert source["text"] == "Red apples grow in the orchard."
