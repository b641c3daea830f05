"""The run history: stored runs listed with filters, pages and sorts
(`GET /api/fusion/runs`), and their retention by age.

Listing reads only indexed columns to find a page (engine/fusion/runs.py's migration 5
makes every filter-and-sort combination a covering index scan), then reads the page's own
rows: a run's summary columns sit after its JSON in the row, so reading them for every
match would walk each large record's overflow pages. A summary's `steps` counts come from
the stored trace (json_each), for the page's rows only.

Purging deletes runs created before `now - max_age` in batches, each its own short
transaction, so a large purge never holds the write lock for long; it runs in a thread
(RunPurger), never on the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

import msgspec
import structlog

from engine.clock import utc_iso
from engine.errors import InvalidRequest
from engine.jobs.types import SortOrder
from engine.store import Store

log = structlog.get_logger(__name__)

# A run's status (docs/api.md): `running` until it ends.
RUN_STATUSES = ("running", "completed", "partial", "failed", "cancelled")
MAX_LIMIT = 1000
DEFAULT_LIMIT = 100
PURGE_BATCH = 500  # rows per purge transaction: a few ms of write lock each


class RunSort(StrEnum):
    CREATED_AT = "created_at"
    COMPLETED_AT = "completed_at"
    TOTAL_LATENCY_MS = "total_latency_ms"


@dataclass(frozen=True)
class RunQuery:
    """A listing: its filters (None: any), page and order. `statuses` matches any of them;
    `created_after` (inclusive) and `created_before` (exclusive) are ISO 8601 text as the
    caller sent it, checked by `RunHistory.list`."""

    workflow: str | None = None
    statuses: tuple[str, ...] = ()
    created_after: str | None = None
    created_before: str | None = None
    limit: int = DEFAULT_LIMIT
    offset: int = 0
    sort_by: RunSort = RunSort.CREATED_AT
    order: SortOrder = SortOrder.DESC


@dataclass(frozen=True)
class RunPage:
    runs: list[dict[str, Any]]  # summaries, as the API answers them
    total: int  # runs matching the filters, all pages together


def split_statuses(values: Iterable[str]) -> tuple[str, ...]:
    """`status` given repeated and/or comma-separated, as one tuple; an unknown status is
    400 naming the parameter."""
    statuses: list[str] = []
    for value in values:
        for status in value.split(","):
            status = status.strip()
            if status not in RUN_STATUSES:
                raise InvalidRequest(
                    f"unknown run status {status!r}: expected one of {', '.join(RUN_STATUSES)}",
                    param="status",
                )
            if status not in statuses:
                statuses.append(status)
    return tuple(statuses)


def _instant(text: str | None, param: str) -> str | None:
    """ISO 8601 text as the runs table writes times (UTC, milliseconds, Z), so that text
    comparison is time order. No offset means UTC."""
    if text is None:
        return None
    try:
        moment = datetime.fromisoformat(text.strip())
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=UTC)
        moment = moment.astimezone(UTC)
    except (ValueError, OverflowError):
        raise InvalidRequest(
            f"{param} must be an ISO 8601 time such as 2026-11-27T10:00:00Z, not {text!r}",
            param=param,
        ) from None
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


# The page's rows in order; {order} sorts by the chosen column, then by insertion.
_STEP_STATUS = "json_extract(s.value, '$.status')"
_PAGE_SQL = f"""
SELECT r.id, r.workflow_id, r.workflow_version, r.status, r.created_at, r.completed_at,
       r.total_latency_ms, r.error,
       (SELECT json_array(count(*), total({_STEP_STATUS} = 'completed'),
                          total({_STEP_STATUS} = 'failed'), total({_STEP_STATUS} = 'skipped'),
                          total({_STEP_STATUS} = 'running'))
          FROM json_each(r.trace) AS s)
  FROM runs AS r
 WHERE r.rowid IN (SELECT rowid FROM runs {{where}} ORDER BY {{order}} LIMIT ? OFFSET ?)
 ORDER BY {{outer_order}}
"""
_PURGE_SQL = (
    "DELETE FROM runs WHERE rowid IN "
    "(SELECT rowid FROM runs INDEXED BY runs_by_created WHERE created_at < ? LIMIT ?)"
)
_SUMMARY_KEYS = (
    "workflow_id",
    "workflow",
    "workflow_version",
    "status",
    "created_at",
    "completed_at",
    "total_latency_ms",
    "error",
)
_STEP_KEYS = ("total", "completed", "failed", "skipped", "running")


class RunHistory:
    """Lists and purges the runs table (engine/fusion/runs.py owns its rows)."""

    def __init__(self, store: Store, *, clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self._clock = clock  # epoch seconds; tests pass their own

    def list(self, query: RunQuery) -> RunPage:
        """One page of runs matching `query`, and how many match in all. Blocking: call
        it from a worker thread."""
        if not 1 <= query.limit <= MAX_LIMIT:
            raise InvalidRequest(
                f"limit must be between 1 and {MAX_LIMIT}, not {query.limit}", param="limit"
            )
        if query.offset < 0:
            raise InvalidRequest(f"offset must be 0 or more, not {query.offset}", param="offset")
        where: list[str] = []
        bindings: list[Any] = []
        if query.workflow is not None:
            where.append("workflow_id = ?")
            bindings.append(query.workflow)
        if query.statuses:
            where.append(f"status IN ({', '.join('?' * len(query.statuses))})")
            bindings.extend(query.statuses)
        after = _instant(query.created_after, "created_after")
        if after is not None:
            where.append("created_at >= ?")
            bindings.append(after)
        before = _instant(query.created_before, "created_before")
        if before is not None:
            where.append("created_at < ?")
            bindings.append(before)
        clause = f"WHERE {' AND '.join(where)}" if where else ""
        direction = "DESC" if query.order is SortOrder.DESC else "ASC"
        # SQLite sorts NULL (a running run's completed_at and latency) lowest; the rowid
        # (insertion order) breaks ties, so pages never overlap or skip a run.
        column = query.sort_by.value
        sql = _PAGE_SQL.format(
            where=clause,
            order=f"{column} {direction}, rowid {direction}",
            outer_order=f"r.{column} {direction}, r.rowid {direction}",
        )
        # Two statements, as the jobs' listing: the total may differ from the page by the
        # runs stored between them.
        ((total,),) = self.store.query(f"SELECT count(*) FROM runs {clause}", bindings)
        rows = self.store.query(sql, [*bindings, query.limit, query.offset])
        return RunPage([_summary(row) for row in rows], int(total))

    def purge(
        self, max_age_s: float, *, batch: int = PURGE_BATCH, stop: threading.Event | None = None
    ) -> int:
        """Delete the runs created more than `max_age_s` seconds ago, whatever their status
        (one still `running` that long was left by a process that ended), `batch` rows
        per transaction, until none is left or `stop` is set; returns how many. Blocking:
        call it from a worker thread."""
        cutoff = utc_iso(self._clock() - max_age_s)
        purged = 0
        while stop is None or not stop.is_set():
            with self.store.transaction() as conn:
                conn.execute(_PURGE_SQL, (cutoff, batch))
                count = conn.changes()
            purged += count
            if count < batch:
                break
        return purged


def _summary(row: tuple[Any, ...]) -> dict[str, Any]:
    summary = dict(zip(_SUMMARY_KEYS, row[:8], strict=True))
    counts = msgspec.json.decode(row[8]) if row[8] is not None else [0] * len(_STEP_KEYS)
    summary["steps"] = {key: int(n) for key, n in zip(_STEP_KEYS, counts, strict=True)}
    return summary


class RunPurger:
    """Purges runs older than `max_age_days` once at start and every `interval_s` after,
    in a worker thread. max_age_days 0 keeps runs forever (start() then does nothing)."""

    def __init__(self, history: RunHistory, *, max_age_days: float, interval_s: float) -> None:
        self.history = history
        self.max_age_s = max_age_days * 86_400
        self.interval_s = interval_s
        self._task: asyncio.Task[None] | None = None
        # Set by stop(): ends the wait between purges, and a purge between two batches, so
        # no purge thread is left writing after the engine closes its store.
        self._stopping = threading.Event()
        self._wake = asyncio.Event()

    def start(self) -> None:
        if self.max_age_s > 0 and self._task is None:
            self._task = asyncio.create_task(self._loop(), name="runs-purge")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is None:
            return
        self._stopping.set()
        self._wake.set()
        await task  # within one batch: the loop returns once its thread has

    async def _loop(self) -> None:
        while not self._stopping.is_set():
            try:
                purged = await asyncio.to_thread(
                    self.history.purge, self.max_age_s, stop=self._stopping
                )
            except Exception:
                # A busy or full database now is no reason to stop purging later.
                log.exception("runs_purge_failed")
            else:
                if purged:
                    log.info("runs_purged", purged=purged, max_age_s=self.max_age_s)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.interval_s)
