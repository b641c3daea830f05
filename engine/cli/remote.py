"""The CLI's side of a running Fusion server: a small HTTP client (`--server`, `--api-key`),
its errors as one line on stderr, and `fusion run --server`, which runs a workflow there
and streams its progress.

A server's §7 error envelope becomes `error: <message> (<code>)` with exit 2, and so does
an address where nothing answers (`error: no Fusion server at URL`)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx

from engine.cli.common import (
    EXIT_USAGE,
    is_workflow_file,
    json_object,
    out,
    run_exit,
    run_input,
    run_models,
)
from engine.cli.progress import Progress
from engine.dsl.source import load_file
from engine.errors import InvalidRequest

DEFAULT_SERVER = "http://127.0.0.1:8000"
SERVER_ENV, API_KEY_ENV = "FUSION_SERVER", "FUSION_API_KEY"
# Connecting is quick or never; a request may wait longer (a queue, a cold cache).
TIMEOUT = httpx.Timeout(60.0, connect=5.0)
# A model load or a streamed run takes as long as it takes: only connecting is bounded.
UNBOUNDED = httpx.Timeout(None, connect=5.0)
# The server's workflow "custom" runs the document sent as `definition`.
CUSTOM = "custom"


class RemoteError(Exception):
    """A request the server refused, or that never reached one: the one line to show."""


def add_server_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--server",
        metavar="URL",
        help=f"the Fusion server (default: ${SERVER_ENV}, else {DEFAULT_SERVER})",
    )
    parser.add_argument(
        "--api-key", metavar="KEY", help=f"sent as a Bearer token (default: ${API_KEY_ENV})"
    )


class Client:
    """Requests to one server, each answered with its JSON body or a RemoteError."""

    def __init__(self, server: str | None = None, api_key: str | None = None) -> None:
        self.server = (server or os.environ.get(SERVER_ENV) or DEFAULT_SERVER).rstrip("/")
        key = api_key or os.environ.get(API_KEY_ENV)
        # server/auth.py reads `Authorization: Bearer <key>`.
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        self.http = httpx.Client(base_url=self.server, headers=headers, timeout=TIMEOUT)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Client:
        return cls(getattr(args, "server", None), getattr(args, "api_key", None))

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.http.close()

    def request(
        self,
        method: str,
        path: str,
        *,
        body: Any = None,
        params: dict[str, Any] | None = None,
        timeout: httpx.Timeout = TIMEOUT,
    ) -> Any:
        with self._errors():
            response = self.http.request(method, path, json=body, params=params, timeout=timeout)
        self._check(response)
        return response.json()

    @contextmanager
    def stream(self, path: str, body: Any) -> Iterator[Iterator[tuple[str, Any]]]:
        """POST ``body`` and read the answer as server-sent events: (name, JSON data)."""
        with (
            self._errors(),
            self.http.stream("POST", path, json=body, timeout=UNBOUNDED) as response,
        ):
            if response.status_code >= 400:
                response.read()
                self._check(response)
            yield _sse(response.iter_lines())

    @contextmanager
    def _errors(self) -> Iterator[None]:
        try:
            yield
        except httpx.ConnectError:
            raise RemoteError(f"no Fusion server at {self.server}") from None
        except httpx.TransportError as exc:
            raise RemoteError(f"{self.server}: {type(exc).__name__}: {exc}") from None

    @staticmethod
    def _check(response: httpx.Response) -> None:
        if response.is_success:
            return
        try:
            error = response.json().get("error")
        except (ValueError, AttributeError):
            error = None
        if isinstance(error, dict) and error.get("message"):
            raise RemoteError(envelope_line(error))
        raise RemoteError(f"HTTP {response.status_code}: {response.text.strip()[:200]}")


def envelope_line(error: dict[str, Any]) -> str:
    """A §7 error object as one line: its message and code."""
    code = error.get("code") or error.get("type")
    return f"{error.get('message')} ({code})" if code else str(error.get("message"))


def model_path(model_id: str) -> str:
    """The URL path of a loaded model (ids may hold '/', which the routes take as is)."""
    return "/v1/models/" + quote(model_id, safe="/")


def handled(command: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """A command whose RemoteError ends it with its line on stderr and exit 2."""

    def run(args: argparse.Namespace) -> int:
        try:
            return command(args)
        except RemoteError as exc:
            out(sys.stderr, f"error: {exc}")
            return EXIT_USAGE

    return run


def _sse(lines: Iterator[str]) -> Iterator[tuple[str, Any]]:
    name = "message"
    data: list[str] = []
    for line in lines:
        if not line:
            if data:
                yield name, json.loads("\n".join(data))
            name, data = "message", []
        elif line.startswith("event:"):
            name = line[len("event:") :].strip()
        elif line.startswith("data:"):
            data.append(line[len("data:") :].strip())
    if data:
        yield name, json.loads("\n".join(data))


# -- fusion run --server ------------------------------------------------------------------
def orchestrate_body(args: argparse.Namespace) -> dict[str, Any]:
    """The POST /api/fusion/orchestrate body: a workflow file goes as workflow "custom"
    with its document as `definition` (YAML errors are reported here, located); anything
    else is a workflow id on the server."""
    target: str = args.workflow
    path = Path(target)
    # The run is the terminal's: Ctrl-C (the stream closing) stops it on the server too.
    body: dict[str, Any] = {"workflow": target, "stream": True, "cancel_on_disconnect": True}
    if is_workflow_file(target):
        if not path.is_file():
            raise InvalidRequest(f"no such workflow file: {target}", param="workflow")
        definition = load_file(path).data
        if not isinstance(definition, dict):
            raise InvalidRequest(f"{target}: a workflow file holds a mapping", param="workflow")
        body.update(workflow=CUSTOM, definition=definition)
    body["input"] = run_input(args)
    config = json_object(args.config_json, "config-json")
    if config is not None:
        body["config"] = config
    models = run_models(args)
    if models:
        body["models"] = models
    return body


@handled
def run_remote(args: argparse.Namespace) -> int:
    """`fusion run WORKFLOW --server URL`: run on the server, progress and tokens on
    stderr, the §3.1 body on stdout; exit 0 completed, 1 failed, 3 partial."""
    body = orchestrate_body(args)
    progress = Progress(sys.stderr)
    with Client.from_args(args) as client, client.stream("/api/fusion/orchestrate", body) as events:
        for name, data in events:
            if name == "result":
                progress.end()
                out(sys.stdout, json.dumps(data, indent=2))
                return run_exit(data.get("status"))
            if name == "error":
                progress.end()
                raise RemoteError(envelope_line(data.get("error") or {}))
            progress(name, data)
    raise RemoteError("the server's event stream ended before the run's result")
