"""
SLOW SUITE: the packaged deployment run for real.

The Debian nginx serves packaging/nginx/hmacfs.conf (rendered for a loopback
port, a temp UNIX socket and a throwaway certificate) in front of the real
``twistd hmacfs``; curl and raw TLS sockets are the clients.  Also here: the
systemd socket-activation endpoint under ``systemd-socket-activate``, the
packaged logrotate file with the real logrotate, and ``pip install`` of the
project into a fresh virtualenv.  ``make test-fast`` skips this module.

Clients use their own loopback source addresses (127.0.0.2, .3, ...) so the
address hmacfs logs and bans can only have come from X-Forwarded-For.
"""

from __future__ import annotations

import atexit
import hashlib
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import uuid
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import quote

from twisted.trial.unittest import SkipTest, SynchronousTestCase

from hmacfs.testing import free_port, v1_mac, wait_for
from tests.test_integration import (
    ROOT,
    Daemon,
    die_with_parent,
    make_file,
    require_curl,
    sha256_file,
)
from tests.test_packaging import (
    LOG_FILE,
    PACKAGING,
    find_program,
    make_certificate,
    render_config,
    render_nginx,
    replace_literals,
)

HOST = "upload.example.org"
MIB = 1024 * 1024
#: hmacfs's MaxUploadSize in these tests; the shipped nginx allows 1g, so bodies
#: between the two are refused by hmacfs itself (its 413 must pass nginx unchanged).
MAX_UPLOAD = "400MiB"
#: Every stack's hmacfs trusts no TCP proxy: the UNIX-socket peer (nginx) is the only one.
BASE_EXTRA = "TrustedProxies = []\n"


def expect(predicate: Callable[[], object], timeout: float, what: str) -> None:
    """Wait (bounded) until ``predicate`` holds; fail naming ``what`` if it never does."""
    if not wait_for(predicate, timeout, interval=0.02):
        raise AssertionError(f"timed out after {timeout}s waiting for {what}")


class Nginx:
    """The real nginx on a loopback port, proxying to ``socket_path``."""

    def __init__(self, socket_path: Path) -> None:
        self.binary = find_program("nginx")
        self.prefix = Path(tempfile.mkdtemp(prefix="hmacfs-nginx-"))
        self.cert, key = make_certificate(self.prefix, HOST)
        self.port = free_port()
        self.http_port = free_port()
        conf = render_nginx(
            self.prefix, socket_path=socket_path, port=self.port, http_port=self.http_port,
            cert=self.cert, key=key,
        )
        self.output = open(self.prefix / "nginx.out", "wb")
        self.process = subprocess.Popen(
            [self.binary, "-p", str(self.prefix), "-c", str(conf),
             "-e", str(self.prefix / "error.log")],
            stdout=self.output, stderr=subprocess.STDOUT, preexec_fn=die_with_parent,
        )
        deadline = time.monotonic() + 15
        while True:
            if self.process.poll() is not None:
                raise AssertionError(f"nginx exited {self.process.returncode}: {self.log_tail()}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise AssertionError(f"nginx did not listen: {self.log_tail()}") from None
                time.sleep(0.02)

    def log_tail(self) -> str:
        path = self.prefix / "error.log"
        return path.read_text(errors="replace")[-3000:] if path.exists() else ""

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGQUIT)  # graceful: finish, then exit
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        self.output.close()
        shutil.rmtree(self.prefix, ignore_errors=True)


class Stack:
    """hmacfs on a UNIX socket behind nginx, as packaged."""

    def __init__(self, extra: str = "") -> None:
        self.daemon = Daemon(unix=True, extra=BASE_EXTRA + extra, max_upload_size=MAX_UPLOAD)
        try:
            self.nginx = Nginx(self.daemon.socket)
        except BaseException:
            self.daemon.stop()
            raise

    @property
    def log_path(self) -> Path:
        return self.daemon.dir / "hmacfs.log"

    def url(self, slot: str, query: str = "") -> str:
        base = f"https://{HOST}:{self.nginx.port}/upload/{quote(slot)}"
        return f"{base}?{query}" if query else base

    def signed_url(self, slot: str, size: int) -> str:
        return self.url(slot, f"v={v1_mac(slot, size)}")

    def curl_argv(
        self, source: str = "127.0.0.1", http: str = "--http1.1", timeout: float = 60
    ) -> list[str]:
        return [
            require_curl(), "-sS", "--max-time", str(int(timeout)), http,
            "--cacert", str(self.nginx.cert),
            "--resolve", f"{HOST}:{self.nginx.port}:127.0.0.1",
            "--interface", source,
        ]

    def curl(
        self, *args: str, source: str = "127.0.0.1", http: str = "--http1.1", timeout: float = 60
    ) -> subprocess.CompletedProcess:
        return subprocess.run(
            self.curl_argv(source, http, timeout) + list(args),
            capture_output=True, timeout=timeout + 10,
        )

    def raw_request(
        self, head: bytes, source: str = "127.0.0.1", timeout: float = 15
    ) -> tuple[bytes, bytes]:
        """Send a request head over TLS (no body) and read one response: (head, body)."""
        context = ssl.create_default_context(cafile=str(self.nginx.cert))
        sock = socket.create_connection(
            ("127.0.0.1", self.nginx.port), timeout=timeout, source_address=(source, 0)
        )
        with context.wrap_socket(sock, server_hostname=HOST) as tls:
            tls.sendall(head)
            return read_response(tls, timeout)

    def partial_bytes(self) -> int:
        """Bytes in the partial files of uploads in progress (StoreDir/.hmacfs/partial/)."""
        total = 0
        for path in (self.daemon.store / ".hmacfs" / "partial").glob("*.part"):
            try:
                total += path.stat().st_size
            except FileNotFoundError:
                pass
        return total

    def log_line(self, needle: str, timeout: float = 10) -> str:
        """The access-log line that contains ``needle`` (waits for it to be written)."""

        def find() -> str | None:
            text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
            lines = [line for line in text.splitlines() if needle in line]
            return lines[-1] if lines else None

        expect(lambda: find() is not None, timeout, f"a log line with {needle!r}")
        return str(find())

    def stop(self) -> None:
        try:
            self.nginx.stop()
        finally:
            self.daemon.stop()


def kill_if_running(process: subprocess.Popen[bytes]) -> None:
    """A cleanup: kill ``process`` unless it has already exited."""
    if process.poll() is None:
        process.kill()


def read_response(sock: socket.socket, timeout: float) -> tuple[bytes, bytes]:
    """One HTTP/1.1 response with a Content-Length (or up to EOF), read within ``timeout``."""
    deadline = time.monotonic() + timeout
    data = b""
    while b"\r\n\r\n" not in data:
        sock.settimeout(max(0.1, deadline - time.monotonic()))
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = re.search(rb"(?im)^content-length:\s*(\d+)\s*$", head)
    while (length is None or len(body) < int(length.group(1))) and time.monotonic() < deadline:
        sock.settimeout(max(0.1, deadline - time.monotonic()))
        try:
            chunk = sock.recv(65536)
        except (TimeoutError, ssl.SSLError, ConnectionError):
            break
        if not chunk:
            break
        body += chunk
    return head, body


def status(head: bytes) -> int:
    return int(head.split(b" ", 2)[1])


def split_response(output: bytes) -> tuple[int, dict[str, str], bytes]:
    """curl -i output: the last response's status, headers (lower-case names) and body."""
    head, _, body = output.partition(b"\r\n\r\n")
    while head.startswith(b"HTTP/") and b" 100 " in head.split(b"\r\n", 1)[0]:
        head, _, body = body.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return int(lines[0].split(" ", 2)[1]), headers, body


class BodyFeeder:
    """
    A deterministic body of ``size`` bytes, handed to a client's stdin in
    steps the test chooses, hashed on the way.
    """

    def __init__(self, size: int) -> None:
        self.size = size
        self.sent = 0
        self.block = os.urandom(MIB)
        self.digest = hashlib.sha256()

    def feed(self, stream: object, up_to: int) -> None:
        """Write until ``up_to`` bytes (at most ``size``) have been written in total."""
        up_to = min(up_to, self.size)
        while self.sent < up_to:
            counter = self.sent // MIB
            piece = (counter.to_bytes(8, "big") + self.block)[: min(MIB, up_to - self.sent)]
            stream.write(piece)  # type: ignore[attr-defined]
            self.digest.update(piece)
            self.sent += len(piece)
        stream.flush()  # type: ignore[attr-defined]


_shared: dict[str, Stack] = {}


def shared_stack() -> Stack:
    """One nginx + hmacfs per test process for the tests that only send traffic."""
    if "stack" not in _shared:
        _shared["stack"] = Stack()
    stack = _shared["stack"]
    if stack.daemon.process.poll() is not None or stack.nginx.process.poll() is not None:
        raise AssertionError(
            f"the shared stack died: {stack.daemon.log_tail()} {stack.nginx.log_tail()}"
        )
    return stack


@atexit.register
def _stop_shared() -> None:
    for stack in _shared.values():
        stack.stop()


class ThroughNginxTests(SynchronousTestCase):
    """Uploads and downloads through the packaged nginx site."""

    def setUp(self) -> None:
        self.stack = shared_stack()
        self.work = Path(self.mktemp())
        self.work.mkdir()

    def upload(self, source: Path) -> tuple[int, str]:
        """PUT ``source`` to a fresh slot through nginx: (status, slot)."""
        slot = f"{uuid.uuid4()}/{source.name}"
        size = source.stat().st_size
        result = self.stack.curl(
            "-T", str(source), "-o", "/dev/null", "-w", "%{http_code}",
            self.stack.signed_url(slot, size),
        )
        self.assertEqual(result.returncode, 0, result.stderr)
        return int(result.stdout), slot

    def test_300_mib_streams_through(self) -> None:
        """
        A 300 MiB PUT through nginx reaches hmacfs while the client is still
        sending (the partial file grows while curl has not been given the rest
        of the body), and the stored file is byte-identical.
        """
        size = 300 * MIB
        slot = f"{uuid.uuid4()}/big.bin"
        feeder = BodyFeeder(size)
        client = subprocess.Popen(
            self.stack.curl_argv(timeout=180)
            + ["-T", "-", "-H", f"Content-Length: {size}", "-H", "Transfer-Encoding:",
               "-o", "/dev/null", "-w", "%{http_code}", self.stack.signed_url(slot, size)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )
        self.addCleanup(kill_if_running, client)
        assert client.stdin is not None
        feeder.feed(client.stdin, 100 * MIB)
        expect(lambda: self.stack.partial_bytes() >= 32 * MIB, 60, "32 MiB in the partial file")
        seen = self.stack.partial_bytes()
        self.assertIsNone(client.poll(), "curl finished without the rest of the body")
        feeder.feed(client.stdin, 200 * MIB)
        expect(
            lambda: self.stack.partial_bytes() >= seen + 64 * MIB, 60, "the partial file to grow"
        )
        self.assertIsNone(client.poll())
        self.assertFalse((self.stack.daemon.store / slot).exists())
        feeder.feed(client.stdin, size)
        out, err = client.communicate(timeout=180)  # closes stdin: the body is complete
        self.assertEqual(out, b"201", err)
        stored = self.stack.daemon.store / slot
        self.assertEqual(stored.stat().st_size, size)
        self.assertEqual(sha256_file(stored), feeder.digest.hexdigest())
        self.assertEqual(self.stack.partial_bytes(), 0)

    def compare_direct(self, through: tuple[int, dict[str, str], bytes], direct: bytes) -> None:
        """Status, body and hmacfs's own headers are the same through nginx as on the socket."""
        code, headers, body = through
        d_code, d_headers, d_body = split_response(direct)
        self.assertEqual((code, body), (d_code, d_body))
        for name in ("content-type", "x-session-token", "access-control-allow-origin"):
            self.assertEqual(headers.get(name), d_headers.get(name), name)

    def test_403_unchanged(self) -> None:
        """A bad MAC's 403 comes through nginx with hmacfs's status, body and headers."""
        source = make_file(self.work, 100)
        slot = f"{uuid.uuid4()}/bad.bin"
        query = "v=" + "0" * 64
        token = ["-H", "X-Session-Token: nginx-pass-through-1"]
        through = self.stack.curl("-i", "-T", str(source), *token, self.stack.url(slot, query))
        direct = self.stack.daemon.curl(
            "-i", "-T", str(source), *token, f"{self.stack.daemon.base()}/{slot}?{query}"
        )
        parsed = split_response(through.stdout)
        self.assertEqual(parsed[0], 403)
        self.assertIn(b"bad MAC", parsed[2])
        self.assertEqual(parsed[1]["x-session-token"], "nginx-pass-through-1")
        self.compare_direct(parsed, direct.stdout)

    def test_409_unchanged(self) -> None:
        """The second PUT of a slot gets hmacfs's 409 through nginx; the first file stays."""
        source = make_file(self.work, 1000)
        code, slot = self.upload(source)
        self.assertEqual(code, 201)
        other = self.work / "other.bin"
        other.write_bytes(b"\0" * 1000)
        url = self.stack.signed_url(slot, 1000)
        token = ["-H", "X-Session-Token: nginx-pass-through-2"]
        through = split_response(self.stack.curl("-i", "-T", str(other), *token, url).stdout)
        direct = self.stack.daemon.curl(
            "-i", "-T", str(other), *token,
            f"{self.stack.daemon.base()}/{slot}?v={v1_mac(slot, 1000)}",
        )
        self.assertEqual(through[0], 409)
        self.compare_direct(through, direct.stdout)
        self.assertEqual((self.stack.daemon.store / slot).read_bytes(), source.read_bytes())

    def test_413_unchanged(self) -> None:
        """
        A signed PUT over MaxUploadSize (but under nginx's client_max_body_size)
        gets hmacfs's 413 through nginx as soon as the headers are sent; one
        over client_max_body_size gets nginx's own 413.
        """
        size = 450 * MIB
        slot = f"{uuid.uuid4()}/huge.bin"
        request_line = f"PUT /upload/{slot}?v={v1_mac(slot, size)} HTTP/1.1\r\n"
        head = f"{request_line}Host: {HOST}\r\nContent-Length: {size}\r\n\r\n".encode()
        through_head, through_body = self.stack.raw_request(head)
        self.assertEqual(status(through_head), 413, through_head)
        sock = self.stack.daemon.raw_connect()
        try:
            sock.sendall(head)
            direct_head, direct_body = read_response(sock, 15)
        finally:
            sock.close()
        self.assertEqual(status(direct_head), 413)
        self.assertEqual(through_body, direct_body)
        self.assertNotIn(b"nginx", through_body)

        size = 2 * 1024 * MIB
        head = (
            f"PUT /upload/{slot}?v={v1_mac(slot, size)} HTTP/1.1\r\nHost: {HOST}\r\n"
            f"Content-Length: {size}\r\n\r\n"
        ).encode()
        nginx_head, nginx_body = self.stack.raw_request(head)
        self.assertEqual(status(nginx_head), 413)
        self.assertIn(b"nginx", nginx_body)

    def test_range_and_head(self) -> None:
        """Range (206, open-ended, 416), If-None-Match (304) and HEAD work through nginx."""
        source = make_file(self.work, 10000)
        code, slot = self.upload(source)
        self.assertEqual(code, 201)
        data = source.read_bytes()
        url = self.stack.url(slot)

        part = split_response(self.stack.curl("-i", "-r", "100-199", url).stdout)
        self.assertEqual(part[0], 206)
        self.assertEqual(part[2], data[100:200])
        self.assertEqual(part[1]["content-range"], "bytes 100-199/10000")

        tail = split_response(self.stack.curl("-i", "-H", "Range: bytes=9990-", url).stdout)
        self.assertEqual((tail[0], tail[2]), (206, data[9990:]))

        bad = split_response(self.stack.curl("-i", "-H", "Range: bytes=20000-", url).stdout)
        self.assertEqual(bad[0], 416)
        self.assertEqual(bad[1]["content-range"], "bytes */10000")

        head = self.stack.curl("-I", url)
        code, headers, body = split_response(head.stdout)
        self.assertEqual((code, body), (200, b""))
        self.assertEqual(headers["content-length"], "10000")
        self.assertEqual(headers["accept-ranges"], "bytes")
        self.assertNotIn("content-encoding", headers)

        etag = headers["etag"]
        cached = split_response(self.stack.curl("-i", "-H", f"If-None-Match: {etag}", url).stdout)
        self.assertEqual(cached[0], 304)

        whole = self.stack.curl("-o", str(self.work / "out.bin"), "-w", "%{http_code}", url)
        self.assertEqual(whole.stdout, b"200")
        self.assertEqual((self.work / "out.bin").read_bytes(), data)

    def test_http2(self) -> None:
        """Clients speaking HTTP/2 to nginx upload and download through it too."""
        source = make_file(self.work, 3 * MIB + 5)
        slot = f"{uuid.uuid4()}/h2.bin"
        put = self.stack.curl(
            "--http2", "-T", str(source), "-o", "/dev/null", "-w", "%{http_version} %{http_code}",
            self.stack.signed_url(slot, source.stat().st_size), http="--http2",
        )
        self.assertEqual(put.stdout, b"2 201", put.stderr)
        out = self.work / "h2.out"
        get = self.stack.curl(
            "-o", str(out), "-w", "%{http_version} %{http_code}", self.stack.url(slot),
            http="--http2",
        )
        self.assertEqual(get.stdout, b"2 200")
        self.assertEqual(sha256_file(out), sha256_file(source))

    def test_client_address_from_forwarded_for(self) -> None:
        """
        hmacfs logs the address nginx saw (from X-Forwarded-For, its UNIX peer
        being trusted); a client's own X-Forwarded-For / X-Real-IP change nothing.
        """
        honest = f"{uuid.uuid4()}/honest.bin"
        self.stack.curl("-o", "/dev/null", self.stack.url(honest), source="127.0.0.2")
        line = self.stack.log_line(f"/upload/{honest}")
        self.assertIn(f'127.0.0.2 "GET /upload/{honest}" 404', line)

        forged = f"{uuid.uuid4()}/forged.bin"
        self.stack.curl(
            "-o", "/dev/null", "-H", "X-Forwarded-For: 203.0.113.9", "-H", "X-Real-IP: 203.0.113.9",
            self.stack.url(forged), source="127.0.0.3",
        )
        line = self.stack.log_line(f"/upload/{forged}")
        self.assertIn(f'127.0.0.3 "GET /upload/{forged}" 404', line)
        self.assertNotIn("203.0.113.9", line)


class BanThroughNginxTests(SynchronousTestCase):
    """Bans hit the real client behind nginx, not nginx, and forged headers do not escape them."""

    def test_ban_by_forwarded_address(self) -> None:
        """
        BlockAfterFails bad MACs from one client get it 429 + Retry-After
        through nginx, with or without a forged X-Forwarded-For; another client
        behind the same nginx still uploads.
        """
        # Bans are per process without Redis: one process makes the count exact.
        stack = Stack('NumCores = 1\nBlockAfterFails = 3\nBlockDuration = "60s"\n')
        self.addCleanup(stack.stop)
        work = Path(self.mktemp())
        work.mkdir()
        source = make_file(work, 10)
        for attempt in range(3):
            slot = f"{uuid.uuid4()}/b{attempt}.bin"
            bad = stack.curl(
                "-T", str(source), "-o", "/dev/null", "-w", "%{http_code}",
                stack.url(slot, "v=" + "1" * 64), source="127.0.0.4",
            )
            self.assertEqual(bad.stdout, b"403")

        def put(source_ip: str, *headers: str) -> tuple[int, dict[str, str], bytes]:
            slot = f"{uuid.uuid4()}/after.bin"
            extra = [item for header in headers for item in ("-H", header)]
            result = stack.curl(
                "-i", "-T", str(source), *extra, stack.signed_url(slot, 10), source=source_ip
            )
            return split_response(result.stdout)

        code, headers, _ = put("127.0.0.4")
        self.assertEqual(code, 429)
        self.assertTrue(0 < int(headers["retry-after"]) <= 60, headers)
        for forged in ("X-Forwarded-For: 198.51.100.7", "X-Real-IP: 198.51.100.7"):
            self.assertEqual(put("127.0.0.4", forged)[0], 429, forged)
        self.assertEqual(
            put("127.0.0.4", "X-Forwarded-For: 198.51.100.7, 127.0.0.5")[0], 429
        )
        self.assertEqual(put("127.0.0.5")[0], 201)
        self.assertIn('127.0.0.4 "PUT /upload/', stack.log_line(" 429 "))


class SignalTests(SynchronousTestCase):
    """SIGHUP and SIGTERM on the real process behind nginx."""

    def test_logrotate_sighup_reopens_log(self) -> None:
        """
        The packaged logrotate file (postrotate = SIGHUP) rotates LogFile and
        hmacfs writes on in a new file: requests after it are logged there,
        none in the rotated one.
        """
        # Two workers: the supervisor and each worker reopen the file on their own.
        stack = Stack("NumCores = 2\n")
        self.addCleanup(stack.stop)
        before = f"{uuid.uuid4()}/before.bin"
        stack.curl("-o", "/dev/null", stack.url(before))
        stack.log_line(before)
        pid = stack.daemon.process.pid
        rotated = stack.log_path.with_name("hmacfs.log.1")
        try:
            logrotate: str | None = find_program("logrotate")
        except SkipTest:  # not installed here (in CI that is a failure instead)
            logrotate = None
        if logrotate is None:
            stack.log_path.rename(rotated)
            os.kill(pid, signal.SIGHUP)
        else:
            conf = stack.daemon.dir / "logrotate.conf"
            conf.write_text(
                replace_literals(
                    (PACKAGING / "logrotate" / "hmacfs").read_text(),
                    {
                        LOG_FILE: str(stack.log_path),
                        "create 0640 hmacfs hmacfs": "create 0640",
                        "systemctl reload hmacfs.service": f"kill -HUP {pid}",
                    },
                )
            )
            result = subprocess.run(
                [logrotate, "-f", "-s", str(stack.daemon.dir / "state"), str(conf)],
                capture_output=True, timeout=60,
            )
            self.assertEqual(result.returncode, 0, result.stderr)
        self.assertIn(before, rotated.read_text())
        expect(
            lambda: stack.log_path.exists()
            and stack.log_path.read_text().count("configuration reloaded") >= 3,
            15, "the supervisor and both workers to reopen the log",
        )
        afterwards = []
        for number in range(6):
            slot = f"{uuid.uuid4()}/after{number}.bin"
            stack.curl("-o", "/dev/null", stack.url(slot))
            afterwards.append(slot)
        for slot in afterwards:
            self.assertIn(f'"GET /upload/{slot}" 404', stack.log_line(slot))
        old = rotated.read_text()
        self.assertFalse([slot for slot in afterwards if slot in old])
        self.assertEqual(stack.daemon.process.poll(), None)

    def test_sigterm_drains_upload(self) -> None:
        """
        SIGTERM during an upload through nginx: the upload still completes
        (201, byte-identical) when it finishes within DrainTimeout, then the
        process exits cleanly and its socket file is gone.
        """
        stack, size, slot, feeder, client = self.upload_under_way('DrainTimeout = "20s"\n', "drain.bin")
        stack.daemon.process.send_signal(signal.SIGTERM)
        stopped_at = time.monotonic()
        time.sleep(1.0)
        self.assertIsNone(stack.daemon.process.poll(), "exited without draining the upload")
        try:
            feeder.feed(client.stdin, size)
        except BrokenPipeError:
            client.stdin = None  # communicate() must not flush the broken pipe
        out, err = client.communicate(timeout=60)
        self.assertEqual(
            out, b"201",
            f"curl: {err!r}\nnginx: {stack.nginx.log_tail()}\nhmacfs: {stack.daemon.log_tail()}",
        )
        self.assertEqual(sha256_file(stack.daemon.store / slot), feeder.digest.hexdigest())
        code = stack.daemon.process.wait(30)
        self.assertLess(
            time.monotonic() - stopped_at, 20,
            "the stop waited out DrainTimeout after the upload ended",
        )
        self.assertIn(code, (0, -signal.SIGTERM), stack.daemon.log_tail())
        self.assertFalse(stack.daemon.socket.exists())
        self.assertNotIn("still in flight", stack.log_path.read_text())

    def test_sigterm_gives_up_after_drain_timeout(self) -> None:
        """
        An upload still unfinished when DrainTimeout ends is dropped: the
        process (supervisor and workers) exits soon after, nothing appears at
        the target, and the client sees an error rather than a 201.
        """
        self.check_gives_up("")

    def test_sigterm_gives_up_after_drain_timeout_one_process(self) -> None:
        """The same with NumCores = 1, where twistd itself serves (no supervisor to SIGKILL it)."""
        self.check_gives_up("NumCores = 1\n")

    def upload_under_way(self, config: str, name: str) -> tuple:
        """A 64 MiB upload through nginx, fed from a pipe, with 8 MiB already on disk:
        (stack, size, slot, feeder, curl process)."""
        stack = Stack(config)
        self.addCleanup(stack.stop)
        size = 64 * MIB
        slot = f"{uuid.uuid4()}/{name}"
        feeder = BodyFeeder(size)
        client = subprocess.Popen(
            stack.curl_argv(timeout=60)
            + ["-T", "-", "-H", f"Content-Length: {size}", "-H", "Transfer-Encoding:",
               "-o", "/dev/null", "-w", "%{http_code}", stack.signed_url(slot, size)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )
        self.addCleanup(kill_if_running, client)
        assert client.stdin is not None
        feeder.feed(client.stdin, 16 * MIB)
        expect(lambda: stack.partial_bytes() >= 8 * MIB, 30, "the upload to be under way")
        return stack, size, slot, feeder, client

    def check_gives_up(self, extra: str) -> None:
        stack, size, slot, feeder, client = self.upload_under_way(
            'DrainTimeout = "2s"\n' + extra, "late.bin"
        )
        stack.daemon.process.send_signal(signal.SIGTERM)
        stopped_at = time.monotonic()
        try:
            code = stack.daemon.process.wait(8)
        except subprocess.TimeoutExpired:
            self.fail(f"running 8s after SIGTERM (DrainTimeout 2s): {stack.daemon.log_tail()}")
        self.assertGreaterEqual(time.monotonic() - stopped_at, 1.5, "did not wait for the upload")
        self.assertIn(code, (0, -signal.SIGTERM), stack.daemon.log_tail())
        client.stdin = None  # the body stays unfinished
        out, _err = client.communicate(timeout=70)
        self.assertNotEqual(out, b"201")
        self.assertFalse((stack.daemon.store / slot).exists())
        self.assertFalse(stack.daemon.socket.exists())


class ActivatedDaemon(Daemon):
    """hmacfs started by ``systemd-socket-activate`` on the socket it hands over (systemd:)."""

    def listen_config(self) -> str:
        domain = "UNIX" if self.unix else "INET"
        return f'ListenPort = "systemd:domain={domain}:name=hmacfs"\n'

    def command(self) -> list[str]:
        address = str(self.socket) if self.unix else f"127.0.0.1:{self.port}"
        activate = find_program("systemd-socket-activate", required_in_ci=False)
        return [activate, "--listen", address, "--fdname=hmacfs", *super().command()]


class SocketActivationTests(SynchronousTestCase):
    """The systemd: ListenPort form that hmacfs.socket and hmacfs-tcp.socket need."""

    def check(self, unix: bool) -> None:
        require_curl()
        find_program("systemd-socket-activate", required_in_ci=False)
        daemon = ActivatedDaemon(unix=unix, extra="NumCores = 1\n")
        self.addCleanup(daemon.stop)
        work = Path(self.mktemp())
        work.mkdir()
        source = make_file(work, 1000)
        slot = f"{uuid.uuid4()}/activated.bin"
        result = daemon.curl(
            "-T", str(source), "-o", "/dev/null", "-w", "%{http_code}",
            f"{daemon.base()}/{slot}?v={v1_mac(slot, 1000)}", timeout=30,
        )
        self.assertEqual(result.stdout, b"201", daemon.log_tail())
        self.assertEqual((daemon.store / slot).read_bytes(), source.read_bytes())

    def test_unix(self) -> None:
        """A UNIX socket handed over as by hmacfs.socket (FileDescriptorName=hmacfs) serves."""
        self.check(unix=True)

    def test_tcp(self) -> None:
        """A TCP socket handed over as in hmacfs-tcp.socket serves uploads."""
        self.check(unix=False)


def copy_source(target: Path) -> Path:
    """The project's source tree without its virtualenv, caches and build output."""
    ignore = shutil.ignore_patterns(
        ".git", ".venv", "_trial_temp*", "build", "*.egg-info", ".hypothesis", ".mypy_cache",
        ".ruff_cache", "__pycache__", "bench-out", "data", "dropin.cache", "*.pyc",
    )
    shutil.copytree(ROOT, target, ignore=ignore)
    return target


def outside_env() -> dict[str, str]:
    """
    This environment without what points Python at the source tree or this
    virtualenv (trial --jobs sets PYTHONPATH for its workers): what a fresh
    shell on the server would have.
    """
    return {
        name: value for name, value in os.environ.items()
        if not name.startswith(("PYTHON", "VIRTUAL_ENV", "PIP_"))
    }


class InstalledDaemon(Daemon):
    """``twistd hmacfs`` from an installed virtualenv, started outside the source tree."""

    def __init__(self, venv: Path, **kwargs: Any) -> None:
        self.venv = venv
        self.cwd = venv
        self.env = outside_env()
        super().__init__(**kwargs)

    def command(self) -> list[str]:
        return [str(self.venv / "bin" / "twistd"), *super().command()[1:]]


class InstallTests(SynchronousTestCase):
    """`pip install` (via a built wheel) gives `twistd hmacfs` and the `hmacfs` command."""

    def test_wheel_install(self) -> None:
        """
        The wheel holds the package and the plugin file (and no twisted/__init__.py);
        installed into a fresh virtualenv it gives a working `hmacfs` command
        and a `twistd hmacfs` that serves an upload, all from the installed copy.
        """
        require_curl()
        work = Path(tempfile.mkdtemp(prefix="hmacfs-wheel-"))
        self.addCleanup(shutil.rmtree, work, True)
        source = copy_source(work / "src")
        wheels = work / "wheels"
        env = outside_env()
        built = subprocess.run(
            [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(wheels),
             str(source)],
            capture_output=True, timeout=300, env=env,
        )
        self.assertEqual(built.returncode, 0, built.stderr)
        (wheel,) = wheels.glob("hmacfs-*.whl")
        names = set(zipfile.ZipFile(wheel).namelist())
        self.assertIn("twisted/plugins/hmacfs_plugin.py", names)
        self.assertIn("hmacfs/service/tap.py", names)
        self.assertNotIn("twisted/__init__.py", names)
        self.assertNotIn("twisted/plugins/__init__.py", names)
        self.assertFalse([name for name in names if name.endswith("dropin.cache")])
        self.assertFalse([name for name in names if name.startswith("tests/")])

        venv = work / "venv"
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120, env=env)
        installed = subprocess.run(
            [str(venv / "bin" / "pip"), "install", "-q", str(wheel)],
            capture_output=True, timeout=600, env=env,
        )
        self.assertEqual(installed.returncode, 0, installed.stderr)

        where = subprocess.run(
            [str(venv / "bin" / "python"), "-c",
             "import hmacfs, twisted.plugins.hmacfs_plugin as p;"
             " print(hmacfs.__file__); print(p.__file__)"],
            capture_output=True, timeout=60, cwd=work, env=env,
        )
        self.assertEqual(where.returncode, 0, where.stderr)
        for path in where.stdout.decode().split():
            self.assertTrue(path.startswith(str(venv)), path)

        help_text = subprocess.run(
            [str(venv / "bin" / "twistd"), "--help"], capture_output=True, timeout=60, cwd=work,
            env=env,
        )
        self.assertRegex(help_text.stdout.decode(), r"(?m)^\s+hmacfs\s+XEP-0363")

        config = render_config(work / "cfg")
        checked = subprocess.run(
            [str(venv / "bin" / "hmacfs"), "check-config", str(config)],
            capture_output=True, timeout=60, cwd=work, env=env,
        )
        self.assertEqual(checked.returncode, 0, checked.stderr)

        daemon = InstalledDaemon(venv)
        self.addCleanup(daemon.stop)
        signed = subprocess.run(
            [str(venv / "bin" / "hmacfs"), "sign", "--config", str(daemon.config),
             "a1/hello.txt", "6"],
            capture_output=True, timeout=60, cwd=work, env=env,
        )
        self.assertEqual(signed.returncode, 0, signed.stderr)
        put_url = signed.stdout.decode().splitlines()[0].removeprefix("PUT ")
        body = work / "hello.txt"
        body.write_bytes(b"hello\n")
        result = daemon.curl("-T", str(body), "-o", "/dev/null", "-w", "%{http_code}", put_url)
        self.assertEqual(result.stdout, b"201", daemon.log_tail())
        self.assertEqual((daemon.store / "a1" / "hello.txt").read_bytes(), b"hello\n")
