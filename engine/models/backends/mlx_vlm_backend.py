"""Vision-language models through mlx-vlm. Images arrive already loaded (PIL), fetched by
engine.models.messages under the SSRF policy; mlx-vlm never fetches anything."""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, cast

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
from engine.models.messages import VisionPrompt
from engine.models.types import Capability, ModelType, Operation


class MlxVlmBackend(GenerativeBackend):
    model_type = ModelType.MULTIMODAL
    capabilities = (Capability.VISION, Capability.CHAT)
    operations = frozenset(
        {Operation.CHAT, Operation.VISION, Operation.COUNT_TOKENS, Operation.TOKENIZE}
    )
    package = "mlx-vlm"
    module = "mlx_vlm"

    def load(self, path: Path, context_length: int | None) -> LoadedModel:
        import mlx_vlm

        config = check_model_files(path, self.model_type)
        with loader_errors(path, self.model_type):
            model, processor = mlx_vlm.load(str(path))
        return VlmModel(model, processor, config, context_length, self.prefill_step_tokens)


class VlmModel(LoadedModel):
    model_type = ModelType.MULTIMODAL
    capabilities = frozenset(MlxVlmBackend.capabilities)

    def __init__(
        self,
        model: Any,
        processor: Any,
        config: dict[str, Any],
        context_length: int | None,
        prefill_step_tokens: int,
    ) -> None:
        self.model = model
        self.processor = processor
        self.prefill_step_tokens = prefill_step_tokens
        self.config = model.config
        self.family = config.get("model_type")
        self.context_length = context_length or context_length_of(config)
        self.weight_bytes = parameter_bytes(model)

    def chat_stream(
        self,
        messages: Sequence[dict[str, Any]] | VisionPrompt,
        params: ChatParams,
        stop: threading.Event,
    ) -> Iterator[ChatChunk]:
        from mlx_vlm import stream_generate
        from mlx_vlm.prompt_utils import apply_chat_template

        vision = (
            messages if isinstance(messages, VisionPrompt) else VisionPrompt(list(messages), [])
        )
        # A string for chat messages (mlx-vlm types it loosely, for its other inputs).
        prompt = cast(
            str,
            apply_chat_template(
                self.processor, self.config, vision.messages, num_images=len(vision.images)
            ),
        )
        # Text tokens only: image tokens join when mlx-vlm expands the image placeholders.
        tokens = self.count_tokens(prompt)
        if self.context_length and tokens >= self.context_length:
            raise InvalidRequest(
                f"the prompt has {tokens} tokens; the model's context is {self.context_length}",
                param="messages",
                code=ErrorCode.CONTEXT_LENGTH_EXCEEDED,
            )
        responses = stream_generate(
            self.model,
            self.processor,
            prompt,
            image=vision.images or None,
            max_tokens=params.max_tokens,
            temperature=params.temperature,
            top_p=params.top_p,
            logit_bias=params.logit_bias,
            seed=params.seed,
            prefill_step_size=self.prefill_step_tokens,
        )
        yield from stream_chunks(responses, params.stop, stop)

    def count_tokens(self, text: str) -> int:
        tokenizer = getattr(self.processor, "tokenizer", self.processor)
        return len(tokenizer.encode(text))

    def token_offsets(self, text: str) -> list[tuple[int, int]]:
        return hf_token_offsets(getattr(self.processor, "tokenizer", self.processor), text)

    def close(self) -> None:
        self.model = None
        self.processor = None
