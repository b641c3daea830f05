"""The `model_call` step type: one request to a loaded model (chat, vision, embed or
count_tokens) through the model registry."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, ClassVar

from engine.errors import InvalidRequest
from engine.models.backends import serving
from engine.models.backends.base import ChatParams
from engine.models.messages import has_image, prompt_messages
from engine.models.types import Operation
from engine.steps.base import CheckContext, StepContext, StepPlugin

if TYPE_CHECKING:  # the registry needs the server extra (metrics); validation loads this module
    from engine.models.registry import ModelRegistry

OPERATIONS = (Operation.CHAT, Operation.VISION, Operation.EMBED, Operation.COUNT_TOKENS)
# The model types that serve each operation, as their backends declare.
MODEL_TYPES: dict[str, tuple[str, ...]] = {op.value: serving(op) for op in OPERATIONS}
PROMPT_KEYS = ("prompt", "image_url", "system")

_GENERATION: dict[str, Any] = {
    "temperature": {"type": "number", "minimum": 0, "description": "Default 0.7."},
    "top_p": {"type": "number", "exclusiveMinimum": 0, "maximum": 1, "description": "Default 1."},
    "max_tokens": {"type": "integer", "minimum": 1, "description": "Default 512."},
    "stop": {
        "type": ["string", "array"],
        "items": {"type": "string"},
        "description": "Stop string(s): generation ends before the first one.",
    },
    "seed": {"type": "integer", "description": "Sampling seed, for repeatable output."},
}

INPUT_SCHEMA: dict[str, Any] = {
    # One schema for three shapes: `properties` only constrain an object, `items` only an
    # array (a union of types rather than anyOf, so errors name the offending key).
    "type": ["string", "array", "object"],
    "description": (
        "chat / vision: {messages: [...]} or {prompt, image_url?, system?}, plus generation "
        "options (temperature, top_p, max_tokens, stop, seed). embed: a text or a list of "
        "texts. count_tokens: a text."
    ),
    "items": {"type": "string"},
    "properties": {
        "messages": {
            "type": "array",
            "minItems": 1,
            "description": "OpenAI-style messages; content may hold text and image_url parts.",
            "items": {
                "type": "object",
                "properties": {
                    "role": {"enum": ["system", "user", "assistant", "tool"]},
                    "content": {"type": ["string", "array", "null"]},
                },
                "required": ["role", "content"],
            },
        },
        "prompt": {"type": "string", "description": "The user's message."},
        "image_url": {
            "type": "string",
            "description": "An image for the prompt: a data: URI, an http(s) URL (fetched "
            "under the server's SSRF policy) or a file under the image root.",
        },
        "system": {"type": "string", "description": "A system message before the prompt."},
        **_GENERATION,
    },
    "additionalProperties": False,
}


VECTOR: dict[str, Any] = {"type": "array", "items": {"type": "number"}}
VECTORS: dict[str, Any] = {"type": "array", "items": VECTOR}
# What each operation outputs (embed: a vector for a text, a list of them for a list).
OUTPUT_SCHEMAS: dict[str, dict[str, Any]] = {
    "chat": {
        "type": "object",
        "properties": {
            "content": {"type": "string"},
            "finish_reason": {"type": "string"},
            "usage": {
                "type": "object",
                "properties": {
                    "prompt_tokens": {"type": "integer"},
                    "completion_tokens": {"type": "integer"},
                    "total_tokens": {"type": "integer"},
                },
                "required": ["prompt_tokens", "completion_tokens", "total_tokens"],
                "additionalProperties": False,
            },
        },
        "required": ["content", "finish_reason", "usage"],
        "additionalProperties": False,
    },
    "embed": {"anyOf": [VECTOR, VECTORS]},
    "count_tokens": {
        "type": "object",
        "properties": {"tokens": {"type": "integer"}},
        "required": ["tokens"],
        "additionalProperties": False,
    },
}
OUTPUT_SCHEMAS["vision"] = OUTPUT_SCHEMAS["chat"]


class ModelCallStep(StepPlugin):
    type_name = "model_call"
    description = (
        "Call a loaded model. operation chat (lm or multimodal) and vision (multimodal, with "
        "an image) output {content, finish_reason, usage} and stream `token` events; embed "
        "(embeddings) outputs a vector for a text, a list of vectors for a list; "
        "count_tokens outputs {tokens}."
    )
    params_schema: ClassVar[dict[str, Any]] = {
        "type": "object",
        "properties": {
            "model_id": {"type": "string", "minLength": 1, "description": "A loaded model."},
            "operation": {"enum": list(MODEL_TYPES)},
            "input": INPUT_SCHEMA,
        },
        "required": ["model_id", "operation", "input"],
    }
    model_param = "model_id"
    output_schema: ClassVar[dict[str, Any]] = {
        "anyOf": [OUTPUT_SCHEMAS["chat"], OUTPUT_SCHEMAS["embed"], OUTPUT_SCHEMAS["count_tokens"]]
    }

    def output_schema_for(self, params: Mapping[str, Any], prepared: Any) -> dict[str, Any]:
        operation, value = params.get("operation"), params.get("input")
        if operation == "embed" and not _is_template(value):
            return VECTOR if isinstance(value, str) else VECTORS
        if isinstance(operation, str) and operation in OUTPUT_SCHEMAS:
            return OUTPUT_SCHEMAS[operation]
        return self.output_schema

    def check(self, params: Mapping[str, Any], ctx: CheckContext) -> None:
        operation, value = params.get("operation"), params.get("input")
        # Checked even when the schema already refused the parameters: any JSON may be here.
        if not isinstance(operation, str) or operation not in MODEL_TYPES or _is_template(value):
            return
        problem = _input_problem(operation, value)
        if problem:
            ctx.report(problem, ("input",))

    async def run(self, params: dict[str, Any], ctx: StepContext, prepared: Any = None) -> Any:
        models = ctx.models
        model_id, operation, value = params["model_id"], params["operation"], params["input"]
        problem = _input_problem(operation, value)
        if problem:
            raise InvalidRequest(problem, param="input")
        models.require(model_id, MODEL_TYPES[operation], f"operation '{operation}'")
        if operation == "embed":
            texts = [value] if isinstance(value, str) else value
            vectors = (await models.embed(model_id, texts)).vectors
            return vectors[0] if isinstance(value, str) else vectors
        if operation == "count_tokens":
            return {"tokens": await models.count_tokens(model_id, value)}
        return await _chat(models, model_id, operation, value, ctx)


async def _chat(
    models: ModelRegistry, model_id: str, operation: str, value: dict[str, Any], ctx: StepContext
) -> dict[str, Any]:
    if "messages" in value:
        messages = value["messages"]
    else:
        messages = prompt_messages(
            value["prompt"], image_url=value.get("image_url"), system=value.get("system")
        )
    if operation == "vision" and not has_image(messages):
        raise InvalidRequest(
            "operation 'vision' needs an image: give input.image_url, or an image_url part "
            "in input.messages",
            param="input",
        )
    options = {k: v for k, v in value.items() if k in ChatParams.OPTIONS}
    params = ChatParams.from_options(options, param="input")
    extra = {} if ctx.index is None else {"index": ctx.index}
    result = await models.chat(
        model_id, messages, params, on_text=lambda text: ctx.emit("token", {"delta": text, **extra})
    )
    return {
        "content": result.content,
        "finish_reason": result.finish_reason,
        "usage": {
            "prompt_tokens": result.prompt_tokens,
            "completion_tokens": result.completion_tokens,
            "total_tokens": result.total_tokens,
        },
    }


def _is_template(value: Any) -> bool:
    return isinstance(value, str) and ("{{" in value or "{%" in value)


def _input_problem(operation: str, value: Any) -> str | None:
    """What is wrong with ``input`` for the operation (None: nothing). On raw parameters,
    templated parts are not judged."""
    if operation == "embed":
        if isinstance(value, str) or (
            isinstance(value, list) and all(isinstance(v, str) for v in value)
        ):
            return None
        return "operation 'embed' takes a text or a list of texts as input"
    if operation == "count_tokens":
        return None if isinstance(value, str) else "operation 'count_tokens' takes a text"
    if not isinstance(value, dict):
        return (
            f"operation '{operation}' takes an object as input: "
            "{messages: [...]} or {prompt: ..., image_url: ...}"
        )
    prompt_keys = sorted(k for k in PROMPT_KEYS if k in value)
    if "messages" in value and prompt_keys:
        return f"give input.messages or input.prompt, not both (also given: {prompt_keys})"
    if "messages" not in value and "prompt" not in value:
        return f"operation '{operation}' needs input.messages or input.prompt"
    return None
