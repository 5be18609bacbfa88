# -*- test-case-name: tests.test_paths -*-
"""
Turn the request path of an upload/download URL into a validated slot path.

XMPP servers sign the *decoded* slot path (``<random>/<filename>`` for
Prosody, ``<user>/<random>/<file>`` for ejabberd) and let the filename carry
almost anything, ``..`` included.  So the path is split on ``/`` before
decoding (an encoded ``%2F`` can never create a new segment), every segment is
percent-decoded on its own and then held to rules strict enough that joining
the segments under a store directory can never leave it.

The decoded bytes are kept unchanged in ``SlotPath.signed``: they are what the
MAC covers, so no Unicode normalisation or case folding is applied (only the
check for our private directory folds case: ``.HMACFS`` is refused too, as
the store does, since on a case-insensitive filesystem it is the same name).

Pure functions, no Twisted: the resource maps ``PathError.status`` to the
response code.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Sequence

import attrs

from hmacfs.errors import Refusal

__all__ = [
    "MAX_PATH_BYTES",
    "MAX_SEGMENTS",
    "MAX_SEGMENT_BYTES",
    "PRIVATE_DIR",
    "PathError",
    "SlotPath",
    "parse_slot_path",
    "validate_segments",
]

#: Longest decoded segment (a common filesystem NAME_MAX).
MAX_SEGMENT_BYTES = 255
#: Longest decoded slot path, separators included.
MAX_PATH_BYTES = 1024
#: Most segments a slot path may have (Prosody uses 2, ejabberd 3).
MAX_SEGMENTS = 8
#: The store's private directory (``StoreDir/.hmacfs``), named here once: this is the lowest
#: layer that must know it (as a first segment it is refused, in any case); the store, the
#: health probe and the ban list import it from here.
PRIVATE_DIR = ".hmacfs"

# Every byte below 0x20, DEL and "/" (only reachable through %2F).
_FORBIDDEN_BYTES = re.compile(rb"[\x00-\x1f\x7f/]")
_ONLY_DOTS = re.compile(rb"\.*")

_HEX_DIGITS = "0123456789abcdefABCDEF"
# Every accepted two-character escape, upper, lower and mixed case, to its byte;
# int(x, 16) alone would also take "+1", " 1" or "1_".
_ESCAPES: dict[bytes, bytes] = {
    (high + low).encode("ascii"): bytes([int(high + low, 16)])
    for high in _HEX_DIGITS
    for low in _HEX_DIGITS
}


class PathError(Refusal):
    """
    The request path cannot name a slot.

    ``status`` is the HTTP status to answer with (400 malformed, 403
    reserved, 404 outside the upload prefix, 414 too long); ``reason`` is a
    short human text for the response body and logs.
    """


@attrs.frozen
class SlotPath:
    """
    A validated slot path.

    ``segments`` are the decoded segments as text, ``signed`` the exact bytes
    an XMPP server signs: the percent-decoded segments joined with ``/``.
    """

    segments: tuple[str, ...]
    signed: bytes

    @property
    def text(self) -> str:
        """The slot path as text, e.g. for logs and storage keys."""
        return "/".join(self.segments)


def _percent_decode(raw: bytes) -> bytes:
    """
    Decode ``%XX`` escapes strictly.

    A ``%`` that is not followed by two hex digits is an error rather than a
    literal: the signer always escapes ``%`` itself, so such a URL was not
    produced by it.  ``+`` stays a plus.
    """
    if b"%" not in raw:
        return raw
    head, *escaped = raw.split(b"%")
    decoded = [head]
    for piece in escaped:
        byte = _ESCAPES.get(piece[:2])
        if byte is None:
            raise PathError(400, "malformed percent-escape")
        decoded.append(byte)
        decoded.append(piece[2:])
    return b"".join(decoded)


def _check_segment(segment: bytes) -> str:
    """Validate one decoded segment and return it as text."""
    if _FORBIDDEN_BYTES.search(segment) is not None:
        if b"/" in segment:
            raise PathError(400, "encoded slash in path")
        raise PathError(400, "control character in path")
    if _ONLY_DOTS.fullmatch(segment) is not None:
        # "", ".", ".." and any longer run of dots.
        raise PathError(400, "empty or dot segment in path")
    if len(segment) > MAX_SEGMENT_BYTES:
        raise PathError(414, "path segment too long")
    try:
        return segment.decode("utf-8")
    except UnicodeDecodeError:
        raise PathError(400, "path is not valid UTF-8") from None


def validate_segments(segments: Sequence[bytes]) -> SlotPath:
    """
    Apply the slot path rules to already decoded segments.

    ``parse_slot_path`` uses this after decoding; the URL signer uses it so it
    never produces a URL this server would refuse.
    """
    if not segments:
        raise PathError(400, "empty path")
    if len(segments) > MAX_SEGMENTS:
        raise PathError(400, "too many path segments")
    texts = tuple(_check_segment(segment) for segment in segments)
    signed = b"/".join(segments)
    if len(signed) > MAX_PATH_BYTES:
        raise PathError(414, "path too long")
    # casefold, like the store: '.HMACFS' is the same directory on a case-insensitive
    # filesystem, and a name the store refuses must be refused here, before any I/O.
    if texts[0].casefold() == PRIVATE_DIR:
        raise PathError(403, "reserved path")
    return SlotPath(segments=texts, signed=signed)


@functools.lru_cache(maxsize=16)
def _prefix_segments(prefix: str) -> tuple[bytes, ...]:
    stripped = prefix.strip("/")
    if not stripped:
        return ()
    return tuple(part.encode("utf-8") for part in stripped.split("/"))


def parse_slot_path(raw_path: bytes, prefix: str) -> SlotPath:
    """
    Parse a still percent-encoded request path into a ``SlotPath``.

    ``prefix`` is the configured upload sub-directory without surrounding
    slashes (``"upload"``, ``"a/b"``, or ``""`` for the root); it is compared
    after decoding, so ``/upl%6fad/...`` is the same URL as ``/upload/...``.

    Raises ``PathError`` for anything that is not a valid slot path.
    """
    return _parse_slot_path(raw_path, prefix)


# A request's path is parsed more than once (the tombstone check, then the upload
# policy or the download), and a SlotPath is immutable: the recent ones are kept.
# Refusals raise, so they are never cached.
@functools.lru_cache(maxsize=64)
def _parse_slot_path(raw_path: bytes, prefix: str) -> SlotPath:
    if not raw_path.startswith(b"/"):
        raise _outside()
    parts = raw_path[1:].split(b"/")
    expected = _prefix_segments(prefix)
    if len(parts) <= len(expected):
        raise _outside()
    for raw, wanted in zip(parts, expected, strict=False):  # the rest is the file path
        try:
            matches = _percent_decode(raw) == wanted
        except PathError:
            matches = False
        if not matches:
            raise _outside()

    remainder = parts[len(expected) :]
    # Bound the work before decoding: a decoded path of MAX_PATH_BYTES takes at
    # most three raw bytes per decoded byte.
    if sum(len(raw) + 1 for raw in remainder) - 1 > 3 * MAX_PATH_BYTES:
        raise PathError(414, "path too long")
    if len(remainder) > MAX_SEGMENTS:
        raise PathError(400, "too many path segments")
    return validate_segments([_percent_decode(raw) for raw in remainder])


def _outside() -> PathError:
    return PathError(404, "not under the upload prefix")
