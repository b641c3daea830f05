"""The model backends on their own: the mlx-lm chat model, the sentence embedder (tiny
synthetic and the real all-MiniLM-L6-v2), the stop-string scanner and the OpenBLAS swap.

Models load through the real backends (mlx-lm, mlx-vlm's encoder loader) once per module
and run on this thread: MLX work must stay on the thread that loaded it, and nothing else
here uses these models. Random weights: assert on counts, shapes and plumbing, never on
what the text says.
"""

from __future__ import annotations

import glob
import json
import math
import os
import re
import shutil
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np
import pytest

from engine.errors import InvalidRequest
from engine.models import blas
from engine.models.backends.base import ChatChunk, ChatParams, EmbedResult
from engine.models.backends.embeddings import EmbeddingModel, EmbeddingsBackend
from engine.models.backends.mlx_lm_backend import LmModel, MlxLmBackend
from engine.models.backends.textgen import StopScanner

MESSAGES = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Say hello to the world."},
]

# Reference values for all-MiniLM-L6-v2 (sentence-transformers on PyTorch gives the same
# cosine, 0.7553, for this pair).
FOOD = "A man is eating food."
BREAD = "A man is eating a piece of bread."
FOOD_HEAD = [0.033242, 0.004406, -0.006277, 0.048379, -0.138702]
FOOD_BREAD_COSINE = 0.75533730


# --- helpers ---------------------------------------------------------------------------------


def no_eos(model: LmModel) -> dict[int, float]:
    """Random weights often emit an end token at once: bias every one of them away."""
    return {int(t): -1e9 for t in model.tokenizer.eos_token_ids}


def run_chat(
    model: LmModel, params: ChatParams, messages: Sequence[dict[str, Any]] = MESSAGES
) -> tuple[str, ChatChunk, list[ChatChunk]]:
    chunks = list(model.chat_stream(messages, params, threading.Event()))
    return "".join(c.text for c in chunks), chunks[-1], chunks


def embed(model: EmbeddingModel, texts: Sequence[str]) -> EmbedResult:
    return model.embed(list(texts), threading.Event())


def cosine(a: Sequence[float], b: Sequence[float]) -> float:
    va, vb = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(va @ vb / (np.linalg.norm(va) * np.linalg.norm(vb)))


def norm(v: Sequence[float]) -> float:
    return float(np.linalg.norm(np.asarray(v, dtype=np.float64)))


# --- fixtures --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lm(tiny_lm_dir: Path) -> LmModel:
    model = MlxLmBackend().load(tiny_lm_dir, None)
    assert isinstance(model, LmModel)
    return model


@pytest.fixture(scope="module")
def embedder(tiny_embedder_dir: Path) -> EmbeddingModel:
    model = EmbeddingsBackend().load(tiny_embedder_dir, None)
    assert isinstance(model, EmbeddingModel)
    return model


@pytest.fixture(scope="module")
def minilm(minilm_dir: Path) -> EmbeddingModel:
    model = EmbeddingsBackend().load(minilm_dir, None)
    assert isinstance(model, EmbeddingModel)
    return model


# --- StopScanner -----------------------------------------------------------------------------


def feed_all(scanner: StopScanner, pieces: Sequence[str]) -> tuple[str, bool, int]:
    """Feed pieces until a stop hits: (emitted text, hit, pieces consumed)."""
    out = []
    for i, piece in enumerate(pieces, 1):
        text, hit = scanner.feed(piece)
        out.append(text)
        if hit:
            return "".join(out), True, i
    out.append(scanner.flush())
    return "".join(out), False, len(pieces)


def test_stop_scanner_without_stops_passes_everything_through() -> None:
    scanner = StopScanner([])
    assert scanner.feed("abc") == ("abc", False)
    assert scanner.feed("") == ("", False)
    assert scanner.feed("def") == ("def", False)
    assert scanner.flush() == ""
    # Empty stop strings are no stops at all (they would otherwise match everywhere).
    assert StopScanner(["", ""]).feed("xyz") == ("xyz", False)


def test_stop_scanner_cuts_at_a_stop_split_across_pieces() -> None:
    scanner = StopScanner(["END"])
    emitted = []
    for piece in ["hello E", "N"]:
        text, hit = scanner.feed(piece)
        assert not hit
        emitted.append(text)
    # Nothing that could still become "END" has been let out.
    assert "".join(emitted) == "hello "
    text, hit = scanner.feed("D and more")
    assert hit
    assert "".join([*emitted, text]) == "hello "


@pytest.mark.parametrize(
    ("stops", "pieces", "expected"),
    [
        (["xyz", "b"], ["aaa", "bxyz"], "aaa"),  # the earliest match wins, not the first stop
        (["zz", "2"], ["1a", "2zz"], "1a"),
        (["<|im_end|>", "\n\n"], ["one\n", "\ntwo<|im_", "end|>"], "one"),
        (["<|im_end|>", "\n\n"], ["one ", "two<|im_", "end|>\n\n"], "one two"),
        (["abcd", "x"], ["abc", "x"], "abc"),  # a longer stop still incomplete does not hide x
    ],
)
def test_stop_scanner_with_several_stops(
    stops: list[str], pieces: list[str], expected: str
) -> None:
    text, hit, _ = feed_all(StopScanner(stops), pieces)
    assert hit
    assert text == expected


def test_stop_scanner_without_a_match_emits_all_text_by_the_flush() -> None:
    scanner = StopScanner(["STOP"])
    text, hit, consumed = feed_all(scanner, ["ST", "O", "nothing here"])
    assert not hit
    assert consumed == 3
    assert text == "STOnothing here"
    # Held-back text comes out only at the flush, never twice.
    scanner = StopScanner(["STOP"])
    assert scanner.feed("abcST") == ("ab", False)
    assert scanner.flush() == "cST"
    assert scanner.flush() == ""


# --- lm ---------------------------------------------------------------------------------------


def test_lm_metadata_and_capabilities(lm: LmModel) -> None:
    assert lm.family == "qwen2"
    assert lm.context_length == 2048  # max_position_embeddings of the synthetic config
    assert lm.weight_bytes > 0
    assert "chat" in lm.capabilities
    assert "tool_calling" in lm.capabilities  # the chat template handles `tools`
    assert "long_context" not in lm.capabilities


def test_lm_applies_the_chat_template(lm: LmModel) -> None:
    _, last, _ = run_chat(lm, ChatParams(max_tokens=2, temperature=0, logit_bias=no_eos(lm)))
    text = lm.tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False)
    assert "<|im_start|>user" in text
    assert text.endswith("<|im_start|>assistant\n")
    expected = lm.tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True)
    if isinstance(expected, dict):  # transformers 5 may return a mapping
        expected = expected["input_ids"]
    assert last.prompt_tokens == len(expected)
    # More than the bare contents: the template's role markers are in the prompt.
    bare = sum(len(lm.tokenizer.encode(m["content"])) for m in MESSAGES)
    assert last.prompt_tokens > bare


def test_lm_tools_reach_the_template(lm: LmModel) -> None:
    tool = {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather for a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
        },
    }
    params = ChatParams(max_tokens=1, temperature=0, logit_bias=no_eos(lm))
    _, plain, _ = run_chat(lm, params)
    _, with_tools, _ = run_chat(
        lm, ChatParams(max_tokens=1, temperature=0, logit_bias=no_eos(lm), tools=[tool])
    )
    assert with_tools.prompt_tokens > plain.prompt_tokens + len(lm.tokenizer.encode("get_weather"))


def test_lm_honours_max_tokens(lm: LmModel) -> None:
    for max_tokens in (1, 7):
        text, last, chunks = run_chat(
            lm, ChatParams(max_tokens=max_tokens, temperature=0, logit_bias=no_eos(lm))
        )
        assert last.finish_reason == "length"
        assert last.completion_tokens == max_tokens
        assert all(c.finish_reason is None for c in chunks[:-1])
        assert len(lm.tokenizer.encode(text)) >= 1


def test_lm_stop_strings_cut_the_text(lm: LmModel) -> None:
    greedy = ChatParams(max_tokens=40, temperature=0, logit_bias=no_eos(lm))
    full, last, _ = run_chat(lm, greedy)
    assert last.finish_reason == "length"
    # A stop string from the middle of what greedy decoding produces (no replacement chars,
    # which stand for bytes still being decoded).
    clean = [i for i in range(5, len(full) - 3) if "\ufffd" not in full[i : i + 3]]
    assert clean, f"no usable stop string in {full!r}"
    stop = full[clean[len(clean) // 2] : clean[len(clean) // 2] + 3]
    cut = full.find(stop)

    params = ChatParams(max_tokens=40, temperature=0, logit_bias=no_eos(lm), stop=[stop])
    text, last, chunks = run_chat(lm, params)
    assert last.finish_reason == "stop"
    assert text == full[:cut]
    assert stop not in "".join(c.text for c in chunks)
    assert last.completion_tokens < 40

    # Several stops: the earliest in the text cuts it.
    early = full[cut - 2 : cut] if cut >= 2 and "\ufffd" not in full[cut - 2 : cut] else stop
    params = ChatParams(max_tokens=40, temperature=0, logit_bias=no_eos(lm), stop=[stop, early])
    text, last, _ = run_chat(lm, params)
    assert last.finish_reason == "stop"
    assert text == full[: min(full.find(stop), full.find(early))]

    # A stop that never occurs changes nothing.
    params = ChatParams(max_tokens=40, temperature=0, logit_bias=no_eos(lm), stop=["\x00never"])
    text, last, _ = run_chat(lm, params)
    assert (text, last.finish_reason) == (full, "length")


def test_lm_seed_makes_sampling_repeatable(lm: LmModel) -> None:
    def sample(seed: int) -> str:
        params = ChatParams(max_tokens=24, temperature=1.0, seed=seed, logit_bias=no_eos(lm))
        return run_chat(lm, params)[0]

    first, second = sample(7), sample(7)
    assert first == second
    assert sample(8) != first  # temperature 1 over random weights: another seed, other text


def test_lm_rejects_a_prompt_beyond_the_context(lm: LmModel) -> None:
    long = [{"role": "user", "content": "hello world " * 2000}]
    with pytest.raises(InvalidRequest) as info:
        run_chat(lm, ChatParams(max_tokens=4), long)
    assert info.value.code == "context_length_exceeded"
    assert info.value.status == 400


def test_lm_context_length_from_the_load_caps_generation(tiny_lm_dir: Path) -> None:
    model = MlxLmBackend().load(tiny_lm_dir, 64)
    assert isinstance(model, LmModel)
    assert model.context_length == 64
    _, last, _ = run_chat(
        model, ChatParams(max_tokens=500, temperature=0, logit_bias=no_eos(model))
    )
    assert last.prompt_tokens < 64
    # The prompt and the completion together fit the context.
    assert last.completion_tokens == 64 - last.prompt_tokens
    with pytest.raises(InvalidRequest) as info:
        run_chat(model, ChatParams(max_tokens=4), [{"role": "user", "content": "word " * 80}])
    assert info.value.code == "context_length_exceeded"
    model.close()


def test_lm_stop_event_ends_generation_with_cancelled(lm: LmModel) -> None:
    stop = threading.Event()
    params = ChatParams(max_tokens=500, temperature=0, logit_bias=no_eos(lm))
    chunks = []
    for chunk in lm.chat_stream(MESSAGES, params, stop):
        chunks.append(chunk)
        if len(chunks) == 3:
            stop.set()
    assert chunks[-1].finish_reason == "cancelled"
    assert chunks[-1].completion_tokens < 20


def test_lm_warmup_and_token_count(lm: LmModel) -> None:
    prompt = "The quick brown fox jumps over the lazy dog " * 3
    n = lm.count_tokens(prompt)
    assert n == len(lm.tokenizer.encode(prompt))
    assert n > 8
    assert lm.warmup(prompt, 8) == 8
    assert lm.warmup(prompt, 10_000) == n


def test_lm_does_not_embed(lm: LmModel) -> None:
    with pytest.raises(InvalidRequest) as info:
        lm.embed(["x"], threading.Event())
    assert info.value.code == "unsupported"


# --- embeddings: tiny synthetic BERT ------------------------------------------------------------

MIXED = [
    "a short one",
    "a much longer sentence about the weather in the mountains and the rivers below them",
    "medium length text here",
    "x",
]


def test_embedder_vectors_are_unit_norm_with_the_model_dimension(embedder: EmbeddingModel) -> None:
    assert embedder.dimension == 32
    assert embedder.max_seq_length == 128
    assert embedder.normalize
    result = embed(embedder, MIXED)
    assert len(result.vectors) == len(MIXED)
    for vector in result.vectors:
        assert len(vector) == 32
        assert norm(vector) == pytest.approx(1.0, abs=1e-5)


def test_embedder_batch_equals_single_and_keeps_order(embedder: EmbeddingModel) -> None:
    singles = [embed(embedder, [t]).vectors[0] for t in MIXED]
    batch = embed(embedder, MIXED).vectors
    for alone, batched in zip(singles, batch, strict=True):
        np.testing.assert_allclose(batched, alone, atol=1e-5)
    reversed_batch = embed(embedder, MIXED[::-1]).vectors
    np.testing.assert_allclose(reversed_batch[::-1], batch, atol=1e-5)
    # Distinct texts, distinct vectors: the order check above means something.
    assert cosine(batch[0], batch[1]) < 0.999


def test_embedder_counts_tokens_and_reports_truncation(embedder: EmbeddingModel) -> None:
    long = "word " * 300
    counts = embedder.token_counts(["hello world", long])
    assert counts[1] > embedder.max_seq_length
    result = embed(embedder, ["hello world", long])
    assert result.truncated == [False, True]
    # Prompt tokens are what the model processed: the long text counts up to the limit.
    assert result.prompt_tokens == counts[0] + embedder.max_seq_length
    assert embed(embedder, []) == EmbedResult([], 0, [])


def test_embedder_stops_between_batches(embedder: EmbeddingModel) -> None:
    stop = threading.Event()
    stop.set()
    result = embedder.embed(["a", "b"], stop)
    assert result.prompt_tokens == 0


def test_embedder_without_normalize_module_keeps_raw_pools(
    tiny_embedder_dir: Path, embedder: EmbeddingModel, tmp_path: Path
) -> None:
    copy = tmp_path / "raw-embedder"
    shutil.copytree(tiny_embedder_dir, copy)
    modules = json.loads((copy / "modules.json").read_text())
    kept = [m for m in modules if not m["type"].endswith("Normalize")]
    assert len(kept) == len(modules) - 1
    (copy / "modules.json").write_text(json.dumps(kept))
    shutil.rmtree(copy / "2_Normalize")

    raw_model = EmbeddingsBackend().load(copy, None)
    assert isinstance(raw_model, EmbeddingModel)
    assert not raw_model.normalize
    raw = embed(raw_model, MIXED).vectors
    normalised = embed(embedder, MIXED).vectors
    for r, n in zip(raw, normalised, strict=True):
        assert abs(norm(r) - 1.0) > 1e-3  # not normalised...
        np.testing.assert_allclose(np.asarray(r) / norm(r), n, atol=1e-5)  # ...same direction
    raw_model.close()


def test_embedder_context_length_from_the_load_lowers_the_limit(tiny_embedder_dir: Path) -> None:
    model = EmbeddingsBackend().load(tiny_embedder_dir, 16)
    assert isinstance(model, EmbeddingModel)
    assert model.max_seq_length == 16
    result = embed(model, ["word " * 20, "hi"])
    assert result.truncated == [True, False]
    model.close()


def test_embeddings_backend_refuses_a_directory_without_config(tmp_path: Path) -> None:
    with pytest.raises(InvalidRequest) as info:
        EmbeddingsBackend().load(tmp_path, None)
    assert info.value.code == "invalid_model_path"


# --- embeddings: the real all-MiniLM-L6-v2 ------------------------------------------------------


def test_minilm_matches_reference_values(minilm: EmbeddingModel) -> None:
    assert minilm.dimension == 384
    assert minilm.max_seq_length == 256
    food, bread = embed(minilm, [FOOD, BREAD]).vectors
    assert len(food) == 384
    assert norm(food) == pytest.approx(1.0, abs=1e-5)
    assert norm(bread) == pytest.approx(1.0, abs=1e-5)
    assert cosine(food, bread) == pytest.approx(FOOD_BREAD_COSINE, abs=1e-4)
    np.testing.assert_allclose(food[:5], FOOD_HEAD, atol=1e-4)


def test_minilm_ranks_paraphrases_above_unrelated_pairs(minilm: EmbeddingModel) -> None:
    texts = [
        FOOD,
        BREAD,
        "The new movie is awesome.",
        "The new film is so great.",
        "A cat sits on the windowsill.",
        "Stock markets fell sharply on Monday.",
    ]
    v = embed(minilm, texts).vectors
    paraphrase = cosine(v[2], v[3])
    unrelated = [cosine(v[2], v[4]), cosine(v[2], v[5]), cosine(v[0], v[5]), cosine(v[3], v[4])]
    assert paraphrase > 0.7
    assert paraphrase > max(unrelated) + 0.3
    assert cosine(v[0], v[1]) > max(cosine(v[0], v[4]), cosine(v[0], v[5]))


def test_minilm_batch_equals_single_with_truncation(minilm: EmbeddingModel) -> None:
    long = "The committee discussed the annual budget in great detail. " * 40
    texts = [BREAD, long, FOOD, "Hi."]
    counts = minilm.token_counts(texts)
    assert counts[1] > 256 > max(counts[0], counts[2], counts[3])
    batch = embed(minilm, texts)
    assert batch.truncated == [False, True, False, False]
    assert batch.prompt_tokens == counts[0] + 256 + counts[2] + counts[3]
    for text, vector in zip(texts, batch.vectors, strict=True):
        alone = embed(minilm, [text])
        np.testing.assert_allclose(vector, alone.vectors[0], atol=1e-5)
    # Truncation keeps the first 256 tokens: the long text embeds like a shorter prefix
    # that still exceeds the limit.
    prefix = embed(minilm, ["The committee discussed the annual budget in great detail. " * 30])
    assert prefix.truncated == [True]
    np.testing.assert_allclose(prefix.vectors[0], batch.vectors[1], atol=1e-5)


# --- OpenBLAS -----------------------------------------------------------------------------------

OPENBLAS = sorted(glob.glob("/usr/lib/*/openblas-pthread/libopenblas.so.0"))


@pytest.mark.skipif(not OPENBLAS, reason="Debian's libopenblas0-pthread is not installed")
@pytest.mark.skipif(os.environ.get("FUSION_BLAS") == "bundled", reason="FUSION_BLAS=bundled")
def test_openblas_is_loaded_before_mlx_and_computes_correctly() -> None:
    assert blas.loaded == OPENBLAS[0]
    maps = Path("/proc/self/maps").read_text()
    assert re.search(r"openblas-pthread/libopenblas", maps)

    rng = np.random.default_rng(0)
    for m, k, n in [(257, 384, 129), (512, 512, 512), (1, 384, 1536)]:
        a = rng.standard_normal((m, k), dtype=np.float32)
        b = rng.standard_normal((k, n), dtype=np.float32)
        got = np.array(mx.matmul(mx.array(a), mx.array(b)))
        want = a.astype(np.float64) @ b.astype(np.float64)
        scale = math.sqrt(k)  # entries are sums of k unit-variance products
        np.testing.assert_allclose(got, want, atol=1e-4 * scale, rtol=1e-4)
        np.testing.assert_allclose(got, a @ b, atol=1e-4 * scale, rtol=1e-4)
    # A transposed operand goes through another BLAS path.
    a = rng.standard_normal((300, 200), dtype=np.float32)
    got = np.array(mx.matmul(mx.array(a).T, mx.array(a)))
    np.testing.assert_allclose(
        got, a.T.astype(np.float64) @ a, atol=1e-4 * math.sqrt(300), rtol=1e-4
    )
