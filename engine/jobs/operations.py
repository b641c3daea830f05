"""What a job does, per operation (spec §5.1): `chat`, `vision`, `embed`, `transcribe` and
`workflow`. Each operation checks a submission before it is queued (so a bad one gets its
400/404 naming the field, never a 202) and runs a claimed job, reporting progress in
[0, 1]. OPERATIONS is the table the job service looks them up in.

Params name fields of the submission body: `model_id`, `input.messages[0].role`,
`input.input.question` (a workflow's own input), and so on.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import re
from collections.abc import AsyncGenerator, Callable, Sequence
from contextlib import aclosing
from dataclasses import dataclass
from typing import Annotated, Any, ClassVar, Protocol, TypeVar, cast

import msgspec
from msgspec import Meta

from engine.config import Settings
from engine.errors import ErrorCode, FusionError, InvalidRequest, PayloadTooLarge
from engine.fusion.service import FusionService, PreparedRun, RunOutcome
from engine.models.audio import decode_wav
from engine.models.backends import serving
from engine.models.backends.base import ChatChunk, ChatParams
from engine.models.params import check_logit_bias, openai_chat_params
from engine.models.registry import ModelEntry, ModelRegistry
from engine.models.types import Operation

# Reports progress in [0, 1]; cheap to call on every token (writes are throttled).
Progress = Callable[[float], None]
T = TypeVar("T")


@dataclass(frozen=True)
class OperationEnv:
    """What operations work with: the engine's collaborators and the server's shaping of
    a workflow's outcome into the §3.1 run body (a workflow job's result)."""

    models: ModelRegistry
    fusion: FusionService
    settings: Settings
    run_body: Callable[[RunOutcome], Any]


class JobOperation(Protocol):
    """One operation. `model_bound`: its jobs run on their model (`model_id`, required)
    and count against that model's concurrency; otherwise they are workflow jobs."""

    name: ClassVar[str]
    model_bound: ClassVar[bool]

    async def check(self, env: OperationEnv, model_id: str | None, input: Any) -> None:
        """Raise the request's error (400/404, `param` naming the field), before queueing."""
        ...

    async def run(
        self, env: OperationEnv, model_id: str | None, input: Any, progress: Progress
    ) -> Any:
        """Do the job; its JSON-able result."""
        ...


# -- parsing -------------------------------------------------------------------------------
_AT = re.compile(r" - at `\$(?P<path>[^`]*)`$")
_KEY_IN = re.compile(r" - at `key` in `\$(?P<path>[^`]*)`$")
_UNKNOWN = re.compile(
    r"^Object contains unknown field `(?P<field>[^`]+)`(?: - at `\$(?P<path>[^`]*)`)?$"
)
_MISSING = re.compile(r"^Object missing required field `(?P<field>[^`]+)`")


def parse_input(input: Any, into: type[T], prefix: str = "input") -> T:
    """`input` (a submission's JSON value) as `into`, a msgspec Struct; a mismatch is a
    400 whose param is the offending field's path under `prefix`."""
    if not isinstance(input, dict):
        raise InvalidRequest(f"{prefix} must be an object", param=prefix)
    try:
        return msgspec.convert(input, into)
    except msgspec.ValidationError as exc:
        raise _input_error(str(exc), prefix, getattr(into, "__struct_fields__", ())) from None


def _input_error(message: str, prefix: str, known: Sequence[str]) -> InvalidRequest:
    """msgspec's `message` as a 400 naming the field: its path (`$.messages[0]`, with
    `[...]`, a mapping's value, dropped) under `prefix`."""
    unknown = _UNKNOWN.match(message)
    if unknown is not None:
        path = unknown.group("path") or ""
        field = f"{prefix}{path}.{unknown.group('field')}"
        hint = f" (known: {', '.join(known)})" if known and not path else ""
        return InvalidRequest(
            f"unknown field '{field}'{hint}", param=field, code=ErrorCode.UNKNOWN_FIELD
        )
    path, text = prefix, message
    for pattern in (_KEY_IN, _AT):
        located = pattern.search(message)
        if located is not None:
            path = prefix + located.group("path").replace("[...]", "")
            text = message[: located.start()]
            break
    missing = _MISSING.match(text)
    if missing is not None:
        path = f"{path}.{missing.group('field')}"
        return InvalidRequest(f"{path} is required", param=path)
    return InvalidRequest(f"{path}: {text}", param=path)


def _prefixed(exc: FusionError, prefix: str) -> FusionError:
    """`exc` with its param under `prefix`, written as the param is (a JSON pointer such
    as a workflow input's `input/n`, or dotted)."""
    if exc.param is not None:
        exc.param = f"{prefix}{'/' if '/' in exc.param else '.'}{exc.param}"
    return exc


def _model(env: OperationEnv, model_id: str | None, operation: Operation) -> ModelEntry:
    """The loaded model `model_id` names, which must serve `operation`."""
    purpose = f"operation '{operation.value}'"
    if model_id is None:
        raise InvalidRequest(f"{purpose} needs a model_id", param="model_id")
    return env.models.require(model_id, serving(operation), purpose, param="model_id")


# -- chat and vision -----------------------------------------------------------------------
class ChatInput(msgspec.Struct, forbid_unknown_fields=True):
    messages: Annotated[list[dict[str, Any]], Meta(min_length=1)]
    temperature: Annotated[float, Meta(ge=0, le=2)] | None = None
    top_p: Annotated[float, Meta(gt=0, le=1)] | None = None
    max_tokens: Annotated[int, Meta(ge=1)] | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    logit_bias: dict[str, float] | None = None


class ChatOperation:
    """`input`: OpenAI's chat fields. Result: content, finish_reason and usage. Progress:
    completion tokens / max_tokens."""

    name: ClassVar[str] = "chat"
    model_bound: ClassVar[bool] = True
    serves: ClassVar[Operation] = Operation.CHAT

    def _params(
        self, env: OperationEnv, model_id: str | None, input: Any
    ) -> tuple[str, ChatInput, ChatParams]:
        entry = _model(env, model_id, self.serves)
        body = parse_input(input, ChatInput)
        params = openai_chat_params(
            body.messages,
            max_tokens=body.max_tokens,
            temperature=body.temperature,
            top_p=body.top_p,
            stop=body.stop,
            seed=body.seed,
            logit_bias=body.logit_bias,
            prefix="input.",
        )
        try:
            check_logit_bias(entry.vocab_size, params)
        except InvalidRequest as exc:
            raise _prefixed(exc, "input") from None
        return entry.id, body, params

    async def check(self, env: OperationEnv, model_id: str | None, input: Any) -> None:
        self._params(env, model_id, input)

    async def run(
        self, env: OperationEnv, model_id: str | None, input: Any, progress: Progress
    ) -> Any:
        model, body, params = self._params(env, model_id, input)
        parts: list[str] = []
        finish_reason: str | None = None
        prompt_tokens = completion_tokens = cached_tokens = 0
        # aclosing: a cancelled job closes the stream here, which stops the generation and
        # gives the model slot back now, not when the generator is collected.
        stream = env.models.chat_stream(model, body.messages, params)
        async with aclosing(cast(AsyncGenerator[ChatChunk, None], stream)) as chunks:
            async for chunk in chunks:
                parts.append(chunk.text)
                if chunk.finish_reason is not None:
                    finish_reason = chunk.finish_reason
                    prompt_tokens, completion_tokens = chunk.prompt_tokens, chunk.completion_tokens
                    cached_tokens = chunk.cached_tokens
                elif chunk.text:
                    # A piece is a token, or a few held back while a stop string was possible.
                    completion_tokens += 1
                progress(min(1.0, completion_tokens / params.max_tokens))
        return {
            "content": "".join(parts),
            "finish_reason": finish_reason or "stop",
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
                "prompt_tokens_details": {"cached_tokens": cached_tokens},
            },
        }


class VisionOperation(ChatOperation):
    """Chat on a multimodal model; messages may carry OpenAI image content parts."""

    name: ClassVar[str] = "vision"
    serves: ClassVar[Operation] = Operation.VISION


# -- embeddings ------------------------------------------------------------------------------
class EmbedInput(msgspec.Struct, forbid_unknown_fields=True):
    input: str | list[str]


class EmbedOperation:
    """`input`: {"input": a text or a non-empty list of texts}. Result: the embeddings,
    their dimensions, which texts were truncated, and usage."""

    name: ClassVar[str] = "embed"
    model_bound: ClassVar[bool] = True

    def _texts(self, env: OperationEnv, model_id: str | None, input: Any) -> tuple[str, list[str]]:
        entry = _model(env, model_id, Operation.EMBED)
        body = parse_input(input, EmbedInput)
        texts = [body.input] if isinstance(body.input, str) else body.input
        if not texts:
            raise InvalidRequest("input.input must not be empty", param="input.input")
        return entry.id, texts

    async def check(self, env: OperationEnv, model_id: str | None, input: Any) -> None:
        self._texts(env, model_id, input)

    async def run(
        self, env: OperationEnv, model_id: str | None, input: Any, progress: Progress
    ) -> Any:
        model, texts = self._texts(env, model_id, input)
        result = await env.models.embed(model, texts)
        return {
            "embeddings": result.vectors,
            "dimensions": len(result.vectors[0]) if result.vectors else 0,
            "truncated": result.truncated,
            "usage": {"prompt_tokens": result.prompt_tokens, "total_tokens": result.prompt_tokens},
        }


# -- transcription ---------------------------------------------------------------------------
class TranscribeInput(msgspec.Struct, forbid_unknown_fields=True):
    audio: Annotated[str, Meta(min_length=1)]
    language: str | None = None


class TranscribeOperation:
    """`input`: {"audio": a WAV file in base64, "language": optional ISO-639-1 code}, the
    file at most `audio_max_file_mb`. Result: {"text": ...}."""

    name: ClassVar[str] = "transcribe"
    model_bound: ClassVar[bool] = True

    async def _audio(
        self, env: OperationEnv, model_id: str | None, input: Any
    ) -> tuple[str, Any, str | None]:
        entry = _model(env, model_id, Operation.TRANSCRIBE)
        body = parse_input(input, TranscribeInput)
        limit = int(env.settings.audio_max_file_mb * 1_000_000)
        # Refused by its encoded length before anything is decoded (4 characters: 3 bytes).
        if len(body.audio) // 4 * 3 > limit + 3:
            raise PayloadTooLarge(
                f"the audio is larger than {limit} bytes (setting audio_max_file_mb)",
                param="input.audio",
            )
        audio = await asyncio.to_thread(_decode_audio, body.audio, limit)
        return entry.id, audio, body.language

    async def check(self, env: OperationEnv, model_id: str | None, input: Any) -> None:
        await self._audio(env, model_id, input)

    async def run(
        self, env: OperationEnv, model_id: str | None, input: Any, progress: Progress
    ) -> Any:
        model, audio, language = await self._audio(env, model_id, input)
        result = await env.models.transcribe(model, audio, language)
        return {"text": result["text"]}


def _decode_audio(encoded: str, limit: int) -> Any:
    try:
        data = base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidRequest(
            "input.audio must be a WAV file in base64", param="input.audio"
        ) from None
    if len(data) > limit:
        raise PayloadTooLarge(
            f"the audio is {len(data)} bytes; the limit is {limit} (setting audio_max_file_mb)",
            param="input.audio",
        )
    try:
        return decode_wav(data, "input.audio")
    except InvalidRequest as exc:
        exc.param = "input.audio"
        raise


# -- workflows -------------------------------------------------------------------------------
class WorkflowInput(msgspec.Struct, forbid_unknown_fields=True):
    """What orchestrate takes (server/routes/fusion.py OrchestrateRequest, less `stream`)."""

    workflow: Annotated[str, Meta(min_length=1)]
    input: dict[str, Any] | None = None
    models: dict[str, str | None] | None = None
    config: dict[str, Any] | None = None
    definition: dict[str, Any] | None = None


class WorkflowOperation:
    """`input`: a workflow run's request. Result: the §3.1 run body; the run is stored as
    an orchestrated one is. Progress: top-level steps finished / steps. `model_id` is
    optional, a label for listings (it must name a loaded model)."""

    name: ClassVar[str] = "workflow"
    model_bound: ClassVar[bool] = False

    async def _prepare(self, env: OperationEnv, model_id: str | None, input: Any) -> PreparedRun:
        if model_id is not None:
            env.models.get(model_id, "model_id")
        body = parse_input(input, WorkflowInput)
        try:
            return await env.fusion.prepare(
                body.workflow, body.input, body.models, body.config, body.definition
            )
        except FusionError as exc:
            raise _prefixed(exc, "input") from None

    async def check(self, env: OperationEnv, model_id: str | None, input: Any) -> None:
        await self._prepare(env, model_id, input)

    async def run(
        self, env: OperationEnv, model_id: str | None, input: Any, progress: Progress
    ) -> Any:
        run = await self._prepare(env, model_id, input)
        steps = max(1, len(run.workflow.steps))
        finished: set[str] = set()

        def on_event(event: dict[str, Any]) -> None:
            # The top-level steps (a child step's event carries its `path`: a for_each
            # item, a repeat pass, a sub-run's step); a step is counted once.
            if event.get("event") == "step_finished" and "path" not in event:
                finished.add(str(event.get("step_id")))
                progress(min(1.0, len(finished) / steps))

        return env.run_body(await env.fusion.execute(run, on_event=on_event))


OPERATIONS: dict[str, JobOperation] = {
    op.name: op
    for op in (
        ChatOperation(),
        VisionOperation(),
        EmbedOperation(),
        TranscribeOperation(),
        WorkflowOperation(),
    )
}


def operation(name: str) -> JobOperation:
    """The operation named `name`; 400 `invalid_operation` listing the supported ones."""
    found = OPERATIONS.get(name)
    if found is None:
        raise InvalidRequest(
            f"operation '{name}' is not supported (one of: {', '.join(OPERATIONS)})",
            param="operation",
            code=ErrorCode.INVALID_OPERATION,
        )
    return found
