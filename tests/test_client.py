"""
hmacfs.client against a real hmacfs Site on a loopback port (in this process,
on the real reactor), through a proxy that cuts connections after a given
number of bytes: the client resumes until the file is stored byte-identical.
"""

from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path
from typing import Any

from twisted.internet import protocol, reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SynchronousTestCase, TestCase

from hmacfs.client import TerminalProgress, UploadError, upload_file
from hmacfs.service.site import build_server
from hmacfs.signing.auth import sign_slot
from hmacfs.testing import SECRET, make_config


class _Backend(protocol.Protocol):
    def __init__(self, front: _Front) -> None:
        self.front = front

    def dataReceived(self, data: bytes) -> None:
        self.front.transport.write(data)

    def connectionLost(self, reason: Any) -> None:
        self.front.transport.loseConnection()


class _Front(protocol.Protocol):
    """Forwards one client connection; aborts both sides after ``limit`` request bytes."""

    factory: CuttingProxy

    def connectionMade(self) -> None:
        self.limit: int | None = None
        self.started = False
        self.sent = 0
        self.backend: _Backend | None = None
        self.buffer: list[bytes] = []
        self.transport.pauseProducing()
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", self.factory.port)
        connectProtocol(endpoint, _Backend(self)).addCallback(self._connected)

    def _connected(self, backend: _Backend) -> None:
        self.backend = backend
        self.transport.resumeProducing()

    def dataReceived(self, data: bytes) -> None:
        assert self.backend is not None
        if not self.started:
            # Only uploads are cut (not the HEADs in between).
            self.started = True
            if data.startswith(b"PUT") and self.factory.cuts:
                self.limit = self.factory.cuts.pop(0)
        if self.limit is not None and self.sent + len(data) >= self.limit:
            self.backend.transport.write(data[: self.limit - self.sent])
            self.factory.cut += 1
            self.transport.abortConnection()
            self.backend.transport.abortConnection()
            return
        self.sent += len(data)
        self.backend.transport.write(data)

    def connectionLost(self, reason: Any) -> None:
        if self.backend is not None:
            self.backend.transport.loseConnection()


class CuttingProxy(protocol.Factory):
    protocol = _Front

    def __init__(self, port: int, cuts: list[int]) -> None:
        self.port = port
        self.cuts = list(cuts)
        self.cut = 0


class ClientTests(TestCase):
    size = 6 * 1024 * 1024 + 123

    def setUp(self) -> Deferred | None:
        self.store = Path(self.mktemp()).resolve()
        self.store.mkdir()
        config = make_config(self.store, min_free_bytes=0, enable_get_retries=False)

        def run_blocking(function: Any, *args: Any) -> Deferred:
            return deferToThread(function, *args)

        site = build_server(config, reactor, run_blocking).site
        self.server = reactor.listenTCP(0, site, interface="127.0.0.1")
        self.addCleanup(self.server.stopListening)
        self.file = self.store.parent / "source.bin"
        self.data = os.urandom(self.size)
        self.file.write_bytes(self.data)
        return None

    def proxy(self, cuts: list[int]) -> tuple[CuttingProxy, int]:
        factory = CuttingProxy(self.server.getHost().port, cuts)
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        return factory, port.getHost().port

    def url(self, port: int, name: str) -> str:
        slot = sign_slot(
            base_url=f"http://127.0.0.1:{port}/upload", path=f"c1/{name}", size=self.size, secret=SECRET
        )
        return slot.put_url

    def upload(self, url: str, **kw: Any) -> Deferred:
        kw.setdefault("retry_delay", 0.05)
        return deferToThread(upload_file, url, str(self.file), **kw)

    def stored(self, name: str) -> bytes:
        return (self.store / "c1" / name).read_bytes()

    async def _interrupted(self) -> None:
        factory, port = self.proxy([2_000_000, 2_000_000])
        seen: list[int] = []
        result = await self.upload(self.url(port, "a.bin"), progress=lambda done, total: seen.append(done))
        self.assertEqual(result.status, 201)
        self.assertEqual(factory.cut, 2)
        self.assertEqual(result.resumes, 2)
        self.assertEqual(hashlib.sha256(self.stored("a.bin")).digest(), hashlib.sha256(self.data).digest())
        self.assertEqual(seen[-1], self.size)
        self.assertEqual(os.listdir(self.store / ".hmacfs" / "partial"), [])

    def test_resumes_after_cuts(self) -> Deferred:
        """Two connections cut mid-body: the client resumes twice and the file is byte-identical."""
        return Deferred.fromCoroutine(self._interrupted())

    async def _refused(self) -> None:
        port = self.server.getHost().port
        bad = self.url(port, "b.bin").replace("?v=", "?v=00")[: -2]
        try:
            await self.upload(bad, retries=5)
        except UploadError as error:
            self.assertEqual(error.status, 403)
        else:
            self.fail("a refused upload must raise")
        # Let the server's lingering close see the client go.
        await deferLater(reactor, 0.2, lambda: None)

    def test_refusal_is_not_retried(self) -> None:
        """A 403 (bad MAC) is final: UploadError at once, no retries."""
        return Deferred.fromCoroutine(self._refused())

    async def _gives_up(self) -> None:
        _factory, port = self.proxy([1000] * 10)
        try:
            await self.upload(self.url(port, "c.bin"), retries=2)
        except UploadError as error:
            self.assertIn("gave up after 3 attempts", str(error))
        else:
            self.fail("must give up")

    def test_gives_up_after_retries(self) -> None:
        """Every attempt cut: the client stops after 1 + retries attempts."""
        return Deferred.fromCoroutine(self._gives_up())


class ProgressBarTests(SynchronousTestCase):
    def test_draws_on_a_terminal_only(self) -> None:
        """The bar is drawn on a terminal, ends with a newline at 100 %, and stays silent otherwise."""

        class Tty(io.StringIO):
            def isatty(self) -> bool:
                return True

        tty = Tty()
        bar = TerminalProgress(tty, width=10, interval=0)
        bar(512, 1024)
        bar(1024, 1024)
        self.assertIn("[#####.....]  50.0%", tty.getvalue())
        self.assertTrue(tty.getvalue().endswith("\n"))
        pipe = io.StringIO()
        TerminalProgress(pipe)(1024, 1024)
        self.assertEqual(pipe.getvalue(), "")
