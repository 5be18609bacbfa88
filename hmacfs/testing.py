# -*- test-case-name: tests.test_upload -*-
"""
Shared test helpers: a site on a StringTransport, a controllable disk runner,
and a way to find free ports and start the real daemon.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import shutil
import socket
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.testing import MemoryReactorClock, StringTransport

from hmacfs.config import Config, default_config
from hmacfs.service.site import build_server

SECRET = b"test-secret-0123456789abcdef"


class ManualRunner:
    """
    Stands in for the disk thread pool: jobs wait until the test runs them,
    so a test can hold the "disk" back and watch flow control.
    """

    def __init__(self, auto: bool = False) -> None:
        self.auto = auto
        self.jobs: list[tuple[Callable[..., Any], tuple[Any, ...], Deferred]] = []

    def __call__(self, function: Callable[..., Any], *args: Any) -> Deferred:
        if self.auto:
            return maybeDeferred(function, *args)
        d: Deferred = Deferred()
        self.jobs.append((function, args, d))
        return d

    def run_next(self) -> None:
        """Run the oldest queued job only (not the jobs its result queues)."""
        function, args, d = self.jobs.pop(0)
        try:
            result = function(*args)
        except BaseException as error:  # noqa: BLE001 - handed to the Deferred
            d.errback(error)
        else:
            d.callback(result)

    def run_all(self) -> int:
        """Run queued jobs (and the jobs they queue) until none are left."""
        count = 0
        while self.jobs:
            count += 1
            self.run_next()
        return count


def make_config(store: Path, **overrides: Any) -> Config:
    return default_config(Path(store).resolve(), SECRET, **overrides)


class SiteHarness:
    """A StreamingSite for ``config`` driven through StringTransports."""

    def __init__(
        self, config: Config, runner: ManualRunner | None = None, metrics: Any = None
    ) -> None:
        self.config = config
        self.reactor = MemoryReactorClock()
        self.runner = runner or ManualRunner(auto=True)
        #: the parts behind the site (store, resumable uploads, bans, tombstones, ...)
        self.server = build_server(config, self.reactor, self.runner, metrics=metrics)
        self.site = self.server.site
        self.site.startFactory()

    def connect(self, port: int = 40000, host: str = "127.0.0.1") -> tuple[Any, StringTransport]:
        protocol = self.site.buildProtocol(IPv4Address("TCP", host, port))
        transport = StringTransport(peerAddress=IPv4Address("TCP", host, port))
        protocol.makeConnection(transport)
        return protocol, transport


def stored_metadata(store_dir: Path, segments: tuple[str, ...]) -> dict[str, object]:
    """A finished file's metadata as the store keeps it: its attribute, else its sidecar."""
    import json

    from hmacfs.storage.layout import meta_name, path_key
    from hmacfs.storage.metadata import XATTR

    try:
        raw = os.getxattr(Path(store_dir).joinpath(*segments), XATTR, follow_symlinks=False)
    except OSError:
        raw = (Path(store_dir) / ".hmacfs" / "meta" / meta_name(path_key(segments))).read_bytes()
    meta = json.loads(raw)
    assert isinstance(meta, dict)
    return meta


def v1_mac(path: str, size: int, secret: bytes = SECRET) -> str:
    return hmac.new(secret, path.encode() + b" " + str(size).encode(), hashlib.sha256).hexdigest()


def put_head(
    path: str,
    size: int | None,
    *,
    mac: str | None = None,
    prefix: str = "upload",
    extra: tuple[str, ...] = (),
    quote: Callable[[str], str] | None = None,
) -> bytes:
    """The request line and headers of a v1-signed PUT (no body)."""
    from urllib.parse import quote as urlquote

    mac = mac if mac is not None else v1_mac(path, size or 0)
    url_path = (quote or (lambda p: urlquote(p, safe="/")))(path)
    lines = [f"PUT /{prefix}/{url_path}?v={mac} HTTP/1.1", "Host: localhost"]
    if size is not None:
        lines.append(f"Content-Length: {size}")
    lines.extend(extra)
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def short_tempdir(test: Any, prefix: str = "hmacfs-") -> Path:
    """
    A fresh directory under the system temp dir, removed after ``test``.

    For UNIX socket paths: trial's own temp dirs live under the checkout, and
    a deep clone (CI uses one) pushes them past the 107-byte ``sun_path``.
    """
    directory = Path(tempfile.mkdtemp(prefix=prefix))
    test.addCleanup(shutil.rmtree, directory, True)
    return directory


def _ephemeral_ports() -> range:
    try:
        low, high = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    except (OSError, ValueError):
        low, high = 32768, 60999
    return range(low, high + 1)


def free_port() -> int:
    """
    A loopback TCP port free now, for a server a test starts.  Chosen outside the kernel's
    ephemeral range: a port the kernel hands out (bind to 0) is also what it gives the next
    outgoing connection (to Swift, Redis, ...), which could take it before the server binds.
    """
    import random

    ephemeral = _ephemeral_ports()
    for _ in range(200):
        port = random.randrange(10000, 65536)
        if port in ephemeral:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def wait_for(predicate: Callable[[], object], timeout: float = 20.0, interval: float = 0.05) -> bool:
    """Poll ``predicate`` until it is true or ``timeout`` seconds pass (for real-server tests)."""
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return bool(predicate())


_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"


def status_of(data: bytes) -> int:
    """The final status code of a raw HTTP/1.1 response (interim 100s skipped)."""
    while data.startswith(_CONTINUE):
        data = data[len(_CONTINUE) :]
    return int(data.split(b" ", 2)[1])


def header_value(data: bytes, name: bytes) -> bytes | None:
    """A header's value in a raw HTTP response, or None."""
    import re

    match = re.search(rb"\r\n" + name + rb": ([^\r]*)\r\n", data, re.IGNORECASE)
    return match.group(1) if match else None


def small_filesystem(test: Any, size: str = "20m", *, read_only: bool = False) -> Path:
    """
    A fresh tmpfs of ``size`` mounted on a directory removed after ``test``: a real
    filesystem that fills up (or, ``read_only``, that nobody can write, root included).
    Needs root (CAP_SYS_ADMIN); without it the test is skipped, except in CI (``CI``
    set), where a missing capability is a failure.
    """
    import subprocess

    from twisted.trial.unittest import SkipTest

    directory = Path(tempfile.mkdtemp(prefix="hmacfs-tmpfs-"))
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755{',ro' if read_only else ''}",
         "tmpfs", str(directory)],
        capture_output=True,
        text=True,
    ) if shutil.which("mount") else None
    if done is None or done.returncode != 0:
        directory.rmdir()
        reason = f"cannot mount a tmpfs: {done.stderr.strip() if done else 'no mount(8)'}"
        if os.environ.get("CI"):
            test.fail(reason)
        raise SkipTest(reason)

    def unmount() -> None:
        subprocess.run(["umount", "-l", str(directory)], check=False)
        directory.rmdir()

    test.addCleanup(unmount)
    return directory
