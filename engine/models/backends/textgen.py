"""Pieces shared by the text-generating backends."""

from __future__ import annotations

import threading
from collections.abc import Iterable, Iterator
from typing import Any, Self

from engine.config import Settings
from engine.models.backends.base import Backend, ChatChunk


class GenerativeBackend(Backend):
    """A backend whose models generate text, prefilling the prompt in steps of
    ``prefill_step_tokens`` (one pass over a long prompt would allocate attention for all
    of it at once)."""

    prefill_step_tokens = Settings.model_prefill_step_tokens

    def __init__(self, prefill_step_tokens: int | None = None) -> None:
        if prefill_step_tokens is not None:
            self.prefill_step_tokens = prefill_step_tokens

    @classmethod
    def from_settings(cls, settings: Settings) -> Self:
        return cls(settings.model_prefill_step_tokens)


def parameter_bytes(model: Any) -> int:
    from mlx.utils import tree_flatten

    return int(sum(v.nbytes for v in dict(tree_flatten(model.parameters())).values()))


class StopScanner:
    """Cuts generated text at the first stop string. Text that could still grow into a
    stop string is held back until the next piece decides it."""

    def __init__(self, stops: list[str]) -> None:
        self.stops = [s for s in stops if s]
        self.hold = max((len(s) for s in self.stops), default=1) - 1
        self.buffer = ""

    def feed(self, piece: str) -> tuple[str, bool]:
        """(text safe to emit, whether a stop string was hit)."""
        self.buffer += piece
        if not self.stops:
            out, self.buffer = self.buffer, ""
            return out, False
        hits = [i for i in (self.buffer.find(s) for s in self.stops) if i >= 0]
        if hits:
            out, self.buffer = self.buffer[: min(hits)], ""
            return out, True
        cut = max(0, len(self.buffer) - self.hold)
        out, self.buffer = self.buffer[:cut], self.buffer[cut:]
        return out, False

    def flush(self) -> str:
        out, self.buffer = self.buffer, ""
        return out


def stream_chunks(
    responses: Iterable[Any],
    stops: list[str],
    stop: threading.Event,
    prompt_tokens: int | None = None,
) -> Iterator[ChatChunk]:
    """Turn mlx-lm / mlx-vlm generation responses (``text``, ``generation_tokens``,
    ``finish_reason``, ``prompt_tokens``) into chunks, cutting at stop strings and
    ending early when ``stop`` is set; the last chunk carries the counts."""
    scanner = StopScanner(stops)
    completion, finish, prompt = 0, "length", prompt_tokens or 0
    for response in responses:
        completion = response.generation_tokens
        prompt = prompt_tokens if prompt_tokens is not None else response.prompt_tokens
        text, hit = scanner.feed(response.text)
        if text:
            yield ChatChunk(text)
        if hit:
            finish = "stop"
            break
        if stop.is_set():
            finish = "cancelled"
            break
        if response.finish_reason:
            finish = response.finish_reason
    yield ChatChunk(scanner.flush(), finish, prompt, completion)
