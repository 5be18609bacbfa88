# -*- test-case-name: tests.test_download,tests.test_twisted_internals -*-
"""
The producer that pushes a stored file's bytes into a GET response: the
``sendfile`` path.  What every path shares and the ``pread`` path use no
Twisted internals and live in ``hmacfs.http.producer``.

This module and ``hmacfs.http.channel`` are the only ones that use Twisted
internals (checked by ``tests/test_twisted_internals.py``; an unsupported
Twisted is refused at import by ``hmacfs.http._twisted_compat``).

On a plain TCP or UNIX transport a body of at least ``SENDFILE_MIN`` bytes goes
out with ``os.sendfile``: the kernel moves page-cache pages to the socket, so
Python neither reads nor copies the data.  Twisted has no public API for
writing to a socket behind a transport's back, so the producer reads the
transport's buffer state (``FileDescriptor.dataBuffer``, ``_tempDataLen``)
to send only once the headers have left, and sets ``producerPaused`` before
``startWriting`` to be resumed when the socket is writable again; a
response encoder (``Request._encoder``, gzip) keeps a body on the ``pread``
path, which writes through the request.  TLS,
HTTP/2, response encoders and test transports keep the ``pread`` path, and so
does a file system that refuses ``sendfile``.

Each turn's ``sendfile`` runs on the disk pool (``ILocalByteSource.sendfile``):
``sendfile(2)`` reads the file, and a page that is not cached (a cold file, a
slow disk, NFS) would hold the reactor thread for the disk's latency.  The
socket is duplicated for the job, so a connection closed meanwhile never
sends the bytes to whoever reuses its descriptor number; the transport is not
written to while the job runs (the producer is the only writer of the body,
and the headers left before the first turn).
"""

from __future__ import annotations

import errno
from typing import Any

from twisted.internet.abstract import FileDescriptor
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

import hmacfs.http._twisted_compat  # noqa: F401 - refuses an unsupported Twisted
from hmacfs.http.producer import CHUNKS_PER_TURN, PreadProducer
from hmacfs.logs import log_router
from hmacfs.storage.interface import ILocalByteSource

__all__ = [
    "CHUNKS_PER_TURN",
    "SENDFILE_MIN",
    "SENDFILE_PER_TURN",
    "FileProducer",
    "sendfile_transport",
]

log = Logger(observer=log_router)

#: Bodies from this size on go out with ``os.sendfile`` where the transport
#: allows it.  Below it the headers and body leave in one ``send`` through the
#: transport's buffer, which costs less than a separate ``sendfile`` call.
SENDFILE_MIN = 262144
#: Bytes one download may ``sendfile`` per reactor turn before waiting for the
#: next "writable" event, so one fast reader cannot starve other connections.
SENDFILE_PER_TURN = 4 * 1024 * 1024

# sendfile errors that mean "not on this file or socket": fall back to pread.
_SENDFILE_UNSUPPORTED = frozenset({errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP})
# sendfile errors that mean the client went away.
_PEER_GONE = frozenset({errno.EPIPE, errno.ECONNRESET, errno.ENOTCONN, errno.ESHUTDOWN})


def sendfile_transport(request: Any) -> FileDescriptor | None:
    """
    The socket transport under an HTTP/1.x ``request`` if ``os.sendfile`` may
    write to it directly, else ``None``.

    Only a plain ``FileDescriptor`` transport with a socket qualifies: TLS
    wraps the transport in a protocol that must see every byte, an HTTP/2
    stream shares its connection, and a response encoder (gzip) must see the
    body.  The buffer attributes checked are the ones the producer relies on.
    """
    if getattr(request, "_encoder", None) is not None:
        return None
    transport = getattr(getattr(request, "channel", None), "transport", None)
    if not isinstance(transport, FileDescriptor) or getattr(transport, "TLS", False):
        return None
    if getattr(transport, "socket", None) is None:
        return None
    if not all(hasattr(transport, name) for name in ("dataBuffer", "_tempDataLen", "producerPaused")):
        return None
    return transport


class FileProducer(PreadProducer):
    """
    Push ``length`` bytes of ``source`` from ``offset`` into ``request`` with
    ``sendfile`` when given a ``transport`` (see ``sendfile_transport``), else
    (and when ``sendfile`` refuses the file before the body started) with
    ``pread`` and ``request.write``.

    With a transport the body bypasses the transport's buffer: the headers go
    through it, and each turn waits until the transport has flushed and the
    socket is writable, then ``sendfile``s until the socket is full.  The wait
    uses the transport's own machinery: a transport whose producer is marked
    paused calls the channel's ``resumeProducing`` (and so ours) once its
    buffer is empty and the socket writable.
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
        transport: FileDescriptor | None = None,
    ) -> None:
        super().__init__(
            request,
            source,
            offset=offset,
            length=length,
            clock=clock,
            write_timeout=write_timeout,
            chunk_size=chunk_size,
            chunks_per_turn=chunks_per_turn,
        )
        self._transport = transport
        self._sending = False

    def _begin(self) -> None:
        if self._transport is not None:
            # Headers into the transport's buffer; the body waits for them.
            self._request.write(b"")
            self._wait_for_socket()
            return
        self._produce()

    def _produce(self) -> None:
        if self._transport is None:
            PreadProducer._produce(self)
            return
        self._turn_call = None
        if self._done or self._producing or self._sending:
            return
        self._producing = True
        try:
            self._sendfile_turn()
        finally:
            self._producing = False

    def _wait_for_socket(self) -> None:
        """Be resumed once the transport's buffer is empty and the socket writable."""
        assert self._transport is not None
        self._paused = True
        self._transport.producerPaused = True
        self._transport.startWriting()

    def _sendfile_turn(self) -> None:
        """One job on the pool: ``sendfile`` until the socket is full, the turn's quota is used, or the end."""
        assert self._source is not None and self._transport is not None
        if self._transport.dataBuffer or self._transport._tempDataLen:
            self._wait_for_socket()
            return
        self._sending = True
        sending = self._source.sendfile(
            self._transport.fileno(), self._offset, min(self._remaining, SENDFILE_PER_TURN)
        )
        sending.addCallbacks(self._sent, self._not_sent)

    def _sent(self, sent: int) -> None:
        self._sending = False
        if self._done:
            return
        if not sent:
            self._shrank()
            return
        self._advance(sent)
        # request.write() counts what goes through it; the access log and
        # metrics read this count.
        self._request.sentLength += sent
        if self._remaining == 0:
            self._finish()
            return
        self._wait_for_socket()

    def _not_sent(self, failure: Failure) -> None:
        self._sending = False
        if self._done:
            return
        error = failure.value
        if isinstance(error, BlockingIOError):
            self._wait_for_socket()
        elif isinstance(error, OSError):
            self._sendfile_failed(error)
        else:
            log.failure("sendfile at {offset} failed", failure, offset=self._offset)
            self._abort()

    def _sendfile_failed(self, error: OSError) -> None:
        if error.errno in _SENDFILE_UNSUPPORTED and self._request.sentLength == 0:
            # Nothing of the body left yet: carry on with pread and write().
            log.info("sendfile refused ({error}); serving with read and write", error=error)
            self._transport = None
            self._paused = False
            self._turn_call = self._clock.callLater(0, self._produce)
            return
        if error.errno not in _PEER_GONE:
            log.failure("sendfile at {offset} failed", Failure(error), offset=self._offset)
        self._abort()
