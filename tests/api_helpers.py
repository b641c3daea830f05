"""Helpers for the model API end-to-end tests: a real server per module, tokenizer facts
for the tiny models, server-sent-event parsing, and a stream read on a thread so a
generation can be held in flight while the test does something else."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
from serverutil import serve_app

from engine.config import Settings
from server.app import create_app

POLL_S = 0.02


@contextmanager
def running_server(data_dir: Path, **settings: Any) -> Iterator[httpx.Client]:
    """A real uvicorn serving a fresh app (no start-up models unless `settings` names
    some); yields a client. Rate limits are off unless `settings` turns them on: a test
    module makes more requests than one client may in a minute (tests/test_ratelimit.py
    covers the limits)."""
    config = Settings(
        **{
            "data_dir": data_dir,
            "startup_models": [],
            "workflows_dir": data_dir / "wf",
            "log_level": "warning",
            "rate_limit_enabled": False,
            **settings,
        }
    )
    with (
        serve_app(create_app(config)) as server,
        httpx.Client(base_url=server.base_url, timeout=60.0) as client,
    ):
        yield client


def load(client: httpx.Client, path: Path, model_type: str, **fields: Any) -> dict[str, Any]:
    response = client.post(
        "/v1/models/load", json={"model_path": str(path), "model_type": model_type, **fields}
    )
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def tokenizer(model_dir: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model_dir))


def no_eos_bias(model_dir: Path) -> dict[str, float]:
    """logit_bias that keeps a random-weight model from ever ending: every special token
    (the end-of-sequence ones among them) pushed to -1e9."""
    return {str(i): -1e9 for i in tokenizer(model_dir).all_special_ids}


def chat_prompt_tokens(model_dir: Path, messages: list[dict[str, Any]]) -> int:
    encoded = tokenizer(model_dir).apply_chat_template(messages, add_generation_prompt=True)
    ids = encoded if isinstance(encoded, list) else encoded["input_ids"]
    return len(ids)


def sse_payloads(lines: Iterator[str]) -> list[Any]:
    """The `data:` payloads of an event stream, JSON-decoded except `[DONE]`."""
    out: list[Any] = []
    for line in lines:
        if line.startswith("data: "):
            data = line[len("data: ") :]
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


def wait_for(predicate: Callable[[], bool], timeout_s: float = 20.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(POLL_S)
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what or predicate}")


class StreamReader:
    """POST a streaming chat request on a thread and collect its events as they arrive."""

    def __init__(self, base_url: str, body: dict[str, Any]) -> None:
        self.base_url = base_url
        self.body = {**body, "stream": True}
        self.status: int | None = None
        self.events: list[Any] = []
        self.error: BaseException | None = None
        self.started = threading.Event()  # the first content event arrived
        self.finished = threading.Event()
        self._close = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        try:
            with (
                httpx.Client(base_url=self.base_url, timeout=60.0) as client,
                client.stream("POST", "/v1/chat/completions", json=self.body) as response,
            ):
                self.status = response.status_code
                for line in response.iter_lines():
                    for payload in sse_payloads(iter([line])):
                        self.events.append(payload)
                        if _has_content(payload):
                            self.started.set()
                    if self._close.is_set():
                        return  # leaving the block drops the connection mid-stream
        except BaseException as exc:
            self.error = exc
        finally:
            self.started.set()
            self.finished.set()

    def begin(self) -> StreamReader:
        """Send the request; do not wait for anything."""
        self._thread.start()
        return self

    def start(self) -> StreamReader:
        """Send the request and wait for the first content event."""
        self._thread.start()
        assert self.started.wait(30), "the stream produced no content"
        assert self.status == 200, self.events
        return self

    def disconnect(self) -> None:
        """Stop reading and drop the connection at the next event."""
        self._close.set()
        self.join()

    def join(self, timeout_s: float = 30.0) -> None:
        self._thread.join(timeout_s)
        assert not self._thread.is_alive(), "the stream did not end"


def _has_content(payload: Any) -> bool:
    if not isinstance(payload, dict):
        return False
    choices = payload.get("choices") or []
    return any(c.get("delta", {}).get("content") for c in choices)
