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
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
#: How often (seconds) the cached private-directory descriptors are checked against the
#: names (a directory removed or replaced under a running server is reopened or recreated).
DIR_RECHECK_SECONDS = 1.0


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


def _fsync_fd(fd: int) -> None:
    """Make a directory entry change (link, rename, mkdir) durable."""
    os.fsync(fd)


def _close_all(fds: Sequence[int]) -> None:
    for fd in reversed(fds):
        os.close(fd)


def _unlink_quietly(name: str | Path, dir_fd: int | None = None) -> None:
    try:
        os.unlink(name, dir_fd=dir_fd)
    except FileNotFoundError:
        pass


def _try_lock(fd: int) -> bool:
    """Take the one-writer lock of a partial file without waiting; False if someone holds it."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def _same_file(fd: int, name: str, dir_fd: int) -> bool:
    """Whether ``name`` still names the file open as ``fd`` (not unlinked or replaced)."""
    return _opened_stat(fd, name, dir_fd) is not None


def _opened_stat(fd: int, name: str, dir_fd: int) -> os.stat_result | None:
    """The ``fstat`` of ``fd`` if ``name`` (in ``dir_fd``) still names that file, else None."""
    try:
        named = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return None
    opened = os.fstat(fd)
    if (named.st_ino, named.st_dev) != (opened.st_ino, opened.st_dev):
        return None
    return opened


def _read_json(name: str, dir_fd: int) -> dict[str, object] | None:
    try:
        fd = os.open(name, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW, dir_fd=dir_fd)
    except FileNotFoundError:
        return None
    except OSError:
        log.failure("unreadable upload record {name}", name=name)
        return None
    try:
        with os.fdopen(fd, "rb") as f:
            data = json.load(f)
    except (OSError, ValueError):
        log.failure("unreadable upload record {name}", name=name)
        return None
    return data if isinstance(data, dict) else None


def _write_file(name: str | Path, data: bytes, *, sync: bool, dir_fd: int | None = None) -> None:
    """
    Create or truncate ``name`` (never through a symlink), write all of ``data``, maybe
    fsync.  On failure (a full disk) the file is removed again: nothing half-written stays.
    """
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC | os.O_NOFOLLOW
    fd = os.open(name, flags, _FILE_MODE, dir_fd=dir_fd)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        if sync:
            os.fsync(fd)
    except BaseException:
        os.close(fd)
        _unlink_quietly(name, dir_fd)
        raise
    os.close(fd)


def _write_json(name: str, data: dict[str, object], *, sync: bool, dir_fd: int) -> None:
    """Write ``data`` to a temporary name and rename it over ``name`` (both in ``dir_fd``)."""
    tmp = name + ".tmp"
    _write_file(tmp, json.dumps(data, sort_keys=True).encode("utf-8"), sync=sync, dir_fd=dir_fd)
    try:
        os.rename(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    except BaseException:
        _unlink_quietly(tmp, dir_fd)
        raise


def _open_dir(name: str, dir_fd: int | None) -> int:
    """Open a directory below ``dir_fd`` without following a link (ENOTDIR/ELOOP if one)."""
    return os.open(name, _DIR_FLAGS, dir_fd=dir_fd)


def _is_link(name: str, dir_fd: int) -> bool:
    try:
        return stat_mod.S_ISLNK(os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode)
    except OSError:
        return False


class _Dirs:
    """
    Descriptors of the store root and of ``.hmacfs``, ``.hmacfs/partial`` and
    ``.hmacfs/meta``, opened without following links.  Everything in the private
    directories is done relative to them (``dir_fd=``), so a symlink swapped in below
    StoreDir is never followed.  A snapshot: when a directory is replaced (deleted and
    recreated), the store opens a new ``_Dirs``; the old one closes its descriptors when
    the last upload or call using it lets go of it (reference counting), so a descriptor
    is never closed under a thread that still uses it.
    """

    __slots__ = ("root", "private", "partial", "meta", "ids")

    def __init__(self, root: int, private: int, partial: int, meta: int) -> None:
        self.root, self.private, self.partial, self.meta = root, private, partial, meta
        self.ids = tuple(_identity(os.fstat(fd)) for fd in (root, private, partial, meta))

    def __del__(self) -> None:
        for fd in (self.meta, self.partial, self.private, self.root):
            try:
                os.close(fd)
            except OSError:
                pass


def _identity(st: os.stat_result) -> tuple[int, int]:
    return st.st_dev, st.st_ino


class _Handle:
    """One directory descriptor, closed when the last user lets go of it (see ``_Dirs``)."""

    __slots__ = ("fd",)

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def __del__(self) -> None:
        try:
            os.close(self.fd)
        except OSError:
            pass


class PrivateDir:
    """
    ``StoreDir/.hmacfs/<name>`` (tombstones), reached without following a link: a link or
    a file in its place or in place of ``.hmacfs`` is refused (503); removed, it is
    recreated on ``reopen`` with one warning.
    """

    def __init__(self, root: Path, name: str) -> None:
        self._root = os.path.realpath(root)
        self.name = name
        self.path = Path(self._root) / PRIVATE_DIR / name
        self._lock = threading.Lock()
        self.handle = self._open(warn=False)

    def _open(self, *, warn: bool) -> _Handle:
        created: list[str] = []
        fds: list[int] = []
        try:
            fds.append(os.open(self._root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC))
            for name in (PRIVATE_DIR, self.name):
                try:
                    fds.append(_open_dir(name, fds[-1]))
                except FileNotFoundError:
                    try:
                        os.mkdir(name, _DIR_MODE, dir_fd=fds[-1])
                        created.append(name)
                    except FileExistsError:
                        pass
                    fds.append(_open_dir(name, fds[-1]))
        except OSError as e:
            _close_all(fds)
            if e.errno in (errno.ENOTDIR, errno.ELOOP):
                log.error("{path} is a symlink or not a directory", path=str(self.path))
                raise StorageError(503, "store unavailable") from None
            raise
        if created and warn:
            log.warn("recreated missing store directory {path}", path=str(self.path))
        _close_all(fds[:-1])
        return _Handle(fds[-1])

    def reopen(self) -> _Handle:
        """The directory was found missing: open it again (recreating it)."""
        with self._lock:
            self.handle = self._open(warn=True)
            return self.handle


class Reservation:
    """
    Free space promised to one upload in flight (``Store.reserve``): counted by every
    later admission in this process until the upload ends, and shrunk as its bytes reach
    the disk (they are then counted by ``statvfs`` instead).  ``release`` is idempotent.
    """

    __slots__ = ("_store", "remaining")

    def __init__(self, store: Store, amount: int) -> None:
        self._store = store
        self.remaining = amount

    def consume(self, count: int) -> None:
        """``count`` bytes of the upload were written: no longer promised, now used."""
        store = self._store
        with store._reserve_lock:
            taken = min(count, self.remaining)
            self.remaining -= taken
            store._reserved -= taken

    def release(self) -> None:
        store = self._store
        with store._reserve_lock:
            store._reserved -= self.remaining
            self.remaining = 0


class Store:
    """
    Finished files and uploads in progress under one root directory.

    Paths come from ``hmacfs.signing.paths.SlotPath.segments``, already validated; the checks here
    are repeated on purpose, so a bug elsewhere cannot write outside ``root``.

    Nothing below ``root`` is reached through a symlink: the private directories are open
    descriptors (``O_NOFOLLOW|O_DIRECTORY``, rechecked every ``DIR_RECHECK_SECONDS`` and
    recreated if removed), and the directories of the upload tree are walked one
    ``openat`` at a time, so a link swapped in between a check and a use is never followed.
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
        #: bytes promised to uploads in flight in this process (``reserve``)
        self._reserved = 0
        self._reserve_lock = threading.Lock()
        self._dirs_lock = threading.Lock()
        self._dirs_checked = 0.0
        #: what was last found wrong with the private directories (logged once per change)
        self._dirs_problem: str | None = None
        os.makedirs(self.root, mode=_DIR_MODE, exist_ok=True)
        self._cached_dirs = self._open_dirs(None)
        self._dirs_checked = time.monotonic()

    # -- private directories -------------------------------------------------------------

    def _open_dirs(self, old: _Dirs | None) -> _Dirs:
        """
        Open root, ``.hmacfs``, ``partial`` and ``meta`` without following links, creating
        what is missing (a warning when that happens under a running store).  A symlink or a
        file in their place is refused (503): an operator must look at it.
        """
        created: list[str] = []
        fds: list[int] = []
        shown = ""
        try:
            fds.append(os.open(self._root_str, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC))
            for parent, name, shown in (
                (0, PRIVATE_DIR, PRIVATE_DIR),
                (1, "partial", f"{PRIVATE_DIR}/partial"),
                (1, "meta", f"{PRIVATE_DIR}/meta"),
            ):
                parent_fd = fds[parent]
                try:
                    fd = _open_dir(name, parent_fd)
                except FileNotFoundError:
                    try:
                        os.mkdir(name, _DIR_MODE, dir_fd=parent_fd)
                        created.append(shown)
                    except FileExistsError:
                        pass
                    fd = _open_dir(name, parent_fd)
                fds.append(fd)
        except OSError as e:
            _close_all(fds)
            if e.errno in (errno.ENOTDIR, errno.ELOOP):
                problem = f"{self._root_prefix}{shown} is a symlink or not a directory"
                if problem != self._dirs_problem:
                    self._dirs_problem = problem
                    log.error("store unusable: {problem}; refusing uploads", problem=problem)
                raise StorageError(503, "store unavailable") from None
            raise
        self._dirs_problem = None
        if created and old is not None:
            log.warn(
                "recreated missing store directories under {root}: {dirs}",
                root=self._root_str,
                dirs=", ".join(created),
            )
        return _Dirs(*fds)

    def _dirs(self, *, force: bool = False) -> _Dirs:
        """The private-directory descriptors, rechecked against their names now and then."""
        if not force and time.monotonic() - self._dirs_checked < DIR_RECHECK_SECONDS:
            return self._cached_dirs
        with self._dirs_lock:
            dirs = self._cached_dirs
            if self._dirs_current(dirs):
                self._dirs_checked = time.monotonic()
                return dirs
            dirs = self._cached_dirs = self._open_dirs(dirs)
            self._dirs_checked = time.monotonic()
            return dirs

    def _dirs_current(self, dirs: _Dirs) -> bool:
        """Whether each cached descriptor is still the directory its name designates."""
        try:
            found = (
                _identity(os.stat(self._root_str)),
                _identity(os.stat(PRIVATE_DIR, dir_fd=dirs.root, follow_symlinks=False)),
                _identity(os.stat("partial", dir_fd=dirs.private, follow_symlinks=False)),
                _identity(os.stat("meta", dir_fd=dirs.private, follow_symlinks=False)),
            )
        except OSError:
            return False
        return found == dirs.ids and self._dirs_problem is None

    def open_private_file(self, name: str) -> int:
        """
        Open (creating) ``StoreDir/.hmacfs/<name>`` for writing without following a link,
        for a lock file; the caller closes the descriptor.
        """
        flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC | os.O_NOFOLLOW
        return os.open(name, flags, _FILE_MODE, dir_fd=self._dirs(force=True).private)

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
        return self.partial_dir / _partial_name(path_key(segments))

    def record_path(self, segments: Sequence[str]) -> Path:
        """The sidecar record of an upload in progress (next to its partial file)."""
        return self.partial_dir / f"{path_key(segments)}.json"

    def meta_path(self, segments: Sequence[str]) -> Path:
        return self.meta_dir / f"{path_key(segments)}.json"

    def _open_parents(self, root_fd: int, segs: tuple[str, ...], *, create: bool) -> list[int] | None:
        """
        Open the directories between ``root`` and the target, one ``openat`` below the
        other (creating them if asked); the caller closes the descriptors (last = parent).

        A symlink among them is refused (403): no link below root is followed, even one
        swapped in after a check, so an upload can never land outside it.  A regular file
        where a directory is needed is a conflict (409).  Returns None if a directory is
        missing and ``create`` is False.
        """
        fds: list[int] = []
        parent = root_fd
        try:
            for seg in segs[:-1]:
                if create:
                    try:
                        os.mkdir(seg, _DIR_MODE, dir_fd=parent)
                    except FileExistsError:
                        pass
                try:
                    fd = _open_dir(seg, parent)
                except FileNotFoundError:
                    if create:
                        raise
                    _close_all(fds)
                    return None
                except OSError as e:
                    if e.errno not in (errno.ENOTDIR, errno.ELOOP):
                        raise
                    if _is_link(seg, parent):
                        log.warn(
                            "refusing symlinked directory {path}",
                            path=self._root_prefix + os.sep.join(segs[: len(fds) + 1]),
                        )
                        raise StorageError(403, "forbidden path") from None
                    raise StorageError(409, "path conflicts with an existing file") from None
                fds.append(fd)
                parent = fd
        except BaseException:
            _close_all(fds)
            raise
        return fds

    def _ensure_parents(self, segs: tuple[str, ...], *, create: bool) -> bool:
        """Whether the target's directories exist (are created), no link among them."""
        fds = self._open_parents(self._dirs().root, segs, create=create)
        if fds is None:
            return False
        _close_all(fds)
        return True

    def _lookup(self, segs: tuple[str, ...]) -> tuple[_Dirs, list[int]] | None:
        """The descriptors to reach a finished file (None if a directory is missing)."""
        dirs = self._dirs()
        fds = self._open_parents(dirs.root, segs, create=False)
        return None if fds is None else (dirs, fds)

    # -- queries -------------------------------------------------------------------------

    def exists(self, segments: Sequence[str]) -> bool:
        """Whether anything (even a dangling link) occupies the target: the caller's 409."""
        return os.path.lexists(self.target_path(segments))

    def free_bytes(self) -> int:
        """Bytes an unprivileged writer may still use on the store's filesystem."""
        st = os.statvfs(self.root)
        return st.f_bavail * st.f_frsize

    @property
    def reserved_bytes(self) -> int:
        """Bytes promised to uploads in flight in this process and not written yet."""
        return self._reserved

    def check_free_space(self, incoming: int) -> None:
        """
        Refuse an upload (507) that would leave less than ``min_free_bytes`` free, counting
        the space already promised to uploads in flight (``reserve``).
        """
        if self.free_bytes() - self._reserved - incoming < self.min_free_bytes:
            raise StorageError(507, "insufficient storage")

    def reserve(self, incoming: int) -> Reservation:
        """
        ``check_free_space`` and promise the space to the upload until it ends: two uploads
        admitted together cannot both count the same free bytes.  Per process (each worker
        has its own); the caller hands the reservation to its ``PartialUpload``, which
        releases it on commit, abort or release.
        """
        free = self.free_bytes()
        incoming = max(0, incoming)
        with self._reserve_lock:
            if free - self._reserved - incoming < self.min_free_bytes:
                raise StorageError(507, "insufficient storage")
            self._reserved += incoming
        return Reservation(self, incoming)

    def _read_meta(self, segs: tuple[str, ...]) -> dict[str, object]:
        name = f"{path_key(segs)}.json"
        try:
            fd = os.open(name, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW, dir_fd=self._dirs().meta)
            with os.fdopen(fd, "rb") as f:
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
            meta_st = os.stat(
                f"{path_key(segs)}.json", dir_fd=self._dirs().meta, follow_symlinks=False
            )
        except (OSError, StorageError):
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
            found = self._lookup(segs)
            if found is None:
                return None
            dirs, fds = found
            try:
                st = os.stat(segs[-1], dir_fd=fds[-1] if fds else dirs.root, follow_symlinks=False)
            finally:
                _close_all(fds)
        except (FileNotFoundError, NotADirectoryError, StorageError):
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
        flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
        try:
            found = self._lookup(segs)
            if found is None:
                return None
            dirs, fds = found
            try:
                fd = os.open(segs[-1], flags, dir_fd=fds[-1] if fds else dirs.root)
            finally:
                _close_all(fds)
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
        key = path_key(segs)
        name = _partial_name(key)
        record_name = f"{key}.json"
        try:
            dirs = self._dirs()
            fds = self._open_parents(dirs.root, segs, create=True)
            assert fds is not None
            try:
                exists = _lexists(segs[-1], fds[-1] if fds else dirs.root)
            finally:
                _close_all(fds)
            if exists:
                raise StorageError(409, "file already exists")
            try:
                opened = self._open_locked_new(dirs, name)
            except FileNotFoundError:
                # The private directory was removed under us: recreate it, try once more.
                dirs = self._dirs(force=True)
                opened = self._open_locked_new(dirs, name)
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
                    sidecar.setdefault("created", self._now())
                    _write_json(record_name, sidecar, sync=False, dir_fd=dirs.partial)
            except BaseException:
                _unlink_quietly(name, dirs.partial)
                _unlink_quietly(record_name, dirs.partial)
                os.close(fd)
                raise
        except OSError as e:
            raise _translate(e) from e
        return PartialUpload(
            store=self,
            path=self.partial_dir / name,
            target=target,
            segments=segs,
            content_type=content_type,
            size=size,
            fd=fd,
            record=sidecar,
            has_record=sidecar is not None,
            dirs=dirs,
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
        key = path_key(segs)
        name = _partial_name(key)
        try:
            dirs = self._dirs()
            fd = self._open_locked(dirs, name, create=False)
        except OSError as e:
            raise _translate(e) from e
        if fd is None:
            return None
        try:
            record = _read_json(f"{key}.json", dirs.partial)
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
            path=self.partial_dir / name,
            target=target,
            segments=segs,
            content_type=content_type if isinstance(content_type, str) else DEFAULT_CONTENT_TYPE,
            size=size if isinstance(size, int) else None,
            fd=fd,
            written=offset,
            offset=offset,
            record=record,
            dirs=dirs,
        )

    def partial_status(self, segments: Sequence[str]) -> tuple[int, dict[str, object]] | None:
        """
        ``(bytes on disk, record)`` of an upload in progress or interrupted, or None.

        Reads without locking: while a writer is active the length only grows.
        """
        key = path_key(_check_segments(segments))
        dirs = self._dirs()
        record = _read_json(f"{key}.json", dirs.partial)
        if record is None:
            return None
        try:
            length = os.stat(_partial_name(key), dir_fd=dirs.partial, follow_symlinks=False).st_size
        except FileNotFoundError:
            return None
        return length, record

    def partial_mtime(self, segments: Sequence[str]) -> float | None:
        """When the upload last received bytes (or was created); None if there is none."""
        name = _partial_name(path_key(_check_segments(segments)))
        try:
            return os.stat(name, dir_fd=self._dirs().partial, follow_symlinks=False).st_mtime
        except FileNotFoundError:
            return None

    def remove_partial(self, segments: Sequence[str]) -> bool:
        """
        Drop an interrupted upload (tus termination): False if there is none, 409 if a
        writer holds it.
        """
        segs = _check_segments(segments)
        key = path_key(segs)
        dirs = self._dirs()
        fd = self._open_locked(dirs, _partial_name(key), create=False)
        if fd is None:
            _unlink_quietly(f"{key}.json", dirs.partial)
            return False
        try:
            _unlink_quietly(_partial_name(key), dirs.partial)
            _unlink_quietly(f"{key}.json", dirs.partial)
        finally:
            os.close(fd)
        log.info("removed upload in progress {path}", path="/".join(segs))
        return True

    def sweep_partials(self, max_idle: float) -> int:
        """
        Remove uploads nobody has written to for ``max_idle`` seconds and nobody holds.

        Returns how many were removed.  Also clears records and temporary files left
        without their partial file.  Works only inside the private directory (never through
        a link), and rechecks it first, recreating it if it was removed.  Blocking: run it on
        a worker thread.
        """
        now = self._now()
        removed = 0
        try:
            dirs = self._dirs(force=True)
        except StorageError:
            return 0  # a link or a file where our directory should be: logged, not touched
        directory = dirs.partial
        for name in os.listdir(directory):
            try:
                idle = now - os.stat(name, dir_fd=directory, follow_symlinks=False).st_mtime
            except FileNotFoundError:
                continue
            if idle < max_idle:
                continue
            if name.endswith(".part"):
                if self._sweep_one(dirs, name):
                    removed += 1
            elif name.endswith((".json", ".tmp", ".takeover")):
                stem = name.split(".", 1)[0]
                if not _lexists(f"{stem}.part", directory):
                    _unlink_quietly(name, directory)
        return removed

    def _sweep_one(self, dirs: _Dirs, name: str) -> bool:
        directory = dirs.partial
        try:
            fd = os.open(name, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW, dir_fd=directory)
        except FileNotFoundError:
            return False
        except OSError as e:
            if e.errno == errno.ELOOP:  # not ours: a link someone put there
                return False
            raise
        try:
            if not _try_lock(fd) or not _same_file(fd, name, directory):
                return False
            log.info(
                "removing abandoned upload {name} ({size} bytes)",
                name=name,
                size=os.fstat(fd).st_size,
            )
            _unlink_quietly(name, directory)
            _unlink_quietly(name[: -len(".part")] + ".json", directory)
            return True
        finally:
            os.close(fd)

    def writer_lock_free(self, key: str) -> bool:
        """Whether no process here holds the writer lock of the upload with this path key."""
        if len(key) != 64 or not all(c in "0123456789abcdef" for c in key):
            return False
        try:
            fd = os.open(
                _partial_name(key), os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW,
                dir_fd=self._dirs().partial,
            )
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
        marker = f"{path_key(_check_segments(segments))}.takeover"
        directory = self._dirs().partial
        flags = os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW
        fd = os.open(marker, flags, _FILE_MODE, dir_fd=directory)
        try:
            os.utime(fd)
        finally:
            os.close(fd)

    def takeover_requested(self, segments: Sequence[str], since: float) -> bool:
        """Whether a takeover marker newer than ``since`` (epoch seconds) exists."""
        marker = f"{path_key(_check_segments(segments))}.takeover"
        try:
            st = os.stat(marker, dir_fd=self._dirs().partial, follow_symlinks=False)
        except FileNotFoundError:
            return False
        return st.st_mtime >= since

    def clear_takeover(self, segments: Sequence[str]) -> None:
        marker = f"{path_key(_check_segments(segments))}.takeover"
        _unlink_quietly(marker, self._dirs().partial)

    def _open_locked(self, dirs: _Dirs, name: str, *, create: bool) -> int | None:
        """
        Open a partial file for writing and take its one-writer lock.

        Returns None if it does not exist (and ``create`` is false); 409 if another writer
        holds it.  A name unlinked or replaced between our open and our lock (a commit or a
        sweep that won the race) is opened again, so the lock is always on the file that
        the name designates.
        """
        flags = os.O_WRONLY | os.O_CLOEXEC | os.O_NOFOLLOW | (os.O_CREAT if create else 0)
        directory = dirs.partial
        for _attempt in range(5):
            try:
                fd = os.open(name, flags, _FILE_MODE, dir_fd=directory)
            except FileNotFoundError:
                if create:
                    raise
                return None
            except OSError as e:
                if e.errno != errno.ELOOP:
                    raise
                # Not ours: a link someone planted at a partial file's name.  Removing the
                # link (never what it points to) gives the name back to the upload.
                log.warn("removing a symlink in {dir}: {name}", dir=str(self.partial_dir), name=name)
                _unlink_quietly(name, directory)
                continue
            if not _try_lock(fd):
                os.close(fd)
                raise StorageError(409, "upload already in progress")
            if _same_file(fd, name, directory):
                return fd
            os.close(fd)
        raise StorageError(409, "upload already in progress")

    def _open_locked_new(self, dirs: _Dirs, name: str) -> tuple[int, bool]:
        """
        ``_open_locked(create=True)``, and whether the file was created just now (empty, and
        no record of an earlier upload beside it can be ours to reuse).

        ``O_EXCL`` tells a new file from a leftover in the same ``open``; the lock and the
        check that the name still designates the locked file are the same as for a leftover.
        """
        flags = os.O_WRONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_CREAT
        directory = dirs.partial
        try:
            fd = os.open(name, flags | os.O_EXCL, _FILE_MODE, dir_fd=directory)
        except FileExistsError:
            fd = self._open_locked(dirs, name, create=True)
            assert fd is not None
            return fd, False
        if not _try_lock(fd):
            os.close(fd)
            raise StorageError(409, "upload already in progress")
        st = _opened_stat(fd, name, directory)
        if st is None or st.st_size:
            # Someone else got at the new name between our create and our lock (a commit or
            # a sweep that won the race, another writer): take the general path.
            os.close(fd)
            fd = self._open_locked(dirs, name, create=True)
            assert fd is not None
            return fd, False
        return fd, True

    def delete(self, segments: Sequence[str]) -> bool:
        """Remove a finished file and its metadata; False if there was no regular file."""
        segs = _check_segments(segments)
        try:
            found = self._lookup(segs)
            if found is None:
                return False
            dirs, fds = found
            parent = fds[-1] if fds else dirs.root
            try:
                st = os.stat(segs[-1], dir_fd=parent, follow_symlinks=False)
                if not stat_mod.S_ISREG(st.st_mode):
                    return False
                os.unlink(segs[-1], dir_fd=parent)
            finally:
                _close_all(fds)
        except (FileNotFoundError, NotADirectoryError, StorageError):
            return False
        _unlink_quietly(f"{path_key(segs)}.json", self._dirs().meta)
        log.info("deleted {path}", path="/".join(segs))
        return True


    def remove_empty_dir(self, segments: Sequence[str]) -> bool:
        """``rmdir`` of a directory of the upload tree (reached by ``openat``); False if not."""
        segs = _check_segments(segments)
        try:
            found = self._lookup(segs)
            if found is None:
                return False
            dirs, fds = found
            try:
                os.rmdir(segs[-1], dir_fd=fds[-1] if fds else dirs.root)
            finally:
                _close_all(fds)
        except (OSError, StorageError):
            return False
        return True


def _partial_name(key: str) -> str:
    return f"{key}.part"


def _lexists(name: str, dir_fd: int) -> bool:
    try:
        os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return False
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
    there when it was opened, for a resumed upload).  ``reservation`` (set by the upload
    policy) is the free space promised to this upload; it shrinks as bytes are written and
    is released when the upload is committed, aborted or released.
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
    #: the private-directory descriptors the partial file was opened in
    dirs: _Dirs | None = None
    reservation: Reservation | None = None
    _finished: bool = attrs.field(default=False, init=False)
    _lock: threading.Lock = attrs.field(factory=threading.Lock, init=False)

    def __attrs_post_init__(self) -> None:
        if self.dirs is None:
            self.dirs = self.store._dirs()

    @property
    def _key(self) -> str:
        return path_key(self.segments)

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
        assert self.dirs is not None
        fd = os.open(
            _partial_name(self._key), os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW,
            dir_fd=self.dirs.partial,
        )
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
        On any failure nothing of this upload remains (not even at the target).  Every name
        is reached through directory descriptors (the target's directories walked again
        with ``openat``), so a link swapped in during the upload is never followed.
        """
        with self._lock:
            if self._finished:
                raise ValueError("upload already committed or aborted")
            self._finished = True
            store = self.store
            dirs = self.dirs
            assert dirs is not None
            key = self._key
            name = _partial_name(key)
            record = f"{key}.json"
            meta_final = f"{key}.json"
            meta_tmp = meta_final + ".tmp"
            meta_dirs = dirs
            linked = placed = False
            parents: list[int] = []
            parent = -1
            try:
                os.fsync(self.fd)
                try:
                    meta_dirs = store._dirs()
                    self._write_meta(meta_tmp, sha256_hex, meta_dirs.meta)
                except FileNotFoundError:
                    # .hmacfs/meta was removed under us: recreate it and try once more.
                    meta_dirs = store._dirs(force=True)
                    self._write_meta(meta_tmp, sha256_hex, meta_dirs.meta)
                # A retention sweep may have removed now-empty parents during the upload.
                opened = store._open_parents(meta_dirs.root, self.segments, create=True)
                assert opened is not None
                parents = opened
                parent = parents[-1] if parents else meta_dirs.root
                try:
                    os.link(
                        name, self.segments[-1], src_dir_fd=dirs.partial, dst_dir_fd=parent,
                        follow_symlinks=False,
                    )
                except FileExistsError:
                    log.info("upload of {path} lost to an existing file", path=self._name)
                    raise StorageError(409, "file already exists") from None
                except FileNotFoundError:
                    if _lexists(name, dirs.partial):
                        raise
                    log.warn(
                        "upload of {path} lost: its partial file was removed", path=self._name
                    )
                    raise StorageError(503, "the upload was removed from the store; retry") from None
                linked = True
                os.rename(
                    meta_tmp, meta_final, src_dir_fd=meta_dirs.meta, dst_dir_fd=meta_dirs.meta
                )
                placed = True
                os.unlink(name, dir_fd=dirs.partial)
                if self.has_record:
                    _unlink_quietly(record, dirs.partial)
                # The target is a second name of the file we hold: its size, mtime and
                # inode are the stored file's (link changes only its ctime).
                st = os.fstat(self.fd)
                self._close()
                # fsync from the target's directory up to root, so new directories survive too.
                for fd in reversed(parents):
                    os.fsync(fd)
                os.fsync(meta_dirs.root)
                os.fsync(meta_dirs.meta)
            except BaseException as e:
                if placed:
                    _unlink_quietly(meta_final, meta_dirs.meta)
                if linked:
                    _unlink_quietly(self.segments[-1], parent)
                _unlink_quietly(meta_tmp, meta_dirs.meta)
                _unlink_quietly(name, dirs.partial)
                _unlink_quietly(record, dirs.partial)
                self._close()
                if isinstance(e, OSError):
                    translated = _translate(e)
                    if translated is not e:
                        raise translated from e
                raise
            finally:
                _close_all(parents)
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
            assert self.dirs is not None
            key = self._key
            try:
                _unlink_quietly(_partial_name(key), self.dirs.partial)
                _unlink_quietly(f"{key}.json", self.dirs.partial)
            finally:
                self._close()

    @property
    def _name(self) -> str:
        return "/".join(self.segments)

    def _close(self) -> None:
        """Close the partial file (dropping its lock) and give back the reserved space."""
        reservation, self.reservation = self.reservation, None
        if reservation is not None:
            reservation.release()
        if self.fd >= 0:
            fd, self.fd = self.fd, -1
            os.close(fd)

    def _write_meta(self, name: str, sha256_hex: str | None, dir_fd: int) -> None:
        meta = {
            "path": self._name,
            "content_type": self.content_type,
            "size": self.written,
            "sha256": sha256_hex,
            "created": self.store._now(),
        }
        _write_file(name, json.dumps(meta).encode("utf-8"), sync=True, dir_fd=dir_fd)
