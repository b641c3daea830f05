"""Continuous batching of a language model's requests (engine/models/decoding.py,
engine/models/backends/batch_decode.py), with the real tiny LM through mlx-lm's
BatchGenerator: requests decoded together keep their own sampling, stop strings, limits,
streams, counts and cancellation; the prefix cache; backpressure on slow readers.

Every test has at least two requests in flight together. Random weights: assertions are on
counts, finish reasons and text forced by logit_bias, never on what the model says."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from polling import until

from engine.config import Settings
from engine.errors import ServiceUnavailable
from engine.models.backends import default_backends
from engine.models.backends.base import ChatChunk, ChatParams, ChatResult
from engine.models.backends.batch_decode import DecodeBatch
from engine.models.backends.mlx_lm_backend import LmModel, MlxLmBackend
from engine.models.registry import ModelRegistry
from engine.models.types import BatchPolicy, LoadSpec

pytestmark = pytest.mark.unit

BOUND_S = 15.0  # an upper bound on any wait, far above the expected time
USER = [{"role": "user", "content": "hello there"}]
POLICY = BatchPolicy(
    max_batch=4, prompt_cache_bytes=64 << 20, stream_backlog_chunks=8, embed_max_texts=64
)

Registry = Callable[..., Awaitable[ModelRegistry]]


@pytest.fixture
async def make_registry(tiny_lm_dir: Path) -> AsyncIterator[Registry]:
    made: list[ModelRegistry] = []

    async def make(policy: BatchPolicy = POLICY, **load: Any) -> ModelRegistry:
        registry = ModelRegistry(
            default_backends(Settings()), budget_bytes=1 << 34, batching=policy
        )
        made.append(registry)
        await registry.load(LoadSpec(str(tiny_lm_dir), "lm", model_id="m", **load))
        return registry

    yield make
    for registry in made:
        await asyncio.wait_for(registry.close(), BOUND_S)


def batch_of(registry: ModelRegistry) -> DecodeBatch:
    model = registry.get("m").model
    assert isinstance(model, LmModel)
    assert model.batch is not None
    return model.batch


def tokenizer(registry: ModelRegistry) -> Any:
    model = registry.get("m").model
    assert isinstance(model, LmModel)
    return model.tokenizer


def no_eos(registry: ModelRegistry) -> dict[int, float]:
    return {int(t): -1e9 for t in tokenizer(registry).eos_token_ids}


def forced(registry: ModelRegistry, max_tokens: int, **fields: Any) -> ChatParams:
    """Greedy, every end-of-sequence token banned: exactly ``max_tokens`` tokens."""
    return ChatParams(max_tokens=max_tokens, temperature=0, logit_bias=no_eos(registry), **fields)


def single_token(registry: ModelRegistry, text: str) -> int:
    (token,) = tokenizer(registry).encode(text, add_special_tokens=False)
    assert tokenizer(registry).decode([token]) == text
    return int(token)


async def bounded(awaitable: Awaitable[Any]) -> Any:
    return await asyncio.wait_for(awaitable, BOUND_S)


async def collect(stream: AsyncIterator[ChatChunk]) -> list[ChatChunk]:
    return [chunk async for chunk in stream]


# --- decoding together, each request its own ---------------------------------------------


async def test_requests_decode_together_each_with_its_own_limit(make_registry: Registry) -> None:
    registry = await make_registry()
    batch = batch_of(registry)
    limits = [5, 40, 17, 60]
    results: list[ChatResult] = await bounded(
        asyncio.gather(*(registry.chat("m", USER, forced(registry, n)) for n in limits))
    )
    assert [(r.completion_tokens, r.finish_reason) for r in results] == [
        (n, "length") for n in limits
    ]
    assert all(r.prompt_tokens == results[0].prompt_tokens > 0 for r in results)
    # Decoded together: far fewer steps than tokens (alone they would be the sum).
    assert batch.tokens_decoded == sum(limits)
    assert batch.steps < sum(limits)
    assert batch.in_batch() == 0


async def test_a_stop_string_ends_one_request_and_the_other_finishes_intact(
    make_registry: Registry,
) -> None:
    registry = await make_registry()
    letter = single_token(registry, "a")
    stopped = ChatParams(
        max_tokens=50, temperature=0, logit_bias={letter: 100.0}, stop=["zz", "aaaa"]
    )
    stopping = registry.chat("m", USER, stopped)
    other = registry.chat("m", USER, forced(registry, 30))
    cut, intact = await bounded(asyncio.gather(stopping, other))
    # "aaaa" completes at the fourth forced token; the text before it is all there is.
    assert (cut.content, cut.finish_reason, cut.completion_tokens) == ("", "stop", 4)
    assert (intact.finish_reason, intact.completion_tokens) == ("length", 30)


async def test_logit_bias_and_end_of_sequence_are_per_request(make_registry: Registry) -> None:
    registry = await make_registry()
    eos = min(int(t) for t in tokenizer(registry).eos_token_ids)
    ends_at_once = ChatParams(max_tokens=50, temperature=0, logit_bias={eos: 100.0})
    letter = single_token(registry, "b")
    forced_b = ChatParams(max_tokens=12, temperature=0, logit_bias={letter: 100.0})
    done, bs, free = await bounded(
        asyncio.gather(
            registry.chat("m", USER, ends_at_once),
            registry.chat("m", USER, forced_b),
            registry.chat("m", USER, forced(registry, 20)),
        )
    )
    assert (done.content, done.finish_reason, done.completion_tokens) == ("", "stop", 1)
    assert (bs.content, bs.finish_reason) == ("b" * 12, "length")
    assert (free.finish_reason, free.completion_tokens) == ("length", 20)


async def test_seeded_sampling_is_per_request_in_a_shared_batch(make_registry: Registry) -> None:
    registry = await make_registry()

    def sampled(seed: int) -> Awaitable[ChatResult]:
        params = ChatParams(max_tokens=16, temperature=1.0, seed=seed, logit_bias=no_eos(registry))
        return registry.chat("m", USER, params)

    first, same, other = await bounded(asyncio.gather(sampled(7), sampled(7), sampled(8)))
    assert first.content == same.content  # its own key: the company it keeps changes nothing
    assert first.content != other.content
    again = await bounded(sampled(7))
    assert again.completion_tokens == first.completion_tokens == 16


async def test_a_stream_and_a_whole_answer_share_the_batch(make_registry: Registry) -> None:
    registry = await make_registry()
    letter = single_token(registry, "c")
    streamed = ChatParams(max_tokens=9, temperature=0, logit_bias={letter: 100.0})
    chunks, whole = await bounded(
        asyncio.gather(
            collect(registry.chat_stream("m", USER, streamed)),
            registry.chat("m", USER, forced(registry, 25)),
        )
    )
    assert "".join(c.text for c in chunks) == "c" * 9
    assert len([c for c in chunks if c.text]) == 9  # token by token
    assert [c.finish_reason for c in chunks][-1] == "length"
    assert chunks[-1].completion_tokens == 9
    assert whole.completion_tokens == 25


async def test_a_forced_unload_ends_every_request_in_the_batch(make_registry: Registry) -> None:
    registry = await make_registry()
    batch = batch_of(registry)
    tasks = [
        asyncio.create_task(registry.chat("m", USER, forced(registry, 1500))) for _ in range(3)
    ]
    await until(lambda: batch.in_batch() == 3 and batch.tokens_decoded > 6, "all three decode")
    await bounded(registry.unload("m", force=True))
    outcomes = await bounded(asyncio.gather(*tasks, return_exceptions=True))
    for outcome in outcomes:
        assert isinstance(outcome, ServiceUnavailable), repr(outcome)
        assert outcome.code == "model_unloaded"
    assert batch.tokens_decoded < 3 * 1500 // 2


async def test_a_model_whose_caches_cannot_batch_serves_one_at_a_time(
    tiny_lm_dir: Path,
) -> None:
    class Unbatchable(LmModel):
        @property
        def batchable(self) -> bool:
            return False

    class Backend(MlxLmBackend):
        def load(self, path: Path, context_length: int | None) -> LmModel:
            model = super().load(path, context_length)
            model.__class__ = Unbatchable
            assert isinstance(model, LmModel)
            return model

    backends = default_backends(Settings())
    backends["lm"] = Backend()
    registry = ModelRegistry(backends, budget_bytes=1 << 34, batching=POLICY)
    try:
        entry = await registry.load(LoadSpec(str(tiny_lm_dir), "lm", model_id="m"))
        assert entry.decoder is None
        results = await bounded(
            asyncio.gather(*(registry.chat("m", USER, forced(registry, n)) for n in (3, 7)))
        )
        assert [r.completion_tokens for r in results] == [3, 7]
    finally:
        await bounded(registry.close())


# --- the prefix cache --------------------------------------------------------------------------


async def test_a_repeated_prompt_reuses_its_cache_and_reports_cached_tokens(
    make_registry: Registry,
) -> None:
    registry = await make_registry()
    cold = await bounded(registry.chat("m", USER, forced(registry, 4)))
    assert cold.cached_tokens == 0
    warm, twin = await bounded(
        asyncio.gather(*(registry.chat("m", USER, forced(registry, 4)) for _ in range(2)))
    )
    # All but the last prompt token (decoding starts from it) come from the cache.
    assert warm.cached_tokens == twin.cached_tokens == cold.prompt_tokens - 1
    assert warm.prompt_tokens == cold.prompt_tokens


async def test_a_conversation_turn_reuses_the_previous_turn(make_registry: Registry) -> None:
    registry = await make_registry()
    letter = single_token(registry, "d")
    first = await bounded(
        registry.chat(
            "m", USER, ChatParams(max_tokens=6, temperature=0, logit_bias={letter: 100.0})
        )
    )
    follow_up = [
        *USER,
        {"role": "assistant", "content": first.content},
        {"role": "user", "content": "and then?"},
    ]
    second = await bounded(registry.chat("m", follow_up, forced(registry, 3)))
    assert second.cached_tokens >= first.prompt_tokens
    assert second.cached_tokens < second.prompt_tokens


async def test_warmup_keeps_its_prefill_for_prompts_that_start_with_it(
    make_registry: Registry,
) -> None:
    registry = await make_registry()
    system = {"role": "system", "content": "You answer in one word. " * 8}
    messages = [system, *USER]
    tok = tokenizer(registry)
    prefix = tok.apply_chat_template([system], tokenize=False)
    _, warmed = await bounded(registry.warmup("m", prefix, 4096))
    prompt = tok.apply_chat_template(messages, add_generation_prompt=True)
    common = next(
        (i for i, (a, b) in enumerate(zip(tok.encode(prefix), prompt, strict=False)) if a != b),
        min(warmed, len(prompt)),
    )
    assert common > 20
    # One request: a second one could start from the first's finished entry, which shares more.
    result = await bounded(registry.chat("m", messages, forced(registry, 2)))
    assert result.cached_tokens == common


async def test_the_prefix_cache_is_bounded_by_bytes_least_recently_used_first(
    make_registry: Registry,
) -> None:
    probe = await make_registry()
    await bounded(probe.chat("m", USER, forced(probe, 2)))
    cache = batch_of(probe).cache
    assert cache is not None
    one_entry = cache.nbytes
    assert one_entry > 0
    # Room for one entry and a half: a second prompt evicts the first.
    registry = await make_registry(replace(POLICY, prompt_cache_bytes=one_entry * 3 // 2))
    other = [{"role": "user", "content": "something else entirely"}]
    await bounded(registry.chat("m", USER, forced(registry, 2)))
    await bounded(registry.chat("m", other, forced(registry, 2)))
    kept = await bounded(registry.chat("m", other, forced(registry, 2)))
    assert kept.cached_tokens == kept.prompt_tokens - 1
    # USER's own entry is gone: only the chat template's opening, shared with the kept
    # entry, comes from the cache.
    evicted = await bounded(registry.chat("m", USER, forced(registry, 2)))
    tok = tokenizer(registry)
    ours, theirs = (tok.apply_chat_template(m, add_generation_prompt=True) for m in (USER, other))
    shared = next(i for i, (a, b) in enumerate(zip(ours, theirs, strict=False)) if a != b)
    assert evicted.cached_tokens == shared < evicted.prompt_tokens - 1
    assert batch_of(registry).cache.nbytes <= one_entry * 3 // 2  # type: ignore[union-attr]

    off = await make_registry(replace(POLICY, prompt_cache_bytes=0))
    await bounded(off.chat("m", USER, forced(off, 2)))
    assert (await bounded(off.chat("m", USER, forced(off, 2)))).cached_tokens == 0


# --- backpressure ------------------------------------------------------------------------------


async def test_a_stalled_reader_leaves_the_batch_and_resumes_where_it_stopped(
    make_registry: Registry,
) -> None:
    registry = await make_registry()
    batch = batch_of(registry)
    letter = single_token(registry, "e")
    total = 200
    params = ChatParams(max_tokens=total, temperature=0, logit_bias={letter: 100.0})
    slow = registry.chat_stream("m", USER, params)
    first = await bounded(anext(slow))
    assert first.text == "e"
    # The reader stops reading; the batch goes on with another request meanwhile.
    await until(lambda: batch.parked() == 1, "the stalled sequence leaves the batch")
    decoded = batch.tokens_decoded
    assert decoded <= 1 + POLICY.stream_backlog_chunks + 2  # nothing ran ahead unbounded
    other = await bounded(registry.chat("m", USER, forced(registry, 40)))
    assert other.completion_tokens == 40
    assert batch.tokens_decoded == decoded + 40  # the parked one did not decode meanwhile
    rest = await bounded(collect(slow))
    assert first.text + "".join(c.text for c in rest) == "e" * total
    assert (rest[-1].finish_reason, rest[-1].completion_tokens) == ("length", total)
    assert batch.parked() == batch.in_batch() == 0
