"""Images for multimodal requests: a data: URI, a file under the configured image root,
or an http(s) URL fetched under the SSRF policy."""

from __future__ import annotations

import base64
import binascii
import io
from pathlib import Path

from engine.errors import InvalidRequest
from engine.net import FetchPolicy, fetch

MAX_IMAGE_BYTES = 20 * 1024 * 1024


def _decode(data: bytes, source: str):  # -> PIL.Image.Image
    from PIL import Image, UnidentifiedImageError

    try:
        image = Image.open(io.BytesIO(data))
        image.load()
    except (UnidentifiedImageError, OSError) as exc:
        raise InvalidRequest(
            f"{source} is not a readable image: {exc}", code="invalid_image"
        ) from None
    return image.convert("RGB")


def _from_data_uri(uri: str):
    header, sep, payload = uri.partition(",")
    if not sep or ";base64" not in header:
        raise InvalidRequest("a data: image URI must be base64 encoded", code="invalid_image")
    try:
        raw = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidRequest(
            "the data: image URI is not valid base64", code="invalid_image"
        ) from None
    return _decode(raw, "the data: URI")


def _from_file(ref: str, root: Path | None):
    if root is None:
        raise InvalidRequest(
            "local image paths are disabled: set image_root to allow reading files under it",
            code="invalid_image",
        )
    path = (root / ref.removeprefix("file://")).resolve()
    if not path.is_relative_to(root.resolve()):
        raise InvalidRequest(f"image path '{ref}' is outside the image root", code="invalid_image")
    if not path.is_file():
        raise InvalidRequest(f"image file '{ref}' not found", code="invalid_image")
    if path.stat().st_size > MAX_IMAGE_BYTES:
        raise InvalidRequest(
            f"image file '{ref}' exceeds {MAX_IMAGE_BYTES} bytes", code="invalid_image"
        )
    return _decode(path.read_bytes(), f"image file '{ref}'")


async def load_image(ref: str, *, root: Path | None, allow_private: bool):
    if ref.startswith("data:"):
        return _from_data_uri(ref)
    if ref.startswith(("http://", "https://")):
        policy = FetchPolicy(allow_private=allow_private, max_bytes=MAX_IMAGE_BYTES)
        response = await fetch(ref, policy)
        if response.status_code != 200:
            raise InvalidRequest(
                f"fetching image '{ref}' returned HTTP {response.status_code}", code="invalid_image"
            )
        return _decode(response.content, f"image URL '{ref}'")
    return _from_file(ref, root)
