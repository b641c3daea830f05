"""The `chunk` step type, counting whitespace words or a model's own tokens, and the
models' token offsets it relies on."""

from __future__ import annotations

import asyncio
import itertools

import pytest
from step_helpers import (
    compile_workflow,
    run_workflow,
    tiny_models_engine,  # noqa: F401  (provides the `engine` fixture)
)

from engine.dsl.issues import WorkflowInvalid
from engine.services import Engine

pytestmark = pytest.mark.asyncio(loop_scope="module")

MODELS = ("tiny-lm", "tiny-vlm", "tiny-embedder")
TEXT = (
    "Fusion runs workflows written in YAML. Each step calls a model or a plugin. "
    "Independent steps run at the same time.\n\n"
    "Chunking splits long documents into pieces. It prefers paragraph boundaries, then "
    "sentence boundaries. Overlap carries whole sentences into the next piece.\n\n"
    "Summaries of each piece are combined at the end. The combined summary is shortened "
    "again when it is still too long."
)


def chunk(**params: object) -> str:
    lines = "".join(f"    {key}: {value}\n" for key, value in params.items())
    return "steps:\n  - step_id: split\n    type: chunk\n    text: '{{ input.text }}'\n" + lines


def words(text: str) -> list[str]:
    return text.split()


async def test_without_a_model_words_are_counted(engine: Engine) -> None:
    run = await run_workflow(engine, chunk(chunk_size=12), {"text": TEXT})
    assert run.status == "completed", run.result.error
    chunks = run.output["split"]
    assert len(chunks) > 3
    assert all(isinstance(c, str) for c in chunks)
    assert max(len(words(c)) for c in chunks) <= 12
    # Without overlap the chunks are the text, in order, nothing lost or repeated.
    assert [w for c in chunks for w in words(c)] == words(TEXT)
    assert chunks[0] == "Fusion runs workflows written in YAML."  # at a sentence boundary
    assert run.step("split").model is None


async def test_overlap_repeats_whole_sentences(engine: Engine) -> None:
    plain = (await run_workflow(engine, chunk(chunk_size=20), {"text": TEXT})).output["split"]
    run = await run_workflow(engine, chunk(chunk_size=20, overlap=10), {"text": TEXT})
    chunks = run.output["split"]
    assert max(len(words(c)) for c in chunks) <= 20
    assert len(chunks) > len(plain)
    carried = 0
    for previous, current in itertools.pairwise(chunks):
        last_sentence = previous.rsplit(". ", 1)[-1]
        if current.startswith(last_sentence):
            carried += 1
            assert len(words(last_sentence)) <= 10
    assert carried >= 1


@pytest.mark.parametrize("model_id", MODELS)
async def test_a_models_tokens_are_counted(engine: Engine, model_id: str) -> None:
    run = await run_workflow(engine, chunk(chunk_size=64, model_id=f'"{model_id}"'), {"text": TEXT})
    assert run.status == "completed", run.result.error
    chunks = run.output["split"]
    model = engine.models.get(model_id).model
    counts = [len(model.token_offsets(c)) for c in chunks]
    assert max(counts) <= 64
    # No sentence is longer than a chunk here: chunks end at sentence boundaries.
    assert [w for c in chunks for w in words(c)] == words(TEXT)
    assert all(c.endswith(".") for c in chunks)
    by_words = await run_workflow(engine, chunk(chunk_size=64), {"text": TEXT})
    # These tiny tokenizers split words into several tokens: more chunks than by words.
    assert len(chunks) > len(by_words.output["split"])
    assert run.step("split").model == model_id


@pytest.mark.parametrize("model_id", MODELS)
async def test_token_offsets_cover_the_text(engine: Engine, model_id: str) -> None:
    model = engine.models.get(model_id).model
    text = "Tokenizers report spans: naïve café, 42 tokens!"
    offsets = model.token_offsets(text)
    assert len(offsets) > len(text.split())  # subword tokens, special tokens excluded
    assert all(0 <= a <= b <= len(text) for a, b in offsets)
    assert [a for a, _ in offsets] == sorted(a for a, _ in offsets)
    # Byte-level BPE splits a character like 'ï' over tokens that share its span.
    covered = {i for a, b in offsets for i in range(a, b)}
    assert {i for i, c in enumerate(text) if not c.isspace()} <= covered


async def test_offsets_are_exact_while_the_embedder_embeds(engine: Engine) -> None:
    """The embedder's tokenizer is shared with its embed calls, which truncate: chunking
    in a thread meanwhile must still see every token (not the embed call's truncation)."""
    model = engine.models.get("tiny-embedder").model
    long = " ".join(["tokenizer"] * 400)
    expected = len(model.token_offsets(long))
    assert expected > model.max_seq_length

    async def embed() -> None:
        for _ in range(15):
            await engine.models.embed("tiny-embedder", [long, "short"])

    def offsets() -> list[int]:
        return [len(model.token_offsets(long)) for _ in range(60)]

    _, counts = await asyncio.gather(embed(), asyncio.to_thread(offsets))
    assert set(counts) == {expected}


async def test_errors(engine: Engine) -> None:
    run = await run_workflow(
        engine,
        chunk(chunk_size=10, overlap="'{{ input.overlap }}'", model_id="'{{ input.model }}'"),
        {"text": TEXT, "overlap": 10, "model": "tiny-lm"},
    )
    assert "overlap (10) must be below chunk_size (10)" in (run.step("split").error or "")
    run = await run_workflow(
        engine, chunk(chunk_size=10, model_id="nope"), {"text": TEXT, "overlap": 0}
    )
    assert run.step("split").status == "failed"
    assert "model 'nope' not found" in (run.step("split").error or "")


async def test_empty_text_has_no_chunks(engine: Engine) -> None:
    run = await run_workflow(engine, chunk(chunk_size=10, model_id="tiny-lm"), {"text": " \n"})
    assert run.output == {"split": []}


async def test_static_check_of_overlap() -> None:
    with pytest.raises(WorkflowInvalid) as info:
        compile_workflow(chunk(chunk_size=8, overlap=8))
    assert [(i.pointer, i.message) for i in info.value.issues] == [
        ("/steps/0/overlap", "overlap (8) must be below chunk_size (8)")
    ]
