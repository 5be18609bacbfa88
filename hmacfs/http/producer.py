# -*- test-case-name: tests.test_producer,tests.test_download -*-
"""
The GET body producer's plain part: the bookkeeping every path shares and the
``pread`` path.

``BodyProducer`` owns the file and the progress (offset, bytes left, the idle
timeout, finish and abort); ``PreadProducer`` reads with ``os.pread`` and
writes through the request, which works on every transport.  The ``sendfile``
path needs Twisted internals and lives in hmacfs.http.sendfile; this module
uses none.
"""

from __future__ import annotations

import os
from typing import Any

from twisted.internet.interfaces import IDelayedCall, IPushProducer, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from hmacfs.logs import log_router

__all__ = ["CHUNKS_PER_TURN", "BodyProducer", "PreadProducer"]

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
    Push ``length`` bytes of ``fd`` from ``offset`` into ``request``: what every
    way of sending shares.  Subclasses write in ``_produce`` and report each
    write with ``_advance``.

    Owns ``fd`` and closes it on every way out: end of data, client gone
    (``stopProducing`` or the ``notifyFinish`` errback), idle timeout (no
    progress for ``write_timeout`` seconds), read error.
    """

    def __init__(
        self,
        request: Any,
        fd: int,
        *,
        offset: int,
        length: int,
        clock: IReactorTime,
        write_timeout: float,
    ) -> None:
        self._request = request
        self._fd: int | None = fd
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
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)


class PreadProducer(BodyProducer):
    """
    Writes the body through the request, ``chunk_size`` bytes at a time, at
    most ``chunks_per_turn`` chunks per reactor turn.

    Reads use ``os.pread``: the transport keeps a reference to each written
    ``bytes`` until it is sent, so a reusable buffer would need a copy
    anyway, and ``pread`` allocates exactly one object per chunk.
    """

    def __init__(
        self,
        request: Any,
        fd: int,
        *,
        offset: int,
        length: int,
        clock: IReactorTime,
        write_timeout: float,
        chunk_size: int,
        chunks_per_turn: int = CHUNKS_PER_TURN,
    ) -> None:
        super().__init__(
            request, fd, offset=offset, length=length, clock=clock, write_timeout=write_timeout
        )
        self._chunk_size = chunk_size
        self._chunks_per_turn = chunks_per_turn

    def _produce(self) -> None:
        self._turn_call = None
        if self._done or self._producing:
            return
        self._producing = True
        try:
            written = 0
            while not self._paused and not self._done:
                if written == self._chunks_per_turn:
                    self._turn_call = self._clock.callLater(0, self._produce)
                    return
                if not self._write_chunk():
                    return
                written += 1
        finally:
            self._producing = False

    def _write_chunk(self) -> bool:
        """Read and write one chunk; finish or abort at the end. False when done."""
        assert self._fd is not None
        try:
            data = os.pread(self._fd, min(self._chunk_size, self._remaining), self._offset)
        except OSError:
            log.failure("reading {fd} at {offset} failed", fd=self._fd, offset=self._offset)
            self._abort()
            return False
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
