"""X-API-Version and deprecated routes (spec §9) against a real server."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest
from litestar import get
from serverutil import serve_app

from engine.config import Settings
from server.app import create_app
from server.versioning import SUNSET_OPT


@get("/test/current")
async def current() -> dict[str, str]:
    return {"ok": "yes"}


@get("/test/old", deprecated=True, opt={SUNSET_OPT: "2027-05-27"})
async def old() -> dict[str, str]:
    return {"ok": "still"}


@get("/test/old-undated", deprecated=True)
async def old_undated() -> dict[str, str]:
    return {"ok": "still"}


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[httpx.Client]:
    data_dir = tmp_path_factory.mktemp("versioning")
    settings = Settings(
        data_dir=data_dir, startup_models=[], workflows_dir=data_dir / "wf", log_level="warning"
    )
    app = create_app(settings, extra_routes=[current, old, old_undated])
    with serve_app(app) as server, httpx.Client(base_url=server.base_url) as client:
        yield client


pytestmark = pytest.mark.e2e


@pytest.mark.parametrize("asked", ["1", "v1", "V1"])
def test_the_current_version_is_accepted_and_echoed(client: httpx.Client, asked: str) -> None:
    response = client.get("/v1/models", headers={"X-API-Version": asked})
    assert response.status_code == 200
    assert response.headers["X-API-Version"] == "1"


def test_a_request_without_a_version_is_answered_by_the_current_one(client: httpx.Client) -> None:
    response = client.get("/test/current")
    assert response.status_code == 200
    assert response.headers["X-API-Version"] == "1"
    assert "X-API-Deprecated" not in response.headers


@pytest.mark.parametrize("asked", ["2", "v2", "0", "latest", ""])
def test_any_other_version_is_refused_naming_the_supported_ones(
    client: httpx.Client, asked: str
) -> None:
    response = client.get("/v1/models", headers={"X-API-Version": asked})
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert error["code"] == "invalid_request"
    assert error["param"] == "X-API-Version"
    assert "supported versions: 1" in error["message"]
    assert response.headers["X-API-Version"] == "1"


def test_a_deprecated_route_says_so_in_headers(client: httpx.Client) -> None:
    response = client.get("/test/old")
    assert response.status_code == 200
    assert response.headers["X-API-Deprecated"] == "true"
    assert response.headers["X-API-Sunset"] == "2027-05-27"
    undated = client.get("/test/old-undated")
    assert undated.headers["X-API-Deprecated"] == "true"
    assert "X-API-Sunset" not in undated.headers
    # On its errors too.
    refused = client.get("/test/old", headers={"X-API-Version": "3"})
    assert refused.status_code == 400
    assert refused.headers["X-API-Deprecated"] == "true"


def test_a_deprecated_route_is_deprecated_in_the_openapi_document(client: httpx.Client) -> None:
    paths = client.get("/schema/openapi.json").json()["paths"]
    assert paths["/test/old"]["get"]["deprecated"] is True
    assert paths["/test/old-undated"]["get"]["deprecated"] is True
    assert not paths["/test/current"]["get"].get("deprecated", False)
