"""A BERT encoder forward pass for MLX's CPU backend, over the weights of mlx-vlm's BERT
model: the same function as ``mlx_vlm.models.bert.Model`` (exact-erf GELU, post-layer-norm
blocks), computed in a way that runs well where MLX has no vectorised transcendentals.

Measured on Linux x86_64 CPUs (mlx 0.32.4, 2 cores; bench/embeddings.py, BENCHMARKS.md):
MLX's CPU ``exp`` costs ~12 ns and ``erf`` ~26 ns per element whatever the array's size,
adds and multiplies ~0.2 ns when the arrays fit in cache and ~2.5 ns when they do not, and
every MLX CPU kernel but the matmuls (OpenBLAS) runs on one thread. mlx-vlm's pass spent
about as long in the attention softmax and in GELU as in all its matmuls. So here:

- softmax's exponential and GELU's erf are polynomials of adds, multiplies and one
  division, fused by ``mx.compile`` into a few loops (g++ on Linux);
- a batch runs in slices of ~512 tokens, so every intermediate (the 12-head score
  matrices, the 1536-wide GELU input) stays in cache, and each slice is cut to its own
  longest text (rounded up to SPAN_STEP) instead of the batch's;
- the slices run on one MLX CPU stream per core, each with single-threaded OpenBLAS:
  data parallelism for the kernels MLX runs on one thread;
- Q, K and V come from one matmul, with the attention scale folded into Q's weights.

Models this does not cover (another family, quantised or half-precision weights) keep
mlx-vlm's own forward pass: ``BertForward.covers`` says which.
"""

from __future__ import annotations

import ctypes
import os
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import numpy as np
import structlog

log = structlog.get_logger(__name__)

# MLX's CPU allocator keeps 32 MiB of freed buffers by default; the slices' intermediates
# (of many sizes, as slices differ in length) cycle through ~400 MiB per batch, so beyond
# the cache buffers come back from the kernel as fresh pages: ~150k page faults per batch
# of 32 MiniLM passages on one stream (~15% of its time then; a few % with the streams).
# The limit is raised while a batch runs and put back after, when the next allocation
# returns the excess.
CACHE_LIMIT_BYTES = 512 << 20

# Slices are cut to a multiple of this many columns: fewer distinct buffer sizes, which
# MLX's allocator can reuse (it only reuses a freed buffer of about the size asked).
SPAN_STEP = 16

# Slices run on this many MLX CPU streams at most (one per core), each stream's matmuls
# on one OpenBLAS thread: MLX's own CPU kernels (everything but the matmuls) use one
# thread per stream, so splitting the batch across streams is what uses every core.
MAX_WORKERS = 8

# Tokens per slice: a slice's widest intermediate (tokens x 1536 floats for MiniLM's FFN,
# or texts x 12 heads x length² scores) stays within a few MB.
SLICE_TOKENS = 512

# erf(x) = x * P(x²) / Q(x²) on [-4, 4] (erf is ±1 to float precision beyond): the rational
# approximation Eigen and XLA use for float32, max abs error ~5e-7 against MLX's erf.
ERF_P = (
    -2.72614225801306e-10,
    2.77068142495902e-08,
    -2.10102402082508e-06,
    -5.69250639462346e-05,
    -7.34990630326855e-04,
    -2.95459980854025e-03,
    -1.60960333262415e-02,
)
ERF_Q = (
    -1.45660718464996e-05,
    -2.13374055278905e-04,
    -1.68282697438203e-03,
    -7.37332916720468e-03,
    -1.42647390514189e-02,
)
SQRT_HALF = 0.7071067811865476
# Softmax weights below e^-20 (2e-9 of the largest) are taken as e^-20; exp(x) =
# (exp(x/32))^32 with a degree-8 Taylor polynomial on [-0.625, 0]: relative error < 1e-5
# (measured), far inside the 1e-4 cosine tolerance of the tests.
EXP_FLOOR = -20.0
EXP_SQUARINGS = 5
EXP_TAYLOR = tuple(1.0 / float(np.prod(np.arange(1, k + 1))) for k in range(8, -1, -1))


def _erf(x: mx.array) -> mx.array:
    x = mx.clip(x, -4.0, 4.0)
    x2 = x * x
    p = mx.array(ERF_P[0], dtype=x.dtype)
    for c in ERF_P[1:]:
        p = p * x2 + c
    q = mx.array(ERF_Q[0], dtype=x.dtype)
    for c in ERF_Q[1:]:
        q = q * x2 + c
    return x * p / q


def _gelu(x: mx.array) -> mx.array:
    return 0.5 * x * (1.0 + _erf(x * SQRT_HALF))


def _exp_nonpositive(x: mx.array) -> mx.array:
    y = mx.maximum(x, EXP_FLOOR) * (1.0 / (1 << EXP_SQUARINGS))
    p = mx.array(EXP_TAYLOR[0], dtype=x.dtype)
    for c in EXP_TAYLOR[1:]:
        p = p * y + c
    for _ in range(EXP_SQUARINGS):
        p = p * p
    return p


def _columns(array: np.ndarray, width: int) -> np.ndarray:
    """The first `width` columns, padded with zeros (padding, masked) where fewer."""
    array = array[:, :width]
    if array.shape[1] < width:
        array = np.pad(array, ((0, 0), (0, width - array.shape[1])))
    return array


class _Kernels:
    """The elementwise pieces, compiled into fused loops. MLX compiles them with g++ on
    first use; where that fails (no compiler, or usearch's extension loaded before MLX:
    see engine/rag/hnsw_index.py) the same functions run uncompiled, op by op."""

    def __init__(self) -> None:
        self.gelu: Callable[[mx.array], mx.array] = mx.compile(_gelu, shapeless=True)
        # Traced per input shape (slices come in few: SPAN_STEP), the exponential fuses
        # into fewer, faster loops than shapeless (measured 1.6 against 4.0 ns per
        # element); GELU is the other way round (3.8 shapeless, 5.4 per shape).
        self.exp: Callable[[mx.array], mx.array] = mx.compile(_exp_nonpositive)
        self.checked = False

    def check(self) -> None:
        if self.checked:
            return
        self.checked = True
        try:
            probe = mx.array([-1.0, 0.0, 1.0])
            mx.eval(self.gelu(probe), self.exp(probe))
        except Exception as exc:  # any compiler failure: run uncompiled
            log.warning("bert_encoder.compile_failed", error=str(exc))
            self.gelu, self.exp = _gelu, _exp_nonpositive


_KERNELS = _Kernels()


def _workers() -> int:
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return max(1, min(cores, MAX_WORKERS))


class _Streams(threading.local):
    """One MLX CPU stream (each has its own thread) per core, made on first use. MLX
    streams belong to the thread that made them: each calling thread has its own (in
    the server, the one MLX worker thread)."""

    def __init__(self) -> None:
        self.streams: list[mx.Stream] = []

    def get(self) -> list[mx.Stream]:
        if not self.streams:
            self.streams = [mx.new_stream(mx.cpu) for _ in range(_workers())]
        return self.streams


_STREAMS = _Streams()


@contextmanager
def _single_threaded_blas() -> Iterator[None]:
    """OpenBLAS on one thread per call while the slices run on one stream per core, put
    back after: a model's prefill on the same process keeps all cores for its matmuls."""
    from engine.models import blas

    library = ctypes.CDLL(blas.loaded) if blas.loaded else None
    if library is None or not hasattr(library, "openblas_set_num_threads"):
        yield
        return
    previous = int(library.openblas_get_num_threads())
    library.openblas_set_num_threads(1)
    try:
        yield
    finally:
        library.openblas_set_num_threads(previous)


@dataclass(frozen=True)
class _LayerNorm:
    weight: mx.array
    bias: mx.array
    eps: float

    def __call__(self, x: mx.array) -> mx.array:
        return mx.fast.layer_norm(x, self.weight, self.bias, self.eps)


@dataclass(frozen=True)
class _Layer:
    qkv_weight: mx.array  # (3H, H): query rows pre-scaled by head_dim ** -0.5
    qkv_bias: mx.array
    out_weight: mx.array
    out_bias: mx.array
    attention_norm: _LayerNorm
    up_weight: mx.array
    up_bias: mx.array
    down_weight: mx.array
    down_bias: mx.array
    output_norm: _LayerNorm


def _norm(module: Any) -> _LayerNorm:
    return _LayerNorm(module.weight, module.bias, float(module.eps))


class BertForward:
    """mlx-vlm's BERT encoder (``Model._encode``) over the same weights, faster on CPU."""

    def __init__(self, model: Any, slice_tokens: int = SLICE_TOKENS) -> None:
        config = model.config
        self.heads = int(config.num_attention_heads)
        self.hidden = int(config.hidden_size)
        self.head_dim = self.hidden // self.heads
        self.slice_tokens = slice_tokens
        emb = model.embeddings
        self.word = emb.word_embeddings.weight
        self.position = emb.position_embeddings.weight
        self.token_type = emb.token_type_embeddings.weight
        self.embedding_norm = _norm(emb.LayerNorm)
        scale = self.head_dim**-0.5
        self.layers = []
        for layer in model.encoder.layer:
            attn = layer.attention.self
            qkv_weight = mx.concatenate(
                [attn.query.weight * scale, attn.key.weight, attn.value.weight], axis=0
            )
            qkv_bias = mx.concatenate([attn.query.bias * scale, attn.key.bias, attn.value.bias])
            self.layers.append(
                _Layer(
                    qkv_weight=qkv_weight,
                    qkv_bias=qkv_bias,
                    out_weight=layer.attention.output.dense.weight,
                    out_bias=layer.attention.output.dense.bias,
                    attention_norm=_norm(layer.attention.output.LayerNorm),
                    up_weight=layer.intermediate.dense.weight,
                    up_bias=layer.intermediate.dense.bias,
                    down_weight=layer.output.dense.weight,
                    down_bias=layer.output.dense.bias,
                    output_norm=_norm(layer.output.LayerNorm),
                )
            )
        mx.eval([(lay.qkv_weight, lay.qkv_bias) for lay in self.layers])

    @property
    def extra_bytes(self) -> int:
        """Memory held beside the model's own parameters: the fused QKV copies (mlx-vlm's
        separate ones stay, for its pass)."""
        return sum(lay.qkv_weight.nbytes + lay.qkv_bias.nbytes for lay in self.layers)

    @staticmethod
    def covers(model: Any) -> bool:
        """mlx-vlm's plain BERT encoder with float32, unquantised linear layers, on the
        CPU (a GPU runs mlx-vlm's pass well: one launch per op, no cache to fit)."""
        import mlx.nn as nn
        from mlx_vlm.models.bert.bert import Model

        if type(model) is not Model or mx.default_device() != mx.cpu:
            return False
        linears = [
            m
            for layer in model.encoder.layer
            for m in (
                layer.attention.self.query,
                layer.attention.self.key,
                layer.attention.self.value,
                layer.attention.output.dense,
                layer.intermediate.dense,
                layer.output.dense,
            )
        ]
        if any(type(m) is not nn.Linear or "bias" not in m for m in linears):
            return False
        arrays = [model.embeddings.word_embeddings.weight] + [m.weight for m in linears]
        return all(a.dtype == mx.float32 for a in arrays)

    def encode(
        self,
        input_ids: np.ndarray,
        attention_mask: np.ndarray,
        token_type_ids: np.ndarray | None,
        pool: Callable[[mx.array, mx.array], mx.array],
    ) -> mx.array:
        """``pool(last_hidden_state, attention_mask)`` of every row, in row order, the
        rows run in slices of similar length."""
        _KERNELS.check()
        previous = mx.set_cache_limit(CACHE_LIMIT_BYTES)
        if previous > CACHE_LIMIT_BYTES:
            mx.set_cache_limit(previous)
        try:
            with _single_threaded_blas():
                return self._encode(input_ids, attention_mask, token_type_ids, pool)
        finally:
            mx.set_cache_limit(previous)

    def _encode(
        self,
        input_ids: np.ndarray,
        attention_mask: np.ndarray,
        token_type_ids: np.ndarray | None,
        pool: Callable[[mx.array, mx.array], mx.array],
    ) -> mx.array:
        spans = self._spans(attention_mask)
        order = np.argsort(spans, kind="stable")
        streams = _STREAMS.get()
        pooled: list[mx.array] = []
        pending: list[mx.array] = []
        start = 0
        while start < len(order):
            end = start + 1
            # Ascending spans: a slice's width is its last row's.
            while end < len(order) and (end + 1 - start) * spans[order[end]] <= self.slice_tokens:
                end += 1
            rows = order[start:end]
            width = int(spans[rows[-1]])
            types = None if token_type_ids is None else _columns(token_type_ids[rows], width)
            with mx.stream(streams[len(pending)]):
                pending.append(
                    self._slice(
                        _columns(input_ids[rows], width),
                        _columns(attention_mask[rows], width),
                        types,
                        pool,
                    )
                )
            # One slice per stream at a time: each slice's intermediates stay in cache.
            if len(pending) == len(streams) or end == len(order):
                mx.eval(pending)
                pooled += pending
                pending = []
            start = end
        out = mx.concatenate(pooled, axis=0)
        return out[mx.array(np.argsort(order))]

    def _spans(self, attention_mask: np.ndarray) -> np.ndarray:
        """Per row, the columns up to its last attended token (trailing padding is cut),
        rounded up to a multiple of SPAN_STEP within the position table."""
        attended = attention_mask != 0
        last = attention_mask.shape[1] - np.argmax(attended[:, ::-1], axis=1)
        spans = np.where(attended.any(axis=1), last, 1)
        rounded = -(-spans // SPAN_STEP) * SPAN_STEP
        return np.maximum(np.minimum(rounded, len(self.position)), spans)

    def _slice(
        self,
        ids_np: np.ndarray,
        mask_np: np.ndarray,
        types_np: np.ndarray | None,
        pool: Callable[[mx.array, mx.array], mx.array],
    ) -> mx.array:
        ids = mx.array(ids_np)
        mask = mx.array(mask_np)
        n, length = ids.shape
        h = self.word[ids] + self.position[:length]
        h = h + (self.token_type[0] if types_np is None else self.token_type[mx.array(types_np)])
        h = self.embedding_norm(h)
        # Padding's scores sit 1e9 below the real ones: its weights are e^EXP_FLOOR of the
        # largest at most (2e-9), with the slice cut to its longest text, a few at most.
        bias = (mask.astype(h.dtype)[:, None, None, :] - 1.0) * 1e9
        for layer in self.layers:
            h = self._layer(layer, h, bias, n, length)
        return pool(h, mask)

    def _layer(self, layer: _Layer, x: mx.array, bias: mx.array, n: int, length: int) -> mx.array:
        qkv = mx.addmm(layer.qkv_bias, x, layer.qkv_weight.T)
        qkv = qkv.reshape(n, length, 3, self.heads, self.head_dim).transpose(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        scores = q @ k.swapaxes(-1, -2) + bias
        # The shift is an eager broadcast: a compiled kernel with broadcast inputs runs
        # MLX's strided loop, several times slower than the contiguous one.
        weights = _KERNELS.exp(scores - mx.max(scores, axis=-1, keepdims=True))
        weights = weights / mx.sum(weights, axis=-1, keepdims=True)
        context = (weights @ v).transpose(0, 2, 1, 3).reshape(n, length, self.hidden)
        attended = layer.attention_norm(mx.addmm(layer.out_bias, context, layer.out_weight.T) + x)
        up = _KERNELS.gelu(mx.addmm(layer.up_bias, attended, layer.up_weight.T))
        return layer.output_norm(mx.addmm(layer.down_bias, up, layer.down_weight.T) + attended)
