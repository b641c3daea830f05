"""Fusion Orchestration API (spec §3): orchestrate (JSON or server-sent events), stored
runs, workflows (list, describe, delete), capabilities and compose. The work is done by
engine.fusion.service.FusionService; these handlers only translate HTTP.

Streaming: `"stream": true` in the body, or `Accept: text/event-stream` (when the body does
not say `"stream": false`), answers with events `step_started`, `step_finished`, `token`
(deltas from chat steps) and any event a step plugin emits, then `result` with the §3.1
body, then the stream ends. Request errors (404 unknown workflow, 400 bad input, 503 model
not loaded) are found before the stream starts and keep their status; an unexpected error
during the run is an `error` event carrying the §7 envelope.

A run is the engine's, not the request's (engine/fusion/live.py): a client that goes away
stops waiting (or reading), not the run, unless a streamed request asked for
`cancel_on_disconnect`. Any client may follow a run (`GET .../runs/{id}/events`) or cancel
it (`POST .../runs/{id}/cancel`).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Annotated, Any

import msgspec
from litestar import Request, Response, delete, get, post
from litestar.di import NamedDependency
from litestar.openapi.spec import OpenAPIMediaType, OpenAPIType, Operation, RequestBody, Schema
from litestar.params import FromPath, FromQuery, JSONBody, QueryParameter
from litestar.response import Stream
from msgspec import Meta

from engine.config import Settings
from engine.errors import FusionError, InternalError, ServiceUnavailable
from engine.fusion.capabilities import Capabilities
from engine.fusion.live import Dropped, RunEvent
from engine.fusion.run_body import (
    INCLUDE_IO,
    INCLUDES,
    RunFields,
    RunResponse,
    outcome_response,
    parse_include,
    run_fields,
    run_response,
)
from engine.fusion.run_body import run_body as run_body  # a workflow job's result
from engine.fusion.runs import StoredRun
from engine.fusion.service import FusionService, RunOutcome, WorkflowInfo
from engine.logging import get_logger
from server.errors import GENERIC_500_MESSAGE
from server.openapi_docs import error_responses
from server.sse import SSE_HEADERS, sse_event
from server.versioning import deprecation_headers
from server.workflow_body import read_workflow_document

log = get_logger("server.fusion")

TAGS = ["fusion"]


# -- bodies ---------------------------------------------------------------------------------
class OrchestrateRequest(msgspec.Struct, forbid_unknown_fields=True):
    workflow: Annotated[str, Meta(min_length=1)]
    input: dict[str, Any] | None = None
    models: dict[str, str | None] | None = None
    config: dict[str, Any] | None = None
    # Extensions (docs/api.md): the workflow document run by workflow "custom", and SSE.
    definition: dict[str, Any] | None = None
    stream: bool | None = None
    # A streamed run is cancelled when its client disconnects (by default it runs on).
    cancel_on_disconnect: bool | None = None


class StoredRunResponse(RunFields, kw_only=True):
    input: Any
    config: dict[str, Any] | None
    definition: dict[str, Any] | None = None
    # include=io on a run stored without its steps' IO: why (left out otherwise)
    io_omitted: str | msgspec.UnsetType = msgspec.UNSET


class CancelResponse(msgspec.Struct):
    workflow_id: str
    status: str
    cancelled_at: str


class WorkflowSummary(msgspec.Struct, kw_only=True):
    id: str
    name: str
    description: str
    required_models: list[str]
    optional_models: list[str]
    input_schema: dict[str, Any]
    source: str
    version: int | str | None


class WorkflowList(msgspec.Struct):
    workflows: list[WorkflowSummary]


class ModelRole(msgspec.Struct):
    type: str
    optional: bool


class WorkflowDetail(WorkflowSummary, kw_only=True):
    models: dict[str, ModelRole]
    created_at: str | None
    definition: dict[str, Any]


class DeleteResponse(msgspec.Struct):
    workflow_id: str
    status: str
    version: int


class ComposeResponse(msgspec.Struct):
    workflow_id: str
    name: str
    status: str
    created_at: str
    version: int


class ModelCapabilities(msgspec.Struct):
    id: str
    type: str
    capabilities: list[str]
    context_length: int | None
    vram_usage_gb: float
    status: str


class CapabilitiesResponse(msgspec.Struct):
    capabilities: dict[str, list[str]]
    models: list[ModelCapabilities]


# -- shaping --------------------------------------------------------------------------------
def _stored_run_response(run: StoredRun, *, io: bool = False) -> StoredRunResponse:
    request = run.request
    with_io = io and run.io_omitted is None
    return StoredRunResponse(
        **run_fields(run.result, source=run.workflow_source, models=run.models, io=with_io),
        input=request.input,
        config=request.config,
        definition=request.definition,
        io_omitted=run.io_omitted if io and run.io_omitted is not None else msgspec.UNSET,
    )


def _summary_fields(info: WorkflowInfo) -> dict[str, Any]:
    wf = info.workflow
    return {
        "id": wf.id,
        "name": wf.name,
        "description": wf.description,
        "required_models": wf.required_models,
        "optional_models": wf.optional_models,
        "input_schema": wf.input_schema,
        "source": info.source,
        "version": wf.version,
    }


def _workflow_detail(info: WorkflowInfo) -> WorkflowDetail:
    wf = info.workflow
    return WorkflowDetail(
        **_summary_fields(info),
        models={role: ModelRole(spec.type, spec.optional) for role, spec in wf.models.items()},
        created_at=info.created_at,
        definition=wf.definition,
    )


def _capabilities_response(found: Capabilities) -> CapabilitiesResponse:
    models = [
        # Only loaded models are listed (§3.3 shows the status all the same).
        ModelCapabilities(
            m.id, m.type, m.capabilities, m.context_length, m.vram_usage_gb, status="loaded"
        )
        for m in found.models
    ]
    return CapabilitiesResponse(found.by_capability, models)


# -- routes ---------------------------------------------------------------------------------
def _wants_stream(request: Request[Any, Any, Any], body: OrchestrateRequest) -> bool:
    if body.stream is not None:
        return body.stream
    return "text/event-stream" in request.headers.get("accept", "")


async def _events(
    run_id: str, items: AsyncIterator[RunEvent | Dropped | RunOutcome]
) -> AsyncIterator[bytes]:
    try:
        async for item in items:
            if isinstance(item, RunEvent):
                yield sse_event(item.name, item.data)
            elif isinstance(item, Dropped):
                yield sse_event("error", _dropped(item).envelope())
            else:
                yield sse_event("result", outcome_response(item))
    except FusionError as exc:
        yield sse_event("error", exc.envelope())
    except Exception as exc:
        log.error("run event stream failed", run_id=run_id, exc_info=exc)
        yield sse_event("error", InternalError(GENERIC_500_MESSAGE).envelope())


def _dropped(item: Dropped) -> ServiceUnavailable:
    return ServiceUnavailable(
        f"this client fell {item.behind} events behind run '{item.run_id}' and was dropped: "
        f"reconnect to GET /api/fusion/runs/{item.run_id}/events, which sends the run's "
        "events so far, then the live ones",
        param="run_id",
    )


async def _stored_result(run: StoredRun) -> AsyncIterator[bytes]:
    body = run_response(run.result, source=run.workflow_source, models=run.models, stored=True)
    yield sse_event("result", body)


@post(
    "/api/fusion/orchestrate",
    responses=error_responses(400, 404, 429, 503, 504),
    status_code=200,
    tags=TAGS,
    summary="Run a workflow (§3.1); `stream: true` answers with server-sent events",
)
async def orchestrate(
    request: Request[Any, Any, Any],
    fusion: NamedDependency[FusionService],
    data: JSONBody[OrchestrateRequest],
) -> Response[RunResponse]:
    run = await fusion.prepare(data.workflow, data.input, data.models, data.config, data.definition)
    # Spec §9's deprecation headers when the request used a deprecated name; the body's
    # `warnings` says which.
    deprecated = deprecation_headers(run.sunset) if run.sunset is not None else {}
    if _wants_stream(request, data):
        items = fusion.stream(run, cancel_on_disconnect=bool(data.cancel_on_disconnect))
        return Stream(  # type: ignore[return-value]
            _events(run.run_id, items),
            media_type="text/event-stream",
            headers={**SSE_HEADERS, **deprecated},
        )
    # The run is the engine's: a client that goes away stops waiting, not the run.
    outcome = await fusion.execute(run, detach=True)
    return Response(outcome_response(outcome), headers=deprecated)


@get(
    "/api/fusion/runs/{run_id:str}",
    tags=TAGS,
    summary="A stored run with its trace",
    responses=error_responses(400, 404),
)
async def get_run(
    fusion: NamedDependency[FusionService],
    run_id: FromPath[str],
    include: Annotated[
        list[str] | None,
        QueryParameter(
            description="More in the body: `io` adds each trace entry's rendered `input` "
            f"and `output` (children too). One of: {', '.join(INCLUDES)}"
        ),
    ] = None,
) -> StoredRunResponse:
    io = INCLUDE_IO in parse_include(include)
    return _stored_run_response(await fusion.read_run(run_id, io=io), io=io)


@post(
    "/api/fusion/runs/{run_id:str}/cancel",
    status_code=200,
    tags=TAGS,
    summary="Cancel a running run: it stops at once and is stored `cancelled`",
    responses=error_responses(400, 404, 409),
)
async def cancel_run(
    fusion: NamedDependency[FusionService], run_id: FromPath[str]
) -> CancelResponse:
    cancelled = await fusion.cancel(run_id)
    return CancelResponse(run_id, cancelled.outcome.result.status, cancelled.cancelled_at)


@get(
    "/api/fusion/runs/{run_id:str}/events",
    tags=TAGS,
    summary="A run's events (server-sent): those so far, the live ones, then `result`",
    responses=error_responses(400, 404),
)
async def run_events(fusion: NamedDependency[FusionService], run_id: FromPath[str]) -> Stream:
    found = await fusion.follow(run_id)
    body = _stored_result(found) if isinstance(found, StoredRun) else _events(run_id, found)
    return Stream(body, media_type="text/event-stream", headers=SSE_HEADERS)


@get("/api/fusion/workflows", tags=TAGS, summary="Predefined and composed workflows (§3.2)")
async def list_workflows(fusion: NamedDependency[FusionService]) -> WorkflowList:
    return WorkflowList([WorkflowSummary(**_summary_fields(i)) for i in fusion.list_workflows()])


@get(
    "/api/fusion/workflows/{workflow_id:str}",
    tags=TAGS,
    summary="A workflow with its definition",
    responses=error_responses(400, 404),
)
async def get_workflow(
    fusion: NamedDependency[FusionService], workflow_id: FromPath[str]
) -> WorkflowDetail:
    return _workflow_detail(fusion.get_workflow(workflow_id))


@delete(
    "/api/fusion/workflows/{workflow_id:str}",
    status_code=200,
    tags=TAGS,
    summary="Delete a composed workflow (every version)",
    responses=error_responses(400, 404, 409),
)
async def delete_workflow(
    fusion: NamedDependency[FusionService], workflow_id: FromPath[str]
) -> DeleteResponse:
    info = fusion.delete_workflow(workflow_id)
    return DeleteResponse(workflow_id, status="deleted", version=info.version)


@get(
    "/api/fusion/capabilities",
    tags=TAGS,
    summary="What the loaded models can do (§3.3)",
    responses=error_responses(400),
)
async def capabilities(
    fusion: NamedDependency[FusionService], capability: FromQuery[str | None] = None
) -> CapabilitiesResponse:
    return _capabilities_response(fusion.capabilities(capability))


@dataclass
class ComposeOperation(Operation):
    """The compose body is read by hand (JSON or YAML, server/workflow_body.py), so
    Litestar cannot infer it."""

    def __post_init__(self) -> None:
        document = Schema(
            type=OpenAPIType.OBJECT,
            additional_properties=True,
            description="A workflow document (docs/dsl.md)",
        )
        self.request_body = RequestBody(
            content={
                "application/json": OpenAPIMediaType(schema=document),
                # application/x-yaml and text/yaml are read the same way.
                "application/yaml": OpenAPIMediaType(schema=document),
            },
            required=True,
        )


@post(
    "/api/fusion/compose",
    status_code=201,
    tags=TAGS,
    summary="Compose a custom workflow (§3.4); the same name again stores a new version",
    description="The workflow document as JSON, or as YAML (application/yaml, "
    "application/x-yaml or text/yaml): the text a workflow file holds.",
    operation_class=ComposeOperation,
    responses=error_responses(400, 409, 415),
)
async def compose(
    request: Request[Any, Any, Any],
    fusion: NamedDependency[FusionService],
    settings: NamedDependency[Settings],
) -> ComposeResponse:
    info = fusion.compose(await read_workflow_document(request, settings.max_json_depth))
    return ComposeResponse(info.workflow_id, info.name, "created", info.created_at, info.version)


ROUTES = [
    orchestrate,
    get_run,
    cancel_run,
    run_events,
    list_workflows,
    get_workflow,
    delete_workflow,
    capabilities,
    compose,
]
