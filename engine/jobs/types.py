"""What the job queue deals in: a job's record, a submission, a page of jobs.

Times are epoch seconds (floats) from the queue's clock; the HTTP layer writes them as
ISO 8601 (engine.clock.utc_iso).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from enum import StrEnum
from typing import Any


class JobPriority(StrEnum):
    HIGH = "high"
    NORMAL = "normal"
    LOW = "low"

    @property
    def rank(self) -> int:
        """0 for high, 1 for normal, 2 for low: the number of aging periods a job of this
        priority waits behind a high job submitted at the same moment."""
        return _RANKS[self]


_RANKS = {JobPriority.HIGH: 0, JobPriority.NORMAL: 1, JobPriority.LOW: 2}


class JobStatus(StrEnum):
    QUEUED = "queued"
    PROCESSING = "processing"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def terminal(self) -> bool:
        return self in _TERMINAL


_TERMINAL = frozenset({JobStatus.COMPLETED, JobStatus.FAILED, JobStatus.CANCELLED})


@dataclass(frozen=True)
class JobRequest:
    """A job to submit. `input` is any JSON value; validating it per operation is the
    caller's business (the queue stores what it is given). `max_attempts` None takes the
    queue's default."""

    operation: str
    input: Any
    model_id: str | None = None
    priority: JobPriority = JobPriority.NORMAL
    callback_url: str | None = None
    # Signs the callback_url's deliveries as a webhook's secret does (an extension).
    callback_secret: str | None = None
    metadata: Any = None
    idempotency_key: str | None = None
    max_attempts: int | None = None

    def request_hash(self) -> str:
        """SHA-256 of what the caller asked (not the idempotency key itself): a repeated
        Idempotency-Key with another hash is another request, answered 409."""
        asked = {
            "operation": self.operation,
            "input": self.input,
            "model_id": self.model_id,
            "priority": self.priority.value,
            "callback_url": self.callback_url,
            "callback_secret": self.callback_secret,
            "metadata": self.metadata,
            "max_attempts": self.max_attempts,
        }
        canonical = json.dumps(asked, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class Job:
    """A job's record. `attempts` counts claims; while processing, the current attempt's
    number is the lease token that heartbeat and finish must present (a fencing token:
    an attempt that lost its lease holds a smaller number and writes nothing)."""

    id: str
    operation: str
    model_id: str | None
    input: Any
    priority: JobPriority
    status: JobStatus
    attempts: int
    max_attempts: int
    lease_owner: str | None
    lease_expires_at: float | None
    progress: float | None
    result: Any
    error: str | None
    callback_url: str | None
    callback_secret: str | None
    metadata: Any
    idempotency_key: str | None
    request_hash: str
    created_at: float
    started_at: float | None
    completed_at: float | None

    @property
    def lease_token(self) -> int:
        return self.attempts


@dataclass(frozen=True)
class Submission:
    """submit()'s answer: the job, and whether this call created it (False: an earlier
    submission with the same Idempotency-Key and body)."""

    job: Job
    created: bool


@dataclass(frozen=True)
class JobPage:
    """One page of a listing, and how many jobs match the filters in all."""

    items: list[Job]
    total: int


class JobSort(StrEnum):
    CREATED_AT = "created_at"
    COMPLETED_AT = "completed_at"
    PRIORITY = "priority"
    STATUS = "status"


class SortOrder(StrEnum):
    ASC = "asc"
    DESC = "desc"


DEFAULT_LIMIT = 100


@dataclass(frozen=True)
class JobQuery:
    """A listing (spec §5.3): its filters, page and order."""

    status: JobStatus | None = None
    model_id: str | None = None
    limit: int = DEFAULT_LIMIT
    offset: int = 0
    sort_by: JobSort = JobSort.CREATED_AT
    order: SortOrder = SortOrder.DESC


class JobEventName(StrEnum):
    QUEUED = "job.queued"
    PROCESSING = "job.processing"
    COMPLETED = "job.completed"
    FAILED = "job.failed"
    CANCELLED = "job.cancelled"

    @classmethod
    def of(cls, status: JobStatus) -> JobEventName:
        return cls(f"job.{status.value}")


@dataclass(frozen=True)
class JobEvent:
    """A change of a job's status, recorded in the same transaction as the change.
    `seq` orders all events of all jobs; `payload` is the §5.8 body (event, timestamp and
    the job as it was right after the change)."""

    seq: int
    name: JobEventName
    job: Job
    at: float
    payload: dict[str, Any]


@dataclass(frozen=True)
class Recovery:
    """recover()'s answer: ids of expired leases put back in the queue, and of jobs
    failed because their last allowed attempt's lease expired."""

    requeued: list[str]
    failed: list[str]
