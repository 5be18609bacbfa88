# -*- test-case-name: tests.test_s3_units,tests.test_s3_client -*-
"""
The two streamed bodies, with flow control both ways and nothing held but the chunk in hand.

:class:`UploadBody` is the outgoing request's ``IBodyProducer``: the caller ``write()``s
chunks and waits on each returned Deferred, which fires once the chunk is handed to the
connection and the connection is not paused, so a slow S3 pauses the caller (and through it
the client's socket).  :class:`DownloadReceiver` is the protocol a response body is
delivered to; it writes into the caller's ``IConsumer`` and is registered there as a push
producer, so a slow downstream pauses the S3 connection's transport.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IConsumer, IDelayedCall, IPushProducer, IReactorTime
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone
from twisted.web.iweb import IBodyProducer
from zope.interface import implementer

from .errors import S3Aborted, S3Error, S3Unavailable


@implementer(IBodyProducer)
class UploadBody:
    """
    A request body of known ``length`` fed by ``write()``.  One write may be outstanding at
    a time (wait for its Deferred): that is what keeps memory at one chunk per upload.
    """

    def __init__(self, length: int) -> None:
        self.length = length
        self.sent = 0
        self._consumer: IConsumer | None = None
        self._pending: bytes | None = None
        self._paused = False
        self._waiting: Deferred[None] | None = None
        self._finished: Deferred[None] | None = None
        self._finish_requested = False
        self._failure: S3Error | None = None
        #: the connection stopped taking the body (S3 answered early, or it was lost)
        self._stopped = False

    # IBodyProducer, called by the Agent's HTTP client protocol
    def startProducing(self, consumer: IConsumer) -> Deferred[None]:
        self._consumer = consumer
        self._finished = Deferred(lambda d: self.stopProducing())
        if self._pending is not None:
            data, self._pending = self._pending, None
            consumer.write(data)
        if self._finish_requested:
            self._finished.callback(None)
        elif not self._paused:
            self._release()
        return self._finished

    def pauseProducing(self) -> None:
        self._paused = True

    def resumeProducing(self) -> None:
        self._paused = False
        if self._consumer is not None:
            self._release()

    def stopProducing(self) -> None:
        # What ended it (S3's early answer or the connection's failure) reaches the request's
        # Deferred; the upload then fail()s the waiting write with it.
        self._stopped = True

    # the caller's side
    def write(self, data: bytes) -> Deferred[None]:
        """Hand ``data`` on; the Deferred fires when the next chunk may come."""
        if self._failure is not None:
            failure: Deferred[None] = Deferred()
            failure.errback(Failure(self._failure))
            return failure
        if self._waiting is not None:
            raise RuntimeError("write() before the previous write's Deferred fired")
        if self._finish_requested:
            raise RuntimeError("write() after finish()")
        if self.sent + len(data) > self.length:
            raise ValueError(f"body longer than its Content-Length {self.length}")
        self.sent += len(data)
        if self._stopped:
            pass  # nowhere to write: the caller waits for fail()
        elif self._consumer is None:
            self._pending = data
        else:
            self._consumer.write(data)
            if not self._paused:
                return succeed(None)
        self._waiting = Deferred()
        return self._waiting

    def finish(self) -> None:
        """The last byte was written: let the request complete."""
        if self.sent != self.length:
            raise ValueError(f"body of {self.sent} bytes, its Content-Length is {self.length}")
        self._finish_requested = True
        if self._finished is not None and not self._finished.called:
            self._finished.callback(None)

    def fail(self, error: S3Error) -> None:
        """The request is over (error, abort): the waiting write and later ones fail with it."""
        if self._failure is None:
            self._failure = error
        waiting, self._waiting = self._waiting, None
        if waiting is not None:
            waiting.errback(Failure(self._failure))

    def _release(self) -> None:
        waiting, self._waiting = self._waiting, None
        if waiting is not None:
            waiting.callback(None)


@implementer(IPushProducer)
class DownloadReceiver(Protocol):
    """
    Delivers a response body to ``consumer`` and fires ``done`` with the byte count.  The
    consumer pauses us; we pause the S3 connection (``self.transport``, Twisted's
    ``TransportProxyProducer``) so nothing piles up in memory.
    """

    def __init__(
        self,
        consumer: IConsumer,
        operation: str,
        clock: IReactorTime | None = None,
        idle_timeout: float | None = None,
    ) -> None:
        self.consumer = consumer
        self.operation = operation
        self.received = 0
        self.done: Deferred[int] = Deferred()
        self._stopped = False
        self._clock = clock
        self._idle_timeout = idle_timeout
        self._idle: IDelayedCall | None = None
        self._timed_out = False
        self._paused = False

    def connectionMade(self) -> None:
        self.consumer.registerProducer(self, True)
        self._arm()

    def dataReceived(self, data: bytes) -> None:
        self.received += len(data)
        self.consumer.write(data)
        if self._idle is not None and self._idle.active() and self._idle_timeout is not None:
            self._idle.reset(self._idle_timeout)

    def connectionLost(self, reason: Failure = ResponseDone) -> None:  # type: ignore[assignment]
        self._disarm()
        self.consumer.unregisterProducer()
        if reason.check(ResponseDone):
            self.done.callback(self.received)
        elif self._timed_out:
            self.done.errback(
                Failure(S3Unavailable(0, "Timeout", "S3 sent nothing in time", self.operation))
            )
        elif self._stopped:
            self.done.errback(Failure(S3Aborted(0, "Aborted", "download stopped", self.operation)))
        else:
            self.done.errback(
                Failure(S3Unavailable(0, "ConnectionLost", _describe(reason), self.operation))
            )

    # S3 going quiet while we want data is S3's fault; the downstream pausing us is not
    def _arm(self) -> None:
        if self._clock is not None and self._idle_timeout is not None and self._idle is None:
            self._idle = self._clock.callLater(self._idle_timeout, self._quiet)

    def _disarm(self) -> None:
        if self._idle is not None and self._idle.active():
            self._idle.cancel()
        self._idle = None

    def _quiet(self) -> None:
        self._idle = None
        self._timed_out = True
        if self.transport is not None:
            self.transport.stopProducing()  # type: ignore[attr-defined]

    # IPushProducer, called by the downstream consumer
    def pauseProducing(self) -> None:
        self._paused = True
        self._disarm()
        if self.transport is not None:
            self.transport.pauseProducing()  # type: ignore[attr-defined]

    def resumeProducing(self) -> None:
        self._paused = False
        self._arm()
        if self.transport is not None:
            self.transport.resumeProducing()  # type: ignore[attr-defined]

    def stopProducing(self) -> None:
        self._stopped = True
        if self.transport is not None:
            self.transport.stopProducing()  # type: ignore[attr-defined]


def _describe(reason: Failure) -> str:
    value: Any = reason.value
    inner = getattr(value, "reasons", None)
    if inner:
        return "; ".join(f.getErrorMessage() for f in inner)
    return reason.getErrorMessage()
