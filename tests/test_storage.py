# -*- test-case-name: tests.test_storage -*-
"""Tests for hmacfs.storage.filesystem: path safety, partial files, atomic commit, metadata."""

from __future__ import annotations

import errno
import hashlib
import itertools
import json
import os
import stat as stat_mod
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from hmacfs.storage import commit as storage_commit
from hmacfs.storage import filesystem as storage
from hmacfs.storage import fs_dirs, fsio, metadata
from hmacfs.storage.filesystem import DEFAULT_CONTENT_TYPE, StorageError, Store, path_key

SEGS = ("0123abcd", "photo.jpg")


class StoreTestsMixin:
    """
    Helpers: a fresh store in a real temporary directory, keeping metadata in sidecar
    files (what these tests look at; ``XattrMetadataTests`` covers the attribute).
    """

    metadata_xattr = False

    def make_store(self, **kwargs: object) -> Store:
        root = Path(self.mktemp())  # type: ignore[attr-defined]
        root.mkdir()
        kwargs.setdefault("now", lambda: 1700000000.5)
        kwargs.setdefault("metadata_xattr", self.metadata_xattr)
        return Store(root, **kwargs)  # type: ignore[arg-type]

    def upload(self, store: Store, segs, body: bytes, ctype: str = "image/jpeg", sha=None):
        partial = store.open_partial(segs, ctype, len(body))
        partial.write([body])
        return partial.commit(sha)

    def private_files(self, store: Store) -> list[str]:
        return sorted(os.listdir(store.partial_dir)) + sorted(os.listdir(store.meta_dir))


class CommitTests(StoreTestsMixin, SynchronousTestCase):
    def test_init_creates_private_dirs(self) -> None:
        """The constructor creates .hmacfs/partial and .hmacfs/meta under the root."""
        store = self.make_store()
        self.assertTrue(store.partial_dir.is_dir())
        self.assertTrue(store.meta_dir.is_dir())
        self.assertEqual(store.partial_dir, store.root / ".hmacfs" / "partial")
        self.assertEqual(store.meta_dir, store.root / ".hmacfs" / "meta")

    def test_commit_exact_bytes_and_meta(self) -> None:
        """open/write/commit stores exactly the bytes written plus the documented metadata."""
        store = self.make_store()
        body = bytes(range(256)) * 10
        partial = store.open_partial(SEGS, "image/jpeg", len(body))
        self.assertEqual(partial.path, store.partial_dir / f"{path_key(SEGS)}.part")
        self.assertTrue(partial.path.exists())
        self.assertEqual(partial.write([body[:100], b"", body[100:]]), len(body))
        self.assertEqual(partial.written, len(body))
        stored = partial.commit("ab" * 32)

        target = store.root / "0123abcd" / "photo.jpg"
        self.assertEqual(target.read_bytes(), body)
        self.assertEqual(stored.path, target)
        self.assertEqual(stored.size, len(body))
        self.assertEqual(stored.content_type, "image/jpeg")
        self.assertEqual(stored.sha256, "ab" * 32)
        meta = json.loads((store.meta_dir / f"{path_key(SEGS)}.json").read_text())
        self.assertEqual(
            meta,
            {
                "path": "0123abcd/photo.jpg",
                "content_type": "image/jpeg",
                "size": len(body),
                "sha256": "ab" * 32,
                "created": 1700000000.5,
            },
        )
        # Only the finished meta file remains: no partial, no .tmp.
        self.assertEqual(self.private_files(store), [f"{path_key(SEGS)}.json"])
        self.assertEqual(os.stat(target).st_mode & 0o777 & ~0o640, 0)

    def test_commit_describes_the_file_as_stat_does(self) -> None:
        """
        The StoredFile commit returns (built from what it wrote, not read back) is the
        one stat() gives for the stored file: same size, mtime, ETag, type and digest.
        """
        store = self.make_store()
        partial = store.open_partial(SEGS, "image/png", 5)
        partial.write([b"hello"])
        stored = partial.commit("cd" * 32)
        self.assertEqual(stored, store.stat(SEGS))
        self.assertEqual((stored.content_type, stored.sha256), ("image/png", "cd" * 32))

    def test_key_is_sha256_of_joined_path(self) -> None:
        """Private names are sha256("/".join(segments)) so they never contain client text."""
        self.assertEqual(path_key(("a", "b")), hashlib.sha256(b"a/b").hexdigest())
        self.assertEqual(path_key(("é",)), hashlib.sha256("é".encode()).hexdigest())
        self.assertNotEqual(path_key(("a", "b")), path_key(("ab",)))

    def test_commit_loses_to_file_that_appeared(self) -> None:
        """
        A file created at the target during the upload wins: commit answers 409, the existing
        bytes and metadata are untouched, and no partial or temporary metadata remains.
        """
        store = self.make_store()
        partial = store.open_partial(SEGS, "text/plain", 3)
        partial.write([b"new"])
        target = store.target_path(SEGS)
        target.write_bytes(b"old bytes")
        meta_path = store.meta_path(SEGS)
        old_meta = b'{"content_type": "image/png", "sha256": null}'
        meta_path.write_bytes(old_meta)

        e = self.assertRaises(StorageError, partial.commit, None)
        self.assertEqual(e.status, 409)
        self.assertEqual(target.read_bytes(), b"old bytes")
        self.assertEqual(meta_path.read_bytes(), old_meta)
        self.assertEqual(self.private_files(store), [meta_path.name])
        self.assertEqual(partial.fd, -1)
        partial.abort()  # no-op afterwards
        self.assertEqual(target.read_bytes(), b"old bytes")

    def test_directories_made_durable_once(self) -> None:
        """
        A new directory is fsynced into its parent when it is created; a commit fsyncs the
        target's directory after the link.  A second file in the same directory costs that
        one directory fsync, not one per level up to the root.
        """
        store = self.make_store(metadata_xattr=True)
        synced: list[tuple[int, int]] = []
        real_fsync = os.fsync

        def fsync(fd: int) -> None:
            st = os.fstat(fd)
            if stat_mod.S_ISDIR(st.st_mode):
                synced.append((st.st_dev, st.st_ino))
            real_fsync(fd)

        self.patch(storage.os, "fsync", fsync)

        def ident(path: Path) -> tuple[int, int]:
            st = os.stat(path)
            return (st.st_dev, st.st_ino)

        self.upload(store, ("a", "b", "first"), b"1")
        root, a, b = store.root, store.root / "a", store.root / "a" / "b"
        created = [ident(root), ident(a)]  # the entries of a (in root) and b (in a)
        self.assertEqual(synced[:2], created)
        self.assertEqual(synced[2:], [ident(b)])  # the link, in b
        synced.clear()
        self.upload(store, ("a", "b", "second"), b"2")
        self.assertEqual(synced, [ident(b)])

    def test_failure_after_link_leaves_nothing(self) -> None:
        """If commit fails after linking, the target and our metadata are removed again."""
        store = self.make_store()
        partial = store.open_partial(SEGS, "text/plain", 3)
        partial.write([b"abc"])

        def broken_rename(src, dst, **kw):
            raise OSError(errno.EIO, "simulated")

        self.patch(storage.os, "rename", broken_rename)
        e = self.assertRaises(OSError, partial.commit, None)
        self.assertEqual(e.errno, errno.EIO)
        self.assertFalse(os.path.lexists(store.target_path(SEGS)))
        self.assertEqual(self.private_files(store), [])

    def test_enospc_on_fsync_is_507(self) -> None:
        """A full disk at commit becomes 507 and leaves nothing behind."""
        store = self.make_store()
        partial = store.open_partial(SEGS, "text/plain", 3)
        partial.write([b"abc"])

        def full_fsync(fd):
            raise OSError(errno.ENOSPC, "No space left on device")

        self.patch(storage.os, "fsync", full_fsync)
        e = self.assertRaises(StorageError, partial.commit, None)
        self.assertEqual(e.status, 507)
        self.assertFalse(os.path.lexists(store.target_path(SEGS)))
        self.assertEqual(self.private_files(store), [])

    def test_commit_recreates_parent_removed_meanwhile(self) -> None:
        """A parent directory removed during the upload (retention sweep) is recreated."""
        store = self.make_store()
        partial = store.open_partial(SEGS, "text/plain", 2)
        partial.write([b"hi"])
        os.rmdir(store.root / SEGS[0])
        partial.commit(None)
        self.assertEqual(store.target_path(SEGS).read_bytes(), b"hi")

    def test_abort_leaves_nothing(self) -> None:
        """abort removes the partial file and creates nothing at the target; twice is fine."""
        store = self.make_store()
        partial = store.open_partial(SEGS, "text/plain", None)
        partial.write([b"some data"])
        partial.abort()
        partial.abort()
        self.assertEqual(partial.fd, -1)
        self.assertFalse(os.path.lexists(store.target_path(SEGS)))
        self.assertEqual(self.private_files(store), [])
        self.assertRaises(ValueError, partial.write, [b"x"])
        self.assertRaises(ValueError, partial.commit, None)

    def test_abort_after_commit_keeps_file(self) -> None:
        """A late abort after a successful commit touches neither the file nor a new upload."""
        store = self.make_store()
        partial = store.open_partial(SEGS, "text/plain", 2)
        partial.write([b"hi"])
        partial.commit(None)
        self.assertTrue(store.delete(SEGS))
        second = store.open_partial(SEGS, "text/plain", 2)
        partial.abort()
        self.assertTrue(second.path.exists())
        second.abort()

    def test_second_open_is_in_progress(self) -> None:
        """A second upload of the same path while one is running gets 409 in progress."""
        store = self.make_store()
        first = store.open_partial(SEGS, "text/plain", 1)
        e = self.assertRaises(StorageError, store.open_partial, SEGS, "text/plain", 1)
        self.assertEqual((e.status, e.reason), (409, "upload already in progress"))
        first.abort()
        store.open_partial(SEGS, "text/plain", 1).abort()

    def test_open_existing_target_409(self) -> None:
        """Opening an upload for a path that already holds a file is 409 file exists."""
        store = self.make_store()
        self.upload(store, SEGS, b"x")
        self.assertTrue(store.exists(SEGS))
        e = self.assertRaises(StorageError, store.open_partial, SEGS, "text/plain", 1)
        self.assertEqual((e.status, e.reason), (409, "file already exists"))
        self.assertEqual(os.listdir(store.partial_dir), [])

    def test_open_dangling_symlink_target_409(self) -> None:
        """Even a dangling symlink at the target counts as existing (lexists)."""
        store = self.make_store()
        os.mkdir(store.root / SEGS[0])
        os.symlink("/nonexistent-hmacfs-test", store.target_path(SEGS))
        self.assertTrue(store.exists(SEGS))
        e = self.assertRaises(StorageError, store.open_partial, SEGS, "text/plain", 1)
        self.assertEqual(e.status, 409)

    def test_file_where_directory_needed_409(self) -> None:
        """Uploading a/b when a is a file is a conflict, not a server error."""
        store = self.make_store()
        self.upload(store, ("a",), b"x")
        e = self.assertRaises(StorageError, store.open_partial, ("a", "b"), "text/plain", 1)
        self.assertEqual(e.status, 409)


class PathSafetyTests(StoreTestsMixin, SynchronousTestCase):
    def test_target_path_joins_segments(self) -> None:
        """target_path is the root joined with the segments."""
        store = self.make_store()
        self.assertEqual(store.target_path(("a", "b c.txt")), store.root / "a" / "b c.txt")

    def test_target_path_refuses_traversal(self) -> None:
        """Segments that are empty, '.', '..', contain '/' or NUL are refused with 403."""
        store = self.make_store()
        for segs in [
            ("..", "etc"),
            ("a", "..", "..", "x"),
            ("a", ".."),
            (".",),
            ("a", ""),
            ("a/../../x",),
            ("/etc", "passwd"),
            ("a\0b",),
            (),
        ]:
            e = self.assertRaises(StorageError, store.target_path, segs)
            self.assertEqual(e.status, 403, segs)

    def test_normpath_check_alone_refuses_escape(self) -> None:
        """Even if segment validation let '..' through, the commonpath check refuses it."""
        store = self.make_store()
        self.patch(storage, "check_segments", tuple)
        for segs in [("..", "x"), ("a", "..", "..", "x"), ("a", ".."), ()]:
            e = self.assertRaises(StorageError, store.target_path, segs)
            self.assertEqual(e.status, 403, segs)
        self.assertEqual(store.target_path(("a", "..", "b")), store.root / "a" / ".." / "b")

    def test_private_dir_is_reserved(self) -> None:
        """The first segment '.hmacfs' (any case) is never a user path."""
        store = self.make_store()
        for first in (".hmacfs", ".HMACFS"):
            e = self.assertRaises(StorageError, store.target_path, (first, "meta", "x.json"))
            self.assertEqual(e.status, 403)
        self.assertEqual(store.target_path(("a", ".hmacfs")), store.root / "a" / ".hmacfs")

    def test_string_is_not_segments(self) -> None:
        """Passing a plain string instead of segments is a programming error."""
        store = self.make_store()
        self.assertRaises(TypeError, store.target_path, "a/b")

    def test_symlinked_directory_refused(self) -> None:
        """A symlinked directory under root pointing outside is refused; nothing is written."""
        store = self.make_store()
        outside = Path(self.mktemp()).absolute()
        outside.mkdir()
        os.symlink(outside, store.root / "escape")
        e = self.assertRaises(
            StorageError, store.open_partial, ("escape", "sub", "f.txt"), "text/plain", 1
        )
        self.assertEqual(e.status, 403)
        self.assertEqual(os.listdir(outside), [])
        self.assertEqual(os.listdir(store.partial_dir), [])
        self.assertIsNone(store.stat(("escape", "f.txt")))

    def test_symlinked_root_is_fine(self) -> None:
        """The operator may point StoreDir at a symlink; only links below it are refused."""
        real = Path(self.mktemp()).absolute()
        real.mkdir()
        link = Path(self.mktemp())
        os.symlink(real, link)
        store = Store(link)
        self.upload(store, SEGS, b"data")
        self.assertEqual((real / SEGS[0] / SEGS[1]).read_bytes(), b"data")


class StatTests(StoreTestsMixin, SynchronousTestCase):
    def test_stat_missing(self) -> None:
        """stat of a missing file, or below a missing directory, is None."""
        store = self.make_store()
        self.assertIsNone(store.stat(SEGS))
        self.assertIsNone(store.stat(("nodir", "x", "y")))

    def test_stat_directory(self) -> None:
        """stat of a directory is None (we never list directories)."""
        store = self.make_store()
        self.upload(store, SEGS, b"x")
        self.assertIsNone(store.stat(SEGS[:1]))

    def test_stat_symlink(self) -> None:
        """stat of a symlink is None even when it points at a stored file."""
        store = self.make_store()
        self.upload(store, SEGS, b"x")
        os.symlink(store.target_path(SEGS), store.root / "link")
        self.assertIsNone(store.stat(("link",)))

    def test_stat_below_a_file(self) -> None:
        """stat of a/b where a is a file is None, not an error."""
        store = self.make_store()
        self.upload(store, ("a",), b"x")
        self.assertIsNone(store.stat(("a", "b")))

    def test_stat_with_meta(self) -> None:
        """stat reports size, content type and digest from the metadata."""
        store = self.make_store()
        committed = self.upload(store, SEGS, b"hello", "text/plain", "cd" * 32)
        stored = store.stat(SEGS)
        self.assertEqual(stored, committed)
        self.assertEqual(stored.size, 5)
        self.assertEqual(stored.content_type, "text/plain")
        self.assertEqual(stored.sha256, "cd" * 32)
        self.assertEqual(stored.mtime, os.stat(store.target_path(SEGS)).st_mtime)

    def test_stat_without_meta(self) -> None:
        """A file without (or with broken) metadata is served as application/octet-stream."""
        store = self.make_store()
        self.upload(store, SEGS, b"hello", "text/plain")
        store.meta_path(SEGS).unlink()
        stored = store.stat(SEGS)
        self.assertEqual((stored.content_type, stored.sha256), (DEFAULT_CONTENT_TYPE, None))
        store.meta_path(SEGS).write_text("{not json")
        self.assertEqual(store.stat(SEGS).content_type, DEFAULT_CONTENT_TYPE)
        self.assertEqual(len(self.flushLoggedErrors(ValueError)), 1)

    def test_etag(self) -> None:
        """The ETag is strong, stable for an unchanged file, and changes when mtime changes."""
        store = self.make_store()
        self.upload(store, SEGS, b"hello")
        etag = store.stat(SEGS).etag
        self.assertTrue(etag.startswith('"5-') and etag.endswith('"'), etag)
        self.assertEqual(store.stat(SEGS).etag, etag)
        st = os.stat(store.target_path(SEGS))
        os.utime(store.target_path(SEGS), ns=(st.st_atime_ns, st.st_mtime_ns + 1))
        self.assertNotEqual(store.stat(SEGS).etag, etag)

    def test_stat_describes_the_stored_file(self) -> None:
        """stat's path names the committed bytes, described as the commit described them."""
        store = self.make_store()
        committed = self.upload(store, SEGS, b"hello")
        stored = store.stat(SEGS)
        self.assertEqual(stored, committed)
        self.assertEqual(stored.path.read_bytes(), b"hello")
        self.assertEqual(stored.path, store.target_path(SEGS))
        self.assertIsNone(store.stat(("missing",)))
        self.assertIsNone(store.stat(SEGS[:1]))

    def test_delete(self) -> None:
        """delete removes the file and its metadata; False when there is nothing to delete."""
        store = self.make_store()
        self.upload(store, SEGS, b"hello")
        self.assertTrue(store.delete(SEGS))
        self.assertFalse(os.path.lexists(store.target_path(SEGS)))
        self.assertFalse(store.meta_path(SEGS).exists())
        self.assertFalse(store.delete(SEGS))
        self.assertFalse(store.delete(SEGS[:1]))
        self.assertTrue((store.root / SEGS[0]).is_dir())


class FreeSpaceTests(StoreTestsMixin, SynchronousTestCase):
    def fake_statvfs(self, path):
        return SimpleNamespace(f_bavail=10, f_frsize=100)

    def test_free_bytes(self) -> None:
        """free_bytes is the unprivileged space: f_bavail * f_frsize of the store."""
        store = self.make_store()
        self.patch(storage.os, "statvfs", self.fake_statvfs)
        self.assertEqual(store.free_bytes(), 1000)

    def test_reserve_boundary(self) -> None:
        """An upload may use space down to exactly min_free_bytes, not one byte more."""
        store = self.make_store(min_free_bytes=500)
        self.patch(storage.os, "statvfs", self.fake_statvfs)
        store.reserve(500).release()
        e = self.assertRaises(StorageError, store.reserve, 501)
        self.assertEqual((e.status, e.reason), (507, "insufficient storage"))

    def test_reading_reused_far_from_full(self) -> None:
        """
        Far from full, admissions within FREE_SPACE_TTL share one statvfs, less what was
        written since; an older reading, or one whose margin the need would eat, is read again.
        """
        store = self.make_store(min_free_bytes=1000)
        calls: list[str] = []
        free = [10 * storage.FREE_SPACE_MARGIN]
        clock = [100.0]

        def fake_statvfs(path):
            calls.append(path)
            return SimpleNamespace(f_bavail=free[0], f_frsize=1)

        self.patch(storage.os, "statvfs", fake_statvfs)
        self.patch(storage, "_monotonic", lambda: clock[0])
        store.reserve(10).release()
        first = store.reserve(4096)
        first.consume(4096)  # written: the estimate drops by it
        first.release()
        self.assertEqual(len(calls), 1)
        self.assertEqual(store._free_for(0), free[0] - 4096)
        clock[0] += storage.FREE_SPACE_TTL
        store.reserve(10).release()
        self.assertEqual(len(calls), 2)  # too old
        free[0] = storage.FREE_SPACE_MARGIN + 1000 + 10
        clock[0] += storage.FREE_SPACE_TTL
        store.reserve(10).release()
        self.assertEqual(len(calls), 3)
        store.reserve(10).release()  # leaves exactly the margin: reused
        self.assertEqual(len(calls), 3)
        store.reserve(11).release()  # the margin would not hold for 11: read again
        self.assertEqual(len(calls), 4)
        # Near full, every admission reads the disk again, however young the reading.
        clock[0] += storage.FREE_SPACE_TTL
        free[0] = 1005
        store.reserve(1).release()
        store.reserve(1).release()
        self.assertEqual(len(calls), 6)
        free[0] = 1000
        e = self.assertRaises(StorageError, store.reserve, 1)
        self.assertEqual((e.status, len(calls)), (507, 7))

    def test_reserve_real(self) -> None:
        """On the real filesystem, a huge reserve gives 507 and none passes for 0 bytes."""
        store = self.make_store(min_free_bytes=2**62)
        e = self.assertRaises(StorageError, store.reserve, 0)
        self.assertEqual(e.status, 507)
        self.make_store().reserve(0).release()


class WriteTests(StoreTestsMixin, SynchronousTestCase):
    def test_short_writes(self) -> None:
        """write() finishes the job when writev writes one byte at a time."""
        store = self.make_store()
        calls = []

        def one_byte_writev(fd, buffers):
            calls.append(len(buffers))
            for buf in buffers:
                if len(buf):
                    return os.write(fd, bytes(buf[:1]))
            return 0

        self.patch(storage.os, "writev", one_byte_writev)
        partial = store.open_partial(SEGS, "text/plain", None)
        self.assertEqual(partial.write([b"abc", b"", b"de"]), 5)
        self.assertEqual(partial.write([b"f"]), 1)
        self.assertEqual(len(calls), 6)
        partial.commit(None)
        self.assertEqual(store.target_path(SEGS).read_bytes(), b"abcdef")
        self.assertEqual(store.stat(SEGS).size, 6)

    def test_many_chunks(self) -> None:
        """More chunks than the kernel's IOV_MAX in one call are all written in order."""
        store = self.make_store()
        chunks = [bytes([i % 256]) * (i % 3 + 1) for i in range(5000)]
        partial = store.open_partial(SEGS, "text/plain", None)
        self.assertEqual(partial.write(chunks), sum(map(len, chunks)))
        partial.commit(None)
        self.assertEqual(store.target_path(SEGS).read_bytes(), b"".join(chunks))

    def test_write_enospc(self) -> None:
        """A full disk during write becomes 507; abort then leaves nothing."""
        store = self.make_store()

        def full(fd, buffers):
            raise OSError(errno.ENOSPC, "No space left on device")

        partial = store.open_partial(SEGS, "text/plain", None)
        self.patch(storage.os, "writev", full)
        e = self.assertRaises(StorageError, partial.write, [b"x"])
        self.assertEqual(e.status, 507)
        partial.abort()
        self.assertEqual(self.private_files(store), [])

    @settings(derandomize=True, deadline=None, max_examples=200)
    @given(
        body=st.binary(max_size=4096),
        cuts=st.lists(st.integers(min_value=0, max_value=4096), max_size=20),
        groups=st.lists(st.integers(min_value=1, max_value=5), max_size=20),
    )
    def test_any_chunking_same_bytes(self, body: bytes, cuts: list[int], groups: list[int]):
        """Any split of a body into chunks and write() calls commits exactly the body."""
        store = self.make_store()
        points = sorted({min(c, len(body)) for c in cuts} | {0, len(body)})
        chunks = [body[a:b] for a, b in itertools.pairwise(points)]
        partial = store.open_partial(SEGS, "application/octet-stream", len(body))
        i = 0
        for n in groups + [len(chunks)]:
            partial.write(chunks[i : i + n])
            i += n
        stored = partial.commit(None)
        self.assertEqual(store.target_path(SEGS).read_bytes(), body)
        self.assertEqual(stored.size, len(body))
        self.assertEqual(partial.written, len(body))


class StalePartialTests(SynchronousTestCase):
    """
    Leftover partial files from a crash do not block their path: only a live writer's
    lock does (issue 3: this used to be decided by the partial's age, ``stale_after``).
    """

    def setUp(self) -> None:
        self.root = Path(self.mktemp()).resolve()
        self.root.mkdir()
        self.clock = [1_000_000.0]
        self.store = Store(self.root, now=lambda: self.clock[0])

    def test_fresh_partial_blocks(self) -> None:
        """A partial whose writer still holds it means an upload in progress: 409."""
        first = self.store.open_partial(("u", "f"), "text/plain", 3)
        os.utime(first.path, (self.clock[0] - 10, self.clock[0] - 10))
        error = self.assertRaises(StorageError, self.store.open_partial, ("u", "f"), "text/plain", 3)
        self.assertEqual(error.status, 409)
        first.abort()

    def test_stale_partial_replaced(self) -> None:
        """A partial nobody holds (its writer is gone) is replaced and the new upload proceeds."""
        first = self.store.open_partial(("u", "g"), "text/plain", 3)
        os.close(first.fd)
        os.utime(first.path, (self.clock[0] - 500, self.clock[0] - 500))
        second = self.store.open_partial(("u", "g"), "text/plain", 3)
        second.write([b"abc"])
        second.commit(None)
        self.assertEqual((self.root / "u" / "g").read_bytes(), b"abc")


class ResumableStoreTests(StoreTestsMixin, SynchronousTestCase):
    """Partial files kept for a resume: release, reopen, truncate, records, locks, sweeps."""

    def test_release_keeps_bytes_and_record(self) -> None:
        """release() keeps the partial and its record and lets go of the lock; resume reopens at its end."""
        store = self.make_store()
        partial = store.open_partial(SEGS, "image/jpeg", 10, record={"token": "t"})
        partial.write([b"abcd"])
        self.assertEqual(partial.release(), 4)
        self.assertEqual(partial.release(), 4)  # idempotent
        self.assertEqual(partial.fd, -1)
        self.assertRaises(ValueError, partial.write, [b"x"])
        status = store.partial_status(SEGS)
        self.assertEqual(status[0], 4)
        self.assertEqual((status[1]["token"], status[1]["size"], status[1]["path"]), ("t", 10, "0123abcd/photo.jpg"))
        again = store.resume_partial(SEGS)
        self.assertEqual((again.written, again.offset, again.size, again.content_type), (4, 4, 10, "image/jpeg"))
        again.write([b"efghij"])
        again.commit(None)
        self.assertEqual(store.target_path(SEGS).read_bytes(), b"abcdefghij")
        self.assertIsNone(store.partial_status(SEGS))
        self.assertEqual(self.private_files(store), [f"{path_key(SEGS)}.json"])  # the meta only

    def test_one_writer_per_partial(self) -> None:
        """While a writer holds the partial, neither a fresh open nor a resume gets it (409)."""
        store = self.make_store()
        first = store.open_partial(SEGS, "text/plain", 10)
        first.write([b"12"])
        for opener in (lambda: store.open_partial(SEGS, "text/plain", 10), lambda: store.resume_partial(SEGS)):
            error = self.assertRaises(StorageError, opener)
            self.assertEqual((error.status, error.reason), (409, "upload already in progress"))
        self.assertFalse(store.writer_lock_free(path_key(SEGS)))
        first.release()
        self.assertTrue(store.writer_lock_free(path_key(SEGS)))
        store.resume_partial(SEGS).abort()
        self.assertEqual(self.private_files(store), [])

    def test_fresh_open_truncates_leftover(self) -> None:
        """A fresh open of an interrupted upload starts from zero with a new record."""
        store = self.make_store()
        old = store.open_partial(SEGS, "text/plain", 10, record={"token": "old"})
        old.write([b"stale data"])
        old.release()
        new = store.open_partial(SEGS, "text/plain", 3, record={"token": "new"})
        self.assertEqual((new.written, os.path.getsize(new.path)), (0, 0))
        self.assertEqual(store.partial_status(SEGS)[1]["token"], "new")
        new.write([b"abc"])
        new.commit(None)
        self.assertEqual(store.target_path(SEGS).read_bytes(), b"abc")

    def test_one_request_open_writes_no_record(self) -> None:
        """
        open_partial(resumable=False) on a new partial writes no sidecar (nothing could
        resume it) and commits like any other upload, leaving only the metadata.
        """
        store = self.make_store()
        partial = store.open_partial(SEGS, "text/plain", 3, resumable=False)
        self.assertFalse(partial.has_record)
        self.assertEqual(self.private_files(store), [f"{path_key(SEGS)}.part"])
        self.assertIsNone(store.partial_status(SEGS))
        partial.write([b"abc"])
        stored = partial.commit(None)
        self.assertEqual(stored.size, 3)
        self.assertEqual(store.target_path(SEGS).read_bytes(), b"abc")
        self.assertEqual(self.private_files(store), [f"{path_key(SEGS)}.json"])

    def test_one_request_open_over_leftover_replaces_its_record(self) -> None:
        """
        open_partial(resumable=False) over an interrupted upload truncates it and writes
        a fresh record, so the old record never describes the new bytes.
        """
        store = self.make_store()
        old = store.open_partial(SEGS, "text/plain", 10, record={"token": "old"})
        old.write([b"stale data"])
        old.release()
        new = store.open_partial(SEGS, "text/plain", 3, record=None, resumable=False)
        self.assertTrue(new.has_record)
        self.assertEqual((new.written, os.path.getsize(new.path)), (0, 0))
        self.assertNotEqual(store.partial_status(SEGS)[1].get("token"), "old")
        new.write([b"abc"])
        new.commit(None)
        self.assertEqual(store.target_path(SEGS).read_bytes(), b"abc")
        self.assertEqual(self.private_files(store), [f"{path_key(SEGS)}.json"])

    def test_one_request_open_still_one_writer(self) -> None:
        """A writer holding the partial refuses a one-request open too (409), and vice versa."""
        store = self.make_store()
        first = store.open_partial(SEGS, "text/plain", 10, resumable=False)
        error = self.assertRaises(StorageError, store.open_partial, SEGS, "text/plain", 10)
        self.assertEqual((error.status, error.reason), (409, "upload already in progress"))
        first.abort()
        second = store.open_partial(SEGS, "text/plain", 10)
        error = self.assertRaises(
            StorageError, store.open_partial, SEGS, "text/plain", 10, resumable=False
        )
        self.assertEqual(error.status, 409)
        second.abort()
        self.assertEqual(self.private_files(store), [])

    def test_resume_needs_a_record(self) -> None:
        """Nothing to resume without a partial, or with a partial that has no record."""
        store = self.make_store()
        self.assertIsNone(store.resume_partial(SEGS))
        partial = store.open_partial(SEGS, "text/plain", 10)
        partial.write([b"x"])
        partial.release()
        store.record_path(SEGS).unlink()
        self.assertIsNone(store.resume_partial(SEGS))
        self.assertTrue(store.writer_lock_free(path_key(SEGS)))  # the probe let go again

    def test_resume_when_file_exists_409(self) -> None:
        """A resume after the file appeared is 409 file already exists."""
        store = self.make_store()
        self.upload(store, SEGS, b"done")
        error = self.assertRaises(StorageError, store.resume_partial, SEGS)
        self.assertEqual((error.status, error.reason), (409, "file already exists"))

    def test_truncate_and_hash_prefix(self) -> None:
        """truncate() cuts a bad chunk off; hash_prefix() reads back exactly the first bytes."""
        store = self.make_store()
        partial = store.open_partial(SEGS, "text/plain", 100)
        partial.write([b"good-", b"BAD"])
        partial.truncate(5)
        partial.write([b"fine"])
        self.assertEqual(partial.path.read_bytes(), b"good-fine")
        digest = hashlib.sha256()
        partial.hash_prefix(digest, 7, block=2)
        self.assertEqual(digest.hexdigest(), hashlib.sha256(b"good-fi").hexdigest())
        self.assertRaises(OSError, partial.hash_prefix, hashlib.sha256(), 50)
        partial.abort()

    def test_remove_partial(self) -> None:
        """remove_partial drops an interrupted upload; 409 while written; False when there is none."""
        store = self.make_store()
        partial = store.open_partial(SEGS, "text/plain", 10)
        self.assertRaises(StorageError, store.remove_partial, SEGS)
        partial.release()
        self.assertTrue(store.remove_partial(SEGS))
        self.assertEqual(self.private_files(store), [])
        self.assertFalse(store.remove_partial(SEGS))

    def test_commit_holds_lock_until_unlinked(self) -> None:
        """Nobody can lock the partial between commit's link and unlink (a reopen sees a new file)."""
        store = self.make_store()
        partial = store.open_partial(SEGS, "text/plain", 2)
        partial.write([b"hi"])
        seen = []
        real_link = os.link

        def link(src, dst, **kw):
            real_link(src, dst, **kw)
            seen.append(store.writer_lock_free(path_key(SEGS)))

        self.patch(storage.os, "link", link)
        partial.commit(None)
        self.assertEqual(seen, [False])

    def test_takeover_markers(self) -> None:
        """A takeover request is seen by writers older than it, and cleared."""
        store = self.make_store()
        self.assertFalse(store.takeover_requested(SEGS, 0))
        store.request_takeover(SEGS)
        marker = store.partial_dir / f"{path_key(SEGS)}.takeover"
        os.utime(marker, (1000.0, 1000.0))
        self.assertTrue(store.takeover_requested(SEGS, 999.0))
        self.assertFalse(store.takeover_requested(SEGS, 1001.0))
        store.clear_takeover(SEGS)
        self.assertFalse(marker.exists())

    def test_sweep(self) -> None:
        """sweep_partials removes idle unlocked uploads and orphan records, nothing else."""
        clock = [1_000_000.0]
        store = self.make_store(now=lambda: clock[0])
        idle = store.open_partial(("a", "idle"), "text/plain", 5)
        idle.release()
        busy = store.open_partial(("a", "busy"), "text/plain", 5)
        recent = store.open_partial(("a", "recent"), "text/plain", 5)
        recent.release()
        orphan = store.partial_dir / ("f" * 64 + ".json")
        orphan.write_text("{}")
        for path in (idle.path, store.record_path(idle.segments), busy.path, orphan):
            os.utime(path, (clock[0] - 100, clock[0] - 100))
        self.assertEqual(store.sweep_partials(50), 1)
        self.assertFalse(idle.path.exists())
        self.assertFalse(store.record_path(idle.segments).exists())
        self.assertFalse(orphan.exists())
        self.assertTrue(busy.path.exists())
        self.assertTrue(recent.path.exists())
        busy.abort()


class OneJobUploadTests(StoreTestsMixin, SynchronousTestCase):
    """``open_partial(keep_parents=True)``: an upload committed in the job that admits it."""

    def test_own_name_beside_an_interrupted_upload(self) -> None:
        """Its partial file has a name of its own: an interrupted upload of the same path
        (its partial and record) is left as it was, and the finished file wins over it."""
        store = self.make_store()
        interrupted = store.open_partial(SEGS, "text/plain", 10, record={"k": "v"})
        interrupted.write([b"12345"])
        interrupted.release()
        before = sorted(os.listdir(store.partial_dir))
        whole = store.open_partial(SEGS, "text/plain", 3, resumable=False, keep_parents=True)
        self.assertNotEqual(whole.path, interrupted.path)
        self.assertEqual(len(os.listdir(store.partial_dir)), len(before) + 1)
        whole.write([b"abc"])
        whole.commit(None)
        self.assertEqual(store.target_path(SEGS).read_bytes(), b"abc")
        self.assertEqual(sorted(os.listdir(store.partial_dir)), before)
        self.assertEqual(interrupted.path.read_bytes(), b"12345")
        e = self.assertRaises(StorageError, store.resume_partial, SEGS)
        self.assertEqual(e.status, 409)

    def test_abort_removes_only_its_own(self) -> None:
        store = self.make_store()
        held = store.open_partial(SEGS, "text/plain", 10, record={"k": "v"})
        whole = store.open_partial(SEGS, "text/plain", 3, resumable=False, keep_parents=True)
        whole.write([b"abc"])
        whole.abort()
        self.assertEqual(
            sorted(os.listdir(store.partial_dir)), sorted([held.path.name, store.record_path(SEGS).name])
        )
        self.assertFalse(store.target_path(SEGS).exists())
        held.abort()

    def test_existing_file_is_409_at_the_commit(self) -> None:
        """No existence check at the admission: the link refuses, the old file untouched."""
        store = self.make_store()
        self.upload(store, SEGS, b"old")
        whole = store.open_partial(SEGS, "text/plain", 3, resumable=False, keep_parents=True)
        whole.write([b"new"])
        e = self.assertRaises(StorageError, whole.commit, None)
        self.assertEqual(e.status, 409)
        self.assertEqual(store.target_path(SEGS).read_bytes(), b"old")
        self.assertEqual(self.private_files(store), [f"{path_key(SEGS)}.json"])  # its metadata only

    def test_abandoned_is_swept(self) -> None:
        """Left behind by a crash (its descriptor gone), it is swept once idle; held, never."""
        clock = [1_000_000.0]
        store = self.make_store(now=lambda: clock[0])
        held = store.open_partial(("a", "held"), "text/plain", 1, resumable=False, keep_parents=True)
        left = store.open_partial(("a", "left"), "text/plain", 1, resumable=False, keep_parents=True)
        os.close(left.fd)  # the process died: its lock went with it
        left.fd = -1
        for path in (held.path, left.path):
            os.utime(path, (clock[0] - 100, clock[0] - 100))
        self.assertEqual(store.sweep_partials(50), 1)
        self.assertFalse(left.path.exists())
        self.assertTrue(held.path.exists())
        held.abort()
        left.close()


class MetaCacheTests(SynchronousTestCase):
    def test_cache_follows_file_identity(self) -> None:
        """Metadata is read once per finished file and re-read when the file is replaced;
        a file without metadata yet is not cached with the default type."""
        root = Path(self.mktemp()).resolve()
        root.mkdir()
        store = Store(root, metadata_xattr=False)
        partial = store.open_partial(("c", "f"), "image/png", 3)
        partial.write([b"abc"])
        partial.commit(None)
        self.assertEqual(store.stat(("c", "f")).content_type, "image/png")
        reads = []
        original = metadata.read_meta
        self.patch(metadata, "read_meta", lambda *args: reads.append(args) or original(*args))
        self.assertEqual(store.stat(("c", "f")).content_type, "image/png")
        self.assertEqual(reads, [])
        # Replaced by another file (new inode): read again.
        store.delete(("c", "f"))
        partial = store.open_partial(("c", "f"), "text/plain", 2)
        partial.write([b"xy"])
        partial.commit(None)
        self.assertEqual(store.stat(("c", "f")).content_type, "text/plain")
        self.assertEqual(len(reads), 1)
        # A file whose metadata is missing is served with the default type, uncached.
        (root / "c" / "bare").write_bytes(b"1")
        self.assertEqual(store.stat(("c", "bare")).content_type, "application/octet-stream")
        meta = store.meta_path(("c", "bare"))
        meta.write_text('{"content_type": "audio/ogg"}')
        self.assertEqual(store.stat(("c", "bare")).content_type, "audio/ogg")


class XattrMetadataTests(StoreTestsMixin, SynchronousTestCase):
    """Metadata in the file's ``user.hmacfs`` attribute (MetadataXattr, the default)."""

    metadata_xattr = True

    def setUp(self) -> None:
        probe = self.make_store()
        if not probe.xattrs:  # pragma: no cover - every filesystem the tests run on has them
            self.fail(f"{probe.root}: no user extended attributes")

    def test_commit_sets_the_attribute_and_no_sidecar(self) -> None:
        """The documented metadata, on the file itself; nothing in .hmacfs/meta or partial."""
        store = self.make_store()
        stored = self.upload(store, SEGS, b"abc", "image/jpeg", "ab" * 32)
        target = store.root / "0123abcd" / "photo.jpg"
        meta = json.loads(os.getxattr(target, metadata.XATTR))
        self.assertEqual(
            meta,
            {
                "path": "0123abcd/photo.jpg",
                "content_type": "image/jpeg",
                "size": 3,
                "sha256": "ab" * 32,
                "created": 1700000000.5,
            },
        )
        self.assertEqual(self.private_files(store), [])
        self.assertEqual(stored, store.stat(SEGS))

    def test_attribute_is_set_before_the_data_fsync(self) -> None:
        """The data fsync makes the attribute durable with the bytes: it comes first."""
        store = self.make_store()
        events: list[str] = []
        real_setxattr, real_fsync = metadata.os.setxattr, storage.os.fsync
        self.patch(metadata.os, "setxattr", lambda *a, **k: events.append("setxattr") or real_setxattr(*a, **k))
        def fsync(fd: int) -> None:
            if stat_mod.S_ISREG(os.fstat(fd).st_mode):
                events.append("fsync")  # the data's (directories are fsynced too)
            real_fsync(fd)

        self.patch(storage.os, "fsync", fsync)
        self.upload(store, SEGS, b"abc")
        self.assertEqual(events[:2], ["setxattr", "fsync"])
        self.assertNotIn("setxattr", events[2:])

    def test_stat_reads_the_attribute_once(self) -> None:
        """A GET of a file with the attribute: read once, then no call beyond the lstat."""
        store = self.make_store()
        self.upload(store, SEGS, b"abc", "audio/ogg")
        reads: list[object] = []
        real = metadata.os.getxattr
        self.patch(metadata.os, "getxattr", lambda *a, **k: reads.append(a) or real(*a, **k))
        stats: list[object] = []
        real_stat = metadata.os.stat
        self.patch(metadata.os, "stat", lambda *a, **k: stats.append(a) or real_stat(*a, **k))
        for _ in range(3):
            self.assertEqual(store.stat(SEGS).content_type, "audio/ogg")
        # The lstat of the file itself, no sidecar stat.
        self.assertEqual((len(reads), stats), (1, [("photo.jpg",)] * 3))

    def test_sidecar_files_still_served(self) -> None:
        """A file stored with a sidecar (before, or with MetadataXattr = false) keeps its type;
        its attribute, where it has one, wins over a stale sidecar."""
        root = Path(self.mktemp())
        root.mkdir()
        old = Store(root, metadata_xattr=False)
        partial = old.open_partial(("s", "old"), "image/gif", 1)
        partial.write([b"g"])
        partial.commit(None)
        new = Store(root)
        self.assertEqual(new.stat(("s", "old")).content_type, "image/gif")
        partial = new.open_partial(("s", "new"), "image/webp", 1)
        partial.write([b"w"])
        partial.commit(None)
        new.meta_path(("s", "new")).write_text('{"content_type": "text/stale"}')
        self.assertEqual(Store(root).stat(("s", "new")).content_type, "image/webp")
        self.assertEqual(old.stat(("s", "new")).content_type, "image/webp")

    def test_refused_attribute_falls_back_to_a_sidecar(self) -> None:
        """An attribute the filesystem refuses (too big for its attribute space): a sidecar."""
        store = self.make_store()

        def refuse(*args: object, **kwargs: object) -> None:
            raise OSError(errno.E2BIG, "Argument list too long")

        self.patch(metadata.os, "setxattr", refuse)
        self.upload(store, SEGS, b"abc", "image/png")
        self.assertEqual(self.private_files(store), [f"{path_key(SEGS)}.json"])
        self.assertEqual(store.stat(SEGS).content_type, "image/png")

    def test_failure_after_link_leaves_nothing(self) -> None:
        """A commit that fails after the link removes the target (and with it the attribute)."""
        store = self.make_store()
        partial = store.open_partial(SEGS, "text/plain", 3)
        partial.write([b"abc"])

        real_unlink = os.unlink
        calls: list[object] = []

        def unlink_fails_once(*args: object, **kwargs: Any) -> None:
            calls.append(args)
            if len(calls) == 1:  # the partial's name, right after the link
                raise OSError(errno.EIO, "simulated")
            real_unlink(*args, **kwargs)  # type: ignore[arg-type]

        self.patch(storage_commit.os, "unlink", unlink_fails_once)
        self.assertRaises(OSError, partial.commit, None)
        self.assertFalse(os.path.lexists(store.target_path(SEGS)))
        self.assertEqual(self.private_files(store), [])

    def test_cache_follows_the_attribute(self) -> None:
        """The attribute changed (its ctime moves): read again."""
        store = self.make_store()
        self.upload(store, SEGS, b"abc", "image/png")
        self.assertEqual(store.stat(SEGS).content_type, "image/png")
        target = store.target_path(SEGS)
        os.setxattr(target, metadata.XATTR, b'{"content_type": "image/avif"}')
        self.assertEqual(store.stat(SEGS).content_type, "image/avif")

    def test_no_attributes_means_sidecars(self) -> None:
        """A filesystem without user attributes (the probe fails): sidecars, as before."""

        def unsupported(*args: object, **kwargs: object) -> None:
            raise OSError(errno.EOPNOTSUPP, "Operation not supported")

        self.patch(metadata.os, "setxattr", unsupported)
        store = self.make_store()
        self.assertFalse(store.xattrs)
        self.upload(store, SEGS, b"abc", "image/png")
        self.assertEqual(self.private_files(store), [f"{path_key(SEGS)}.json"])
        self.assertEqual(store.stat(SEGS).content_type, "image/png")
        self.assertFalse([n for n in os.listdir(store.root / ".hmacfs") if n.startswith(".xattr-probe")])


class ReservationTests(StoreTestsMixin, SynchronousTestCase):
    """Space is promised to uploads in flight, so concurrent admissions cannot share it."""

    MIB = 1024 * 1024

    def fake_free(self, free: int) -> None:
        self.patch(
            storage.os, "statvfs", lambda path: SimpleNamespace(f_bavail=free // 4096, f_frsize=4096)
        )

    def test_two_uploads_cannot_share_the_free_space(self) -> None:
        """On 20 MiB free, a 12 MiB upload in flight leaves no room for a second one."""
        store = self.make_store()
        self.fake_free(20 * self.MIB)
        first = store.reserve(12 * self.MIB)
        self.assertEqual(store.reserved_bytes, 12 * self.MIB)
        e = self.assertRaises(StorageError, store.reserve, 12 * self.MIB)
        self.assertEqual((e.status, e.reason), (507, "insufficient storage"))
        self.assertRaises(StorageError, store.reserve, 12 * self.MIB)
        store.reserve(8 * self.MIB).release()
        first.release()
        first.release()  # idempotent
        self.assertEqual(store.reserved_bytes, 0)
        store.reserve(12 * self.MIB).release()

    def test_reservation_shrinks_as_bytes_land_and_ends_with_the_upload(self) -> None:
        """Written bytes stop counting as promised (statvfs sees them); every end releases."""
        store = self.make_store()
        for end in ("commit", "abort", "release"):
            partial = store.open_partial(("r", end), "text/plain", 10)
            partial.reservation = store.reserve(10)
            partial.write([b"abcd"])
            self.assertEqual(store.reserved_bytes, 6)
            if end == "commit":
                partial.write([b"efghijklmn"])  # more than promised: never negative
                self.assertEqual(store.reserved_bytes, 0)
                partial.commit(None)
            else:
                getattr(partial, end)()
            self.assertEqual(store.reserved_bytes, 0, end)

    def test_failed_commit_releases(self) -> None:
        store = self.make_store()
        partial = store.open_partial(SEGS, "text/plain", 10)
        partial.reservation = store.reserve(10)
        store.target_path(SEGS).write_bytes(b"there first")
        self.assertRaises(StorageError, partial.commit, None)
        self.assertEqual(store.reserved_bytes, 0)


class SidecarSpaceTests(StoreTestsMixin, SynchronousTestCase):
    def test_enospc_writing_the_sidecar_leaves_nothing(self) -> None:
        """A full disk while writing the record (.json.tmp): 507, no tmp, no partial file."""
        store = self.make_store()

        def full_write(fd, data):
            raise OSError(errno.ENOSPC, "No space left on device")

        self.patch(storage.os, "write", full_write)
        e = self.assertRaises(StorageError, store.open_partial, SEGS, "text/plain", 10)
        self.assertEqual(e.status, 507)
        self.assertEqual(self.private_files(store), [])

    def test_enospc_writing_metadata_leaves_nothing(self) -> None:
        store = self.make_store()
        partial = store.open_partial(SEGS, "text/plain", 2)
        partial.write([b"hi"])

        def full_write(fd, data):
            raise OSError(errno.ENOSPC, "No space left on device")

        self.patch(storage.os, "write", full_write)
        e = self.assertRaises(StorageError, partial.commit, None)
        self.assertEqual(e.status, 507)
        self.assertEqual(self.private_files(store), [])
        self.assertFalse(os.path.lexists(store.target_path(SEGS)))


def captured_log(test) -> list[dict]:
    """The store's log events during ``test`` (its modules share one logger)."""
    events: list[dict] = []
    test.patch(fsio.log, "observer", events.append)
    return events


def levels(events: list[dict], level: str) -> list[dict]:
    return [event for event in events if event["log_level"].name == level]


class PrivateDirLinkTests(StoreTestsMixin, SynchronousTestCase):
    """No link below StoreDir is ever followed: not in .hmacfs, not in the upload tree."""

    def outside(self) -> Path:
        outside = Path(self.mktemp()).absolute()
        outside.mkdir()
        # Files an abandoned-upload sweep would remove if it followed a link here.
        for name in ("a" * 64 + ".json", "b" * 64 + ".tmp", "notes.json"):
            (outside / name).write_text("{}")
            os.utime(outside / name, (1000.0, 1000.0))
        return outside

    def assertUntouched(self, outside: Path) -> None:
        self.assertEqual(
            sorted(os.listdir(outside)), ["a" * 64 + ".json", "b" * 64 + ".tmp", "notes.json"]
        )

    def test_symlinked_private_dir_at_start_is_refused(self) -> None:
        root = Path(self.mktemp()).absolute()
        root.mkdir()
        outside = self.outside()
        os.symlink(outside, root / ".hmacfs")
        events = captured_log(self)
        e = self.assertRaises(StorageError, Store, root)
        self.assertEqual(e.status, 503)
        self.assertUntouched(outside)
        self.assertEqual(len(levels(events, "error")), 1)

    def test_partial_dir_replaced_by_symlink_while_running(self) -> None:
        """Uploads get a clean 503 and the sweep deletes nothing through the link."""
        store = self.make_store(now=lambda: 10_000_000.0)
        outside = self.outside()
        os.rmdir(store.partial_dir)
        os.symlink(outside, store.partial_dir)
        events = captured_log(self)
        e = self.assertRaises(StorageError, store.open_partial, SEGS, "text/plain", 3)
        self.assertEqual((e.status, e.reason), (503, "store unavailable"))
        self.assertEqual(store.sweep_partials(1), 0)
        self.assertUntouched(outside)
        self.assertFalse(os.path.lexists(store.root / SEGS[0] / SEGS[1]))
        self.assertEqual(len(levels(events, "error")), 1)  # once, not per request

    def test_private_dir_replaced_by_symlink_while_running(self) -> None:
        store = self.make_store(now=lambda: 10_000_000.0)
        outside = self.outside()
        (outside / "partial").mkdir()
        (outside / "meta").mkdir()
        for name in os.listdir(outside):
            if name.endswith((".json", ".tmp")):
                os.rename(outside / name, outside / "partial" / name)
        import shutil

        shutil.rmtree(store.root / ".hmacfs")
        os.symlink(outside, store.root / ".hmacfs")
        e = self.assertRaises(StorageError, store.open_partial, SEGS, "text/plain", 3)
        self.assertEqual(e.status, 503)
        self.assertEqual(store.sweep_partials(1), 0)
        self.assertEqual(len(os.listdir(outside / "partial")), 3)
        self.assertEqual(os.listdir(outside / "meta"), [])

    def test_linked_partial_dir_moved_away_is_noticed_on_recheck(self) -> None:
        """A directory renamed away and replaced by a link is caught at the next recheck."""
        store = self.make_store()
        outside = self.outside()
        os.rename(store.partial_dir, store.root / "moved")
        os.symlink(outside, store.partial_dir)
        self.patch(fs_dirs, "DIR_RECHECK_SECONDS", 0.0)
        e = self.assertRaises(StorageError, store.open_partial, SEGS, "text/plain", 3)
        self.assertEqual(e.status, 503)
        self.assertUntouched(outside)

    def test_intermediate_directory_swapped_for_a_link_during_upload(self) -> None:
        """
        A directory of the upload path replaced by a link to elsewhere between open and
        commit: the commit's openat walk refuses the link (403), nothing is written there.
        """
        store = self.make_store()
        segs = ("dir", "sub", "f.txt")
        partial = store.open_partial(segs, "text/plain", 3)
        partial.write([b"abc"])
        outside = Path(self.mktemp()).absolute()
        (outside / "sub").mkdir(parents=True)
        os.rename(store.root / "dir", store.root / "old")
        os.symlink(outside, store.root / "dir")
        e = self.assertRaises(StorageError, partial.commit, None)
        self.assertEqual(e.status, 403)
        self.assertEqual(os.listdir(outside / "sub"), [])
        self.assertEqual(self.private_files(store), [])
        # Reads never go through it either.
        (outside / "sub" / "f.txt").write_bytes(b"secret")
        self.assertIsNone(store.stat(segs))
        self.assertFalse(store.delete(segs))
        self.assertTrue((outside / "sub" / "f.txt").exists())
        self.flushLoggedErrors()

    def test_symlinked_partial_file_is_not_followed(self) -> None:
        """A link planted at a partial file's name is neither written through nor swept."""
        store = self.make_store(now=lambda: 10_000_000.0)
        outside = self.outside()
        link = store.partial_path(SEGS)
        os.symlink(outside / "notes.json", link)
        os.utime(link, (1000.0, 1000.0), follow_symlinks=False)
        self.assertEqual(store.sweep_partials(1), 0)
        self.assertTrue(link.is_symlink())
        record = store.record_path(SEGS)
        os.symlink(outside / "notes.json", record)
        partial = store.open_partial(SEGS, "text/plain", 3)  # the planted links are replaced
        partial.write([b"abc"])
        self.assertFalse(record.is_symlink())
        partial.commit(None)
        self.assertEqual(store.target_path(SEGS).read_bytes(), b"abc")
        self.assertEqual((outside / "notes.json").read_text(), "{}")
        self.assertUntouched(outside)


class RecreateTests(StoreTestsMixin, SynchronousTestCase):
    """Private directories removed under a running store come back (one warning)."""

    def assertRecreated(self, store: Store, events: list[dict]) -> None:
        self.upload(store, SEGS, b"after")
        self.assertEqual(store.target_path(SEGS).read_bytes(), b"after")
        self.assertEqual(store.stat(SEGS).content_type, "image/jpeg")
        self.assertTrue(store.partial_dir.is_dir() and not store.partial_dir.is_symlink())
        self.assertEqual(len(levels(events, "warn")), 1)
        self.upload(store, ("x", "y"), b"again")
        self.assertEqual(len(levels(events, "warn")), 1)
        self.assertEqual(levels(events, "critical"), [])

    def test_private_dir_removed(self) -> None:
        import shutil

        store = self.make_store()
        self.upload(store, ("before", "f"), b"x")
        events = captured_log(self)
        shutil.rmtree(store.root / ".hmacfs")
        self.assertRecreated(store, events)

    def test_partial_dir_removed(self) -> None:
        store = self.make_store()
        events = captured_log(self)
        os.rmdir(store.partial_dir)
        self.assertRecreated(store, events)

    def test_meta_dir_removed_during_upload(self) -> None:
        import shutil

        store = self.make_store()
        partial = store.open_partial(SEGS, "image/jpeg", 3)
        partial.write([b"abc"])
        events = captured_log(self)
        shutil.rmtree(store.meta_dir)
        partial.commit(None)
        self.assertEqual(store.stat(SEGS).content_type, "image/jpeg")
        self.assertEqual(len(levels(events, "warn")), 1)

    def test_sweep_recreates(self) -> None:
        import shutil

        store = self.make_store()
        events = captured_log(self)
        shutil.rmtree(store.root / ".hmacfs")
        self.assertEqual(store.sweep_partials(1), 0)
        self.assertTrue(store.partial_dir.is_dir())
        self.assertEqual(len(levels(events, "warn")), 1)


class OwnNameTests(SynchronousTestCase):
    """A one-step upload's own partial name: unique per process, and per forked child."""

    def test_unique_and_renewed_after_fork(self) -> None:
        from hmacfs.storage import partial

        root = Path(self.mktemp())
        root.mkdir()
        fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
        self.addCleanup(os.close, fd)
        names = set()
        for _ in range(50):
            opened, name = partial._create_own(fd, "k")
            os.close(opened)
            names.add(name)
        self.assertEqual(len(names), 50)
        before = partial._own_prefix
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child reports through the pipe
            os.write(write, partial._own_prefix.encode())
            os._exit(0)
        os.close(write)
        child = os.read(read, 100).decode()
        os.close(read)
        os.waitpid(pid, 0)
        self.assertNotEqual(child, before)
        self.assertTrue(child.startswith(f"{pid}-"))
