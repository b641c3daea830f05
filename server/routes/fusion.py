"""Fusion Orchestration API (spec §3): orchestrate (JSON or server-sent events), stored
runs, workflows (list, describe, delete), capabilities and compose. The work is done by
engine.fusion.service.FusionService; these handlers only translate HTTP.

Streaming: `"stream": true` in the body, or `Accept: text/event-stream` (when the body does
not say `"stream": false`), answers with events `step_started`, `step_finished`, `token`
(deltas from chat steps) and any event a step plugin emits, then `result` with the §3.1
body, then the stream ends. Request errors (404 unknown workflow, 400 bad input, 503 model
not loaded) are found before the stream starts and keep their status; an unexpected error
during the run is an `error` event carrying the §7 envelope.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated, Any

import msgspec
from litestar import Request, Response, delete, get, post
from litestar.di import NamedDependency
from litestar.params import FromPath, FromQuery, JSONBody
from litestar.response import Stream
from msgspec import Meta

from engine.errors import FusionError
from engine.fusion.service import FusionService, PreparedRun
from engine.logging import get_logger
from server.errors import GENERIC_500_MESSAGE, type_and_code

log = get_logger("server.fusion")

TAGS = ["fusion"]
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


# -- bodies ---------------------------------------------------------------------------------
class OrchestrateRequest(msgspec.Struct, forbid_unknown_fields=True):
    workflow: Annotated[str, Meta(min_length=1)]
    input: dict[str, Any] | None = None
    models: dict[str, str | None] | None = None
    config: dict[str, Any] | None = None
    # Extensions (docs/api.md): the workflow document run by workflow "custom", and SSE.
    definition: dict[str, Any] | None = None
    stream: bool | None = None


class TraceEntry(msgspec.Struct, kw_only=True, omit_defaults=True):
    step: str
    type: str
    model: str | None
    status: str
    duration_ms: float | None
    attempts: int
    error: str | None
    started_at: str | None
    items: int | None = None  # for_each: how many items ran
    iterations: int | None = None  # repeat: how many passes ran


class RunResponse(msgspec.Struct, kw_only=True):
    workflow_id: str
    status: str
    result: Any
    execution_trace: list[TraceEntry]
    total_latency_ms: float | None
    created_at: str
    completed_at: str | None
    workflow: str
    workflow_version: int | str | None
    workflow_source: str | None
    models: dict[str, str | None]
    error: str | None


class StoredRunResponse(RunResponse, kw_only=True):
    input: Any
    config: dict[str, Any] | None
    definition: dict[str, Any] | None = None


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


# -- routes ---------------------------------------------------------------------------------
def _wants_stream(request: Request[Any, Any, Any], body: OrchestrateRequest) -> bool:
    if body.stream is not None:
        return body.stream
    return "text/event-stream" in request.headers.get("accept", "")


def _sse(name: str, data: Any) -> bytes:
    return b"event: " + name.encode() + b"\ndata: " + msgspec.json.encode(data) + b"\n\n"


async def _events(service: FusionService, run: PreparedRun) -> AsyncIterator[bytes]:
    try:
        async for name, data in service.stream(run):
            yield _sse(name, data)
    except FusionError as exc:
        yield _sse("error", exc.envelope())
    except Exception as exc:
        log.error("orchestrate stream failed", run_id=run.run_id, exc_info=exc)
        type_, code = type_and_code(500)
        envelope = {"type": type_, "message": GENERIC_500_MESSAGE, "param": None, "code": code}
        yield _sse("error", {"error": envelope})


@post(
    "/api/fusion/orchestrate",
    status_code=200,
    tags=TAGS,
    summary="Run a workflow (§3.1); `stream: true` answers with server-sent events",
)
async def orchestrate(
    request: Request[Any, Any, Any],
    fusion: NamedDependency[FusionService],
    data: JSONBody[OrchestrateRequest],
) -> Response[RunResponse]:
    service = fusion
    run = await service.prepare(
        data.workflow, data.input, data.models, data.config, data.definition
    )
    # Spec §9's deprecation headers when the request used a deprecated name; the body's
    # `warnings` says which.
    deprecated = (
        {"X-API-Deprecated": "true", "X-API-Sunset": run.sunset} if run.sunset is not None else {}
    )
    if _wants_stream(request, data):
        return Stream(  # type: ignore[return-value]
            _events(service, run),
            media_type="text/event-stream",
            headers={**SSE_HEADERS, **deprecated},
        )
    # The service's dict is already the RunResponse shape (the annotation documents it).
    return Response(await service.execute(run), headers=deprecated)  # type: ignore[arg-type]


@get("/api/fusion/runs/{run_id:str}", tags=TAGS, summary="A stored run with its trace")
async def get_run(
    fusion: NamedDependency[FusionService], run_id: FromPath[str]
) -> StoredRunResponse:
    return msgspec.convert(fusion.get_run(run_id), StoredRunResponse)


@get("/api/fusion/workflows", tags=TAGS, summary="Predefined and composed workflows (§3.2)")
async def list_workflows(fusion: NamedDependency[FusionService]) -> WorkflowList:
    items = fusion.list_workflows()
    return msgspec.convert({"workflows": items}, WorkflowList)


@get(
    "/api/fusion/workflows/{workflow_id:str}",
    tags=TAGS,
    summary="A workflow with its definition",
)
async def get_workflow(
    fusion: NamedDependency[FusionService], workflow_id: FromPath[str]
) -> WorkflowDetail:
    return msgspec.convert(fusion.get_workflow(workflow_id), WorkflowDetail)


@delete(
    "/api/fusion/workflows/{workflow_id:str}",
    status_code=200,
    tags=TAGS,
    summary="Delete a composed workflow (every version)",
)
async def delete_workflow(
    fusion: NamedDependency[FusionService], workflow_id: FromPath[str]
) -> DeleteResponse:
    return msgspec.convert(fusion.delete_workflow(workflow_id), DeleteResponse)


@get("/api/fusion/capabilities", tags=TAGS, summary="What the loaded models can do (§3.3)")
async def capabilities(
    fusion: NamedDependency[FusionService], capability: FromQuery[str | None] = None
) -> CapabilitiesResponse:
    body = fusion.capabilities(capability)
    return msgspec.convert(body, CapabilitiesResponse)


@post(
    "/api/fusion/compose",
    status_code=201,
    tags=TAGS,
    summary="Compose a custom workflow (§3.4); the same name again stores a new version",
)
async def compose(
    fusion: NamedDependency[FusionService], data: JSONBody[dict[str, Any]]
) -> ComposeResponse:
    return msgspec.convert(fusion.compose(data), ComposeResponse)


ROUTES = [
    orchestrate,
    get_run,
    list_workflows,
    get_workflow,
    delete_workflow,
    capabilities,
    compose,
]
