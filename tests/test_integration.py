"""
SLOW SUITE: the real daemon (``twistd -n hmacfs``) on a loopback port and on a
UNIX socket, driven with curl and raw sockets.  ``make test-fast`` skips it.
"""

from __future__ import annotations

import atexit
import hashlib
import http.client
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from urllib.parse import quote

from twisted.trial.unittest import SkipTest, SynchronousTestCase

from hmacfs.signing.auth import sign_slot
from hmacfs.testing import SECRET, free_port, in_ci, v1_mac, wait_for

VENV_BIN = Path(sys.executable).parent
TWISTD = str(VENV_BIN / "twistd")
ROOT = Path(__file__).resolve().parent.parent
CURL = shutil.which("curl")


def die_with_parent() -> None:
    """preexec_fn: the daemon gets SIGTERM when the test process ends, however it ends
    (trial's parallel workers may exit without running atexit handlers)."""
    import ctypes

    ctypes.CDLL(None).prctl(1, signal.SIGTERM, 0, 0, 0)  # PR_SET_PDEATHSIG


def require_curl() -> str:
    if CURL is None:
        if in_ci():
            raise AssertionError("curl is required in CI")
        raise SkipTest("curl not installed")
    return CURL


class Daemon:
    """One ``twistd -n hmacfs`` process with its own store and config."""

    def __init__(
        self, *, unix: bool = False, extra: str = "", max_upload_size: str = "250MiB"
    ) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="hmacfs-it-"))
        self.store = self.dir / "store"
        self.store.mkdir()
        self.unix = unix
        if unix:
            self.socket = self.dir / "hmacfs.sock"
        else:
            self.port = free_port()
        self.config = self.dir / "config.toml"
        self._settings = (
            f'Secret = "{SECRET.decode()}"\nStoreDir = "{self.store}"\n'
            + f'UploadSubDir = "upload"\nLogLevel = "{self.log_level}"\n'
            + f'LogFile = "{self.dir / "hmacfs.log"}"\n'
            + f"MaxUploadSize = \"{max_upload_size}\"\nMinFreeBytes = 0\nEnableGetRetries = false\n"
            + extra
        )
        for attempt in range(3):
            self.config.write_text(self.listen_config() + self._settings)
            self.output = open(self.dir / "twistd.out", "wb")
            self.process = subprocess.Popen(
                self.command(),
                cwd=self.cwd,
                env=self.env,
                stdout=self.output,
                stderr=subprocess.STDOUT,
                preexec_fn=die_with_parent,
            )
            try:
                self.wait_listening()
                return
            except BaseException:
                # Nobody gets this object to stop(): do not leave the process running.
                self.process.kill()
                self.process.wait(10)
                self.output.close()
                # free_port() only finds a port that was free a moment ago; a client
                # connection elsewhere may take it as its own port before twistd binds.
                if self.unix or attempt == 2 or "Address already in use" not in self.log_tail():
                    raise
                self.port = free_port()

    #: LogLevel (a subclass may log more)
    log_level = "info"
    #: Where twistd runs; a subclass testing an installed copy moves it out of the source tree.
    cwd = ROOT
    #: The daemon's environment (None: this process's); such a subclass drops PYTHONPATH.
    env: dict[str, str] | None = None

    def listen_config(self) -> str:
        """The ListenPort lines of the config (a subclass may listen another way)."""
        if self.unix:
            return f'UnixSocket = true\nListenPort = "{self.socket}"\n'
        return f'ListenPort = "127.0.0.1:{self.port}"\n'

    def command(self) -> list[str]:
        """The argv that starts the daemon (a subclass may wrap or replace it)."""
        return [TWISTD, "--nodaemon", "--pidfile=", "hmacfs", "--config", str(self.config)]

    def wait_listening(self, timeout: float = 30.0) -> None:
        """Wait until the daemon answers HTTP (with worker processes, the socket
        accepts connections before any worker serves them)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"twistd exited {self.process.returncode}: {self.log_tail()}")
            try:
                sock = self.raw_connect()
                try:
                    sock.settimeout(1)
                    sock.sendall(b"OPTIONS /upload/ready/check HTTP/1.0\r\n\r\n")
                    if b" 204 " in sock.recv(64):
                        return
                finally:
                    sock.close()
            except OSError:
                pass
            time.sleep(0.05)
        raise AssertionError(f"twistd did not serve within {timeout}s: {self.log_tail()}")

    def raw_connect(self) -> socket.socket:
        if self.unix:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.connect(str(self.socket))
        else:
            sock = socket.create_connection(("127.0.0.1", self.port), timeout=5)
        sock.settimeout(5)
        return sock

    def log_tail(self) -> str:
        texts = []
        for name in ("twistd.out", "hmacfs.log"):
            path = self.dir / name
            if path.exists():
                texts.append(path.read_text(errors="replace")[-3000:])
        return "\n".join(texts)

    def base(self) -> str:
        return "http://localhost/upload" if self.unix else f"http://127.0.0.1:{self.port}/upload"

    def curl(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        cmd = [require_curl(), "-sS", "--max-time", str(int(timeout))]
        if self.unix:
            cmd += ["--unix-socket", str(self.socket)]
        return subprocess.run(cmd + list(args), capture_output=True, timeout=timeout + 10)

    def terminate(self) -> int:
        """SIGTERM (SIGKILL after 15 s); the exit status."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        self.output.close()
        return self.process.returncode

    def stop(self) -> int:
        """Terminate and remove this daemon's directory (its store included)."""
        code = self.terminate()
        shutil.rmtree(self.dir, ignore_errors=True)
        return code


_daemons: dict[str, Daemon] = {}


def shared_daemon(kind: str) -> Daemon:
    """One daemon per kind per test process, stopped at exit."""
    if kind not in _daemons:
        _daemons[kind] = Daemon(unix=(kind == "unix"))
    daemon = _daemons[kind]
    if daemon.process.poll() is not None:
        raise AssertionError(f"daemon died: {daemon.log_tail()}")
    return daemon


@atexit.register
def _stop_all() -> None:
    for daemon in _daemons.values():
        daemon.stop()


def make_file(directory: Path, size: int) -> Path:
    """A file of ``size`` pseudo-random bytes, written in 1 MiB steps."""
    path = directory / f"src-{size}.bin"
    block = os.urandom(1024 * 1024)
    with open(path, "wb") as handle:
        remaining = size
        counter = 0
        while remaining:
            piece = (counter.to_bytes(8, "big") + block)[: min(remaining, 1024 * 1024)]
            handle.write(piece)
            remaining -= len(piece)
            counter += 1
    return path


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def status_of(result: subprocess.CompletedProcess) -> int:
    return int(result.stdout.decode().strip().splitlines()[-1])


class TCPDaemonTests(SynchronousTestCase):
    """Uploads and downloads through the real daemon on a loopback TCP port."""

    kind = "tcp"

    def setUp(self) -> None:
        require_curl()
        self.daemon = shared_daemon(self.kind)
        self.work = Path(self.mktemp())
        self.work.mkdir()

    def put_file(self, source: Path, name: str | None = None) -> tuple[int, str, str]:
        slot = f"{uuid.uuid4()}/{name or source.name}"
        size = source.stat().st_size
        url = f"{self.daemon.base()}/{quote(slot)}?v={v1_mac(slot, size)}"
        result = self.daemon.curl("-T", str(source), "-o", "/dev/null", "-w", "%{http_code}\n", url)
        self.assertEqual(result.returncode, 0, result.stderr)
        return status_of(result), slot, url

    def roundtrip(self, size: int) -> None:
        source = make_file(self.work, size)
        status, slot, _url = self.put_file(source)
        self.assertEqual(status, 201)
        out = self.work / "out.bin"
        got = self.daemon.curl("-o", str(out), "-w", "%{http_code}\n", f"{self.daemon.base()}/{quote(slot)}")
        self.assertEqual(status_of(got), 200)
        self.assertEqual(sha256_file(out), sha256_file(source))
        stored = self.daemon.store / slot
        self.assertEqual(stored.stat().st_size, size)

    def test_one_byte(self) -> None:
        """A 1-byte file goes up with 201 and comes back identical."""
        self.roundtrip(1)

    def test_three_mib(self) -> None:
        """A 3 MiB file goes up with 201 and comes back identical."""
        self.roundtrip(3 * 1024 * 1024)

    def test_two_hundred_mib(self) -> None:
        """A 200 MiB file streams up and back byte-identical."""
        self.roundtrip(200 * 1024 * 1024)

    def test_second_put_409(self) -> None:
        """The same signed URL used twice: 201, then 409 with the first file untouched."""
        source = make_file(self.work, 1000)
        status, slot, url = self.put_file(source)
        self.assertEqual(status, 201)
        other = self.work / "other.bin"
        other.write_bytes(b"\0" * 1000)
        again = self.daemon.curl("-T", str(other), "-o", "/dev/null", "-w", "%{http_code}\n", url)
        self.assertEqual(status_of(again), 409)
        self.assertEqual((self.daemon.store / slot).read_bytes(), source.read_bytes())

    def test_tampered_mac_403(self) -> None:
        """A MAC with one changed digit is refused and nothing is stored."""
        source = make_file(self.work, 100)
        slot = f"{uuid.uuid4()}/t.bin"
        mac = v1_mac(slot, 100)
        mac = ("0" if mac[0] != "0" else "1") + mac[1:]
        url = f"{self.daemon.base()}/{slot}?v={mac}"
        result = self.daemon.curl("-T", str(source), "-w", "\n%{http_code}\n", url)
        self.assertEqual(status_of(result), 403)
        self.assertIn(b"bad MAC", result.stdout)
        self.assertFalse((self.daemon.store / slot).exists())

    def test_chunked_411(self) -> None:
        """A chunked PUT is refused with 411."""
        slot = f"{uuid.uuid4()}/c.bin"
        url = f"{self.daemon.base()}/{slot}?v={v1_mac(slot, 5)}"
        result = self.daemon.curl(
            "-X", "PUT", "-H", "Transfer-Encoding: chunked", "--data-binary", "hello",
            "-o", "/dev/null", "-w", "%{http_code}\n", url,
        )
        self.assertEqual(status_of(result), 411)

    def test_delete_405(self) -> None:
        """Methods we do not serve get 405 with Allow."""
        result = self.daemon.curl("-X", "DELETE", "-i", f"{self.daemon.base()}/a/b")
        self.assertIn(b" 405 ", result.stdout.splitlines()[0])
        self.assertIn(b"Allow: GET, HEAD, PUT, OPTIONS", result.stdout)

    def test_options_cors(self) -> None:
        """A preflight gets 204 without authentication and the CORS headers."""
        result = self.daemon.curl(
            "-X", "OPTIONS", "-i", "-H", "Origin: https://chat.example",
            "-H", "Access-Control-Request-Method: PUT", f"{self.daemon.base()}/a/b.png",
        )
        head = result.stdout.decode()
        self.assertIn(" 204 ", head.splitlines()[0])
        self.assertIn("Access-Control-Allow-Origin: *", head)
        self.assertIn("Authorization", head)

    def test_range_and_head(self) -> None:
        """Range gives 206 with the right bytes; HEAD gives Content-Length and no body."""
        source = make_file(self.work, 10000)
        status, slot, _ = self.put_file(source, "r.bin")
        self.assertEqual(status, 201)
        url = f"{self.daemon.base()}/{quote(slot)}"
        part = self.daemon.curl("-r", "100-199", "-w", "\n%{http_code}", url)
        body, _, code = part.stdout.rpartition(b"\n")
        self.assertEqual(int(code), 206)
        self.assertEqual(body, source.read_bytes()[100:200])
        tail = self.daemon.curl("-H", "Range: bytes=9990-", url)
        self.assertEqual(tail.stdout, source.read_bytes()[9990:])
        head = self.daemon.curl("-I", url).stdout.decode()
        self.assertIn("Content-Length: 10000", head)
        self.assertIn(" 200 ", head.splitlines()[0])
        bad = self.daemon.curl("-i", "-H", "Range: bytes=20000-", url).stdout.decode()
        self.assertIn(" 416 ", bad.splitlines()[0])
        self.assertIn("Content-Range: bytes */10000", bad)

    def test_v2_content_type_and_serving(self) -> None:
        """A v2 slot binds the type; the download is served with it, inline for images."""
        body = self.work / "pic.png"
        body.write_bytes(b"\x89PNG fake" * 10)
        slot = sign_slot(
            base_url=self.daemon.base(), path=f"{uuid.uuid4()}/pic.png", size=90,
            secret=SECRET, scheme="v2", content_type="image/png",
        )
        wrong = self.daemon.curl(
            "-T", str(body), "-H", "Content-Type: image/jpeg", "-o", "/dev/null",
            "-w", "%{http_code}\n", slot.put_url,
        )
        self.assertEqual(status_of(wrong), 403)
        ok = self.daemon.curl(
            "-T", str(body), "-H", "Content-Type: image/png", "-o", "/dev/null",
            "-w", "%{http_code}\n", slot.put_url,
        )
        self.assertEqual(status_of(ok), 201)
        head = self.daemon.curl("-I", slot.get_url).stdout.decode()
        self.assertIn("Content-Type: image/png", head)
        self.assertIn("X-Content-Type-Options: nosniff", head)
        self.assertNotIn("attachment", head)

    def raw_expect(self, head: bytes) -> bytes:
        """Send only the headers (with Expect) and read what comes back within 3 s."""
        sock = self.daemon.raw_connect()
        try:
            sock.sendall(head)
            sock.settimeout(3)
            data = b""
            while b"\r\n\r\n" not in data:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                data += chunk
            return data
        finally:
            sock.close()

    def test_403_before_body_no_continue(self) -> None:
        """With Expect: 100-continue and a bad MAC, the 403 arrives before any body byte is sent."""
        slot = f"{uuid.uuid4()}/e.bin"
        head = (
            f"PUT /upload/{slot}?v={'0' * 64} HTTP/1.1\r\nHost: x\r\n"
            "Content-Length: 104857600\r\nExpect: 100-continue\r\n\r\n"
        ).encode()
        answer = self.raw_expect(head)
        self.assertTrue(answer.startswith(b"HTTP/1.1 403 "), answer)
        self.assertNotIn(b"100 Continue", answer)

    def test_413_before_body_no_continue(self) -> None:
        """A signed upload over MaxUploadSize gets 413 before the body, without 100 Continue."""
        slot = f"{uuid.uuid4()}/big.bin"
        size = 300 * 1024 * 1024
        head = (
            f"PUT /upload/{slot}?v={v1_mac(slot, size)} HTTP/1.1\r\nHost: x\r\n"
            f"Content-Length: {size}\r\nExpect: 100-continue\r\n\r\n"
        ).encode()
        answer = self.raw_expect(head)
        self.assertTrue(answer.startswith(b"HTTP/1.1 413 "), answer)
        self.assertNotIn(b"100 Continue", answer)

    def test_continue_after_acceptance(self) -> None:
        """A valid upload with Expect gets 100 Continue, then 201 after the body."""
        slot = f"{uuid.uuid4()}/ok.bin"
        sock = self.daemon.raw_connect()
        try:
            sock.sendall(
                f"PUT /upload/{slot}?v={v1_mac(slot, 5)} HTTP/1.1\r\nHost: x\r\n"
                "Content-Length: 5\r\nExpect: 100-continue\r\n\r\n".encode()
            )
            self.assertEqual(sock.recv(100), b"HTTP/1.1 100 Continue\r\n\r\n")
            sock.sendall(b"hello")
            answer = sock.recv(4096)
            self.assertTrue(answer.startswith(b"HTTP/1.1 201 "), answer)
        finally:
            sock.close()

    def http_connection(self) -> http.client.HTTPConnection:
        """An http.client connection to the daemon, over TCP or its UNIX socket."""
        daemon = self.daemon

        class Connection(http.client.HTTPConnection):
            def connect(self) -> None:
                self.sock = daemon.raw_connect()
                self.sock.settimeout(30)

        return Connection("localhost", timeout=30)

    def session_offset(self, path: str, token: str) -> int | None:
        """The Upload-Offset a HEAD with the session token reports, or None."""
        connection = self.http_connection()
        try:
            connection.request("HEAD", path, headers={"X-Session-Token": token})
            response = connection.getresponse()
            response.read()
            value = response.getheader("Upload-Offset")
            return int(value) if value is not None else None
        finally:
            connection.close()

    def test_early_409_reaches_a_client_that_sends_the_whole_body_first(self) -> None:
        """
        Issue 9 defect 2: an 8 MiB upload cut after 3 MiB, then a resume of the
        rest at the wrong offset sent whole before reading (as http.client,
        requests and many mobile stacks do).  The client reads the 409 with the
        Upload-Offset, every time, six times on one server (the discard keeps
        reading instead of stalling into EPIPE).
        """
        total = 8 * 1024 * 1024
        sent = 3 * 1024 * 1024
        body = os.urandom(total)
        for attempt in range(6):
            slot = f"{uuid.uuid4()}/early.bin"
            token = f"early-{attempt}-{uuid.uuid4().hex}"
            path = f"/upload/{quote(slot)}?v={v1_mac(slot, total)}"
            sock = self.daemon.raw_connect()
            try:
                sock.sendall(
                    f"PUT {path} HTTP/1.1\r\nHost: localhost\r\nContent-Length: {total}\r\n"
                    f"X-Session-Token: {token}\r\n\r\n".encode() + body[:sent]
                )
            finally:
                sock.close()
            # What reached the disk before the server saw the close (queued
            # chunks are dropped), once the server has let go of the upload.
            seen: list[int | None] = [None]

            def settled(seen: list[int | None] = seen, path: str = path, token: str = token) -> bool:
                before, seen[0] = seen[0], self.session_offset(path, token)
                return seen[0] is not None and seen[0] == before

            self.assertTrue(wait_for(settled, interval=0.2), (attempt, seen))
            offset = seen[0]
            assert offset is not None
            start = offset + 1
            connection = self.http_connection()
            try:
                connection.request(
                    "PUT", path, body=body[start:],
                    headers={
                        "Content-Range": f"bytes {start}-{total - 1}/{total}",
                        "X-Session-Token": token,
                    },
                )
                response = connection.getresponse()
                response.read()
            finally:
                connection.close()
            self.assertEqual(response.status, 409, attempt)
            self.assertEqual(response.getheader("Upload-Offset"), str(offset), attempt)

    def test_access_log_has_no_mac(self) -> None:
        """The access log names method, path and status but never the query (the MAC)."""
        source = make_file(self.work, 10)
        _status, slot, url = self.put_file(source, "log.bin")
        mac = url.rsplit("=", 1)[1]
        deadline = time.monotonic() + 5
        log = ""
        while time.monotonic() < deadline:
            log = (self.daemon.dir / "hmacfs.log").read_text()
            if "log.bin" in log:
                break
            time.sleep(0.1)
        self.assertIn('"PUT /upload/', log)
        self.assertIn(" 201 ", log)
        self.assertNotIn(mac, log)


class UnixDaemonTests(TCPDaemonTests):
    """The same behaviour on a UNIX socket (how nginx talks to us)."""

    kind = "unix"

    def test_two_hundred_mib(self) -> None:
        """Covered on TCP; a 3 MiB round trip is enough here."""
        self.roundtrip(3 * 1024 * 1024 + 17)


class DaemonLifecycleTests(SynchronousTestCase):
    """Starting, refusing bad configs and stopping."""

    def test_bad_config_exits_nonzero_naming_key(self) -> None:
        """A bad value makes twistd exit non-zero before listening, naming key and value."""
        directory = Path(self.mktemp()).resolve()
        directory.mkdir()
        config = directory / "bad.toml"
        port = free_port()
        config.write_text(
            f'ListenPort = "127.0.0.1:{port}"\nSecret = "0123456789abcdef0123"\n'
            f'StoreDir = "{directory}"\nBufferSize = "lots"\n'
        )
        result = subprocess.run(
            [TWISTD, "--nodaemon", "--pidfile=", "hmacfs", "--config", str(config)],
            capture_output=True, timeout=60, cwd=ROOT,
        )
        self.assertNotEqual(result.returncode, 0)
        output = (result.stdout + result.stderr).decode()
        self.assertIn("BufferSize", output)
        self.assertIn("lots", output)
        self.assertNotIn("0123456789abcdef0123", output)

    def test_tac_file(self) -> None:
        """`twistd -ny hmacfs.tac` with HMACFS_CONFIG serves uploads too."""
        require_curl()
        directory = Path(tempfile.mkdtemp(prefix="hmacfs-tac-"))
        self.addCleanup(shutil.rmtree, directory, True)
        port = free_port()
        config = directory / "c.toml"
        config.write_text(
            f'ListenPort = "127.0.0.1:{port}"\nSecret = "{SECRET.decode()}"\nStoreDir = "{directory}"\n'
            "MinFreeBytes = 0\n"
        )
        env = dict(os.environ, HMACFS_CONFIG=str(config))
        process = subprocess.Popen(
            [TWISTD, "--nodaemon", "--pidfile=", "-y", str(ROOT / "hmacfs.tac")],
            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        )
        self.addCleanup(process.wait, 10)
        self.addCleanup(process.terminate)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.05)
        slot = f"{uuid.uuid4()}/tac.txt"
        result = subprocess.run(
            [require_curl(), "-sS", "-T", "-", "-H", "Content-Length: 3", "-H", "Transfer-Encoding:",
             "-o", "/dev/null", "-w", "%{http_code}", f"http://127.0.0.1:{port}/upload/{slot}?v={v1_mac(slot, 3)}"],
            input=b"abc", capture_output=True, timeout=30,
        )
        self.assertEqual(result.stdout, b"201")
        self.assertEqual((directory / slot).read_bytes(), b"abc")

    def test_sigterm_removes_socket(self) -> None:
        """SIGTERM stops the daemon cleanly and removes its UNIX socket file."""
        daemon = Daemon(unix=True)
        sock_path = daemon.socket
        self.assertTrue(sock_path.exists())
        daemon.process.send_signal(signal.SIGTERM)
        daemon.process.wait(20)
        # twistd re-raises the signal after a clean shutdown, so the exit
        # status says "terminated by SIGTERM" (systemd counts that as success).
        self.assertIn(daemon.process.returncode, (0, -signal.SIGTERM), daemon.log_tail())
        self.assertIn("Server Shut Down", daemon.log_tail())
        self.assertFalse(sock_path.exists())
        daemon.stop()

    def test_stale_socket_replaced(self) -> None:
        """A socket file left by a crashed process does not stop the next start."""
        first = Daemon(unix=True)
        first.process.kill()
        first.process.wait(10)
        self.assertTrue(first.socket.exists())
        config = first.config.read_text()
        second_dir = first.dir
        process = subprocess.Popen(
            [TWISTD, "--nodaemon", "--pidfile=", "hmacfs", "--config", str(first.config)],
            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        first.process = process
        self.addCleanup(first.stop)
        first.wait_listening()
        self.assertIn("UnixSocket", config)
        self.assertTrue((second_dir / "hmacfs.sock").exists())


class SignalTests(SynchronousTestCase):
    """SIGHUP on the real process."""

    def test_sighup_reopens_log_and_rotates_secret(self) -> None:
        """After logrotate moves LogFile, SIGHUP makes the daemon write a new one and
        picks up a changed secret while the old one stays valid for the grace period."""
        require_curl()
        daemon = Daemon()
        self.addCleanup(daemon.stop)
        log_path = daemon.dir / "hmacfs.log"
        rotated = daemon.dir / "hmacfs.log.1"
        os.rename(log_path, rotated)
        config = daemon.config.read_text().replace(SECRET.decode(), "a-brand-new-secret-0123456789")
        daemon.config.write_text(config)
        daemon.process.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not log_path.exists():
            time.sleep(0.05)
        self.assertTrue(log_path.exists(), daemon.log_tail())

        def put(secret: bytes) -> int:
            slot = f"{uuid.uuid4()}/s.txt"
            url = f"{daemon.base()}/{slot}?v={v1_mac(slot, 2, secret)}"
            result = subprocess.run(
                [require_curl(), "-sS", "-X", "PUT", "--data-binary", "hi", "-o", "/dev/null",
                 "-w", "%{http_code}", url], capture_output=True, timeout=30,
            )
            return int(result.stdout)

        # Every process (the supervisor and each worker when NumCores > 1)
        # re-reads the config when the signal reaches it.
        workers = os.cpu_count() or 1
        expected = 1 + (workers if workers > 1 else 0)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if log_path.read_text().count("configuration reloaded") >= expected:
                break
            time.sleep(0.05)
        self.assertEqual(log_path.read_text().count("configuration reloaded"), expected, daemon.log_tail())
        for _ in range(4):
            self.assertEqual(put(b"a-brand-new-secret-0123456789"), 201)
        self.assertEqual(put(SECRET), 201)  # grace period (default 1h)
        self.assertEqual(put(b"never-the-secret-0123456789"), 403)


class SlowClientTests(SynchronousTestCase):
    """HeaderTimeout and MaxConnectionsPerClient on the real daemon (issue 9 defect 11)."""

    def test_head_deadline_and_connection_cap(self) -> None:
        """
        With MaxConnectionsPerClient = 3, a fourth connection from 127.0.0.1 (not a
        trusted proxy here) gets 429 and closing one frees a slot; a head trickled
        past HeaderTimeout gets 408.
        """
        daemon = Daemon(
            extra='NumCores = 1\nHeaderTimeout = "1s"\nMaxConnectionsPerClient = 3\nTrustedProxies = []\n'
        )
        self.addCleanup(daemon.stop)
        options = b"OPTIONS /upload/a/b HTTP/1.1\r\nHost: x\r\n\r\n"

        def keep_alive() -> socket.socket:
            sock = daemon.raw_connect()
            sock.sendall(options)
            self.assertIn(b" 204 ", sock.recv(4096))
            return sock

        open_sockets = [keep_alive() for _ in range(3)]

        def close_all() -> None:
            for sock in open_sockets:
                sock.close()

        self.addCleanup(close_all)
        extra = daemon.raw_connect()
        answer = extra.recv(4096)
        extra.close()
        self.assertTrue(answer.startswith(b"HTTP/1.1 429 "), answer)
        open_sockets.pop().close()

        def slot_free() -> bool:
            try:
                open_sockets.append(keep_alive())
                return True
            except (AssertionError, OSError):
                return False

        self.assertTrue(wait_for(slot_free))
        while open_sockets:
            open_sockets.pop().close()

        # A byte every 0.2 s (well within ReadTimeout) for a while, then waiting.
        sock = daemon.raw_connect()
        try:
            for byte in b"PUT":
                sock.sendall(bytes([byte]))
                time.sleep(0.2)
            answer = sock.recv(4096)
        finally:
            sock.close()
        self.assertTrue(answer.startswith(b"HTTP/1.1 408 "), answer)


class IPv6DaemonTests(SynchronousTestCase):
    """The daemon listens on IPv6 loopback ("[::1]:port") too."""

    def test_upload_over_ipv6(self) -> None:
        """An upload and its download over [::1] work like over IPv4."""
        require_curl()
        try:
            probe = socket.socket(socket.AF_INET6)
            probe.bind(("::1", 0))
            port = probe.getsockname()[1]
            probe.close()
        except OSError:
            if in_ci():
                raise
            raise SkipTest("no IPv6 loopback here") from None

        class IPv6Daemon(Daemon):
            def listen_config(self) -> str:
                return f'ListenPort = "[::1]:{port}"\nNumCores = 1\n'

            def raw_connect(self) -> socket.socket:
                sock = socket.create_connection(("::1", port), timeout=5)
                sock.settimeout(5)
                return sock

        daemon = IPv6Daemon()
        self.addCleanup(daemon.stop)
        slot = f"{uuid.uuid4()}/six.txt"
        url = f"http://[::1]:{port}/upload/{slot}"
        put = daemon.curl("-g", "-X", "PUT", "--data-binary", "over six", "-o", "/dev/null",
                          "-w", "%{http_code}", f"{url}?v={v1_mac(slot, 8)}")
        self.assertEqual(put.stdout, b"201")
        self.assertEqual(daemon.curl("-g", url).stdout, b"over six")
