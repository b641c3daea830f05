"""Generation parameters: OpenAI's chat fields read into ChatParams, and the checks that
need the loaded model to decide."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from engine.errors import ErrorCode, InvalidRequest
from engine.models.backends.base import OPENAI_CHAT_DEFAULTS, ChatParams


def vocab_size(config: dict[str, Any]) -> int | None:
    """The size of the model's output layer, from its config (top level or text_config)."""
    text: dict[str, Any] = config.get("text_config") or {}
    size = config.get("vocab_size") or text.get("vocab_size")
    return size if isinstance(size, int) and size > 0 else None


def check_logit_bias(size: int | None, params: ChatParams) -> None:
    """Token ids in logit_bias index the logits directly, and MLX does not bound-check
    that index: an id outside the vocabulary (of ``size``, the loaded model's
    `vocab_size`) crashes the process (SIGSEGV), so refuse it."""
    if not params.logit_bias:
        return
    if size is None:
        raise InvalidRequest(
            "logit_bias cannot be checked against this model's vocabulary (no vocab_size "
            "in its config)",
            param="logit_bias",
            code=ErrorCode.INVALID_LOGIT_BIAS,
        )
    bad = sorted(t for t in params.logit_bias if not 0 <= t < size)
    if bad:
        raise InvalidRequest(
            f"logit_bias token ids must be in [0, {size}); got {', '.join(map(str, bad[:5]))}",
            param="logit_bias",
            code=ErrorCode.INVALID_LOGIT_BIAS,
        )


def openai_chat_params(
    messages: list[dict[str, Any]],
    *,
    max_tokens: int | None,
    temperature: float | None,
    top_p: float | None,
    stop: str | list[str] | None,
    seed: int | None,
    logit_bias: Mapping[str, float] | None,
    tools: list[dict[str, Any]] | None = None,
    prefix: str = "",
) -> ChatParams:
    """Generation parameters as OpenAI's chat API writes them (defaults
    OPENAI_CHAT_DEFAULTS): every message needs a string role, logit_bias keys are token
    ids written as strings. `prefix` is put before the params errors name. Used by
    /v1/chat/completions and by chat jobs."""
    for i, message in enumerate(messages):
        if not isinstance(message.get("role"), str):
            raise InvalidRequest(
                "every message needs a string 'role'", param=f"{prefix}messages[{i}].role"
            )
    bias: dict[int, float] | None = None
    if logit_bias:
        try:
            bias = {int(token): float(value) for token, value in logit_bias.items()}
        except ValueError:
            raise InvalidRequest(
                "logit_bias keys must be token ids (integers as strings)",
                param=f"{prefix}logit_bias",
                code=ErrorCode.INVALID_LOGIT_BIAS,
            ) from None
    defaults = OPENAI_CHAT_DEFAULTS
    return ChatParams(
        max_tokens=max_tokens or defaults.max_tokens,
        temperature=defaults.temperature if temperature is None else temperature,
        top_p=defaults.top_p if top_p is None else top_p,
        stop=[stop] if isinstance(stop, str) else list(stop or []),
        seed=seed,
        logit_bias=bias,
        tools=tools,
    )
