"""
The GET body producer's plain part (hmacfs.http.producer) alone: the pread
path and the bookkeeping every path shares, on a fake request and a Clock.
The sendfile path and the whole download are in tests.test_download.
"""

from __future__ import annotations

import os
from pathlib import PurePath
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionLost
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from hmacfs.http.producer import CHUNKS_PER_TURN, PreadProducer, StreamedBody
from hmacfs.storage.fs_backend import FileRange
from hmacfs.storage.interface import ByteRange, StoredFile
from hmacfs.testing import ManualRunner


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

    def producer(
        self, offset: int = 0, length: int | None = None, runner: Any = None, **kwargs: object
    ) -> PreadProducer:
        settings: dict = {"clock": self.clock, "write_timeout": 30.0, "chunk_size": 100}
        settings.update(kwargs)
        stored = StoredFile(PurePath("f"), len(self.data), 0.0, "text/plain", '"x"', None)
        source = FileRange(
            stored, ByteRange(0, len(self.data)), self.fd, runner or ManualRunner(auto=True)
        )
        return PreadProducer(
            self.request, source, offset=offset,
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

    def test_reads_on_the_pool_one_at_a_time(self) -> None:
        """
        Each chunk is one job on the disk pool: nothing is written before it ran, a resume
        while it is out starts no second read, and the bytes arrive in order.
        """
        runner = ManualRunner()
        producer = self.producer(runner=runner, chunk_size=1000)
        producer.start()
        self.assertEqual((self.request.written, len(runner.jobs)), ([], 1))
        producer.pauseProducing()
        producer.resumeProducing()
        self.assertEqual(len(runner.jobs), 1)
        for _ in range(100):
            if not runner.jobs:
                break
            function, args, deferred = runner.jobs.pop(0)
            self.assertIn(function, (os.pread, os.close))
            deferred.callback(function(*args))
        self.assertEqual(b"".join(self.request.written), self.data)
        self.assertTrue(self.request.finished)
        self.assertTrue(self.fd_closed())

    def test_close_waits_for_the_read_out(self) -> None:
        """A client gone while a read is on the pool: the file is closed after that read, not under it."""
        runner = ManualRunner()
        producer = self.producer(runner=runner)
        producer.start()
        self.request.finish_notified.errback(Failure(ConnectionLost()))
        self.assertFalse(self.fd_closed())
        self.assertEqual([job[0] for job in runner.jobs], [os.pread])
        runner.run_all()
        self.assertTrue(self.fd_closed())
        self.assertEqual(self.request.written, [])


class FakeSource:
    """A byte source that streams itself (as an object store's would): no descriptor."""

    fd: int | None = None

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.stored = StoredFile(PurePath("f"), len(data), 0.0, "text/plain", '"x"', None)
        self.byte_range = ByteRange(0, len(data))
        self.consumer: Any = None
        self.done: Deferred[None] | None = None
        self.paused = False
        self.stopped = False
        self.closed = 0

    def select(self, byte_range: ByteRange) -> None:
        self.byte_range = byte_range

    def stream(self, consumer: Any) -> Deferred[None]:
        self.consumer = consumer
        self.done = Deferred()
        consumer.registerProducer(self, True)
        return self.done

    def send(self, count: int) -> None:
        """The store delivers ``count`` more bytes of the range."""
        first = self.byte_range.first + sum(len(d) for d in self.sent)
        self.consumer.write(self.data[first : first + count])

    @property
    def sent(self) -> list[bytes]:
        return self.consumer._request.written

    def end(self) -> None:
        self.consumer.unregisterProducer()
        assert self.done is not None
        self.done.callback(None)

    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        self.paused = False

    def stopProducing(self) -> None:
        self.stopped = True
        if self.done is not None:
            done, self.done = self.done, None
            done.errback(ConnectionLost())

    def close(self) -> None:
        self.closed += 1


class StreamedBodyTests(SynchronousTestCase):
    """A source without a descriptor streams itself: back-pressure, idle timeout, client gone."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.request = FakeRequest()
        self.source = FakeSource(os.urandom(1000))

    def start(self, write_timeout: float = 10.0) -> StreamedBody:
        body = StreamedBody(self.request, self.source, clock=self.clock, write_timeout=write_timeout)
        body.start()
        return body

    def test_streams_and_finishes(self) -> None:
        """The source is the request's producer (its pauses reach the store); the end finishes and closes."""
        self.start()
        self.assertIs(self.request.producer, self.source)
        self.source.send(600)
        self.source.send(400)
        self.source.end()
        self.assertEqual(b"".join(self.request.written), self.source.data)
        self.assertTrue(self.request.finished)
        self.assertIsNone(self.request.producer)
        self.assertEqual(self.source.closed, 1)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_idle_timeout(self) -> None:
        """No bytes for write_timeout: the source is stopped, closed, the connection aborted."""
        self.start(write_timeout=5.0)
        self.clock.advance(3)
        self.source.send(10)
        self.clock.advance(4)
        self.assertFalse(self.request.transport.aborted)
        self.clock.advance(1)
        self.assertTrue(self.request.transport.aborted)
        self.assertTrue(self.source.stopped)
        self.assertEqual(self.source.closed, 1)
        self.assertFalse(self.request.finished)

    def test_client_gone(self) -> None:
        """A client that left stops the source; nothing more is written, no error logged."""
        self.start()
        self.source.send(10)
        self.request.finish_notified.errback(Failure(ConnectionLost()))
        self.assertTrue(self.source.stopped)
        self.assertEqual(self.source.closed, 1)
        self.assertFalse(self.request.finished)
        self.assertEqual(self.flushLoggedErrors(), [])
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_store_failure_aborts(self) -> None:
        """The store failing mid-body aborts the connection (the client sees a short body)."""
        self.start()
        self.source.send(10)
        assert self.source.done is not None
        self.source.done.errback(OSError("the store went away"))
        self.assertTrue(self.request.transport.aborted)
        self.assertFalse(self.request.finished)
        self.assertEqual(self.source.closed, 1)
        self.assertEqual(len(self.flushLoggedErrors(OSError)), 1)
