"""Sentence-embedding models (BERT family, sentence-transformers layout) on MLX, loaded
through mlx-vlm's encoder loader. Pooling, normalisation and the maximum sequence length
follow the model's own sentence-transformers files."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from engine.models.backends.base import (
    Backend,
    EmbedResult,
    LoadedModel,
    check_model_files,
    hf_token_offsets,
    loader_errors,
)
from engine.models.backends.textgen import parameter_bytes
from engine.models.types import Capability, ModelType, Operation

BATCH = 32


def _json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None
    except (OSError, json.JSONDecodeError):
        return None


class EmbeddingsBackend(Backend):
    model_type = ModelType.EMBEDDINGS
    capabilities = (Capability.EMBEDDINGS,)
    operations = frozenset({Operation.EMBED, Operation.COUNT_TOKENS, Operation.TOKENIZE})
    package = "mlx-vlm"
    module = "mlx_vlm"

    def load(self, path: Path, context_length: int | None) -> LoadedModel:
        from mlx_vlm.embedding_loader import load_embedding_model
        from transformers import AutoTokenizer

        config = check_model_files(path, self.model_type)
        with loader_errors(path, self.model_type):
            model = load_embedding_model(path)
            tokenizer = AutoTokenizer.from_pretrained(str(path))
        return EmbeddingModel(model, tokenizer, config, path, context_length)


class EmbeddingModel(LoadedModel):
    model_type = ModelType.EMBEDDINGS
    capabilities = frozenset(EmbeddingsBackend.capabilities)

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        config: dict[str, Any],
        path: Path,
        context_length: int | None,
    ) -> None:
        from engine.models.backends.bert_encoder import BertForward

        self.model = model
        # Our own forward pass where it covers the model (several times faster on CPU: see
        # bert_encoder.py); mlx-vlm's otherwise. None keeps mlx-vlm's (the benchmark's
        # baseline).
        self.forward: BertForward | None = BertForward(model) if BertForward.covers(model) else None
        self.tokenizer = tokenizer
        # A fast tokenizer keeps truncation/padding as state that every call resets: two
        # threads using it at once (chunking in a thread while the worker embeds) get each
        # other's truncation. Every use of the tokenizer holds this lock.
        self.tokenizer_lock = threading.Lock()
        self.family = config.get("model_type")
        self.pooling = _json(path / "1_Pooling" / "config.json") or {"pooling_mode": "mean"}
        modules = _json(path / "modules.json") or []
        # sentence-transformers normalises only when the pipeline has a Normalize module;
        # a model without one (or without modules.json: a bare encoder) keeps raw pools.
        self.normalize = any(str(m.get("type", "")).endswith("Normalize") for m in modules)
        st_config = _json(path / "sentence_bert_config.json") or {}
        positions = config.get("max_position_embeddings") or 512
        self.max_seq_length = min(
            context_length or st_config.get("max_seq_length") or positions, positions
        )
        self.context_length = self.max_seq_length
        self.dimension = int(config.get("hidden_size", 0)) or None
        # What the memory budget counts: the forward pass's fused copies too.
        self.weight_bytes = parameter_bytes(model) + (
            self.forward.extra_bytes if self.forward else 0
        )

    @contextmanager
    def with_mlx_vlm_forward(self) -> Iterator[None]:
        """mlx-vlm's own forward pass instead of ours for a while: the reference that
        benchmarks and tests compare ours with."""
        forward, self.forward = self.forward, None
        try:
            yield
        finally:
            self.forward = forward

    def token_counts(self, texts: Sequence[str]) -> list[int]:
        """Tokens per text with the special tokens, before truncation."""
        with self.tokenizer_lock:
            encoded = self.tokenizer(list(texts))
        return [len(ids) for ids in encoded["input_ids"]]

    def count_tokens(self, text: str) -> int:
        return self.token_counts([text])[0]

    def warmup(self, prompt: str, max_length: int) -> int:
        """One real forward pass over the prompt (allocations, kernels)."""
        with self.tokenizer_lock:
            ids = self.tokenizer(prompt, truncation=True, max_length=max(2, max_length))
            ids = ids["input_ids"]
            text = self.tokenizer.decode(ids, skip_special_tokens=True) or prompt
        self.embed([text], threading.Event())
        return len(ids)

    def token_offsets(self, text: str) -> list[tuple[int, int]]:
        """Character span of each token, special tokens excluded: what chunking counts."""
        with self.tokenizer_lock:
            return hf_token_offsets(self.tokenizer, text)

    @property
    def special_tokens(self) -> int:
        """Tokens the tokenizer adds around every text ([CLS] and [SEP] for BERT)."""
        with self.tokenizer_lock:
            return len(self.tokenizer("")["input_ids"])

    def _pool(self, hidden: Any, mask: Any) -> Any:
        from mlx_vlm.models.pooling import normalize_embeddings, pool_by_config

        pooled = pool_by_config(hidden, mask, self.pooling)
        return normalize_embeddings(pooled) if self.normalize else pooled

    def _pooled(self, encoded: Any) -> Any:
        """One pooled (and, as the model says, normalised) vector per tokenised row."""
        import mlx.core as mx

        types = encoded.get("token_type_ids")
        if self.forward is not None:
            return self.forward.encode(
                encoded["input_ids"], encoded["attention_mask"], types, self._pool
            )
        mask = mx.array(encoded["attention_mask"])
        out = self.model(
            mx.array(encoded["input_ids"]),
            attention_mask=mask,
            token_type_ids=None if types is None else mx.array(types),
        )
        return self._pool(out.last_hidden_state, mask)

    def embed(self, texts: Sequence[str], stop: threading.Event) -> EmbedResult:
        return self.embed_groups([texts], stop)[0]

    def embed_groups(
        self, groups: Sequence[Sequence[str]], stop: threading.Event
    ) -> list[EmbedResult]:
        """The texts of several requests in shared forward passes; one result per group,
        in order, with its own token count and truncation flags. Stopped early, the texts
        not reached have no vector (None)."""
        import mlx.core as mx
        import numpy as np

        texts = [text for group in groups for text in group]
        counts = self.token_counts(texts) if texts else []
        # Similar lengths batched together waste less on padding; results keep input order.
        order = sorted(range(len(texts)), key=lambda i: counts[i])
        vectors: list[Any] = [None] * len(texts)
        used = [0] * len(texts)
        for start in range(0, len(order), BATCH):
            if stop.is_set():
                break
            batch = order[start : start + BATCH]
            with self.tokenizer_lock:
                encoded = self.tokenizer(
                    [texts[i] for i in batch],
                    padding=True,
                    truncation=True,
                    max_length=self.max_seq_length,
                    return_tensors="np",
                )
            rows = np.array(self._pooled(encoded).astype(mx.float32))
            tokens = encoded["attention_mask"].sum(axis=1)
            for row, index, n in zip(rows, batch, tokens, strict=True):
                vectors[index] = row.tolist()
                used[index] = int(n)
        results = []
        start = 0
        for group in groups:
            end = start + len(group)
            results.append(
                EmbedResult(
                    vectors=vectors[start:end],
                    prompt_tokens=sum(used[start:end]),
                    truncated=[n > self.max_seq_length for n in counts[start:end]],
                )
            )
            start = end
        return results

    def close(self) -> None:
        self.model = None
        self.forward = None
        self.tokenizer = None
