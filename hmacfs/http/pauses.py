# -*- test-case-name: tests.test_pauses,tests.test_request -*-
"""
Why a connection is not reading its socket: the one owner of a transport's reading.

The disk lagging, an admission decision waiting for I/O, Twisted's own flow
control and a discard over its budget each hold a pause *reason*; the
transport is read only while none holds, so one party resuming never undoes
another's pause.  A plain object (no Twisted internals): the channel consults
it on pause and resume only, never per chunk.
"""

from __future__ import annotations

from typing import Any

__all__ = ["ADMISSION", "DISCARD", "DISK", "TWISTED", "PauseArbiter"]

DISK = "disk"  #: a body consumer waits for the disk (``pause_body``/``resume_body``)
ADMISSION = "admission"  #: the admission decision waits for I/O (``RequestState.admission``)
#: HTTPChannel's own flow control, through ``_networkProducer``: pipelined data
#: buffered while a request is answered (``rawDataReceived``, undone by
#: ``requestDone``) and a full send buffer (``pauseProducing``/``resumeProducing``,
#: called by the transport).  Twisted keeps these two in one bit of its own
#: (``_waitingForTransport``), so they are one reason here.
TWISTED = "twisted"
DISCARD = "discard"  #: a refused body went over LINGER_BYTES before the answer was written


class PauseArbiter:
    """
    Holds the reasons a transport is paused, and pauses it on the first reason
    and resumes it when the last one is released.

    ``transport`` is anything with ``pauseProducing``/``resumeProducing`` (None: not
    connected, every call is ignored).  After ``stop`` reading is no longer
    arbitrated: the transport is resumed and later pauses are ignored.  The
    arbiter is also a producer standing for the transport (see below).
    """

    __slots__ = ("_reasons", "_stopped", "_transport")

    def __init__(self, transport: Any) -> None:
        self._transport = transport
        self._reasons: set[str] = set()
        self._stopped = False

    def pause(self, reason: str) -> None:
        reasons = self._reasons
        if reason in reasons or self._stopped or self._transport is None:
            return
        reasons.add(reason)
        if len(reasons) == 1:
            self._transport.pauseProducing()

    def resume(self, reason: str) -> None:
        reasons = self._reasons
        if reason not in reasons:
            return
        reasons.discard(reason)
        if not reasons and self._transport is not None:
            self._transport.resumeProducing()

    def stop(self) -> None:
        """Read from now on, whatever paused: resume the transport and ignore later pauses."""
        self._stopped = True
        if self._reasons:
            self._reasons.clear()
            self._transport.resumeProducing()

    @property
    def reasons(self) -> frozenset[str]:
        """Why the transport is not being read now (empty: it is)."""
        return frozenset(self._reasons)

    # The transport's producer interface: the arbiter takes the transport's
    # place as ``HTTPChannel._networkProducer``, so that Twisted's own
    # pauseProducing/resumeProducing become the TWISTED reason instead of
    # acting directly.  The rest goes to the transport.

    def pauseProducing(self) -> None:
        self.pause(TWISTED)

    def resumeProducing(self) -> None:
        self.resume(TWISTED)

    def stopProducing(self) -> None:
        self._transport.stopProducing()

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        self._transport.registerProducer(producer, streaming)

    def unregisterProducer(self) -> None:
        self._transport.unregisterProducer()
