"""
The S3 client's flow control, timeouts, signing choices and settings, without sockets or an
S3 server (fast; runs on the oldest Twisted too).  The real-S3 tests are in test_s3_client.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IConsumer, IProducer, IReactorTime
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.iweb import IAgent
from zope.interface import implementer

from hmacfs.storage.s3.bodies import DownloadReceiver, UploadBody
from hmacfs.storage.s3.client import S3Client
from hmacfs.storage.s3.errors import S3Unavailable
from hmacfs.storage.s3.settings import MIB, S3Settings

ROOT = Path(__file__).resolve().parent.parent

@implementer(IConsumer)
class Collector:
    """An IConsumer that keeps what it is given (small bodies) and can pause its producer."""

    def __init__(self) -> None:
        self.chunks: list[bytes] = []
        self.producer: Any = None
        self.registered = 0

    def registerProducer(self, producer: IProducer, streaming: bool) -> None:
        assert streaming
        self.producer = producer
        self.registered += 1

    def unregisterProducer(self) -> None:
        self.producer = None

    def write(self, data: bytes) -> None:
        self.chunks.append(data)

    @property
    def data(self) -> bytes:
        return b"".join(self.chunks)


class Recorder:
    """An S3Observer that keeps every report."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str, int, int]] = []

    def request_finished(
        self, operation: str, outcome: str, seconds: float, sent: int, received: int
    ) -> None:
        assert seconds >= 0
        self.calls.append((operation, outcome, sent, received))


class FlowControlTests(SynchronousTestCase):
    """The bodies' back-pressure, with StringTransport on both sides (no sockets)."""

    def test_write_waits_while_paused(self) -> None:
        """write()'s Deferred stays unfired while the connection is paused, fires on resume."""
        body = UploadBody(30)
        early = body.write(b"a" * 10)
        self.assertNoResult(early)  # not connected yet: held, the caller waits
        transport = StringTransport()
        finished = body.startProducing(transport)
        self.successResultOf(early)
        self.assertEqual(transport.value(), b"a" * 10)
        body.pauseProducing()
        second = body.write(b"b" * 10)
        self.assertEqual(transport.value(), b"a" * 10 + b"b" * 10)  # handed on, not held
        self.assertNoResult(second)
        self.assertRaises(RuntimeError, body.write, b"c")
        body.resumeProducing()
        self.successResultOf(second)
        self.successResultOf(body.write(b"c" * 10))
        self.assertNoResult(finished)
        body.finish()
        self.successResultOf(finished)

    def test_length_enforced(self) -> None:
        """More bytes than the length is refused; finish() before the end is refused."""
        body = UploadBody(4)
        body.startProducing(StringTransport())
        self.assertRaises(ValueError, body.write, b"12345")
        self.successResultOf(body.write(b"12"))
        self.assertRaises(ValueError, body.finish)

    def test_failure_reaches_waiting_write(self) -> None:
        """An S3 answer or lost connection while a write waits fails that write and later ones."""
        body = UploadBody(20)
        body.startProducing(StringTransport())
        body.pauseProducing()
        waiting = body.write(b"x" * 10)
        body.fail(S3Unavailable(0, "ConnectionLost"))
        self.failureResultOf(waiting, S3Unavailable)
        self.failureResultOf(body.write(b"y"), S3Unavailable)

    def test_download_pauses_s3_transport(self) -> None:
        """A paused downstream pauses the S3 connection; resuming it resumes the connection."""
        downstream = StringTransport()
        receiver = DownloadReceiver(downstream, "GetObject")
        upstream = StringTransport()
        receiver.makeConnection(upstream)
        self.assertIs(downstream.producer, receiver)
        self.assertTrue(downstream.streaming)
        receiver.dataReceived(b"chunk")
        self.assertEqual(downstream.value(), b"chunk")
        receiver.pauseProducing()  # what the downstream does when its buffer fills
        self.assertEqual(upstream.producerState, "paused")
        receiver.resumeProducing()
        self.assertEqual(upstream.producerState, "producing")
        from twisted.python.failure import Failure
        from twisted.web.client import ResponseDone

        receiver.connectionLost(Failure(ResponseDone()))
        self.assertEqual(self.successResultOf(receiver.done), 5)
        self.assertIsNone(downstream.producer)

    def test_download_cut_short(self) -> None:
        """A body that ends before its length is S3Unavailable, not a short success."""
        from twisted.python.failure import Failure
        from twisted.web.client import ResponseFailed

        receiver = DownloadReceiver(StringTransport(), "GetObject")
        receiver.makeConnection(StringTransport())
        receiver.connectionLost(Failure(ResponseFailed([Failure(ConnectionError("gone"))])))
        self.failureResultOf(receiver.done, S3Unavailable)


@implementer(IAgent)
class NeverAnswers:
    """An IAgent whose requests never get an answer."""

    def __init__(self) -> None:
        self.requests: list[Deferred[Any]] = []

    def request(self, *args: Any, **kwargs: Any) -> Deferred[Any]:
        d: Deferred[Any] = Deferred()
        self.requests.append(d)
        return d


@implementer(IAgent)
class PausedAgent:
    """An IAgent that starts taking the body, then pauses it for good (a stuck S3)."""

    def __init__(self) -> None:
        self.transport = StringTransport()

    def request(self, method: bytes, uri: bytes, headers: Any = None, bodyProducer: Any = None) -> Deferred[Any]:
        bodyProducer.startProducing(self.transport)
        bodyProducer.pauseProducing()
        return Deferred(lambda d: bodyProducer.stopProducing())


class TimeoutAndSettingsTests(SynchronousTestCase):
    def settings(self, **changes: Any) -> S3Settings:
        values: dict[str, Any] = {
            "bucket": "b", "access_key": "AK", "secret_key": "sekrit-value",
            "endpoint": "http://127.0.0.1:9", "request_timeout": 5.0,
        }
        values.update(changes)
        return S3Settings(**values)

    def test_control_call_times_out(self) -> None:
        """A control call with no answer fails with S3Unavailable(Timeout) after request_timeout."""
        clock = MemoryReactorClock()
        agent = NeverAnswers()
        observer = Recorder()
        client = S3Client(self.settings(), clock, agent=agent, observer=observer)
        d = client.head_bucket()
        clock.advance(4.9)
        self.assertNoResult(d)
        clock.advance(0.2)
        failure = self.failureResultOf(d, S3Unavailable)
        self.assertEqual(failure.value.code, "Timeout")
        self.assertEqual(observer.calls, [("HeadBucket", "unavailable", 0, 0)])

    def test_upload_answer_times_out(self) -> None:
        """After the last byte, S3 must answer within request_timeout."""
        clock: IReactorTime = MemoryReactorClock()
        client = S3Client(self.settings(), clock, agent=NeverAnswers())
        upload = client.put_object("k", 0)
        d = upload.finish()
        clock.advance(5.1)  # type: ignore[attr-defined]
        self.assertEqual(self.failureResultOf(d, S3Unavailable).value.code, "Timeout")

    def test_upload_stalled(self) -> None:
        """A write that waits request_timeout for a paused S3 fails the upload with a Timeout."""
        clock = MemoryReactorClock()
        client = S3Client(self.settings(), clock, agent=PausedAgent())
        upload = client.put_object("k", 10)
        waiting = upload.write(b"12345")
        clock.advance(4.9)
        self.assertNoResult(waiting)
        clock.advance(0.2)
        self.assertEqual(self.failureResultOf(waiting, S3Unavailable).value.code, "Timeout")
        self.assertEqual(self.failureResultOf(upload.finish(), S3Unavailable).value.code, "Timeout")
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_download_idle_timeout(self) -> None:
        """S3 silent for the timeout while we read fails the download; a paused downstream does not."""
        from twisted.python.failure import Failure
        from twisted.web.client import ResponseFailed

        clock = MemoryReactorClock()
        receiver = DownloadReceiver(StringTransport(), "GetObject", clock, 5.0)
        upstream = StringTransport()
        receiver.makeConnection(upstream)
        clock.advance(4)
        receiver.dataReceived(b"x")
        clock.advance(4)  # 8 s in, 4 s since the last byte
        receiver.pauseProducing()
        clock.advance(60)  # the downstream's pace, not S3's
        self.assertNoResult(receiver.done)
        receiver.resumeProducing()
        clock.advance(5.1)
        self.assertEqual(upstream.producerState, "stopped")
        receiver.connectionLost(Failure(ResponseFailed([Failure(ConnectionError("aborted"))])))
        self.assertEqual(self.failureResultOf(receiver.done, S3Unavailable).value.code, "Timeout")

    def test_secret_not_shown(self) -> None:
        """The secret key is in neither the settings' repr nor a signed request's headers."""
        settings = self.settings()
        self.assertNotIn("sekrit-value", repr(settings))
        self.assertNotIn("sekrit-value", str(settings))
        from hmacfs.storage.s3.protocol import S3Protocol

        signed = S3Protocol(settings).build("HeadBucket", {})
        self.assertNotIn(b"sekrit-value", b" ".join(v[0] for v in signed.headers.values()))
        self.assertTrue(signed.headers[b"Authorization"][0].startswith(b"AWS4-HMAC-SHA256 "))

    def test_streaming_is_unsigned_payload(self) -> None:
        """A streamed body is signed as UNSIGNED-PAYLOAD; a control body by its SHA-256."""
        from hmacfs.storage.s3.protocol import S3Protocol

        protocol = S3Protocol(self.settings())
        put = protocol.build("PutObject", {"Key": "k"}, streaming=True)
        self.assertEqual(put.headers[b"X-Amz-Content-SHA256"], [b"UNSIGNED-PAYLOAD"])
        self.assertNotIn(b"Content-Length", put.headers)
        delete = protocol.build("DeleteObjects", {"Delete": {"Objects": [{"Key": "k"}]}})
        self.assertEqual(
            delete.headers[b"X-Amz-Content-SHA256"], [hashlib.sha256(delete.body).hexdigest().encode()]
        )
        self.assertIn(b"Content-MD5", delete.headers)

    def test_addressing(self) -> None:
        """Path style keeps the bucket in the path; virtual (and auto on AWS) moves it to the host."""
        from hmacfs.storage.s3.protocol import S3Protocol

        path = S3Protocol(self.settings(addressing_style="path")).build("HeadObject", {"Key": "a b"})
        self.assertEqual(path.url, b"http://127.0.0.1:9/b/a%20b")
        aws = self.settings(endpoint="", bucket="my-bucket", region="eu-west-1")
        virtual = S3Protocol(aws).build("HeadObject", {"Key": "x/y"})
        self.assertEqual(virtual.url, b"https://my-bucket.s3.eu-west-1.amazonaws.com/x/y")

    def test_settings_checked(self) -> None:
        """Settings the client cannot work with are refused, naming the field."""
        for changes, word in (
            ({"part_size": MIB}, "part_size"),
            ({"addressing_style": "dns"}, "addressing_style"),
            ({"presign_expiry": 0}, "presign_expiry"),
            ({"endpoint": "127.0.0.1:9000"}, "endpoint"),
            ({"bucket": ""}, "bucket"),
        ):
            with self.assertRaises(ValueError) as raised:
                self.settings(**changes)
            self.assertIn(word, str(raised.exception))

    def test_no_botocore_for_the_package(self) -> None:
        """Importing the package (settings, errors, observer) and the daemon does not import botocore."""
        code = (
            "import sys, hmacfs.storage.s3.settings, hmacfs.storage.s3.errors, "
            "hmacfs.storage.s3.observer, hmacfs.service.tap; "
            "print(any(m == 'botocore' or m.startswith('botocore.') for m in sys.modules))"
        )
        out = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
            env=dict(os.environ, PYTHONPATH=str(ROOT)),
        )
        self.assertEqual(out.stdout.strip(), "False", out.stderr)


class StorageErrorTests(SynchronousTestCase):
    """What a client is told when S3 fails under its request."""

    def test_unavailable_and_refused_are_503_with_retry_after(self) -> None:
        """S3 down (or answering an error hmacfs cannot act on): 503 with Retry-After, as a
        filesystem error that may pass; a 412 on the create is 409 without one."""
        from hmacfs.storage.s3.errors import PreconditionFailed, S3Error
        from hmacfs.storage.s3.store import storage_error

        for error in (S3Unavailable(0, "Error", "refused"), S3Error(500, "InternalError", "", "PutObject")):
            answer = storage_error(error)
            self.assertEqual(answer.status, 503)
            self.assertEqual(dict(answer.headers), {b"Retry-After": b"5"})
        conflict = storage_error(PreconditionFailed(412, "PreconditionFailed", "", "PutObject"))
        self.assertEqual((conflict.status, conflict.headers), (409, ()))

class HandClient:
    """An S3Client stand-in whose requests each wait for the test to answer them."""

    def __init__(self) -> None:
        self.settings = S3Settings(endpoint="http://127.0.0.1:9", bucket="b", access_key="a", secret_key="s")
        self.pending: dict[str, Deferred[Any]] = {}

    def get_object(self, key: str) -> Deferred[Any]:
        return self.pending.setdefault("get " + key, Deferred())

    def head_object(self, key: str) -> Deferred[Any]:
        return self.pending.setdefault("head " + key, Deferred())


class SettledTests(SynchronousTestCase):
    """An operation that asks S3 several things at once fails only when every request has
    settled: none outlives it (a request left in flight held a connection attempt and its
    timeout past the failure, and once left the reactor unclean in CI)."""

    def test_admit_waits_for_the_other_request(self) -> None:
        from hmacfs.storage.interface import StorageError
        from hmacfs.storage.s3.store import S3Store

        client = HandClient()
        store = S3Store(client, conditional=True)  # type: ignore[arg-type]
        answer = store.admit(("f",), "text/plain", 1)
        (tombstone,) = [d for k, d in client.pending.items() if k.startswith("get ")]
        (head,) = [d for k, d in client.pending.items() if k.startswith("head ")]
        tombstone.errback(S3Unavailable(0, "Error", "connection refused"))
        self.assertNoResult(answer)
        head.errback(S3Unavailable(0, "Error", "connection refused"))
        self.assertEqual(self.failureResultOf(answer, StorageError).value.status, 503)

    def test_the_first_failure_is_the_one_raised(self) -> None:
        from hmacfs.storage.s3.errors import S3Error
        from hmacfs.storage.s3.store import _settled

        first: Deferred[Any] = Deferred()
        second: Deferred[Any] = Deferred()
        answer = Deferred.fromCoroutine(_settled([first, second]))
        second.errback(S3Error(500, "InternalError", "", "HeadObject"))
        first.errback(S3Unavailable(0, "Error", "refused"))
        self.failureResultOf(answer, S3Unavailable)
