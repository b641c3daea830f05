"""GET /metrics (spec §6.1, issue #11) end to end: a real server with tiny models serves
chat, embedding, orchestration, RAG and job requests; the exposition, parsed with
prometheus-client's own parser, has every series with its type and exact label names,
the counts moved by what was done, and no raw path or unknown model as a label value."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from api_helpers import running_server, wait_for
from prometheus_client.parser import text_string_to_metric_families

from engine.metrics import LATENCY_BUCKETS, note_model, tracking_models
from engine.models.synthetic import build_lm

LM, EMBED = "tiny-lm", "tiny-embedder"
MESSAGES = [{"role": "user", "content": "hello"}]
UNKNOWN = "no-such-model"

GREET = """
id: greet
name: Greeting
models:
  generation: {type: lm}
steps:
  - step_id: greet
    type: template
    value: "Hello, {{ input.name }}!"
  - step_id: twice
    type: template
    value: "{{ [steps.greet.output] * 2 }}"
output:
  text: "{{ steps.greet.output }}"
"""
INLINE = {
    "id": "my-inline-id",
    "name": "Inline",
    "steps": [{"step_id": "only", "type": "template", "value": "hi"}],
    "output": {"text": "{{ steps.only.output }}"},
}

# name -> (type, label names of its samples, bucket `le` aside)
SERIES: dict[str, tuple[str, set[str]]] = {
    "mlx_requests": ("counter", {"model", "endpoint", "status"}),
    "mlx_request_latency_seconds": ("histogram", {"model"}),
    "fusion_http_requests": ("counter", {"route", "method", "status", "key"}),
    "fusion_http_request_duration_seconds": ("histogram", {"route", "method"}),
    "mlx_generated_tokens": ("counter", {"model"}),
    "mlx_prompt_tokens": ("counter", {"model"}),
    "mlx_time_to_first_token_seconds": ("histogram", {"model"}),
    "fusion_workflow_runs": ("counter", {"workflow", "status"}),
    "fusion_step_duration_seconds": ("histogram", {"step_type"}),
    "fusion_rag_ingested_documents": ("counter", set()),
    "fusion_rag_ingested_chunks": ("counter", set()),
    "fusion_rag_ingest_duration_seconds": ("histogram", set()),
    "fusion_rag_queries": ("counter", {"kind"}),
    "fusion_rag_query_duration_seconds": ("histogram", {"kind"}),
    "mlx_vram_usage_gb": ("gauge", {"model"}),
    "mlx_queue_depth": ("gauge", {"model"}),
    "mlx_model_load_time_seconds": ("gauge", {"model"}),
    "fusion_jobs": ("gauge", {"status"}),
    "fusion_webhook_deliveries": ("gauge", {"status"}),
    "fusion_rag_collections": ("gauge", set()),
    "fusion_rag_documents": ("gauge", set()),
    "fusion_rag_chunks": ("gauge", set()),
}


@dataclass
class Scrape:
    types: dict[str, str]
    samples: list[tuple[str, dict[str, str], float]]
    families: dict[str, list[tuple[str, dict[str, str], float]]]

    def value(self, name: str, **labels: str) -> float:
        """The sample's value; 0 when it does not exist yet (a counter not yet touched)."""
        found = [v for n, lbl, v in self.samples if n == name and lbl == labels]
        assert len(found) <= 1
        return found[0] if found else 0.0

    def label_values(self, label: str) -> set[str]:
        return {lbl[label] for _, lbl, _ in self.samples if label in lbl}


def scrape(client: httpx.Client) -> Scrape:
    response = client.get("/metrics")
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    types: dict[str, str] = {}
    samples: list[tuple[str, dict[str, str], float]] = []
    families: dict[str, list[tuple[str, dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(response.text):
        types[family.name] = family.type
        rows = [(s.name, dict(s.labels), s.value) for s in family.samples]
        families[family.name] = rows
        samples += rows
    return Scrape(types, samples, families)


@pytest.fixture(scope="module")
def client(
    tmp_path_factory: pytest.TempPathFactory, tiny_lm_dir: Path, tiny_embedder_dir: Path
) -> Iterator[httpx.Client]:
    data_dir = tmp_path_factory.mktemp("metrics")
    (data_dir / "wf").mkdir()
    (data_dir / "wf" / "greet.yaml").write_text(GREET)
    models = [
        {"model_path": str(tiny_lm_dir), "model_type": "lm", "model_id": LM},
        {"model_path": str(tiny_embedder_dir), "model_type": "embeddings", "model_id": EMBED},
    ]
    with running_server(data_dir, startup_models=models) as c:
        yield c


def post(client: httpx.Client, path: str, status: int, **kwargs: Any) -> dict[str, Any]:
    response = client.post(path, **kwargs)
    assert response.status_code == status, response.text
    body: dict[str, Any] = response.json()
    return body


def test_metrics_count_what_the_server_did(client: httpx.Client) -> None:
    before = scrape(client)

    chat = post(
        client,
        "/v1/chat/completions",
        200,
        json={"model": LM, "messages": MESSAGES, "max_tokens": 3, "temperature": 0},
    )
    post(client, "/v1/chat/completions", 404, json={"model": UNKNOWN, "messages": MESSAGES})
    post(client, "/v1/embeddings", 200, json={"model": EMBED, "input": ["a", "b c"]})
    assert client.get(f"/v1/models/{LM}/info").status_code == 200
    assert client.get("/v1/models/no-such/info").status_code == 404
    assert client.get("/nope/123").status_code == 404

    post(client, "/api/fusion/orchestrate", 200, json={"workflow": "greet", "input": {"name": "A"}})
    post(client, "/api/fusion/orchestrate", 200, json={"workflow": "custom", "definition": INLINE})

    text = "Rivers carry water to the sea. " * 40
    ingest = post(
        client,
        "/api/rag/ingest",
        200,
        data={"collection": "docs"},
        files=[("files", ("rivers.txt", text.encode(), "text/plain"))],
    )
    answer = post(
        client,
        "/api/rag/query",
        200,
        json={
            "query": "rivers",
            "collection": "docs",
            "model_id": LM,
            "similarity_threshold": 0.0,
            "generation_config": {"max_tokens": 3, "temperature": 0},
        },
    )

    job = post(
        client,
        "/api/mcp/jobs",
        202,
        json={
            "model_id": LM,
            "operation": "chat",
            "input": {"messages": MESSAGES, "max_tokens": 3, "temperature": 0},
        },
    )
    path = f"/api/mcp/jobs/{job['job_id']}"
    wait_for(lambda: client.get(path).json()["status"] == "completed", 60, "the job to complete")
    job_usage = client.get(path).json()["result"]["usage"]

    after = scrape(client)

    # Every series, with its type and exact label names.
    for name, (kind, labels) in SERIES.items():
        assert after.types.get(name) == kind, (name, after.types.get(name))
        assert after.families[name], name
        for sample, lbl, _ in after.families[name]:
            assert set(lbl) - {"le"} == labels, (sample, lbl)

    # Bounded labels: loaded models and route templates only.
    assert after.label_values("model") <= {LM, EMBED}
    routes = after.label_values("route") | after.label_values("endpoint")
    assert all(r.startswith("/") and "no-such" not in r and LM not in r for r in routes), routes
    every_value = {v for _, lbl, _ in after.samples for v in lbl.values()}
    assert not {UNKNOWN, "no-such", "/nope/123", "/v1/models/no-such/info"} & every_value

    def delta(name: str, **labels: str) -> float:
        return after.value(name, **labels) - before.value(name, **labels)

    # Per-request series: by route template, one count per loaded model the request used.
    chat_route = {"endpoint": "/v1/chat/completions", "status": "200"}
    assert delta("mlx_requests_total", model=LM, **chat_route) == 1
    assert delta("mlx_requests_total", model=EMBED, endpoint="/v1/embeddings", status="200") == 1
    assert delta("mlx_requests_total", model=LM, endpoint="/api/mcp/jobs", status="202") == 1
    for model in (LM, EMBED):
        assert delta("mlx_requests_total", model=model, endpoint="/api/rag/query", status="200")
    http = {"route": "/v1/chat/completions", "method": "POST", "key": ""}
    assert delta("fusion_http_requests_total", status="200", **http) == 1
    assert delta("fusion_http_requests_total", status="404", **http) == 1
    info_routes = {
        lbl["route"]
        for n, lbl, _ in after.samples
        if n == "fusion_http_requests_total"
        and lbl["method"] == "GET"
        and "models/" in lbl["route"]
    }
    assert len(info_routes) == 1, info_routes  # the template both model paths matched
    info = {"route": info_routes.pop(), "method": "GET", "key": ""}
    assert delta("fusion_http_requests_total", status="200", **info) == 1
    assert delta("fusion_http_requests_total", status="404", **info) == 1
    assert delta("fusion_http_request_duration_seconds_count", route="/metrics", method="GET") == 1

    # Generation: one first token per generation (chat, RAG answer, job); tokens as reported.
    usages = [chat["usage"], job_usage, answer["metadata"]["usage"]]
    generated = sum(u["completion_tokens"] for u in usages)
    prompted = sum(u["prompt_tokens"] for u in usages)
    assert delta("mlx_generated_tokens_total", model=LM) == generated
    assert delta("mlx_prompt_tokens_total", model=LM) == prompted
    assert delta("mlx_time_to_first_token_seconds_count", model=LM) == 3

    # Workflows: catalog ids, inline definitions as "custom"; steps by type.
    assert delta("fusion_workflow_runs_total", workflow="greet", status="completed") == 1
    assert delta("fusion_workflow_runs_total", workflow="custom", status="completed") == 1
    assert "my-inline-id" not in after.label_values("workflow")
    assert delta("fusion_step_duration_seconds_count", step_type="template") == 3

    # RAG.
    assert delta("fusion_rag_ingested_documents_total") == ingest["documents_ingested"] == 1
    assert delta("fusion_rag_ingested_chunks_total") == ingest["chunks_created"]
    assert delta("fusion_rag_ingest_duration_seconds_count") == 1
    assert delta("fusion_rag_queries_total", kind="query") == 1
    assert delta("fusion_rag_query_duration_seconds_count", kind="query") == 1
    assert after.value("fusion_rag_collections") == 1
    assert after.value("fusion_rag_documents") == 1
    assert after.value("fusion_rag_chunks") == ingest["chunks_created"]

    # State read at scrape time.
    assert delta("fusion_jobs", status="completed") == 1
    assert after.value("fusion_jobs", status="queued") == 0
    assert {lbl["status"] for _, lbl, _ in after.families["fusion_webhook_deliveries"]} == {
        "pending",
        "delivered",
        "failed",
        "cancelled",
    }
    for model in (LM, EMBED):
        assert after.value("mlx_vram_usage_gb", model=model) > 0
        assert after.value("mlx_queue_depth", model=model) == 0
        assert after.value("mlx_model_load_time_seconds", model=model) > 0

    # Histograms carry their buckets, +Inf last.
    bounds = [
        lbl["le"]
        for n, lbl, _ in after.samples
        if n == "mlx_request_latency_seconds_bucket" and lbl["model"] == LM
    ]
    assert [float(b) for b in bounds] == [*LATENCY_BUCKETS, float("inf")]


def test_a_model_loaded_later_gets_its_gauges_and_an_unloaded_one_loses_them(
    client: httpx.Client, tmp_path_factory: pytest.TempPathFactory
) -> None:
    extra = build_lm(tmp_path_factory.mktemp("extra") / "lm")
    body = {"model_path": str(extra), "model_type": "lm", "model_id": "extra-lm"}
    post(client, "/v1/models/load", 200, json=body)
    loaded = scrape(client)
    assert loaded.value("mlx_vram_usage_gb", model="extra-lm") > 0
    # The load names the model: counted under it, by the load route's template.
    load = {"model": "extra-lm", "endpoint": "/v1/models/load", "status": "200"}
    assert loaded.value("mlx_requests_total", **load) == 1

    assert client.delete("/v1/models/extra-lm/unload").status_code == 200
    unloaded = scrape(client)
    gauges = ("mlx_vram_usage_gb", "mlx_queue_depth", "mlx_model_load_time_seconds")
    for name in gauges:
        assert "extra-lm" not in {lbl["model"] for _, lbl, _ in unloaded.families[name]}


def test_each_app_has_its_own_registry(
    tmp_path_factory: pytest.TempPathFactory, client: httpx.Client
) -> None:
    """A second app in the same process starts from zero."""
    with running_server(tmp_path_factory.mktemp("second")) as other:
        fresh = scrape(other)
    assert fresh.value("mlx_generated_tokens_total", model=LM) == 0
    assert not [s for s in fresh.samples if s[0] == "fusion_workflow_runs_total"]
    assert scrape(client).value("mlx_generated_tokens_total", model=LM) > 0


def test_the_key_name_labels_the_http_series(tmp_path_factory: pytest.TempPathFactory) -> None:
    """The key's name, never the key; a refused request is counted under no key."""
    secret = "metrics-test-key-0123456789"
    with running_server(tmp_path_factory.mktemp("keys"), api_keys={"ci": secret}) as c:
        assert c.get("/v1/models").status_code == 401
        c.headers["Authorization"] = f"Bearer {secret}"
        assert c.get("/v1/models").status_code == 200
        found = scrape(c)
    listing = {"route": "/v1/models", "method": "GET"}
    assert found.value("fusion_http_requests_total", status="401", key="", **listing) == 1
    assert found.value("fusion_http_requests_total", status="200", key="ci", **listing) == 1
    assert secret not in {v for _, lbl, _ in found.samples for v in lbl.values()}


def test_models_looked_up_in_tasks_and_threads_reach_the_request() -> None:
    async def note(model_id: str) -> None:
        note_model(model_id)

    async def request() -> set[str]:
        with tracking_models() as used:
            await asyncio.to_thread(note_model, "in-a-thread")
            await asyncio.create_task(note("in-a-task"))
        note_model("after-the-request")
        return used

    assert asyncio.run(request()) == {"in-a-thread", "in-a-task"}
