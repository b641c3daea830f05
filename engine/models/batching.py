"""Grouping of requests that arrive together into shared model passes (issue #12).

A ``Batcher`` serves one model's requests. The first request starts a pass at once; requests
that arrive while a pass runs wait, and when it ends they go together into the next pass,
oldest first, as long as their total size stays within the bound (a request larger than the
bound goes alone, never split). There is no timer: a lone request never waits for company.

Each request gets its own result back. A caller that gives up is dropped before its pass,
or its result is discarded; when every caller of a running pass has given up, the pass's
stop event is set. If a pass of several requests fails, each is run again alone, so an
error that belongs to one request fails that request only.
"""

from __future__ import annotations

import asyncio
import contextvars
import threading
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

import structlog

log = structlog.get_logger(__name__)
I = TypeVar("I")  # noqa: E741  (a request's item)
R = TypeVar("R")


@dataclass(eq=False)
class _Member(Generic[I, R]):
    item: I
    size: int
    future: asyncio.Future[R]


@dataclass
class BatchStats:
    """What the passes did: ``passes`` run (retries alone included), ``requests`` and
    ``units`` (texts) they carried, and the most units one pass held."""

    passes: int = 0
    requests: int = 0
    units: int = 0
    largest: int = 0


class Batcher(Generic[I, R]):
    def __init__(
        self,
        run: Callable[[list[I], threading.Event], Awaitable[list[R]]],
        *,
        bound: int,
        size: Callable[[I], int],
    ) -> None:
        """``run`` serves a group: one result per item, in order; it watches the event,
        which is set when every caller of the group has given up."""
        self._run = run
        self.bound = bound
        self._size = size
        self._pending: deque[_Member[I, R]] = deque()
        self._driver: asyncio.Task[None] | None = None
        self.stats = BatchStats()

    @property
    def waiting(self) -> int:
        """Requests queued for a later pass."""
        return sum(1 for m in self._pending if not m.future.done())

    async def submit(self, item: I) -> R:
        loop = asyncio.get_running_loop()
        member: _Member[I, R] = _Member(item, self._size(item), loop.create_future())
        self._pending.append(member)
        if self._driver is None:
            # A fresh context: the passes serve many requests, not the first one's logs.
            self._driver = loop.create_task(self._drive(), context=contextvars.Context())
        return await member.future

    async def _drive(self) -> None:
        group: list[_Member[I, R]] = []
        try:
            while group := self._cut():
                await self._pass(group)
        finally:
            self._driver = None
            # Reached with members unanswered only when this task is cancelled (the loop
            # closing): their callers must not wait forever.
            for member in [*group, *self._pending]:
                if not member.future.done():
                    member.future.cancel()
            self._pending.clear()

    def _cut(self) -> list[_Member[I, R]]:
        group: list[_Member[I, R]] = []
        total = 0
        while self._pending:
            member = self._pending[0]
            if member.future.done():  # its caller gave up while it waited
                self._pending.popleft()
                continue
            if group and total + member.size > self.bound:
                break
            group.append(self._pending.popleft())
            total += member.size
        return group

    async def _pass(self, group: list[_Member[I, R]]) -> None:
        stop = threading.Event()

        def abandoned(_: asyncio.Future[R]) -> None:
            if all(m.future.cancelled() for m in group):
                stop.set()

        for member in group:
            member.future.add_done_callback(abandoned)
        units = sum(m.size for m in group)
        self.stats.passes += 1
        self.stats.requests += len(group)
        self.stats.units += units
        self.stats.largest = max(self.stats.largest, units)
        try:
            results = await self._run([m.item for m in group], stop)
        except Exception as exc:
            if len(group) == 1:
                if not group[0].future.done():
                    group[0].future.set_exception(exc)
                return
            log.info("batch_failed_retrying_alone", requests=len(group), error=repr(exc))
            for member in group:
                if not member.future.done():
                    await self._pass([member])
            return
        finally:
            for member in group:
                member.future.remove_done_callback(abandoned)
        for member, result in zip(group, results, strict=True):
            if not member.future.done():
                member.future.set_result(result)
