"""
The S3 backend against a real S3 server (Swift with s3api, tests/s3_server.py): the store
contract every backend keeps (``StoreContractMixin``), and what only object storage has
to get right (parts cut from the stream, the incomplete-part object, resume on another
store object as another node would).
"""

from __future__ import annotations

import hashlib
import uuid
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.trial.unittest import TestCase

from hmacfs.storage.interface import ByteRange, IStore, StorageError
from hmacfs.storage.s3.client import S3Client
from hmacfs.storage.s3.settings import MIB
from hmacfs.storage.s3.store import INCOMPLETE, UPLOADS, S3Store, path_key

from .s3_server import shared_s3
from .test_fs_backend import Collector, StoreContractMixin
from .test_s3_client import pattern, settings_for
from .test_s3_units import Recorder


class S3Case(TestCase):
    timeout = 180

    def setUp(self) -> Deferred[None]:  # type: ignore[override]
        self.server = shared_s3()
        self.bucket = f"s{uuid.uuid4().hex[:20]}"
        self.client = self.make_client()
        return self.client.create_bucket()

    def make_client(self, **changes: Any) -> S3Client:
        client = S3Client(settings_for(self.server, self.bucket, **changes), reactor)
        self.addCleanup(client.close)
        return client

    def make_store(self, **changes: Any) -> IStore:
        client = self.client if not changes else self.make_client(**changes)
        return S3Store(client, conditional=True)

    async def read(self, store: IStore, segments: tuple[str, ...]) -> bytes:
        stored = await store.lookup(segments)
        assert stored is not None
        source = await store.open_range(stored, ByteRange(0, stored.size))
        consumer = Collector()
        try:
            await source.stream(consumer)
        finally:
            source.close()
        return b"".join(consumer.data)


class S3ContractTests(StoreContractMixin, S3Case):
    """The same contract as the filesystem backend's."""

    prefix_readable = False


class S3UploadTests(S3Case):
    @inlineCallbacks
    def test_one_request_put_is_one_object(self) -> Any:
        store = self.make_store()
        data = pattern(3 * MIB)
        upload = yield store.admit(("a", "one.bin"), "application/pdf", len(data), resumable=False)
        for offset in range(0, len(data), 256 * 1024):
            yield upload.write([data[offset : offset + 256 * 1024]])
        stored = yield upload.commit(None)
        self.assertEqual((stored.size, stored.content_type), (len(data), "application/pdf"))
        got = yield Deferred.fromCoroutine(self.read(store, ("a", "one.bin")))
        self.assertEqual(hashlib.sha256(got).digest(), hashlib.sha256(data).digest())
        page = yield self.client.list_multipart_uploads()
        self.assertEqual(page.uploads, [])

    @inlineCallbacks
    def test_resumable_upload_in_one_request_is_one_put_object(self) -> Any:
        """Up to S3PartSize, in one request: one PutObject, no multipart upload; the record
        a session-token HEAD needs exists while it runs and is gone after."""
        calls: list[str] = []

        class Observer:
            def request_finished(self, operation: str, *rest: Any) -> None:
                calls.append(operation)

        client = S3Client(
            settings_for(self.server, self.bucket, part_size=5 * MIB), reactor, observer=Observer()
        )
        self.addCleanup(client.close)
        store = S3Store(client)
        data = pattern(3 * MIB, seed=9)
        upload = yield store.admit(("one", "r.bin"), "text/plain", len(data), record={"t": 1})
        self.assertEqual((yield store.upload_status(("one", "r.bin"))), (0, {"t": 1}))
        upload.expect(len(data))
        for offset in range(0, len(data), 1 * MIB):
            yield upload.write([data[offset : offset + MIB]])
        yield upload.commit(None)
        self.assertNotIn("CreateMultipartUpload", calls)
        self.assertNotIn("UploadPart", calls)
        self.assertIsNone((yield store.upload_status(("one", "r.bin"))))
        got = yield Deferred.fromCoroutine(self.read(store, ("one", "r.bin")))
        self.assertEqual(got, data)

    @inlineCallbacks
    def test_multipart_cut_from_the_stream(self) -> Any:
        store = self.make_store(part_size=5 * MIB)
        data = pattern(12 * MIB + 12345, seed=1)
        upload = yield store.admit(("big",), "video/mp4", len(data), record={"k": "v"})
        for offset in range(0, len(data), 300_000):
            yield upload.write([data[offset : offset + 300_000]])
        stored = yield upload.commit(None)
        self.assertEqual(stored.size, len(data))
        got = yield Deferred.fromCoroutine(self.read(store, ("big",)))
        self.assertEqual(got, data)
        # nothing of the upload is left under .hmacfs/
        page = yield self.client.list_objects_v2(".hmacfs/")
        self.assertEqual(page.objects, [])

    @inlineCallbacks
    def test_a_second_create_is_409(self) -> Any:
        store = self.make_store()
        first = yield store.admit(("x",), "text/plain", 1, resumable=False)
        second = yield store.admit(("x",), "text/plain", 1, resumable=False)
        yield first.write([b"1"])
        yield first.commit(None)
        yield second.write([b"2"])
        error = yield self.failUnlessFailure(second.commit(None), StorageError)
        self.assertEqual(error.status, 409)
        got = yield Deferred.fromCoroutine(self.read(store, ("x",)))
        self.assertEqual(got, b"1")

    @inlineCallbacks
    def test_interrupted_mid_part_resumes_from_the_last_part_on_another_node(self) -> Any:
        node_a = self.make_store(part_size=5 * MIB)
        data = pattern(11 * MIB, seed=2)
        upload = yield node_a.admit(("r",), "text/plain", len(data), record={"token": "t"})
        yield upload.write([data[: 7 * MIB]])  # one whole part, then 2 MiB of the second
        kept = yield upload.release()
        self.assertEqual(kept, 5 * MIB)
        node_b = self.make_store(part_size=5 * MIB)
        status = yield node_b.upload_status(("r",))
        self.assertEqual(status, (5 * MIB, {"token": "t"}))
        again = yield node_b.resume(("r",), len(data) - 5 * MIB)
        self.assertEqual(again.written, 5 * MIB)
        yield again.write([data[5 * MIB :]])
        yield again.commit(None)
        got = yield Deferred.fromCoroutine(self.read(node_b, ("r",)))
        self.assertEqual(got, data)

    @inlineCallbacks
    def test_short_requests_keep_their_bytes_in_the_incomplete_part(self) -> Any:
        """tus PATCHes of 1 MiB with 5 MiB parts: each one's bytes survive, on any node."""
        data = pattern(7 * MIB + 100, seed=3)
        upload = yield self.make_store(part_size=5 * MIB).admit(
            ("tus",), "text/plain", len(data), record={"protocol": "tus"}
        )
        offset = 0
        chunk = 1 * MIB
        rounds = 0
        while offset < len(data):
            rounds += 1
            self.assertLess(rounds, 20)
            count = min(chunk, len(data) - offset)
            upload.expect(count)
            yield upload.write([data[offset : offset + count]])
            offset += count
            if offset == len(data):
                break
            kept = yield upload.release()
            self.assertEqual(kept, offset)
            # the next PATCH lands on another node
            node = self.make_store(part_size=5 * MIB)
            status = yield node.upload_status(("tus",))
            self.assertEqual(status[0], offset)
            upload = yield node.resume(("tus",), len(data) - offset)
            self.assertEqual(upload.written, offset)
        yield upload.commit(None)
        got = yield Deferred.fromCoroutine(self.read(self.make_store(), ("tus",)))
        self.assertEqual(got, data)
        leftover = yield self.client.head_object(UPLOADS + path_key(("tus",))).addErrback(
            lambda f: None
        )
        self.assertIsNone(leftover)
        leftover = yield self.client.head_object(INCOMPLETE + path_key(("tus",))).addErrback(
            lambda f: None
        )
        self.assertIsNone(leftover)

    @inlineCallbacks
    def test_fresh_admission_deletes_nothing(self) -> Any:
        """A fresh upload with nothing left by an earlier attempt costs no DeleteObject (the
        record is looked for once; without it there is no incomplete part either); one
        left by an earlier attempt is dropped, its multipart upload aborted."""
        recorder = Recorder()
        client = S3Client(settings_for(self.server, self.bucket, part_size=5 * MIB), reactor, observer=recorder)
        self.addCleanup(client.close)
        store = S3Store(client)
        upload = yield store.admit(("fresh",), "text/plain", 6 * MIB, record={"k": 1})
        operations = [call[0] for call in recorder.calls]
        self.assertNotIn("DeleteObject", operations)
        yield upload.write([b"x" * (5 * MIB + 1)])
        yield upload.release()
        del recorder.calls[:]
        again = yield store.admit(("fresh",), "text/plain", 6 * MIB, record={"k": 2})
        operations = [call[0] for call in recorder.calls]
        self.assertIn("AbortMultipartUpload", operations)
        self.assertEqual(operations.count("DeleteObject"), 2)
        page = yield self.client.list_multipart_uploads()
        self.assertEqual(page.uploads, [])
        yield again.abort()

    @inlineCallbacks
    def test_abort_leaves_nothing(self) -> Any:
        store = self.make_store(part_size=5 * MIB)
        data = pattern(6 * MIB, seed=4)
        upload = yield store.admit(("gone",), "text/plain", len(data), record={"k": 1})
        yield upload.write([data[: 5 * MIB + 10]])
        yield upload.abort()
        self.assertIsNone((yield store.upload_status(("gone",))))
        page = yield self.client.list_multipart_uploads()
        self.assertEqual(page.uploads, [])
        page = yield self.client.list_objects_v2()
        self.assertEqual(page.objects, [])

    @inlineCallbacks
    def test_sweep_removes_idle_uploads(self) -> Any:
        store = self.make_store(part_size=5 * MIB)
        upload = yield store.admit(("idle",), "text/plain", 10, record={"k": 1})
        yield upload.write([b"12345"])
        yield upload.release()
        self.assertEqual((yield store.sweep_uploads(3600)), 0)
        self.assertEqual((yield store.sweep_uploads(-10)), 1)
        self.assertIsNone((yield store.upload_status(("idle",))))
        page = yield self.client.list_multipart_uploads()
        self.assertEqual(page.uploads, [])

    @inlineCallbacks
    def test_stored_prefix_cannot_be_hashed(self) -> Any:
        """A whole-file checksum over bytes an earlier request stored: refused, said why."""
        store = self.make_store()
        upload = yield store.admit(("h",), "text/plain", 4, record={"k": 1})
        self.assertIsNone((yield upload.hash_prefix(hashlib.sha256(), 0)))
        upload.expect(2)
        yield upload.write([b"ab"])
        error = yield self.failUnlessFailure(upload.hash_prefix(hashlib.sha256(), 2), StorageError)
        self.assertEqual(error.status, 409)
        self.assertIn("Content-Range", error.reason)
        yield upload.abort()

    @inlineCallbacks
    def test_takeover_markers(self) -> Any:
        store = self.make_store()
        self.assertFalse((yield store.takeover_requested(("m",), 0)))
        yield store.request_takeover(("m",))
        self.assertTrue((yield store.takeover_requested(("m",), 0)))
        self.assertFalse((yield store.takeover_requested(("m",), 4_000_000_000)))
        yield store.clear_takeover(("m",))
        self.assertFalse((yield store.takeover_requested(("m",), 0)))

    @inlineCallbacks
    def test_unreachable_store_is_503(self) -> Any:
        store = self.make_store(endpoint="http://127.0.0.1:9", connect_timeout=2.0)
        error = yield self.failUnlessFailure(store.exists(("f",)), StorageError)
        self.assertEqual(error.status, 503)
        error = yield self.failUnlessFailure(store.admit(("f",), "text/plain", 1), StorageError)
        self.assertEqual(error.status, 503)

    @inlineCallbacks
    def test_presigned_download_url(self) -> Any:
        store = S3Store(self.client, redirect_downloads=True)
        upload = yield store.admit(("p.txt",), "text/plain", 2, resumable=False)
        yield upload.write([b"hi"])
        stored = yield upload.commit(None)
        url = store.download_url(stored, b"text/plain; charset=utf-8", b'attachment; filename="p.txt"')
        self.assertIn("response-content-disposition", url)
        self.assertIsNone(S3Store(self.client).download_url(stored, b"text/plain", b"inline"))


class StartupCheckTests(S3Case):
    """Before listening: the bucket, the credentials, and the conditional-write probe."""

    def check(self, **changes: Any) -> Any:
        from hmacfs.storage.s3.startup import check_bucket

        values = {"bucket": self.bucket, **changes}
        return check_bucket(settings_for(self.server, **values), timeout=5)

    def test_a_working_bucket(self) -> None:
        report = self.check()
        # Swift 2.38.3 answers 412 to a create over an existing key.
        self.assertTrue(report.conditional_writes)

    def test_each_problem_names_its_key(self) -> None:
        from hmacfs.storage.s3.startup import S3StartupError

        cases = [
            ({"bucket": "no-such-bucket-here"}, "S3Bucket"),
            ({"secret_key": "wrong"}, "S3AccessKey"),
            ({"endpoint": "http://127.0.0.1:9"}, "S3Endpoint"),
        ]
        for changes, key in cases:
            with self.assertRaises(S3StartupError) as caught:
                self.check(**changes)
            self.assertEqual(caught.exception.key, key, changes)
            self.assertNotIn("wrong", str(caught.exception))
