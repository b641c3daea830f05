"""Images for multimodal requests and the SSRF-guarded fetch behind image URLs: data: URIs,
files under the image root, and http URLs served by a real server on loopback (allowed only
when private addresses are allowed)."""

from __future__ import annotations

import base64
import io
import threading
from collections.abc import Iterator
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from engine.config import Settings
from engine.errors import InvalidRequest, PayloadTooLarge
from engine.models.images import ImagePolicy, load_image
from engine.net import BlockedAddress, FetchPolicy, fetch


def images(root: Path | None = None, allow_private: bool = False) -> ImagePolicy:
    return ImagePolicy.from_settings(Settings(image_root=root, allow_private_urls=allow_private))


def fetch_policy(allow_private: bool = False, **changes: Any) -> FetchPolicy:
    return replace(images(allow_private=allow_private).fetch, **changes)


def png_bytes(colour: tuple[int, int, int] = (200, 30, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 6), colour).save(buffer, "PNG")
    return buffer.getvalue()


class _Handler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        if self.path == "/cat.png":
            body = png_bytes()
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        elif self.path == "/moved":
            self.send_response(302)
            self.send_header("Location", "/cat.png")
            self.end_headers()
        elif self.path == "/big":
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b"x" * 100_000)
        else:
            self.send_response(404)
            self.end_headers()

    def log_message(self, *args: object) -> None:  # keep test output clean
        pass


@pytest.fixture(scope="module")
def loopback_server() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        thread.join(10)


async def test_data_uri() -> None:
    uri = "data:image/png;base64," + base64.b64encode(png_bytes()).decode()
    image = await load_image(uri, images())
    assert image.size == (8, 6)
    assert image.getpixel((0, 0)) == (200, 30, 30)


@pytest.mark.parametrize(
    ("uri", "message"),
    [
        ("data:image/png,notbase64", "must be base64"),
        ("data:image/png;base64,!!!", "not valid base64"),
        ("data:image/png;base64," + base64.b64encode(b"not an image").decode(), "not a readable"),
    ],
)
async def test_bad_data_uris(uri: str, message: str) -> None:
    with pytest.raises(InvalidRequest, match=message):
        await load_image(uri, images())


async def test_files_only_under_the_image_root(tmp_path: Path) -> None:
    root = tmp_path / "images"
    root.mkdir()
    (root / "ok.png").write_bytes(png_bytes((1, 2, 3)))
    (tmp_path / "secret.png").write_bytes(png_bytes())
    image = await load_image("ok.png", images(root))
    assert image.getpixel((0, 0)) == (1, 2, 3)
    with pytest.raises(InvalidRequest, match="outside the image root"):
        await load_image("../secret.png", images(root))
    with pytest.raises(InvalidRequest, match="not found"):
        await load_image("missing.png", images(root))
    with pytest.raises(InvalidRequest, match="local image paths are disabled"):
        await load_image("ok.png", images())


async def test_loopback_urls_are_refused_by_default(loopback_server: str) -> None:
    with pytest.raises(BlockedAddress, match="loopback"):
        await load_image(f"{loopback_server}/cat.png", images())


async def test_loopback_urls_when_private_addresses_are_allowed(loopback_server: str) -> None:
    image = await load_image(f"{loopback_server}/cat.png", images(allow_private=True))
    assert image.size == (8, 6)
    moved = await load_image(f"{loopback_server}/moved", images(allow_private=True))
    assert moved.size == (8, 6)  # the redirect was followed, and checked again
    with pytest.raises(InvalidRequest, match="HTTP 404"):
        await load_image(f"{loopback_server}/nothing", images(allow_private=True))


async def test_fetch_bounds_the_body(loopback_server: str) -> None:
    policy = fetch_policy(allow_private=True, max_bytes=10_000)
    with pytest.raises(PayloadTooLarge, match="exceeds 10000 bytes"):
        await fetch(f"{loopback_server}/big", policy)


@pytest.mark.parametrize(
    "url",
    ["http://10.0.0.1/x", "http://169.254.169.254/latest", "http://[::1]/", "http://0.0.0.0/"],
)
async def test_private_link_local_and_unspecified_addresses_are_refused(url: str) -> None:
    # refused before any connection is attempted
    with pytest.raises(BlockedAddress):
        await fetch(url, fetch_policy())


async def test_only_http_urls() -> None:
    with pytest.raises(InvalidRequest, match="only http"):
        await fetch("file:///etc/passwd", fetch_policy(allow_private=True))
