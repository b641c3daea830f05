"""JobService: what the §5.1-5.4 routes call. Submit (validated per operation before
anything is queued), get, list, cancel, and stream a job's events; it owns the workers
that run the jobs (engine/jobs/workers.py).

Position and estimate (a queued job's `position_in_queue` and `estimated_completion_ms`)
    position_in_queue is 1 for the job claimed next, 2 for the one after, and so on, over
    every queued job (priority with aging, engine/jobs/queue.py).
    estimated_completion_ms = per_job_ms * ceil(position_in_queue / capacity), where
    per_job_ms is the mean claim-to-completion time of the last 50 completed jobs of the
    same operation and model, or, before there is one, the model's measured median
    (p50) request latency (its registry statistics), and capacity is how many such jobs
    run at once (the model's concurrency limit; `jobs_workflow_concurrency` for workflow
    jobs). It is null when neither time was measured yet, when the job's model is not
    loaded, and for a job that is not queued.
"""

from __future__ import annotations

import asyncio
import math
import os
import socket
import uuid
from collections import defaultdict
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import structlog

from engine.config import Settings
from engine.fusion.service import FusionService, RunOutcome
from engine.jobs.operations import OperationEnv, operation
from engine.jobs.queue import JobQueue
from engine.jobs.types import (
    Job,
    JobEvent,
    JobEventName,
    JobPage,
    JobPriority,
    JobQuery,
    JobRequest,
    JobStatus,
)
from engine.jobs.webhooks import check_metadata, check_secret, check_url
from engine.jobs.workers import MODEL_OPERATIONS, Workers, wait_event
from engine.models.registry import ModelRegistry

log = structlog.get_logger(__name__)

# A stream of a job's events re-reads them at least this often (a change made by another
# process is not announced here); changes made here wake it at once.
EVENTS_POLL_S = 2.0
_TERMINAL_EVENTS = frozenset({JobEventName.COMPLETED, JobEventName.FAILED, JobEventName.CANCELLED})


@dataclass(frozen=True)
class JobSubmission:
    """What the route parsed from POST /api/mcp/jobs."""

    operation: str
    input: Any
    model_id: str | None
    priority: JobPriority = JobPriority.NORMAL
    callback_url: str | None = None
    callback_secret: str | None = None
    metadata: Any = None
    idempotency_key: str | None = None


@dataclass(frozen=True)
class JobState:
    """A job and, while it is queued, its place in line and the estimate (module doc)."""

    job: Job
    position_in_queue: int | None
    estimated_completion_ms: float | None


class JobService:
    def __init__(
        self,
        queue: JobQueue,
        models: ModelRegistry,
        fusion: FusionService,
        settings: Settings,
        run_body: Callable[[RunOutcome], Any],
    ) -> None:
        self._queue = queue
        self._models = models
        self._settings = settings
        self._env = OperationEnv(models, fusion, settings, run_body)
        worker_id = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._workers = Workers(queue, self._env, worker_id=worker_id)
        self._watchers: defaultdict[str, set[asyncio.Event]] = defaultdict(set)
        self._loop: asyncio.AbstractEventLoop | None = None
        queue.on_event(observe=self._observe)

    @property
    def queue(self) -> JobQueue:
        return self._queue

    # -- lifecycle --------------------------------------------------------------------
    async def start(self) -> None:
        """Take back every lease (this is the only server: whatever was processing was
        left by a process that ended), purge expired jobs, then start the workers."""
        self._loop = asyncio.get_running_loop()
        recovery = await asyncio.to_thread(self._queue.recover, math.inf)
        purged = await asyncio.to_thread(
            self._queue.purge, self._settings.jobs_retention_hours * 3600
        )
        log.info(
            "jobs_started",
            requeued=len(recovery.requeued),
            failed=len(recovery.failed),
            purged=purged,
        )
        await self._workers.start()

    async def stop(self) -> None:
        """Stop claiming; running jobs are stopped and put back in the queue."""
        await self._workers.stop()
        self._loop = None

    @property
    def workers_running(self) -> bool:
        """Whether the workers claim and reap jobs (/health, /health/ready)."""
        return self._workers.running

    def wake(self) -> None:
        """Nudge the dispatcher; safe from any thread."""
        self._workers.wake()

    # -- requests ---------------------------------------------------------------------
    async def submit(self, submission: JobSubmission) -> tuple[JobState, bool]:
        """Validate, then queue (committed before returning). The bool says whether this
        call created the job (False: a repeated Idempotency-Key with the same request)."""
        op = operation(submission.operation)
        if submission.callback_url is not None:
            check_url(submission.callback_url, param="callback_url")
        check_secret(submission.callback_secret, param="callback_secret")
        check_metadata(submission.metadata, self._settings.jobs_metadata_max_bytes)
        await op.check(self._env, submission.model_id, submission.input)
        request = JobRequest(
            operation=submission.operation,
            input=submission.input,
            model_id=submission.model_id,
            priority=submission.priority,
            callback_url=submission.callback_url,
            callback_secret=submission.callback_secret,
            metadata=submission.metadata,
            idempotency_key=submission.idempotency_key,
        )
        submitted = await asyncio.to_thread(self._queue.submit, request)
        return await self._state(submitted.job), submitted.created

    async def get(self, job_id: str) -> JobState:
        return await self._state(await asyncio.to_thread(self._queue.get, job_id))

    async def list(self, query: JobQuery | None = None) -> JobPage:
        return await asyncio.to_thread(self._queue.list, query)

    async def cancel(self, job_id: str) -> Job:
        """Cancel a queued or processing job (409 once finished); a running one stops at
        once (a generation at its next token, freeing its model slot)."""
        job = await asyncio.to_thread(self._queue.cancel, job_id)
        self._workers.interrupt(job_id)
        return job

    async def events(self, job_id: str, after: int = 0) -> AsyncIterator[JobEvent]:
        """The job's stored events with seq > `after`, then new ones as they happen; ends
        after the terminal one, or at once when the job ended before `after` (NotFound if
        the job is unknown, or purged meanwhile)."""
        changed = asyncio.Event()
        self._watchers[job_id].add(changed)
        try:
            ended = False
            while True:
                changed.clear()
                batch = await asyncio.to_thread(self._queue.events, job_id, after)
                for event in batch:
                    after = event.seq
                    yield event
                    if event.name in _TERMINAL_EVENTS:
                        return
                if ended:
                    return
                if not batch and (await asyncio.to_thread(self._queue.get, job_id)).status.terminal:
                    # It may have ended after the read above: read its last events once more.
                    ended = True
                    continue
                await wait_event(changed, EVENTS_POLL_S)
        finally:
            watchers = self._watchers[job_id]
            watchers.discard(changed)
            if not watchers:
                del self._watchers[job_id]

    # -- internals --------------------------------------------------------------------
    async def _state(self, job: Job) -> JobState:
        if job.status is not JobStatus.QUEUED:
            return JobState(job, None, None)
        position, recent_ms = await asyncio.to_thread(self._place, job)
        if position is None:  # claimed meanwhile
            return JobState(job, None, None)
        return JobState(job, position, self._estimate(job, position, recent_ms))

    def _place(self, job: Job) -> tuple[int | None, float | None]:
        return (
            self._queue.position_in_queue(job.id),
            self._queue.recent_run_ms(job.operation, job.model_id),
        )

    def _estimate(self, job: Job, position: int, recent_ms: float | None) -> float | None:
        capacity = self._workers.capacity(job)
        per_job_ms = recent_ms
        if per_job_ms is None and job.operation in MODEL_OPERATIONS and job.model_id:
            entry = self._models.find(job.model_id)
            if entry is not None:
                per_job_ms = entry.stats.summary()["p50_latency_ms"]
        if per_job_ms is None or not capacity:
            return None
        return round(per_job_ms * math.ceil(position / capacity), 3)

    def _observe(self, events: Sequence[JobEvent]) -> None:
        """Queue events, once committed, in whichever thread committed them."""
        loop = self._loop
        if loop is None:
            return
        try:
            loop.call_soon_threadsafe(self._on_events, events)
        except RuntimeError:  # the loop closed meanwhile: nobody is left to tell
            return

    def _on_events(self, events: Sequence[JobEvent]) -> None:
        for event in events:
            for changed in self._watchers.get(event.job.id, ()):
                changed.set()
            if event.name is JobEventName.QUEUED:
                self._workers.wake()
            elif event.name is JobEventName.CANCELLED:
                self._workers.interrupt(event.job.id)
