# -*- test-case-name: tests.test_tus -*-
"""
The tus 1.0.0 protocol's headers, on the same signed upload URLs.

A tus client (tus-js-client, Uppy, tuspy, TUSKit, tus-android-client) is given
the signed PUT URL as its endpoint: ``POST`` creates the upload there
(``Upload-Length`` must be the signed size) and ``Location`` is that same URL,
so every later ``HEAD``, ``PATCH`` and ``DELETE`` carries the MAC too.  The
admission logic lives in ``hmacfs.upload.protocols`` with the other uploads; this
module parses and produces the tus headers and knows nothing of Twisted's
request objects beyond ``requestHeaders``.

Extensions: creation, creation-with-upload, termination, expiration and
checksum (sha1, md5, sha256, sha512).  Not offered: creation-defer-length
(the size is part of the MAC) and concatenation.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
from collections.abc import Callable
from typing import Any

from twisted.web.http import datetimeToString

from hmacfs.errors import Refusal

TUS_VERSION = b"1.0.0"
TUS_EXTENSIONS = b"creation,creation-with-upload,termination,expiration,checksum"
#: tus ``Upload-Checksum`` algorithms (sha1 is the one the spec requires).
CHECKSUM_ALGORITHMS: dict[str, Callable[[], Any]] = {
    "sha1": hashlib.sha1,
    "md5": hashlib.md5,
    "sha256": hashlib.sha256,
    "sha512": hashlib.sha512,
}
OFFSET_CONTENT_TYPE = b"application/offset+octet-stream"
#: 460 is tus's own status for a chunk whose Upload-Checksum does not match.
CHECKSUM_MISMATCH = 460
#: Metadata keys a client may carry the file's media type in (tus-js-client and
#: Uppy use ``filetype``; some send ``type`` or ``contentType``).
TYPE_KEYS = ("filetype", "type", "contentType", "content-type", "mimetype")
MAX_METADATA = 4096

_DIGITS = re.compile(rb"^[0-9]{1,19}$")
_META_KEY = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")


def is_tus(request: Any) -> bool:
    """A tus request carries ``Tus-Resumable`` (all but OPTIONS must)."""
    return request.requestHeaders.hasHeader(b"tus-resumable")


def header(request: Any, name: bytes) -> bytes | None:
    values = request.requestHeaders.getRawHeaders(name)
    return values[0].strip() if values else None


def method_override(request: Any) -> bytes | None:
    """``X-HTTP-Method-Override: PATCH`` (or ``DELETE``) on a tus POST, else None."""
    value = header(request, b"x-http-method-override")
    if value is not None and value.upper() in (b"PATCH", b"DELETE"):
        return value.upper()
    return None


def check_version(request: Any) -> None:
    """412 with ``Tus-Version`` for a protocol version we do not speak."""
    if header(request, b"tus-resumable") != TUS_VERSION:
        raise Refusal(412, "unsupported tus version", ((b"Tus-Version", TUS_VERSION),))


def _number(request: Any, name: bytes) -> int | None:
    value = header(request, name)
    if value is None:
        return None
    if not _DIGITS.match(value):
        raise Refusal(400, f"{name.decode()} must be a non-negative integer")
    return int(value)


def upload_length(request: Any) -> int:
    """The creation's ``Upload-Length`` (deferred lengths are refused: the MAC signs the size)."""
    if header(request, b"upload-defer-length") is not None:
        raise Refusal(400, "Upload-Defer-Length is not supported: the signed URL fixes the size")
    if header(request, b"upload-concat") is not None:
        raise Refusal(400, "concatenation is not supported")
    length = _number(request, b"upload-length")
    if length is None:
        raise Refusal(400, "Upload-Length required")
    return length


def upload_offset(request: Any) -> int:
    offset = _number(request, b"upload-offset")
    if offset is None:
        raise Refusal(400, "Upload-Offset required")
    return offset


def check_patch_type(request: Any) -> None:
    """PATCH bodies must be ``application/offset+octet-stream`` (415 otherwise)."""
    value = header(request, b"content-type")
    if value is None or value.split(b";")[0].strip().lower() != OFFSET_CONTENT_TYPE:
        raise Refusal(415, "Content-Type must be application/offset+octet-stream")


def has_body_type(request: Any) -> bool:
    """Whether a creation request carries upload data (creation-with-upload)."""
    value = header(request, b"content-type")
    return value is not None and value.split(b";")[0].strip().lower() == OFFSET_CONTENT_TYPE


def chunk_checksum(request: Any) -> tuple[str, bytes] | None:
    """``Upload-Checksum: <algorithm> <base64>`` as ``(algorithm, digest)``, or None."""
    value = header(request, b"upload-checksum")
    if value is None:
        return None
    name, _, encoded = value.decode("latin-1").partition(" ")
    name = name.strip().lower()
    if name not in CHECKSUM_ALGORITHMS:
        raise Refusal(400, f"unsupported checksum algorithm {name[:20]!r}")
    try:
        digest = base64.b64decode(encoded.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise Refusal(400, "Upload-Checksum value is not base64") from None
    if len(digest) != CHECKSUM_ALGORITHMS[name]().digest_size:
        raise Refusal(400, "Upload-Checksum has the wrong length for its algorithm")
    return name, digest


def parse_metadata(value: bytes | None) -> dict[str, bytes]:
    """``Upload-Metadata``: comma-separated ``key base64value`` pairs (the value may be absent)."""
    if not value:
        return {}
    if len(value) > MAX_METADATA:
        raise Refusal(400, "Upload-Metadata too long")
    result: dict[str, bytes] = {}
    for item in value.decode("latin-1").split(","):
        item = item.strip()
        if not item:
            continue
        key, _, encoded = item.partition(" ")
        if not _META_KEY.match(key) or key in result:
            raise Refusal(400, "malformed Upload-Metadata")
        try:
            result[key] = base64.b64decode(encoded.strip(), validate=True)
        except (binascii.Error, ValueError):
            raise Refusal(400, "malformed Upload-Metadata") from None
    return result


def metadata_type(metadata: dict[str, bytes]) -> bytes | None:
    """The media type a client put into its metadata, if any."""
    for key in TYPE_KEYS:
        value = metadata.get(key)
        if value:
            return value
    return None


def options_headers(max_size: int) -> list[tuple[bytes, bytes]]:
    """What an OPTIONS response advertises to tus clients."""
    headers = [
        (b"Tus-Resumable", TUS_VERSION),
        (b"Tus-Version", TUS_VERSION),
        (b"Tus-Extension", TUS_EXTENSIONS),
        (b"Tus-Checksum-Algorithm", ",".join(CHECKSUM_ALGORITHMS).encode("ascii")),
    ]
    if max_size:
        headers.append((b"Tus-Max-Size", str(max_size).encode("ascii")))
    return headers


def expires_header(epoch: float) -> tuple[bytes, bytes]:
    """``Upload-Expires`` as an RFC 9110 date."""
    return (b"Upload-Expires", datetimeToString(int(epoch)))
