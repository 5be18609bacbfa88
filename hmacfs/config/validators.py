# -*- test-case-name: tests.test_config -*-
"""
The per-key converters: one TOML value in, one checked Python value out.

Each is C{convert(value, key, ctx)} and raises a L{ConfigError} naming the key,
the value and what is allowed; the factories (C{integer(1)}, C{size(4096)})
bake the bounds into the message.  Paths are made absolute against the config
file's directory.
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Callable
from pathlib import Path

import attrs

from hmacfs.config.endpoints import LISTEN_FORMS
from hmacfs.config.error import ConfigError, toml_type, wrong_type
from hmacfs.config.units import format_size, parse_duration, parse_size


@attrs.define
class Context:
    """What a converter needs besides the value: the base of relative paths, the warnings."""

    base_dir: Path
    warnings: list[str]
    #: False for ``hmacfs check-config``: check StoreDir could be created, create nothing
    create_store_dir: bool = True


Converter = Callable[[object, str, Context], object]


def boolean(value: object, key: str, ctx: Context) -> bool:
    if not isinstance(value, bool):
        raise wrong_type(key, value, "true or false, without quotes")
    return value


def integer(minimum: int, maximum: int | None = None) -> Converter:
    if maximum is None:
        allowed = f"an integer >= {minimum}"
    else:
        allowed = f"an integer from {minimum} to {maximum}"

    def convert(value: object, key: str, ctx: Context) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise wrong_type(key, value, allowed)
        if value < minimum or (maximum is not None and value > maximum):
            raise ConfigError(key, value, allowed, "is out of range")
        return value

    return convert


def as_text(value: object, key: str, allowed: str) -> str:
    if not isinstance(value, str):
        raise wrong_type(key, value, allowed)
    return value


def string(value: object, key: str, ctx: Context) -> str:
    return as_text(value, key, "a string")


def duration(
    minimum: float = 0.0, *, exclusive: bool = False, maximum: float | None = None
) -> Converter:
    bound = f"greater than {minimum:g}s" if exclusive else f"of at least {minimum:g}s"
    if maximum is not None:
        bound = f"{bound} and at most {maximum:g}s"

    def convert(value: object, key: str, ctx: Context) -> float:
        seconds = parse_duration(value, key=key)  # type: ignore[arg-type]
        if seconds < minimum or (exclusive and seconds == minimum):
            raise ConfigError(key, value, f"a duration {bound}", "is too short")
        if maximum is not None and seconds > maximum:
            raise ConfigError(key, value, f"a duration {bound}", "is too long")
        return seconds

    return convert


def size(minimum: int = 0, maximum: int | None = None) -> Converter:
    if maximum is None:
        allowed = f"a size of at least {format_size(minimum)}"
    else:
        allowed = f"a size from {format_size(minimum)} to {format_size(maximum)}"

    def convert(value: object, key: str, ctx: Context) -> int:
        result = parse_size(value, key=key)  # type: ignore[arg-type]
        if result < minimum or (maximum is not None and result > maximum):
            raise ConfigError(key, value, allowed, "is out of range")
        return result

    return convert


def listen_text(value: object, key: str, ctx: Context) -> str:
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise wrong_type(key, value, LISTEN_FORMS)
    text = str(value).strip()
    if not text:
        raise ConfigError(key, value, LISTEN_FORMS, "is empty")
    return text


def socket_mode(value: object, key: str, ctx: Context) -> int:
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
        raise ConfigError(key, value, allowed, f"is not a permission mode ({toml_type(value)})")
    if not 0 <= mode <= 0o777:
        raise ConfigError(key, value, allowed, "is not a permission mode (above 0o777)")
    return mode


def _under(base_dir: Path, text: str) -> Path:
    path = Path(text)
    return path if path.is_absolute() else base_dir / path


def optional_path(value: object, key: str, ctx: Context) -> Path | None:
    text = as_text(value, key, 'a file path, or "" for none')
    return _under(ctx.base_dir, text) if text else None


def store_dir(value: object, key: str, ctx: Context) -> Path:
    allowed = "a writable directory (created with its parents if missing)"
    text = as_text(value, key, allowed)
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


def upload_subdir(value: object, key: str, ctx: Context) -> str:
    allowed = (
        'a URL path like "upload" or "files/xmpp" made of A-Z a-z 0-9 . _ ~ -, or "" for the root'
    )
    normalized = as_text(value, key, allowed).strip("/")
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


def log_level(value: object, key: str, ctx: Context) -> str:
    allowed = "debug, info, warn (or warning), error"
    level = _LOG_LEVELS.get(as_text(value, key, allowed).strip().lower())
    if level is None:
        raise ConfigError(key, value, allowed, "is not a log level")
    return level


def log_file(value: object, key: str, ctx: Context) -> Path | None:
    allowed = 'a file in an existing directory, or "" for standard output'
    path = optional_path(value, key, ctx)
    if path is None:
        return None
    if path.is_dir():
        raise ConfigError(key, str(path), allowed, "is a directory")
    if not path.parent.is_dir():
        raise ConfigError(key, str(path), allowed, "is in a directory that does not exist")
    return path


def num_cores(value: object, key: str, ctx: Context) -> int:
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
        raise wrong_type(key, value, allowed)
    if cores < 1:
        raise ConfigError(key, value, allowed, "is out of range")
    return cores


def networks(
    value: object, key: str, ctx: Context
) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    allowed = 'an array of IP addresses or CIDR networks, like ["127.0.0.1/32", "::1/128"]'
    if not isinstance(value, (list, tuple)):
        raise wrong_type(key, value, allowed)
    networks = []
    for item in value:
        if not isinstance(item, str):
            raise wrong_type(key, item, allowed)
        try:
            networks.append(ipaddress.ip_network(item.strip(), strict=False))
        except ValueError:
            raise ConfigError(key, item, allowed, "is not an IP address or network") from None
    return tuple(networks)


def read_secret_file(
    path: Path,
    warnings: list[str] | None = None,
    *,
    key: str = "SecretFile",
    allowed: str = "a readable file holding the shared secret",
) -> bytes:
    """
    A secret held in a file (C{SecretFile}, C{S3SecretKeyFile}): errors and
    warnings name C{key} and the path, never the content.
    """
    try:
        secret = path.read_bytes()
        world_readable = path.stat().st_mode & 0o004
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise ConfigError(key, str(path), allowed, f"cannot be read ({reason})") from exc
    # One trailing newline is what `echo` and editors add; anything else is part of the secret.
    secret = secret.removesuffix(b"\n").removesuffix(b"\r")
    if not secret:
        raise ConfigError(key, str(path), allowed, "is empty")
    if world_readable and warnings is not None:
        warnings.append(f"{key} {str(path)!r} is readable by every user; chmod o-r it")
    return secret
