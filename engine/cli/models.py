"""`fusion models ls | ps | load | unload | info`: the models of a running server, managed
as people know it from Ollama. `ls` lists the loaded models, `ps` what each is serving
now, `load` loads one with an elapsed-time line while the request runs."""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, TextIO

from engine.cli.common import EXIT_OK, out
from engine.cli.remote import (
    UNBOUNDED,
    Client,
    RemoteError,
    add_server_args,
    handled,
    model_path,
)
from engine.models.types import ModelType

FORMATS = ("text", "json")
SPINNER = "|/-\\"
REDRAW_S = 0.1


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """Columns left-aligned to their widest cell, two spaces apart."""
    cells = [list(headers), *([("-" if c is None else str(c)) for c in row] for row in rows)]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in cells
    )


def memory(gb: float | None) -> str:
    return "-" if gb is None else f"{gb:.2f} GB"


def _print(args: argparse.Namespace, data: Any, text: Callable[[], str]) -> int:
    out(sys.stdout, json.dumps(data, indent=2) if args.format == "json" else text())
    return EXIT_OK


@handled
def cmd_ls(args: argparse.Namespace) -> int:
    with Client.from_args(args) as client:
        models = client.request("GET", "/v1/models")["data"]
    rows = [
        (
            m["id"],
            m["type"],
            m.get("family"),
            m.get("context_length"),
            memory(m.get("vram_usage_gb")),
            m["status"],
            ",".join(m.get("tags", [])),
        )
        for m in models
    ]
    headers = ("ID", "TYPE", "FAMILY", "CONTEXT", "MEMORY", "STATUS", "TAGS")
    return _print(args, models, lambda: table(headers, rows))


@handled
def cmd_ps(args: argparse.Namespace) -> int:
    with Client.from_args(args) as client:
        infos = []
        for m in client.request("GET", "/v1/models")["data"]:
            try:
                infos.append(client.request("GET", model_path(m["id"]) + "/info"))
            except RemoteError:
                continue  # unloaded since the list was read
    rows = [_ps_row(info) for info in infos]
    headers = ("ID", "ACTIVE", "QUEUED", "CONCURRENCY", "BATCH", "REQUESTS", "LAST USED")
    return _print(args, infos, lambda: table(headers, rows))


def _ps_row(info: dict[str, Any]) -> tuple[Any, ...]:
    queue, batch = info["queue"], info.get("batch")
    # A language model's continuous batch: sequences decoding now of its batch size.
    decoding = f"{batch['decoding']}/{batch['max_batch']}" if batch else None
    return (
        info["model_id"],
        queue["active"],
        queue["waiting"],
        queue["max_concurrency"],
        decoding,
        info["request_count"],
        info.get("last_used"),
    )


class Elapsed:
    """While a request runs: on a terminal a spinner with the seconds elapsed, redrawn in
    place with '\\r'; elsewhere (a log, a pipe) the one line saying what started."""

    def __init__(self, stream: TextIO, label: str) -> None:
        self.stream = stream
        self.label = label
        self.tty = bool(getattr(stream, "isatty", lambda: False)())
        self.done = threading.Event()
        self.started = time.monotonic()

    def run(self, work: Callable[[], Any]) -> Any:
        if not self.tty:
            out(self.stream, f"{self.label}...")
            self.stream.flush()
            return work()
        drawer = threading.Thread(target=self._draw, daemon=True)
        drawer.start()
        try:
            return work()
        finally:
            self.done.set()
            drawer.join()

    def _draw(self) -> None:
        tick = 0
        while True:
            elapsed = time.monotonic() - self.started
            self.stream.write(f"\r{self.label} {SPINNER[tick % len(SPINNER)]} {elapsed:5.1f}s")
            self.stream.flush()
            tick += 1
            if self.done.wait(REDRAW_S):
                break
        self.stream.write("\r\x1b[K")  # clear the line for what follows
        self.stream.flush()


@handled
def cmd_load(args: argparse.Namespace) -> int:
    body: dict[str, Any] = {"model_path": args.path, "model_type": args.type}
    if args.id:
        body["model_id"] = args.id
    if args.context_length:
        body["context_length"] = args.context_length
    with Client.from_args(args) as client:
        loaded = Elapsed(sys.stderr, f"loading {args.path} ({args.type})").run(
            lambda: client.request("POST", "/v1/models/load", body=body, timeout=UNBOUNDED)
        )
    seconds = loaded["load_time_ms"] / 1000
    summary = (
        f"loaded {loaded['model_id']} in {seconds:.2f} s, memory {memory(loaded['vram_usage_gb'])}"
    )
    return _print(args, loaded, lambda: summary)


@handled
def cmd_unload(args: argparse.Namespace) -> int:
    params = {"force": "true"} if args.force else None
    with Client.from_args(args) as client:
        done = client.request("DELETE", model_path(args.id) + "/unload", params=params)
    out(sys.stdout, f"unloaded {done['model_id']}, freed {memory(done['vram_freed_gb'])}")
    return EXIT_OK


@handled
def cmd_info(args: argparse.Namespace) -> int:
    with Client.from_args(args) as client:
        info = client.request("GET", model_path(args.id) + "/info")
    return _print(args, info, lambda: "\n".join(_pretty(info)))


def _pretty(value: dict[str, Any], indent: str = "") -> list[str]:
    """A JSON object as `key: value` lines, nested objects indented under their key."""
    width = max((len(k) for k in value), default=0) + 1
    lines = []
    for key, item in value.items():
        if isinstance(item, dict) and item:
            lines.append(f"{indent}{key}:")
            lines += _pretty(item, indent + "  ")
        else:
            lines.append(f"{indent}{key + ':':<{width}} {_scalar(item)}")
    return lines


def _scalar(item: Any) -> str:
    if item is None:
        return "-"
    if isinstance(item, list):
        return ", ".join(map(_scalar, item))
    return item if isinstance(item, str) else json.dumps(item)


def register(sub: argparse._SubParsersAction) -> None:
    models = sub.add_parser("models", help="list, load and unload the models of a Fusion server")
    actions = models.add_subparsers(dest="action", required=True)
    for name, func, text in (
        ("ls", cmd_ls, "the loaded models"),
        ("ps", cmd_ps, "what each loaded model is serving now"),
        ("load", cmd_load, "load a model"),
        ("unload", cmd_unload, "unload a model"),
        ("info", cmd_info, "a loaded model's details"),
    ):
        p = actions.add_parser(name, help=text)
        p.set_defaults(func=func)
        add_server_args(p)
        if name in ("ls", "ps", "info", "load"):
            p.add_argument("--format", choices=FORMATS, default="text")
        if name == "load":
            p.add_argument("path", help="a model directory or hub id (any label for echo)")
            p.add_argument("--type", required=True, help=f"the model type: {', '.join(ModelType)}")
            p.add_argument("--id", help="the model's id (default: from the path)")
            p.add_argument("--context-length", type=int, metavar="N")
        elif name in ("unload", "info"):
            p.add_argument("id", help="a loaded model's id")
        if name == "unload":
            p.add_argument("--force", action="store_true", help="stop its running requests")
