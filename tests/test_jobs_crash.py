"""Accepted work is never lost: a real server process is killed with SIGKILL while a job is
generating and another waits behind it, then started again on the same database."""

from __future__ import annotations

import json
import signal
from pathlib import Path
from typing import Any

import httpx
from api_helpers import no_eos_bias, wait_for
from serverutil import ServerProcess, serve_cli_process, serve_factory_process

from engine.models.synthetic import build_lm

LONG = "long-lm"
ROOT = Path(__file__).resolve().parents[1]
MAX_ATTEMPTS = 2


def _env(data: Path, model_dir: Path) -> dict[str, str]:
    model = {
        "model_path": str(model_dir),
        "model_type": "lm",
        "model_id": LONG,
        "max_concurrency": 1,
    }
    return {
        "FUSION_DATA_DIR": str(data),
        "FUSION_WORKFLOWS_DIR": str(data / "wf"),
        "FUSION_STARTUP_MODELS": json.dumps([model]),
        "FUSION_JOBS_MAX_ATTEMPTS": str(MAX_ATTEMPTS),
        "FUSION_LOG_LEVEL": "warning",
    }


def _job(client: httpx.Client, job_id: str) -> dict[str, Any]:
    response = client.get(f"/api/mcp/jobs/{job_id}")
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def _kill(server: ServerProcess) -> None:
    server.process.send_signal(signal.SIGKILL)
    assert server.process.wait(30) == -signal.SIGKILL


def _endless(model_dir: Path) -> dict[str, Any]:
    return {
        "model_id": LONG,
        "operation": "chat",
        "input": {
            "messages": [{"role": "user", "content": "go"}],
            "max_tokens": 60_000,
            "logit_bias": no_eos_bias(model_dir),
        },
    }


def _generating(client: httpx.Client, job_id: str, attempt: int) -> None:
    def there() -> bool:
        job = _job(client, job_id)
        return job["status"] == "processing" and job["attempts"] == attempt and job["progress"] > 0

    wait_for(there, timeout_s=60, what=f"job {job_id} generating in attempt {attempt}")


def test_jobs_survive_sigkill_and_a_lost_job_ends_failed_after_its_attempts(
    tmp_path: Path,
) -> None:
    model_dir = build_lm(tmp_path / "long-lm", context_length=65_536)
    endless = _endless(model_dir)
    waiting = {
        "model_id": LONG,
        "operation": "chat",
        "input": {"messages": [{"role": "user", "content": "next"}], "max_tokens": 2},
    }
    env = _env(tmp_path / "data", model_dir)

    # 1. A job generates, another waits for the model's only slot; the process dies.
    with serve_factory_process(env, tmp_path / "first.log", ROOT) as server:
        with httpx.Client(base_url=server.base_url, timeout=30) as client:
            lost = client.post("/api/mcp/jobs", json=endless).json()["job_id"]
            _generating(client, lost, attempt=1)
            behind = client.post("/api/mcp/jobs", json=waiting)
            assert behind.status_code == 202
            behind_id = behind.json()["job_id"]
        _kill(server)

    # 2. After the restart both are there; the lost one runs again as attempt 2.
    with serve_factory_process(env, tmp_path / "second.log", ROOT) as server:
        with httpx.Client(base_url=server.base_url, timeout=30) as client:
            assert _job(client, behind_id)["status"] == "queued"
            _generating(client, lost, attempt=2)
        _kill(server)

    # 3. Its last attempt was lost too: it ends failed with the reason, and the waiting job
    # finally gets the model. Nothing is left processing.
    with (
        serve_factory_process(env, tmp_path / "third.log", ROOT) as server,
        httpx.Client(base_url=server.base_url, timeout=30) as client,
    ):
        failed = _job(client, lost)
        assert failed["status"] == "failed"
        assert failed["attempts"] == MAX_ATTEMPTS
        assert "expired" in failed["error"]
        assert "failed_at" in failed
        wait_for(
            lambda: _job(client, behind_id)["status"] == "completed",
            timeout_s=60,
            what="the waiting job to complete",
        )
        events = client.get(f"/api/mcp/jobs/{lost}/events").text
        assert events.count("event: job.processing") == MAX_ATTEMPTS
        assert "event: job.completed" not in events
        processing = client.get("/api/mcp/jobs", params={"status": "processing"}).json()
        assert processing["total"] == 0


def test_sigterm_puts_running_jobs_back_and_a_restart_runs_them(tmp_path: Path) -> None:
    """A graceful stop (`fusion serve` on SIGTERM) releases the job it was running without
    using up an attempt; nothing accepted is lost."""
    model_dir = build_lm(tmp_path / "long-lm", context_length=65_536)
    env = {
        **_env(tmp_path / "data", model_dir),
        "FUSION_SHUTDOWN_TIMEOUT_S": "1",
        "FUSION_LOG_LEVEL": "info",
    }
    with serve_cli_process(env, tmp_path / "first.log", ROOT) as server:
        with httpx.Client(base_url=server.base_url, timeout=30) as client:
            running = client.post("/api/mcp/jobs", json=_endless(model_dir)).json()["job_id"]
            _generating(client, running, attempt=1)
        server.process.send_signal(signal.SIGTERM)
        assert server.process.wait(60) in (0, -signal.SIGTERM), server.log_path.read_text()
    log = (tmp_path / "first.log").read_text()
    assert "job_released" in log
    assert "engine stopped" in log
    assert "Traceback" not in log
    with (
        serve_cli_process(env, tmp_path / "second.log", ROOT) as server,
        httpx.Client(base_url=server.base_url, timeout=30) as client,
    ):
        _generating(client, running, attempt=1)  # the same first attempt, run again
        assert client.delete(f"/api/mcp/jobs/{running}").status_code == 200
