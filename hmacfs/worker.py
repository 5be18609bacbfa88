# -*- test-case-name: tests.test_workers -*-
"""
One worker process: ``python -m hmacfs.worker --config FILE --fd 3 --family inet``.

Started by ``hmacfs.workers.WorkerSupervisor``; serves requests on the
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
from typing import Any

# Before anything slow: a SIGHUP forwarded while this process is still
# starting must not kill it (its default action) nor be lost: remember it and
# reload once the services (and the real handler) are up.
_early_sighup: list[int] = []
signal.signal(signal.SIGHUP, lambda signum, frame: _early_sighup.append(signum))

from twisted.application.service import MultiService, Service
from twisted.internet import fdesc
from twisted.internet.abstract import FileDescriptor
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
            self.port.stopReading()


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


class SupervisorPipe(FileDescriptor):
    """
    Reads the supervisor's messages from stdin (JSON lines: the current
    secrets).  End of file means the supervisor is gone: stop serving.
    """

    def __init__(self, reactor: Any, fd: int, on_message: Any, on_eof: Any) -> None:
        super().__init__(reactor)
        self.fd = fd
        self.on_message = on_message
        self.on_eof = on_eof
        self._buffer = b""
        fdesc.setNonBlocking(fd)

    def fileno(self) -> int:
        return self.fd

    def doRead(self) -> Any:
        return fdesc.readFromFD(self.fd, self._received)

    def _received(self, data: bytes) -> None:
        self._buffer += data
        while b"\n" in self._buffer:
            line, self._buffer = self._buffer.split(b"\n", 1)
            if line.strip():
                self.on_message(json.loads(line))

    def connectionLost(self, reason: Any) -> None:
        super().connectionLost(reason)
        self.on_eof()


def build_worker(config_path: str, fd: int, family: int, index: int, reactor: Any) -> MultiService:
    from hmacfs.config import load_config
    from hmacfs.tap import assemble_server, tune_allocator

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

    pipe = SupervisorPipe(reactor, 0, on_message, on_eof)
    top.pipe = pipe  # type: ignore[attr-defined]
    return top


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hmacfs.worker")
    parser.add_argument("--config", required=True)
    parser.add_argument("--fd", type=int, required=True)
    parser.add_argument("--family", choices=sorted(FAMILIES), required=True)
    parser.add_argument("--index", type=int, default=0)
    args = parser.parse_args(argv)
    die_with_parent()

    from twisted.internet import reactor

    globalLogBeginner.beginLoggingTo([textFileLogObserver(sys.stdout)], redirectStandardIO=False)
    top = build_worker(args.config, args.fd, FAMILIES[args.family], args.index, reactor)
    def start() -> None:
        top.startService()
        top.pipe.startReading()
        if _early_sighup:
            top.reload.reload()

    reactor.callWhenRunning(start)
    reactor.addSystemEventTrigger("before", "shutdown", top.stopService)
    reactor.run()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
