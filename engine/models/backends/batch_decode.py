"""Continuous batching for a language model, on the MLX worker thread.

mlx-lm's BatchGenerator (the machinery of ``mlx_lm.server``) decodes every admitted
sequence together: a sequence joins at the next step and leaves when it is done, each with
its own sampler, logits processors and token limit. Around it this module keeps what the
engine adds per request: stop strings (cut on text, across token boundaries), streaming
detokenization, the counts a usage block reports, cancellation, backpressure (a sequence
whose reader fell behind leaves the batch with its KV cache and rejoins where it stopped
when the reader catches up), and a prefix cache (mlx-lm's LRUPromptCache, bounded by bytes)
that later prompts sharing a prefix start from.

Every method runs on the one MLX worker thread (engine/models/worker.py); the asyncio side
is engine/models/decoding.py.
"""

from __future__ import annotations

import copy
import secrets
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import mlx.core as mx
from mlx_lm.generate import BatchGenerator, StopSequences
from mlx_lm.models.cache import (
    KVCache,
    LRUPromptCache,
    can_trim_prompt_cache,
    make_prompt_cache,
    trim_prompt_cache,
)
from mlx_lm.sample_utils import apply_top_p, make_logits_processors

from engine.models.backends.base import ChatChunk, ChatParams
from engine.models.backends.textgen import StopScanner
from engine.models.decoding import Event, Generation

# The prefix cache holds one model's sequences; LRUPromptCache keys entries by model too.
CACHE_KEY = "model"
# Prompt tokens one prefill pass may take: sequences are prefilled together, each up to
# prefill_step_tokens at a time, as many as fit (a wave of short prompts in one pass was
# 1.07x mlx_lm.server's 8 at a time, at 32 clients on the 2-core CPU); the bound keeps a
# pass's activations in check when the prompts are long.
PREFILL_TOKENS = 65_536
# Prefix cache entries: LRUPromptCache also bounds their number; bytes are the real bound.
CACHE_ENTRIES = 1024


class PrefixCache(LRUPromptCache):
    """mlx-lm's LRU prompt cache, fetching without its deep copy. A fetched cache is only
    read (merged into the batch's own arrays) or trimmed (an offset), so a plain KV
    cache's copy may take new views of the entry's arrays; deepcopy walked every layer's
    objects in Python on the worker: 13% of its time at 8 clients on an H100. The search
    is mlx-lm's own (LRUPromptCache.fetch_nearest_cache, mlx-lm 0.32)."""

    def fetch_nearest_cache(self, model: Any, tokens: list[int]) -> tuple[Any, list[int]]:
        found = self._trie.search(model, tokens)
        if found.exact is not None:
            return _copied(self._trie.get(found.model, found.exact).prompt_cache), []
        short = len(found.shorter) if found.shorter is not None else 0
        if found.longer is not None and found.common_prefix > short:
            entry = self._trie.get(found.model, found.longer)
            if can_trim_prompt_cache(entry.prompt_cache):
                cache = _copied(entry.prompt_cache)
                prefix = min(len(tokens) - 1, found.common_prefix)
                trim_prompt_cache(cache, len(found.longer) - prefix)
                return cache, tokens[prefix:]
        if found.shorter is not None and short > 0:
            entry = self._trie.get(found.model, found.shorter)
            return _copied(entry.prompt_cache), tokens[short:]
        return None, tokens


def _copied(cache: list[Any]) -> list[Any]:
    """A cached KV state to start a sequence from: for plain KV caches, new views of the
    entry's arrays (an update through them replaces only the view), else a deep copy."""
    fresh: list[Any] = []
    for layer in cache:
        if type(layer) is KVCache and layer.keys is not None:
            view = KVCache()
            view.keys = layer.keys[..., : layer.offset, :]
            view.values = layer.values[..., : layer.offset, :]
            view.offset = layer.offset
            fresh.append(view)
        else:
            fresh.append(copy.deepcopy(layer))
    return fresh


class DecodeBatch:
    """The sequences one language model decodes together."""

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        *,
        max_batch: int,
        prefill_step_tokens: int,
        cache_bytes: int,
        park_backlog: int,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.max_batch = max_batch
        self.prefill_step_tokens = prefill_step_tokens
        self.park_backlog = park_backlog
        self.cache = PrefixCache(CACHE_ENTRIES, cache_bytes) if cache_bytes > 0 else None
        self.eos = StopSequences([[int(t)] for t in tokenizer.eos_token_ids])
        # Set from the event loop when something waits for the worker's attention (a new
        # sequence, a reader that caught up): run() then returns before its time budget.
        self.attention = threading.Event()
        self._generator: BatchGenerator | None = None
        self._stream: Any = None
        self._active: dict[int, Generation] = {}
        self._parked: list[Generation] = []
        # What a test or a diagnostic may read: tokens decoded, and steps taken.
        self.tokens_decoded = 0
        self.steps = 0

    # -- the batch ------------------------------------------------------------------------
    @property
    def generator(self) -> BatchGenerator:
        if self._generator is None:
            # The generation stream of this thread, as mlx_lm.server makes it: MLX streams
            # are per thread, and every call here runs on the worker.
            self._stream = mx.default_stream(mx.default_device())
            self._generator = BatchGenerator(
                self.model,
                completion_batch_size=self.max_batch,
                prefill_batch_size=max(
                    1, min(self.max_batch, PREFILL_TOKENS // self.prefill_step_tokens)
                ),
                prefill_step_size=self.prefill_step_tokens,
                stream=self._stream,
            )
        return self._generator

    def in_batch(self) -> int:
        return len(self._active)

    def parked(self) -> int:
        return len(self._parked)

    def state(self) -> dict[str, int]:
        """What model info reports; read from the event loop, so each figure is a
        moment's reading of state the worker changes."""
        cache = self.cache
        return {
            "max_batch": self.max_batch,
            "decoding": self.in_batch(),
            "parked": self.parked(),
            "prompt_cache_entries": len(cache) if cache is not None else 0,
            "prompt_cache_bytes": cache.nbytes if cache is not None else 0,
            "prompt_cache_max_bytes": cache.max_bytes if cache is not None else 0,
        }

    def run(
        self,
        incoming: Sequence[Generation],
        deliver: Callable[[list[Event]], None],
        budget_s: float,
    ) -> bool:
        """Admit ``incoming``, then decode until the batch empties, ``budget_s`` passes
        or ``attention`` is set, handing each step's chunks to ``deliver`` as they come.
        Whether work remains that needs no outside event (a sequence to decode, a
        cancelled or caught-up one to act on)."""
        self.attention.clear()
        events: list[Event] = []
        self._end_cancelled(events)  # first: the places they free are for the incoming
        for seq in incoming:
            self._admit(seq, events)
        deadline = time.perf_counter() + budget_s
        while True:
            self._step(events)
            if events:
                deliver(events)
                events = []
            if not self._active or self.attention.is_set() or time.perf_counter() >= deadline:
                break
        return bool(self._active) or any(s.stop.is_set() or self.caught_up(s) for s in self._parked)

    def caught_up(self, seq: Generation) -> bool:
        """Whether a parked sequence's reader has taken half its backlog: it rejoins."""
        return seq.backlog <= self.park_backlog // 2

    def _admit(self, seq: Generation, events: list[Event]) -> None:
        if seq.stop.is_set():
            _emit(seq, events, _final(seq, "cancelled"))
            return
        try:
            cache, rest = self._cached_prefix(seq.prompt)
            seq.cached_tokens = len(seq.prompt) - len(rest)
            seq.sampler = _sampler(seq.params)
            seq.detokenizer = self.tokenizer.detokenizer
            seq.scanner = StopScanner(seq.params.stop)
            (seq.uid,) = self.generator.insert(
                [rest],
                max_tokens=[seq.max_tokens],
                caches=None if cache is None else [cache],
                all_tokens=[seq.prompt[: seq.cached_tokens]],
                samplers=[seq.sampler],
                logits_processors=[_processors(seq.params)],
                stop_sequences=[self.eos],
            )
        except Exception as exc:  # this sequence's failure; the batch goes on
            _emit(seq, events, exc)
            return
        self._active[seq.uid] = seq

    def _cached_prefix(self, prompt: list[int]) -> tuple[list[Any] | None, list[int]]:
        """The KV cache of the longest cached prefix of ``prompt`` and the tokens left to
        prefill, at least one (the last prompt token is what decoding starts from)."""
        if self.cache is None:
            return None, prompt
        cache, rest = self.cache.fetch_nearest_cache(CACHE_KEY, prompt)
        if cache is None:
            return None, prompt
        if not rest:
            if not can_trim_prompt_cache(cache):
                return None, prompt
            trim_prompt_cache(cache, 1)
            rest = prompt[-1:]
        return cache, rest

    def _end_cancelled(self, events: list[Event]) -> None:
        for seq in [*self._active.values(), *self._parked]:
            if seq.stop.is_set():
                self._finish(seq, "cancelled", events)

    def _step(self, events: list[Event]) -> None:
        self._end_cancelled(events)
        for seq in list(self._active.values()):
            if seq.backlog > self.park_backlog:
                self._park(seq)
        for seq in list(self._parked):
            if self.caught_up(seq):
                self._resume(seq)
        if not self._active:
            return
        _, responses = self.generator.next()
        self.steps += 1
        for response in responses:
            owner = self._active.get(response.uid)
            if owner is not None:
                self._take(owner, response, events)

    def _take(self, seq: Generation, response: Any, events: list[Event]) -> None:
        seq.generated += 1
        self.tokens_decoded += 1
        reason = response.finish_reason
        if reason != "stop":  # "stop" here: an end-of-sequence token, which is not text
            seq.detokenizer.add_token(response.token)
        if reason is not None:
            seq.detokenizer.finalize()
        text, hit = seq.scanner.feed(seq.detokenizer.last_segment)
        if hit:
            self._finish(seq, "stop", events, text)
        elif reason is not None:
            # The generator has already dropped the sequence: keep its cache for reuse.
            self._active.pop(seq.uid or 0, None)
            seq.uid = None
            self.remember(response.all_tokens, response.prompt_cache)
            _emit(seq, events, _final(seq, reason, text + seq.scanner.flush()))
        elif text:
            _emit(seq, events, ChatChunk(text))

    def _finish(self, seq: Generation, reason: str, events: list[Event], text: str = "") -> None:
        """End a sequence still in the batch or parked: a stop string or cancellation."""
        keep = reason != "cancelled"
        if seq.uid is not None:
            caches = self.generator.remove([seq.uid], return_prompt_caches=keep)
            self._active.pop(seq.uid, None)
            seq.uid = None
            if keep and caches:
                ((cache, tokens),) = caches.values()
                self.remember(tokens, cache)
        elif seq.parked is not None:
            self._parked.remove(seq)
            cache, tokens = seq.parked
            seq.parked = None
            if keep:
                self.remember(tokens, cache)
        _emit(seq, events, _final(seq, reason, text))

    def remember(self, tokens: list[int] | None, cache: list[Any] | None) -> None:
        """Keep the KV cache of ``tokens`` for later prompts that start with them."""
        if self.cache is not None and tokens and cache:
            self.cache.insert_cache(CACHE_KEY, list(tokens), cache)

    # -- backpressure -----------------------------------------------------------------------
    def _park(self, seq: Generation) -> None:
        """Take a sequence whose reader fell behind out of the batch, with its KV cache:
        the batch goes on without it and nothing more is buffered for the reader. Caches
        that cannot be trimmed (sliding-window layers) cannot rejoin, so stay."""
        assert seq.uid is not None
        caches = self.generator.extract_cache([seq.uid])
        ((cache, tokens),) = caches.values()
        if not can_trim_prompt_cache(cache):
            return
        self.generator.remove([seq.uid])
        self._active.pop(seq.uid)
        seq.uid = None
        seq.parked = (cache, list(tokens))
        self._parked.append(seq)

    def _resume(self, seq: Generation) -> None:
        """Rejoin from the last token the reader was given. The token sampled after it was
        dropped with the batch, so the last token is decoded again to sample anew."""
        assert seq.parked is not None
        cache, tokens = seq.parked
        trim_prompt_cache(cache, 1)
        (seq.uid,) = self.generator.insert(
            [tokens[-1:]],
            max_tokens=[seq.max_tokens - seq.generated],
            caches=[cache],
            all_tokens=[tokens[:-1]],
            samplers=[seq.sampler],
            logits_processors=[_processors(seq.params)],
            stop_sequences=[self.eos],
        )
        seq.parked = None
        self._parked.remove(seq)
        self._active[seq.uid] = seq

    # -- teardown -----------------------------------------------------------------------------
    def fail_all(self) -> None:
        """After a failed step: forget every sequence (the caller tells their readers) and
        the generator, which may be mid-step; the next sequence starts a fresh one."""
        self._active.clear()
        self._parked.clear()
        if self._generator is not None:
            self._generator.close()
            self._generator = None

    def close(self) -> None:
        self.fail_all()
        self.cache = None
        self.model = None


def _emit(seq: Generation, events: list[Event], item: ChatChunk | BaseException) -> None:
    seq.produced += 1
    events.append((seq, item))


def prefill(model: Any, tokens: list[int], step: int) -> list[Any]:
    """The KV cache of ``tokens``, computed ``step`` tokens per forward pass as mlx-lm's
    own prefill does (one pass over a long prompt would allocate attention for all of it)."""
    cache = make_prompt_cache(model)
    for start in range(0, len(tokens), step):
        logits = model(mx.array(tokens[start : start + step])[None], cache=cache)
        mx.eval(logits, [c.state for c in cache])
    return cache


def _final(seq: Generation, reason: str, text: str = "") -> ChatChunk:
    return ChatChunk(
        text,
        reason,
        prompt_tokens=len(seq.prompt),
        completion_tokens=seq.generated,
        cached_tokens=seq.cached_tokens,
    )


def _processors(params: ChatParams) -> list[Any]:
    return make_logits_processors(logit_bias=params.logit_bias) if params.logit_bias else []


def _sampler(params: ChatParams) -> Callable[[mx.array], mx.array] | None:
    """This request's sampler, or None for greedy decoding (which the batch then does in
    one call for every greedy row). A random sampler keeps its own key, so a seeded
    request draws the same numbers whatever else shares the batch."""
    if params.temperature <= 0:
        return None
    seed = params.seed if params.seed is not None else secrets.randbits(63)
    state = [mx.random.key(seed)]
    scale = 1.0 / params.temperature
    top_p = params.top_p

    def sample(logprobs: mx.array) -> mx.array:
        keys = mx.random.split(state[0])
        state[0] = keys[0]
        if 0 < top_p < 1:
            logprobs = apply_top_p(logprobs, top_p)
        return mx.random.categorical(logprobs * scale, key=keys[1])

    return sample
