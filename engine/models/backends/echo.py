"""The `echo` model type: a fake model with no weights, for tests and demos. It answers a
chat with the last user message's text, streamed a word at a time; it counts a word (a run
of non-space characters) as a token; it embeds a text as the normalised sum of one
pseudo-random vector per word, so texts sharing words are near and RAG runs end to end.
Everything it returns is a function of its input alone.

``model_path`` is not read: any non-empty string is accepted, and like any path it is the
model's id unless the load names one (``echo`` by convention)."""

from __future__ import annotations

import hashlib
import math
import re
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from engine.models.backends.base import (
    Backend,
    ChatChunk,
    ChatParams,
    EmbedResult,
    LoadedModel,
)
from engine.models.backends.textgen import StopScanner
from engine.models.types import Capability, ModelType, Operation

DIMENSION = 64
MAX_WORDS = 8192  # what an embedding reads when the load gives no context_length
_WORD = re.compile(r"\S+")
_FEATURE = re.compile(r"\w+")


def words(text: str) -> list[re.Match[str]]:
    """The tokens of ``text`` as echo counts them."""
    return list(_WORD.finditer(text))


def _word_vector(word: str) -> list[float]:
    digest = hashlib.shake_256(word.encode("utf-8")).digest(DIMENSION)
    return [byte - 127.5 for byte in digest]


def vector(text: str) -> list[float]:
    """A unit vector: the sum of the vectors of its lower-cased words, punctuation left
    out (of the whole text when it has none)."""
    total = [0.0] * DIMENSION
    for word in _FEATURE.findall(text.lower()) or [text]:
        total = [a + b for a, b in zip(total, _word_vector(word), strict=True)]
    norm = math.sqrt(sum(x * x for x in total)) or 1.0
    return [x / norm for x in total]


def _last_user_text(messages: Sequence[dict[str, Any]]) -> str:
    users = [m for m in messages if m.get("role") == "user"]
    return str(users[-1].get("content") or "") if users else ""


class EchoBackend(Backend):
    model_type = ModelType.ECHO
    capabilities = (Capability.CHAT, Capability.EMBEDDINGS)
    operations = frozenset(
        {Operation.CHAT, Operation.EMBED, Operation.COUNT_TOKENS, Operation.TOKENIZE}
    )
    package = "fusion"  # built in: nothing to install
    reads_files = False

    def available(self) -> bool:
        return True

    def load(self, path: Path, context_length: int | None) -> LoadedModel:
        return EchoModel(context_length)


class EchoModel(LoadedModel):
    model_type = ModelType.ECHO
    family = "echo"
    capabilities = frozenset(EchoBackend.capabilities)

    # What RAG ingest reads of an embedder (EmbeddingModel's): the words a chunk may hold
    # (the context length when the load gives one) and the tokens added around a text.
    special_tokens = 0
    dimension = DIMENSION

    def __init__(self, context_length: int | None) -> None:
        self.context_length = context_length
        self.max_seq_length = context_length or MAX_WORDS

    def chat_stream(
        self, messages: Sequence[dict[str, Any]], params: ChatParams, stop: threading.Event
    ) -> Iterator[ChatChunk]:
        """One chunk per word (with the space before it), at most ``max_tokens`` words,
        cut before the first stop string."""
        text = _last_user_text(messages)
        spans = words(text)
        prompt = sum(self.count_tokens(str(m.get("content") or "")) for m in messages)
        scanner = StopScanner(params.stop)
        finish, start = "stop", 0
        sent: list[str] = []  # joined once: adding each word to a string is quadratic
        for i, match in enumerate(spans):
            if stop.is_set():
                finish = "cancelled"
                break
            if i == params.max_tokens:
                finish = "length"
                break
            end = len(text) if i == len(spans) - 1 else match.end()
            piece, hit = scanner.feed(text[start:end])
            start = end
            sent.append(piece)
            if piece:
                yield ChatChunk(piece)
            if hit:
                break
        rest = scanner.flush() if finish != "cancelled" else ""
        yield ChatChunk(rest, finish, prompt, self.count_tokens("".join(sent) + rest))

    def count_tokens(self, text: str) -> int:
        return len(words(text))

    def token_offsets(self, text: str) -> list[tuple[int, int]]:
        return [m.span() for m in words(text)]

    def warmup(self, prompt: str, max_length: int) -> int:
        return min(self.count_tokens(prompt), max_length)

    def embed(self, texts: Sequence[str], stop: threading.Event) -> EmbedResult:
        return EmbedResult(
            vectors=[vector(text) for text in texts],
            prompt_tokens=sum(self.count_tokens(text) for text in texts),
            truncated=[False] * len(texts),
        )
