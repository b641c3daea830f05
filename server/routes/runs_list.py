"""`GET /api/fusion/runs`: the run history (docs/api.md), filtered, paged and sorted. The
listing is engine.fusion.run_history's; this handler only translates HTTP."""

from __future__ import annotations

import asyncio
from typing import Annotated, Any

import msgspec
from litestar import get
from litestar.di import NamedDependency
from litestar.openapi import ResponseSpec
from litestar.params import QueryParameter

from engine.fusion.run_history import (
    DEFAULT_LIMIT,
    MAX_LIMIT,
    RUN_STATUSES,
    RunHistory,
    RunQuery,
    RunSort,
    split_statuses,
)
from engine.fusion.service import FusionService
from engine.jobs.types import SortOrder
from server.openapi_docs import error_responses
from server.routes.mcp import SQLITE_MAX_INT


class StepCountsDoc(msgspec.Struct):
    total: int
    completed: int
    failed: int
    skipped: int
    running: int


class RunSummaryDoc(msgspec.Struct, kw_only=True):
    workflow_id: str  # the run's id
    workflow: str
    workflow_version: int | str | None
    status: str
    created_at: str
    completed_at: str | None
    total_latency_ms: float | None
    error: str | None
    steps: StepCountsDoc


class RunListDoc(msgspec.Struct):
    runs: list[RunSummaryDoc]
    total: int
    limit: int
    offset: int


_SUCCESS = ResponseSpec(data_container=RunListDoc, description="Success", generate_examples=False)


@get(
    "/api/fusion/runs",
    tags=["fusion"],
    summary="Stored runs, filtered, paged and sorted (newest first by default)",
    responses={200: _SUCCESS, **error_responses(400)},
)
async def list_runs(
    fusion: NamedDependency[FusionService],
    workflow: Annotated[
        str | None, QueryParameter(description="Only runs of this workflow id")
    ] = None,
    status: Annotated[
        list[str] | None,
        QueryParameter(
            description="Only runs in one of these statuses ("
            + ", ".join(RUN_STATUSES)
            + "): repeat the parameter or separate them with commas"
        ),
    ] = None,
    created_after: Annotated[
        str | None,
        QueryParameter(description="ISO 8601: runs created at or after this time"),
    ] = None,
    created_before: Annotated[
        str | None,
        QueryParameter(description="ISO 8601: runs created before this time"),
    ] = None,
    limit: Annotated[int, QueryParameter(ge=1, le=MAX_LIMIT)] = DEFAULT_LIMIT,
    offset: Annotated[int, QueryParameter(ge=0, le=SQLITE_MAX_INT)] = 0,
    sort_by: Annotated[RunSort, QueryParameter()] = RunSort.CREATED_AT,
    order: Annotated[SortOrder, QueryParameter()] = SortOrder.DESC,
) -> dict[str, Any]:
    query = RunQuery(
        workflow=workflow,
        statuses=split_statuses(status or ()),
        created_after=created_after,
        created_before=created_before,
        limit=limit,
        offset=offset,
        sort_by=sort_by,
        order=order,
    )
    # SQLite reads off the event loop: a listing of 1000 summaries takes milliseconds.
    page = await asyncio.to_thread(RunHistory(fusion.runs.store).list, query)
    return {"runs": page.runs, "total": page.total, "limit": limit, "offset": offset}


ROUTES = [list_runs]
