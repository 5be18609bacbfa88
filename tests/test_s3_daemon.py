"""
SLOW SUITE: the real daemon (``twistd -n hmacfs``) with ``StorageBackend = "s3"`` against a
real S3 (Swift with s3api on 127.0.0.1, tests/s3_server.py), driven by real clients (curl,
raw sockets, tuspy): one node; two nodes with their own StoreDirs, one bucket and one
redis-server; S3 stopped before and during an upload; retention on the bucket.

What the bucket holds is read with the same botocore-built requests as the start-up check
(``S3Protocol`` + plain http.client), from the test process, never through the daemon.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import quote

from twisted.trial.unittest import SkipTest, SynchronousTestCase

from hmacfs.signing.auth import sign_slot
from hmacfs.state.store import LOCK_TTL
from hmacfs.storage.s3.protocol import ParsedResponse, S3Protocol
from hmacfs.storage.s3.startup import _exchange
from hmacfs.testing import SECRET, free_port, in_ci, v1_mac, wait_for
from tests.redis_server import RedisServer
from tests.s3_server import SCRIPT, S3Server, shared_s3
from tests.test_integration import ROOT, TWISTD, make_file, require_curl, sha256_file, status_of
from tests.test_resume_integration import StoreDaemon, Upload, http, send_some
from tests.test_s3_client import settings_for

MiB = 1024 * 1024
PART = 5 * MiB


class Bucket:
    """One bucket, inspected from the test process (blocking, bounded by a timeout)."""

    def __init__(self, server: S3Server, name: str | None = None) -> None:
        self.server = server
        self.name = name or f"d{uuid.uuid4().hex[:20]}"
        self.settings = settings_for(server, self.name)
        self.protocol = S3Protocol(self.settings)

    def call(self, operation: str, **params: Any) -> ParsedResponse:
        return _exchange(self.protocol, self.settings, operation, params, 30.0)

    def create(self) -> Bucket:
        self.call("CreateBucket")
        return self

    def keys(self, prefix: str = "") -> list[str]:
        """Every key (paged), ``.hmacfs/`` ones included."""
        keys: list[str] = []
        token: str | None = None
        for _ in range(100):
            params: dict[str, Any] = {"Prefix": prefix}
            if token:
                params["ContinuationToken"] = token
            data = self.call("ListObjectsV2", **params).data
            keys += [item["Key"] for item in data.get("Contents", [])]
            token = data.get("NextContinuationToken")
            if not token:
                break
        return sorted(keys)

    def uploads(self) -> list[str]:
        """The keys of the multipart uploads in progress."""
        data = self.call("ListMultipartUploads").data
        return sorted(item["Key"] for item in data.get("Uploads", []))

    def etag(self, key: str) -> str:
        return str(self.call("HeadObject", Key=key).data["ETag"])

    def get(self, key: str) -> bytes:
        """An object's bytes, by a presigned URL (botocore's parser wants text bodies)."""
        url = self.protocol.presign("GetObject", {"Key": key}, 60)
        with urllib.request.urlopen(url, timeout=30) as response:
            return bytes(response.read())

    def config(self, **extra: str) -> str:
        """The daemon's S3 keys for this bucket (``extra``: more keys, TOML values)."""
        values = {
            "StorageBackend": '"s3"',
            "S3Endpoint": f'"{self.server.endpoint}"',
            "S3Region": f'"{self.server.region}"',
            "S3Bucket": f'"{self.name}"',
            "S3AccessKey": f'"{self.server.access_key}"',
            "S3SecretKey": f'"{self.server.secret_key}"',
            "S3AddressingStyle": '"path"',
            "S3PartSize": '"5MiB"',
            **extra,
        }
        return "".join(f"{key} = {value}\n" for key, value in values.items())


class S3Node(StoreDaemon):
    """A daemon on the S3 backend with a StoreDir of its own (nodes share no filesystem)."""

    def __init__(self, workdir: Path, name: str, bucket: Bucket, extra: str = "") -> None:
        store = workdir / f"store-{name}"
        store.mkdir(exist_ok=True)
        super().__init__(workdir, store, name, extra=bucket.config() + extra)



class S3DaemonCase(SynchronousTestCase):
    """A scratch directory, a fresh bucket on the shared Swift, daemons stopped at cleanup."""

    def setUp(self) -> None:
        require_curl()
        self.server = shared_s3()
        self.work = Path(tempfile.mkdtemp(prefix="hmacfs-s3d-"))
        self.addCleanup(shutil.rmtree, self.work, True)
        self.bucket = Bucket(self.server).create()

    def node(self, name: str, extra: str = "", bucket: Bucket | None = None) -> S3Node:
        daemon = S3Node(self.work, name, bucket or self.bucket, extra)
        self.addCleanup(daemon.stop)
        return daemon

    def redis(self) -> RedisServer:
        server = RedisServer().start()
        self.addCleanup(server.cleanup)
        return server

    def assertNothingLeft(self, bucket: Bucket | None = None) -> None:
        """No object (``.hmacfs/`` included) and no multipart upload in the bucket."""
        bucket = bucket or self.bucket
        self.assertEqual(bucket.keys(), [])
        self.assertEqual(bucket.uploads(), [])

    def assertStored(self, upload: Upload, daemon: StoreDaemon) -> None:
        """The file comes back byte-identical and nothing of its upload is left."""
        body = upload.stored(daemon)
        self.assertEqual(hashlib.sha256(body).hexdigest(), hashlib.sha256(upload.data).hexdigest())
        self.assertEqual(self.bucket.keys(".hmacfs/"), [])
        self.assertEqual(self.bucket.uploads(), [])


def settled_offset(upload: Upload, daemon: StoreDaemon, timeout: float = 20.0) -> int:
    """The Upload-Offset ``daemon`` reports once it stops changing (the writer let go)."""
    seen: list[int | None] = [None]

    def same() -> bool:
        before, seen[0] = seen[0], upload.offset(daemon)
        return seen[0] == before

    wait_for(same, timeout, interval=0.3)
    assert seen[0] is not None
    return seen[0]


def finish_with_retries(upload: Upload, daemon: StoreDaemon, timeout: float = 30.0) -> int:
    """HEAD for the offset and PUT the rest, again after a 409 + Retry-After (the dead
    writer's lock), within ``timeout``; the last status."""
    deadline = time.monotonic() + timeout
    while True:
        offset = upload.offset(daemon)
        status, headers = put_rest(upload, daemon, offset)
        if status not in (409, 503) or "retry-after" not in headers or time.monotonic() > deadline:
            return status
        time.sleep(min(float(headers["retry-after"]), 2.0))


def put_rest(upload: Upload, daemon: StoreDaemon, offset: int) -> tuple[int, dict[str, str]]:
    """PUT from ``offset`` with Expect: 100-continue, the body only after the 100 (a refusal
    comes before it, so the body is not sent into a closed connection); status, headers."""
    head = upload.put_head(offset)[:-2] + b"Expect: 100-continue\r\n\r\n"
    sock = daemon.raw_connect()
    sock.settimeout(60)
    try:
        sock.sendall(head)
        data = b""
        while b"\r\n\r\n" not in data:
            more = sock.recv(65536)
            if not more:
                break
            data += more
        if data.startswith(b"HTTP/1.1 100 "):
            sock.sendall(upload.data[offset:])
            data = data.partition(b"\r\n\r\n")[2]
            while b"\r\n\r\n" not in data:
                more = sock.recv(65536)
                if not more:
                    break
                data += more
        lines = data.partition(b"\r\n\r\n")[0].decode("latin-1").split("\r\n")
        headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
        return int(lines[0].split()[1]), headers
    finally:
        sock.close()


class SingleNodeTests(S3DaemonCase):
    """One node on one bucket, driven with curl."""

    def setUp(self) -> None:
        super().setUp()
        self.daemon = self.node("a")

    def put(self, source: Path, slot: str, *args: str) -> int:
        size = source.stat().st_size
        url = f"{self.daemon.base()}/{quote(slot)}?v={v1_mac(slot, size)}"
        result = self.daemon.curl("-T", str(source), *args, "-o", "/dev/null", "-w", "%{http_code}\n", url)
        self.assertEqual(result.returncode, 0, result.stderr)
        return status_of(result)

    def roundtrip(self, size: int) -> tuple[Path, str]:
        source = make_file(self.work, size)
        slot = f"{uuid.uuid4()}/{source.name}"
        self.assertEqual(self.put(source, slot), 201)
        out = self.work / "out.bin"
        got = self.daemon.curl("-o", str(out), "-w", "%{http_code}\n", f"{self.daemon.base()}/{quote(slot)}")
        self.assertEqual(status_of(got), 200, got.stderr)
        self.assertEqual(sha256_file(out), sha256_file(source))
        self.assertEqual(self.bucket.keys(), [slot])
        self.assertEqual(self.bucket.uploads(), [])
        return source, slot

    def test_one_byte(self) -> None:
        """
        A 1-byte PUT comes back identical; sent in one packet with its headers (the body in
        hand) it is one PutObject (a plain MD5 ETag, no multipart upload).
        """
        self.roundtrip(1)
        slot = f"{uuid.uuid4()}/one.bin"
        raw = (
            f"PUT /upload/{slot}?v={v1_mac(slot, 1)} HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\n"
            "Connection: close\r\n\r\nz"
        ).encode()
        self.assertEqual(http(self.daemon.raw_connect, raw)[0], 201)
        self.assertEqual(self.bucket.etag(slot), f'"{hashlib.md5(b"z").hexdigest()}"')
        self.assertEqual(self.bucket.get(slot), b"z")

    def test_three_mib_range_and_head(self) -> None:
        """
        3 MiB with curl (one PutObject): back identical; a Range GET is 206 with those bytes; HEAD has
        the length and the type and no body.
        """
        source, slot = self.roundtrip(3 * MiB)
        data = source.read_bytes()
        # up to S3PartSize and whole in one request: one PutObject (its ETag a plain MD5)
        self.assertEqual(self.bucket.etag(slot), f'"{hashlib.md5(data).hexdigest()}"')
        url = f"{self.daemon.base()}/{quote(slot)}"
        part = self.daemon.curl("-r", "1000000-2000099", "-D", "-", "-o", str(self.work / "r"), url)
        self.assertIn(" 206 ", part.stdout.decode().splitlines()[0])
        self.assertIn(f"Content-Range: bytes 1000000-2000099/{len(data)}", part.stdout.decode())
        self.assertEqual((self.work / "r").read_bytes(), data[1000000:2000100])
        tail = self.daemon.curl("-H", "Range: bytes=-10", url)
        self.assertEqual(tail.stdout, data[-10:])
        status, headers, body = http(
            self.daemon.raw_connect,
            f"HEAD /upload/{quote(slot)} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode(),
        )
        self.assertEqual(status, 200)
        self.assertEqual(headers["content-length"], str(len(data)))
        self.assertEqual(headers["content-type"], "application/octet-stream")
        self.assertEqual(body, b"")
        bad = self.daemon.curl("-i", "-H", f"Range: bytes={len(data)}-", url).stdout.decode()
        self.assertIn(" 416 ", bad.splitlines()[0])

    def test_two_hundred_mib_multipart(self) -> None:
        """200 MiB (40 parts of 5 MiB, cut from the stream) streams up and back identical."""
        _source, slot = self.roundtrip(200 * MiB)
        self.assertTrue(self.bucket.etag(slot).endswith('-40"'), self.bucket.etag(slot))

    def test_content_type_and_head(self) -> None:
        """A v2 slot's type is the object's; HEAD answers it, inline for an image, no body."""
        body = self.work / "pic.png"
        body.write_bytes(b"\x89PNG fake" * 10)
        slot = sign_slot(
            base_url=self.daemon.base(), path=f"{uuid.uuid4()}/pic.png", size=90,
            secret=SECRET, scheme="v2", content_type="image/png",
        )
        ok = self.daemon.curl(
            "-T", str(body), "-H", "Content-Type: image/png", "-o", "/dev/null",
            "-w", "%{http_code}\n", slot.put_url,
        )
        self.assertEqual(status_of(ok), 201)
        head = self.daemon.curl("-I", slot.get_url).stdout.decode()
        self.assertIn(" 200 ", head.splitlines()[0])
        self.assertIn("Content-Type: image/png", head)
        self.assertIn("Content-Length: 90", head)
        self.assertIn("X-Content-Type-Options: nosniff", head)
        self.assertNotIn("attachment", head)

    def test_second_put_409(self) -> None:
        """The same slot twice: 201, then 409, and the first bytes stay."""
        source = make_file(self.work, 1000)
        slot = f"{uuid.uuid4()}/twice.bin"
        self.assertEqual(self.put(source, slot), 201)
        other = self.work / "other.bin"
        other.write_bytes(b"\0" * 1000)
        self.assertEqual(self.put(other, slot), 409)
        self.assertEqual(self.bucket.get(slot), source.read_bytes())
        self.assertEqual(self.bucket.keys(), [slot])
        self.assertEqual(self.bucket.uploads(), [])

    def test_second_resumable_put_409(self) -> None:
        """The same slot twice with X-Session-Token (a multipart upload): 409, nothing left."""
        data = os.urandom(6 * MiB)
        first = Upload(self.daemon, f"{uuid.uuid4().hex}.bin", data, token="first-token-1")
        self.assertEqual(first.finish(0), 201)
        second = Upload(self.daemon, first.name, os.urandom(6 * MiB), token="second-token-2")
        self.assertEqual(second.finish(0), 409)
        self.assertEqual(first.stored(), data)
        self.assertEqual(self.bucket.keys(), [f"it/{first.name}"])
        self.assertEqual(self.bucket.uploads(), [])

    def test_too_large_413_leaves_nothing(self) -> None:
        """Over MaxUploadSize: 413 before the body (no 100 Continue), nothing in the bucket."""
        slot = f"{uuid.uuid4()}/big.bin"
        size = 300 * MiB
        for token in ("", "X-Session-Token: big-token-1\r\n"):
            sock = self.daemon.raw_connect()
            try:
                sock.sendall(
                    f"PUT /upload/{slot}?v={v1_mac(slot, size)} HTTP/1.1\r\nHost: x\r\n{token}"
                    f"Content-Length: {size}\r\nExpect: 100-continue\r\n\r\n".encode()
                )
                sock.settimeout(5)
                answer = sock.recv(4096)
            finally:
                sock.close()
            self.assertTrue(answer.startswith(b"HTTP/1.1 413 "), answer)
        self.assertNothingLeft()

    def test_bad_mac_403_leaves_nothing(self) -> None:
        """A tampered MAC: 403 "bad MAC", nothing in the bucket (plain and resumable PUT)."""
        source = make_file(self.work, 6 * MiB)
        slot = f"{uuid.uuid4()}/t.bin"
        mac = v1_mac(slot, 6 * MiB)
        mac = ("0" if mac[0] != "0" else "1") + mac[1:]
        url = f"{self.daemon.base()}/{slot}?v={mac}"
        for args in ([], ["-H", "X-Session-Token: bad-mac-token-1"]):
            result = self.daemon.curl("-T", str(source), *args, "-w", "\n%{http_code}\n", url)
            self.assertEqual(status_of(result), 403)
            self.assertIn(b"bad MAC", result.stdout)
        self.assertNothingLeft()


class RedirectTests(S3DaemonCase):
    """S3RedirectDownloads = true: the GET is a 302 to a presigned URL that curl -L follows."""

    def test_redirect_followed_by_curl(self) -> None:
        """
        302 (no body, no-store) to the bucket's presigned URL; curl -L gets the bytes with the
        type and the disposition hmacfs's rules give: an image inline, HTML as an attachment.
        """
        daemon = self.node("a", "S3RedirectDownloads = true\n")
        cases = [
            ("pic.png", "image/png", b"\x89PNG fake" * 100, "inline"),
            ("page.html", "text/html", b"<script>alert(1)</script>", "attachment; filename*=UTF-8''page.html"),
        ]
        for name, content_type, data, disposition in cases:
            slot = sign_slot(
                base_url=daemon.base(), path=f"{uuid.uuid4()}/{name}", size=len(data),
                secret=SECRET, scheme="v2", content_type=content_type,
            )
            source = self.work / name
            source.write_bytes(data)
            put = daemon.curl(
                "-T", str(source), "-H", f"Content-Type: {content_type}", "-o", "/dev/null",
                "-w", "%{http_code}\n", slot.put_url,
            )
            self.assertEqual(status_of(put), 201)
            first = daemon.curl("-i", slot.get_url).stdout.decode("latin-1")
            head, _, body = first.partition("\r\n\r\n")
            self.assertIn(" 302 ", head.splitlines()[0])
            self.assertEqual(body, "")
            location = next(
                line.split(":", 1)[1].strip() for line in head.splitlines()
                if line.lower().startswith("location:")
            )
            self.assertTrue(location.startswith(self.server.endpoint + "/"), location)
            self.assertIn("response-content-disposition", location)
            self.assertIn("Cache-Control: no-store", head)
            self.assertIn("Access-Control-Allow-Origin: *", head)
            out = self.work / "got"
            followed = daemon.curl(
                "-L", "-D", str(self.work / "headers"), "-o", str(out), "-w", "%{http_code}\n", slot.get_url
            )
            self.assertEqual(status_of(followed), 200, followed.stderr)
            self.assertEqual(out.read_bytes(), data)
            # the last response's headers: the bucket's, shaped by the presigned query
            dumped = (self.work / "headers").read_text("latin-1")
            self.assertEqual(dumped.count("HTTP/1.1 "), 2, dumped)
            final = dumped[dumped.rindex("HTTP/1.1 ") :]
            lowered = {
                k.strip().lower(): v.strip()
                for k, _, v in (line.partition(":") for line in final.splitlines()[1:])
            }
            self.assertEqual(lowered["content-type"], content_type)
            self.assertEqual(lowered["content-disposition"], disposition)
        # HEAD still answers from hmacfs (no redirect)
        head = daemon.curl("-I", slot.get_url).stdout.decode()
        self.assertIn(" 200 ", head.splitlines()[0])
        self.assertIn(f"Content-Length: {len(data)}", head)


class StartupTests(S3DaemonCase):
    """A bucket that does not answer: twistd exits non-zero before listening, naming the key."""

    def start_fails(self, bucket: Bucket, **changes: str) -> str:
        directory = self.work / uuid.uuid4().hex[:8]
        directory.mkdir()
        port = free_port()
        config = directory / "config.toml"
        config.write_text(
            f'ListenPort = "127.0.0.1:{port}"\nSecret = "{SECRET.decode()}"\n'
            f'StoreDir = "{directory}"\nMinFreeBytes = 0\nNumCores = 1\n' + bucket.config(**changes)
        )
        result = subprocess.run(
            [TWISTD, "--nodaemon", "--pidfile=", "hmacfs", "--config", str(config)],
            capture_output=True, timeout=60, cwd=ROOT,
        )
        output = (result.stdout + result.stderr).decode(errors="replace")
        self.assertNotEqual(result.returncode, 0, output)
        self.assertNotIn("starting on", output)
        return output

    def test_missing_bucket(self) -> None:
        """S3Bucket names a bucket that does not exist: the error names S3Bucket and the bucket."""
        missing = Bucket(self.server, "no-such-bucket-" + uuid.uuid4().hex[:8])
        output = self.start_fails(missing)
        self.assertIn("S3Bucket", output)
        self.assertIn(missing.name, output)

    def test_wrong_secret(self) -> None:
        """A wrong secret: the error names S3AccessKey and never shows the secret."""
        output = self.start_fails(self.bucket, S3SecretKey='"not-the-secret-xyz"')
        self.assertIn("S3AccessKey", output)
        self.assertNotIn("not-the-secret-xyz", output)


class TwoNodeTests(S3DaemonCase):
    """Two daemons, their own StoreDirs, one bucket, one redis-server."""

    def setUp(self) -> None:
        super().setUp()
        self.redis_server = self.redis()
        extra = f'RedisAddr = "{self.redis_server.addr}"\n'
        self.a = self.node("a", extra)
        self.b = self.node("b", extra)
        self.assertNotEqual(self.a.store, self.b.store)

    def test_upload_on_a_get_on_b(self) -> None:
        """A file uploaded on A is served by B (with Range), byte-identical."""
        data = os.urandom(7 * MiB + 3)
        upload = Upload(self.a, "ab.bin", data)
        self.assertEqual(upload.finish(0), 201)
        self.assertStored(upload, self.b)
        status, headers, body = http(
            self.b.raw_connect,
            f"GET {upload.get_path} HTTP/1.1\r\nHost: x\r\nRange: bytes=5242870-5242889\r\n"
            "Connection: close\r\n\r\n".encode(),
        )
        self.assertEqual((status, body), (206, data[5242870:5242890]))
        self.assertEqual(os.listdir(self.a.store), os.listdir(self.b.store))

    def test_second_put_on_b_is_409(self) -> None:
        """A slot stored through A is taken on B too: 409, plain or resumable, A's bytes stay."""
        data = os.urandom(6 * MiB)
        upload = Upload(self.a, "taken.bin", data)
        self.assertEqual(upload.finish(0), 201)
        for token in ("b-plain-token-1", "b-other-token-2"):
            again = Upload(self.b, "taken.bin", os.urandom(6 * MiB), token=token)
            self.assertEqual(again.finish(0), 409)
        self.assertEqual(self.bucket.get("it/taken.bin"), data)
        self.assertEqual(self.bucket.uploads(), [])

    def test_one_writer_across_nodes(self) -> None:
        """
        While A streams an upload (its client alive, sending), B refuses a second writer: a
        plain PUT of the slot is 409, a resume with the token is 409 + Retry-After; once A's
        client is gone the resume on B finishes it byte-identical.
        """
        upload = Upload(self.a, "busy.bin", os.urandom(12 * MiB), token="busy-token-1")
        live = upload.open_put(0)
        self.addCleanup(live.close)
        send_some(live, upload.data[: 6 * MiB])
        self.assertTrue(wait_for(lambda: upload.offset(self.b) >= PART, 20, interval=0.2))
        plain = Upload(self.b, "busy.bin", upload.data, token="another-client-9")
        self.assertEqual(put_rest(plain, self.b, 0)[0], 409)
        offset = upload.offset(self.b)
        status, headers = put_rest(upload, self.b, offset)
        self.assertEqual(status, 409, headers)
        self.assertIn("retry-after", headers)
        live.close()
        self.assertEqual(finish_with_retries(upload, self.b), 201)
        self.assertStored(upload, self.a)

    def test_session_upload_interrupted_on_a_resumed_on_b(self) -> None:
        """
        X-Session-Token: 12 MiB of 23 sent to A and the connection dropped; B's HEAD gives the
        end of the last whole part (two parts, 10 MiB), and a Content-Range PUT on B finishes
        it byte-identical.
        """
        upload = Upload(self.a, "resume.bin", os.urandom(23 * MiB), token="resume-token-1")
        sock = upload.open_put(0)
        sock.sendall(upload.data[: 12 * MiB])
        wait_for(lambda: upload.offset(self.b) >= 2 * PART, 20, interval=0.2)
        sock.close()
        offset = settled_offset(upload, self.b)
        self.assertEqual(offset, 2 * PART)
        status, headers = upload.head(self.b)
        self.assertEqual(headers["upload-length"], str(len(upload.data)))
        self.assertEqual(finish_with_retries(upload, self.b), 201)
        self.assertStored(upload, self.a)

    def test_tus_started_on_a_finished_on_b(self) -> None:
        """
        tuspy with 1 MiB chunks (5 MiB parts, so most PATCHes end inside a part and their
        bytes wait in the incomplete-part object): 7 MiB + 100 on A, the rest on B.
        """
        try:
            from tusclient import client as tus_client
        except ImportError:
            if in_ci():
                raise AssertionError("tuspy is a test dependency (pip install -e '.[test]')") from None
            raise SkipTest("tuspy not installed") from None
        data = os.urandom(13 * MiB + 100)
        source = self.work / "tus.bin"
        source.write_bytes(data)
        slot = sign_slot(
            base_url=f"http://127.0.0.1:{self.a.port}/upload", path="tus/file.bin", size=len(data),
            secret=SECRET,
        )
        first = tus_client.TusClient(slot.put_url).uploader(str(source), chunk_size=MiB)
        first.upload(stop_at=7 * MiB + 100)
        self.assertEqual(first.offset, 7 * MiB + 100)
        # the 2 MiB + 100 after the last whole part wait in the bucket, not on A
        self.assertEqual(
            [key.split("/")[1] for key in self.bucket.keys(".hmacfs/")], ["incomplete", "uploads"]
        )
        assert first.url is not None
        url = first.url.replace(f":{self.a.port}/", f":{self.b.port}/")
        self.assertNotEqual(url, first.url)
        second = tus_client.TusClient(slot.put_url).uploader(str(source), chunk_size=MiB, url=url)
        self.assertEqual(second.get_offset(), 7 * MiB + 100)
        second.offset = second.get_offset()
        second.upload()
        status, _headers, body = http(
            self.b.raw_connect, b"GET /upload/tus/file.bin HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        self.assertEqual(status, 200)
        self.assertEqual(hashlib.sha256(body).hexdigest(), hashlib.sha256(data).hexdigest())
        self.assertEqual(self.bucket.keys(".hmacfs/"), [])
        self.assertEqual(self.bucket.uploads(), [])

    def test_kill9_of_a_mid_upload_resume_on_b(self) -> None:
        """
        A dies (SIGKILL) after more than a part reached S3; B resumes from what the bucket
        holds, once the dead writer's Redis lock expired (409 + Retry-After until then).
        """
        upload = Upload(self.a, "kill.bin", os.urandom(20 * MiB), token="kill-token-1")
        sock = upload.open_put(0)
        send_some(sock, upload.data[: 8 * MiB])
        self.assertTrue(wait_for(lambda: upload.offset(self.b) >= PART, 20, interval=0.2))
        self.a.kill9()
        sock.close()
        offset = upload.offset(self.b)
        self.assertEqual(offset, PART)
        started = time.monotonic()
        self.assertEqual(finish_with_retries(upload, self.b, timeout=LOCK_TTL + 15), 201)
        self.assertLess(time.monotonic() - started, LOCK_TTL + 15)
        self.assertStored(upload, self.b)


class SwiftOfOurOwn(S3Server):
    """A Swift only these tests stop and start, on the same S3 port each time."""

    def start(self, timeout: float = 90.0) -> SwiftOfOurOwn:
        if self.env:
            return self.restart(timeout)
        super().start(timeout)
        return self

    def restart(self, timeout: float = 90.0) -> SwiftOfOurOwn:
        """The same WORKDIR (the data stays) and the same S3 port."""
        env = dict(os.environ, SAIO_PYTHON=str(self.python), SAIO_LOG_LEVEL="WARNING")
        with open(self.dir / "saio.stderr", "a") as stderr:
            self.process = subprocess.Popen(
                ["bash", str(SCRIPT), "run", str(self.workdir), str(self.port)],
                stdout=subprocess.PIPE, stderr=stderr, text=True, env=env,
            )
        assert self.process.stdout is not None
        deadline = time.monotonic() + timeout
        for line in self.process.stdout:
            if line.startswith("SAIO_READY"):
                return self
            if time.monotonic() > deadline:
                break
        self.stop()
        raise AssertionError(f"the S3 server did not start again: {self.log_tail()}")


class FaultTests(S3DaemonCase):
    """S3 (a Swift of this test's own) stopped before and during uploads."""

    def setUp(self) -> None:
        require_curl()
        self.work = Path(tempfile.mkdtemp(prefix="hmacfs-s3f-"))
        self.addCleanup(shutil.rmtree, self.work, True)
        self.server = SwiftOfOurOwn()
        self.addCleanup(self.server.cleanup)
        self.server.start()
        self.bucket = Bucket(self.server).create()
        self.daemon = self.node("a", 'RetryDelay = "200ms"\n')

    def test_s3_down_before_put_is_503(self) -> None:
        """
        S3 stopped: a PUT gets 503 with Retry-After before its body (and so do GET and HEAD
        of a stored file, never a 500); S3 back, nothing was left and the node serves again.
        """
        stored = Upload(self.daemon, "stored.bin", os.urandom(1000))
        self.assertEqual(stored.finish(0), 201)
        self.server.stop()
        for method in ("GET", "HEAD"):
            status, headers, _ = http(
                self.daemon.raw_connect,
                f"{method} {stored.get_path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode(),
            )
            self.assertEqual(status, 503, (method, headers))
            self.assertIn("retry-after", headers)
        for token in ("", "X-Session-Token: down-token-1\r\n"):
            slot = f"{uuid.uuid4()}/down.bin"
            status, headers, _ = http(
                self.daemon.raw_connect,
                f"PUT /upload/{slot}?v={v1_mac(slot, 6 * MiB)} HTTP/1.1\r\nHost: x\r\n{token}"
                f"Content-Length: {6 * MiB}\r\nExpect: 100-continue\r\nConnection: close\r\n\r\n".encode(),
            )
            self.assertEqual(status, 503, headers)
            self.assertIn("retry-after", headers)
        self.server.start()
        self.assertEqual(self.bucket.keys(), ["it/stored.bin"])
        self.assertEqual(self.bucket.uploads(), [])
        self.assertEqual(stored.stored(), stored.data)
        # and the node works again without a restart
        upload = Upload(self.daemon, "after.bin", os.urandom(MiB))
        self.assertEqual(finish_with_retries(upload, self.daemon), 201)
        self.assertStored(upload, self.daemon)

    def test_s3_stopped_mid_upload_and_started_again(self) -> None:
        """
        S3 stops after more than a part of a resumable upload reached it; the request fails,
        S3 starts again (same data), and the client HEADs and resumes to a byte-identical file.
        """
        upload = Upload(self.daemon, "outage.bin", os.urandom(16 * MiB), token="outage-token-1")
        sock = upload.open_put(0)
        send_some(sock, upload.data[: 7 * MiB])
        self.assertTrue(wait_for(lambda: upload.offset(self.daemon) >= PART, 20, interval=0.2))
        self.server.stop()
        sock.settimeout(30)
        send_some(sock, upload.data[7 * MiB :])
        try:
            answer = sock.recv(4096)
        except OSError:
            answer = b""
        sock.close()
        self.assertNotIn(b" 201 ", answer.split(b"\r\n")[0])
        self.assertNotIn(b" 500 ", answer.split(b"\r\n")[0])
        self.server.start()
        self.assertEqual(finish_with_retries(upload, self.daemon), 201)
        self.assertStored(upload, self.daemon)
        self.assertNotIn('" 500 ', self.daemon.log())


class RetentionTests(S3DaemonCase):
    """Retention on the bucket with two nodes and the Redis sweep lock."""

    def test_one_node_sweeps_and_tombstones(self) -> None:
        """
        An old file: both nodes start with retention on; one sweeps (the other is told
        another process is sweeping), the object is gone from the bucket, the deletion is
        reported once, and a re-PUT to its URL on either node is 403 (the tombstone).
        """
        redis = self.redis()
        extra = f'RedisAddr = "{redis.addr}"\n'
        seed = self.node("seed", extra)
        old = Upload(seed, "old.bin", os.urandom(1000), token="old-token-1")
        self.assertEqual(old.finish(0), 201)
        self.assertEqual(self.bucket.keys(), ["it/old.bin"])
        seed.terminate()
        time.sleep(2.5)
        # MaxRetentionTime deletes it; DeleteFilesAfterPeriod only makes the horizon (how
        # long the tombstone lives) an hour rather than 2 s.
        retention = extra + (
            'RetentionPolicyEnabled = true\nMaxRetentionTime = "2s"\nRetentionInterval = "1h"\n'
            'DeleteFiles = true\nDeleteFilesAfterPeriod = "1h"\n'
        )
        a = self.node("a", retention)
        b = self.node("b", retention)
        self.assertTrue(wait_for(lambda: "it/old.bin" not in self.bucket.keys(), 20, interval=0.2))
        self.assertNotIn("it/old.bin", self.bucket.keys())
        self.assertTrue(
            wait_for(lambda: "retention sweep skipped" in a.log() + b.log(), 10), a.log() + b.log()
        )
        logs = a.log() + b.log()
        self.assertEqual(logs.count("retention deleted 1 files"), 1, logs)
        self.assertEqual(logs.count("retention sweep skipped"), 1, logs)
        reports = [
            p.read_text() for d in (a, b) for p in d.dir.glob("*deletion*") if p.is_file()
        ]
        self.assertEqual(sum(r.count("old.bin") for r in reports), 1, reports)
        self.assertEqual([key.split("/")[1] for key in self.bucket.keys(".hmacfs/")], ["tombstones"])
        for node in (a, b):
            again = Upload(node, "old.bin", old.data, token=f"again-{node.port}")
            status, headers, body = http(node.raw_connect, again.put_head(0), again.data)
            self.assertEqual(status, 403, body)
            self.assertIn(b"deleted by the retention policy", body)
        self.assertNotIn("it/old.bin", self.bucket.keys())
        self.assertEqual(self.bucket.uploads(), [])
