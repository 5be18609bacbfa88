"""
One worker process's link to its supervisor (fast: a real pipe, no processes).

tests/test_workers.py runs the real supervisor and workers.
"""

from __future__ import annotations

import fcntl
import os
import socket
from typing import Any

from twisted.internet import reactor
from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.trial.unittest import SynchronousTestCase, TestCase

from hmacfs.service.worker_process import SupervisorMessages, connect_supervisor
from hmacfs.service.workers import address_family


class SupervisorMessagesTests(SynchronousTestCase):
    def test_lines_split_across_reads(self) -> None:
        """JSON lines are decoded whole, however the pipe cut them; blank lines are skipped."""
        messages: list[dict[str, Any]] = []
        protocol = SupervisorMessages(messages.append, lambda: None)
        protocol.dataReceived(b'{"secrets": {"current": "a"}}\n\n{"secr')
        self.assertEqual(messages, [{"secrets": {"current": "a"}}])
        protocol.dataReceived(b'ets": {}}\n')
        self.assertEqual(messages, [{"secrets": {"current": "a"}}, {"secrets": {}}])

    def test_end_of_input_means_supervisor_gone(self) -> None:
        ended: list[bool] = []
        SupervisorMessages(lambda message: None, lambda: ended.append(True)).connectionLost()
        self.assertEqual(ended, [True])


class ConnectSupervisorTests(TestCase):
    @inlineCallbacks
    def test_reads_a_pipe_with_standard_io_until_eof(self) -> Any:
        """
        The worker reads its stdin through StandardIO until the supervisor closes it,
        and leaves fd 1 (the supervisor's stdout, shared by every worker) as it was.
        """
        read_end, write_end = os.pipe()
        self.addCleanup(_close_quietly, read_end)
        messages: list[dict[str, Any]] = []
        ended: Deferred[None] = Deferred()
        flags = fcntl.fcntl(1, fcntl.F_GETFL)
        connect_supervisor(
            reactor, SupervisorMessages(messages.append, lambda: ended.callback(None)), read_end
        )
        self.assertEqual(fcntl.fcntl(1, fcntl.F_GETFL), flags)
        os.write(write_end, b'{"secrets": {"current": "s1"}}\n')
        os.close(write_end)
        yield ended
        self.assertEqual(messages, [{"secrets": {"current": "s1"}}])


class AddressFamilyTests(SynchronousTestCase):
    def test_family_from_public_address(self) -> None:
        """The supervisor learns its socket's family from getHost(), not from the port's socket."""
        self.assertEqual(address_family(IPv4Address("TCP", "127.0.0.1", 8080)), socket.AF_INET)
        self.assertEqual(address_family(IPv6Address("TCP", "::1", 8080)), socket.AF_INET6)
        self.assertEqual(address_family(UNIXAddress(b"/run/hmacfs.sock")), socket.AF_UNIX)
        self.assertRaises(ValueError, address_family, object())


def _close_quietly(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass
