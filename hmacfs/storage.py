# -*- test-case-name: tests.test_storage -*-
"""
The on-disk store for uploads: path safety, partial files, atomic commit, metadata.

Layout under the store root::

    <root>/<segments...>                  finished files, served as they are
    <root>/.hmacfs/partial/<key>.part     uploads in progress or interrupted (resumable)
    <root>/.hmacfs/partial/<key>.json     the sidecar record of that upload (who may resume it)
    <root>/.hmacfs/meta/<key>.json        metadata of finished files

where ``key`` is the SHA-256 hex digest of ``"/".join(segments)`` in UTF-8, so our private
names never depend on what a client chose.

Invariants: a file is never overwritten (commit publishes with ``os.link``, which refuses an
existing name atomically); a failed upload leaves nothing at the target path; no method
buffers a whole file; one writer per partial file at a time.  The writer holds an exclusive
``flock`` on its partial file from open to commit, abort or release, so a second writer in
this process, in another worker process or (where the filesystem supports it) on another
node sharing the store is refused, and a writer that dies (even ``kill -9``) lets go at once.
Everything here is synchronous and blocking: the caller runs ``PartialUpload.write``/
``commit`` on a thread pool.
"""

from __future__ import annotations

import errno
import fcntl
import functools
import hashlib
import json
import os
import stat as stat_mod
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import BinaryIO

import attrs
from twisted.logger import Logger

from hmacfs.errors import Refusal
from hmacfs.logs import log_router

log = Logger(observer=log_router)

PRIVATE_DIR = ".hmacfs"
#: finished files whose metadata (Content-Type, SHA-256) each process keeps in memory
META_CACHE_SIZE = 4096
DEFAULT_CONTENT_TYPE = "application/octet-stream"

_FILE_MODE = 0o640
_DIR_MODE = 0o750
# Linux refuses writev() with more buffers than this (EINVAL); Python does not split.
try:
    _IOV_MAX = max(16, os.sysconf("SC_IOV_MAX"))
except (AttributeError, ValueError, OSError):
    _IOV_MAX = 1024
_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


class StorageError(Refusal):
    """A refusal the HTTP layer turns into ``status`` with ``reason``."""


@attrs.frozen
class StoredFile:
    """A finished upload as GET/HEAD need it."""

    path: Path
    size: int
    mtime: float
    content_type: str
    etag: str
    sha256: str | None


def path_key(segments: Sequence[str]) -> str:
    """The name of a path's private files; hashed so it never depends on client input."""
    return _path_key("/".join(segments))


@functools.lru_cache(maxsize=1024)
def _path_key(joined: str) -> str:
    # One upload asks for its key several times (lock, partial, record, meta).
    return hashlib.sha256(joined.encode("utf-8")).hexdigest()


def _check_segments(segments: Sequence[str]) -> tuple[str, ...]:
    """Refuse anything that is not a plain list of plain names (SlotPath already did)."""
    if isinstance(segments, (str, bytes)):
        raise TypeError("segments must be a sequence of path segments, not a string")
    segs = tuple(segments)
    if not segs:
        raise StorageError(403, "empty path")
    for seg in segs:
        if (
            not isinstance(seg, str)
            or seg in ("", ".", "..")
            or "/" in seg
            or os.sep in seg
            or (os.altsep is not None and os.altsep in seg)
            or "\0" in seg
        ):
            raise StorageError(403, "forbidden path")
        try:
            seg.encode("utf-8")
        except UnicodeEncodeError:
            raise StorageError(403, "forbidden path") from None
    # casefold: on a case-insensitive filesystem ".HMACFS" is the same directory.
    if segs[0].casefold() == PRIVATE_DIR:
        raise StorageError(403, "forbidden path")
    return segs


def _etag(st: os.stat_result) -> str:
    """A strong validator: changes when the file is replaced, stable while it is not."""
    return f'"{st.st_size:x}-{st.st_mtime_ns:x}-{st.st_ino:x}"'


def _fsync_dir(path: Path) -> None:
    """Make a directory entry change (link, rename, mkdir) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _unlink_quietly(path: Path) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _try_lock(fd: int) -> bool:
    """Take the one-writer lock of a partial file without waiting; False if someone holds it."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def _same_file(fd: int, path: Path) -> bool:
    """Whether ``path`` still names the file open as ``fd`` (not unlinked or replaced)."""
    return _opened_stat(fd, path) is not None


def _opened_stat(fd: int, path: Path) -> os.stat_result | None:
    """The ``fstat`` of ``fd`` if ``path`` still names that file, else None."""
    try:
        named = os.lstat(path)
    except FileNotFoundError:
        return None
    opened = os.fstat(fd)
    if (named.st_ino, named.st_dev) != (opened.st_ino, opened.st_dev):
        return None
    return opened


def _read_json(path: Path) -> dict[str, object] | None:
    try:
        with open(path, "rb") as f:
            data = json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        log.failure("unreadable upload record {path}", path=str(path))
        return None
    return data if isinstance(data, dict) else None


def _write_file(path: Path, data: bytes, *, sync: bool) -> None:
    """Create or truncate ``path`` (never through a symlink), write all of ``data``, maybe fsync."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC | os.O_NOFOLLOW
    fd = os.open(path, flags, _FILE_MODE)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        if sync:
            os.fsync(fd)
    finally:
        os.close(fd)


def _write_json(path: Path, data: dict[str, object], *, sync: bool) -> None:
    """Write ``data`` to a temporary name and rename it over ``path``."""
    tmp = path.with_name(path.name + ".tmp")
    _write_file(tmp, json.dumps(data, sort_keys=True).encode("utf-8"), sync=sync)
    os.rename(tmp, path)


class Store:
    """
    Finished files and uploads in progress under one root directory.

    Paths come from ``hmacfs.paths.SlotPath.segments``, already validated; the checks here
    are repeated on purpose, so a bug elsewhere cannot write outside ``root``.
    """

    def __init__(
        self,
        root: Path,
        *,
        min_free_bytes: int = 0,
        now: Callable[[], float] = time.time,
    ) -> None:
        # A partial file never blocks its path because of its age: only a live
        # writer's lock does (``writer_lock_free``); ``sweep_partials`` removes
        # abandoned ones after ResumeTTL.
        # Resolve once: the operator may point StoreDir at a symlink; below it we follow none.
        self.root = Path(os.path.realpath(root))
        self._root_str = str(self.root)
        self._root_prefix = self._root_str.rstrip(os.sep) + os.sep
        self.min_free_bytes = min_free_bytes
        self._now = now
        self._meta_cache: dict[tuple[object, ...], dict[str, object]] = {}
        self.partial_dir = self.root / PRIVATE_DIR / "partial"
        self.meta_dir = self.root / PRIVATE_DIR / "meta"
        self._meta_prefix = str(self.meta_dir) + os.sep
        os.makedirs(self.partial_dir, mode=_DIR_MODE, exist_ok=True)
        os.makedirs(self.meta_dir, mode=_DIR_MODE, exist_ok=True)

    # -- paths ---------------------------------------------------------------------------

    def target_path(self, segments: Sequence[str]) -> Path:
        """Where a path's file lives; 403 for anything that could leave ``root``."""
        return Path(self._target(_check_segments(segments)))

    def _target(self, segs: tuple[str, ...]) -> str:
        """``target_path`` as a string, for checked segments (strings: GETs are hot)."""
        target = self._root_prefix + os.sep.join(segs)
        # What commonpath([root, normed]) == root says for a normalised absolute
        # path, without its cost on every request.
        if not os.path.normpath(target).startswith(self._root_prefix):
            raise StorageError(403, "forbidden path")
        return target

    def partial_path(self, segments: Sequence[str]) -> Path:
        return self.partial_dir / f"{path_key(segments)}.part"

    def record_path(self, segments: Sequence[str]) -> Path:
        """The sidecar record of an upload in progress (next to its partial file)."""
        return self.partial_dir / f"{path_key(segments)}.json"

    def meta_path(self, segments: Sequence[str]) -> Path:
        return Path(self._meta(segments))

    def _meta(self, segments: Sequence[str]) -> str:
        return f"{self._meta_prefix}{path_key(segments)}.json"

    def _ensure_parents(self, segs: tuple[str, ...], *, create: bool) -> bool:
        """
        Walk the directories between ``root`` and the target, creating them if asked.

        A symlink among them is refused (403): we never follow links below root, so an
        upload can never land outside it.  A regular file where a directory is needed is a
        conflict (409).  Returns False if a directory is missing and ``create`` is False.
        """
        current = self._root_prefix[:-1]  # "" for a store at "/"
        for seg in segs[:-1]:
            current = f"{current}{os.sep}{seg}"
            if create:
                try:
                    os.mkdir(current, _DIR_MODE)
                    continue
                except FileExistsError:
                    pass
            try:
                st = os.lstat(current)
            except FileNotFoundError:
                return False
            if stat_mod.S_ISLNK(st.st_mode):
                log.warn("refusing symlinked directory {path}", path=current)
                raise StorageError(403, "forbidden path")
            if not stat_mod.S_ISDIR(st.st_mode):
                raise StorageError(409, "path conflicts with an existing file")
        return True

    # -- queries -------------------------------------------------------------------------

    def exists(self, segments: Sequence[str]) -> bool:
        """Whether anything (even a dangling link) occupies the target: the caller's 409."""
        return os.path.lexists(self.target_path(segments))

    def free_bytes(self) -> int:
        """Bytes an unprivileged writer may still use on the store's filesystem."""
        st = os.statvfs(self.root)
        return st.f_bavail * st.f_frsize

    def check_free_space(self, incoming: int) -> None:
        """Refuse an upload (507) that would leave less than ``min_free_bytes`` free."""
        if self.free_bytes() - incoming < self.min_free_bytes:
            raise StorageError(507, "insufficient storage")

    def _read_meta(self, segs: tuple[str, ...]) -> dict[str, object]:
        try:
            with open(self.meta_path(segs), "rb") as f:
                meta = json.load(f)
        except FileNotFoundError:
            return {}
        except (OSError, ValueError):
            log.failure("unreadable metadata for {path}", path="/".join(segs))
            return {}
        return meta if isinstance(meta, dict) else {}

    def _stored_file(self, segs: tuple[str, ...], st: os.stat_result, target: str) -> StoredFile:
        # Metadata is cached by the identity of the file and of its metadata
        # file: one lstat instead of open, read and JSON per GET.  Missing
        # metadata (the instant between link and rename) is never cached.
        try:
            meta_st = os.lstat(self._meta(segs))
        except OSError:
            meta = {}
        else:
            key = (segs, st.st_ino, st.st_mtime_ns, st.st_size, meta_st.st_ino, meta_st.st_mtime_ns)
            meta = self._meta_cache.get(key)
            if meta is None:
                meta = self._read_meta(segs)
                if meta:
                    if len(self._meta_cache) >= META_CACHE_SIZE:
                        self._meta_cache.pop(next(iter(self._meta_cache)))
                    self._meta_cache[key] = meta
        content_type = meta.get("content_type")
        sha256 = meta.get("sha256")
        return StoredFile(
            path=Path(target),
            size=st.st_size,
            mtime=st.st_mtime,
            content_type=content_type if isinstance(content_type, str) else DEFAULT_CONTENT_TYPE,
            etag=_etag(st),
            sha256=sha256 if isinstance(sha256, str) else None,
        )

    def stat(self, segments: Sequence[str]) -> StoredFile | None:
        """A finished regular file, or None (missing, directory, symlink, symlinked parent)."""
        segs = _check_segments(segments)
        target = self._target(segs)
        try:
            if not self._ensure_parents(segs, create=False):
                return None
            st = os.lstat(target)
        except (FileNotFoundError, NotADirectoryError):
            return None
        except StorageError:
            return None
        if not stat_mod.S_ISREG(st.st_mode):
            return None
        return self._stored_file(segs, st, target)

    def open_file(self, segments: Sequence[str]) -> tuple[BinaryIO, StoredFile] | None:
        """
        Open a finished file for serving, or None like ``stat``.

        Opens with O_NOFOLLOW and describes the *opened* file (fstat), so the ETag and size
        always match the bytes served even if the name changes in between.
        """
        segs = _check_segments(segments)
        target = self._target(segs)
        try:
            if not self._ensure_parents(segs, create=False):
                return None
            fd = os.open(target, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
        except (FileNotFoundError, NotADirectoryError, StorageError):
            return None
        except OSError as e:
            if e.errno == errno.ELOOP:  # the target itself is a symlink
                return None
            raise
        try:
            st = os.fstat(fd)
            if not stat_mod.S_ISREG(st.st_mode):
                os.close(fd)
                return None
            f = os.fdopen(fd, "rb")
        except BaseException:
            os.close(fd)
            raise
        return f, self._stored_file(segs, st, target)

    # -- changes -------------------------------------------------------------------------

    def open_partial(
        self,
        segments: Sequence[str],
        content_type: str,
        size: int | None,
        *,
        record: dict[str, object] | None = None,
        resumable: bool = True,
    ) -> PartialUpload:
        """
        Start an upload from byte 0: 409 if the file exists or another writer holds the upload.

        A partial file left by an interrupted upload that nobody is writing to is truncated
        and reused: a client that starts over (a plain PUT retry) must not be refused because
        an earlier attempt could have been resumed.  ``record`` is the sidecar (what binds the
        upload to its signed URL and session); it is written before this returns.

        ``resumable=False`` is for an upload that is committed or dropped within one request
        (its whole body is in memory, no session token): no sidecar is written when the
        partial file is new, since a partial without a record is never resumed.  A leftover
        partial is reused with a record as usual, so no stale record is left beside it.
        """
        segs = _check_segments(segments)
        target = self.target_path(segs)
        try:
            self._ensure_parents(segs, create=True)
        except OSError as e:
            raise _translate(e) from e
        if os.path.lexists(target):
            raise StorageError(409, "file already exists")
        partial = self.partial_path(segs)
        sidecar: dict[str, object] | None = None
        try:
            opened = self._open_locked_new(partial)
            assert opened is not None
            fd, fresh = opened
            try:
                if not fresh:
                    os.ftruncate(fd, 0)
                if resumable or not fresh:
                    sidecar = dict(record or {})
                    sidecar.setdefault("path", "/".join(segs))
                    sidecar.setdefault("content_type", content_type)
                    sidecar.setdefault("size", size)
                    sidecar.setdefault("created", self._now())
                    _write_json(self.record_path(segs), sidecar, sync=False)
            except BaseException:
                _unlink_quietly(partial)
                _unlink_quietly(self.record_path(segs))
                os.close(fd)
                raise
        except OSError as e:
            raise _translate(e) from e
        return PartialUpload(
            store=self,
            path=partial,
            target=target,
            segments=segs,
            content_type=content_type,
            size=size,
            fd=fd,
            record=sidecar,
            has_record=sidecar is not None,
        )

    def resume_partial(self, segments: Sequence[str]) -> PartialUpload | None:
        """
        Reopen an interrupted upload to append to it, or None if there is none to resume.

        409 if the file exists by now or another writer holds the upload.  The offset to
        resume from is the partial file's length (``PartialUpload.written``): the bytes that
        reached the file, whatever any progress record says.
        """
        segs = _check_segments(segments)
        target = self.target_path(segs)
        if os.path.lexists(target):
            raise StorageError(409, "file already exists")
        partial = self.partial_path(segs)
        try:
            fd = self._open_locked(partial, create=False)
        except OSError as e:
            raise _translate(e) from e
        if fd is None:
            return None
        try:
            record = _read_json(self.record_path(segs))
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
            store=self,
            path=partial,
            target=target,
            segments=segs,
            content_type=content_type if isinstance(content_type, str) else DEFAULT_CONTENT_TYPE,
            size=size if isinstance(size, int) else None,
            fd=fd,
            written=offset,
            offset=offset,
            record=record,
        )

    def partial_status(self, segments: Sequence[str]) -> tuple[int, dict[str, object]] | None:
        """
        ``(bytes on disk, record)`` of an upload in progress or interrupted, or None.

        Reads without locking: while a writer is active the length only grows.
        """
        segs = _check_segments(segments)
        record = _read_json(self.record_path(segs))
        if record is None:
            return None
        try:
            length = os.lstat(self.partial_path(segs)).st_size
        except FileNotFoundError:
            return None
        return length, record

    def partial_mtime(self, segments: Sequence[str]) -> float | None:
        """When the upload last received bytes (or was created); None if there is none."""
        try:
            return os.lstat(self.partial_path(_check_segments(segments))).st_mtime
        except FileNotFoundError:
            return None

    def remove_partial(self, segments: Sequence[str]) -> bool:
        """
        Drop an interrupted upload (tus termination): False if there is none, 409 if a
        writer holds it.
        """
        segs = _check_segments(segments)
        partial = self.partial_path(segs)
        fd = self._open_locked(partial, create=False)
        if fd is None:
            _unlink_quietly(self.record_path(segs))
            return False
        try:
            _unlink_quietly(partial)
            _unlink_quietly(self.record_path(segs))
        finally:
            os.close(fd)
        log.info("removed upload in progress {path}", path="/".join(segs))
        return True

    def sweep_partials(self, max_idle: float) -> int:
        """
        Remove uploads nobody has written to for ``max_idle`` seconds and nobody holds.

        Returns how many were removed.  Also clears records and temporary files left
        without their partial file.  Blocking: run it on a worker thread.
        """
        now = self._now()
        removed = 0
        try:
            names = os.listdir(self.partial_dir)
        except FileNotFoundError:
            return 0
        for name in names:
            path = self.partial_dir / name
            try:
                idle = now - os.lstat(path).st_mtime
            except FileNotFoundError:
                continue
            if idle < max_idle:
                continue
            if name.endswith(".part"):
                if self._sweep_one(path):
                    removed += 1
            elif name.endswith((".json", ".tmp", ".takeover")):
                stem = name.split(".", 1)[0]
                if not (self.partial_dir / f"{stem}.part").exists():
                    _unlink_quietly(path)
        return removed

    def _sweep_one(self, partial: Path) -> bool:
        try:
            fd = os.open(partial, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
        except FileNotFoundError:
            return False
        try:
            if not _try_lock(fd) or not _same_file(fd, partial):
                return False
            record = partial.with_suffix(".json")
            log.info(
                "removing abandoned upload {name} ({size} bytes)",
                name=partial.name,
                size=os.fstat(fd).st_size,
            )
            _unlink_quietly(partial)
            _unlink_quietly(record)
            return True
        finally:
            os.close(fd)

    def writer_lock_free(self, key: str) -> bool:
        """Whether no process here holds the writer lock of the upload with this path key."""
        if len(key) != 64 or not all(c in "0123456789abcdef" for c in key):
            return False
        try:
            fd = os.open(self.partial_dir / f"{key}.part", os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
        except FileNotFoundError:
            return True
        try:
            return _try_lock(fd)
        finally:
            os.close(fd)  # closing drops the probe's lock

    def request_takeover(self, segments: Sequence[str]) -> None:
        """
        Ask whichever process writes this upload to let go (its client is back on a new
        connection, so the old one is dead): it checks for this marker every second.
        """
        marker = self.partial_dir / f"{path_key(_check_segments(segments))}.takeover"
        fd = os.open(marker, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, _FILE_MODE)
        os.close(fd)
        os.utime(marker)

    def takeover_requested(self, segments: Sequence[str], since: float) -> bool:
        """Whether a takeover marker newer than ``since`` (epoch seconds) exists."""
        marker = self.partial_dir / f"{path_key(_check_segments(segments))}.takeover"
        try:
            return os.lstat(marker).st_mtime >= since
        except FileNotFoundError:
            return False

    def clear_takeover(self, segments: Sequence[str]) -> None:
        _unlink_quietly(self.partial_dir / f"{path_key(_check_segments(segments))}.takeover")

    def _open_locked(self, partial: Path, *, create: bool) -> int | None:
        """
        Open a partial file for writing and take its one-writer lock.

        Returns None if it does not exist (and ``create`` is false); 409 if another writer
        holds it.  A name unlinked or replaced between our open and our lock (a commit or a
        sweep that won the race) is opened again, so the lock is always on the file that
        the name designates.
        """
        flags = os.O_WRONLY | os.O_CLOEXEC | os.O_NOFOLLOW | (os.O_CREAT if create else 0)
        for _attempt in range(5):
            try:
                fd = os.open(partial, flags, _FILE_MODE)
            except FileNotFoundError:
                if create:
                    raise
                return None
            if not _try_lock(fd):
                os.close(fd)
                raise StorageError(409, "upload already in progress")
            if _same_file(fd, partial):
                return fd
            os.close(fd)
        raise StorageError(409, "upload already in progress")

    def _open_locked_new(self, partial: Path) -> tuple[int, bool] | None:
        """
        ``_open_locked(create=True)``, and whether the file was created just now (empty, and
        no record of an earlier upload beside it can be ours to reuse).

        ``O_EXCL`` tells a new file from a leftover in the same ``open``; the lock and the
        check that the name still designates the locked file are the same as for a leftover.
        """
        flags = os.O_WRONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_CREAT
        try:
            fd = os.open(partial, flags | os.O_EXCL, _FILE_MODE)
        except FileExistsError:
            fd = self._open_locked(partial, create=True)
            return None if fd is None else (fd, False)
        if not _try_lock(fd):
            os.close(fd)
            raise StorageError(409, "upload already in progress")
        st = _opened_stat(fd, partial)
        if st is None or st.st_size:
            # Someone else got at the new name between our create and our lock (a commit or
            # a sweep that won the race, another writer): take the general path.
            os.close(fd)
            fd = self._open_locked(partial, create=True)
            return None if fd is None else (fd, False)
        return fd, True

    def delete(self, segments: Sequence[str]) -> bool:
        """Remove a finished file and its metadata; False if there was no regular file."""
        segs = _check_segments(segments)
        target = self.target_path(segs)
        try:
            if not self._ensure_parents(segs, create=False):
                return False
            st = os.lstat(target)
        except (FileNotFoundError, NotADirectoryError, StorageError):
            return False
        if not stat_mod.S_ISREG(st.st_mode):
            return False
        try:
            os.unlink(target)
        except FileNotFoundError:
            return False
        _unlink_quietly(self.meta_path(segs))
        log.info("deleted {path}", path="/".join(segs))
        return True


def _translate(e: OSError) -> OSError | StorageError:
    """Map the OS errors a client can cause or should hear about; others stay 500s."""
    if e.errno in _NO_SPACE:
        return StorageError(507, "insufficient storage")
    if e.errno == errno.ENAMETOOLONG:
        return StorageError(400, "file name too long")
    return e


@attrs.define(eq=False)
class PartialUpload:
    """
    One upload being written, owning (and locking) its partial file.

    ``write`` and ``commit`` block; run them on a worker thread.  Do not call ``abort``
    concurrently with them from another thread: a lock makes it wait for the running call
    (so the fd is never closed under a write), which blocks the calling thread meanwhile.
    After a failed ``write`` the caller must ``abort`` or ``release``; ``commit`` cleans up
    after itself.  ``written`` is the length of the partial file (``offset`` of it were
    there when it was opened, for a resumed upload).
    """

    store: Store
    path: Path
    target: Path
    segments: tuple[str, ...]
    content_type: str
    size: int | None
    fd: int
    written: int = 0
    offset: int = 0
    record: dict[str, object] | None = None
    #: whether a sidecar record was written for this upload (a one-request upload has none)
    has_record: bool = True
    _finished: bool = attrs.field(default=False, init=False)
    _lock: threading.Lock = attrs.field(factory=threading.Lock, init=False)

    def write(self, chunks: Sequence[bytes]) -> int:
        """Append all of ``chunks``; returns the number of bytes written."""
        with self._lock:
            if self._finished:
                raise ValueError("upload already committed or aborted")
            views = [memoryview(c) for c in chunks if len(c)]
            total = 0
            while views:
                try:
                    n = os.writev(self.fd, views[:_IOV_MAX])
                except OSError as e:
                    raise _translate(e) from e
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
        fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
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
                self._close()
            return self.written

    def commit(self, sha256_hex: str | None) -> StoredFile:
        """
        Publish the upload at its target; 409 if something appeared there meanwhile.

        Order: fsync data, write metadata to a temporary name, link the partial to the
        target (atomic, never overwrites), move the metadata into place, unlink the partial
        and its record, fsync directories, and only then close (and so unlock) the partial
        file, so nobody can reopen it in between.  Metadata reaches its final name only after
        the link succeeded, so a losing upload never touches the existing file's metadata.
        On any failure nothing of this upload remains (not even at the target).
        """
        with self._lock:
            if self._finished:
                raise ValueError("upload already committed or aborted")
            self._finished = True
            store = self.store
            meta_final = store.meta_path(self.segments)
            meta_tmp = meta_final.with_name(meta_final.name + ".tmp")
            record = store.record_path(self.segments)
            linked = placed = False
            try:
                os.fsync(self.fd)
                self._write_meta(meta_tmp, sha256_hex)
                # A retention sweep may have removed now-empty parents during the upload.
                store._ensure_parents(self.segments, create=True)
                try:
                    os.link(self.path, self.target, follow_symlinks=False)
                except FileExistsError:
                    log.info("upload of {path} lost to an existing file", path=self._name)
                    raise StorageError(409, "file already exists") from None
                linked = True
                os.rename(meta_tmp, meta_final)
                placed = True
                os.unlink(self.path)
                if self.has_record:
                    _unlink_quietly(record)
                # The target is a second name of the file we hold: its size, mtime and
                # inode are the stored file's (link changes only its ctime).
                st = os.fstat(self.fd)
                self._close()
                self._fsync_parents()
                _fsync_dir(store.meta_dir)
            except BaseException as e:
                if placed:
                    _unlink_quietly(meta_final)
                if linked:
                    _unlink_quietly(self.target)
                _unlink_quietly(meta_tmp)
                _unlink_quietly(self.path)
                _unlink_quietly(record)
                self._close()
                if isinstance(e, OSError):
                    translated = _translate(e)
                    if translated is not e:
                        raise translated from e
                raise
            log.debug("committed {path}: {size} bytes", path=self._name, size=st.st_size)
            # Described from what was just written: reading the metadata back would cost
            # a stat, an open and a JSON parse per upload.
            return StoredFile(
                path=self.target,
                size=st.st_size,
                mtime=st.st_mtime,
                content_type=self.content_type,
                etag=_etag(st),
                sha256=sha256_hex,
            )

    def abort(self) -> None:
        """Drop the upload: remove the partial file and its record, then close. Idempotent."""
        with self._lock:
            if self._finished:
                return
            self._finished = True
            _unlink_quietly(self.path)
            _unlink_quietly(self.store.record_path(self.segments))
            self._close()

    @property
    def _name(self) -> str:
        return "/".join(self.segments)

    def _close(self) -> None:
        if self.fd >= 0:
            fd, self.fd = self.fd, -1
            os.close(fd)

    def _write_meta(self, path: Path, sha256_hex: str | None) -> None:
        meta = {
            "path": self._name,
            "content_type": self.content_type,
            "size": self.written,
            "sha256": sha256_hex,
            "created": self.store._now(),
        }
        _write_file(path, json.dumps(meta).encode("utf-8"), sync=True)

    def _fsync_parents(self) -> None:
        """fsync from the target's directory up to root, so new directories survive too."""
        directory = self.target.parent
        while True:
            _fsync_dir(directory)
            if directory == self.store.root:
                break
            directory = directory.parent
