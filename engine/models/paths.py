"""Where a model's files are: a local directory, or a hub id resolved through the local
Hugging Face cache or, when the hub answers, a download. Offline, fail at once."""

from __future__ import annotations

import os
import re
import socket
from pathlib import Path

from engine.errors import ErrorCode, InvalidRequest

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
HUB_HOST = ("huggingface.co", 443)
PROBE_TIMEOUT_S = 3.0


def _hub_reachable() -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        return False
    try:
        with socket.create_connection(HUB_HOST, timeout=PROBE_TIMEOUT_S):
            return True
    except OSError:
        return False


def resolve_model_path(model_path: str) -> Path:
    local = Path(model_path).expanduser()
    if local.is_dir():
        return local.resolve()
    if not HUB_ID.match(model_path):
        raise InvalidRequest(
            f"model_path '{model_path}' is neither a local directory nor a hub id (owner/name)",
            param="model_path",
            code=ErrorCode.INVALID_MODEL_PATH,
        )
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(model_path, local_files_only=True))
    except (LocalEntryNotFoundError, OSError, ValueError):
        pass
    if not _hub_reachable():
        raise InvalidRequest(
            f"model_path '{model_path}' is not a local directory, is not in the local hub "
            "cache, and the model hub is unreachable: download the model elsewhere and pass "
            "its directory",
            param="model_path",
            code=ErrorCode.MODEL_UNAVAILABLE_OFFLINE,
        )
    try:
        return Path(snapshot_download(model_path))
    except Exception as exc:
        raise InvalidRequest(
            f"could not download '{model_path}' from the hub: {exc}",
            param="model_path",
            code=ErrorCode.INVALID_MODEL_PATH,
        ) from None
