# -*- test-case-name: tests.test_receiver -*-
"""
One request's body on its way to the upload's partial file.

Two parts with one boundary: ``UploadReceiver`` is the write pipeline (the
channel's ``IBodyConsumer``: batches, ``writev`` jobs on the pool, pausing
the socket while the disk lags), called per chunk; ``UploadFinish`` is how
the partial file ends (commit after the checksums, keep for a resume, or
remove) and what the request's ``done`` says, used once per request.  The
finish needs no channel, so its commit protocol is tested on its own.
"""

from __future__ import annotations

import errno
import hashlib
from collections.abc import Callable
from typing import Any, Protocol

import attrs
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure

from hmacfs.errors import Refusal
from hmacfs.http.channel import IBodyConsumer
from hmacfs.logs import log_router
from hmacfs.storage.filesystem import PartialUpload, StorageError, StoredFile
from hmacfs.upload import tus
from hmacfs.upload.resume import CHECKPOINT_BYTES, CHECKPOINT_SECONDS, UploadEnd, offset_header

log = Logger(observer=log_router)

RunBlocking = Callable[..., Deferred]

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
    once, how the partial file was left; ``done`` fires once with the answer.
    """

    # One per upload request: no instance dict.
    __slots__ = (
        "partial", "start", "total", "keep_on_interrupt", "_keep_empty", "_run_blocking",
        "_on_end", "_expected", "_hasher", "_prefix", "_chunk_expected", "_chunk_hasher",
        "finishing", "done",
    )

    def __init__(
        self,
        partial: PartialUpload,
        *,
        run_blocking: RunBlocking,
        total: int | None = None,
        expected_sha256: bytes | None = None,
        chunk_checksum: tuple[str, bytes] | None = None,
        on_end: Callable[[UploadEnd], None] | None = None,
        keep_on_interrupt: bool = False,
        keep_empty: bool = False,
    ) -> None:
        self.partial = partial
        self.start = partial.written
        self.total = total
        self.keep_on_interrupt = keep_on_interrupt
        self._keep_empty = keep_empty
        self._run_blocking = run_blocking
        self._on_end = on_end
        self._expected = expected_sha256
        self._hasher = hashlib.sha256() if expected_sha256 is not None else None
        # Bytes an earlier request wrote, to hash before ours (on the pool thread).
        self._prefix = self.start if self._hasher is not None else 0
        self._chunk_expected: bytes | None = None
        self._chunk_hasher: Any = None
        if chunk_checksum is not None:
            name, self._chunk_expected = chunk_checksum
            self._chunk_hasher = tus.CHECKSUM_ALGORITHMS[name]()
        #: an ending has begun: the pipeline starts no more jobs
        self.finishing = False
        self.done: Deferred[StoredFile | Progress] = Deferred()

    @property
    def checks_chunk(self) -> bool:
        """Whether this request's bytes carry a tus chunk checksum (checked before any commit)."""
        return self._chunk_hasher is not None

    def hash(self, batch: list[bytes]) -> None:
        """Runs in a worker thread, before the batch is written: feed the checksums."""
        if self._hasher is not None:
            if self._prefix:
                self.partial.hash_prefix(self._hasher, self._prefix)
                self._prefix = 0
            for chunk in batch:
                self._hasher.update(chunk)
        if self._chunk_hasher is not None:
            for chunk in batch:
                self._chunk_hasher.update(chunk)

    # the body ended

    def body_done(self, offset: int) -> None:
        """All of this request's body is in the file, which holds ``offset`` bytes."""
        self.finishing = True
        if self._chunk_hasher is not None and self._chunk_hasher.digest() != self._chunk_expected:
            # tus checksum: the chunk is discarded, the upload stays where it was.
            d: Deferred[Any] = self._run_blocking(self.partial.truncate, self.start)
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
            d = self._run_blocking(self.commit)
            d.addCallbacks(self.committed, self.commit_failed)
            return
        self.close(keep=True, clean=True).addCallback(self._kept)

    def _kept(self, end: UploadEnd) -> None:
        if end.outcome == "kept":
            self.succeed(Progress(end.offset, self.total))
        else:
            self.fail(UploadFailed(500, "could not keep the upload"))

    def commit(self) -> StoredFile:
        """Runs in a worker thread: check the whole file's SHA-256, then publish it."""
        digest = None
        if self._hasher is not None:
            if self._prefix:
                self.partial.hash_prefix(self._hasher, self._prefix)
                self._prefix = 0
            actual = self._hasher.digest()
            if actual != self._expected:
                self.partial.abort()
                raise UploadFailed(400, "checksum mismatch: the file was not stored")
            digest = actual.hex()
        return self.partial.commit(digest)

    def committed(self, stored: StoredFile) -> None:
        self.ended(UploadEnd("stored", stored.size))
        self.succeed(stored)

    def commit_failed(self, failure: Failure) -> None:
        if failure.check(UploadFailed):
            error = failure.value
        elif failure.check(StorageError):
            error = UploadFailed(failure.value.status, failure.value.reason)
        elif _is_enospc(failure):
            # ``commit`` removed everything of this upload already.
            log.warn("committing upload {path} failed: insufficient storage", path=self.partial.target)
            self._run_blocking(self.partial.abort).addErrback(
                lambda f: log.failure("removing partial upload failed", f)
            )
            error = UploadFailed(507, "insufficient storage")
        else:
            log.failure("committing upload {path} failed", failure, path=self.partial.target)
            self._run_blocking(self.partial.abort).addErrback(
                lambda f: log.failure("removing partial upload failed", f)
            )
            error = UploadFailed(507 if _is_enospc(failure) else 500, "could not store the file")
        self.ended(UploadEnd("removed", 0))
        self.fail(error)

    # the body did not end

    def write_failure(self, failure: Failure) -> tuple[UploadFailed, bool]:
        """The answer to a failed write (logged here), and whether the disk is full."""
        full = _is_full(failure)
        if full:
            # Expected in operation, not a bug: one line, no traceback.
            log.warn("writing upload {path} failed: insufficient storage", path=self.partial.target)
            return UploadFailed(507, "insufficient storage"), True
        if failure.check(StorageError):
            log.warn(
                "writing upload {path} failed: {reason}",
                path=self.partial.target,
                reason=failure.value.reason,
            )
            return UploadFailed(failure.value.status, failure.value.reason), False
        log.failure("writing upload {path} failed", failure, path=self.partial.target)
        return UploadFailed(500, "could not write the file"), False

    def interrupted(self, offset: int) -> None:
        """The client went away; the file holds ``offset`` bytes."""
        keep = self.keep_on_interrupt and (offset > 0 or self._keep_empty)
        self.close(keep=keep, clean=False)

    def close(self, *, keep: bool, clean: bool) -> Deferred[UploadEnd]:
        """Keep (release) or remove the partial file, then report how it was left."""
        self.finishing = True
        if keep:
            d = self._run_blocking(self.partial.release)
            d.addCallback(lambda offset: UploadEnd("kept", offset, clean))
        else:
            d = self._run_blocking(self.partial.abort)
            d.addCallback(lambda _: UploadEnd("removed", 0, clean))

        def failed(failure: Failure) -> UploadEnd:
            log.failure("closing partial upload {path} failed", failure, path=self.partial.target)
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
    Writes one request's body to its upload's partial file, off the reactor thread.

    Chunks queue in memory only while a write is in flight; once more than
    ``high_water`` bytes wait, the socket is paused until the disk catches up,
    so memory per upload stays bounded whatever the file size.  The reactor
    thread only appends and counts; hashing and writing happen on the pool,
    and every ``checkpoint_bytes``/``checkpoint_seconds`` a write is synced and
    reported to ``progress``.  How the file ends is ``finish``'s; ``done`` is
    its answer.
    """

    # One per upload request: no instance dict.
    __slots__ = (
        "partial", "_finish", "done", "start", "total", "_run_blocking", "_flow", "_high_water",
        "_progress", "_checkpoint_bytes", "_checkpoint_seconds", "_clock", "_synced",
        "_synced_at", "_pending", "_queued", "_flushed", "_writing", "_paused", "_complete",
        "_aborted", "_error", "_answer", "received",
    )

    def __init__(
        self,
        finish: UploadFinish,
        *,
        run_blocking: RunBlocking,
        flow: BodyFlow,
        high_water: int,
        progress: Callable[[int], None] | None = None,
        checkpoint_bytes: int = CHECKPOINT_BYTES,
        checkpoint_seconds: float = CHECKPOINT_SECONDS,
        clock: Any = None,
    ) -> None:
        self.partial = partial = finish.partial
        self._finish = finish
        self.done = finish.done
        self.start = partial.written
        self.total = finish.total
        self._run_blocking = run_blocking
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
                # in one disk job (one thread hop for a small upload, not two).
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
            path=self.partial.target,
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
        """Bytes of the upload in its partial file so far."""
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
        d = self._run_blocking(self._write_batch, batch, sync)
        d.addCallbacks(self._written, self._write_failed, callbackArgs=(sync,))

    def _write_batch(self, batch: list[bytes], sync: bool) -> int:
        """Runs in a worker thread: hash (hashlib releases the GIL), write, maybe fdatasync."""
        self._finish.hash(batch)
        count = self.partial.write(batch)
        if sync:
            self.partial.datasync()
        return count

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

        written: list[int] = []

        def job() -> StoredFile:
            written.append(self._write_batch(batch, False))
            return finish.commit()

        def count_written() -> None:
            self._writing = False
            if written:
                self._queued -= written[0]
                self._flushed += written[0]

        def done(stored: StoredFile) -> None:
            count_written()
            finish.committed(stored)

        def failed(failure: Failure) -> None:
            count_written()
            # A failed write keeps what reached the disk (resumable), as on the
            # normal path; a failed commit is handled as a commit failure.
            if written:
                finish.commit_failed(failure)
            else:
                self._write_failed(failure)

        self._run_blocking(job).addCallbacks(done, failed)


def _is_enospc(failure: Failure) -> bool:
    value = failure.value
    return isinstance(value, OSError) and value.errno in (errno.ENOSPC, errno.EDQUOT)


def _is_full(failure: Failure) -> bool:
    """A full disk or quota, raw or already translated by the store (507)."""
    if failure.check(StorageError):
        return failure.value.status == 507
    return _is_enospc(failure)
