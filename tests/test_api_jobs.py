"""The MCP job API (spec §5.1-5.4) end to end: a real server with tiny models, jobs
submitted, polled, listed, cancelled and streamed over HTTP.

A "long" model has a 64k context and its end-of-sequence tokens biased away, so a job on
it generates until it is cancelled: tests hold a job in `processing` without racing it."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from api_helpers import no_eos_bias, running_server, wait_for
from webhook_receiver import Received, serve_receiver

from engine.models.synthetic import build_lm

LM = "tiny-lm"
LONG = "long-lm"
EMBED = "tiny-embedder"
MESSAGES = [{"role": "user", "content": "hello"}]
ENDLESS_TOKENS = 60_000


@pytest.fixture(scope="module")
def long_lm_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_lm(tmp_path_factory.mktemp("long") / "lm", context_length=65_536)


@pytest.fixture(scope="module")
def client(
    tmp_path_factory: pytest.TempPathFactory,
    tiny_lm_dir: Path,
    tiny_embedder_dir: Path,
    long_lm_dir: Path,
) -> Iterator[httpx.Client]:
    models = [
        {"model_path": str(tiny_lm_dir), "model_type": "lm", "model_id": LM},
        # One job at a time, so that later ones queue behind an endless one.
        {
            "model_path": str(long_lm_dir),
            "model_type": "lm",
            "model_id": LONG,
            "max_concurrency": 1,
        },
        {"model_path": str(tiny_embedder_dir), "model_type": "embeddings", "model_id": EMBED},
    ]
    with running_server(
        tmp_path_factory.mktemp("jobs"), startup_models=models, allow_private_urls=True
    ) as c:
        yield c


@pytest.fixture(scope="module")
def endless(long_lm_dir: Path) -> dict[str, Any]:
    """A chat job input that generates until cancelled."""
    return {
        "messages": MESSAGES,
        "max_tokens": ENDLESS_TOKENS,
        "logit_bias": no_eos_bias(long_lm_dir),
    }


def submit(client: httpx.Client, body: dict[str, Any], **headers: str) -> httpx.Response:
    return client.post("/api/mcp/jobs", json=body, headers=headers)


def accepted(client: httpx.Client, body: dict[str, Any]) -> dict[str, Any]:
    response = submit(client, body)
    assert response.status_code == 202, response.text
    answer: dict[str, Any] = response.json()
    return answer


def job(client: httpx.Client, job_id: str) -> dict[str, Any]:
    response = client.get(f"/api/mcp/jobs/{job_id}")
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def finished(client: httpx.Client, job_id: str) -> dict[str, Any]:
    wait_for(
        lambda: job(client, job_id)["status"] in ("completed", "failed", "cancelled"),
        timeout_s=60,
        what=f"job {job_id} to finish",
    )
    return job(client, job_id)


def processing(client: httpx.Client, job_id: str) -> dict[str, Any]:
    wait_for(lambda: job(client, job_id).get("progress", 0) > 0, what=f"job {job_id} generating")
    return job(client, job_id)


def cancel(client: httpx.Client, job_id: str) -> httpx.Response:
    return client.delete(f"/api/mcp/jobs/{job_id}")


def error(response: httpx.Response) -> dict[str, Any]:
    body: dict[str, Any] = response.json()["error"]
    return body


def test_a_chat_job_is_accepted_then_completes_with_usage(client: httpx.Client) -> None:
    body = {
        "model_id": LM,
        "operation": "chat",
        "input": {"messages": MESSAGES, "max_tokens": 3, "temperature": 0},
        "metadata": {"user_id": "u1"},
    }
    response = submit(client, body)
    assert response.status_code == 202, response.text
    answer = response.json()
    assert answer["status"] == "queued"
    assert answer["job_id"].startswith("job-")
    assert {"created_at", "position_in_queue", "estimated_completion_ms"} <= set(answer)
    assert response.headers["location"] == f"/api/mcp/jobs/{answer['job_id']}"

    done = finished(client, answer["job_id"])
    assert done["status"] == "completed", done
    assert {"started_at", "completed_at"} <= set(done)
    usage = done["result"]["usage"]
    assert usage["completion_tokens"] <= 3
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert isinstance(done["result"]["content"], str)
    assert done["metadata"] == {"user_id": "u1"}


def test_an_embed_job_returns_one_vector_per_text(client: httpx.Client) -> None:
    answer = accepted(
        client, {"model_id": EMBED, "operation": "embed", "input": {"input": ["a", "b c"]}}
    )
    done = finished(client, answer["job_id"])
    assert done["status"] == "completed", done
    assert len(done["result"]["embeddings"]) == 2
    assert {len(v) for v in done["result"]["embeddings"]} == {32}


@pytest.mark.parametrize(
    ("body", "status", "code", "param"),
    [
        (
            {"model_id": LM, "operation": "paint", "input": {}},
            400,
            "invalid_operation",
            "operation",
        ),
        (
            {"model_id": LM, "operation": "chat", "input": {"messages": MESSAGES, "tone": 1}},
            400,
            "unknown_field",
            "input.tone",
        ),
        ({"model_id": LM, "operation": "chat", "input": {}}, 400, None, "input.messages"),
        (
            {"model_id": "nobody", "operation": "chat", "input": {"messages": MESSAGES}},
            404,
            "model_not_found",
            "model_id",
        ),
        (
            {"model_id": LM, "operation": "chat", "input": {"messages": MESSAGES}, "priority": "x"},
            400,
            None,
            "priority",
        ),
        (
            {"operation": "workflow", "input": {"workflow": "no-such-workflow"}},
            404,
            None,
            None,
        ),
        (
            {
                "model_id": LM,
                "operation": "chat",
                "input": {"messages": MESSAGES},
                "callback_url": "ftp://x",
            },
            400,
            None,
            "callback_url",
        ),
    ],
)
def test_submit_refuses_bad_requests_naming_the_field(
    client: httpx.Client,
    body: dict[str, Any],
    status: int,
    code: str | None,
    param: str | None,
) -> None:
    before = client.get("/api/mcp/jobs", params={"limit": 1}).json()["total"]
    response = submit(client, body)
    assert response.status_code == status, response.text
    problem = error(response)
    if code is not None:
        assert problem["code"] == code
    if param is not None:
        assert problem["param"] == param
    assert client.get("/api/mcp/jobs", params={"limit": 1}).json()["total"] == before


def test_an_idempotency_key_returns_the_same_job_or_conflicts(client: httpx.Client) -> None:
    body = {"model_id": LM, "operation": "chat", "input": {"messages": MESSAGES, "max_tokens": 1}}
    first = submit(client, body, **{"Idempotency-Key": "key-1"})
    again = submit(client, body, **{"Idempotency-Key": "key-1"})
    assert first.status_code == again.status_code == 202
    assert again.json()["job_id"] == first.json()["job_id"]
    assert again.headers["idempotent-replayed"] == "true"
    other = submit(client, {**body, "priority": "high"}, **{"Idempotency-Key": "key-1"})
    assert other.status_code == 409, other.text
    assert error(other)["code"] == "idempotency_key_reused"
    finished(client, first.json()["job_id"])


def test_cancel_stops_a_generating_job_frees_the_model_and_is_final(
    client: httpx.Client, endless: dict[str, Any]
) -> None:
    running = accepted(client, {"model_id": LONG, "operation": "chat", "input": endless})
    seen = processing(client, running["job_id"])
    assert 0 < seen["progress"] < 1
    assert seen["status"] == "processing"

    response = cancel(client, running["job_id"])
    assert response.status_code == 200, response.text
    assert response.json()["status"] == "cancelled"
    assert "cancelled_at" in response.json()

    # The model's only slot is free again: a short job on it completes.
    after = accepted(
        client,
        {"model_id": LONG, "operation": "chat", "input": {"messages": MESSAGES, "max_tokens": 2}},
    )
    assert finished(client, after["job_id"])["status"] == "completed"
    assert job(client, running["job_id"])["status"] == "cancelled"
    again = cancel(client, running["job_id"])
    assert again.status_code == 409
    assert error(again)["code"] == "job_finished"
    assert cancel(client, "job-nope").status_code == 404


def test_queued_jobs_report_their_position_and_can_be_cancelled(
    client: httpx.Client, endless: dict[str, Any]
) -> None:
    holder = accepted(client, {"model_id": LONG, "operation": "chat", "input": endless})
    processing(client, holder["job_id"])
    short = {"messages": MESSAGES, "max_tokens": 1}
    low = accepted(
        client, {"model_id": LONG, "operation": "chat", "input": short, "priority": "low"}
    )
    high = accepted(
        client, {"model_id": LONG, "operation": "chat", "input": short, "priority": "high"}
    )
    assert job(client, high["job_id"])["position_in_queue"] == 1
    assert job(client, low["job_id"])["position_in_queue"] == 2
    assert cancel(client, low["job_id"]).status_code == 200
    assert cancel(client, holder["job_id"]).status_code == 200
    assert finished(client, high["job_id"])["status"] == "completed"
    assert job(client, low["job_id"])["status"] == "cancelled"


def test_list_filters_sorts_pages_and_counts(client: httpx.Client) -> None:
    ids = [
        accepted(client, {"model_id": EMBED, "operation": "embed", "input": {"input": str(i)}})[
            "job_id"
        ]
        for i in range(3)
    ]
    for job_id in ids:
        finished(client, job_id)
    page = client.get(
        "/api/mcp/jobs", params={"model_id": EMBED, "status": "completed", "limit": 2}
    ).json()
    assert page["limit"] == 2
    assert page["offset"] == 0
    assert page["total"] >= 3
    assert len(page["jobs"]) == 2
    assert {j["model_id"] for j in page["jobs"]} == {EMBED}
    assert all("latency_ms" in j and "completed_at" in j for j in page["jobs"])
    newest_first = [j["job_id"] for j in page["jobs"]]
    assert newest_first == ids[::-1][:2]
    oldest = client.get(
        "/api/mcp/jobs",
        params={"model_id": EMBED, "sort_by": "completed_at", "order": "asc", "offset": 1},
    ).json()
    assert oldest["offset"] == 1
    for params in (
        {"limit": 0},
        {"limit": 1001},
        {"offset": -1},
        {"sort_by": "size"},
        {"status": "x"},
    ):
        response = client.get("/api/mcp/jobs", params=params)
        assert response.status_code == 400, (params, response.text)


def _sse_events(client: httpx.Client, job_id: str, **headers: str) -> list[tuple[str, Any]]:
    events: list[tuple[str, Any]] = []
    with client.stream("GET", f"/api/mcp/jobs/{job_id}/events", headers=headers) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        name = ""
        for line in response.iter_lines():
            if line.startswith("event: "):
                name = line[len("event: ") :]
            elif line.startswith("data: "):
                events.append((name, json.loads(line[len("data: ") :])))
    return events


def test_job_events_stream_live_and_replay_to_late_joiners(client: httpx.Client) -> None:
    answer = accepted(
        client,
        {"model_id": LM, "operation": "chat", "input": {"messages": MESSAGES, "max_tokens": 2}},
    )
    live = _sse_events(client, answer["job_id"])  # ends once the job has ended
    names = [name for name, _ in live]
    assert names == ["job.queued", "job.processing", "job.completed"]
    assert live[-1][1]["job"]["result"]["usage"]["completion_tokens"] <= 2
    assert all(payload["event"] == name for name, payload in live)
    assert _sse_events(client, answer["job_id"]) == live  # a late joiner gets them all
    resumed = _sse_events(client, answer["job_id"], **{"Last-Event-ID": "0"})
    assert resumed == live
    assert client.get("/api/mcp/jobs/job-nope/events").status_code == 404


def test_a_workflow_job_result_is_the_run_body_and_the_run_is_stored(
    client: httpx.Client,
) -> None:
    definition = {
        "input_schema": {"type": "object", "properties": {"text": {"type": "string"}}},
        "models": {"generation": {"type": "lm"}},
        "steps": [
            {
                "step_id": "say",
                "type": "model_call",
                "model_id": "{{ models.generation }}",
                "operation": "chat",
                "input": {"prompt": "{{ input.text }}", "max_tokens": 2},
            },
            {"step_id": "echo", "type": "template", "value": "{{ input.text }}"},
        ],
        "output": {"echo": "{{ steps.echo.output }}"},
    }
    answer = accepted(
        client,
        {
            "operation": "workflow",
            "input": {
                "workflow": "custom",
                "definition": definition,
                "input": {"text": "hi"},
                "models": {"generation": LM},
            },
        },
    )
    done = finished(client, answer["job_id"])
    assert done["status"] == "completed", done
    run = done["result"]
    assert run["status"] == "completed"
    assert run["result"] == {"echo": "hi"}
    assert [entry["step"] for entry in run["execution_trace"]] == ["say", "echo"]
    stored = client.get(f"/api/fusion/runs/{run['workflow_id']}")
    assert stored.status_code == 200, stored.text
    assert stored.json()["result"] == {"echo": "hi"}


def test_a_full_queue_answers_429_with_retry_after(
    tmp_path: Path, long_lm_dir: Path, endless: dict[str, Any]
) -> None:
    models = [{"model_path": str(long_lm_dir), "model_type": "lm", "model_id": LONG}]
    models[0]["max_concurrency"] = 1  # a second job queues behind the first
    with running_server(tmp_path, startup_models=models, jobs_max_queued=1) as small:
        holder = accepted(small, {"model_id": LONG, "operation": "chat", "input": endless})
        processing(small, holder["job_id"])
        short = {"model_id": LONG, "operation": "chat", "input": {"messages": MESSAGES}}
        accepted(small, short)  # waits behind the holder: the queue is now full
        full = submit(small, short)
        assert full.status_code == 429, full.text
        assert error(full)["code"] == "queue_full"
        assert int(full.headers["retry-after"]) >= 1
        assert cancel(small, holder["job_id"]).status_code == 200


def _for_job(received: list[Received], job_id: str) -> list[Received]:
    return [r for r in received if json.loads(r.body)["job"]["job_id"] == job_id]


def _assert_signed(got: Received, secret: str) -> None:
    """Both signatures, computed here independently of engine.jobs.webhooks."""
    key = secret.encode()
    spec = "sha256=" + hmac.new(key, got.body, hashlib.sha256).hexdigest()
    assert got.headers["x-webhook-signature"] == spec
    signed = f"{got.headers['webhook-id']}.{got.headers['webhook-timestamp']}.".encode() + got.body
    standard = base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()
    assert got.headers["webhook-signature"] == f"v1,{standard}"


def test_webhooks_and_callbacks_receive_the_signed_final_event(client: httpx.Client) -> None:
    with serve_receiver() as receiver:
        response = client.post(
            "/api/mcp/webhooks",
            json={
                "url": receiver.url("/hook"),
                "events": ["job.completed", "job.failed"],
                "secret": "hook-secret",
                "metadata": {"description": "tier 2"},
            },
        )
        assert response.status_code == 201, response.text
        webhook = response.json()
        assert webhook["status"] == "active"
        assert webhook["events"] == ["job.completed", "job.failed"]
        assert "secret" not in webhook

        answer = accepted(
            client,
            {
                "model_id": LM,
                "operation": "chat",
                "input": {"messages": MESSAGES, "max_tokens": 2},
                "callback_url": receiver.url("/callback"),
                "callback_secret": "callback-secret",
            },
        )
        job_id = answer["job_id"]
        assert finished(client, job_id)["status"] == "completed"
        wait_for(
            lambda: (
                bool(_for_job(receiver.at("/hook"), job_id))
                and bool(_for_job(receiver.at("/callback"), job_id))
            ),
            what="both deliveries",
        )
        for path, secret, sender in (
            ("/hook", "hook-secret", webhook["webhook_id"]),
            ("/callback", "callback-secret", "callback"),
        ):
            (got,) = _for_job(receiver.at(path), job_id)
            assert got.method == "POST"
            assert got.headers["content-type"] == "application/json"
            assert got.headers["x-webhook-event"] == "job.completed"
            assert got.headers["x-webhook-id"] == sender
            payload = json.loads(got.body)
            assert payload["event"] == "job.completed"
            assert payload["job"]["status"] == "completed"
            assert payload["job"]["result"]["usage"]["completion_tokens"] <= 2
            _assert_signed(got, secret)

        def listed() -> dict[str, Any]:
            (found,) = [
                w
                for w in client.get("/api/mcp/webhooks").json()["webhooks"]
                if w["webhook_id"] == webhook["webhook_id"]
            ]
            return found

        # The attempt is logged once the receiver's answer is in: after it saw the POST.
        wait_for(lambda: listed()["success_count"] == 1, what="the delivery logged")
        assert len(receiver.at("/hook")) == 1
        assert listed()["failure_count"] == 0
        assert listed()["last_triggered_at"] is not None

        deleted = client.delete(f"/api/mcp/webhooks/{webhook['webhook_id']}")
        assert deleted.status_code == 200
        assert deleted.json() == {"webhook_id": webhook["webhook_id"], "status": "deleted"}
        again = client.delete(f"/api/mcp/webhooks/{webhook['webhook_id']}")
        assert again.status_code == 404
        assert error(again)["code"] == "webhook_not_found"


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"url": "ftp://example.com/x", "events": ["job.completed"]}, "url"),
        ({"url": "https://example.com/x", "events": []}, "events"),
        ({"url": "https://example.com/x", "events": ["job.nope"]}, "events[0]"),
    ],
)
def test_webhook_registration_refuses_bad_fields(
    client: httpx.Client, body: dict[str, Any], param: str
) -> None:
    response = client.post("/api/mcp/webhooks", json=body)
    assert response.status_code == 400, response.text
    assert error(response)["param"] == param


def test_health_reports_the_job_service(client: httpx.Client) -> None:
    assert client.get("/health").json()["services"]["mcp_enabled"] is True


def test_jobs_can_be_switched_off(tmp_path: Path) -> None:
    with running_server(tmp_path, jobs_enabled=False) as off:
        assert off.get("/api/mcp/jobs").status_code == 404
        assert off.get("/health").json()["services"]["mcp_enabled"] is False
