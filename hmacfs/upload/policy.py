# -*- test-case-name: tests.test_upload -*-
"""
Upload admission (decided from headers) and the streaming body writer.

``UploadPolicy.headers_received`` runs before any byte of the body is read:
path, method, length, MAC, size limit, existence, free space and, for a
resumed upload, its binding and offset are all checked there, so a refused
client gets its answer without sending the body.  The same holds for the
three ways a body can arrive:

* ``PUT`` of the whole file (XEP-0363), or of its rest with ``Content-Range:
  bytes N-(S-1)/S`` and the same ``X-Session-Token`` (``hmacfs.upload.resume``);
* tus ``POST`` (creation, creation-with-upload) and ``PATCH`` on the same
  signed URL (``hmacfs.upload.tus``).

Body-less tus ``HEAD``/``DELETE`` and the session-token ``HEAD`` are answered
from here too (``RequestState.answer``), so every MAC check lives in one place.

An accepted request gets an ``UploadReceiver`` that writes chunks on a thread
pool as they arrive, pauses the socket while too much waits for the disk, and
commits the partial file atomically once all the signed bytes are there.  If
the client goes away first, the bytes written so far are kept for a resume.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import attrs
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure

from hmacfs.errors import Refusal, storage_refusal
from hmacfs.http.channel import Answer, RequestState, StreamingRequest
from hmacfs.logs import log_router
from hmacfs.signing.auth import Authenticator, AuthError
from hmacfs.signing.paths import PathError, SlotPath, parse_slot_path
from hmacfs.storage.filesystem import PartialUpload, StorageError, Store, StoredFile
from hmacfs.upload import tus
from hmacfs.upload.resume import (
    CHECKPOINT_BYTES,
    CHECKPOINT_SECONDS,
    Lease,
    UploadEnd,
    UploadRecord,
    Uploads,
    mac_fingerprint,
    offset_header,
    parse_content_range,
)

if TYPE_CHECKING:
    from twisted.internet.interfaces import IReactorTime

log = Logger(observer=log_router)

RunBlocking = Callable[..., Deferred]

#: At most this many buffers go to one writev() call (IOV_MAX is 1024).
MAX_BATCH_BUFFERS = 512
#: What a refused body method is told (tus methods need Tus-Resumable).
ALLOW = b"GET, HEAD, PUT, OPTIONS"
_HEX64 = re.compile(rb"^[0-9a-fA-F]{64}$")
_DIGEST_SHA256 = re.compile(rb"(?:^|,)\s*sha-256\s*=\s*:([A-Za-z0-9+/=]+):", re.IGNORECASE)
_TOKEN = re.compile(rb"[A-Za-z0-9._~-]{8,128}")


class UploadFailed(Refusal):
    """An upload refused or not stored; carries the HTTP answer."""


@attrs.frozen
class Progress:
    """A request that stored part of an upload: how many bytes of ``size`` are on disk."""

    offset: int
    size: int | None


def expected_sha256(headers: Any) -> bytes | None:
    """
    The SHA-256 the client announced, from ``X-Checksum`` (hex) or RFC 9530
    ``Content-Digest: sha-256=:<base64>:``; ``None`` when it announced none.

    Raises ``ValueError`` for a header that is present but malformed.
    """
    checksum = headers.getRawHeaders(b"x-checksum")
    if checksum:
        value = checksum[0].strip()
        if not _HEX64.match(value):
            raise ValueError("X-Checksum must be 64 hex digits (SHA-256)")
        return bytes.fromhex(value.decode("ascii"))
    digest = headers.getRawHeaders(b"content-digest")
    if digest:
        match = _DIGEST_SHA256.search(b",".join(digest))
        if match is None:
            raise ValueError("Content-Digest must carry sha-256=:<base64>:")
        try:
            raw = base64.b64decode(match.group(1), validate=True)
        except binascii.Error:
            raise ValueError("Content-Digest sha-256 value is not base64") from None
        if len(raw) != 32:
            raise ValueError("Content-Digest sha-256 value is not 32 bytes")
        return raw
    return None


def client_token(request: Any) -> str | None:
    """The client's own well-formed ``X-Session-Token``, or None."""
    given = request.requestHeaders.getRawHeaders(b"x-session-token")
    if given and _TOKEN.fullmatch(given[0]):
        return given[0].decode("ascii")
    return None


def _content_type(request: StreamingRequest) -> bytes | None:
    values = request.requestHeaders.getRawHeaders(b"content-type")
    return values[0] if values else None


def _valid_type(value: bytes) -> bool:
    return len(value) <= 255 and all(0x20 <= byte < 0x7F for byte in value)


def _has_mac(request: Any) -> bool:
    return any(name in request.args for name in (b"v", b"v2", b"token", b"v3"))


@attrs.define
class UploadLimits:
    """The upload settings the policy needs from the configuration."""

    prefix: str
    max_upload_size: int = 0
    checksum_verification: bool = False
    buffer_size: int = 65536


class UploadPolicy:
    """Admits or refuses uploads from their request line and headers."""

    def __init__(
        self,
        *,
        limits: UploadLimits,
        store: Store,
        authenticator: Authenticator,
        run_blocking: RunBlocking,
        clock: IReactorTime,
        on_auth_failure: Callable[[StreamingRequest, str], None] | None = None,
        uploads: Uploads | None = None,
    ) -> None:
        self.limits = limits
        self.store = store
        self.authenticator = authenticator
        self.run_blocking = run_blocking
        self.clock = clock
        self.on_auth_failure = on_auth_failure
        if uploads is None:
            from hmacfs.state.store import EmbeddedState

            uploads = Uploads(store=store, state=EmbeddedState(clock), clock=clock)
        self.uploads = uploads
        #: uploads accepted and not yet stored, kept or abandoned (for graceful stop)
        self.active = 0

    # routing

    def headers_received(self, request: StreamingRequest, length: int | None) -> None:
        """Attach a receiver, an answer or a ``Refusal`` to an upload request."""
        state = request.upload_state
        method = request.method
        is_tus = tus.is_tus(request)
        if is_tus and method == b"POST":
            # tus clients behind proxies that drop PATCH/DELETE send them as POST.
            method = request.method = tus.method_override(request) or method
        handler: Callable[[StreamingRequest, SlotPath, int | None], Any] | None = None
        if method == b"PUT":
            handler = self._put
        elif is_tus and method in (b"POST", b"PATCH", b"HEAD", b"DELETE"):
            handler = {
                b"POST": self._tus_create,
                b"PATCH": self._tus_patch,
                b"HEAD": self._tus_head,
                b"DELETE": self._tus_delete,
            }[method]
        elif method == b"HEAD" and client_token(request) is not None and _has_mac(request):
            handler = self._token_head
        if handler is None:
            if length != 0:
                state.rejection = Refusal(405, "method not allowed", ((b"Allow", ALLOW),))
            return
        try:
            slot = parse_slot_path(request.path, self.limits.prefix)
        except PathError as error:
            state.rejection = Refusal(error.status, error.reason)
            return
        state.slot = slot
        try:
            if is_tus:
                tus.check_version(request)
            outcome = handler(request, slot, length)
        except Refusal as refusal:
            state.rejection = Refusal(refusal.status, refusal.reason, refusal.headers)
            return
        except OSError as error:
            # A store lookup at header time (a HEAD's offset, a PUT's parents) that failed:
            # a short answer, never an unhandled error in the channel.
            refusal = storage_refusal(error, reading=method == b"HEAD")
            if refusal.status == 503:
                log.warn("{path}: storage error: {error}", path=slot.text, error=error.strerror or error)
            state.rejection = Refusal(refusal.status, refusal.reason, refusal.headers)
            return
        if isinstance(outcome, Deferred):
            outcome.addCallbacks(self._attach, self._refuse, (state,), None, (state,))
            if not outcome.called:
                state.admission = outcome
        else:
            self._attach(outcome, state)

    def _attach(self, outcome: Answer | UploadReceiver, state: RequestState) -> None:
        if isinstance(outcome, Answer):
            state.answer = outcome
        else:
            state.consumer = state.receiver = outcome

    def _refuse(self, failure: Failure, state: RequestState) -> None:
        if failure.check(Refusal):
            error = failure.value
            state.rejection = Refusal(error.status, error.reason, error.headers)
        else:
            log.failure("upload admission failed", failure)
            state.rejection = Refusal(500, "internal error")

    # checks shared by every kind of request

    def _authorize(
        self, request: StreamingRequest, slot: SlotPath, size: int | None, content_type: bytes | None
    ) -> None:
        """The MAC check; every upload-related method is checked as the PUT it was signed for."""
        try:
            self.authenticator.verify_upload(
                method=b"PUT",
                full_path=_decoded_full_path(request.path),
                slot=slot,
                query=request.args,
                size=size,
                content_type=content_type,
            )
        except AuthError as error:
            if self.on_auth_failure is not None:
                self.on_auth_failure(request, error.reason)
            raise UploadFailed(403, error.reason) from None

    def _check_size(self, size: int) -> None:
        limit = self.limits.max_upload_size
        if limit and size > limit:
            raise UploadFailed(413, f"file too large (maximum {limit} bytes)")

    def _announced_sha256(self, request: StreamingRequest) -> bytes | None:
        if not self.limits.checksum_verification:
            return None
        try:
            return expected_sha256(request.requestHeaders)
        except ValueError as error:
            raise UploadFailed(400, str(error)) from None

    def _record(
        self, slot: SlotPath, request: StreamingRequest, size: int, content_type: bytes | None, **kw: Any
    ) -> UploadRecord:
        stored_type = (content_type or b"application/octet-stream").decode("ascii")
        return UploadRecord(
            path=slot.text,
            size=size,
            content_type=stored_type,
            signed_type=None if content_type is None else content_type.decode("ascii"),
            mac=mac_fingerprint(request.args) or "",
            created=time.time(),
            **kw,
        )

    def _resumable(self, slot: SlotPath) -> tuple[int, UploadRecord] | None:
        status = self.store.partial_status(slot.segments)
        if status is None:
            return None
        record = UploadRecord.from_dict(status[1])
        return None if record is None else (status[0], record)

    @staticmethod
    def _binds(
        record: UploadRecord, request: StreamingRequest, slot: SlotPath, *, session: bool
    ) -> bool:
        """Whether this request may continue the upload of ``record``."""
        if record.path != slot.text or record.mac != mac_fingerprint(request.args):
            return False
        return not (session and record.token is not None and client_token(request) != record.token)

    def _check_session(self, record: UploadRecord, request: StreamingRequest, slot: SlotPath) -> None:
        """
        Refuse a request that may not see or touch ``record``'s upload: another URL, or
        not the session token the upload was started with.  Every verb that reaches an
        upload in progress (session-token HEAD, tus HEAD, PATCH, DELETE) gets this same 404.
        """
        if not self._binds(record, request, slot, session=True):
            raise UploadFailed(404, "no upload in progress for this session", (offset_header(0),))

    # PUT

    def _put(self, request: StreamingRequest, slot: SlotPath, length: int | None) -> Any:
        if length is None:
            raise UploadFailed(411, "Content-Length required (chunked uploads are not accepted)")
        content_type = _content_type(request)
        if content_type is not None and not _valid_type(content_type):
            raise UploadFailed(400, "invalid Content-Type")
        content_range = request.requestHeaders.getRawHeaders(b"content-range")
        first, total = 0, length
        if content_range:
            try:
                first, last, total = parse_content_range(content_range[0])
            except ValueError as error:
                raise UploadFailed(400, str(error)) from None
            if last - first + 1 != length:
                raise UploadFailed(400, "Content-Length does not match Content-Range")
        self._authorize(request, slot, total, content_type)
        self._check_size(total)
        expected = self._announced_sha256(request)
        if self.store.exists(slot.segments):
            headers = (offset_header(total),) if content_range else ()
            raise UploadFailed(409, "file already exists", headers)
        token = client_token(request)
        found = self._resumable(slot) if content_range else None
        if found is not None and (
            found[1].size != total or not self._binds(found[1], request, slot, session=True)
        ):
            found = None
        if found is None:
            if first != 0:
                raise UploadFailed(409, "no upload to resume for this session", (offset_header(0),))
            record = self._record(
                slot, request, total, content_type, token=token,
                sha256=None if expected is None else expected.hex(),
            )
            # The whole body came with the headers and nobody asked to resume it: it is
            # stored or dropped within this request, so it needs no sidecar record.
            one_request = token is None and not content_range and request.upload_state.body_in_hand
            return self._start(
                request, slot, record, fresh=True, takeover=False, first=0, length=length,
                resumable=not one_request,
            )
        record = found[1]
        if expected is not None and record.sha256 is not None and expected.hex() != record.sha256:
            raise UploadFailed(400, "the checksum differs from the one the upload started with")
        if expected is not None and record.sha256 is None:
            record = attrs.evolve(record, sha256=expected.hex())
        return self._start(
            request, slot, record, fresh=False, takeover=True, first=first, length=length,
            resumed=first > 0,
        )

    def _token_head(self, request: StreamingRequest, slot: SlotPath, length: int | None) -> Any:
        """``HEAD`` with ``X-Session-Token`` on the signed URL: how far the upload got."""
        no_store = (b"Cache-Control", b"no-store")
        found = self._resumable(slot)
        if found is not None:
            offset, record = found
            self._authorize(request, slot, record.size, record.signed_type_bytes)
            self._check_session(record, request, slot)
            return Answer(200, _offset_headers(offset, record.size) + (no_store,))
        stored = self.store.stat(slot.segments)
        if stored is not None:
            self._authorize(request, slot, stored.size, stored.content_type.encode("ascii"))
            return Answer(200, _offset_headers(stored.size, stored.size) + (no_store,))
        raise UploadFailed(404, "no upload in progress", (offset_header(0),))

    # tus

    def _tus_create(self, request: StreamingRequest, slot: SlotPath, length: int | None) -> Any:
        size = tus.upload_length(request)
        self._check_size(size)
        raw_metadata = tus.header(request, b"upload-metadata")
        content_type = tus.metadata_type(tus.parse_metadata(raw_metadata))
        if content_type is not None and not _valid_type(content_type):
            raise UploadFailed(400, "invalid filetype in Upload-Metadata")
        self._authorize(request, slot, size, content_type)
        if length is None:
            raise UploadFailed(411, "Content-Length required (chunked uploads are not accepted)")
        if length and not tus.has_body_type(request):
            raise UploadFailed(415, "Content-Type must be application/offset+octet-stream")
        if length > size:
            raise UploadFailed(413, "the body is larger than Upload-Length")
        expected = self._announced_sha256(request)
        chunk = tus.chunk_checksum(request) if length else None
        if self.store.exists(slot.segments):
            raise UploadFailed(409, "file already exists")
        record = self._record(
            slot, request, size, content_type, protocol="tus",
            sha256=None if expected is None else expected.hex(),
            metadata=None if raw_metadata is None else raw_metadata.decode("latin-1"),
        )
        request.upload_state.kind = "tus-create"
        return self._start(
            request, slot, record, fresh=True, takeover=False, first=0, length=length, chunk=chunk
        )

    def _tus_upload(self, request: StreamingRequest, slot: SlotPath) -> tuple[int, UploadRecord]:
        """
        The upload a tus request is about, authorised; 404 when there is none for this URL
        or it was started with an X-Session-Token this request does not carry.
        """
        found = self._resumable(slot)
        if found is None:
            stored = self.store.stat(slot.segments)
            if stored is not None:
                self._authorize(request, slot, stored.size, stored.content_type.encode("ascii"))
                raise _Complete(stored)
            raise UploadFailed(404, "no upload in progress")
        offset, record = found
        self._authorize(request, slot, record.size, record.signed_type_bytes)
        self._check_session(record, request, slot)
        return offset, record

    def _tus_patch(self, request: StreamingRequest, slot: SlotPath, length: int | None) -> Any:
        tus.check_patch_type(request)
        offset = tus.upload_offset(request)
        if length is None:
            raise UploadFailed(411, "Content-Length required (chunked uploads are not accepted)")
        chunk = tus.chunk_checksum(request)
        try:
            _on_disk, record = self._tus_upload(request, slot)
        except _Complete as complete:
            raise UploadFailed(
                409, "the upload is complete", (offset_header(complete.stored.size),)
            ) from None
        if offset + length > record.size:
            raise UploadFailed(400, "the chunk goes beyond Upload-Length")
        request.upload_state.kind = "tus-patch"
        return self._start(
            request, slot, record, fresh=False, takeover=True, first=offset, length=length,
            chunk=chunk,
            resumed=offset > 0 and not self.uploads.continues_cleanly(slot.segments),
        )

    def _tus_head(self, request: StreamingRequest, slot: SlotPath, length: int | None) -> Any:
        no_store = (b"Cache-Control", b"no-store")
        try:
            offset, record = self._tus_upload(request, slot)
        except _Complete as complete:
            size = complete.stored.size
            return Answer(200, _offset_headers(size, size, ranges=False) + (no_store,))
        headers = _offset_headers(offset, record.size, ranges=False) + (
            no_store,
            tus.expires_header(self.uploads.expires_at(slot.segments)),
        )
        if record.metadata:
            headers += ((b"Upload-Metadata", record.metadata.encode("latin-1")),)
        return Answer(200, headers)

    def _tus_delete(self, request: StreamingRequest, slot: SlotPath, length: int | None) -> Any:
        try:
            _offset, record = self._tus_upload(request, slot)
        except _Complete:
            raise UploadFailed(404, "no upload in progress (the file is complete)") from None

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

    # starting a writer

    def _start(
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
                partial = self._open(
                    slot, record, fresh=fresh, takeover=takeover, first=first, length=length,
                    resumable=resumable,
                )
            except BaseException:
                lease.release()
                raise
            receiver = UploadReceiver(
                partial,
                run_blocking=self.run_blocking,
                flow=request.channel,
                high_water=4 * self.limits.buffer_size,
                expected_sha256=(
                    bytes.fromhex(record.sha256)
                    if record.sha256 and self.limits.checksum_verification
                    else None
                ),
                on_end=lambda end: self._upload_ended(lease, end),
                total=record.size,
                keep_on_interrupt=resumable,
                keep_empty=record.protocol == "tus",
                chunk_checksum=chunk,
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

    def _open(
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

    def _upload_ended(self, lease: Lease, end: UploadEnd) -> None:
        self.active -= 1
        lease.release(end)


class _Complete(Exception):
    """A tus request for an upload that is already a finished file."""

    def __init__(self, stored: StoredFile) -> None:
        super().__init__("complete")
        self.stored = stored


def _offset_headers(offset: int, size: int, *, ranges: bool = True) -> tuple[tuple[bytes, bytes], ...]:
    headers: tuple[tuple[bytes, bytes], ...] = (
        offset_header(offset),
        (b"Upload-Length", str(size).encode("ascii")),
    )
    if ranges and offset > 0:
        headers += ((b"Range", f"bytes=0-{offset - 1}".encode("ascii")),)
    return headers


def _decoded_full_path(raw_path: bytes) -> bytes:
    from urllib.parse import unquote_to_bytes

    return unquote_to_bytes(raw_path)


class UploadReceiver:
    """
    Writes one request's body to its upload's partial file, off the reactor thread.

    Chunks queue in memory only while a write is in flight; once more than
    ``high_water`` bytes wait, the socket is paused until the disk catches up,
    so memory per upload stays bounded whatever the file size.  The reactor
    thread only appends and counts; hashing and writing happen on the pool.

    When the body ends: the file is committed once it holds all ``total``
    bytes (after the whole-file SHA-256 check, which covers bytes written by
    earlier requests too: they are read back and hashed first), otherwise it
    is kept for the next request (``done`` fires ``Progress``).  When the
    client goes away, what was written is kept (``keep_on_interrupt``).
    ``on_end`` hears, exactly once, how the partial file was left.
    """

    def __init__(
        self,
        partial: PartialUpload,
        *,
        run_blocking: RunBlocking,
        flow: Any,
        high_water: int,
        expected_sha256: bytes | None = None,
        on_end: Callable[[UploadEnd], None] | None = None,
        total: int | None = None,
        keep_on_interrupt: bool = False,
        keep_empty: bool = False,
        chunk_checksum: tuple[str, bytes] | None = None,
        progress: Callable[[int], None] | None = None,
        checkpoint_bytes: int = CHECKPOINT_BYTES,
        checkpoint_seconds: float = CHECKPOINT_SECONDS,
        clock: Any = None,
    ) -> None:
        self.partial = partial
        self.start = partial.written
        self.total = total
        self._on_end = on_end
        self._run_blocking = run_blocking
        self._flow = flow
        self._high_water = high_water
        self._expected = expected_sha256
        self._hasher = hashlib.sha256() if expected_sha256 is not None else None
        # Bytes an earlier request wrote, to hash before ours (on the pool thread).
        self._prefix = self.start if self._hasher is not None else 0
        self._chunk_expected: bytes | None = None
        self._chunk_hasher: Any = None
        if chunk_checksum is not None:
            name, self._chunk_expected = chunk_checksum
            self._chunk_hasher = tus.CHECKSUM_ALGORITHMS[name]()
        self._keep_on_interrupt = keep_on_interrupt
        self._keep_empty = keep_empty
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
        self._finishing = False
        self._error: Failure | None = None
        #: the answer to a request whose write failed mid-body (given at ``body_complete``)
        self._answer: UploadFailed | None = None
        self.received = 0
        self.done: Deferred[StoredFile | Progress] = Deferred()

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
            self._fail(self._answer)
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
        transport = getattr(self._flow, "transport", None)
        if transport is not None:
            transport.abortConnection()
        self.connection_lost()

    @property
    def offset(self) -> int:
        """Bytes of the upload in its partial file so far."""
        return self.start + self._flushed

    # internals

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
        if self._hasher is not None:
            if self._prefix:
                self.partial.hash_prefix(self._hasher, self._prefix)
                self._prefix = 0
            for chunk in batch:
                self._hasher.update(chunk)
        if self._chunk_hasher is not None:
            for chunk in batch:
                self._chunk_hasher.update(chunk)
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
        if self._finishing:
            return
        if self._aborted:
            self._interrupted()
        elif self._pending and self._complete and self._last_bytes_of_upload():
            self._write_and_commit()
        elif self._pending:
            self._flush()
        elif self._complete:
            self._body_done()

    def _write_failed(self, failure: Failure) -> None:
        self._writing = False
        self._error = failure
        self._pending = []
        full = _is_full(failure)
        if full:
            # Expected in operation, not a bug: one line, no traceback.
            log.warn(
                "writing upload {path} failed: insufficient storage", path=self.partial.target
            )
            error = UploadFailed(507, "insufficient storage")
        elif failure.check(StorageError):
            log.warn(
                "writing upload {path} failed: {reason}",
                path=self.partial.target,
                reason=failure.value.reason,
            )
            error = UploadFailed(failure.value.status, failure.value.reason)
        else:
            log.failure("writing upload {path} failed", failure, path=self.partial.target)
            error = UploadFailed(500, "could not write the file")
        if self._complete:
            self._fail(error)
        else:
            # Mid-body: answer now through the normal response path (error page, CORS,
            # access log) and discard the rest of the body, as after an early refusal;
            # ``done`` fails when the channel ends the body (``body_complete``).
            self._answer = error
            if self._paused:
                self._paused = False
                self._flow.resume_body()
            refuse = getattr(self._flow, "refuse_body", None)
            if refuse is not None:
                refuse(self)
            else:  # pragma: no cover - a flow without it can only drop the client
                abort = getattr(self._flow, "forceAbortClient", None)
                if abort is not None and getattr(self._flow, "transport", None) is not None:
                    abort()
        # On a full disk the bytes written would only hold the space every later upload
        # needs (until ResumeTTL): nobody could usefully resume them now, so drop them.
        self._close(keep=self._keep_on_interrupt and not full, clean=False)

    def _interrupted(self) -> None:
        keep = self._keep_on_interrupt and (self.offset > 0 or self._keep_empty)
        self._close(keep=keep, clean=False)

    def _close(self, *, keep: bool, clean: bool) -> Deferred[UploadEnd]:
        """Keep (release) or remove the partial file, then report how it was left."""
        self._finishing = True
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
        d.addCallback(self._ended)
        return d

    def _ended(self, end: UploadEnd) -> UploadEnd:
        on_end, self._on_end = self._on_end, None
        if on_end is not None:
            on_end(end)
        return end

    def _body_done(self) -> None:
        self._finishing = True
        if self._chunk_hasher is not None and self._chunk_hasher.digest() != self._chunk_expected:
            # tus checksum: the chunk is discarded, the upload stays where it was.
            d = self._run_blocking(self.partial.truncate, self.start)
            d.addCallbacks(
                lambda _: self._close(keep=True, clean=True),
                lambda _: self._close(keep=False, clean=False),
            )
            mismatch = UploadFailed(
                tus.CHECKSUM_MISMATCH,
                "checksum mismatch: the chunk was discarded",
                (offset_header(self.start),),
            )
            d.addCallback(lambda _: self._fail(mismatch))
            return
        if self.total is None or self.offset >= self.total:
            d = self._run_blocking(self._commit)
            d.addCallbacks(self._committed, self._commit_failed)
            return
        self._close(keep=True, clean=True).addCallback(self._kept)

    def _kept(self, end: UploadEnd) -> None:
        if end.outcome == "kept":
            self._succeed(Progress(end.offset, self.total))
        else:
            self._fail(UploadFailed(500, "could not keep the upload"))

    def _last_bytes_of_upload(self) -> bool:
        """Whether the queued bytes complete the whole upload (not just this request)."""
        return (
            self.total is not None
            and self._chunk_hasher is None
            and len(self._pending) <= MAX_BATCH_BUFFERS
            and self.offset + self._queued >= self.total
        )

    def _write_and_commit(self) -> None:
        batch, self._pending = self._pending, []
        self._writing = True
        self._finishing = True

        written: list[int] = []

        def job() -> StoredFile:
            written.append(self._write_batch(batch, False))
            return self._commit()

        def count_written() -> None:
            self._writing = False
            if written:
                self._queued -= written[0]
                self._flushed += written[0]

        def done(stored: StoredFile) -> None:
            count_written()
            self._committed(stored)

        def failed(failure: Failure) -> None:
            count_written()
            # A failed write keeps what reached the disk (resumable), as on the
            # normal path; a failed commit is handled as a commit failure.
            if written:
                self._commit_failed(failure)
            else:
                self._write_failed(failure)

        self._run_blocking(job).addCallbacks(done, failed)

    def _commit(self) -> StoredFile:
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

    def _committed(self, stored: StoredFile) -> None:
        self._ended(UploadEnd("stored", stored.size))
        self._succeed(stored)

    def _commit_failed(self, failure: Failure) -> None:
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
        self._ended(UploadEnd("removed", 0))
        self._fail(error)

    def _succeed(self, result: StoredFile | Progress) -> None:
        if not self.done.called:
            self.done.callback(result)

    def _fail(self, error: UploadFailed) -> None:
        if not self.done.called:
            self.done.errback(error)


def _is_enospc(failure: Failure) -> bool:
    import errno

    value = failure.value
    return isinstance(value, OSError) and value.errno in (errno.ENOSPC, errno.EDQUOT)


def _is_full(failure: Failure) -> bool:
    """A full disk or quota, raw or already translated by the store (507)."""
    if failure.check(StorageError):
        return failure.value.status == 507
    return _is_enospc(failure)
