# -*- test-case-name: tests.test_resume,tests.test_tus -*-
"""
The two ways an upload arrives and resumes, each as the handlers of its verbs.

``PutUploads``: XEP-0363's ``PUT`` of the whole file, or of its rest with
``Content-Range: bytes N-(S-1)/S`` and the same ``X-Session-Token``, and the
``HEAD`` with that token that says how far it got.  ``TusUploads``: tus 1.0
creation (with upload), ``PATCH``, ``HEAD`` and termination on the signed URL.
Each handler takes ``(request, slot, length)`` after the path parsed, checks
with ``Admission`` and returns a Deferred ``Answer`` or starts a writer
(``UploadStarter``); refusals are raised (or the Deferred fails) as
``UploadFailed``.  Every store lookup is a Deferred of the ``IStore``, made
before the body is read.
"""

from __future__ import annotations

from typing import Any

import attrs
from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

from hmacfs.http.channel import Answer, StreamingRequest
from hmacfs.signing.paths import SlotPath
from hmacfs.storage.interface import IStore, StoredFile
from hmacfs.upload import tus
from hmacfs.upload.admission import (
    Admission,
    client_token,
    put_content_type,
    put_extent,
    require_length,
    valid_type,
)
from hmacfs.upload.leases import UploadStarter
from hmacfs.upload.receiver import UploadFailed, UploadReceiver
from hmacfs.upload.resume import UploadRecord, Uploads, offset_header

Headers = tuple[tuple[bytes, bytes], ...]
NO_STORE = (b"Cache-Control", b"no-store")


def offset_headers(offset: int, size: int, *, ranges: bool = True) -> Headers:
    """How far an upload got: Upload-Offset, Upload-Length and (for PUT clients) Range."""
    headers: Headers = (
        offset_header(offset),
        (b"Upload-Length", str(size).encode("ascii")),
    )
    if ranges and offset > 0:
        headers += ((b"Range", f"bytes=0-{offset - 1}".encode("ascii")),)
    return headers


class PutUploads:
    """``PUT`` (whole, or resumed with Content-Range) and the session-token ``HEAD``."""

    def __init__(self, admission: Admission, starter: UploadStarter, store: IStore) -> None:
        self.admission = admission
        self.starter = starter
        self.store = store

    def put(
        self, request: StreamingRequest, slot: SlotPath, length: int | None
    ) -> Deferred[UploadReceiver]:
        check = self.admission
        length = require_length(length)
        content_type = put_content_type(request)
        first, total, ranged = put_extent(request, length)
        check.authorize(request, slot, total, content_type)
        check.check_size(total)
        expected = check.announced_sha256(request)
        token = client_token(request)
        if not ranged:
            # A whole file: the store's admission (one step: tombstone, existence,
            # space, the upload) is all the store work before the body.
            return self._fresh(request, slot, total, length, content_type, expected, token, False)
        d: Deferred[Any] = check.check_tombstone(slot)
        d.addCallback(lambda _: check.check_absent(slot, (offset_header(total),)))
        d.addCallback(lambda _: check.resumable(slot))
        return d.addCallback(
            self._ranged, request, slot, first, total, length, content_type, expected, token
        )

    def _fresh(
        self,
        request: StreamingRequest,
        slot: SlotPath,
        total: int,
        length: int,
        content_type: bytes | None,
        expected: bytes | None,
        token: str | None,
        ranged: bool,
    ) -> Deferred[UploadReceiver]:
        record = self.admission.record(
            slot, request, total, content_type, token=token,
            sha256=None if expected is None else expected.hex(),
        )
        # The whole body came with the headers and nobody asked to resume it: it is
        # stored or dropped within this request, so it needs no sidecar record.
        one_request = token is None and not ranged and request.upload_state.body_in_hand
        return self.starter.start(
            request, slot, record, fresh=True, takeover=False, first=0, length=length,
            resumable=not one_request,
        )

    def _ranged(
        self,
        found: tuple[int, UploadRecord] | None,
        request: StreamingRequest,
        slot: SlotPath,
        first: int,
        total: int,
        length: int,
        content_type: bytes | None,
        expected: bytes | None,
        token: str | None,
    ) -> Deferred[UploadReceiver]:
        check = self.admission
        if found is not None and (
            found[1].size != total or not check.binds(found[1], request, slot, session=True)
        ):
            found = None
        if found is None:
            if first != 0:
                raise UploadFailed(409, "no upload to resume for this session", (offset_header(0),))
            return self._fresh(request, slot, total, length, content_type, expected, token, True)
        record = found[1]
        if expected is not None and record.sha256 is not None and expected.hex() != record.sha256:
            raise UploadFailed(400, "the checksum differs from the one the upload started with")
        if expected is not None and record.sha256 is None:
            record = attrs.evolve(record, sha256=expected.hex())
        return self.starter.start(
            request, slot, record, fresh=False, takeover=True, first=first, length=length,
            resumed=first > 0,
        )

    def head(
        self, request: StreamingRequest, slot: SlotPath, length: int | None
    ) -> Deferred[Answer]:
        """``HEAD`` with ``X-Session-Token`` on the signed URL: how far the upload got."""
        check = self.admission

        def found(status: tuple[int, UploadRecord] | None) -> Answer | Deferred[Answer]:
            if status is not None:
                offset, record = status
                check.authorize(request, slot, record.size, record.signed_type_bytes)
                check.check_session(record, request, slot)
                return Answer(200, offset_headers(offset, record.size) + (NO_STORE,))
            return check.lookup(slot).addCallback(finished)

        def finished(stored: StoredFile | None) -> Answer:
            if stored is None:
                raise UploadFailed(404, "no upload in progress", (offset_header(0),))
            check.authorize(request, slot, stored.size, stored.content_type.encode("ascii"))
            return Answer(200, offset_headers(stored.size, stored.size) + (NO_STORE,))

        return check.resumable(slot).addCallback(found)


class _Complete(Exception):
    """A tus request for an upload that is already a finished file."""

    def __init__(self, stored: StoredFile) -> None:
        super().__init__("complete")
        self.stored = stored


class TusUploads:
    """tus 1.0 on the signed URL: creation (with upload), ``PATCH``, ``HEAD``, termination."""

    def __init__(
        self, admission: Admission, starter: UploadStarter, store: IStore, uploads: Uploads
    ) -> None:
        self.admission = admission
        self.starter = starter
        self.store = store
        self.uploads = uploads

    def create(
        self, request: StreamingRequest, slot: SlotPath, length: int | None
    ) -> Deferred[UploadReceiver]:
        check = self.admission
        size = tus.upload_length(request)
        check.check_size(size)
        raw_metadata = tus.header(request, b"upload-metadata")
        content_type = tus.metadata_type(tus.parse_metadata(raw_metadata))
        if content_type is not None and not valid_type(content_type):
            raise UploadFailed(400, "invalid filetype in Upload-Metadata")
        check.authorize(request, slot, size, content_type)
        length = require_length(length)
        if length and not tus.has_body_type(request):
            raise UploadFailed(415, "Content-Type must be application/offset+octet-stream")
        if length > size:
            raise UploadFailed(413, "the body is larger than Upload-Length")
        expected = check.announced_sha256(request)
        chunk = tus.chunk_checksum(request) if length else None
        record = check.record(
            slot, request, size, content_type, protocol="tus",
            sha256=None if expected is None else expected.hex(),
            metadata=None if raw_metadata is None else raw_metadata.decode("latin-1"),
        )
        request.upload_state.kind = "tus-create"
        # The store's admission refuses a tombstoned path (403) or an existing file (409).
        return self.starter.start(
            request, slot, record, fresh=True, takeover=False, first=0, length=length, chunk=chunk
        )

    def _upload(self, request: StreamingRequest, slot: SlotPath) -> Deferred[tuple[int, UploadRecord]]:
        """
        The upload a tus request is about, authorised; 404 when there is none for this URL
        or it was started with an X-Session-Token this request does not carry; fails with
        ``_Complete`` when it is a finished file by now.
        """
        check = self.admission

        def found(status: tuple[int, UploadRecord] | None) -> Any:
            if status is None:
                return check.lookup(slot).addCallback(finished)
            offset, record = status
            check.authorize(request, slot, record.size, record.signed_type_bytes)
            check.check_session(record, request, slot)
            return offset, record

        def finished(stored: StoredFile | None) -> None:
            if stored is None:
                raise UploadFailed(404, "no upload in progress")
            check.authorize(request, slot, stored.size, stored.content_type.encode("ascii"))
            raise _Complete(stored)

        return check.resumable(slot).addCallback(found)

    def patch(
        self, request: StreamingRequest, slot: SlotPath, length: int | None
    ) -> Deferred[UploadReceiver]:
        tus.check_patch_type(request)
        offset = tus.upload_offset(request)
        length = require_length(length)
        chunk = tus.chunk_checksum(request)

        def complete(failure: Failure) -> UploadReceiver:
            failure.trap(_Complete)
            raise UploadFailed(409, "the upload is complete", (offset_header(failure.value.stored.size),))

        def start(found: tuple[int, UploadRecord]) -> Deferred[UploadReceiver]:
            _in_store, record = found
            if offset + length > record.size:
                raise UploadFailed(400, "the chunk goes beyond Upload-Length")
            request.upload_state.kind = "tus-patch"
            return self.starter.start(
                request, slot, record, fresh=False, takeover=True, first=offset, length=length,
                chunk=chunk,
                resumed=offset > 0 and not self.uploads.continues_cleanly(slot.segments),
            )

        d = self.admission.check_tombstone(slot)
        d.addCallback(lambda _: self._upload(request, slot))
        return d.addCallbacks(start, complete)

    def head(
        self, request: StreamingRequest, slot: SlotPath, length: int | None
    ) -> Deferred[Answer]:
        def complete(failure: Failure) -> Answer:
            failure.trap(_Complete)
            size = failure.value.stored.size
            return Answer(200, offset_headers(size, size, ranges=False) + (NO_STORE,))

        def found(status: tuple[int, UploadRecord]) -> Deferred[Answer]:
            offset, record = status
            return self.uploads.expires_at(slot.segments).addCallback(answer, offset, record)

        def answer(expires: float, offset: int, record: UploadRecord) -> Answer:
            headers = offset_headers(offset, record.size, ranges=False) + (
                NO_STORE,
                tus.expires_header(expires),
            )
            if record.metadata:
                headers += ((b"Upload-Metadata", record.metadata.encode("latin-1")),)
            return Answer(200, headers)

        return self._upload(request, slot).addCallbacks(found, complete)

    def delete(
        self, request: StreamingRequest, slot: SlotPath, length: int | None
    ) -> Deferred[Answer]:
        def complete(failure: Failure) -> Answer:
            failure.trap(_Complete)
            raise UploadFailed(404, "no upload in progress (the file is complete)")

        def remove(status: tuple[int, UploadRecord]) -> Deferred[Answer]:
            return self.starter.remove(slot, status[1])

        return self._upload(request, slot).addCallbacks(remove, complete)
