# -*- test-case-name: tests.test_config -*-
"""
The converters for other services' addresses: Redis, the XMPP server's
component port, the component's JID and upload ACL, the public URL.

Host names are checked for form, never resolved.
"""

from __future__ import annotations

import ipaddress
import re

from twisted.internet.endpoints import clientFromString

from hmacfs.config.endpoints import DryRunReactor, quote_argument, split_host_port
from hmacfs.config.error import ConfigError, wrong_type
from hmacfs.config.validators import Context, as_text

REDIS_FORMS = (
    '"host:port", "[IPv6]:port", "redis://[user:password@]host[:port][/db]", "rediss://...", '
    '"unix:/path/to/redis.sock", or "" for the embedded state store'
)
HOSTNAME = re.compile(
    r"(?=.{1,253}$)[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
    r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*\.?"
)


def mask_password(text: str) -> str:
    """Hide the password of a C{scheme://user:password@host} address (it may itself hold C{@})."""
    scheme, separator, rest = text.partition("://")
    if not separator or "@" not in rest:
        return text
    userinfo, _, hostpart = rest.rpartition("@")
    if ":" not in userinfo:
        return text
    return f"{scheme}://{userinfo.split(':', 1)[0]}:***@{hostpart}"


def redis_addr(value: object, key: str, ctx: Context) -> str:
    text = as_text(value, key, REDIS_FORMS).strip()
    if not text:
        return ""
    shown = mask_password(text)
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
    host_port = split_host_port(text)
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
        if not HOSTNAME.fullmatch(host):
            raise ConfigError(key, shown, REDIS_FORMS, "has a host that is not valid") from None


# --- the XEP-0114 component (hmacfs.xmpp.component) ------------------------------------------------

_JID_DOMAIN_FORMS = 'a domain such as "upload.example.org" (no user part, no resource)'


def component_jid(value: object, key: str, ctx: Context) -> str:
    text = as_text(value, key, _JID_DOMAIN_FORMS + ', or "" to run no component').strip().lower()
    if text and (not HOSTNAME.fullmatch(text) or text.endswith(".")):
        raise ConfigError(key, value, _JID_DOMAIN_FORMS, "is not a domain")
    return text


COMPONENT_SERVER_FORMS = (
    '"host:port" of the XMPP server\'s component port, such as "127.0.0.1:5347" or '
    '"[::1]:5347", or a Twisted client endpoint such as "tcp:host=xmpp.example.org:port=5347"'
)


def component_server(value: object, key: str, ctx: Context) -> str:
    """C{"host:port"} (or a client endpoint description) to a client endpoint description."""
    text = as_text(value, key, COMPONENT_SERVER_FORMS).strip()
    if text.startswith(("tcp:", "unix:", "ssl:", "tls:")):
        try:
            clientFromString(DryRunReactor(), text)
        except Exception as exc:
            reason = str(exc) or type(exc).__name__
            raise ConfigError(
                key, text, COMPONENT_SERVER_FORMS, f"cannot be parsed by Twisted ({reason})"
            ) from exc
        return text
    host_port = split_host_port(text)
    if host_port is None or not host_port[0]:
        raise ConfigError(key, value, COMPONENT_SERVER_FORMS, "is not host:port")
    host, port = host_port[0], int(host_port[1])
    if not 1 <= port <= 65535:
        raise ConfigError(key, value, COMPONENT_SERVER_FORMS, "has a port outside 1..65535")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        if not HOSTNAME.fullmatch(host):
            raise ConfigError(key, value, COMPONENT_SERVER_FORMS, "has a host that is not valid") from None
    return f"tcp:host={quote_argument(host)}:port={port}"


PUBLIC_URL_FORMS = (
    'the https URL of hmacfs\'s root as clients reach it, without a path, '
    'such as "https://upload.example.org" or "https://upload.example.org:5443"'
)


def public_url(value: object, key: str, ctx: Context) -> str:
    """
    The scheme, host and port clients use; slots go under C{/<UploadSubDir>/}
    there.  A path is refused because C{v3} signs the path hmacfs itself sees.
    """
    text = as_text(value, key, PUBLIC_URL_FORMS + ', or ""').strip()
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


def upload_access(value: object, key: str, ctx: Context) -> tuple[str, ...]:
    if not isinstance(value, (list, tuple)):
        raise wrong_type(key, value, UPLOAD_ACCESS_FORMS)
    entries = []
    for item in value:
        if not isinstance(item, str):
            raise wrong_type(key, item, UPLOAD_ACCESS_FORMS)
        entry = item.strip().lower()
        if entry != "*":
            local, at, domain = entry.rpartition("@")
            if (
                not HOSTNAME.fullmatch(domain)
                or domain.endswith(".")
                or (at and not _LOCALPART.fullmatch(local))
            ):
                raise ConfigError(key, item, UPLOAD_ACCESS_FORMS, "is not a domain or bare JID")
        entries.append(entry)
    return tuple(entries)
