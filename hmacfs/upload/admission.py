# -*- test-case-name: tests.test_admission -*-
"""
The header-time checks every upload request passes, apart from the channel.

Plain functions of the request's headers and arguments (checksum, session
token, Content-Type, Content-Range) and one ``Admission`` object for the
checks that need the secret or the store (the MAC, the size limit, the
binding of a request to an upload in progress), so each decision is tested
on a bare request object without a socket.  What needs the store asks the
``IStore`` and answers with a Deferred: nothing here touches the disk.
"""

from __future__ import annotations

import base64
import binascii
import re
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import unquote_to_bytes

import attrs
from twisted.internet.defer import Deferred

from hmacfs.signing.auth import Authenticator, AuthError
from hmacfs.signing.paths import SlotPath
from hmacfs.storage.interface import TOMBSTONED, IStore, StoredFile
from hmacfs.upload.receiver import UploadFailed
from hmacfs.upload.resume import UploadRecord, mac_fingerprint, offset_header, parse_content_range

_HEX64 = re.compile(rb"^[0-9a-fA-F]{64}$")
_DIGEST_SHA256 = re.compile(rb"(?:^|,)\s*sha-256\s*=\s*:([A-Za-z0-9+/=]+):", re.IGNORECASE)
_TOKEN = re.compile(rb"[A-Za-z0-9._~-]{8,128}")


@attrs.define
class UploadLimits:
    """The upload settings the policy needs from the configuration."""

    prefix: str
    max_upload_size: int = 0
    checksum_verification: bool = False
    buffer_size: int = 65536


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


def has_mac(request: Any) -> bool:
    """Whether the query carries any of the MAC parameters."""
    return any(name in request.args for name in (b"v", b"v2", b"token", b"v3"))


def valid_type(value: bytes) -> bool:
    """A Content-Type we store and send back: short, printable ASCII."""
    return len(value) <= 255 and all(0x20 <= byte < 0x7F for byte in value)


def put_content_type(request: Any) -> bytes | None:
    """A PUT's Content-Type (the one it was signed for), or None; 400 if unusable."""
    values = request.requestHeaders.getRawHeaders(b"content-type")
    content_type = values[0] if values else None
    if content_type is not None and not valid_type(content_type):
        raise UploadFailed(400, "invalid Content-Type")
    return content_type


def require_length(length: int | None) -> int:
    """The body's Content-Length; 411 for a chunked body."""
    if length is None:
        raise UploadFailed(411, "Content-Length required (chunked uploads are not accepted)")
    return length


def put_extent(request: Any, length: int) -> tuple[int, int, bool]:
    """
    Where a PUT's body goes: (its first byte, the upload's whole size, whether
    it carries ``Content-Range``); 400 for a range that is malformed or does
    not match the length.
    """
    content_range = request.requestHeaders.getRawHeaders(b"content-range")
    if not content_range:
        return 0, length, False
    try:
        first, last, total = parse_content_range(content_range[0])
    except ValueError as error:
        raise UploadFailed(400, str(error)) from None
    if last - first + 1 != length:
        raise UploadFailed(400, "Content-Length does not match Content-Range")
    return first, total, True


def decoded_full_path(raw_path: bytes) -> bytes:
    return unquote_to_bytes(raw_path)


class Admission:
    """The checks that need the secret or the store; each raises ``UploadFailed``."""

    def __init__(
        self,
        *,
        limits: UploadLimits,
        store: IStore,
        authenticator: Authenticator,
        on_auth_failure: Callable[[Any, str], None] | None = None,
    ) -> None:
        self.limits = limits
        self.store = store
        self.authenticator = authenticator
        self.on_auth_failure = on_auth_failure

    def authorize(
        self, request: Any, slot: SlotPath, size: int | None, content_type: bytes | None
    ) -> None:
        """The MAC check; every upload-related method is checked as the PUT it was signed for."""
        try:
            self.authenticator.verify_upload(
                method=b"PUT",
                full_path=decoded_full_path(request.path),
                slot=slot,
                query=request.args,
                size=size,
                content_type=content_type,
            )
        except AuthError as error:
            if self.on_auth_failure is not None:
                self.on_auth_failure(request, error.reason)
            raise UploadFailed(403, error.reason) from None

    def check_size(self, size: int) -> None:
        limit = self.limits.max_upload_size
        if limit and size > limit:
            raise UploadFailed(413, f"file too large (maximum {limit} bytes)")

    def announced_sha256(self, request: Any) -> bytes | None:
        """The SHA-256 to verify the file against (None: none announced, or not verified)."""
        if not self.limits.checksum_verification:
            return None
        try:
            return expected_sha256(request.requestHeaders)
        except ValueError as error:
            raise UploadFailed(400, str(error)) from None

    def check_absent(
        self, slot: SlotPath, headers: tuple[tuple[bytes, bytes], ...] = ()
    ) -> Deferred[None]:
        """Fails with 409 when the file is already stored: a slot is written once."""

        def decided(exists: bool) -> None:
            if exists:
                raise UploadFailed(409, "file already exists", headers)

        return self.store.exists(slot.segments).addCallback(decided)

    def check_tombstone(self, slot: SlotPath) -> Deferred[None]:
        """
        Fails with 403 for a path retention deleted (a never-expiring URL may not
        re-create it).  ``IStore.admit``/``resume`` refuse it too: this is for the
        requests that are refused before they get that far (a resume of nothing).
        """

        def decided(blocked: bool) -> None:
            if blocked:
                raise UploadFailed(403, TOMBSTONED)

        return self.store.tombstoned(slot.segments).addCallback(decided)

    def lookup(self, slot: SlotPath) -> Deferred[StoredFile | None]:
        """The finished file at ``slot``, or None."""
        return self.store.lookup(slot.segments)

    @staticmethod
    def record(
        slot: SlotPath, request: Any, size: int, content_type: bytes | None, **kw: Any
    ) -> UploadRecord:
        """The record that binds a new upload to this request's URL (and session token)."""
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

    def resumable(self, slot: SlotPath) -> Deferred[tuple[int, UploadRecord] | None]:
        """The upload in progress on ``slot``: (bytes stored, its record), or None."""

        def found(status: tuple[int, dict[str, object]] | None) -> tuple[int, UploadRecord] | None:
            if status is None:
                return None
            record = UploadRecord.from_dict(status[1])
            return None if record is None else (status[0], record)

        return self.store.upload_status(slot.segments).addCallback(found)

    @staticmethod
    def binds(record: UploadRecord, request: Any, slot: SlotPath, *, session: bool) -> bool:
        """Whether this request may continue the upload of ``record``."""
        if record.path != slot.text or record.mac != mac_fingerprint(request.args):
            return False
        return not (session and record.token is not None and client_token(request) != record.token)

    def check_session(self, record: UploadRecord, request: Any, slot: SlotPath) -> None:
        """
        Refuse a request that may not see or touch ``record``'s upload: another URL, or
        not the session token the upload was started with.  Every verb that reaches an
        upload in progress (session-token HEAD, tus HEAD, PATCH, DELETE) gets this same 404.
        """
        if not self.binds(record, request, slot, session=True):
            raise UploadFailed(404, "no upload in progress for this session", (offset_header(0),))
