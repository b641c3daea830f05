"""The HTTP edge against hostile requests (issue #8, findings 5b, 7 and 12a), against a real
server: browsers' cross-site requests (content type, Host allow-list for DNS rebinding,
Origin), JSON bodies nested deep enough to exhaust the recursion limit, clients that leave
mid-run, and SIGTERM during a long request. Every refusal is a 4xx in the §7 envelope and
/health keeps answering while the bad request is in flight."""

from __future__ import annotations

import json
import random
import signal
import socket
import subprocess
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path
from typing import Any

import httpx
import pytest
from api_helpers import no_eos_bias, running_server, wait_for
from serverutil import RunningServer, serve_app, serve_cli_process

from engine.config import Settings
from server.app import create_app
from server.guards import JsonDepthCounter

LM = "tiny-lm"
EMBED = "tiny-embedder"
EVIL = "http://evil.example"
HANG_GUARD_S = 60.0  # an upper bound on a wait, reached only when something is stuck


def lm_model(path: Path) -> dict[str, Any]:
    return {"model_path": str(path), "model_type": "lm", "model_id": LM}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, tiny_lm_dir: Path) -> Iterator[RunningServer]:
    data = tmp_path_factory.mktemp("edge")
    settings = Settings(
        data_dir=data,
        workflows_dir=data / "wf",
        startup_models=[lm_model(tiny_lm_dir)],
        log_level="info",
        # Tests poll model stats more often than one client may in a minute.
        rate_limit_enabled=False,
    )
    with serve_app(create_app(settings)) as running:
        yield running


@pytest.fixture
def client(server: RunningServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.base_url, timeout=60.0) as c:
        yield c


def assert_error(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    error: dict[str, Any] = response.json()["error"]
    assert set(error) >= {"type", "message", "param", "code"}
    assert error["code"] == code, error
    return error


def assert_health(base_url: str) -> None:
    """/health answers. Called while a request is known to be in progress (the callers wait
    for it to reach the model), it proves /health overtook that request by ordering: the
    request is cancelled only after this answer, and the caller then checks that it was."""
    with httpx.Client(base_url=base_url, timeout=HANG_GUARD_S) as fresh:
        assert fresh.get("/health").status_code == 200


def port_of(base_url: str) -> int:
    return int(base_url.rsplit(":", 1)[1])


# -- content type (finding 7) -------------------------------------------------------------------
JSON_ROUTES = [
    "/api/fusion/orchestrate",
    "/api/fusion/compose",
    "/api/rag/query",
    "/v1/chat/completions",
    "/v1/embeddings",
    "/v1/models/load",
]


@pytest.mark.parametrize("path", JSON_ROUTES)
@pytest.mark.parametrize(
    "content_type", ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data", None]
)
def test_json_routes_refuse_other_content_types(
    client: httpx.Client, path: str, content_type: str | None
) -> None:
    headers = {"content-type": content_type} if content_type else {}
    # httpx adds no content type to raw content: the "missing" case is real.
    response = client.post(path, content=b'{"workflow": "x"}', headers=headers)
    error = assert_error(response, 415, "unsupported_media_type")
    assert error["param"] == "Content-Type"


@pytest.mark.parametrize(
    "content_type", ["application/json", "application/json; charset=utf-8", "application/x+json"]
)
def test_json_content_types_are_accepted(client: httpx.Client, content_type: str) -> None:
    response = client.post(
        "/api/fusion/orchestrate",
        content=b'{"workflow": "no-such-workflow"}',
        headers={"content-type": content_type},
    )
    assert_error(response, 404, "invalid_workflow")


def test_an_optional_body_may_be_left_out_without_a_content_type(client: httpx.Client) -> None:
    assert client.post(f"/v1/models/{LM}/warmup").status_code == 200


# -- Host allow-list (finding 7: DNS rebinding) -------------------------------------------------
def test_a_rebinding_host_is_refused(client: httpx.Client, server: RunningServer) -> None:
    port = port_of(server.base_url)
    for host in ("evil.example", f"evil.example:{port}", "127.0.0.1.evil.example"):
        response = client.get("/health", headers={"host": host})
        error = assert_error(response, 421, "host_not_allowed")
        assert error["param"] == "Host"
        assert "allowed_hosts" in error["message"]
        post = client.post(
            "/api/fusion/orchestrate", json={"workflow": "x"}, headers={"host": host}
        )
        assert_error(post, 421, "host_not_allowed")


def test_bind_address_and_localhost_names_are_allowed(
    client: httpx.Client, server: RunningServer
) -> None:
    port = port_of(server.base_url)
    for host in ("127.0.0.1", f"127.0.0.1:{port}", "localhost", f"LocalHost:{port}", "[::1]:80"):
        assert client.get("/health", headers={"host": host}).status_code == 200, host


def test_allowed_hosts_setting(tmp_path: Path) -> None:
    # 127.0.0.1: the address the test client (and the readiness poll) use.
    with running_server(tmp_path / "a", allowed_hosts=["fusion.lan:9000", "127.0.0.1"]) as c:
        assert c.get("/health", headers={"host": "fusion.lan:9000"}).status_code == 200
        assert_error(c.get("/health", headers={"host": "fusion.lan"}), 421, "host_not_allowed")
        # The list replaces the defaults.
        assert_error(c.get("/health", headers={"host": "localhost"}), 421, "host_not_allowed")
    with running_server(tmp_path / "b", allowed_hosts=["*"]) as c:
        assert c.get("/health", headers={"host": "anything.example"}).status_code == 200


# -- Origin (finding 7: cross-site requests) ----------------------------------------------------
def test_cross_origin_requests_are_refused(client: httpx.Client) -> None:
    headers = {"origin": EVIL}
    refused = [
        client.post("/api/fusion/orchestrate", json={"workflow": "x"}, headers=headers),
        client.get("/health", headers=headers),
        # Multipart uploads are "simple" requests: a page can send them without a preflight.
        client.post(
            "/api/rag/ingest",
            data={"collection": "c"},
            files={"files": ("a.txt", b"text")},
            headers=headers,
        ),
        client.post(
            "/v1/audio/transcriptions",
            data={"model": "w"},
            files={"file": ("a.wav", b"RIFF")},
            headers=headers,
        ),
        client.options(
            "/api/fusion/orchestrate",
            headers={**headers, "access-control-request-method": "POST"},
        ),
        client.post("/api/fusion/orchestrate", json={"workflow": "x"}, headers={"origin": "null"}),
    ]
    for response in refused:
        error = assert_error(response, 403, "origin_not_allowed")
        assert error["param"] == "Origin"
        assert "access-control-allow-origin" not in response.headers


def test_same_origin_and_non_browser_requests_pass(
    client: httpx.Client, server: RunningServer
) -> None:
    same = client.post(
        "/api/fusion/orchestrate", json={"workflow": "x"}, headers={"origin": server.base_url}
    )
    assert_error(same, 404, "invalid_workflow")
    assert_error(
        client.post("/api/fusion/orchestrate", json={"workflow": "x"}), 404, "invalid_workflow"
    )


def test_configured_origins_get_cors(tmp_path: Path) -> None:
    app_origin = "http://app.example:3000"
    with running_server(tmp_path, cors_allow_origins=[app_origin]) as c:
        preflight = c.options(
            "/api/fusion/orchestrate",
            headers={
                "origin": app_origin,
                "access-control-request-method": "POST",
                "access-control-request-headers": "content-type",
            },
        )
        assert preflight.status_code == 204
        assert preflight.headers["access-control-allow-origin"] == app_origin
        allowed = c.post(
            "/api/fusion/orchestrate", json={"workflow": "x"}, headers={"origin": app_origin}
        )
        assert_error(allowed, 404, "invalid_workflow")
        assert allowed.headers["access-control-allow-origin"] == app_origin
        other = c.post("/api/fusion/orchestrate", json={"workflow": "x"}, headers={"origin": EVIL})
        assert_error(other, 403, "origin_not_allowed")


# -- JSON depth (finding 12a) -------------------------------------------------------------------
def nested(depth: int) -> bytes:
    return b'{"workflow": "custom", "input": {"a": ' + b"[" * depth + b"]" * depth + b"}}"


def test_a_deeply_nested_body_is_a_400_with_a_short_log_line(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    # A server of its own: its log handler is made while this test captures stderr.
    with running_server(tmp_path) as c:
        for path in ("/api/fusion/orchestrate", "/v1/chat/completions", "/v1/models/load"):
            response = c.post(
                path, content=nested(3000), headers={"content-type": "application/json"}
            )
            error = assert_error(response, 400, "json_too_deep")
            assert "max_json_depth" in error["message"]
        assert_health(str(c.base_url).rstrip("/"))
    logged = capfd.readouterr()
    text = logged.out + logged.err
    assert "json body too deep" in text
    assert "Traceback" not in text
    assert "RecursionError" not in text


def test_the_depth_limit_is_a_setting_and_counts_brackets_not_text(tmp_path: Path) -> None:
    with running_server(tmp_path, max_json_depth=8) as c:
        # 2 levels of the body itself + 6: at the limit, past the guard to the handler.
        at_limit = c.post(
            "/api/fusion/orchestrate",
            content=nested(6).replace(b"custom", b"x"),
            headers={"content-type": "application/json"},
        )
        assert_error(at_limit, 404, "invalid_workflow")
        over = c.post(
            "/api/fusion/orchestrate",
            content=nested(7),
            headers={"content-type": "application/json"},
        )
        assert_error(over, 400, "json_too_deep")
        # Brackets inside strings (escaped quotes included) are text.
        text = c.post(
            "/api/fusion/orchestrate",
            json={"workflow": "x", "input": {"s": '\\"[[[[[[[[[[{{{{{{{{{{' * 50}},
        )
        assert_error(text, 404, "invalid_workflow")


def _reference_depth(text: str) -> int:
    depth = deepest = 0
    in_string = escaped = False
    for ch in text:
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif ch in "]}":
            depth -= 1
    return deepest


def _document(rnd: random.Random, depth: int) -> Any:
    pick = rnd.random()
    if depth and pick < 0.35:
        return [_document(rnd, depth - 1) for _ in range(rnd.randint(0, 3))]
    if depth and pick < 0.6:
        keys = ["a", '"[', "\\{", 'x\\"]']
        return {rnd.choice(keys): _document(rnd, depth - 1) for _ in range(rnd.randint(0, 3))}
    return rnd.choice(["[[[", "\\", '"', '\\"{', "plain", 1, None, '\\\\"}}]'])


def test_depth_counter_matches_a_parser_for_any_chunking() -> None:
    rnd = random.Random(8)
    for _ in range(500):
        raw = json.dumps(_document(rnd, rnd.randint(0, 10))).encode()
        depth = _reference_depth(raw.decode())
        for limit in (depth, depth - 1):
            counter = JsonDepthCounter(limit)
            verdicts = []
            for start in range(0, len(raw), size := rnd.randint(1, 7)):
                verdicts.append(counter.feed(raw[start : start + size]))
            assert all(verdicts) == (depth <= limit), (raw, depth, limit)


# -- client disconnect (finding 5b) -------------------------------------------------------------
def long_run(items: int) -> dict[str, Any]:
    """A custom workflow that calls the tiny LM once per item, one at a time."""
    return {
        "workflow": "custom",
        "models": {"generation": LM},
        "definition": {
            "models": {"generation": {"type": "lm"}},
            "steps": [
                {
                    "step_id": "many",
                    "type": "model_call",
                    "for_each": list(range(items)),
                    "concurrency": 1,
                    "model_id": "{{ models.generation }}",
                    "operation": "chat",
                    "input": {"prompt": "item {{ item }}", "max_tokens": 4},
                }
            ],
        },
    }


def send_raw(base_url: str, path: str, **content: Any) -> socket.socket:
    """POST on a raw connection and return it unread, so the test decides when the client
    goes away. `content`: httpx's `json=`, or `data=` and `files=` for a multipart form."""
    request = httpx.Request("POST", base_url + path, **content)
    payload = request.read()
    port = port_of(base_url)
    sock = socket.create_connection(("127.0.0.1", port))
    head = (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        f"Content-Type: {request.headers['content-type']}\r\n"
        f"Content-Length: {len(payload)}\r\n\r\n"
    )
    sock.sendall(head.encode() + payload)
    return sock


def lm_requests(client: httpx.Client) -> int:
    count: int = client.get(f"/v1/models/{LM}/stats").json()["request_count"]
    return count


def test_a_run_stops_when_its_client_disconnects_if_asked(
    client: httpx.Client, server: RunningServer
) -> None:
    # A run is the engine's: only a streamed one that asks for it stops with its client
    # (tests/test_runs_live.py: the others run on).
    items = 400
    registry = server.app.state.engine.models
    before = lm_requests(client)
    body = {**long_run(items), "stream": True, "cancel_on_disconnect": True}
    with closing(send_raw(server.base_url, "/api/fusion/orchestrate", json=body)):
        wait_for(lambda: lm_requests(client) >= before + 2, what="the run calling the model")
        assert_health(server.base_url)
    # The connection is closed: the run is cancelled within one item.
    wait_for(lambda: not registry.get(LM).busy, what="the model going idle")
    stopped_at = lm_requests(client)
    assert stopped_at - before < items
    # One more request goes through the model's queue; had the run gone on, its next items
    # would have been counted too.
    probe = client.post(
        "/v1/chat/completions",
        json={"model": LM, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1},
    )
    assert probe.status_code == 200, probe.text
    assert lm_requests(client) == stopped_at + 1
    assert not registry.get(LM).busy
    assert_health(server.base_url)


def test_a_non_streaming_chat_stops_when_its_client_disconnects(
    client: httpx.Client, server: RunningServer, tiny_lm_dir: Path
) -> None:
    registry = server.app.state.engine.models
    before = lm_requests(client)
    body = {
        "model": LM,
        "messages": [{"role": "user", "content": "go on"}],
        "max_tokens": 2000,  # seconds of generation for the tiny model
        "logit_bias": no_eos_bias(tiny_lm_dir),
    }
    with closing(send_raw(server.base_url, "/v1/chat/completions", json=body)):
        wait_for(lambda: registry.get(LM).busy, what="the generation starting")
        assert_health(server.base_url)
    wait_for(lambda: not registry.get(LM).busy, what="the generation stopping")
    # A generation that ran to its end would have been counted.
    assert lm_requests(client) == before


def test_an_ingest_stops_when_its_client_disconnects(
    client: httpx.Client, server: RunningServer, tiny_embedder_dir: Path
) -> None:
    loaded = client.post(
        "/v1/models/load",
        json={"model_path": str(tiny_embedder_dir), "model_type": "embeddings", "model_id": EMBED},
    )
    assert loaded.status_code == 200, loaded.text
    embedder = server.app.state.engine.models.get(EMBED)
    # Many distinct sentences: many chunks, embedded batch after batch.
    text = " ".join(f"Sentence {i} tells of river {i * 7919 % 10007}." for i in range(20_000))
    upload = {
        "data": {"collection": "left", "embedding_model": EMBED},
        "files": [("files", ("long.txt", text.encode(), "text/plain"))],
    }
    with closing(send_raw(server.base_url, "/api/rag/ingest", **upload)):
        wait_for(lambda: embedder.stats.request_count >= 2, what="the ingest embedding")
        assert_health(server.base_url)
    wait_for(lambda: not embedder.busy, what="the embedding stopping")
    stopped_at = embedder.stats.request_count
    probe = client.post("/v1/embeddings", json={"model": EMBED, "input": "probe"})
    assert probe.status_code == 200, probe.text
    assert embedder.stats.request_count == stopped_at + 1
    # Nothing was stored: the ingest is all or nothing.
    assert client.get("/api/rag/collections/left").status_code == 404


def test_a_finished_request_is_not_cancelled_by_its_own_end(client: httpx.Client) -> None:
    response = client.post("/api/fusion/orchestrate", json=long_run(3))
    assert response.status_code == 200, response.text
    assert response.json()["status"] == "completed"


# -- SIGTERM mid-run (finding 5b) ---------------------------------------------------------------
SHUTDOWN_TIMEOUT_S = 1
EXIT_BOUND_S = SHUTDOWN_TIMEOUT_S + 15  # generous: proves "did not hang"


def test_sigterm_stops_fusion_serve_mid_run(tmp_path: Path, tiny_lm_dir: Path) -> None:
    env = {
        "FUSION_DATA_DIR": str(tmp_path / "data"),
        "FUSION_WORKFLOWS_DIR": str(tmp_path / "wf"),
        "FUSION_STARTUP_MODELS": json.dumps([lm_model(tiny_lm_dir)]),
        "FUSION_SHUTDOWN_TIMEOUT_S": str(SHUTDOWN_TIMEOUT_S),
        "FUSION_LOG_LEVEL": "info",
    }
    cwd = Path(__file__).resolve().parents[1]
    with (
        serve_cli_process(env, tmp_path / "server.log", cwd) as proc,
        httpx.Client(base_url=proc.base_url, timeout=60.0) as c,
    ):
        before = lm_requests(c)
        sock = send_raw(proc.base_url, "/api/fusion/orchestrate", json=long_run(5000))
        with closing(sock):
            wait_for(lambda: lm_requests(c) >= before + 2, what="the run calling the model")
            assert_health(proc.base_url)
            proc.process.send_signal(signal.SIGTERM)
            try:
                code = proc.process.wait(EXIT_BOUND_S)
            except subprocess.TimeoutExpired:
                pytest.fail(f"fusion serve still running {EXIT_BOUND_S}s after SIGTERM")
            # uvicorn re-raises the signal once it has shut down cleanly.
            assert code in (0, -signal.SIGTERM), proc.log_path.read_text()
            # The run was cancelled, not finished: the client is told why.
            sock.settimeout(HANG_GUARD_S)
            reply = sock.recv(65536)
    assert reply.startswith(b"HTTP/1.1 503"), reply
    assert b'"code":"shutting_down"' in reply
    log = proc.log_path.read_text()
    assert "server shutting down: request cancelled" in log
    assert "engine stopped" in log
    assert "Traceback" not in log
