# -*- test-case-name: tests.test_config -*-
"""
Listen addresses to Twisted server endpoint descriptions, checked without binding.

Go-style ":8080", "[::1]:8080" or a socket path become "tcp:…" / "unix:…"
descriptions; a description given as-is is parsed by Twisted on a dry-run
reactor (no socket opened, the global reactor not installed).
"""

from __future__ import annotations

import ipaddress
import os
import re
from pathlib import Path
from typing import Any

from twisted.internet.endpoints import (
    SSL4ServerEndpoint,
    TCP4ServerEndpoint,
    TCP6ServerEndpoint,
    serverFromString,
)
from twisted.internet.interfaces import (
    IReactorPluggableNameResolver,
    IReactorSSL,
    IReactorTCP,
)
from twisted.internet.protocol import Factory
from zope.interface import implementer

from hmacfs.config.error import ConfigError

ENDPOINT_PREFIXES = ("tcp:", "tcp6:", "unix:", "ssl:", "systemd:")
LISTEN_FORMS = (
    'a port ("8080" or ":8080"), "IPv4:port", "[IPv6]:port", a socket path when '
    "UnixSocket = true, or a Twisted endpoint starting with " + ", ".join(ENDPOINT_PREFIXES)
)
_MAX_UNIX_PATH = 107  # Linux sun_path holds 108 bytes including the terminating NUL.
_HOST_PORT = re.compile(r"(?:\[(?P<v6>[^\]]+)\]|(?P<host>[^:\[\]/]*)):(?P<port>[0-9]+)")


#: Listen queue length for the address forms we translate (Twisted's default is
#: 50: a burst of mobile clients reconnecting overflows it; nginx uses 511).
LISTEN_BACKLOG = 511


def listen_to_endpoint(
    value: str,
    *,
    unix_socket: bool,
    socket_mode: int,
    key: str,
    base_dir: Path | None = None,
) -> str:
    """
    Turn a Go-style listen address into a Twisted server endpoint description.

    C{":8080"} and C{"8080"} listen on every IPv4 interface, C{"127.0.0.1:8080"}
    and C{"[::1]:8080"} on one address (C{"localhost"} means 127.0.0.1, other
    host names are refused rather than resolved at start).  With
    C{unix_socket} the value is a socket path, relative to C{base_dir} (the
    current directory if None).  A value that already is an endpoint
    description (C{tcp:}, C{tcp6:}, C{unix:}, C{ssl:}, C{systemd:}) is used
    as-is, after checking that Twisted can parse it; its relative paths stay
    relative to the process's working directory, as Twisted reads them.
    """
    text = value.strip()
    if text.startswith(ENDPOINT_PREFIXES):
        _check_endpoint(text, key)
        return text
    if unix_socket:
        return _unix_endpoint(value, text, socket_mode, key, base_dir or Path.cwd())
    host_port = split_host_port(text)
    if host_port is None:
        if "/" in text:
            problem = "looks like a socket path, but UnixSocket is false"
        elif text.count(":") > 1:
            problem = "looks like an IPv6 address without [brackets] around it"
        else:
            problem = "is not a listen address"
        raise ConfigError(key, value, LISTEN_FORMS, problem)
    host, port_text = host_port
    port = int(port_text)
    if port > 65535:
        raise ConfigError(key, value, LISTEN_FORMS, "has a port above 65535")
    if not host:
        return f"tcp:port={port}:backlog={LISTEN_BACKLOG}"
    if host.lower() == "localhost":
        host = "127.0.0.1"
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        raise ConfigError(
            key, value, LISTEN_FORMS, "does not name an IP address (only localhost is looked up)"
        ) from None
    if address.version == 4:
        return f"tcp:port={port}:interface={address}:backlog={LISTEN_BACKLOG}"
    return f"tcp6:port={port}:interface={quote_argument(str(address))}:backlog={LISTEN_BACKLOG}"


def split_host_port(text: str) -> tuple[str, str] | None:
    """Split C{"host:port"}, C{"[v6]:port"}, C{":port"} or C{"port"}; None if it is none of them."""
    if text.isascii() and text.isdigit():
        return "", text
    match = _HOST_PORT.fullmatch(text)
    if match is None:
        return None
    return match.group("v6") or match.group("host") or "", match.group("port")


def quote_argument(argument: str) -> str:
    """
    Escape an argument for Twisted's endpoint parser.

    Like C{quoteStringArgument}, plus C{=}: in a positional argument an
    unescaped C{=} would turn it into a keyword.
    """
    return argument.replace("\\", "\\\\").replace(":", "\\:").replace("=", "\\=")


def _unix_endpoint(value: str, text: str, mode: int, key: str, base_dir: Path) -> str:
    allowed = f"a UNIX socket path of at most {_MAX_UNIX_PATH} bytes"
    if not text or "\0" in text:
        raise ConfigError(key, value, allowed, "is not a socket path")
    path = Path(text) if Path(text).is_absolute() else base_dir / text
    if len(os.fsencode(str(path))) > _MAX_UNIX_PATH:
        raise ConfigError(key, str(path), allowed, "is too long for a UNIX socket")
    return f"unix:{quote_argument(str(path))}:mode={mode:o}:lockfile=1:backlog={LISTEN_BACKLOG}"


@implementer(IReactorTCP, IReactorSSL, IReactorPluggableNameResolver)
class DryRunReactor:
    """
    What the endpoint parsers get instead of a reactor: it notes the ports a
    listen would bind and binds nothing.

    A description is checked with public API only (``serverFromString``,
    ``clientFromString``, ``IStreamServerEndpoint.listen``) and without side
    effects: the global reactor is not imported (that would install the
    default one under an application that embeds hmacfs and wants another),
    no socket is opened, and ``twisted.internet.testing`` (a test fake that
    pulls in trial and unittest) stays out of the daemon.  The parsers only
    store the reactor; HostnameEndpoint (``tls:``) also asks for its
    ``nameResolver``.
    """

    nameResolver: Any = None

    def __init__(self) -> None:
        self.ports: list[int] = []

    def installNameResolver(self, resolver: Any) -> Any:
        previous, self.nameResolver = self.nameResolver, resolver
        return previous

    def listenTCP(self, port: int, factory: Any, backlog: int = 50, interface: str = "") -> Any:
        self.ports.append(port)

    def listenSSL(
        self, port: int, factory: Any, contextFactory: Any, backlog: int = 50, interface: str = ""
    ) -> Any:
        self.ports.append(port)

    # A dry run never connects: the interface's connect methods only raise.
    def connectTCP(self, *args: Any, **kwargs: Any) -> Any:  # pragma: no cover
        raise NotImplementedError("a dry run connects nowhere")

    connectSSL = connectTCP


def _check_endpoint(text: str, key: str) -> None:
    allowed = "a Twisted server endpoint description, e.g. tcp:port=8080:interface=127.0.0.1"
    reactor = DryRunReactor()
    try:
        endpoint = serverFromString(reactor, text)
    except Exception as exc:
        if text.startswith("systemd:") and isinstance(exc, (IndexError, KeyError)):
            # Twisted looks the descriptor up in this process's LISTEN_FDS; a config
            # checked outside the systemd unit legitimately has none.
            _check_systemd_domain(text, key, allowed)
            return
        reason = str(exc) or type(exc).__name__
        raise ConfigError(key, text, allowed, f"cannot be parsed by Twisted ({reason})") from exc
    # Twisted only notices port 70000 when binding: listen on the dry run to see
    # the port.  Only on the TCP endpoints, whose listen merely calls the reactor
    # (an adopted systemd endpoint closes its descriptor when it listens).
    if isinstance(endpoint, (TCP4ServerEndpoint, TCP6ServerEndpoint, SSL4ServerEndpoint)):
        failures: list[Any] = []
        endpoint.listen(Factory()).addErrback(failures.append)  # type: ignore[no-untyped-call]
        if failures:  # pragma: no cover - the dry run's listen cannot fail
            failures[0].raiseException()
        if any(not 0 <= port <= 65535 for port in reactor.ports):
            raise ConfigError(key, text, allowed, "has a port outside 0..65535")


def _check_systemd_domain(text: str, key: str, allowed: str) -> None:
    # systemd forbids ':' in FileDescriptorName, so a plain split is exact here.
    parts = text.split(":")[1:]
    keywords = dict(part.split("=", 1) for part in parts if "=" in part)
    positional = [part for part in parts if "=" not in part]
    domain = keywords.get("domain", positional[0] if positional else "")
    if domain not in ("INET", "INET6", "UNIX"):
        raise ConfigError(key, text, allowed, "needs domain=INET, INET6 or UNIX")
