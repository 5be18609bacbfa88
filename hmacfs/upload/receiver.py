# -*- test-case-name: tests.test_receiver -*-
"""
One request's body on its way to the upload (an ``IUpload`` of the store).

Two parts with one boundary: ``UploadReceiver`` is the write pipeline (the
channel's ``IBodyConsumer``: batches, ``IUpload.write`` calls, pausing
the socket while the store lags), called per chunk; ``UploadFinish`` is how
the upload ends (commit after the checksums, keep for a resume, or
remove) and what the request's ``done`` says, used once per request.  The
finish needs no channel, so its commit protocol is tested on its own.
"""

from __future__ import annotations

import errno
import hashlib
from collections.abc import Callable
from typing import Any, Protocol, TypeVar

import attrs
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure

from hmacfs.errors import Refusal
from hmacfs.http.channel import IBodyConsumer
from hmacfs.logs import log_router
from hmacfs.storage.interface import Hasher, IUpload, StorageError, StoredFile
from hmacfs.upload import tus
from hmacfs.upload.resume import CHECKPOINT_BYTES, CHECKPOINT_SECONDS, UploadEnd, offset_header

log = Logger(observer=log_router)

T = TypeVar("T")

#: At most this many buffers go to one writev() call (IOV_MAX is 1024).
MAX_BATCH_BUFFERS = 512


class UploadFailed(Refusal):
    """An upload refused or not stored; carries the HTTP answer."""


@attrs.frozen
class Progress:
    """A request that stored part of an upload: how many bytes of ``size`` are on disk."""

    offset: int
    size: int | None


class BodyFlow(Protocol):
    """The channel as a receiver sees it (``StreamingChannel``)."""

    transport: Any

    def pause_body(self) -> None: ...

    def resume_body(self) -> None: ...

    def refuse_body(self, consumer: IBodyConsumer) -> None: ...


class UploadFinish:
    """
    How one request's upload ends, and the checksums that decide it.

    The body ended: the file is committed once it holds all ``total`` bytes
    (after the whole-file SHA-256 check, which covers bytes written by earlier
    requests too: they are read back and hashed first), otherwise it is kept
    for the next request (``done`` fires ``Progress``); a tus chunk whose
    ``Upload-Checksum`` differs is cut off again.  The client went away: what
    was written is kept (``keep_on_interrupt``).  ``on_end`` hears, exactly
    once, how the upload was left; ``done`` fires once with the answer.

    Every store operation goes through the upload's ``IUpload``; the checksums
    are fed by the store as part of its writes (``IUpload.write``'s hashers), so
    the reactor thread never hashes a big body on the filesystem backend.
    """

    # One per upload request: no instance dict.
    __slots__ = (
        "upload", "start", "total", "keep_on_interrupt", "_keep_empty", "_on_end",
        "_expected", "_hasher", "_prefix", "_chunk_expected", "_chunk_hasher", "_hashers",
        "finishing", "done",
    )

    def __init__(
        self,
        upload: IUpload,
        *,
        total: int | None = None,
        expected_sha256: bytes | None = None,
        chunk_checksum: tuple[str, bytes] | None = None,
        on_end: Callable[[UploadEnd], None] | None = None,
        keep_on_interrupt: bool = False,
        keep_empty: bool = False,
    ) -> None:
        self.upload = upload
        self.start = upload.written
        self.total = total
        self.keep_on_interrupt = keep_on_interrupt
        self._keep_empty = keep_empty
        self._on_end = on_end
        self._expected = expected_sha256
        self._hasher = hashlib.sha256() if expected_sha256 is not None else None
        # Bytes an earlier request wrote, to hash (by the store) before ours.
        self._prefix = self.start if self._hasher is not None else 0
        self._chunk_expected: bytes | None = None
        self._chunk_hasher: Any = None
        if chunk_checksum is not None:
            name, self._chunk_expected = chunk_checksum
            self._chunk_hasher = tus.CHECKSUM_ALGORITHMS[name]()
        self._hashers: tuple[Hasher, ...] = tuple(
            h for h in (self._hasher, self._chunk_hasher) if h is not None
        )
        #: an ending has begun: the pipeline starts no more jobs
        self.finishing = False
        self.done: Deferred[StoredFile | Progress] = Deferred()

    @property
    def checks_chunk(self) -> bool:
        """Whether this request's bytes carry a tus chunk checksum (checked before any commit)."""
        return self._chunk_hasher is not None

    @property
    def path(self) -> str:
        """The upload's path, for the log."""
        return "/".join(self.upload.segments)

    def _with_prefix(self, then: Callable[[], Deferred[T]]) -> Deferred[T]:
        """``then()``, after the bytes of earlier requests were fed to the whole-file hasher."""
        prefix, self._prefix = self._prefix, 0
        if not prefix or self._hasher is None:
            return then()
        return self.upload.hash_prefix(self._hasher, prefix).addCallback(lambda _: then())

    def write(self, batch: list[bytes]) -> Deferred[int]:
        """Write a batch of this request's body, the checksums fed by the store."""
        return self._with_prefix(lambda: self.upload.write(batch, self._hashers))

    def write_and_commit(self, batch: list[bytes]) -> Deferred[StoredFile]:
        """Write the last batch (maybe none) and commit, one store step (``_digest`` checks)."""
        return self._with_prefix(
            lambda: self.upload.write_and_commit(batch, self._hashers, self._digest)
        )

    def _digest(self) -> str | None:
        """Called by the store once every byte is hashed: the whole file's SHA-256, or 400."""
        if self._hasher is None:
            return None
        actual = self._hasher.digest()
        if actual != self._expected:
            raise UploadFailed(400, "checksum mismatch: the file was not stored")
        return actual.hex()

    # the body ended

    def body_done(self, offset: int) -> None:
        """All of this request's body is in the file, which holds ``offset`` bytes."""
        self.finishing = True
        if self._chunk_hasher is not None and self._chunk_hasher.digest() != self._chunk_expected:
            # tus checksum: the chunk is discarded, the upload stays where it was.
            d: Deferred[Any] = self.upload.truncate(self.start)
            # kept as it was before this chunk if the truncate worked, dropped if not
            d.addBoth(lambda result: self.close(
                keep=not isinstance(result, Failure), clean=not isinstance(result, Failure)
            ))
            mismatch = UploadFailed(
                tus.CHECKSUM_MISMATCH,
                "checksum mismatch: the chunk was discarded",
                (offset_header(self.start),),
            )
            d.addCallback(lambda _: self.fail(mismatch))
            return
        if self.total is None or offset >= self.total:
            self.write_and_commit([]).addCallbacks(self.committed, self.commit_failed)
            return
        self.close(keep=True, clean=True).addCallback(self._kept)

    def _kept(self, end: UploadEnd) -> None:
        if end.outcome == "kept":
            self.succeed(Progress(end.offset, self.total))
        else:
            self.fail(UploadFailed(500, "could not keep the upload"))

    def committed(self, stored: StoredFile) -> None:
        self.ended(UploadEnd("stored", stored.size))
        self.succeed(stored)

    def commit_failed(self, failure: Failure) -> None:
        if failure.check(UploadFailed):
            error = failure.value
        elif failure.check(StorageError):
            error = UploadFailed(failure.value.status, failure.value.reason)
        else:
            if _is_enospc(failure):
                # ``commit`` removed everything of this upload already.
                log.warn("committing upload {path} failed: insufficient storage", path=self.path)
            else:
                log.failure("committing upload {path} failed", failure, path=self.path)
            self.upload.abort().addErrback(
                lambda f: log.failure("removing partial upload failed", f)
            )
            error = UploadFailed(
                507 if _is_enospc(failure) else 500,
                "insufficient storage" if _is_enospc(failure) else "could not store the file",
            )
        self.ended(UploadEnd("removed", 0))
        self.fail(error)

    # the body did not end

    def write_failure(self, failure: Failure) -> tuple[UploadFailed, bool]:
        """The answer to a failed write (logged here), and whether the disk is full."""
        if failure.check(Refusal) and not failure.check(StorageError):
            # Already an answer: a one-step upload's admission refused (409, 403, 507).
            error = failure.value
            if not isinstance(error, UploadFailed):
                error = UploadFailed(error.status, error.reason, error.headers)
            return error, error.status == 507
        full = _is_full(failure)
        if full:
            # Expected in operation, not a bug: one line, no traceback.
            log.warn("writing upload {path} failed: insufficient storage", path=self.path)
            return UploadFailed(507, "insufficient storage"), True
        if failure.check(StorageError):
            log.warn(
                "writing upload {path} failed: {reason}",
                path=self.path,
                reason=failure.value.reason,
            )
            error = failure.value
            return UploadFailed(error.status, error.reason, error.headers), False
        log.failure("writing upload {path} failed", failure, path=self.path)
        return UploadFailed(500, "could not write the file"), False

    def interrupted(self, offset: int) -> None:
        """The client went away; the file holds ``offset`` bytes."""
        keep = self.keep_on_interrupt and (offset > 0 or self._keep_empty)
        self.close(keep=keep, clean=False)

    def close(self, *, keep: bool, clean: bool) -> Deferred[UploadEnd]:
        """Keep (release) or remove the upload, then report how it was left."""
        self.finishing = True
        d: Deferred[UploadEnd]
        if keep:
            d = self.upload.release().addCallback(lambda offset: UploadEnd("kept", offset, clean))
        else:
            d = self.upload.abort().addCallback(lambda _: UploadEnd("removed", 0, clean))

        def failed(failure: Failure) -> UploadEnd:
            log.failure("closing partial upload {path} failed", failure, path=self.path)
            return UploadEnd("removed", 0, False)

        d.addErrback(failed)
        d.addCallback(self.ended)
        return d

    def ended(self, end: UploadEnd) -> UploadEnd:
        on_end, self._on_end = self._on_end, None
        if on_end is not None:
            on_end(end)
        return end

    def succeed(self, result: StoredFile | Progress) -> None:
        if not self.done.called:
            self.done.callback(result)

    def fail(self, error: UploadFailed) -> None:
        if not self.done.called:
            self.done.errback(error)


class UploadReceiver:
    """
    Writes one request's body to its upload, never blocking the reactor thread.

    Chunks queue in memory only while a write is in flight; once more than
    ``high_water`` bytes wait, the socket is paused until the store catches up
    (``IUpload.write``'s Deferred is its back-pressure), so memory per upload
    stays bounded whatever the file size.  The reactor thread only appends and
    counts; hashing and writing are the store's (on the pool for the
    filesystem), and every ``checkpoint_bytes``/``checkpoint_seconds`` a write
    is followed by ``IUpload.checkpoint`` and reported to ``progress``.  How the
    upload ends is ``finish``'s; ``done`` is its answer.
    """

    # One per upload request: no instance dict.
    __slots__ = (
        "upload", "_finish", "done", "start", "total", "_flow", "_high_water",
        "_progress", "_checkpoint_bytes", "_checkpoint_seconds", "_clock", "_synced",
        "_synced_at", "_pending", "_queued", "_flushed", "_writing", "_paused", "_complete",
        "_aborted", "_error", "_answer", "received",
    )

    def __init__(
        self,
        finish: UploadFinish,
        *,
        flow: BodyFlow,
        high_water: int,
        progress: Callable[[int], None] | None = None,
        checkpoint_bytes: int = CHECKPOINT_BYTES,
        checkpoint_seconds: float = CHECKPOINT_SECONDS,
        clock: Any = None,
    ) -> None:
        self.upload = upload = finish.upload
        self._finish = finish
        self.done = finish.done
        self.start = upload.written
        self.total = finish.total
        self._flow = flow
        self._high_water = high_water
        self._progress = progress
        self._checkpoint_bytes = checkpoint_bytes
        self._checkpoint_seconds = checkpoint_seconds
        self._clock = clock
        self._synced = self.start
        self._synced_at = clock.seconds() if clock is not None else 0.0
        self._pending: list[bytes] = []
        self._queued = 0  # bytes pending or in flight
        self._flushed = 0  # bytes of this request in the file
        self._writing = False
        self._paused = False
        self._complete = False
        self._aborted = False
        self._error: Failure | None = None
        #: the answer to a request whose write failed mid-body (given at ``body_complete``)
        self._answer: UploadFailed | None = None
        self.received = 0

    # IBodyConsumer

    def write(self, data: bytes) -> None:
        if self._aborted or self._error is not None:
            return
        self.received += len(data)
        self._pending.append(data)
        self._queued += len(data)
        if not self._writing:
            if self._last_bytes_of_upload():
                # body_complete() follows in this same call: write and commit
                # in one store step (one thread hop for a small upload, not two).
                return
            self._flush()
        elif self._queued > self._high_water and not self._paused:
            self._paused = True
            self._flow.pause_body()

    def body_complete(self) -> None:
        self._complete = True
        if self._answer is not None:
            # A write failed mid-body and the channel ended the body early: answer it.
            self._finish.fail(self._answer)
            return
        if not self._writing:
            self._next()

    def connection_lost(self) -> None:
        if self._complete or self._aborted or self._error is not None:
            return
        self._aborted = True
        self._pending = []
        log.info(
            "upload {path} interrupted after {received} bytes of this request",
            path=self._finish.path,
            received=self.received,
        )
        if not self._writing:
            self._next()

    def take_over(self) -> None:
        """Another request continues this upload: drop our client, keep the bytes written."""
        if self._complete or self._aborted:
            return
        transport = self._flow.transport
        if transport is not None:
            transport.abortConnection()
        self.connection_lost()

    @property
    def offset(self) -> int:
        """Bytes of the upload in the store so far."""
        return self.start + self._flushed

    # the pipeline

    def _flush(self) -> None:
        batch = self._pending[:MAX_BATCH_BUFFERS]
        del self._pending[:MAX_BATCH_BUFFERS]
        self._writing = True
        sync = self._progress is not None and (
            self.offset - self._synced >= self._checkpoint_bytes
            or self._clock.seconds() - self._synced_at >= self._checkpoint_seconds
        )
        d = self._finish.write(batch)
        if sync:
            d.addCallback(self._checkpoint)
        d.addCallbacks(self._written, self._write_failed, callbackArgs=(sync,))

    def _checkpoint(self, count: int) -> Deferred[int]:
        """After a write: make the upload so far survive a crash (then it is reported)."""
        return self.upload.checkpoint().addCallback(lambda _: count)

    def _written(self, count: int, sync: bool) -> None:
        self._writing = False
        self._queued -= count
        self._flushed += count
        if sync and self._progress is not None:
            self._synced = self.offset
            self._synced_at = self._clock.seconds()
            self._progress(self._synced)
        if self._paused and self._queued <= self._high_water // 2:
            self._paused = False
            self._flow.resume_body()
        self._next()

    def _next(self) -> None:
        if self._finish.finishing:
            return
        if self._aborted:
            self._finish.interrupted(self.offset)
        elif self._pending and self._complete and self._last_bytes_of_upload():
            self._write_and_commit()
        elif self._pending:
            self._flush()
        elif self._complete:
            self._finish.body_done(self.offset)

    def _write_failed(self, failure: Failure) -> None:
        self._writing = False
        self._error = failure
        self._pending = []
        error, full = self._finish.write_failure(failure)
        if self._complete:
            self._finish.fail(error)
        else:
            # Mid-body: answer now through the normal response path (error page, CORS,
            # access log) and discard the rest of the body, as after an early refusal;
            # ``done`` fails when the channel ends the body (``body_complete``).
            self._answer = error
            if self._paused:
                self._paused = False
                self._flow.resume_body()
            self._flow.refuse_body(self)
        # On a full disk the bytes written would only hold the space every later upload
        # needs (until ResumeTTL): nobody could usefully resume them now, so drop them.
        self._finish.close(keep=self._finish.keep_on_interrupt and not full, clean=False)

    def _last_bytes_of_upload(self) -> bool:
        """Whether the queued bytes complete the whole upload (not just this request)."""
        return (
            self.total is not None
            and not self._finish.checks_chunk
            and len(self._pending) <= MAX_BATCH_BUFFERS
            and self.offset + self._queued >= self.total
        )

    def _write_and_commit(self) -> None:
        batch, self._pending = self._pending, []
        self._writing = True
        finish = self._finish
        finish.finishing = True
        count = sum(len(chunk) for chunk in batch)
        end = self.offset + count

        def count_written() -> bool:
            self._writing = False
            if self.upload.written < end:
                return False
            self._queued -= count
            self._flushed += count
            return True

        def done(stored: StoredFile) -> None:
            count_written()
            finish.committed(stored)

        def failed(failure: Failure) -> None:
            # A failed write keeps what reached the store (resumable), as on the
            # normal path; a failed commit is handled as a commit failure.
            if count_written():
                finish.commit_failed(failure)
            else:
                self._write_failed(failure)

        finish.write_and_commit(batch).addCallbacks(done, failed)


def _is_enospc(failure: Failure) -> bool:
    value = failure.value
    return isinstance(value, OSError) and value.errno in (errno.ENOSPC, errno.EDQUOT)


def _is_full(failure: Failure) -> bool:
    """A full disk or quota, raw or already translated by the store (507)."""
    if failure.check(StorageError):
        return failure.value.status == 507
    return _is_enospc(failure)
