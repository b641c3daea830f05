"""Optional API keys and the request log line, against a real server."""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from api_helpers import wait_for
from litestar import post
from litestar.params import JSONBody
from serverutil import serve_app

from engine.config import Settings
from server.app import create_app
from server.auth import key_digests, key_name

ALICE = "alice-secret-key-0123456789"
BOB = "bob-secret-key-9876543210"
WRONG = "mallory-guess-5555555555"
KEYS = {"alice": ALICE, "bob": "sha256:" + hashlib.sha256(BOB.encode()).hexdigest()}


def _settings(data_dir: Path, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "data_dir": data_dir,
        "startup_models": [],
        "workflows_dir": data_dir / "wf",
        "log_level": "warning",
        **overrides,
    }
    return Settings(**values)


@post("/test/hang")
async def hang(data: JSONBody[dict[str, Any]]) -> None:
    await asyncio.Event().wait()  # until the client leaves and the request is cancelled


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[httpx.Client]:
    settings = _settings(tmp_path_factory.mktemp("auth"), api_keys=KEYS)
    app = create_app(settings, extra_routes=[hang])
    with serve_app(app) as server, httpx.Client(base_url=server.base_url) as client:
        yield client


def _bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def _assert_refused(response: httpx.Response) -> None:
    assert response.status_code == 401, response.text
    error = response.json()["error"]
    assert error["type"] == "authentication_error"
    assert error["code"] == "authentication_failed"
    assert error["param"] == "Authorization"
    assert response.headers["WWW-Authenticate"] == "Bearer"


def _request_lines(records: list[logging.LogRecord], request_id: str) -> list[dict[str, Any]]:
    return [
        r.msg
        for r in records
        if isinstance(r.msg, dict)
        and r.msg.get("event") == "request"
        and r.msg.get("request_id") == request_id
    ]


@pytest.mark.e2e
@pytest.mark.parametrize(
    "authorization",
    [None, f"Bearer {WRONG}", f"Basic {ALICE}", "Bearer", f"Bearer {ALICE} extra", ALICE],
)
def test_a_request_without_a_valid_key_is_refused(
    client: httpx.Client, authorization: str | None
) -> None:
    headers = {"Authorization": authorization} if authorization is not None else {}
    _assert_refused(client.get("/v1/models", headers=headers))


@pytest.mark.e2e
@pytest.mark.parametrize("key", [ALICE, BOB], ids=["plain", "sha256"])
def test_a_configured_key_is_let_in(client: httpx.Client, key: str) -> None:
    assert client.get("/v1/models", headers=_bearer(key)).status_code == 200
    # The scheme is case-insensitive (RFC 7235).
    assert client.get("/v1/models", headers={"Authorization": f"bearer {key}"}).status_code == 200


@pytest.mark.e2e
def test_health_is_open_and_operational_routes_are_not(client: httpx.Client) -> None:
    assert client.get("/health").status_code == 200
    for path in ("/metrics", "/internal/diagnostics", "/schema/openapi.json"):
        _assert_refused(client.get(path))
        assert client.get(path, headers=_bearer(ALICE)).status_code == 200, path


@pytest.mark.e2e
def test_the_request_line_names_the_key_and_no_key_is_ever_logged(
    client: httpx.Client, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.DEBUG):
        ok = client.get(
            "/api/fusion/runs/no-such-run", headers={**_bearer(BOB), "X-Request-ID": "auth-ok"}
        )
        refused = client.get(
            "/v1/models", headers={**_bearer(WRONG), "X-Request-ID": "auth-refused"}
        )
        unrouted = client.get("/nowhere", headers={**_bearer(ALICE), "X-Request-ID": "unrouted"})
    assert ok.status_code == 404
    assert refused.status_code == 401
    assert unrouted.status_code == 404

    (line,) = _request_lines(caplog.records, "auth-ok")
    assert line["api_key"] == "bob"
    assert line["method"] == "GET"
    assert line["route"] == "/api/fusion/runs/{run_id}"
    assert line["path"] == "/api/fusion/runs/no-such-run"
    assert line["status"] == 404
    assert line["client"] == "127.0.0.1"
    assert isinstance(line["latency_ms"], float)
    assert line["latency_ms"] >= 0
    (line,) = _request_lines(caplog.records, "auth-refused")
    assert line["status"] == 401
    assert line["api_key"] is None
    (line,) = _request_lines(caplog.records, "unrouted")
    assert line["status"] == 404
    assert line["route"] is None

    text = caplog.text + "".join(str(r.msg) for r in caplog.records)
    for secret in (ALICE, BOB, WRONG):
        assert secret not in text


@pytest.mark.e2e
def test_a_request_whose_client_leaves_still_gets_its_line(
    client: httpx.Client, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO):
        with pytest.raises(httpx.ReadTimeout):
            client.post(
                "/test/hang",
                json={},
                headers={**_bearer(ALICE), "X-Request-ID": "left"},
                timeout=httpx.Timeout(10.0, read=0.2),
            )
        wait_for(lambda: bool(_request_lines(caplog.records, "left")), what="the request line")
    (line,) = _request_lines(caplog.records, "left")
    assert line["completed"] is False
    assert line["status"] is None
    assert line["api_key"] == "alice"


@pytest.mark.e2e
def test_without_keys_every_route_is_open(tmp_path: Path) -> None:
    with (
        serve_app(create_app(_settings(tmp_path))) as server,
        httpx.Client(base_url=server.base_url) as client,
    ):
        assert client.get("/v1/models").status_code == 200
        assert client.get("/metrics").status_code == 200


@pytest.mark.unit
@pytest.mark.parametrize(
    ("host", "keys", "warned"),
    [
        ("0.0.0.0", {}, True),
        ("192.168.1.20", {}, True),
        ("fusion.example", {}, True),
        ("::", {}, True),
        ("0.0.0.0", KEYS, False),
        ("127.0.0.1", {}, False),
        ("::1", {}, False),
        ("localhost", {}, False),
    ],
)
def test_serving_beyond_loopback_without_a_key_warns(
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    host: str,
    keys: dict[str, str],
    warned: bool,
) -> None:
    with caplog.at_level(logging.WARNING):
        create_app(_settings(tmp_path, host=host, api_keys=keys))
    warnings = [
        r.msg
        for r in caplog.records
        if r.name == "server.auth" and "without API keys" in str(r.msg)
    ]
    assert len(warnings) == (1 if warned else 0)


@pytest.mark.unit
def test_key_settings_are_checked_without_showing_the_key() -> None:
    digests = key_digests(KEYS)
    assert key_name(f"Bearer {ALICE}", digests) == "alice"
    assert key_name(f"Bearer {BOB}", digests) == "bob"
    assert key_name(f"Bearer {WRONG}", digests) is None
    assert key_name(None, digests) is None
    with pytest.raises(ValueError, match=r"api_keys\.carol") as bad_hash:
        key_digests({"carol": "sha256:" + ALICE})
    assert ALICE not in str(bad_hash.value)
    with pytest.raises(ValueError, match="empty"):
        key_digests({"dave": ""})
