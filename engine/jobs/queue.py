"""The durable job queue (spec §5): a small interface, `JobQueue`, and its embedded SQLite
backend, `SqliteJobQueue`.

Routes and workers (issue #10) are to depend on `JobQueue` only, so that a backend for
several servers sharing one database can be added later without touching them.

Events
    Every change of status records a `job_events` row (the §5.8 payload) in the same
    transaction; `on_event(record=...)` hooks join that transaction (the webhook outbox),
    `on_event(observe=...)` hooks see the events after the commit (to wake waiters).

Leases and fencing
    claim() hands out a lease, not a flag: the job becomes `processing`, its attempt count
    goes up by one and `lease_expires_at` is set. The attempt number is the lease token.
    heartbeat() extends the lease and records progress; finish() writes the terminal
    status; release() hands the job back to the queue (a graceful stop: the attempt is not
    counted). Both act only if the job is still `processing` under the same attempt, so a
    cancelled job never completes and an attempt whose lease was taken back (recover(),
    then perhaps a new claim) writes nothing. A lease that expired is taken back only by
    recover(); until then its holder may still heartbeat or finish, since nobody else has
    the job. recover() puts expired leases back in the queue, or fails the job with a
    reason once `max_attempts` claims have been made, so no job stays `processing`
    forever. After a restart of the only server, `recover(now=math.inf)` takes back every
    lease at once.

Priority with aging
    Each job gets a scheduling key when submitted:
    ``sched_at = created_at + rank * aging_s`` (rank 0 high, 1 normal, 2 low), and claim()
    takes the queued job with the smallest key (submission order among equal keys). So a
    job is claimed before every job of a higher priority submitted more than
    ``(rank difference) * aging_s`` after it. Bound: a low job is overtaken only by high
    jobs submitted less than ``2 * aging_s`` after it (normal jobs: ``aging_s``), and by
    what was queued before it; under a constant stream of high jobs at rate r, it starts
    after at most the jobs ahead of it when submitted plus ``2 * aging_s * r`` high jobs.
    The key is fixed at submission, so it is indexed (claim, recover and purge name
    their partial index: without ANALYZE statistics SQLite would pick the status index
    and sort every queued job); a re-queued job keeps its key (its place in line).

Durability
    Every state change is one transaction (`Store.transaction()`); submit() returns only
    after its commit, so a job whose submission was answered survives the process being
    killed (WAL with synchronous=NORMAL: a power loss may lose the last commits, a crash
    of the process does not). Claims are serialized by SQLite's write lock (BEGIN
    IMMEDIATE), so two claimers, in threads or processes, never get the same job.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Protocol

import apsw

from engine.config import Settings
from engine.errors import Conflict, ErrorCode, InvalidRequest, NotFound, QueueFull
from engine.jobs.types import (
    Job,
    JobEvent,
    JobEventName,
    JobPage,
    JobPriority,
    JobQuery,
    JobRequest,
    JobSort,
    JobStatus,
    Recovery,
    SortOrder,
    Submission,
)
from engine.jobs.views import event_payload
from engine.store import Store, register_migration

MAX_LIMIT = 1000

register_migration(
    200,
    "jobs",
    """
    CREATE TABLE jobs (
        seq INTEGER PRIMARY KEY,
        id TEXT NOT NULL UNIQUE,
        operation TEXT NOT NULL,
        model_id TEXT,
        input TEXT NOT NULL CHECK (json_valid(input)),
        priority TEXT NOT NULL CHECK (priority IN ('high', 'normal', 'low')),
        sched_at REAL NOT NULL,
        status TEXT NOT NULL
            CHECK (status IN ('queued', 'processing', 'completed', 'failed', 'cancelled')),
        attempts INTEGER NOT NULL CHECK (attempts >= 0),
        max_attempts INTEGER NOT NULL CHECK (max_attempts >= 1),
        lease_owner TEXT,
        lease_expires_at REAL,
        progress REAL CHECK (progress IS NULL OR (progress >= 0 AND progress <= 1)),
        result TEXT CHECK (result IS NULL OR json_valid(result)),
        error TEXT,
        callback_url TEXT,
        callback_secret TEXT,
        metadata TEXT CHECK (metadata IS NULL OR json_valid(metadata)),
        idempotency_key TEXT UNIQUE,
        request_hash TEXT NOT NULL,
        created_at REAL NOT NULL,
        started_at REAL,
        completed_at REAL
    ) STRICT;
    CREATE INDEX jobs_queued ON jobs (sched_at, seq) WHERE status = 'queued';
    CREATE INDEX jobs_leases ON jobs (lease_expires_at) WHERE status = 'processing';
    CREATE INDEX jobs_finished ON jobs (completed_at) WHERE completed_at IS NOT NULL;
    CREATE INDEX jobs_by_status ON jobs (status, created_at);
    CREATE INDEX jobs_by_model ON jobs (model_id, created_at);
    CREATE TABLE job_events (
        seq INTEGER PRIMARY KEY,
        job_id TEXT NOT NULL,
        event TEXT NOT NULL,
        at REAL NOT NULL,
        payload TEXT NOT NULL CHECK (json_valid(payload))
    ) STRICT;
    CREATE INDEX job_events_by_job ON job_events (job_id, seq);
    -- Jobs per status, kept by triggers in the transaction of every change: the bound on
    -- queued jobs is checked at each submit, and count(*) costs a scan of every waiting job.
    CREATE TABLE job_counts (status TEXT PRIMARY KEY, n INTEGER NOT NULL) STRICT;
    INSERT INTO job_counts (status, n) VALUES
        ('queued', 0), ('processing', 0), ('completed', 0), ('failed', 0), ('cancelled', 0);
    CREATE TRIGGER jobs_counted_insert AFTER INSERT ON jobs BEGIN
        UPDATE job_counts SET n = n + 1 WHERE status = NEW.status;
    END;
    CREATE TRIGGER jobs_counted_update AFTER UPDATE OF status ON jobs
    WHEN OLD.status != NEW.status BEGIN
        UPDATE job_counts SET n = n - 1 WHERE status = OLD.status;
        UPDATE job_counts SET n = n + 1 WHERE status = NEW.status;
    END;
    CREATE TRIGGER jobs_counted_delete AFTER DELETE ON jobs BEGIN
        UPDATE job_counts SET n = n - 1 WHERE status = OLD.status;
    END;
    """,
)

_COLUMNS = (
    "id, operation, model_id, input, priority, status, attempts, max_attempts, lease_owner, "
    "lease_expires_at, progress, result, error, callback_url, callback_secret, metadata, "
    "idempotency_key, request_hash, created_at, started_at, completed_at"
)

_BY_ID_SQL = f"SELECT {_COLUMNS} FROM jobs WHERE id = ?"
# Runs inside the transaction that records the event (a webhook outbox adds its deliveries
# there, so they are committed, or lost, together with the change).
EventRecorder = Callable[[apsw.Connection, JobEvent], None]
# Runs after that transaction committed, in the committing thread (wakes waiters).
EventObserver = Callable[[list[JobEvent]], None]
# Runs inside purge()'s transaction with its cutoff (epoch seconds): what was kept for the
# jobs finished before it (webhook deliveries) goes with them.
PurgeHook = Callable[[apsw.Connection, float], object]
_PRIORITY_RANK_SQL = "CASE priority WHEN 'high' THEN 0 WHEN 'normal' THEN 1 ELSE 2 END"
_SORT_SQL = {
    JobSort.CREATED_AT: "created_at",
    JobSort.COMPLETED_AT: "completed_at",
    JobSort.PRIORITY: _PRIORITY_RANK_SQL,
    JobSort.STATUS: "status",
}


class JobQueue(Protocol):
    """The queue routes and workers use. Errors are engine.errors': 404 `job_not_found`,
    409 `conflict`, 429 `queue_full` (with Retry-After), 400 for an invalid listing."""

    def submit(self, request: JobRequest) -> Submission:
        """Queue a job, committed before returning. A repeated Idempotency-Key answers
        the existing job (same request) or raises Conflict (another request); a full
        queue raises QueueFull."""
        ...

    def claim(
        self,
        worker_id: str,
        lease_s: float,
        *,
        operations: Sequence[str] | None = None,
        model_ids: Sequence[str | None] | None = None,
    ) -> Job | None:
        """Lease the next job (of these operations / models, when given), or None."""
        ...

    def heartbeat(
        self, job_id: str, lease_token: int, lease_s: float, progress: float | None = None
    ) -> bool:
        """Extend the lease by `lease_s` from now and record progress in [0, 1]. False when
        the lease is no longer this attempt's (cancelled or taken back): stop working."""
        ...

    def finish(
        self, job_id: str, lease_token: int, *, result: Any = None, error: str | None = None
    ) -> bool:
        """Complete the job with `result`, or fail it with `error`. False (nothing written)
        when the lease is no longer this attempt's."""
        ...

    def release(self, job_id: str, lease_token: int) -> bool:
        """Put a processing job back in the queue without using up its attempt (a worker
        stopping gracefully). False (nothing written) when the lease is no longer this
        attempt's. The next claim hands out the same attempt number, so the releasing
        worker must not use its token again."""
        ...

    def cancel(self, job_id: str) -> Job:
        """Cancel a queued or processing job; a finished one raises Conflict."""
        ...

    def get(self, job_id: str) -> Job:
        """The job, or NotFound."""
        ...

    def list(self, query: JobQuery | None = None) -> JobPage:
        """A page of jobs and the total matching the filters (all jobs, newest first, when
        None)."""
        ...

    def counts(self) -> dict[JobStatus, int]:
        """Jobs per status, read in constant time."""
        ...

    def position_in_queue(self, job_id: str) -> int | None:
        """1 for the job claimed next, and so on; None when the job is not queued."""
        ...

    def recover(self, now: float | None = None) -> Recovery:
        """Take back leases expired at `now` (the clock's time when None)."""
        ...

    def purge(self, older_than_s: float) -> int:
        """Delete jobs finished more than `older_than_s` ago, and their events; returns
        how many jobs."""
        ...

    def events(self, job_id: str, after_seq: int = 0) -> Sequence[JobEvent]:
        """The job's events with seq > `after_seq`, oldest first (NotFound: no such job)."""
        ...

    def recent_run_ms(self, operation: str, model_id: str | None, sample: int = 50) -> float | None:
        """Mean milliseconds from claim to completion of the last `sample` completed jobs
        of this operation and model; None before the first."""
        ...

    def on_event(
        self, *, record: EventRecorder | None = None, observe: EventObserver | None = None
    ) -> None:
        """`record` joins every event's transaction; `observe` sees events once committed."""
        ...

    def on_purge(self, hook: PurgeHook) -> None:
        """`hook` joins every purge's transaction."""
        ...


class SqliteJobQueue:
    """`JobQueue` in the `jobs` table of `store`.

    `max_queued`: queued jobs beyond which submit() raises QueueFull, whose Retry-After
    says `retry_after_s`. `aging_s`: see the module doc. `clock`: epoch seconds, injectable
    so tests decide time."""

    def __init__(
        self,
        store: Store,
        *,
        max_queued: int = 1000,
        max_attempts: int = 3,
        aging_s: float = 30.0,
        retry_after_s: int = 5,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if max_queued < 0 or max_attempts < 1 or aging_s < 0 or retry_after_s < 1:
            raise ValueError(
                "max_queued >= 0, max_attempts >= 1, aging_s >= 0 and retry_after_s >= 1 "
                f"are required (got {max_queued}, {max_attempts}, {aging_s}, {retry_after_s})"
            )
        self._store = store
        self._max_queued = max_queued
        self._max_attempts = max_attempts
        self._aging_s = aging_s
        self._retry_after_s = retry_after_s
        self._clock = clock
        self._recorders: list[EventRecorder] = []
        self._observers: list[EventObserver] = []
        self._purge_hooks: list[PurgeHook] = []

    @classmethod
    def from_settings(cls, store: Store, settings: Settings) -> SqliteJobQueue:
        """The queue with the jobs_* settings (engine.config)."""
        return cls(
            store,
            max_queued=settings.jobs_max_queued,
            max_attempts=settings.jobs_max_attempts,
            aging_s=settings.jobs_aging_s,
            retry_after_s=settings.jobs_retry_after_s,
        )

    def on_event(
        self, *, record: EventRecorder | None = None, observe: EventObserver | None = None
    ) -> None:
        if record is not None:
            self._recorders.append(record)
        if observe is not None:
            self._observers.append(observe)

    def on_purge(self, hook: PurgeHook) -> None:
        self._purge_hooks.append(hook)

    def _emit(self, conn: apsw.Connection, job: Job, at: float, into: list[JobEvent]) -> None:
        """Record the event of `job`'s new status in the open transaction."""
        name = JobEventName.of(job.status)
        payload = event_payload(name, job, at)
        ((seq,),) = conn.execute(
            "INSERT INTO job_events (job_id, event, at, payload) VALUES (?, ?, ?, ?) RETURNING seq",
            (job.id, name.value, at, json.dumps(payload, ensure_ascii=False)),
        ).fetchall()
        event = JobEvent(int(seq or 0), name, job, at, payload)
        for record in self._recorders:
            record(conn, event)
        into.append(event)

    def _committed(self, events: list[JobEvent]) -> None:
        if events:
            for observe in self._observers:
                observe(events)

    def submit(self, request: JobRequest) -> Submission:
        max_attempts = self._max_attempts if request.max_attempts is None else request.max_attempts
        if max_attempts < 1:
            raise InvalidRequest(
                "max_attempts must be at least 1",
                param="max_attempts",
            )
        request_hash = request.request_hash()
        events: list[JobEvent] = []
        with self._store.transaction() as conn:
            # Read under the write lock, so times follow the order of commits.
            now = self._clock()
            if request.idempotency_key is not None:
                row = conn.execute(
                    f"SELECT {_COLUMNS} FROM jobs WHERE idempotency_key = ?",
                    (request.idempotency_key,),
                ).fetchone()
                if row is not None:
                    existing = _job(row)
                    if existing.request_hash != request_hash:
                        raise Conflict(
                            f"Idempotency-Key {request.idempotency_key!r} was used for another "
                            f"request (job {existing.id}); use a new key for a new request",
                            param="Idempotency-Key",
                            code=ErrorCode.IDEMPOTENCY_KEY_REUSED,
                        )
                    return Submission(existing, created=False)
            if _queued(conn) >= self._max_queued:
                raise QueueFull(
                    f"the job queue is full ({self._max_queued} jobs waiting); retry later",
                    headers={"Retry-After": str(self._retry_after_s)},
                )
            (row,) = conn.execute(
                f"INSERT INTO jobs (id, operation, model_id, input, priority, sched_at, status, "
                "attempts, max_attempts, callback_url, callback_secret, metadata, "
                "idempotency_key, request_hash, created_at) "
                "VALUES (?, ?, ?, ?, ?, ?, 'queued', 0, ?, ?, ?, ?, ?, ?, ?) "
                f"RETURNING {_COLUMNS}",
                (
                    f"job-{uuid.uuid4().hex}",
                    request.operation,
                    request.model_id,
                    json.dumps(request.input, ensure_ascii=False),
                    request.priority.value,
                    now + request.priority.rank * self._aging_s,
                    max_attempts,
                    request.callback_url,
                    request.callback_secret,
                    None if request.metadata is None else json.dumps(request.metadata),
                    request.idempotency_key,
                    request_hash,
                    now,
                ),
            ).fetchall()
            job = _job(row)
            self._emit(conn, job, now, events)
        self._committed(events)
        return Submission(job, created=True)

    def claim(
        self,
        worker_id: str,
        lease_s: float,
        *,
        operations: Sequence[str] | None = None,
        model_ids: Sequence[str | None] | None = None,
    ) -> Job | None:
        where = ["status = 'queued'"]
        bindings: list[Any] = []
        if operations is not None:
            where.append(f"operation IN ({', '.join('?' * len(operations))})")
            bindings.extend(operations)
        if model_ids is not None:
            named = [m for m in model_ids if m is not None]
            either = [f"model_id IN ({', '.join('?' * len(named))})"]
            if None in model_ids:
                either.append("model_id IS NULL")
            where.append(f"({' OR '.join(either)})")
            bindings.extend(named)
        events: list[JobEvent] = []
        with self._store.transaction() as conn:
            now = self._clock()
            found = conn.execute(
                f"SELECT seq FROM jobs INDEXED BY jobs_queued WHERE {' AND '.join(where)} "
                "ORDER BY sched_at, seq LIMIT 1",
                bindings,
            ).fetchone()
            if found is None:
                return None
            (row,) = conn.execute(
                "UPDATE jobs SET status = 'processing', attempts = attempts + 1, "
                "lease_owner = ?, lease_expires_at = ?, started_at = ?, progress = 0 "
                f"WHERE seq = ? RETURNING {_COLUMNS}",
                (worker_id, now + lease_s, now, found[0]),
            ).fetchall()
            job = _job(row)
            self._emit(conn, job, now, events)
        self._committed(events)
        return job

    def heartbeat(
        self, job_id: str, lease_token: int, lease_s: float, progress: float | None = None
    ) -> bool:
        if progress is not None and not 0 <= progress <= 1:
            raise ValueError(f"progress must be in [0, 1], not {progress}")
        with self._store.transaction() as conn:
            row = conn.execute(
                "UPDATE jobs SET lease_expires_at = ?, progress = coalesce(?, progress) "
                "WHERE id = ? AND status = 'processing' AND attempts = ? RETURNING 1",
                (self._clock() + lease_s, progress, job_id, lease_token),
            ).fetchone()
        return row is not None

    def finish(
        self, job_id: str, lease_token: int, *, result: Any = None, error: str | None = None
    ) -> bool:
        status = JobStatus.COMPLETED if error is None else JobStatus.FAILED
        finished = self._change(
            "UPDATE jobs SET status = ?, result = ?, error = ?, completed_at = ?, "
            "progress = CASE WHEN ? = 'completed' THEN 1 ELSE progress END, "
            "lease_owner = NULL, lease_expires_at = NULL "
            f"WHERE id = ? AND status = 'processing' AND attempts = ? RETURNING {_COLUMNS}",
            lambda now: (
                status.value,
                None if error is not None else json.dumps(result, ensure_ascii=False),
                error,
                now,
                status.value,
                job_id,
                lease_token,
            ),
        )
        return finished is not None

    def release(self, job_id: str, lease_token: int) -> bool:
        released = self._change(
            "UPDATE jobs SET status = 'queued', attempts = attempts - 1, lease_owner = NULL, "
            "lease_expires_at = NULL, progress = NULL "
            f"WHERE id = ? AND status = 'processing' AND attempts = ? RETURNING {_COLUMNS}",
            lambda now: (job_id, lease_token),
        )
        return released is not None

    def cancel(self, job_id: str) -> Job:
        cancelled = self._change(
            "UPDATE jobs SET status = 'cancelled', completed_at = ?, lease_owner = NULL, "
            "lease_expires_at = NULL WHERE id = ? AND status IN ('queued', 'processing') "
            f"RETURNING {_COLUMNS}",
            lambda now: (now, job_id),
        )
        if cancelled is not None:
            return cancelled
        job = self.get(job_id)  # NotFound for an unknown id; a finished job stays finished
        raise Conflict(
            f"job {job_id} is already {job.status.value} and cannot be cancelled",
            param="job_id",
            code=ErrorCode.JOB_FINISHED,
        )

    def _change(self, sql: str, bindings: Callable[[float], Sequence[Any]]) -> Job | None:
        """One job's UPDATE ... RETURNING in its own transaction, with its event; None
        when no row matched (nothing written). `bindings` gets the transaction's time."""
        events: list[JobEvent] = []
        with self._store.transaction() as conn:
            now = self._clock()
            row = conn.execute(sql, bindings(now)).fetchone()
            job = None if row is None else _job(row)
            if job is not None:
                self._emit(conn, job, now, events)
        self._committed(events)
        return job

    def get(self, job_id: str) -> Job:
        return _found(self._store.query(_BY_ID_SQL, (job_id,)), job_id)

    def list(self, query: JobQuery | None = None) -> JobPage:
        q = query or JobQuery()
        if not 1 <= q.limit <= MAX_LIMIT:
            raise InvalidRequest(
                f"limit must be between 1 and {MAX_LIMIT}, not {q.limit}",
                param="limit",
            )
        if q.offset < 0:
            raise InvalidRequest(
                f"offset must be 0 or more, not {q.offset}",
                param="offset",
            )
        where: list[str] = []
        bindings: list[Any] = []
        if q.status is not None:
            where.append("status = ?")
            bindings.append(q.status.value)
        if q.model_id is not None:
            where.append("model_id = ?")
            bindings.append(q.model_id)
        clause = f"WHERE {' AND '.join(where)}" if where else ""
        direction = "DESC" if q.order is SortOrder.DESC else "ASC"
        # Reads take no write lock, so workers are never held up by a listing; the total
        # may differ from the page by the jobs that changed between the two statements.
        if q.model_id is None:
            counts = self.counts()
            total = counts[q.status] if q.status is not None else sum(counts.values())
        else:
            ((total,),) = self._store.query(f"SELECT count(*) FROM jobs {clause}", bindings)
        rows = self._store.query(
            f"SELECT {_COLUMNS} FROM jobs {clause} "
            f"ORDER BY {_SORT_SQL[q.sort_by]} {direction}, seq {direction} LIMIT ? OFFSET ?",
            [*bindings, q.limit, q.offset],
        )
        return JobPage([_job(row) for row in rows], total)

    def counts(self) -> dict[JobStatus, int]:
        return {
            JobStatus(status): int(n)
            for status, n in self._store.query("SELECT status, n FROM job_counts")
        }

    def position_in_queue(self, job_id: str) -> int | None:
        rows = self._store.query(
            "SELECT (SELECT count(*) FROM jobs AS ahead INDEXED BY jobs_queued "
            "WHERE ahead.status = 'queued' "
            "AND (ahead.sched_at < job.sched_at "
            "OR (ahead.sched_at = job.sched_at AND ahead.seq < job.seq))) "
            "FROM jobs AS job WHERE job.id = ? AND job.status = 'queued'",
            (job_id,),
        )
        if rows:
            return int(rows[0][0]) + 1
        self.get(job_id)  # raises NotFound for an unknown id
        return None

    def recover(self, now: float | None = None) -> Recovery:
        moment = self._clock() if now is None else now
        events: list[JobEvent] = []
        with self._store.transaction() as conn:
            at = self._clock()
            failed = conn.execute(
                "UPDATE jobs INDEXED BY jobs_leases SET status = 'failed', completed_at = ?, "
                "error = 'the lease of attempt ' || attempts || ' of ' || max_attempts || "
                "' expired (its worker stopped or was lost); no attempts are left', "
                "lease_owner = NULL, lease_expires_at = NULL "
                "WHERE status = 'processing' AND lease_expires_at <= ? "
                f"AND attempts >= max_attempts RETURNING {_COLUMNS}",
                (at, moment),
            ).fetchall()
            requeued = conn.execute(
                "UPDATE jobs INDEXED BY jobs_leases SET status = 'queued', lease_owner = NULL, "
                "lease_expires_at = NULL, "
                "progress = NULL WHERE status = 'processing' AND lease_expires_at <= ? "
                f"RETURNING {_COLUMNS}",
                (moment,),
            ).fetchall()
            for row in [*failed, *requeued]:
                self._emit(conn, _job(row), at, events)
        self._committed(events)
        return Recovery(requeued=[str(r[0]) for r in requeued], failed=[str(r[0]) for r in failed])

    def purge(self, older_than_s: float) -> int:
        cutoff = self._clock() - older_than_s
        with self._store.transaction() as conn:
            rows = conn.execute(
                "DELETE FROM jobs INDEXED BY jobs_finished "
                "WHERE completed_at IS NOT NULL AND completed_at < ? "
                "AND status IN ('completed', 'failed', 'cancelled') RETURNING id",
                (cutoff,),
            ).fetchall()
            conn.executemany("DELETE FROM job_events WHERE job_id = ?", rows)
            for hook in self._purge_hooks:
                hook(conn, cutoff)
        return len(rows)

    def events(self, job_id: str, after_seq: int = 0) -> Sequence[JobEvent]:
        job = self.get(job_id)
        rows = self._store.query(
            "SELECT seq, event, at, payload FROM job_events WHERE job_id = ? AND seq > ? "
            "ORDER BY seq",
            (job_id, after_seq),
        )
        return [
            JobEvent(seq, JobEventName(name), job, at, json.loads(payload))
            for seq, name, at, payload in rows
        ]

    def recent_run_ms(self, operation: str, model_id: str | None, sample: int = 50) -> float | None:
        ((mean,),) = self._store.query(
            "SELECT avg(completed_at - started_at) FROM (SELECT completed_at, started_at "
            "FROM jobs INDEXED BY jobs_finished WHERE completed_at IS NOT NULL "
            "AND status = 'completed' AND operation = ? AND model_id IS ? "
            "ORDER BY completed_at DESC LIMIT ?)",
            (operation, model_id, sample),
        )
        return None if mean is None else float(mean) * 1000


if TYPE_CHECKING:  # mypy proves that SqliteJobQueue implements JobQueue

    def _is_a_job_queue(queue: SqliteJobQueue) -> JobQueue:
        return queue


def _queued(conn: apsw.Connection) -> int:
    # apsw types rows as any SQLite value; a count is an int.
    rows: list[tuple[Any, ...]] = conn.execute(
        "SELECT n FROM job_counts WHERE status = 'queued'"
    ).fetchall()
    return int(rows[0][0])


def _found(rows: Sequence[Sequence[Any]], job_id: str) -> Job:
    if not rows:
        raise NotFound(f"no job {job_id}", param="job_id", code=ErrorCode.JOB_NOT_FOUND)
    return _job(rows[0])


def _job(row: Sequence[Any]) -> Job:
    (
        job_id,
        operation,
        model_id,
        input_json,
        priority,
        status,
        attempts,
        max_attempts,
        lease_owner,
        lease_expires_at,
        progress,
        result_json,
        error,
        callback_url,
        callback_secret,
        metadata_json,
        idempotency_key,
        request_hash,
        created_at,
        started_at,
        completed_at,
    ) = row
    return Job(
        id=job_id,
        operation=operation,
        model_id=model_id,
        input=json.loads(input_json),
        priority=JobPriority(priority),
        status=JobStatus(status),
        attempts=attempts,
        max_attempts=max_attempts,
        lease_owner=lease_owner,
        lease_expires_at=lease_expires_at,
        progress=progress,
        result=None if result_json is None else json.loads(result_json),
        error=error,
        callback_url=callback_url,
        callback_secret=callback_secret,
        metadata=None if metadata_json is None else json.loads(metadata_json),
        idempotency_key=idempotency_key,
        request_hash=request_hash,
        created_at=created_at,
        started_at=started_at,
        completed_at=completed_at,
    )
