"""
A real ``redis-server`` for one test: on a free loopback port, in a
temporary directory, no persistence.  Outside CI a missing redis-server
skips the test; in CI (``hmacfs.testing.in_ci()``) it is a failure, since
``make test`` installs it (scripts/install-system-deps.sh).
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from twisted.trial.unittest import SkipTest

from hmacfs.testing import free_port, in_ci

REDIS_SERVER = shutil.which("redis-server") or (
    "/usr/bin/redis-server" if Path("/usr/bin/redis-server").exists() else None
)


def require_redis() -> str:
    if REDIS_SERVER is None:
        if in_ci():
            raise AssertionError("redis-server is required in CI (scripts/install-system-deps.sh)")
        raise SkipTest("redis-server not installed")
    return REDIS_SERVER


class RedisServer:
    """``start()`` / ``stop()`` / ``restart()`` one redis-server; the port stays the same."""

    def __init__(self, password: str | None = None) -> None:
        self.binary = require_redis()
        self.dir = Path(tempfile.mkdtemp(prefix="hmacfs-redis-"))
        self.port = free_port()
        self.password = password
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def addr(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, timeout: float = 10.0) -> RedisServer:
        args = [
            self.binary,
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--dir", str(self.dir),
            "--save", "",
            "--appendonly", "no",
            "--daemonize", "no",
            "--loglevel", "warning",
            "--logfile", str(self.dir / "redis.log"),
        ]
        if self.password:
            args += ["--requirepass", self.password]
        self.process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"redis-server exited: {self.log_tail()}")
            if self._ping():
                return self
            time.sleep(0.02)
        raise AssertionError(f"redis-server did not answer within {timeout}s: {self.log_tail()}")

    def _ping(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1) as sock:
                if self.password:
                    sock.sendall(f"AUTH {self.password}\r\n".encode())
                    sock.recv(100)
                sock.sendall(b"PING\r\n")
                return sock.recv(100).startswith(b"+PONG")
        except OSError:
            return False

    def command(self, *args: str) -> bytes:
        """One command through a raw socket (for assertions): the first reply line."""
        with socket.create_connection(("127.0.0.1", self.port), timeout=5) as sock:
            if self.password:
                sock.sendall(f"AUTH {self.password}\r\n".encode())
                sock.recv(100)
            parts = [f"*{len(args)}\r\n"] + [f"${len(a.encode())}\r\n{a}\r\n" for a in args]
            sock.sendall("".join(parts).encode())
            reply = sock.recv(65536)
        if reply.startswith(b"$-1"):
            return b""
        if reply.startswith(b"$"):
            return reply.split(b"\r\n")[1]
        return reply.split(b"\r\n")[0]

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        self.process = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    def log_tail(self) -> str:
        path = self.dir / "redis.log"
        return path.read_text(errors="replace")[-2000:] if path.exists() else ""


def redis_for(test: object, password: str | None = None) -> RedisServer:
    """A started RedisServer that ``test`` (a trial TestCase) stops at cleanup."""
    server = RedisServer(password=password).start()
    test.addCleanup(server.cleanup)  # type: ignore[attr-defined]
    return server
