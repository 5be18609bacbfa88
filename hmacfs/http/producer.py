# -*- test-case-name: tests.test_producer,tests.test_download -*-
"""
The GET body producer's plain part: the bookkeeping every path shares, the
chunked-read path, and the adapter for byte sources that stream themselves.

``BodyProducer`` owns the opened file (an ``ILocalByteSource``) and the
progress (offset, bytes left, the idle timeout, finish and abort);
``PreadProducer`` reads a chunk at a time through the source (``pread`` on the
disk pool) and writes through the request, which works on every transport.
The ``sendfile`` path needs Twisted internals and lives in
hmacfs.http.sendfile; this module uses none.  ``StreamedBody`` serves a source
without a descriptor (an object store's) through its own ``stream``, with the
same idle timeout and client-gone handling.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.interfaces import IConsumer, IDelayedCall, IPushProducer, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from hmacfs.logs import log_router
from hmacfs.storage.interface import IByteSource, ILocalByteSource

__all__ = ["CHUNKS_PER_TURN", "BodyProducer", "PreadProducer", "StreamedBody"]

log = Logger(observer=log_router)

#: Chunks written in one reactor turn before yielding with ``callLater(0)``,
#: for consumers that never push back, so one download cannot starve others.
CHUNKS_PER_TURN = 8


def _abort_connection(request: Any) -> None:
    """
    Drop the client without a clean end, so it sees a short body and can resume.

    HTTP/1.x requests carry the TCP/TLS transport; an HTTP/2 request has no
    transport and its channel (the stream) resets just this stream.
    """
    transport = getattr(request, "transport", None)
    if transport is not None:
        transport.abortConnection()
        return
    channel = getattr(request, "channel", None)
    if channel is not None:
        channel.abortConnection()


@implementer(IPushProducer)
class BodyProducer:
    """
    Push ``length`` bytes of ``source`` from ``offset`` into ``request``: what
    every way of sending shares.  Subclasses write in ``_produce`` and report
    each write with ``_advance``.

    Owns ``source`` and closes it on every way out: end of data, client gone
    (``stopProducing`` or the ``notifyFinish`` errback), idle timeout (no
    progress for ``write_timeout`` seconds), read error.
    """

    def __init__(
        self,
        request: Any,
        source: ILocalByteSource,
        *,
        offset: int,
        length: int,
        clock: IReactorTime,
        write_timeout: float,
    ) -> None:
        self._request = request
        self._source: ILocalByteSource | None = source
        self._offset = offset
        self._remaining = length
        self._clock = clock
        self._write_timeout = write_timeout
        self._paused = False
        self._producing = False
        self._done = False
        self._turn_call: IDelayedCall | None = None
        self._idle_call: IDelayedCall | None = None
        self._last_progress = clock.seconds()

    def start(self) -> None:
        """Register with the request and write the first turn's chunks."""
        self._request.registerProducer(self, True)
        self._request.notifyFinish().addErrback(self._connection_lost)
        if self._write_timeout > 0:
            self._idle_call = self._clock.callLater(self._write_timeout, self._check_idle)
        self._begin()

    def _begin(self) -> None:
        self._produce()

    def _produce(self) -> None:
        """One turn: write until paused, done or the turn's quota is used."""
        raise NotImplementedError

    # IPushProducer

    def pauseProducing(self) -> None:
        self._paused = True

    def resumeProducing(self) -> None:
        self._paused = False
        # Inside our own write the running loop simply carries on; with a turn
        # already scheduled, that turn carries on.
        if not self._producing and self._turn_call is None:
            self._produce()

    def stopProducing(self) -> None:
        self._close()

    # the bookkeeping

    def _advance(self, count: int) -> None:
        self._offset += count
        self._remaining -= count
        self._last_progress = self._clock.seconds()

    def _shrank(self) -> None:
        log.warn(
            "stored file shrank while serving it: {remaining} bytes missing at {offset}",
            remaining=self._remaining,
            offset=self._offset,
        )
        self._abort()

    def _finish(self) -> None:
        self._close()
        self._request.unregisterProducer()
        self._request.finish()

    def _check_idle(self) -> None:
        self._idle_call = None
        if self._done:
            return
        idle = self._clock.seconds() - self._last_progress
        if idle >= self._write_timeout:
            log.info(
                "download stalled for {idle:.1f}s with {remaining} bytes left: aborting",
                idle=idle,
                remaining=self._remaining,
            )
            self._abort()
        else:
            self._idle_call = self._clock.callLater(
                self._write_timeout - idle, self._check_idle
            )

    def _abort(self) -> None:
        self._close()
        self._request.unregisterProducer()
        _abort_connection(self._request)

    def _connection_lost(self, reason: Failure) -> None:
        self._close()

    def _close(self) -> None:
        """Stop for good: cancel timers and close the file. Idempotent."""
        self._done = True
        for call in (self._turn_call, self._idle_call):
            if call is not None and call.active():
                call.cancel()
        self._turn_call = self._idle_call = None
        if self._source is not None:
            source, self._source = self._source, None
            source.close()


class PreadProducer(BodyProducer):
    """
    Writes the body through the request, ``chunk_size`` bytes at a time, at
    most ``chunks_per_turn`` chunks per reactor turn.

    Each chunk is one ``source.read`` (a ``pread`` on the disk pool, so a slow
    disk holds up this download only); a read that completes at once (a file
    held in memory, or a synchronous runner in tests) is written in the same
    turn.  One read at a time: a resume while one is out changes nothing.
    """

    def __init__(
        self,
        request: Any,
        source: ILocalByteSource,
        *,
        offset: int,
        length: int,
        clock: IReactorTime,
        write_timeout: float,
        chunk_size: int,
        chunks_per_turn: int = CHUNKS_PER_TURN,
    ) -> None:
        super().__init__(
            request, source, offset=offset, length=length, clock=clock, write_timeout=write_timeout
        )
        self._chunk_size = chunk_size
        self._chunks_per_turn = chunks_per_turn
        self._reading = False

    def _produce(self) -> None:
        self._turn_call = None
        if self._done or self._producing or self._reading:
            return
        self._producing = True
        try:
            written = 0
            while not self._paused and not self._done:
                if written == self._chunks_per_turn:
                    self._turn_call = self._clock.callLater(0, self._produce)
                    return
                outcome = self._read()
                if outcome is None:
                    return  # on the pool: _read_back carries on
                if not self._write_chunk(outcome):
                    return
                written += 1
        finally:
            self._producing = False

    def _read(self) -> bytes | Failure | None:
        """The next chunk if the read completed at once, else None (it completes later)."""
        assert self._source is not None
        box: list[Any] = []
        reading = self._source.read(self._offset, min(self._chunk_size, self._remaining))
        reading.addBoth(box.append)
        if box:
            return box[0]
        self._reading = True
        reading.addCallback(lambda _: self._read_back(box[0]))
        return None

    def _read_back(self, outcome: bytes | Failure) -> None:
        self._reading = False
        if self._done:
            return
        if self._write_chunk(outcome) and not self._paused:
            self._produce()

    def _write_chunk(self, outcome: bytes | Failure) -> bool:
        """Write one chunk read; finish or abort at the end. False when done."""
        if isinstance(outcome, Failure):
            log.failure("reading at {offset} failed", outcome, offset=self._offset)
            self._abort()
            return False
        data = outcome
        if not data:
            self._shrank()
            return False
        self._advance(len(data))
        self._request.write(data)
        if self._done:
            # The write told us the client is gone.
            return False
        if self._remaining == 0:
            # Finish even if that write filled the transport: all bytes are
            # handed over, and the idle timer must not abort a complete answer.
            self._finish()
            return False
        return True


@implementer(IConsumer)
class StreamedBody:
    """
    Serve a byte source that streams itself (``IByteSource.stream``: an object
    store's, with no local descriptor) into ``request``.

    The source registers with this consumer, which hands it on to the request,
    so the transport's back-pressure pauses the source.  The idle timer aborts
    a download that made no progress for ``write_timeout`` seconds; a client
    that went away stops the source; the source is closed on every way out.
    """

    def __init__(
        self, request: Any, source: IByteSource, *, clock: IReactorTime, write_timeout: float
    ) -> None:
        self._request = request
        self._source = source
        self._clock = clock
        self._write_timeout = write_timeout
        self._producer: Any = None
        self._gone = False
        self._done = False
        self._idle_call: IDelayedCall | None = None
        self._last_progress = clock.seconds()

    def start(self) -> None:
        self._request.notifyFinish().addErrback(self._connection_lost)
        if self._write_timeout > 0:
            self._idle_call = self._clock.callLater(self._write_timeout, self._check_idle)
        streaming = self._source.stream(self)
        streaming.addCallbacks(self._streamed, self._failed)

    # IConsumer, as the source sees us

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        self._producer = producer
        self._request.registerProducer(producer, streaming)

    def unregisterProducer(self) -> None:
        if self._producer is not None:
            self._producer = None
            if not self._gone:
                self._request.unregisterProducer()

    def write(self, data: bytes) -> None:
        if self._gone or self._done:
            return
        self._last_progress = self._clock.seconds()
        self._request.write(data)

    # the outcome

    def _streamed(self, _: None) -> None:
        if self._gone or self._done:
            return
        self._close()
        self._request.finish()

    def _failed(self, failure: Failure) -> None:
        if self._gone or self._done:
            self._close()
            return
        log.failure("streaming a stored file failed", failure)
        self._close()
        _abort_connection(self._request)

    def _check_idle(self) -> None:
        self._idle_call = None
        if self._done:
            return
        idle = self._clock.seconds() - self._last_progress
        if idle >= self._write_timeout:
            log.info("download stalled for {idle:.1f}s: aborting", idle=idle)
            producer = self._producer
            self._close()
            if producer is not None:
                self.unregisterProducer()
                producer.stopProducing()
            _abort_connection(self._request)
        else:
            self._idle_call = self._clock.callLater(self._write_timeout - idle, self._check_idle)

    def _connection_lost(self, reason: Failure) -> None:
        self._gone = True
        producer = self._producer
        if producer is not None:
            self._producer = None
            producer.stopProducing()
        self._close()

    def _close(self) -> None:
        if self._done:
            return
        self._done = True
        if self._idle_call is not None and self._idle_call.active():
            self._idle_call.cancel()
        self._idle_call = None
        self._source.close()
