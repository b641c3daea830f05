"""OpenAI-compatible endpoints on the model registry: `POST /v1/chat/completions` (with SSE
streaming), `POST /v1/embeddings` and `POST /v1/audio/transcriptions`.
`GET /v1/models` lives in routes/models.py.

Only the request's shape is handled here; admission, generation, token counting and
cancellation are the registry's. Errors raised before a stream starts leave as the normal
envelope and status; once the 200 and the first event are out, an error is sent as a
`data: {"error": {...}}` event followed by `data: [DONE]`.
"""

from __future__ import annotations

import asyncio
import base64
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Annotated, Any, Literal, cast

import msgspec
import numpy as np
from litestar import Request, Response, post
from litestar.di import NamedDependency
from litestar.openapi.spec import OpenAPIFormat, OpenAPIMediaType, Operation, RequestBody, Schema
from litestar.openapi.spec.enums import OpenAPIType
from litestar.params import JSONBody
from litestar.response import Stream
from msgspec import Meta

from engine.config import Settings
from engine.errors import ErrorCode, FusionError, InternalError, InvalidRequest, NotFound
from engine.logging import get_logger
from engine.models.audio import decode_wav
from engine.models.backends import serving
from engine.models.backends.base import ChatChunk, ChatParams, ChatResult
from engine.models.params import openai_chat_params
from engine.models.registry import ModelRegistry
from engine.models.types import Operation as ModelOperation
from server.errors import GENERIC_500_MESSAGE
from server.openapi_docs import error_responses
from server.sse import SSE_HEADERS
from server.uploads import UploadLimits, read_multipart

log = get_logger("server.openai")

TAGS = ["openai"]
FINISH_REASONS = ("stop", "length", "tool_calls", "content_filter")


# -- chat ---------------------------------------------------------------------------------------
class StreamOptions(msgspec.Struct):
    include_usage: bool = False


class ChatCompletionRequest(msgspec.Struct):
    model: Annotated[str, Meta(min_length=1)]
    messages: Annotated[list[dict[str, Any]], Meta(min_length=1)]
    temperature: Annotated[float, Meta(ge=0, le=2)] | None = None
    top_p: Annotated[float, Meta(gt=0, le=1)] | None = None
    max_tokens: Annotated[int, Meta(ge=1)] | None = None
    max_completion_tokens: Annotated[int, Meta(ge=1)] | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    n: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: Any = None
    logit_bias: dict[str, float] | None = None


class ChatMessage(msgspec.Struct):
    role: str
    content: str


class ChatChoice(msgspec.Struct):
    index: int
    message: ChatMessage
    finish_reason: str
    logprobs: None = None


class PromptTokensDetails(msgspec.Struct):
    # Prompt tokens served from the model's prefix cache, as OpenAI reports them.
    cached_tokens: int


class Usage(msgspec.Struct):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails

    @classmethod
    def of(cls, counts: ChatChunk | ChatResult) -> Usage:
        return cls(
            counts.prompt_tokens,
            counts.completion_tokens,
            counts.prompt_tokens + counts.completion_tokens,
            PromptTokensDetails(counts.cached_tokens),
        )


class ChatCompletion(msgspec.Struct, kw_only=True):
    id: str
    object: str = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    system_fingerprint: str | None = None


def _chat_params(body: ChatCompletionRequest) -> ChatParams:
    if body.n not in (None, 1):
        raise InvalidRequest(
            "only n=1 is supported", param="n", code=ErrorCode.UNSUPPORTED_PARAMETER
        )
    return openai_chat_params(
        body.messages,
        max_tokens=body.max_completion_tokens or body.max_tokens,
        temperature=body.temperature,
        top_p=body.top_p,
        stop=body.stop,
        seed=body.seed,
        logit_bias=body.logit_bias,
        tools=None if body.tool_choice == "none" else body.tools,
    )


@contextmanager
def _model_param() -> Iterator[None]:
    """The registry names a missing or malformed model `model_id`; in OpenAI's bodies it
    is `model`."""
    try:
        yield
    except (NotFound, InvalidRequest) as exc:
        if exc.code in (ErrorCode.MODEL_NOT_FOUND, ErrorCode.INVALID_MODEL_ID):
            exc.param = "model"
        raise


def _finish_reason(reason: str | None) -> str:
    return reason if reason in FINISH_REASONS else "stop"


@post(
    "/v1/chat/completions",
    status_code=200,
    tags=TAGS,
    summary="Chat completion (OpenAI); `stream: true` answers with server-sent events",
    responses=error_responses(400, 404, 429, 503, 504),
)
async def chat_completions(
    registry: NamedDependency[ModelRegistry], data: JSONBody[ChatCompletionRequest]
) -> Response[ChatCompletion]:
    params = _chat_params(data)
    completion_id = f"chatcmpl-{uuid.uuid4().hex}"
    created = int(time.time())
    if data.stream:
        include_usage = bool(data.stream_options and data.stream_options.include_usage)
        return await _start_stream(  # type: ignore[return-value]  # SSE, not the JSON body
            registry, data, params, completion_id, created, include_usage
        )
    with _model_param():
        result = await registry.chat(data.model, data.messages, params)
    return Response(
        ChatCompletion(
            id=completion_id,
            created=created,
            model=data.model,
            choices=[
                ChatChoice(
                    index=0,
                    message=ChatMessage(role="assistant", content=result.content),
                    finish_reason=_finish_reason(result.finish_reason),
                )
            ],
            usage=Usage.of(result),
        )
    )


async def _start_stream(
    registry: ModelRegistry,
    body: ChatCompletionRequest,
    params: ChatParams,
    completion_id: str,
    created: int,
    include_usage: bool,
) -> Stream:
    """Wait for admission and the first piece before answering, so that an unknown model,
    a full queue or an over-long prompt still get their own status."""
    source = registry.chat_stream(body.model, body.messages, params)
    with _model_param():
        try:
            first = await anext(source)
        except StopAsyncIteration:
            first = None
    events = _sse(source, first, completion_id, created, body.model, include_usage)
    return Stream(events, media_type="text/event-stream", headers=SSE_HEADERS)


def _event(payload: Any) -> bytes:
    return b"data: " + msgspec.json.encode(payload) + b"\n\n"


async def _sse(
    source: AsyncIterator[ChatChunk],
    first: ChatChunk | None,
    completion_id: str,
    created: int,
    model: str,
    include_usage: bool,
) -> AsyncIterator[bytes]:
    def chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
        body: dict[str, Any] = {
            "id": completion_id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
        }
        if include_usage:
            body["usage"] = None
        return body

    async def pieces() -> AsyncIterator[ChatChunk]:
        if first is not None:
            yield first
        async for piece in source:
            yield piece

    last: ChatChunk | None = None
    try:
        yield _event(chunk({"role": "assistant", "content": ""}))
        async for piece in pieces():
            if piece.text:
                yield _event(chunk({"content": piece.text}))
            if piece.finish_reason is not None:
                last = piece
        reason = _finish_reason(last.finish_reason if last else None)
        yield _event(chunk({}, reason))
        if include_usage and last is not None:
            yield _event({**chunk({}), "choices": [], "usage": Usage.of(last)})
    except FusionError as exc:
        yield _event(exc.envelope())
    except Exception as exc:
        log.error("stream failed", model=model, error_type=type(exc).__name__, exc_info=exc)
        yield _event(InternalError(GENERIC_500_MESSAGE).envelope())
    finally:
        # The client went away or the response failed: stop generation now rather than
        # when the generator is collected.
        await cast(AsyncGenerator[ChatChunk, None], source).aclose()
    yield b"data: [DONE]\n\n"


# -- embeddings ------------------------------------------------------------------------------------
class EmbeddingRequest(msgspec.Struct):
    model: Annotated[str, Meta(min_length=1)]
    input: str | list[str]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: Annotated[int, Meta(ge=1)] | None = None
    user: str | None = None


class Embedding(msgspec.Struct, kw_only=True):
    object: str = "embedding"
    index: int
    embedding: list[float] | str
    truncated: bool


class EmbeddingUsage(msgspec.Struct):
    prompt_tokens: int
    total_tokens: int


class EmbeddingList(msgspec.Struct, kw_only=True):
    object: str = "list"
    data: list[Embedding]
    model: str
    usage: EmbeddingUsage


def _encode(vector: list[float], encoding: str) -> list[float] | str:
    if encoding == "base64":  # as OpenAI: little-endian float32 bytes
        return base64.b64encode(np.asarray(vector, dtype="<f4").tobytes()).decode("ascii")
    return vector


def _check_dimensions(requested: int | None, actual: int | None) -> None:
    if requested is not None and actual is not None and requested != actual:
        raise InvalidRequest(
            f"this model's embeddings have {actual} dimensions; it cannot return {requested}",
            param="dimensions",
            code=ErrorCode.DIMENSIONS_NOT_SUPPORTED,
        )


@post(
    "/v1/embeddings",
    status_code=200,
    tags=TAGS,
    summary="Embeddings (OpenAI)",
    responses=error_responses(400, 404, 429, 503, 504),
)
async def embeddings(
    registry: NamedDependency[ModelRegistry], data: JSONBody[EmbeddingRequest]
) -> EmbeddingList:
    texts = [data.input] if isinstance(data.input, str) else data.input
    if not texts:
        raise InvalidRequest("input must not be empty", param="input")
    with _model_param():
        entry = registry.get(data.model)
        _check_dimensions(data.dimensions, getattr(entry.model, "dimension", None))
        result = await registry.embed(data.model, texts)
    if result.vectors:
        _check_dimensions(data.dimensions, len(result.vectors[0]))
    return EmbeddingList(
        data=[
            Embedding(index=i, embedding=_encode(vector, data.encoding_format), truncated=cut)
            for i, (vector, cut) in enumerate(zip(result.vectors, result.truncated, strict=True))
        ],
        model=data.model,
        usage=EmbeddingUsage(result.prompt_tokens, result.prompt_tokens),
    )


# -- audio transcriptions ------------------------------------------------------------------------
AUDIO_FILE_FIELDS = frozenset({"file"})
AUDIO_TEXT_FIELDS = frozenset({"model", "language", "response_format"})
RESPONSE_FORMATS = ("json", "text")
_TRANSCRIPTION_FORM = Schema(
    type=OpenAPIType.OBJECT,
    required=["file", "model"],
    properties={
        "file": Schema(
            type=OpenAPIType.STRING,
            format=OpenAPIFormat.BINARY,
            description="A PCM WAV file (8/16/24/32-bit, any rate, mono or stereo)",
        ),
        "model": Schema(type=OpenAPIType.STRING, description="A loaded whisper model"),
        "language": Schema(type=OpenAPIType.STRING, description="ISO-639-1 code; else detected"),
        "response_format": Schema(type=OpenAPIType.STRING, enum=list(RESPONSE_FORMATS)),
    },
    additional_properties=False,  # another field is refused (400)
)


@dataclass
class TranscriptionOperation(Operation):
    """The body is read by hand (streamed, size-limited), so Litestar cannot infer it."""

    def __post_init__(self) -> None:
        self.request_body = RequestBody(
            content={"multipart/form-data": OpenAPIMediaType(schema=_TRANSCRIPTION_FORM)},
            required=True,
        )


class Transcription(msgspec.Struct):
    text: str


@post(
    "/v1/audio/transcriptions",
    status_code=200,
    tags=TAGS,
    summary="Transcribe audio (OpenAI); multipart/form-data with a WAV file",
    request_max_body_size=None,  # bounded per file and per field in server/uploads.py
    operation_class=TranscriptionOperation,
    responses=error_responses(400, 404, 413, 429, 503, 504),
)
async def transcriptions(
    request: Request[Any, Any, Any],
    registry: NamedDependency[ModelRegistry],
    settings: NamedDependency[Settings],
) -> Response[Any]:
    limits = UploadLimits(max_file_bytes=int(settings.audio_max_file_mb * 1_000_000), max_files=1)
    form = await read_multipart(
        request, limits, file_fields=AUDIO_FILE_FIELDS, text_fields=AUDIO_TEXT_FIELDS
    )
    model = form.fields.get("model", "").strip()
    if not model:
        raise InvalidRequest("the form field 'model' is required", param="model")
    if not form.files:
        raise InvalidRequest("upload the audio in the form field 'file'", param="file")
    response_format = form.fields.get("response_format", "").strip() or "json"
    if response_format not in RESPONSE_FORMATS:
        raise InvalidRequest(
            f"response_format '{response_format}' is not supported "
            f"(one of: {', '.join(RESPONSE_FORMATS)})",
            param="response_format",
        )
    with _model_param():
        registry.require(model, serving(ModelOperation.TRANSCRIBE), "transcription", param="model")
    upload = form.files[0]
    audio = await asyncio.to_thread(decode_wav, upload.data, upload.filename)
    with _model_param():
        result = await registry.transcribe(
            model, audio, form.fields.get("language", "").strip() or None
        )
    if response_format == "text":
        return Response(result["text"], media_type="text/plain; charset=utf-8")
    return Response(Transcription(text=result["text"]))


ROUTES = [chat_completions, embeddings, transcriptions]
