"""Split extracted sections into chunks of at most ``chunk_size`` tokens of the embedding
model's own tokenizer, preferring paragraph, then sentence boundaries, with ``overlap``
tokens of whole sentences carried into the next chunk."""

from __future__ import annotations

import re
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass

from engine.rag.types import Chunk, Section

# Character spans of a text's tokens, special tokens excluded.
Tokenize = Callable[[str], list[tuple[int, int]]]

_WORD = re.compile(r"\S+")

_PARAGRAPH = re.compile(r"\n\s*\n")
# A sentence ends at . ! ? (optionally closed by quotes or brackets) before whitespace and
# a capital, digit or opening quote; abbreviations mid-sentence rarely meet all three.
_SENTENCE_END = re.compile(
    "([.!?\u2026][\"'\u201d\u2019)\\]]*)\\s+(?=[\"'\u201c\u2018(\\[]?[A-Z0-9])"
)


@dataclass(frozen=True)
class _Unit:
    text: str
    tokens: int
    page: int | None
    heading: str | None
    new_paragraph: bool


def word_offsets(text: str) -> list[tuple[int, int]]:
    """A Tokenize without a model: whitespace-separated words count as tokens."""
    return [match.span() for match in _WORD.finditer(text)]


class TooManyChunks(Exception):
    """More chunks than `max_chunks`: raised as soon as the next one is made."""


class ChunkingStopped(Exception):
    """The caller's `stop` event was set (its request went away)."""


def chunk_sections(
    sections: Sequence[Section],
    tokenize: Tokenize,
    chunk_size: int,
    overlap: int,
    *,
    max_chunks: int | None = None,
    stop: threading.Event | None = None,
) -> list[Chunk]:
    """The sections' chunks. More than `max_chunks` raises TooManyChunks and a set
    `stop` raises ChunkingStopped, both without chunking the rest."""
    if chunk_size < 1 or not 0 <= overlap < chunk_size:
        raise ValueError("need chunk_size >= 1 and 0 <= overlap < chunk_size")
    chunks: list[Chunk] = []
    for group in _pack(_units(sections, tokenize, chunk_size), chunk_size, overlap):
        if stop is not None and stop.is_set():
            raise ChunkingStopped
        if max_chunks is not None and len(chunks) == max_chunks:
            raise TooManyChunks
        text = _join(group)
        chunks.append(
            Chunk(
                index=len(chunks),
                text=text,
                token_count=len(tokenize(text)),
                page=group[0].page,
                heading=group[0].heading,
            )
        )
    return chunks


def _units(sections: Sequence[Section], tokenize: Tokenize, limit: int) -> Iterator[_Unit]:
    """Sentences (or, for a sentence longer than a chunk, token-bounded pieces of it)."""
    for section in sections:
        for paragraph in _PARAGRAPH.split(section.text):
            first = True
            for sentence in _sentences(paragraph.strip()):
                sentence = " ".join(sentence.split())
                if not sentence:
                    continue
                for piece, count in _pieces(sentence, tokenize, limit):
                    yield _Unit(piece, count, section.page, section.heading, first)
                    first = False


def _sentences(paragraph: str) -> Iterator[str]:
    start = 0
    for match in _SENTENCE_END.finditer(paragraph):
        yield paragraph[start : match.end(1)]
        start = match.end()
    yield paragraph[start:]


def _pieces(text: str, tokenize: Tokenize, limit: int) -> Iterator[tuple[str, int]]:
    offsets = tokenize(text)
    if len(offsets) <= limit:
        yield text, len(offsets)
        return
    for start in range(0, len(offsets), limit):
        span = offsets[start : start + limit]
        end = offsets[start + limit][0] if start + limit < len(offsets) else len(text)
        yield text[span[0][0] : end].strip(), len(span)


def _pack(units: Iterable[_Unit], limit: int, overlap: int) -> Iterator[list[_Unit]]:
    current: list[_Unit] = []
    size = 0
    for unit in units:
        new_page = bool(current) and unit.page != current[0].page
        if current and (size + unit.tokens > limit or new_page):
            yield current
            # Carry whole trailing sentences, up to `overlap` tokens, into the next chunk;
            # never across a page break, so a chunk's page stays true.
            carry: list[_Unit] = []
            carried = 0
            for previous in reversed(current[1:] if not new_page else []):
                if (
                    carried + previous.tokens > overlap
                    or carried + previous.tokens + unit.tokens > limit
                ):
                    break
                carry.insert(0, previous)
                carried += previous.tokens
            current, size = carry, carried
        current.append(unit)
        size += unit.tokens
    if current:
        yield current


def _join(units: list[_Unit]) -> str:
    text = units[0].text
    for unit in units[1:]:
        text += ("\n\n" if unit.new_paragraph else " ") + unit.text
    return text
