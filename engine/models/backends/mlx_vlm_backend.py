"""Vision-language models through mlx-vlm. Images arrive already loaded (PIL), fetched by
engine.models.messages under the SSRF policy; mlx-vlm never fetches anything."""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from engine.models.backends.base import (
    Backend,
    ChatChunk,
    ChatParams,
    LoadedModel,
    context_length_of,
    hf_token_offsets,
    read_config,
)
from engine.models.backends.textgen import parameter_bytes, stream_chunks
from engine.models.messages import VisionPrompt


class MlxVlmBackend(Backend):
    model_type = "multimodal"
    package = "mlx-vlm"
    module = "mlx_vlm"

    def load(self, path: Path, context_length: int | None) -> LoadedModel:
        import mlx_vlm

        config = read_config(path)
        model, processor = mlx_vlm.load(str(path))
        return VlmModel(model, processor, config, context_length)


class VlmModel(LoadedModel):
    model_type = "multimodal"
    capabilities = frozenset({"chat", "vision"})

    def __init__(
        self, model: Any, processor: Any, config: dict[str, Any], context_length: int | None
    ) -> None:
        self.model = model
        self.processor = processor
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
        prompt = apply_chat_template(
            self.processor, self.config, vision.messages, num_images=len(vision.images)
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
