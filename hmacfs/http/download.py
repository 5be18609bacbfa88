# -*- test-case-name: tests.test_download -*-
"""
Serve a stored upload for GET and HEAD.

Why not ``twisted.web.static.File`` (REFERENCE.md F.4): it defaults unknown
types to ``text/html``, turns ``.gz`` uploads into ``Content-Encoding: gzip``,
lists directories, has no ETag/If-None-Match/If-Range, and its pull producers
cannot notice a client that stopped reading.  Uploads are hostile content
served from our origin, so every response carries ``nosniff`` and a sandboxing
CSP, and only media and plain text are ever shown inline.

The body is streamed by a push producer that reads ``chunk_size`` bytes at a
time and stops when the transport says its buffer is full; the whole file is
never in memory.  An idle timer aborts a download whose client has stopped
reading (Conversations resumes with ``Range: bytes=N-``, so an abort costs the
client little), while a slow download that keeps moving is never cut off.

On a plain TCP or UNIX transport a body of at least ``SENDFILE_MIN`` bytes goes
out with ``os.sendfile`` instead: the kernel moves page-cache pages to the
socket, so Python neither reads nor copies the data (PERFORMANCE.md's lever
for big GETs).  The producer lives in ``hmacfs.http.sendfile``, because it needs
Twisted internals and this module uses public API only.
"""

from __future__ import annotations

import math
import os
import re
from typing import TYPE_CHECKING, Literal
from urllib.parse import quote

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.web import http
from twisted.web.iweb import IRequest
from twisted.web.server import NOT_DONE_YET

from hmacfs.http.sendfile import (
    CHUNKS_PER_TURN,
    SENDFILE_MIN,
    SENDFILE_PER_TURN,
    FileProducer,
    sendfile_transport,
)
from hmacfs.logs import log_router
from hmacfs.storage.fs_backend import open_stored

if TYPE_CHECKING:
    from hmacfs.storage.filesystem import StoredFile

__all__ = [
    "CHUNKS_PER_TURN",
    "CONTENT_SECURITY_POLICY",
    "DEFAULT_CHUNK_SIZE",
    "INLINE_TYPES",
    "SENDFILE_MIN",
    "SENDFILE_PER_TURN",
    "parse_range",
    "render_download",
]

log = Logger(observer=log_router)

#: Bytes read from disk and handed to the transport per write.
DEFAULT_CHUNK_SIZE = 262144
#: Media types shown by the browser; prefixes end in "/", others match exactly.
INLINE_TYPES: tuple[str, ...] = ("image/", "video/", "audio/", "text/plain")

#: No scripts, no plugins, no framing, and a sandbox for whatever gets rendered.
CONTENT_SECURITY_POLICY = b"default-src 'none'; frame-ancestors 'none'; sandbox"
CACHE_CONTROL = b"private, max-age=86400"
FALLBACK_TYPE = b"application/octet-stream"

_OWS = b" \t"
# Larger than any file; stands in for positions too long to convert cheaply
# (int() refuses more than 4300 digits, and nothing needs more than 20).
_HUGE_POSITION = 1 << 64
_MAX_POSITION_DIGITS = 20
# type "/" subtype, then optional parameters; printable ASCII only.
_TOKEN = r"[!#$%&'*+.^_`|~0-9A-Za-z-]+"
_MEDIA_TYPE = re.compile(_TOKEN + "/" + _TOKEN + r"(?:[ \t]*;[ -~\t]*)?")
# RFC 8187 attr-char minus ALPHA / DIGIT, which quote() never escapes.
_ATTR_CHAR_PUNCTUATION = "!#$&+-.^_`|~"


def parse_range(header: bytes, size: int) -> tuple[int, int] | None | Literal["unsatisfiable"]:
    """
    Parse a ``Range`` header into one inclusive byte range clipped to ``size``.

    ``None`` means "ignore the header and send the whole file": another unit,
    a malformed value, or several ranges (RFC 9110 14.2 lets a server ignore
    Range, which spares us multipart/byteranges).  ``"unsatisfiable"`` means
    a well-formed single range that selects nothing (416).
    """
    unit, equals, ranges_text = header.partition(b"=")
    if not equals or unit.strip(_OWS).lower() != b"bytes":
        return None
    ranges = [item.strip(_OWS) for item in ranges_text.split(b",")]
    ranges = [item for item in ranges if item]
    if len(ranges) != 1:
        return None
    first_text, dash, last_text = ranges[0].partition(b"-")
    if not dash:
        return None
    first_text = first_text.strip(_OWS)
    last_text = last_text.strip(_OWS)
    if not first_text:
        suffix_length = _parse_position(last_text)
        if suffix_length is None:
            return None
        if suffix_length == 0 or size == 0:
            return "unsatisfiable"
        return (max(0, size - suffix_length), size - 1)
    first = _parse_position(first_text)
    if first is None:
        return None
    last = size - 1
    if last_text:
        requested_last = _parse_position(last_text)
        if requested_last is None or requested_last < first:
            return None
        last = min(last, requested_last)
    if first >= size:
        return "unsatisfiable"
    return (first, last)


def _parse_position(digits: bytes) -> int | None:
    """ASCII digits to an int; ``None`` for anything else (``bytes.isdigit`` is ASCII-only)."""
    if not digits.isdigit():
        return None
    if len(digits.lstrip(b"0")) > _MAX_POSITION_DIGITS:
        return _HUGE_POSITION
    return int(digits)


def render_download(
    request: IRequest,
    stored: StoredFile,
    *,
    clock: IReactorTime,
    write_timeout: float,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> bytes | int:
    """
    Answer a GET or HEAD for ``stored``.

    Returns ``b""`` when the response has no body (HEAD, 304, 416, an empty
    file) and ``NOT_DONE_YET`` when a producer now streams the body and will
    finish the request.  Raises ``FileNotFoundError`` (before touching the
    response) when the file cannot be opened as the regular file ``stored``
    describes, for the caller to answer 404.  The request must still be
    connected; HEAD never opens the file.  A ``write_timeout`` of zero or less
    disables the idle timer.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be positive, not {chunk_size!r}")
    is_head = request.method == b"HEAD"
    etag = stored.etag.encode("ascii")
    modified = math.floor(stored.mtime)
    last_modified = http.datetimeToString(modified)

    if _not_modified(request, etag, modified):
        _set_security_headers(request)
        _set_validators(request, etag, last_modified)
        request.setResponseCode(http.NOT_MODIFIED)
        return b""

    byte_range: tuple[int, int] | None = None
    if not is_head:
        wanted = _wanted_range(request, stored.size, etag, modified)
        if wanted == "unsatisfiable":
            # No Cache-Control: a cached 416 would answer later plain GETs.
            _set_security_headers(request)
            request.setHeader(b"Accept-Ranges", b"bytes")
            request.setHeader(b"Content-Range", b"bytes */%d" % (stored.size,))
            request.setHeader(b"Content-Length", b"0")
            request.setResponseCode(http.REQUESTED_RANGE_NOT_SATISFIABLE)
            return b""
        byte_range = wanted

    fd = None if is_head else open_stored(stored)

    content_type, inline = _response_type(stored.content_type)
    _set_security_headers(request)
    _set_validators(request, etag, last_modified)
    request.setHeader(b"Accept-Ranges", b"bytes")
    request.setHeader(b"Content-Type", content_type)
    request.setHeader(b"Content-Disposition", _content_disposition(inline, stored.path.name))
    if byte_range is None:
        first, last = 0, stored.size - 1
        request.setResponseCode(http.OK)
    else:
        first, last = byte_range
        request.setResponseCode(http.PARTIAL_CONTENT)
        request.setHeader(b"Content-Range", b"bytes %d-%d/%d" % (first, last, stored.size))
    length = last - first + 1
    request.setHeader(b"Content-Length", b"%d" % (length,))

    if fd is None:
        return b""
    if length == 0:
        os.close(fd)
        return b""
    producer = FileProducer(
        request,
        fd,
        offset=first,
        length=length,
        clock=clock,
        write_timeout=write_timeout,
        chunk_size=chunk_size,
        transport=sendfile_transport(request) if length >= SENDFILE_MIN else None,
    )
    try:
        producer.start()
    except BaseException:
        producer.stopProducing()
        raise
    return NOT_DONE_YET


def _set_security_headers(request: IRequest) -> None:
    """Headers every response about an upload carries, whatever its status."""
    request.setHeader(b"X-Content-Type-Options", b"nosniff")
    request.setHeader(b"Content-Security-Policy", CONTENT_SECURITY_POLICY)


def _set_validators(request: IRequest, etag: bytes, last_modified: bytes) -> None:
    request.setHeader(b"ETag", etag)
    request.setHeader(b"Last-Modified", last_modified)
    request.setHeader(b"Cache-Control", CACHE_CONTROL)


def _not_modified(request: IRequest, etag: bytes, modified: int) -> bool:
    """
    RFC 9110 13.2.2 steps 3 and 4 for GET/HEAD: If-None-Match decides when
    present (weak comparison), otherwise If-Modified-Since.
    """
    none_match = request.requestHeaders.getRawHeaders(b"if-none-match")
    if none_match is not None:
        tags = _parse_entity_tags(b",".join(none_match))
        if tags == "*":
            return True
        opaque = _opaque_tag(etag)
        return any(_opaque_tag(tag) == opaque for tag in tags)
    since = request.getHeader(b"if-modified-since")
    if since is None:
        return False
    since_seconds = _parse_http_date(since)
    return since_seconds is not None and modified <= since_seconds


def _wanted_range(
    request: IRequest, size: int, etag: bytes, modified: int
) -> tuple[int, int] | None | Literal["unsatisfiable"]:
    """The Range to honour, after If-Range (RFC 9110 13.1.5, strong comparison)."""
    range_headers = request.requestHeaders.getRawHeaders(b"range")
    if range_headers is None:
        return None
    if_range = request.getHeader(b"if-range")
    if if_range is not None:
        validator = if_range.strip(_OWS)
        if validator.startswith((b'"', b"W/")):
            # A weak tag never matches strongly; ours are strong.
            if validator != etag:
                return None
        elif _parse_http_date(validator) != modified:
            return None
    # Several Range fields are as good as one field with several ranges: ignored.
    return parse_range(b",".join(range_headers), size)


def _parse_entity_tags(value: bytes) -> list[bytes] | Literal["*"]:
    """
    The entity tags of an If-None-Match value, or ``"*"``.

    Tags may contain commas, so the list is scanned rather than split; the
    scan stops at the first malformed element and keeps what came before.
    """
    if value.strip(_OWS) == b"*":
        return "*"
    tags: list[bytes] = []
    position = 0
    while True:
        while position < len(value) and value[position : position + 1] in (b" ", b"\t", b","):
            position += 1
        if position >= len(value):
            return tags
        start = position
        if value.startswith(b"W/", position):
            position += 2
        if not value.startswith(b'"', position):
            return tags
        close = value.find(b'"', position + 1)
        if close == -1:
            return tags
        position = close + 1
        tags.append(value[start:position])


def _opaque_tag(tag: bytes) -> bytes:
    """The quoted part of an entity tag, for weak comparison."""
    return tag[2:] if tag.startswith(b"W/") else tag


def _parse_http_date(value: bytes) -> int | None:
    """Seconds since the epoch, or ``None`` for anything that is not an HTTP date."""
    try:
        return int(http.stringToDatetime(value.strip(_OWS)))
    except (ValueError, IndexError, AssertionError, OverflowError):
        return None


def _response_type(stored_type: str) -> tuple[bytes, bool]:
    """
    The ``Content-Type`` to send and whether the browser may show the body.

    A missing or malformed type becomes ``application/octet-stream`` rather
    than anything a browser would render; a well-formed type is kept even when
    it is not inline (text/html included) since the attachment disposition,
    nosniff and the sandbox are what make it safe.
    """
    value = stored_type.strip(" \t")
    if not _MEDIA_TYPE.fullmatch(value):
        return FALLBACK_TYPE, False
    media_type = value.split(";", 1)[0].strip(" \t").lower()
    inline = any(
        media_type.startswith(kind) if kind.endswith("/") else media_type == kind
        for kind in INLINE_TYPES
    )
    return value.encode("ascii"), inline


def _content_disposition(inline: bool, name: str) -> bytes:
    """``inline``, or ``attachment`` with the RFC 6266/8187 ``filename*`` of ``name``."""
    if inline:
        return b"inline"
    if not name:
        return b"attachment"
    encoded = quote(name.encode("utf-8", "replace"), safe=_ATTR_CHAR_PUNCTUATION)
    return b"attachment; filename*=UTF-8''" + encoded.encode("ascii")
