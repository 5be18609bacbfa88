"""
Tests for the pieces of hmacfs.storage on their own: the layout names, the openat walk,
the private-directory descriptors, the reservation ledger, the writer locks and takeover
markers, the sweep, the metadata cache, and the interface the Store implements.
(The Store as a whole: tests/test_storage.py.)
"""

from __future__ import annotations

import errno
import hashlib
import inspect
import os
import shutil
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

from hmacfs.signing import paths as signing_paths
from hmacfs.storage import fs_dirs, fs_paths, fsio, layout, locks, metadata, sweep
from hmacfs.storage.blocking import IBlockingStore, IBlockingUpload, ILocalBlockingStore
from hmacfs.storage.filesystem import Store
from hmacfs.storage.interface import IReservation, StorageError
from hmacfs.storage.reservations import Reservation, ReservationLedger


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


class DirTestCase(SynchronousTestCase):
    def make_dir(self) -> Path:
        path = Path(self.mktemp()).resolve()
        path.mkdir(parents=True)
        return path

    def open_dir(self, path: Path) -> int:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        self.addCleanup(os.close, fd)
        return fd


class LayoutTests(SynchronousTestCase):
    def test_private_dir_is_named_once(self) -> None:
        """The store's private directory is the one the path parser refuses."""
        self.assertIs(layout.PRIVATE_DIR, signing_paths.PRIVATE_DIR)
        self.assertEqual(layout.PRIVATE_DIR, ".hmacfs")

    def test_names_of_a_path(self) -> None:
        """A path's private names are its key with a suffix; the key is its SHA-256."""
        key = layout.path_key(("a", "b.txt"))
        self.assertEqual(key, hashlib.sha256(b"a/b.txt").hexdigest())
        self.assertEqual(key, layout.path_key(["a", "b.txt"]))
        self.assertNotEqual(key, layout.path_key(("a",)))
        self.assertEqual(layout.partial_name(key), key + ".part")
        self.assertEqual(layout.record_name(key), key + ".json")
        self.assertEqual(layout.meta_name(key), key + ".json")
        self.assertEqual(layout.takeover_name(key), key + ".takeover")

    def test_is_path_key(self) -> None:
        """Only what path_key could return passes (so it is safe as a file name)."""
        self.assertTrue(layout.is_path_key(layout.path_key(("x",))))
        for bad in ("", "a" * 63, "A" * 64, "../" + "a" * 61, "g" * 64, "a" * 65):
            self.assertFalse(layout.is_path_key(bad), bad)


class SegmentTests(SynchronousTestCase):
    def test_check_segments(self) -> None:
        """Plain names pass as a tuple; anything that could leave the root is 403."""
        self.assertEqual(fs_paths.check_segments(["a", "b"]), ("a", "b"))
        for segs in [(), ("",), (".",), ("..",), ("a/b",), ("a\0",), (".HMACFS", "x"), ("\udcff",)]:
            e = self.assertRaises(StorageError, fs_paths.check_segments, segs)
            self.assertEqual(e.status, 403, segs)
        self.assertRaises(TypeError, fs_paths.check_segments, "ab")

    def test_target_of(self) -> None:
        """target_of joins below the root and refuses what normalises outside it."""
        self.assertEqual(fs_paths.target_of("/srv/s/", ("a", "b")), "/srv/s/a/b")
        for segs in [("..", "x"), ("a", "..", "..", "x"), ("a", "..")]:
            self.assertRaises(StorageError, fs_paths.target_of, "/srv/s/", segs)


class OpenParentsTests(DirTestCase):
    """The openat walk: one directory below the other, never through a link."""

    def test_creates_and_returns_the_parents(self) -> None:
        root = self.make_dir()
        root_fd = self.open_dir(root)
        before = open_fds()
        fds = fs_paths.open_parents(root_fd, ("a", "b", "f"), create=True)
        assert fds is not None
        self.assertEqual(len(fds), 2)
        self.assertEqual(os.fstat(fds[-1]).st_ino, os.stat(root / "a" / "b").st_ino)
        fsio.close_all(fds)
        self.assertEqual(open_fds(), before)

    def test_existing_parents_are_opened_without_mkdir(self) -> None:
        """create=True on directories that exist only opens them (no mkdir per level),
        and a dangling link among them is still refused."""
        root = self.make_dir()
        (root / "a" / "b").mkdir(parents=True)
        made: list[str] = []
        real_mkdir = os.mkdir

        def mkdir(path: str, *args: object, **kwargs: object) -> None:
            made.append(path)
            real_mkdir(path, *args, **kwargs)  # type: ignore[arg-type]

        self.patch(fs_paths.os, "mkdir", mkdir)
        root_fd = self.open_dir(root)
        fds = fs_paths.open_parents(root_fd, ("a", "b", "c", "f"), create=True)
        assert fds is not None
        fsio.close_all(fds)
        self.assertEqual(made, ["c"])
        self.assertTrue((root / "a" / "b" / "c").is_dir())
        os.symlink(root / "missing", root / "a" / "d")
        e = self.assertRaises(
            StorageError, fs_paths.open_parents, root_fd, ("a", "d", "f"), create=True
        )
        self.assertEqual(e.status, 403)
        self.assertEqual(made, ["c"])

    def test_a_file_in_the_root_has_no_parents(self) -> None:
        root = self.make_dir()
        self.assertEqual(fs_paths.open_parents(self.open_dir(root), ("f",), create=False), [])

    def test_missing_without_create_is_none(self) -> None:
        root = self.make_dir()
        (root / "a").mkdir()
        before = open_fds()
        self.assertIsNone(fs_paths.open_parents(self.open_dir(root), ("a", "b", "f"), create=False))
        self.assertEqual(open_fds(), before + 1)  # only the test's root descriptor
        self.assertFalse((root / "a" / "b").exists())

    def test_refuses_a_symlinked_directory(self) -> None:
        """A link among the parents is 403 (with create or without), and nothing leaks."""
        root, outside = self.make_dir(), self.make_dir()
        (root / "a").mkdir()
        os.symlink(outside, root / "a" / "b")
        root_fd = self.open_dir(root)
        before = open_fds()
        for create in (True, False):
            e = self.assertRaises(
                StorageError, fs_paths.open_parents, root_fd, ("a", "b", "f"), create=create
            )
            self.assertEqual(e.status, 403)
        self.assertEqual(open_fds(), before)
        self.assertEqual(os.listdir(outside), [])

    def test_a_file_where_a_directory_is_needed_is_409(self) -> None:
        root = self.make_dir()
        (root / "a").write_bytes(b"x")
        e = self.assertRaises(
            StorageError, fs_paths.open_parents, self.open_dir(root), ("a", "f"), create=True
        )
        self.assertEqual(e.status, 409)

    def test_other_errors_pass_through(self) -> None:
        """An error that is not about links or files (a name too long) is not a refusal."""
        root = self.make_dir()
        (root / "a").mkdir()
        root_fd = self.open_dir(root)
        before = open_fds()
        e = self.assertRaises(
            OSError, fs_paths.open_parents, root_fd, ("a", "n" * 300, "f"), create=False
        )
        self.assertEqual(e.errno, errno.ENAMETOOLONG)
        self.assertEqual(open_fds(), before)


class PrivateDirsTests(DirTestCase):
    def test_opens_and_creates(self) -> None:
        """The four directories exist after opening; their identities are recorded."""
        root = self.make_dir()
        private = fs_dirs.PrivateDirs(str(root))
        dirs = private.get()
        self.assertEqual(private.partial_path, root / ".hmacfs" / "partial")
        self.assertEqual(private.meta_path, root / ".hmacfs" / "meta")
        self.assertEqual(os.fstat(dirs.partial).st_ino, os.stat(private.partial_path).st_ino)
        self.assertEqual(len(dirs.ids), 4)

    def test_cached_between_rechecks(self) -> None:
        """Within DIR_RECHECK_SECONDS the same snapshot is returned without a check."""
        root = self.make_dir()
        private = fs_dirs.PrivateDirs(str(root))
        dirs = private.get()
        shutil.rmtree(root / ".hmacfs")
        self.assertIs(private.get(), dirs)
        recreated = private.get(force=True)
        self.assertIsNot(recreated, dirs)
        self.assertTrue(private.partial_path.is_dir())
        self.assertIs(private.get(force=True), recreated)

    def test_recheck_after_the_interval(self) -> None:
        root = self.make_dir()
        self.patch(fs_dirs, "DIR_RECHECK_SECONDS", 0.0)
        private = fs_dirs.PrivateDirs(str(root))
        dirs = private.get()
        self.assertIs(private.get(), dirs)  # unchanged: the same snapshot
        shutil.rmtree(root / ".hmacfs" / "meta")
        self.assertIsNot(private.get(), dirs)
        self.assertTrue(private.meta_path.is_dir())

    def test_a_link_in_place_is_503(self) -> None:
        root, outside = self.make_dir(), self.make_dir()
        os.symlink(outside, root / ".hmacfs")
        e = self.assertRaises(StorageError, fs_dirs.PrivateDirs, str(root))
        self.assertEqual(e.status, 503)
        self.assertEqual(os.listdir(outside), [])
        self.flushLoggedErrors()

    def test_private_dir_handle(self) -> None:
        """PrivateDir opens (creating) one subdirectory and reopens it when removed."""
        root = self.make_dir()
        tomb = fs_dirs.PrivateDir(root, layout.TOMBSTONES_DIR)
        self.assertEqual(tomb.path, root / ".hmacfs" / "tombstones")
        shutil.rmtree(tomb.path)
        handle = tomb.reopen()
        self.assertIs(tomb.handle, handle)
        self.assertEqual(os.fstat(handle.fd).st_ino, os.stat(tomb.path).st_ino)


class ReservationLedgerTests(SynchronousTestCase):
    """The ledger alone: no disk, the free space is given."""

    def test_boundary(self) -> None:
        """Space may be used down to exactly min_free_bytes, not one byte more."""
        ledger = ReservationLedger(min_free_bytes=100)
        ledger.reserve(1000, 900).release()
        e = self.assertRaises(StorageError, ledger.reserve, 1000, 901)
        self.assertEqual((e.status, e.reason), (507, "insufficient storage"))
        self.assertEqual(ledger.reserved, 0)

    def test_promises_add_up(self) -> None:
        """Two uploads cannot count the same free bytes; releasing gives them back."""
        ledger = ReservationLedger()
        first = ledger.reserve(100, 60)
        self.assertEqual(ledger.reserved, 60)
        self.assertRaises(StorageError, ledger.reserve, 100, 41)
        second = ledger.reserve(100, 40)
        self.assertEqual(ledger.reserved, 100)
        first.release()
        first.release()  # idempotent
        self.assertEqual((ledger.reserved, first.remaining), (40, 0))
        second.release()
        self.assertEqual(ledger.reserved, 0)

    def test_consume_shrinks_the_promise(self) -> None:
        """Written bytes leave the ledger (statvfs counts them); never more than promised."""
        ledger = ReservationLedger()
        reservation = ledger.reserve(100, 10)
        reservation.consume(4)
        self.assertEqual((reservation.remaining, ledger.reserved), (6, 6))
        reservation.consume(50)
        self.assertEqual((reservation.remaining, ledger.reserved), (0, 0))
        reservation.release()
        self.assertEqual(ledger.reserved, 0)

    def test_negative_is_nothing(self) -> None:
        """An unknown or negative size promises nothing (and takes nothing back)."""
        ledger = ReservationLedger()
        reservation = ledger.reserve(100, -5)
        self.assertEqual((reservation.remaining, ledger.reserved), (0, 0))
        reservation.release()
        self.assertEqual(ledger.reserved, 0)


class PartialDirTestCase(DirTestCase):
    def setUp(self) -> None:
        self.path = self.make_dir()
        self.directory = self.open_dir(self.path)
        self.key = layout.path_key(("u", "f.bin"))
        self.name = layout.partial_name(self.key)


class LockTests(PartialDirTestCase):
    def test_one_writer(self) -> None:
        """A second open for writing is refused (409) while the first holds the lock."""
        fd, fresh = locks.open_locked_new(self.directory, self.name)
        self.assertTrue(fresh)
        e = self.assertRaises(
            StorageError, locks.open_locked, self.directory, self.name, create=False
        )
        self.assertEqual((e.status, e.reason), (409, "upload already in progress"))
        self.assertFalse(locks.lock_free(self.directory, self.key))
        os.close(fd)
        self.assertTrue(locks.lock_free(self.directory, self.key))
        again = locks.open_locked(self.directory, self.name, create=False)
        assert again is not None
        os.close(again)

    def test_leftover_is_not_fresh(self) -> None:
        os.close(locks.open_locked_new(self.directory, self.name)[0])
        fd, fresh = locks.open_locked_new(self.directory, self.name)
        os.close(fd)
        self.assertFalse(fresh)

    def test_missing(self) -> None:
        self.assertIsNone(locks.open_locked(self.directory, self.name, create=False))
        self.assertTrue(locks.lock_free(self.directory, self.key))

    def test_planted_link_is_removed_not_followed(self) -> None:
        """A symlink at the partial's name is unlinked (its target untouched), then created."""
        outside = self.make_dir() / "victim"
        outside.write_bytes(b"keep")
        os.symlink(outside, self.path / self.name)
        fd = locks.open_locked(self.directory, self.name, create=True, where=str(self.path))
        assert fd is not None
        os.close(fd)
        self.assertFalse((self.path / self.name).is_symlink())
        self.assertEqual(outside.read_bytes(), b"keep")

    def test_takeover_markers(self) -> None:
        """request/requested/clear: a marker newer than ``since`` is a request."""
        self.assertFalse(locks.takeover_requested(self.directory, self.key, 0))
        locks.request_takeover(self.directory, self.key)
        marker = self.path / layout.takeover_name(self.key)
        mtime = marker.stat().st_mtime
        self.assertTrue(locks.takeover_requested(self.directory, self.key, mtime))
        self.assertFalse(locks.takeover_requested(self.directory, self.key, mtime + 1))
        locks.clear_takeover(self.directory, self.key)
        locks.clear_takeover(self.directory, self.key)  # idempotent
        self.assertFalse(marker.exists())


class SweepTests(PartialDirTestCase):
    NOW = 10_000_000.0

    def age(self, name: str, seconds: float) -> None:
        os.utime(name, (self.NOW - seconds, self.NOW - seconds), dir_fd=self.directory)

    def test_removes_idle_unlocked_and_their_leftovers(self) -> None:
        (self.path / self.name).write_bytes(b"abc")
        (self.path / layout.record_name(self.key)).write_text("{}")
        self.age(self.name, 100)
        self.assertEqual(sweep.sweep_partials(self.directory, self.NOW, 50), 1)
        # The record was not idle itself, but goes with its partial file.
        self.assertEqual(os.listdir(self.path), [])

    def test_keeps_recent_and_locked(self) -> None:
        fd, _ = locks.open_locked_new(self.directory, self.name)
        self.addCleanup(os.close, fd)
        self.age(self.name, 100)
        other = layout.partial_name(layout.path_key(("recent",)))
        (self.path / other).write_bytes(b"x")
        self.age(other, 10)
        self.assertEqual(sweep.sweep_partials(self.directory, self.NOW, 50), 0)
        self.assertEqual(sorted(os.listdir(self.path)), sorted([self.name, other]))

    def test_orphans_go_links_stay(self) -> None:
        """Records, temporary files and markers without their partial go; a planted link stays."""
        orphans = [layout.record_name(self.key), self.key + ".json.tmp", layout.takeover_name(self.key)]
        for name in orphans:
            (self.path / name).write_text("x")
            self.age(name, 100)
        link = layout.partial_name(layout.path_key(("link",)))
        os.symlink("/etc/passwd", self.path / link)
        os.utime(link, (self.NOW - 100, self.NOW - 100), dir_fd=self.directory, follow_symlinks=False)
        self.assertEqual(sweep.sweep_partials(self.directory, self.NOW, 50), 0)
        self.assertEqual(os.listdir(self.path), [link])


class MetadataTests(DirTestCase):
    def test_read_meta(self) -> None:
        """A JSON object is the metadata; missing, broken or not an object is {}."""
        path = self.make_dir()
        fd = self.open_dir(path)
        self.assertEqual(metadata.read_meta("m.json", fd, "a/b"), {})
        (path / "m.json").write_text('{"content_type": "text/plain"}')
        self.assertEqual(metadata.read_meta("m.json", fd, "a/b"), {"content_type": "text/plain"})
        (path / "m.json").write_text("[1]")
        self.assertEqual(metadata.read_meta("m.json", fd, "a/b"), {})
        (path / "m.json").write_text("{broken")
        self.assertEqual(metadata.read_meta("m.json", fd, "a/b"), {})
        self.assertEqual(len(self.flushLoggedErrors(ValueError)), 1)

    def test_cache_is_bounded(self) -> None:
        """The cache keeps at most ``size`` entries, dropping the oldest first."""
        root = self.make_dir()
        store = Store(root)
        cache = metadata.MetadataCache(size=2)
        for name in ("a", "b", "c"):
            upload = store.open_partial((name,), f"text/{name}", 1)
            upload.write([b"x"])
            upload.commit(None)
        private = fs_dirs.PrivateDirs(str(root))
        for name in ("a", "b", "c"):
            st = os.lstat(root / name)
            stored = cache.stored_file(private.get, (name,), st, str(root / name), store.xattrs)
            self.assertEqual(stored.content_type, f"text/{name}")
        self.assertEqual(len(cache._entries), 2)
        self.assertEqual(sorted(key[0] for key in cache._entries), [("b",), ("c",)])


class FsioTests(DirTestCase):
    def test_write_json_leaves_nothing_half_written(self) -> None:
        """A failing rename removes the temporary file; the old content stays."""
        path = self.make_dir()
        fd = self.open_dir(path)
        fsio.write_json("r.json", {"a": 1}, sync=False, dir_fd=fd)
        self.assertEqual(fsio.read_json("r.json", fd), {"a": 1})

        def broken(*args: object, **kwargs: object) -> None:
            raise OSError(errno.EIO, "rename failed")

        self.patch(fsio.os, "rename", broken)
        self.assertRaises(OSError, fsio.write_json, "r.json", {"a": 2}, sync=True, dir_fd=fd)
        self.assertEqual(os.listdir(path), ["r.json"])
        self.assertEqual(fsio.read_json("r.json", fd), {"a": 1})

    def test_translate(self) -> None:
        """A full disk is 507, a long name 400; other errors are left as they are."""
        self.assertEqual(fsio.translate(OSError(errno.ENOSPC, "x")).status, 507)  # type: ignore[union-attr]
        self.assertEqual(fsio.translate(OSError(errno.EDQUOT, "x")).status, 507)  # type: ignore[union-attr]
        self.assertEqual(fsio.translate(OSError(errno.ENAMETOOLONG, "x")).status, 400)  # type: ignore[union-attr]
        other = OSError(errno.EIO, "x")
        self.assertIs(fsio.translate(other), other)


#: Store's public names that are not part of the interface: views of its own layout that
#: tests and operators use (a backend without local files has no such paths).
FILESYSTEM_ONLY = {
    "free_bytes", "meta_dir", "meta_path", "partial_dir", "partial_path", "record_path",
    "reserved_bytes", "target_path",
}


def protocol_members(protocol: type) -> set[str]:
    names: set[str] = set()
    for klass in protocol.__mro__:
        if klass in (object,) or klass.__name__ in ("Protocol", "Generic"):
            continue
        names.update(n for n in vars(klass) if not n.startswith("_"))
        names.update(getattr(klass, "__annotations__", {}))
    return names


class InterfaceTests(DirTestCase):
    def test_store_implements_the_interface(self) -> None:
        store = Store(self.make_dir())
        self.assertIsInstance(store, IBlockingStore)
        self.assertIsInstance(store, ILocalBlockingStore)
        upload = store.open_partial(("f",), "text/plain", 1)
        self.addCleanup(upload.abort)
        self.assertIsInstance(upload, IBlockingUpload)
        reservation = store.reserve(0)
        self.assertIsInstance(reservation, IReservation)
        self.assertIsInstance(reservation, Reservation)

    def test_the_interface_names_what_the_store_offers(self) -> None:
        """Every public method of Store is in ILocalBlockingStore (or a filesystem-only view), and back."""
        public = {
            name for name, _ in inspect.getmembers(Store) if not name.startswith("_")
        } | {"root", "partial_dir", "meta_dir"}
        declared = protocol_members(ILocalBlockingStore)
        self.assertEqual(public - FILESYSTEM_ONLY, declared)

    def test_signatures_match(self) -> None:
        """Each method the interface declares has the same parameters on Store."""
        for name in protocol_members(ILocalBlockingStore):
            declared = getattr(ILocalBlockingStore, name, None)
            if not callable(declared):
                continue
            self.assertEqual(
                list(inspect.signature(getattr(Store, name)).parameters),
                list(inspect.signature(declared).parameters),
                name,
            )


class ReadSmallTests(SynchronousTestCase):
    """``fsio.read_small``: the whole file through bare reads, whatever its size."""

    def test_whole_file(self) -> None:
        where = self.mktemp()
        os.mkdir(where)
        fd = os.open(where, os.O_RDONLY | os.O_DIRECTORY)
        self.addCleanup(os.close, fd)
        for size in (0, 1, 65536, 200_003):
            body = os.urandom(size)
            with open(os.path.join(where, f"f{size}"), "wb") as f:
                f.write(body)
            self.assertEqual(fsio.read_small(f"f{size}", fd), body)
        self.assertRaises(FileNotFoundError, fsio.read_small, "missing", fd)
        os.symlink("f1", os.path.join(where, "link"))
        self.assertRaises(OSError, fsio.read_small, "link", fd)
