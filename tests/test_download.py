"""
Tests for hmacfs.http.download: GET/HEAD of a stored upload.

Most tests drive ``render_download`` with a ``DummyRequest`` subclass that
treats a push producer the way ``twisted.web.http.Request`` does (registering
does not drive it) and can push back on every write like a full transport; a
few run the same code behind a real ``Site``/``HTTPChannel`` on a
``StringTransport``.  Files are real temp files.
"""

from __future__ import annotations

import errno
import os
import random
import socket
import struct
import time
from pathlib import Path
from typing import Any

import attrs
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet import defer, reactor, task, threads
from twisted.internet.address import IPv4Address, UNIXAddress
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SkipTest, SynchronousTestCase, TestCase
from twisted.web.http import datetimeToString
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Site
from twisted.web.test.requesthelper import DummyRequest

from hmacfs.http.download import (
    CHUNKS_PER_TURN,
    CONTENT_SECURITY_POLICY,
    DEFAULT_CHUNK_SIZE,
    SENDFILE_MIN,
    SENDFILE_PER_TURN,
    parse_range,
    render_download,
)
from hmacfs.service.diskpool import DiskThreadPoolService
from hmacfs.storage.fs_backend import FileRange, open_stored
from hmacfs.storage.interface import ByteRange
from hmacfs.testing import short_tempdir

PROFILE = settings(derandomize=True, deadline=None, max_examples=200)

MTIME = 1_700_000_000.75  # a fraction, to pin second precision
SMALL_CHUNK = 1000


@attrs.frozen
class FakeStoredFile:
    """Same fields as hmacfs.storage.filesystem.StoredFile (duck-typed by render_download)."""

    path: Path
    size: int
    mtime: float
    content_type: str
    etag: str
    sha256: str | None = None


def make_stored(
    testcase: SynchronousTestCase,
    data: bytes,
    name: str = "file.bin",
    content_type: str = "application/octet-stream",
) -> FakeStoredFile:
    """Write ``data`` to a fresh temp file and describe it like the store would."""
    directory = Path(testcase.mktemp())
    directory.mkdir(parents=True)
    path = directory / name
    path.write_bytes(data)
    os.utime(path, (MTIME, MTIME))
    etag = f'"{len(data):x}-{int(MTIME):x}"'
    return FakeStoredFile(path, len(data), MTIME, content_type, etag)


def sync_run(function: Any, *args: Any) -> defer.Deferred[Any]:
    """The disk pool's run_blocking, run at once (the producer's reads complete in the same turn)."""
    return defer.maybeDeferred(function, *args)


def open_source(stored: Any, run_blocking: Any = sync_run) -> FileRange:
    """The whole stored file opened, as ``FilesystemBackend.open_file`` gives it to a GET."""
    return FileRange(stored, ByteRange(0, stored.size), open_stored(stored), run_blocking)


def download(request: Any, stored: Any, *, run_blocking: Any = sync_run, **kwargs: Any) -> bytes | int:
    """render_download as the resource calls it: a GET brings the opened file, HEAD nothing."""
    source = None if request.method == b"HEAD" else open_source(stored, run_blocking)
    return render_download(request, stored, source=source, **kwargs)


def payload(size: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(size)


def open_fds() -> set[str]:
    """This process's open descriptors (a leaked one shows up as a new entry)."""
    if not os.path.isdir("/proc/self/fd"):
        raise SkipTest("needs /proc/self/fd")
    return set(os.listdir("/proc/self/fd"))


class PushRequest(DummyRequest):
    """
    A DummyRequest that, like twisted.web.http.Request with a push producer,
    only records the producer (DummyRequest itself would spin on it as a pull
    producer), optionally pauses it on every write like a full transport, and
    has a transport that records an abort.
    """

    def __init__(
        self,
        method: bytes = b"GET",
        headers: dict[bytes, bytes] | None = None,
        pause_on_write: bool = False,
    ) -> None:
        super().__init__([b"file"])
        self.method = method
        for name, value in (headers or {}).items():
            self.requestHeaders.addRawHeader(name, value)
        self.producer = None
        self.streaming = None
        self.pause_on_write = pause_on_write
        self.transport = StringTransport()

    def registerProducer(self, producer, streaming):
        if self.producer is not None:
            raise RuntimeError("producer already registered")
        self.producer = producer
        self.streaming = streaming

    def unregisterProducer(self):
        self.producer = None

    def write(self, data):
        super().write(data)
        if self.pause_on_write and self.producer is not None:
            self.producer.pauseProducing()

    @property
    def aborted(self) -> bool:
        return self.transport.disconnected

    @property
    def body(self) -> bytes:
        return b"".join(self.written)


def header(request: DummyRequest, name: bytes) -> bytes | None:
    """The single value of a response header, or None."""
    values = request.responseHeaders.getRawHeaders(name)
    if values is None:
        return None
    assert len(values) == 1, (name, values)
    return values[0]


def serve(
    request: PushRequest,
    stored: FakeStoredFile,
    clock: Clock | None = None,
    write_timeout: float = 30.0,
    chunk_size: int = SMALL_CHUNK,
) -> bytes | int:
    """render_download, then run the reactor turns it schedules until finished."""
    clock = clock if clock is not None else Clock()
    result = download(
        request, stored, clock=clock, write_timeout=write_timeout, chunk_size=chunk_size
    )
    if result is NOT_DONE_YET:
        for _ in range(100_000):
            if request.finished:
                break
            clock.advance(0)
    return result


class ParseRangeTests(SynchronousTestCase):
    """parse_range: one inclusive range clipped to the size, or None / unsatisfiable."""

    def test_forms(self) -> None:
        """a-b, a- and -n select the bytes RFC 9110 14.1.2 says they do."""
        self.assertEqual(parse_range(b"bytes=0-9", 100), (0, 9))
        self.assertEqual(parse_range(b"bytes=10-", 100), (10, 99))
        self.assertEqual(parse_range(b"bytes=-10", 100), (90, 99))
        self.assertEqual(parse_range(b"bytes=99-99", 100), (99, 99))

    def test_clipped(self) -> None:
        """A last position or suffix beyond the end is clipped to the file."""
        self.assertEqual(parse_range(b"bytes=50-1000", 100), (50, 99))
        self.assertEqual(parse_range(b"bytes=-1000", 100), (0, 99))
        self.assertEqual(parse_range(b"bytes=0-" + b"9" * 5000, 100), (0, 99))
        self.assertEqual(parse_range(b"bytes=-" + b"9" * 5000, 100), (0, 99))

    def test_unsatisfiable(self) -> None:
        """A first position at/after the end, any range of an empty file, or -0 select nothing."""
        self.assertEqual(parse_range(b"bytes=100-", 100), "unsatisfiable")
        self.assertEqual(parse_range(b"bytes=100-200", 100), "unsatisfiable")
        self.assertEqual(parse_range(b"bytes=" + b"9" * 5000 + b"-", 100), "unsatisfiable")
        self.assertEqual(parse_range(b"bytes=0-", 0), "unsatisfiable")
        self.assertEqual(parse_range(b"bytes=-5", 0), "unsatisfiable")
        self.assertEqual(parse_range(b"bytes=-0", 100), "unsatisfiable")

    def test_whitespace_and_case(self) -> None:
        """Optional whitespace and a differently cased unit are accepted."""
        self.assertEqual(parse_range(b" bytes = 0 - 9 ", 100), (0, 9))
        self.assertEqual(parse_range(b"bytes=\t5-", 100), (5, 99))
        self.assertEqual(parse_range(b"BYTES=0-9", 100), (0, 9))
        self.assertEqual(parse_range(b"bytes=0-9, ,", 100), (0, 9))

    def test_ignored(self) -> None:
        """Other units, malformed specs and several ranges are ignored (None -> 200)."""
        for header in [
            b"",
            b"bytes",
            b"bytes 0-9",
            b"items=0-9",
            b"bytes=",
            b"bytes=-",
            b"bytes=9-5",
            b"bytes=a-9",
            b"bytes=0-9x",
            b"bytes=1-2-3",
            b"bytes=+1-2",
            b"bytes=0x1-2",
            b"bytes=\xd9\xa1-2",
            b"bytes=0-1,5-6",
            b"bytes=0-1,-5",
            b"bytes=0-1,0-1",
        ]:
            self.assertIsNone(parse_range(header, 100), header)

    @PROFILE
    @given(
        size=st.integers(min_value=0, max_value=2**40),
        header=st.one_of(
            st.binary(max_size=40),
            st.lists(
                st.sampled_from(
                    [b"bytes", b"BYTES", b"=", b"-", b",", b" ", b"\t", b"0", b"1",
                     b"7", b"42", b"18446744073709551616", b"x"]
                ),
                max_size=12,
            ).map(b"".join),
        ),
    )
    def test_result_inside_file(self, size: int, header: bytes) -> None:
        """Whatever the header, a returned range lies inside the file: 0 <= a <= b < size."""
        result = parse_range(header, size)
        if isinstance(result, tuple):
            first, last = result
            self.assertTrue(0 <= first <= last < size, (header, size, result))
        else:
            self.assertIn(result, (None, "unsatisfiable"))

    @PROFILE
    @given(
        size=st.integers(min_value=0, max_value=10**6),
        first=st.integers(min_value=0, max_value=2 * 10**6),
        length=st.integers(min_value=1, max_value=2 * 10**6),
    )
    def test_oracle(self, size: int, first: int, length: int) -> None:
        """bytes=a-b and bytes=-n agree with a direct reading of RFC 9110."""
        last = first + length - 1
        expected = (first, min(last, size - 1)) if first < size else "unsatisfiable"
        self.assertEqual(parse_range(b"bytes=%d-%d" % (first, last), size), expected)
        suffix = (max(0, size - length), size - 1) if size else "unsatisfiable"
        self.assertEqual(parse_range(b"bytes=-%d" % (length,), size), suffix)


class FullResponseTests(SynchronousTestCase):
    """200 responses: body, headers, HEAD."""

    def test_body_byte_exact(self) -> None:
        """A file spanning many chunks (and a short last one) arrives byte for byte."""
        data = payload(3 * CHUNKS_PER_TURN * SMALL_CHUNK + 123)
        stored = make_stored(self, data)
        request = PushRequest()
        self.assertIs(serve(request, stored), NOT_DONE_YET)
        self.assertEqual(request.finished, 1)
        self.assertEqual(request.responseCode, 200)
        self.assertEqual(request.body, data)
        self.assertEqual(header(request, b"Content-Length"), b"%d" % (len(data),))
        self.assertIsNone(request.producer)
        self.assertTrue(request.streaming)

    def test_default_chunk_size(self) -> None:
        """With the default chunk size, a file of a few MiB streams intact."""
        data = payload(5 * DEFAULT_CHUNK_SIZE + 7, seed=1)
        stored = make_stored(self, data)
        request = PushRequest()
        clock = Clock()
        download(request, stored, clock=clock, write_timeout=30.0)
        while not request.finished:
            clock.advance(0)
        self.assertEqual(request.body, data)
        self.assertTrue(all(len(chunk) <= DEFAULT_CHUNK_SIZE for chunk in request.written))

    def test_headers(self) -> None:
        """Every GET carries the security, caching, validator and type headers, no encoding."""
        stored = make_stored(self, b"hello", name="a.tar.gz", content_type="application/gzip")
        request = PushRequest()
        serve(request, stored)
        self.assertEqual(header(request, b"X-Content-Type-Options"), b"nosniff")
        self.assertEqual(
            header(request, b"Content-Security-Policy"),
            b"default-src 'none'; frame-ancestors 'none'; sandbox",
        )
        self.assertEqual(header(request, b"Accept-Ranges"), b"bytes")
        self.assertEqual(header(request, b"ETag"), stored.etag.encode("ascii"))
        self.assertEqual(header(request, b"Last-Modified"), datetimeToString(int(MTIME)))
        self.assertEqual(header(request, b"Cache-Control"), b"private, max-age=86400")
        self.assertEqual(header(request, b"Content-Type"), b"application/gzip")
        self.assertEqual(
            header(request, b"Content-Disposition"), b"attachment; filename*=UTF-8''a.tar.gz"
        )
        self.assertIsNone(header(request, b"Content-Encoding"))
        self.assertIsNone(header(request, b"Content-Range"))

    def test_head(self) -> None:
        """HEAD answers the GET's headers with the full Content-Length and no body."""
        data = payload(5 * SMALL_CHUNK)
        stored = make_stored(self, data, content_type="image/png")
        request = PushRequest(method=b"HEAD")
        self.assertEqual(serve(request, stored), b"")
        self.assertEqual(request.responseCode, 200)
        self.assertEqual(request.body, b"")
        self.assertIsNone(request.producer)
        self.assertEqual(header(request, b"Content-Length"), b"%d" % (len(data),))
        self.assertEqual(header(request, b"Content-Type"), b"image/png")
        self.assertEqual(header(request, b"X-Content-Type-Options"), b"nosniff")
        self.assertEqual(header(request, b"Content-Security-Policy"), CONTENT_SECURITY_POLICY)
        self.assertEqual(header(request, b"ETag"), stored.etag.encode("ascii"))

    def test_head_does_not_open(self) -> None:
        """HEAD never opens the file: it answers from the metadata even if the file is gone."""
        stored = make_stored(self, b"12345")
        stored.path.unlink()
        request = PushRequest(method=b"HEAD")
        self.assertEqual(render_download(request, stored, clock=Clock(), write_timeout=1), b"")
        self.assertEqual(request.responseCode, 200)
        self.assertEqual(header(request, b"Content-Length"), b"5")

    def test_head_ignores_range(self) -> None:
        """HEAD with a Range still answers 200 with the full length."""
        stored = make_stored(self, b"0123456789")
        request = PushRequest(method=b"HEAD", headers={b"Range": b"bytes=2-3"})
        self.assertEqual(serve(request, stored), b"")
        self.assertEqual(request.responseCode, 200)
        self.assertEqual(header(request, b"Content-Length"), b"10")
        self.assertIsNone(header(request, b"Content-Range"))

    def test_empty_file(self) -> None:
        """An empty file answers 200 with Content-Length 0 and no producer, fd closed."""
        stored = make_stored(self, b"")
        before = open_fds()
        request = PushRequest()
        self.assertEqual(serve(request, stored), b"")
        self.assertEqual(request.responseCode, 200)
        self.assertEqual(header(request, b"Content-Length"), b"0")
        self.assertIsNone(request.producer)
        self.assertEqual(open_fds(), before)

    def test_bad_chunk_size(self) -> None:
        """A chunk size below one byte is a programming error."""
        stored = make_stored(self, b"x")
        self.assertRaises(
            ValueError,
            download,
            PushRequest(),
            stored,
            clock=Clock(),
            write_timeout=1,
            chunk_size=0,
        )


class RangeTests(SynchronousTestCase):
    """Single byte ranges on GET: 206, 416, or ignored."""

    def setUp(self) -> None:
        self.data = payload(10 * SMALL_CHUNK + 17, seed=2)
        self.stored = make_stored(self, self.data)
        self.size = len(self.data)

    def get(self, range_value: bytes, **headers: bytes) -> PushRequest:
        request = PushRequest(headers={b"Range": range_value, **headers})
        serve(request, self.stored)
        return request

    def assertPartial(self, request: PushRequest, first: int, last: int) -> None:
        self.assertEqual(request.responseCode, 206)
        self.assertEqual(request.body, self.data[first : last + 1])
        self.assertEqual(
            header(request, b"Content-Range"), b"bytes %d-%d/%d" % (first, last, self.size)
        )
        self.assertEqual(header(request, b"Content-Length"), b"%d" % (last - first + 1,))
        self.assertEqual(request.finished, 1)

    def assertFull(self, request: PushRequest) -> None:
        self.assertEqual(request.responseCode, 200)
        self.assertEqual(request.body, self.data)
        self.assertIsNone(header(request, b"Content-Range"))
        self.assertEqual(header(request, b"Content-Length"), b"%d" % (self.size,))

    def test_first_last(self) -> None:
        """bytes=a-b across chunk boundaries gives exactly those bytes."""
        self.assertPartial(self.get(b"bytes=999-3500"), 999, 3500)

    def test_open_ended(self) -> None:
        """bytes=N- (Conversations' resume) gives the rest of the file."""
        self.assertPartial(self.get(b"bytes=4321-"), 4321, self.size - 1)

    def test_suffix(self) -> None:
        """bytes=-n gives the last n bytes."""
        self.assertPartial(self.get(b"bytes=-1500"), self.size - 1500, self.size - 1)

    def test_beyond_size_clipped(self) -> None:
        """A last position past the end is clipped to the last byte."""
        self.assertPartial(self.get(b"bytes=10000-99999999"), 10000, self.size - 1)

    def test_unsatisfiable(self) -> None:
        """A range starting at the end answers 416, Content-Range */size, no body, no open."""
        before = open_fds()
        request = PushRequest(headers={b"Range": b"bytes=%d-" % (self.size,)})
        self.assertEqual(serve(request, self.stored), b"")
        self.assertEqual(request.responseCode, 416)
        self.assertEqual(header(request, b"Content-Range"), b"bytes */%d" % (self.size,))
        self.assertEqual(header(request, b"Content-Length"), b"0")
        self.assertEqual(request.body, b"")
        self.assertIsNone(request.producer)
        self.assertEqual(header(request, b"X-Content-Type-Options"), b"nosniff")
        self.assertEqual(header(request, b"Content-Security-Policy"), CONTENT_SECURITY_POLICY)
        self.assertIsNone(header(request, b"Cache-Control"))
        self.assertEqual(open_fds(), before)

    def test_empty_file_unsatisfiable(self) -> None:
        """Any range of an empty file is unsatisfiable."""
        stored = make_stored(self, b"")
        request = PushRequest(headers={b"Range": b"bytes=0-"})
        self.assertEqual(serve(request, stored), b"")
        self.assertEqual(request.responseCode, 416)
        self.assertEqual(header(request, b"Content-Range"), b"bytes */0")

    def test_multiple_ranges(self) -> None:
        """Several ranges are ignored: 200 with the whole file."""
        self.assertFull(self.get(b"bytes=0-10,20-30"))

    def test_multiple_range_fields(self) -> None:
        """Two Range fields count as two ranges: 200 with the whole file."""
        request = PushRequest()
        request.requestHeaders.setRawHeaders(b"Range", [b"bytes=0-10", b"bytes=20-30"])
        serve(request, self.stored)
        self.assertFull(request)

    def test_malformed(self) -> None:
        """A malformed Range or another unit is ignored: 200 with the whole file."""
        self.assertFull(self.get(b"bytes=abc"))
        self.assertFull(self.get(b"lines=1-2"))

    def test_if_range_etag_match(self) -> None:
        """If-Range with our (strong) ETag honours the Range."""
        self.assertPartial(
            self.get(b"bytes=5-9", **{"If-Range": self.stored.etag.encode()}), 5, 9
        )

    def test_if_range_etag_mismatch(self) -> None:
        """If-Range with another ETag sends the whole file."""
        self.assertFull(self.get(b"bytes=5-9", **{"If-Range": b'"other"'}))

    def test_if_range_weak_etag(self) -> None:
        """If-Range uses strong comparison: a weak form of our tag does not match."""
        self.assertFull(self.get(b"bytes=5-9", **{"If-Range": b"W/" + self.stored.etag.encode()}))

    def test_if_range_date_match(self) -> None:
        """If-Range with exactly our Last-Modified honours the Range."""
        date = datetimeToString(int(MTIME))
        self.assertPartial(self.get(b"bytes=5-9", **{"If-Range": date}), 5, 9)

    def test_if_range_date_mismatch(self) -> None:
        """If-Range with any other date, later ones included, sends the whole file."""
        self.assertFull(self.get(b"bytes=5-9", **{"If-Range": datetimeToString(int(MTIME) + 1)}))
        self.assertFull(self.get(b"bytes=5-9", **{"If-Range": datetimeToString(int(MTIME) - 1)}))
        self.assertFull(self.get(b"bytes=5-9", **{"If-Range": b"not a date"}))


class ConditionalTests(SynchronousTestCase):
    """If-None-Match / If-Modified-Since -> 304."""

    def setUp(self) -> None:
        self.data = b"conditional body"
        self.stored = make_stored(self, self.data)
        self.etag = self.stored.etag.encode("ascii")

    def request(self, method: bytes = b"GET", **headers: bytes) -> PushRequest:
        request = PushRequest(method=method, headers={k.encode(): v for k, v in headers.items()})
        serve(request, self.stored)
        return request

    def assertNotModified(self, request: PushRequest) -> None:
        self.assertEqual(request.responseCode, 304)
        self.assertEqual(request.body, b"")
        self.assertIsNone(request.producer)
        self.assertEqual(header(request, b"ETag"), self.etag)
        self.assertEqual(header(request, b"Last-Modified"), datetimeToString(int(MTIME)))
        self.assertEqual(header(request, b"X-Content-Type-Options"), b"nosniff")
        self.assertEqual(header(request, b"Content-Security-Policy"), CONTENT_SECURITY_POLICY)
        self.assertIsNone(header(request, b"Content-Type"))
        self.assertIsNone(header(request, b"Content-Length"))

    def assertFull(self, request: PushRequest) -> None:
        self.assertEqual(request.responseCode, 200)
        self.assertEqual(request.body, self.data)

    def test_if_none_match(self) -> None:
        """Our ETag in If-None-Match answers 304 without a body."""
        self.assertNotModified(self.request(**{"If-None-Match": self.etag}))

    def test_if_none_match_head(self) -> None:
        """HEAD is conditional too."""
        self.assertNotModified(self.request(b"HEAD", **{"If-None-Match": self.etag}))

    def test_if_none_match_star(self) -> None:
        """If-None-Match: * matches any existing file."""
        self.assertNotModified(self.request(**{"If-None-Match": b"*"}))

    def test_if_none_match_weak(self) -> None:
        """If-None-Match uses weak comparison: W/ plus our tag matches."""
        self.assertNotModified(self.request(**{"If-None-Match": b"W/" + self.etag}))

    def test_if_none_match_list(self) -> None:
        """Our tag anywhere in a list (tags may hold commas) matches."""
        value = b'"a,b", W/"x" ,' + self.etag
        self.assertNotModified(self.request(**{"If-None-Match": value}))

    def test_if_none_match_other(self) -> None:
        """Other tags, or our tag without its quotes, give the full file."""
        self.assertFull(self.request(**{"If-None-Match": b'"other", W/"other2"'}))
        self.assertFull(self.request(**{"If-None-Match": self.etag.strip(b'"')}))

    def test_if_none_match_beats_range(self) -> None:
        """A matching If-None-Match answers 304 even with a Range."""
        self.assertNotModified(self.request(**{"If-None-Match": self.etag, "Range": b"bytes=0-1"}))

    def test_if_modified_since(self) -> None:
        """A date at or after the mtime (second precision) answers 304."""
        self.assertNotModified(self.request(**{"If-Modified-Since": datetimeToString(int(MTIME))}))
        later = datetimeToString(int(MTIME) + 3600)
        self.assertNotModified(self.request(**{"If-Modified-Since": later}))

    def test_if_modified_since_older(self) -> None:
        """A date before the mtime, or garbage, gives the full file."""
        earlier = datetimeToString(int(MTIME) - 1)
        self.assertFull(self.request(**{"If-Modified-Since": earlier}))
        self.assertFull(self.request(**{"If-Modified-Since": b"yesterday"}))
        self.assertFull(self.request(**{"If-Modified-Since": b""}))

    def test_if_none_match_overrides_if_modified_since(self) -> None:
        """With If-None-Match present, If-Modified-Since is ignored (RFC 9110 13.1.3)."""
        later = datetimeToString(int(MTIME) + 3600)
        self.assertFull(
            self.request(**{"If-None-Match": b'"other"', "If-Modified-Since": later})
        )

    @PROFILE
    @given(
        method=st.sampled_from([b"GET", b"HEAD"]),
        values=st.dictionaries(
            st.sampled_from([b"If-None-Match", b"If-Modified-Since", b"If-Range", b"Range"]),
            st.binary(max_size=40),
        ),
    )
    def test_any_headers(self, method: bytes, values: dict[bytes, bytes]) -> None:
        """Any conditional/range header bytes give a sane answer, never an exception."""
        request = PushRequest(method=method, headers=values)
        serve(request, self.stored)
        self.assertIn(request.responseCode, (200, 206, 304, 416))
        if request.responseCode == 206:
            content_range = header(request, b"Content-Range")
            first, last = map(int, content_range[6:].split(b"/")[0].split(b"-"))
            self.assertEqual(request.body, self.data[first : last + 1])
        elif request.responseCode == 200 and method == b"GET":
            self.assertEqual(request.body, self.data)
        else:
            self.assertEqual(request.body, b"")


class ContentTypeTests(SynchronousTestCase):
    """What the browser is allowed to render inline."""

    def disposition(self, content_type: str, name: str = "f") -> tuple[bytes, bytes]:
        stored = make_stored(self, b"data", name=name, content_type=content_type)
        request = PushRequest()
        serve(request, stored)
        self.assertEqual(header(request, b"X-Content-Type-Options"), b"nosniff")
        self.assertEqual(header(request, b"Content-Security-Policy"), CONTENT_SECURITY_POLICY)
        return header(request, b"Content-Type"), header(request, b"Content-Disposition")

    def test_inline(self) -> None:
        """Images, video, audio and exactly text/plain are served inline with their type."""
        for content_type in ["image/png", "video/mp4", "audio/ogg", "text/plain",
                             "text/plain; charset=utf-8", "IMAGE/JPEG"]:
            self.assertEqual(
                self.disposition(content_type), (content_type.encode(), b"inline"), content_type
            )

    def test_attachment(self) -> None:
        """text/html, PDF and any other type keep their type but become attachments."""
        for content_type in ["text/html", "application/pdf", "text/plain2", "text/xml",
                             "application/xhtml+xml"]:
            self.assertEqual(
                self.disposition(content_type, name="x.y"),
                (content_type.encode(), b"attachment; filename*=UTF-8''x.y"),
                content_type,
            )

    def test_non_ascii_filename(self) -> None:
        """The attachment filename* is the UTF-8, percent-encoded basename (RFC 8187)."""
        _, disposition = self.disposition("application/pdf", name="résumé ü's.pdf")
        self.assertEqual(
            disposition, b"attachment; filename*=UTF-8''r%C3%A9sum%C3%A9%20%C3%BC%27s.pdf"
        )

    def test_missing_or_broken_type(self) -> None:
        """An empty, injected, non-ASCII or shapeless type becomes an octet-stream attachment."""
        for content_type in ["", "  ", "text/plain\r\nX-Evil: 1", "text/plain\n",
                             "image/pngé", "png", "text/"]:
            content, disposition = self.disposition(content_type)
            self.assertEqual(content, b"application/octet-stream", repr(content_type))
            self.assertEqual(disposition, b"attachment; filename*=UTF-8''f", repr(content_type))


class StreamingTests(SynchronousTestCase):
    """The push producer: turns, pausing, idle timeout, closing the file."""

    def setUp(self) -> None:
        self.data = payload(20 * SMALL_CHUNK, seed=3)
        self.stored = make_stored(self, self.data)
        self.clock = Clock()
        self.fds = open_fds()

    def start(self, write_timeout: float = 10.0, pause_on_write: bool = True) -> PushRequest:
        request = PushRequest(pause_on_write=pause_on_write)
        result = download(
            request, self.stored, clock=self.clock, write_timeout=write_timeout,
            chunk_size=SMALL_CHUNK,
        )
        self.assertIs(result, NOT_DONE_YET)
        self.assertEqual(request.responseCode, 200)
        return request

    def test_yields_between_turns(self) -> None:
        """A consumer that never pushes back gets CHUNKS_PER_TURN chunks per reactor turn."""
        request = self.start(pause_on_write=False)
        self.assertEqual(len(request.written), CHUNKS_PER_TURN)
        self.assertFalse(request.finished)
        turns = [call for call in self.clock.getDelayedCalls() if call.getTime() == 0]
        self.assertEqual(len(turns), 1)
        # Clock.advance(0) also runs the turns scheduled while it runs.
        self.clock.advance(0)
        self.assertEqual(request.finished, 1)
        self.assertEqual(request.body, self.data)

    def test_pause_and_resume(self) -> None:
        """A paused producer writes nothing until resumed, then one chunk per push-back."""
        request = self.start()
        self.assertEqual(len(request.written), 1)
        self.clock.advance(0)
        self.clock.advance(5)
        self.assertEqual(len(request.written), 1)
        request.producer.resumeProducing()
        self.assertEqual(len(request.written), 2)
        self.assertEqual(request.body, self.data[: 2 * SMALL_CHUNK])

    def test_resume_during_write(self) -> None:
        """A resume arriving inside our own write continues the running loop, not a nested one."""
        request = PushRequest()
        original_write = request.write

        def write(data: bytes) -> None:
            original_write(data)
            request.producer.pauseProducing()
            request.producer.resumeProducing()

        request.write = write
        download(
            request, self.stored, clock=self.clock, write_timeout=10, chunk_size=SMALL_CHUNK
        )
        self.assertEqual(len(request.written), CHUNKS_PER_TURN)
        while not request.finished:
            self.clock.advance(0)
        self.assertEqual(request.body, self.data)

    def test_finishes_when_last_write_fills_transport(self) -> None:
        """The request finishes on the last chunk even if that write paused the producer."""
        request = self.start()
        while request.producer is not None:
            request.producer.resumeProducing()
        self.assertEqual(request.finished, 1)
        self.assertEqual(request.body, self.data)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual(open_fds(), self.fds)

    def test_idle_timeout_aborts(self) -> None:
        """A download paused for write_timeout seconds is aborted and its file closed."""
        request = self.start(write_timeout=10.0)
        self.clock.advance(9.9)
        self.assertFalse(request.aborted)
        self.clock.advance(0.1)
        self.assertTrue(request.aborted)
        self.assertFalse(request.finished)
        self.assertIsNone(request.producer)
        self.assertEqual(open_fds(), self.fds)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_idle_timer_counts_from_last_progress(self) -> None:
        """The timeout runs from the last written chunk, not from the start."""
        request = self.start(write_timeout=10.0)
        self.clock.advance(6)
        request.producer.resumeProducing()
        self.clock.advance(6)
        self.assertFalse(request.aborted)
        self.clock.advance(4)
        self.assertTrue(request.aborted)

    def test_progressing_download_never_aborted(self) -> None:
        """A slow download that keeps moving is never cut off, however long it takes."""
        request = self.start(write_timeout=10.0)
        while request.producer is not None:
            self.clock.advance(4)
            self.assertFalse(request.aborted)
            request.producer.resumeProducing()
        self.assertFalse(request.aborted)
        self.assertEqual(request.finished, 1)
        self.assertEqual(request.body, self.data)
        self.assertGreater(self.clock.seconds(), 5 * 10.0)

    def test_no_timeout_when_disabled(self) -> None:
        """write_timeout <= 0 disables the idle timer."""
        request = self.start(write_timeout=0)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.clock.advance(10**6)
        self.assertFalse(request.aborted)

    def test_fd_closed_after_finish(self) -> None:
        """The file and the timers are gone once the response is finished."""
        request = self.start(pause_on_write=False)
        self.assertNotEqual(open_fds(), self.fds)
        while not request.finished:
            self.clock.advance(0)
        self.assertEqual(open_fds(), self.fds)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_client_disconnect(self) -> None:
        """When the client goes away (notifyFinish errback) the file is closed, writing stops."""
        request = self.start()
        producer = request.producer
        request.processingFailed(Failure(ConnectionDone()))
        self.assertEqual(open_fds(), self.fds)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        producer.resumeProducing()
        self.clock.advance(100)
        self.assertEqual(len(request.written), 1)
        self.assertFalse(request.finished)

    def test_stop_producing(self) -> None:
        """stopProducing (transport gone) closes the file; a later errback is harmless."""
        request = self.start(pause_on_write=False)
        request.producer.stopProducing()
        self.assertEqual(open_fds(), self.fds)
        written = len(request.written)
        self.clock.advance(0)
        self.assertEqual(len(request.written), written)
        request.processingFailed(Failure(ConnectionLost()))
        self.assertEqual(open_fds(), self.fds)

    def test_file_shrinks(self) -> None:
        """A file truncated mid-download aborts the connection instead of finishing short."""
        request = self.start()
        os.truncate(self.stored.path, SMALL_CHUNK + 500)
        request.producer.resumeProducing()
        self.assertEqual(len(request.body), SMALL_CHUNK + 500)
        self.assertFalse(request.aborted)
        request.producer.resumeProducing()
        self.assertTrue(request.aborted)
        self.assertFalse(request.finished)
        self.assertEqual(open_fds(), self.fds)


class OpenFailureTests(SynchronousTestCase):
    """The file is opened (``open_stored``, in the job of ``IStore.open_file``) before the response is touched; failures are FileNotFoundError."""

    def assertNotFound(self, stored: FakeStoredFile) -> None:
        before = open_fds()
        request = PushRequest()
        self.assertRaises(
            FileNotFoundError, download, request, stored, clock=Clock(), write_timeout=1
        )
        self.assertIsNone(request.responseCode)
        self.assertEqual(list(request.responseHeaders.getAllRawHeaders()), [])
        self.assertEqual(open_fds(), before)

    def test_missing(self) -> None:
        """A vanished file raises FileNotFoundError."""
        stored = make_stored(self, b"abc")
        stored.path.unlink()
        self.assertNotFound(stored)

    def test_symlink(self) -> None:
        """A symlink is never followed (O_NOFOLLOW)."""
        stored = make_stored(self, b"abc")
        link = stored.path.with_name("link")
        link.symlink_to(stored.path)
        self.assertNotFound(attrs.evolve(stored, path=link))

    def test_directory(self) -> None:
        """A directory is not a stored file, even with a matching size."""
        stored = make_stored(self, b"abc")
        directory = stored.path.parent
        self.assertNotFound(
            attrs.evolve(stored, path=directory, size=directory.stat().st_size)
        )

    def test_size_changed(self) -> None:
        """A file whose size differs from the metadata is not served."""
        stored = make_stored(self, b"abc")
        stored.path.write_bytes(b"abcdef")
        self.assertNotFound(stored)


class DownloadResource(Resource):
    isLeaf = True

    def __init__(self, stored: FakeStoredFile, clock: Clock, write_timeout: float) -> None:
        super().__init__()
        self.stored = stored
        self.clock = clock
        self.write_timeout = write_timeout

    chunk_size = SMALL_CHUNK
    seen: list[Any] | None = None
    run_blocking: Any = staticmethod(sync_run)

    def render_GET(self, request):
        if self.seen is not None:
            self.seen.append(request)
        return download(
            request, self.stored, clock=self.clock, write_timeout=self.write_timeout,
            chunk_size=self.chunk_size, run_blocking=self.run_blocking,
        )

    render_HEAD = render_GET


class RealChannelTests(SynchronousTestCase):
    """The same code behind a real Site/HTTPChannel on a StringTransport."""

    def setUp(self) -> None:
        self.data = payload(12 * SMALL_CHUNK + 5, seed=4)
        self.stored = make_stored(self, self.data, content_type="text/plain")
        self.clock = Clock()
        self.fds = open_fds()
        site = Site(DownloadResource(self.stored, self.clock, 10.0), reactor=self.clock)
        self.channel = site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 4321))
        self.transport = StringTransport()
        self.channel.makeConnection(self.transport)

    def send(self, method: bytes, *headers: bytes) -> None:
        lines = [method + b" /file HTTP/1.1", b"Host: example.org", *headers]
        self.channel.dataReceived(b"\r\n".join(lines) + b"\r\n\r\n")

    def response(self) -> tuple[bytes, dict[bytes, bytes], bytes]:
        head, _, body = self.transport.value().partition(b"\r\n\r\n")
        status, *lines = head.split(b"\r\n")
        fields = dict(line.split(b": ", 1) for line in lines)
        return status, {name.lower(): value for name, value in fields.items()}, body

    def test_get(self) -> None:
        """GET over HTTP/1.1 streams the exact body with a Content-Length (not chunked)."""
        self.send(b"GET")
        self.clock.advance(0)
        status, fields, body = self.response()
        self.assertEqual(status, b"HTTP/1.1 200 OK")
        self.assertEqual(fields[b"content-length"], b"%d" % (len(self.data),))
        self.assertNotIn(b"transfer-encoding", fields)
        self.assertEqual(fields[b"content-disposition"], b"inline")
        self.assertEqual(body, self.data)
        self.assertEqual(open_fds(), self.fds)

    def test_range(self) -> None:
        """A resume request (bytes=N-) over a real channel gets 206 and the tail."""
        self.send(b"GET", b"Range: bytes=4000-")
        self.clock.advance(0)
        status, fields, body = self.response()
        self.assertEqual(status, b"HTTP/1.1 206 Partial Content")
        self.assertEqual(
            fields[b"content-range"], b"bytes 4000-%d/%d" % (len(self.data) - 1, len(self.data))
        )
        self.assertEqual(body, self.data[4000:])

    def test_head(self) -> None:
        """Twisted keeps our full Content-Length on HEAD (clients check it before GET)."""
        self.send(b"HEAD")
        status, fields, body = self.response()
        self.assertEqual(status, b"HTTP/1.1 200 OK")
        self.assertEqual(fields[b"content-length"], b"%d" % (len(self.data),))
        self.assertEqual(body, b"")

    def test_stalled_client_aborted(self) -> None:
        """A client that stops reading is aborted after the idle timeout; teardown is clean."""
        self.send(b"GET")
        # What a full TCP send buffer does (site.buildProtocol wraps the channel).
        self.channel._channel.pauseProducing()
        self.clock.advance(0)
        self.assertFalse(self.transport.disconnected)
        self.clock.advance(10)
        self.assertTrue(self.transport.disconnected)
        self.channel.connectionLost(Failure(ConnectionLost()))
        self.assertEqual(open_fds(), self.fds)

    def test_client_disconnects(self) -> None:
        """A connection lost mid-download closes the file; later turns write nothing."""
        self.send(b"GET")
        self.channel.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(open_fds(), self.fds)
        sent = self.transport.value()
        self.clock.advance(0)
        self.clock.advance(100)
        self.assertEqual(self.transport.value(), sent)
        self.assertFalse(self.transport.disconnected)


def _read_response(sock: socket.socket, delay: float = 0.0, recv_size: int = 1 << 20) -> tuple[bytes, dict[bytes, bytes], bytes]:
    """Read one Content-Length response from a blocking socket (in a thread)."""
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = sock.recv(1)
        if not chunk:
            raise ConnectionError(f"closed after {head!r}")
        head += chunk
    status, *lines = head[:-4].split(b"\r\n")
    fields = {name.lower(): value for name, value in (line.split(b": ", 1) for line in lines)}
    if delay:
        time.sleep(delay)  # let the server fill the socket and wait for "writable"
    wanted = int(fields[b"content-length"])
    parts: list[bytes] = []
    got = 0
    while got < wanted:
        chunk = sock.recv(min(recv_size, wanted - got))
        if not chunk:
            break
        parts.append(chunk)
        got += len(chunk)
    return status, fields, b"".join(parts)


def read_until_closed(sock: socket.socket, reset_ok: bool = True) -> bytes:
    """Everything the server sends until it closes (or, if ``reset_ok``, resets) the connection."""
    received: list[bytes] = []
    try:
        while chunk := sock.recv(1 << 20):
            received.append(chunk)
    except ConnectionResetError:
        if not reset_ok:
            raise
    return b"".join(received)


class SendfileTests(TestCase):
    """
    Bodies of SENDFILE_MIN bytes and more over real loopback sockets, where
    ``os.sendfile`` writes them: exact bytes, Range, a slow reader (the
    socket fills and the producer waits for "writable"), keep-alive, UNIX
    sockets, the fallback when sendfile is refused, and clean teardown.
    """

    size = 3 * SENDFILE_PER_TURN // 2 + 12345  # more than one turn
    timeout = 60

    def setUp(self) -> None:
        self.data = payload(self.size, seed=9)
        self.stored = make_stored(self, self.data)
        self.calls = {"sent": 0, "again": 0}
        real_sendfile = os.sendfile

        def spy(out: int, fd: int, offset: int, count: int) -> int:
            try:
                sent = real_sendfile(out, fd, offset, count)
            except BlockingIOError:
                self.calls["again"] += 1
                raise
            self.calls["sent"] += 1
            return sent

        self.patch(os, "sendfile", spy)
        self.requests: list[Any] = []

    def listen(self, write_timeout: float = 30.0, unix: bool = False) -> Any:
        resource = DownloadResource(self.stored, reactor, write_timeout)
        resource.chunk_size = DEFAULT_CHUNK_SIZE
        # The real disk pool: every read, sendfile and close is a job on its threads.
        pool = DiskThreadPoolService(reactor)
        pool.startService()
        self.addCleanup(pool.stopService)
        resource.run_blocking = pool.run_blocking
        resource.seen = self.requests
        site = Site(resource)
        if unix:
            port = reactor.listenUNIX(os.fspath(short_tempdir(self) / "s"), site)
        else:
            port = reactor.listenTCP(0, site, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        return port.getHost()

    def file_open(self) -> bool:
        """Whether this process still has the stored file open (the producer owns one fd)."""
        target = os.fspath(self.stored.path)
        for fd in open_fds():
            try:
                if os.readlink(f"/proc/self/fd/{fd}") == target:
                    return True
            except OSError:
                pass
        return False

    def connect(self, address: Any, small_buffer: bool = False) -> socket.socket:
        """A blocking client socket; ``small_buffer`` makes the server's sends fill it early."""
        if isinstance(address, UNIXAddress):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            family_address: Any = address.name
        else:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            family_address = (address.host, address.port)
        if small_buffer:
            # Before connect: TCP fixes its window scale at the handshake.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect(family_address)
        sock.settimeout(30)
        self.addCleanup(sock.close)
        return sock

    def get(self, address: Any, *headers: bytes, delay: float = 0.0, requests: int = 1) -> Any:
        def run() -> list[tuple[bytes, dict[bytes, bytes], bytes]]:
            sock = self.connect(address, small_buffer=delay > 0)
            answers = []
            for _ in range(requests):
                lines = [b"GET /file HTTP/1.1", b"Host: example.org", *headers]
                sock.sendall(b"\r\n".join(lines) + b"\r\n\r\n")
                answers.append(_read_response(sock, delay))
            return answers

        return threads.deferToThread(run)

    @defer.inlineCallbacks
    def test_get(self) -> Any:
        """A big GET goes out with sendfile, byte-exact, and the access log's byte count is right."""
        [(status, fields, body)] = yield self.get(self.listen())
        self.assertEqual(status, b"HTTP/1.1 200 OK")
        self.assertEqual(fields[b"content-length"], b"%d" % (self.size,))
        self.assertEqual(body, self.data)
        self.assertGreater(self.calls["sent"], 1)
        self.assertEqual(self.requests[0].sentLength, self.size)

    @defer.inlineCallbacks
    def test_range(self) -> Any:
        """A Range answer is sendfile'd from the right offset."""
        [(status, fields, body)] = yield self.get(self.listen(), b"Range: bytes=1000-")
        self.assertEqual(status, b"HTTP/1.1 206 Partial Content")
        self.assertEqual(body, self.data[1000:])
        self.assertGreater(self.calls["sent"], 0)

    @defer.inlineCallbacks
    def test_slow_reader(self) -> Any:
        """A client that reads late fills the socket: the producer waits for writable and loses nothing."""
        [(status, _, body)] = yield self.get(self.listen(), delay=0.5, requests=1)
        self.assertEqual(status, b"HTTP/1.1 200 OK")
        self.assertEqual(body, self.data)
        self.assertGreater(self.calls["again"], 0)

    @defer.inlineCallbacks
    def test_keep_alive(self) -> Any:
        """Two GETs on one connection: the second response starts cleanly after a sendfile'd body."""
        answers = yield self.get(self.listen(), requests=2)
        self.assertEqual([body for _, _, body in answers], [self.data, self.data])

    @defer.inlineCallbacks
    def test_http10_close(self) -> Any:
        """HTTP/1.0 without keep-alive: the whole body arrives before the connection closes."""
        address = self.listen()

        def fetch() -> bytes:
            sock = self.connect(address)
            sock.sendall(b"GET /file HTTP/1.0\r\n\r\n")
            return read_until_closed(sock, reset_ok=False)

        received = yield threads.deferToThread(fetch)
        head, _, body = received.partition(b"\r\n\r\n")
        self.assertTrue(head.startswith(b"HTTP/1.0 200 OK"), head[:40])
        self.assertEqual(body, self.data)
        self.assertGreater(self.calls["sent"], 0)

    @defer.inlineCallbacks
    def test_unix_socket(self) -> Any:
        """nginx talks to us over a UNIX socket: sendfile works there too."""
        [(_, _, body)] = yield self.get(self.listen(unix=True))
        self.assertEqual(body, self.data)
        self.assertGreater(self.calls["sent"], 0)

    @defer.inlineCallbacks
    def test_small_body_not_sendfiled(self) -> Any:
        """Below SENDFILE_MIN the body rides in the transport's buffer with the headers."""
        [(_, _, body)] = yield self.get(self.listen(), b"Range: bytes=0-%d" % (SENDFILE_MIN - 2,))
        self.assertEqual(body, self.data[: SENDFILE_MIN - 1])
        self.assertEqual(self.calls, {"sent": 0, "again": 0})

    @defer.inlineCallbacks
    def test_refused_falls_back_to_read(self) -> Any:
        """A file system without sendfile (EINVAL) is served with pread and write instead."""

        def refuse(out: int, fd: int, offset: int, count: int) -> int:
            self.calls["sent"] += 1
            raise OSError(errno.EINVAL, "sendfile not supported here")

        self.patch(os, "sendfile", refuse)
        [(status, _, body)] = yield self.get(self.listen())
        self.assertEqual(status, b"HTTP/1.1 200 OK")
        self.assertEqual(body, self.data)
        self.assertEqual(self.calls["sent"], 1)

    @defer.inlineCallbacks
    def test_file_shrinks(self) -> Any:
        """A file truncated while it is served: the client gets a short body and a closed connection."""
        real_sendfile = os.sendfile
        half = self.size // 2

        def truncating(out: int, fd: int, offset: int, count: int) -> int:
            if os.fstat(fd).st_size > half:
                os.truncate(self.stored.path, half)
            return real_sendfile(out, fd, offset, count)

        self.patch(os, "sendfile", truncating)
        address = self.listen()

        def fetch() -> bytes:
            sock = self.connect(address)
            sock.sendall(b"GET /file HTTP/1.1\r\nHost: example.org\r\n\r\n")
            return read_until_closed(sock)

        received = yield threads.deferToThread(fetch)
        head, _, body = received.partition(b"\r\n\r\n")
        self.assertIn(b"Content-Length: %d" % (self.size,), head)
        # An abort is a reset, and a reset may discard what the client had not read yet.
        self.assertLessEqual(len(body), half)
        self.assertTrue(self.data.startswith(body))
        yield wait_until(lambda: not self.file_open())
        self.assertEqual(len(self.requests), 1)
        self.assertEqual(self.requests[0].sentLength, half)

    @defer.inlineCallbacks
    def test_client_gone(self) -> Any:
        """A client that leaves mid-body: the file is closed and nothing is logged as an error."""
        address = self.listen()

        def leave() -> None:
            sock = self.connect(address)
            sock.sendall(b"GET /file HTTP/1.1\r\nHost: example.org\r\n\r\n")
            sock.recv(65536)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            sock.close()  # RST

        yield threads.deferToThread(leave)
        self.assertEqual(len(self.requests), 1)
        # The close is a job on the disk pool and the abort's connectionLost a reactor
        # turn: either may come first, both must come.
        yield wait_until(lambda: not self.file_open() and self.requests[0]._disconnected)
        self.assertFalse(self.file_open())
        self.assertTrue(self.requests[0]._disconnected)
        self.assertEqual(self.flushLoggedErrors(), [])

    @defer.inlineCallbacks
    def test_stalled_reader_aborted(self) -> Any:
        """A client that stops reading is cut off after WriteTimeout, as on the pread path."""
        address = self.listen(write_timeout=0.5)

        def stall() -> bytes:
            sock = self.connect(address, small_buffer=True)
            sock.sendall(b"GET /file HTTP/1.1\r\nHost: example.org\r\n\r\n")
            time.sleep(2.0)
            received = read_until_closed(sock)
            sock.close()
            return received

        received = yield threads.deferToThread(stall)
        self.assertLess(len(received), self.size)
        self.assertEqual(len(self.requests), 1)
        yield wait_until(lambda: not self.file_open())


def wait_until(condition: Any, timeout: float = 10.0) -> defer.Deferred[None]:
    """Poll ``condition`` on the reactor until it holds (fails the test after ``timeout``)."""
    deadline = time.monotonic() + timeout

    def check() -> Any:
        if condition():
            return None
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        return task.deferLater(reactor, 0.02, check)

    return task.deferLater(reactor, 0, check)
