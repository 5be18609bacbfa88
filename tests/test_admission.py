"""
The header-time upload checks on their own (hmacfs.upload.admission): bare
request objects, a stub store, no channel and no socket.  The end-to-end
answers are in tests/test_upload.py, test_resume.py and test_tus.py.
"""

from __future__ import annotations

import base64
import hashlib
from typing import Any

import attrs
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.http_headers import Headers

from hmacfs.signing.auth import Authenticator
from hmacfs.signing.paths import parse_slot_path
from hmacfs.storage.interface import TOMBSTONED
from hmacfs.testing import SECRET, v1_mac
from hmacfs.upload.admission import (
    Admission,
    UploadLimits,
    client_token,
    expected_sha256,
    has_mac,
    put_content_type,
    put_extent,
    require_length,
    valid_type,
)
from hmacfs.upload.receiver import UploadFailed
from hmacfs.upload.resume import UploadRecord, mac_fingerprint

UUID = "6f1c1b5e-2c59-4a55-9b0e-0d4f4a3f2b11"
TOKEN = "session-token-0123"


@attrs.define
class BareRequest:
    """What the checks read of a request: its path, query and headers."""

    path: bytes
    args: dict[bytes, list[bytes]]
    requestHeaders: Headers = attrs.field(factory=Headers)  # noqa: N815 - Twisted's name


def request(name: str = "a.bin", size: int = 10, **headers: str) -> BareRequest:
    text = f"{UUID}/{name}"
    made = BareRequest(f"/upload/{text}".encode(), {b"v": [v1_mac(text, size).encode()]})
    for key, value in headers.items():
        made.requestHeaders.setRawHeaders(key.replace("_", "-").encode(), [value.encode()])
    return made


@attrs.define
class StubStore:
    """The store lookups admission makes (``IStore``'s, answered at once)."""

    stored: set[tuple[str, ...]] = attrs.field(factory=set)
    partials: dict[tuple[str, ...], tuple[int, dict]] = attrs.field(factory=dict)
    tombstones: set[tuple[str, ...]] = attrs.field(factory=set)

    def exists(self, segments: tuple[str, ...]) -> Deferred[bool]:
        return succeed(tuple(segments) in self.stored)

    def tombstoned(self, segments: tuple[str, ...]) -> Deferred[bool]:
        return succeed(tuple(segments) in self.tombstones)

    def upload_status(self, segments: tuple[str, ...]) -> Deferred[tuple[int, dict] | None]:
        return succeed(self.partials.get(tuple(segments)))


def slot(name: str = "a.bin") -> Any:
    return parse_slot_path(f"/upload/{UUID}/{name}".encode(), "upload")


class HeaderFunctionTests(SynchronousTestCase):
    """The checks that read only the request's own headers and query."""

    def test_expected_sha256(self) -> None:
        """X-Checksum (hex) or Content-Digest (base64) announce it; none announces nothing."""
        digest = hashlib.sha256(b"x").digest()
        self.assertEqual(expected_sha256(request(x_checksum=digest.hex()).requestHeaders), digest)
        encoded = base64.b64encode(digest).decode()
        given = request(content_digest=f"md5=:abc=:, sha-256=:{encoded}:")
        self.assertEqual(expected_sha256(given.requestHeaders), digest)
        self.assertIsNone(expected_sha256(request().requestHeaders))

    def test_expected_sha256_malformed(self) -> None:
        """A checksum header that is present but unusable is a ValueError (400 upstream)."""
        for headers in (
            {"x_checksum": "abc"},
            {"content_digest": "md5=:abc=:"},
            {"content_digest": "sha-256=:!!!!:"},
            {"content_digest": "sha-256=:" + base64.b64encode(b"short").decode() + ":"},
        ):
            given = request()
            for key, value in headers.items():
                given.requestHeaders.setRawHeaders(key.replace("_", "-").encode(), [value.encode()])
            self.assertRaises(ValueError, expected_sha256, given.requestHeaders)

    def test_client_token(self) -> None:
        """Only a well-formed X-Session-Token is the client's own."""
        self.assertEqual(client_token(request(x_session_token=TOKEN)), TOKEN)
        self.assertIsNone(client_token(request(x_session_token="short")))
        self.assertIsNone(client_token(request(x_session_token="has space in it")))
        self.assertIsNone(client_token(request()))

    def test_has_mac(self) -> None:
        """Any of the four MAC parameters counts."""
        for name in (b"v", b"v2", b"token", b"v3"):
            self.assertTrue(has_mac(BareRequest(b"/", {name: [b"x"]})))
        self.assertFalse(has_mac(BareRequest(b"/", {b"other": [b"x"]})))

    def test_content_type(self) -> None:
        """A PUT's Content-Type is kept as sent, unless it is long or not printable ASCII."""
        self.assertTrue(valid_type(b"image/png; charset=x"))
        self.assertFalse(valid_type(b"a" * 256))
        self.assertFalse(valid_type(b"text/\x7fplain"))
        self.assertEqual(put_content_type(request(content_type="image/png")), b"image/png")
        self.assertIsNone(put_content_type(request()))
        refused = self.assertRaises(UploadFailed, put_content_type, request(content_type="a\tb"))
        self.assertEqual((refused.status, refused.reason), (400, "invalid Content-Type"))

    def test_require_length(self) -> None:
        """A chunked body (no length) is 411; a length passes through."""
        self.assertEqual(require_length(0), 0)
        self.assertEqual(require_length(5), 5)
        self.assertEqual(self.assertRaises(UploadFailed, require_length, None).status, 411)

    def test_put_extent(self) -> None:
        """Without Content-Range the body is the whole file; with one, the range says where."""
        self.assertEqual(put_extent(request(), 10), (0, 10, False))
        ranged = request(content_range="bytes 4-9/10")
        self.assertEqual(put_extent(ranged, 6), (4, 10, True))

    def test_put_extent_refusals(self) -> None:
        """A malformed range, or one that does not match Content-Length, is 400."""
        mismatch = self.assertRaises(UploadFailed, put_extent, request(content_range="bytes 4-9/10"), 5)
        self.assertEqual(
            (mismatch.status, mismatch.reason), (400, "Content-Length does not match Content-Range")
        )
        for value in ("bytes */10", "bytes 9-4/10", "bytes 0-10/10", "items 0-1/2"):
            error = self.assertRaises(UploadFailed, put_extent, request(content_range=value), 2)
            self.assertEqual(error.status, 400, value)


class AdmissionTests(SynchronousTestCase):
    """The checks that need the secret or the store."""

    def setUp(self) -> None:
        self.store = StubStore()
        self.failures: list[str] = []
        self.admission = self.make()

    def make(self, **limits: Any) -> Admission:
        return Admission(
            limits=UploadLimits(prefix="upload", **limits),
            store=self.store,  # type: ignore[arg-type]
            authenticator=Authenticator(lambda: [SECRET], Clock()),
            on_auth_failure=lambda _request, reason: self.failures.append(reason),
        )

    def test_authorize(self) -> None:
        """The MAC must sign this path and size; a failure is 403 and reported once."""
        self.admission.authorize(request(size=10), slot(), 10, None)
        self.assertEqual(self.failures, [])
        refused = self.assertRaises(UploadFailed, self.admission.authorize, request(size=10), slot(), 11, None)
        self.assertEqual(refused.status, 403)
        self.assertEqual(self.failures, [refused.reason])
        unsigned = BareRequest(f"/upload/{UUID}/a.bin".encode(), {})
        self.assertEqual(
            self.assertRaises(UploadFailed, self.admission.authorize, unsigned, slot(), 10, None).status,
            403,
        )
        self.assertEqual(len(self.failures), 2)

    def test_check_size(self) -> None:
        """MaxUploadSize bounds the announced size; 0 means no bound."""
        self.admission.check_size(10**12)
        bounded = self.make(max_upload_size=100)
        bounded.check_size(100)
        refused = self.assertRaises(UploadFailed, bounded.check_size, 101)
        self.assertEqual((refused.status, refused.reason), (413, "file too large (maximum 100 bytes)"))

    def test_announced_sha256_only_when_verifying(self) -> None:
        """Without ChecksumVerification the header is ignored, malformed or not."""
        digest = hashlib.sha256(b"x").digest()
        self.assertIsNone(self.admission.announced_sha256(request(x_checksum=digest.hex())))
        self.assertIsNone(self.admission.announced_sha256(request(x_checksum="nonsense")))
        verifying = self.make(checksum_verification=True)
        self.assertEqual(verifying.announced_sha256(request(x_checksum=digest.hex())), digest)
        refused = self.assertRaises(UploadFailed, verifying.announced_sha256, request(x_checksum="zz"))
        self.assertEqual(refused.status, 400)

    def test_check_absent(self) -> None:
        """A stored file is 409, with the headers the caller asks for."""
        self.successResultOf(self.admission.check_absent(slot()))
        self.store.stored.add(slot().segments)
        refused = self.failureResultOf(
            self.admission.check_absent(slot(), ((b"Upload-Offset", b"10"),)), UploadFailed
        ).value
        self.assertEqual((refused.status, refused.headers), (409, ((b"Upload-Offset", b"10"),)))

    def test_check_tombstone(self) -> None:
        """A path retention deleted is 403 with the retention reason."""
        self.successResultOf(self.admission.check_tombstone(slot()))
        self.store.tombstones.add(slot().segments)
        refused = self.failureResultOf(self.admission.check_tombstone(slot()), UploadFailed).value
        self.assertEqual((refused.status, refused.reason), (403, TOMBSTONED))

    def test_record_binds_this_url(self) -> None:
        """A new upload's record names the path, the signed type and the MAC's fingerprint."""
        given = request(size=10)
        record = self.admission.record(slot(), given, 10, None, token=TOKEN)
        self.assertEqual(record.path, f"{UUID}/a.bin")
        self.assertEqual(record.content_type, "application/octet-stream")
        self.assertIsNone(record.signed_type)
        self.assertEqual(record.mac, mac_fingerprint(given.args))
        self.assertEqual(record.token, TOKEN)
        typed = self.admission.record(slot(), given, 10, b"image/png")
        self.assertEqual((typed.content_type, typed.signed_type), ("image/png", "image/png"))

    def test_resumable(self) -> None:
        """The upload in progress is (bytes on disk, record); a partial without a record is none."""
        self.assertIsNone(self.successResultOf(self.admission.resumable(slot())))
        record = self.admission.record(slot(), request(), 10, None)
        self.store.partials[slot().segments] = (4, record.to_dict())
        self.assertEqual(self.successResultOf(self.admission.resumable(slot())), (4, record))
        self.store.partials[slot().segments] = (4, {})
        self.assertIsNone(self.successResultOf(self.admission.resumable(slot())))

    def test_binds_and_check_session(self) -> None:
        """Another URL, another MAC or a missing session token may not touch the upload (404)."""
        mine = request(x_session_token=TOKEN)
        record = self.admission.record(slot(), mine, 10, None, token=TOKEN)
        self.assertTrue(Admission.binds(record, mine, slot(), session=True))
        self.admission.check_session(record, mine, slot())
        no_token = request()
        self.assertFalse(Admission.binds(record, no_token, slot(), session=True))
        self.assertTrue(Admission.binds(record, no_token, slot(), session=False))
        other_mac = request(size=11, x_session_token=TOKEN)
        self.assertFalse(Admission.binds(record, other_mac, slot(), session=False))
        other_path = request("b.bin", x_session_token=TOKEN)
        self.assertFalse(Admission.binds(record, other_path, slot("b.bin"), session=True))
        refused = self.assertRaises(UploadFailed, self.admission.check_session, record, no_token, slot())
        self.assertEqual(
            (refused.status, refused.reason, refused.headers),
            (404, "no upload in progress for this session", ((b"Upload-Offset", b"0"),)),
        )

    def test_records_round_trip(self) -> None:
        """What ``record`` makes is what ``resumable`` reads back from the store."""
        record = self.admission.record(slot(), request(), 10, b"text/plain", sha256="ab" * 32)
        self.assertEqual(UploadRecord.from_dict(record.to_dict()), record)
