"""Chat messages as OpenAI clients send them: ``content`` is a string or a list of parts
(``{"type": "text"}``, ``{"type": "image_url", "image_url": {"url": ...}}``)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from engine.errors import ErrorCode, InvalidRequest
from engine.models.images import ImagePolicy, load_image

IMAGE_PART_TYPES = ("image_url", "input_image", "image")


def _parts(content: Any) -> list[dict[str, Any]]:
    if content is None:
        return []
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    if isinstance(content, list):
        return [p if isinstance(p, dict) else {"type": "text", "text": str(p)} for p in content]
    raise InvalidRequest("message content must be a string or a list of parts", param="messages")


def _image_url(part: dict[str, Any]) -> str:
    ref = part.get("image_url", part.get("image"))
    url = ref.get("url") if isinstance(ref, dict) else ref
    if not isinstance(url, str) or not url:
        raise InvalidRequest("an image part needs image_url.url", param="messages")
    return url


def prompt_chars(messages: Sequence[dict[str, Any]]) -> int:
    """Characters of text the messages carry: what tokenizing them will cost."""
    return sum(
        len(str(p.get("text", "")))
        for m in messages
        for p in _parts(m.get("content"))
        if p.get("type") not in IMAGE_PART_TYPES
    )


def text_messages(messages: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Messages with content flattened to text; image parts are refused."""
    out = []
    for i, message in enumerate(messages):
        parts = _parts(message.get("content"))
        if any(p.get("type") in IMAGE_PART_TYPES for p in parts):
            raise InvalidRequest(
                "this model takes text only; send images to a multimodal model",
                param=f"messages[{i}].content",
                code=ErrorCode.IMAGES_NOT_SUPPORTED,
            )
        text = "".join(str(p.get("text", "")) for p in parts)
        out.append({**message, "content": text})
    return out


@dataclass
class VisionPrompt:
    messages: list[dict[str, Any]]  # text content only
    images: list[Any]  # PIL images, in order of appearance


async def vision_prompt(messages: Sequence[dict[str, Any]], policy: ImagePolicy) -> VisionPrompt:
    """Fetch every image (data: URI, file under the root, http(s) under the SSRF policy)
    before generation, so the model's worker thread never does network I/O."""
    texts, images = [], []
    for message in messages:
        text = []
        for part in _parts(message.get("content")):
            if part.get("type") in IMAGE_PART_TYPES:
                images.append(await load_image(_image_url(part), policy))
            else:
                text.append(str(part.get("text", "")))
        texts.append({**message, "content": "".join(text)})
    return VisionPrompt(texts, images)


def prompt_messages(
    prompt: str, *, image_url: str | None = None, system: str | None = None
) -> list[dict[str, Any]]:
    """A one-turn conversation from a prompt: an optional system message, then the user's
    prompt, with the image as an ``image_url`` part after the text when one is given."""
    messages: list[dict[str, Any]] = []
    if system:
        messages.append({"role": "system", "content": system})
    if image_url is None:
        messages.append({"role": "user", "content": prompt})
    else:
        parts = [
            {"type": "text", "text": prompt},
            {"type": "image_url", "image_url": {"url": image_url}},
        ]
        messages.append({"role": "user", "content": parts})
    return messages


def has_image(messages: Sequence[dict[str, Any]]) -> bool:
    return any(
        isinstance(m, dict) and p.get("type") in IMAGE_PART_TYPES
        for m in messages
        for p in (_parts(m.get("content")) if isinstance(m, dict) else [])
    )
