# -*- test-case-name: tests.test_workers -*-
"""
Several worker processes on one listening socket (NumCores > 1).

Python runs one thread of Python at a time, so the way to use every core is
several processes.  The twistd process becomes a supervisor: it opens the
listening socket (TCP, UNIX or one handed over by systemd), stops accepting on
it itself, and has the zygote (L{hmacfs.service.zygote}) fork NumCores
workers that accept on it.  The zygote was forked from this process before
its reactor and threads existed, or else started by it; it gets the socket
over its control socket (SCM_RIGHTS) and forks every worker, restarts too,
from its thread-free state.  The supervisor decides when a dead worker is
restarted, forwards SIGHUP and secret changes to all of them, and on SIGTERM
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

import attrs
from twisted.application.service import Service
from twisted.internet import protocol
from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IReadDescriptor
from twisted.logger import Logger
from twisted.protocols.basic import LineOnlyReceiver
from zope.interface import implementer

from hmacfs.logs import log_router
from hmacfs.service.metrics import mark_process_dead
from hmacfs.service.zygote import CONTROL_FD, ForkedZygote

log = Logger(observer=log_router)

#: A worker that dies sooner than this after its start counts as crashing:
#: its restart waits longer each time (up to MAX_RESTART_DELAY).
QUICK_DEATH = 5.0
MAX_RESTART_DELAY = 30.0
#: A zygote still there this long after the drain timeout is killed.
ZYGOTE_GRACE = 20.0


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


@attrs.define(eq=False)
class WorkerRecord:
    """One worker, as the supervisor knows it from the zygote's reports."""

    index: int
    pid: int
    started_at: float
    ended: Deferred[None] = attrs.field(factory=Deferred)


@implementer(IReadDescriptor)
class ExitWatcher:
    """
    Reaps a child this process forked itself (the zygote; spawnProcess reaps
    its own): Linux makes a process's pidfd readable when it exits.
    """

    def __init__(self, reactor: Any, pid: int, on_exit: Callable[[int], None]) -> None:
        self.reactor = reactor
        self.pid = pid
        self.on_exit = on_exit
        self.fd = os.pidfd_open(pid)
        reactor.addReader(self)

    def fileno(self) -> int:
        return self.fd

    def doRead(self) -> None:
        try:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
        except ChildProcessError:  # pragma: no cover - reaped elsewhere
            pid, status = self.pid, 0
        if pid == 0:
            return
        self.reactor.removeReader(self)
        os.close(self.fd)
        self.on_exit(status)

    def connectionLost(self, reason: Any) -> None:  # pragma: no cover - removed before close
        pass

    def logPrefix(self) -> str:
        return "zygote-exit"


class SpawnedZygote(protocol.ProcessProtocol):
    """A zygote started as ``python -m hmacfs.service.zygote`` (Twisted reaps it)."""

    def __init__(self, on_exit: Callable[[int], None]) -> None:
        self.on_exit = on_exit

    def processEnded(self, reason: Any) -> None:
        status = getattr(reason.value, "status", None)
        self.on_exit(status if status is not None else 0)


class ZygoteControl(LineOnlyReceiver):
    """The supervisor's end of the control socket: the zygote's reports, one JSON line each."""

    delimiter = b"\n"
    MAX_LENGTH = 1 << 20

    def __init__(self, supervisor: WorkerSupervisor) -> None:
        self.supervisor = supervisor

    def lineReceived(self, line: bytes) -> None:
        self.supervisor.zygote_reported(json.loads(line))

    def connectionLost(self, reason: Any = None) -> None:
        self.supervisor.control_lost(self)


class WorkerSupervisor(Service):
    """Owns the listening socket, the zygote, and the restart policy of NumCores workers."""

    def __init__(
        self,
        *,
        reactor: Any,
        listen: str,
        count: int,
        config_path: str,
        drain_timeout: float,
        secret_state: Callable[[], dict[str, object]],
        zygote: ForkedZygote | None = None,
        python: str = sys.executable,
    ) -> None:
        self.secret_state = secret_state
        self.reactor = reactor
        self.listen = listen
        self.count = count
        self.config_path = config_path
        self.drain_timeout = drain_timeout
        self.python = python
        self.forked_zygote = zygote
        self.port: Any = None
        self.family: int | None = None
        self.workers: dict[int, WorkerRecord] = {}
        #: Indexes asked of the zygote that it has not reported forked yet.
        self.pending_forks: set[int] = set()
        self.control: ZygoteControl | None = None
        self.zygote_pid: int | None = None
        self.zygote_ended: Deferred[None] | None = None
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
        self.start_zygote()

    # -- the zygote -------------------------------------------------------

    def start_zygote(self) -> None:
        """Take the forked zygote, or start one; greet it; have it fork every worker."""
        forked, self.forked_zygote = self.forked_zygote, None
        ended: Deferred[None] = Deferred()
        self.zygote_ended = ended
        if forked is not None:
            sock = forked.control
            self.zygote_pid = forked.pid
            ExitWatcher(self.reactor, forked.pid, lambda status: self.zygote_exited(ended, status))
            log.info(
                "the zygote (pid {pid}) was forked from this process with {threads} thread(s), "
                "before its reactor", pid=forked.pid, threads=forked.threads,
            )
        else:
            sock, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
            args = [self.python, "-m", "hmacfs.service.zygote", "--config", self.config_path,
                    "--control-fd", str(CONTROL_FD)]
            transport = self.reactor.spawnProcess(
                SpawnedZygote(lambda status: self.zygote_exited(ended, status)),
                self.python, args, env=dict(os.environ),
                childFDs={0: "w", 1: 1, 2: 2, CONTROL_FD: theirs.fileno()},
            )
            theirs.close()
            self.zygote_pid = transport.pid
            log.info("started a zygote process (pid {pid})", pid=transport.pid)
        # What twistd made of this process after the fork (it shed privileges,
        # changed directory): the zygote becomes the same before it forks.
        umask = os.umask(0)
        os.umask(umask)
        hello = {
            "uid": list(os.getresuid()), "gid": list(os.getresgid()), "groups": os.getgroups(),
            "cwd": os.getcwd(), "umask": umask, "family": self.family,
            "drain_timeout": self.drain_timeout,
        }
        # Blocking and small (the socket buffer holds it): the zygote is not reading yet.
        socket.send_fds(sock, [json.dumps({"hello": hello}).encode() + b"\n"], [self.port.fileno()])
        control = ZygoteControl(self)
        self.reactor.adoptStreamConnection(
            sock.fileno(), socket.AF_UNIX, protocol.Factory.forProtocol(lambda: control)
        )
        sock.close()  # the reactor holds its own descriptor now
        self.control = control
        self.send({"secrets": self.secret_state()})
        for index in range(self.count):
            self.fork(index)

    def send(self, message: dict[str, Any]) -> None:
        if self.control is not None and self.control.transport is not None:
            self.control.sendLine(json.dumps(message).encode())

    def fork(self, index: int) -> None:
        if self._stopping or self.control is None:
            return  # a new zygote forks every index
        if index not in self.workers and index not in self.pending_forks:
            self.pending_forks.add(index)
            self.send({"fork": index})

    def zygote_reported(self, event: dict[str, Any]) -> None:
        if "forked" in event:
            index = int(event["forked"])
            self.pending_forks.discard(index)
            self.workers[index] = WorkerRecord(index, int(event["pid"]), self.reactor.seconds())
            log.info(
                "worker {index} (pid {pid}) forked by the zygote with {threads} thread(s)",
                index=index, pid=event["pid"], threads=event.get("threads"),
            )
        elif "ended" in event:
            worker = self.workers.get(int(event["ended"]))
            if worker is not None and worker.pid == int(event["pid"]):
                self.worker_ended(worker, str(event["status"]))

    def worker_ended(self, worker: WorkerRecord, reason: str, restart: bool = True) -> None:
        if self.workers.get(worker.index) is worker:
            del self.workers[worker.index]
        mark_process_dead(worker.pid)
        worker.ended.callback(None)
        if self._stopping or not restart:
            return
        lived = self.reactor.seconds() - worker.started_at
        delay = self._delays.get(worker.index, 0.5)
        delay = min(delay * 2, MAX_RESTART_DELAY) if lived < QUICK_DEATH else 0.5
        self._delays[worker.index] = delay
        log.warn(
            "worker {index} (pid {pid}) ended ({reason}); restarting in {delay:.1f}s",
            index=worker.index,
            pid=worker.pid,
            reason=reason,
            delay=delay,
        )
        self.reactor.callLater(delay, self.fork, worker.index)

    def control_lost(self, control: ZygoteControl) -> None:
        if self.control is control:
            self.control = None

    def zygote_exited(self, ended: Deferred[None], status: int) -> None:
        """The zygote is gone: its workers get SIGTERM from the kernel and drain on their own."""
        from hmacfs.service.zygote import status_text

        for worker in list(self.workers.values()):
            self.worker_ended(worker, "its zygote ended", restart=False)
        self.pending_forks.clear()
        self.control = None
        self.zygote_pid = None
        ended.callback(None)
        if self._stopping:
            return
        log.error("the zygote process ended ({reason}); starting a new one",
                  reason=status_text(status))
        self.reactor.callLater(1.0, self.restart_zygote)

    def restart_zygote(self) -> None:
        if not self._stopping and self.zygote_pid is None:
            self.start_zygote()

    # -- what the other services ask --------------------------------------

    def broadcast_secrets(self) -> None:
        self.send({"secrets": self.secret_state()})

    def signal_workers(self, signum: int) -> None:
        self.send({"signal": int(signum)})

    def stopService(self) -> Deferred:
        super().stopService()
        self._stopping = True
        pending = [worker.ended for worker in self.workers.values()]
        self.signal_workers(signal.SIGTERM)
        kill_call = self.reactor.callLater(self.drain_timeout + 10.0, self.signal_workers, signal.SIGKILL)
        done = DeferredList(pending) if pending else succeed(None)

        def zygote_done(_: object) -> Any:
            # No worker left: end of file tells the zygote to exit.
            if kill_call.active():
                kill_call.cancel()
            if self.control is not None and self.control.transport is not None:
                self.control.transport.loseConnection()
            ended = self.zygote_ended
            if ended is None or self.zygote_pid is None:
                return None
            pid = self.zygote_pid
            kill_zygote = self.reactor.callLater(ZYGOTE_GRACE, _kill, pid)
            return ended.addBoth(lambda _: kill_zygote.cancel() if kill_zygote.active() else None)

        def close(_: object) -> Any:
            if self.port is not None:
                return self.port.stopListening()
            return None

        return done.addCallback(zygote_done).addCallback(close)


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:  # pragma: no cover - gone meanwhile
        pass
