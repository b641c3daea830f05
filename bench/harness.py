"""What the benchmarks share: a `fusion serve` process started as a user would, and
timing helpers."""

from __future__ import annotations

import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx

READY_TIMEOUT_S = 120.0


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    return f"{cpu}, {os.cpu_count()} cores, Python {platform.python_version()}"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def fusion_server(data_dir: Path, startup_models: list[dict[str, Any]]) -> Iterator[str]:
    """`fusion serve` in a subprocess with the given models loaded; yields its base URL."""
    port = free_port()
    env = {
        **os.environ,
        "FUSION_CONFIG": str(data_dir / "absent.yaml"),
        "FUSION_DATA_DIR": str(data_dir),
        "FUSION_STARTUP_MODELS": json.dumps(startup_models),
        "FUSION_LOG_LEVEL": "warning",
        # Throughput is measured: the per-client rate limits (spec §8) would refuse it.
        "FUSION_RATE_LIMIT_ENABLED": "false",
        "HF_HUB_OFFLINE": "1",
    }
    command = [sys.executable, "-m", "engine.cli", "serve", "--port", str(port)]
    with server_process(command, port, data_dir / "server.log", env) as base:
        yield base


@contextmanager
def server_process(
    command: list[str], port: int, log_path: Path, env: dict[str, str] | None = None
) -> Iterator[str]:
    """A server started by `command` on `port`, once its /health answers 200; yields its
    base URL and stops it afterwards. Its output goes to `log_path`."""
    log = log_path.open("wb")
    process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"{command[0]} exited: see {log_path}")
            try:
                if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"not ready: {' '.join(command)[:200]}")
            time.sleep(0.1)
        yield base
    finally:
        process.terminate()
        process.wait(30)
        log.close()


def median(samples: list[float]) -> float:
    return statistics.median(samples)
