"""Language models through mlx-lm."""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from engine.errors import ErrorCode, InvalidRequest
from engine.models.backends.base import (
    ChatChunk,
    ChatParams,
    LoadedModel,
    check_model_files,
    context_length_of,
    hf_token_offsets,
    loader_errors,
)
from engine.models.backends.textgen import GenerativeBackend, parameter_bytes, stream_chunks
from engine.models.types import Capability, ModelType, Operation

if TYPE_CHECKING:
    from engine.models.backends.batch_decode import DecodeBatch

LONG_CONTEXT = 32_768
RERANK_SYSTEM = (
    "Judge whether the Document meets the requirements based on the Query and the Instruct "
    'provided. Note that the answer can only be "yes" or "no".'
)


class MlxLmBackend(GenerativeBackend):
    model_type = ModelType.LM
    capabilities = (Capability.CHAT,)
    operations = frozenset(
        {Operation.CHAT, Operation.COUNT_TOKENS, Operation.TOKENIZE, Operation.RELEVANCE}
    )
    package = "mlx-lm"
    module = "mlx_lm"

    def load(self, path: Path, context_length: int | None) -> LoadedModel:
        import mlx_lm

        config = check_model_files(path, self.model_type)
        with loader_errors(path, self.model_type):
            loaded = mlx_lm.load(str(path))  # (model, tokenizer)
        model, tokenizer = loaded[0], loaded[1]
        return LmModel(model, tokenizer, config, context_length, self.prefill_step_tokens)


class LmModel(LoadedModel):
    model_type = ModelType.LM

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        config: dict[str, Any],
        context_length: int | None,
        prefill_step_tokens: int,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.prefill_step_tokens = prefill_step_tokens
        self.batch: DecodeBatch | None = None
        # Prompts are tokenized on threads of their own, beside the worker: one at a time,
        # since a Hugging Face tokenizer refuses a call that overlaps a mutating one
        # ("Already borrowed").
        self._tokenizing = threading.Lock()
        self.family = config.get("model_type")
        self.context_length = context_length or context_length_of(config)
        self.weight_bytes = parameter_bytes(model)
        template = getattr(tokenizer, "chat_template", None) or ""
        caps: set[str] = set(MlxLmBackend.capabilities)
        if "tools" in template:
            caps.add(Capability.TOOL_CALLING)
        if (self.context_length or 0) >= LONG_CONTEXT:
            caps.add(Capability.LONG_CONTEXT)
        self.capabilities = frozenset(caps)

    def prompt_tokens(
        self, messages: Sequence[dict[str, Any]], tools: list[dict[str, Any]] | None
    ) -> list[int]:
        if not getattr(self.tokenizer, "chat_template", None):
            text = "\n".join(f"{m.get('role')}: {m.get('content')}" for m in messages)
            return self.encode(text + "\nassistant:")
        kwargs: dict[str, Any] = {"add_generation_prompt": True}
        if tools:
            kwargs["tools"] = tools
        with self._tokenizing:
            tokens = self.tokenizer.apply_chat_template(list(messages), **kwargs)
        # transformers 5 may return a BatchEncoding-like mapping instead of a list
        return list(tokens["input_ids"] if isinstance(tokens, dict) else tokens)

    def generation_prompt(
        self, messages: Sequence[dict[str, Any]], params: ChatParams
    ) -> tuple[list[int], int]:
        """The prompt's tokens and how many tokens may follow them: ``max_tokens`` cut to
        what the context leaves. Tokenizer work only, so any thread may run it."""
        prompt = self.prompt_tokens(messages, params.tools)
        limit = self.context_length
        if limit and len(prompt) >= limit:
            raise InvalidRequest(
                f"the prompt has {len(prompt)} tokens; the model's context is {limit}",
                param="messages",
                code=ErrorCode.CONTEXT_LENGTH_EXCEEDED,
            )
        return prompt, min(params.max_tokens, limit - len(prompt)) if limit else params.max_tokens

    @property
    def batchable(self) -> bool:
        """Whether its requests can share a batch: every layer's cache can merge with
        others (mlx_lm.server's test). Others are served one at a time."""
        from mlx_lm.models.cache import make_prompt_cache

        return all(hasattr(c, "merge") for c in make_prompt_cache(self.model))

    def start_batching(
        self, max_batch: int, cache_bytes: int, park_backlog: int
    ) -> DecodeBatch | None:
        """The batch its requests share from now on (engine/models/decoding.py), None if
        its caches cannot batch; warmups then keep their prefill in its prefix cache."""
        from engine.models.backends.batch_decode import DecodeBatch

        if not self.batchable:
            return None

        self.batch = DecodeBatch(
            self.model,
            self.tokenizer,
            max_batch=max_batch,
            prefill_step_tokens=self.prefill_step_tokens,
            cache_bytes=cache_bytes,
            park_backlog=park_backlog,
        )
        return self.batch

    def chat_stream(
        self, messages: Sequence[dict[str, Any]], params: ChatParams, stop: threading.Event
    ) -> Iterator[ChatChunk]:
        """One request alone (models whose caches cannot batch)."""
        import mlx.core as mx
        from mlx_lm import stream_generate
        from mlx_lm.sample_utils import make_logits_processors, make_sampler

        prompt, max_tokens = self.generation_prompt(messages, params)
        if params.seed is not None:
            mx.random.seed(params.seed)
        sampler = make_sampler(
            temp=params.temperature, top_p=params.top_p if params.top_p < 1.0 else 0.0
        )
        processors = make_logits_processors(logit_bias=params.logit_bias)
        responses = stream_generate(
            self.model,
            self.tokenizer,
            prompt,
            max_tokens=max_tokens,
            sampler=sampler,
            logits_processors=processors,
            prefill_step_size=self.prefill_step_tokens,
        )
        yield from stream_chunks(responses, params.stop, stop, prompt_tokens=len(prompt))

    def warmup(self, prompt: str, max_length: int) -> int:
        """Prefill the prompt's first tokens; with batching on, their KV cache stays in
        the prefix cache for the prompts that start with them."""
        from engine.models.backends.batch_decode import prefill

        tokens = self.encode(prompt)[: max(1, max_length)]
        cache = prefill(self.model, tokens, self.prefill_step_tokens)
        if self.batch is not None:
            self.batch.remember(tokens, cache)
        return len(tokens)

    def relevance(self, query: str, documents: Sequence[str], instruction: str) -> list[float]:
        """P(yes) that each document answers the query, judged by the model itself: the
        Qwen3-Reranker method (a yes/no question; softmax over the two answer logits at
        the first generated position). Works with any chat model; rerankers trained for
        it (Qwen3-Reranker) judge best."""
        import mlx.core as mx

        yes, no = (self.tokenizer.encode(w, add_special_tokens=False)[0] for w in ("yes", "no"))
        scores = []
        for document in documents:
            messages = [
                {"role": "system", "content": RERANK_SYSTEM},
                {
                    "role": "user",
                    "content": (
                        f"<Instruct>: {instruction}\n<Query>: {query}\n<Document>: {document}"
                    ),
                },
            ]
            tokens = self.prompt_tokens(messages, None)
            if self.context_length:
                tokens = tokens[-self.context_length :]
            logits = self.model(mx.array(tokens)[None])[0, -1]
            pair = mx.softmax(mx.stack([logits[yes], logits[no]]).astype(mx.float32))
            scores.append(float(cast(float, pair[0].item())))
        return scores

    def count_tokens(self, text: str) -> int:
        return len(self.encode(text))

    def encode(self, text: str) -> list[int]:
        """The tokens of ``text`` (special ones as the tokenizer adds them)."""
        with self._tokenizing:
            return list(self.tokenizer.encode(text))

    def token_offsets(self, text: str) -> list[tuple[int, int]]:
        # mlx-lm's TokenizerWrapper forwards attributes, not calls, to the HF tokenizer.
        with self._tokenizing:
            return hf_token_offsets(getattr(self.tokenizer, "_tokenizer", self.tokenizer), text)

    def close(self) -> None:
        if self.batch is not None:
            self.batch.close()
            self.batch = None
        self.model = None
        self.tokenizer = None
