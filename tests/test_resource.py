"""
The resource tree and channel behaviour that is not about the body:
CORS, OPTIONS, session tokens, GET retries, idle timeouts.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

from hmacfs.testing import SiteHarness, make_config, put_head

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
        from hmacfs import resource

        source = resource._TokenSource()
        tokens = [source.token() for _ in range(3 * source.BATCH + 5)]
        self.assertEqual(len(set(tokens)), len(tokens))
        for token in tokens:
            self.assertRegex(token, rb"^[A-Za-z0-9_-]{32}$")

    def test_session_token_batch_dropped_after_fork(self) -> None:
        """A forked child never hands out the tokens its parent read (the batch is dropped)."""
        from hmacfs import resource

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
