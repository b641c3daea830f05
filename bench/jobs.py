"""The durable job queue (spec §5), three figures, each against a baseline measured in the
same run:

1. durable submits/s over HTTP: `POST /api/mcp/jobs` (each answered 202 only after its
   commit) of a one-step template workflow job, against a bare Litestar POST route on the
   same server answering the same body (goal: >= 500 submits/s on 2 cores). The workers run
   the submitted jobs meanwhile, as they would in service.
2. durable submits/s in-process: `SqliteJobQueue.submit` against a bare apsw INSERT of the
   same row, one committed transaction each, on the same kind of database file.
3. latency of a trivial job from submit to `completed` (the client follows the job's SSE
   events), against `POST /api/fusion/orchestrate` of the same workflow answered
   synchronously; the difference is what the queue adds (goal: p50 <= 20 ms).

    .venv/bin/python bench/jobs.py [--requests 2000] [--concurrency 8] [--latency 200]

The server runs in a subprocess (this file with `--serve`), as in bench/orchestrate.py.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
from pathlib import Path

import httpx
from harness import Goal, Row, add_json_option, machine, write_rows
from orchestrate import load, serve, served

JOB = {
    "operation": "workflow",
    "input": {"workflow": "trivial", "input": {"name": "Ada"}},
    "priority": "normal",
}
ORCHESTRATE = JOB["input"]
ACCEPTED = {
    "job_id": "job-0123456789abcdef0123456789abcdef",
    "status": "queued",
    "model_id": None,
    "operation": "workflow",
    "priority": "normal",
    "created_at": "2026-11-27T10:00:00.000Z",
    "attempts": 0,
    "max_attempts": 3,
    "metadata": None,
    "position_in_queue": 1,
    "estimated_completion_ms": 1.5,
}


async def submit_load(
    base: str, path: str, requests: int, concurrency: int, pid: int
) -> tuple[float, float, float]:
    """(submits/s, p50 ms, server CPU ms per submit)."""
    return await load(base, path, requests, concurrency, pid, body=JOB, expect=202)


def drain(base: str) -> None:
    """Wait until the workers have run every submitted job, so the next round starts idle."""
    with httpx.Client(base_url=base, timeout=30) as client:
        while True:
            pending = sum(
                client.get("/api/mcp/jobs", params={"status": s, "limit": 1}).json()["total"]
                for s in ("queued", "processing")
            )
            if pending == 0:
                return
            time.sleep(0.2)


def job_latency(base: str, count: int) -> tuple[list[float], list[float]]:
    """Milliseconds: submit -> job.completed event, and orchestrate round trips."""
    jobs: list[float] = []
    direct: list[float] = []
    with httpx.Client(base_url=base, timeout=30) as client:
        for _ in range(count):
            start = time.perf_counter()
            job_id = client.post("/api/mcp/jobs", json=JOB).json()["job_id"]
            with client.stream("GET", f"/api/mcp/jobs/{job_id}/events") as events:
                last = ""
                for line in events.iter_lines():
                    if line.startswith("event: "):
                        last = line[len("event: ") :]
                if last != "job.completed":
                    raise RuntimeError(f"job {job_id} ended with {last}")
            jobs.append((time.perf_counter() - start) * 1000)
            start = time.perf_counter()
            response = client.post("/api/fusion/orchestrate", json=ORCHESTRATE)
            direct.append((time.perf_counter() - start) * 1000)
            if response.json()["status"] != "completed":
                raise RuntimeError(response.text)
    return jobs, direct


def in_process(count: int, tmp: Path) -> tuple[float, float]:
    """(queue submits/s, bare INSERT+commit/s) on fresh database files."""
    from engine.jobs.queue import SqliteJobQueue
    from engine.jobs.types import JobRequest
    from engine.store import Store

    with Store(tmp / "queue.sqlite3") as store:
        queue = SqliteJobQueue(store, max_queued=10 * count)
        request = JobRequest(operation="workflow", input=JOB["input"])
        started = time.perf_counter()
        for _ in range(count):
            queue.submit(request)
        ours = count / (time.perf_counter() - started)
    with Store(tmp / "bare.sqlite3") as store:
        with store.transaction() as conn:
            conn.execute("CREATE TABLE bare (id INTEGER PRIMARY KEY, input TEXT, at REAL)")
        payload = json.dumps(JOB["input"])
        started = time.perf_counter()
        for _ in range(count):
            with store.transaction() as conn:
                conn.execute("INSERT INTO bare (input, at) VALUES (?, ?)", (payload, time.time()))
        bare = count / (time.perf_counter() - started)
    return ours, bare


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--latency", type=int, default=200, help="sequential jobs timed")
    parser.add_argument("--serve", nargs=2, metavar=("PORT", "DATA_DIR"), help=argparse.SUPPRESS)
    add_json_option(parser)
    args = parser.parse_args()
    if args.serve:
        serve(
            int(args.serve[0]),
            Path(args.serve[1]),
            bare_answer=ACCEPTED,
            bare_status=202,
            jobs_max_queued=1_000_000,
        )
        return

    print(f"machine: {machine()}")
    with tempfile.TemporaryDirectory(prefix="fusion-bench-jobs-") as tmp:
        ours_in, bare_in = in_process(args.requests, Path(tmp))
        with served(__file__, Path(tmp)) as (base, process):
            for path in ("/bench/bare", "/api/mcp/jobs"):  # warm connections and pages
                asyncio.run(submit_load(base, path, 200, args.concurrency, process.pid))
            drain(base)
            rounds: dict[str, list[tuple[float, float, float]]] = {"bare": [], "jobs": []}
            for _ in range(args.rounds):
                for name, path in (("bare", "/bench/bare"), ("jobs", "/api/mcp/jobs")):
                    rounds[name].append(
                        asyncio.run(
                            submit_load(base, path, args.requests, args.concurrency, process.pid)
                        )
                    )
                drain(base)
            job_times, direct_times = job_latency(base, args.latency)

    def medians(name: str) -> list[float]:
        return [statistics.median(row[k] for row in rounds[name]) for k in range(3)]

    bare_rps, bare_p50, bare_cpu = medians("bare")
    jobs_rps, jobs_p50, jobs_cpu = medians("jobs")
    print(
        f"HTTP, {args.requests} submits x {args.rounds} rounds, concurrency {args.concurrency} "
        "(medians of rounds):"
    )
    print(
        f"  POST /api/mcp/jobs:         {jobs_rps:7.1f} submits/s, p50 {jobs_p50:6.2f} ms, "
        f"server CPU {jobs_cpu:.3f} ms/submit"
    )
    print(
        f"  bare route (baseline):      {bare_rps:7.1f} req/s,     p50 {bare_p50:6.2f} ms, "
        f"server CPU {bare_cpu:.3f} ms/request"
    )
    print(f"  ratio jobs/bare: {jobs_rps / bare_rps:.2f}; goal >= 500 submits/s: {jobs_rps:.0f}")
    print(f"in-process, {args.requests} submits, one commit each:")
    print(f"  SqliteJobQueue.submit:      {ours_in:7.1f} submits/s")
    print(f"  bare INSERT (baseline):     {bare_in:7.1f} inserts/s")
    print(f"  ratio queue/bare: {ours_in / bare_in:.2f}")
    job_p50 = statistics.median(job_times)
    direct_p50 = statistics.median(direct_times)
    print(f"latency of a trivial workflow job, {args.latency} sequential (p50):")
    print(f"  submit -> job.completed:    {job_p50:6.2f} ms")
    print(f"  orchestrate (baseline):     {direct_p50:6.2f} ms")
    print(
        f"  added by the queue: {job_p50 - direct_p50:.2f} ms (ratio {job_p50 / direct_p50:.2f}); "
        "goal <= 20 ms"
    )
    bench = "jobs"
    write_rows(
        args.json,
        [
            Row(
                bench,
                "durable submits over HTTP (POST /api/mcp/jobs)",
                jobs_rps,
                "submits/s",
                bare_rps,
                "bare Litestar POST route",
                Goal(">=", 500, "ours"),
            ),
            Row(
                bench,
                "durable submits in-process (SqliteJobQueue.submit)",
                ours_in,
                "submits/s",
                bare_in,
                "bare apsw INSERT + commit",
            ),
            Row(
                bench,
                "trivial job, submit -> job.completed, p50",
                job_p50,
                "ms",
                direct_p50,
                "orchestrate, same workflow",
                Goal("<=", 20, "difference"),
            ),
        ],
    )


if __name__ == "__main__":
    main()
