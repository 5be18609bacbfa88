# -*- test-case-name: tests.test_fs_backend -*-
"""
The filesystem backend: ``IStore`` over the blocking ``filesystem.Store``, every call on
the disk pool.

Each operation is one job on the pool (``run_blocking``), so a slow disk or NFS mount
holds up only the requests that wait for it, never the reactor thread.  Operations that
a request needs together are one job, not several: ``admit`` checks that the path is
free, promises the space and opens the partial file in one go, and ``open_range``
checks and opens the file it will stream.  The on-disk layout and its guarantees are
``filesystem``'s (fsync before link, link without replacing, directory fsync, flock
across nodes on a shared mount).
"""

from __future__ import annotations

import errno
import fcntl
import os
import secrets
import stat as stat_mod
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IConsumer, IPushProducer
from twisted.python.failure import Failure
from zope.interface import implementer

from hmacfs.signing.paths import PRIVATE_DIR
from hmacfs.storage.filesystem import PartialUpload, Store
from hmacfs.storage.fsio import log
from hmacfs.storage.interface import (
    TOMBSTONED,
    ByteRange,
    FileEntry,
    Hasher,
    IByteSource,
    ILocalByteSource,
    IStore,
    IUpload,
    ListPage,
    StorageError,
    StoredFile,
    Usage,
)
from hmacfs.storage.layout import SWEEP_LOCK_FILE
from hmacfs.storage.retention import Tombstones, scan_store

#: listings in pages kept between ``list_files`` calls (one per sweep in progress)
_LISTINGS_KEPT = 4

__all__ = ["FileLock", "FilesystemBackend", "probe_store"]

T = TypeVar("T")
RunBlocking = Callable[..., Deferred]


class FilesystemUpload:
    """``IUpload`` over a ``PartialUpload``: each call one job on the pool."""

    __slots__ = ("partial", "_run")

    def __init__(self, partial: PartialUpload, run_blocking: RunBlocking) -> None:
        self.partial = partial
        self._run = run_blocking

    @property
    def segments(self) -> tuple[str, ...]:
        return self.partial.segments

    @property
    def content_type(self) -> str:
        return self.partial.content_type

    @property
    def size(self) -> int | None:
        return self.partial.size

    @property
    def written(self) -> int:
        return self.partial.written

    @property
    def offset(self) -> int:
        return self.partial.offset

    @property
    def record(self) -> dict[str, object] | None:
        return self.partial.record

    @record.setter
    def record(self, value: dict[str, object] | None) -> None:
        self.partial.record = value

    def expect(self, count: int) -> None:
        """Every byte written is kept: nothing to plan."""

    def write(self, chunks: Sequence[bytes], hashers: Sequence[Hasher] = ()) -> Deferred[int]:
        if hashers:
            return self._run(self._write, chunks, hashers)
        return self._run(self.partial.write, chunks)

    def _write(self, chunks: Sequence[bytes], hashers: Sequence[Hasher]) -> int:
        """On the pool: hash (``hashlib`` lets go of the GIL for big buffers), then write."""
        for hasher in hashers:
            for chunk in chunks:
                hasher.update(chunk)
        return self.partial.write(chunks)

    def write_and_commit(
        self,
        chunks: Sequence[bytes],
        hashers: Sequence[Hasher] = (),
        digest: Callable[[], str | None] | None = None,
    ) -> Deferred[StoredFile]:
        return self._run(self._write_and_commit, chunks, hashers, digest)

    def _write_and_commit(
        self,
        chunks: Sequence[bytes],
        hashers: Sequence[Hasher],
        digest: Callable[[], str | None] | None,
    ) -> StoredFile:
        if chunks:
            self._write(chunks, hashers)
        try:
            sha256_hex = digest() if digest is not None else None
        except BaseException:
            self.partial.abort()
            raise
        return self.partial.commit(sha256_hex)

    def checkpoint(self) -> Deferred[int]:
        return self._run(self.partial.datasync)

    def truncate(self, length: int) -> Deferred[None]:
        return self._run(self.partial.truncate, length)

    def hash_prefix(self, hasher: Hasher, length: int) -> Deferred[None]:
        return self._run(self.partial.hash_prefix, hasher, length)

    def commit(self, sha256_hex: str | None) -> Deferred[StoredFile]:
        return self._run(self.partial.commit, sha256_hex)

    def abort(self) -> Deferred[None]:
        return self._run(self.partial.abort)

    def release(self) -> Deferred[int]:
        return self._run(self.partial.release)


@implementer(IPushProducer)
class FileRange:
    """
    ``ILocalByteSource`` of a file on disk: a descriptor the HTTP layer ``sendfile``s
    or ``read``s from, every call on the pool.  ``stream`` (for callers that cannot use
    the descriptor) reads on the pool, one chunk at a time, and holds back while the
    consumer is paused.

    A file read ahead by ``open_file`` is held as ``data`` with no descriptor.  The
    descriptor is closed on the pool too, and only once no job uses it any more: a
    descriptor closed under a running ``pread`` or ``sendfile`` could be reused by
    another open meanwhile and that file's bytes sent.
    """

    CHUNK = 256 * 1024

    def __init__(
        self,
        stored: StoredFile,
        byte_range: ByteRange,
        fd: int | None,
        run_blocking: RunBlocking,
        data: bytes | None = None,
    ) -> None:
        self.stored = stored
        self.byte_range = byte_range
        self.fd: int | None = fd
        self._opened = byte_range
        self._data = data
        self._run = run_blocking
        self._jobs = 0
        self._close_wanted = False
        self._paused = False
        self._stopped = False
        self._reading = False
        self._position = byte_range.first
        self._end = byte_range.first + byte_range.length
        self._consumer: IConsumer | None = None
        self._done: Deferred[None] | None = None

    def select(self, byte_range: ByteRange) -> None:
        opened = self._opened
        if not (
            opened.first <= byte_range.first
            and byte_range.length >= 0
            and byte_range.first + byte_range.length <= opened.first + opened.length
        ):
            raise ValueError(f"{byte_range} is not inside the opened {opened}")
        self.byte_range = byte_range
        self._position = byte_range.first
        self._end = byte_range.first + byte_range.length

    # ILocalByteSource

    def read(self, offset: int, count: int) -> Deferred[bytes]:
        if self._data is not None:
            return succeed(self._data[offset : offset + count])
        fd = self.fd
        if fd is None:
            return fail(ValueError("the file range was closed"))
        return self._job(os.pread, fd, count, offset)

    def sendfile(self, out_fd: int, offset: int, count: int) -> Deferred[int]:
        fd = self.fd
        if fd is None:
            return fail(ValueError("the file range has no descriptor"))
        # A duplicate of the socket for the job: if the connection is closed meanwhile,
        # its number may be reused, and the bytes must not go to whoever gets it.
        out = os.dup(out_fd)
        return self._job(_sendfile_until_full, out, fd, offset, count)

    def _job(self, function: Callable[..., T], *args: Any) -> Deferred[T]:
        self._jobs += 1
        return self._run(function, *args).addBoth(self._job_done)

    def _job_done(self, result: T) -> T:
        self._jobs -= 1
        if self._close_wanted and not self._jobs:
            self._close_now()
        return result

    # IByteSource.stream

    def stream(self, consumer: IConsumer) -> Deferred[None]:
        self._consumer = consumer
        done: Deferred[None] = Deferred()
        self._done = done
        consumer.registerProducer(self, True)
        self._next()  # may finish at once (a file held in memory)
        return done

    def pauseProducing(self) -> None:
        self._paused = True

    def resumeProducing(self) -> None:
        self._paused = False
        self._next()

    def stopProducing(self) -> None:
        if not self._stopped:
            self._stopped = True
            self._finish(ConnectionAbortedError("the consumer stopped the download"))

    def _next(self) -> None:
        while not (self._paused or self._reading or self._stopped or self._done is None):
            if self._position >= self._end:
                self._finish(None)
                return
            self._reading = True
            count = min(self.CHUNK, self._end - self._position)
            outcome: list[Any] = []
            reading = self.read(self._position, count)
            reading.addBoth(outcome.append)
            if not outcome:
                # On the pool: carry on when it is back.
                reading.addCallback(self._got_later, outcome)
                return
            self._got(outcome[0], then=False)

    def _got_later(self, _: object, box: list[Any]) -> None:
        self._got(box[0], then=True)

    def _got(self, outcome: Any, *, then: bool) -> None:
        self._reading = False
        if self._stopped or self._done is None:
            return
        if isinstance(outcome, Failure):
            self._finish(outcome.value)
            return
        if not outcome:
            self._finish(OSError(errno.EIO, "the stored file ended early"))
            return
        self._position += len(outcome)
        assert self._consumer is not None
        self._consumer.write(outcome)
        if then:
            self._next()

    def _finish(self, error: BaseException | None) -> None:
        done, self._done = self._done, None
        if done is None:
            return
        if self._consumer is not None:
            self._consumer.unregisterProducer()
        if error is None:
            done.callback(None)
        else:
            done.errback(error)

    def close(self) -> None:
        self._data = None
        if self._jobs:
            self._close_wanted = True
            return
        self._close_now()

    def _close_now(self) -> None:
        self._close_wanted = False
        fd, self.fd = self.fd, None
        if fd is not None:
            self._run(os.close, fd).addErrback(_close_here, fd)


def _close_here(failure: Failure, fd: int) -> None:
    """
    The pool refused the close (it stopped: the process is shutting down, and no job
    can use the descriptor any more): close it here rather than leak it.
    """
    if failure.check(RuntimeError):
        try:
            os.close(fd)
        except OSError:
            pass
        return
    log.failure("closing a stored file failed", failure)


class FileLock:
    """
    ``flock`` of ``.hmacfs/<name>`` (opened through the store's descriptor, never a
    link): one holder across the processes of a host, and across nodes on a shared
    mount whose filesystem supports flock.  Taken and released on the pool.
    """

    def __init__(self, store: Store, run_blocking: RunBlocking, name: str) -> None:
        self.store = store
        self._run = run_blocking
        self.name = name

    def acquire(self) -> Deferred[Callable[[], Deferred[None]] | None]:
        return self._run(self._take).addCallback(self._held)

    def _take(self) -> int | None:
        fd = self.store.open_private_file(self.name)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            os.close(fd)
            if error.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                return None
            raise
        return fd

    def _held(self, fd: int | None) -> Callable[[], Deferred[None]] | None:
        if fd is None:
            return None
        return lambda: self._run(_unlock_and_close, fd)


def _unlock_and_close(fd: int) -> None:
    try:
        fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def _sendfile_until_full(out: int, fd: int, offset: int, count: int) -> int:
    """
    ``sendfile`` from ``fd`` to the non-blocking socket ``out`` until it is full or
    ``count`` bytes went (on the pool); closes ``out``, a duplicate made for this job.
    BlockingIOError if the socket took nothing; 0 if the file ended.
    """
    sent = 0
    try:
        while sent < count:
            try:
                just = os.sendfile(out, fd, offset + sent, count - sent)
            except BlockingIOError:
                if sent:
                    break
                raise
            except InterruptedError:
                continue
            except OSError:
                if sent:
                    break  # what went is counted; the error comes back next turn
                raise
            if not just:
                break
            sent += just
    finally:
        os.close(out)
    return sent


#: the largest body whose one-step store is a ``run_short`` job (a few system calls, one
#: small write, one fsync of it)
SHORT_JOB_BYTES = 64 * 1024


class FilesystemBackend:
    """``IStore`` for a ``Store`` (a local or shared POSIX directory)."""

    local = True
    #: ``store_whole``'s partial file has a name of its own (``partial.start(keep_parents)``)
    whole_uploads_isolated = True

    def __init__(
        self,
        store: Store,
        run_blocking: RunBlocking,
        tombstones: Tombstones | None = None,
        run_short: RunBlocking | None = None,
    ) -> None:
        self.store = store
        self._run = run_blocking
        #: for the jobs of a few system calls a request waits on (``DiskThreadPoolService.
        #: run_short``: batched per reactor iteration, and the reactor waits a moment for
        #: them, so they need not fight it for the GIL)
        self._run_short = run_short or run_blocking
        self.tombstones = tombstones if tombstones is not None else Tombstones(store.root)
        #: the rest of listings in pages (``list_files``), by token
        self._listings: dict[str, list[FileEntry]] = {}
        self._listings_lock = threading.Lock()

    @property
    def root(self) -> Path:
        return self.store.root

    # -- finished files

    def lookup(self, segments: Sequence[str]) -> Deferred[StoredFile | None]:
        return self._run_short(self.store.stat, segments)

    def exists(self, segments: Sequence[str]) -> Deferred[bool]:
        return self._run(self.store.exists, segments)

    def open_range(self, stored: StoredFile, byte_range: ByteRange) -> Deferred[IByteSource]:
        return self._run(self._open_range, stored, byte_range)

    def _open_range(self, stored: StoredFile, byte_range: ByteRange) -> IByteSource:
        return FileRange(stored, byte_range, open_stored(stored), self._run)

    def open_file(self, segments: Sequence[str], read_ahead: int = 0) -> Deferred[IByteSource | None]:
        # A stat, an open and (up to ``read_ahead``) a read: a GET's one job, a short one.
        return self._run_short(self._open_file, segments, read_ahead)

    def _open_file(self, segments: Sequence[str], read_ahead: int) -> IByteSource | None:
        stored = self.store.stat(segments)
        if stored is None:
            return None
        whole = ByteRange(0, stored.size)
        fd = open_stored(stored)
        if stored.size > read_ahead:
            return FileRange(stored, whole, fd, self._run)
        # Small enough to hold: read it now and close, so the GET needs no other job.
        try:
            data = _read_exactly(fd, stored.size)
        finally:
            os.close(fd)
        return FileRange(stored, whole, None, self._run, data=data)

    def download_url(self, stored: StoredFile, content_type: bytes, disposition: bytes) -> str | None:
        return None

    def delete(self, segments: Sequence[str]) -> Deferred[bool]:
        return self._run(self._delete, tuple(segments))

    def _delete(self, segments: tuple[str, ...]) -> bool:
        """Unlink, then prune the directories that emptied (up to, not including, the root)."""
        if not self.store.delete(segments):
            return False
        for depth in range(len(segments) - 1, 0, -1):
            # Walked with openat like every store path: never rmdir through a link.
            if not self.store.remove_empty_dir(segments[:depth]):
                break  # not empty (or gone): stop climbing
        return True

    @property
    def sweep_lock(self) -> FileLock:
        """The retention sweep's lock on this store (``retention.ExclusiveLock``)."""
        return FileLock(self.store, self._run, SWEEP_LOCK_FILE)

    def list_files(self, cursor: str | None = None, limit: int = 1000) -> Deferred[ListPage]:
        return self._run(self._list_files, cursor, limit)

    def _list_files(self, cursor: str | None, limit: int) -> ListPage:
        # The directory tree has no stable cursor of its own: the first page walks it
        # and keeps the rest (sorted) for the next pages under a token, so a walk in
        # pages costs one walk.  A token unknown here (another process, or dropped)
        # walks again and starts after the cursor's path.
        entries: list[FileEntry] | None = None
        after: tuple[str, ...] | None = None
        if cursor is not None:
            token, _, last = cursor.partition("|")
            with self._listings_lock:
                entries = self._listings.pop(token, None)
            after = tuple(last.split("/"))
        if entries is None:
            entries = sorted(scan_store(self.store.root), key=lambda e: e.segments)
            if after is not None:
                entries = [e for e in entries if e.segments > after]
        page, rest = entries[:limit], entries[limit:]
        if not rest or not page:
            return ListPage(tuple(page), None)
        token = secrets.token_hex(8)
        with self._listings_lock:
            self._listings[token] = rest
            while len(self._listings) > _LISTINGS_KEPT:
                self._listings.pop(next(iter(self._listings)))
        return ListPage(tuple(page), token + "|" + "/".join(page[-1].segments))

    def usage(self) -> Deferred[Usage]:
        return self._run(self._usage)

    def _usage(self) -> Usage:
        files = count = 0
        for entry in scan_store(self.store.root):
            files += 1
            count += entry.size
        return Usage(files=files, bytes=count, free=self.store.free_bytes())

    def probe(self) -> Deferred[None]:
        return self._run(self._probe)

    def _probe(self) -> None:
        reason = probe_store(self.store.root)
        if reason is not None:
            raise StorageError(503, reason)

    # -- tombstones

    def add_tombstone(self, segments: Sequence[str], until: float) -> Deferred[None]:
        return self._run(self.tombstones.add, segments, until)

    def tombstoned(self, segments: Sequence[str]) -> Deferred[bool]:
        return self._run(self.tombstones.blocks, segments)

    def purge_tombstones(self) -> Deferred[int]:
        return self._run(self.tombstones.purge_expired)

    # -- uploads in progress

    def admit(
        self,
        segments: Sequence[str],
        content_type: str,
        size: int | None,
        *,
        record: dict[str, object] | None = None,
        resumable: bool = True,
    ) -> Deferred[IUpload]:
        return self._run(self._admit, tuple(segments), content_type, size, record, resumable)

    def _admit(
        self,
        segments: tuple[str, ...],
        content_type: str,
        size: int | None,
        record: dict[str, object] | None,
        resumable: bool,
        keep_parents: bool = False,
    ) -> FilesystemUpload:
        if self.tombstones.blocks(segments):
            raise StorageError(403, TOMBSTONED)
        # ``open_partial`` refuses an existing target (409) itself, before the space
        # check: a separate ``exists`` first would be one more call on every PUT.  With
        # ``keep_parents`` (``_store_whole``) the commit's link refuses it instead.
        partial = self.store.open_partial(
            segments, content_type, size, record=record, resumable=resumable,
            keep_parents=keep_parents,
        )
        try:
            partial.reservation = self.store.reserve(size or 0)
        except BaseException as error:
            partial.abort()
            if keep_parents and isinstance(error, StorageError) and self.store.exists(segments):
                raise StorageError(409, "file already exists") from None  # 409 before 507
            raise
        return FilesystemUpload(partial, self._run)

    def store_whole(
        self,
        segments: Sequence[str],
        content_type: str,
        chunks: Sequence[bytes],
        hashers: Sequence[Hasher] = (),
        digest: Callable[[], str | None] | None = None,
    ) -> Deferred[StoredFile]:
        run = self._run_short if sum(len(c) for c in chunks) <= SHORT_JOB_BYTES else self._run
        return run(self._store_whole, tuple(segments), content_type, chunks, hashers, digest)

    def _store_whole(
        self,
        segments: tuple[str, ...],
        content_type: str,
        chunks: Sequence[bytes],
        hashers: Sequence[Hasher],
        digest: Callable[[], str | None] | None,
    ) -> StoredFile:
        size = sum(len(chunk) for chunk in chunks)
        # The target's directories stay open for the commit, whose link refuses an existing
        # file (409): no separate existence check, no second walk (two calls, each a GIL
        # hand-off on the pool, on every small PUT).
        upload = self._admit(segments, content_type, size, None, False, keep_parents=True)
        try:
            return upload._write_and_commit(chunks, hashers, digest)
        except BaseException:
            upload.partial.abort()  # idempotent; a failed commit left nothing already
            raise

    def resume(self, segments: Sequence[str], remaining: int | None) -> Deferred[IUpload | None]:
        return self._run(self._resume, tuple(segments), remaining)

    def _resume(self, segments: tuple[str, ...], remaining: int | None) -> IUpload | None:
        if self.tombstones.blocks(segments):
            raise StorageError(403, TOMBSTONED)
        partial = self.store.resume_partial(segments)
        if partial is None:
            return None
        try:
            partial.reservation = self.store.reserve(remaining or 0)
        except BaseException:
            partial.release()
            raise
        return FilesystemUpload(partial, self._run)

    def upload_status(self, segments: Sequence[str]) -> Deferred[tuple[int, dict[str, object]] | None]:
        return self._run(self.store.partial_status, segments)

    def upload_mtime(self, segments: Sequence[str]) -> Deferred[float | None]:
        return self._run(self.store.partial_mtime, segments)

    def remove_upload(self, segments: Sequence[str]) -> Deferred[bool]:
        return self._run(self.store.remove_partial, segments)

    def sweep_uploads(self, max_idle: float) -> Deferred[int]:
        return self._run(self.store.sweep_partials, max_idle)

    # -- one writer per upload

    def writer_lock_free(self, key: str) -> Deferred[bool]:
        return self._run(self.store.writer_lock_free, key)

    def request_takeover(self, segments: Sequence[str]) -> Deferred[None]:
        return self._run(self.store.request_takeover, segments)

    def takeover_requested(self, segments: Sequence[str], since: float) -> Deferred[bool]:
        return self._run(self.store.takeover_requested, segments, since)

    def takeovers_requested(
        self, uploads: Sequence[tuple[Sequence[str], float]]
    ) -> Deferred[list[bool]]:
        return self._run(self._takeovers_requested, list(uploads))

    def _takeovers_requested(self, uploads: list[tuple[Sequence[str], float]]) -> list[bool]:
        asked = []
        for segments, since in uploads:
            try:
                asked.append(self.store.takeover_requested(segments, since))
            except (OSError, StorageError):  # one broken upload must not hide the others
                asked.append(False)
        return asked

    def clear_takeover(self, segments: Sequence[str]) -> Deferred[None]:
        return self._run(self.store.clear_takeover, segments)


def _read_exactly(fd: int, size: int) -> bytes:
    """The first ``size`` bytes of ``fd``; ``FileNotFoundError`` if it has fewer now."""
    parts: list[bytes] = []
    got = 0
    while got < size:
        data = os.pread(fd, size - got, got)
        if not data:
            raise FileNotFoundError(errno.ENOENT, "stored file shrank while opened")
        parts.append(data)
        got += len(data)
    return b"".join(parts)


def open_stored(stored: StoredFile) -> int:
    """
    Open the stored file for reading, refusing symlinks and anything that is not the
    regular file of the size about to be announced (``FileNotFoundError``: the caller's 404).
    """
    path = os.fspath(stored.path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as error:
        if error.errno in (errno.ELOOP, errno.ENOTDIR):
            raise FileNotFoundError(errno.ENOENT, "not a stored file", path) from error
        raise
    try:
        status = os.fstat(fd)
        if not stat_mod.S_ISREG(status.st_mode):
            raise FileNotFoundError(errno.ENOENT, "not a regular file", path)
        if status.st_size != stored.size:
            log.warn(
                "stored file {path} has {actual} bytes, metadata says {expected}",
                path=path,
                actual=status.st_size,
                expected=stored.size,
            )
            raise FileNotFoundError(errno.ENOENT, "stored file changed size", path)
    except BaseException:
        os.close(fd)
        raise
    return fd


def probe_store(root: Path) -> str | None:
    """
    Create, write and remove a small file in ``root/.hmacfs`` (on the disk pool).

    Returns None when that worked, else a short reason.  No link below ``root`` is followed.
    """
    name = f"health-{os.getpid()}.tmp"
    try:
        root_fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
        try:
            try:
                os.mkdir(PRIVATE_DIR, dir_fd=root_fd)
            except FileExistsError:
                pass
            private = os.open(PRIVATE_DIR, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=root_fd)
            try:
                fd = os.open(
                    name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600, dir_fd=private
                )
                try:
                    os.write(fd, b"ok\n")
                finally:
                    os.close(fd)
                os.unlink(name, dir_fd=private)
            finally:
                os.close(private)
        finally:
            os.close(root_fd)
    except OSError as error:
        return f"not writable: {error.strerror or error}"
    return None


if TYPE_CHECKING:
    # mypy checks that the backend implements the interface (structurally).
    def _implements(
        backend: FilesystemBackend, upload: FilesystemUpload, source: FileRange
    ) -> tuple[IStore, IUpload, ILocalByteSource]:
        return backend, upload, source
