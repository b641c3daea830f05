"""Images for multimodal requests: a data: URI, a file under the configured image root,
or an http(s) URL fetched under the SSRF policy."""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
from dataclasses import dataclass
from pathlib import Path

from engine.config import Settings
from engine.errors import ErrorCode, InvalidRequest, PayloadTooLarge
from engine.net import FetchPolicy, fetch


@dataclass(frozen=True)
class ImagePolicy:
    """Where images may come from: files under ``root`` (None: no files), and URLs under
    the fetch policy, whose ``max_bytes`` bounds every image whatever its source."""

    root: Path | None
    fetch: FetchPolicy

    @classmethod
    def from_settings(cls, settings: Settings) -> ImagePolicy:
        return cls(
            root=settings.image_root,
            fetch=FetchPolicy(
                allow_private=settings.allow_private_urls,
                timeout_s=settings.image_fetch_timeout_s,
                max_bytes=int(settings.image_max_mb * 1_000_000),
            ),
        )


def _check_size(size: int, source: str, limit: int) -> None:
    if size > limit:
        raise PayloadTooLarge(f"{source} exceeds {limit} bytes")


def _decode(data: bytes, source: str):  # -> PIL.Image.Image
    from PIL import Image, UnidentifiedImageError

    try:
        image = Image.open(io.BytesIO(data))
        image.load()
    except (UnidentifiedImageError, OSError) as exc:
        raise InvalidRequest(
            f"{source} is not a readable image: {exc}", code=ErrorCode.INVALID_IMAGE
        ) from None
    return image.convert("RGB")


def _from_data_uri(uri: str, limit: int):
    header, sep, payload = uri.partition(",")
    if not sep or ";base64" not in header:
        raise InvalidRequest(
            "a data: image URI must be base64 encoded", code=ErrorCode.INVALID_IMAGE
        )
    try:
        raw = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidRequest(
            "the data: image URI is not valid base64", code=ErrorCode.INVALID_IMAGE
        ) from None
    _check_size(len(raw), "the data: image URI", limit)
    return _decode(raw, "the data: URI")


def _from_file(ref: str, root: Path | None, limit: int):
    if root is None:
        raise InvalidRequest(
            "local image paths are disabled: set image_root to allow reading files under it",
            code=ErrorCode.INVALID_IMAGE,
        )
    path = (root / ref.removeprefix("file://")).resolve()
    if not path.is_relative_to(root.resolve()):
        raise InvalidRequest(
            f"image path '{ref}' is outside the image root", code=ErrorCode.INVALID_IMAGE
        )
    if not path.is_file():
        raise InvalidRequest(f"image file '{ref}' not found", code=ErrorCode.INVALID_IMAGE)
    _check_size(path.stat().st_size, f"image file '{ref}'", limit)
    return _decode(path.read_bytes(), f"image file '{ref}'")


async def load_image(ref: str, policy: ImagePolicy):
    """The image ``ref`` names, as RGB. Decoding (and base64, and reading a file) runs in
    a thread: its cost grows with the request's image, which must not hold the event loop."""
    limit = policy.fetch.max_bytes
    if ref.startswith("data:"):
        return await asyncio.to_thread(_from_data_uri, ref, limit)
    if ref.startswith(("http://", "https://")):
        response = await fetch(ref, policy.fetch)
        if response.status_code != 200:
            raise InvalidRequest(
                f"fetching image '{ref}' returned HTTP {response.status_code}",
                code=ErrorCode.INVALID_IMAGE,
            )
        return await asyncio.to_thread(_decode, response.content, f"image URL '{ref}'")
    return await asyncio.to_thread(_from_file, ref, policy.root, limit)
