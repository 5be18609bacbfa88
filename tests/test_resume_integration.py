"""
SLOW SUITE: resumable uploads against the real daemon (``twistd -n hmacfs``):
the README's curl walk-through, kill -9 of the daemon in the middle of a
100 MiB upload (20 times in a row, embedded state; 5 times with Redis), Redis
stopped and restarted during an upload, two daemons sharing a store and a
Redis, worker processes, the real ``tuspy`` client, and the abandoned-upload
sweep.  Every run ends with a byte-identical file and no partial file left.
"""

from __future__ import annotations

import hashlib
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from twisted.trial.unittest import SkipTest, SynchronousTestCase

from hmacfs.client import upload_file
from hmacfs.signing.auth import sign_slot
from hmacfs.testing import SECRET, free_port, in_ci, wait_for
from tests.redis_server import RedisServer
from tests.test_integration import Daemon, die_with_parent, require_curl

MiB = 1024 * 1024
#: Stores go to tmpfs when there is one: the fault tests write a lot.
SCRATCH = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None


class StoreDaemon(Daemon):
    """
    A daemon on a store it does not own (several daemons, or one restarted
    after kill -9, share it), with its own config, port and logs.
    """

    def __init__(self, workdir: Path, store: Path, name: str, *, extra: str = "") -> None:
        self.dir = workdir / name
        self.dir.mkdir(exist_ok=True)
        self.store = store
        self.unix = False
        self.port = free_port()
        self.config = self.dir / "config.toml"
        settings = extra
        if "NumCores" not in settings:
            settings += "NumCores = 1\n"
        self.config.write_text(
            self.listen_config()
            + f'Secret = "{SECRET.decode()}"\nStoreDir = "{store}"\n'
            + 'UploadSubDir = "upload"\nLogLevel = "info"\n'
            + f'LogFile = "{self.dir / "hmacfs.log"}"\n'
            + 'MaxUploadSize = "250MiB"\nMinFreeBytes = 0\nEnableGetRetries = false\n'
            + settings
        )
        self.output = open(self.dir / "twistd.out", "ab")
        self.launch()

    def launch(self) -> None:
        self.process = subprocess.Popen(
            self.command(),
            cwd=self.cwd,
            stdout=self.output,
            stderr=subprocess.STDOUT,
            preexec_fn=die_with_parent,
        )
        self.wait_listening()

    def kill9(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(10)

    def restart(self) -> None:
        """A fresh process on the same port, config and store."""
        if self.process.poll() is None:
            self.kill9()
        self.launch()

    def stop(self) -> int:
        """The store is shared: only the process goes."""
        return self.terminate()

    def log(self) -> str:
        path = self.dir / "hmacfs.log"
        return path.read_text(errors="replace") if path.exists() else ""


def http(sock_factory: Any, raw: bytes, body: bytes = b"") -> tuple[int, dict[str, str], bytes]:
    """One request on a fresh connection; the status, headers and body of the answer."""
    sock = sock_factory()
    try:
        sock.sendall(raw + body)
        data = b""
        while b"\r\n\r\n" not in data:
            more = sock.recv(65536)
            if not more:
                break
            data += more
        head, _, rest = data.partition(b"\r\n\r\n")
        while head.startswith(b"HTTP/1.1 100"):
            head, _, rest = rest.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
        length = int(headers.get("content-length", "0") or 0)
        answer = bytearray(rest)
        if not raw.startswith(b"HEAD"):
            while len(answer) < length:
                more = sock.recv(1024 * 1024)
                if not more:
                    break
                answer += more
        return int(lines[0].split()[1]), headers, bytes(answer)
    finally:
        sock.close()


class Upload:
    """One signed upload and the raw requests of the session-token protocol."""

    def __init__(self, daemon: StoreDaemon, name: str, data: bytes, token: str = "fault-test-token-1") -> None:
        self.name = name
        self.data = data
        self.token = token
        slot = sign_slot(
            base_url="http://127.0.0.1/upload", path=f"it/{name}", size=len(data), secret=SECRET
        )
        self.target = slot.put_url[len("http://127.0.0.1") :]
        self.get_path = slot.get_url[len("http://127.0.0.1") :]
        self.daemon = daemon

    def head(self, daemon: StoreDaemon | None = None) -> tuple[int, dict[str, str]]:
        daemon = daemon or self.daemon
        raw = (
            f"HEAD {self.target} HTTP/1.1\r\nHost: x\r\nX-Session-Token: {self.token}\r\n"
            "Connection: close\r\n\r\n"
        ).encode()
        status, headers, _ = http(daemon.raw_connect, raw)
        return status, headers

    def offset(self, daemon: StoreDaemon | None = None) -> int:
        status, headers = self.head(daemon)
        if status == 404:
            return 0
        assert status == 200, (status, headers)
        return int(headers["upload-offset"])

    def put_head(self, offset: int) -> bytes:
        size = len(self.data)
        lines = [
            f"PUT {self.target} HTTP/1.1",
            "Host: x",
            f"Content-Length: {size - offset}",
            f"X-Session-Token: {self.token}",
        ]
        if offset:
            lines.append(f"Content-Range: bytes {offset}-{size - 1}/{size}")
        return ("\r\n".join(lines) + "\r\n\r\n").encode()

    def open_put(self, offset: int, daemon: StoreDaemon | None = None) -> socket.socket:
        """A PUT from ``offset`` whose body the caller sends (or not)."""
        sock = (daemon or self.daemon).raw_connect()
        sock.settimeout(30)
        sock.sendall(self.put_head(offset))
        return sock

    def finish(self, offset: int, daemon: StoreDaemon | None = None) -> int:
        raw = self.put_head(offset)
        status, _headers, _ = http((daemon or self.daemon).raw_connect, raw, self.data[offset:])
        return status

    def stored(self, daemon: StoreDaemon | None = None) -> bytes:
        daemon = daemon or self.daemon
        status, _headers, body = http(
            daemon.raw_connect,
            f"GET {self.get_path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode(),
        )
        assert status == 200, status
        return body


def send_some(sock: socket.socket, data: bytes) -> None:
    try:
        sock.sendall(data)
    except OSError:
        pass  # the daemon may already be dead


class ResumeSuite(SynchronousTestCase):
    """A scratch directory with one shared store; daemons are stopped at cleanup."""

    def setUp(self) -> None:
        self.work = Path(tempfile.mkdtemp(prefix="hmacfs-resume-", dir=SCRATCH))
        self.addCleanup(shutil.rmtree, self.work, True)
        self.store = self.work / "store"
        self.store.mkdir()

    def daemon(self, name: str = "a", extra: str = "") -> StoreDaemon:
        daemon = StoreDaemon(self.work, self.store, name, extra=extra)
        self.addCleanup(daemon.stop)
        return daemon

    def redis(self) -> RedisServer:
        server = RedisServer().start()
        self.addCleanup(server.cleanup)
        return server

    def partials(self) -> list[str]:
        return sorted(os.listdir(self.store / ".hmacfs" / "partial"))

    def assertStored(self, upload: Upload, daemon: StoreDaemon | None = None) -> None:
        body = upload.stored(daemon)
        self.assertEqual(hashlib.sha256(body).hexdigest(), hashlib.sha256(upload.data).hexdigest())
        self.assertEqual(self.partials(), [])


class CurlWalkthroughTests(ResumeSuite):
    def test_readme_walkthrough(self) -> None:
        """The README's curl walk-through: start, kill curl part-way, HEAD, resume with Content-Range."""
        curl = require_curl()
        daemon = self.daemon()
        source = self.work / "photo.jpg"
        data = os.urandom(24 * MiB)
        source.write_bytes(data)
        size = len(data)
        slot = sign_slot(
            base_url=f"http://127.0.0.1:{daemon.port}/upload", path="walk/photo.jpg", size=size,
            secret=SECRET, scheme="v2", content_type="image/jpeg",
        )
        token = "my-upload-1234"
        common = [curl, "-sS", "-H", f"X-Session-Token: {token}", "-H", "Content-Type: image/jpeg"]
        first = subprocess.run(
            [*common, "--limit-rate", "16M", "--max-time", "0.6", "-T", str(source), slot.put_url],
            capture_output=True,
        )
        self.assertEqual(first.returncode, 28)  # curl's "operation timed out": the kill
        head = subprocess.run(
            [curl, "-sS", "-I", "-H", f"X-Session-Token: {token}", slot.put_url], capture_output=True, check=True
        ).stdout.decode()
        match = re.search(r"Upload-Offset: (\d+)", head)
        assert match is not None, head
        offset = int(match.group(1))
        self.assertTrue(0 < offset < size, offset)
        self.assertIn(f"Range: bytes=0-{offset - 1}", head)
        self.assertIn(f"Upload-Length: {size}", head)
        rest = self.work / "rest.bin"
        rest.write_bytes(data[offset:])
        second = subprocess.run(
            [*common, "-H", f"Content-Range: bytes {offset}-{size - 1}/{size}", "-T", str(rest),
             "-o", "/dev/null", "-w", "%{http_code}", slot.put_url],
            capture_output=True, check=True,
        )
        self.assertEqual(second.stdout, b"201")
        self.assertEqual((self.store / "walk" / "photo.jpg").read_bytes(), data)
        self.assertEqual(self.partials(), [])


class KillNineTests(ResumeSuite):
    """The daemon dies (SIGKILL) at a random point of a 100 MiB upload, again and again."""

    def run_kills(self, daemon: StoreDaemon, kills: int, seed: int) -> list[int]:
        rng = random.Random(seed)
        upload = Upload(daemon, f"big-{seed}.bin", rng.randbytes(100 * MiB))
        offsets = []
        offset = 0
        for _ in range(kills):
            remaining = len(upload.data) - offset
            cut = offset + rng.randint(1, max(1, remaining // 3))
            sock = upload.open_put(offset)
            send_some(sock, upload.data[offset:cut])
            time.sleep(rng.random() * 0.05)
            daemon.kill9()
            sock.close()
            daemon.restart()
            new = upload.offset()
            self.assertGreaterEqual(new, offset)  # bytes on disk are never lost
            self.assertLessEqual(new, cut)
            offsets.append(new)
            offset = new
        self.assertEqual(upload.finish(offset), 201)
        self.assertStored(upload)
        return offsets

    def test_twenty_kills_embedded(self) -> None:
        """20 kill -9 in a row, embedded state: every resume continues from the bytes on disk."""
        offsets = self.run_kills(self.daemon(), 20, seed=20)
        self.assertGreater(offsets[-1], 0)

    def test_kills_with_redis(self) -> None:
        """
        20 kill -9 with Redis: the dead process's Redis lock does not block the restarted one
        (same host, file lock free), so every resume goes through at once.
        """
        redis = self.redis()
        daemon = self.daemon(extra=f'RedisAddr = "{redis.addr}"\n')
        self.run_kills(daemon, 20, seed=5)
        # The lock is released when the upload ends; the DEL may reach Redis a
        # moment after the 201 reached the client.
        wait_for(lambda: redis.command("KEYS", "hmacfs:lock:*") == b"*0", 5)
        self.assertEqual(redis.command("KEYS", "hmacfs:lock:*"), b"*0")


class RedisFaultTests(ResumeSuite):
    def test_redis_stops_and_returns_mid_upload(self) -> None:
        """
        Redis stopped in the middle of an upload, then started again: the upload finishes
        (never a 500), one outage is logged, Redis is used again afterwards.
        """
        redis = self.redis()
        daemon = self.daemon(extra=f'RedisAddr = "{redis.addr}"\nRetryDelay = "200ms"\n')
        upload = Upload(daemon, "outage.bin", os.urandom(40 * MiB))
        sock = upload.open_put(0)
        sock.sendall(upload.data[: 10 * MiB])
        # Progress is checkpointed every 8 MiB (after an fdatasync on the disk thread).
        wait_for(lambda: redis.command("EXISTS", "upload_progress:" + upload.token) == b":1", 5)
        self.assertEqual(redis.command("EXISTS", "upload_progress:" + upload.token), b":1")
        redis.stop()
        sock.sendall(upload.data[10 * MiB : 25 * MiB])
        # An upload that starts while Redis is away works too.
        other = Upload(daemon, "during.bin", os.urandom(MiB), token="during-outage-1")
        self.assertEqual(other.finish(0), 201)
        redis.start()
        deadline = time.monotonic() + 10
        while "reachable again" not in daemon.log() and time.monotonic() < deadline:
            time.sleep(0.1)
        sock.sendall(upload.data[25 * MiB :])
        answer = sock.recv(4096)
        sock.close()
        self.assertIn(b" 201 ", answer.split(b"\r\n")[0])
        self.assertStored(upload)
        self.assertStored(other)
        log = daemon.log()
        self.assertEqual(log.count("unreachable ("), 1, log[-3000:])
        self.assertIn("reachable again", log)
        self.assertNotIn('" 500 ', log)
        # Redis is in use again: a new interrupted upload records its progress there.
        third = Upload(daemon, "after.bin", os.urandom(4 * MiB), token="after-outage-1")
        sock = third.open_put(0)
        sock.sendall(third.data[: 2 * MiB])
        time.sleep(0.3)
        sock.close()
        deadline = time.monotonic() + 5
        while redis.command("GET", "upload_progress:after-outage-1") == b"" and time.monotonic() < deadline:
            time.sleep(0.05)
        self.assertEqual(int(redis.command("GET", "upload_progress:after-outage-1")), third.offset())


class TwoNodeTests(ResumeSuite):
    def test_start_on_one_node_resume_on_the_other(self) -> None:
        """Two daemons (two ports) on one store and one Redis: interrupted on A, finished on B."""
        redis = self.redis()
        extra = f'RedisAddr = "{redis.addr}"\n'
        a, b = self.daemon("a", extra), self.daemon("b", extra)
        upload = Upload(a, "nodes.bin", os.urandom(30 * MiB))
        sock = upload.open_put(0)
        sock.sendall(upload.data[: 12 * MiB])
        time.sleep(0.3)
        sock.close()
        # A notices the disconnect, writes what it has and lets go of the upload.
        wait_for(lambda: upload.offset(b) > 0, 10)
        offset = upload.offset(b)
        self.assertGreater(offset, 0)
        self.assertEqual(upload.finish(offset, b), 201)
        self.assertStored(upload, a)

    def test_one_writer_across_nodes(self) -> None:
        """
        While A writes an upload, B refuses a second writer: a plain PUT gets 409, a resume
        gets 409 + Retry-After and A lets go of its (stale) connection, so the retry works.
        """
        redis = self.redis()
        extra = f'RedisAddr = "{redis.addr}"\n'
        a, b = self.daemon("a", extra), self.daemon("b", extra)
        upload = Upload(a, "busy.bin", os.urandom(8 * MiB))
        stale = upload.open_put(0)
        stale.sendall(upload.data[: 3 * MiB])
        time.sleep(0.3)
        plain = Upload(b, "busy.bin", upload.data, token="another-client-9")
        self.assertEqual(plain.finish(0), 409)
        offset = upload.offset(b)
        status, headers, _ = http(b.raw_connect, upload.put_head(offset), upload.data[offset:])
        self.assertEqual(status, 409)
        self.assertIn("retry-after", headers)
        time.sleep(float(headers["retry-after"]) + 0.5)
        # A closes its stale connection within about a second of the request; on a
        # loaded machine the retry may still meet the lock: retry like a client does.
        deadline = time.monotonic() + 10
        while True:
            offset = upload.offset(b)
            status = upload.finish(offset, b)
            if status != 409 or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        self.assertEqual(status, 201)
        stale.close()
        self.assertStored(upload, a)


class WorkerTests(ResumeSuite):
    def test_client_takes_over_across_workers(self) -> None:
        """
        With two worker processes, a stale connection on one and the client coming back
        (hmacfs.client with the same token) on either: it takes over and finishes.
        """
        daemon = self.daemon(extra="NumCores = 2\n")
        upload = Upload(daemon, "workers.bin", os.urandom(12 * MiB), token="worker-client-1")
        stale = upload.open_put(0)
        stale.sendall(upload.data[: 5 * MiB])
        time.sleep(0.3)
        source = self.work / "workers.bin"
        source.write_bytes(upload.data)
        result = upload_file(
            f"http://127.0.0.1:{daemon.port}{upload.target}", source, token=upload.token,
            retries=8, retry_delay=0.2,
        )
        stale.close()
        self.assertEqual(result.status, 201)
        self.assertGreaterEqual(result.resumes, 1)
        self.assertStored(upload)


class TuspyTests(ResumeSuite):
    def test_tuspy_interrupted_and_resumed(self) -> None:
        """
        The real tuspy client: 50 MiB in 5 MiB chunks, stopped part-way, the daemon killed
        and restarted, then a new client object resumes from the URL it stored; GET returns
        the same SHA-256.
        """
        try:
            from tusclient import client as tus_client
            from tusclient.storage.filestorage import FileStorage
        except ImportError:
            if in_ci():
                raise AssertionError("tuspy is a test dependency (pip install -e '.[test]')") from None
            raise SkipTest("tuspy not installed") from None
        daemon = self.daemon()
        data = os.urandom(50 * MiB)
        source = self.work / "tus.bin"
        source.write_bytes(data)
        slot = sign_slot(
            base_url=f"http://127.0.0.1:{daemon.port}/upload", path="tus/file.bin", size=len(data),
            secret=SECRET,
        )
        urls = str(self.work / "tus-urls.json")
        first = tus_client.TusClient(slot.put_url).uploader(
            str(source), chunk_size=5 * MiB, store_url=True, url_storage=FileStorage(urls),
            upload_checksum=True,
        )
        first.upload(stop_at=23 * MiB)
        self.assertEqual(first.offset, 23 * MiB)
        daemon.kill9()
        daemon.restart()
        second = tus_client.TusClient(slot.put_url).uploader(
            str(source), chunk_size=5 * MiB, store_url=True, url_storage=FileStorage(urls),
        )
        self.assertEqual(second.url, first.url)
        self.assertEqual(second.offset, 23 * MiB)
        second.upload()
        status, _headers, body = http(
            daemon.raw_connect, b"GET /upload/tus/file.bin HTTP/1.1\r\nHost: x\r\n\r\n"
        )
        self.assertEqual(status, 200)
        self.assertEqual(hashlib.sha256(body).hexdigest(), hashlib.sha256(data).hexdigest())
        self.assertEqual(self.partials(), [])


class SweepTests(ResumeSuite):
    def test_abandoned_upload_removed_after_ttl(self) -> None:
        """An interrupted upload nobody comes back for is removed after ResumeTTL, and counted."""
        daemon = self.daemon(extra='ResumeTTL = "2s"\n')
        upload = Upload(daemon, "abandoned.bin", os.urandom(3 * MiB))
        sock = upload.open_put(0)
        sock.sendall(upload.data[:MiB])
        time.sleep(0.3)
        sock.close()
        time.sleep(0.3)
        self.assertEqual(len(self.partials()), 2)
        deadline = time.monotonic() + 10
        while self.partials() and time.monotonic() < deadline:
            time.sleep(0.2)
        self.assertEqual(self.partials(), [])
        self.assertIn("removed 1 abandoned partial uploads", daemon.log())
        self.assertEqual(upload.offset(), 0)
