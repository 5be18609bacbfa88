# -*- test-case-name: tests.test_storage_parts -*-
"""
The one store interface: what everything above ``storage/`` may use of a store.

Every operation that touches the storage returns a ``Deferred`` and never blocks the
reactor thread: the filesystem backend (``fs_backend``) runs its work on the disk pool,
an object-store backend talks to its server asynchronously.  Resources, the upload
protocols, resume, tus, retention and the XMPP component use only these Protocols, so a
backend is added without changing them; no module above ``storage/`` calls ``os`` on the
store.

The names of the things a store holds:

- a *finished file* (``StoredFile``) is never replaced once it exists;
- an *upload* (``IUpload``) is a file being written, by one writer at a time across
  every process and node; it may be interrupted and resumed later (by another node of
  the same deployment when the store is shared);
- a *byte source* (``IByteSource``) is an opened range of a finished file, ready to be
  streamed to a client.

This module imports no backend and nothing of Twisted at run time, so a backend can build
on it alone (``Deferred`` and ``IConsumer`` appear in annotations only).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import PurePath
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import attrs

from hmacfs.errors import Refusal

if TYPE_CHECKING:
    from twisted.internet.defer import Deferred
    from twisted.internet.interfaces import IConsumer

__all__ = [
    "TOMBSTONED",
    "ByteRange",
    "FileEntry",
    "Hasher",
    "IByteSource",
    "ILocalByteSource",
    "IReservation",
    "IStore",
    "IUpload",
    "ListPage",
    "StorageError",
    "StoredFile",
    "Usage",
]


class StorageError(Refusal):
    """A refusal the HTTP layer turns into ``status`` with ``reason``."""


#: The 403 of ``IStore.admit``/``resume`` for a path a tombstone blocks.
TOMBSTONED = "this file was deleted by the retention policy; request a new slot"


class Hasher(Protocol):
    """What ``IUpload.write`` feeds the bytes to: a ``hashlib`` object."""

    def update(self, data: bytes, /) -> None: ...


@attrs.frozen
class StoredFile:
    """
    A finished upload as GET/HEAD need it.

    ``path`` names the file (its last part is the download's file name); for the
    filesystem it is the file on disk, for an object store the object's key.
    """

    path: PurePath
    size: int
    mtime: float
    content_type: str
    etag: str
    sha256: str | None


@attrs.frozen
class ByteRange:
    """Bytes ``first`` to ``first + length - 1`` of a finished file (``length`` may be 0)."""

    first: int
    length: int


@attrs.frozen
class FileEntry:
    """One finished file, as retention sees it."""

    segments: tuple[str, ...]
    size: int
    mtime: float


@attrs.frozen
class ListPage:
    """
    Some of the finished files, in no promised order; ``cursor`` fetches the next page
    (None: this was the last).  A file added or removed during a walk may be missed or
    listed once more; retention tolerates both.
    """

    entries: tuple[FileEntry, ...]
    cursor: str | None


@attrs.frozen
class Usage:
    """What the store holds (finished files only) and, where known, the space left."""

    files: int
    bytes: int
    #: free bytes for new uploads, None where the store has no such limit (object stores)
    free: int | None = None


@runtime_checkable
class IReservation(Protocol):
    """Free space promised to one upload in flight (``IStore.admit``)."""

    remaining: int

    def consume(self, count: int) -> None:
        """``count`` bytes reached the store: no longer promised, now used."""

    def release(self) -> None:
        """Give back what is still promised (idempotent)."""


@runtime_checkable
class IUpload(Protocol):
    """
    One upload being written, held by one writer from admission to ``commit``, ``abort``
    or ``release``.

    ``written`` is how many bytes the upload has (``offset`` of them were there when it
    was admitted or resumed); ``record`` is what binds it to a signed URL and session,
    stored with it so that a later request (on any node sharing the store) can resume it.
    Calls are made one at a time: the next after the previous one's Deferred fired.
    """

    @property
    def segments(self) -> tuple[str, ...]: ...

    @property
    def content_type(self) -> str: ...

    @property
    def size(self) -> int | None: ...

    @property
    def written(self) -> int: ...

    @property
    def offset(self) -> int: ...

    #: settable: a resume that announces a checksum the creation did not updates it
    record: dict[str, object] | None

    def expect(self, count: int) -> None:
        """
        This request brings ``count`` more bytes (a tus PATCH may bring less than the rest
        of the upload).  A backend that stores whole parts plans them with it: the bytes
        of a request that ends inside a part are kept all the same.  Without it, a request
        is taken to bring the rest of the upload.
        """

    def write(self, chunks: Sequence[bytes], hashers: Sequence[Hasher] = ()) -> Deferred[int]:
        """
        Append ``chunks``; fires with the number of bytes taken once the store can take
        more.  Writing no faster than these fire is the store's back-pressure: the caller
        pauses the client's socket while a write is outstanding beyond its high-water mark.

        Each of ``hashers`` is fed every chunk, in order, before this fires: where the
        backend has a thread for the write (the filesystem's pool job) it hashes there,
        so a big upload's checksums cost the reactor thread nothing; another backend
        hashes wherever it likes.
        """

    def write_and_commit(
        self,
        chunks: Sequence[bytes],
        hashers: Sequence[Hasher] = (),
        digest: Callable[[], str | None] | None = None,
    ) -> Deferred[StoredFile]:
        """
        ``write`` the last chunks, then ``commit``, as one step where the backend can (the
        filesystem's is one pool job: a small upload costs one hop, not two).

        ``digest`` (plain CPU work, called in whichever thread the backend likes, after
        the chunks are written and hashed) gives ``commit``'s ``sha256_hex``; if it raises,
        the upload is aborted and this fails with its error.  If the write fails, this
        fails with the write's error and the upload is still held, as after a failed
        ``write`` (``written`` is short of what was asked); otherwise a failure means the
        upload is gone, as after a failed ``commit``.
        """

    def checkpoint(self) -> Deferred[int]:
        """
        Make what was written so far survive a crash, for a later resume; fires with the
        offset a resume would start from (it may be less than ``written`` where the store
        keeps bytes only in whole parts).
        """

    def truncate(self, length: int) -> Deferred[None]:
        """Cut the upload back to ``length`` bytes (a tus chunk whose checksum failed)."""

    def hash_prefix(self, hasher: Hasher, length: int) -> Deferred[None]:
        """Feed the first ``length`` bytes already stored to ``hasher`` (``hashlib`` object)."""

    def commit(self, sha256_hex: str | None) -> Deferred[StoredFile]:
        """
        Publish the upload as a finished file, atomically and never replacing one: a
        file that appeared meanwhile fails this with a 409 ``StorageError``, and the
        upload is gone either way.
        """

    def abort(self) -> Deferred[None]:
        """Drop the upload and everything stored of it (idempotent)."""

    def release(self) -> Deferred[int]:
        """
        Let go, keeping the upload for a resume; fires with the offset kept.  Every byte of
        a request that brought what it announced (``expect``) is kept; of a request cut
        short, a backend that stores whole parts keeps only those (the client resumes from
        the offset this gives).
        """


@runtime_checkable
class IByteSource(Protocol):
    """
    An opened range of a finished file, to stream to a client.

    A local backend gives a descriptor (``fd``, positioned nowhere: reads use offsets)
    that the HTTP layer may ``sendfile`` from; other backends give None and stream.
    ``close`` is called exactly once, whether the range was streamed or not.
    """

    stored: StoredFile
    byte_range: ByteRange
    fd: int | None

    def stream(self, consumer: IConsumer) -> Deferred[None]:
        """
        Write the range to ``consumer``, registering as its streaming producer (so the
        consumer's ``pauseProducing`` holds the store back); fires when all of it was
        written, fails if the store failed or ``stopProducing`` was called.
        """

    def select(self, byte_range: ByteRange) -> None:
        """
        Stream only ``byte_range`` (within the range opened): ``IStore.open_file`` opens
        the whole file before the request's Range is weighed against its size.  Called
        before ``stream``, if at all.
        """

    def close(self) -> None:
        """Release what the source holds (descriptor, connection)."""


@runtime_checkable
class ILocalByteSource(IByteSource, Protocol):
    """
    A byte source with a local descriptor (``fd`` not None while open): the HTTP layer
    may ``sendfile`` from it or read it in chunks, each on the backend's disk pool, so
    the reactor thread never waits for the disk.
    """

    def read(self, offset: int, count: int) -> Deferred[bytes]:
        """Up to ``count`` bytes at ``offset`` (fewer only at the end of the file)."""

    def sendfile(self, out_fd: int, offset: int, count: int) -> Deferred[int]:
        """
        ``sendfile(2)`` up to ``count`` bytes at ``offset`` to the non-blocking socket
        ``out_fd`` until it is full; fires with the bytes sent (0: the file ended).  The
        caller's ``out_fd`` may be closed meanwhile: the source sends on its own duplicate.
        Fails with the ``OSError`` of sendfile (EINVAL and the like: not on this file).
        """


@runtime_checkable
class IStore(Protocol):
    """
    Finished files and uploads in progress, addressed by validated path segments
    (``hmacfs.signing.paths.SlotPath.segments``).

    Refusals a client can cause come as ``StorageError`` (409 exists or busy, 507 no
    space, 503 the store is unreachable for now); anything else is a failure of the store.
    """

    #: whether the byte sources are ``ILocalByteSource`` (a local descriptor that may be
    #: ``sendfile``d, reads on the backend's pool); otherwise they stream themselves
    local: bool
    #: whether ``store_whole`` leaves every other upload of its path alone (its bytes never
    #: meet theirs, and a second writer loses at the commit with 409), so that its caller
    #: needs no lease on the path: no lock, and no round trip to the state backend for one
    whole_uploads_isolated: bool

    # -- finished files

    def lookup(self, segments: Sequence[str]) -> Deferred[StoredFile | None]:
        """The finished file at the path, or None (missing, or anything but a file)."""

    def exists(self, segments: Sequence[str]) -> Deferred[bool]:
        """Whether anything occupies the path (the caller's 409, decided before the body)."""

    def open_file(self, segments: Sequence[str], read_ahead: int = 0) -> Deferred[IByteSource | None]:
        """
        ``lookup`` and ``open_range`` of the whole file in one step (a GET is one call to
        the store, not two), or None where ``lookup`` gives None; the caller narrows the
        source with ``select`` once it has weighed the Range against ``source.stored``.
        A backend may read a file of at most ``read_ahead`` bytes in the same step and
        hold it (then ``fd`` is None): a small GET is then one call in all.
        """

    def open_range(self, stored: StoredFile, byte_range: ByteRange) -> Deferred[IByteSource]:
        """
        Open ``byte_range`` of ``stored`` for streaming; fails with ``FileNotFoundError``
        when the file is gone or is no longer the one ``stored`` describes (the caller's 404).
        """

    def download_url(
        self, stored: StoredFile, content_type: bytes, disposition: bytes
    ) -> str | None:
        """
        A URL the client may fetch the file from directly (a presigned object-store URL
        that answers with these headers), or None to stream it through hmacfs.
        """

    def delete(self, segments: Sequence[str]) -> Deferred[bool]:
        """Remove a finished file and its metadata; False if there was none."""

    def list_files(self, cursor: str | None = None, limit: int = 1000) -> Deferred[ListPage]:
        """A page of the finished files (retention walks the store with these)."""

    def usage(self) -> Deferred[Usage]:
        """How many finished files and bytes the store holds, and the free space."""

    def probe(self) -> Deferred[None]:
        """Fails if the store cannot be written now (``/healthz``)."""

    # -- tombstones: paths retention deleted, which no upload may re-create

    def add_tombstone(self, segments: Sequence[str], until: float) -> Deferred[None]:
        """Refuse uploads to the path until ``until`` (epoch seconds)."""

    def tombstoned(self, segments: Sequence[str]) -> Deferred[bool]:
        """Whether a tombstone blocks uploads to the path now."""

    def purge_tombstones(self) -> Deferred[int]:
        """Forget the expired tombstones; fires with how many."""

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
        """
        Start an upload from byte 0, in one step: 403 (``TOMBSTONED``) if a tombstone blocks
        the path, 409 if the file exists or another writer holds the upload, 507 if the
        store cannot take ``size`` more bytes (counting what is promised to uploads in
        flight), and the space promised to it until it ends.  One step, so that a small
        upload is admitted with one round trip to the store.

        An interrupted upload that nobody is writing to is started over: a client that
        retries a plain PUT must not be refused because an earlier attempt could have been
        resumed.  ``record`` is stored before this fires.  ``resumable=False`` is for an
        upload committed or dropped within one request (its whole body in hand, no session
        token): the backend may skip what only a resume needs.
        """

    def store_whole(
        self,
        segments: Sequence[str],
        content_type: str,
        chunks: Sequence[bytes],
        hashers: Sequence[Hasher] = (),
        digest: Callable[[], str | None] | None = None,
    ) -> Deferred[StoredFile]:
        """
        ``admit`` (``resumable=False``), ``write_and_commit`` and, on any failure, ``abort``,
        as one step: a whole upload whose body is in hand and that nobody may resume.  The
        filesystem's is one pool job, so a small PUT costs one hop, not two.  It fails as
        ``admit`` would (nothing created) or as ``write_and_commit`` would, and in either
        case nothing of the upload is left.
        """

    def resume(self, segments: Sequence[str], remaining: int | None) -> Deferred[IUpload | None]:
        """
        Reopen an interrupted upload to append to it, or None if there is none.

        403 (``TOMBSTONED``) if a tombstone blocks the path, 409 if the file exists by now
        or another writer holds the upload; 507 if the store cannot take the ``remaining``
        bytes.  The offset to resume from is ``written``.
        """

    def upload_status(self, segments: Sequence[str]) -> Deferred[tuple[int, dict[str, object]] | None]:
        """``(bytes stored, record)`` of an upload in progress or interrupted, or None."""

    def upload_mtime(self, segments: Sequence[str]) -> Deferred[float | None]:
        """When the upload last received bytes (or was created); None if there is none."""

    def remove_upload(self, segments: Sequence[str]) -> Deferred[bool]:
        """Drop an interrupted upload (tus termination): False if none, 409 if held."""

    def sweep_uploads(self, max_idle: float) -> Deferred[int]:
        """
        Remove uploads nobody has written to for ``max_idle`` seconds and nobody holds,
        and what is left of them; fires with how many were removed.
        """

    # -- one writer per upload, across processes and nodes

    def writer_lock_free(self, key: str) -> Deferred[bool]:
        """Whether nobody holds the writer lock of the upload with this path key."""

    def request_takeover(self, segments: Sequence[str]) -> Deferred[None]:
        """
        Ask whichever process writes this upload to let go (its client is back on a new
        connection, so the old one is dead); writers poll ``takeover_requested``.
        """

    def takeover_requested(self, segments: Sequence[str], since: float) -> Deferred[bool]:
        """Whether a takeover was requested at or after ``since`` (epoch seconds)."""

    def takeovers_requested(
        self, uploads: Sequence[tuple[Sequence[str], float]]
    ) -> Deferred[list[bool]]:
        """
        ``takeover_requested`` for each ``(segments, since)``, in one go: the once-a-second
        poll of every upload a process writes is one store round trip, not one per upload.
        """

    def clear_takeover(self, segments: Sequence[str]) -> Deferred[None]:
        """Forget a takeover request (the new writer has the upload)."""
