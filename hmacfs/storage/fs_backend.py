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
import os
import stat as stat_mod
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IConsumer, IPushProducer
from zope.interface import implementer

from hmacfs.signing.paths import PRIVATE_DIR
from hmacfs.storage.filesystem import PartialUpload, Store
from hmacfs.storage.fsio import log
from hmacfs.storage.interface import (
    TOMBSTONED,
    ByteRange,
    Hasher,
    IByteSource,
    IStore,
    IUpload,
    ListPage,
    StorageError,
    StoredFile,
    Usage,
)
from hmacfs.storage.retention import Tombstones, scan_store

__all__ = ["FilesystemBackend", "probe_store"]

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
    ``IByteSource`` of a file on disk: a descriptor the HTTP layer ``sendfile``s or
    ``pread``s from.  ``stream`` (for callers that cannot use the descriptor) reads
    on the pool, one chunk at a time, and holds back while the consumer is paused.
    """

    CHUNK = 256 * 1024

    def __init__(
        self, stored: StoredFile, byte_range: ByteRange, fd: int, run_blocking: RunBlocking
    ) -> None:
        self.stored = stored
        self.byte_range = byte_range
        self.fd: int | None = fd
        self._run = run_blocking
        self._paused = False
        self._stopped = False
        self._reading = False
        self._position = byte_range.first
        self._end = byte_range.first + byte_range.length
        self._consumer: IConsumer | None = None
        self._done: Deferred[None] | None = None

    def stream(self, consumer: IConsumer) -> Deferred[None]:
        self._consumer = consumer
        self._done = Deferred()
        consumer.registerProducer(self, True)
        self._next()
        return self._done

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
        if self._paused or self._reading or self._stopped or self._done is None:
            return
        if self._position >= self._end:
            self._finish(None)
            return
        fd = self.fd
        if fd is None:
            self._finish(ValueError("the file range was closed"))
            return
        self._reading = True
        count = min(self.CHUNK, self._end - self._position)
        self._run(os.pread, fd, count, self._position).addCallbacks(self._read, self._failed)

    def _read(self, data: bytes) -> None:
        self._reading = False
        if self._stopped:
            return
        if not data:
            self._finish(OSError(errno.EIO, "the stored file ended early"))
            return
        self._position += len(data)
        assert self._consumer is not None
        self._consumer.write(data)
        self._next()

    def _failed(self, failure: Any) -> None:
        self._reading = False
        self._finish(failure.value)

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
        fd, self.fd = self.fd, None
        if fd is not None:
            os.close(fd)  # close(2) of a regular file does not wait for the disk


class FilesystemBackend:
    """``IStore`` for a ``Store`` (a local or shared POSIX directory)."""

    local = True

    def __init__(self, store: Store, run_blocking: RunBlocking, tombstones: Tombstones | None = None) -> None:
        self.store = store
        self._run = run_blocking
        self.tombstones = tombstones if tombstones is not None else Tombstones(store.root)

    @property
    def root(self) -> Path:
        return self.store.root

    # -- finished files

    def lookup(self, segments: Sequence[str]) -> Deferred[StoredFile | None]:
        return self._run(self.store.stat, segments)

    def exists(self, segments: Sequence[str]) -> Deferred[bool]:
        return self._run(self.store.exists, segments)

    def open_range(self, stored: StoredFile, byte_range: ByteRange) -> Deferred[IByteSource]:
        return self._run(self._open_range, stored, byte_range)

    def _open_range(self, stored: StoredFile, byte_range: ByteRange) -> IByteSource:
        return FileRange(stored, byte_range, open_stored(stored), self._run)

    def download_url(self, stored: StoredFile, content_type: bytes, disposition: bytes) -> str | None:
        return None

    def delete(self, segments: Sequence[str]) -> Deferred[bool]:
        return self._run(self.store.delete, segments)

    def list_files(self, cursor: str | None = None, limit: int = 1000) -> Deferred[ListPage]:
        return self._run(self._list_files, cursor, limit)

    def _list_files(self, cursor: str | None, limit: int) -> ListPage:
        # One walk per page: the directory tree has no stable cursor of its own.
        entries = sorted(scan_store(self.store.root), key=lambda e: e.segments)
        if cursor is not None:
            after = tuple(cursor.split("/"))
            entries = [e for e in entries if e.segments > after]
        page = entries[:limit]
        more = len(entries) > limit
        return ListPage(tuple(page), "/".join(page[-1].segments) if more and page else None)

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
    ) -> IUpload:
        if self.tombstones.blocks(segments):
            raise StorageError(403, TOMBSTONED)
        if self.store.exists(segments):
            raise StorageError(409, "file already exists")
        reservation = self.store.reserve(size or 0)
        try:
            partial = self.store.open_partial(
                segments, content_type, size, record=record, resumable=resumable
            )
        except BaseException:
            reservation.release()
            raise
        partial.reservation = reservation
        return FilesystemUpload(partial, self._run)

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
    ) -> tuple[IStore, IUpload, IByteSource]:
        return backend, upload, source
