"""
The GET body producer's plain part (hmacfs.http.producer) alone: the pread
path and the bookkeeping every path shares, on a fake request and a Clock.
The sendfile path and the whole download are in tests.test_download.
"""

from __future__ import annotations

import os

from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionLost
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from hmacfs.http.producer import CHUNKS_PER_TURN, PreadProducer


class FakeTransport:
    aborted = False

    def abortConnection(self) -> None:
        self.aborted = True


class FakeRequest:
    """What the producer uses of a twisted.web request."""

    def __init__(self) -> None:
        self.written: list[bytes] = []
        self.producer: object = None
        self.finished = False
        self.transport = FakeTransport()
        self.finish_notified: Deferred[None] = Deferred()
        self.on_write = lambda: None

    def registerProducer(self, producer: object, streaming: bool) -> None:
        assert streaming
        self.producer = producer

    def unregisterProducer(self) -> None:
        self.producer = None

    def write(self, data: bytes) -> None:
        self.written.append(data)
        self.on_write()

    def finish(self) -> None:
        self.finished = True

    def notifyFinish(self) -> Deferred[None]:
        return self.finish_notified


class PreadProducerTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.data = os.urandom(10_000)
        path = self.mktemp()
        with open(path, "wb") as file:
            file.write(self.data)
        self.fd = os.open(path, os.O_RDONLY)
        self.addCleanup(self.close_fd)
        self.clock = Clock()
        self.request = FakeRequest()

    def close_fd(self) -> None:
        try:
            os.close(self.fd)
        except OSError:
            pass  # closed by the producer, as it should be

    def fd_closed(self) -> bool:
        try:
            os.fstat(self.fd)
        except OSError:
            return True
        return False

    def producer(self, offset: int = 0, length: int | None = None, **kwargs: object) -> PreadProducer:
        settings: dict = {"clock": self.clock, "write_timeout": 30.0, "chunk_size": 100}
        settings.update(kwargs)
        return PreadProducer(
            self.request, self.fd, offset=offset,
            length=len(self.data) - offset if length is None else length, **settings,
        )

    def test_writes_the_range_a_turn_at_a_time(self) -> None:
        """CHUNKS_PER_TURN chunks per reactor turn, then the answer is finished and the file closed."""
        producer = self.producer(offset=1000, length=2 * CHUNKS_PER_TURN * 100 + 50)
        producer.start()
        self.assertIs(self.request.producer, producer)
        self.assertEqual(len(self.request.written), CHUNKS_PER_TURN)
        # the next turn, and the idle timer
        self.assertEqual(sorted(call.getTime() for call in self.clock.getDelayedCalls()), [0, 30.0])
        self.assertFalse(self.request.finished)
        self.clock.advance(0)  # the next turns (Clock runs the calls they schedule too)
        self.assertEqual(len(self.request.written), 2 * CHUNKS_PER_TURN + 1)
        self.assertEqual(b"".join(self.request.written), self.data[1000 : 1000 + 2 * CHUNKS_PER_TURN * 100 + 50])
        self.assertTrue(self.request.finished)
        self.assertIsNone(self.request.producer)
        self.assertTrue(self.fd_closed())
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_pause_and_resume(self) -> None:
        """A consumer that pushes back stops the loop; resuming carries on where it stopped."""
        self.request.on_write = lambda: producer.pauseProducing()
        producer = self.producer(chunk_size=1000)
        producer.start()
        self.assertEqual(len(self.request.written), 1)
        self.request.on_write = lambda: None
        producer.resumeProducing()
        self.clock.advance(0)
        self.assertEqual(b"".join(self.request.written), self.data)
        self.assertTrue(self.request.finished)

    def test_resume_inside_a_write_does_not_recurse(self) -> None:
        """A consumer that pauses and resumes inside write(): one loop, the bytes in order."""

        def bounce() -> None:
            producer.pauseProducing()
            producer.resumeProducing()

        self.request.on_write = bounce
        producer = self.producer(chunk_size=1000, chunks_per_turn=100)
        producer.start()
        self.assertEqual(b"".join(self.request.written), self.data)

    def test_stalled_client_aborted(self) -> None:
        """No progress for write_timeout: the connection is aborted and the file closed."""
        self.request.on_write = lambda: producer.pauseProducing()
        producer = self.producer(write_timeout=5.0)
        producer.start()
        self.clock.advance(4.9)
        self.assertFalse(self.request.transport.aborted)
        self.clock.advance(0.1)
        self.assertTrue(self.request.transport.aborted)
        self.assertFalse(self.request.finished)
        self.assertTrue(self.fd_closed())

    def test_progress_postpones_the_idle_abort(self) -> None:
        self.request.on_write = lambda: producer.pauseProducing()
        producer = self.producer(write_timeout=5.0)
        producer.start()
        self.clock.advance(4)
        producer.resumeProducing()  # one more chunk: progress
        self.clock.advance(4)
        self.assertFalse(self.request.transport.aborted)
        self.clock.advance(1)
        self.assertTrue(self.request.transport.aborted)

    def test_file_shrank(self) -> None:
        """Fewer bytes on disk than promised: abort, so the client sees a short body."""
        producer = self.producer(length=len(self.data) + 10)
        producer.start()
        self.clock.advance(0)
        self.clock.advance(0)
        self.assertEqual(b"".join(self.request.written), self.data)
        self.assertTrue(self.request.transport.aborted)
        self.assertFalse(self.request.finished)
        self.assertTrue(self.fd_closed())

    def test_client_gone(self) -> None:
        """The request's notifyFinish errback (or stopProducing) stops for good, once."""
        producer = self.producer()
        producer.start()
        self.request.finish_notified.errback(Failure(ConnectionLost()))
        self.assertTrue(self.fd_closed())
        written = len(self.request.written)
        producer.stopProducing()
        producer.resumeProducing()
        self.clock.advance(60)
        self.assertEqual(len(self.request.written), written)
        self.assertFalse(self.request.transport.aborted)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_read_error_aborts(self) -> None:
        """A read that fails (here: a directory) aborts the answer and closes the file."""
        directory = self.mktemp()
        os.mkdir(directory)
        os.close(self.fd)
        self.fd = os.open(directory, os.O_RDONLY)
        producer = self.producer()
        producer.start()
        self.assertEqual(self.request.written, [])
        self.assertTrue(self.request.transport.aborted)
        self.assertTrue(self.fd_closed())
        self.flushLoggedErrors(OSError)
