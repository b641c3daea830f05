"""Who a request comes from, and over which scheme, when trusted proxies stand in front:
`trusted_proxies` (addresses or networks) may name the client in X-Forwarded-For and the
scheme in X-Forwarded-Proto; any other peer's forwarding headers are ignored."""

from __future__ import annotations

from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_address, ip_network

from litestar.types import Scope

Network = IPv4Network | IPv6Network


def parse_networks(entries: list[str]) -> tuple[Network, ...]:
    """settings.trusted_proxies as networks (a bare address is a network of one)."""
    networks: list[Network] = []
    for entry in entries:
        try:
            networks.append(ip_network(entry, strict=False))
        except ValueError as exc:
            raise ValueError(f"trusted_proxies: {entry!r} is not an IP address or network") from exc
    return tuple(networks)


def _address(text: str) -> IPv4Address | IPv6Address | None:
    try:
        return ip_address(text.strip())
    except ValueError:
        return None


def _trusted(text: str, networks: tuple[Network, ...]) -> bool:
    address = _address(text)
    return address is not None and any(address in network for network in networks)


def client_address(scope: Scope, trusted_proxies: tuple[Network, ...]) -> str:
    """The request's client: the peer, or behind trusted proxies the right-most untrusted
    hop of X-Forwarded-For (the left-most hop when every one is trusted)."""
    peer = scope.get("client")
    address = peer[0] if peer else "unknown"
    if not trusted_proxies or not _trusted(address, trusted_proxies):
        return address
    hops = [
        hop.strip()
        for name, value in scope.get("headers", ())
        if name == b"x-forwarded-for"
        for hop in value.decode("latin-1").split(",")
        if hop.strip()
    ]
    for hop in reversed(hops):
        address = hop
        if not _trusted(hop, trusted_proxies):
            break
    return address


def _peer_trusted(scope: Scope, trusted_proxies: tuple[Network, ...]) -> bool:
    peer = scope.get("client")
    return bool(trusted_proxies) and peer is not None and _trusted(peer[0], trusted_proxies)


def request_scheme(scope: Scope, trusted_proxies: tuple[Network, ...]) -> str:
    """`http` or `https` as the client used it: the connection's scheme, or behind a
    trusted proxy the one X-Forwarded-Proto names (the client-side, left-most value)."""
    scheme = str(scope.get("scheme", "http"))
    if not _peer_trusted(scope, trusted_proxies):
        return scheme
    for name, value in scope.get("headers", ()):
        if name == b"x-forwarded-proto":
            forwarded = value.decode("latin-1").split(",")[0].strip().lower()
            if forwarded in ("http", "https"):
                return forwarded
    return scheme
