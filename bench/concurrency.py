"""Serving many callers at once (issue #12): three parts, one entry point.

Run from the repository root (the server finds workflows/ there):

    .venv/bin/python bench/concurrency.py [--part all]     # or parts: --part chat summary
    .venv/bin/python bench/concurrency.py --part chat [--clients 1,8,32] [--tokens 64] [--repeats 1]
        [--requests-per-client 1] [--hidden 512 --layers 8 --head-dim 64]
    .venv/bin/python bench/concurrency.py --part summary [--doc-tokens 8192]
        [--piece-tokens 512] [--summary-tokens 64]
    .venv/bin/python bench/concurrency.py --part embeddings [--passages 64] [--callers 8]
        [--rounds 2] [--words N] [--max-concurrency N]

Chat: aggregate completion tokens/s, p50/p95 time to first token and p50/p95 total latency
of streamed `POST /v1/chat/completions` at each client count, Fusion against
`mlx_lm.server` on the same synthetic qwen2 model (`build_lm`, random weights) in the same
run, both started here with the same BLAS (`import engine.models` before MLX), alternating
per client count. Every request sends the same system prompt and a user message of its own
(requests share a prefix, as a workflow's do, but no whole prompt repeats: a prompt cache
reuses the prefix only); greedy, every EOS id biased by -100 so each
request yields `--tokens`; completion tokens are counted from the stream's usage chunk
(`stream_options.include_usage`, which both servers honour). Time to first token: from
sending to the first SSE chunk with non-empty content. Both servers are warmed (one short
request, then one short request per top-count client) before anything is timed. Goals:
tokens/s >= 0.95x the anchor at 1 client and >= 1.0x above; p95 latency at the top client
count no worse than the anchor's.

Summary: wall time of one `POST /api/fusion/orchestrate` of the predefined
`sequential_summarization` on a synthetic document of about `--doc-tokens` tokens of the
same model, greedy (config temperature 0, so runs repeat), on the same Fusion server. It
has no in-run baseline: compare it before and after a change to the generation path.

Embeddings: passages/s through `POST /v1/embeddings` of a `fusion serve` process, with 8
concurrent callers each sending one passage per request (the server groups requests that
wait while a pass runs: engine/models/batching.py), against one caller sending the same
passages in requests of 32, measured in the same run, alternating. Goal: ratio >= 0.8.
The model is the real all-MiniLM-L6-v2 when its wheel is installed, else the tiny
synthetic embedder (the figures then say little about compute). Passages are
bench/embeddings.py's (~158 MiniLM tokens); `--words 8` cuts each to its first words,
query-sized texts where the per-pass overhead, not the matmuls, dominates.
`--max-concurrency 1` loads the model admitting one request at a time, which turns the
grouping off: the figure before it.

Servers already running (e.g. on another machine, or to watch one under a profiler):
`--fusion-url URL` (with the lm loaded as `--fusion-model`, default `bench`, and its
max_concurrency at least the top client count) and `--anchor-url URL` (an mlx_lm.server);
`--model DIR` names the model they serve (for its EOS ids and tokenizer; by default the
synthetic model built here with the same sizes, whose ids are the same). `--no-anchor`
measures Fusion alone. On the GPU machine (../shared/gpu/README.md) run it with the
carried wheels on PYTHONPATH: it imports only httpx, tokenizers, numpy and the project.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from embeddings import BATCH, passages
from harness import (
    Goal,
    Row,
    add_json_option,
    free_port,
    fusion_server,
    machine,
    server_process,
    write_rows,
)

import engine.models  # noqa: F401  (chooses the BLAS before MLX loads)
from engine.models.blas import loaded as blas_loaded
from engine.models.minilm import minilm_path
from engine.models.synthetic import build_embedder, build_lm

MODEL = "embedder"
LM = "bench"
ANCHOR_MODEL = "default_model"  # mlx_lm.server's name for the model given on its command line
SYSTEM = "You are a helpful assistant. Answer in plain prose and keep every key fact."
WARM_TOKENS = 4
# mlx_lm.server's own entry point, with the BLAS preloaded first as Fusion does it. Its
# ThreadingHTTPServer listens with a backlog of 5: 32 clients connecting at once then get
# connections reset (ReadError) before any generation, so it gets uvicorn's backlog (2048).
ANCHOR_CODE = (
    "import sys, engine.models, http.server; "
    "http.server.ThreadingHTTPServer.request_queue_size = 2048; "
    "from mlx_lm.server import main; sys.argv = ['mlx_lm.server'] + sys.argv[1:]; main()"
)


# -- chat --------------------------------------------------------------------------------------
@dataclass
class Sample:
    tokens: int
    ttft: float
    latency: float


@dataclass
class Round:
    wall: float
    samples: list[Sample] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    @property
    def rate(self) -> float:
        return sum(s.tokens for s in self.samples) / self.wall


def tokens_range(r: Round) -> str:
    counts = [s.tokens for s in r.samples] or [0]
    return f"{min(counts)}" if min(counts) == max(counts) else f"{min(counts)}-{max(counts)}"


def percentile(values: list[float], q: float) -> float:
    """Nearest rank: with few samples an interpolated p95 would invent a latency."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


def eos_ids(model: Path) -> list[int]:
    ids: set[int] = set()
    for name in ("config.json", "generation_config.json"):
        file = model / name
        if file.exists():
            value = json.loads(file.read_text()).get("eos_token_id")
            ids.update(value if isinstance(value, list) else [value] if value is not None else [])
    return sorted(ids)


def chat_body(model: str, caller: str, tokens: int, eos: list[int]) -> dict[str, Any]:
    return {
        "model": model,
        "messages": [
            {"role": "system", "content": SYSTEM},
            {"role": "user", "content": f"Caller {caller}: tell me about unified memory."},
        ],
        "max_tokens": tokens,
        "temperature": 0.0,
        "logit_bias": {str(i): -100 for i in eos},
        "stream": True,
        "stream_options": {"include_usage": True},
    }


async def sse_data(response: httpx.Response) -> AsyncIterator[str]:
    """The data fields of an event stream, cut at its own line ends only: httpx's line
    splitting also cuts at U+2028 and its kin, which a JSON string may hold raw."""
    buffer = ""
    async for text in response.aiter_text():
        *lines, buffer = (buffer + text).split("\n")
        for line in lines:
            if line.startswith("data: "):
                yield line[len("data: ") :].rstrip("\r")


async def streamed(client: httpx.AsyncClient, body: dict[str, Any]) -> Sample:
    start = time.perf_counter()
    ttft: float | None = None
    tokens: int | None = None
    async with client.stream("POST", "/v1/chat/completions", json=body) as response:
        if response.status_code != 200:
            await response.aread()
            raise RuntimeError(f"{response.status_code}: {response.text[:300]}")
        async for data in sse_data(response):
            if data == "[DONE]":
                continue
            chunk = json.loads(data)
            if "error" in chunk:
                raise RuntimeError(f"stream error: {json.dumps(chunk)[:300]}")
            choices = chunk.get("choices") or []
            if ttft is None and choices and (choices[0].get("delta") or {}).get("content"):
                ttft = time.perf_counter() - start
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    latency = time.perf_counter() - start
    if tokens is None:
        raise RuntimeError("the stream carried no usage chunk (stream_options.include_usage)")
    # A stream whose every chunk is empty text (bytes of an unfinished character) gave its
    # first content when it ended.
    return Sample(tokens, latency if ttft is None else ttft, latency)


async def chat_round(
    client: httpx.AsyncClient,
    label: str,
    model: str,
    clients: int,
    per_client: int,
    tokens: int,
    eos: list[int],
) -> Round:
    result = Round(wall=0.0)

    async def caller(index: int) -> None:
        for request in range(per_client):
            try:
                body = chat_body(model, f"{label}.{index}.{request}", tokens, eos)
                result.samples.append(await streamed(client, body))
            except (httpx.HTTPError, RuntimeError) as exc:
                result.errors.append(f"{type(exc).__name__}: {exc}"[:300])

    start = time.perf_counter()
    await asyncio.gather(*(caller(i) for i in range(clients)))
    result.wall = time.perf_counter() - start
    return result


def async_client(base: str, connections: int) -> httpx.AsyncClient:
    limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
    return httpx.AsyncClient(base_url=base, timeout=1800, limits=limits)


async def warm(base: str, model: str, clients: int, eos: list[int]) -> None:
    """Compile the kernels and size the caches: one request alone, then one batch."""
    async with async_client(base, clients) as client:
        await streamed(client, chat_body(model, "warm", WARM_TOKENS, eos))
        warm_round = await chat_round(client, "warm", model, clients, 1, WARM_TOKENS, eos)
    if warm_round.errors:
        raise RuntimeError(f"warm-up failed at {base}: {warm_round.errors[0]}")


async def measure_chat(
    servers: dict[str, tuple[str, str]], args: argparse.Namespace, eos: list[int]
) -> dict[tuple[str, int], Round]:
    top = max(args.clients)
    for base, model in servers.values():
        await warm(base, model, top, eos)
    runs: dict[tuple[str, int], list[Round]] = {}
    for n in args.clients:
        for repeat in range(args.repeats):
            for name, (base, model) in servers.items():
                async with async_client(base, n) as client:
                    r = await chat_round(
                        client,
                        f"n{n}.{repeat}",
                        model,
                        n,
                        args.requests_per_client,
                        args.tokens,
                        eos,
                    )
                runs.setdefault((name, n), []).append(r)
                print(
                    f"  {name} at {n} clients: {r.rate:.1f} tok/s over {r.wall:.1f} s, "
                    f"{len(r.samples)} requests of {tokens_range(r)} tokens, "
                    f"{len(r.errors)} errors",
                    flush=True,
                )
                for error in r.errors[:3]:
                    print(f"    error: {error}")
    # Each figure from the round of median throughput (repeats alternate the servers).
    return {key: sorted(rs, key=lambda r: r.rate)[len(rs) // 2] for key, rs in runs.items()}


FIGURES = ("tok/s", "TTFT p50 s", "TTFT p95 s", "latency p50 s", "latency p95 s")


def figures(r: Round) -> dict[str, float]:
    if not r.samples:
        return {}
    ttft = [s.ttft for s in r.samples]
    latency = [s.latency for s in r.samples]
    values = (
        r.rate,
        percentile(ttft, 0.5),
        percentile(ttft, 0.95),
        percentile(latency, 0.5),
        percentile(latency, 0.95),
    )
    return dict(zip(FIGURES, values, strict=True))


def goal(figure: str, clients: int, top: int) -> tuple[str, float] | None:
    """Issue #12's goals, as (comparison, bound) on the ratio Fusion / mlx_lm.server."""
    if figure == "tok/s":
        return (">=", 0.95 if clients == 1 else 1.0)
    if figure == "latency p95 s" and clients == top:
        return ("<=", 1.0)
    return None


def chat_table(rounds: dict[tuple[str, int], Round], clients: list[int]) -> None:
    print(f"{'figure':<22}{'Fusion':>10}{'mlx_lm.server':>15}{'ratio':>8}  goal")
    for n in clients:
        fusion = figures(rounds["fusion", n])
        anchor = figures(rounds["mlx_lm", n]) if ("mlx_lm", n) in rounds else {}
        for figure in FIGURES:
            digits = 1 if figure == "tok/s" else 3
            ours, theirs = fusion.get(figure), anchor.get(figure)
            ratio = ours / theirs if ours is not None and theirs else None
            target = goal(figure, n, max(clients))
            verdict = ""
            if target and theirs is not None:
                op, bound = target
                met = ratio is not None and (ratio >= bound if op == ">=" else ratio <= bound)
                verdict = f"{op} {bound}x {'met' if met else 'MISSED'}"
            print(
                f"{figure + ' @ ' + str(n):<22}"
                f"{'-' if ours is None else f'{ours:.{digits}f}':>10}"
                f"{'-' if theirs is None else f'{theirs:.{digits}f}':>15}"
                f"{'-' if ratio is None else f'{ratio:.2f}x':>8}  {verdict}"
            )


def chat_rows(rounds: dict[tuple[str, int], Round], clients: list[int], tokens: int) -> list[Row]:
    """The table's ratios as rows: tok/s at each client count, p95 latency at the top one."""
    rows = []
    for n in clients:
        fusion = figures(rounds["fusion", n])
        anchor = figures(rounds["mlx_lm", n]) if ("mlx_lm", n) in rounds else {}
        for figure in FIGURES:
            target = goal(figure, n, max(clients))
            if target is None:
                continue
            rows.append(
                Row(
                    "concurrency",
                    f"chat {figure} @ {n} clients, {tokens} tokens each",
                    fusion.get(figure),
                    figure.split()[-1],
                    anchor.get(figure),
                    "mlx_lm.server",
                    Goal(*target),
                )
            )
    return rows


@contextmanager
def anchor_server(model: Path, log_dir: Path) -> Iterator[str]:
    """`mlx_lm.server` on `model` in a subprocess; yields its base URL."""
    port = free_port()
    command = [sys.executable, "-c", ANCHOR_CODE, "--model", str(model), "--port", str(port)]
    with server_process(command, port, log_dir / "mlx_lm_server.log") as base:
        yield base


# -- summary -----------------------------------------------------------------------------------
def document(model: Path, tokens: int) -> tuple[str, int]:
    """Sentences that differ (so no two pieces are alike) up to about `tokens` tokens."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(model / "tokenizer.json"))

    def text(count: int) -> str:
        return " ".join(
            f"Section {i} records that the harbour handled {i * 7} ships in spring, "
            f"and {i * 3 % 11} of them carried grain to the northern towns."
            for i in range(count)
        )

    sample = 50
    per_sentence = len(tokenizer.encode(text(sample)).ids) / sample
    body = text(math.ceil(tokens / per_sentence))
    return body, len(tokenizer.encode(body).ids)


def summarise(base: str, model: str, path: Path, args: argparse.Namespace) -> Row:
    body, count = document(path, args.doc_tokens)
    request = {
        "workflow": "sequential_summarization",
        "input": {"document": body, "max_summary_length": args.summary_tokens},
        "models": {"generation": model},
        "config": {"temperature": 0, "piece_tokens": args.piece_tokens},
    }
    with httpx.Client(base_url=base, timeout=3600) as client:
        start = time.perf_counter()
        response = client.post("/api/fusion/orchestrate", json=request)
        wall = time.perf_counter() - start
    response.raise_for_status()
    run = response.json()
    if run["status"] != "completed":
        raise RuntimeError(f"summarisation {run['status']}: {run.get('error')}")
    passes = next(s for s in run["execution_trace"] if s["step"] == "passes")
    print(
        f"sequential_summarization of a {count}-token document (pieces of {args.piece_tokens}, "
        f"summary <= {args.summary_tokens} tokens, greedy): {wall:.2f} s wall, "
        f"{run['result']['passes']} passes, summary {run['result']['summary_tokens']} tokens, "
        f"step 'passes' {passes['duration_ms'] / 1000:.2f} s (no in-run baseline: compare "
        "before/after the change)"
    )
    return Row(
        "concurrency",
        f"sequential_summarization of {count} tokens, wall time (no in-run baseline)",
        wall,
        "s",
    )


def chat_and_summary(args: argparse.Namespace) -> list[Row]:
    top = max(args.clients)
    rows: list[Row] = []
    with tempfile.TemporaryDirectory() as tmp, ExitStack() as stack:
        path = args.model or build_lm(
            Path(tmp) / "lm", hidden=args.hidden, layers=args.layers, head_dim=args.head_dim
        )
        config = json.loads((path / "config.json").read_text())
        eos = eos_ids(path)
        print(
            f"machine: {machine()}; BLAS: {blas_loaded or 'MLX bundled'}; model: {path.name} "
            f"hidden {config['hidden_size']} x {config['num_hidden_layers']} layers, "
            f"heads {config['num_attention_heads']}/{config['num_key_value_heads']}, "
            f"EOS ids {eos} biased away",
            flush=True,
        )
        fusion = args.fusion_url
        if fusion is None:
            load = {"model_path": str(path), "model_type": "lm", "model_id": args.fusion_model}
            load["max_concurrency"] = top
            fusion = stack.enter_context(fusion_server(Path(tmp), [load]))
        if "chat" in args.parts:
            servers = {"fusion": (fusion, args.fusion_model)}
            if not args.no_anchor:
                anchor = args.anchor_url or stack.enter_context(anchor_server(path, Path(tmp)))
                servers["mlx_lm"] = (anchor, ANCHOR_MODEL)
            rounds = asyncio.run(measure_chat(servers, args, eos))
            print(
                f"chat, streamed, greedy, {args.tokens} tokens/request, "
                f"{args.requests_per_client} request(s)/client:"
            )
            chat_table(rounds, args.clients)
            rows += chat_rows(rounds, args.clients, args.tokens)
        if "summary" in args.parts:
            if "chat" not in args.parts:
                asyncio.run(warm(fusion, args.fusion_model, 1, eos))
            rows.append(summarise(fusion, args.fusion_model, path, args))
    return rows


# -- embeddings --------------------------------------------------------------------------------
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


async def measure_embeddings(
    base: str, texts: list[str], callers: int, rounds: int
) -> tuple[float, float]:
    async with async_client(base, callers) as client:
        await one_caller(client, texts[:BATCH])  # first calls compile kernels
        await many_callers(client, texts[:callers], callers)
        many, one = [], []
        for _ in range(rounds):
            many.append(await many_callers(client, texts, callers))
            one.append(await one_caller(client, texts))
    return statistics.median(many), statistics.median(one)


def embeddings_part(args: argparse.Namespace) -> Row:
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
            many, one = asyncio.run(measure_embeddings(base, texts, args.callers, args.rounds))
    print(
        f"embeddings, {args.callers} concurrent callers x 1 passage/request: {many:.2f} "
        f"passages/s vs 1 caller x {BATCH} passages/request: {one:.2f} passages/s -> "
        f"ratio {many / one:.2f} (goal >= 0.8)"
    )
    words = f", {args.words}-word texts" if args.words else ""
    return Row(
        "concurrency",
        f"embeddings, {args.callers} callers x 1 passage{words} ({name})",
        many,
        "passages/s",
        one,
        f"1 caller x {BATCH} passages",
        Goal(">=", 0.8),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--part", nargs="+", choices=["chat", "summary", "embeddings", "all"], default=["all"]
    )
    chat = parser.add_argument_group("chat and summary")
    chat.add_argument("--clients", default="1,8,32", help="client counts, comma-separated")
    chat.add_argument("--tokens", type=int, default=64, help="completion tokens per request")
    chat.add_argument("--requests-per-client", type=int, default=1)
    chat.add_argument(
        "--repeats", type=int, default=1, help="rounds per client count; the median is kept"
    )
    chat.add_argument("--hidden", type=int, default=512)
    chat.add_argument("--layers", type=int, default=8)
    chat.add_argument("--head-dim", type=int, default=64)
    chat.add_argument("--model", type=Path, help="an lm directory instead of a synthetic one")
    chat.add_argument("--fusion-url", help="a running Fusion server instead of starting one")
    chat.add_argument("--fusion-model", default=LM, help="the lm's model id on that server")
    chat.add_argument("--anchor-url", help="a running mlx_lm.server instead of starting one")
    chat.add_argument("--no-anchor", action="store_true", help="measure Fusion alone")
    chat.add_argument("--doc-tokens", type=int, default=8192)
    chat.add_argument("--piece-tokens", type=int, default=512)
    chat.add_argument("--summary-tokens", type=int, default=64)
    embed = parser.add_argument_group("embeddings")
    embed.add_argument("--passages", type=int, default=64)
    embed.add_argument("--callers", type=int, default=8)
    embed.add_argument("--words", type=int, help="cut each passage to its first words")
    embed.add_argument("--rounds", type=int, default=2)
    embed.add_argument("--max-concurrency", type=int, help="the embedder load's max_concurrency")
    add_json_option(parser)
    args = parser.parse_args()
    args.clients = [int(n) for n in args.clients.split(",")]
    args.parts = {"chat", "summary", "embeddings"} if "all" in args.part else set(args.part)
    # mlx_lm.server inherits it: a local model must not send it looking at the hub.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    rows: list[Row] = []
    if args.parts & {"chat", "summary"}:
        rows += chat_and_summary(args)
    if "embeddings" in args.parts:
        rows.append(embeddings_part(args))
    write_rows(args.json, rows)


if __name__ == "__main__":
    main()
