# -*- test-case-name: tests.test_workers -*-
"""
One worker process: ``python -m hmacfs.service.worker --config FILE --fd 3 --family inet``.

Started by ``hmacfs.service.workers.WorkerSupervisor``; serves requests on the
listening socket it inherited.  SIGHUP re-reads the configuration (like the
single-process server), SIGTERM stops accepting and lets uploads in flight
finish within DrainTimeout.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import signal
import socket
import sys
from collections.abc import Callable
from typing import Any

# Before anything slow: a SIGHUP forwarded while this process is still
# starting must not kill it (its default action) nor be lost: remember it and
# reload once the services (and the real handler) are up.
_early_sighup: list[int] = []
signal.signal(signal.SIGHUP, lambda signum, frame: _early_sighup.append(signum))

from twisted.application.service import MultiService, Service
from twisted.internet.protocol import Protocol
from twisted.internet.stdio import StandardIO
from twisted.logger import globalLogBeginner, textFileLogObserver

FAMILIES = {"inet": socket.AF_INET, "inet6": socket.AF_INET6, "unix": socket.AF_UNIX}


class AdoptedPortService(Service):
    """Accepts on an inherited listening socket; at stop, just stops accepting.

    (``stopListening`` on an adopted UNIX port would unlink the socket file
    that the supervisor and the other workers still use.)
    """

    def __init__(self, reactor: Any, fd: int, family: int, factory: Any) -> None:
        self.reactor = reactor
        self.fd = fd
        self.family = family
        self.factory = factory
        self.port: Any = None

    def startService(self) -> None:
        super().startService()
        self.port = self.reactor.adoptStreamPort(self.fd, self.family, self.factory)

    def stopService(self) -> None:
        super().stopService()
        if self.port is not None:
            self.reactor.removeReader(self.port)


def die_with_parent() -> None:
    """Get SIGTERM when the supervisor dies (even by SIGKILL): no orphaned workers."""
    parent = os.getppid()
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        PR_SET_PDEATHSIG = 1
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    except (OSError, AttributeError):  # pragma: no cover - not Linux
        return
    if os.getppid() != parent:  # the parent died before prctl took effect
        os.kill(os.getpid(), signal.SIGTERM)


class SupervisorMessages(Protocol):
    """
    The supervisor's messages on stdin (JSON lines: the current secrets).
    End of file means the supervisor is gone: stop serving.
    """

    def __init__(self, on_message: Callable[[dict[str, Any]], None], on_eof: Callable[[], None]) -> None:
        self.on_message = on_message
        self.on_eof = on_eof
        self._buffer = b""

    def dataReceived(self, data: bytes) -> None:
        self._buffer += data
        while b"\n" in self._buffer:
            line, self._buffer = self._buffer.split(b"\n", 1)
            if line.strip():
                self.on_message(json.loads(line))

    def connectionLost(self, reason: Any = None) -> None:
        self.on_eof()


def connect_supervisor(reactor: Any, messages: SupervisorMessages, stdin: int = 0) -> StandardIO:
    """
    Read ``messages`` from ``stdin`` with Twisted's StandardIO.

    Nothing is written back, and fd 1 is the supervisor's own stdout, shared by
    every worker: StandardIO would make it non-blocking for all of them, so its
    writing half gets a descriptor of its own on /dev/null.
    """
    devnull = os.open(os.devnull, os.O_WRONLY | os.O_CLOEXEC)
    # mypy reads the Windows StandardIO; the POSIX one takes stdin and stdout.
    return StandardIO(messages, stdin=stdin, stdout=devnull, reactor=reactor)  # type: ignore[call-arg]


def build_worker(
    config_path: str, fd: int, family: int, index: int, reactor: Any
) -> tuple[MultiService, SupervisorMessages]:
    """The worker's services, and what reads the supervisor's messages once they run."""
    from hmacfs.config import load_config
    from hmacfs.service.tap import assemble_server, tune_allocator

    config, _warnings = load_config(config_path)
    tune_allocator(config.buffer_size)
    top, site = assemble_server(config, reactor, config_path=config_path, worker_index=index)
    AdoptedPortService(reactor, fd, family, site).setServiceParent(top)
    ring = top.ring  # type: ignore[attr-defined]

    def on_message(message: dict[str, Any]) -> None:
        if "secrets" in message:
            ring.load_state(message["secrets"])

    def on_eof() -> None:
        if reactor.running:
            reactor.stop()

    return top, SupervisorMessages(on_message, on_eof)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hmacfs.service.worker")
    parser.add_argument("--config", required=True)
    parser.add_argument("--fd", type=int, required=True)
    parser.add_argument("--family", choices=sorted(FAMILIES), required=True)
    parser.add_argument("--index", type=int, default=0)
    args = parser.parse_args(argv)
    die_with_parent()

    from twisted.internet import reactor

    globalLogBeginner.beginLoggingTo([textFileLogObserver(sys.stdout)], redirectStandardIO=False)
    top, messages = build_worker(args.config, args.fd, FAMILIES[args.family], args.index, reactor)
    def start() -> None:
        top.startService()
        connect_supervisor(reactor, messages)
        if _early_sighup:
            top.reload.reload()  # type: ignore[attr-defined]  # set by tap.assemble_server

    reactor.callWhenRunning(start)
    reactor.addSystemEventTrigger("before", "shutdown", top.stopService)
    reactor.run()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
