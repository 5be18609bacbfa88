# -*- test-case-name: tests.test_limits,tests.test_request -*-
"""
The channel's connection limits: HeaderTimeout and MaxConnectionsPerClient.

The settings are one frozen object a site carries (and ``embed.install`` hands
to a host's Site); the open connections per client are a table per site.
Plain objects (no Twisted internals), so the counting is testable without a
channel; the channel applies them (hmacfs.http.channel).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import attrs

from hmacfs.http.clientaddr import ClientAddressResolver

__all__ = ["NO_LIMITS", "ConnectionLimits", "ConnectionTable"]


def _peer_key() -> Callable[[Any], str | None]:
    return ClientAddressResolver(()).connection_key


@attrs.frozen
class ConnectionLimits:
    """What the channel enforces per connection (0 turns a limit off)."""

    #: seconds from a request head's first byte to its end (0: no deadline)
    header_timeout: float = 0.0
    #: open connections allowed per client (0: unlimited), counted by ``key_of``
    max_per_client: int = 0
    #: what a connection from a peer counts against (an IPv6 client's /64), or
    #: None for a peer that is not counted (a trusted proxy, a UNIX-socket peer)
    key_of: Callable[[Any], str | None] = attrs.field(factory=_peer_key)


#: A site that sets no limits.
NO_LIMITS = ConnectionLimits()


class ConnectionTable:
    """Open connections by client key, for one site."""

    __slots__ = ("counts",)

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}

    def claim(self, key: str, limit: int) -> bool:
        """Count one more connection against ``key``; False (nothing counted) at ``limit``."""
        counts = self.counts
        count = counts.get(key, 0)
        if count >= limit:
            return False
        counts[key] = count + 1
        return True

    def release(self, key: str) -> None:
        """One connection counted against ``key`` closed."""
        counts = self.counts
        left = counts.get(key, 0) - 1
        if left > 0:
            counts[key] = left
        else:
            counts.pop(key, None)

    def open(self, key: str) -> int:
        """How many connections are counted against ``key``."""
        return self.counts.get(key, 0)
