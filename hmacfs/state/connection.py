# -*- test-case-name: tests.test_state -*-
"""
How a process reaches Redis: ``RedisAddr`` parsed (``RedisAddress``), the
client endpoint for it (TCP, TLS with the name checked, UNIX socket) and the
txredisapi protocol factory.  ``hmacfs.state.store.StateService`` is the one
owner of a connection built from these; nothing else opens one.
"""

from __future__ import annotations

from typing import Any, Protocol
from urllib.parse import unquote, urlsplit

import attrs
from twisted.internet import protocol

#: How long a Redis command may take before Redis counts as unreachable.
REPLY_TIMEOUT = 2.0


class RefusalListener(Protocol):
    """Told when Redis refuses AUTH or SELECT (``StateService``)."""

    def note_refused(self, why: str) -> None: ...


@attrs.frozen
class RedisAddress:
    """A parsed ``RedisAddr`` (with ``RedisPassword``/``RedisDB`` folded in)."""

    kind: str  # "tcp", "tls" or "unix"
    host: str = ""
    port: int = 6379
    path: str = ""
    db: int = 0
    username: str | None = None
    password: str | None = attrs.field(default=None, repr=False)

    @property
    def shown(self) -> str:
        """For logs: never the password."""
        if self.kind == "unix":
            return f"unix:{self.path}"
        scheme = "rediss" if self.kind == "tls" else "redis"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{scheme}://{host}:{self.port}/{self.db}"


def parse_redis_address(addr: str, password: str = "", db: int = 0) -> RedisAddress:
    """
    ``host:port``, ``[v6]:port``, ``redis://[user:password@]host[:port][/db]``,
    ``rediss://...`` (TLS) or ``unix:/path``.  A password or database in the URL
    wins over ``RedisPassword``/``RedisDB``.  (The config loader has already
    refused malformed values; this only splits good ones.)
    """
    text = addr.strip()
    pw = password or None
    if text.lower().startswith("unix:"):
        return RedisAddress(kind="unix", path=text[len("unix:") :], db=db, password=pw)
    if text.lower().startswith(("redis://", "rediss://")):
        parts = urlsplit(text)
        kind = "tls" if parts.scheme.lower() == "rediss" else "tcp"
        username = unquote(parts.username) if parts.username else None
        if parts.password is not None:
            pw = unquote(parts.password)
        path = parts.path.strip("/")
        return RedisAddress(
            kind=kind,
            host=parts.hostname or "localhost",
            port=parts.port or 6379,
            db=int(path) if path else db,
            username=username,
            password=pw,
        )
    host, _, port = text.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    return RedisAddress(kind="tcp", host=host, port=int(port), db=db, password=pw)


def redis_endpoint(reactor: Any, address: RedisAddress, connect_timeout: float = 5.0) -> Any:
    """The client endpoint for an address; TLS verifies the server name (service-identity)."""
    from twisted.internet.endpoints import HostnameEndpoint, UNIXClientEndpoint, wrapClientTLS

    if address.kind == "unix":
        return UNIXClientEndpoint(reactor, address.path, timeout=connect_timeout)
    endpoint = HostnameEndpoint(reactor, address.host, address.port, timeout=connect_timeout)
    if address.kind == "tls":
        from twisted.internet.ssl import optionsForClientTLS

        return wrapClientTLS(optionsForClientTLS(address.host), endpoint)
    return endpoint


class RedisFactory(protocol.Factory):
    """Builds txredisapi protocols that run on our reactor and never stop retrying."""

    noisy = False
    isLazy = True

    def __init__(self, reactor: Any, address: RedisAddress, service: RefusalListener) -> None:
        self.reactor = reactor
        self.address = address
        self.service = service

    def buildProtocol(self, addr: Any) -> Any:
        import txredisapi

        proto = txredisapi.RedisProtocol(
            charset="utf-8",
            replyTimeout=REPLY_TIMEOUT,
            password=self.address.password,
            dbid=self.address.db or None,
            convertNumbers=False,
            username=self.address.username,
        )
        proto.factory = self
        proto.callLater = self.reactor.callLater
        return proto

    # txredisapi calls these when AUTH or SELECT fails.  The connection is
    # dropped; our ClientService keeps retrying, the operator may fix Redis.
    def stopTrying(self) -> None:
        pass

    def connectionError(self, why: str) -> None:
        self.service.note_refused(why)


__all__ = ["REPLY_TIMEOUT", "RedisAddress", "RedisFactory", "parse_redis_address", "redis_endpoint"]
