# -*- test-case-name: tests.test_workers -*-
"""
Several worker processes on one listening socket (NumCores > 1).

Python runs one thread of Python at a time, so the way to use every core is
several processes.  The twistd process becomes a supervisor: it opens the
listening socket (TCP, UNIX or one handed over by systemd), stops accepting on
it itself, and starts NumCores workers (``python -m hmacfs.service.worker``) that
inherit the socket as file descriptor 3 and accept on it.  The supervisor
restarts a worker that dies, forwards SIGHUP to all of them, and on SIGTERM
lets every worker drain its uploads (DrainTimeout) before it closes the socket
and exits.  Retention sweeps and the metrics listener run in the supervisor;
metrics from all processes are summed through prometheus-client's
multiprocess directory.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
from collections.abc import Callable
from typing import Any

from twisted.application.service import Service
from twisted.internet import protocol
from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.internet.endpoints import serverFromString
from twisted.logger import Logger

from hmacfs.logs import log_router
from hmacfs.service.metrics import mark_process_dead

log = Logger(observer=log_router)

#: A worker that dies sooner than this after its start counts as crashing:
#: its restart waits longer each time (up to MAX_RESTART_DELAY).
QUICK_DEATH = 5.0
MAX_RESTART_DELAY = 30.0
LISTEN_FD = 3


class _NoConnections(protocol.Factory):
    """The supervisor never accepts on the socket it shares."""

    def buildProtocol(self, addr: Any) -> None:  # pragma: no cover - never reading
        return None


def address_family(address: Any) -> int:
    """The socket family of a listening port's ``getHost()`` address."""
    if isinstance(address, IPv6Address):
        return socket.AF_INET6
    if isinstance(address, UNIXAddress):
        return socket.AF_UNIX
    if isinstance(address, IPv4Address):
        return socket.AF_INET
    raise ValueError(f"NumCores > 1 needs a TCP or UNIX listen socket, not {address!r}")


def socket_family_name(family: int) -> str:
    names: dict[int, str] = {socket.AF_INET: "inet", socket.AF_INET6: "inet6", socket.AF_UNIX: "unix"}
    return names[family]


class WorkerProcess(protocol.ProcessProtocol):
    """One worker; tells the supervisor when it ends."""

    def __init__(self, supervisor: WorkerSupervisor, index: int) -> None:
        self.supervisor = supervisor
        self.index = index
        self.started_at = supervisor.reactor.seconds()
        self.ended: Deferred[None] = Deferred()
        self.pid: int | None = None

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.pid = self.transport.pid
        self.send_secrets()

    def send_secrets(self) -> None:
        """The worker's secrets come over its stdin: one JSON line per change."""
        line = json.dumps({"secrets": self.supervisor.secret_state()}) + "\n"
        assert self.transport is not None
        self.transport.write(line.encode("ascii"))

    def processEnded(self, reason: Any) -> None:
        self.supervisor.worker_ended(self, reason)
        self.ended.callback(None)


class WorkerSupervisor(Service):
    """Owns the listening socket and NumCores worker processes."""

    def __init__(
        self,
        *,
        reactor: Any,
        listen: str,
        count: int,
        config_path: str,
        drain_timeout: float,
        secret_state: Callable[[], dict[str, object]],
        python: str = sys.executable,
    ) -> None:
        self.secret_state = secret_state
        self.reactor = reactor
        self.listen = listen
        self.count = count
        self.config_path = config_path
        self.drain_timeout = drain_timeout
        self.python = python
        self.port: Any = None
        self.family: int | None = None
        self.workers: dict[int, WorkerProcess] = {}
        self._delays: dict[int, float] = {}
        self._stopping = False

    def privilegedStartService(self) -> None:
        super().privilegedStartService()
        # Listen before dropping privileges (a low port), like StreamServerEndpointService.
        d = serverFromString(self.reactor, self.listen).listen(_NoConnections())
        ports: list[Any] = []
        d.addCallback(ports.append)
        failures: list[Any] = []
        d.addErrback(failures.append)
        if failures:
            failures[0].raiseException()
        self.port = ports[0]
        # The workers accept; this process only keeps the socket open for them.
        self.reactor.removeReader(self.port)
        self.family = address_family(self.port.getHost())

    def startService(self) -> None:
        if self.port is None:
            self.privilegedStartService()
        super().startService()
        log.info(
            "starting {count} worker processes on {listen}", count=self.count, listen=self.listen
        )
        for index in range(self.count):
            self.spawn(index)

    def spawn(self, index: int) -> None:
        if self._stopping:
            return
        worker = WorkerProcess(self, index)
        args = [
            self.python,
            "-m",
            "hmacfs.service.worker",
            "--config",
            self.config_path,
            "--fd",
            str(LISTEN_FD),
            "--family",
            socket_family_name(self.family or socket.AF_INET),
            "--index",
            str(index),
        ]
        self.reactor.spawnProcess(
            worker,
            self.python,
            args,
            env=dict(os.environ),
            childFDs={0: "w", 1: 1, 2: 2, LISTEN_FD: self.port.fileno()},
        )
        self.workers[index] = worker

    def worker_ended(self, worker: WorkerProcess, reason: Any) -> None:
        if self.workers.get(worker.index) is worker:
            del self.workers[worker.index]
        if worker.pid is not None:
            mark_process_dead(worker.pid)
        if self._stopping:
            return
        lived = self.reactor.seconds() - worker.started_at
        delay = self._delays.get(worker.index, 0.5)
        delay = min(delay * 2, MAX_RESTART_DELAY) if lived < QUICK_DEATH else 0.5
        self._delays[worker.index] = delay
        log.warn(
            "worker {index} (pid {pid}) ended ({reason}); restarting in {delay:.1f}s",
            index=worker.index,
            pid=worker.pid,
            reason=reason.getErrorMessage(),
            delay=delay,
        )
        self.reactor.callLater(delay, self.spawn, worker.index)

    def broadcast_secrets(self) -> None:
        for worker in list(self.workers.values()):
            if worker.pid is not None:
                worker.send_secrets()

    def signal_workers(self, signum: int) -> None:
        for worker in list(self.workers.values()):
            if worker.pid is not None:
                try:
                    os.kill(worker.pid, signum)
                except ProcessLookupError:
                    pass

    def stopService(self) -> Deferred:
        super().stopService()
        self._stopping = True
        pending = [worker.ended for worker in self.workers.values()]
        self.signal_workers(signal.SIGTERM)
        kill_call = self.reactor.callLater(self.drain_timeout + 10.0, self.signal_workers, signal.SIGKILL)
        done = DeferredList(pending) if pending else succeed(None)

        def close(_: object) -> Any:
            if kill_call.active():
                kill_call.cancel()
            if self.port is not None:
                return self.port.stopListening()
            return None

        return done.addCallback(close)
