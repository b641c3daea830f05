"""Live runs (issue #14) end to end on a real server: a run is stored as it starts and
answered while it runs, cancelled over HTTP (its model call stopped, the slot freed),
followed by late joiners over server-sent events, kept running when its client goes away
(unless asked otherwise), cancelled at shutdown and failed when a crash left it running.

Runs are held deterministically by test step types registered on the running engine:
`test_gate` waits until the test opens its gate; `test_held_chat` streams a real chat from
the echo model and, after the first token, waits for its gate with the model's slot held.
"""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, ClassVar

import httpx
import pytest
from api_helpers import wait_for
from gates import GATES, GateStep
from serverutil import RunningServer, serve_app
from structlog.testing import capture_logs

from engine.config import Settings
from engine.fusion.live import Dropped, LiveRun, RunEvent
from engine.fusion.runs import INTERRUPTED, RunRequest, RunStore, StoredRun
from engine.models.backends.base import ChatParams
from engine.runtime.trace import RunResult, StepRecord
from engine.services import Engine
from engine.steps.base import StepContext, StepPlugin
from engine.store import Store
from server.app import create_app

ECHO = {"model_path": "echo", "model_type": "echo", "model_id": "echo"}


class HeldChat(StepPlugin):
    """Test-only: a real streamed chat on a loaded model, each token emitted, held after
    the first one until gate `gate` opens (the model's slot in use meanwhile)."""

    type_name = "test_held_chat"
    params_schema: ClassVar[dict[str, Any]] = {
        "type": "object",
        "properties": {
            "model_id": {"type": "string"},
            "text": {"type": "string"},
            "gate": {"type": "string"},
        },
        "required": ["model_id", "text", "gate"],
    }

    async def run(self, params: dict[str, Any], ctx: StepContext, prepared: Any = None) -> Any:
        models = ctx.services.models
        assert models is not None
        params_ = ChatParams.from_options({"max_tokens": 100_000}, param="input")
        messages = [{"role": "user", "content": params["text"]}]
        text = ""
        async for chunk in models.chat_stream(params["model_id"], messages, params_):
            ctx.emit("token", {"delta": chunk.text})
            text += chunk.text
            await GATES.event(params["gate"]).wait()
        return text


def settings(data_dir: Path, **extra: Any) -> Settings:
    return Settings(
        **{
            "data_dir": data_dir,
            "workflows_dir": data_dir / "wf",
            "startup_models": [ECHO],
            "log_level": "warning",
            "rate_limit_enabled": False,
            **extra,
        }
    )


@contextmanager
def serving(data_dir: Path, **extra: Any) -> Iterator[RunningServer]:
    with serve_app(create_app(settings(data_dir, **extra))) as running:
        running.app.state.engine.steps.register(GateStep)
        running.app.state.engine.steps.register(HeldChat)
        yield running


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    with serving(tmp_path_factory.mktemp("runs-live")) as running:
        yield running


@pytest.fixture
def client(server: RunningServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.base_url, timeout=60.0) as c:
        yield c


def gated(gate: str) -> dict[str, Any]:
    """A workflow: `first`, then `wait` (held at gate `gate`; its template makes it depend
    on `first`), then `last`."""
    return {
        "steps": [
            {"step_id": "first", "type": "template", "value": "one"},
            {
                "step_id": "wait",
                "type": "test_gate",
                "gate": f"{gate}{{{{ '' if steps.first.output else '' }}}}",
            },
            {"step_id": "last", "type": "template", "value": "{{ steps.wait.output }} done"},
        ],
        "output": "{{ steps.last.output }}",
    }


def held_chat(gate: str, text: str = "one two three four") -> dict[str, Any]:
    return {
        "steps": [
            {
                "step_id": "chat",
                "type": "test_held_chat",
                "model_id": "echo",
                "text": text,
                "gate": gate,
            },
        ],
        "output": "{{ steps.chat.output }}",
    }


class Orchestrate:
    """A non-streaming orchestrate on a thread of its own; `run_id` once the engine has it."""

    def __init__(self, server: RunningServer, definition: dict[str, Any]) -> None:
        self.response: httpx.Response | None = None
        self.error: BaseException | None = None
        before = set(live_ids(server))
        self._thread = threading.Thread(target=self._post, args=(server, definition), daemon=True)
        self._thread.start()
        wait_for(lambda: bool(set(live_ids(server)) - before), what="the run to start")
        (self.run_id,) = set(live_ids(server)) - before

    def _post(self, server: RunningServer, definition: dict[str, Any]) -> None:
        try:
            with httpx.Client(base_url=server.base_url, timeout=60.0) as c:
                self.response = c.post(
                    "/api/fusion/orchestrate", json={"workflow": "custom", "definition": definition}
                )
        except BaseException as exc:
            self.error = exc

    def body(self) -> dict[str, Any]:
        self._thread.join(30)
        assert self.response is not None, self.error
        assert self.response.status_code == 200, self.response.text
        body: dict[str, Any] = self.response.json()
        return body


class EventReader:
    """GET /api/fusion/runs/{id}/events on a thread, collecting (event, data) as they come."""

    def __init__(self, base_url: str, run_id: str) -> None:
        self.events: list[tuple[str, Any]] = []
        self.status: int | None = None
        self._thread = threading.Thread(target=self._read, args=(base_url, run_id), daemon=True)
        self._thread.start()

    def _read(self, base_url: str, run_id: str) -> None:
        with (
            httpx.Client(base_url=base_url, timeout=60.0) as c,
            c.stream("GET", f"/api/fusion/runs/{run_id}/events") as response,
        ):
            self.status = response.status_code
            name = "message"
            for line in response.iter_lines():
                if line.startswith("event: "):
                    name = line[len("event: ") :]
                elif line.startswith("data: "):
                    self.events.append((name, json.loads(line[len("data: ") :])))

    def names(self) -> list[str]:
        return [name for name, _ in self.events]

    def join(self) -> list[tuple[str, Any]]:
        self._thread.join(30)
        assert not self._thread.is_alive(), "the event stream did not end"
        return self.events


def live_ids(server: RunningServer) -> list[str]:
    ids: list[str] = server.app.state.engine.fusion.live.ids()
    return ids


def get_run(client: httpx.Client, run_id: str) -> dict[str, Any]:
    response = client.get(f"/api/fusion/runs/{run_id}")
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def stored_row(server: RunningServer, run_id: str) -> tuple[Any, ...]:
    rows = server.app.state.engine.store.query(
        "SELECT status, trace, completed_at FROM runs WHERE id = ?", (run_id,)
    )
    assert rows, f"run {run_id} has no row"
    return tuple(rows[0])


def step_status(body: dict[str, Any]) -> dict[str, str]:
    return {entry["step"]: entry["status"] for entry in body["execution_trace"]}


def echo_active(client: httpx.Client) -> int:
    queue: int = client.get("/v1/models/echo/info").json()["queue"]["active"]
    return queue


# -- a running run ---------------------------------------------------------------------------
def test_a_running_run_is_stored_and_answered_with_its_trace_so_far(
    server: RunningServer, client: httpx.Client
) -> None:
    run = Orchestrate(server, gated("visible"))
    wait_for(lambda: step_status(get_run(client, run.run_id))["wait"] == "running")
    body = get_run(client, run.run_id)
    assert body["status"] == "running"
    assert body["workflow_id"] == run.run_id
    assert body["workflow"] == "custom"
    assert body["completed_at"] is None
    assert body["result"] is None
    assert step_status(body) == {"first": "completed", "wait": "running", "last": "pending"}
    # Its row is in the database too (written as it started, its trace as steps finished).
    wait_for(lambda: '"running"' in str(stored_row(server, run.run_id)[1]), what="progress row")
    assert stored_row(server, run.run_id)[0] == "running"

    GATES.open("visible")
    done = run.body()
    assert done["status"] == "completed"
    assert done["result"] == "visible done"
    stored = get_run(client, run.run_id)
    assert stored["status"] == "completed"
    assert stored["execution_trace"] == done["execution_trace"]
    assert stored["created_at"] == done["created_at"]


def test_cancel_stops_the_run_and_its_model_call(
    server: RunningServer, client: httpx.Client
) -> None:
    run = Orchestrate(server, held_chat("never-cancel"))
    wait_for(lambda: echo_active(client) == 1, what="the chat to hold the echo model's slot")
    response = client.post(f"/api/fusion/runs/{run.run_id}/cancel")
    assert response.status_code == 200, response.text
    cancelled = response.json()
    assert cancelled["workflow_id"] == run.run_id
    assert cancelled["status"] == "cancelled"
    assert cancelled["cancelled_at"].endswith("Z")
    assert echo_active(client) == 0  # the model call was stopped before the answer
    stored = get_run(client, run.run_id)
    assert stored["status"] == "cancelled"
    assert stored["completed_at"] == cancelled["cancelled_at"]
    assert step_status(stored) == {"chat": "cancelled"}
    assert "cancel" in stored["error"]
    assert stored_row(server, run.run_id)[0] == "cancelled"
    assert run.body()["status"] == "cancelled"  # what the waiting request got

    again = client.post(f"/api/fusion/runs/{run.run_id}/cancel")
    assert again.status_code == 409
    assert again.json()["error"]["code"] == "run_not_cancellable"
    missing = client.post("/api/fusion/runs/wf-000000000000/cancel")
    assert missing.status_code == 404
    assert missing.json()["error"]["code"] == "run_not_found"


# -- events ----------------------------------------------------------------------------------
def test_late_joiners_get_the_events_so_far_then_the_live_ones(
    server: RunningServer, client: httpx.Client
) -> None:
    run = Orchestrate(server, gated("late"))
    wait_for(lambda: step_status(get_run(client, run.run_id))["wait"] == "running")
    readers = [EventReader(server.base_url, run.run_id) for _ in range(2)]
    so_far = ["step_started", "step_finished", "step_started"]
    for reader in readers:
        wait_for(lambda r=reader: r.names() == so_far, what="the events so far")  # type: ignore[misc]
    assert [d["step_id"] for _, d in readers[0].events] == ["first", "first", "wait"]
    GATES.open("late")
    done = run.body()
    for reader in readers:
        events = reader.join()
        assert reader.status == 200
        assert [name for name, _ in events] == [
            *so_far,
            "step_finished",
            "step_started",
            "step_finished",
            "result",
        ]
        assert [d["step_id"] for _, d in events[3:6]] == ["wait", "last", "last"]
        result = events[-1][1]
        assert result["status"] == "completed"
        assert result["result"] == done["result"] == "late done"
    # An ended run: just its result.
    ended = EventReader(server.base_url, run.run_id).join()
    assert [name for name, _ in ended] == ["result"]
    assert ended[0][1]["execution_trace"] == done["execution_trace"]
    missing = client.get("/api/fusion/runs/wf-000000000000/events")
    assert missing.status_code == 404


def test_token_events_reach_a_follower(server: RunningServer, client: httpx.Client) -> None:
    run = Orchestrate(server, held_chat("tokens", "alpha beta gamma"))
    wait_for(lambda: echo_active(client) == 1, what="the first token")
    reader = EventReader(server.base_url, run.run_id)
    wait_for(lambda: "token" in reader.names(), what="the first token to be replayed")
    GATES.open("tokens")
    events = reader.join()
    deltas = "".join(d["delta"] for name, d in events if name == "token")
    assert deltas == "alpha beta gamma"
    assert events[-1][1]["result"] == "alpha beta gamma"
    assert run.body()["status"] == "completed"


# -- clients that go away --------------------------------------------------------------------
def test_a_run_outlives_its_non_streaming_client(
    server: RunningServer, client: httpx.Client
) -> None:
    body = json.dumps({"workflow": "custom", "definition": gated("orphan")}).encode()
    with capture_logs() as logs:
        before = set(live_ids(server))
        # A raw request: the test closes its connection while the server runs it.
        host, port = server.base_url.removeprefix("http://").split(":")
        sock = socket.create_connection((host, int(port)))
        sock.sendall(
            b"POST /api/fusion/orchestrate HTTP/1.1\r\nHost: localhost\r\n"
            b"Content-Type: application/json\r\nContent-Length: "
            + str(len(body)).encode()
            + b"\r\n\r\n"
            + body
        )
        wait_for(lambda: bool(set(live_ids(server)) - before), what="the run to start")
        (run_id,) = set(live_ids(server)) - before
        wait_for(lambda: step_status(get_run(client, run_id))["wait"] == "running")
        sock.close()
        wait_for(
            lambda: any(e["event"] == "run_detached" for e in logs),
            what="the server to see the client go",
        )
    assert get_run(client, run_id)["status"] == "running"
    GATES.open("orphan")
    wait_for(lambda: get_run(client, run_id)["status"] != "running", what="the run's end")
    stored = get_run(client, run_id)
    assert stored["status"] == "completed"
    assert stored["result"] == "orphan done"


def stream_then_leave(server: RunningServer, definition: dict[str, Any], **extra: Any) -> str:
    """Start a streamed run, read its first event, and drop the connection: its run id."""
    with (
        httpx.Client(base_url=server.base_url, timeout=60.0) as c,
        c.stream(
            "POST",
            "/api/fusion/orchestrate",
            json={"workflow": "custom", "definition": definition, "stream": True, **extra},
        ) as response,
    ):
        for line in response.iter_lines():
            if line.startswith("data: "):
                run_id: str = json.loads(line[len("data: ") :])["run_id"]
                return run_id
    raise AssertionError("no event")


def test_a_streamed_run_goes_on_without_its_client(
    server: RunningServer, client: httpx.Client
) -> None:
    run_id = stream_then_leave(server, gated("stream-left"))
    wait_for(lambda: step_status(get_run(client, run_id))["wait"] == "running")
    GATES.open("stream-left")
    wait_for(lambda: get_run(client, run_id)["status"] != "running", what="the run's end")
    assert get_run(client, run_id)["result"] == "stream-left done"


def test_cancel_on_disconnect_cancels_a_streamed_run(
    server: RunningServer, client: httpx.Client
) -> None:
    run_id = stream_then_leave(server, held_chat("stream-cancel"), cancel_on_disconnect=True)
    wait_for(lambda: get_run(client, run_id)["status"] != "running", what="the cancel")
    stored = get_run(client, run_id)
    assert stored["status"] == "cancelled"
    assert "disconnected" in stored["error"]
    wait_for(lambda: echo_active(client) == 0, what="the model's slot to be freed")


# -- restarts --------------------------------------------------------------------------------
def test_shutdown_cancels_runs_and_a_restart_fails_those_a_crash_left(tmp_path: Path) -> None:
    with serving(tmp_path) as running:
        run_id = stream_then_leave(running, gated("shutdown"))
        with httpx.Client(base_url=running.base_url) as c:
            wait_for(lambda: step_status(get_run(c, run_id))["wait"] == "running")
    # A crash: a row left `running` (as a killed server leaves it).
    store = Store(tmp_path / "fusion.sqlite3")
    crashed = RunResult(
        "wf-crashedcrash",
        "custom",
        None,
        "running",
        None,
        [StepRecord("a", "template", status="running")],
        created_at="2026-11-27T00:00:00Z",
    )
    runs = RunStore(store)
    runs.save(StoredRun(crashed, "inline", {}, RunRequest({}, None)))
    store.close()
    with serving(tmp_path) as running, httpx.Client(base_url=running.base_url) as c:
        stopped = get_run(c, run_id)
        assert stopped["status"] == "cancelled"
        assert "shut down" in stopped["error"]
        assert step_status(stopped) == {
            "first": "completed",
            "wait": "cancelled",
            "last": "cancelled",
        }
        failed = get_run(c, "wf-crashedcrash")
        assert failed["status"] == "failed"
        assert failed["error"] == INTERRUPTED
        assert failed["completed_at"] is not None


# -- bounds ----------------------------------------------------------------------------------
async def test_the_event_log_and_each_follower_stay_bounded(tmp_path: Path) -> None:
    engine = await Engine.start(settings(tmp_path, startup_models=[]))
    try:
        assert engine.fusion is not None
        definition = {"steps": [{"step_id": "a", "type": "template", "value": "x"}]}
        prepared = await engine.fusion.prepare("custom", {}, definition=definition)
        live = LiveRun(prepared, max_events=4)
        slow = live.subscribe()  # never reads
        live.publish(RunEvent("step_started", {"step_id": "a"}))
        for i in range(3):
            live.publish(RunEvent("token", {"delta": str(i)}))
        # The fifth event: the log drops its oldest token; the slow follower is dropped.
        live.publish(RunEvent("step_finished", {"step_id": "a"}))
        late = live.subscribe().items()
        backlog = [await anext(late) for _ in range(4)]
        assert [(e.name, e.data) for e in backlog if isinstance(e, RunEvent)] == [
            ("step_started", {"step_id": "a"}),
            ("token", {"delta": "1"}),
            ("token", {"delta": "2"}),
            ("step_finished", {"step_id": "a"}),
        ]
        assert [item async for item in slow.items()] == [Dropped(prepared.run_id, 4)]
        # With no token left to drop, the oldest step events go.
        for i in range(3):
            live.publish(RunEvent("step_started", {"step_id": f"s{i}"}))
        assert [(e.name, e.data.get("step_id")) for e in await _backlog(live, 4)] == [
            ("step_finished", "a"),  # the tokens went first, then the oldest step event
            ("step_started", "s0"),
            ("step_started", "s1"),
            ("step_started", "s2"),
        ]
        live.publish(RunEvent("step_started", {"step_id": "s3"}))
        assert all(e.name == "step_started" for e in await _backlog(live, 4))
    finally:
        await engine.stop()


async def _backlog(live: LiveRun, count: int) -> list[RunEvent]:
    subscription = live.subscribe()
    items = subscription.items()
    found = [await anext(items) for _ in range(count)]
    subscription.close()
    assert all(isinstance(e, RunEvent) for e in found)
    return [e for e in found if isinstance(e, RunEvent)]
