# -*- test-case-name: tests.test_clientaddr -*-
"""
Which address a request comes from.

The TCP peer is the truth unless that peer is a proxy we trust (a configured
CIDR, or any UNIX-socket peer, which is the local nginx).  Only then is
``X-Real-IP`` or ``X-Forwarded-For`` believed, and ``X-Forwarded-For`` is read
from the right, skipping trusted proxies: its left-most entries are whatever
the client typed, so they never decide who gets logged or banned.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from typing import Any

from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def _parse_ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    text = text.strip()
    if text.startswith("[") and "]" in text:
        text = text[1 : text.index("]")]
    elif text.count(":") == 1:  # IPv4 with a port
        text = text.split(":", 1)[0]
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


class ClientAddressResolver:
    """Resolves the client address of a request given the trusted proxies."""

    def __init__(self, trusted_proxies: Sequence[Network]) -> None:
        self.trusted = tuple(trusted_proxies)

    def _is_trusted(self, address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
        return any(address in network for network in self.trusted)

    def connection_key(self, peer: Any) -> str | None:
        """
        What a connection from ``peer`` counts against for MaxConnectionsPerClient:
        the IP address (an IPv6 client's /64, which one subscriber usually holds
        whole), or None for a peer that is not counted: a trusted proxy or a
        UNIX-socket peer carries many clients, which the proxy must limit.
        """
        if not isinstance(peer, (IPv4Address, IPv6Address)):
            return None
        address = _parse_ip(peer.host)
        if address is None:
            return peer.host
        if self._is_trusted(address):
            return None
        if isinstance(address, ipaddress.IPv6Address):
            return str(ipaddress.IPv6Network((address, 64), strict=False))
        return str(address)

    def resolve(self, peer: Any, headers: Any) -> str:
        """The client address as text: the peer, or what a trusted proxy says."""
        if isinstance(peer, (IPv4Address, IPv6Address)):
            peer_ip = _parse_ip(peer.host)
            if peer_ip is None or not self._is_trusted(peer_ip):
                return str(peer_ip) if peer_ip is not None else peer.host
            fallback = str(peer_ip)
        elif isinstance(peer, UNIXAddress) or peer is None:
            fallback = "unix"
        else:
            return str(peer)
        forwarded = headers.getRawHeaders(b"x-forwarded-for")
        if forwarded:
            hops = [h for line in forwarded for h in line.decode("latin-1").split(",")]
            for hop in reversed(hops):
                address = _parse_ip(hop)
                if address is None:
                    break  # garbage: stop believing anything further left
                if not self._is_trusted(address):
                    return str(address)
                fallback = str(address)
            return fallback
        real_ip = headers.getRawHeaders(b"x-real-ip")
        if real_ip:
            address = _parse_ip(real_ip[-1].decode("latin-1"))
            if address is not None:
                return str(address)
        return fallback


def request_client(request: Any, resolver: ClientAddressResolver) -> str:
    """The resolved client address of a twisted.web request (cached on it)."""
    cached = getattr(request, "_hmacfs_client", None)
    if cached is None:
        cached = resolver.resolve(request.getClientAddress(), request.requestHeaders)
        request._hmacfs_client = cached
    return cached
