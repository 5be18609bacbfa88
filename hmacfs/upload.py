# -*- test-case-name: tests.test_upload -*-
"""
Upload admission (decided from headers) and the streaming body writer.

``UploadPolicy.headers_received`` runs before any byte of the body is read:
path, method, length, MAC, size limit, existence and free space are all
checked there, so a refused client gets its answer without sending the body.
An accepted request gets an ``UploadReceiver`` that writes chunks on a thread
pool as they arrive, pauses the socket while too much waits for the disk, and
commits the partial file atomically when the last byte is in.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import attrs
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure

from hmacfs.auth import AuthError, Authenticator
from hmacfs.logs import log_router
from hmacfs.paths import PathError, SlotPath, parse_slot_path
from hmacfs.request import Rejection, StreamingRequest
from hmacfs.storage import PartialUpload, Store, StorageError, StoredFile

if TYPE_CHECKING:
    from twisted.internet.interfaces import IReactorTime

log = Logger(observer=log_router)

RunBlocking = Callable[..., Deferred]

#: At most this many buffers go to one writev() call (IOV_MAX is 1024).
MAX_BATCH_BUFFERS = 512
_HEX64 = re.compile(rb"^[0-9a-fA-F]{64}$")
_DIGEST_SHA256 = re.compile(rb"(?:^|,)\s*sha-256\s*=\s*:([A-Za-z0-9+/=]+):", re.IGNORECASE)


class UploadFailed(Exception):
    """An accepted upload that could not be stored; carries the HTTP answer."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(f"{status} {reason}")
        self.status = status
        self.reason = reason


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


def _content_type(request: StreamingRequest) -> bytes | None:
    values = request.requestHeaders.getRawHeaders(b"content-type")
    return values[0] if values else None


def _valid_type(value: bytes) -> bool:
    return len(value) <= 255 and all(0x20 <= byte < 0x7F for byte in value)


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
    ) -> None:
        self.limits = limits
        self.store = store
        self.authenticator = authenticator
        self.run_blocking = run_blocking
        self.clock = clock
        self.on_auth_failure = on_auth_failure
        #: uploads accepted and not yet stored or abandoned (for graceful stop)
        self.active = 0

    def headers_received(self, request: StreamingRequest, length: int | None) -> None:
        """Attach an ``UploadReceiver`` or a ``Rejection`` to an upload request."""
        method = request.method
        if method not in (b"PUT",):
            if length != 0:
                request.rejection = Rejection(
                    405, "method not allowed", ((b"Allow", b"GET, HEAD, PUT, OPTIONS"),)
                )
            return
        try:
            slot = parse_slot_path(request.path, self.limits.prefix)
        except PathError as error:
            request.rejection = Rejection(error.status, error.reason)
            return
        request.slot = slot
        try:
            request.body_consumer = self._admit(request, slot, length)
        except UploadFailed as refusal:
            request.rejection = Rejection(refusal.status, refusal.reason)

    def _admit(self, request: StreamingRequest, slot: SlotPath, length: int | None) -> UploadReceiver:
        if length is None:
            raise UploadFailed(411, "Content-Length required (chunked uploads are not accepted)")
        content_type = _content_type(request)
        if content_type is not None and not _valid_type(content_type):
            raise UploadFailed(400, "invalid Content-Type")
        try:
            self.authenticator.verify_upload(
                method=request.method,
                full_path=_decoded_full_path(request.path),
                slot=slot,
                query=request.args,
                size=length,
                content_type=content_type,
            )
        except AuthError as error:
            if self.on_auth_failure is not None:
                self.on_auth_failure(request, error.reason)
            raise UploadFailed(403, error.reason) from None
        limit = self.limits.max_upload_size
        if limit and length > limit:
            raise UploadFailed(413, f"file too large (maximum {limit} bytes)")
        expected = None
        if self.limits.checksum_verification:
            try:
                expected = expected_sha256(request.requestHeaders)
            except ValueError as error:
                raise UploadFailed(400, str(error)) from None
        if self.store.exists(slot.segments):
            raise UploadFailed(409, "file already exists")
        stored_type = (content_type or b"application/octet-stream").decode("ascii")
        try:
            self.store.check_free_space(length)
            partial = self.store.open_partial(slot.segments, stored_type, length)
        except StorageError as error:
            raise UploadFailed(error.status, error.reason) from None
        receiver = UploadReceiver(
            partial,
            run_blocking=self.run_blocking,
            flow=request.channel,
            high_water=4 * self.limits.buffer_size,
            expected_sha256=expected,
            on_end=self._upload_ended,
        )
        self.active += 1
        return receiver

    def _upload_ended(self) -> None:
        self.active -= 1


def _decoded_full_path(raw_path: bytes) -> bytes:
    from urllib.parse import unquote_to_bytes

    return unquote_to_bytes(raw_path)


class UploadReceiver:
    """
    Writes one upload's body to its partial file, off the reactor thread.

    Chunks queue in memory only while a write is in flight; once more than
    ``high_water`` bytes wait, the socket is paused until the disk catches up,
    so memory per upload stays bounded whatever the file size.
    """

    def __init__(
        self,
        partial: PartialUpload,
        *,
        run_blocking: RunBlocking,
        flow: Any,
        high_water: int,
        expected_sha256: bytes | None = None,
        on_end: Callable[[], None] | None = None,
    ) -> None:
        self.partial = partial
        self._on_end = on_end
        self._run_blocking = run_blocking
        self._flow = flow
        self._high_water = high_water
        self._expected = expected_sha256
        self._hasher = hashlib.sha256() if expected_sha256 is not None else None
        self._pending: list[bytes] = []
        self._queued = 0  # bytes pending or in flight
        self._writing = False
        self._paused = False
        self._complete = False
        self._aborted = False
        self._error: Failure | None = None
        self.received = 0
        self.done: Deferred[StoredFile] = Deferred()

    # IBodyConsumer

    def write(self, data: bytes) -> None:
        if self._aborted or self._error is not None:
            return
        self.received += len(data)
        self._pending.append(data)
        self._queued += len(data)
        if not self._writing:
            self._flush()
        elif self._queued > self._high_water and not self._paused:
            self._paused = True
            self._flow.pause_body()

    def body_complete(self) -> None:
        self._complete = True
        if not self._writing:
            self._next()

    def connection_lost(self) -> None:
        if self._complete or self._aborted:
            return
        self._aborted = True
        self._pending = []
        log.info(
            "upload {path} interrupted after {received} bytes",
            path=self.partial.target,
            received=self.received,
        )
        self._ended()
        if not self._writing:
            self._discard()

    def _ended(self) -> None:
        on_end, self._on_end = self._on_end, None
        if on_end is not None:
            on_end()

    # internals

    def _flush(self) -> None:
        batch = self._pending[:MAX_BATCH_BUFFERS]
        del self._pending[:MAX_BATCH_BUFFERS]
        self._writing = True
        d = self._run_blocking(self._write_batch, batch)
        d.addCallbacks(self._written, self._write_failed)

    def _write_batch(self, batch: list[bytes]) -> int:
        """Runs in a worker thread: hash (hashlib releases the GIL) and write."""
        if self._hasher is not None:
            for chunk in batch:
                self._hasher.update(chunk)
        return self.partial.write(batch)

    def _written(self, count: int) -> None:
        self._writing = False
        self._queued -= count
        if self._paused and self._queued <= self._high_water // 2:
            self._paused = False
            self._flow.resume_body()
        self._next()

    def _next(self) -> None:
        if self._aborted:
            self._discard()
        elif self._pending:
            self._flush()
        elif self._complete:
            self._commit()

    def _write_failed(self, failure: Failure) -> None:
        self._writing = False
        self._error = failure
        log.failure("writing upload {path} failed", failure, path=self.partial.target)
        self._pending = []
        self._discard()
        if not self._complete:
            # Mid-body: no response can be written from here; drop the client.
            abort = getattr(self._flow, "forceAbortClient", None)
            if abort is not None and getattr(self._flow, "transport", None) is not None:
                abort()
        self._fail(UploadFailed(507 if _is_enospc(failure) else 500, "could not write the file"))

    def _commit(self) -> None:
        digest = None
        if self._hasher is not None:
            actual = self._hasher.digest()
            if actual != self._expected:
                self._discard()
                self._fail(UploadFailed(400, "checksum mismatch: the file was not stored"))
                return
            digest = actual.hex()
        d = self._run_blocking(self.partial.commit, digest)
        d.addCallbacks(self._committed, self._commit_failed)

    def _committed(self, stored: StoredFile) -> None:
        self._ended()
        if not self.done.called:
            self.done.callback(stored)

    def _commit_failed(self, failure: Failure) -> None:
        if failure.check(StorageError):
            error = failure.value
            self._fail(UploadFailed(error.status, error.reason))
            return
        log.failure("committing upload {path} failed", failure, path=self.partial.target)
        self._discard()
        self._fail(UploadFailed(507 if _is_enospc(failure) else 500, "could not store the file"))

    def _discard(self) -> None:
        d = self._run_blocking(self.partial.abort)
        d.addErrback(lambda f: log.failure("removing partial upload failed", f))

    def _fail(self, error: UploadFailed) -> None:
        self._ended()
        if not self.done.called:
            self.done.errback(error)


def _is_enospc(failure: Failure) -> bool:
    import errno

    value = failure.value
    return isinstance(value, OSError) and value.errno in (errno.ENOSPC, errno.EDQUOT)
