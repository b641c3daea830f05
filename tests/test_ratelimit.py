"""Rate limits (spec §8): per client and endpoint group, against a real server, and the
pieces that decide the group and the client."""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from api_helpers import running_server

from server.proxies import client_address, parse_networks
from server.ratelimit import group_for, parse_limits

LIMIT_HEADERS = ("X-RateLimit-Limit", "X-RateLimit-Remaining", "X-RateLimit-Reset")
MESSAGE = re.compile(r"Rate limit exceeded\. Try again in (\d+) seconds\.")
# Every group unlimited but the ones a test names.
UNLIMITED = {"models": None, "fusion": None, "rag": None, "mcp": None, "inference": None}


def _limits(**groups: str) -> dict[str, Any]:
    return {"rate_limit_enabled": True, "rate_limits": {**UNLIMITED, **groups}}


def _assert_limited(response: httpx.Response) -> int:
    """The 429 of spec §8; returns Retry-After."""
    assert response.status_code == 429, response.text
    error = response.json()["error"]
    assert error["type"] == "rate_limit_error"
    assert error["code"] == "rate_limit_exceeded"
    assert error["param"] is None
    match = MESSAGE.fullmatch(error["message"])
    assert match is not None, error["message"]
    retry_after = int(response.headers["Retry-After"])
    assert retry_after == int(match.group(1))
    assert 1 <= retry_after <= 60
    assert response.headers["X-RateLimit-Remaining"] == "0"
    return retry_after


@pytest.mark.e2e
def test_a_group_allows_its_limit_then_answers_429_with_headers(tmp_path: Path) -> None:
    with running_server(tmp_path, **_limits(models="3/minute")) as client:
        before = int(time.time())
        for remaining in (2, 1, 0):
            response = client.get("/v1/models")
            assert response.status_code == 200, response.text
            assert response.headers["X-RateLimit-Limit"] == "3"
            assert response.headers["X-RateLimit-Remaining"] == str(remaining)
            reset = int(response.headers["X-RateLimit-Reset"])
            assert before < reset <= int(time.time()) + 61  # epoch seconds, in this window
        refused = client.get("/v1/models")
        _assert_limited(refused)
        assert refused.headers["X-RateLimit-Limit"] == "3"
        assert int(refused.headers["X-RateLimit-Reset"]) >= reset
        # The refusal did not take a hit itself: still refused, still at 0.
        _assert_limited(client.get("/v1/models/some-model/info"))


@pytest.mark.e2e
def test_the_defaults_are_the_spec_table(tmp_path: Path) -> None:
    with running_server(tmp_path, rate_limit_enabled=True) as client:
        for path, limit in [
            ("/v1/models", "10"),
            ("/api/fusion/workflows", "60"),
            ("/api/rag/collections", "30"),
            ("/api/mcp/jobs", "100"),
        ]:
            response = client.get(path)
            assert response.status_code == 200, (path, response.text)
            assert response.headers["X-RateLimit-Limit"] == limit
            assert response.headers["X-RateLimit-Remaining"] == str(int(limit) - 1)


@pytest.mark.e2e
def test_groups_never_share_a_counter(tmp_path: Path) -> None:
    with running_server(tmp_path, **_limits(models="1/minute", fusion="2/minute")) as client:
        assert client.get("/v1/models").status_code == 200
        _assert_limited(client.get("/v1/models"))
        fusion = client.get("/api/fusion/workflows")
        assert fusion.status_code == 200
        assert fusion.headers["X-RateLimit-Limit"] == "2"
        assert fusion.headers["X-RateLimit-Remaining"] == "1"
        # A group set to null is not limited and has no headers.
        rag = client.get("/api/rag/collections")
        assert rag.status_code == 200
        assert not any(name in rag.headers for name in LIMIT_HEADERS)


@pytest.mark.e2e
def test_error_responses_of_a_limited_group_carry_the_headers(tmp_path: Path) -> None:
    with running_server(tmp_path, **_limits(inference="5/minute", fusion="5/minute")) as client:
        # From the handler.
        missing = client.post("/v1/embeddings", json={"model": "nope", "input": "x"})
        assert missing.status_code == 404
        assert missing.headers["X-RateLimit-Remaining"] == "4"
        # From a middleware after the limiter (the version check).
        refused = client.get("/api/fusion/workflows", headers={"X-API-Version": "7"})
        assert refused.status_code == 400
        assert refused.headers["X-RateLimit-Remaining"] == "4"


@pytest.mark.e2e
def test_health_and_metrics_are_never_limited(tmp_path: Path) -> None:
    every_group = {group: "1/minute" for group in UNLIMITED}
    with running_server(tmp_path, rate_limit_enabled=True, rate_limits=every_group) as client:
        for _ in range(3):
            for path in ("/health", "/metrics"):
                response = client.get(path)
                assert response.status_code == 200, (path, response.text)
                assert not any(name in response.headers for name in LIMIT_HEADERS)


@pytest.mark.e2e
def test_forwarded_for_is_ignored_without_a_trusted_proxy(tmp_path: Path) -> None:
    with running_server(tmp_path, **_limits(models="2/minute")) as client:
        for hop in ("10.0.0.1", "10.0.0.2"):
            response = client.get("/v1/models", headers={"X-Forwarded-For": hop})
            assert response.status_code == 200
        # Still the same client (the peer): a third address does not get a fresh counter.
        _assert_limited(client.get("/v1/models", headers={"X-Forwarded-For": "10.0.0.3"}))


@pytest.mark.e2e
def test_forwarded_for_names_the_client_behind_a_trusted_proxy(tmp_path: Path) -> None:
    settings = {**_limits(models="1/minute"), "trusted_proxies": ["127.0.0.1", "10.9.0.0/16"]}
    with running_server(tmp_path, **settings) as client:

        def get(forwarded: str) -> httpx.Response:
            return client.get("/v1/models", headers={"X-Forwarded-For": forwarded})

        assert get("203.0.113.1").status_code == 200
        assert get("203.0.113.2").status_code == 200  # another client, its own counter
        _assert_limited(get("203.0.113.1"))
        # A left-most hop is the client's own word: writing another address there does
        # not make a new client.
        _assert_limited(get("198.51.100.7, 203.0.113.1"))
        # Trusted hops (a second proxy in the trusted network) are skipped from the right.
        _assert_limited(get("203.0.113.2, 10.9.4.4"))
        assert get("203.0.113.3, 10.9.4.4").status_code == 200


@pytest.mark.e2e
def test_the_switch_turns_every_limit_off(tmp_path: Path) -> None:
    settings = {**_limits(models="1/minute"), "rate_limit_enabled": False}
    with running_server(tmp_path, **settings) as client:
        for _ in range(3):
            response = client.get("/v1/models")
            assert response.status_code == 200
            assert not any(name in response.headers for name in LIMIT_HEADERS)


@pytest.mark.unit
@pytest.mark.parametrize(
    ("path", "group"),
    [
        ("/v1/models", "models"),
        ("/v1/models/load", "models"),
        ("/v1/models/org/model/info", "models"),
        ("/api/fusion/orchestrate", "fusion"),
        ("/api/rag/query", "rag"),
        ("/api/mcp/jobs", "mcp"),
        ("/v1/chat/completions", "inference"),
        ("/v1/embeddings", "inference"),
        ("/v1/audio/transcriptions", "inference"),
        ("/v1/modelsx", None),
        ("/api/fusionist", None),
        ("/health", None),
        ("/health/ready", None),
        ("/metrics", None),
        ("/internal/diagnostics", None),
        ("/schema/openapi.json", None),
    ],
)
def test_group_for_matches_whole_path_segments(path: str, group: str | None) -> None:
    assert group_for(path) == group


@pytest.mark.unit
def test_settings_are_checked_when_the_app_is_built() -> None:
    assert parse_limits({"models": "10/minute", "rag": None}).keys() == {"models"}
    with pytest.raises(ValueError, match="unknown group"):
        parse_limits({"modles": "10/minute"})
    with pytest.raises(ValueError, match=r"rate_limits\.fusion"):
        parse_limits({"fusion": "lots"})
    with pytest.raises(ValueError, match="trusted_proxies"):
        parse_networks(["proxy.local"])


@pytest.mark.unit
def test_client_address_counts_untrusted_hops_from_the_right() -> None:
    trusted = parse_networks(["10.0.0.1", "192.168.0.0/16"])

    def scope(peer: str, *forwarded: str) -> Any:
        headers = [(b"x-forwarded-for", value.encode()) for value in forwarded]
        return {"client": (peer, 1234), "headers": headers}

    assert client_address(scope("203.0.113.9", "1.2.3.4"), trusted) == "203.0.113.9"
    assert client_address(scope("10.0.0.1"), trusted) == "10.0.0.1"
    assert client_address(scope("10.0.0.1", "1.2.3.4"), trusted) == "1.2.3.4"
    assert client_address(scope("10.0.0.1", "6.6.6.6, 1.2.3.4"), trusted) == "1.2.3.4"
    # Several headers are one list, in order.
    several = scope("10.0.0.1", "6.6.6.6", "1.2.3.4, 192.168.3.3")
    assert client_address(several, trusted) == "1.2.3.4"
    # Every hop trusted: the left-most is the best there is.
    all_trusted = scope("10.0.0.1", "192.168.1.1, 192.168.2.2")
    assert client_address(all_trusted, trusted) == "192.168.1.1"
    assert client_address(scope("10.0.0.1", "1.2.3.4"), ()) == "10.0.0.1"
    no_peer: Any = {"client": None, "headers": []}  # a Unix socket
    assert client_address(no_peer, trusted) == "unknown"


@pytest.mark.e2e
@pytest.mark.parametrize(
    ("trusted", "forwarded_proto", "status"),
    [
        (["127.0.0.1"], "https", 200),  # a TLS proxy in front: the browser's origin is https
        (["127.0.0.1"], None, 403),  # the hop is http: an https origin is another origin
        ([], "https", 403),  # any other peer's X-Forwarded-Proto is its own word
    ],
)
def test_the_origin_guard_takes_the_scheme_from_a_trusted_proxy(
    tmp_path: Path, trusted: list[str], forwarded_proto: str | None, status: int
) -> None:
    with running_server(tmp_path, trusted_proxies=trusted) as client:
        host = client.base_url.netloc.decode()
        headers = {"Origin": f"https://{host}"}
        if forwarded_proto is not None:
            headers["X-Forwarded-Proto"] = forwarded_proto
        assert client.get("/api/fusion/workflows", headers=headers).status_code == status
