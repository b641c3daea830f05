"""MCP Server API (spec §5): the durable job queue and its webhooks.

The work is engine.jobs': JobService validates, queues and runs jobs; WebhookStore keeps
webhooks and their delivery log. These handlers only translate HTTP. A job's body is
engine.jobs.views' (the same shape its SSE events and webhook payloads carry).

Extensions (docs/api.md): `Idempotency-Key` on submit, `callback_secret` in the submit
body and `GET /api/mcp/jobs/{id}/events` (server-sent events, resumable with
Last-Event-ID).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Annotated, Any

import msgspec
from litestar import Response, delete, get, post
from litestar.di import NamedDependency
from litestar.openapi import ResponseSpec
from litestar.params import FromPath, HeaderParameter, JSONBody, QueryParameter
from litestar.response import Stream
from msgspec import Meta

from engine.clock import utc_iso
from engine.jobs.service import JobService, JobState, JobSubmission
from engine.jobs.types import JobPriority, JobQuery, JobSort, JobStatus, SortOrder
from engine.jobs.views import job_body, job_summary
from engine.jobs.webhooks import Webhook, WebhookInfo, WebhookStore
from server.openapi_docs import error_responses
from server.sse import SSE_HEADERS, sse_event

TAGS = ["mcp"]
# SQLite's largest integer: a larger offset or event id cannot even be bound to a query.
SQLITE_MAX_INT = 2**63 - 1
IDEMPOTENCY_KEY_MAX_CHARS = 255


class SubmitJobRequest(msgspec.Struct, forbid_unknown_fields=True):
    operation: Annotated[str, Meta(min_length=1)]
    input: Any
    model_id: Annotated[str, Meta(min_length=1)] | None = None
    callback_url: str | None = None
    callback_secret: str | None = None  # extension: signs the callback's deliveries
    priority: JobPriority = JobPriority.NORMAL
    metadata: dict[str, Any] | None = None


class RegisterWebhookRequest(msgspec.Struct, forbid_unknown_fields=True):
    url: Annotated[str, Meta(min_length=1)]
    events: list[str]
    secret: str | None = None
    metadata: dict[str, Any] | None = None


# -- documented answers -----------------------------------------------------------------------
# The routes answer with the dicts of engine/jobs/views.py (one shape for routes, the event
# stream and webhook deliveries); these say in the OpenAPI document what those dicts hold.
# A key that only some states have is optional here.
class _JobHeadDoc(msgspec.Struct, kw_only=True):
    """What a job's body and its list item share."""

    job_id: str
    status: JobStatus
    model_id: str | None
    operation: str
    priority: JobPriority
    created_at: str
    started_at: str | None = None
    completed_at: str | None = None
    failed_at: str | None = None
    cancelled_at: str | None = None


class JobDoc(_JobHeadDoc, kw_only=True):
    attempts: int
    max_attempts: int
    metadata: Any
    progress: float | None = None
    result: Any = None
    error: str | None = None
    callback_url: str | None = None
    # While queued.
    position_in_queue: int | None = None
    estimated_completion_ms: float | None = None


class JobSummaryDoc(_JobHeadDoc, kw_only=True):
    latency_ms: float | None = None


class JobListDoc(msgspec.Struct):
    jobs: list[JobSummaryDoc]
    total: int
    limit: int
    offset: int


class JobCancelledDoc(msgspec.Struct):
    job_id: str
    status: JobStatus
    cancelled_at: str | None


class WebhookDoc(msgspec.Struct, kw_only=True):
    webhook_id: str
    url: str
    events: list[str]
    status: str
    created_at: str
    metadata: Any
    disabled_reason: str | None = None


class WebhookInfoDoc(WebhookDoc, kw_only=True):
    last_triggered_at: str | None
    success_count: int
    failure_count: int
    consecutive_failures: int


class WebhookListDoc(msgspec.Struct):
    webhooks: list[WebhookInfoDoc]


class WebhookDeletedDoc(msgspec.Struct):
    webhook_id: str
    status: str


def _answer(status: int, body: type[msgspec.Struct], *errors: int) -> dict[int, ResponseSpec]:
    """`responses=`: the success body `body` and the §7 envelope for `errors`."""
    success = ResponseSpec(data_container=body, description="Success", generate_examples=False)
    return {status: success, **error_responses(*errors)}


def _state_body(state: JobState) -> dict[str, Any]:
    body = job_body(state.job)
    if state.job.status is JobStatus.QUEUED:
        body["position_in_queue"] = state.position_in_queue
        body["estimated_completion_ms"] = state.estimated_completion_ms
    return body


@post(
    "/api/mcp/jobs",
    status_code=202,
    tags=TAGS,
    summary="Submit a job (§5.1): answered once it is committed",
    responses=_answer(202, JobDoc, 400, 409, 429, 503),
)
async def submit_job(
    jobs: NamedDependency[JobService],
    data: JSONBody[SubmitJobRequest],
    idempotency_key: Annotated[
        str | None,
        HeaderParameter(name="Idempotency-Key", min_length=1, max_length=IDEMPOTENCY_KEY_MAX_CHARS),
    ] = None,
) -> Response[dict[str, Any]]:
    state, created = await jobs.submit(
        JobSubmission(
            operation=data.operation,
            input=data.input,
            model_id=data.model_id,
            priority=data.priority,
            callback_url=data.callback_url,
            callback_secret=data.callback_secret,
            metadata=data.metadata,
            idempotency_key=idempotency_key,
        )
    )
    headers = {"Location": f"/api/mcp/jobs/{state.job.id}"}
    if not created:
        headers["Idempotent-Replayed"] = "true"
    return Response(_state_body(state), status_code=202, headers=headers)


@get(
    "/api/mcp/jobs/{job_id:str}",
    tags=TAGS,
    summary="A job's status (§5.2)",
    responses=_answer(200, JobDoc, 400, 404),
)
async def get_job(jobs: NamedDependency[JobService], job_id: FromPath[str]) -> dict[str, Any]:
    return _state_body(await jobs.get(job_id))


@get(
    "/api/mcp/jobs",
    tags=TAGS,
    summary="List jobs (§5.3)",
    responses=_answer(200, JobListDoc, 400),
)
async def list_jobs(
    jobs: NamedDependency[JobService],
    status: Annotated[JobStatus | None, QueryParameter()] = None,
    model_id: Annotated[str | None, QueryParameter()] = None,
    limit: Annotated[int, QueryParameter(ge=1, le=1000)] = 100,
    offset: Annotated[int, QueryParameter(ge=0, le=SQLITE_MAX_INT)] = 0,
    sort_by: Annotated[JobSort, QueryParameter()] = JobSort.CREATED_AT,
    order: Annotated[SortOrder, QueryParameter()] = SortOrder.DESC,
) -> dict[str, Any]:
    page = await jobs.list(JobQuery(status, model_id, limit, offset, sort_by, order))
    return {
        "jobs": [job_summary(job) for job in page.items],
        "total": page.total,
        "limit": limit,
        "offset": offset,
    }


@delete(
    "/api/mcp/jobs/{job_id:str}",
    status_code=200,
    tags=TAGS,
    summary="Cancel a queued or processing job (§5.4)",
    responses=_answer(200, JobCancelledDoc, 400, 404, 409),
)
async def cancel_job(jobs: NamedDependency[JobService], job_id: FromPath[str]) -> dict[str, Any]:
    job = await jobs.cancel(job_id)
    body = job_body(job)
    return {"job_id": job.id, "status": job.status.value, "cancelled_at": body["cancelled_at"]}


async def _job_events(jobs: JobService, job_id: str, after: int) -> AsyncIterator[bytes]:
    async for event in jobs.events(job_id, after):
        yield sse_event(event.name.value, event.payload, event.seq)


@get(
    "/api/mcp/jobs/{job_id:str}/events",
    tags=TAGS,
    summary="A job's events as server-sent events: those so far, then live ones, until it ends",
    responses=error_responses(400, 404),
)
async def job_events(
    jobs: NamedDependency[JobService],
    job_id: FromPath[str],
    last_event_id: Annotated[
        int, HeaderParameter(name="Last-Event-ID", ge=0, le=SQLITE_MAX_INT)
    ] = 0,
) -> Stream:
    await jobs.get(job_id)  # 404 before the stream starts
    return Stream(
        _job_events(jobs, job_id, last_event_id),
        media_type="text/event-stream",
        headers=SSE_HEADERS,
    )


# -- webhooks ---------------------------------------------------------------------------------
def _webhook_body(webhook: Webhook) -> dict[str, Any]:
    body: dict[str, Any] = {
        "webhook_id": webhook.id,
        "url": webhook.url,
        "events": [event.value for event in webhook.events],
        "status": webhook.status.value,
        "created_at": utc_iso(webhook.created_at),
        "metadata": webhook.metadata,
    }
    if webhook.disabled_reason is not None:
        body["disabled_reason"] = webhook.disabled_reason
    return body


def _webhook_info(info: WebhookInfo) -> dict[str, Any]:
    return {
        **_webhook_body(info.webhook),
        "last_triggered_at": None
        if info.last_triggered_at is None
        else utc_iso(info.last_triggered_at),
        "success_count": info.success_count,
        "failure_count": info.failure_count,
        "consecutive_failures": info.webhook.consecutive_failures,
    }


@post(
    "/api/mcp/webhooks",
    status_code=201,
    tags=TAGS,
    summary="Register a webhook for job events (§5.5)",
    responses=_answer(201, WebhookDoc, 400),
)
async def register_webhook(
    webhooks: NamedDependency[WebhookStore], data: JSONBody[RegisterWebhookRequest]
) -> dict[str, Any]:
    webhook = await asyncio.to_thread(
        webhooks.register, data.url, data.events, data.secret, data.metadata
    )
    return _webhook_body(webhook)


@get(
    "/api/mcp/webhooks",
    tags=TAGS,
    summary="Registered webhooks and their delivery counts (§5.6)",
    responses=_answer(200, WebhookListDoc),
)
async def list_webhooks(webhooks: NamedDependency[WebhookStore]) -> dict[str, Any]:
    return {"webhooks": [_webhook_info(info) for info in await asyncio.to_thread(webhooks.list)]}


@delete(
    "/api/mcp/webhooks/{webhook_id:str}",
    status_code=200,
    tags=TAGS,
    summary="Delete a webhook (§5.7); its pending deliveries are dropped",
    responses=_answer(200, WebhookDeletedDoc, 400, 404),
)
async def delete_webhook(
    webhooks: NamedDependency[WebhookStore], webhook_id: FromPath[str]
) -> dict[str, Any]:
    await asyncio.to_thread(webhooks.delete, webhook_id)
    return {"webhook_id": webhook_id, "status": "deleted"}


ROUTES = [
    submit_job,
    get_job,
    list_jobs,
    cancel_job,
    job_events,
    register_webhook,
    list_webhooks,
    delete_webhook,
]
