"""Property-based fuzzing of the HTTP request models (issue #8): a real server, with no
models loaded, fed arbitrary JSON and bodies shaped like the real ones on every JSON POST
route. Every answer is below 500, every error is in the spec's envelope (§7), and /health
keeps answering."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from api_helpers import running_server
from fuzz_strategies import FUZZ, TEMPLATES, values, workflows
from hypothesis import example, given, settings
from hypothesis import strategies as st

# A request takes about a millisecond, so the HTTP suites afford more examples.
HTTP_FUZZ = settings(FUZZ, max_examples=400)
JSON_HEADERS = {"Content-Type": "application/json"}

ROUTES = [
    "/api/fusion/orchestrate",
    "/api/fusion/compose",
    "/v1/models/load",
    "/v1/models/demo-chat/warmup",
    "/v1/chat/completions",
    "/v1/embeddings",
    "/api/rag/query",
]


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[httpx.Client]:
    with running_server(tmp_path_factory.mktemp("fuzz_http")) as client:
        yield client


def post(client: httpx.Client, route: str, body: Any) -> httpx.Response:
    return post_raw(client, route, json.dumps(body).encode())


def post_raw(client: httpx.Client, route: str, content: bytes) -> httpx.Response:
    response = client.post(route, content=content, headers=JSON_HEADERS)
    assert response.status_code < 500, f"{route} {content[:300]!r}: {response.text[:500]}"
    if response.status_code >= 400:
        assert_envelope(response)
    _ = response.text  # a streamed answer is read to its end
    health = client.get("/health")  # the client's timeout is the hang guard
    assert health.status_code == 200, health.text
    return response


def assert_envelope(response: httpx.Response) -> None:
    body = response.json()
    assert set(body) == {"error"}, body
    error = body["error"]
    assert {"type", "message", "param", "code"} <= set(error), error
    assert isinstance(error["type"], str)
    assert isinstance(error["message"], str)
    assert error["message"]
    assert isinstance(error["code"], str)
    assert error["param"] is None or isinstance(error["param"], str)


# -- any JSON at all -----------------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=30),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=10), inner),
    max_leaves=25,
)


@HTTP_FUZZ
@given(st.sampled_from(ROUTES), json_values)
def test_any_json_is_answered_below_500(client: httpx.Client, route: str, body: Any) -> None:
    post(client, route, body)


@HTTP_FUZZ
@given(st.sampled_from(ROUTES), st.binary(max_size=200) | st.text(max_size=200).map(str.encode))
def test_any_bytes_are_answered_below_500(client: httpx.Client, route: str, body: bytes) -> None:
    post_raw(client, route, body)


@HTTP_FUZZ
@given(
    st.sampled_from(ROUTES),
    st.integers(1, 5000),
    st.sampled_from(["[", '{"a":']),
    st.sampled_from(["input", "definition", "messages", "metadata", "query", "generation_config"]),
)
def test_deep_json_is_answered_below_500(
    client: httpx.Client, route: str, depth: int, opener: str, field: str
) -> None:
    closer = "]" if opener == "[" else "}"
    deep = opener * depth + "1" + closer * depth
    post_raw(client, route, f'{{"{field}": {deep}}}'.encode())


# -- bodies shaped like the real ones ------------------------------------------------------------

names = st.sampled_from(["demo-chat", "", "custom", "../x", "a\x00b", "\x1b[31m", "x" * 300])
texts = st.sampled_from(["hello", "", " ", *TEMPLATES]) | st.text(max_size=20)
small_ints = st.integers(-3, 3) | st.sampled_from([0, 2**31, 2**63, 10**30])
numbers = small_ints | st.floats()


def shaped(fields: dict[str, st.SearchStrategy[Any]]) -> st.SearchStrategy[dict[str, Any]]:
    """The route's own fields, each optional and each sometimes any JSON, plus a stray one."""
    optional = {k: v | values for k, v in fields.items()}
    return st.fixed_dictionaries({}, optional={**optional, "unknown_field": values})


messages = st.lists(
    st.fixed_dictionaries(
        {},
        optional={
            "role": st.sampled_from(["system", "user", "assistant", "tool", "nobody"]) | values,
            "content": texts
            | st.lists(
                st.fixed_dictionaries(
                    {},
                    optional={
                        "type": st.sampled_from(["text", "image_url"]),
                        "text": texts,
                        "image_url": st.fixed_dictionaries(
                            {},
                            optional={
                                "url": st.sampled_from(
                                    ["data:image/png;base64,AAAA", "http://127.0.0.1:1/x.png"]
                                )
                            },
                        ),
                    },
                ),
                max_size=2,
            ),
        },
    ),
    max_size=3,
)
# Literal values only: a custom definition that compiles is run, and running templates is
# not fuzzed here (the renderer has its own budgets and tests).
plain_definition = st.fixed_dictionaries(
    {
        "steps": st.lists(
            st.fixed_dictionaries(
                {
                    "step_id": st.sampled_from(["a", "b"]),
                    "type": st.sampled_from(["template", "chunk", "model_call", "nope"]),
                },
                optional={
                    "value": st.none() | st.integers() | st.text(max_size=10),
                    "text": st.text(max_size=10),
                    "model_id": st.just("demo-chat"),
                    "operation": st.sampled_from(["lm", "embed"]),
                    "input": st.text(max_size=5),
                },
            ),
            max_size=3,
        )
    }
)
ONE_STEP = {"steps": [{"step_id": "a", "type": "template", "value": 1}]}
BODIES: dict[str, st.SearchStrategy[dict[str, Any]]] = {
    "/api/fusion/orchestrate": shaped(
        {
            "workflow": st.sampled_from(["custom", "rag_query", "nope", ""]),
            "input": st.dictionaries(st.text(max_size=5), values, max_size=3),
            "models": st.dictionaries(st.text(max_size=5), st.none() | names, max_size=2),
            "config": st.dictionaries(st.text(max_size=5), values, max_size=3),
            "definition": plain_definition,
            "stream": st.booleans(),
        }
    ),
    "/api/fusion/compose": workflows,
    "/v1/models/load": shaped(
        {
            "model_path": st.sampled_from(["", "/nonexistent", "/dev/null", "\x00"]),
            "model_type": st.sampled_from(["lm", "multimodal", "embeddings", "whisper", "x"]),
            "model_id": names,
            "context_length": small_ints,
            "priority": st.sampled_from(["low", "normal", "high", "urgent"]),
            "metadata": st.dictionaries(st.text(max_size=5), values, max_size=3),
            "pinned": st.booleans(),
            "max_concurrency": small_ints,
            "max_queue": small_ints,
        }
    ),
    "/v1/models/demo-chat/warmup": shaped({"prompt": texts, "max_length": small_ints}),
    "/v1/chat/completions": shaped(
        {
            "model": names,
            "messages": messages,
            "temperature": numbers,
            "top_p": numbers,
            "max_tokens": small_ints,
            "max_completion_tokens": small_ints,
            "stop": texts | st.lists(texts, max_size=3),
            "seed": small_ints,
            "n": small_ints,
            "stream": st.booleans(),
            "stream_options": st.fixed_dictionaries({}, optional={"include_usage": values}),
            "tools": st.lists(values, max_size=2),
            "tool_choice": values,
            "logit_bias": st.dictionaries(st.text(max_size=4), numbers, max_size=3),
        }
    ),
    "/v1/embeddings": shaped(
        {
            "model": names,
            "input": texts | st.lists(texts, max_size=3),
            "encoding_format": st.sampled_from(["float", "base64", "hex"]),
            "dimensions": small_ints,
            "user": texts,
        }
    ),
    "/api/rag/query": shaped(
        {
            "query": texts,
            "collection": names,
            "top_k": small_ints,
            "model_id": names,
            "embedding_model": names,
            "include_sources": st.booleans(),
            "similarity_threshold": numbers,
            "rerank": st.booleans(),
            "rerank_model": names,
            "generation_config": st.dictionaries(st.text(max_size=8), values, max_size=3),
        }
    ),
}


@HTTP_FUZZ
@given(st.sampled_from(ROUTES).flatmap(lambda r: st.tuples(st.just(r), BODIES[r])))
@example(("/api/fusion/orchestrate", {"workflow": "custom", "definition": {"steps": []}}))
@example(
    ("/api/fusion/orchestrate", {"workflow": "custom", "definition": ONE_STEP, "stream": True})
)
# Found by this test: a compose body whose `id` was not hashable was a 500 (TypeError).
@example(("/api/fusion/compose", {"id": [], "steps": []}))
def test_shaped_bodies_are_answered_below_500(
    client: httpx.Client, route_and_body: tuple[str, dict[str, Any]]
) -> None:
    route, body = route_and_body
    post(client, route, body)


def test_health_still_answers_after_the_fuzzing(client: httpx.Client) -> None:
    response = client.get("/health")
    assert response.status_code == 200
