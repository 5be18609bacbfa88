"""
The S3 client (hmacfs.storage.s3) against a real S3: Swift with s3api (tests/s3_server.py),
and TLS against a local server.  Its socket-free unit tests are in test_s3_units.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

from twisted.internet import reactor as _reactor
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.trial.unittest import TestCase
from twisted.web.client import Agent, readBody

from hmacfs.storage.s3.client import Part, S3Client
from hmacfs.storage.s3.errors import (
    AccessDenied,
    NotFound,
    NotModified,
    PreconditionFailed,
    RangeNotSatisfiable,
    S3Error,
    S3Unavailable,
)
from hmacfs.storage.s3.settings import MIB, S3Settings
from hmacfs.testing import free_port

from .s3_server import S3Server, shared_s3
from .test_packaging import make_certificate
from .test_s3_units import Collector, Recorder

reactor: Any = _reactor
ROOT = Path(__file__).resolve().parent.parent


def settings_for(server: S3Server, bucket: str, **changes: Any) -> S3Settings:
    values: dict[str, Any] = {
        "bucket": bucket,
        "access_key": server.access_key,
        "secret_key": server.secret_key,
        "endpoint": server.endpoint,
        "region": server.region,
        "addressing_style": "path",
    }
    values.update(changes)
    return S3Settings(**values)


def pattern(size: int, seed: int = 0) -> bytes:
    """``size`` bytes that differ at every offset (a shifted or dropped chunk shows)."""
    block = hashlib.sha256(str(seed).encode()).digest() * 2048  # 64 KiB
    out = bytearray()
    counter = 0
    while len(out) < size:
        out += counter.to_bytes(4, "big") + block[: 65532]
        counter += 1
    return bytes(out[:size])


class S3ClientTests(TestCase):
    """Each test gets a fresh bucket on the shared Swift server."""

    timeout = 120

    def setUp(self) -> Deferred[None]:  # type: ignore[override]
        self.server = shared_s3()
        self.bucket = f"t{uuid.uuid4().hex[:20]}"
        self.observer = Recorder()
        self.client = self.make_client()
        return self.client.create_bucket()

    def make_client(self, **changes: Any) -> S3Client:
        client = S3Client(
            settings_for(self.server, changes.pop("bucket", self.bucket), **changes),
            reactor,
            observer=self.observer,
        )
        self.addCleanup(client.close)
        return client

    async def put(self, key: str, data: bytes, chunk: int = 65536, **kwargs: Any) -> Any:
        upload = self.client.put_object(key, len(data), **kwargs)
        for offset in range(0, len(data), chunk):
            await upload.write(data[offset : offset + chunk])
        return await upload.finish()

    async def get(self, key: str, **kwargs: Any) -> tuple[Any, bytes]:
        download = await self.client.get_object(key, **kwargs)
        sink = Collector()
        count = await download.deliver(sink)
        self.assertEqual(count, len(sink.data))
        return download, sink.data

    def test_put_get_one_byte(self) -> Deferred[None]:
        """A 1-byte object comes back byte-identical, with its type and metadata."""

        async def run() -> None:
            result = await self.put("one", b"x", content_type="text/plain", metadata={"sha256": "ab"})
            self.assertEqual(result.etag, f'"{hashlib.md5(b"x").hexdigest()}"')
            download, data = await self.get("one")
            self.assertEqual((download.status, data), (200, b"x"))
            self.assertEqual(download.content_length, 1)
            self.assertEqual(download.info.content_type, "text/plain")
            self.assertEqual(download.info.metadata, {"sha256": "ab"})
            self.assertIn(("PutObject", "ok", 1, 0), self.observer.calls)
            self.assertIn(("GetObject", "ok", 0, 1), self.observer.calls)

        return ensureDeferred(run())

    def test_put_get_mib(self) -> Deferred[None]:
        """3 MiB written in 64 KiB chunks (UNSIGNED-PAYLOAD over http) read back identical."""

        async def run() -> None:
            data = pattern(3 * MIB + 17)
            await self.put("dir/three", data)
            _, got = await self.get("dir/three")
            self.assertEqual(hashlib.sha256(got).hexdigest(), hashlib.sha256(data).hexdigest())

        return ensureDeferred(run())

    def test_ranges(self) -> Deferred[None]:
        """Closed, open and suffix ranges give 206 and their bytes; past the end is 416."""

        async def run() -> None:
            data = pattern(1000)
            await self.put("r", data)
            download, got = await self.get("r", range="bytes=10-19")
            self.assertEqual((download.status, got), (206, data[10:20]))
            self.assertEqual(download.content_range, "bytes 10-19/1000")
            self.assertEqual(download.headers["content-length"], "10")
            download, got = await self.get("r", range="bytes=990-")
            self.assertEqual((download.status, got), (206, data[990:]))
            download, got = await self.get("r", range="bytes=-5")
            self.assertEqual((download.status, got), (206, data[-5:]))
            self.assertEqual(download.content_range, "bytes 995-999/1000")
            with self.assertRaises(RangeNotSatisfiable) as raised:
                await self.client.get_object("r", range="bytes=1000-")
            self.assertEqual(raised.exception.status, 416)
            self.assertEqual(raised.exception.code, "InvalidRange")

        return ensureDeferred(run())

    def test_conditional_get(self) -> Deferred[None]:
        """If-None-Match with the ETag is NotModified (304); a wrong If-Match is 412."""

        async def run() -> None:
            result = await self.put("c", b"abc")
            with self.assertRaises(NotModified):
                await self.client.get_object("c", if_none_match=result.etag)
            with self.assertRaises(PreconditionFailed):
                await self.client.get_object("c", if_match='"0000"')
            download, got = await self.get("c", if_match=result.etag)
            self.assertEqual(got, b"abc")

        return ensureDeferred(run())

    def test_head_delete(self) -> Deferred[None]:
        """HEAD gives size, ETag and metadata; after DELETE it is NotFound; deleting again is fine."""

        async def run() -> None:
            await self.put("h", b"12345", content_type="image/png", metadata={"name": "a b"})
            info = await self.client.head_object("h")
            self.assertEqual((info.size, info.content_type), (5, "image/png"))
            self.assertEqual(info.metadata, {"name": "a b"})
            self.assertIsNotNone(info.last_modified)
            await self.client.delete_object("h")
            with self.assertRaises(NotFound):
                await self.client.head_object("h")
            await self.client.delete_object("h")
            with self.assertRaises(NotFound) as raised:
                await self.client.get_object("h")
            self.assertEqual(raised.exception.code, "NoSuchKey")

        return ensureDeferred(run())

    def test_list_paging_and_prefix(self) -> Deferred[None]:
        """ListObjectsV2 pages of 2 cover every key once; the settings' prefix is invisible."""

        async def run() -> None:
            self.client = self.make_client(prefix="node/")
            keys = [f"up/{i}" for i in range(5)]
            for key in keys:
                await self.put(key, key.encode())
            await self.put("other", b"o")
            seen: list[str] = []
            token = None
            pages = 0
            while pages < 10:
                page = await self.client.list_objects_v2("up/", continuation_token=token, max_keys=2)
                self.assertLessEqual(len(page.objects), 2)
                seen += [o.key for o in page.objects]
                pages += 1
                token = page.next_token
                if token is None:
                    break
            self.assertEqual(seen, keys)
            self.assertEqual(pages, 3)
            page = await self.client.list_objects_v2("", delimiter="/")
            self.assertEqual(page.common_prefixes, ["up/"])
            self.assertEqual([o.key for o in page.objects], ["other"])
            # the real key carries the prefix
            raw = self.make_client()
            info = await raw.head_object("node/up/0")
            self.assertEqual(info.size, 4)

        return ensureDeferred(run())

    def test_delete_objects(self) -> Deferred[None]:
        """DeleteObjects (with its Content-MD5) removes the keys it names."""

        async def run() -> None:
            for key in ("a", "b", "c"):
                await self.put(key, b"1")
            result = await self.client.delete_objects(["a", "b", "missing"])
            self.assertEqual(sorted(result.deleted), ["a", "b", "missing"])
            self.assertEqual(result.errors, {})
            page = await self.client.list_objects_v2()
            self.assertEqual([o.key for o in page.objects], ["c"])

        return ensureDeferred(run())

    async def upload_part(self, key: str, upload_id: str, number: int, data: bytes) -> Part:
        upload = self.client.upload_part(key, upload_id, number, len(data))
        for offset in range(0, len(data), 256 * 1024):
            await upload.write(data[offset : offset + 256 * 1024])
        result = await upload.finish()
        return Part(number, result.etag)

    def test_multipart(self) -> Deferred[None]:
        """Two 5 MiB parts and a small last one assemble byte-identical, with the create's metadata."""

        async def run() -> None:
            data = pattern(10 * MIB + 1234, seed=3)
            upload_id = await self.client.create_multipart_upload(
                "big", content_type="video/mp4", metadata={"sha256": "cafe"}
            )
            uploads = await self.client.list_multipart_uploads()
            self.assertEqual([(u.key, u.upload_id) for u in uploads.uploads], [("big", upload_id)])
            parts = [
                await self.upload_part("big", upload_id, 1, data[: 5 * MIB]),
                await self.upload_part("big", upload_id, 2, data[5 * MIB : 10 * MIB]),
                await self.upload_part("big", upload_id, 3, data[10 * MIB :]),
            ]
            listed = await self.client.list_parts("big", upload_id, max_parts=2)
            self.assertEqual([p.part_number for p in listed.parts], [1, 2])
            self.assertEqual(listed.next_marker, 2)
            rest = await self.client.list_parts("big", upload_id, part_number_marker=2)
            self.assertEqual([(p.part_number, p.size) for p in rest.parts], [(3, 1234)])
            self.assertIsNone(rest.next_marker)
            self.assertEqual([p.etag for p in listed.parts + rest.parts], [p.etag for p in parts])
            await self.client.complete_multipart_upload("big", upload_id, parts, if_none_match=True)
            download, got = await self.get("big")
            self.assertEqual(hashlib.sha256(got).digest(), hashlib.sha256(data).digest())
            self.assertEqual(download.info.metadata, {"sha256": "cafe"})
            self.assertEqual(download.info.content_type, "video/mp4")
            _, tail = await self.get("big", range="bytes=-10")
            self.assertEqual(tail, data[-10:])
            self.assertEqual((await self.client.list_multipart_uploads()).uploads, [])

        return ensureDeferred(run())

    def test_entity_too_small_and_abort(self) -> Deferred[None]:
        """A short part that is not the last is EntityTooSmall; abort leaves no upload behind."""

        async def run() -> None:
            upload_id = await self.client.create_multipart_upload("small")
            parts = [
                await self.upload_part("small", upload_id, 1, b"a" * 1024),
                await self.upload_part("small", upload_id, 2, b"b" * 1024),
            ]
            with self.assertRaises(S3Error) as raised:
                await self.client.complete_multipart_upload("small", upload_id, parts)
            self.assertEqual((raised.exception.status, raised.exception.code), (400, "EntityTooSmall"))
            await self.client.abort_multipart_upload("small", upload_id)
            self.assertEqual((await self.client.list_multipart_uploads()).uploads, [])
            with self.assertRaises(NotFound) as missing:
                await self.client.list_parts("small", upload_id)
            self.assertEqual(missing.exception.code, "NoSuchUpload")

        return ensureDeferred(run())

    def test_if_none_match(self) -> Deferred[None]:
        """If-None-Match: * on PutObject and on CompleteMultipartUpload never replaces a key."""

        async def run() -> None:
            await self.put("once", b"first", if_none_match=True)
            with self.assertRaises(PreconditionFailed) as raised:
                await self.put("once", b"second", if_none_match=True)
            self.assertEqual(raised.exception.status, 412)
            upload_id = await self.client.create_multipart_upload("once")
            parts = [await self.upload_part("once", upload_id, 1, b"third")]
            with self.assertRaises(PreconditionFailed):
                await self.client.complete_multipart_upload("once", upload_id, parts, if_none_match=True)
            await self.client.abort_multipart_upload("once", upload_id)
            _, got = await self.get("once")
            self.assertEqual(got, b"first")
            self.assertTrue(await self.client.probe_conditional_writes())
            page = await self.client.list_objects_v2(".hmacfs-probe/")
            self.assertEqual(page.objects, [])
            self.assertIn(("PutObject", "precondition_failed", 6, 0), self.observer.calls)

        return ensureDeferred(run())

    def test_presigned_get(self) -> Deferred[None]:
        """A presigned URL fetched by a plain Agent answers with the signed type and disposition."""

        async def run() -> None:
            await self.put("p/file.bin", b"<html>hi</html>", content_type="text/html")
            url = self.client.presign_get(
                "p/file.bin",
                content_type="text/plain; charset=utf-8",
                content_disposition="attachment; filename=\"file.bin\"",
                expires=60,
            )
            self.assertIn("X-Amz-Signature=", url)
            self.assertNotIn(self.server.secret_key, url)
            agent = Agent(reactor)
            response = await agent.request(b"GET", url.encode())
            body = await readBody(response)
            self.assertEqual((response.code, body), (200, b"<html>hi</html>"))
            headers = response.headers
            self.assertEqual(headers.getRawHeaders(b"content-type"), [b"text/plain; charset=utf-8"])
            self.assertEqual(
                headers.getRawHeaders(b"content-disposition"), [b'attachment; filename="file.bin"']
            )
            # the signature covers the query: changing the type breaks it
            tampered = url.replace("text%2Fplain", "text%2Fhtml")
            response = await agent.request(b"GET", tampered.encode())
            await readBody(response)
            self.assertEqual(response.code, 403)

        return ensureDeferred(run())

    def test_wrong_secret(self) -> Deferred[None]:
        """A wrong secret is AccessDenied (SignatureDoesNotMatch), on control calls and uploads."""

        async def run() -> None:
            bad = self.make_client(secret_key="not-the-secret")
            with self.assertRaises(AccessDenied) as raised:
                await bad.head_bucket()
            self.assertEqual(raised.exception.status, 403)
            upload = bad.put_object("k", 3)
            await upload.write(b"abc")
            with self.assertRaises(AccessDenied) as put_raised:
                await upload.finish()
            self.assertEqual(put_raised.exception.code, "SignatureDoesNotMatch")
            self.assertNotIn("not-the-secret", repr(bad.settings) + str(put_raised.exception))

        return ensureDeferred(run())

    def test_missing_bucket(self) -> Deferred[None]:
        """HeadBucket on a bucket that does not exist is NotFound; the real one answers."""

        async def run() -> None:
            await self.client.head_bucket()
            missing = self.make_client(bucket="no-such-bucket-here")
            with self.assertRaises(NotFound) as raised:
                await missing.head_bucket()
            self.assertEqual(raised.exception.status, 404)
            self.assertIn(("HeadBucket", "not_found", 0, 0), self.observer.calls)

        return ensureDeferred(run())

    def test_connection_refused(self) -> Deferred[None]:
        """A closed port is S3Unavailable, on control calls, uploads and downloads."""

        async def run() -> None:
            dead = self.make_client(endpoint=f"http://127.0.0.1:{free_port()}")
            with self.assertRaises(S3Unavailable) as raised:
                await dead.head_bucket()
            self.assertEqual((raised.exception.status, raised.exception.code), (0, "ConnectFailed"))
            upload = dead.put_object("k", 10)
            with self.assertRaises(S3Unavailable):
                await upload.write(b"0123456789")
                await upload.finish()
            with self.assertRaises(S3Unavailable):
                await dead.get_object("k")
            self.assertIn(("HeadBucket", "unavailable", 0, 0), self.observer.calls)

        return ensureDeferred(run())

    def test_wrong_secret_big_body(self) -> Deferred[None]:
        """A 20 MiB upload with a wrong secret ends in AccessDenied, on a write or on finish()."""

        async def run() -> None:
            from twisted.internet import tcp
            from twisted.internet.task import deferLater

            def clients() -> int:
                selectables = reactor.getReaders() + reactor.getWriters()
                return len({s for s in selectables if isinstance(s, tcp.Client)})

            before = clients()
            bad = self.make_client(secret_key="not-the-secret")
            upload = bad.put_object("k", 20 * MIB)
            chunk = b"z" * 65536
            with self.assertRaises(AccessDenied):
                for _ in range(20 * MIB // len(chunk)):
                    await upload.write(chunk)
                await upload.finish()
            # The refused upload's connection cannot be reused: it closes, on a later
            # reactor turn (the test would end with it still in the reactor).
            for _ in range(100):
                if clients() <= before:
                    break
                await deferLater(reactor, 0.05, lambda: None)
            self.assertLessEqual(clients(), before)

        return ensureDeferred(run())

    def test_connection_lost_mid_body(self) -> Deferred[None]:
        """A server that drops the connection mid-upload or mid-download gives S3Unavailable."""
        from twisted.internet.protocol import Factory, Protocol

        class Dropper(Protocol):
            def dataReceived(self, data: bytes) -> None:
                if data.startswith(b"GET"):
                    self.transport.write(  # type: ignore[union-attr]
                        b"HTTP/1.1 200 OK\r\nContent-Length: 1000000\r\n\r\n" + b"a" * 1000
                    )
                self.received = getattr(self, "received", 0) + len(data)
                if self.received > 300_000 or data.startswith(b"GET"):
                    self.transport.loseConnection()  # type: ignore[union-attr]

        port = reactor.listenTCP(0, Factory.forProtocol(Dropper), interface="127.0.0.1")
        self.addCleanup(port.stopListening)

        async def run() -> None:
            dropping = self.make_client(endpoint=f"http://127.0.0.1:{port.getHost().port}")
            upload = dropping.put_object("k", 10 * MIB)
            with self.assertRaises(S3Unavailable):
                for _ in range(10 * MIB // 65536):
                    await upload.write(b"q" * 65536)
                await upload.finish()
            download = await dropping.get_object("k")
            with self.assertRaises(S3Unavailable):
                await download.deliver(Collector())

        return ensureDeferred(run())

    def test_discard_download(self) -> Deferred[None]:
        """discard() drops a body unread; the client goes on working (a fresh connection)."""

        async def run() -> None:
            await self.put("d", pattern(2 * MIB))
            download = await self.client.get_object("d")
            download.discard()
            download.discard()
            self.assertRaises(RuntimeError, download.deliver, Collector())
            _, got = await self.get("d", range="bytes=0-3")
            self.assertEqual(got, pattern(4))
            self.assertIn(("GetObject", "aborted", 0, 0), self.observer.calls)
            # mid-delivery: the consumer pauses, then the download is let go of
            download = await self.client.get_object("d")
            sink = Collector()
            delivered = download.deliver(sink)
            download.discard()
            with self.assertRaises(S3Error) as raised:
                await delivered
            self.assertEqual(raised.exception.code, "Aborted")
            self.assertLess(len(sink.data), 2 * MIB)
            # after a whole delivery: nothing to do
            download = await self.client.get_object("d", range="bytes=0-9")
            await download.deliver(Collector())
            download.discard()

        return ensureDeferred(run())

    def test_abort_upload(self) -> Deferred[None]:
        """abort() mid-body fails the upload and leaves no object."""

        async def run() -> None:
            upload = self.client.put_object("gone", 1000)
            await upload.write(b"x" * 100)
            upload.abort()
            with self.assertRaises(S3Error) as raised:
                await upload.finish()
            self.assertEqual(raised.exception.code, "Aborted")
            with self.assertRaises(NotFound):
                await self.client.head_object("gone")

        return ensureDeferred(run())

    def test_streaming_memory(self) -> None:
        """
        A 200 MiB put_object and a 200 MiB get_object through the client, in a child process,
        keep its peak RSS far below the object's size (the bodies are streamed).
        """
        script = ROOT / "tests" / "s3_stream_rss.py"
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        result = subprocess.run(
            [sys.executable, str(script), self.server.endpoint, self.server.access_key,
             self.server.secret_key, f"{self.bucket}", str(200 * MIB)],
            capture_output=True, text=True, timeout=300, env=env,
        )
        self.assertEqual(result.returncode, 0, result.stderr[-3000:])
        figures = dict(line.split("=", 1) for line in result.stdout.split())
        print(f"\nS3 streaming RSS: {figures}", file=sys.stderr)
        peak = int(figures["peak_rss_kib"]) * 1024
        baseline = int(figures["baseline_rss_kib"]) * 1024
        self.assertEqual(figures["identical"], "True")
        self.assertLess(peak - baseline, 48 * MIB)


class TLSTests(TestCase):
    """TLS to S3 is verified: an unknown CA is refused, the one in ca_file is trusted."""

    def setUp(self) -> None:
        from twisted.internet.ssl import PrivateCertificate
        from twisted.web.resource import Resource
        from twisted.web.server import Site

        directory = Path(self.mktemp())
        directory.mkdir()
        self.cert, key = make_certificate(directory, "localhost")
        pem = self.cert.read_bytes() + key.read_bytes()
        options = PrivateCertificate.loadPEM(pem).options()

        class Bucket(Resource):
            isLeaf = True

            def render_HEAD(self, request: Any) -> bytes:
                return b""

        site = Site(Bucket())
        self.port = reactor.listenSSL(0, site, options, interface="127.0.0.1")
        self.addCleanup(self.port.stopListening)

    def client(self, ca_file: str | None) -> S3Client:
        settings = S3Settings(
            bucket="b", access_key="a", secret_key="s", addressing_style="path",
            endpoint=f"https://localhost:{self.port.getHost().port}", ca_file=ca_file,
        )
        client = S3Client(settings, reactor)
        self.addCleanup(client.close)
        return client

    def test_unknown_ca_refused(self) -> Deferred[None]:
        """Without ca_file, a self-signed server certificate fails verification: S3Unavailable."""

        async def run() -> None:
            with self.assertRaises(S3Unavailable) as raised:
                await self.client(None).head_bucket()
            self.assertIn("certificate verify failed", str(raised.exception))

        return ensureDeferred(run())

    def test_ca_file_trusted(self) -> Deferred[None]:
        """With its certificate as ca_file, the same server answers."""

        async def run() -> None:
            headers = await self.client(str(self.cert)).head_bucket()
            self.assertIn("date", headers)

        return ensureDeferred(run())

    def test_ca_file_without_certificate(self) -> None:
        """A ca_file with no PEM certificate is refused when the client is made, naming it."""
        path = Path(self.mktemp())
        path.write_text("not a certificate\n")
        with self.assertRaises(ValueError) as raised:
            self.client(str(path))
        self.assertIn("ca_file", str(raised.exception))


