"""Runs in progress: the registry of the runs the engine owns while they run, each with
its task, its trace as it grows, and a bounded log of its events for the clients that
follow it (GET /api/fusion/runs/{id}/events and orchestrate's own stream).

A run belongs to the engine, not to the request that started it: FusionService starts it
as a task of its own, and the request only waits for it (or follows its events). Memory
stays bounded whatever the run emits and however slowly a client reads:

- the log keeps at most `run_events_max` events; beyond it the oldest `token` event is
  dropped first, so the step events (a late joiner's picture of the run) stay; once only
  step events are left, the oldest of those go;
- each subscriber's queue holds at most `run_events_max` events; a subscriber that falls
  that far behind is dropped: its queue is emptied and it gets `Dropped` (the route
  answers an `error` event telling the client to reconnect).
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import structlog

from engine.clock import utc_iso
from engine.runtime.trace import (
    FAILED,
    STEP_CANCELLED,
    STEP_PENDING,
    STEP_RUNNING,
    RunResult,
    StepRecord,
)

if TYPE_CHECKING:
    from engine.fusion.service import PreparedRun, RunOutcome

log = structlog.get_logger(__name__)

CANCELLED = "cancelled"
RUNNING = "running"
TOKEN = "token"
STEP_EVENTS = frozenset({"step_started", "step_finished"})


@dataclass(frozen=True)
class RunEvent:
    """One event of a run (step_started, step_finished, token, or one a step plugin
    emits) with its data."""

    name: str
    data: dict[str, Any]


@dataclass(frozen=True)
class Dropped:
    """The last item a subscriber gets when it fell `behind` events behind the run."""

    run_id: str
    behind: int


class _End:
    """The run has ended: its outcome is on the LiveRun."""


_END = _End()


class Subscription:
    """One client following a run: the events logged when it joined, then live ones, then
    the end (or `Dropped`). Iterate it; `close` it when the client goes."""

    def __init__(self, live: LiveRun, backlog: list[RunEvent], limit: int) -> None:
        self.live = live
        self._backlog = backlog
        self._queue: asyncio.Queue[RunEvent | _End | Dropped] = asyncio.Queue(limit)
        self._limit = limit

    def push(self, item: RunEvent | _End) -> bool:
        """Queue `item`; False (the subscriber is dropped) when its queue is full."""
        try:
            self._queue.put_nowait(item)
        except asyncio.QueueFull:
            while not self._queue.empty():  # free what it holds now, not when it reads
                self._queue.get_nowait()
            self._queue.put_nowait(Dropped(self.live.run_id, self._limit))
            return False
        return True

    async def items(self) -> AsyncIterator[RunEvent | Dropped]:
        """The events, ending at the run's end (or with Dropped)."""
        backlog, self._backlog = self._backlog, []
        for event in backlog:
            yield event
        while True:
            item = await self._queue.get()
            if isinstance(item, _End):
                return
            yield item
            if isinstance(item, Dropped):
                return

    def close(self) -> None:
        self.live.unsubscribe(self)


class LiveRun:
    """A run the engine is running: `task` ends with its RunOutcome (a cancelled run's
    too). `root` is the trace record whose children are the run's top-level step
    records, which the executor updates as the run goes (Runner.run's trace_parent)."""

    def __init__(self, run: PreparedRun, *, max_events: int) -> None:
        self.run = run
        self.run_id = run.run_id
        self.created_at = utc_iso()
        self.started = time.perf_counter()
        self.root = StepRecord(run.workflow.id, "workflow")
        self.task: asyncio.Task[RunOutcome] | None = None
        self.outcome: RunOutcome | None = None
        # Set by cancel(): why the run stopped (stored as its error) and when.
        self.cancel_reason: str | None = None
        self.cancelled_at: str | None = None
        # starting (its row being written), executing (cancel() interrupts the runner),
        # finishing (its end being stored: too late to cancel).
        self.phase = "starting"
        self.changed = asyncio.Event()  # a step started or finished: the row is stale
        self._max_events = max_events
        self._seq = 0
        self._log: OrderedDict[int, RunEvent] = OrderedDict()
        self._tokens: deque[int] = deque()  # seqs of the token events in the log, oldest first
        self._subscribers: set[Subscription] = set()

    @property
    def ended(self) -> bool:
        return self.outcome is not None

    # -- events ---------------------------------------------------------------------------
    def publish(self, event: RunEvent) -> None:
        self._seq += 1
        self._log[self._seq] = event
        if event.name == TOKEN:
            self._tokens.append(self._seq)
        elif event.name in STEP_EVENTS:
            self.changed.set()
        if len(self._log) > self._max_events:
            if self._tokens:
                del self._log[self._tokens.popleft()]
            else:
                self._log.popitem(last=False)
        for subscriber in list(self._subscribers):
            if not subscriber.push(event):
                self._subscribers.discard(subscriber)
                log.info("run_subscriber_dropped", run_id=self.run_id, behind=self._max_events)

    def subscribe(self) -> Subscription:
        """A new follower: the events so far, then live ones. On an ended run it just ends."""
        subscription = Subscription(self, list(self._log.values()), self._max_events)
        if self.ended:
            subscription.push(_END)
        else:
            self._subscribers.add(subscription)
        return subscription

    def unsubscribe(self, subscription: Subscription) -> None:
        self._subscribers.discard(subscription)

    def finish(self, outcome: RunOutcome) -> None:
        self.outcome = outcome
        for subscriber in self._subscribers:
            subscriber.push(_END)  # the queue may be full: then it was dropped already
        self._subscribers.clear()
        self._log.clear()
        self._tokens.clear()

    # -- control ----------------------------------------------------------------------------
    def cancel(self, reason: str) -> bool:
        """Ask the run to stop (its running steps and model calls are cancelled at once);
        False when it has already ended or is ending. The run's task then ends with the
        cancelled run stored."""
        if self.phase == "finishing" or self.cancel_reason is not None or self.task is None:
            return False
        self.cancel_reason = reason
        self.cancelled_at = utc_iso()
        if self.phase == "executing":
            self.task.cancel()
        return True

    # -- results ----------------------------------------------------------------------------
    def steps(self) -> list[StepRecord]:
        return list(self.root.children or [])

    def snapshot(self) -> RunResult:
        """The run as it stands: status running, its trace so far, no output."""
        run = self.run
        return RunResult(
            run_id=self.run_id,
            workflow_id=run.workflow.id,
            workflow_version=run.workflow.version,
            status=RUNNING,
            output=None,
            trace=self.steps(),
            created_at=self.created_at,
            # A running run has no end yet: the §3.1 body's completed_at and
            # total_latency_ms are null until it has.
            completed_at=None,  # type: ignore[arg-type]
            total_latency_ms=None,  # type: ignore[arg-type]
        )

    def cancelled(self) -> RunResult:
        """The run as it stopped: its unfinished steps cancelled, no output."""
        return self._stopped(CANCELLED, self.cancel_reason, self.cancelled_at)

    def failed(self, error: str) -> RunResult:
        """The run as an engine fault outside its steps stopped it."""
        return self._stopped(FAILED, error, None)

    def _stopped(self, status: str, error: str | None, at: str | None) -> RunResult:
        for record in _walk(self.steps()):
            if record.status in (STEP_PENDING, STEP_RUNNING):
                record.status = STEP_CANCELLED
        result = self.snapshot()
        result.status = status
        result.error = error
        result.completed_at = at or utc_iso()
        result.total_latency_ms = round((time.perf_counter() - self.started) * 1000, 3)
        return result


def _walk(records: list[StepRecord]) -> Iterator[StepRecord]:
    for record in records:
        yield record
        yield from _walk(record.children or [])


class LiveRuns:
    """The runs in progress, by run id."""

    def __init__(self) -> None:
        self._runs: dict[str, LiveRun] = {}

    def add(self, live: LiveRun) -> None:
        self._runs[live.run_id] = live

    def remove(self, run_id: str) -> None:
        self._runs.pop(run_id, None)

    def get(self, run_id: str) -> LiveRun | None:
        return self._runs.get(run_id)

    def ids(self) -> list[str]:
        return list(self._runs)

    async def cancel_all(self, reason: str) -> None:
        """Cancel every run and wait until each is stored (server shutdown)."""
        runs = list(self._runs.values())
        for live in runs:
            live.cancel(reason)
        tasks = [live.task for live in runs if live.task is not None]
        await asyncio.gather(*tasks, return_exceptions=True)
        if runs:
            log.info("runs_cancelled_at_shutdown", count=len(runs))
