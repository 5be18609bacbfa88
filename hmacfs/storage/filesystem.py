# -*- test-case-name: tests.test_storage -*-
"""
The on-disk store for uploads: ``Store``, the façade the rest of hmacfs calls (it
implements ``hmacfs.storage.blocking.ILocalBlockingStore``) over the pieces of this folder.

Invariants: a file is never overwritten (commit publishes with ``os.link``, which refuses an
existing name atomically); a failed upload leaves nothing at the target path; no method
buffers a whole file; one writer per partial file at a time (``locks``).  Nothing below the
root is reached through a symlink.  The layout of the private tree is in ``layout``.
Everything here is synchronous and blocking: the caller runs ``PartialUpload.write``/
``commit`` on a thread pool.
"""

from __future__ import annotations

import os
import stat as stat_mod
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from hmacfs.storage import locks, partial
from hmacfs.storage.blocking import IBlockingUpload, ILocalBlockingStore
from hmacfs.storage.fs_dirs import Dirs, PrivateDirs
from hmacfs.storage.fs_paths import check_segments, open_parents, target_of
from hmacfs.storage.fsio import DIR_MODE, FILE_MODE, close_all, log, unlink_quietly
from hmacfs.storage.interface import StorageError, StoredFile
from hmacfs.storage.layout import (
    is_path_key,
    meta_name,
    partial_name,
    path_key,
    record_name,
)
from hmacfs.storage.metadata import DEFAULT_CONTENT_TYPE, MetadataCache, xattrs_work
from hmacfs.storage.partial import PartialUpload
from hmacfs.storage.reservations import Reservation, ReservationLedger
from hmacfs.storage.sweep import sweep_partials

#: how long a ``statvfs`` reading may stand for later admissions (``Store._free_for``)
FREE_SPACE_TTL = 1.0
#: ... and by how much the space it showed must clear what an admission needs
FREE_SPACE_MARGIN = 256 * 1024 * 1024
_monotonic = time.monotonic

# What callers import from here (the upload protocols, the resources, the assembly).
__all__ = [
    "DEFAULT_CONTENT_TYPE",
    "PartialUpload",
    "StorageError",
    "Store",
    "StoredFile",
    "path_key",
]


T = TypeVar("T")


class Store:
    """
    Finished files and uploads in progress under one root directory.

    Paths come from ``hmacfs.signing.paths.SlotPath.segments``, already validated; the checks
    here are repeated on purpose (``fs_paths``), so a bug elsewhere cannot write outside
    ``root``.  The private directories are open descriptors (``fs_dirs``, rechecked every
    second and recreated if removed), and the directories of the upload tree are walked one
    ``openat`` at a time, so a link swapped in between a check and a use is never followed.
    """

    def __init__(
        self,
        root: Path,
        *,
        min_free_bytes: int = 0,
        now: Callable[[], float] = time.time,
        metadata_xattr: bool = True,
    ) -> None:
        # Resolve once: the operator may point StoreDir at a symlink; below it we follow none.
        self.root = Path(os.path.realpath(root))
        self._root_prefix = str(self.root).rstrip(os.sep) + os.sep
        self._now = now
        os.makedirs(self.root, mode=DIR_MODE, exist_ok=True)
        self._private = PrivateDirs(str(self.root))
        #: the private-directory descriptors (``PrivateDirs.get``)
        self._dirs: Callable[..., Dirs] = self._private.get
        self.partial_dir = self._private.partial_path
        self.meta_dir = self._private.meta_path
        self._meta = MetadataCache()
        #: whether files here take the metadata attribute (read it first where they do);
        #: ``metadata_xattr`` (MetadataXattr) says whether commits write it
        self.xattrs = xattrs_work(self._private.get().private)
        self._private.meta_xattr = self.xattrs and metadata_xattr
        self._ledger = ReservationLedger(min_free_bytes)
        #: the last ``statvfs`` reading: (free bytes, monotonic time, ``ledger.written`` then)
        self._free_reading: tuple[int, float, int] | None = None

    def open_private_file(self, name: str) -> int:
        """Open (creating) ``.hmacfs/<name>`` without following a link; the caller closes it."""
        flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC | os.O_NOFOLLOW
        return os.open(name, flags, FILE_MODE, dir_fd=self._dirs(force=True).private)

    # -- paths (the private ones for tests and operators) --

    def target_path(self, segments: Sequence[str]) -> Path:
        """Where a path's file lives; 403 for anything that could leave ``root``."""
        return Path(target_of(self._root_prefix, check_segments(segments)))

    def partial_path(self, segments: Sequence[str]) -> Path:
        return self.partial_dir / partial_name(path_key(segments))

    def record_path(self, segments: Sequence[str]) -> Path:
        """The sidecar record of an upload in progress (next to its partial file)."""
        return self.partial_dir / record_name(path_key(segments))

    def meta_path(self, segments: Sequence[str]) -> Path:
        return self.meta_dir / meta_name(path_key(segments))

    def _at_parent(self, segs: tuple[str, ...], act: Callable[[int, str], T]) -> T | None:
        """
        ``act(parent_fd, name)`` on the entry ``segs`` names, its parent reached by the
        ``openat`` walk (never through a link); None if a parent is missing.  The
        walk's descriptors are closed whatever ``act`` does; its errors propagate.
        """
        dirs = self._dirs()
        fds = open_parents(dirs.root, segs, create=False, root_prefix=self._root_prefix)
        if fds is None:
            return None
        try:
            return act(fds[-1] if fds else dirs.root, segs[-1])
        finally:
            close_all(fds)

    # -- finished files

    def exists(self, segments: Sequence[str]) -> bool:
        """Whether anything (even a dangling link) occupies the target: the caller's 409."""
        # The string, not target_path's Path: this runs on every PUT.
        return os.path.lexists(target_of(self._root_prefix, check_segments(segments)))

    def stat(self, segments: Sequence[str]) -> StoredFile | None:
        """A finished regular file, or None (missing, directory, symlink, symlinked parent)."""
        segs = check_segments(segments)
        target = target_of(self._root_prefix, segs)
        try:
            st = self._at_parent(segs, _lstat_at)
        except (FileNotFoundError, NotADirectoryError, StorageError):
            return None
        if st is None or not stat_mod.S_ISREG(st.st_mode):
            return None
        return self._meta.stored_file(self._dirs, segs, st, target, self.xattrs)

    def delete(self, segments: Sequence[str]) -> bool:
        """Remove a finished file and its metadata; False if there was no regular file."""
        segs = check_segments(segments)
        try:
            if not self._at_parent(segs, _unlink_regular_at):
                return False
        except (FileNotFoundError, NotADirectoryError, StorageError):
            return False
        unlink_quietly(meta_name(path_key(segs)), self._dirs().meta)
        log.info("deleted {path}", path="/".join(segs))
        return True

    def remove_empty_dir(self, segments: Sequence[str]) -> bool:
        """``rmdir`` of a directory of the upload tree (reached by ``openat``); False if not."""
        segs = check_segments(segments)
        try:
            return self._at_parent(segs, _rmdir_at) is not None
        except (OSError, StorageError):
            return False

    # -- free space

    def free_bytes(self) -> int:
        """Bytes an unprivileged writer may still use on the store's filesystem."""
        st = os.statvfs(self.root)
        return st.f_bavail * st.f_frsize

    @property
    def reserved_bytes(self) -> int:
        """Bytes promised to uploads in flight in this process and not written yet."""
        return self._ledger.reserved

    def reserve(self, incoming: int) -> Reservation:
        """``IBlockingStore.reserve``: ``statvfs`` says what is free; per process (``reservations``)."""
        return self._ledger.reserve(self._free_for(incoming), incoming)

    def _free_for(self, incoming: int) -> int:
        """
        The free space to admit ``incoming`` bytes against: a ``statvfs`` reading younger
        than ``FREE_SPACE_TTL``, less what this process wrote since, while that clears the
        need by ``FREE_SPACE_MARGIN``; otherwise a new reading.  Far from full, a PUT then
        costs no ``statvfs`` (one call and one GIL hand-off on the disk pool each); near full,
        every admission reads the disk again.  Another process would have to write the whole
        margin within the TTL to be missed, and then the write fails with 507 and is removed.
        """
        ledger = self._ledger
        now = _monotonic()
        reading = self._free_reading
        if reading is not None:
            free, at, written = reading
            estimate = free - (ledger.written - written)
            spare = estimate - ledger.reserved - max(0, incoming) - ledger.min_free_bytes
            if now - at < FREE_SPACE_TTL and spare >= FREE_SPACE_MARGIN:
                return estimate
        written = ledger.written
        free = self.free_bytes()
        self._free_reading = (free, now, written)
        return free

    # -- uploads in progress

    def open_partial(
        self,
        segments: Sequence[str],
        content_type: str,
        size: int | None,
        *,
        record: dict[str, object] | None = None,
        resumable: bool = True,
        keep_parents: bool = False,
    ) -> PartialUpload:
        """``IBlockingStore.open_partial``: a partial file, locked, and its sidecar record beside it.
        ``keep_parents`` (a commit in the same job follows): see ``partial.start``."""
        segs = check_segments(segments)
        target = Path(target_of(self._root_prefix, segs))
        return partial.start(
            self._private, segs, target, content_type, size,
            record=record, resumable=resumable, now=self._now, keep_parents=keep_parents,
        )

    def resume_partial(self, segments: Sequence[str]) -> PartialUpload | None:
        """``IBlockingStore.resume_partial``: the offset is the partial file's length."""
        segs = check_segments(segments)
        target = Path(target_of(self._root_prefix, segs))
        if os.path.lexists(target):
            raise StorageError(409, "file already exists")
        return partial.resume(self._private, segs, target, now=self._now)

    def partial_status(self, segments: Sequence[str]) -> tuple[int, dict[str, object]] | None:
        """``(bytes on disk, record)``, read without locking: while written, it only grows."""
        return partial.status(self._dirs().partial, path_key(check_segments(segments)))

    def partial_mtime(self, segments: Sequence[str]) -> float | None:
        """When the upload last received bytes (or was created); None if there is none."""
        return partial.mtime(self._dirs().partial, path_key(check_segments(segments)))

    def remove_partial(self, segments: Sequence[str]) -> bool:
        """``IBlockingStore.remove_partial``: the partial file and its record, taking the lock first."""
        segs = check_segments(segments)
        return partial.remove(self._dirs().partial, segs, where=self._private.partial_where)

    def sweep_partials(self, max_idle: float) -> int:
        """``IBlockingStore.sweep_partials`` (``sweep``), the private directory rechecked first."""
        now = self._now()
        try:
            dirs = self._dirs(force=True)
        except StorageError:
            return 0  # a link or a file where our directory should be: logged, not touched
        return sweep_partials(dirs.partial, now, max_idle)

    # -- one writer per upload

    def writer_lock_free(self, key: str) -> bool:
        """Whether no process here holds the writer lock of the upload with this path key."""
        return is_path_key(key) and locks.lock_free(self._dirs().partial, key)

    def request_takeover(self, segments: Sequence[str]) -> None:
        """Touch the upload's takeover marker; its writer checks for it every second."""
        locks.request_takeover(self._dirs().partial, path_key(check_segments(segments)))

    def takeover_requested(self, segments: Sequence[str], since: float) -> bool:
        """Whether the upload's takeover marker is newer than ``since`` (epoch seconds)."""
        key = path_key(check_segments(segments))
        return locks.takeover_requested(self._dirs().partial, key, since)

    def clear_takeover(self, segments: Sequence[str]) -> None:
        locks.clear_takeover(self._dirs().partial, path_key(check_segments(segments)))


if TYPE_CHECKING:
    # mypy checks that the store implements its interface (structurally).
    def _implements(store: Store, upload: PartialUpload) -> tuple[ILocalBlockingStore, IBlockingUpload]:
        return store, upload


def _lstat_at(parent: int, name: str) -> os.stat_result:
    return os.stat(name, dir_fd=parent, follow_symlinks=False)


def _unlink_regular_at(parent: int, name: str) -> bool:
    """Unlink ``name`` if it is a regular file (never a link or a directory)."""
    if not stat_mod.S_ISREG(_lstat_at(parent, name).st_mode):
        return False
    os.unlink(name, dir_fd=parent)
    return True


def _rmdir_at(parent: int, name: str) -> bool:
    os.rmdir(name, dir_fd=parent)
    return True
