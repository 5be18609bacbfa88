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

The file comes opened, as an ``IByteSource`` from ``IStore.open_file`` (every
read and ``sendfile`` then runs on the disk pool); a source without a local
descriptor streams itself (``StreamedBody``).  A store that can hand out a
URL for the file (``download_url``: a presigned object-store URL) gets the
client redirected there instead, so the bytes never pass through hmacfs.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from typing import TYPE_CHECKING, Literal, cast
from urllib.parse import quote

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.web import http
from twisted.web.iweb import IRequest
from twisted.web.server import NOT_DONE_YET

from hmacfs.http.producer import StreamedBody
from hmacfs.http.sendfile import (
    CHUNKS_PER_TURN,
    SENDFILE_MIN,
    SENDFILE_PER_TURN,
    FileProducer,
    sendfile_transport,
)
from hmacfs.logs import log_router
from hmacfs.storage.interface import ByteRange, IByteSource, ILocalByteSource

if TYPE_CHECKING:
    from hmacfs.storage.interface import StoredFile

#: ``IStore.download_url``: a URL to redirect the GET to, or None to stream it
DownloadURL = Callable[["StoredFile", bytes, bytes], "str | None"]

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
    source: IByteSource | None = None,
    local: bool = True,
    download_url: DownloadURL | None = None,
) -> bytes | int:
    """
    Answer a GET or HEAD for ``stored``.

    A GET brings ``source``, the whole file opened (``IStore.open_file``); this
    owns it from here and closes it on every way out.  HEAD has none: it never
    opens the file.  ``local`` is ``IStore.local`` (the source's descriptor may
    be ``sendfile``d); ``download_url`` is ``IStore.download_url``, asked first
    on a GET (a URL: 302 there).

    Returns ``b""`` when the response has no body (HEAD, 302, 304, 416, an
    empty file) and ``NOT_DONE_YET`` when a producer now streams the body and
    will finish the request.  The request must still be connected.  A
    ``write_timeout`` of zero or less disables the idle timer.
    """
    try:
        return _render(
            request, stored, source, clock=clock, write_timeout=write_timeout,
            chunk_size=chunk_size, local=local, download_url=download_url,
        )
    except BaseException:
        if source is not None:
            source.close()
        raise


def _render(
    request: IRequest,
    stored: StoredFile,
    source: IByteSource | None,
    *,
    clock: IReactorTime,
    write_timeout: float,
    chunk_size: int,
    local: bool,
    download_url: DownloadURL | None,
) -> bytes | int:
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be positive, not {chunk_size!r}")
    is_head = request.method == b"HEAD"
    if not is_head and source is None:
        raise ValueError("a GET needs the opened file (source)")
    if is_head and source is not None:
        source.close()
        source = None
    content_type, inline = _response_type(stored.content_type)
    disposition = _content_disposition(inline, stored.path.name)
    if source is not None and download_url is not None:
        # The place where an object store sends the client to the bytes (S3RedirectDownloads).
        url = download_url(stored, content_type, disposition)
        if url is not None:
            source.close()
            _set_security_headers(request)
            request.setResponseCode(http.FOUND)
            request.setHeader(b"Location", url.encode("ascii"))
            # A presigned URL expires: neither the redirect nor its target is cached.
            request.setHeader(b"Cache-Control", b"no-store")
            request.setHeader(b"Content-Length", b"0")
            return b""
    etag = stored.etag.encode("ascii")
    modified = math.floor(stored.mtime)
    last_modified = http.datetimeToString(modified)

    if _not_modified(request, etag, modified):
        if source is not None:
            source.close()
        _set_security_headers(request)
        _set_validators(request, etag, last_modified)
        request.setResponseCode(http.NOT_MODIFIED)
        return b""

    byte_range: tuple[int, int] | None = None
    if not is_head:
        wanted = _wanted_range(request, stored.size, etag, modified)
        if wanted == "unsatisfiable":
            assert source is not None
            source.close()
            # No Cache-Control: a cached 416 would answer later plain GETs.
            _set_security_headers(request)
            request.setHeader(b"Accept-Ranges", b"bytes")
            request.setHeader(b"Content-Range", b"bytes */%d" % (stored.size,))
            request.setHeader(b"Content-Length", b"0")
            request.setResponseCode(http.REQUESTED_RANGE_NOT_SATISFIABLE)
            return b""
        byte_range = wanted

    _set_security_headers(request)
    _set_validators(request, etag, last_modified)
    request.setHeader(b"Accept-Ranges", b"bytes")
    request.setHeader(b"Content-Type", content_type)
    request.setHeader(b"Content-Disposition", disposition)
    if byte_range is None:
        first, last = 0, stored.size - 1
        request.setResponseCode(http.OK)
    else:
        first, last = byte_range
        request.setResponseCode(http.PARTIAL_CONTENT)
        request.setHeader(b"Content-Range", b"bytes %d-%d/%d" % (first, last, stored.size))
    length = last - first + 1
    request.setHeader(b"Content-Length", b"%d" % (length,))

    if source is None:
        return b""
    if length == 0:
        source.close()
        return b""
    if local:
        # IStore.local: its sources are ILocalByteSource (no isinstance on the
        # runtime Protocol: some 30 us a call).
        local_source = cast(ILocalByteSource, source)
        producer = FileProducer(
            request,
            local_source,
            offset=first,
            length=length,
            clock=clock,
            write_timeout=write_timeout,
            chunk_size=chunk_size,
            transport=(
                sendfile_transport(request)
                if length >= SENDFILE_MIN and local_source.fd is not None
                else None
            ),
        )
        try:
            producer.start()
        except BaseException:
            producer.stopProducing()
            raise
        return NOT_DONE_YET
    # A source that streams itself (an object store's): only the range is its business.
    source.select(ByteRange(first, length))
    StreamedBody(request, source, clock=clock, write_timeout=write_timeout).start()
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
