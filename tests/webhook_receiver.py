"""A webhook receiver for tests: a real HTTP server on loopback that records what it is
sent (method, path, headers, exact body bytes) and answers as scripted per path."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

WAIT_S = 10.0
STALL = -1  # a scripted answer that never comes (until the receiver stops)


@dataclass(frozen=True)
class Received:
    method: str
    path: str
    headers: dict[str, str]  # names in lower case
    body: bytes


@dataclass
class Receiver:
    """What a loopback HTTP server was sent, and the answers it gives per path: scripted
    ones first, in order, then `always[path]`, else 200."""

    port: int = 0
    received: list[Received] = field(default_factory=list)
    scripts: dict[str, list[tuple[int, dict[str, str]]]] = field(default_factory=dict)
    always: dict[str, tuple[int, dict[str, str]]] = field(default_factory=dict)
    release: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def url(self, path: str, host: str = "127.0.0.1") -> str:
        return f"http://{host}:{self.port}{path}"

    def script(self, path: str, *answers: tuple[int, dict[str, str]]) -> None:
        self.scripts[path] = list(answers)

    def at(self, path: str) -> list[Received]:
        with self.lock:
            return [r for r in self.received if r.path == path]

    def answer(self, request: Received) -> tuple[int, dict[str, str]]:
        with self.lock:
            self.received.append(request)
            pending = self.scripts.get(request.path)
            if pending:
                return pending.pop(0)
            return self.always.get(request.path, (200, {}))


class _Handler(BaseHTTPRequestHandler):
    server: _ReceiverServer

    def _handle(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        headers = {name.lower(): value for name, value in self.headers.items()}
        receiver = self.server.receiver
        status, extra = receiver.answer(Received(self.command, self.path, headers, body))
        if status == STALL:
            receiver.release.wait(WAIT_S * 3)
            return
        try:
            self.send_response(status)
            for name, value in extra.items():
                self.send_header(name, value)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"ok")
        except OSError:  # the client gave up
            pass

    do_POST = _handle
    do_GET = _handle

    def log_message(self, *args: object) -> None:
        pass


class _ReceiverServer(ThreadingHTTPServer):
    daemon_threads = True
    receiver: Receiver


@contextmanager
def serve_receiver() -> Iterator[Receiver]:
    """A receiver on a free loopback port, in a thread, for the duration of the block."""
    server = _ReceiverServer(("127.0.0.1", 0), _Handler)
    server.receiver = Receiver(port=server.server_address[1])
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield server.receiver
    finally:
        server.receiver.release.set()
        server.shutdown()
        server.server_close()
