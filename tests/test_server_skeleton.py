"""The server skeleton end to end: a real uvicorn on a loopback port, called over HTTP."""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest
from litestar import get, post
from litestar.exceptions import TooManyRequestsException
from litestar.params import FromQuery, JSONBody
from serverutil import RunningServer, serve_app, serve_factory_process

from engine.config import Settings
from engine.errors import ErrorCode, NotFound, QueueFull
from server.app import create_app

REPO_ROOT = Path(__file__).resolve().parent.parent


class Item(msgspec.Struct):
    name: str
    count: int


@post("/test/items")
async def create_item(data: JSONBody[Item]) -> Item:
    return data


@get("/test/boom")
async def boom() -> None:
    raise RuntimeError("secret internals at /etc/fusion")


@get("/test/missing-model")
async def missing_model() -> None:
    raise NotFound("Model 'nope' not found", param="model_id", code=ErrorCode.MODEL_NOT_FOUND)


@get("/test/queue-full")
async def queue_full() -> None:
    raise QueueFull("Queue is full", headers={"Retry-After": "7"})


@get("/test/limited")
async def limited() -> None:
    raise TooManyRequestsException(
        "Rate limit exceeded. Try again in 30 seconds.", headers={"RateLimit-Reset": "30"}
    )


@get("/test/search")
async def search(limit: FromQuery[int]) -> dict[str, int]:
    return {"limit": limit}


@post("/test/small", request_max_body_size=16)
async def small(data: JSONBody[dict[str, Any]]) -> dict[str, Any]:
    return data


TEST_ROUTES = [create_item, boom, missing_model, queue_full, limited, search, small]


def _settings(data_dir: Path) -> Settings:
    return Settings(
        data_dir=data_dir,
        log_format="console",
        log_level="warning",
        startup_models=[],
        workflows_dir=data_dir / "workflows",
    )


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    app = create_app(_settings(tmp_path_factory.mktemp("data")), extra_routes=TEST_ROUTES)
    with serve_app(app) as running:
        yield running


@pytest.fixture
def client(server: RunningServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.base_url, timeout=10.0) as c:
        yield c


def _error(response: httpx.Response, status: int, type_: str, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert set(body) == {"error"}
    error = body["error"]
    assert {"type", "message", "param", "code"} <= set(error)
    assert error["type"] == type_
    assert error["code"] == code
    assert isinstance(error["message"], str)
    assert error["message"]
    return error


def test_health_reports_real_readings(client: httpx.Client, server: RunningServer) -> None:
    response = client.get("/health")
    assert response.status_code == 200
    body = response.json()
    assert body["status"] == "ok"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", body["timestamp"])
    stamp = datetime.strptime(body["timestamp"], "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)
    assert abs(datetime.now(UTC) - stamp) < timedelta(minutes=5)
    assert body["models"] == {"loaded_count": 0, "models_healthy": True, "models": []}
    persistence = body["persistence"]
    assert persistence["vector_db_connected"] is True
    assert persistence["store_writable"] is True
    assert persistence["store_free_bytes"] > 0
    assert "error" not in body
    assert body["services"] == {"fusion_enabled": True, "rag_enabled": True, "mcp_enabled": True}
    assert server.app.state.store.path.is_file()


def test_health_reports_a_broken_store(tmp_path: Path) -> None:
    app = create_app(_settings(tmp_path))
    with serve_app(app) as running:
        running.app.state.store.close()
        response = httpx.get(f"{running.base_url}/health", timeout=10.0)
    # Unhealthy, naming the part (docs/decisions.md), with every reading kept.
    assert response.status_code == 503
    body = response.json()
    assert body["status"] == "unhealthy"
    assert body["persistence"] == {
        "vector_db_connected": False,
        "store_writable": False,
        "store_free_bytes": None,
    }
    assert body["error"]["type"] == "service_unavailable_error"
    assert body["error"]["code"] == "storage_unavailable"


def test_unknown_route_is_404_envelope(client: httpx.Client) -> None:
    error = _error(client.get("/no/such/route"), 404, "not_found_error", "not_found")
    assert error["param"] is None
    assert error["message"] == "No route matches GET /no/such/route"


def test_wrong_method_is_405_envelope_with_allow(client: httpx.Client) -> None:
    response = client.delete("/health")
    error = _error(response, 405, "invalid_request_error", "method_not_allowed")
    assert error["message"] == "Method DELETE is not allowed on /health"
    assert "GET" in response.headers["allow"]


def test_unexpected_exception_is_generic_500(client: httpx.Client) -> None:
    response = client.get("/test/boom")
    error = _error(response, 500, "internal_error", "internal_error")
    assert error["message"] == "Internal server error"
    for leaked in ("secret", "Traceback", "RuntimeError", "/etc/fusion", ".py"):
        assert leaked not in response.text


def test_wrong_body_type_is_400_with_param(client: httpx.Client) -> None:
    response = client.post("/test/items", json={"name": "x", "count": "many"})
    error = _error(response, 400, "invalid_request_error", "invalid_request")
    assert error["param"] == "count"
    assert "int" in error["message"]
    assert error["details"][0]["param"] == "count"
    assert error["details"][0]["source"] == "body"


def test_missing_body_field_names_the_field(client: httpx.Client) -> None:
    response = client.post("/test/items", json={"name": "x"})
    error = _error(response, 400, "invalid_request_error", "invalid_request")
    assert error["param"] == "count"


def test_malformed_json_is_400_envelope(client: httpx.Client) -> None:
    response = client.post(
        "/test/items", content=b"{not json", headers={"content-type": "application/json"}
    )
    _error(response, 400, "invalid_request_error", "invalid_request")


def test_bad_and_missing_query_params_name_the_param(client: httpx.Client) -> None:
    error = _error(
        client.get("/test/search", params={"limit": "ten"}),
        400,
        "invalid_request_error",
        "invalid_request",
    )
    assert error["param"] == "limit"
    error = _error(client.get("/test/search"), 400, "invalid_request_error", "invalid_request")
    assert error["param"] == "limit"
    assert client.get("/test/search", params={"limit": 3}).json() == {"limit": 3}


def test_valid_body_passes(client: httpx.Client) -> None:
    response = client.post("/test/items", json={"name": "x", "count": 2})
    assert response.status_code == 201
    assert response.json() == {"name": "x", "count": 2}


def test_domain_error_keeps_its_status_code_and_param(client: httpx.Client) -> None:
    error = _error(client.get("/test/missing-model"), 404, "not_found_error", "model_not_found")
    assert error["param"] == "model_id"
    assert error["message"] == "Model 'nope' not found"


def test_domain_error_headers_are_sent(client: httpx.Client) -> None:
    response = client.get("/test/queue-full")
    _error(response, 429, "rate_limit_error", "queue_full")
    assert response.headers["retry-after"] == "7"


def test_http_429_keeps_its_headers(client: httpx.Client) -> None:
    response = client.get("/test/limited")
    error = _error(response, 429, "rate_limit_error", "rate_limit_exceeded")
    assert error["message"] == "Rate limit exceeded. Try again in 30 seconds."
    assert response.headers["ratelimit-reset"] == "30"


def test_oversized_body_is_413_envelope(client: httpx.Client) -> None:
    response = client.post("/test/small", json={"text": "x" * 100})
    _error(response, 413, "payload_too_large_error", "payload_too_large")


def test_request_id_is_echoed(client: httpx.Client) -> None:
    for path in ("/health", "/no/such/route", "/test/boom"):
        response = client.get(path, headers={"X-Request-ID": "client-id-123"})
        assert response.headers["x-request-id"] == "client-id-123", path


def test_request_id_is_generated_per_request(client: httpx.Client) -> None:
    ids = set()
    for path in ("/health", "/health", "/no/such/route", "/test/boom"):
        request_id = client.get(path).headers["x-request-id"]
        assert re.fullmatch(r"[0-9a-f]{32}", request_id), request_id
        ids.add(request_id)
    assert len(ids) == 4
    response = client.delete("/health")
    assert re.fullmatch(r"[0-9a-f]{32}", response.headers["x-request-id"])


def test_request_id_is_sanitised_and_bounded(client: httpx.Client) -> None:
    response = client.get("/health", headers={"X-Request-ID": 'ab c"d<e>;f' + "z" * 500})
    request_id = response.headers["x-request-id"]
    assert request_id.startswith("abcdef")
    assert len(request_id) == 128
    unusable = client.get("/health", headers={"X-Request-ID": "<<>>"})
    assert re.fullmatch(r"[0-9a-f]{32}", unusable.headers["x-request-id"])


def test_openapi_is_served(client: httpx.Client) -> None:
    response = client.get("/schema/openapi.json")
    assert response.status_code == 200
    spec = response.json()
    assert spec["info"]["title"] == "Fusion"
    assert "/health" in spec["paths"]


def test_uvicorn_factory_serves_with_json_logs_carrying_request_id(tmp_path: Path) -> None:
    env = {
        "FUSION_CONFIG": str(tmp_path / "absent.yaml"),
        "FUSION_DATA_DIR": str(tmp_path / "data"),
        "FUSION_LOG_FORMAT": "json",
        "FUSION_LOG_LEVEL": "info",
        "FUSION_STARTUP_MODELS": "[]",
    }
    log_path = tmp_path / "server.log"
    with serve_factory_process(env, log_path, cwd=REPO_ROOT) as proc:
        response = httpx.get(
            f"{proc.base_url}/health", headers={"X-Request-ID": "factory-check-1"}, timeout=10
        )
        assert response.status_code == 200
        assert response.json()["persistence"]["vector_db_connected"] is True
        missing = httpx.get(f"{proc.base_url}/nope", headers={"X-Request-ID": "factory-404"})
        assert missing.json()["error"]["type"] == "not_found_error"
    assert (tmp_path / "data" / "fusion.sqlite3").is_file()

    lines = [line for line in log_path.read_text().splitlines() if line.strip()]
    records = [json.loads(line) for line in lines]  # every line, uvicorn's too, is JSON
    # The app's one line per request, not uvicorn's access line (which it turns down).
    access = [r for r in records if r.get("event") == "request"]
    assert not any(r.get("logger") == "uvicorn.access" for r in records)
    assert any(r.get("request_id") == "factory-check-1" for r in access), access
    assert any(r.get("request_id") == "factory-404" for r in access), access
    assert any(r.get("event") == "engine started" for r in records)
    assert any(r.get("event") == "engine stopped" for r in records)


def test_unexpected_exception_is_logged_with_traceback_and_request_id(
    client: httpx.Client, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.ERROR):
        client.get("/test/boom", headers={"X-Request-ID": "boom-1"})
    events = [r.msg for r in caplog.records if r.name == "server.errors"]
    assert len(events) == 1
    event = events[0]
    assert isinstance(event, dict)
    assert event["request_id"] == "boom-1"
    assert event["path"] == "/test/boom"
    assert isinstance(event["exc_info"], RuntimeError)
