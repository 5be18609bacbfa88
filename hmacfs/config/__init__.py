# -*- test-case-name: tests.test_config -*-
"""
Load and check the hmacfs configuration.

The file is flat TOML with the PascalCase keys of the Go "HMAC File Server",
so an operator can keep their old file: obsolete keys are reported and
ignored (or mapped onto their replacement) and unknown keys get a typo hint.
Every value is checked and converted exactly once, here, into a frozen
L{Config} of seconds, bytes, paths and Twisted endpoint descriptions, so the
rest of the server never parses a string.  The first bad value stops the load
with a L{ConfigError} naming the key, the value and what would be accepted.
The secrets (C{Secret}, the file behind C{SecretFile}, C{RedisPassword},
C{ComponentSecret}) never appear in an error, a warning, C{repr(config)} or L{Config.redacted}.
"""

from __future__ import annotations

import difflib
import ipaddress
import math
import os
import re
import tomllib
from collections.abc import Callable, Mapping
from datetime import date, time
from fractions import Fraction
from pathlib import Path
from typing import Any

import attrs
from twisted.internet.endpoints import (
    SSL4ServerEndpoint,
    TCP4ServerEndpoint,
    TCP6ServerEndpoint,
    clientFromString,
    serverFromString,
)
from twisted.internet.interfaces import IReactorPluggableNameResolver, IReactorSSL, IReactorTCP
from twisted.internet.protocol import Factory
from zope.interface import implementer


class _Shown:
    """A stand-in for a value that must not be printed; its repr is its text."""

    def __init__(self, text: str) -> None:
        self._text = text

    def __repr__(self) -> str:
        return self._text


REDACTED = _Shown("<redacted>")


class ConfigError(Exception):
    """
    A configuration value was rejected.

    The message always reads C{"<Key>: <repr(value)> <problem> (allowed:
    <what>)"} so an operator sees what to change without reading code.
    C{source} names the file (or C{"<config>"}) once L{parse_config} has seen
    the error.
    """

    def __init__(
        self, key: str, value: object, allowed: str, problem: str = "is not valid"
    ) -> None:
        super().__init__(key, value, allowed, problem)
        self.key = key
        self.value = value
        self.allowed = allowed
        self.problem = problem
        self.source: str | None = None

    def __str__(self) -> str:
        return f"{self.key}: {self.value!r} {self.problem} (allowed: {self.allowed})"


# --- value parsers shared with other modules ------------------------------------------------

DURATION_FORMS = (
    "a duration such as 45s, 90m, 24h, 30d, 1w, 1y or 1h30m "
    "(units ms, s, m, h, d, w = 7d, y = 365d; a bare number means seconds)"
)
_DURATION_UNITS = {
    "ms": Fraction(1, 1000),
    "s": Fraction(1),
    "m": Fraction(60),
    "h": Fraction(3600),
    "d": Fraction(86400),
    "w": Fraction(7 * 86400),
    "y": Fraction(365 * 86400),
}
_NUMBER = r"[0-9]+(?:\.[0-9]+)?"
_BARE_NUMBER = re.compile(rf"\s*{_NUMBER}\s*")
_DURATION = re.compile(rf"\s*(?:{_NUMBER}\s*(?:ms|[smhdwy])\s*)+", re.IGNORECASE)
_DURATION_PART = re.compile(rf"({_NUMBER})\s*(ms|[smhdwy])", re.IGNORECASE)


def parse_duration(value: str | float, *, key: str) -> float:
    """
    Turn C{"1d12h"}, C{"90m"}, C{45} or C{"45"} into seconds.

    Units may be combined, in any order and any case, with optional spaces;
    a bare number (TOML integer, float or digit string) means seconds, which
    is what the Go server's plain integers meant.
    """
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise _wrong_type(key, value, DURATION_FORMS)
    if isinstance(value, str):
        if _BARE_NUMBER.fullmatch(value):
            seconds = float(value)
        elif _DURATION.fullmatch(value):
            seconds = float(
                sum(
                    Fraction(number) * _DURATION_UNITS[unit.lower()]
                    for number, unit in _DURATION_PART.findall(value)
                )
            )
        else:
            raise ConfigError(key, value, DURATION_FORMS, "is not a duration")
    else:
        seconds = float(value)
    if not math.isfinite(seconds):
        raise ConfigError(key, value, DURATION_FORMS, "is not a duration")
    if seconds < 0:
        raise ConfigError(key, value, DURATION_FORMS, "is negative")
    return seconds


SIZE_FORMS = (
    'a size such as 65536, "64KiB", "500MB" or "10GiB" '
    "(KB/MB/GB/TB = 1000^n; KiB/MiB/GiB/TiB and bare K/M/G/T = 1024^n)"
)
_SIZE_UNITS = {"": 1, "b": 1}
for _power, _letter in enumerate("kmgtp", start=1):
    _SIZE_UNITS[_letter] = 1024**_power
    _SIZE_UNITS[_letter + "ib"] = 1024**_power
    _SIZE_UNITS[_letter + "b"] = 1000**_power
_SIZE = re.compile(rf"\s*({_NUMBER})\s*([a-z]*)\s*", re.IGNORECASE)


def parse_size(value: str | int, *, key: str) -> int:
    """
    Turn C{"10GiB"}, C{"500 MB"}, C{65536} or C{"65536"} into bytes.

    Units follow the common convention: KB, MB, GB, TB (and PB) are powers
    of 1000; KiB, MiB, GiB, TiB and the bare letters K, M, G, T are powers of
    1024, because C{"64K"} in the Go configs meant 65536.  Units are
    case-insensitive and may be separated by a space.  A fractional result
    (C{"1.5KB"} is exact, C{"0.3KiB"} is not) is rounded down to whole bytes.
    """
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise _wrong_type(key, value, SIZE_FORMS)
    if isinstance(value, int):
        if value < 0:
            raise ConfigError(key, value, SIZE_FORMS, "is negative")
        return value
    match = _SIZE.fullmatch(value)
    if match is None or match.group(2).lower() not in _SIZE_UNITS:
        raise ConfigError(key, value, SIZE_FORMS, "is not a size")
    return int(Fraction(match.group(1)) * _SIZE_UNITS[match.group(2).lower()])


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
    host_port = _split_host_port(text)
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
    return f"tcp6:port={port}:interface={_quote(str(address))}:backlog={LISTEN_BACKLOG}"


def _split_host_port(text: str) -> tuple[str, str] | None:
    """Split C{"host:port"}, C{"[v6]:port"}, C{":port"} or C{"port"}; None if it is none of them."""
    if text.isascii() and text.isdigit():
        return "", text
    match = _HOST_PORT.fullmatch(text)
    if match is None:
        return None
    return match.group("v6") or match.group("host") or "", match.group("port")


def _quote(argument: str) -> str:
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
    return f"unix:{_quote(str(path))}:mode={mode:o}:lockfile=1:backlog={LISTEN_BACKLOG}"


@implementer(IReactorTCP, IReactorSSL, IReactorPluggableNameResolver)
class _DryRunReactor:
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

    def listenTCP(self, port: int, factory: Any, backlog: int = 50, interface: str = "") -> None:
        self.ports.append(port)

    def listenSSL(
        self, port: int, factory: Any, contextFactory: Any, backlog: int = 50, interface: str = ""
    ) -> None:
        self.ports.append(port)

    def connectTCP(self, *args: Any, **kwargs: Any) -> None:  # pragma: no cover - never connects
        raise NotImplementedError("a dry run connects nowhere")

    connectSSL = connectTCP


def _check_endpoint(text: str, key: str) -> None:
    allowed = "a Twisted server endpoint description, e.g. tcp:port=8080:interface=127.0.0.1"
    reactor = _DryRunReactor()
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
        endpoint.listen(Factory()).addErrback(failures.append)
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


# --- per-key converters -----------------------------------------------------------------------


@attrs.define
class _Context:
    """What a converter needs besides the value: the base of relative paths, the warnings."""

    base_dir: Path
    warnings: list[str]
    #: False for ``hmacfs check-config``: check StoreDir could be created, create nothing
    create_store_dir: bool = True


_Converter = Callable[[object, str, _Context], object]


def _toml_type(value: object) -> str:
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a float"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, (list, tuple)):
        return "an array"
    if isinstance(value, Mapping):
        return "a table"
    if isinstance(value, (date, time)):
        return "a date/time"
    return f"a {type(value).__name__}"


def _wrong_type(key: str, value: object, allowed: str) -> ConfigError:
    return ConfigError(key, value, allowed, f"is {_toml_type(value)}")


def _boolean(value: object, key: str, ctx: _Context) -> bool:
    if not isinstance(value, bool):
        raise _wrong_type(key, value, "true or false, without quotes")
    return value


def _integer(minimum: int, maximum: int | None = None) -> _Converter:
    if maximum is None:
        allowed = f"an integer >= {minimum}"
    else:
        allowed = f"an integer from {minimum} to {maximum}"

    def convert(value: object, key: str, ctx: _Context) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise _wrong_type(key, value, allowed)
        if value < minimum or (maximum is not None and value > maximum):
            raise ConfigError(key, value, allowed, "is out of range")
        return value

    return convert


def _text(value: object, key: str, allowed: str) -> str:
    if not isinstance(value, str):
        raise _wrong_type(key, value, allowed)
    return value


def _string(value: object, key: str, ctx: _Context) -> str:
    return _text(value, key, "a string")


def _duration(minimum: float = 0.0, *, exclusive: bool = False) -> _Converter:
    bound = f"greater than {minimum:g}s" if exclusive else f"of at least {minimum:g}s"

    def convert(value: object, key: str, ctx: _Context) -> float:
        seconds = parse_duration(value, key=key)  # type: ignore[arg-type]
        if seconds < minimum or (exclusive and seconds == minimum):
            raise ConfigError(key, value, f"a duration {bound}", "is too short")
        return seconds

    return convert


def _format_size(size: int) -> str:
    for unit, factor in (("TiB", 1024**4), ("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if size >= factor and size % factor == 0:
            return f"{size // factor}{unit}"
    return f"{size} bytes"


def _size(minimum: int = 0, maximum: int | None = None) -> _Converter:
    if maximum is None:
        allowed = f"a size of at least {_format_size(minimum)}"
    else:
        allowed = f"a size from {_format_size(minimum)} to {_format_size(maximum)}"

    def convert(value: object, key: str, ctx: _Context) -> int:
        size = parse_size(value, key=key)  # type: ignore[arg-type]
        if size < minimum or (maximum is not None and size > maximum):
            raise ConfigError(key, value, allowed, "is out of range")
        return size

    return convert


def _listen_text(value: object, key: str, ctx: _Context) -> str:
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise _wrong_type(key, value, LISTEN_FORMS)
    text = str(value).strip()
    if not text:
        raise ConfigError(key, value, LISTEN_FORMS, "is empty")
    return text


def _socket_mode(value: object, key: str, ctx: _Context) -> int:
    """
    Read a permission mode.  A string is octal (C{"660"}, C{"0660"}, C{"0o660"});
    an integer is taken as TOML gives it, so C{0o660} works and a bare
    C{660} (which is 0o1224) is refused with a hint instead of misread.
    """
    allowed = 'an octal string like "660", or a TOML octal integer like 0o660'
    if isinstance(value, str) and re.fullmatch(r"(?:0o?)?[0-7]{1,4}", value.strip(), re.IGNORECASE):
        mode = int(value.strip(), 8)
    elif isinstance(value, int) and not isinstance(value, bool):
        mode = value
    else:
        raise ConfigError(key, value, allowed, f"is not a permission mode ({_toml_type(value)})")
    if not 0 <= mode <= 0o777:
        raise ConfigError(key, value, allowed, "is not a permission mode (above 0o777)")
    return mode


def _under(base_dir: Path, text: str) -> Path:
    path = Path(text)
    return path if path.is_absolute() else base_dir / path


def _optional_path(value: object, key: str, ctx: _Context) -> Path | None:
    text = _text(value, key, 'a file path, or "" for none')
    return _under(ctx.base_dir, text) if text else None


def _store_dir(value: object, key: str, ctx: _Context) -> Path:
    allowed = "a writable directory (created with its parents if missing)"
    text = _text(value, key, allowed)
    if not text.strip():
        raise ConfigError(key, value, allowed, "is empty")
    path = _under(ctx.base_dir, text).resolve()
    if path.exists() and not path.is_dir():
        raise ConfigError(key, str(path), allowed, "is not a directory")
    if not ctx.create_store_dir and not path.exists():
        _check_creatable(path, key, allowed)  # the server creates it at start
        return path
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise ConfigError(
            key, str(path), allowed, f"does not exist and cannot be created ({reason})"
        ) from exc
    if not os.access(path, os.W_OK | os.X_OK):
        raise ConfigError(key, str(path), allowed, "is not writable by this user")
    return path


def _check_creatable(path: Path, key: str, allowed: str) -> None:
    """Refuse a missing directory whose nearest existing ancestor would not let us create it."""
    ancestor = path.parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise ConfigError(
            key, str(path), allowed, f"does not exist and cannot be created ({str(ancestor)!r} is not a directory)"
        )
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise ConfigError(
            key, str(path), allowed,
            f"does not exist and cannot be created ({str(ancestor)!r} is not writable by this user)",
        )


_SEGMENT = re.compile(r"[A-Za-z0-9._~-]+")


def _upload_subdir(value: object, key: str, ctx: _Context) -> str:
    allowed = (
        'a URL path like "upload" or "files/xmpp" made of A-Z a-z 0-9 . _ ~ -, or "" for the root'
    )
    normalized = _text(value, key, allowed).strip("/")
    if not normalized:
        return ""
    for segment in normalized.split("/"):
        if segment in ("", ".", "..") or not _SEGMENT.fullmatch(segment):
            raise ConfigError(key, value, allowed, f"has a bad path segment {segment!r}")
    return normalized


_LOG_LEVELS = {
    "debug": "debug",
    "info": "info",
    "warn": "warn",
    "warning": "warn",
    "error": "error",
}


def _log_level(value: object, key: str, ctx: _Context) -> str:
    allowed = "debug, info, warn (or warning), error"
    level = _LOG_LEVELS.get(_text(value, key, allowed).strip().lower())
    if level is None:
        raise ConfigError(key, value, allowed, "is not a log level")
    return level


def _log_file(value: object, key: str, ctx: _Context) -> Path | None:
    allowed = 'a file in an existing directory, or "" for standard output'
    path = _optional_path(value, key, ctx)
    if path is None:
        return None
    if path.is_dir():
        raise ConfigError(key, str(path), allowed, "is a directory")
    if not path.parent.is_dir():
        raise ConfigError(key, str(path), allowed, "is in a directory that does not exist")
    return path


def _num_cores(value: object, key: str, ctx: _Context) -> int:
    allowed = '"auto" or a whole number >= 1'
    if isinstance(value, str):
        text = value.strip().lower()
        if text == "auto":
            return os.cpu_count() or 1
        if not (text.isascii() and text.isdigit()):
            raise ConfigError(key, value, allowed, "is not a core count")
        cores = int(text)
    elif isinstance(value, int) and not isinstance(value, bool):
        cores = value
    else:
        raise _wrong_type(key, value, allowed)
    if cores < 1:
        raise ConfigError(key, value, allowed, "is out of range")
    return cores


REDIS_FORMS = (
    '"host:port", "[IPv6]:port", "redis://[user:password@]host[:port][/db]", "rediss://...", '
    '"unix:/path/to/redis.sock", or "" for the embedded state store'
)
_HOSTNAME = re.compile(
    r"(?=.{1,253}$)[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
    r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*\.?"
)


def _mask_password(text: str) -> str:
    """Hide the password of a C{scheme://user:password@host} address (it may itself hold C{@})."""
    scheme, separator, rest = text.partition("://")
    if not separator or "@" not in rest:
        return text
    userinfo, _, hostpart = rest.rpartition("@")
    if ":" not in userinfo:
        return text
    return f"{scheme}://{userinfo.split(':', 1)[0]}:***@{hostpart}"


def _redis_addr(value: object, key: str, ctx: _Context) -> str:
    text = _text(value, key, REDIS_FORMS).strip()
    if not text:
        return ""
    shown = _mask_password(text)
    lowered = text.lower()
    if lowered.startswith(("redis://", "rediss://")):
        rest = text.partition("://")[2]
        hostport = rest.rpartition("@")[2].partition("/")[0]
        path = rest.rpartition("@")[2].partition("/")[2]
        if path and not (path.isascii() and path.isdigit()):
            raise ConfigError(key, shown, REDIS_FORMS, "has a path that is not a database number")
        _check_host_port(hostport, key, shown, default_port=True)
        return text
    if lowered.startswith("unix:"):
        if not text[len("unix:") :].startswith("/"):
            raise ConfigError(key, shown, REDIS_FORMS, "needs an absolute socket path")
        return text
    _check_host_port(text, key, shown, default_port=False)
    return text


def _check_host_port(text: str, key: str, shown: str, *, default_port: bool) -> None:
    host_port = _split_host_port(text)
    if host_port is None and default_port:
        host_port = (text[1:-1] if text.startswith("[") and text.endswith("]") else text), "6379"
    if host_port is None or not host_port[0]:
        raise ConfigError(key, shown, REDIS_FORMS, "is not host:port")
    host, port = host_port
    if not 1 <= int(port) <= 65535:
        raise ConfigError(key, shown, REDIS_FORMS, "has a port outside 1..65535")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        if not _HOSTNAME.fullmatch(host):
            raise ConfigError(key, shown, REDIS_FORMS, "has a host that is not valid") from None


def _networks(
    value: object, key: str, ctx: _Context
) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    allowed = 'an array of IP addresses or CIDR networks, like ["127.0.0.1/32", "::1/128"]'
    if not isinstance(value, (list, tuple)):
        raise _wrong_type(key, value, allowed)
    networks = []
    for item in value:
        if not isinstance(item, str):
            raise _wrong_type(key, item, allowed)
        try:
            networks.append(ipaddress.ip_network(item.strip(), strict=False))
        except ValueError:
            raise ConfigError(key, item, allowed, "is not an IP address or network") from None
    return tuple(networks)


# --- the XEP-0114 component (hmacfs.xmpp.component) ------------------------------------------------

_JID_DOMAIN_FORMS = 'a domain such as "upload.example.org" (no user part, no resource)'


def _component_jid(value: object, key: str, ctx: _Context) -> str:
    text = _text(value, key, _JID_DOMAIN_FORMS + ', or "" to run no component').strip().lower()
    if text and (not _HOSTNAME.fullmatch(text) or text.endswith(".")):
        raise ConfigError(key, value, _JID_DOMAIN_FORMS, "is not a domain")
    return text


COMPONENT_SERVER_FORMS = (
    '"host:port" of the XMPP server\'s component port, such as "127.0.0.1:5347" or '
    '"[::1]:5347", or a Twisted client endpoint such as "tcp:host=xmpp.example.org:port=5347"'
)


def _component_server(value: object, key: str, ctx: _Context) -> str:
    """C{"host:port"} (or a client endpoint description) to a client endpoint description."""
    text = _text(value, key, COMPONENT_SERVER_FORMS).strip()
    if text.startswith(("tcp:", "unix:", "ssl:", "tls:")):
        try:
            clientFromString(_DryRunReactor(), text)
        except Exception as exc:
            reason = str(exc) or type(exc).__name__
            raise ConfigError(
                key, text, COMPONENT_SERVER_FORMS, f"cannot be parsed by Twisted ({reason})"
            ) from exc
        return text
    host_port = _split_host_port(text)
    if host_port is None or not host_port[0]:
        raise ConfigError(key, value, COMPONENT_SERVER_FORMS, "is not host:port")
    host, port = host_port[0], int(host_port[1])
    if not 1 <= port <= 65535:
        raise ConfigError(key, value, COMPONENT_SERVER_FORMS, "has a port outside 1..65535")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        if not _HOSTNAME.fullmatch(host):
            raise ConfigError(key, value, COMPONENT_SERVER_FORMS, "has a host that is not valid") from None
    return f"tcp:host={_quote(host)}:port={port}"


PUBLIC_URL_FORMS = (
    'the https URL of hmacfs\'s root as clients reach it, without a path, '
    'such as "https://upload.example.org" or "https://upload.example.org:5443"'
)


def _public_url(value: object, key: str, ctx: _Context) -> str:
    """
    The scheme, host and port clients use; slots go under C{/<UploadSubDir>/}
    there.  A path is refused because C{v3} signs the path hmacfs itself sees.
    """
    text = _text(value, key, PUBLIC_URL_FORMS + ', or ""').strip()
    if not text:
        return ""
    from urllib.parse import urlsplit

    try:
        parts = urlsplit(text)
        parts.port  # noqa: B018 - raises ValueError for a port that is not a number
    except ValueError:
        raise ConfigError(key, value, PUBLIC_URL_FORMS, "is not a URL") from None
    if parts.scheme not in ("https", "http") or not parts.hostname:
        raise ConfigError(key, value, PUBLIC_URL_FORMS, "is not an http(s) URL")
    if parts.path not in ("", "/") or parts.query or parts.fragment or parts.username:
        raise ConfigError(key, value, PUBLIC_URL_FORMS, "has a path, query or user part")
    if parts.scheme == "http":
        try:
            loopback = ipaddress.ip_address(parts.hostname).is_loopback
        except ValueError:
            loopback = parts.hostname == "localhost"
        if not loopback:
            ctx.warnings.append(
                f"PublicURL {text!r} is not https: XEP-0363 requires https and clients "
                "such as Gajim refuse plain http slots"
            )
    return text.rstrip("/")


UPLOAD_ACCESS_FORMS = (
    'an array of domains ("example.org": all its users) and bare JIDs '
    '("alice@example.org"), or ["*"] for anyone'
)
_LOCALPART = re.compile(r"[^\s@/\"&'<>:]{1,1023}")


def _upload_access(value: object, key: str, ctx: _Context) -> tuple[str, ...]:
    if not isinstance(value, (list, tuple)):
        raise _wrong_type(key, value, UPLOAD_ACCESS_FORMS)
    entries = []
    for item in value:
        if not isinstance(item, str):
            raise _wrong_type(key, item, UPLOAD_ACCESS_FORMS)
        entry = item.strip().lower()
        if entry != "*":
            local, at, domain = entry.rpartition("@")
            if (
                not _HOSTNAME.fullmatch(domain)
                or domain.endswith(".")
                or (at and not _LOCALPART.fullmatch(local))
            ):
                raise ConfigError(key, item, UPLOAD_ACCESS_FORMS, "is not a domain or bare JID")
        entries.append(entry)
    return tuple(entries)


def _check_component(values: dict[str, object]) -> None:
    """With C{ComponentJID} set, the secret and the public URL are required."""
    if not values["component_jid"]:
        return
    if not values["component_secret"]:
        raise ConfigError(
            "ComponentSecret", "", "the component password set on the XMPP server", "is empty"
        )
    if not values["public_url"]:
        raise ConfigError(
            "PublicURL", "", PUBLIC_URL_FORMS, "is empty, but ComponentJID is set"
        )


# --- the key table ----------------------------------------------------------------------------


@attrs.frozen
class _Key:
    """One TOML key: the attribute it fills, its default as TOML would hold it, its converter."""

    name: str
    attr: str
    default: object
    convert: _Converter
    sensitive: bool = False


# In this order: the first bad key in this order is the one reported.
_KEYS: tuple[_Key, ...] = (
    _Key("ListenPort", "listen_raw", ":8080", _listen_text),
    _Key("UnixSocket", "unix_socket", False, _boolean),
    _Key("SocketMode", "socket_mode", "660", _socket_mode),
    _Key("Secret", "secret", "", _string, sensitive=True),
    _Key("SecretFile", "secret_file", "", _optional_path),
    _Key("StoreDir", "store_dir", "./data", _store_dir),
    _Key("UploadSubDir", "upload_subdir", "upload", _upload_subdir),
    _Key("LogLevel", "log_level", "info", _log_level),
    _Key("LogFile", "log_file", "", _log_file),
    _Key("MaxRetries", "max_retries", 5, _integer(0)),
    _Key("RetryDelay", "retry_delay", 2, _duration()),
    _Key("EnableGetRetries", "enable_get_retries", True, _boolean),
    _Key("BlockAfterFails", "block_after_fails", 5, _integer(1)),
    _Key("BlockDuration", "block_duration", "300s", _duration()),
    _Key("AutoUnban", "auto_unban", True, _boolean),
    _Key("AutoBanTime", "auto_ban_time", "600s", _duration()),
    _Key("DeleteFiles", "delete_files", False, _boolean),
    _Key("DeleteFilesAfterPeriod", "delete_files_after_period", "1y", _duration(0, exclusive=True)),
    _Key("NumCores", "num_cores", "auto", _num_cores),
    _Key("ReaskSecretEnabled", "reask_secret_enabled", False, _boolean),
    _Key("ReaskSecretInterval", "reask_secret_interval", "1h", _duration(1)),
    _Key("MetricsEnabled", "metrics_enabled", False, _boolean),
    _Key("MetricsPort", "metrics_listen", ":9090", _listen_text),
    _Key("ChecksumVerification", "checksum_verification", False, _boolean),
    _Key("RetentionPolicyEnabled", "retention_policy_enabled", False, _boolean),
    _Key("MaxRetentionSize", "max_retention_size", "10GiB", _size(1)),
    _Key("MaxRetentionTime", "max_retention_time", "30d", _duration(0, exclusive=True)),
    _Key("RedisAddr", "redis_addr", "", _redis_addr),
    _Key("RedisPassword", "redis_password", "", _string, sensitive=True),
    _Key("RedisDB", "redis_db", 0, _integer(0, 15)),
    _Key("ResumeTTL", "resume_ttl", "600s", _duration(1)),
    _Key("ReadTimeout", "read_timeout", "2m", _duration(0, exclusive=True)),
    _Key("WriteTimeout", "write_timeout", "2m", _duration(0, exclusive=True)),
    _Key("HeaderTimeout", "header_timeout", "30s", _duration()),
    _Key("MaxConnectionsPerClient", "max_connections_per_client", 64, _integer(0)),
    _Key("BufferSize", "buffer_size", 65536, _size(4 * 1024, 16 * 1024**2)),
    _Key("MaxUploadSize", "max_upload_size", 0, _size()),
    _Key("MinFreeBytes", "min_free_bytes", "100MiB", _size()),
    _Key("TrustedProxies", "trusted_proxies", ["127.0.0.1/32", "::1/128"], _networks),
    _Key("ClockSkew", "clock_skew", "30s", _duration()),
    _Key("DrainTimeout", "drain_timeout", "30s", _duration()),
    _Key("AccessLog", "log_access", True, _boolean),
    _Key("SecretGracePeriod", "secret_grace_period", "1h", _duration()),
    _Key("RetentionInterval", "retention_interval", "1h", _duration(1)),
    _Key("DeletionReportFile", "deletion_report_file", "", _log_file),
    _Key("ComponentJID", "component_jid", "", _component_jid),
    _Key("ComponentSecret", "component_secret", "", _string, sensitive=True),
    _Key("ComponentServer", "component_server", "127.0.0.1:5347", _component_server),
    _Key("PublicURL", "public_url", "", _public_url),
    _Key("UploadAccess", "upload_access", [], _upload_access),
    _Key("UserQuota", "user_quota", 0, _size()),
    _Key("SlotExpiry", "slot_expiry", "5m", _duration(1)),
    _Key("HealthOnMainPort", "health_on_main_port", False, _boolean),
)
KNOWN_KEYS: tuple[str, ...] = tuple(spec.name for spec in _KEYS)
#: TOML key -> the L{Config} attribute it fills (what SIGHUP compares).
KEY_ATTRIBUTES: dict[str, str] = {spec.name: spec.attr for spec in _KEYS}

_NO_VERSIONS = "is ignored: uploads are never overwritten, so there are no versions to keep"
_NO_REPORT = "is ignored: files removed by DeleteFiles are reported in the log"
_IGNORED = {
    "EnableVersioning": _NO_VERSIONS,
    "VersioningDirectory": _NO_VERSIONS,
    "MaxVersions": _NO_VERSIONS,
    "VersioningStrategy": _NO_VERSIONS,
    "DeleteFilesReport": _NO_REPORT,
    "DeleteFilesReportPath": _NO_REPORT,
    "LoggingEnabled": "is ignored: logging is always on; use LogLevel and LogFile",
}
# Still honoured when their replacement is not set; see _min_free_alias and _resolve_listen.
_ALIASED = ("MinFreeSpaceThreshold", "UnixSocketPath")
# Keys of the Go server that hmacfs recognises but no longer uses as such.
OBSOLETE_KEYS: tuple[str, ...] = (*_IGNORED, *_ALIASED)
_FLAT = 'flat top-level keys such as ListenPort = ":8080"; hmacfs reads no [sections]'


# --- the Config value -------------------------------------------------------------------------


@attrs.frozen(kw_only=True)
class Config:
    """
    The effective configuration, already checked and converted.

    Durations are seconds, sizes bytes, paths absolute, listen addresses
    Twisted endpoint descriptions.  Build one with L{load_config},
    L{parse_config} or (in tests) L{default_config}.
    """

    listen: str
    listen_raw: str
    unix_socket: bool
    socket_mode: int
    secret: bytes = attrs.field(repr=False)
    secret_file: Path | None
    store_dir: Path
    upload_subdir: str
    log_level: str
    log_file: Path | None
    max_retries: int
    retry_delay: float
    enable_get_retries: bool
    block_after_fails: int
    block_duration: float
    auto_unban: bool
    auto_ban_time: float
    delete_files: bool
    delete_files_after_period: float
    num_cores: int
    reask_secret_enabled: bool
    reask_secret_interval: float
    metrics_enabled: bool
    metrics_listen: str
    checksum_verification: bool
    retention_policy_enabled: bool
    max_retention_size: int
    max_retention_time: float
    redis_addr: str = attrs.field(repr=lambda addr: repr(_mask_password(addr)))
    redis_password: str = attrs.field(repr=False)
    redis_db: int
    resume_ttl: float
    read_timeout: float
    write_timeout: float
    header_timeout: float
    max_connections_per_client: int
    buffer_size: int
    max_upload_size: int
    min_free_bytes: int
    trusted_proxies: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]
    clock_skew: float
    drain_timeout: float
    log_access: bool
    secret_grace_period: float
    retention_interval: float
    deletion_report_file: Path | None
    component_jid: str
    component_secret: str = attrs.field(repr=False)
    component_server: str
    public_url: str
    upload_access: tuple[str, ...]
    user_quota: int
    slot_expiry: float
    health_on_main_port: bool

    def redacted(self) -> dict[str, object]:
        """
        The effective configuration under its TOML key names, for
        C{--print-config} and the startup log: secrets replaced by
        C{"<redacted>"}, listen addresses shown as the endpoints in use.
        """
        special: dict[str, object] = {
            "ListenPort": self.listen,
            "SocketMode": f"{self.socket_mode:03o}",
            "Secret": repr(REDACTED),
            "RedisAddr": _mask_password(self.redis_addr),
            "RedisPassword": repr(REDACTED) if self.redis_password else "",
            "ComponentSecret": repr(REDACTED) if self.component_secret else "",
        }
        shown: dict[str, object] = {}
        for spec in _KEYS:
            value = special.get(spec.name, getattr(self, spec.attr))
            if value is None:
                value = ""
            elif isinstance(value, Path):
                value = str(value)
            elif isinstance(value, tuple):
                value = [str(item) for item in value]
            shown[spec.name] = value
        return shown

    def read_secret(self) -> bytes:
        """
        The current secret: read again from C{SecretFile} when there is one,
        so a rotated secret is picked up without a restart.
        """
        if self.secret_file is None:
            return self.secret
        return _read_secret_file(self.secret_file)


# --- cross-key rules --------------------------------------------------------------------------


def _read_secret_file(path: Path, warnings: list[str] | None = None) -> bytes:
    allowed = "a readable file holding the shared secret"
    try:
        secret = path.read_bytes()
        world_readable = path.stat().st_mode & 0o004
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise ConfigError("SecretFile", str(path), allowed, f"cannot be read ({reason})") from exc
    # One trailing newline is what `echo` and editors add; anything else is part of the secret.
    secret = secret.removesuffix(b"\n").removesuffix(b"\r")
    if not secret:
        raise ConfigError("SecretFile", str(path), allowed, "is empty")
    if world_readable and warnings is not None:
        warnings.append(f"SecretFile {str(path)!r} is readable by every user; chmod o-r it")
    return secret


def _resolve_secret(text: str, secret_file: Path | None, ctx: _Context) -> bytes:
    if text and secret_file is not None:
        raise ConfigError(
            "Secret",
            REDACTED,
            "set exactly one of Secret or SecretFile",
            "is set and so is SecretFile",
        )
    if secret_file is not None:
        secret = _read_secret_file(secret_file, ctx.warnings)
    elif text:
        secret = text.encode("utf-8")
    else:
        raise ConfigError("Secret", "", "set Secret or SecretFile", "is empty")
    if len(secret) < 16:
        ctx.warnings.append(
            f"the secret is only {len(secret)} bytes long; use at least 16 "
            "(for example the output of `openssl rand -hex 32`)"
        )
    return secret


def _resolve_listen(data: Mapping[str, object], values: dict[str, object], ctx: _Context) -> str:
    raw = str(values["listen_raw"])
    unix_socket = bool(values["unix_socket"])
    key = "ListenPort"
    if "UnixSocketPath" in data:
        legacy = _string(data["UnixSocketPath"], "UnixSocketPath", ctx).strip()
        if unix_socket and legacy and _split_host_port(raw) is not None:
            ctx.warnings.append(
                "obsolete key 'UnixSocketPath' is used as the socket path for now; "
                "with UnixSocket = true, put the path in ListenPort instead"
            )
            raw, key = legacy, "UnixSocketPath"
        else:
            ctx.warnings.append(
                "obsolete key 'UnixSocketPath' is ignored: with UnixSocket = true, "
                "ListenPort holds the socket path"
            )
    if unix_socket and not raw.startswith(ENDPOINT_PREFIXES) and _split_host_port(raw) is not None:
        raise ConfigError(
            key,
            raw,
            "a socket path such as /run/hmacfs/hmacfs.sock when UnixSocket = true",
            "is a TCP port, but UnixSocket = true",
        )
    return listen_to_endpoint(
        raw,
        unix_socket=unix_socket,
        socket_mode=int(values["socket_mode"]),  # type: ignore[call-overload]
        key=key,
        base_dir=ctx.base_dir,
    )


def _min_free_alias(data: Mapping[str, object], values: dict[str, object], ctx: _Context) -> None:
    if "MinFreeSpaceThreshold" not in data:
        return
    if "MinFreeBytes" in data:
        ctx.warnings.append(
            "obsolete key 'MinFreeSpaceThreshold' is ignored because MinFreeBytes is set"
        )
        return
    values["min_free_bytes"] = _size()(data["MinFreeSpaceThreshold"], "MinFreeSpaceThreshold", ctx)
    ctx.warnings.append(
        "obsolete key 'MinFreeSpaceThreshold' is used as MinFreeBytes for now; "
        "rename it to MinFreeBytes"
    )


def _key_warning(key: str) -> str | None:
    """The warning for a key hmacfs does not use, or None for a key it knows."""
    if key in _KEYS_BY_NAME or key in _ALIASED:
        return None
    if key in _IGNORED:
        return f"obsolete key {key!r} {_IGNORED[key]}"
    # Obsolete keys are candidates too: a typo of one should be recognised as that key.
    candidates = KNOWN_KEYS + OBSOLETE_KEYS
    by_lower = {known.lower(): known for known in candidates}
    guess = by_lower.get(key.lower()) or next(
        iter(difflib.get_close_matches(key, candidates, n=1)), None
    )
    hint = f" (did you mean {guess!r}?)" if guess else ""
    return f"unknown key {key!r}{hint}"


_KEYS_BY_NAME = {spec.name: spec for spec in _KEYS}


# --- entry points -----------------------------------------------------------------------------


def _parse(
    data: Mapping[str, object],
    base_dir: Path,
    secret: bytes | None = None,
    create_store_dir: bool = True,
) -> tuple[Config, list[str]]:
    ctx = _Context(base_dir=base_dir.absolute(), warnings=[], create_store_dir=create_store_dir)
    for key, value in data.items():
        if isinstance(value, Mapping):
            raise ConfigError(key, _Shown("{...}"), _FLAT, "is a table")
        warning = _key_warning(key)
        if warning is not None:
            ctx.warnings.append(warning)

    values: dict[str, object] = {}
    for spec in _KEYS:
        try:
            values[spec.attr] = spec.convert(data.get(spec.name, spec.default), spec.name, ctx)
        except ConfigError as error:
            if spec.sensitive:
                raise ConfigError(spec.name, REDACTED, error.allowed, error.problem) from None
            raise

    _min_free_alias(data, values, ctx)
    _check_component(values)
    if secret is None:
        secret_file = values["secret_file"]
        assert secret_file is None or isinstance(secret_file, Path)
        secret = _resolve_secret(str(values["secret"]), secret_file, ctx)
    values["secret"] = secret
    values["listen"] = _resolve_listen(data, values, ctx)
    metrics_raw = str(values["metrics_listen"])
    values["metrics_listen"] = listen_to_endpoint(
        metrics_raw,
        unix_socket=metrics_raw.startswith("/"),
        socket_mode=int(values["socket_mode"]),  # type: ignore[call-overload]
        key="MetricsPort",
        base_dir=ctx.base_dir,
    )
    return Config(**values), ctx.warnings  # type: ignore[arg-type]


def parse_config(
    data: Mapping[str, object],
    *,
    base_dir: Path,
    source: str = "<config>",
    create_store_dir: bool = True,
) -> tuple[Config, list[str]]:
    """
    Check and convert already-parsed TOML data into a L{Config}.

    Relative paths are taken relative to C{base_dir} (the config file's
    directory).  C{StoreDir} is created if missing (with
    C{create_store_dir=False} only checked: its nearest existing ancestor
    must be a writable directory) and C{SecretFile} is read.
    Returns the config and the warnings (unknown and obsolete keys, a short
    secret) for the caller to log; raises the first L{ConfigError}, with
    C{source} recorded on it.
    """
    try:
        return _parse(data, Path(base_dir), create_store_dir=create_store_dir)
    except ConfigError as error:
        error.source = source
        raise


def load_config(path: str | Path, *, create_store_dir: bool = True) -> tuple[Config, list[str]]:
    """
    Read a TOML config file; relative paths in it are relative to its directory.
    C{create_store_dir} as for L{parse_config}.

    An unreadable file or a TOML syntax error is a L{ConfigError} whose key is
    C{"<file>"}.
    """
    path = Path(path)
    try:
        with path.open("rb") as file:
            data = tomllib.load(file)
    except OSError as exc:
        error = ConfigError(
            "<file>", str(path), "a readable TOML file", f"cannot be read ({exc.strerror or exc})"
        )
        error.source = str(path)
        raise error from exc
    except tomllib.TOMLDecodeError as exc:
        error = ConfigError(
            "<file>", str(path), "TOML syntax, see https://toml.io", f"is not valid TOML: {exc}"
        )
        error.source = str(path)
        raise error from exc
    return parse_config(
        data, base_dir=path.absolute().parent, source=str(path), create_store_dir=create_store_dir
    )


def default_config(store_dir: Path, secret: bytes, **overrides: Any) -> Config:
    """
    The built-in defaults around a given store and secret, for tests and for
    embedding hmacfs in another program.

    C{overrides} are L{Config} attribute names with final values (seconds,
    bytes, endpoint strings); they are taken as given, not parsed.
    """
    if not secret:
        raise ConfigError("Secret", "", "a non-empty secret", "is empty")
    config, _ = _parse({"StoreDir": str(store_dir)}, Path(store_dir), secret=secret)
    return attrs.evolve(config, **overrides)
