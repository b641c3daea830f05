"""OpenAI-compatible endpoints end to end: a real server with tiny MLX models, called with
the official `openai` package and with raw HTTP."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import openai
import pytest
from api_helpers import chat_prompt_tokens, load, no_eos_bias, running_server, tokenizer

CHAT_ID = "org/tiny-chat"
EMBED_ID = "tiny-embed"
MESSAGES = [{"role": "user", "content": "Tell me a story."}]


@dataclass
class Api:
    client: httpx.Client
    oai: openai.OpenAI
    lm_dir: Path
    embed_dir: Path
    bias: dict[str, float]


@pytest.fixture(scope="module")
def api(
    tmp_path_factory: pytest.TempPathFactory, tiny_lm_dir: Path, tiny_embedder_dir: Path
) -> Iterator[Api]:
    with running_server(tmp_path_factory.mktemp("openai-api")) as client:
        load(client, tiny_lm_dir, "lm", model_id=CHAT_ID)
        load(client, tiny_embedder_dir, "embeddings", model_id=EMBED_ID)
        oai = openai.OpenAI(
            base_url=f"{client.base_url}/v1", api_key="not-needed", max_retries=0, timeout=60
        )
        yield Api(client, oai, tiny_lm_dir, tiny_embedder_dir, no_eos_bias(tiny_lm_dir))
        oai.close()


def _error(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    error: dict[str, Any] = response.json()["error"]
    assert error["code"] == code, error
    return error


def _chat(api: Api, **fields: Any) -> httpx.Response:
    return api.client.post(
        "/v1/chat/completions", json={"model": CHAT_ID, "messages": MESSAGES, **fields}
    )


# -- chat ----------------------------------------------------------------------------------------
def test_chat_completion_with_the_openai_client(api: Api) -> None:
    completion = api.oai.chat.completions.create(
        model=CHAT_ID,
        messages=MESSAGES,  # type: ignore[arg-type]
        max_tokens=7,
        temperature=0,
        logit_bias=api.bias,  # type: ignore[arg-type]
    )
    assert completion.object == "chat.completion"
    assert completion.id.startswith("chatcmpl-")
    assert completion.model == CHAT_ID
    assert len(completion.choices) == 1
    choice = completion.choices[0]
    assert choice.index == 0
    assert choice.message.role == "assistant"
    assert choice.finish_reason == "length"
    assert isinstance(choice.message.content, str)
    assert completion.usage is not None
    assert completion.usage.prompt_tokens == chat_prompt_tokens(api.lm_dir, MESSAGES)
    assert completion.usage.completion_tokens == 7
    assert completion.usage.total_tokens == completion.usage.prompt_tokens + 7


def test_max_completion_tokens_wins_over_max_tokens(api: Api) -> None:
    response = _chat(api, max_tokens=9, max_completion_tokens=4, logit_bias=api.bias)
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["completion_tokens"] == 4


def test_streaming_with_the_openai_client_matches_the_plain_answer(api: Api) -> None:
    common: dict[str, Any] = {
        "model": CHAT_ID,
        "messages": MESSAGES,
        "max_tokens": 12,
        "seed": 11,
        "temperature": 1.0,
        "logit_bias": api.bias,
    }
    plain = api.oai.chat.completions.create(**common)
    chunks = list(
        api.oai.chat.completions.create(
            **common, stream=True, stream_options={"include_usage": True}
        )
    )
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert len({c.id for c in chunks}) == 1
    assert chunks[0].choices[0].delta.role == "assistant"
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert content == plain.choices[0].message.content
    finals = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finals[-1] == "length"
    assert all(f is None for f in finals[:-1])
    usage_chunk = chunks[-1]
    assert usage_chunk.choices == []
    assert usage_chunk.usage is not None
    assert usage_chunk.usage.completion_tokens == 12
    assert usage_chunk.usage.prompt_tokens == plain.usage.prompt_tokens  # type: ignore[union-attr]


def test_usage_reports_prompt_tokens_served_from_the_prefix_cache(api: Api) -> None:
    messages = [{"role": "user", "content": "a prompt no other test sends"}]
    common: dict[str, Any] = {"model": CHAT_ID, "messages": messages, "max_tokens": 3}
    cold = api.oai.chat.completions.create(**common)
    assert cold.usage is not None
    assert cold.usage.prompt_tokens_details is not None
    warm = api.oai.chat.completions.create(**common)
    assert warm.usage is not None
    assert warm.usage.prompt_tokens_details is not None
    # All but the last prompt token, which decoding starts from; the first time, at most
    # the chat template's opening that other tests' prompts share.
    cached = warm.usage.prompt_tokens_details.cached_tokens
    assert cached == cold.usage.prompt_tokens - 1
    assert cold.usage.prompt_tokens_details.cached_tokens < cached
    chunks = list(
        api.oai.chat.completions.create(
            **common, stream=True, stream_options={"include_usage": True}
        )
    )
    usage = chunks[-1].usage
    assert usage is not None
    assert usage.prompt_tokens_details is not None
    assert usage.prompt_tokens_details.cached_tokens == cold.usage.prompt_tokens - 1


def test_raw_event_stream_ends_with_done(api: Api) -> None:
    body = {"model": CHAT_ID, "messages": MESSAGES, "max_tokens": 5, "stream": True}
    with api.client.stream("POST", "/v1/chat/completions", json=body) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        raw = response.read().decode()
    events = [block for block in raw.split("\n\n") if block]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"
    payloads = [json.loads(e[len("data: ") :]) for e in events[:-1]]
    assert payloads[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    assert all("usage" not in p for p in payloads)  # only with stream_options.include_usage


def test_seed_makes_sampling_reproducible(api: Api) -> None:
    def sample(seed: int) -> str:
        response = _chat(api, max_tokens=16, seed=seed, temperature=1.0, logit_bias=api.bias)
        assert response.status_code == 200, response.text
        content: str = response.json()["choices"][0]["message"]["content"]
        return content

    first = sample(3)
    assert sample(3) == first
    assert sample(4) != first or sample(5) != first


def test_stop_strings_cut_the_output(api: Api) -> None:
    fields: dict[str, Any] = {
        "max_tokens": 40,
        "seed": 21,
        "temperature": 1.0,
        "logit_bias": api.bias,
    }
    full = _chat(api, **fields).json()["choices"][0]["message"]["content"]
    # A two-letter stop string first found in the middle of the unstopped answer.
    cut = next(
        i
        for i in range(5, len(full) - 1)
        if full[i : i + 2].isascii()
        and full[i : i + 2].isalpha()
        and full.find(full[i : i + 2]) == i
    )
    stop = full[cut : cut + 2]
    for value in (stop, [stop, "\x00never"]):
        stopped = _chat(api, **fields, stop=value).json()
        assert stopped["choices"][0]["message"]["content"] == full[:cut]
        assert stopped["choices"][0]["finish_reason"] == "stop"
        assert stopped["usage"]["completion_tokens"] < 40


def test_content_parts_and_tools_reach_the_model(api: Api) -> None:
    parts = [
        {
            "role": "user",
            "content": [{"type": "text", "text": "Tell me "}, {"type": "text", "text": "a story."}],
        }
    ]
    as_parts = _chat(api, messages=parts, max_tokens=2, logit_bias=api.bias).json()
    assert as_parts["usage"]["prompt_tokens"] == chat_prompt_tokens(api.lm_dir, MESSAGES)

    tools = [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "description": "Weather for a city",
                "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
            },
        }
    ]
    with_tools = _chat(api, tools=tools, max_tokens=2, logit_bias=api.bias).json()
    assert with_tools["usage"]["prompt_tokens"] > as_parts["usage"]["prompt_tokens"]
    ignored = _chat(api, tools=tools, tool_choice="none", max_tokens=2).json()
    assert ignored["usage"]["prompt_tokens"] == as_parts["usage"]["prompt_tokens"]

    image = [
        {
            "role": "user",
            "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}],
        }
    ]
    _error(_chat(api, messages=image, max_tokens=2), 400, "images_not_supported")


def test_chat_errors(api: Api) -> None:
    assert _error(_chat(api, n=2), 400, "unsupported_parameter")["param"] == "n"
    assert _chat(api, n=1, max_tokens=1).status_code == 200
    assert _error(_chat(api, temperature=3), 400, "invalid_request")["param"] == "temperature"
    missing = api.client.post("/v1/chat/completions", json={"model": CHAT_ID})
    assert _error(missing, 400, "invalid_request")["param"] == "messages"
    assert _error(_chat(api, logit_bias={"abc": 1}), 400, "invalid_logit_bias")["param"] == (
        "logit_bias"
    )
    # Out of the vocabulary: refused before MLX indexes the logits with it.
    for token in ("100000", "-1"):
        error = _error(_chat(api, logit_bias={token: 5}), 400, "invalid_logit_bias")
        assert error["param"] == "logit_bias"
    _error(_chat(api, model=EMBED_ID), 400, "unsupported")

    for stream in (False, True):
        error = _error(_chat(api, model="nope/model", stream=stream), 404, "model_not_found")
        assert error["param"] == "model"
        assert error["type"] == "not_found_error"
    with pytest.raises(openai.NotFoundError) as raised:
        api.oai.chat.completions.create(model="nope/model", messages=MESSAGES)  # type: ignore[arg-type]
    assert raised.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError):
        api.oai.chat.completions.create(model=CHAT_ID, messages=MESSAGES, n=2)  # type: ignore[arg-type]


# -- embeddings --------------------------------------------------------------------------------
def test_embeddings_float_and_base64(api: Api) -> None:
    texts = ["A man is eating food.", "The cat sleeps on the sofa all day long."]
    floats = api.oai.embeddings.create(model=EMBED_ID, input=texts, encoding_format="float")
    # Without encoding_format the client asks for base64 and decodes it itself.
    decoded = api.oai.embeddings.create(model=EMBED_ID, input=texts)
    assert floats.object == "list"
    assert floats.model == EMBED_ID
    assert [d.index for d in floats.data] == [0, 1]
    assert all(d.object == "embedding" for d in floats.data)
    for a, b in zip(floats.data, decoded.data, strict=True):
        assert len(a.embedding) == 32
        assert np.allclose(a.embedding, b.embedding, atol=0)
        assert abs(np.linalg.norm(a.embedding) - 1) < 1e-4  # the model's Normalize module
    counts = [len(ids) for ids in tokenizer(api.embed_dir)(texts)["input_ids"]]
    assert floats.usage.prompt_tokens == sum(counts)
    assert floats.usage.total_tokens == sum(counts)

    raw = api.client.post(
        "/v1/embeddings", json={"model": EMBED_ID, "input": texts, "encoding_format": "base64"}
    ).json()
    for item, expected in zip(raw["data"], floats.data, strict=True):
        vector = np.frombuffer(base64.b64decode(item["embedding"]), dtype="<f4")
        assert vector.tolist() == pytest.approx(expected.embedding, abs=0)
        assert item["truncated"] is False


def test_embeddings_single_string_and_dimensions(api: Api) -> None:
    single = api.client.post("/v1/embeddings", json={"model": EMBED_ID, "input": "hello"})
    assert single.status_code == 200, single.text
    assert len(single.json()["data"]) == 1
    same = api.client.post(
        "/v1/embeddings", json={"model": EMBED_ID, "input": "hello", "dimensions": 32}
    )
    assert same.status_code == 200
    other = api.client.post(
        "/v1/embeddings", json={"model": EMBED_ID, "input": "hello", "dimensions": 16}
    )
    assert _error(other, 400, "dimensions_not_supported")["param"] == "dimensions"


def test_embeddings_errors(api: Api) -> None:
    def post(**body: Any) -> httpx.Response:
        return api.client.post("/v1/embeddings", json={"model": EMBED_ID, "input": "x", **body})

    assert _error(post(input=[]), 400, "invalid_request")["param"] == "input"
    assert _error(post(encoding_format="hex"), 400, "invalid_request")["param"] == (
        "encoding_format"
    )
    assert _error(post(model="nope"), 404, "model_not_found")["param"] == "model"
    _error(post(model=CHAT_ID), 400, "unsupported")


# -- models --------------------------------------------------------------------------------------
def test_models_list_and_retrieve_with_the_openai_client(api: Api) -> None:
    listed = {m.id: m for m in api.oai.models.list()}
    assert {CHAT_ID, EMBED_ID} <= set(listed)
    assert listed[CHAT_ID].owned_by == "local-mlx"
    assert listed[CHAT_ID].object == "model"
    retrieved = api.oai.models.retrieve(CHAT_ID)  # sent as /v1/models/org%2Ftiny-chat
    assert retrieved.id == CHAT_ID
    assert retrieved.created == listed[CHAT_ID].created
    with pytest.raises(openai.NotFoundError):
        api.oai.models.retrieve("org/absent")
