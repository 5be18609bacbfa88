# -*- test-case-name: tests.test_request -*-
"""
The streaming HTTP/1.1 channel and request.

Twisted's own Request spools a body to memory or a temporary file and calls
``render`` only after the whole body arrived, and its channel sends
``100 Continue`` unconditionally.  An upload server must decide from the
request line and headers alone, before reading a byte of the body, and then
stream the body to disk.  This module is the only place that touches Twisted
internals to make that possible (``HTTPChannel.allHeadersReceived``, the
channel's ``_command``/``_path``/``_version`` and ``Request.gotLength``); it is
pinned to the Twisted versions in ``SUPPORTED_TWISTED`` and tested against them.

The decision itself is not made here: the site's ``body_policy`` (an
``IBodyPolicy``) looks at the request and either attaches a body consumer
(``request.body_consumer``) or a ``Rejection`` (``request.rejection``).  A
decision that needs I/O (a Redis lock, another writer letting go) is a
Deferred in ``request.admission``: until it fires the channel reads nothing
more, holds back the body bytes already read and sends no ``100 Continue``.
"""

from __future__ import annotations

import time
from io import BytesIO
from collections.abc import Callable
from typing import Any, Protocol
from urllib.parse import parse_qs

import attrs
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import http, server

import hmacfs._twisted_compat  # noqa: F401 - refuses an unsupported Twisted
from hmacfs.logs import log_router

log = Logger(observer=log_router)

#: Twisted releases whose HTTPChannel internals this module was checked against.
SUPPORTED_TWISTED = ((24, 11), (26, 99))

#: After an early rejection, how long (seconds) and how much (bytes) of an
#: unwanted body we keep reading and discarding so that the client reads our
#: answer instead of a TCP reset (what nginx calls lingering close).
LINGER_SECONDS = 3.0
LINGER_BYTES = 8 * 1024 * 1024


@attrs.frozen
class Rejection:
    """A refusal decided from the request line and headers."""

    status: int
    reason: str
    headers: tuple[tuple[bytes, bytes], ...] = ()


class IBodyConsumer(Protocol):
    """Where an accepted request body goes, chunk by chunk."""

    def write(self, data: bytes) -> None: ...

    def body_complete(self) -> None: ...

    def connection_lost(self) -> None: ...


class IBodyPolicy(Protocol):
    """Decides, at header time, what happens to a request's body."""

    def headers_received(self, request: StreamingRequest, length: int | None) -> None:
        """Set ``request.body_consumer`` or ``request.rejection`` (or neither)."""


class StreamingRequest(server.Request):
    """
    A Request that knows its method, URI and arguments once the headers are in,
    and hands its body to ``body_consumer`` instead of a spool file.
    """

    body_consumer: IBodyConsumer | None = None
    rejection: Rejection | None = None
    #: the parsed upload path, set by the policy for upload requests
    slot: Any = None
    #: bytes of body handed to the consumer (or discarded)
    body_received: int = 0
    started: float = 0.0
    #: set by the policy when its decision waits for I/O (a Redis lock, another
    #: writer letting go): the channel pauses the socket and holds back body
    #: bytes until it fires; by then ``body_consumer`` or ``rejection`` is set
    admission: Any = None
    #: whether the whole body had already been read when the headers ended (set by
    #: the channel before the policy runs): such an upload can finish in one disk job
    body_in_hand: bool = False
    _held: list[bytes] | None = None
    _complete_while_held: bool = False

    def __init__(self, channel: Any, queued: object = None) -> None:
        super().__init__(channel)
        self.started = time.monotonic()
        metrics = getattr(getattr(channel, "site", None), "metrics", None)
        if metrics is not None:
            metrics.request_started()
            self.notifyFinish().addBoth(metrics.request_ended)

    def headers_received(
        self, command: bytes, uri: bytes, version: bytes, length: int | None
    ) -> None:
        """Called by the channel at the end of the headers, before any body byte."""
        self.method, self.uri, self.clientproto = command, uri, version
        self.path, _, query = uri.partition(b"?")
        self.args = parse_qs(query, keep_blank_values=True) if query else {}
        site = self.channel.site
        for check in getattr(site, "admission_checks", ()):
            rejection = check(self)
            if rejection is not None:
                self.rejection = rejection
                return
        policy = getattr(site, "body_policy", None)
        if policy is not None:
            policy.headers_received(self, length)
        if (
            self.body_consumer is None
            and self.rejection is None
            and self.admission is None
            and length != 0
        ):
            # Nobody wants this body: never spool it.  Whoever routes requests
            # should have said why; this is the safe default.
            self.rejection = Rejection(413, "this resource takes no request body")

    def gotLength(self, length: int | None) -> None:
        # No spool: the body goes to the consumer.  ``content`` stays a tiny
        # empty placeholder for code that expects the attribute.
        self.content = BytesIO()

    def handleContentChunk(self, data: bytes) -> None:
        self.body_received += len(data)
        if self._held is not None:
            self._held.append(data)
            return
        consumer = self.body_consumer
        if consumer is not None:
            consumer.write(data)

    def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:
        # The base method rewinds the spool and parses POST forms; we already
        # set method/uri/args in headers_received.
        if self._held is not None:
            self._complete_while_held = True
            return
        if self.body_consumer is not None:
            self.body_consumer.body_complete()
        self.process()

    def hold_body(self) -> None:
        """Keep body bytes (at most what one read delivered) until ``admit_held``."""
        self._held = []

    def admit_held(self) -> bool:
        """
        The admission decision is in: hand the held bytes to the consumer (or drop
        them for a refusal).  Returns whether the whole body had already arrived,
        in which case the request has been processed.
        """
        held, self._held = self._held or [], None
        consumer = self.body_consumer if self.rejection is None else None
        if consumer is not None:
            for chunk in held:
                consumer.write(chunk)
        if self._complete_while_held:
            self.requestReceived(self.method, self.uri, self.clientproto)
            return True
        return False

    def connectionLost(self, reason: Any) -> None:
        consumer = self.body_consumer
        if consumer is not None and not self.finished:
            consumer.connection_lost()
        super().connectionLost(reason)

    def processingFailed(self, reason: Any) -> Any:
        log.failure("unhandled error processing {method} request", reason, method=self.method)
        if self.body_consumer is not None:
            self.body_consumer.connection_lost()
        return super().processingFailed(reason)


class StreamingChannel(http.HTTPChannel):
    """
    HTTP/1.1 channel that lets the site's policy accept or refuse a request
    from its headers, sends ``100 Continue`` only to accepted requests, reads
    bodies in ``read_size`` pieces and closes refused ones politely.
    """

    read_size: int = 65536
    _rejected_early: bool = False
    _lingering: bool = False
    _linger_bytes: int = 0
    _linger_call: Any = None

    def connectionMade(self) -> None:
        super().connectionMade()
        read_size = getattr(self.site, "read_size", None)
        if read_size and hasattr(self.transport, "bufferSize"):
            # One recv() per read_size bytes instead of per 64 KiB: fewer
            # trips through the parser for big uploads.
            self.transport.bufferSize = read_size

    _host: Any = None

    def getHost(self) -> Any:
        # Every Request asks for the local address (Request.__init__); a
        # connected socket's does not change, so ask the kernel once.
        host = self._host
        if host is None and self.transport is not None:
            host = self._host = self.transport.getHost()
        return host

    def allHeadersReceived(self) -> None:
        req = self.requests[-1]
        req.parseCookies()
        self.persistent = self.checkPersistence(req, self._version)
        req.gotLength(self.length)
        # LineReceiver keeps what followed the blank line in ``_buffer``: the body
        # bytes that came in the same read as the headers.
        length = self.length
        req.body_in_hand = length is not None and len(self._buffer) >= length
        req.headers_received(self._command, self._path, self._version, length)
        admission = req.admission
        if admission is not None and not admission.called:
            # The decision needs I/O: read nothing more until it is made.
            req.hold_body()
            self.transport.pauseProducing()
            admission.addBoth(self._admitted, req, self._version)
            return
        if req.rejection is not None and self.length != 0:
            self._reject_before_body(req)
            return
        self._maybe_continue(req, self._version)

    def _maybe_continue(self, req: StreamingRequest, version: bytes) -> None:
        expect = req.requestHeaders.getRawHeaders(b"Expect")
        if expect and expect[0].lower() == b"100-continue" and version == b"HTTP/1.1":
            self._send100Continue()

    def _admitted(self, result: object, req: StreamingRequest, version: bytes) -> None:
        """A deferred admission decision arrived (see ``StreamingRequest.admission``)."""
        if isinstance(result, Failure):
            log.failure("admission failed", result)
            if req.rejection is None and req.body_consumer is None:
                req.rejection = Rejection(500, "internal error")
        if self.transport is None or req._disconnected:
            # The client left while we were deciding: whoever was admitted lets go.
            req._held = None
            if req.body_consumer is not None and req.rejection is None:
                req.body_consumer.connection_lost()
            return
        received = req.body_received
        if req.rejection is not None and not req._complete_while_held:
            req._held = None
            self.transport.resumeProducing()
            self._reject_before_body(req)
            return
        if req.admit_held():
            self.transport.resumeProducing()
            return
        if not received:
            self._maybe_continue(req, version)
        self.transport.resumeProducing()

    def _reject_before_body(self, req: StreamingRequest) -> None:
        """
        Answer a refused request now, without reading its body.

        The request goes through the normal resource machinery (so the error
        page, CORS headers and access log are the usual ones) with an empty
        body; the connection is then closed, because the unread body would
        otherwise be parsed as the next request.
        """
        self.persistent = False
        self._rejected_early = True
        req.responseHeaders.setRawHeaders(b"Connection", [b"close"])
        self._transferDecoder = None
        self.allContentReceived()
        # allContentReceived reset ``length`` to 0, which would make our
        # caller (lineReceived) run allContentReceived a second time.
        self.length = None

    def refuse_body(self, consumer: IBodyConsumer) -> None:
        """
        ``consumer`` cannot take the rest of its body (the disk is full): end the body
        now, so its request is answered through the normal response path, and discard
        what the client still sends, as after an early rejection.  On the next reactor
        turn: the consumer may be calling from inside the body parser.
        """
        clock = self.site.reactor if self.site is not None else None
        if clock is None:  # pragma: no cover - every site we build has a reactor
            self._refuse_body_now(consumer)
        else:
            clock.callLater(0, self._refuse_body_now, consumer)

    def _refuse_body_now(self, consumer: IBodyConsumer) -> None:
        if self.transport is None or not self.requests or self._transferDecoder is None:
            return  # gone, or the body ended meanwhile (the consumer answers then)
        req = self.requests[-1]
        if req.body_consumer is consumer and not req.finished:
            self._reject_before_body(req)

    def loseConnection(self) -> None:
        if not self._rejected_early or self._lingering or self.requests or self.transport is None:
            return super().loseConnection()
        # The response to an early rejection is written; the client may still
        # be sending its body.  Half-close and discard what comes for a little
        # while so the client reads our status instead of a reset.
        self._lingering = True
        self._networkProducer.unregisterProducer()
        self.transport.resumeProducing()
        self.setTimeout(None)
        clock: IReactorTime = self.site.reactor if self.site is not None else None
        if hasattr(self.transport, "loseWriteConnection"):
            self.transport.loseWriteConnection()
        else:  # pragma: no cover - every stream transport we listen on has it
            return self.transport.loseConnection()
        if clock is not None:
            self._linger_call = clock.callLater(LINGER_SECONDS, self._stop_lingering)

    def _stop_lingering(self) -> None:
        self._linger_call = None
        if self.transport is not None:
            self.transport.loseConnection()

    def dataReceived(self, data: bytes) -> None:
        if self._lingering:
            self._linger_bytes += len(data)
            if self._linger_bytes > LINGER_BYTES:
                if self._linger_call is not None:
                    self._linger_call.cancel()
                self._stop_lingering()
            return
        super().dataReceived(data)

    def connectionLost(self, reason: Any) -> None:
        if self._linger_call is not None:
            self._linger_call.cancel()
            self._linger_call = None
        super().connectionLost(reason)

    # Flow control used by body consumers: stop reading while the disk lags,
    # and do not count that pause against the client's idle timeout.

    def pause_body(self) -> None:
        """Stop reading the socket until ``resume_body``."""
        if self.transport is not None:
            self.transport.pauseProducing()
            self.setTimeout(None)

    def resume_body(self) -> None:
        """Read the socket again and restart the client's idle timeout."""
        if self.transport is not None:
            self.transport.resumeProducing()
            self.setTimeout(self.timeOut)


class StreamingSite(server.Site):
    """
    A Site whose channels stream request bodies to the ``body_policy``.

    ``read_size`` is the socket read size (the BufferSize setting);
    ``access_log`` is called with each finished request.
    """

    protocol = StreamingChannel  # type: ignore[assignment]
    requestFactory = StreamingRequest
    body_policy: IBodyPolicy | None = None
    read_size: int = 65536
    #: an hmacfs.metrics.Metrics, or None
    metrics: Any = None
    #: called with each request at header time, before the body policy; the
    #: first Rejection returned wins (bans, tombstones: "before any other work")
    admission_checks: list[Callable[[StreamingRequest], Rejection | None]]

    def __init__(
        self,
        resource: Any,
        *,
        body_policy: IBodyPolicy | None,
        reactor: IReactorTime,
        read_timeout: float = 120.0,
        read_size: int = 65536,
        access_log: Any = None,
    ) -> None:
        super().__init__(resource, timeout=read_timeout, reactor=reactor)
        self.body_policy = body_policy
        self.read_size = read_size
        self.admission_checks = []
        self._access_log = access_log
        self.displayTracebacks = False

    def log(self, request: Any) -> None:
        if self.metrics is not None:
            self.metrics.request_finished(request)
        if self._access_log is not None:
            self._access_log(request)
