"""Serving many callers at once (issue #12). This file holds the embeddings part for now:
the chat parts of issue #12 (aggregate tokens/s and time to first token at 1, 8 and 32
clients against `mlx_lm.server`, and the summarisation wall time) come later.

Embeddings: passages/s through `POST /v1/embeddings` of a `fusion serve` process, with 8
concurrent callers each sending one passage per request (the server groups requests that
wait while a pass runs: engine/models/batching.py), against one caller sending the same
passages in requests of 32, measured in the same run, alternating. Goal: ratio >= 0.8.
The model is the real all-MiniLM-L6-v2 when its wheel is installed, else the tiny
synthetic embedder (the figures then say little about compute).

    .venv/bin/python bench/concurrency.py [--passages 64] [--callers 8] [--rounds 2] [--words N]

Passages are bench/embeddings.py's (~158 MiniLM tokens); `--words 8` cuts each to its first
words, query-sized texts where the per-pass overhead, not the matmuls, dominates.

`--max-concurrency 1` loads the model admitting one request at a time, which turns the
grouping off: the figure before it.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path

import httpx
from embeddings import BATCH, passages
from harness import fusion_server, machine

import engine.models  # noqa: F401  (chooses the BLAS before MLX loads)
from engine.models.blas import loaded as blas_loaded
from engine.models.minilm import minilm_path
from engine.models.synthetic import build_embedder

MODEL = "embedder"


async def one_caller(client: httpx.AsyncClient, texts: list[str]) -> float:
    start = time.perf_counter()
    for i in range(0, len(texts), BATCH):
        response = await client.post(
            "/v1/embeddings", json={"model": MODEL, "input": texts[i : i + BATCH]}
        )
        response.raise_for_status()
    return len(texts) / (time.perf_counter() - start)


async def many_callers(client: httpx.AsyncClient, texts: list[str], callers: int) -> float:
    queue: asyncio.Queue[str] = asyncio.Queue()
    for text in texts:
        queue.put_nowait(text)

    async def caller() -> None:
        while not queue.empty():
            text = queue.get_nowait()
            response = await client.post("/v1/embeddings", json={"model": MODEL, "input": text})
            response.raise_for_status()

    start = time.perf_counter()
    await asyncio.gather(*(caller() for _ in range(callers)))
    return len(texts) / (time.perf_counter() - start)


async def measure(base: str, texts: list[str], callers: int, rounds: int) -> tuple[float, float]:
    limits = httpx.Limits(max_connections=callers, max_keepalive_connections=callers)
    async with httpx.AsyncClient(base_url=base, timeout=600, limits=limits) as client:
        await one_caller(client, texts[:BATCH])  # first calls compile kernels
        await many_callers(client, texts[:callers], callers)
        many, one = [], []
        for _ in range(rounds):
            many.append(await many_callers(client, texts, callers))
            one.append(await one_caller(client, texts))
    return statistics.median(many), statistics.median(one)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--passages", type=int, default=64)
    parser.add_argument("--callers", type=int, default=8)
    parser.add_argument("--words", type=int, help="cut each passage to its first words")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--max-concurrency", type=int, help="the load's max_concurrency")
    args = parser.parse_args()
    texts = passages(args.passages)
    if args.words:
        texts = [" ".join(text.split()[: args.words]) for text in texts]
    with tempfile.TemporaryDirectory() as tmp:
        path = minilm_path() or build_embedder(Path(tmp) / "tiny-embedder")
        name = "all-MiniLM-L6-v2" if minilm_path() else "tiny synthetic embedder"
        print(f"machine: {machine()}; BLAS: {blas_loaded or 'MLX bundled'}; model: {name}")
        load: dict[str, object] = {"model_path": str(path), "model_type": "embeddings"}
        load["model_id"] = MODEL
        if args.max_concurrency:
            load["max_concurrency"] = args.max_concurrency
        with fusion_server(Path(tmp), [load]) as base:
            many, one = asyncio.run(measure(base, texts, args.callers, args.rounds))
    print(
        f"embeddings, {args.callers} concurrent callers x 1 passage/request: {many:.2f} "
        f"passages/s vs 1 caller x {BATCH} passages/request: {one:.2f} passages/s -> "
        f"ratio {many / one:.2f} (goal >= 0.8)"
    )


if __name__ == "__main__":
    main()
