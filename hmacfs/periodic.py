# -*- test-case-name: tests.test_periodic -*-
"""
One timer for every periodic job (sweeps, syncs, gauge refreshes, lock refreshes).

Twisted's LoopingCall stops for good at the first exception and its failure
goes nowhere unless someone remembers an errback; six services each wrapped
it by hand.  ``PeriodicService`` keeps calling, logs a failure once per
streak of failures, and its ``stopService`` returns a Deferred that fires
once a call still running has finished, so shutdown waits for it.
"""

from __future__ import annotations

from collections.abc import Callable

from twisted.application.service import Service
from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from hmacfs.logs import log_router

log = Logger(observer=log_router)


class PeriodicService(Service):
    """
    Call ``function`` every ``interval`` seconds of ``clock`` while running
    (first at start when ``now``, else one interval after it).

    A call that returns a Deferred is waited for before the next one is
    scheduled (like LoopingCall: calls never overlap).  ``what`` names the job
    in the log.  Start and stop may be called any number of times; a changed
    ``interval`` takes effect at the next start (``restart()``).
    """

    def __init__(
        self,
        clock: IReactorTime,
        interval: float,
        function: Callable[[], object],
        *,
        what: str,
        now: bool = False,
    ) -> None:
        self.clock = clock
        self.interval = interval
        self.function = function
        self.what = what
        self.now = now
        #: True from a failed call until the next call that succeeds
        self.failing = False
        self._loop: LoopingCall | None = None
        self._stopped: Deferred[None] | None = None

    def startService(self) -> None:
        if self.running:
            return
        super().startService()  # type: ignore[no-untyped-call]  # Twisted: unannotated
        self._loop = LoopingCall(self._call)
        self._loop.clock = self.clock
        # Fires when the loop has stopped and no call is running any more; _call
        # never fails, so neither does it.
        self._stopped = self._loop.start(self.interval, now=self.now).addCallback(lambda _: None)

    def stopService(self) -> Deferred[None]:
        if not self.running:
            return succeed(None)
        super().stopService()  # type: ignore[no-untyped-call]  # Twisted: unannotated
        loop, stopped = self._loop, self._stopped
        self._loop = self._stopped = None
        assert loop is not None and stopped is not None
        if loop.running:
            loop.stop()
        return stopped

    def restart(self) -> None:
        """Apply a changed ``interval`` now (a no-op while stopped)."""
        if self.running:
            self.stopService()
            self.startService()

    def _call(self) -> Deferred[None]:
        return maybeDeferred(self.function).addCallbacks(self._succeeded, self._failed)

    def _succeeded(self, _: object) -> None:
        if self.failing:
            self.failing = False
            log.info("{what} works again", what=self.what)

    def _failed(self, failure: Failure) -> None:
        if not self.failing:
            self.failing = True
            log.failure(
                "{what} failed (logged once until it works again; retried every {interval}s)",
                failure,
                what=self.what,
                interval=self.interval,
            )
