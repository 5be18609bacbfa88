# -*- test-case-name: tests.test_resume -*-
"""
The lease dance around the store: one writer per upload.

An admitted request takes the upload's ``Lease`` (``Uploads.lock``, taking
over from a dead connection of the same client when it resumes), opens or
reopens the partial file under it (promising the free space the rest of the
upload needs), and gets an ``UploadReceiver`` whose end releases the lease.
Any failure on the way lets go of what was taken.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from twisted.internet.defer import Deferred

from hmacfs.http.channel import Answer, StreamingRequest
from hmacfs.signing.paths import SlotPath
from hmacfs.storage.filesystem import PartialUpload, StorageError, Store
from hmacfs.upload.admission import UploadLimits
from hmacfs.upload.receiver import RunBlocking, UploadFailed, UploadFinish, UploadReceiver
from hmacfs.upload.resume import Lease, UploadEnd, UploadRecord, Uploads, offset_header

if TYPE_CHECKING:
    from twisted.internet.interfaces import IReactorTime


class UploadStarter:
    """Leases, partial files and receivers for admitted uploads; counts those in flight."""

    def __init__(
        self,
        *,
        limits: UploadLimits,
        store: Store,
        uploads: Uploads,
        run_blocking: RunBlocking,
        clock: IReactorTime,
    ) -> None:
        self.limits = limits
        self.store = store
        self.uploads = uploads
        self.run_blocking = run_blocking
        self.clock = clock
        #: uploads accepted and not yet stored, kept or abandoned (for graceful stop)
        self.active = 0

    def start(
        self,
        request: StreamingRequest,
        slot: SlotPath,
        record: UploadRecord,
        *,
        fresh: bool,
        takeover: bool,
        first: int,
        length: int,
        chunk: tuple[str, bytes] | None = None,
        resumed: bool = False,
        resumable: bool = True,
    ) -> Deferred[UploadReceiver]:
        """
        Take the upload's lease, open its partial file and build its receiver.

        ``resumed`` marks the request for metrics (``RequestState.resumed``) once it is
        admitted: it continues an upload that an earlier request left unfinished.
        ``resumable=False`` (a fresh upload whose whole body is in hand and that
        carries no session token) writes no sidecar record and keeps nothing when
        it fails: the client sends the same few bytes again.
        """

        def locked(lease: Lease) -> UploadReceiver:
            try:
                partial = self.open(
                    slot, record, fresh=fresh, takeover=takeover, first=first, length=length,
                    resumable=resumable,
                )
            except BaseException:
                lease.release()
                raise
            finish = UploadFinish(
                partial,
                run_blocking=self.run_blocking,
                total=record.size,
                expected_sha256=(
                    bytes.fromhex(record.sha256)
                    if record.sha256 and self.limits.checksum_verification
                    else None
                ),
                chunk_checksum=chunk,
                on_end=lambda end: self._ended(lease, end),
                keep_on_interrupt=resumable,
                keep_empty=record.protocol == "tus",
            )
            receiver = UploadReceiver(
                finish,
                run_blocking=self.run_blocking,
                flow=request.channel,
                high_water=4 * self.limits.buffer_size,
                progress=self.uploads.progress_callback(record),
                checkpoint_bytes=self.uploads.checkpoint_bytes,
                checkpoint_seconds=self.uploads.checkpoint_seconds,
                clock=self.clock,
            )
            lease.attach(receiver, record)
            self.active += 1
            if resumed:
                request.upload_state.resumed = True
            return receiver

        return self.uploads.lock(slot.segments, takeover=takeover).addCallback(locked)

    def open(
        self,
        slot: SlotPath,
        record: UploadRecord,
        *,
        fresh: bool,
        takeover: bool,
        first: int,
        length: int,
        resumable: bool = True,
    ) -> PartialUpload:
        """A new partial file (``fresh``), or the one left at ``first`` bytes by this upload."""
        try:
            if fresh:
                # The space the whole upload needs is promised to it now (and counted by
                # every later admission) until it ends: concurrent uploads cannot each
                # count the same free bytes.
                reservation = self.store.reserve(record.size)
                try:
                    opened = self.store.open_partial(
                        slot.segments, record.content_type, record.size,
                        record=record.to_dict() if resumable else None, resumable=resumable,
                    )
                except BaseException:
                    reservation.release()
                    raise
                opened.reservation = reservation
                return opened
            partial = self.store.resume_partial(slot.segments)
        except StorageError as error:
            if error.reason == "upload already in progress":
                raise self.uploads.busy_elsewhere(slot.segments, takeover=takeover) from None
            raise UploadFailed(error.status, error.reason) from None
        current = None if partial is None else UploadRecord.from_dict(partial.record or {})
        if (
            partial is None
            or current is None
            or (current.mac, current.size, current.token) != (record.mac, record.size, record.token)
        ):
            if partial is not None:
                partial.release()
            raise UploadFailed(409, "no upload to resume", (offset_header(0),))
        if partial.written != first:
            offset = partial.release()
            raise UploadFailed(409, "wrong offset: resume from Upload-Offset", (offset_header(offset),))
        if record != current:  # the resume announced a checksum the creation did not
            partial.record = record.to_dict()
        try:
            # What the rest of the upload needs, not only this request's part of it.
            partial.reservation = self.store.reserve(record.size - first)
        except StorageError as error:
            partial.release()
            raise UploadFailed(error.status, error.reason) from None
        return partial

    def remove(self, slot: SlotPath, record: UploadRecord) -> Deferred[Answer]:
        """tus termination: under the upload's lease (taken over), drop its partial file."""

        def locked(lease: Lease) -> Answer:
            lease.record = record  # so its progress record is dropped too
            try:
                removed = self.store.remove_partial(slot.segments)
            except StorageError as error:
                lease.release()
                raise self.uploads.busy_elsewhere(slot.segments, takeover=True) from error
            lease.release(UploadEnd("removed", 0))
            if not removed:
                raise UploadFailed(404, "no upload in progress")
            return Answer(204)

        return self.uploads.lock(slot.segments, takeover=True).addCallback(locked)

    def _ended(self, lease: Lease, end: UploadEnd) -> None:
        self.active -= 1
        lease.release(end)
