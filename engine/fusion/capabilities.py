"""Capability discovery (spec §3.3), derived from the models that are loaded right now."""

from __future__ import annotations

from dataclasses import dataclass

from engine.errors import ErrorCode, InvalidRequest
from engine.models.backends import type_capabilities
from engine.models.memory import gb
from engine.models.registry import ModelEntry
from engine.models.types import Capability

LONG_CONTEXT_TOKENS = 32_768
CAPABILITIES = tuple(c.value for c in Capability)


def model_capabilities(entry: ModelEntry) -> list[str]:
    """What one loaded model can do: by its type (what its backend declares), what
    its backend found (tool_calling when the chat template handles `tools`), and
    long_context when its context length is at least 32768 tokens; in CAPABILITIES order."""
    found: set[str] = set(type_capabilities(entry.type))
    found |= {c.replace("-", "_") for c in entry.model.capabilities}
    if (entry.model.context_length or 0) >= LONG_CONTEXT_TOKENS:
        found.add("long_context")
    return [c for c in CAPABILITIES if c in found]


def normalise(capability: str) -> str:
    name = capability.strip().lower().replace("-", "_")
    if name not in CAPABILITIES:
        raise InvalidRequest(
            f"unknown capability '{capability}'; known: {', '.join(CAPABILITIES)}",
            param="capability",
            code=ErrorCode.INVALID_CAPABILITY,
        )
    return name


@dataclass(frozen=True)
class ModelCapabilities:
    """One loaded model and what it can do."""

    id: str
    type: str
    capabilities: list[str]
    context_length: int | None
    vram_usage_gb: float


@dataclass(frozen=True)
class Capabilities:
    """Each capability (in CAPABILITIES order) with the ids of the models that have it,
    and the models themselves by id."""

    by_capability: dict[str, list[str]]
    models: list[ModelCapabilities]


def capabilities(entries: list[ModelEntry], capability: str | None = None) -> Capabilities:
    """§3.3's answer. With `capability`, only that one and the models that have it."""
    wanted = normalise(capability) if capability is not None else None
    by_name: dict[str, list[str]] = {c: [] for c in CAPABILITIES if wanted in (None, c)}
    models = []
    for entry in sorted(entries, key=lambda e: e.id):
        caps = model_capabilities(entry)
        if wanted is not None and wanted not in caps:
            continue
        for cap in caps:
            if cap in by_name:
                by_name[cap].append(entry.id)
        models.append(
            ModelCapabilities(
                id=entry.id,
                type=entry.type,
                capabilities=caps,
                context_length=entry.model.context_length,
                vram_usage_gb=gb(entry.memory_bytes),
            )
        )
    return Capabilities(by_name, models)
