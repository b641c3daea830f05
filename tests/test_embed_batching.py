"""Embedding requests that arrive together share forward passes (issue #12): the real tiny
embedder (and the real MiniLM when installed) through the registry and its worker thread.

To make requests "arrive together" deterministically, the test holds the one MLX worker
thread with a gate (as another model's long generation would): the first request's pass
queues behind it, the rest wait for the next pass; opening the gate lets both run. Waiting
for state polls with a bound; nothing asserts on time.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from api_helpers import load, running_server
from polling import until

from engine.config import Settings
from engine.errors import ErrorCode, QueueFull, ServiceUnavailable
from engine.models.backends import default_backends
from engine.models.backends.base import EmbedResult
from engine.models.batching import Batcher
from engine.models.registry import ModelRegistry
from engine.models.types import BatchPolicy, LoadSpec
from engine.services import Engine

BOUND_S = 30.0
TEXTS = [
    ["alpha"],
    ["bravo charlie", "delta"],
    ["echo foxtrot golf hotel india", "juliett", "kilo lima"],
    ["mike"],
    ["november oscar papa quebec romeo sierra tango uniform victor whiskey"],
    ["x-ray", "yankee zulu"],
]


@pytest.fixture
async def make_registry() -> AsyncIterator[Callable[..., Awaitable[ModelRegistry]]]:
    made: list[ModelRegistry] = []

    async def make(path: Path, **kwargs: object) -> ModelRegistry:
        policy = BatchPolicy.from_settings(Settings())
        bound = kwargs.pop("embed_batch_max_texts", None)
        if bound is not None:
            policy = replace(policy, embed_max_texts=bound)  # type: ignore[arg-type]
        registry = ModelRegistry(
            default_backends(Settings()), budget_bytes=1 << 34, batching=policy
        )
        made.append(registry)
        await registry.load(LoadSpec(str(path), "embeddings", model_id="e", **kwargs))  # type: ignore[arg-type]
        return registry

    yield make
    for registry in made:
        await asyncio.wait_for(registry.close(), BOUND_S)


@contextmanager
def held_worker(registry: ModelRegistry) -> Iterator[threading.Event]:
    """Holds the MLX worker thread until the yielded gate is set (always set on exit)."""
    gate = threading.Event()
    held = asyncio.ensure_future(registry.worker.call(gate.wait, BOUND_S))
    try:
        yield gate
    finally:
        gate.set()
        del held


def batcher(registry: ModelRegistry) -> Batcher[list[str], EmbedResult]:
    made = registry.get("e").embed_batcher
    assert made is not None
    return made


async def solo(registry: ModelRegistry, texts: Sequence[str]) -> EmbedResult:
    return await registry.embed("e", list(texts))


def assert_same(got: EmbedResult, alone: EmbedResult) -> None:
    assert len(got.vectors) == len(alone.vectors)
    for a, b in zip(got.vectors, alone.vectors, strict=True):
        assert np.allclose(a, b, rtol=1e-4, atol=1e-5)
    assert got.truncated == alone.truncated
    assert got.prompt_tokens == alone.prompt_tokens


async def queue_behind_a_pass(
    registry: ModelRegistry, requests: Sequence[Sequence[str]]
) -> tuple[asyncio.Future[EmbedResult], list[asyncio.Future[EmbedResult]]]:
    """With the worker held: an opening request whose pass is cut and queued on the
    worker, then ``requests``, all waiting for the next pass."""
    made = registry.get("e").embed_batcher
    passes = made.stats.passes if made else 0
    first = asyncio.ensure_future(registry.embed("e", ["opening"]))
    await until(
        lambda: (
            registry.get("e").embed_batcher is not None
            and batcher(registry).stats.passes == passes + 1
        ),
        "the opening pass was cut",
    )
    rest = [asyncio.ensure_future(registry.embed("e", list(t))) for t in requests]
    await until(lambda: batcher(registry).waiting == len(rest), "the rest queued")
    return first, rest


@pytest.fixture
async def embedder(
    make_registry: Callable[..., Awaitable[ModelRegistry]], tiny_embedder_dir: Path
) -> ModelRegistry:
    return await make_registry(tiny_embedder_dir)


async def test_requests_waiting_together_share_one_pass(embedder: ModelRegistry) -> None:
    alone = [await solo(embedder, texts) for texts in TEXTS]
    stats = batcher(embedder).stats
    assert stats.passes == len(TEXTS)  # one after another: one pass each, nothing waited
    with held_worker(embedder) as gate:
        first, rest = await queue_behind_a_pass(embedder, TEXTS)
        # All admitted at once: an embeddings model admits a full pass of requests.
        assert embedder.get("e").slots.active == len(TEXTS) + 1
        gate.set()
        await first
        results = await asyncio.gather(*rest)
    assert stats.passes == len(TEXTS) + 2
    assert stats.largest == sum(len(t) for t in TEXTS)
    for got, want in zip(results, alone, strict=True):
        assert_same(got, want)
    entry = embedder.get("e")
    assert entry.stats.request_count == 2 * len(TEXTS) + 1  # counted per request
    assert (
        entry.stats.total_tokens
        == 2 * sum(r.prompt_tokens for r in alone)
        + (await solo(embedder, ["opening"])).prompt_tokens
    )
    assert entry.slots.concurrency == Settings().model_embed_batch_max_texts


async def test_a_pass_never_exceeds_the_bound(
    make_registry: Callable[..., Awaitable[ModelRegistry]], tiny_embedder_dir: Path
) -> None:
    registry = await make_registry(tiny_embedder_dir, embed_batch_max_texts=4, max_concurrency=16)
    requests = [*TEXTS, ["one", "two", "three", "four", "five", "six"]]
    alone = [await solo(registry, texts) for texts in requests]
    stats = batcher(registry).stats
    assert stats.largest == 6  # larger than the bound: it went alone, whole
    stats.largest = 0
    with held_worker(registry) as gate:
        first, rest = await queue_behind_a_pass(registry, requests[:-1])
        passes = stats.passes
        gate.set()
        await first
        results = await asyncio.gather(*rest)
    assert stats.largest <= 4
    total = sum(len(t) for t in requests[:-1])
    assert -(-total // 4) <= stats.passes - passes < len(rest)  # grouped, within the bound
    for got, want in zip(results, alone[:-1], strict=True):
        assert_same(got, want)


async def test_a_cancelled_caller_does_not_disturb_the_others(embedder: ModelRegistry) -> None:
    alone = [await solo(embedder, texts) for texts in TEXTS]
    stats = batcher(embedder).stats
    with held_worker(embedder) as gate:
        first, rest = await queue_behind_a_pass(embedder, TEXTS)
        units = stats.units
        rest[1].cancel()  # waiting for the next pass: its texts are dropped
        first.cancel()  # its pass is queued on the worker: the pass is abandoned
        await until(lambda: batcher(embedder).waiting == len(rest) - 1, "dropped")
        gate.set()
        with pytest.raises(asyncio.CancelledError):
            await first
        with pytest.raises(asyncio.CancelledError):
            await rest[1]
        results = await asyncio.gather(rest[0], *rest[2:])
    for got, want in zip(results, [alone[0], *alone[2:]], strict=True):
        assert_same(got, want)
    assert stats.units - units == sum(len(t) for i, t in enumerate(TEXTS) if i != 1)
    assert embedder.get("e").slots.active == 0


async def test_one_failing_request_fails_alone(embedder: ModelRegistry) -> None:
    """An error raised by one request's texts inside a shared pass (here the tokenizer
    refusing a non-string, as a buggy internal caller could send) fails that request only:
    the pass is run again one request at a time."""
    alone = [await solo(embedder, texts) for texts in TEXTS[:3]]
    bad: list[str] = [123]  # type: ignore[list-item]
    with held_worker(embedder) as gate:
        first, rest = await queue_behind_a_pass(embedder, [TEXTS[0], TEXTS[1], bad, TEXTS[2]])
        gate.set()
        await first
        outcomes = await asyncio.gather(*rest, return_exceptions=True)
    assert isinstance(outcomes[2], ValueError | TypeError)  # the tokenizer's, alone or not
    results = [outcomes[0], outcomes[1], outcomes[3]]
    for got, want in zip(results, alone, strict=True):
        assert isinstance(got, EmbedResult)
        assert_same(got, want)
    assert embedder.get("e").stats.error_count == 1


async def test_forced_unload_mid_group_answers_503_to_all(embedder: ModelRegistry) -> None:
    with held_worker(embedder) as gate:
        first, rest = await queue_behind_a_pass(embedder, TEXTS)
        unload = asyncio.ensure_future(embedder.unload("e", force=True))
        await until(lambda: embedder.find("e") is None, "unloading began")
        gate.set()
        outcomes = await asyncio.gather(first, *rest, return_exceptions=True)
        await asyncio.wait_for(unload, BOUND_S)
    for outcome in outcomes:
        assert isinstance(outcome, ServiceUnavailable), outcome
        assert outcome.code == ErrorCode.MODEL_UNLOADED


async def test_the_queue_bound_still_applies(
    make_registry: Callable[..., Awaitable[ModelRegistry]], tiny_embedder_dir: Path
) -> None:
    """Admission is per request as before: past max_concurrency requests queue, and past
    max_queue they are refused (429); those admitted share passes."""
    registry = await make_registry(tiny_embedder_dir, max_concurrency=2, max_queue=1)
    alone = [await solo(registry, texts) for texts in TEXTS[:2]]
    with held_worker(registry) as gate:
        first, rest = await queue_behind_a_pass(registry, TEXTS[:1])
        third = asyncio.ensure_future(registry.embed("e", TEXTS[1]))
        await until(lambda: registry.get("e").slots.waiting == 1, "third waits for a slot")
        with pytest.raises(QueueFull):
            await registry.embed("e", ["refused"])
        gate.set()
        await first
        results = await asyncio.gather(*rest, third)
    for got, want in zip(results, alone, strict=True):
        assert_same(got, want)


async def test_minilm_grouped_vectors_match_solo(
    make_registry: Callable[..., Awaitable[ModelRegistry]], minilm_dir: Path
) -> None:
    registry = await make_registry(minilm_dir)
    requests = [["a short query"], ["a longer passage about lazy arrays and unified memory"]]
    requests += [[f"passage number {i} on machine learning"] for i in range(4)]
    alone = [await solo(registry, texts) for texts in requests]
    stats = batcher(registry).stats
    with held_worker(registry) as gate:
        first, rest = await queue_behind_a_pass(registry, requests)
        passes = stats.passes
        gate.set()
        await first
        results = await asyncio.gather(*rest)
    assert stats.passes == passes + 1
    for got, want in zip(results, alone, strict=True):
        assert_same(got, want)


def test_concurrent_http_callers_get_their_own_vectors(
    tmp_path: Path, tiny_embedder_dir: Path
) -> None:
    """Eight callers at once through POST /v1/embeddings (however the server groups them):
    each answer is the one its input gets alone, in order, with its own usage."""

    def post(client: httpx.Client, texts: list[str]) -> dict[str, Any]:
        response = client.post("/v1/embeddings", json={"model": "e", "input": texts})
        assert response.status_code == 200, response.text
        body: dict[str, Any] = response.json()
        return body

    requests = [*TEXTS, ["one more"], ["and", "the", "last"]]
    with running_server(tmp_path) as client:
        load(client, tiny_embedder_dir, "embeddings", model_id="e")
        alone = [post(client, t) for t in requests]
        with ThreadPoolExecutor(len(requests)) as pool:
            together = list(pool.map(lambda t: post(client, t), requests * 3))
    for got, want in zip(together, alone * 3, strict=True):
        assert got["usage"] == want["usage"]
        assert [d["index"] for d in got["data"]] == [d["index"] for d in want["data"]]
        for g, w in zip(got["data"], want["data"], strict=True):
            assert np.allclose(g["embedding"], w["embedding"], rtol=1e-4, atol=1e-5)


async def test_the_batch_bound_is_a_setting(tmp_path: Path, tiny_embedder_dir: Path) -> None:
    model = {"model_path": str(tiny_embedder_dir), "model_type": "embeddings", "model_id": "e"}
    settings = Settings(
        data_dir=tmp_path, startup_models=[model], model_embed_batch_max_texts=5, jobs_enabled=False
    )
    engine = await Engine.start(settings, load_workflows=False)
    try:
        assert engine.models.batching.embed_max_texts == 5
        assert engine.models.get("e").slots.concurrency == 5  # a full pass is admitted at once
    finally:
        await engine.stop()
