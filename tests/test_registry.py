"""The model registry with real tiny models loaded through the real loaders: loading,
measured memory, the budget and eviction, admission (concurrency, queue), unloading and
cancellation, and statistics.

The only test doubles are subclasses of the real lm backend, model and decode batch that
count loads and generations (and, for one test, fail on purpose); every model runs through
MLX on the registry's worker thread. Waiting for state is bounded: events, ``asyncio.wait_for`` and
short polling loops under ``asyncio.timeout``.
"""

from __future__ import annotations

import asyncio
import gc
import re
import shutil
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import mlx.core as mx
import pytest
from polling import until

from engine.config import Settings
from engine.errors import (
    Conflict,
    InsufficientMemory,
    InvalidRequest,
    NotFound,
    QueueFull,
    ServiceUnavailable,
)
from engine.models.backends import default_backends
from engine.models.backends.base import ChatChunk, ChatParams, weight_file_bytes
from engine.models.backends.batch_decode import DecodeBatch
from engine.models.backends.mlx_lm_backend import LmModel, MlxLmBackend
from engine.models.decoding import Event, Generation
from engine.models.registry import ModelRegistry
from engine.models.types import BatchPolicy, LoadSpec, ModelLimits

MESSAGES = [{"role": "user", "content": "hello there"}]
BOUND = 15.0  # seconds: an upper bound on any wait here, far above the expected time
LONG = 2000  # max_tokens for a generation that must still be running when we act on it


# --- test doubles: the real backend, counted ------------------------------------------------


class Run:
    """One request's generation in the batch: chunks it produced, and whether it ended
    (left the batch)."""

    def __init__(self) -> None:
        self.chunks = 0
        self.last: ChatChunk | None = None
        self.ended = threading.Event()


class CountingBatch(DecodeBatch):
    """The real decode batch; records each request it admits and what it delivered."""

    generations: list[Run]
    runs: dict[int, Run]
    fail_after: int | None = None  # raise after this many chunks (an inference failure)
    most = 0  # the most sequences seen in the batch when a step delivered

    def run(
        self,
        incoming: Sequence[Generation],
        deliver: Callable[[list[Event]], None],
        budget_s: float,
    ) -> bool:
        for seq in incoming:
            if not seq.stop.is_set():  # one cancelled while queued never starts
                self.runs[id(seq)] = run = Run()
                self.generations.append(run)

        def counted(events: list[Event]) -> None:
            self.most = max(self.most, self.in_batch())
            for seq, item in events:
                run = self.runs.get(id(seq))
                if run is None or not isinstance(item, ChatChunk):
                    continue
                if self.fail_after is not None and run.chunks >= self.fail_after:
                    raise RuntimeError("inference exploded")
                run.chunks += 1
                run.last = item
                if item.finish_reason is not None:
                    run.ended.set()
            deliver(events)

        return super().run(incoming, counted, budget_s)


class CountingLmModel(LmModel):
    generations: list[Run]

    def start_batching(self, max_batch: int, cache_bytes: int, park_backlog: int) -> DecodeBatch:
        batch = super().start_batching(max_batch, cache_bytes, park_backlog)
        batch.__class__ = CountingBatch  # same object, counted run
        assert isinstance(batch, CountingBatch)
        batch.generations, batch.runs = self.generations, {}
        return batch


class CountingLmBackend(MlxLmBackend):
    """The real mlx-lm backend; counts loads and records every generation."""

    def __init__(self) -> None:
        self.loads = 0
        self.generations: list[Run] = []

    def load(self, path: Path, context_length: int | None) -> LmModel:
        self.loads += 1
        model = super().load(path, context_length)
        model.__class__ = CountingLmModel  # same object, counted chat_stream
        assert isinstance(model, CountingLmModel)
        model.generations = self.generations
        return model


# --- fixtures and helpers -------------------------------------------------------------------


@pytest.fixture
def counting() -> CountingLmBackend:
    return CountingLmBackend()


@pytest.fixture
async def make_registry(
    counting: CountingLmBackend,
) -> AsyncIterator[Callable[..., ModelRegistry]]:
    made: list[ModelRegistry] = []

    def make(budget_bytes: int = 1 << 34, **kwargs: Any) -> ModelRegistry:
        backends = default_backends(Settings())
        backends["lm"] = counting
        registry = ModelRegistry(backends, budget_bytes=budget_bytes, **kwargs)
        made.append(registry)
        return registry

    yield make
    for registry in made:
        try:
            await asyncio.wait_for(registry.close(), BOUND)
        except TimeoutError:  # a failed test left a slot held: do not hang the session
            registry.worker._executor.shutdown(wait=False, cancel_futures=True)


@pytest.fixture
def registry(make_registry: Callable[..., ModelRegistry]) -> ModelRegistry:
    return make_registry()


@pytest.fixture
def lm_path(tiny_lm_dir: Path) -> str:
    return str(tiny_lm_dir)


@pytest.fixture
def lm_bytes(tiny_lm_dir: Path) -> int:
    """The registry's size estimate for one tiny LM before loading it."""
    return weight_file_bytes(tiny_lm_dir)


def no_eos(registry: ModelRegistry, model_id: str) -> dict[int, float]:
    tokenizer = registry.get(model_id).model.tokenizer  # type: ignore[attr-defined]
    return {int(t): -1e9 for t in tokenizer.eos_token_ids}


def params(registry: ModelRegistry, model_id: str, max_tokens: int = 4, **kw: Any) -> ChatParams:
    return ChatParams(
        max_tokens=max_tokens, temperature=0, logit_bias=no_eos(registry, model_id), **kw
    )


async def bounded(awaitable: Awaitable[Any]) -> Any:
    return await asyncio.wait_for(awaitable, BOUND)


def resolved(path: str | Path) -> Path:
    return Path(path).resolve()


async def hold(registry: ModelRegistry, model_id: str, max_tokens: int = 6) -> AsyncIterator[Any]:
    """Start a chat stream and take its first chunk: the request holds a slot until the
    returned stream is drained or closed."""
    stream = registry.chat_stream(model_id, MESSAGES, params(registry, model_id, max_tokens))
    first = await bounded(anext(stream))
    assert first.text or first.finish_reason
    return stream


def loaded(registry: ModelRegistry) -> set[str]:
    return {e.id for e in registry.entries()}


def active_memory() -> int:
    gc.collect()
    return int(mx.get_active_memory())


# --- loading -----------------------------------------------------------------------------------


async def test_load_measures_memory_and_time(registry: ModelRegistry, lm_path: str) -> None:
    before = active_memory()
    entry = await registry.load(LoadSpec(lm_path, "lm", model_id="m"))
    grew = active_memory() - before
    weights = entry.model.weight_bytes
    assert weights > 100_000
    assert entry.memory_bytes > 0
    assert abs(entry.memory_bytes - weights) <= 0.02 * weights
    assert abs(grew - entry.memory_bytes) <= 0.05 * weights
    assert entry.load_time_ms > 0
    assert entry.path == resolved(lm_path)
    assert registry.used_bytes() == entry.memory_bytes
    assert entry.model.family == "qwen2"
    assert entry.model.context_length == 2048
    assert not entry.warmup_completed
    assert registry.get("m") is entry


async def test_load_generates_the_id_from_the_directory_name(
    registry: ModelRegistry, tiny_lm_dir: Path
) -> None:
    entry = await registry.load(LoadSpec(str(tiny_lm_dir) + "/", "lm"))
    assert entry.id == tiny_lm_dir.name == "lm"
    assert registry.get("lm") is entry


async def test_load_duplicate_id_conflicts(
    registry: ModelRegistry, counting: CountingLmBackend, lm_path: str
) -> None:
    await registry.load(LoadSpec(lm_path, "lm", model_id="m"))
    with pytest.raises(Conflict) as info:
        await registry.load(LoadSpec(lm_path, "lm", model_id="m"))
    assert info.value.code == "model_already_loaded"
    assert info.value.status == 409
    assert counting.loads == 1


async def test_concurrent_loads_of_one_model_load_it_once(
    registry: ModelRegistry, counting: CountingLmBackend, lm_path: str
) -> None:
    spec = LoadSpec(lm_path, "lm", model_id="m")
    first, second, third = await bounded(
        asyncio.gather(registry.load(spec), registry.load(spec), registry.load(spec))
    )
    assert first is second is third
    assert counting.loads == 1
    assert loaded(registry) == {"m"}
    assert registry.used_bytes() == first.memory_bytes


async def test_concurrent_load_of_one_id_from_another_path_conflicts(
    registry: ModelRegistry, counting: CountingLmBackend, tiny_lm_dir: Path, tmp_path: Path
) -> None:
    other = tmp_path / "other-lm"
    shutil.copytree(tiny_lm_dir, other)
    results = await bounded(
        asyncio.gather(
            registry.load(LoadSpec(str(tiny_lm_dir), "lm", model_id="m")),
            registry.load(LoadSpec(str(other), "lm", model_id="m")),
            return_exceptions=True,
        )
    )
    assert results[0].id == "m"
    assert isinstance(results[1], Conflict)
    assert counting.loads == 1
    assert registry.get("m").path == resolved(tiny_lm_dir)


async def test_load_refuses_an_unknown_model_type(registry: ModelRegistry, lm_path: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        await registry.load(LoadSpec(lm_path, "banana"))
    assert info.value.code == "invalid_model_type"
    assert info.value.param == "model_type"


async def test_load_refuses_a_directory_without_config(
    registry: ModelRegistry, counting: CountingLmBackend, lm_path: str, tmp_path: Path
) -> None:
    (tmp_path / "weights.safetensors").write_bytes(b"not a model")
    with pytest.raises(InvalidRequest) as info:
        await registry.load(LoadSpec(str(tmp_path), "lm", model_id="m"))
    assert info.value.code == "invalid_model_path"
    with pytest.raises(InvalidRequest) as info:
        await registry.load(LoadSpec(str(tmp_path / "missing" / "dir"), "lm", model_id="m"))
    assert info.value.code == "invalid_model_path"
    assert counting.loads == 0
    # A failed load leaves nothing behind: the id loads fine afterwards.
    entry = await registry.load(LoadSpec(lm_path, "lm", model_id="m"))
    assert entry.id == "m"


@pytest.mark.parametrize("probe", [False, True], ids=["hf-offline-env", "network-probe"])
async def test_load_by_hub_id_fails_fast_offline(
    registry: ModelRegistry, monkeypatch: pytest.MonkeyPatch, probe: bool
) -> None:
    if probe:  # no offline flag: the registry must find out by itself, quickly
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    # Fast by mechanism: this code is only answered when the hub was found unreachable
    # before any download was tried; wait_for is a hang guard.
    with pytest.raises(InvalidRequest) as info:
        await asyncio.wait_for(registry.load(LoadSpec("someone/some-model", "lm")), 60.0)
    assert info.value.code == "model_unavailable_offline"
    assert "someone/some-model" in info.value.message


@pytest.mark.parametrize("model_type", ["image-generation", "image-edit"])
async def test_load_without_a_backend_package_names_the_package(
    registry: ModelRegistry, lm_path: str, model_type: str
) -> None:
    with pytest.raises(InvalidRequest) as info:
        await registry.load(LoadSpec(lm_path, model_type))
    assert info.value.code == "backend_unavailable"
    assert model_type in info.value.message
    named = re.search(r"'([^']+)' package", info.value.message)
    assert named, info.value.message
    assert re.fullmatch(r"[a-z0-9][a-z0-9._-]*", named.group(1)), named.group(1)


# --- memory budget and eviction ---------------------------------------------------------------


@pytest.fixture
def two_fit(make_registry: Callable[..., ModelRegistry], lm_bytes: int) -> ModelRegistry:
    """A registry whose budget holds two tiny LMs but not three."""
    return make_registry(budget_bytes=int(2.5 * lm_bytes))


async def test_third_load_evicts_the_least_recently_used(
    two_fit: ModelRegistry, lm_path: str
) -> None:
    await two_fit.load(LoadSpec(lm_path, "lm", model_id="a"))
    await two_fit.load(LoadSpec(lm_path, "lm", model_id="b"))
    await two_fit.chat("a", MESSAGES, params(two_fit, "a", 2))  # b is now the older one
    await two_fit.load(LoadSpec(lm_path, "lm", model_id="c"))
    assert loaded(two_fit) == {"a", "c"}
    assert two_fit.used_bytes() <= two_fit.budget_bytes
    with pytest.raises(NotFound):
        two_fit.get("b")


@pytest.mark.parametrize(
    ("first", "second", "victim"),
    [
        ("low", "normal", "a"),  # a was used last, but low goes first
        ("normal", "high", "a"),
        ("high", "normal", "b"),  # b is less recently used than a, but a is high
        ("high", "low", "b"),
    ],
)
async def test_lower_priority_is_evicted_before_more_recent_use(
    two_fit: ModelRegistry, lm_path: str, first: str, second: str, victim: str
) -> None:
    await two_fit.load(LoadSpec(lm_path, "lm", model_id="a", priority=first))
    await two_fit.load(LoadSpec(lm_path, "lm", model_id="b", priority=second))
    # Make recency point the other way from priority.
    recent = "a" if victim == "a" else "b"
    await two_fit.chat(recent, MESSAGES, params(two_fit, recent, 1))
    await two_fit.load(LoadSpec(lm_path, "lm", model_id="c"))
    assert loaded(two_fit) == {"a", "b", "c"} - {victim}


async def test_pinned_models_are_never_evicted(two_fit: ModelRegistry, lm_path: str) -> None:
    await two_fit.load(LoadSpec(lm_path, "lm", model_id="a", pinned=True, priority="low"))
    await two_fit.load(LoadSpec(lm_path, "lm", model_id="b", priority="high"))
    await two_fit.load(LoadSpec(lm_path, "lm", model_id="c"))  # only b is evictable
    assert loaded(two_fit) == {"a", "c"}
    await two_fit.unload("c")
    await two_fit.load(LoadSpec(lm_path, "lm", model_id="d", pinned=True))
    used = two_fit.used_bytes()
    with pytest.raises(InsufficientMemory) as info:
        await two_fit.load(LoadSpec(lm_path, "lm", model_id="e"))
    assert info.value.code == "insufficient_vram"
    assert info.value.status == 503
    assert loaded(two_fit) == {"a", "d"}
    assert two_fit.used_bytes() == used


async def test_a_model_serving_a_request_is_never_evicted(
    two_fit: ModelRegistry, counting: CountingLmBackend, lm_path: str
) -> None:
    await two_fit.load(LoadSpec(lm_path, "lm", model_id="a", priority="low"))
    await two_fit.load(LoadSpec(lm_path, "lm", model_id="b"))
    stream = await hold(two_fit, "a")  # a: lowest priority, least recently used, but busy
    assert two_fit.get("a").busy
    await bounded(two_fit.load(LoadSpec(lm_path, "lm", model_id="c")))
    assert loaded(two_fit) == {"a", "c"}
    # The held request finishes normally on the model that stayed.
    rest = [chunk async for chunk in stream]
    assert rest[-1].finish_reason == "length"
    assert rest[-1].completion_tokens == 6

    # Now every other model is busy too: nothing can be evicted, and nothing is.
    held = [await hold(two_fit, "a"), await hold(two_fit, "c")]
    with pytest.raises(InsufficientMemory):
        await two_fit.load(LoadSpec(lm_path, "lm", model_id="d"))
    assert loaded(two_fit) == {"a", "c"}
    for stream in held:
        await stream.aclose()
    assert not two_fit.get("a").busy
    assert not two_fit.get("c").busy
    assert counting.loads == 3


async def test_requests_queued_on_a_busy_model_survive_an_eviction_elsewhere(
    two_fit: ModelRegistry, lm_path: str
) -> None:
    await two_fit.load(LoadSpec(lm_path, "lm", model_id="a", max_concurrency=1))
    await two_fit.load(LoadSpec(lm_path, "lm", model_id="b", priority="high"))
    stream = await hold(two_fit, "a")
    queued = asyncio.create_task(two_fit.chat("a", MESSAGES, params(two_fit, "a", 2)))
    await until(lambda: two_fit.get("a").slots.waiting == 1, "the second request queues")
    await bounded(two_fit.load(LoadSpec(lm_path, "lm", model_id="c")))  # b goes, high or not
    assert loaded(two_fit) == {"a", "c"}
    assert not queued.done()
    await stream.aclose()
    result = await bounded(queued)
    assert (result.finish_reason, result.completion_tokens) == ("length", 2)


async def test_a_load_that_cannot_fit_evicts_nothing(
    two_fit: ModelRegistry, counting: CountingLmBackend, lm_path: str, lm_bytes: int
) -> None:
    await two_fit.load(LoadSpec(lm_path, "lm", model_id="pinned", pinned=True))
    await two_fit.load(LoadSpec(lm_path, "lm", model_id="idle"))
    used = two_fit.used_bytes()
    # Shrink the budget so that evicting the idle model would still not make room.
    two_fit.budget_bytes = two_fit.get("pinned").memory_bytes + lm_bytes - 1
    with pytest.raises(InsufficientMemory) as info:
        await two_fit.load(LoadSpec(lm_path, "lm", model_id="new"))
    assert info.value.code == "insufficient_vram"
    assert loaded(two_fit) == {"pinned", "idle"}
    assert two_fit.used_bytes() == used
    assert counting.loads == 2  # the refused model was never loaded
    # One byte more and the idle model makes room.
    two_fit.budget_bytes += 1
    await two_fit.load(LoadSpec(lm_path, "lm", model_id="new"))
    assert loaded(two_fit) == {"pinned", "new"}


async def test_a_model_larger_than_the_whole_budget_is_refused(
    make_registry: Callable[..., ModelRegistry], lm_path: str, lm_bytes: int
) -> None:
    registry = make_registry(budget_bytes=lm_bytes - 1)
    with pytest.raises(InsufficientMemory):
        await registry.load(LoadSpec(lm_path, "lm", model_id="m"))
    assert loaded(registry) == set()


async def test_unload_frees_memory(registry: ModelRegistry, lm_path: str) -> None:
    await registry.load(LoadSpec(lm_path, "lm", model_id="a"))
    entry = await registry.load(LoadSpec(lm_path, "lm", model_id="b"))
    await registry.chat("b", MESSAGES, params(registry, "b", 2))
    weights, accounted = entry.model.weight_bytes, entry.memory_bytes
    used = registry.used_bytes()
    before = active_memory()
    freed, ms = await registry.unload("b")
    del entry  # the test's own reference must not keep arrays alive
    after = active_memory()
    assert registry.used_bytes() == used - accounted
    assert registry.used_bytes() == registry.get("a").memory_bytes
    assert freed >= 0.9 * weights
    assert before - after >= 0.9 * weights
    assert ms >= 0
    assert loaded(registry) == {"a"}
    with pytest.raises(NotFound) as info:
        await registry.unload("b")
    assert info.value.code == "model_not_found"


async def test_evicted_load_runs_after_the_eviction_freed_memory(
    two_fit: ModelRegistry, lm_path: str
) -> None:
    """Eviction really releases the arrays: MLX active memory stays near two models."""
    await two_fit.load(LoadSpec(lm_path, "lm", model_id="a"))
    await two_fit.load(LoadSpec(lm_path, "lm", model_id="b"))
    with_two = active_memory()
    for model_id in ("c", "d", "e"):
        await two_fit.load(LoadSpec(lm_path, "lm", model_id=model_id))
    assert len(loaded(two_fit)) == 2
    assert active_memory() - with_two < 0.5 * two_fit.get("e").memory_bytes


# --- serving ----------------------------------------------------------------------------------


async def test_concurrency_limit_and_bounded_queue(registry: ModelRegistry, lm_path: str) -> None:
    entry = await registry.load(
        LoadSpec(lm_path, "lm", model_id="m", max_concurrency=1, max_queue=1)
    )
    slots = entry.slots
    stream = await hold(registry, "m")
    assert (slots.active, slots.waiting) == (1, 0)

    second = asyncio.create_task(registry.chat("m", MESSAGES, params(registry, "m", 3)))
    await until(lambda: slots.waiting == 1, "the second request queues")
    assert slots.active == 1
    assert not second.done()

    with pytest.raises(QueueFull) as info:
        await registry.chat("m", MESSAGES, params(registry, "m", 3))
    assert info.value.code == "queue_full"
    assert info.value.status == 429
    retry_after = info.value.headers["Retry-After"]
    assert retry_after.isdigit()
    assert int(retry_after) >= 1
    assert (slots.active, slots.waiting) == (1, 1)  # the refused request took nothing

    rest = [chunk async for chunk in stream]  # the first finishes...
    assert rest[-1].finish_reason == "length"
    result = await bounded(second)  # ...then the second runs
    assert result.completion_tokens == 3
    assert (slots.active, slots.waiting) == (0, 0)
    assert slots.idle.is_set()


async def test_concurrency_limit_of_two_admits_two(registry: ModelRegistry, lm_path: str) -> None:
    entry = await registry.load(
        LoadSpec(lm_path, "lm", model_id="m", max_concurrency=2, max_queue=5)
    )
    held = [await hold(registry, "m"), await hold(registry, "m")]
    assert (entry.slots.active, entry.slots.waiting) == (2, 0)
    third = asyncio.create_task(registry.chat("m", MESSAGES, params(registry, "m", 2)))
    await until(lambda: entry.slots.waiting == 1, "the third request queues")
    await held[0].aclose()
    assert (await bounded(third)).completion_tokens == 2
    await held[1].aclose()
    assert (entry.slots.active, entry.slots.waiting) == (0, 0)


async def test_registry_defaults_apply_when_the_load_sets_no_limits(
    make_registry: Callable[..., ModelRegistry], lm_path: str, tiny_vlm_dir: Path
) -> None:
    policy = BatchPolicy(
        max_batch=5, prompt_cache_bytes=0, stream_backlog_chunks=8, embed_max_texts=64
    )
    registry = make_registry(default_concurrency=3, default_queue=7, batching=policy)
    lm = await registry.load(LoadSpec(lm_path, "lm", model_id="m"))
    # A language model's batch size is its concurrency; other types take the default.
    assert (lm.slots.concurrency, lm.slots.max_queue) == (5, 7)
    assert lm.model.batch is not None  # type: ignore[attr-defined]
    assert lm.model.batch.max_batch == 5  # type: ignore[attr-defined]
    vlm = await registry.load(LoadSpec(str(tiny_vlm_dir), "multimodal", model_id="v"))
    assert (vlm.slots.concurrency, vlm.slots.max_queue) == (3, 7)
    assert vlm.decoder is None  # vision requests run one at a time


async def test_unload_while_busy_conflicts(registry: ModelRegistry, lm_path: str) -> None:
    await registry.load(LoadSpec(lm_path, "lm", model_id="m"))
    stream = await hold(registry, "m")
    with pytest.raises(Conflict) as info:
        await registry.unload("m")
    assert info.value.code == "model_in_use"
    assert loaded(registry) == {"m"}
    await stream.aclose()
    await registry.unload("m")
    assert loaded(registry) == set()


async def test_forced_unload_stops_the_running_stream_and_fails_queued_requests(
    registry: ModelRegistry, counting: CountingLmBackend, lm_path: str
) -> None:
    entry = await registry.load(LoadSpec(lm_path, "lm", model_id="m", max_concurrency=1))
    first_chunk = asyncio.Event()
    received: list[ChatChunk] = []

    async def consume() -> None:
        async for chunk in registry.chat_stream("m", MESSAGES, params(registry, "m", LONG)):
            received.append(chunk)
            first_chunk.set()

    running = asyncio.create_task(consume())
    await bounded(first_chunk.wait())
    queued = asyncio.create_task(registry.chat("m", MESSAGES, params(registry, "m", 2)))
    await until(lambda: entry.slots.waiting == 1, "the second request queues")
    with pytest.raises(Conflict):
        await registry.unload("m")

    await bounded(registry.unload("m", force=True))

    # The running stream ends promptly, and says why: it does not look like a normal end.
    outcome = await bounded(asyncio.gather(running, return_exceptions=True))
    error = outcome[0]
    if error is None:
        assert received[-1].finish_reason == "cancelled"
    else:
        assert isinstance(error, ServiceUnavailable), repr(error)
        assert error.code == "model_unloaded"
    assert all(c.finish_reason in (None, "cancelled") for c in received)
    generation = counting.generations[0]
    assert generation.ended.is_set()
    assert generation.chunks < LONG // 2, "the generation ran on after the unload"

    with pytest.raises(ServiceUnavailable) as info:
        await bounded(queued)
    assert info.value.code == "model_unloaded"
    assert len(counting.generations) == 1  # the queued request never ran

    assert loaded(registry) == set()
    assert registry.used_bytes() == 0
    with pytest.raises(NotFound):
        registry.get("m")


async def test_forced_unload_of_a_non_streaming_chat_is_not_a_normal_answer(
    registry: ModelRegistry, counting: CountingLmBackend, lm_path: str
) -> None:
    await registry.load(LoadSpec(lm_path, "lm", model_id="m"))
    chat = asyncio.create_task(registry.chat("m", MESSAGES, params(registry, "m", LONG)))
    await until(lambda: counting.generations and counting.generations[0].chunks > 0, "it runs")
    await bounded(registry.unload("m", force=True))
    outcome = (await bounded(asyncio.gather(chat, return_exceptions=True)))[0]
    if isinstance(outcome, BaseException):
        assert isinstance(outcome, ServiceUnavailable), repr(outcome)
        assert outcome.code == "model_unloaded"
    else:
        assert outcome.finish_reason == "cancelled", outcome
    assert counting.generations[0].chunks < LONG // 2


async def test_breaking_out_of_a_stream_stops_generation_on_the_worker(
    registry: ModelRegistry, counting: CountingLmBackend, lm_path: str
) -> None:
    entry = await registry.load(LoadSpec(lm_path, "lm", model_id="m", max_concurrency=1))
    seen = 0
    async for _chunk in registry.chat_stream("m", MESSAGES, params(registry, "m", LONG)):
        seen += 1
        if seen == 2:
            break
    # The next request runs right after, not after LONG more tokens of the first.
    result = await bounded(registry.chat("m", MESSAGES, params(registry, "m", 3)))
    assert result.completion_tokens == 3
    first, second = counting.generations
    assert first.ended.is_set()
    assert first.chunks < LONG // 2, f"the abandoned generation produced {first.chunks} chunks"
    assert first.last is None or first.last.finish_reason in (None, "cancelled")
    assert second.last is not None
    assert second.last.finish_reason == "length"
    assert (entry.slots.active, entry.slots.waiting) == (0, 0)


async def test_closing_a_stream_frees_its_slot_and_its_place_in_the_batch(
    registry: ModelRegistry, counting: CountingLmBackend, lm_path: str
) -> None:
    """Once aclose() returns the slot is free; the abandoned sequence leaves the batch at
    the next step, before the request that took its slot joins: the batch never decodes
    more sequences than the model's concurrency."""
    entry = await registry.load(LoadSpec(lm_path, "lm", model_id="m", max_concurrency=1))
    stream = registry.chat_stream("m", MESSAGES, params(registry, "m", LONG))
    await bounded(anext(stream))
    await bounded(anext(stream))
    await bounded(stream.aclose())
    assert entry.slots.active == 0
    result = await bounded(registry.chat("m", MESSAGES, params(registry, "m", 3)))
    assert (result.completion_tokens, result.finish_reason) == (3, "length")
    abandoned, _ = counting.generations
    assert abandoned.ended.is_set()
    assert abandoned.last is not None
    assert abandoned.last.finish_reason == "cancelled"
    assert abandoned.chunks < LONG // 2
    batch = entry.model.batch  # type: ignore[attr-defined]
    assert batch.most == 1
    assert batch.in_batch() == 0


async def test_a_request_for_an_unknown_model_is_not_found(registry: ModelRegistry) -> None:
    with pytest.raises(NotFound) as info:
        await registry.chat("nope", MESSAGES, ChatParams(max_tokens=1))
    assert info.value.code == "model_not_found"
    with pytest.raises(NotFound):
        await registry.embed("nope", ["x"])


# --- warmup, stats, embeddings through the registry -------------------------------------------


async def test_warmup_prefills_and_marks_the_model(registry: ModelRegistry, lm_path: str) -> None:
    entry = await registry.load(LoadSpec(lm_path, "lm", model_id="m"))
    prompt = "The quick brown fox jumps over the lazy dog " * 4
    total = await registry.count_tokens("m", prompt)
    assert total > 16
    ms, tokens = await registry.warmup("m", prompt, 16)
    assert tokens == 16
    assert ms > 0
    assert entry.warmup_completed
    _, tokens = await registry.warmup("m", prompt, 10_000)
    assert tokens == total
    assert (entry.slots.active, entry.slots.waiting) == (0, 0)


async def test_stats_record_requests_tokens_and_errors(
    registry: ModelRegistry, counting: CountingLmBackend, lm_path: str
) -> None:
    entry = await registry.load(LoadSpec(lm_path, "lm", model_id="m"))
    results = [await registry.chat("m", MESSAGES, params(registry, "m", n)) for n in (2, 5)]
    stats = entry.stats
    assert stats.request_count == 2
    assert stats.total_tokens == sum(r.total_tokens for r in results)
    assert all(r.prompt_tokens > 0 for r in results)
    summary = stats.summary()
    assert summary["p50_latency_ms"] is not None
    assert summary["p50_latency_ms"] > 0
    assert summary["avg_latency_ms"] is not None
    assert summary["avg_latency_ms"] > 0
    assert stats.error_count == 0

    entry.model.batch.fail_after = 1  # type: ignore[attr-defined]
    with pytest.raises(RuntimeError, match="inference exploded"):
        await registry.chat("m", MESSAGES, params(registry, "m", 8))
    assert stats.error_count == 1
    assert stats.request_count == 3
    assert stats.last_error is not None
    assert "inference exploded" in stats.last_error
    assert len(stats.latencies_ms) == 2  # failures add no latency sample
    assert (entry.slots.active, entry.slots.waiting) == (0, 0)  # the slot came back

    # A client error (the prompt is too long) is the caller's, not the model's.
    with pytest.raises(InvalidRequest):
        await registry.chat(
            "m", [{"role": "user", "content": "hello " * 3000}], ChatParams(max_tokens=1)
        )
    assert stats.error_count == 1


async def test_embeddings_through_the_registry(
    registry: ModelRegistry, tiny_embedder_dir: Path
) -> None:
    before = active_memory()
    entry = await registry.load(LoadSpec(str(tiny_embedder_dir), "embeddings"))
    assert entry.id == "embedder"
    assert entry.memory_bytes > 0
    assert abs(entry.memory_bytes - entry.model.weight_bytes) <= 0.05 * entry.model.weight_bytes
    assert active_memory() - before >= 0.9 * entry.model.weight_bytes
    result = await registry.embed("embedder", ["one", "two words", "word " * 200])
    assert [len(v) for v in result.vectors] == [32, 32, 32]
    assert result.truncated == [False, False, True]
    assert entry.stats.request_count == 1
    assert entry.stats.total_tokens == result.prompt_tokens > 128
    assert registry.select("embeddings") == "embedder"
    assert registry.select("lm") is None
    with pytest.raises(InvalidRequest) as info:
        await registry.chat("embedder", MESSAGES, ChatParams(max_tokens=1))
    assert info.value.code == "unsupported"


async def test_models_chosen_for_eviction_admit_no_request_meanwhile(
    make_registry: Callable[..., ModelRegistry], lm_path: str, lm_bytes: int
) -> None:
    """A load that must evict two models releases them one after the other. A request
    for the second must not be admitted while the first is released and then be killed
    by the eviction: a model serving a request is never evicted."""
    registry = make_registry(budget_bytes=int(2.5 * lm_bytes))
    await registry.load(LoadSpec(lm_path, "lm", model_id="a"))
    await registry.load(LoadSpec(lm_path, "lm", model_id="b"))
    registry.budget_bytes = lm_bytes + 1024  # room for the newcomer only
    gate = threading.Event()
    blocker = asyncio.create_task(registry.worker.call(gate.wait, BOUND))  # worker busy
    load = asyncio.create_task(registry.load(LoadSpec(lm_path, "lm", model_id="c")))
    try:
        # The eviction has begun: a is on its way out, its release queued on the worker.
        await until(lambda: "a" not in loaded(registry), "a is being evicted")
        request = asyncio.create_task(registry.chat("b", MESSAGES, ChatParams(max_tokens=2)))
        await until(lambda: request.done() or registry._entries["b"].slots.active > 0, "b")
    finally:
        gate.set()
    await bounded(blocker)
    await bounded(load)
    assert loaded(registry) == {"c"}
    outcome = (await bounded(asyncio.gather(request, return_exceptions=True)))[0]
    # Refused up front (the model is already on its way out), never admitted and killed.
    assert isinstance(outcome, NotFound), repr(outcome)


async def test_counting_tokens_is_bounded_like_a_prompt(
    make_registry: Callable[..., ModelRegistry], lm_path: str
) -> None:
    limits = ModelLimits(id_max_chars=256, max_prompt_chars=100, warmup_max_tokens=64)
    registry = make_registry(limits=limits)
    await registry.load(LoadSpec(lm_path, "lm", model_id="m"))
    assert await bounded(registry.count_tokens("m", "hello " * 16)) > 0
    with pytest.raises(InvalidRequest) as info:
        await registry.count_tokens("m", "x" * 101)
    assert (info.value.code, info.value.param) == ("prompt_too_long", "input")
