# -*- test-case-name: tests.test_storage_parts -*-
"""
The blocking filesystem store, as the asynchronous filesystem backend (``fs_backend``) sees it.

``IBlockingStore`` is what ``hmacfs.storage.filesystem.Store`` offers, ``ILocalBlockingStore``
adds what only a local directory has.  Every operation is synchronous and may block, so
nothing above ``storage/`` calls these: ``fs_backend.FilesystemBackend`` runs each of them on
the disk pool and offers ``hmacfs.storage.interface.IStore`` (tests check that ``Store``
satisfies these Protocols, and that the Protocols name all it offers).

This module imports no backend and nothing of Twisted.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Protocol, runtime_checkable

from hmacfs.storage.interface import IReservation, StoredFile

__all__ = [
    "IBlockingStore",
    "IBlockingUpload",
    "ILocalBlockingStore",
]


@runtime_checkable
class IBlockingUpload(Protocol):
    """
    One upload being written, held by one writer from open to commit, abort or release.

    ``written`` is how many bytes the upload has (``offset`` of them were there when it
    was resumed); ``record`` is its sidecar (what binds it to a signed URL and session).
    """

    target: Path
    segments: tuple[str, ...]
    content_type: str
    size: int | None
    written: int
    offset: int
    record: dict[str, object] | None
    reservation: IReservation | None

    def write(self, chunks: Sequence[bytes]) -> int: ...

    def datasync(self) -> int: ...

    def truncate(self, length: int) -> None: ...

    def hash_prefix(self, hasher: object, length: int, block: int = ...) -> None: ...

    def release(self) -> int: ...

    def commit(self, sha256_hex: str | None) -> StoredFile: ...

    def abort(self) -> None: ...


@runtime_checkable
class IBlockingStore(Protocol):
    """
    Finished files and uploads in progress, addressed by validated path segments.

    A finished file is never overwritten and a failed upload leaves nothing at its path;
    an upload has one writer at a time (across processes), which a later connection of
    the same client can ask to let go (``request_takeover``).
    """

    # -- finished files

    def exists(self, segments: Sequence[str]) -> bool:
        """Whether anything occupies the path (the caller's 409)."""

    def stat(self, segments: Sequence[str]) -> StoredFile | None:
        """The finished file at the path, or None (missing, or anything but a file)."""

    def delete(self, segments: Sequence[str]) -> bool:
        """Remove a finished file and its metadata; False if there was none."""

    # -- admission

    def reserve(self, incoming: int) -> IReservation:
        """
        Refuse an upload (507) that would leave less than the configured minimum free,
        counting the space already promised to uploads in flight, and promise the space
        to it until it ends: two uploads admitted together cannot both count the same free
        bytes.  The caller hands the reservation to its ``IBlockingUpload``, which releases
        it on commit, abort or release.
        """

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
    ) -> IBlockingUpload:
        """
        Start an upload from byte 0: 409 if the file exists or another writer holds the upload.

        An interrupted upload that nobody is writing to is truncated and reused: a client
        that starts over (a plain PUT retry) must not be refused because an earlier attempt
        could have been resumed.  ``record`` is the sidecar (what binds the upload to its
        signed URL and session); it is stored before this returns.

        ``resumable=False`` is for an upload that is committed or dropped within one request
        (its whole body is in memory, no session token): no sidecar is stored when the
        upload is new, since an upload without a record is never resumed.  A leftover is
        reused with a record as usual, so no stale record is left beside it.

        ``keep_parents`` is for an upload committed in the same call on the same thread: the
        target's directories stay open for the commit, and an existing file is refused by
        the commit's link (409) rather than checked for here.
        """

    def resume_partial(self, segments: Sequence[str]) -> IBlockingUpload | None:
        """
        Reopen an interrupted upload to append to it, or None if there is none to resume.

        409 if the file exists by now or another writer holds the upload.  The offset to
        resume from is ``written``: the bytes that reached the store, whatever any progress
        record says.
        """

    def partial_status(self, segments: Sequence[str]) -> tuple[int, dict[str, object]] | None:
        """``(bytes stored, record)`` of an upload in progress or interrupted, or None."""

    def partial_mtime(self, segments: Sequence[str]) -> float | None:
        """When the upload last received bytes (or was created); None if there is none."""

    def remove_partial(self, segments: Sequence[str]) -> bool:
        """Drop an interrupted upload (tus termination): False if none, 409 if held."""

    def sweep_partials(self, max_idle: float) -> int:
        """
        Remove uploads nobody has written to for ``max_idle`` seconds and nobody holds, and
        what is left of them; returns how many uploads were removed.
        """

    # -- one writer per upload, across processes

    def writer_lock_free(self, key: str) -> bool:
        """Whether no process here holds the writer lock of the upload with this path key."""

    def request_takeover(self, segments: Sequence[str]) -> None:
        """
        Ask whichever process writes this upload to let go (its client is back on a new
        connection, so the old one is dead); writers poll ``takeover_requested``.
        """

    def takeover_requested(self, segments: Sequence[str], since: float) -> bool:
        """Whether a takeover was requested at or after ``since`` (epoch seconds)."""

    def clear_takeover(self, segments: Sequence[str]) -> None:
        """Forget a takeover request (the new writer has the upload)."""


@runtime_checkable
class ILocalBlockingStore(IBlockingStore, Protocol):
    """A store that is a local directory: what retention and the assembly use besides."""

    #: the store directory (retention walks it; tombstones and reports live under it)
    root: Path

    def remove_empty_dir(self, segments: Sequence[str]) -> bool:
        """``rmdir`` of a directory of the upload tree; False if it is not empty or gone."""

    def open_private_file(self, name: str) -> int:
        """A descriptor of ``StoreDir/.hmacfs/<name>``, opened for appending (a lock file)."""
