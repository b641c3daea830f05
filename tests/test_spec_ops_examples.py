"""The examples of spec §6 (metrics, diagnostics, health), §8 (rate limits) and §9
(versions), black-box against a real server: every key, series, label and header the
spec prints is there, with the type the spec shows. Readings the hardware cannot give
(VRAM on a CPU-only machine) are left out rather than faked (docs/api.md)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from api_helpers import running_server
from prometheus_client.parser import text_string_to_metric_families

LM = "qwen-7b"  # the spec's example id, for a tiny model
MODELS_LIMIT = 3


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory, tiny_lm_dir: Path) -> Iterator[httpx.Client]:
    model = {"model_path": str(tiny_lm_dir), "model_type": "lm", "model_id": LM}
    with running_server(
        tmp_path_factory.mktemp("spec-ops"),
        startup_models=[model],
        rate_limit_enabled=True,
        rate_limits={"models": f"{MODELS_LIMIT}/minute", "fusion": "60/minute"},
    ) as c:
        chat = {"model": LM, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
        assert c.post("/v1/chat/completions", json=chat).status_code == 200
        yield c


def _keys(body: dict[str, Any], *keys: str) -> None:
    assert set(keys) <= set(body), sorted(set(keys) - set(body))


def test_6_1_metrics_has_the_spec_series_with_their_types_and_labels(
    client: httpx.Client,
) -> None:
    response = client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    families = {f.name: f for f in text_string_to_metric_families(response.text)}
    expected = {
        "mlx_requests": ("counter", {"model", "endpoint", "status"}),
        "mlx_request_latency_seconds": ("histogram", {"model"}),
        "mlx_vram_usage_gb": ("gauge", {"model"}),
        "mlx_queue_depth": ("gauge", {"model"}),
        "mlx_model_load_time_seconds": ("gauge", {"model"}),
    }
    for name, (kind, labels) in expected.items():
        family = families[name]
        assert family.type == kind, name
        samples = [s for s in family.samples if not s.name.endswith("_created")]
        assert samples, name
        assert {LM} == {s.labels["model"] for s in samples}, name
        assert all(labels <= set(s.labels) for s in samples), name
    chat = [
        s
        for s in families["mlx_requests"].samples
        if s.name == "mlx_requests_total" and s.labels["endpoint"] == "/v1/chat/completions"
    ]
    assert [(s.labels["status"], s.value) for s in chat] == [("200", 1.0)]
    buckets = [
        s for s in families["mlx_request_latency_seconds"].samples if s.name.endswith("_bucket")
    ]
    assert {"0.1", "0.5", "1.0", "+Inf"} <= {s.labels["le"] for s in buckets}


def test_6_2_diagnostics_has_the_spec_keys(client: httpx.Client) -> None:
    body = client.get("/internal/diagnostics").json()
    _keys(body, "timestamp", "uptime_seconds", "system", "resources", "models", "queues")
    _keys(body, "jobs", "rag", "errors")
    _keys(
        body["system"], "platform", "platform_version", "processor", "python_version", "mlx_version"
    )
    _keys(body["resources"], "cpu_usage_percent", "memory_usage_gb", "memory_total_gb")
    _keys(body["models"], "loaded_count", "total_vram_usage_gb", "models")
    (model,) = body["models"]["models"]
    _keys(model, "id", "status", "vram_usage_gb", "request_count", "avg_latency_ms")
    assert model["id"] == LM
    assert model["request_count"] >= 1
    _keys(body["queues"][LM], "queue_size", "max_queue_size", "active_requests", "max_concurrency")
    assert set(body["jobs"]) == {"queued", "processing", "completed", "failed", "cancelled"}
    _keys(body["rag"], "collections", "total_documents", "total_chunks")
    _keys(body["errors"], "last_24h", "recent_errors")


def test_6_3_health_has_the_spec_keys(client: httpx.Client) -> None:
    response = client.get("/health")
    assert response.status_code == 200
    body = response.json()
    assert body["status"] == "ok"
    _keys(body["models"], "loaded_count", "models_healthy", "models")
    (model,) = body["models"]["models"]
    _keys(model, "id", "status", "warmup_completed")
    assert body["persistence"]["vector_db_connected"] is True
    assert body["services"] == {"fusion_enabled": True, "rag_enabled": True, "mcp_enabled": True}


def test_8_rate_limit_headers_and_error_as_the_spec_prints_them(client: httpx.Client) -> None:
    answers = [client.get(f"/v1/models/{LM}/info") for _ in range(MODELS_LIMIT + 1)]
    first, refused = answers[0], answers[-1]
    assert first.status_code == 200
    assert first.headers["X-RateLimit-Limit"] == str(MODELS_LIMIT)
    assert int(first.headers["X-RateLimit-Remaining"]) == MODELS_LIMIT - 1
    assert int(first.headers["X-RateLimit-Reset"]) > 1_700_000_000  # epoch seconds
    assert refused.status_code == 429
    error = refused.json()["error"]
    assert error["type"] == "rate_limit_error"
    assert error["code"] == "rate_limit_exceeded"
    assert error["param"] is None
    wait = int(refused.headers["Retry-After"])
    assert error["message"] == f"Rate limit exceeded. Try again in {wait} seconds."
    # Another group has its own counter.
    assert client.get("/api/fusion/workflows").status_code == 200


def test_9_the_version_header_is_accepted_and_echoed(client: httpx.Client) -> None:
    response = client.get("/api/fusion/workflows", headers={"X-API-Version": "1"})
    assert response.status_code == 200
    assert response.headers["X-API-Version"] == "1"
    refused = client.get("/api/fusion/workflows", headers={"X-API-Version": "2"})
    assert refused.status_code == 400
    assert refused.json()["error"]["param"] == "X-API-Version"
