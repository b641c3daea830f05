"""Chunking counts the embedding model's tokens and prefers sentence boundaries."""

from __future__ import annotations

import itertools
import re
from pathlib import Path

import pytest

from engine.models.backends.embeddings import EmbeddingsBackend
from engine.rag.chunking import chunk_sections
from engine.rag.types import Section


def words(text: str) -> list[tuple[int, int]]:
    """A tokenizer whose counts are easy to reason about: one token per word."""
    return [m.span() for m in re.finditer(r"\S+", text)]


def sentence(i: int) -> str:
    return f"Sentence {i} has exactly six words."  # six tokens under `words`


def test_chunks_never_exceed_the_size_and_end_on_sentence_boundaries() -> None:
    text = " ".join(sentence(i) for i in range(20))
    chunks = chunk_sections([Section(text)], words, chunk_size=20, overlap=0)
    assert [c.token_count for c in chunks] == [18] * 6 + [12]  # 3 sentences fit in 20
    assert all(c.text.endswith("words.") for c in chunks)
    assert " ".join(c.text for c in chunks) == text  # nothing lost, nothing repeated


def test_overlap_carries_whole_trailing_sentences() -> None:
    text = " ".join(sentence(i) for i in range(10))
    chunks = chunk_sections([Section(text)], words, chunk_size=20, overlap=7)
    for previous, current in itertools.pairwise(chunks):
        last = previous.text.rsplit("Sentence", 1)[1]
        assert current.text.startswith("Sentence" + last)  # one 6-token sentence carried
    assert all(c.token_count <= 20 for c in chunks)


def test_a_sentence_longer_than_a_chunk_is_split_at_token_boundaries() -> None:
    long = " ".join(f"w{i}" for i in range(45)) + "."
    chunks = chunk_sections([Section(long)], words, chunk_size=20, overlap=0)
    assert [c.token_count for c in chunks] == [20, 20, 5]
    assert chunks[0].text.split()[0] == "w0"
    assert chunks[1].text.split()[0] == "w20"


def test_paragraph_breaks_are_kept_and_pages_are_never_mixed() -> None:
    sections = [
        Section("First para one.\n\nSecond para two.", page=1, heading="A"),
        Section("Page two text.", page=2, heading="B"),
    ]
    chunks = chunk_sections(sections, words, chunk_size=50, overlap=10)
    assert [(c.page, c.heading) for c in chunks] == [(1, "A"), (2, "B")]
    assert chunks[0].text == "First para one.\n\nSecond para two."
    assert chunks[1].text == "Page two text."  # no overlap carried across a page break


def test_chunk_indexes_are_sequential() -> None:
    text = " ".join(sentence(i) for i in range(12))
    chunks = chunk_sections([Section(text)], words, chunk_size=12, overlap=0)
    assert [c.index for c in chunks] == list(range(len(chunks)))


@pytest.mark.parametrize(("size", "overlap"), [(0, 0), (10, 10), (10, -1)])
def test_bad_sizes_are_refused(size: int, overlap: int) -> None:
    with pytest.raises(ValueError, match="chunk_size"):
        chunk_sections([Section("x.")], words, chunk_size=size, overlap=overlap)


def test_counts_are_in_the_embedding_models_own_tokens(minilm_dir: Path) -> None:
    model = EmbeddingsBackend().load(minilm_dir, None)
    text = " ".join(
        f"The unbelievably photosynthetic chloroplast number {i} absorbs light." for i in range(40)
    )
    chunks = chunk_sections([Section(text)], model.token_offsets, chunk_size=64, overlap=16)
    assert len(chunks) > 1
    for chunk in chunks:
        assert chunk.token_count == len(model.token_offsets(chunk.text)) <= 64
    # wordpieces, not words: the model's count is well above the word count
    assert chunks[0].token_count > len(chunks[0].text.split())
