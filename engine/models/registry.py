"""The model registry: loads and unloads models within a memory budget, admits requests
through each model's bounded queue and concurrency limit, and keeps statistics."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import aclosing, asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import structlog

from engine.config import Settings
from engine.errors import (
    Conflict,
    ErrorCode,
    InsufficientMemory,
    InvalidRequest,
    NotFound,
    QueueFull,
    ServiceUnavailable,
)
from engine.metrics import EngineMetrics, note_model
from engine.models.backends import serving
from engine.models.backends.base import (
    Backend,
    ChatChunk,
    ChatParams,
    ChatResult,
    EmbedResult,
    LoadedModel,
    read_config,
    weight_file_bytes,
)
from engine.models.backends.embeddings import EmbeddingModel
from engine.models.backends.mlx_lm_backend import LmModel
from engine.models.batching import Batcher
from engine.models.decoding import ContinuousDecoder
from engine.models.ids import check_model_id
from engine.models.images import ImagePolicy
from engine.models.memory import active_bytes, gb, release_cached
from engine.models.messages import prompt_chars, text_messages, vision_prompt
from engine.models.params import check_logit_bias, vocab_size
from engine.models.paths import resolve_model_path
from engine.models.stats import ModelStats
from engine.models.types import (
    PRIORITY_RANK,
    BatchPolicy,
    LoadSpec,
    ModelLimits,
    ModelType,
    Operation,
)
from engine.models.worker import MLXWorker

log = structlog.get_logger(__name__)
T = TypeVar("T")
RELEASE_WAIT_S = 10.0


class Slots:
    """A model's admission control: at most ``concurrency`` requests run and at most
    ``max_queue`` wait; past that, QueueFull (429) tells the caller when to retry."""

    def __init__(self, concurrency: int, max_queue: int) -> None:
        self.concurrency = concurrency
        self.max_queue = max_queue
        self.active = 0
        self.waiting = 0
        self._free = asyncio.Semaphore(concurrency)
        self.idle = asyncio.Event()
        self.idle.set()

    async def acquire(self, model_id: str, retry_after_s: int) -> None:
        if self._free.locked() and self.waiting >= self.max_queue:
            raise QueueFull(
                f"model '{model_id}' has {self.waiting} requests queued (limit "
                f"{self.max_queue}); retry later",
                param="model",
                headers={"Retry-After": str(retry_after_s)},
            )
        self.waiting += 1
        try:
            await self._free.acquire()
        finally:
            self.waiting -= 1
        self.active += 1
        self.idle.clear()

    def release(self) -> None:
        self.active -= 1
        if self.active == 0:
            self.idle.set()
        self._free.release()


@dataclass
class ModelEntry:
    id: str
    spec: LoadSpec
    path: Path
    model: LoadedModel
    memory_bytes: int
    load_time_ms: float
    slots: Slots
    created_at: float = field(default_factory=time.time)
    last_used: float = field(default_factory=time.time)
    stats: ModelStats = field(default_factory=ModelStats)
    vocab_size: int | None = None  # from config.json at load: what logit_bias is checked by
    warmup_completed: bool = False
    unloading: bool = False
    stops: set[threading.Event] = field(default_factory=set)
    waiters: set[asyncio.Task[Any]] = field(default_factory=set)
    # Groups the embed requests of an embeddings model; made by its first one.
    embed_batcher: Batcher[list[str], EmbedResult] | None = None
    # Decodes a language model's requests together (None: one at a time on the worker).
    decoder: ContinuousDecoder | None = None

    @property
    def busy(self) -> bool:
        return self.slots.active > 0 or self.slots.waiting > 0

    @property
    def type(self) -> str:
        return self.spec.model_type

    def retry_after_s(self) -> int:
        """A guess at when a queue slot frees: queue length times the median latency."""
        p50 = self.stats.summary()["p50_latency_ms"] or 1000.0
        return max(1, int(self.slots.waiting * p50 / 1000 / max(1, self.slots.concurrency)))


class ModelRegistry:
    def __init__(
        self,
        backends: Mapping[str, Backend],
        *,
        budget_bytes: int,
        worker: MLXWorker | None = None,
        default_concurrency: int = 1,
        default_queue: int = 100,
        images: ImagePolicy | None = None,
        limits: ModelLimits | None = None,
        metrics: EngineMetrics | None = None,
        batching: BatchPolicy | None = None,
    ) -> None:
        self.backends = dict(backends)
        # The engine's instruments; the services built on this registry record through it.
        self.metrics = metrics if metrics is not None else EngineMetrics()
        self.images = images or ImagePolicy.from_settings(Settings())
        self.limits = limits or ModelLimits.from_settings(Settings())
        self.budget_bytes = budget_bytes
        self.worker = worker or MLXWorker()
        self.default_concurrency = default_concurrency
        self.default_queue = default_queue
        self.batching = batching or BatchPolicy.from_settings(Settings())
        self._entries: dict[str, ModelEntry] = {}
        self._loading: dict[str, tuple[LoadSpec, asyncio.Task[ModelEntry]]] = {}
        self._load_lock = asyncio.Lock()

    # -- queries ----------------------------------------------------------------------
    def get(self, model_id: str, param: str = "model_id") -> ModelEntry:
        """The loaded model; NotFound naming ``param`` (the request field) otherwise, or
        InvalidRequest when ``model_id`` is not a well-formed id."""
        check_model_id(model_id, self.limits.id_max_chars, param)
        entry = self.find(model_id)
        if entry is None:
            raise NotFound(
                f"model '{model_id}' not found", param=param, code=ErrorCode.MODEL_NOT_FOUND
            )
        note_model(entry.id)
        return entry

    def require(
        self, model_id: str, types: Sequence[str], purpose: str, param: str = "model_id"
    ) -> ModelEntry:
        """The loaded model, which must be of one of ``types`` to serve ``purpose``:
        NotFound when it is not loaded, InvalidRequest (``wrong_model_type``) otherwise."""
        entry = self.get(model_id, param)
        if entry.type not in types:
            wanted = " or ".join(f"'{t}'" for t in types)
            raise InvalidRequest(
                f"{purpose} needs a model of type {wanted}; '{model_id}' is a '{entry.type}' model",
                param=param,
                code=ErrorCode.WRONG_MODEL_TYPE,
            )
        return entry

    def find(self, model_id: str) -> ModelEntry | None:
        entry = self._entries.get(model_id)
        return None if entry is None or entry.unloading else entry

    def entries(self) -> list[ModelEntry]:
        return [e for e in self._entries.values() if not e.unloading]

    def used_bytes(self) -> int:
        return sum(e.memory_bytes for e in self._entries.values())

    def select(self, model_type: str) -> str | None:
        """The loaded model of a type to use when the caller names none: the most
        recently used one."""
        candidates = [e for e in self.entries() if e.type == model_type]
        return max(candidates, key=lambda e: e.last_used).id if candidates else None

    # -- loading ------------------------------------------------------------------------
    async def load(self, spec: LoadSpec) -> ModelEntry:
        backend = self._backend(spec.model_type)
        model_id = spec.model_id or _id_from_path(spec.model_path)
        check_model_id(model_id, self.limits.id_max_chars)
        spec = spec.with_id(model_id)
        if model_id in self._entries:
            raise Conflict(
                f"model '{model_id}' is already loaded",
                param="model_id",
                code=ErrorCode.MODEL_ALREADY_LOADED,
            )
        pending = self._loading.get(model_id)
        if pending is not None:
            if pending[0].same_model(spec):  # the same load asked twice: load it once
                return await asyncio.shield(pending[1])
            raise Conflict(
                f"model '{model_id}' is being loaded from another path",
                param="model_id",
                code=ErrorCode.MODEL_ALREADY_LOADED,
            )
        task = asyncio.ensure_future(self._load(spec, backend))
        self._loading[model_id] = (spec, task)
        try:
            return await asyncio.shield(task)
        finally:
            if task.done():
                self._loading.pop(model_id, None)
            else:
                task.add_done_callback(lambda _: self._loading.pop(model_id, None))

    def _backend(self, model_type: str) -> Backend:
        if model_type not in tuple(ModelType):
            raise InvalidRequest(
                f"model_type '{model_type}' is not one of {', '.join(ModelType)}",
                param="model_type",
                code=ErrorCode.INVALID_MODEL_TYPE,
            )
        backend = self.backends.get(model_type)
        if backend is None or not backend.available():
            reason = backend.unavailable_reason() if backend else "no backend is configured"
            raise InvalidRequest(
                f"cannot load model_type '{model_type}': {reason}",
                param="model_type",
                code=ErrorCode.BACKEND_UNAVAILABLE,
            )
        return backend

    async def _load(self, spec: LoadSpec, backend: Backend) -> ModelEntry:
        path, config, estimate = Path(spec.model_path), {}, 0
        if backend.reads_files:
            path = await asyncio.to_thread(resolve_model_path, spec.model_path)
            # A clear 400 before any eviction.
            config = await asyncio.to_thread(read_config, path)
            estimate = await asyncio.to_thread(weight_file_bytes, path)  # a directory scan
        async with self._load_lock:
            await self._make_room(spec.model_id or "", estimate)
            started = time.perf_counter()
            model, measured = await self.worker.call(_load_measured, backend, path, spec)
            load_ms = round((time.perf_counter() - started) * 1000, 3)
            concurrency = spec.max_concurrency or self._default_concurrency(spec.model_type)
            entry = ModelEntry(
                id=spec.model_id or "",
                spec=spec,
                path=path,
                model=model,
                memory_bytes=measured or model.weight_bytes,
                load_time_ms=load_ms,
                slots=Slots(
                    concurrency,
                    self.default_queue if spec.max_queue is None else spec.max_queue,
                ),
                vocab_size=vocab_size(config),
                decoder=await self._decoder(model, concurrency),
            )
            self._entries[entry.id] = entry
        note_model(entry.id)
        log.info(
            "model_loaded",
            model_id=entry.id,
            type=spec.model_type,
            memory_gb=gb(entry.memory_bytes),
            weights_gb=gb(model.weight_bytes),
            load_ms=load_ms,
        )
        return entry

    async def _decoder(self, model: LoadedModel, max_batch: int) -> ContinuousDecoder | None:
        """Continuous batching for a language model whose caches can batch: its
        max_concurrency is the batch size."""
        if not isinstance(model, LmModel):
            return None
        policy = self.batching
        batch = await self.worker.call(
            model.start_batching,
            max_batch,
            policy.prompt_cache_bytes,
            policy.stream_backlog_chunks,
        )
        return None if batch is None else ContinuousDecoder(batch, self.worker)

    async def _make_room(self, model_id: str, needed: int) -> None:
        """Evict idle, unpinned models, lowest priority then least recently used first,
        until ``needed`` bytes fit; if even all of them would not do, evict nothing."""
        excess = self.used_bytes() + needed - self.budget_bytes
        if excess <= 0:
            return
        candidates = sorted(
            (e for e in self.entries() if not e.spec.pinned and not e.busy),
            key=lambda e: (PRIORITY_RANK[e.spec.priority], e.last_used),
        )
        victims, freed = [], 0
        for entry in candidates:
            if freed >= excess:
                break
            victims.append(entry)
            freed += entry.memory_bytes
        if freed < excess:
            raise InsufficientMemory(
                f"loading '{model_id}' needs {gb(needed)} GB; the budget is "
                f"{gb(self.budget_bytes)} GB with {gb(self.used_bytes())} GB in use and only "
                f"{gb(sum(e.memory_bytes for e in candidates))} GB evictable",
                param="model_path",
            )
        # Take every victim out of service before the first release awaits: a request
        # admitted to a later victim meanwhile would be killed by its eviction.
        for entry in victims:
            entry.unloading = True
        for entry in victims:
            log.info("model_evicted", model_id=entry.id, for_model=model_id)
            await self._release(entry)

    # -- unloading ------------------------------------------------------------------------
    async def unload(self, model_id: str, *, force: bool = False) -> tuple[int, float]:
        """Unload; returns (bytes freed, milliseconds). In use: 409 unless forced, which
        stops running generations at their next token and fails queued requests."""
        entry = self.get(model_id)
        if entry.busy and not force:
            raise Conflict(
                f"model '{model_id}' is in use ({entry.slots.active} running, "
                f"{entry.slots.waiting} queued); pass force=true to unload anyway",
                param="model_id",
                code=ErrorCode.MODEL_IN_USE,
            )
        started = time.perf_counter()
        freed = await self._release(entry)
        return freed, round((time.perf_counter() - started) * 1000, 3)

    async def _release(self, entry: ModelEntry) -> int:
        entry.unloading = True
        for stop in list(entry.stops):
            stop.set()
        if entry.decoder is not None:
            entry.decoder.poke()
        for waiter in list(entry.waiters):
            waiter.cancel()
        # Running work stops at its next token or batch. A request whose client stopped
        # reading can hold its slot longer; the close is still safe after the bound,
        # because it is queued on the one worker thread behind any generation step.
        try:
            await asyncio.wait_for(entry.slots.idle.wait(), RELEASE_WAIT_S)
        except TimeoutError:
            log.warning("model_release_without_idle", model_id=entry.id, active=entry.slots.active)
        self._entries.pop(entry.id, None)
        if entry.decoder is not None:
            entry.decoder.close()
        freed = await self.worker.call(_close_measured, entry.model)
        log.info("model_unloaded", model_id=entry.id, freed_gb=gb(freed))
        return freed or entry.memory_bytes

    async def close(self) -> None:
        for entry in list(self._entries.values()):
            await self._release(entry)
        self.worker.shutdown()

    # -- serving --------------------------------------------------------------------------
    @asynccontextmanager
    async def use(self, model_id: str) -> AsyncIterator[tuple[ModelEntry, threading.Event]]:
        """Admission for one request: waits in the model's queue, then holds a slot.
        Yields the entry and a stop event that a forced unload sets."""
        entry = self.get(model_id)
        task = asyncio.current_task()
        assert task is not None
        entry.waiters.add(task)
        try:
            await entry.slots.acquire(model_id, entry.retry_after_s())
        except asyncio.CancelledError:
            if entry.unloading:
                # The unload cancelled the wait, not the caller: clear that cancellation so
                # the task's later awaits (timeouts, task groups) are not disturbed by it.
                task.uncancel()
                raise _unloaded(model_id) from None
            raise
        finally:
            entry.waiters.discard(task)
        stop = threading.Event()
        entry.stops.add(stop)
        try:
            if entry.unloading:
                raise _unloaded(model_id)
            yield entry, stop
        finally:
            # Whatever ends the request (an answer, an error, its task cancelled), work it
            # left on the worker stops at its next check rather than run on unowned.
            stop.set()
            entry.stops.discard(stop)
            entry.last_used = time.time()
            entry.slots.release()

    async def chat_stream(
        self, model_id: str, messages: Sequence[dict[str, Any]], params: ChatParams
    ) -> AsyncIterator[ChatChunk]:
        started = time.perf_counter()
        entry = self.get(model_id)
        self._check_prompt_chars(prompt_chars(messages), "messages")
        check_logit_bias(entry.vocab_size, params)
        generate = await self._generation(entry, messages, params)
        async with self.use(model_id) as (entry, stop):
            total = 0
            finished = False
            first = True
            try:
                # aclosing: when this stream is closed early, the generation is stopped
                # here, before `use` gives the slot back (left to the garbage collector,
                # it ran on after the next request was admitted).
                async with aclosing(generate(stop)) as chunks:
                    async for chunk in chunks:
                        if first:
                            first = False
                            self.metrics.observe_first_token(
                                model_id, time.perf_counter() - started
                            )
                        total = chunk.prompt_tokens + chunk.completion_tokens or total
                        if chunk.finish_reason == "cancelled" and entry.unloading:
                            raise _unloaded(model_id)
                        finished = chunk.finish_reason is not None
                        if finished:
                            self.metrics.observe_generation(
                                model_id, chunk.prompt_tokens, chunk.completion_tokens
                            )
                        yield chunk
                # A forced unload makes the worker drop the generation before its last
                # chunk: say so, rather than end the stream as if the answer were complete.
                if not finished and entry.unloading:
                    raise _unloaded(model_id)
            except (InvalidRequest, ServiceUnavailable):
                raise
            except Exception as exc:
                entry.stats.record_error(f"{type(exc).__name__}: {exc}")
                raise
            entry.stats.record((time.perf_counter() - started) * 1000, total)

    def _check_prompt_chars(self, chars: int, param: str) -> None:
        """Refuse a prompt too long to tokenize before any work on it: tokenizing is linear
        but holds the worker, and the context-length check can only follow it."""
        limit = self.limits.max_prompt_chars
        if chars > limit:
            raise InvalidRequest(
                f"the prompt has {chars} characters; the limit is {limit} "
                "(setting model_max_prompt_chars)",
                param=param,
                code=ErrorCode.PROMPT_TOO_LONG,
            )

    async def _generation(
        self, entry: ModelEntry, messages: Sequence[dict[str, Any]], params: ChatParams
    ) -> Callable[[threading.Event], AsyncGenerator[ChatChunk, None]]:
        """What generates the answer once the request holds a slot, given its stop event.
        The prompt is made ready first, before the request takes a slot: a multimodal
        model's images fetched, a batching language model's prompt tokenized (off the
        worker, which the batch's decoding needs)."""
        model = entry.model
        prompt: Any
        if entry.type == ModelType.MULTIMODAL:
            prompt = await vision_prompt(messages, self.images)
        else:
            prompt = text_messages(messages)
        decoder = entry.decoder
        if decoder is None:
            return lambda stop: self.worker.stream(
                lambda: model.chat_stream(prompt, params, stop), stop
            )
        assert isinstance(model, LmModel)
        tokens, max_tokens = await asyncio.to_thread(model.generation_prompt, prompt, params)
        return lambda stop: decoder.generate(tokens, params, max_tokens, stop)

    async def chat(
        self,
        model_id: str,
        messages: Sequence[dict[str, Any]],
        params: ChatParams,
        on_text: Callable[[str], None] | None = None,
    ) -> ChatResult:
        """The whole answer; ``on_text`` (if given) sees each piece as it is generated."""
        parts: list[str] = []
        last = ChatChunk("")
        async for chunk in self.chat_stream(model_id, messages, params):
            parts.append(chunk.text)
            last = chunk
            if on_text is not None and chunk.text:
                on_text(chunk.text)
        return ChatResult(
            "".join(parts),
            last.finish_reason or "stop",
            last.prompt_tokens,
            last.completion_tokens,
            last.cached_tokens,
        )

    async def _serve(
        self,
        model_id: str,
        call: Callable[[ModelEntry, threading.Event], T],
        tokens: Callable[[T], int],
    ) -> T:
        """One blocking request on the worker thread, admitted and counted in the stats."""
        return await self._admitted(
            model_id, lambda entry, stop: self.worker.call(call, entry, stop), tokens
        )

    async def _admitted(
        self,
        model_id: str,
        run: Callable[[ModelEntry, threading.Event], Awaitable[T]],
        tokens: Callable[[T], int],
    ) -> T:
        """One request, admitted and counted in the stats."""
        started = time.perf_counter()
        async with self.use(model_id) as (entry, stop):
            try:
                result = await run(entry, stop)
            except (InvalidRequest, ServiceUnavailable):
                raise
            except Exception as exc:
                entry.stats.record_error(f"{type(exc).__name__}: {exc}")
                raise
            if stop.is_set() and entry.unloading:
                raise _unloaded(model_id)
            entry.stats.record((time.perf_counter() - started) * 1000, tokens(result))
            return result

    async def embed(self, model_id: str, texts: Sequence[str]) -> EmbedResult:
        """The vectors of ``texts``, in order. An embeddings model's requests that wait
        while one of its passes runs share the next pass (engine/models/batching.py);
        each is admitted, answered and counted on its own."""

        async def run(entry: ModelEntry, stop: threading.Event) -> EmbedResult:
            if not isinstance(entry.model, EmbeddingModel):  # the base class's clear refusal
                return await self.worker.call(entry.model.embed, list(texts), stop)
            return await self._embed_batcher(entry).submit(list(texts))

        return await self._admitted(model_id, run, lambda r: r.prompt_tokens)

    def _embed_batcher(self, entry: ModelEntry) -> Batcher[list[str], EmbedResult]:
        if entry.embed_batcher is None:
            model = entry.model
            assert isinstance(model, EmbeddingModel)

            async def run(groups: list[list[str]], stop: threading.Event) -> list[EmbedResult]:
                if entry.unloading:
                    raise _unloaded(entry.id)
                entry.stops.add(stop)  # a forced unload ends the pass at its next batch
                try:
                    results = await self.worker.call(model.embed_groups, groups, stop)
                finally:
                    entry.stops.discard(stop)
                if stop.is_set() and entry.unloading:
                    raise _unloaded(entry.id)
                return results

            entry.embed_batcher = Batcher(run, bound=self.batching.embed_max_texts, size=len)
        return entry.embed_batcher

    def _default_concurrency(self, model_type: str) -> int:
        """Requests a model admits at once unless its load says: a language model's batch;
        for an embeddings model at least a full pass of one-text requests, since admitted
        requests share passes."""
        if model_type == ModelType.LM:
            return self.batching.max_batch
        if model_type == ModelType.EMBEDDINGS:
            return max(self.default_concurrency, self.batching.embed_max_texts)
        return self.default_concurrency

    async def relevance(
        self, model_id: str, query: str, documents: Sequence[str], instruction: str
    ) -> list[float]:
        """Rerank scores in [0, 1] from a language model's yes/no judgement."""
        return await self._serve(
            model_id,
            lambda entry, _: entry.model.relevance(query, list(documents), instruction),
            lambda scores: 0,
        )

    async def transcribe(self, model_id: str, audio: Any, language: str | None) -> dict[str, Any]:
        """Speech to text: ``audio`` is float32 mono 16 kHz samples (a numpy array)."""
        self.require(model_id, serving(Operation.TRANSCRIBE), "transcription", param="model")
        return await self._serve(
            model_id,
            lambda entry, stop: entry.model.transcribe(audio, language, stop),
            lambda r: 0,
        )

    async def warmup(self, model_id: str, prompt: str, max_length: int) -> tuple[float, int]:
        """Prefill the first tokens of ``prompt``: at most ``max_length``, the model's
        context length and the warmup setting, whichever is least (the answer's token
        count says how many)."""
        entry = self.get(model_id)
        self._check_prompt_chars(len(prompt), "prompt")
        bounds = (max_length, self.limits.warmup_max_tokens, entry.model.context_length)
        max_length = min(b for b in bounds if b)
        async with self.use(model_id) as (entry, _):
            started = time.perf_counter()
            tokens = await self.worker.call(entry.model.warmup, prompt, max_length)
            entry.warmup_completed = True
            return round((time.perf_counter() - started) * 1000, 3), tokens

    async def count_tokens(self, model_id: str, text: str) -> int:
        """Tokenizer work only: on a thread of its own, so that neither the event loop
        nor a language model's batch on the worker waits for a long text."""
        entry = self.get(model_id)
        self._check_prompt_chars(len(text), "input")
        return await asyncio.to_thread(entry.model.count_tokens, text)


def _unloaded(model_id: str) -> ServiceUnavailable:
    return ServiceUnavailable(
        f"model '{model_id}' was unloaded while the request was pending",
        param="model",
        code=ErrorCode.MODEL_UNLOADED,
    )


def _id_from_path(model_path: str) -> str:
    local = Path(model_path).expanduser()
    return local.name if local.is_dir() else model_path.strip("/")


def _load_measured(backend: Backend, path: Path, spec: LoadSpec) -> tuple[LoadedModel, int]:
    """On the worker thread: load, and measure what MLX allocated for it."""
    release_cached()
    before = active_bytes()
    model = backend.load(path, spec.context_length)
    return model, max(0, active_bytes() - before)


def _close_measured(model: LoadedModel) -> int:
    before = active_bytes()
    model.close()
    release_cached()
    return max(0, before - active_bytes())
