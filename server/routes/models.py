"""Model Management API (spec §2): load, unload, info, stats, list, warmup; the list is also
OpenAI's `GET /v1/models`, and `GET /v1/models/{id}` is OpenAI's retrieve-model.

Model ids may contain '/' (`mlx-community/qwen`), so everything after `/v1/models/` is one
`{rest:path}` parameter and the last segment picks the action: `.../info`, `.../stats`
(GET), `.../unload` (DELETE), `.../warmup` (POST); without one of those, GET retrieves
the model. `%2F` works too: the server decodes the path before routing. `POST
/v1/models/load` is a static route and takes precedence.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec
from litestar import delete, get, post
from litestar.di import NamedDependency
from litestar.exceptions import MethodNotAllowedException
from litestar.params import FromPath, FromQuery, JSONBody
from msgspec import Meta

from engine.errors import ErrorCode, InvalidRequest
from engine.models.memory import gb
from engine.models.registry import ModelRegistry
from engine.models.types import LoadSpec, ModelType
from server import model_views as views
from server.openapi_docs import error_responses

TAGS = ["models"]
# The action each trailing segment names, and the one method that serves it.
ACTIONS = {"info": "GET", "stats": "GET", "unload": "DELETE", "warmup": "POST"}


# -- request and response bodies ------------------------------------------------------------
class LoadRequest(msgspec.Struct, forbid_unknown_fields=True):
    model_path: Annotated[str, Meta(min_length=1)]
    # A string rather than ModelType: an unknown type is the registry's to refuse, as
    # 'invalid_model_type' naming the known ones, like every load problem it finds.
    model_type: Annotated[str, Meta(min_length=1, description=f"One of: {', '.join(ModelType)}.")]
    # Its shape and length are the registry's to check (engine/models/ids.py).
    model_id: Annotated[str, Meta(min_length=1)] | None = None
    context_length: Annotated[int, Meta(gt=0)] | None = None
    priority: Literal["low", "normal", "high"] = "normal"
    metadata: dict[str, Any] | None = None
    # Extensions (docs/api.md): never evicted to make room; per-model admission limits.
    pinned: bool = False
    max_concurrency: Annotated[int, Meta(ge=1)] | None = None
    max_queue: Annotated[int, Meta(ge=0)] | None = None


class LoadResponse(msgspec.Struct):
    model_id: str
    status: str
    vram_usage_gb: float
    weights_gb: float
    load_time_ms: float
    metadata: dict[str, Any]


class UnloadResponse(msgspec.Struct):
    model_id: str
    status: str
    vram_freed_gb: float
    unload_time_ms: float


class MemoryInfo(msgspec.Struct):
    measured_bytes: int
    weight_bytes: int
    measured_gb: float
    weights_gb: float


class QueueInfo(msgspec.Struct):
    active: int
    waiting: int
    max_concurrency: int
    max_queue: int


class BatchInfo(msgspec.Struct):
    max_batch: int
    decoding: int  # sequences in the batch now
    parked: int  # sequences out of it while their readers catch up
    prompt_cache_entries: int
    prompt_cache_bytes: int
    prompt_cache_max_bytes: int


class InfoResponse(msgspec.Struct):
    model_id: str
    status: str
    metadata: dict[str, Any]
    vram_usage_gb: float
    load_time: str
    last_used: str
    request_count: int
    memory: MemoryInfo
    load_time_ms: float
    model_path: str
    priority: str
    pinned: bool
    capabilities: list[str]
    warmup_completed: bool
    queue: QueueInfo
    batch: BatchInfo | None


class StatsResponse(msgspec.Struct):
    model_id: str
    request_count: int
    total_tokens_processed: int
    avg_latency_ms: float | None
    p50_latency_ms: float | None
    p95_latency_ms: float | None
    p99_latency_ms: float | None
    error_count: int
    last_error: str | None
    last_error_message: str | None
    vram_usage_gb: float
    latency_samples: int


class ModelObject(msgspec.Struct, kw_only=True, omit_defaults=True):
    id: str
    object: str
    created: int
    owned_by: str
    family: str | None = None
    type: str
    context_length: int | None = None
    tags: list[str]
    tier: str
    vram_usage_gb: float
    status: str


class ModelList(msgspec.Struct, kw_only=True):
    object: str = "list"
    data: list[ModelObject]


class WarmupRequest(msgspec.Struct, forbid_unknown_fields=True):
    prompt: Annotated[str, Meta(min_length=1)] = "Hello world"
    max_length: Annotated[int, Meta(ge=1)] = 100


class WarmupResponse(msgspec.Struct):
    model_id: str
    status: str
    warmup_time_ms: float
    prompt_tokens: int


# -- helpers ----------------------------------------------------------------------------------
def _split(rest: str) -> tuple[str, str | None]:
    """`a/b/info` -> ("a/b", "info"); `a/b` -> ("a/b", None)."""
    path = rest.strip("/")
    head, _, last = path.rpartition("/")
    if head and last in ACTIONS:
        return head, last
    return path, None


def _require(method: str, action: str | None) -> None:
    allowed = ACTIONS.get(action or "", "GET")
    if method != allowed:
        raise MethodNotAllowedException(headers={"Allow": allowed})


def _check_model_id(model_id: str) -> None:
    """A loaded id must stay addressable: its last segment must not read as an action."""
    last = model_id.rpartition("/")[2]
    if last in ACTIONS or model_id == "load":
        raise InvalidRequest(
            f"model_id {model_id!a} would clash with the route /v1/models/.../{last}: "
            "choose another id",
            param="model_id",
            code=ErrorCode.INVALID_MODEL_ID,
        )


def _load_spec(data: LoadRequest) -> LoadSpec:
    metadata = data.metadata or {}
    if "tags" in metadata and views.request_tags(metadata) is None:
        raise InvalidRequest("metadata.tags must be a list of strings", param="metadata.tags")
    if data.model_id is not None:
        _check_model_id(data.model_id)
    return LoadSpec(
        model_path=data.model_path,
        model_type=data.model_type,
        model_id=data.model_id,
        context_length=data.context_length,
        priority=data.priority,
        metadata=metadata,
        pinned=data.pinned,
        max_concurrency=data.max_concurrency,
        max_queue=data.max_queue,
    )


# -- routes -------------------------------------------------------------------------------------
@post(
    "/v1/models/load",
    status_code=200,
    tags=TAGS,
    summary="Load a model (§2.1)",
    responses=error_responses(400, 409, 503, 507),
)
async def load_model(
    registry: NamedDependency[ModelRegistry], data: JSONBody[LoadRequest]
) -> LoadResponse:
    entry = await registry.load(_load_spec(data))
    return msgspec.convert(views.load_result(entry), LoadResponse)


@get("/v1/models", tags=TAGS, summary="List loaded models (§2.5; OpenAI list models)")
async def list_models(registry: NamedDependency[ModelRegistry]) -> ModelList:
    items = [views.model_object(e) for e in registry.entries()]
    return msgspec.convert({"data": items}, ModelList)


@get(
    "/v1/models/{rest:path}",
    tags=TAGS,
    summary="Model info (…/info, §2.3), stats (…/stats, §2.4), or the model (OpenAI retrieve)",
    responses=error_responses(400, 404, 405),
)
async def get_model(
    registry: NamedDependency[ModelRegistry], rest: FromPath[str]
) -> InfoResponse | StatsResponse | ModelObject:
    model_id, action = _split(rest)
    _require("GET", action)
    entry = registry.get(model_id)
    if action == "info":
        return msgspec.convert(views.info(entry), InfoResponse)
    if action == "stats":
        return msgspec.convert(views.stats(entry), StatsResponse)
    return msgspec.convert(views.model_object(entry), ModelObject)


@delete(
    "/v1/models/{rest:path}",
    status_code=200,
    tags=TAGS,
    summary="Unload a model (§2.2)",
    responses=error_responses(400, 404, 405, 409),
)
async def unload_model(
    registry: NamedDependency[ModelRegistry], rest: FromPath[str], force: FromQuery[bool] = False
) -> UnloadResponse:
    model_id, action = _split(rest)
    _require("DELETE", action)
    freed, elapsed_ms = await registry.unload(model_id, force=force)
    return UnloadResponse(
        model_id=model_id, status="unloaded", vram_freed_gb=gb(freed), unload_time_ms=elapsed_ms
    )


@post(
    "/v1/models/{rest:path}",
    status_code=200,
    tags=TAGS,
    summary="Warm a model up (§2.6)",
    responses=error_responses(400, 404, 405, 429, 503, 504),
)
async def warmup_model(
    registry: NamedDependency[ModelRegistry],
    rest: FromPath[str],
    data: JSONBody[WarmupRequest | None] = None,
) -> WarmupResponse:
    model_id, action = _split(rest)
    _require("POST", action)
    body = data or WarmupRequest()
    elapsed_ms, tokens = await registry.warmup(model_id, body.prompt, body.max_length)
    return WarmupResponse(
        model_id=model_id, status="warmed", warmup_time_ms=elapsed_ms, prompt_tokens=tokens
    )


ROUTES = [load_model, list_models, get_model, unload_model, warmup_model]
