"""/internal/diagnostics (spec §6.2), its ring buffer of recent errors, and /health with
/health/live and /health/ready (§6.3), against a real server with tiny models; the ring
buffer's bounds also in-process with a stepped clock."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import mlx.core as mx
import pytest
from api_helpers import wait_for
from litestar import Request, get, post
from litestar.datastructures import State
from serverutil import RunningServer, serve_app

from engine.config import Settings
from engine.jobs.queue import SqliteJobQueue
from engine.jobs.types import JobRequest
from engine.recent_errors import RecentErrors
from engine.store import Store
from server.app import create_app
from server.diagnostics import job_failures, recent_errors

LM = "tiny-lm"
EMBED = "tiny-embedder"
STAMP = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ")


@post("/test/stop-workers", status_code=200)
async def stop_workers(request: Request[Any, Any, Any]) -> None:
    await request.app.state.engine.jobs.stop()


@get("/test/boom")
async def boom() -> None:
    raise RuntimeError("secret internals at /etc/fusion")


@post("/test/start-workers", status_code=200)
async def start_workers(request: Request[Any, Any, Any]) -> None:
    await request.app.state.engine.jobs.start()


def _settings(data_dir: Path, **extra: Any) -> Settings:
    return Settings(
        **{
            "data_dir": data_dir,
            "startup_models": [],
            "workflows_dir": data_dir / "wf",
            "log_level": "warning",
            **extra,
        }
    )


@pytest.fixture(scope="module")
def server(
    tmp_path_factory: pytest.TempPathFactory, tiny_lm_dir: Path, tiny_embedder_dir: Path
) -> Iterator[RunningServer]:
    models = [
        {"model_path": str(tiny_lm_dir), "model_type": "lm", "model_id": LM},
        {"model_path": str(tiny_embedder_dir), "model_type": "embeddings", "model_id": EMBED},
    ]
    settings = _settings(
        tmp_path_factory.mktemp("diag"),
        startup_models=models,
        diagnostics_max_errors=3,
        # The model routes' readings are compared many times over; limits are tested apart.
        rate_limit_enabled=False,
    )
    app = create_app(settings, extra_routes=[stop_workers, start_workers, boom])
    with serve_app(app) as running:
        yield running


@pytest.fixture
def client(server: RunningServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.base_url, timeout=60.0) as c:
        yield c


def diagnostics(client: httpx.Client) -> dict[str, Any]:
    response = client.get("/internal/diagnostics")
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


# -- /internal/diagnostics -------------------------------------------------------------------


@pytest.mark.e2e
def test_diagnostics_has_the_spec_keys_with_real_readings(client: httpx.Client) -> None:
    body = diagnostics(client)
    assert {
        "timestamp",
        "uptime_seconds",
        "system",
        "resources",
        "models",
        "queues",
        "jobs",
        "rag",
        "errors",
    } <= set(body)
    assert STAMP.fullmatch(body["timestamp"])
    assert body["uptime_seconds"] > 0
    system = body["system"]
    for key in ("platform", "platform_version", "processor", "python_version", "mlx_version"):
        assert isinstance(system[key], str), key
        assert system[key], key
    packages = system["packages"]
    assert set(packages) == {"fusion", "litestar", "mlx", "mlx-lm", "mlx-vlm"}
    assert packages["litestar"]
    assert packages["mlx"] == system["mlx_version"]
    resources = body["resources"]
    assert 0 <= resources["cpu_usage_percent"] <= 100 * 1024
    assert 0 < resources["memory_usage_gb"] <= resources["memory_total_gb"]
    assert 0 < resources["process_memory_gb"] <= resources["memory_total_gb"]
    # GPU memory only where MLX runs on a GPU.
    on_gpu = mx.default_device().type == mx.DeviceType.gpu
    assert ("vram_usage_gb" in resources) is on_gpu
    assert ("vram_total_gb" in resources) is on_gpu
    assert set(body["jobs"]) == {"queued", "processing", "completed", "failed", "cancelled"}
    assert all(isinstance(n, int) and n >= 0 for n in body["jobs"].values())
    assert set(body["rag"]) == {"collections", "total_documents", "total_chunks"}
    assert isinstance(body["errors"]["last_24h"], int)


@pytest.mark.e2e
def test_models_and_queues_agree_with_the_model_routes(client: httpx.Client) -> None:
    chat = client.post(
        "/v1/chat/completions",
        json={"model": LM, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
    )
    assert chat.status_code == 200, chat.text
    body = diagnostics(client)
    listed = {m["id"]: m for m in client.get("/v1/models").json()["data"]}
    models = body["models"]
    assert models["loaded_count"] == len(listed) == 2
    assert {m["id"] for m in models["models"]} == set(listed) == set(body["queues"])
    for model in models["models"]:
        stats = client.get(f"/v1/models/{model['id']}/stats").json()
        info = client.get(f"/v1/models/{model['id']}/info").json()
        assert model["status"] == "loaded"
        assert model["vram_usage_gb"] == listed[model["id"]]["vram_usage_gb"]
        assert model["request_count"] == stats["request_count"]
        assert model["avg_latency_ms"] == stats["avg_latency_ms"]
        queue = body["queues"][model["id"]]
        assert queue == {
            "queue_size": info["queue"]["waiting"],
            "max_queue_size": info["queue"]["max_queue"],
            "active_requests": info["queue"]["active"],
            "max_concurrency": info["queue"]["max_concurrency"],
        }
    lm = next(m for m in models["models"] if m["id"] == LM)
    assert lm["request_count"] >= 1
    assert lm["avg_latency_ms"] is not None
    assert models["total_vram_usage_gb"] == pytest.approx(
        sum(m["vram_usage_gb"] for m in models["models"]), abs=1e-3
    )


@pytest.mark.e2e
def test_job_counts_follow_submitted_jobs(client: httpx.Client) -> None:
    before = diagnostics(client)["jobs"]
    ids = []
    for _ in range(2):
        response = client.post(
            "/api/mcp/jobs",
            json={
                "model_id": LM,
                "operation": "chat",
                "input": {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
            },
        )
        assert response.status_code == 202, response.text
        ids.append(response.json()["job_id"])

    def all_completed() -> bool:
        return all(
            client.get(f"/api/mcp/jobs/{job_id}").json()["status"] == "completed" for job_id in ids
        )

    wait_for(all_completed, timeout_s=60, what="the jobs to complete")
    after = diagnostics(client)["jobs"]
    assert after["completed"] == before["completed"] + 2
    for status, count in after.items():
        listed = client.get("/api/mcp/jobs", params={"status": status, "limit": 1}).json()
        assert listed["total"] == count, status


@pytest.mark.e2e
def test_rag_totals_follow_an_ingest(client: httpx.Client) -> None:
    files = [
        ("files", ("a.txt", b"Rivers carry water to the sea. " * 40, "text/plain")),
        ("files", ("b.txt", b"Volcanoes erupt molten rock. " * 40, "text/plain")),
    ]
    response = client.post(
        "/api/rag/ingest", data={"collection": "diag", "embedding_model": EMBED}, files=files
    )
    assert response.status_code == 200, response.text
    rag = diagnostics(client)["rag"]
    collections = client.get("/api/rag/collections").json()["collections"]
    assert rag["collections"] == len(collections) >= 1
    assert rag["total_documents"] == sum(c["document_count"] for c in collections) >= 2
    assert rag["total_chunks"] == sum(c["chunk_count"] for c in collections) >= 2


# -- recent errors ---------------------------------------------------------------------------


@pytest.mark.e2e
def test_recent_errors_keep_the_newest_within_the_bound(client: httpx.Client) -> None:
    """diagnostics_max_errors is 3: five errors leave the last three, newest first, and
    all five counted."""
    before = diagnostics(client)["errors"]["last_24h"]
    ids = [f"diag-missing-{i}" for i in range(5)]
    for request_id in ids:
        response = client.get("/api/mcp/jobs/job-nope", headers={"X-Request-ID": request_id})
        assert response.status_code == 404, response.text
    errors = diagnostics(client)["errors"]
    assert errors["last_24h"] == before + 5
    recent = errors["recent_errors"]
    assert [e["request_id"] for e in recent] == ids[::-1][:3]
    newest = recent[0]
    assert STAMP.fullmatch(newest["timestamp"])
    assert newest["status"] == 404
    assert newest["code"] == "job_not_found"
    assert "job-nope" in newest["error"]
    assert newest["route"] == "/api/mcp/jobs/{job_id}"
    assert newest["model"] is None
    assert newest["job_id"] is None


@pytest.mark.e2e
def test_a_validation_error_is_recorded_and_a_routing_miss_is_not(client: httpx.Client) -> None:
    invalid = client.post(
        "/v1/chat/completions",
        json={"model": LM, "messages": "not a list"},
        headers={"X-Request-ID": "diag-invalid"},
    )
    assert invalid.status_code == 400, invalid.text
    missing = client.get("/no/such/route", headers={"X-Request-ID": "diag-no-route"})
    assert missing.status_code == 404
    recent = diagnostics(client)["errors"]["recent_errors"]
    assert recent[0]["request_id"] == "diag-invalid"
    assert recent[0]["status"] == 400
    assert recent[0]["route"] == "/v1/chat/completions"
    assert all(e["request_id"] != "diag-no-route" for e in recent)


@pytest.mark.e2e
def test_a_500_is_recorded_without_the_exception_text(client: httpx.Client) -> None:
    response = client.get("/test/boom", headers={"X-Request-ID": "diag-boom"})
    assert response.status_code == 500
    newest = diagnostics(client)["errors"]["recent_errors"][0]
    assert newest["request_id"] == "diag-boom"
    assert (newest["status"], newest["code"]) == (500, "internal_error")
    assert newest["error"] == "Internal server error (RuntimeError)"
    assert newest["route"] == "/test/boom"


@pytest.mark.e2e
def test_an_error_about_a_loaded_model_names_it(client: httpx.Client) -> None:
    response = client.post(
        f"/v1/models/{LM}/warmup",
        json={"max_length": -1},
        headers={"X-Request-ID": "diag-model"},
    )
    assert response.status_code == 400, response.text
    newest = diagnostics(client)["errors"]["recent_errors"][0]
    assert newest["request_id"] == "diag-model"
    assert newest["model"] == LM


@pytest.mark.unit
def test_the_ring_buffer_forgets_what_is_older_than_its_window() -> None:
    now = [1_000_000.0]
    errors = RecentErrors(10, window_s=3600, clock=lambda: now[0])
    errors.record("first", "internal_error", 500, request_id="r1")
    now[0] += 1800
    errors.record("second", "invalid_request", 400, request_id="r2")
    assert errors.snapshot()[0] == 2
    now[0] += 1860  # the first is past the window (with its whole minute), the second not
    count, kept = errors.snapshot()
    assert count == 1
    assert [e.request_id for e in kept] == ["r2"]
    now[0] += 3600
    assert errors.snapshot() == (0, [])


@pytest.mark.unit
def test_the_ring_buffer_counts_more_than_it_keeps() -> None:
    errors = RecentErrors(2)
    for i in range(7):
        errors.record(f"e{i}", "not_found", 404)
    count, kept = errors.snapshot()
    assert count == 7
    assert [e.message for e in kept] == ["e6", "e5"]


@pytest.mark.unit
def test_failed_jobs_are_recorded_by_the_queue_observer(tmp_path: Path) -> None:
    """A real queue in a real database: the failure's commit reaches the observer."""
    state = State({"settings": _settings(tmp_path, diagnostics_max_errors=5)})
    with Store(tmp_path / "jobs.sqlite3") as store:
        queue = SqliteJobQueue(store)
        queue.on_event(observe=job_failures(state))
        for text in ("ok", "doomed"):
            queue.submit(JobRequest(operation="chat", input={"messages": [text]}, model_id="m"))
        for error in (None, "model 'm' not found"):
            job = queue.claim("worker", 60.0, operations=["chat"])
            assert job is not None
            assert queue.finish(job.id, job.lease_token, result={}, error=error)
    count, kept = recent_errors(state).snapshot()
    assert count == 1
    (failed,) = kept
    assert (failed.code, failed.status, failed.model) == ("job.failed", None, "m")
    assert failed.message == "model 'm' not found"
    assert failed.job_id == job.id


# -- /health, /health/live, /health/ready ----------------------------------------------------


@pytest.mark.e2e
def test_health_live_and_ready_answer_200_when_all_runs(client: httpx.Client) -> None:
    health = client.get("/health")
    assert health.status_code == 200, health.text
    body = health.json()
    assert body["status"] == "ok"
    assert body["jobs"] == {"workers_running": True}
    assert body["models"]["loaded_count"] == 2
    assert client.get("/health/live").json() == {"status": "ok"}
    ready = client.get("/health/ready")
    assert ready.status_code == 200
    assert ready.json() == {"status": "ready"}


@pytest.mark.e2e
def test_stopped_job_workers_make_health_and_ready_503(client: httpx.Client) -> None:
    assert client.post("/test/stop-workers").status_code == 200
    try:
        health = client.get("/health")
        assert health.status_code == 503
        body = health.json()
        assert body["status"] == "unhealthy"
        assert body["jobs"] == {"workers_running": False}
        assert body["persistence"]["store_writable"] is True  # every reading kept
        assert body["error"]["code"] == "service_unavailable"
        assert "job workers" in body["error"]["message"]
        ready = client.get("/health/ready")
        assert ready.status_code == 503
        error = ready.json()["error"]
        assert error["type"] == "service_unavailable_error"
        assert "job workers" in error["message"]
        assert client.get("/health/live").status_code == 200
    finally:
        assert client.post("/test/start-workers").status_code == 200
    assert client.get("/health/ready").status_code == 200


@pytest.mark.e2e
def test_a_broken_store_makes_ready_503_naming_it(tmp_path: Path) -> None:
    with serve_app(create_app(_settings(tmp_path))) as running:
        running.app.state.store.close()
        with httpx.Client(base_url=running.base_url, timeout=10.0) as c:
            ready = c.get("/health/ready")
            live = c.get("/health/live")
            health = c.get("/health")
    assert ready.status_code == 503
    error = ready.json()["error"]
    assert error["code"] == "storage_unavailable"
    assert error["message"].startswith("not ready: the database")
    assert live.status_code == 200
    assert health.status_code == 503
    assert health.json()["error"]["code"] == "storage_unavailable"


@pytest.mark.e2e
def test_health_without_jobs_has_no_jobs_reading(tmp_path: Path) -> None:
    with (
        serve_app(create_app(_settings(tmp_path, jobs_enabled=False))) as running,
        httpx.Client(base_url=running.base_url, timeout=10.0) as c,
    ):
        health = c.get("/health")
        assert health.status_code == 200
        assert "jobs" not in health.json()
        assert c.get("/health/ready").status_code == 200
        assert "jobs" not in diagnostics(c)
