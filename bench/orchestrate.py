"""Engine overhead through HTTP: requests/s and p50 latency of a trivial one-step `template`
workflow through `POST /api/fusion/orchestrate`, against a bare Litestar route on the same
server (same app, middleware, error handlers and uvicorn settings as `fusion serve`)
returning the same JSON. Both are measured in the same run, alternating, with a fixed
number of requests at a small concurrency; the figure is the ratio orchestrate / bare
(goal >= 0.5).

With 2 cores shared by the client and the server, the client (httpx) can be the limit for
both routes, which pulls the ratio towards 1. So the server process's own CPU time per
request (utime + stime from /proc, all its threads) is reported too: its inverse ratio is
the server-side capacity ratio, whatever the client manages.

    .venv/bin/python bench/orchestrate.py [--requests 2000] [--concurrency 8] [--rounds 3]

The server runs in a subprocess (this file with `--serve`), so the client (httpx) and the
server do not share an interpreter; on a 2-core machine they still share the cores.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
from harness import Goal, Row, add_json_option, free_port, machine, write_rows

WORKFLOW = """
id: trivial
name: Trivial
description: One template step
input_schema:
  type: object
  properties:
    name: {type: string}
  required: [name]
steps:
  - step_id: greet
    type: template
    value: "Hello, {{ input.name }}!"
"""
REQUEST = {"workflow": "trivial", "input": {"name": "Ada"}}
READY_TIMEOUT_S = 60.0


def bare_body() -> dict[str, Any]:
    """What orchestrate answers for REQUEST, field for field (ids and times are fixed)."""
    return {
        "workflow_id": "wf-0123456789ab",
        "status": "completed",
        "result": {"greet": "Hello, Ada!"},
        "execution_trace": [
            {
                "step": "greet",
                "type": "template",
                "model": None,
                "status": "completed",
                "duration_ms": 0.123,
                "attempts": 1,
                "error": None,
                "started_at": "2026-11-26T10:00:00.000Z",
            }
        ],
        "total_latency_ms": 0.456,
        "created_at": "2026-11-26T10:00:00.000Z",
        "completed_at": "2026-11-26T10:00:00.001Z",
        "workflow": "trivial",
        "workflow_version": None,
        "workflow_source": "predefined",
        "models": {},
        "error": None,
        "stored": True,
    }


def serve(
    port: int,
    data_dir: Path,
    bare_answer: dict[str, Any] | None = None,
    bare_status: int = 200,
    **settings: Any,
) -> None:
    """The server process: the Fusion app with the trivial workflow, plus a bare route
    (`POST /bench/bare`) answering `bare_answer` (orchestrate's body by default) with
    `bare_status`, as `fusion serve` runs it."""
    import uvicorn
    from litestar import post
    from litestar.params import JSONBody

    from engine.config import Settings
    from server.app import create_app

    body = bare_body() if bare_answer is None else bare_answer

    @post("/bench/bare", status_code=bare_status)
    async def bare(data: JSONBody[dict[str, Any]]) -> dict[str, Any]:
        return body

    workflows = data_dir / "workflows"
    workflows.mkdir(parents=True, exist_ok=True)
    (workflows / "trivial.yaml").write_text(WORKFLOW)
    # A benchmark measures throughput: the per-client rate limits (spec §8) would refuse it.
    config = Settings(
        **{
            "data_dir": data_dir,
            "workflows_dir": workflows,
            "startup_models": [],
            "log_level": "warning",
            "rate_limit_enabled": False,
            **settings,
        }
    )
    app = create_app(config, extra_routes=[bare])
    uvicorn.run(app, host="127.0.0.1", port=port, log_config=None, access_log=False)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def load(
    base: str,
    path: str,
    requests: int,
    concurrency: int,
    pid: int,
    body: dict[str, Any] = REQUEST,
    expect: int = 200,
) -> tuple[float, float, float]:
    """(requests/s, p50 ms, server CPU ms per request) for `requests` POSTs of `body` by
    `concurrency` workers, each answered `expect`."""
    latencies: list[float] = []
    remaining = requests
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)

    async with httpx.AsyncClient(base_url=base, limits=limits, timeout=30.0) as client:

        async def worker() -> None:
            nonlocal remaining
            while remaining > 0:
                remaining -= 1
                start = time.perf_counter()
                response = await client.post(path, json=body)
                latencies.append(time.perf_counter() - start)
                if response.status_code != expect:
                    raise RuntimeError(f"{path}: HTTP {response.status_code} {response.text}")

        cpu_before = cpu_seconds(pid)
        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
        cpu = cpu_seconds(pid) - cpu_before
    return requests / elapsed, statistics.median(latencies) * 1000, cpu / requests * 1000


@contextmanager
def served(script: str, data_dir: Path) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """`script --serve PORT DATA_DIR` in a subprocess (its own interpreter, as `fusion
    serve` would be), ready: its base URL and process; output in DATA_DIR/server.log."""
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    env = {**os.environ, "FUSION_CONFIG": str(data_dir / "absent.yaml")}
    with (data_dir / "server.log").open("wb") as log:
        command = [sys.executable, script, "--serve", str(port), str(data_dir)]
        process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            wait_ready(base, process)
            yield base, process
        finally:
            process.terminate()
            process.wait(30)


def wait_ready(base: str, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError("the server exited before it was ready")
        try:
            if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise TimeoutError("server not ready")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--serve", nargs=2, metavar=("PORT", "DATA_DIR"), help=argparse.SUPPRESS)
    add_json_option(parser)
    args = parser.parse_args()
    if args.serve:
        serve(int(args.serve[0]), Path(args.serve[1]))
        return

    print(f"machine: {machine()}")
    with (
        tempfile.TemporaryDirectory(prefix="fusion-bench-") as tmp,
        served(__file__, Path(tmp)) as (base, process),
    ):
        check = httpx.post(f"{base}/api/fusion/orchestrate", json=REQUEST).json()
        assert check["result"] == bare_body()["result"], check
        assert set(check) == set(bare_body()), sorted(check)
        # Warm both paths (connections, caches, SQLite pages).
        for path in ("/bench/bare", "/api/fusion/orchestrate"):
            asyncio.run(load(base, path, 200, args.concurrency, process.pid))
        results: dict[str, list[tuple[float, float, float]]] = {"bare": [], "orchestrate": []}
        for _ in range(args.rounds):
            for name, path in (
                ("bare", "/bench/bare"),
                ("orchestrate", "/api/fusion/orchestrate"),
            ):
                results[name].append(
                    asyncio.run(load(base, path, args.requests, args.concurrency, process.pid))
                )

    def summary(name: str) -> tuple[float, float, float]:
        rows = results[name]
        return tuple(statistics.median(row[k] for row in rows) for k in range(3))  # type: ignore[return-value]

    bare_rps, bare_p50, bare_cpu = summary("bare")
    orch_rps, orch_p50, orch_cpu = summary("orchestrate")
    print(
        f"{args.requests} requests x {args.rounds} rounds, concurrency {args.concurrency}, "
        "medians of rounds"
    )
    print(
        f"orchestrate (1 template step): {orch_rps:7.1f} req/s, p50 {orch_p50:6.2f} ms, "
        f"server CPU {orch_cpu:.3f} ms/request"
    )
    print(
        f"bare Litestar route (baseline): {bare_rps:7.1f} req/s, p50 {bare_p50:6.2f} ms, "
        f"server CPU {bare_cpu:.3f} ms/request"
    )
    print(f"ratio orchestrate/bare, requests/s: {orch_rps / bare_rps:.2f} (goal >= 0.5)")
    print(
        f"ratio orchestrate/bare, server capacity (CPU per request, bare/orchestrate): "
        f"{bare_cpu / orch_cpu:.2f} (goal >= 0.5)"
    )
    bench = "orchestrate"
    write_rows(
        args.json,
        [
            Row(
                bench,
                "POST /api/fusion/orchestrate, requests/s",
                orch_rps,
                "req/s",
                bare_rps,
                "bare Litestar route",
                Goal(">=", 0.5),
            ),
            # Requests per server CPU-second: the capacity ratio, whatever the client manages.
            Row(
                bench,
                "server capacity, requests per CPU-second",
                1000 / orch_cpu,
                "req/CPU-s",
                1000 / bare_cpu,
                "bare Litestar route",
                Goal(">=", 0.5),
            ),
        ],
    )


if __name__ == "__main__":
    main()
