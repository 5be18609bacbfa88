# -*- test-case-name: tests.test_storage -*-
"""
One upload being written: its partial file in ``.hmacfs/partial``, locked by its one
writer, appended to by ``write`` and published by ``commit`` (``hmacfs.storage.commit``).

``start`` opens an upload from byte 0, ``resume`` reopens an interrupted one, ``status``,
``mtime`` and ``remove`` look at one nobody may be writing; the store calls them
(``Store.open_partial`` and the rest) after checking the path.  A partial file never
blocks its path because of its age: only a live writer's lock does; the sweep
(``hmacfs.storage.sweep``) removes abandoned ones after ResumeTTL.
"""

from __future__ import annotations

import errno
import fcntl
import itertools
import os
import secrets
import threading
from collections.abc import Callable, Sequence
from pathlib import Path

import attrs

from hmacfs.storage import commit as _commit
from hmacfs.storage.fs_dirs import Dirs, PrivateDirs
from hmacfs.storage.fs_paths import open_parents
from hmacfs.storage.fsio import (
    FILE_MODE,
    READ_FLAGS,
    close_all,
    lexists,
    log,
    read_json,
    translate,
    unlink_quietly,
    write_json,
)
from hmacfs.storage.interface import IReservation, StorageError, StoredFile
from hmacfs.storage.layout import PART_SUFFIX, partial_name, path_key, record_name
from hmacfs.storage.locks import open_locked, open_locked_new
from hmacfs.storage.metadata import DEFAULT_CONTENT_TYPE

# Linux refuses writev() with more buffers than this (EINVAL); Python does not split.
try:
    _IOV_MAX = max(16, os.sysconf("SC_IOV_MAX"))
except (AttributeError, ValueError, OSError):
    _IOV_MAX = 1024


@attrs.define(eq=False)
class PartialUpload:
    """
    One upload being written, owning (and locking) its partial file.

    ``write`` and ``commit`` block; run them on a worker thread.  Do not call ``abort``
    concurrently with them from another thread: a lock makes it wait for the running call
    (so the fd is never closed under a write), which blocks the calling thread meanwhile.
    After a failed ``write`` the caller must ``abort`` or ``release``; ``commit`` cleans up
    after itself.  ``written`` is the length of the partial file (``offset`` of it were
    there when it was opened, for a resumed upload).  ``reservation`` (set by the upload
    policy) is the free space promised to this upload; it shrinks as bytes are written and
    is released when the upload is committed, aborted or released.
    """

    #: the store's private directories (the commit reaches ``meta`` and the tree through them)
    private: PrivateDirs
    #: the store's clock (the metadata's ``created``)
    now: Callable[[], float]
    target: Path
    segments: tuple[str, ...]
    content_type: str
    size: int | None
    fd: int
    #: the private-directory descriptors the partial file was opened in
    dirs: Dirs
    written: int = 0
    offset: int = 0
    record: dict[str, object] | None = None
    #: whether a sidecar record was written for this upload (a one-request upload has none)
    has_record: bool = True
    reservation: IReservation | None = None
    #: the target's directories, kept open from the admission for a commit in the same job
    #: (``start(keep_parents=True)``; the commit closes them, as does any other end)
    parents: list[int] | None = None
    #: the partial file's own name where it is not the path key's (``start(keep_parents)``)
    own_name: str | None = None
    _finished: bool = attrs.field(default=False, init=False)
    _lock: threading.Lock = attrs.field(factory=threading.Lock, init=False)

    @property
    def key(self) -> str:
        return path_key(self.segments)

    @property
    def path(self) -> Path:
        """The partial file (for messages and tests: built when asked, not per upload)."""
        return self.private.partial_path / self.file_name

    @property
    def file_name(self) -> str:
        """The partial file's name in ``.hmacfs/partial``."""
        return self.own_name or partial_name(self.key)

    @property
    def name(self) -> str:
        """The upload's path, as the log shows it."""
        return "/".join(self.segments)

    def write(self, chunks: Sequence[bytes]) -> int:
        """Append all of ``chunks``; returns the number of bytes written."""
        with self._lock:
            if self._finished:
                raise ValueError("upload already committed or aborted")
            views = [memoryview(c) for c in chunks if len(c)]
            total = 0
            try:
                while views:
                    try:
                        n = os.writev(self.fd, views[:_IOV_MAX])
                    except OSError as e:
                        raise translate(e) from e
                    if n <= 0:  # never for a regular file; do not spin if it ever happens
                        raise OSError(errno.EIO, "writev wrote nothing", str(self.path))
                    total += n
                    self.written += n
                    # Drop what was written; a short write leaves the rest of a buffer.
                    while n:
                        if n >= len(views[0]):
                            n -= len(views.pop(0))
                        else:
                            views[0] = views[0][n:]
                            n = 0
            finally:
                if self.reservation is not None and total:
                    self.reservation.consume(total)
            return total

    def datasync(self) -> int:
        """Make the bytes written so far durable; returns how many there are."""
        with self._lock:
            if not self._finished:
                os.fdatasync(self.fd)
            return self.written

    def truncate(self, length: int) -> None:
        """Cut the partial file back to ``length`` bytes (a chunk that failed its checksum)."""
        with self._lock:
            if self._finished:
                raise ValueError("upload already committed or aborted")
            os.ftruncate(self.fd, length)
            os.lseek(self.fd, length, os.SEEK_SET)
            self.written = length

    def hash_prefix(self, hasher: object, length: int, block: int = 1024 * 1024) -> None:
        """
        Feed the first ``length`` bytes of the partial file to ``hasher`` (a resumed upload
        whose whole-file checksum must cover the bytes an earlier request wrote).
        """
        fd = os.open(self.file_name, READ_FLAGS, dir_fd=self.dirs.partial)
        try:
            remaining = length
            position = 0
            while remaining:
                data = os.pread(fd, min(block, remaining), position)
                if not data:
                    raise OSError(errno.EIO, "partial file shorter than its offset", str(self.path))
                hasher.update(data)  # type: ignore[attr-defined]
                position += len(data)
                remaining -= len(data)
        finally:
            os.close(fd)

    def release(self) -> int:
        """
        Stop writing but keep the upload for a later resume: make the bytes durable, let go
        of the lock.  Returns the length of the partial file.  Idempotent.
        """
        with self._lock:
            if self._finished:
                return self.written
            self._finished = True
            try:
                if self.fd >= 0:
                    os.fdatasync(self.fd)
            finally:
                self.close()
            return self.written

    def commit(self, sha256_hex: str | None) -> StoredFile:
        """
        Publish the upload at its target; 409 if something appeared there meanwhile.
        On any failure nothing of this upload remains (see ``hmacfs.storage.commit``).
        """
        with self._lock:
            if self._finished:
                raise ValueError("upload already committed or aborted")
            self._finished = True
            return _commit.publish(self, sha256_hex)

    def abort(self) -> None:
        """Drop the upload: remove the partial file and its record, then close. Idempotent."""
        with self._lock:
            if self._finished:
                return
            self._finished = True
            try:
                unlink_quietly(self.file_name, self.dirs.partial)
                if self.has_record:
                    unlink_quietly(record_name(self.key), self.dirs.partial)
            finally:
                self.close()

    def close(self) -> None:
        """Close the partial file (dropping its lock) and give back the reserved space."""
        reservation, self.reservation = self.reservation, None
        if reservation is not None:
            reservation.release()
        parents, self.parents = self.parents, None
        if parents:
            close_all(parents)
        if self.fd >= 0:
            fd, self.fd = self.fd, -1
            os.close(fd)


def start(
    private: PrivateDirs,
    segs: tuple[str, ...],
    target: Path,
    content_type: str,
    size: int | None,
    *,
    record: dict[str, object] | None,
    resumable: bool,
    now: Callable[[], float],
    keep_parents: bool = False,
) -> PartialUpload:
    """``Store.open_partial`` for checked segments (see there).  ``keep_parents``: an upload
    committed in the same job (``FilesystemBackend.store_whole``) keeps the target's directories open for
    its commit, and leaves the 409 for an existing file to the commit's link."""
    key = path_key(segs)
    name = partial_name(key)
    sidecar_name = record_name(key)
    parents: list[int] | None = None
    own_name: str | None = None
    try:
        dirs = private.get()
        fds = open_parents(dirs.root, segs, create=True, root_prefix=private.root_prefix)
        assert fds is not None  # create=True: missing raises
        if keep_parents:
            parents = fds
            # Committed in this same job, never resumed: a name of its own, which nobody
            # else opens (no lock race to check for, no leftover of the path's to take
            # over), locked only so that a sweep never takes it for abandoned.
            try:
                fd, own_name = _create_own(dirs.partial, key)
            except FileNotFoundError:
                dirs = private.get(force=True)
                fd, own_name = _create_own(dirs.partial, key)
            name = own_name
            fresh = True
        else:
            try:
                exists = lexists(segs[-1], fds[-1] if fds else dirs.root)
            finally:
                close_all(fds)
            if exists:
                raise StorageError(409, "file already exists")
            try:
                opened = open_locked_new(dirs.partial, name, where=private.partial_where)
            except FileNotFoundError:
                # The private directory was removed under us: recreate it, try once more.
                dirs = private.get(force=True)
                opened = open_locked_new(dirs.partial, name, where=private.partial_where)
            fd, fresh = opened
        sidecar: dict[str, object] | None = None
        try:
            if not fresh:
                os.ftruncate(fd, 0)
            if resumable or not fresh:
                sidecar = dict(record or {})
                sidecar.setdefault("path", "/".join(segs))
                sidecar.setdefault("content_type", content_type)
                sidecar.setdefault("size", size)
                sidecar.setdefault("created", now())
                write_json(sidecar_name, sidecar, sync=False, dir_fd=dirs.partial)
        except BaseException:
            unlink_quietly(name, dirs.partial)
            unlink_quietly(sidecar_name, dirs.partial)
            os.close(fd)
            raise
    except BaseException as e:
        if parents:
            close_all(parents)
        if isinstance(e, OSError):
            raise translate(e) from e
        raise
    return PartialUpload(
        private=private,
        now=now,
        target=target,
        segments=segs,
        content_type=content_type,
        size=size,
        fd=fd,
        dirs=dirs,
        record=sidecar,
        has_record=sidecar is not None,
        parents=parents,
        own_name=own_name,
    )


def resume(
    private: PrivateDirs, segs: tuple[str, ...], target: Path, *, now: Callable[[], float]
) -> PartialUpload | None:
    """``Store.resume_partial`` for checked segments whose target is free (see there)."""
    key = path_key(segs)
    name = partial_name(key)
    try:
        dirs = private.get()
        fd = open_locked(dirs.partial, name, create=False, where=private.partial_where)
    except OSError as e:
        raise translate(e) from e
    if fd is None:
        return None
    try:
        record = read_json(record_name(key), dirs.partial)
        if record is None:
            # A partial without its record (a crash before hmacfs kept records, or
            # during open) is bound to nobody: it cannot be resumed, only replaced.
            os.close(fd)
            return None
        offset = os.lseek(fd, 0, os.SEEK_END)
    except BaseException:
        os.close(fd)
        raise
    size = record.get("size")
    content_type = record.get("content_type")
    return PartialUpload(
        private=private,
        now=now,
        target=target,
        segments=segs,
        content_type=content_type if isinstance(content_type, str) else DEFAULT_CONTENT_TYPE,
        size=size if isinstance(size, int) else None,
        fd=fd,
        dirs=dirs,
        written=offset,
        offset=offset,
        record=record,
    )


def status(directory: int, key: str) -> tuple[int, dict[str, object]] | None:
    """``(length, record)`` of the upload with this key in ``directory``, or None."""
    record = read_json(record_name(key), directory)
    if record is None:
        return None
    try:
        length = os.stat(partial_name(key), dir_fd=directory, follow_symlinks=False).st_size
    except FileNotFoundError:
        return None
    return length, record


def mtime(directory: int, key: str) -> float | None:
    """When the upload's partial file last changed, or None if there is none."""
    try:
        return os.stat(partial_name(key), dir_fd=directory, follow_symlinks=False).st_mtime
    except FileNotFoundError:
        return None


def remove(directory: int, segs: tuple[str, ...], *, where: str = "") -> bool:
    """Remove an upload nobody writes to (False if none; 409 if a writer holds it)."""
    key = path_key(segs)
    fd = open_locked(directory, partial_name(key), create=False, where=where)
    if fd is None:
        unlink_quietly(record_name(key), directory)
        return False
    try:
        unlink_quietly(partial_name(key), directory)
        unlink_quietly(record_name(key), directory)
    finally:
        os.close(fd)
    log.info("removed upload in progress {path}", path="/".join(segs))
    return True


#: what makes a partial file's own name unique: this process's (pid, random prefix, and a
#: counter; no random bytes per upload, which would cost a ``getrandom`` call each)
_own_prefix = f"{os.getpid()}-{secrets.token_hex(4)}"
_own_serial = itertools.count()


def _forked() -> None:
    global _own_prefix
    _own_prefix = f"{os.getpid()}-{secrets.token_hex(4)}"


os.register_at_fork(after_in_child=_forked)


def _create_own(directory: int, key: str) -> tuple[int, str]:
    """A new partial file under a name of its own, locked (see ``start(keep_parents)``)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW
    for attempt in range(3):
        name = f"{key}.{_own_prefix}-{next(_own_serial)}{PART_SUFFIX}"
        try:
            fd = os.open(name, flags, FILE_MODE, dir_fd=directory)
        except FileExistsError:
            if attempt == 2:  # pragma: no cover - would take three clashes of unique names
                raise
            continue
        break
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # new and unknown to anyone: never held
    except BaseException:
        os.close(fd)
        unlink_quietly(name, directory)
        raise
    return fd, name
