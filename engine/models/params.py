"""Checks on generation parameters that need the loaded model to decide."""

from __future__ import annotations

from typing import Any

from engine.errors import ErrorCode, InvalidRequest
from engine.models.backends.base import ChatParams


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
