# -*- test-case-name: tests.test_tap -*-
"""
The generic pieces of a process's service tree: stop in order, the log, the drain.

Every hmacfs process (the single server, a worker, the supervisor) is a
L{SequentialMultiService} with L{LoggingService} first; the serving ones end
with a L{DrainService} so SIGTERM lets uploads in flight finish.
"""

from __future__ import annotations

from typing import Any

from twisted.application.service import MultiService, Service
from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.logger import Logger

from hmacfs.config import Config
from hmacfs.http.channel import StreamingSite
from hmacfs.logs import log_router

log = Logger(observer=log_router)


class SequentialMultiService(MultiService):
    """
    Stops its children one at a time, last added first.

    MultiService stops them all at once, which on SIGTERM would join the disk
    threads and close the log while uploads are still draining.  Added in
    order (logging, disk, state, …, drain, listener), they stop as a graceful
    shutdown needs: stop accepting, let uploads finish, then release the rest.
    """

    def stopService(self) -> Deferred:
        Service.stopService(self)
        return Deferred.fromCoroutine(self._stop_in_order())

    async def _stop_in_order(self) -> None:
        for service in reversed(list(self)):
            try:
                await maybeDeferred(service.stopService)
            except Exception:  # noqa: BLE001 - one failing child must not block the rest
                log.failure("stopping {service} failed", service=service)


class LoggingService(Service):
    """
    Applies LogLevel/LogFile when the service starts, closes the file at stop.

    Started on the reactor thread, which from then on is the only one that
    writes the log file (events from the disk pool are handed to it).
    """

    def __init__(self, config: Config, reactor: Any = None) -> None:
        self.config = config
        self.reactor = reactor

    def startService(self) -> None:
        super().startService()
        log_router.configure(self.config.log_level, self.config.log_file, reactor=self.reactor)

    def stopService(self) -> Deferred:
        super().stopService()
        log_router.close()
        return succeed(None)


#: after the last upload in flight ended, how long the stop waits for its answer to be
#: written (seconds): the reactor's shutdown drops what a transport has not sent yet
ANSWER_GRACE = 0.2


class DrainService(Service):
    """On stop, give uploads in flight up to DrainTimeout seconds to finish."""

    def __init__(self, reactor: Any, site: StreamingSite, timeout: float) -> None:
        self.reactor = reactor
        self.site = site
        self.timeout = timeout

    def stopService(self) -> Deferred:
        super().stopService()
        done: Deferred[None] = Deferred()
        deadline = self.reactor.seconds() + self.timeout
        waited = False

        def check() -> None:
            nonlocal waited
            policy = self.site.body_policy
            # the daemon's policy is an UploadPolicy, which counts its uploads in flight
            active: int = policy.active if policy else 0  # type: ignore[attr-defined]
            if active == 0 and waited:
                # An upload just ended: its 201 is written in the reactor's next turns,
                # and stopping the reactor now would drop it from the transport's buffer.
                self.reactor.callLater(ANSWER_GRACE, done.callback, None)
            elif active == 0 or self.reactor.seconds() >= deadline:
                try:
                    if active:
                        log.warn("stopping with {active} uploads still in flight", active=active)
                finally:
                    done.callback(None)
            else:
                waited = True
                self.reactor.callLater(0.1, check)

        check()
        return done
