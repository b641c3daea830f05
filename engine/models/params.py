"""Checks on generation parameters that need the loaded model to decide."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from engine.errors import ErrorCode, InvalidRequest
from engine.models.backends.base import ChatParams, read_config


def vocab_size(path: Path) -> int | None:
    """The size of the model's output layer, from its config (top level or text_config)."""
    try:
        config = read_config(path)
    except InvalidRequest:  # the directory went away after the load
        return None
    text: dict[str, Any] = config.get("text_config") or {}
    size = config.get("vocab_size") or text.get("vocab_size")
    return size if isinstance(size, int) and size > 0 else None


def check_logit_bias(path: Path, params: ChatParams) -> None:
    """Token ids in logit_bias index the logits directly, and MLX does not bound-check
    that index: an id outside the vocabulary crashes the process (SIGSEGV), so refuse it."""
    if not params.logit_bias:
        return
    size = vocab_size(path)
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
