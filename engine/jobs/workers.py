"""The workers that run queued jobs: one dispatcher claims jobs while there is capacity and
runs each in its own task; a reaper takes back expired leases and purges old jobs.

Capacity
    Jobs of a model operation (chat, vision, embed, transcribe) in flight per loaded model
    are at most that model's own concurrency limit (its registry slots); workflow jobs in
    flight at most `jobs_workflow_concurrency`. Claims are filtered by operation and by
    the models with a free slot, so a job waiting for a busy model never holds up one for
    a free model. A queued job whose model is no longer loaded is found by the reaper and
    then claimed so that it fails with the reason, rather than waiting forever.

Leases
    A claimed job holds a lease of `jobs_lease_s`, renewed every third of it, and with
    each progress report (at most one write per PROGRESS_WRITE_S). A renewal refused
    (the job was cancelled, or its lease taken back) cancels the job's task at once; so
    does a cancellation through the service. The outcome is written with finish(), fenced
    by the attempt number: a superseded attempt writes nothing. Queue writes run in
    threads (asyncio.to_thread), never on the event loop; model work runs on the
    registry's worker thread and workflows in the async runner.

Stopping
    stop() stops claiming, cancels the running jobs' tasks and puts their jobs back in the
    queue with release(): a graceful stop does not use up an attempt.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import structlog

from engine.errors import FusionError, InvalidRequest
from engine.jobs.operations import OPERATIONS, OperationEnv
from engine.jobs.queue import MAX_LIMIT, JobQueue
from engine.jobs.types import Job, JobQuery, JobStatus, SortOrder

log = structlog.get_logger(__name__)

# The dispatcher looks at the queue at least this often (another process's submissions,
# a model loaded since): otherwise it sleeps until woken.
POLL_S = 1.0
# The most often a running job's progress is written (each write also renews the lease).
PROGRESS_WRITE_S = 0.25
REAP_MAX_S = 60.0

MODEL_OPERATIONS = tuple(name for name, op in OPERATIONS.items() if op.model_bound)
OTHER_OPERATIONS = tuple(name for name, op in OPERATIONS.items() if not op.model_bound)


@dataclass
class _Beat:
    """A running job's latest progress, and whether it changed since the last write."""

    progress: float = 0.0
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    def report(self, progress: float) -> None:
        if progress != self.progress:
            self.progress = progress
            self.changed.set()


@dataclass
class _Running:
    job: Job
    task: asyncio.Task[None]
    model_id: str | None  # the model whose capacity it uses; None for a workflow job


async def wait_event(event: asyncio.Event, timeout_s: float) -> bool:
    """Wait until `event` is set (True) or `timeout_s` passed (False). Not wait_for: on
    Python 3.11 it loses a cancellation that arrives as the event is set, and a task
    cancelled then would run on."""
    try:
        async with asyncio.timeout(timeout_s):
            await event.wait()
    except TimeoutError:
        return False
    return True


class Workers:
    """Runs jobs of `queue` as `worker_id` (the lease owner)."""

    def __init__(
        self,
        queue: JobQueue,
        env: OperationEnv,
        *,
        worker_id: str,
    ) -> None:
        self._queue = queue
        self._env = env
        self._settings = env.settings
        self._worker_id = worker_id
        self._running: dict[str, _Running] = {}
        self._orphans: tuple[str, ...] = ()  # models of queued jobs that are not loaded
        self._loaded: frozenset[str] | None = None  # the loaded models at the last look
        self._woken = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._stopping = False

    # -- lifecycle --------------------------------------------------------------------
    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stopping = False
        self._tasks = [
            asyncio.create_task(self._dispatch(), name="jobs-dispatcher"),
            asyncio.create_task(self._reap(), name="jobs-reaper"),
        ]

    async def stop(self) -> None:
        if not self._tasks:  # never started, or stopped already
            return
        self._stopping = True
        self._woken.set()
        dispatcher, reaper = self._tasks
        reaper.cancel()
        # The dispatcher ends after its claim in flight (a claim cancelled halfway would
        # leave its job processing until the lease expired), so every claimed job is here.
        await asyncio.gather(dispatcher, reaper, return_exceptions=True)
        self._tasks = []
        running = list(self._running.values())
        for item in running:
            item.task.cancel()
        await asyncio.gather(*(item.task for item in running), return_exceptions=True)
        for item in running:
            # Fenced: a job that finished, or was cancelled, before its task stopped stays so.
            if await asyncio.to_thread(self._queue.release, item.job.id, item.job.lease_token):
                log.info("job_released", job_id=item.job.id, attempt=item.job.attempts)
        self._loop = None

    @property
    def running(self) -> bool:
        """Whether the dispatcher and the reaper are both alive (started, not stopped, and
        neither ended by an error)."""
        return bool(self._tasks) and not self._stopping and not any(t.done() for t in self._tasks)

    def wake(self) -> None:
        """Nudge the dispatcher; safe from any thread."""
        loop = self._loop
        if loop is None:
            return
        with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
            loop.call_soon_threadsafe(self._woken.set)

    def interrupt(self, job_id: str) -> None:
        """Stop the job's task now, if it runs here (on the event loop's thread)."""
        item = self._running.get(job_id)
        if item is not None:
            item.task.cancel()

    def capacity(self, job: Job) -> int | None:
        """How many jobs like `job` run at once here; None when its model is not loaded."""
        if job.operation in OTHER_OPERATIONS:
            return self._settings.jobs_workflow_concurrency
        entry = None if job.model_id is None else self._env.models.find(job.model_id)
        return None if entry is None else entry.slots.concurrency

    # -- dispatching ------------------------------------------------------------------
    async def _dispatch(self) -> None:
        while not self._stopping:
            self._woken.clear()
            try:
                while await self._claim_some():
                    pass
            except Exception:
                log.exception("job_claim_failed")
            await wait_event(self._woken, POLL_S)

    async def _claim_some(self) -> bool:
        """Claim at most one model job and one workflow job; whether any was claimed."""
        lease_s = self._settings.jobs_lease_s
        claimed = False
        # model_id None: a workflow job.
        in_flight = Counter(item.model_id for item in self._running.values())
        free = [e.id for e in self._env.models.entries() if in_flight[e.id] < e.slots.concurrency]
        if (free or self._orphans) and not self._stopping:
            job = await asyncio.to_thread(
                self._queue.claim,
                self._worker_id,
                lease_s,
                operations=MODEL_OPERATIONS,
                model_ids=[*free, *self._orphans],
            )
            if job is not None:
                self._launch(job, job.model_id)
                claimed = True
        if in_flight[None] < self._settings.jobs_workflow_concurrency and not self._stopping:
            job = await asyncio.to_thread(
                self._queue.claim, self._worker_id, lease_s, operations=OTHER_OPERATIONS
            )
            if job is not None:
                self._launch(job, None)
                claimed = True
        return claimed

    def _launch(self, job: Job, model_id: str | None) -> None:
        task = asyncio.create_task(self._execute(job), name=f"job:{job.id}")
        self._running[job.id] = _Running(job, task, model_id)
        task.add_done_callback(lambda _: self._done(job.id))
        log.info("job_started", job_id=job.id, operation=job.operation, attempt=job.attempts)

    def _done(self, job_id: str) -> None:
        self._running.pop(job_id, None)
        self._woken.set()

    # -- one job ----------------------------------------------------------------------
    async def _execute(self, job: Job) -> None:
        # Every log line of the job, its model calls and run included, names it.
        with structlog.contextvars.bound_contextvars(job_id=job.id, model_id=job.model_id):
            await self._run_job(job)

    async def _run_job(self, job: Job) -> None:
        beat = _Beat()
        owner = asyncio.current_task()
        assert owner is not None
        heartbeat = asyncio.create_task(self._heartbeat(job, beat, owner))
        result: Any = None
        error: str | None = None
        try:
            op = OPERATIONS.get(job.operation)
            if op is None:
                raise InvalidRequest(f"operation '{job.operation}' is not supported here")
            result = await op.run(self._env, job.model_id, job.input, beat.report)
        except FusionError as exc:
            error = exc.message
        except Exception as exc:
            log.exception("job_crashed", job_id=job.id, operation=job.operation)
            error = f"internal error: {type(exc).__name__}"
        finally:
            # Before finish: a renewal after it would be refused and cancel this task.
            heartbeat.cancel()
            await asyncio.gather(heartbeat, return_exceptions=True)
        written = await asyncio.to_thread(
            self._queue.finish, job.id, job.lease_token, result=result, error=error
        )
        if written:
            log.info("job_finished", job_id=job.id, error=error)
        else:
            log.info("job_result_superseded", job_id=job.id, attempt=job.attempts)

    async def _heartbeat(self, job: Job, beat: _Beat, owner: asyncio.Task[None]) -> None:
        lease_s = self._settings.jobs_lease_s
        loop = asyncio.get_running_loop()
        written_at = -math.inf
        while True:
            if await wait_event(beat.changed, lease_s / 3):
                await asyncio.sleep(max(0.0, written_at + PROGRESS_WRITE_S - loop.time()))
            beat.changed.clear()
            written_at = loop.time()
            if not await asyncio.to_thread(
                self._queue.heartbeat, job.id, job.lease_token, lease_s, beat.progress
            ):
                log.info("job_lease_lost", job_id=job.id, attempt=job.attempts)
                owner.cancel()
                return

    # -- reaping ----------------------------------------------------------------------
    async def _reap(self) -> None:
        interval = min(self._settings.jobs_lease_s / 3, REAP_MAX_S)
        retention_s = self._settings.jobs_retention_hours * 3600
        while True:
            await asyncio.sleep(interval)
            try:
                recovery = await asyncio.to_thread(self._queue.recover)
                purged = await asyncio.to_thread(self._queue.purge, retention_s)
                await self._find_orphans()
            except Exception:
                log.exception("job_reap_failed")
                continue
            if recovery.requeued or recovery.failed or purged:
                log.info(
                    "jobs_reaped",
                    requeued=len(recovery.requeued),
                    failed=len(recovery.failed),
                    purged=purged,
                )
            if recovery.requeued or self._orphans:
                self._woken.set()

    async def _find_orphans(self) -> None:
        """Note the models of queued jobs that are not loaded. Only a model unloaded (or
        not loaded since a restart) leaves such jobs, since a submission's model must be
        loaded: the queue is read when the loaded models changed, or while orphans are
        left, not at every round."""
        models = self._env.models
        loaded = frozenset(e.id for e in models.entries())
        if loaded == self._loaded and not self._orphans:
            return
        self._loaded = loaded
        orphans: set[str] = set()
        offset = 0
        while True:
            query = JobQuery(
                status=JobStatus.QUEUED, limit=MAX_LIMIT, offset=offset, order=SortOrder.ASC
            )
            page = await asyncio.to_thread(self._queue.list, query)
            orphans.update(
                j.model_id
                for j in page.items
                if j.operation in MODEL_OPERATIONS
                and j.model_id is not None
                and models.find(j.model_id) is None
            )
            offset += len(page.items)
            if len(page.items) < MAX_LIMIT:
                break
        self._orphans = tuple(orphans)
