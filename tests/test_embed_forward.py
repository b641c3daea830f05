"""Fusion's own BERT forward pass (engine/models/backends/bert_encoder.py) gives the
embeddings of mlx-vlm's forward pass over the same weights: the real MiniLM on real
passages of mixed lengths (one past max_seq_length), the tiny synthetic embedder, and the
models it does not cover, which keep mlx-vlm's pass."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest

from engine.models.backends import bert_encoder
from engine.models.backends.bert_encoder import BertForward
from engine.models.backends.embeddings import EmbeddingModel, EmbeddingsBackend

PASSAGES = [
    "A man is eating food.",
    "A man is eating a piece of bread.",
    "The girl is carrying a baby.",
    "Rain fell on the city all night, and by morning the river had risen over its banks.",
    "SQLite is a C-language library that implements a small, fast, self-contained, "
    "high-reliability, full-featured SQL database engine.",
    "Photosynthesis converts light energy into chemical energy that can later be released "
    "to fuel the organism's activities; most plants, algae and cyanobacteria perform it.",
    "The workflow engine reads a YAML file, renders its Jinja templates and runs the steps "
    "of the resulting graph in dependency order, retrying a failed step as configured.",
    "In 1969 the Apollo 11 mission landed two astronauts on the Moon; Neil Armstrong "
    "stepped onto the surface first, followed by Buzz Aldrin, while Michael Collins "
    "remained in lunar orbit aboard the command module Columbia.",
    " ".join(
        "The committee reviewed the proposal in detail, weighing its costs against the "
        "expected benefits for residents, businesses and the regional transport network."
        for _ in range(20)
    ),  # past MiniLM's 256 tokens: truncated
    "ok",
    "Des modèles multilingues existent aussi ; celui-ci est surtout entraîné en anglais.",
]


def embed(model: EmbeddingModel, texts: Sequence[str]) -> np.ndarray:
    return np.array(model.embed(list(texts), threading.Event()).vectors)


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.asarray((a * b).sum(axis=1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1))


@pytest.fixture(scope="module")
def minilm(minilm_dir: Path) -> EmbeddingModel:
    return EmbeddingsBackend().load(minilm_dir, None)


def test_minilm_uses_the_own_forward_pass_and_matches_mlx_vlm(minilm: EmbeddingModel) -> None:
    assert minilm.forward is not None
    ours = embed(minilm, PASSAGES)
    with minilm.with_mlx_vlm_forward():
        theirs = embed(minilm, PASSAGES)
    assert cosines(ours, theirs).min() >= 0.9999
    assert np.abs(ours - theirs).max() < 1e-4


def test_minilm_reference_pair(minilm: EmbeddingModel) -> None:
    # FACTS.md: sentence-transformers' cosine for this pair.
    a, b = embed(minilm, PASSAGES[:2])
    assert float(a @ b) == pytest.approx(0.7553, abs=1e-3)


def test_minilm_slices_do_not_change_vectors(minilm: EmbeddingModel) -> None:
    """One text per slice, or all in one: the same vectors (slices only cut padding)."""
    assert minilm.forward is not None
    whole = embed(minilm, PASSAGES)
    slice_tokens = minilm.forward.slice_tokens
    try:
        minilm.forward.slice_tokens = 1
        singles = embed(minilm, PASSAGES)
        minilm.forward.slice_tokens = 1 << 20
        together = embed(minilm, PASSAGES)
    finally:
        minilm.forward.slice_tokens = slice_tokens
    assert cosines(whole, singles).min() >= 0.99999
    assert cosines(whole, together).min() >= 0.99999


def test_uncompiled_kernels_give_the_same_vectors(minilm: EmbeddingModel) -> None:
    """Where MLX cannot compile (no g++), the same functions run op by op."""
    compiled = embed(minilm, PASSAGES)
    kernels = bert_encoder._KERNELS
    saved = kernels.gelu, kernels.exp
    try:
        kernels.gelu, kernels.exp = bert_encoder._gelu, bert_encoder._exp_nonpositive
        eager = embed(minilm, PASSAGES)
    finally:
        kernels.gelu, kernels.exp = saved
    assert cosines(compiled, eager).min() >= 0.99999


def test_erf_and_exp_polynomials_are_accurate() -> None:
    import mlx.core as mx

    x = mx.linspace(-8.0, 8.0, 20001)
    erf_error = mx.max(mx.abs(bert_encoder._erf(x) - mx.erf(x))).item()
    assert erf_error < 2e-6
    y = mx.linspace(bert_encoder.EXP_FLOOR, 0.0, 20001)
    exp_error = mx.max(mx.abs(bert_encoder._exp_nonpositive(y) / mx.exp(y) - 1.0)).item()
    assert exp_error < 5e-5


def test_tiny_embedder_matches_mlx_vlm(tiny_embedder_dir: Path) -> None:
    model = EmbeddingsBackend().load(tiny_embedder_dir, None)
    assert model.forward is not None
    texts = ["hello world", "a much longer sentence than the first one, with more words", "x"]
    ours = embed(model, texts)
    with model.with_mlx_vlm_forward():
        theirs = embed(model, texts)
    assert cosines(ours, theirs).min() >= 0.9999


def test_quantised_model_keeps_mlx_vlms_forward_pass(tiny_embedder_dir: Path) -> None:
    import mlx.nn as nn

    model = EmbeddingsBackend().load(tiny_embedder_dir, None)
    nn.quantize(model.model, group_size=32, bits=8)
    assert not BertForward.covers(model.model)
    quantised = EmbeddingModel(
        model.model, model.tokenizer, {"model_type": "bert"}, tiny_embedder_dir, None
    )
    assert quantised.forward is None
    vectors = embed(quantised, ["hello world", "x"])
    assert vectors.shape == (2, 32)
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)


def test_other_threads_get_their_own_streams(minilm: EmbeddingModel) -> None:
    """MLX streams belong to the thread that made them; each caller gets its own."""
    here = embed(minilm, PASSAGES[:4])
    there: list[np.ndarray] = []
    thread = threading.Thread(target=lambda: there.append(embed(minilm, PASSAGES[:4])))
    thread.start()
    thread.join(60)
    assert there
    assert cosines(here, there[0]).min() >= 0.99999


def test_blas_threads_and_cache_limit_are_put_back(minilm: EmbeddingModel) -> None:
    import ctypes

    import mlx.core as mx

    from engine.models import blas

    if blas.loaded is None:
        pytest.skip("MLX's bundled BLAS: no OpenBLAS thread count to put back")
    library = ctypes.CDLL(blas.loaded)
    threads = library.openblas_get_num_threads()
    limit = mx.set_cache_limit(64 << 20)
    try:
        embed(minilm, PASSAGES[:3])
        assert library.openblas_get_num_threads() == threads
        assert mx.set_cache_limit(limit) == 64 << 20
    finally:
        mx.set_cache_limit(limit)
