"""Model Management API (spec §2) end to end: a real server, real tiny MLX models loaded
through the real loaders, real HTTP."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from api_helpers import (
    StreamReader,
    chat_prompt_tokens,
    load,
    no_eos_bias,
    running_server,
    tokenizer,
    wait_for,
)

from engine.config import Settings
from engine.models.backends import default_backends
from engine.models.memory import GIB

LM_ID = "mlx-community/tiny-qwen"
EMBED_ID = "tiny-embedder"
ISO_Z = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$")
MESSAGES = [{"role": "user", "content": "Say something."}]


@dataclass
class Api:
    client: httpx.Client
    lm_dir: Path
    lm_load: dict[str, Any]
    embed_load: dict[str, Any]


@pytest.fixture(scope="module")
def api(
    tmp_path_factory: pytest.TempPathFactory, tiny_lm_dir: Path, tiny_embedder_dir: Path
) -> Iterator[Api]:
    with running_server(tmp_path_factory.mktemp("models-api")) as client:
        lm_load = load(
            client,
            tiny_lm_dir,
            "lm",
            model_id=LM_ID,
            priority="high",
            metadata={"description": "tiny qwen2", "tags": ["demo", "random-weights"]},
        )
        embed_load = load(client, tiny_embedder_dir, "embeddings", model_id=EMBED_ID)
        yield Api(client, tiny_lm_dir, lm_load, embed_load)


def _error(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    error: dict[str, Any] = response.json()["error"]
    assert error["code"] == code, error
    assert set(error) >= {"type", "message", "param", "code"}
    return error


def _chat(client: httpx.Client, model: str, **fields: Any) -> dict[str, Any]:
    response = client.post(
        "/v1/chat/completions", json={"model": model, "messages": MESSAGES, **fields}
    )
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def _hold_body(api: Api, model: str) -> dict[str, Any]:
    """A generation that runs until stopped: end-of-sequence biased away, a huge budget."""
    return {
        "model": model,
        "messages": MESSAGES,
        "max_tokens": 90_000,
        "logit_bias": no_eos_bias(api.lm_dir),
    }


def _load_holdable(api: Api, model_id: str, **fields: Any) -> None:
    # A context far past the config's 2048 so max_tokens is not cut short.
    load(api.client, api.lm_dir, "lm", model_id=model_id, context_length=200_000, **fields)


def _queue(api: Api, model_id: str) -> dict[str, Any]:
    response = api.client.get(f"/v1/models/{model_id}/info")
    assert response.status_code == 200, response.text
    queue: dict[str, Any] = response.json()["queue"]
    return queue


# -- load ------------------------------------------------------------------------------------------
def test_load_response_has_measured_memory_and_metadata(api: Api) -> None:
    body = api.lm_load
    assert body["model_id"] == LM_ID
    assert body["status"] == "loaded"
    assert body["load_time_ms"] > 0
    assert body["vram_usage_gb"] > 0
    assert body["weights_gb"] > 0
    meta = body["metadata"]
    assert meta["id"] == LM_ID
    assert meta["family"] == "qwen2"  # the config's model_type
    assert meta["type"] == "lm"
    assert meta["context_length"] == 2048
    assert meta["tags"] == ["local", "chat", "demo", "random-weights"]
    assert meta["tier"] == "3A"
    assert isinstance(meta["created_at"], int)
    assert abs(meta["created_at"] - time.time()) < 600
    assert meta["description"] == "tiny qwen2"

    embed = api.embed_load["metadata"]
    assert embed["type"] == "embeddings"
    assert embed["family"] == "bert"
    assert embed["tags"] == ["local", "embeddings"]


def test_load_generates_the_id_from_the_path_and_honours_context_length(
    api: Api, tiny_embedder_dir: Path, tmp_path: Path
) -> None:
    copy = tmp_path / "my-embedder"
    copy.symlink_to(tiny_embedder_dir, target_is_directory=True)
    body = load(api.client, copy, "embeddings", context_length=64)
    try:
        assert body["model_id"] == "my-embedder"
        assert body["metadata"]["context_length"] == 64
    finally:
        assert api.client.delete("/v1/models/my-embedder/unload").status_code == 200


def test_quantized_models_are_tagged(api: Api, tmp_path: Path) -> None:
    from mlx_lm import convert

    out = tmp_path / "tiny-q4"
    convert(str(api.lm_dir), mlx_path=str(out), quantize=True, q_group_size=32, q_bits=4)
    body = load(api.client, out, "lm", model_id="tiny-q4")
    try:
        assert body["metadata"]["tags"] == ["local", "chat", "quantized"]
    finally:
        assert api.client.delete("/v1/models/tiny-q4/unload").status_code == 200


def test_load_errors(api: Api, tiny_lm_dir: Path, tmp_path: Path) -> None:
    client = api.client
    bad_type = client.post(
        "/v1/models/load", json={"model_path": str(tiny_lm_dir), "model_type": "llm"}
    )
    assert _error(bad_type, 400, "invalid_model_type")["param"] == "model_type"

    missing = client.post("/v1/models/load", json={"model_type": "lm"})
    assert _error(missing, 400, "invalid_request")["param"] == "model_path"

    nowhere = client.post(
        "/v1/models/load", json={"model_path": str(tmp_path / "nope"), "model_type": "lm"}
    )
    assert _error(nowhere, 400, "invalid_model_path")["param"] == "model_path"

    not_a_model = client.post(
        "/v1/models/load", json={"model_path": str(tmp_path), "model_type": "lm"}
    )
    _error(not_a_model, 400, "invalid_model_path")

    bad_priority = client.post(
        "/v1/models/load",
        json={"model_path": str(tiny_lm_dir), "model_type": "lm", "priority": "urgent"},
    )
    assert _error(bad_priority, 400, "invalid_request")["param"] == "priority"

    bad_tags = client.post(
        "/v1/models/load",
        json={"model_path": str(tiny_lm_dir), "model_type": "lm", "metadata": {"tags": "x"}},
    )
    assert _error(bad_tags, 400, "invalid_request")["param"] == "metadata.tags"

    for reserved in ("a/info", "x/unload", "load", "/lead", "a//b"):
        clash = client.post(
            "/v1/models/load",
            json={"model_path": str(tiny_lm_dir), "model_type": "lm", "model_id": reserved},
        )
        assert _error(clash, 400, "invalid_model_id")["param"] == "model_id"

    duplicate = client.post(
        "/v1/models/load",
        json={"model_path": str(tiny_lm_dir), "model_type": "lm", "model_id": LM_ID},
    )
    assert _error(duplicate, 409, "model_already_loaded")["type"] == "conflict_error"


def test_hub_id_fails_fast_offline(api: Api) -> None:
    # Fast by mechanism: model_unavailable_offline is only answered when the hub was found
    # unreachable before any download was tried (a download would answer another code).
    response = api.client.post(
        "/v1/models/load",
        json={"model_path": "mlx-community/Qwen2.5-0.5B-Instruct-4bit", "model_type": "lm"},
    )
    assert _error(response, 400, "model_unavailable_offline")["param"] == "model_path"


def test_missing_backend_names_the_package(api: Api, tiny_lm_dir: Path) -> None:
    package = default_backends(Settings())["image-generation"].package
    response = api.client.post(
        "/v1/models/load",
        json={"model_path": str(tiny_lm_dir), "model_type": "image-generation"},
    )
    error = _error(response, 400, "backend_unavailable")
    assert package in error["message"]
    assert error["param"] == "model_type"


def test_insufficient_memory_is_503_and_loads_nothing(tmp_path: Path, tiny_lm_dir: Path) -> None:
    with running_server(tmp_path, model_memory_budget_gb=1e-5) as client:  # ~10 KiB
        response = client.post(
            "/v1/models/load", json={"model_path": str(tiny_lm_dir), "model_type": "lm"}
        )
        error = _error(response, 503, "insufficient_vram")
        assert error["type"] == "service_unavailable_error"
        assert client.get("/v1/models").json()["data"] == []


# -- info, list, retrieve, stats ------------------------------------------------------------------
@pytest.mark.parametrize("path_id", [LM_ID, LM_ID.replace("/", "%2F")])
def test_info(api: Api, path_id: str) -> None:
    response = api.client.get(f"/v1/models/{path_id}/info")
    assert response.status_code == 200, response.text
    info = response.json()
    assert info["model_id"] == LM_ID
    assert info["status"] == "loaded"
    assert info["metadata"] == api.lm_load["metadata"]
    assert ISO_Z.match(info["load_time"])
    assert ISO_Z.match(info["last_used"])
    assert isinstance(info["request_count"], int)
    memory = info["memory"]
    assert memory["measured_bytes"] > 0
    assert memory["weight_bytes"] > 0
    assert info["vram_usage_gb"] == round(memory["measured_bytes"] / GIB, 4)
    assert info["vram_usage_gb"] == api.lm_load["vram_usage_gb"]
    assert info["priority"] == "high"
    assert info["pinned"] is False
    assert info["queue"] == {"active": 0, "waiting": 0, "max_concurrency": 32, "max_queue": 100}
    assert "chat" in info["capabilities"]
    batch = info["batch"]  # a language model decodes its requests in one batch
    assert (batch["max_batch"], batch["decoding"], batch["parked"]) == (32, 0, 0)
    assert batch["prompt_cache_max_bytes"] == 512 * 2**20
    assert 0 <= batch["prompt_cache_bytes"] <= batch["prompt_cache_max_bytes"]


def test_list_and_retrieve(api: Api) -> None:
    listed = api.client.get("/v1/models").json()
    assert listed["object"] == "list"
    by_id = {m["id"]: m for m in listed["data"]}
    assert {LM_ID, EMBED_ID} <= set(by_id)
    lm = by_id[LM_ID]
    assert lm == {
        "id": LM_ID,
        "object": "model",
        "created": api.lm_load["metadata"]["created_at"],
        "owned_by": "local-mlx",
        "family": "qwen2",
        "type": "lm",
        "context_length": 2048,
        "tags": ["local", "chat", "demo", "random-weights"],
        "tier": "3A",
        "vram_usage_gb": api.lm_load["vram_usage_gb"],
        "status": "loaded",
    }
    for path_id in (LM_ID, LM_ID.replace("/", "%2F")):
        retrieved = api.client.get(f"/v1/models/{path_id}")
        assert retrieved.status_code == 200, retrieved.text
        assert retrieved.json() == lm


def test_unknown_model_is_404_everywhere(api: Api) -> None:
    client = api.client
    for response in (
        client.get("/v1/models/org/missing/info"),
        client.get("/v1/models/org/missing/stats"),
        client.get("/v1/models/org/missing"),
        client.delete("/v1/models/org/missing/unload"),
        client.post("/v1/models/org/missing/warmup", json={"prompt": "hi"}),
    ):
        error = _error(response, 404, "model_not_found")
        assert error["type"] == "not_found_error"
        assert "org/missing" in error["message"]


def test_wrong_method_on_an_action_is_405(api: Api) -> None:
    response = api.client.get(f"/v1/models/{LM_ID}/unload")
    _error(response, 405, "method_not_allowed")
    assert response.headers["allow"] == "DELETE"
    response = api.client.post(f"/v1/models/{LM_ID}/info")
    _error(response, 405, "method_not_allowed")
    assert response.headers["allow"] == "GET"


def test_stats_record_requests_tokens_and_latency_percentiles(api: Api) -> None:
    load(api.client, api.lm_dir, "lm", model_id="stats/lm")
    try:
        bias = no_eos_bias(api.lm_dir)
        totals = []
        for i in range(12):
            body = _chat(api.client, "stats/lm", max_tokens=1 + i % 4, logit_bias=bias)
            assert body["usage"]["completion_tokens"] == 1 + i % 4
            totals.append(body["usage"]["total_tokens"])
        stats = api.client.get("/v1/models/stats/lm/stats").json()
        assert stats["model_id"] == "stats/lm"
        assert stats["request_count"] == 12
        assert stats["latency_samples"] == 12
        assert stats["total_tokens_processed"] == sum(totals)
        assert stats["error_count"] == 0
        assert stats["last_error"] is None
        assert 0 < stats["p50_latency_ms"] <= stats["p95_latency_ms"] <= stats["p99_latency_ms"]
        assert stats["avg_latency_ms"] <= stats["p99_latency_ms"]
        assert stats["vram_usage_gb"] > 0
        info = api.client.get("/v1/models/stats/lm/info").json()
        assert info["request_count"] == 12
    finally:
        assert api.client.delete("/v1/models/stats/lm/unload").status_code == 200


# -- warmup and health ---------------------------------------------------------------------------
def test_warmup_marks_the_model_warm_in_health(api: Api) -> None:
    def warm() -> bool | None:
        models = api.client.get("/health").json()["models"]
        return {m["id"]: m["warmup_completed"] for m in models["models"]}.get(LM_ID)

    health = api.client.get("/health").json()["models"]
    assert health["loaded_count"] == len(api.client.get("/v1/models").json()["data"])
    assert health["models_healthy"] is True
    assert {"id": EMBED_ID, "status": "loaded", "warmup_completed": False} in health["models"]

    prompt = "Hello world, warming up"
    response = api.client.post(
        f"/v1/models/{LM_ID}/warmup", json={"prompt": prompt, "max_length": 100}
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model_id"] == LM_ID
    assert body["status"] == "warmed"
    assert body["warmup_time_ms"] > 0
    assert body["prompt_tokens"] == len(tokenizer(api.lm_dir).encode(prompt))
    assert warm() is True
    assert api.client.get(f"/v1/models/{LM_ID}/info").json()["warmup_completed"] is True

    capped = api.client.post(f"/v1/models/{LM_ID}/warmup", json={"prompt": prompt, "max_length": 2})
    assert capped.json()["prompt_tokens"] == 2
    invalid = api.client.post(f"/v1/models/{LM_ID}/warmup", json={"max_length": 0})
    assert _error(invalid, 400, "invalid_request")["param"] == "max_length"


# -- unload ----------------------------------------------------------------------------------------
def test_unload_frees_memory_and_forgets_the_model(api: Api) -> None:
    body = load(api.client, api.lm_dir, "lm", model_id="gone/soon")
    response = api.client.delete("/v1/models/gone%2Fsoon/unload")
    assert response.status_code == 200, response.text
    unloaded = response.json()
    assert unloaded["model_id"] == "gone/soon"
    assert unloaded["status"] == "unloaded"
    assert unloaded["vram_freed_gb"] > 0
    assert abs(unloaded["vram_freed_gb"] - body["vram_usage_gb"]) <= 0.0002
    assert unloaded["unload_time_ms"] >= 0
    assert "gone/soon" not in {m["id"] for m in api.client.get("/v1/models").json()["data"]}
    _error(api.client.get("/v1/models/gone/soon/info"), 404, "model_not_found")
    _error(api.client.delete("/v1/models/gone/soon/unload"), 404, "model_not_found")


def test_unload_in_use_is_409_and_force_cancels_the_stream(api: Api) -> None:
    _load_holdable(api, "busy/lm")
    reader = StreamReader(str(api.client.base_url), _hold_body(api, "busy/lm")).start()
    try:
        assert _queue(api, "busy/lm")["active"] == 1
        refused = api.client.delete("/v1/models/busy/lm/unload")
        assert _error(refused, 409, "model_in_use")["type"] == "conflict_error"
        assert api.client.delete("/v1/models/busy/lm/unload?force=false").status_code == 409

        forced = api.client.delete("/v1/models/busy/lm/unload", params={"force": "true"})
        assert forced.status_code == 200, forced.text
        assert forced.json()["status"] == "unloaded"
        reader.join()
    finally:
        reader.disconnect()
    assert reader.error is None
    assert reader.events[-1] == "[DONE]"
    error = reader.events[-2]["error"]
    assert error["code"] == "model_unloaded"
    _error(api.client.get("/v1/models/busy/lm/info"), 404, "model_not_found")


def test_queue_full_is_429_with_retry_after_and_force_fails_the_queue(api: Api) -> None:
    _load_holdable(api, "queue/lm", max_concurrency=1, max_queue=1)
    first = StreamReader(str(api.client.base_url), _hold_body(api, "queue/lm")).start()
    # The second waits in the queue: no content until the first ends.
    second = StreamReader(str(api.client.base_url), _hold_body(api, "queue/lm")).begin()
    try:
        wait_for(lambda: _queue(api, "queue/lm")["waiting"] == 1, what="a queued request")
        response = api.client.post(
            "/v1/chat/completions",
            json={"model": "queue/lm", "messages": MESSAGES, "max_tokens": 1},
        )
        error = _error(response, 429, "queue_full")
        assert error["type"] == "rate_limit_error"
        assert int(response.headers["retry-after"]) >= 1
        assert (
            api.client.delete("/v1/models/queue/lm/unload", params={"force": True}).status_code
            == 200
        )
        first.join()
        second.join()
    finally:
        first.disconnect()
        second.disconnect()
    assert first.events[-2]["error"]["code"] == "model_unloaded"
    # The queued request never started: its error is the response status itself.
    assert second.status == 503
    assert second.events == []


def test_client_disconnect_stops_generation(api: Api) -> None:
    _load_holdable(api, "drop/lm")
    try:
        reader = StreamReader(str(api.client.base_url), _hold_body(api, "drop/lm")).start()
        assert _queue(api, "drop/lm")["active"] == 1
        reader.disconnect()
        wait_for(lambda: _queue(api, "drop/lm")["active"] == 0, what="the slot to be freed")
        # Stopped, not run to max_tokens: the model answers the next request at once.
        body = _chat(api.client, "drop/lm", max_tokens=3, logit_bias=no_eos_bias(api.lm_dir))
        assert body["usage"]["completion_tokens"] == 3
        assert body["usage"]["prompt_tokens"] == chat_prompt_tokens(api.lm_dir, MESSAGES)
    finally:
        assert api.client.delete("/v1/models/drop/lm/unload").status_code == 200
