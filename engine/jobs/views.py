"""A job as callers see it: the §5.2 status body, the §5.3 list item and the §5.8 event
payload. One shape serves the routes, the SSE stream and webhook deliveries (which the
engine sends itself, so the shape lives here rather than in server/).

Times are ISO 8601 (engine.clock.utc_iso). A finished job's end time is named after its
status, as the spec's examples do: `completed_at`, `failed_at` or `cancelled_at`.
"""

from __future__ import annotations

from typing import Any

from engine.clock import utc_iso
from engine.jobs.types import Job, JobEventName, JobStatus

_END_KEY = {
    JobStatus.COMPLETED: "completed_at",
    JobStatus.FAILED: "failed_at",
    JobStatus.CANCELLED: "cancelled_at",
}


def _iso(ts: float | None) -> str | None:
    return None if ts is None else utc_iso(ts)


def job_body(job: Job) -> dict[str, Any]:
    """Everything a caller may read about `job` (never its lease or callback secret)."""
    body: dict[str, Any] = {
        "job_id": job.id,
        "status": job.status.value,
        "model_id": job.model_id,
        "operation": job.operation,
        "priority": job.priority.value,
        "created_at": utc_iso(job.created_at),
        "attempts": job.attempts,
        "max_attempts": job.max_attempts,
    }
    if job.started_at is not None:
        body["started_at"] = utc_iso(job.started_at)
    if job.status is JobStatus.PROCESSING:
        body["progress"] = job.progress if job.progress is not None else 0.0
    if job.status.terminal:
        body[_END_KEY[job.status]] = _iso(job.completed_at)
    if job.status is JobStatus.COMPLETED:
        body["result"] = job.result
    if job.error is not None:
        body["error"] = job.error
    if job.callback_url is not None:
        body["callback_url"] = job.callback_url
    body["metadata"] = job.metadata
    return body


_SUMMARY_KEYS = (
    "job_id",
    "status",
    "model_id",
    "operation",
    "priority",
    "created_at",
    "started_at",
    *_END_KEY.values(),
)


def job_summary(job: Job) -> dict[str, Any]:
    """A §5.3 list item. `latency_ms` is from submission to the end, as the caller waited."""
    body = job_body(job)
    item = {key: body[key] for key in _SUMMARY_KEYS if key in body}
    if job.status.terminal and job.completed_at is not None:
        item["latency_ms"] = round((job.completed_at - job.created_at) * 1000, 3)
    return item


def event_payload(name: JobEventName, job: Job, at: float) -> dict[str, Any]:
    """The §5.8 body of a job event."""
    return {"event": name.value, "timestamp": utc_iso(at), "job": job_body(job)}
