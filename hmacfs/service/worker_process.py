# -*- test-case-name: tests.test_worker -*-
"""
What runs inside one worker process: the inherited listening socket, the
supervisor's messages on stdin, and the serving tree around them.

L{hmacfs.service.worker} runs them in a process the zygote forked (which
imported this module before the fork, to share its pages).
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
from collections.abc import Callable
from typing import Any

import attrs
from twisted.application.service import Service
from twisted.internet.protocol import Protocol
from twisted.internet.stdio import StandardIO

from hmacfs.config import Config
from hmacfs.service.assembly import ServerTree, assemble_server
from hmacfs.service.reload import ReloadService


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


@attrs.define(eq=False, kw_only=True)
class WorkerTree:
    """One worker's services, and what its main starts after them."""

    server: ServerTree
    messages: SupervisorMessages

    @property
    def service(self) -> Any:
        return self.server.service

    @property
    def reload(self) -> ReloadService:
        return self.server.reload


def build_worker(
    config: Config, config_path: str, fd: int, family: int, index: int, reactor: Any
) -> WorkerTree:
    """The serving tree of worker ``index``, on the listening socket ``fd`` (nothing starts)."""
    server = assemble_server(config, reactor, config_path=config_path, worker_index=index)
    AdoptedPortService(reactor, fd, family, server.site).setServiceParent(server.service)
    ring = server.ring

    def on_message(message: dict[str, Any]) -> None:
        if "secrets" in message:
            ring.load_state(message["secrets"])

    def on_eof() -> None:
        if reactor.running:
            reactor.stop()

    return WorkerTree(server=server, messages=SupervisorMessages(on_message, on_eof))
