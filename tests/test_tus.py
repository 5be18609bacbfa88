"""
tus 1.0.0 on the signed upload URLs (hmacfs.upload.tus and the tus paths of
hmacfs.upload.protocols), through the real Site on StringTransports: OPTIONS, creation
(with and without upload), HEAD, PATCH, checksums, termination, expiration,
CORS; and the header parsers.
"""

from __future__ import annotations

import base64
import hashlib
import os
from pathlib import Path
from typing import Any

from twisted.internet.error import ConnectionLost
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.http import stringToDatetime

from hmacfs.errors import Refusal
from hmacfs.signing.auth import mac_for
from hmacfs.storage.filesystem import path_key
from hmacfs.testing import (
    SECRET,
    ManualRunner,
    SiteHarness,
    header_value,
    make_config,
    status_of,
    stored_metadata,
    v1_mac,
)
from hmacfs.upload import tus

UUID = "1f2e3d4c-5b6a-4978-8695-a4b3c2d1e0f9"
TUS = "Tus-Resumable: 1.0.0"
OCTETS = "Content-Type: application/offset+octet-stream"


class TusMixin:
    body = os.urandom(200_000)

    def setUp(self) -> None:
        self.store_dir = Path(self.mktemp()).resolve()  # type: ignore[attr-defined]
        self.store_dir.mkdir()
        self.harness = SiteHarness(make_config(self.store_dir, **self.overrides()), ManualRunner(auto=True))
        self.port = 41000
        self.finished: list[Any] = []
        # The finished requests, recorded in place of the access log.
        self.harness.site.log = self.finished.append  # type: ignore[method-assign,assignment]

    def overrides(self) -> dict:
        return {"enable_get_retries": False, "max_upload_size": 10_000_000}

    def url(self, name: str, size: int | None = None) -> str:
        path = f"{UUID}/{name}"
        return f"/upload/{path}?v={v1_mac(path, len(self.body) if size is None else size)}"

    def send(self, method: str, target: str, *headers: str, body: bytes = b"") -> bytes:
        lines = [f"{method} {target} HTTP/1.1", "Host: localhost", *headers]
        if body or method in ("POST", "PATCH"):
            lines.append(f"Content-Length: {len(body)}")
        self.port += 1
        protocol, transport = self.harness.connect(self.port)
        protocol.dataReceived(("\r\n".join(lines) + "\r\n\r\n").encode() + body)
        self.last_protocol = protocol
        return transport.value()

    def create(self, name: str, *extra: str, size: int | None = None) -> bytes:
        length = len(self.body) if size is None else size
        return self.send("POST", self.url(name, length), TUS, f"Upload-Length: {length}", *extra)

    def patch(self, name: str, offset: int, chunk: bytes, *extra: str) -> bytes:
        return self.send(
            "PATCH", self.url(name), TUS, OCTETS, f"Upload-Offset: {offset}", *extra, body=chunk
        )

    def head(self, name: str) -> bytes:
        return self.send("HEAD", self.url(name), TUS)

    def target(self, name: str) -> Path:
        return self.store_dir / UUID / name


class OptionsTests(TusMixin, SynchronousTestCase):
    def test_options_advertises_tus(self) -> None:
        """OPTIONS lists the version, the extensions, the maximum size and the checksum algorithms."""
        answer = self.send("OPTIONS", f"/upload/{UUID}/any")
        self.assertEqual(status_of(answer), 204)
        self.assertEqual(header_value(answer, b"Tus-Version"), b"1.0.0")
        extension_header = header_value(answer, b"Tus-Extension")
        assert extension_header is not None
        extensions = extension_header.split(b",")
        for name in (b"creation", b"creation-with-upload", b"termination", b"expiration", b"checksum"):
            self.assertIn(name, extensions)
        self.assertEqual(header_value(answer, b"Tus-Max-Size"), b"10000000")
        algorithms = header_value(answer, b"Tus-Checksum-Algorithm")
        assert algorithms is not None
        self.assertIn(b"sha1", algorithms.split(b","))

    def test_cors_lists_tus_headers(self) -> None:
        """tus-js-client on another origin may send and read the tus headers."""
        answer = self.send("OPTIONS", f"/upload/{UUID}/any")
        allow = header_value(answer, b"Access-Control-Allow-Headers")
        for name in (b"Tus-Resumable", b"Upload-Length", b"Upload-Offset", b"Upload-Metadata", b"Upload-Checksum"):
            self.assertIn(name, allow)
        expose = header_value(answer, b"Access-Control-Expose-Headers")
        for name in (b"Upload-Offset", b"Upload-Length", b"Upload-Expires", b"Location", b"Tus-Resumable"):
            self.assertIn(name, expose)
        methods = header_value(answer, b"Access-Control-Allow-Methods")
        for name in (b"POST", b"PATCH", b"DELETE", b"HEAD"):
            self.assertIn(name, methods)


class CreationTests(TusMixin, SynchronousTestCase):
    def test_create_then_patch_to_completion(self) -> None:
        """POST creates (201, Location = the signed URL), PATCHes append (204), the last one stores."""
        answer = self.create("a.bin")
        self.assertEqual(status_of(answer), 201)
        self.assertEqual(header_value(answer, b"Location"), self.url("a.bin").encode())
        self.assertEqual(header_value(answer, b"Tus-Resumable"), b"1.0.0")
        self.assertIsNotNone(stringToDatetime(header_value(answer, b"Upload-Expires")))
        offset = 0
        for size in (70_000, 70_000, 60_000):
            answer = self.patch("a.bin", offset, self.body[offset : offset + size])
            self.assertEqual(status_of(answer), 204, answer)
            offset += size
            self.assertEqual(header_value(answer, b"Upload-Offset"), str(offset).encode())
        self.assertEqual(self.target("a.bin").read_bytes(), self.body)
        self.assertEqual([r.upload_state.stored for r in self.finished[1:]], [False, False, True])
        self.assertEqual([r.upload_state.resumed for r in self.finished], [False] * 4)
        self.assertEqual(os.listdir(self.store_dir / ".hmacfs" / "partial"), [])

    def test_head_reports_offset(self) -> None:
        """HEAD gives Upload-Offset, Upload-Length, no-store and the metadata; after completion the full length."""
        metadata = "filename " + base64.b64encode(b"photo.jpg").decode()
        self.create("h.bin", f"Upload-Metadata: {metadata}")
        self.patch("h.bin", 0, self.body[:12_345])
        answer = self.head("h.bin")
        self.assertEqual(status_of(answer), 200)
        self.assertEqual(header_value(answer, b"Upload-Offset"), b"12345")
        self.assertEqual(header_value(answer, b"Upload-Length"), str(len(self.body)).encode())
        self.assertEqual(header_value(answer, b"Cache-Control"), b"no-store")
        self.assertEqual(header_value(answer, b"Upload-Metadata"), metadata.encode())
        self.assertIsNotNone(header_value(answer, b"Upload-Expires"))
        self.patch("h.bin", 12_345, self.body[12_345:])
        answer = self.head("h.bin")
        self.assertEqual(header_value(answer, b"Upload-Offset"), str(len(self.body)).encode())

    def test_creation_with_upload(self) -> None:
        """A POST carrying the first bytes answers 201 with the new Upload-Offset."""
        answer = self.send(
            "POST", self.url("w.bin"), TUS, f"Upload-Length: {len(self.body)}", OCTETS,
            body=self.body[:50_000],
        )
        self.assertEqual(status_of(answer), 201)
        self.assertEqual(header_value(answer, b"Upload-Offset"), b"50000")
        self.patch("w.bin", 50_000, self.body[50_000:])
        self.assertEqual(self.target("w.bin").read_bytes(), self.body)

    def test_creation_with_whole_file(self) -> None:
        """A POST carrying every byte stores the file at once (and counts as stored)."""
        answer = self.send(
            "POST", self.url("x.bin"), TUS, f"Upload-Length: {len(self.body)}", OCTETS, body=self.body
        )
        self.assertEqual(status_of(answer), 201)
        self.assertEqual(header_value(answer, b"Upload-Offset"), str(len(self.body)).encode())
        self.assertEqual(self.target("x.bin").read_bytes(), self.body)

    def test_empty_file(self) -> None:
        """Upload-Length: 0 stores an empty file at creation."""
        answer = self.create("e.bin", size=0)
        self.assertEqual(status_of(answer), 201)
        self.assertEqual(self.target("e.bin").read_bytes(), b"")

    def test_length_must_match_signature(self) -> None:
        """Upload-Length is the size the MAC signs: another length is 403."""
        answer = self.send("POST", self.url("l.bin"), TUS, f"Upload-Length: {len(self.body) + 1}")
        self.assertEqual(status_of(answer), 403)

    def test_over_max_size_413(self) -> None:
        """An Upload-Length over MaxUploadSize is 413."""
        self.assertEqual(status_of(self.create("big.bin", size=10_000_001)), 413)

    def test_defer_length_refused(self) -> None:
        """Deferred lengths are not offered (the size is signed): 400."""
        answer = self.send("POST", self.url("d.bin"), TUS, "Upload-Defer-Length: 1")
        self.assertEqual(status_of(answer), 400)

    def test_version_and_plain_post(self) -> None:
        """Another tus version is 412 with Tus-Version; a POST without tus is 405."""
        answer = self.send("POST", self.url("v.bin"), "Tus-Resumable: 0.2.2", f"Upload-Length: {len(self.body)}")
        self.assertEqual(status_of(answer), 412)
        self.assertEqual(header_value(answer, b"Tus-Version"), b"1.0.0")
        answer = self.send("POST", self.url("v.bin"), f"Upload-Length: {len(self.body)}", body=b"x")
        self.assertEqual(status_of(answer), 405)

    def test_v2_content_type_from_metadata(self) -> None:
        """For a v2 URL, the signed Content-Type comes from the filetype metadata, and is served."""
        path = f"{UUID}/typed.png"
        mac = mac_for("v2", SECRET, signed_path=path.encode(), size=len(self.body), content_type=b"image/png")
        url = f"/upload/{path}?v2={mac}"
        good = "filetype " + base64.b64encode(b"image/png").decode()
        bad = "filetype " + base64.b64encode(b"text/html").decode()
        self.assertEqual(
            status_of(self.send("POST", url, TUS, f"Upload-Length: {len(self.body)}", f"Upload-Metadata: {bad}")),
            403,
        )
        self.assertEqual(
            status_of(self.send("POST", url, TUS, f"Upload-Length: {len(self.body)}", f"Upload-Metadata: {good}")),
            201,
        )
        answer = self.send("PATCH", url, TUS, OCTETS, "Upload-Offset: 0", body=self.body)
        self.assertEqual(status_of(answer), 204)
        self.assertEqual(stored_metadata(self.store_dir, (UUID, "typed.png"))["content_type"], "image/png")


class PatchTests(TusMixin, SynchronousTestCase):
    def setUp(self) -> None:
        super().setUp()
        self.create("p.bin")
        self.patch("p.bin", 0, self.body[:1000])

    def test_wrong_offset_409(self) -> None:
        """A PATCH at another offset is 409 before its body, and changes nothing."""
        answer = self.patch("p.bin", 999, self.body[999:2000])
        self.assertEqual(status_of(answer), 409)
        self.assertEqual(header_value(answer, b"Upload-Offset"), b"1000")
        self.assertEqual(header_value(self.head("p.bin"), b"Upload-Offset"), b"1000")

    def test_wrong_content_type_415(self) -> None:
        """A PATCH body must be application/offset+octet-stream."""
        answer = self.send(
            "PATCH", self.url("p.bin"), TUS, "Content-Type: application/octet-stream",
            "Upload-Offset: 1000", body=b"x",
        )
        self.assertEqual(status_of(answer), 415)

    def test_checksum_mismatch_460_discards_chunk(self) -> None:
        """A chunk whose Upload-Checksum does not match is 460 and discarded; the right one is kept."""
        chunk = self.body[1000:5000]
        wrong = base64.b64encode(hashlib.sha1(b"not it").digest()).decode()
        answer = self.patch("p.bin", 1000, chunk, f"Upload-Checksum: sha1 {wrong}")
        self.assertEqual(status_of(answer), 460)
        self.assertEqual(header_value(answer, b"Upload-Offset"), b"1000")
        self.assertEqual(header_value(self.head("p.bin"), b"Upload-Offset"), b"1000")
        right = base64.b64encode(hashlib.sha1(chunk).digest()).decode()
        answer = self.patch("p.bin", 1000, chunk, f"Upload-Checksum: sha1 {right}")
        self.assertEqual(status_of(answer), 204)
        self.assertEqual(header_value(answer, b"Upload-Offset"), b"5000")

    def test_unknown_checksum_algorithm_400(self) -> None:
        """An algorithm we do not offer is 400."""
        answer = self.patch("p.bin", 1000, b"abc", "Upload-Checksum: crc99 AAAA")
        self.assertEqual(status_of(answer), 400)

    def test_beyond_length_400(self) -> None:
        """A chunk reaching past Upload-Length is refused before its body."""
        answer = self.patch("p.bin", 1000, self.body[1000:] + b"extra")
        self.assertEqual(status_of(answer), 400)

    def test_patch_with_bad_mac_403(self) -> None:
        """PATCH is authenticated by the same MAC (signing the upload's size)."""
        answer = self.send(
            "PATCH", self.url("p.bin", size=5), TUS, OCTETS, "Upload-Offset: 1000", body=b"abc"
        )
        self.assertEqual(status_of(answer), 403)

    def test_interrupted_patch_keeps_bytes(self) -> None:
        """A PATCH cut mid-body keeps what arrived; HEAD tells the new offset; a later PATCH is a resume."""
        lines = [f"PATCH {self.url('p.bin')} HTTP/1.1", TUS, OCTETS, "Upload-Offset: 1000", "Content-Length: 50000"]
        protocol, _t = self.harness.connect(42000)
        protocol.dataReceived(("\r\n".join(lines) + "\r\n\r\n").encode() + self.body[1000:21000])
        protocol.connectionLost(Failure(ConnectionLost()))
        self.assertEqual(header_value(self.head("p.bin"), b"Upload-Offset"), b"21000")
        answer = self.patch("p.bin", 21000, self.body[21000:])
        self.assertEqual(status_of(answer), 204)
        self.assertTrue(self.finished[-1].upload_state.resumed)
        self.assertEqual(self.target("p.bin").read_bytes(), self.body)

    def test_unknown_upload_404(self) -> None:
        """HEAD and PATCH on a URL with no upload are 404."""
        self.assertEqual(status_of(self.head("none.bin")), 404)
        self.assertEqual(status_of(self.patch("none.bin", 0, b"abc")), 404)

    def test_termination(self) -> None:
        """DELETE removes the upload (204); afterwards it is 404 and no partial remains."""
        answer = self.send("DELETE", self.url("p.bin"), TUS)
        self.assertEqual(status_of(answer), 204)
        self.assertEqual(status_of(self.head("p.bin")), 404)
        self.assertEqual(os.listdir(self.store_dir / ".hmacfs" / "partial"), [])
        self.assertEqual(status_of(self.send("DELETE", self.url("p.bin"), TUS)), 404)

    def test_method_override(self) -> None:
        """POST with X-HTTP-Method-Override: PATCH appends, DELETE terminates."""
        answer = self.send(
            "POST", self.url("p.bin"), TUS, OCTETS, "Upload-Offset: 1000",
            "X-HTTP-Method-Override: PATCH", body=self.body[1000:3000],
        )
        self.assertEqual(status_of(answer), 204)
        self.assertEqual(header_value(answer, b"Upload-Offset"), b"3000")
        answer = self.send("POST", self.url("p.bin"), TUS, "X-HTTP-Method-Override: DELETE")
        self.assertEqual(status_of(answer), 204)
        self.assertEqual(status_of(self.head("p.bin")), 404)

    def test_plain_delete_405(self) -> None:
        """DELETE without Tus-Resumable stays 405, with the non-tus Allow list."""
        answer = self.send("DELETE", self.url("p.bin"))
        self.assertEqual(status_of(answer), 405)
        self.assertEqual(header_value(answer, b"Allow"), b"GET, HEAD, PUT, OPTIONS")


TOKEN = "X-Session-Token: bound-session-0001"
WRONG = "X-Session-Token: someone-else-0002"


class SessionBindingTests(TusMixin, SynchronousTestCase):
    """
    An upload started with X-Session-Token is bound to that token over tus too:
    without it, or with another one, HEAD, PATCH and DELETE get the same 404 as
    the session-token HEAD, and nothing is read, written, taken over or removed.
    """

    CUT = 40_000

    def setUp(self) -> None:
        super().setUp()
        self.part = self.store_dir / ".hmacfs" / "partial" / f"{path_key((UUID, 'b.bin'))}.part"
        self.live: Any = None

    def start_put(self, *, cut: bool = True) -> None:
        """A PUT of ``self.body`` with the token; its client disappears after CUT bytes (or stays)."""
        lines = [f"PUT {self.url('b.bin')} HTTP/1.1", f"Content-Length: {len(self.body)}", TOKEN]
        protocol, transport = self.harness.connect(43000)
        protocol.dataReceived(("\r\n".join(lines) + "\r\n\r\n").encode() + self.body[: self.CUT])
        self.live, self.live_protocol = transport, protocol
        if cut:
            protocol.connectionLost(Failure(ConnectionLost()))
        self.assertEqual(self.part.read_bytes(), self.body[: self.CUT])

    def assert_refused(self, answer: bytes) -> None:
        self.assertEqual(status_of(answer), 404, answer)
        self.assertEqual(self.finished[-1].upload_state.reason, "no upload in progress for this session")
        self.assertEqual(header_value(answer, b"Upload-Offset"), b"0")
        self.assertEqual(self.part.read_bytes(), self.body[: self.CUT])

    def test_head(self) -> None:
        """HEAD tells the offset only with the token."""
        self.start_put()
        for extra in ((), (WRONG,)):
            self.assert_refused(self.send("HEAD", self.url("b.bin"), TUS, *extra))
        answer = self.send("HEAD", self.url("b.bin"), TUS, TOKEN)
        self.assertEqual(status_of(answer), 200)
        self.assertEqual(header_value(answer, b"Upload-Offset"), str(self.CUT).encode())

    def test_patch(self) -> None:
        """PATCH appends only with the token (and then finishes the upload)."""
        self.start_put()
        rest = self.body[self.CUT :]
        for extra in ((), (WRONG,)):
            self.assert_refused(self.patch("b.bin", self.CUT, rest, *extra))
            self.assert_refused(
                self.send(
                    "POST", self.url("b.bin"), TUS, OCTETS, f"Upload-Offset: {self.CUT}",
                    "X-HTTP-Method-Override: PATCH", *extra, body=rest,
                )
            )
        self.assertFalse(self.target("b.bin").exists())
        answer = self.patch("b.bin", self.CUT, rest, TOKEN)
        self.assertEqual(status_of(answer), 204, answer)
        self.assertEqual(self.target("b.bin").read_bytes(), self.body)

    def test_patch_cannot_take_over(self) -> None:
        """A PATCH without the token does not cut off the live writer; with it, it takes over."""
        self.start_put(cut=False)
        for extra in ((), (WRONG,)):
            self.assert_refused(self.patch("b.bin", self.CUT, self.body[self.CUT :], *extra))
            self.assertFalse(self.live.disconnecting)
        self.assertEqual(self.harness.server.resumable.uploads.takeovers, 0)
        answer = self.patch("b.bin", self.CUT, self.body[self.CUT :], TOKEN)
        self.assertEqual(status_of(answer), 204, answer)
        self.assertTrue(self.live.disconnecting)
        self.assertEqual(self.target("b.bin").read_bytes(), self.body)

    def test_delete(self) -> None:
        """DELETE removes the upload only with the token."""
        self.start_put()
        for extra in ((), (WRONG,)):
            self.assert_refused(self.send("DELETE", self.url("b.bin"), TUS, *extra))
            self.assert_refused(
                self.send("POST", self.url("b.bin"), TUS, "X-HTTP-Method-Override: DELETE", *extra)
            )
        self.assertEqual(status_of(self.send("DELETE", self.url("b.bin"), TUS, TOKEN)), 204)
        self.assertFalse(self.part.exists())

    def test_creation_starts_over_like_a_plain_put(self) -> None:
        """
        A tus POST on the URL is a fresh start, as a plain PUT is: it never continues the
        bound upload (the old bytes are dropped, the old token no longer finds anything),
        and while the old writer is alive it gets 409, never a takeover.
        """
        self.start_put(cut=False)
        self.assertEqual(status_of(self.create("b.bin")), 409)
        self.assertFalse(self.live.disconnecting)
        self.live_protocol.connectionLost(Failure(ConnectionLost()))
        self.assertEqual(self.part.read_bytes(), self.body[: self.CUT])
        self.assertEqual(status_of(self.create("b.bin")), 201)
        self.assertEqual(self.part.read_bytes(), b"")
        self.assertEqual(header_value(self.head("b.bin"), b"Upload-Offset"), b"0")
        token_head = self.send("HEAD", self.url("b.bin"), TOKEN)
        self.assertEqual(status_of(token_head), 200)  # an upload by nobody's session: offset 0
        self.assertEqual(header_value(token_head, b"Upload-Offset"), b"0")

    def test_unbound_tus_upload_unchanged(self) -> None:
        """A tus upload created without a token takes any later request, token or not."""
        self.create("u.bin")
        self.assertEqual(status_of(self.patch("u.bin", 0, self.body[:1000])), 204)
        self.assertEqual(status_of(self.patch("u.bin", 1000, self.body[1000:2000], WRONG)), 204)
        self.assertEqual(header_value(self.send("HEAD", self.url("u.bin"), TUS, TOKEN), b"Upload-Offset"), b"2000")
        self.assertEqual(status_of(self.send("DELETE", self.url("u.bin"), TUS)), 204)


class ParserTests(SynchronousTestCase):
    def request(self, **headers: str) -> Any:
        from twisted.web.test.requesthelper import DummyRequest

        request = DummyRequest([b""])
        for name, value in headers.items():
            request.requestHeaders.setRawHeaders(name.replace("_", "-").encode(), [value.encode()])
        return request

    def test_metadata(self) -> None:
        """Upload-Metadata pairs decode; a key may have no value; malformed lists are 400."""
        value = b"filename " + base64.b64encode(b"a b.jpg") + b", is_confidential, filetype " + base64.b64encode(b"image/jpeg")
        parsed = tus.parse_metadata(value)
        self.assertEqual(parsed, {"filename": b"a b.jpg", "is_confidential": b"", "filetype": b"image/jpeg"})
        self.assertEqual(tus.metadata_type(parsed), b"image/jpeg")
        for bad in (b"name !!!", b"a b c", b"dup YQ==,dup YQ=="):
            self.assertRaises(Refusal, tus.parse_metadata, bad)

    def test_checksum_header(self) -> None:
        """Upload-Checksum parses into (algorithm, digest) and checks the digest length."""
        digest = hashlib.sha256(b"x").digest()
        parsed = tus.chunk_checksum(self.request(upload_checksum="sha256 " + base64.b64encode(digest).decode()))
        self.assertEqual(parsed, ("sha256", digest))
        error = self.assertRaises(
            Refusal, tus.chunk_checksum, self.request(upload_checksum="sha1 " + base64.b64encode(digest).decode())
        )
        self.assertEqual(error.status, 400)

    def test_numbers(self) -> None:
        """Upload-Length and Upload-Offset are plain non-negative integers."""
        self.assertEqual(tus.upload_length(self.request(upload_length="42")), 42)
        for bad in ("-1", "4.2", "0x10", ""):
            self.assertRaises(Refusal, tus.upload_offset, self.request(upload_offset=bad))
