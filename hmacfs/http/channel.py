# -*- test-case-name: tests.test_request -*-
"""
The streaming HTTP/1.1 channel and request.

Twisted's own Request spools a body to memory or a temporary file and calls
``render`` only after the whole body arrived, and its channel sends
``100 Continue`` unconditionally.  An upload server must decide from the
request line and headers alone, before reading a byte of the body, and then
stream the body to disk.  This module is the only place that touches Twisted
internals to make that possible (``HTTPChannel.allHeadersReceived``,
``Request.gotLength`` and the names in ``TWISTED_INTERNALS``); it is pinned to
the Twisted versions in ``SUPPORTED_TWISTED`` (checked at import) and
tests.test_twisted_internals pins each internal against the tested releases.

The channel is the one owner of its socket's reading.  The disk lagging
(``pause_body``), an admission decision waiting for I/O and HTTPChannel's own
flow control (pipelining, a full send buffer) each hold a pause *reason*; the
socket is read only while none holds, so no party can undo another's pause.
Only a disk pause stops the client's idle clock, and the clock always comes
back.  The channel also bounds a request head in time (``HeaderTimeout``),
caps connections per client (``MaxConnectionsPerClient``), refuses an absurd
Content-Length, and after an early refusal sends every body byte, however it
arrives, to the discard.  ``GuardedChannel`` holds that connection side,
``StreamingChannel`` the header-time decision and the early refusal; the
plain policy they apply (the pause arbiter, the connection limits and their
counting) is in hmacfs.http.pauses and hmacfs.http.limits, which use no
Twisted internals.

The decision itself is not made here: the site's ``body_policy`` (an
``IBodyPolicy``) looks at the request and records it in the request's one
typed ``RequestState`` (``request.upload_state``): a body consumer
(``consumer``) or a ``Refusal`` (``rejection``).  A decision that needs I/O
(a Redis lock, another writer letting go) is a Deferred in ``admission``:
until it fires the channel reads nothing more, holds back the body bytes
already read and sends no ``100 Continue``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from io import BytesIO
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import parse_qs

import attrs
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import http, server

from hmacfs.errors import Refusal
from hmacfs.http._twisted_compat import SUPPORTED_TWISTED  # noqa: F401 - checks the installed Twisted at import
from hmacfs.http.limits import NO_LIMITS, ConnectionLimits, ConnectionTable
from hmacfs.http.pauses import ADMISSION, DISCARD, DISK, PauseArbiter
from hmacfs.logs import log_router

if TYPE_CHECKING:
    from hmacfs.signing.paths import SlotPath

log = Logger(observer=log_router)


#: After an early rejection, how long (seconds) and how much (bytes) of an
#: unwanted body we keep reading and discarding so that the client reads our
#: answer instead of a TCP reset (what nginx calls lingering close).
LINGER_SECONDS = 3.0
LINGER_BYTES = 8 * 1024 * 1024


class IBodyConsumer(Protocol):
    """Where an accepted request body goes, chunk by chunk."""

    def write(self, data: bytes) -> None: ...

    def body_complete(self) -> None: ...

    def connection_lost(self) -> None: ...


class IBodyPolicy(Protocol):
    """Decides, at header time, what happens to a request's body."""

    def headers_received(self, request: StreamingRequest, length: int | None) -> None:
        """Set ``request.upload_state.consumer`` or ``.rejection`` (or neither)."""


class IUploadBody(IBodyConsumer, Protocol):
    """An upload's body consumer as the resource sees it: ``done`` fires with how it ended."""

    @property
    def done(self) -> Deferred[Any]: ...


@attrs.frozen
class Answer:
    """A body-less response decided at header time (HEAD offsets, tus termination)."""

    status: int
    headers: tuple[tuple[bytes, bytes], ...] = ()


@attrs.define(slots=True, eq=False)
class RequestState:
    """
    What hmacfs decided about one request, in one typed object on the request
    (``StreamingRequest.upload_state``) instead of attributes strewn on it.

    The channel reads the first four fields; the upload protocols set the
    rest for the upload resource, the metrics and the access log.
    """

    #: where the body goes (set by the body policy), or None
    consumer: IBodyConsumer | None = None
    #: why the request is refused: its body is discarded, the resource answers this
    rejection: Refusal | None = None
    #: a decision waiting for I/O (a Redis lock, another writer letting go): the
    #: channel pauses the socket and holds back body bytes until it fires; by then
    #: ``consumer`` or ``rejection`` is set
    admission: Deferred[Any] | None = None
    #: whether the whole body had already been read when the headers ended (set by
    #: the channel before the policy runs): such an upload can finish in one disk job
    body_in_hand: bool = False
    #: the parsed upload path, for upload requests
    slot: SlotPath | None = None
    #: ``consumer`` when it is an upload's receiver: the resource answers from its ``done``
    receiver: IUploadBody | None = None
    #: a body-less answer decided at header time
    answer: Answer | None = None
    #: which upload request: "put", "tus-create" or "tus-patch" (how it is answered)
    kind: str = "put"
    #: it continues an upload an earlier request left unfinished (metrics)
    resumed: bool = False
    #: whether the upload was stored (metrics; None: as the status says)
    stored: bool | None = None
    #: why the request was refused (the access log)
    reason: str | None = None


class StreamingRequest(server.Request):
    """
    A Request that knows its method, URI and arguments once the headers are in,
    and hands its body to ``upload_state.consumer`` instead of a spool file.
    """

    upload_state: RequestState
    channel: StreamingChannel
    #: bytes of body handed to the consumer (or discarded)
    body_received: int = 0
    started: float = 0.0
    _held: list[bytes] | None = None
    _complete_while_held: bool = False

    def __init__(self, channel: Any, queued: object = None) -> None:
        super().__init__(channel)
        self.started = time.monotonic()
        self.upload_state = RequestState()
        metrics = channel.site.metrics
        if metrics is not None:
            metrics.request_started()
            self.notifyFinish().addBoth(metrics.request_ended)

    def headers_received(
        self, command: bytes, uri: bytes, version: bytes, length: int | None
    ) -> None:
        """Called by the channel at the end of the headers, before any body byte."""
        self.method, self.uri, self.clientproto = command, uri, version
        self.path, _, query = uri.partition(b"?")
        # Twisted's stub declares args None until its own parsing (which never runs here)
        self.args = parse_qs(query, keep_blank_values=True) if query else {}  # type: ignore[assignment]
        site: StreamingSite = self.channel.site
        state = self.upload_state
        for check in site.admission_checks:
            rejection = check(self)
            if rejection is not None:
                state.rejection = rejection
                return
        policy = site.body_policy
        if policy is not None:
            policy.headers_received(self, length)
        if (
            state.consumer is None
            and state.rejection is None
            and state.admission is None
            and length != 0
        ):
            # Nobody wants this body: never spool it.  Whoever routes requests
            # should have said why; this is the safe default.
            state.rejection = Refusal(413, "this resource takes no request body")

    def gotLength(self, length: int | None) -> None:
        # No spool: the body goes to the consumer.  ``content`` stays a tiny
        # empty placeholder for code that expects the attribute.
        self.content = BytesIO()  # type: ignore[assignment]  # None in Twisted's stub

    def handleContentChunk(self, data: bytes) -> None:
        self.body_received += len(data)
        if self._held is not None:
            self._held.append(data)
            return
        consumer = self.upload_state.consumer
        if consumer is not None:
            consumer.write(data)

    def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:
        # The base method rewinds the spool and parses POST forms; we already
        # set method/uri/args in headers_received.
        if self._held is not None:
            self._complete_while_held = True
            return
        consumer = self.upload_state.consumer
        if consumer is not None:
            consumer.body_complete()
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
        state = self.upload_state
        consumer = state.consumer if state.rejection is None else None
        if consumer is not None:
            for chunk in held:
                consumer.write(chunk)
        if self._complete_while_held:
            self.requestReceived(self.method, self.uri, self.clientproto)
            return True
        return False

    def connectionLost(self, reason: Any) -> None:
        consumer = self.upload_state.consumer
        if consumer is not None and not self.finished:
            consumer.connection_lost()
        super().connectionLost(reason)

    def processingFailed(self, reason: Any) -> Any:
        log.failure("unhandled error processing {method} request", reason, method=self.method)
        consumer = self.upload_state.consumer
        if consumer is not None:
            consumer.connection_lost()
        return super().processingFailed(reason)


#: The longest Content-Length we parse: 19 digits hold every size up to 2**63.
#: Twisted would int() any run of digits, and Python refuses more than 4,300.
MAX_LENGTH_DIGITS = 19

#: The HTTPChannel (and LineReceiver, TimeoutMixin) internals this module relies
#: on; tests.test_request pins each of them against the installed Twisted.
TWISTED_INTERNALS = (
    # allHeadersReceived: the request line is kept on the channel
    "_command",
    "_path",
    "_version",
    # LineReceiver's unparsed bytes: the body that came with the headers
    "_buffer",
    # whether a request is being answered (set by allContentReceived)
    "_handlingRequest",
    # bytes buffered while a request is answered (replayed by requestDone)
    "_dataBuffer",
    # the transport as seen by Twisted's own pause/resume calls (the arbiter wraps it)
    "_networkProducer",
    # dropped when a refusal is answered before its body
    "_transferDecoder",
    # Content-Length parsing, overridden to refuse absurd lengths
    "_maybeChooseTransferDecoder",
    "_send100Continue",
)


def _plain_answer(status: int, phrase: str, reason: str) -> bytes:
    """A complete, closing response written by the channel itself (no request object)."""
    body = reason.encode("ascii") + b"\n"
    return (
        f"HTTP/1.1 {status} {phrase}\r\n"
        "Content-Type: text/plain; charset=utf-8\r\n"
        f"Content-Length: {len(body)}\r\n"
        "Access-Control-Allow-Origin: *\r\n"
        "Connection: close\r\n\r\n"
    ).encode("ascii") + body


_BAD_LENGTH = _plain_answer(400, "Bad Request", "bad Content-Length")
_HEAD_TIMEOUT = _plain_answer(408, "Request Timeout", "request headers not received in time")
_TOO_MANY = _plain_answer(429, "Too Many Requests", "too many connections from your address")


def _ignore(data: bytes) -> None:
    """dataReceived of a refused connection: nothing it sends is parsed."""


class GuardedChannel(http.HTTPChannel):
    """
    The connection side of the streaming channel: the one owner of the
    transport's reading, and the guards every connection passes.

    Every pause has a reason (``DISK``, ``ADMISSION``, ``TWISTED``, ``DISCARD``,
    held by a ``PauseArbiter``) and the socket is read only while none holds;
    only a disk pause stops the client's idle clock.  The request head is
    bounded in time and connections are counted per client
    (``site.connection_limits``, ``site.connections_by_client``); an absurd
    Content-Length is refused.
    """

    #: set by the Site's buildProtocol (HTTPChannel does not declare it)
    site: StreamingSite
    #: a connected TCP or UNIX transport (getPeer, write, bufferSize, half-close)
    transport: Any

    #: the one owner of reading (an inert one until connected)
    _pauses: PauseArbiter = PauseArbiter(None)
    #: the idle timer is stopped for a DISK pause (the disk is slow, not the client)
    _idle_stopped: bool = False
    _header_timeout: float = 0.0
    _head_call: Any = None
    #: a request was answered on a persistent connection; the next byte starts a head
    _head_pending: bool = False
    #: the key this connection counts against (site.connections_by_client)
    _client_key: str | None = None

    def connectionMade(self) -> None:
        site = self.site
        limits = getattr(site, "connection_limits", NO_LIMITS)
        if limits.max_per_client and not self._claim_client_slot(site, limits):
            return
        super().connectionMade()
        self._pauses = pauses = PauseArbiter(self.transport)
        if self._networkProducer is self.transport:
            # Twisted's own pauses of the transport become the TWISTED reason.
            self._networkProducer = pauses
        read_size = getattr(site, "read_size", None)
        if read_size and hasattr(self.transport, "bufferSize"):
            # One recv() per read_size bytes instead of per 64 KiB: fewer
            # trips through the parser for big uploads.
            self.transport.bufferSize = read_size
        self._header_timeout = limits.header_timeout or 0.0
        self._arm_head_deadline()

    _host: Any = None

    def getHost(self) -> Any:
        # Every Request asks for the local address (Request.__init__); a
        # connected socket's does not change, so ask the kernel once.
        host = self._host
        if host is None and self.transport is not None:
            host = self._host = self.transport.getHost()
        return host

    # The one owner of the transport's reading (hmacfs.http.pauses).  Called
    # on pause/resume only, never per chunk.

    def _pause(self, reason: str) -> None:
        self._pauses.pause(reason)

    def _resume(self, reason: str) -> None:
        self._pauses.resume(reason)

    @property
    def pause_reasons(self) -> frozenset[str]:
        """Why the socket is not being read now (empty: it is)."""
        return self._pauses.reasons

    # Flow control used by body consumers: stop reading while the disk lags,
    # and do not count that pause against the client's idle timeout.

    def pause_body(self) -> None:
        """Stop reading the socket (and the client's idle clock) until ``resume_body``."""
        self._pauses.pause(DISK)
        period = self.timeOut
        if period is not None and not self._idle_stopped:
            # setTimeout(None) cancels the timer but also forgets the period
            # (TimeoutMixin keeps it in timeOut); put it back, with no timer
            # running, so resume_body and HTTPChannel's save/restore around a
            # request being answered (allContentReceived/requestDone) see it.
            self.setTimeout(None)
            self.timeOut = period
            self._idle_stopped = True

    def resume_body(self) -> None:
        """Read the socket again and restart the client's idle timeout."""
        self._pauses.resume(DISK)
        self._restart_idle_clock()

    def _restart_idle_clock(self) -> None:
        if self._idle_stopped:
            self._idle_stopped = False
            # None while a request is being answered: requestDone restores it.
            if self.timeOut is not None and self.transport is not None:
                self.setTimeout(self.timeOut)

    # The request head: a deadline from its first byte to its end.

    def _arm_head_deadline(self) -> None:
        self._head_pending = False
        if self._header_timeout and self._head_call is None:
            self._head_call = self.callLater(self._header_timeout, self._head_timed_out)

    def _cancel_head_deadline(self) -> None:
        self._head_pending = False
        call, self._head_call = self._head_call, None
        if call is not None and call.active():
            call.cancel()

    def _head_timed_out(self) -> None:
        self._head_call = None
        if self.transport is None:
            return
        started = bool(self.requests or self._buffer)
        log.info(
            "closing a connection from {peer}: no complete request head within {seconds}s",
            peer=str(self.transport.getPeer()),
            seconds=self._header_timeout,
        )
        self.persistent = False
        if started:
            self.transport.write(_HEAD_TIMEOUT)
        # timeoutConnection closes, and aborts after abortTimeout a client that
        # does not even take the answer.
        self.timeoutConnection()

    def dataReceived(self, data: bytes) -> None:
        if self._head_pending:
            self._arm_head_deadline()
        http.HTTPChannel.dataReceived(self, data)

    # The per-client connection cap (hmacfs.http.limits).

    def _claim_client_slot(self, site: Any, limits: ConnectionLimits) -> bool:
        """Count this connection against its client; False (and answered 429) beyond the cap."""
        key = limits.key_of(self.transport.getPeer())
        if key is None:
            return True
        table: ConnectionTable = site.connections_by_client
        if not table.claim(key, limits.max_per_client):
            log.info(
                "refusing a connection from {client}: {count} already open",
                client=key,
                count=table.open(key),
            )
            self.dataReceived = _ignore  # type: ignore[method-assign]
            self.transport.write(_TOO_MANY)
            self.transport.loseConnection()
            return False
        self._client_key = key
        return True

    def _release_client_slot(self) -> None:
        key, self._client_key = self._client_key, None
        if key is not None:
            self.site.connections_by_client.release(key)

    def _maybeChooseTransferDecoder(self, header: bytes, data: bytes) -> bool:
        # Twisted checks isdigit() and then int()s any length of digits, which
        # raises beyond 4,300 of them (an unhandled error, no response).
        if header == b"Content-Length" and (len(data) > MAX_LENGTH_DIGITS or not data.isdigit()):
            self.transport.write(_BAD_LENGTH)
            self.loseConnection()
            self.length = None
            return False
        return bool(super()._maybeChooseTransferDecoder(header, data))

    def requestDone(self, request: Any) -> None:
        # The body is over, whatever path it took (the last batch may have been
        # written and committed in one disk job that never resumed the body):
        # its pauses end with it.  Twisted restores the idle timer it saved.
        self._idle_stopped = False
        pauses = self._pauses
        pauses.resume(DISK)
        pauses.resume(ADMISSION)
        if self.persistent:
            if self._buffer or any(self._dataBuffer):
                self._arm_head_deadline()  # the next request's head is already here
            else:
                self._head_pending = True
        super().requestDone(request)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._release_client_slot()
        self._cancel_head_deadline()
        super().connectionLost(reason)


class StreamingChannel(GuardedChannel):
    """
    HTTP/1.1 channel that lets the site's policy accept or refuse a request
    from its headers, sends ``100 Continue`` only to accepted requests, reads
    bodies in ``read_size`` pieces and closes refused ones politely: after an
    early refusal every body byte, however it arrives, goes to the discard,
    which lingers so that the client reads the answer instead of a reset.
    """

    read_size: int = 65536
    _rejected_early: bool = False
    _lingering: bool = False
    _linger_bytes: int = 0
    _linger_call: Any = None

    # Headers, admission and early refusal.

    def allHeadersReceived(self) -> None:
        self._cancel_head_deadline()
        req = self.requests[-1]
        req.parseCookies()
        self.persistent = self.checkPersistence(req, self._version)
        req.gotLength(self.length)
        # LineReceiver keeps what followed the blank line in ``_buffer``: the body
        # bytes that came in the same read as the headers.
        length = self.length
        state = req.upload_state
        state.body_in_hand = length is not None and len(self._buffer) >= length
        req.headers_received(self._command, self._path, self._version, length)
        admission = state.admission
        if admission is not None and not admission.called:
            # The decision needs I/O: read nothing more until it is made.
            req.hold_body()
            self._pause(ADMISSION)
            admission.addBoth(self._admitted, req, self._version)
            return
        if state.rejection is not None and self.length != 0:
            self._reject_before_body(req)
            return
        self._maybe_continue(req, self._version)

    def _maybe_continue(self, req: StreamingRequest, version: bytes) -> None:
        if req.upload_state.body_in_hand:
            return  # the body is here already: RFC 9110 lets us omit the 100
        expect = req.requestHeaders.getRawHeaders(b"Expect")
        if expect and expect[0].lower() == b"100-continue" and version == b"HTTP/1.1":
            self._send100Continue()

    def _admitted(self, result: object, req: StreamingRequest, version: bytes) -> None:
        """A deferred admission decision arrived (see ``RequestState.admission``)."""
        state = req.upload_state
        if isinstance(result, Failure):
            log.failure("admission failed", result)
            if state.rejection is None and state.consumer is None:
                state.rejection = Refusal(500, "internal error")
        if self.transport is None or req._disconnected:
            # The client left while we were deciding: whoever was admitted lets go.
            req._held = None
            if state.consumer is not None and state.rejection is None:
                state.consumer.connection_lost()
            return
        received = req.body_received
        if state.rejection is not None and not req._complete_while_held:
            req._held = None
            self._resume(ADMISSION)
            self._reject_before_body(req)
            return
        if req.admit_held():
            self._resume(ADMISSION)
            return
        if not received:
            self._maybe_continue(req, version)
        self._resume(ADMISSION)

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
        # From now on every byte is the refused body, whichever way it comes:
        # LineReceiver hands the rest of the current read to rawDataReceived,
        # later reads go through dataReceived into the same.  (An instance
        # attribute, as Twisted does for a closed connection, so accepted
        # bodies pay nothing for it.)
        self.rawDataReceived = self._discard  # type: ignore[method-assign]
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
        if req.upload_state.consumer is consumer and not req.finished:
            self._reject_before_body(req)
    def _discard(self, data: bytes) -> None:
        """The body of a refused request: count it and drop it."""
        self._linger_bytes += len(data)
        if self._linger_bytes > LINGER_BYTES:
            if self._lingering:
                if self._linger_call is not None:
                    self._linger_call.cancel()
                self._stop_lingering()
            else:
                # The answer is not written yet: stop reading until it is.
                self._pause(DISCARD)

    def loseConnection(self) -> None:
        if not self._rejected_early or self._lingering or self.requests or self.transport is None:
            return super().loseConnection()
        if self._linger_bytes > LINGER_BYTES:
            return super().loseConnection()
        # The response to an early rejection is written; the client may still
        # be sending its body.  Half-close and discard what comes for a little
        # while so the client reads our status instead of a reset.
        self._networkProducer.unregisterProducer()
        self._lingering = True
        # Whatever paused the socket, the discard must read it now.
        self._pauses.stop()
        self.setTimeout(None)
        clock: IReactorTime | None = self.site.reactor if self.site is not None else None
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

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self._linger_call is not None:
            self._linger_call.cancel()
            self._linger_call = None
        super().connectionLost(reason)


class StreamingSite(server.Site):
    """
    A Site whose channels stream request bodies to the ``body_policy``.

    ``read_size`` is the socket read size (the BufferSize setting);
    ``access_log`` is called with each finished request.
    """

    protocol = StreamingChannel  # type: ignore[assignment]
    # Site's stub types it as Request's own constructor (channel, queued)
    requestFactory = StreamingRequest  # type: ignore[assignment]
    body_policy: IBodyPolicy | None = None
    read_size: int = 65536
    #: an hmacfs.service.metrics.Metrics, or None
    metrics: Any = None
    #: called with each request at header time, before the body policy; the
    #: first Refusal returned wins (bans, tombstones: "before any other work")
    admission_checks: list[Callable[[StreamingRequest], Refusal | None]]
    #: HeaderTimeout and MaxConnectionsPerClient (hmacfs.http.limits)
    connection_limits: ConnectionLimits = NO_LIMITS
    #: open connections by ``connection_limits.key_of``
    connections_by_client: ConnectionTable

    def __init__(
        self,
        resource: Any,
        *,
        body_policy: IBodyPolicy | None,
        reactor: IReactorTime,
        read_timeout: float = 120.0,
        read_size: int = 65536,
        access_log: Any = None,
        header_timeout: float = 0.0,
        max_connections_per_client: int = 0,
        connection_key: Callable[[Any], str | None] | None = None,
    ) -> None:
        super().__init__(resource, timeout=read_timeout, reactor=reactor)
        self.body_policy = body_policy
        self.read_size = read_size
        self.admission_checks = []
        self.connection_limits = ConnectionLimits(
            header_timeout=header_timeout,
            max_per_client=max_connections_per_client,
            key_of=connection_key or NO_LIMITS.key_of,
        )
        self.connections_by_client = ConnectionTable()
        self._access_log = access_log
        self.displayTracebacks = False

    def log(self, request: Any) -> None:
        if self.metrics is not None:
            self.metrics.request_finished(request)
        if self._access_log is not None:
            self._access_log(request)
