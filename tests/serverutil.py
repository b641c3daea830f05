"""Run the real server for end-to-end tests: uvicorn on a free loopback port, either in a
thread of the test process (`serve_app`) or as the `uvicorn --factory` command a user runs
(`serve_factory_process`). Readiness is polled with a deadline, never assumed after a sleep.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import uvicorn

READY_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 15.0
_POLL_INTERVAL_S = 0.02


@dataclass
class RunningServer:
    base_url: str
    app: Any


def wait_until_ready(
    base_url: str,
    *,
    alive: Callable[[], bool],
    path: str = "/health",
    timeout_s: float = READY_TIMEOUT_S,
) -> None:
    """Poll `path` until it answers 200; fail early if the server died, late at the deadline."""
    deadline = time.monotonic() + timeout_s
    last_error: str = "no attempt"
    with httpx.Client(base_url=base_url, timeout=2.0) as client:
        while time.monotonic() < deadline:
            if not alive():
                raise RuntimeError(f"server at {base_url} exited before it was ready")
            try:
                response = client.get(path)
                if response.status_code == 200:
                    return
                last_error = f"HTTP {response.status_code}"
            except httpx.TransportError as exc:
                last_error = repr(exc)
            time.sleep(_POLL_INTERVAL_S)
    raise TimeoutError(f"server at {base_url} not ready after {timeout_s}s: {last_error}")


def _bound_loopback_socket() -> socket.socket:
    # Naming the protocol matters: asyncio sets TCP_NODELAY only on accepted sockets whose
    # proto is IPPROTO_TCP, and without it every keep-alive response stalled ~40 ms (Nagle
    # holding the body behind the headers until the client's delayed ACK).
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    return sock


@contextmanager
def serve_app(app: Any) -> Iterator[RunningServer]:
    """Serve an ASGI app with uvicorn in a background thread.

    The socket is bound here and handed to uvicorn, so the port is ours before the server
    starts (no pick-then-bind race).
    """
    sock = _bound_loopback_socket()
    port = sock.getsockname()[1]
    # log_config=None: logging stays as the app configured it, uvicorn adds no handlers.
    # proxy_headers=False as `fusion serve` has it: the app reads X-Forwarded-For itself.
    config = uvicorn.Config(
        app, lifespan="on", log_config=None, timeout_graceful_shutdown=5, proxy_headers=False
    )
    server = uvicorn.Server(config)
    failure: list[BaseException] = []

    def run() -> None:
        try:
            server.run(sockets=[sock])
        except BaseException as exc:
            failure.append(exc)

    thread = threading.Thread(target=run, name=f"uvicorn-{port}", daemon=True)
    thread.start()
    base_url = f"http://127.0.0.1:{port}"
    try:
        wait_until_ready(base_url, alive=thread.is_alive)
        yield RunningServer(base_url=base_url, app=app)
    finally:
        server.should_exit = True
        thread.join(STOP_TIMEOUT_S)
        sock.close()
        if thread.is_alive():
            raise RuntimeError(f"uvicorn on port {port} did not stop within {STOP_TIMEOUT_S}s")
    if failure:
        raise RuntimeError("uvicorn failed") from failure[0]


def free_port() -> int:
    """A port free right now. Only for servers in another process, which must bind it
    themselves; serve_app avoids the small race this leaves."""
    with _bound_loopback_socket() as sock:
        return int(sock.getsockname()[1])


@dataclass
class ServerProcess:
    base_url: str
    process: subprocess.Popen[bytes]
    log_path: Path


@contextmanager
def serve_factory_process(
    env: Mapping[str, str], log_path: Path, cwd: Path
) -> Iterator[ServerProcess]:
    """`uvicorn --factory server.app:create_app` in a subprocess, stderr+stdout to log_path."""
    port = free_port()
    command = ["-m", "uvicorn", "--factory", "server.app:create_app"]
    command += ["--host", "127.0.0.1", "--port", str(port)]
    with _serve_process(command, port, env, log_path, cwd) as server:
        yield server


@contextmanager
def serve_cli_process(env: Mapping[str, str], log_path: Path, cwd: Path) -> Iterator[ServerProcess]:
    """`fusion serve` in a subprocess (its settings from `env`), output to log_path."""
    port = free_port()
    command = ["-m", "engine.cli", "serve", "--host", "127.0.0.1", "--port", str(port)]
    with _serve_process(command, port, env, log_path, cwd) as server:
        yield server


@contextmanager
def _serve_process(
    args: list[str], port: int, env: Mapping[str, str], log_path: Path, cwd: Path
) -> Iterator[ServerProcess]:
    base_url = f"http://127.0.0.1:{port}"
    with log_path.open("wb") as log_file:
        process = subprocess.Popen(
            [sys.executable, *args],
            cwd=cwd,
            env={**os.environ, **env},
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
        try:
            wait_until_ready(base_url, alive=lambda: process.poll() is None)
            yield ServerProcess(base_url=base_url, process=process, log_path=log_path)
        finally:
            process.terminate()
            try:
                process.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(STOP_TIMEOUT_S)
