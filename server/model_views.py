"""How a loaded model is described to HTTP callers: the spec's §2 metadata, info, stats and
list item, and the /health entry, built from the registry's ModelEntry. They live in
server/ because they are response bodies (engine/ returns domain objects); every route that
reports on models builds on these, so every view of a model agrees."""

from __future__ import annotations

from typing import Any

from engine.clock import utc_iso
from engine.models.backends import type_tag
from engine.models.backends.base import read_config
from engine.models.memory import gb
from engine.models.registry import ModelEntry

TIER = "3A"
OWNED_BY = "local-mlx"

# metadata keys the registry owns; a caller's metadata cannot override them.
_OWN_KEYS = ("id", "family", "type", "context_length", "tags", "tier", "created_at")


def iso(timestamp: float | None) -> str | None:
    """Epoch seconds as ISO 8601 UTC with a Z, as the spec writes dates."""
    if timestamp is None:
        return None
    return utc_iso(timestamp, timespec="seconds")


def request_tags(metadata: dict[str, Any]) -> list[str] | None:
    """The caller's ``metadata.tags`` if it is a list of strings, else None."""
    tags = metadata.get("tags")
    if isinstance(tags, list) and all(isinstance(t, str) for t in tags):
        return tags
    return None


def is_quantized(entry: ModelEntry) -> bool:
    try:
        config = read_config(entry.path)
    except Exception:  # the directory may be gone since the load; the model is in memory
        return False
    return bool(config.get("quantization") or config.get("quantization_config"))


def tags(entry: ModelEntry) -> list[str]:
    """ "local", the type's capability tag, "quantized" when the config says so, then the
    caller's own tags; each once, in that order."""
    found = ["local", type_tag(entry.type)]
    if is_quantized(entry):
        found.append("quantized")
    found += request_tags(entry.spec.metadata) or []
    return list(dict.fromkeys(found))


def metadata(entry: ModelEntry) -> dict[str, Any]:
    """§2.1's metadata object. Keys the caller added at load (e.g. ``description``) are
    kept beside the registry's own, which win on a clash."""
    extra = {k: v for k, v in entry.spec.metadata.items() if k not in _OWN_KEYS}
    own: dict[str, Any] = {
        "id": entry.id,
        "family": entry.model.family,
        "type": entry.type,
        "context_length": entry.model.context_length,
        "tags": tags(entry),
        "tier": TIER,
        "created_at": int(entry.created_at),
    }
    return {**extra, **own}


def load_result(entry: ModelEntry) -> dict[str, Any]:
    """§2.1's 200 body."""
    return {
        "model_id": entry.id,
        "status": "loaded",
        "vram_usage_gb": gb(entry.memory_bytes),
        "weights_gb": gb(entry.model.weight_bytes),
        "load_time_ms": entry.load_time_ms,
        "metadata": metadata(entry),
    }


def info(entry: ModelEntry) -> dict[str, Any]:
    """§2.3's body, plus the memory readings behind vram_usage_gb, the load options and
    the model's current queue."""
    slots = entry.slots
    return {
        "model_id": entry.id,
        "status": "loaded",
        "metadata": metadata(entry),
        "vram_usage_gb": gb(entry.memory_bytes),
        "load_time": iso(entry.created_at),
        "last_used": iso(entry.last_used),
        "request_count": entry.stats.request_count,
        "memory": {
            "measured_bytes": entry.memory_bytes,
            "weight_bytes": entry.model.weight_bytes,
            "measured_gb": gb(entry.memory_bytes),
            "weights_gb": gb(entry.model.weight_bytes),
        },
        "load_time_ms": entry.load_time_ms,
        "model_path": entry.spec.model_path,
        "priority": entry.spec.priority,
        "pinned": entry.spec.pinned,
        "capabilities": sorted(entry.model.capabilities),
        "warmup_completed": entry.warmup_completed,
        "queue": {
            "active": slots.active,
            "waiting": slots.waiting,
            "max_concurrency": slots.concurrency,
            "max_queue": slots.max_queue,
        },
        # A language model's continuous batch (null: it serves one request at a time).
        "batch": entry.decoder.batch.state() if entry.decoder is not None else None,
    }


def stats(entry: ModelEntry) -> dict[str, Any]:
    """§2.4's body. Latencies are null until a request has completed."""
    recorded = entry.stats
    return {
        "model_id": entry.id,
        "request_count": recorded.request_count,
        "total_tokens_processed": recorded.total_tokens,
        **recorded.summary(),
        "error_count": recorded.error_count,
        "last_error": iso(recorded.last_error_at),
        "last_error_message": recorded.last_error,
        "vram_usage_gb": gb(entry.memory_bytes),
        "latency_samples": len(recorded.latencies_ms),
    }


def model_object(entry: ModelEntry) -> dict[str, Any]:
    """One item of §2.5's list, which is also OpenAI's model object. ``family`` and
    ``context_length`` are left out when the model does not say."""
    item: dict[str, Any] = {
        "id": entry.id,
        "object": "model",
        "created": int(entry.created_at),
        "owned_by": OWNED_BY,
        "family": entry.model.family,
        "type": entry.type,
        "context_length": entry.model.context_length,
        "tags": tags(entry),
        "tier": TIER,
        "vram_usage_gb": gb(entry.memory_bytes),
        "status": "loaded",
    }
    return {k: v for k, v in item.items() if v is not None}


def health(entry: ModelEntry) -> dict[str, Any]:
    """One model in /health (§6.3)."""
    return {"id": entry.id, "status": "loaded", "warmup_completed": entry.warmup_completed}
