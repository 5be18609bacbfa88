"""
The resource tree and channel behaviour that is not about the body:
CORS, OPTIONS, session tokens, GET retries, idle timeouts.
"""

from __future__ import annotations

import errno
import os
import re
from pathlib import Path, PurePosixPath
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.defer import Deferred, succeed
from twisted.internet.error import ConnectionLost
from twisted.logger import LogLevel, globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from hmacfs.storage.interface import ByteRange, StoredFile
from hmacfs.testing import ManualRunner, SiteHarness, make_config, put_head, status_of
from tests.test_paths import private_names

UUID = "0d5a6c2e-7c1b-4f43-8d4e-3b7f3a1e9c00"


class HarnessMixin:
    def setUp(self) -> None:
        self.store = Path(self.mktemp()).resolve()
        self.store.mkdir()
        self.harness = SiteHarness(make_config(self.store, **self.overrides()))

    def overrides(self) -> dict:
        return {"enable_get_retries": False}

    def request(self, raw: bytes) -> bytes:
        protocol, transport = self.harness.connect()
        protocol.dataReceived(raw)
        return transport.value()


class CORSTests(HarnessMixin, SynchronousTestCase):
    def test_options_without_auth(self) -> None:
        """OPTIONS on any upload path is 204 with the CORS lists, no MAC needed."""
        answer = self.request(f"OPTIONS /upload/{UUID}/x.png HTTP/1.1\r\nHost: h\r\n\r\n".encode())
        self.assertTrue(answer.startswith(b"HTTP/1.1 204 "), answer)
        for header in (
            b"Access-Control-Allow-Origin: *",
            b"Access-Control-Allow-Methods: GET, HEAD, PUT, POST, PATCH, DELETE, OPTIONS",
            b"Access-Control-Max-Age: 7200",
        ):
            self.assertIn(header, answer)
        allow = re.search(rb"Access-Control-Allow-Headers: ([^\r]*)", answer).group(1)
        for name in (b"Authorization", b"Content-Type", b"X-Session-Token", b"Range"):
            self.assertIn(name, allow)
        expose = re.search(rb"Access-Control-Expose-Headers: ([^\r]*)", answer).group(1)
        for name in (b"X-Session-Token", b"Content-Range", b"ETag", b"Location"):
            self.assertIn(name, expose)
        self.assertNotIn(b"Access-Control-Allow-Credentials", answer)

    def test_errors_carry_cors(self) -> None:
        """A 404 (and any error) carries Access-Control-Allow-Origin so scripts see the status."""
        answer = self.request(f"GET /upload/{UUID}/missing HTTP/1.1\r\nHost: h\r\n\r\n".encode())
        self.assertTrue(answer.startswith(b"HTTP/1.1 404 "), answer)
        self.assertIn(b"Access-Control-Allow-Origin: *", answer)

    def test_preflight_only_headers_only_on_options(self) -> None:
        """A PUT's 201 and an error carry Allow-Origin and Expose-Headers (all a browser
        reads there); Allow-Methods, Allow-Headers and Max-Age only answer OPTIONS."""
        body = b"cors body"
        put = self.request(put_head(f"{UUID}/cors.txt", len(body)) + body)
        missing = self.request(f"GET /upload/{UUID}/missing HTTP/1.1\r\nHost: h\r\n\r\n".encode())
        self.assertTrue(put.startswith(b"HTTP/1.1 201 "), put)
        for answer in (put, missing):
            self.assertIn(b"Access-Control-Allow-Origin: *", answer)
            expose = re.search(rb"Access-Control-Expose-Headers: ([^\r]*)", answer).group(1)
            self.assertIn(b"X-Session-Token", expose)
            for preflight_only in (b"Access-Control-Allow-Methods", b"Access-Control-Allow-Headers",
                                   b"Access-Control-Max-Age"):
                self.assertNotIn(preflight_only, answer)

    def test_session_token_generated(self) -> None:
        """Without X-Session-Token the server returns a fresh unpredictable one."""
        first = self.request(f"OPTIONS /upload/{UUID}/a HTTP/1.1\r\n\r\n".encode())
        second = self.request(f"OPTIONS /upload/{UUID}/a HTTP/1.1\r\n\r\n".encode())
        token1 = re.search(rb"X-Session-Token: (\S+)", first).group(1)
        token2 = re.search(rb"X-Session-Token: (\S+)", second).group(1)
        self.assertNotEqual(token1, token2)
        self.assertGreaterEqual(len(token1), 24)

    def test_session_tokens_unique_across_batches(self) -> None:
        """
        Generated tokens come from batches of random bytes: across several batches no
        token repeats, and each has the shape of secrets.token_urlsafe(24).
        """
        from hmacfs.http import resource

        source = resource._TokenSource()
        tokens = [source.token() for _ in range(3 * source.BATCH + 5)]
        self.assertEqual(len(set(tokens)), len(tokens))
        for token in tokens:
            self.assertRegex(token, rb"^[A-Za-z0-9_-]{32}$")

    def test_session_token_batch_dropped_after_fork(self) -> None:
        """A forked child never hands out the tokens its parent read (the batch is dropped)."""
        from hmacfs.http import resource

        source = resource._TokenSource()
        source.token()
        reads: list[int] = []
        real_urandom = os.urandom

        def counting_urandom(n: int) -> bytes:
            reads.append(n)
            return real_urandom(n)

        self.patch(resource.os, "urandom", counting_urandom)
        source.token()
        self.assertEqual(reads, [])  # still in the first batch
        source.forget()
        source.token()
        self.assertEqual(reads, [source.SIZE * source.BATCH])

    def test_session_token_echoed(self) -> None:
        """A well-formed X-Session-Token from the client is echoed back."""
        answer = self.request(
            f"OPTIONS /upload/{UUID}/a HTTP/1.1\r\nX-Session-Token: abcDEF123_-xyz\r\n\r\n".encode()
        )
        self.assertIn(b"X-Session-Token: abcDEF123_-xyz", answer)

    def test_outside_prefix_404(self) -> None:
        """Paths outside UploadSubDir are 404, never a listing."""
        answer = self.request(b"GET / HTTP/1.1\r\n\r\n")
        self.assertTrue(answer.startswith(b"HTTP/1.1 404 "), answer)

    def test_unknown_method_405(self) -> None:
        """A method without a body that we do not serve gets 405 with Allow."""
        answer = self.request(f"DELETE /upload/{UUID}/a HTTP/1.1\r\n\r\n".encode())
        self.assertTrue(answer.startswith(b"HTTP/1.1 405 "), answer)
        self.assertIn(b"Allow: GET, HEAD, PUT, OPTIONS", answer)


class GetRetryTests(HarnessMixin, SynchronousTestCase):
    def overrides(self) -> dict:
        return {"enable_get_retries": True, "max_retries": 3, "retry_delay": 2.0}

    def test_file_appearing_during_retries_is_served(self) -> None:
        """With EnableGetRetries, a file that shows up before the last retry is served, not 404."""
        protocol, transport = self.harness.connect()
        protocol.dataReceived(f"GET /upload/{UUID}/late.txt HTTP/1.1\r\n\r\n".encode())
        self.assertEqual(transport.value(), b"")
        self.harness.reactor.advance(2.0)
        self.assertEqual(transport.value(), b"")
        (self.store / UUID).mkdir()
        (self.store / UUID / "late.txt").write_bytes(b"arrived")
        self.harness.reactor.advance(2.0)
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 200 "), transport.value())
        self.assertTrue(transport.value().endswith(b"arrived"))

    def test_404_after_max_retries(self) -> None:
        """A file that never shows up is 404 after MaxRetries x RetryDelay, not before."""
        protocol, transport = self.harness.connect()
        protocol.dataReceived(f"GET /upload/{UUID}/never.txt HTTP/1.1\r\n\r\n".encode())
        for _ in range(59):
            self.harness.reactor.advance(0.1)
        self.assertEqual(transport.value(), b"")
        self.harness.reactor.advance(0.2)
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 404 "), transport.value())


class IdleTimeoutTests(HarnessMixin, SynchronousTestCase):
    def overrides(self) -> dict:
        return {"read_timeout": 10.0}

    def test_stalled_upload_times_out(self) -> None:
        """An upload that makes no progress for ReadTimeout seconds is disconnected."""
        protocol, transport = self.harness.connect()
        protocol.dataReceived(put_head(f"{UUID}/stall.bin", 1000))
        protocol.dataReceived(b"x" * 100)
        self.harness.reactor.advance(10.5)
        self.assertTrue(transport.disconnecting)

    def test_slow_but_progressing_upload_survives(self) -> None:
        """A slow upload that keeps sending is never cut, however long it takes in total."""
        body = os.urandom(1000)
        protocol, transport = self.harness.connect()
        protocol.dataReceived(put_head(f"{UUID}/slow.bin", len(body)))
        for start in range(0, 1000, 10):
            self.harness.reactor.advance(9.0)
            self.assertFalse(transport.disconnecting)
            protocol.dataReceived(body[start : start + 10])
        self.assertIn(b"HTTP/1.1 201 ", transport.value())
        self.assertEqual((self.store / UUID / "slow.bin").read_bytes(), body)


class UploadStatusAnswerTests(HarnessMixin, SynchronousTestCase):
    def test_status_head_has_no_body_headers(self) -> None:
        """A HEAD answered with an upload offset says Content-Length: 0 and no Content-Type."""
        from hmacfs.testing import v1_mac

        path = f"{UUID}/status.bin"
        protocol, _transport = self.harness.connect()
        protocol.dataReceived(put_head(path, 100, extra=("X-Session-Token: status-token-1",)))
        protocol.dataReceived(b"x" * 40)
        from twisted.internet.error import ConnectionLost
        from twisted.python.failure import Failure

        protocol.connectionLost(Failure(ConnectionLost()))
        answer = self.request(
            f"HEAD /upload/{path}?v={v1_mac(path, 100)} HTTP/1.1\r\n"
            "X-Session-Token: status-token-1\r\n\r\n".encode()
        )
        self.assertTrue(answer.startswith(b"HTTP/1.1 200 "), answer)
        self.assertIn(b"Upload-Offset: 40\r\n", answer)
        self.assertIn(b"Content-Length: 0\r\n", answer)
        self.assertNotIn(b"\r\nContent-Type:", answer)
        self.assertIn(b"X-Session-Token: status-token-1\r\n", answer)

    def test_options_allow_lists_tus_methods(self) -> None:
        """OPTIONS' Allow names every method of the tree, tus ones included."""
        answer = self.request(f"OPTIONS /upload/{UUID}/x HTTP/1.1\r\n\r\n".encode())
        self.assertIn(b"Allow: GET, HEAD, PUT, POST, PATCH, DELETE, OPTIONS\r\n", answer)


class PrivateNameTests(HarnessMixin, SynchronousTestCase):
    """The private directory's name, in any case or encoding, is never served and never a 500."""

    @settings(derandomize=True, deadline=None, max_examples=60)
    @given(
        name=private_names,
        method=st.sampled_from(["GET", "HEAD", "PUT"]),
        rest=st.sampled_from(["/x", "/meta/k.json", "/partial/k.part", ""]),
    )
    def test_private_name_is_refused(self, name: bytes, method: str, rest: str) -> None:
        """GET, HEAD and PUT of /upload/.HMACFS/..., %2Ehmacfs/... etc.: 403, no error logged."""
        (self.store / ".hmacfs" / "meta").mkdir(parents=True, exist_ok=True)
        (self.store / ".hmacfs" / "x").write_bytes(b"private")
        errors = capture_errors(self)
        length = "Content-Length: 1\r\n" if method == "PUT" else ""
        answer = self.request(
            f"{method} /upload/{name.decode()}{rest}?v={'0' * 64} HTTP/1.1\r\nHost: h\r\n{length}\r\n".encode()
        )
        self.assertEqual(status_of(answer), 403, answer)
        self.assertNotIn(b"private", answer)
        self.assertEqual(errors, [])


def capture_errors(test: SynchronousTestCase) -> list[dict]:
    """Events at error level or above (Twisted's 'Unhandled Error', log.failure), for the test."""
    errors: list[dict] = []

    def observe(event: dict) -> None:
        if event.get("log_level") in (LogLevel.error, LogLevel.critical):
            errors.append(event)

    globalLogPublisher.addObserver(observe)
    test.addCleanup(globalLogPublisher.removeObserver, observe)
    return errors


class StorageFailureTests(HarnessMixin, SynchronousTestCase):
    """A store that fails under GET/HEAD gives a short clean answer, never a 500 or a traceback."""

    def setUp(self) -> None:
        super().setUp()
        (self.store / UUID).mkdir()
        (self.store / UUID / "f.txt").write_bytes(b"content")
        self.resource = self.harness.site.resource
        #: the blocking store under the resource's IStore (its calls run on the runner)
        self.blocking = self.resource.store.store
        self.warnings: list[dict] = []
        self.errors = capture_errors(self)

        def observe(event: dict) -> None:
            if event.get("log_level") == LogLevel.warn:
                self.warnings.append(event)

        globalLogPublisher.addObserver(observe)
        self.addCleanup(globalLogPublisher.removeObserver, observe)

    def failing(self, code: int) -> Any:
        def fail(*_args: Any) -> None:
            raise OSError(code, os.strerror(code))

        return fail

    def get(self, method: str = "GET") -> bytes:
        return self.request(f"{method} /upload/{UUID}/f.txt HTTP/1.1\r\nHost: h\r\n\r\n".encode())

    def assert_clean(self, answer: bytes, status: int) -> None:
        self.assertEqual(status_of(answer), status, answer)
        self.assertIn(b"Content-Type: text/plain", answer)
        self.assertIn(b"Access-Control-Allow-Origin: *", answer)
        self.assertEqual(self.errors, [])
        self.assertEqual(self.flushLoggedErrors(), [])

    def test_stat_errors(self) -> None:
        """stat raising EIO is 503 (logged at warn, no traceback); EACCES 403; ELOOP/ENOTDIR 404."""
        for code, status in (
            (errno.EIO, 503), (errno.EACCES, 403), (errno.ELOOP, 404), (errno.ENOTDIR, 404),
        ):
            self.blocking.stat = self.failing(code)  # type: ignore[method-assign]
            for method in ("GET", "HEAD"):
                self.warnings.clear()
                self.assert_clean(self.get(method), status)
                if status == 503:
                    self.assertEqual(len(self.warnings), 1)
                    self.assertIsNone(self.warnings[0].get("log_failure"))

    def test_open_error(self) -> None:
        """Opening the file for the body failing with EIO is 503, not a 500."""
        import hmacfs.storage.fs_backend

        self.patch(hmacfs.storage.fs_backend, "open_stored", self.failing(errno.EIO))
        self.assert_clean(self.get(), 503)
        self.assertEqual(status_of(self.get("HEAD")), 200)

    def test_upload_status_head_errors(self) -> None:
        """The HEADs answered at header time (session token, tus) map store errors the same way."""
        from hmacfs.testing import v1_mac

        path = f"{UUID}/up.bin"
        url = f"/upload/{path}?v={v1_mac(path, 10)}"
        for code, status in ((errno.EIO, 503), (errno.ENOENT, 404)):
            self.blocking.partial_status = self.failing(code)  # type: ignore[method-assign]
            for header in ("X-Session-Token: status-token-1", "Tus-Resumable: 1.0.0"):
                answer = self.request(f"HEAD {url} HTTP/1.1\r\nHost: h\r\n{header}\r\n\r\n".encode())
                self.assert_clean(answer, status)

    def test_storage_refusal(self) -> None:
        """A StorageError from the store (its own path checks) is answered with its status."""
        from hmacfs.storage.filesystem import StorageError

        def refuse(*_args: Any) -> None:
            raise StorageError(403, "forbidden path")

        self.blocking.stat = refuse  # type: ignore[method-assign]
        self.assert_clean(self.get(), 403)


class StorageFailureRetryTests(StorageFailureTests):
    """The same when the store fails during an EnableGetRetries wait."""

    def overrides(self) -> dict:
        return {"enable_get_retries": True, "max_retries": 2, "retry_delay": 1.0}

    def get(self, method: str = "GET") -> bytes:
        """The first look finds nothing; the one after RetryDelay meets the failing store."""
        store_stat = self.blocking.stat
        looks: list[object] = []

        def first_missing(segments: Any) -> Any:
            looks.append(segments)
            return None if len(looks) == 1 else store_stat(segments)

        self.blocking.stat = first_missing  # type: ignore[method-assign]
        try:
            protocol, transport = self.harness.connect()
            protocol.dataReceived(f"{method} /upload/{UUID}/f.txt HTTP/1.1\r\nHost: h\r\n\r\n".encode())
            self.assertEqual(transport.value(), b"")
            self.harness.reactor.advance(1.0)
        finally:
            self.blocking.stat = store_stat  # type: ignore[method-assign]
        self.assertEqual(len(looks), 2)
        return transport.value()


class FakeSource:
    """An object store's byte source: no descriptor, it streams itself."""

    fd: int | None = None

    def __init__(self, stored: Any, data: bytes) -> None:
        self.stored = stored
        self.data = data
        self.byte_range = ByteRange(0, len(data))
        self.selected: list[ByteRange] = []
        self.closed = 0

    def select(self, byte_range: ByteRange) -> None:
        self.selected.append(byte_range)
        self.byte_range = byte_range

    def stream(self, consumer: Any) -> Deferred[None]:
        first, length = self.byte_range.first, self.byte_range.length
        consumer.write(self.data[first : first + length])
        return succeed(None)

    def close(self) -> None:
        self.closed += 1


class FakeObjectStore:
    """The GET/HEAD half of a non-local ``IStore``: answers when the test says."""

    local = False

    def __init__(self, data: bytes, url: str | None = None) -> None:
        self.data = data
        self.url = url
        self.stored = StoredFile(
            PurePosixPath("bucket/key/photo.jpg"), len(data), 1_700_000_000.0, "image/jpeg", '"e1"', None
        )
        self.sources: list[FakeSource] = []
        self.asked: list[tuple[bytes, bytes]] = []
        self.pending: list[Deferred[Any]] = []
        self.hold = False

    def _answer(self, value: Any) -> Deferred[Any]:
        if not self.hold:
            return succeed(value)
        d: Deferred[Any] = Deferred()
        self.pending.append(d)
        d.addCallback(lambda _: value)
        return d

    def lookup(self, segments: Any) -> Deferred[Any]:
        return self._answer(self.stored)

    def open_file(self, segments: Any, read_ahead: int = 0) -> Deferred[Any]:
        source = FakeSource(self.stored, self.data)
        self.sources.append(source)
        return self._answer(source)

    def download_url(self, stored: Any, content_type: bytes, disposition: bytes) -> str | None:
        self.asked.append((content_type, disposition))
        return self.url


class NonLocalStoreTests(HarnessMixin, SynchronousTestCase):
    """GET/HEAD on a store that is not a local directory (an object store, faked here)."""

    def setUp(self) -> None:
        super().setUp()
        self.data = os.urandom(5000)
        self.errors = capture_errors(self)

    def use(self, store: FakeObjectStore) -> FakeObjectStore:
        self.harness.site.resource.store = store
        return store

    def get(self, method: str = "GET", *headers: str) -> bytes:
        lines = [f"{method} /upload/{UUID}/photo.jpg HTTP/1.1", "Host: h", *headers]
        return self.request(("\r\n".join(lines) + "\r\n\r\n").encode())

    def test_redirect_to_download_url(self) -> None:
        """
        A store that hands out a URL (S3RedirectDownloads) gets a 302 there, with CORS
        headers and no body; it was asked with the safe-serving type and disposition,
        and the source opened for the GET is closed.
        """
        store = self.use(FakeObjectStore(self.data, url="https://bucket.example/key?X-Amz-Signature=abc"))
        answer = self.get()
        self.assertEqual(status_of(answer), 302, answer)
        self.assertIn(b"Location: https://bucket.example/key?X-Amz-Signature=abc\r\n", answer)
        self.assertIn(b"Access-Control-Allow-Origin: *\r\n", answer)
        self.assertIn(b"Access-Control-Expose-Headers: ", answer)
        self.assertIn(b"Content-Length: 0\r\n", answer)
        self.assertIn(b"Cache-Control: no-store\r\n", answer)
        self.assertIn(b"X-Content-Type-Options: nosniff\r\n", answer)
        self.assertTrue(answer.endswith(b"\r\n\r\n"), answer)
        self.assertEqual(store.asked, [(b"image/jpeg", b"inline")])
        self.assertEqual([source.closed for source in store.sources], [1])
        self.assertEqual(self.errors, [])

    def test_head_is_not_redirected(self) -> None:
        """HEAD answers from the metadata (no open, no redirect)."""
        store = self.use(FakeObjectStore(self.data, url="https://bucket.example/key"))
        answer = self.get("HEAD")
        self.assertEqual(status_of(answer), 200, answer)
        self.assertIn(b"Content-Length: 5000\r\n", answer)
        self.assertEqual((store.sources, store.asked), ([], []))

    def test_streamed_when_no_url(self) -> None:
        """No URL: the source streams itself, narrowed to the Range, and is closed."""
        store = self.use(FakeObjectStore(self.data))
        answer = self.get("GET", "Range: bytes=100-199")
        self.assertEqual(status_of(answer), 206, answer)
        self.assertIn(b"Content-Range: bytes 100-199/5000\r\n", answer)
        self.assertTrue(answer.endswith(self.data[100:200]))
        [source] = store.sources
        self.assertEqual((source.selected, source.closed), ([ByteRange(100, 100)], 1))
        self.assertEqual(self.errors, [])

    def test_client_gone_before_the_store_answers(self) -> None:
        """The client left while the store was asked: nothing is written, the source is closed, no error."""
        store = self.use(FakeObjectStore(self.data))
        store.hold = True
        protocol, transport = self.harness.connect()
        protocol.dataReceived(f"GET /upload/{UUID}/photo.jpg HTTP/1.1\r\nHost: h\r\n\r\n".encode())
        self.assertEqual(transport.value(), b"")
        protocol.connectionLost(Failure(ConnectionLost()))
        store.pending[0].callback(None)
        self.assertEqual(transport.value(), b"")
        self.assertEqual([source.closed for source in store.sources], [1])
        self.assertEqual(self.errors, [])
        self.assertEqual(self.flushLoggedErrors(), [])


class PoolJobsPerRequestTests(HarnessMixin, SynchronousTestCase):
    """What GET and HEAD cost on the disk pool (the filesystem backend)."""

    def setUp(self) -> None:
        self.store = Path(self.mktemp()).resolve()
        self.store.mkdir()
        self.runner = ManualRunner()
        self.harness = SiteHarness(make_config(self.store, enable_get_retries=False), self.runner)
        (self.store / UUID).mkdir()
        (self.store / UUID / "small.txt").write_bytes(b"s" * 60_000)

    def test_small_get_is_one_job(self) -> None:
        """A small GET: nothing answered before the one pool job (lookup, open, read, close) ran."""
        protocol, transport = self.harness.connect()
        protocol.dataReceived(f"GET /upload/{UUID}/small.txt HTTP/1.1\r\nHost: h\r\n\r\n".encode())
        self.assertEqual((transport.value(), len(self.runner.jobs)), (b"", 1))
        self.assertEqual(self.runner.run_all(), 1)
        self.assertEqual(status_of(transport.value()), 200)
        self.assertTrue(transport.value().endswith(b"s" * 60_000))

    def test_head_is_one_job(self) -> None:
        """HEAD: one pool job (the lookup), and the answer after it."""
        protocol, transport = self.harness.connect()
        protocol.dataReceived(f"HEAD /upload/{UUID}/small.txt HTTP/1.1\r\nHost: h\r\n\r\n".encode())
        self.assertEqual(transport.value(), b"")
        self.assertEqual(self.runner.run_all(), 1)
        self.assertEqual(status_of(transport.value()), 200)
        self.assertIn(b"Content-Length: 60000\r\n", transport.value())
