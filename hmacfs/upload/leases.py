# -*- test-case-name: tests.test_resume -*-
"""
The lease dance around the store: one writer per upload.

An admitted request takes the upload's ``Lease`` (``Uploads.lock``, taking
over from a dead connection of the same client when it resumes), admits or
resumes the upload in the store under it (``IStore.admit``/``resume``: one
store step that also promises the free space the rest of the upload needs),
and gets an ``UploadReceiver`` whose end releases the lease.  Any failure on
the way lets go of what was taken.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from twisted.internet.defer import Deferred, succeed
from twisted.python.failure import Failure

from hmacfs.http.channel import Answer, StreamingRequest
from hmacfs.signing.paths import SlotPath
from hmacfs.storage.interface import Hasher, IStore, IUpload, StorageError, StoredFile
from hmacfs.upload.admission import UploadLimits
from hmacfs.upload.receiver import UploadFailed, UploadFinish, UploadReceiver
from hmacfs.upload.resume import Lease, UploadEnd, UploadRecord, Uploads, offset_header

if TYPE_CHECKING:
    from twisted.internet.interfaces import IReactorTime


class UploadStarter:
    """Leases, store uploads and receivers for admitted uploads; counts those in flight."""

    def __init__(
        self,
        *,
        limits: UploadLimits,
        store: IStore,
        uploads: Uploads,
        clock: IReactorTime,
    ) -> None:
        self.limits = limits
        self.store = store
        self.uploads = uploads
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
        Take the upload's lease, admit (or resume) it in the store and build its receiver.

        ``resumed`` marks the request for metrics (``RequestState.resumed``) once it is
        admitted: it continues an upload that an earlier request left unfinished.
        ``resumable=False`` (a fresh upload whose whole body is in hand and that
        carries no session token) writes no sidecar record and keeps nothing when
        it fails: the client sends the same few bytes again.
        """

        if fresh and not resumable and self.store.whole_uploads_isolated:
            # One request brings it whole, nobody may resume it, and the store keeps its
            # bytes apart from any other upload of the path: no lease (nothing could take
            # it over, a second writer loses at the link), so no lock and no round trip
            # to the state backend (Redis) for it.
            upload = OneStepUpload(
                self.store, slot.segments, record.content_type, record.size,
                lambda failure: self._refused(failure, slot, takeover=False),
            )
            return succeed(
                self._receiver(request, upload, record, length, chunk, resumable, self._one_step_ended)
            )

        def locked(lease: Lease) -> Deferred[UploadReceiver]:
            d = self.open(
                slot,
                record,
                fresh=fresh,
                takeover=takeover,
                first=first,
                length=length,
                resumable=resumable,
            )
            return d.addCallbacks(opened, not_opened, callbackArgs=(lease,), errbackArgs=(lease,))

        def not_opened(failure: Failure, lease: Lease) -> Failure:
            lease.release()
            return failure

        def opened(upload: IUpload, lease: Lease) -> UploadReceiver:
            receiver = self._receiver(
                request, upload, record, length, chunk, resumable,
                lambda end: self._ended(lease, end),
            )
            lease.attach(receiver, record)
            if resumed:
                request.upload_state.resumed = True
            return receiver

        return self.uploads.lock(slot.segments, takeover=takeover).addCallback(locked)

    def _receiver(
        self,
        request: StreamingRequest,
        upload: IUpload,
        record: UploadRecord,
        length: int,
        chunk: tuple[str, bytes] | None,
        resumable: bool,
        on_end: Callable[[UploadEnd], None],
    ) -> UploadReceiver:
        """The receiver of an admitted upload (counted in ``active`` until ``on_end``)."""
        # What this request brings (a tus PATCH may bring less than the rest): a store
        # that keeps whole parts plans them with it.
        upload.expect(length)
        finish = UploadFinish(
            upload,
            total=record.size,
            expected_sha256=(
                bytes.fromhex(record.sha256)
                if record.sha256 and self.limits.checksum_verification
                else None
            ),
            chunk_checksum=chunk,
            on_end=on_end,
            keep_on_interrupt=resumable,
            keep_empty=record.protocol == "tus",
        )
        self.active += 1
        return UploadReceiver(
            finish,
            flow=request.channel,
            high_water=4 * self.limits.buffer_size,
            progress=self.uploads.progress_callback(record) if resumable else None,
            checkpoint_bytes=self.uploads.checkpoint_bytes,
            checkpoint_seconds=self.uploads.checkpoint_seconds,
            clock=self.clock,
        )

    def _one_step_ended(self, end: UploadEnd) -> None:
        self.active -= 1

    def _refused(self, failure: Failure, slot: SlotPath, *, takeover: bool) -> Any:
        """A store refusal as the client's answer (a held upload: ``busy_elsewhere``)."""
        failure.trap(StorageError)
        error = failure.value
        if error.reason == "upload already in progress":
            return self.uploads.busy_elsewhere(slot.segments, takeover=takeover)
        raise UploadFailed(error.status, error.reason, error.headers)

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
    ) -> Deferred[IUpload]:
        """A new upload (``fresh``), or the one left at ``first`` bytes by this upload."""

        def refused(failure: Failure) -> Any:
            return self._refused(failure, slot, takeover=takeover)

        if fresh and not resumable:
            # The whole body is in hand: admitted with its write and commit, one store step.
            return succeed(
                OneStepUpload(self.store, slot.segments, record.content_type, record.size, refused)
            )
        if fresh:
            # One store step: tombstone, existence, the space the whole upload needs
            # (promised to it now, counted by every later admission until it ends:
            # concurrent uploads cannot each count the same free bytes), the file.
            return self.store.admit(
                slot.segments,
                record.content_type,
                record.size,
                record=record.to_dict() if resumable else None,
                resumable=resumable,
            ).addErrback(refused)
        # What the rest of the upload needs, not only this request's part of it.
        d = self.store.resume(slot.segments, record.size - first).addErrback(refused)
        return d.addCallback(self._resumed, record, first)

    def _resumed(
        self, upload: IUpload | None, record: UploadRecord, first: int
    ) -> IUpload | Deferred[IUpload]:
        current = None if upload is None else UploadRecord.from_dict(upload.record or {})
        if (
            upload is None
            or current is None
            or (current.mac, current.size, current.token) != (record.mac, record.size, record.token)
        ):
            refusal = UploadFailed(409, "no upload to resume", (offset_header(0),))
            if upload is None:
                raise refusal
            return _release_then(upload, lambda _offset: refusal)
        if upload.written != first:
            return _release_then(
                upload,
                lambda offset: UploadFailed(
                    409, "wrong offset: resume from Upload-Offset", (offset_header(offset),)
                ),
            )
        if record != current:  # the resume announced a checksum the creation did not
            upload.record = record.to_dict()
        return upload

    def remove(self, slot: SlotPath, record: UploadRecord) -> Deferred[Answer]:
        """tus termination: under the upload's lease (taken over), drop its partial upload."""

        def locked(lease: Lease) -> Deferred[Answer]:
            lease.record = record  # so its progress record is dropped too
            return self.store.remove_upload(slot.segments).addCallbacks(
                removed, failed, callbackArgs=(lease,), errbackArgs=(lease,)
            )

        def removed(found: bool, lease: Lease) -> Answer:
            lease.release(UploadEnd("removed", 0))
            if not found:
                raise UploadFailed(404, "no upload in progress")
            return Answer(204)

        def failed(failure: Failure, lease: Lease) -> Any:
            lease.release()
            if failure.check(StorageError):
                return self.uploads.busy_elsewhere(slot.segments, takeover=True)
            return failure

        return self.uploads.lock(slot.segments, takeover=True).addCallback(locked)

    def _ended(self, lease: Lease, end: UploadEnd) -> None:
        self.active -= 1
        lease.release(end)


def _release_then(upload: IUpload, refusal: Callable[[int], UploadFailed]) -> Deferred[IUpload]:
    """Let go of an upload this request may not continue, then fail with ``refusal(offset)``."""

    def refuse(offset: int) -> IUpload:
        raise refusal(offset)

    return upload.release().addCallback(refuse)


class OneStepUpload:
    """
    ``IUpload`` of a fresh upload that one request brings whole (``resumable=False``): the
    store's admission waits for the body, so that ``write_and_commit`` is one store step
    (``IStore.store_whole``: one pool job on the filesystem) instead of an ``admit`` at the
    headers and a second step at the end.  Nothing differs for the client but when a 409,
    403 or 507 is decided: the body is in hand either way.  Any other call admits the
    upload first and goes to the store's ``IUpload`` from then on.
    """

    __slots__ = (
        "store",
        "segments",
        "content_type",
        "size",
        "record",
        "_refused",
        "_upload",
        "_written",
        "_expected",
    )

    def __init__(
        self,
        store: IStore,
        segments: tuple[str, ...],
        content_type: str,
        size: int | None,
        refused: Callable[[Failure], Any],
    ) -> None:
        self.store = store
        self.segments = segments
        self.content_type = content_type
        self.size = size
        #: no sidecar record: nobody may resume this upload
        self.record: dict[str, object] | None = None
        self._refused = refused
        self._upload: IUpload | None = None
        self._written = 0
        self._expected: int | None = None

    @property
    def written(self) -> int:
        return self._upload.written if self._upload is not None else self._written

    @property
    def offset(self) -> int:
        return self._upload.offset if self._upload is not None else self._written

    def expect(self, count: int) -> None:
        self._expected = count

    def write_and_commit(
        self,
        chunks: Sequence[bytes],
        hashers: Sequence[Hasher] = (),
        digest: Callable[[], str | None] | None = None,
    ) -> Deferred[StoredFile]:
        if self._upload is not None:
            return self._upload.write_and_commit(chunks, hashers, digest)

        def stored(result: StoredFile) -> StoredFile:
            self._written = result.size
            return result

        d = self.store.store_whole(self.segments, self.content_type, chunks, hashers, digest)
        return d.addCallbacks(stored, self._refused)

    def _admitted(self) -> Deferred[IUpload]:
        if self._upload is not None:
            return succeed(self._upload)

        def admitted(upload: IUpload) -> IUpload:
            self._upload = upload
            if self._expected is not None:
                upload.expect(self._expected)
            return upload

        d = self.store.admit(self.segments, self.content_type, self.size, resumable=False)
        return d.addCallbacks(admitted, self._refused)

    def write(self, chunks: Sequence[bytes], hashers: Sequence[Hasher] = ()) -> Deferred[int]:
        return self._admitted().addCallback(lambda upload: upload.write(chunks, hashers))

    def checkpoint(self) -> Deferred[int]:
        return self._admitted().addCallback(lambda upload: upload.checkpoint())

    def truncate(self, length: int) -> Deferred[None]:
        return self._admitted().addCallback(lambda upload: upload.truncate(length))

    def hash_prefix(self, hasher: Hasher, length: int) -> Deferred[None]:
        return self._admitted().addCallback(lambda upload: upload.hash_prefix(hasher, length))

    def commit(self, sha256_hex: str | None) -> Deferred[StoredFile]:
        return self._admitted().addCallback(lambda upload: upload.commit(sha256_hex))

    def abort(self) -> Deferred[None]:
        # Not admitted: nothing to drop (a failed ``store_whole`` left nothing either).
        return self._upload.abort() if self._upload is not None else succeed(None)

    def release(self) -> Deferred[int]:
        return self._upload.release() if self._upload is not None else succeed(self._written)
