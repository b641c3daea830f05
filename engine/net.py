"""Outbound HTTP with an SSRF guard: the host is resolved once, every address checked
against private, loopback, link-local and reserved ranges, and the connection is made to
the checked address (TLS still verifies the host name), so a DNS answer that changes
between check and connect cannot redirect the request. Redirects are followed by hand,
each hop checked the same way.

An IPv6 address that carries an IPv4 address (IPv4-mapped and -compatible, 6to4, Teredo,
NAT64) reaches that IPv4 host through a translator or tunnel, so the IPv4 address inside
is checked too. The whole fetch runs under one deadline: a per-read timeout would let a
server that drips a byte at a time hold the request open for ever."""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from dataclasses import dataclass
from urllib.parse import urljoin, urlsplit, urlunsplit

import httpx

from engine.errors import ErrorCode, InvalidRequest, PayloadTooLarge

MAX_REDIRECTS = 5


class BlockedAddress(InvalidRequest):
    default_code = ErrorCode.URL_NOT_ALLOWED


# NAT64: the well-known prefix carries the IPv4 address in its last 32 bits (RFC 6052);
# the local-use prefix (RFC 8215) is site-specific, never a public destination.
NAT64_WELL_KNOWN = ipaddress.IPv6Network("64:ff9b::/96")
NAT64_LOCAL_USE = ipaddress.IPv6Network("64:ff9b:1::/48")
IPV4_COMPATIBLE = ipaddress.IPv6Network("::/96")


@dataclass(frozen=True)
class FetchPolicy:
    allow_private: bool
    timeout_s: float  # total deadline of one fetch, redirects included
    max_bytes: int


Address = ipaddress.IPv4Address | ipaddress.IPv6Address


def _embedded_ipv4(address: ipaddress.IPv6Address) -> list[ipaddress.IPv4Address]:
    """The IPv4 addresses an IPv6 address routes to through a translation mechanism."""
    found = [a for a in (address.ipv4_mapped, address.sixtofour) if a is not None]
    if address.teredo is not None:
        found.extend(address.teredo)  # (server, client)
    if address in NAT64_WELL_KNOWN or address in IPV4_COMPATIBLE:
        found.append(ipaddress.IPv4Address(int(address) & 0xFFFFFFFF))
    return found


def is_public(address: Address) -> bool:
    if not address.is_global or address.is_multicast:
        return False
    if isinstance(address, ipaddress.IPv6Address):
        if address in NAT64_LOCAL_USE:
            return False
        return all(is_public(inner) for inner in _embedded_ipv4(address))
    return True


async def resolve_checked(host: str, port: int, policy: FetchPolicy) -> str:
    """An address for ``host`` that the policy allows; BlockedAddress otherwise."""
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise InvalidRequest(
            f"cannot resolve host '{host}': {exc}", code=ErrorCode.URL_UNREACHABLE
        ) from None
    addresses = [ipaddress.ip_address(info[4][0]) for info in infos]
    if not policy.allow_private:
        blocked = [str(a) for a in addresses if not is_public(a)]
        if blocked:
            raise BlockedAddress(
                f"host '{host}' resolves to a private, loopback or reserved address "
                f"({', '.join(sorted(set(blocked)))}); such URLs are refused unless "
                "allow_private_urls is set"
            )
    return str(addresses[0])


def _pinned(url: str, address: str) -> tuple[str, str, str]:
    """(URL with the host replaced by the checked address, Host header, TLS name)."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    literal = f"[{address}]" if ":" in address else address
    netloc = literal + (f":{parts.port}" if parts.port else "")
    header = host + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc)), header, host


@dataclass(frozen=True)
class Fetched:
    status_code: int
    headers: httpx.Headers
    content: bytes
    url: str


async def fetch(
    url: str,
    policy: FetchPolicy,
    *,
    method: str = "GET",
    headers: dict[str, str] | None = None,
    content: bytes | None = None,
    max_redirects: int = MAX_REDIRECTS,
) -> Fetched:
    """A checked request; the body is read up to policy.max_bytes, all within
    policy.timeout_s. Unreachable, failing or too slow: InvalidRequest. Up to
    `max_redirects` redirects are followed; with 0 a 3xx response is returned as it is."""
    try:
        async with asyncio.timeout(policy.timeout_s):
            return await _fetch(url, policy, method, headers, content, max_redirects)
    except TimeoutError:
        raise InvalidRequest(
            f"fetching '{url}' took longer than {policy.timeout_s:g} s", code=ErrorCode.URL_TIMEOUT
        ) from None
    except httpx.HTTPError as exc:
        raise InvalidRequest(
            f"fetching '{url}' failed: {type(exc).__name__}: {exc}", code=ErrorCode.URL_UNREACHABLE
        ) from None


async def _fetch(
    url: str,
    policy: FetchPolicy,
    method: str,
    headers: dict[str, str] | None,
    content: bytes | None,
    max_redirects: int,
) -> Fetched:
    # httpx's own timeout is per operation; it stays as a bound on a single connect/read.
    async with httpx.AsyncClient(timeout=policy.timeout_s, follow_redirects=False) as client:
        for _ in range(max_redirects + 1):
            parts = urlsplit(url)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise InvalidRequest(f"only http(s) URLs can be fetched, not '{url}'")
            port = parts.port or (443 if parts.scheme == "https" else 80)
            address = await resolve_checked(parts.hostname, port, policy)
            target, host_header, tls_name = _pinned(url, address)
            request = client.build_request(
                method,
                target,
                headers={**(headers or {}), "Host": host_header},
                content=content,
                extensions={"sni_hostname": tls_name},
            )
            response = await client.send(request, stream=True)
            try:
                if max_redirects and response.is_redirect and "location" in response.headers:
                    url = urljoin(url, response.headers["location"])
                    if response.status_code == 303:
                        method, content = "GET", None
                    continue
                body = bytearray()
                async for chunk in response.aiter_bytes():
                    body.extend(chunk)
                    if len(body) > policy.max_bytes:
                        raise PayloadTooLarge(
                            f"response from '{url}' exceeds {policy.max_bytes} bytes"
                        )
                return Fetched(response.status_code, response.headers, bytes(body), url)
            finally:
                await response.aclose()
    raise InvalidRequest(f"more than {max_redirects} redirects fetching '{url}'")
