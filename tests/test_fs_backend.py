"""
The store interface's contract (``StoreContractMixin``), run against the filesystem
backend; other backends run the same mixin against their own real server.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from twisted.internet.defer import Deferred, inlineCallbacks, maybeDeferred
from twisted.internet.interfaces import IConsumer
from twisted.trial.unittest import TestCase
from zope.interface import implementer

from hmacfs.storage.filesystem import Store
from hmacfs.storage.fs_backend import FileRange, FilesystemBackend
from hmacfs.storage.interface import (
    TOMBSTONED,
    ByteRange,
    IByteSource,
    IStore,
    IUpload,
    StorageError,
)


@implementer(IConsumer)
class Collector:
    """A consumer that keeps what it is given and can hold its producer back."""

    def __init__(self) -> None:
        self.data: list[bytes] = []
        self.producer: Any = None
        self.registered = 0

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        self.producer = producer
        self.registered += 1

    def unregisterProducer(self) -> None:
        self.producer = None

    def write(self, data: bytes) -> None:
        self.data.append(data)


class StoreContractMixin:
    """What every ``IStore`` promises; ``make_store`` gives a fresh, empty one."""

    make_store: Callable[..., IStore]
    #: whether ``IUpload.hash_prefix`` can read back what an upload holds (an object
    #: store's unfinished parts cannot be read: see its own tests for the refusal)
    prefix_readable = True
    assertEqual: Callable[..., None]
    assertIsNone: Callable[..., None]
    assertTrue: Callable[..., None]
    assertFalse: Callable[..., None]
    assertIsInstance: Callable[..., None]
    failUnlessFailure: Callable[..., Deferred[Any]]

    @inlineCallbacks
    def _stored(self, store: IStore, segments: tuple[str, ...], data: bytes) -> Any:
        upload = yield store.admit(segments, "text/plain", len(data), record={"k": "v"})
        self.assertIsInstance(upload, IUpload)
        taken = yield upload.write([data[: len(data) // 2], data[len(data) // 2 :]])
        self.assertEqual(taken, len(data))
        stored = yield upload.commit(hashlib.sha256(data).hexdigest())
        return stored

    @inlineCallbacks
    def test_admit_write_commit_lookup(self) -> Any:
        store = self.make_store()
        self.assertIsInstance(store, IStore)
        self.assertFalse((yield store.exists(("a", "f.txt"))))
        stored = yield self._stored(store, ("a", "f.txt"), b"hello world")
        self.assertEqual(stored.size, 11)
        found = yield store.lookup(("a", "f.txt"))
        self.assertEqual((found.size, found.content_type), (11, "text/plain"))
        self.assertEqual(found.path.name, "f.txt")
        self.assertTrue((yield store.exists(("a", "f.txt"))))

    @inlineCallbacks
    def test_admit_refuses_an_existing_file(self) -> Any:
        store = self.make_store()
        yield self._stored(store, ("f",), b"x")
        error = yield self.failUnlessFailure(store.admit(("f",), "text/plain", 1), StorageError)
        self.assertEqual(error.status, 409)

    @inlineCallbacks
    def test_open_range_streams_the_bytes(self) -> Any:
        store = self.make_store()
        data = os.urandom(700_000)
        stored = yield self._stored(store, ("r",), data)
        source = yield store.open_range(stored, ByteRange(5, 600_000))
        self.assertIsInstance(source, IByteSource)
        consumer = Collector()
        try:
            yield source.stream(consumer)
        finally:
            source.close()
        self.assertEqual(b"".join(consumer.data), data[5:600_005])
        self.assertIsNone(consumer.producer)

    @inlineCallbacks
    def test_open_file_then_select(self) -> Any:
        """open_file opens the whole file in one call; select narrows it before streaming."""
        store = self.make_store()
        data = os.urandom(300_000)
        yield self._stored(store, ("o", "f.bin"), data)
        for read_ahead in (0, len(data)):
            source = yield store.open_file(("o", "f.bin"), read_ahead)
            self.assertIsInstance(source, IByteSource)
            self.assertEqual(
                (source.stored.size, source.byte_range), (len(data), ByteRange(0, len(data)))
            )
            source.select(ByteRange(7, 200_000))
            consumer = Collector()
            try:
                yield source.stream(consumer)
            finally:
                source.close()
            self.assertEqual(b"".join(consumer.data), data[7:200_007], read_ahead)

    @inlineCallbacks
    def test_open_file_select_outside_refused(self) -> Any:
        """A range beyond the file is a programming error, not a short read."""
        store = self.make_store()
        yield self._stored(store, ("s",), b"abc")
        source = yield store.open_file(("s",))
        try:
            for outside in (ByteRange(0, 4), ByteRange(3, 1), ByteRange(-1, 1), ByteRange(0, -1)):
                try:
                    source.select(outside)
                except ValueError:
                    continue
                self.assertFalse(f"{outside} was accepted")
        finally:
            source.close()

    @inlineCallbacks
    def test_open_file_of_nothing(self) -> Any:
        store = self.make_store()
        self.assertIsNone((yield store.open_file(("nothing",))))

    @inlineCallbacks
    def test_lookup_of_nothing(self) -> Any:
        store = self.make_store()
        self.assertIsNone((yield store.lookup(("nothing",))))

    @inlineCallbacks
    def test_release_then_resume(self) -> Any:
        store = self.make_store()
        upload = yield store.admit(("big",), "text/plain", 10, record={"k": "v"})
        upload.expect(5)
        yield upload.write([b"12345"])
        yield upload.checkpoint()
        kept = yield upload.release()
        self.assertEqual(kept, 5)
        status = yield store.upload_status(("big",))
        self.assertEqual(status[0], 5)
        again = yield store.resume(("big",), 5)
        self.assertEqual(again.written, 5)
        again.expect(5)
        yield again.write([b"67890"])
        stored = yield again.commit(None)
        self.assertEqual(stored.size, 10)
        self.assertIsNone((yield store.upload_status(("big",))))

    @inlineCallbacks
    def test_abort_leaves_nothing(self) -> Any:
        store = self.make_store()
        upload = yield store.admit(("gone",), "text/plain", 4, record={"k": "v"})
        yield upload.write([b"ab"])
        yield upload.abort()
        self.assertIsNone((yield store.upload_status(("gone",))))
        self.assertFalse((yield store.exists(("gone",))))

    @inlineCallbacks
    def test_list_files_in_pages_and_usage(self) -> Any:
        store = self.make_store()
        names = [("d", f"f{i}") for i in range(5)]
        for segments in names:
            yield self._stored(store, segments, b"abc")
        seen: list[tuple[str, ...]] = []
        cursor = None
        for _ in range(10):
            page = yield store.list_files(cursor, limit=2)
            self.assertTrue(len(page.entries) <= 2)
            seen.extend(entry.segments for entry in page.entries)
            cursor = page.cursor
            if cursor is None:
                break
        self.assertEqual(sorted(seen), names)
        usage = yield store.usage()
        self.assertEqual((usage.files, usage.bytes), (5, 15))

    @inlineCallbacks
    def test_delete(self) -> Any:
        store = self.make_store()
        yield self._stored(store, ("del",), b"abc")
        self.assertTrue((yield store.delete(("del",))))
        self.assertFalse((yield store.delete(("del",))))
        self.assertIsNone((yield store.lookup(("del",))))

    @inlineCallbacks
    def test_tombstones(self) -> Any:
        store = self.make_store()
        self.assertFalse((yield store.tombstoned(("t",))))
        yield store.add_tombstone(("t",), 4_000_000_000)
        self.assertTrue((yield store.tombstoned(("t",))))
        yield store.add_tombstone(("old",), 1)
        self.assertEqual((yield store.purge_tombstones()), 1)

    @inlineCallbacks
    def test_write_feeds_the_hashers(self) -> Any:
        """Every chunk reaches every hasher, in order, before ``write`` fires."""
        store = self.make_store()
        upload = yield store.admit(("h",), "text/plain", 9)
        first, second = hashlib.sha256(), hashlib.md5()
        yield upload.write([b"abc", b"def"], (first, second))
        yield upload.write([b"ghi"], (first,))
        self.assertEqual(first.hexdigest(), hashlib.sha256(b"abcdefghi").hexdigest())
        self.assertEqual(second.hexdigest(), hashlib.md5(b"abcdef").hexdigest())
        yield upload.abort()

    @inlineCallbacks
    def test_write_and_commit(self) -> Any:
        """The last chunks and the commit in one step: the digest sees every byte hashed."""
        store = self.make_store()
        upload = yield store.admit(("wc",), "text/plain", 6, record={"k": "v"})
        yield upload.write([b"abc"])
        hasher = hashlib.sha256()
        if self.prefix_readable:
            yield upload.hash_prefix(hasher, 3)
        else:
            hasher.update(b"abc")
        stored = yield upload.write_and_commit([b"de", b"f"], (hasher,), hasher.hexdigest)
        self.assertEqual((stored.size, stored.sha256), (6, hashlib.sha256(b"abcdef").hexdigest()))
        found = yield store.lookup(("wc",))
        self.assertEqual(found.size, 6)
        self.assertIsNone((yield store.upload_status(("wc",))))

    @inlineCallbacks
    def test_write_and_commit_without_chunks(self) -> Any:
        store = self.make_store()
        upload = yield store.admit(("e",), "text/plain", 2)
        yield upload.write([b"xy"])
        stored = yield upload.write_and_commit([])
        self.assertEqual((stored.size, stored.sha256), (2, None))

    @inlineCallbacks
    def test_write_and_commit_digest_refuses(self) -> Any:
        """A digest that raises: nothing is published, the upload is gone, the error comes out."""
        store = self.make_store()
        upload = yield store.admit(("bad",), "text/plain", 3, record={"k": "v"})

        def digest() -> str:
            raise StorageError(400, "checksum mismatch")

        error = yield self.failUnlessFailure(
            upload.write_and_commit([b"abc"], (), digest), StorageError
        )
        self.assertEqual(error.status, 400)
        self.assertFalse((yield store.exists(("bad",))))
        self.assertIsNone((yield store.upload_status(("bad",))))

    @inlineCallbacks
    def test_digest_refusing_after_every_byte_went_out(self) -> Any:
        """Every byte already written, then a digest that raises: nothing is published
        (an object store that had the whole object takes it back)."""
        for resumable in (False, True):
            store = self.make_store()
            segments = (f"late-{resumable}",)
            upload = yield store.admit(
                segments,
                "text/plain",
                3,
                resumable=resumable,
                record={"k": "v"} if resumable else None,
            )
            upload.expect(3)
            yield upload.write([b"abc"])

            def digest() -> str:
                raise StorageError(400, "checksum mismatch")

            error = yield self.failUnlessFailure(
                upload.write_and_commit([], (), digest), StorageError
            )
            self.assertEqual(error.status, 400)
            self.assertFalse((yield store.exists(segments)), resumable)
            self.assertIsNone((yield store.lookup(segments)), resumable)
            self.assertIsNone((yield store.upload_status(segments)), resumable)

    @inlineCallbacks
    def test_store_whole(self) -> Any:
        """A whole upload in one step: stored with its digest; then the same path is 409
        and the first file is untouched."""
        store = self.make_store()
        hasher = hashlib.sha256()
        stored = yield store.store_whole(
            ("w", "f.txt"), "text/plain", [b"abc", b"def"], (hasher,), hasher.hexdigest
        )
        self.assertEqual((stored.size, stored.sha256), (6, hashlib.sha256(b"abcdef").hexdigest()))
        found = yield store.lookup(("w", "f.txt"))
        self.assertEqual((found.size, found.content_type), (6, "text/plain"))
        error = yield self.failUnlessFailure(
            store.store_whole(("w", "f.txt"), "text/plain", [b"other"]), StorageError
        )
        self.assertEqual(error.status, 409)
        source = yield store.open_file(("w", "f.txt"), 100)
        consumer = Collector()
        try:
            yield source.stream(consumer)
        finally:
            source.close()
        self.assertEqual(b"".join(consumer.data), b"abcdef")
        self.assertIsNone((yield store.upload_status(("w", "f.txt"))))

    @inlineCallbacks
    def test_store_whole_refusals_leave_nothing(self) -> Any:
        """A tombstone (403) or a digest that raises (its error): nothing is created."""
        store = self.make_store()
        yield store.add_tombstone(("w", "gone"), 4_000_000_000)
        error = yield self.failUnlessFailure(
            store.store_whole(("w", "gone"), "text/plain", [b"x"]), StorageError
        )
        self.assertEqual((error.status, error.reason), (403, TOMBSTONED))

        def digest() -> str:
            raise StorageError(400, "checksum mismatch")

        error = yield self.failUnlessFailure(
            store.store_whole(("w", "bad"), "text/plain", [b"abc"], (), digest), StorageError
        )
        self.assertEqual(error.status, 400)
        for segments in (("w", "gone"), ("w", "bad")):
            self.assertIsNone((yield store.lookup(segments)))
            self.assertIsNone((yield store.upload_status(segments)))

    @inlineCallbacks
    def test_admit_and_resume_refuse_a_tombstoned_path(self) -> Any:
        """A path a tombstone blocks: 403 from ``admit`` and ``resume``, nothing created."""
        store = self.make_store()
        upload = yield store.admit(("t", "r"), "text/plain", 4, record={"k": "v"})
        upload.expect(2)
        yield upload.write([b"ab"])
        yield upload.release()
        for segments in (("t", "n"), ("t", "r")):
            yield store.add_tombstone(segments, 4_000_000_000)
        error = yield self.failUnlessFailure(store.admit(("t", "n"), "text/plain", 1), StorageError)
        self.assertEqual((error.status, error.reason), (403, TOMBSTONED))
        self.assertIsNone((yield store.upload_status(("t", "n"))))
        error = yield self.failUnlessFailure(store.resume(("t", "r"), 2), StorageError)
        self.assertEqual((error.status, error.reason), (403, TOMBSTONED))
        self.assertEqual((yield store.upload_status(("t", "r")))[0], 2)

    @inlineCallbacks
    def test_takeovers(self) -> Any:
        """A takeover request is seen (one by one and in a batch) until it is cleared."""
        store = self.make_store()
        upload = yield store.admit(("k",), "text/plain", 4, record={"k": "v"})
        self.assertFalse((yield store.takeover_requested(("k",), 0)))
        yield store.request_takeover(("k",))
        self.assertTrue((yield store.takeover_requested(("k",), 0)))
        self.assertFalse((yield store.takeover_requested(("k",), 4_000_000_000)))
        both = yield store.takeovers_requested([(("k",), 0), (("other",), 0), (("k",), 4e9)])
        self.assertEqual(both, [True, False, False])
        self.assertEqual((yield store.takeovers_requested([])), [])
        yield store.clear_takeover(("k",))
        self.assertEqual((yield store.takeovers_requested([(("k",), 0)])), [False])
        yield upload.abort()

    @inlineCallbacks
    def test_probe(self) -> Any:
        store = self.make_store()
        yield store.probe()


class FilesystemBackendTests(StoreContractMixin, TestCase):
    def make_store(self) -> IStore:
        root = Path(self.mktemp())
        return FilesystemBackend(Store(root), lambda f, *a: maybeDeferred(f, *a))

    def test_full_disk_admission(self) -> None:
        """Admission on a full disk: an existing file is still 409; a new one is 507 and leaves nothing."""
        root = Path(self.mktemp())
        self.successResultOf(self._stored(self.make_store_at(root), ("f",), b"x"))
        full = self.make_store_at(root, min_free_bytes=2**62)
        existing = self.failureResultOf(full.admit(("f",), "text/plain", 1), StorageError)
        self.assertEqual(existing.value.status, 409)
        for resumable in (False, True):
            new = self.failureResultOf(
                full.admit(("a", "new"), "text/plain", 1, record={"k": "v"}, resumable=resumable),
                StorageError,
            )
            self.assertEqual(new.value.status, 507)
            self.assertEqual(os.listdir(root / ".hmacfs" / "partial"), [])
            self.assertIsNone(self.successResultOf(full.upload_status(("a", "new"))))

    def test_store_whole_full_disk_existing_file_is_409(self) -> None:
        """``store_whole`` leaves the existence check to the link, but a full disk over an
        existing file is still 409 (as ``admit`` answers), and nothing is left."""
        root = Path(self.mktemp())
        self.successResultOf(self._stored(self.make_store_at(root), ("f",), b"x"))
        full = self.make_store_at(root, min_free_bytes=2**62)
        existing = self.failureResultOf(full.store_whole(("f",), "text/plain", [b"y"]), StorageError)
        self.assertEqual(existing.value.status, 409)
        new = self.failureResultOf(full.store_whole(("n",), "text/plain", [b"y"]), StorageError)
        self.assertEqual(new.value.status, 507)
        self.assertEqual(os.listdir(root / ".hmacfs" / "partial"), [])
        self.assertEqual((root / "f").read_bytes(), b"x")

    def test_store_whole_parent_removed_before_the_link(self) -> None:
        """The directory kept open from the admission went (a retention sweep removed it,
        empty): the commit walks the path again, recreating it, and links there."""
        from hmacfs.storage import commit

        root = Path(self.mktemp())
        backend = self.make_store_at(root)
        real_link = os.link
        calls: list[object] = []

        def link_after_rmdir(src: Any, dst: Any, **kw: Any) -> None:
            calls.append(dst)
            if len(calls) == 1:
                os.rmdir(root / "d")  # what the sweep would do, between admission and link
            real_link(src, dst, **kw)

        self.patch(commit.os, "link", link_after_rmdir)
        stored = self.successResultOf(backend.store_whole(("d", "f"), "text/plain", [b"abc"]))
        self.assertEqual((len(calls), stored.size), (2, 3))
        self.assertEqual((root / "d" / "f").read_bytes(), b"abc")
        self.assertEqual(os.listdir(root / ".hmacfs" / "partial"), [])

    def make_store_at(self, root: Path, **kw: Any) -> FilesystemBackend:
        return FilesystemBackend(Store(root, **kw), lambda f, *a: maybeDeferred(f, *a))

    def test_the_paused_stream_waits(self) -> None:
        root = Path(self.mktemp())
        backend = FilesystemBackend(Store(root), lambda f, *a: maybeDeferred(f, *a))
        data = b"z" * 600_000
        stored = self.successResultOf(self._stored(backend, ("p",), data))
        source = self.successResultOf(backend.open_range(stored, ByteRange(0, len(data))))
        self.addCleanup(source.close)
        consumer = Collector()
        paused: list[int] = []
        original = consumer.write

        def write(chunk: bytes) -> None:
            original(chunk)
            if not paused:
                paused.append(len(consumer.data))
                consumer.producer.pauseProducing()

        consumer.write = write  # type: ignore[method-assign, assignment]
        done = source.stream(consumer)
        self.assertNoResult(done)
        self.assertEqual(len(consumer.data), 1)
        consumer.producer.resumeProducing()
        self.successResultOf(done)
        self.assertEqual(b"".join(consumer.data), data)


class CountingRunner:
    """Runs each job at once and counts them (one job = one hop to the disk pool)."""

    def __init__(self) -> None:
        self.jobs: list[str] = []

    def __call__(self, function: Any, *args: Any) -> Deferred[Any]:
        self.jobs.append(getattr(function, "__name__", repr(function)))
        return maybeDeferred(function, *args)


class OpenFileJobsTests(TestCase):
    """What a GET costs on the disk pool with the filesystem backend."""

    def setUp(self) -> None:
        self.runner = CountingRunner()
        self.backend = FilesystemBackend(Store(Path(self.mktemp())), self.runner)

    def open_file(self, read_ahead: int = 0) -> FileRange:
        source = self.successResultOf(self.backend.open_file(("f",), read_ahead))
        assert isinstance(source, FileRange)
        return source

    def stored(self, data: bytes) -> None:
        upload = self.successResultOf(self.backend.admit(("f",), "text/plain", len(data)))
        self.successResultOf(upload.write([data]))
        self.successResultOf(upload.commit(None))
        self.runner.jobs.clear()

    def test_small_file_one_job(self) -> None:
        """A file within read_ahead: looked up, opened, read and closed in one job; no descriptor kept."""
        self.stored(b"x" * 1000)
        source = self.open_file(read_ahead=1000)
        self.assertIsNone(source.fd)
        consumer = Collector()
        self.successResultOf(source.stream(consumer))
        source.close()
        self.assertEqual(b"".join(consumer.data), b"x" * 1000)
        self.assertEqual(self.runner.jobs, ["_open_file"])

    def test_big_file_descriptor(self) -> None:
        """A bigger file: one job opens it, each read is one, and the close is one."""
        self.stored(b"y" * 600_000)
        source = self.open_file(read_ahead=1000)
        self.assertIsNotNone(source.fd)
        consumer = Collector()
        self.successResultOf(source.stream(consumer))
        source.close()
        self.assertIsNone(source.fd)
        self.assertEqual(self.runner.jobs, ["_open_file", "pread", "pread", "pread", "close"])

    def test_close_waits_for_a_job(self) -> None:
        """close while a read is on the pool closes after it: the descriptor is never closed under it."""
        self.stored(b"z" * 600_000)
        held: list[Deferred[Any]] = []
        source = self.open_file()
        self.runner.jobs.clear()

        def hold(function: Any, *args: Any) -> Deferred[Any]:
            self.runner.jobs.append(function.__name__)
            d: Deferred[Any] = Deferred()
            held.append(d)
            d.addCallback(lambda _: function(*args))
            return d

        source._run = hold
        reading = source.read(0, 10)
        source.close()
        self.assertEqual(self.runner.jobs, ["pread"])
        held[0].callback(None)
        self.assertEqual(self.successResultOf(reading), b"z" * 10)
        self.assertEqual(self.runner.jobs, ["pread", "close"])
        held[1].callback(None)
        self.assertIsNone(source.fd)


class OneStepUploadTests(TestCase):
    """``OneStepUpload``: one store step when the body ends at once, the usual steps if not."""

    def setUp(self) -> None:
        self.runner = CountingRunner()
        self.backend = FilesystemBackend(Store(Path(self.mktemp())), self.runner)
        self.refusals: list[Any] = []

    def upload(self, name: str, size: int) -> Any:
        from hmacfs.upload.leases import OneStepUpload

        def refused(failure: Any) -> Any:
            self.refusals.append(failure.value)
            return failure

        upload = OneStepUpload(self.backend, ("o", name), "text/plain", size, refused)
        upload.expect(size)
        return upload

    def test_one_job(self) -> None:
        upload = self.upload("one", 3)
        stored = self.successResultOf(upload.write_and_commit([b"abc"]))
        self.assertEqual((stored.size, upload.written), (3, 3))
        self.assertEqual(self.runner.jobs, ["_store_whole"])

    def test_pieces_admit_first(self) -> None:
        """A body that did not end at once: admitted at its first write, then as usual."""
        upload = self.upload("two", 6)
        self.assertEqual(self.successResultOf(upload.write([b"abc"])), 3)
        self.successResultOf(upload.write_and_commit([b"def"]))
        self.assertEqual(self.runner.jobs, ["_admit", "write", "_write_and_commit"])
        self.assertEqual((Path(self.backend.store.root) / "o" / "two").read_bytes(), b"abcdef")

    def test_abort_before_the_step_costs_nothing(self) -> None:
        upload = self.upload("none", 3)
        self.successResultOf(upload.abort())
        self.assertEqual(self.successResultOf(upload.release()), 0)
        self.assertEqual(self.runner.jobs, [])

    def test_refusal_goes_through_refused(self) -> None:
        self.successResultOf(self.upload("dup", 1).write_and_commit([b"x"]))
        failure = self.failureResultOf(self.upload("dup", 1).write_and_commit([b"y"]), StorageError)
        self.assertEqual([error.status for error in self.refusals], [409])
        self.assertIs(failure.value, self.refusals[0])
