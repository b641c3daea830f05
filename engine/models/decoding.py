"""The asyncio side of continuous batching: requests to one language model join its
DecodeBatch (engine/models/backends/batch_decode.py), which one driver task steps on the
MLX worker thread while any request is in it. Each request reads its own chunks; a reader
that falls behind makes its sequence leave the batch (backpressure), and a reader that
goes away (its stream closed, its task cancelled) frees its place at the next step."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import structlog

from engine.models.backends.base import ChatChunk, ChatParams
from engine.models.backends.textgen import StopScanner
from engine.models.worker import MLXWorker

if TYPE_CHECKING:  # it imports MLX, which only a loaded language model needs
    from engine.models.backends.batch_decode import DecodeBatch

log = structlog.get_logger(__name__)
# How long one call on the worker may decode before it returns: other models' work (an
# embedding pass, a load) waits at most about this long for the shared worker thread.
STEP_BUDGET_S = 0.05


@dataclass(eq=False)
class Generation:
    """One request's generation. Made on the asyncio side; from then on its decoding
    state is the worker's. ``produced`` counts the chunks the worker made for the reader
    and ``consumed`` those the reader took (each written by one thread only); their
    difference is the reader's backlog, which backpressure watches."""

    prompt: list[int]
    params: ChatParams
    stop: threading.Event
    max_tokens: int
    # The chunks (or the error) for the reader, put on the event loop.
    sink: asyncio.Queue[ChatChunk | BaseException] = field(default_factory=asyncio.Queue)
    produced: int = 0
    consumed: int = 0
    # Worker state.
    uid: int | None = None
    parked: tuple[list[Any], list[int]] | None = None  # (KV cache, its tokens) while out
    cached_tokens: int = 0
    generated: int = 0
    sampler: Any = None
    detokenizer: Any = None
    scanner: StopScanner = field(default_factory=lambda: StopScanner([]))

    @property
    def backlog(self) -> int:
        return self.produced - self.consumed


Event = tuple[Generation, ChatChunk | BaseException]


class ContinuousDecoder:
    def __init__(self, batch: DecodeBatch, worker: MLXWorker) -> None:
        self.batch = batch
        self.worker = worker
        self._incoming: list[Generation] = []
        self._live: set[Generation] = set()  # admitted and not yet finished on the worker
        self._wake = asyncio.Event()
        self._driver: asyncio.Task[None] | None = None

    async def generate(
        self, prompt: list[int], params: ChatParams, max_tokens: int, stop: threading.Event
    ) -> AsyncGenerator[ChatChunk, None]:
        """The chunks of one request; the last carries its finish reason and counts.
        Setting ``stop`` (or closing this iterator) ends it at the next step."""
        seq = Generation(prompt, params, stop, max_tokens)
        self._incoming.append(seq)
        self._live.add(seq)
        self.poke()
        try:
            while True:
                item = await seq.sink.get()
                seq.consumed += 1
                if seq.parked is not None and self.batch.caught_up(seq):
                    self.poke()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finish_reason is not None:
                    return
        finally:
            stop.set()
            if seq in self._live:  # still on the worker: it leaves at the next step
                self.poke()

    def poke(self) -> None:
        """Something needs the driver: a new request, a stop, a reader that caught up."""
        self._wake.set()
        self.batch.attention.set()
        if self._driver is None or self._driver.done():
            self._driver = asyncio.create_task(self._drive(), name="lm-decoder")

    async def _drive(self) -> None:
        loop = asyncio.get_running_loop()

        def deliver(events: list[Event]) -> None:  # on the worker thread
            loop.call_soon_threadsafe(self._deliver, events)

        while self._live:
            incoming, self._incoming = self._incoming, []
            self._wake.clear()  # before the step: a poke during it must not be lost
            try:
                runnable = await self.worker.call(self.batch.run, incoming, deliver, STEP_BUDGET_S)
            except Exception as exc:
                log.exception("decode_step_failed", error=repr(exc)[:500])
                await self._fail(exc)
                continue
            if not runnable and not self._incoming:
                await self._wake.wait()

    def _deliver(self, events: list[Event]) -> None:
        for seq, item in events:
            seq.sink.put_nowait(item)
            if isinstance(item, BaseException) or item.finish_reason is not None:
                self._live.discard(seq)

    async def _fail(self, exc: Exception) -> None:
        """A step failed: every request in the batch gets the error, and the batch
        starts afresh for the next ones."""
        await self.worker.call(self.batch.fail_all)
        for seq in self._live:
            seq.sink.put_nowait(exc)
        self._live.clear()
        self._incoming = []

    def close(self) -> None:
        """Stop driving (the model's close drops the batch's arrays on the worker)."""
        if self._driver is not None:
            self._driver.cancel()
