"""
Resumable uploads with X-Session-Token (hmacfs.upload.resume and the resume paths of
hmacfs.upload.protocols), driven through the real Site on StringTransports: interrupt,
ask the offset with HEAD, resume with Content-Range; the bindings that keep a
token or a URL out of someone else's upload; one writer at a time; checksums
across resumes; deferred admission; progress checkpoints; the sweep.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
from pathlib import Path
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.defer import Deferred, succeed
from twisted.internet.error import ConnectionLost
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from hmacfs.state.store import EmbeddedState
from hmacfs.storage.filesystem import Store, path_key
from hmacfs.storage.fs_backend import FilesystemBackend
from hmacfs.testing import (
    ManualRunner,
    SiteHarness,
    header_value,
    make_config,
    status_of,
    stored_metadata,
    v1_mac,
)
from hmacfs.upload.resume import (
    PartialSweeper,
    UploadRecord,
    mac_fingerprint,
    parse_content_range,
)

UUID = "9b2e4f0a-1c3d-4e5f-8a7b-6c5d4e3f2a10"
TOKEN = "session-token-0001"


def head(method: str, path: str, size: int, extra: tuple[str, ...] = (), mac_size: int | None = None) -> bytes:
    """Request line and headers for ``path`` signed (v1) for ``mac_size`` (default ``size``)."""
    mac = v1_mac(path, size if mac_size is None else mac_size)
    lines = [f"{method} /upload/{path}?v={mac} HTTP/1.1", "Host: localhost", *extra]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


class ResumeMixin:
    body = os.urandom(300_000)

    def setUp(self) -> None:
        self.store_dir = Path(self.mktemp()).resolve()  # type: ignore[attr-defined]
        self.store_dir.mkdir()
        self.runner = ManualRunner(auto=True)
        self.harness = SiteHarness(make_config(self.store_dir, **self.overrides()), self.runner)
        self.uploads = self.harness.server.resumable.uploads

    def overrides(self) -> dict:
        return {"enable_get_retries": False}

    @property
    def partial_dir(self) -> Path:
        return self.store_dir / ".hmacfs" / "partial"

    def partial_files(self) -> list[str]:
        return sorted(os.listdir(self.partial_dir))

    def start(self, name: str, cut: int, *, token: str | None = TOKEN, extra: tuple[str, ...] = ()) -> None:
        """A PUT of ``self.body`` whose client disappears after ``cut`` bytes."""
        headers = [f"Content-Length: {len(self.body)}", *extra]
        if token:
            headers.append(f"X-Session-Token: {token}")
        protocol, _transport = self.harness.connect()
        protocol.dataReceived(head("PUT", f"{UUID}/{name}", len(self.body), tuple(headers)))
        protocol.dataReceived(self.body[:cut])
        protocol.connectionLost(Failure(ConnectionLost()))

    def offset(self, name: str, token: str = TOKEN) -> bytes:
        _protocol, transport = self.send(
            head("HEAD", f"{UUID}/{name}", len(self.body), (f"X-Session-Token: {token}",))
        )
        return transport.value()

    def upload_offset(self, name: str) -> int:
        """The Upload-Offset a HEAD reports for ``name``."""
        value = header_value(self.offset(name), b"Upload-Offset")
        assert value is not None, "no Upload-Offset"
        return int(value)

    def resume(
        self, name: str, first: int, *, token: str | None = TOKEN, extra: tuple[str, ...] = (),
        body: bytes | None = None, total: int | None = None,
    ) -> tuple[Any, Any]:
        data = self.body if body is None else body
        total = len(data) if total is None else total
        rest = data[first:]
        headers = [
            f"Content-Length: {len(rest)}",
            f"Content-Range: bytes {first}-{total - 1}/{total}",
            *extra,
        ]
        if token:
            headers.append(f"X-Session-Token: {token}")
        protocol, transport = self.harness.connect(40001)
        protocol.dataReceived(head("PUT", f"{UUID}/{name}", total, tuple(headers)))
        return protocol, transport

    def send(self, raw: bytes, port: int = 40002) -> tuple[Any, Any]:
        protocol, transport = self.harness.connect(port)
        protocol.dataReceived(raw)
        return protocol, transport


class TokenResumeTests(ResumeMixin, SynchronousTestCase):
    def test_interrupt_head_resume(self) -> None:
        """
        The documented protocol: interrupted PUT, HEAD gives Upload-Offset/Range/Upload-Length,
        a PUT with Content-Range from that offset stores the byte-identical file and leaves no
        partial; the request is marked as a resume for metrics.
        """
        self.start("a.bin", 123_457)
        answer = self.offset("a.bin")
        self.assertEqual(status_of(answer), 200)
        self.assertEqual(header_value(answer, b"Upload-Offset"), b"123457")
        self.assertEqual(header_value(answer, b"Range"), b"bytes=0-123456")
        self.assertEqual(header_value(answer, b"Upload-Length"), str(len(self.body)).encode())
        self.assertEqual(header_value(answer, b"Cache-Control"), b"no-store")
        protocol, transport = self.resume("a.bin", 123_457, extra=("Expect: 100-continue",))
        self.assertEqual(transport.value(), b"HTTP/1.1 100 Continue\r\n\r\n")
        request = protocol.requests[-1]
        protocol.dataReceived(self.body[123_457:])
        self.assertEqual(status_of(transport.value()), 201)
        self.assertTrue(request.upload_state.resumed)
        self.assertEqual((self.store_dir / UUID / "a.bin").read_bytes(), self.body)
        self.assertEqual(self.partial_files(), [])

    def test_many_interruptions(self) -> None:
        """An upload cut five times and resumed each time from HEAD's offset ends byte-identical."""
        self.start("m.bin", 1000)
        for cut in (5_000, 70_000, 70_001, 200_000):
            offset = self.upload_offset("m.bin")
            protocol, _t = self.resume("m.bin", offset)
            protocol.dataReceived(self.body[offset:cut])
            protocol.connectionLost(Failure(ConnectionLost()))
        offset = self.upload_offset("m.bin")
        self.assertEqual(offset, 200_000)
        protocol, transport = self.resume("m.bin", offset)
        protocol.dataReceived(self.body[offset:])
        self.assertEqual(status_of(transport.value()), 201)
        self.assertEqual((self.store_dir / UUID / "m.bin").read_bytes(), self.body)

    def test_wrong_offset_409_before_body(self) -> None:
        """A resume at another offset gets 409 with the right Upload-Offset, before any body byte."""
        self.start("w.bin", 50_000)
        for wrong in (10_000, 60_000):
            _p, transport = self.resume("w.bin", wrong, extra=("Expect: 100-continue",))
            answer = transport.value()
            self.assertNotIn(b"100 Continue", answer)
            self.assertEqual(status_of(answer), 409)
            self.assertEqual(header_value(answer, b"Upload-Offset"), b"50000")
            self.assertIn(b"Connection: close", answer)
        self.assertEqual(self.upload_offset("w.bin"), 50_000)

    def test_other_token_cannot_resume(self) -> None:
        """Another session's token neither sees the offset nor writes into the upload."""
        self.start("t.bin", 40_000)
        answer = self.offset("t.bin", token="someone-else-42")
        self.assertEqual(status_of(answer), 404)
        _p, transport = self.resume("t.bin", 40_000, token="someone-else-42")
        self.assertEqual(status_of(transport.value()), 409)
        self.assertEqual(header_value(transport.value(), b"Upload-Offset"), b"0")
        part = self.partial_dir / f"{path_key((UUID, 't.bin'))}.part"
        self.assertEqual(part.read_bytes(), self.body[:40_000])

    def test_token_on_another_path_writes_nothing(self) -> None:
        """A session token reused with another path's signed URL cannot reach the first upload."""
        self.start("first.bin", 40_000)
        _p, transport = self.resume("second.bin", 40_000)
        self.assertEqual(status_of(transport.value()), 409)
        self.assertEqual(header_value(transport.value(), b"Upload-Offset"), b"0")
        self.assertEqual(
            (self.partial_dir / f"{path_key((UUID, 'first.bin'))}.part").read_bytes(),
            self.body[:40_000],
        )
        self.assertFalse((self.partial_dir / f"{path_key((UUID, 'second.bin'))}.part").exists())

    def test_mac_binds_total_size(self) -> None:
        """The MAC still signs the total size S: a resume claiming another total gets 403."""
        self.start("s.bin", 40_000)
        rest = self.body[40_000:]
        headers = (
            f"Content-Length: {len(rest) + 1}",
            f"Content-Range: bytes 40000-{len(self.body)}/{len(self.body) + 1}",
            f"X-Session-Token: {TOKEN}",
        )
        _p, transport = self.send(
            head("PUT", f"{UUID}/s.bin", len(self.body) + 1, headers, mac_size=len(self.body))
        )
        self.assertEqual(status_of(transport.value()), 403)

    def test_malformed_content_range_400(self) -> None:
        """A Content-Range that is not bytes first-last/total, or disagrees with the length, is 400."""
        for value, length in (("bytes */300000", 1), ("bytes 5-4/300000", 1), ("bytes 0-9/300000", 11)):
            extra = (f"Content-Length: {length}", f"Content-Range: {value}")
            _p, transport = self.send(head("PUT", f"{UUID}/r.bin", len(self.body), extra))
            self.assertEqual(status_of(transport.value()), 400, value)

    def test_resume_after_completion_409(self) -> None:
        """Once stored, a resume is 409 'file already exists' with Upload-Offset = size; HEAD says done."""
        self.start("done.bin", 1000)
        protocol, transport = self.resume("done.bin", 1000)
        protocol.dataReceived(self.body[1000:])
        self.assertEqual(status_of(transport.value()), 201)
        _p, again = self.resume("done.bin", 1000)
        self.assertEqual(status_of(again.value()), 409)
        self.assertEqual(header_value(again.value(), b"Upload-Offset"), str(len(self.body)).encode())
        answer = self.offset("done.bin")
        self.assertEqual(status_of(answer), 200)
        self.assertEqual(header_value(answer, b"Upload-Offset"), str(len(self.body)).encode())

    def test_head_without_token_is_a_download_head(self) -> None:
        """HEAD on the signed URL without X-Session-Token is the ordinary download HEAD (404 here)."""
        self.start("d.bin", 1000)
        _p, transport = self.send(head("HEAD", f"{UUID}/d.bin", len(self.body)))
        self.assertEqual(status_of(transport.value()), 404)
        self.assertIsNone(header_value(transport.value(), b"Upload-Offset"))

    def test_head_with_bad_mac_403(self) -> None:
        """The offset is only told to a request whose MAC signs the upload's size."""
        self.start("h.bin", 1000)
        _p, transport = self.send(
            head("HEAD", f"{UUID}/h.bin", len(self.body), (f"X-Session-Token: {TOKEN}",), mac_size=5)
        )
        self.assertEqual(status_of(transport.value()), 403)
        self.assertIsNone(header_value(transport.value(), b"Upload-Offset"))

    def test_fresh_put_replaces_interrupted_upload(self) -> None:
        """A plain PUT (no Content-Range) starts over, whoever's the earlier partial was."""
        self.start("f.bin", 70_000, token="old-session-1")
        other = os.urandom(len(self.body))
        protocol, transport = self.send(
            head("PUT", f"{UUID}/f.bin", len(other), (f"Content-Length: {len(other)}",))
        )
        protocol.dataReceived(other)
        self.assertEqual(status_of(transport.value()), 201)
        self.assertEqual((self.store_dir / UUID / "f.bin").read_bytes(), other)
        self.assertEqual(self.partial_files(), [])

    def test_content_range_from_zero_starts_fresh(self) -> None:
        """A first request may already carry Content-Range: bytes 0-(S-1)/S."""
        protocol, transport = self.resume("z.bin", 0)
        protocol.dataReceived(self.body)
        self.assertEqual(status_of(transport.value()), 201)
        self.assertEqual(self.partial_files(), [])

    def test_sidecar_never_holds_the_mac(self) -> None:
        """The record binds the upload to a fingerprint of its MAC, never the MAC itself."""
        self.start("mac.bin", 1000)
        record = (self.partial_dir / f"{path_key((UUID, 'mac.bin'))}.json").read_text()
        self.assertNotIn(v1_mac(f"{UUID}/mac.bin", len(self.body)), record)
        self.assertIn(TOKEN, record)


class WriterLockTests(ResumeMixin, SynchronousTestCase):
    def test_resume_takes_over_live_connection(self) -> None:
        """
        A resume while the old connection still looks alive (a phone that changed networks)
        closes the old connection, keeps its bytes, and continues from there: no interleaving.
        """
        protocol, old = self.harness.connect()
        protocol.dataReceived(
            head("PUT", f"{UUID}/x.bin", len(self.body),
                 (f"Content-Length: {len(self.body)}", f"X-Session-Token: {TOKEN}"))
        )
        protocol.dataReceived(self.body[:90_000])
        new_protocol, new = self.resume("x.bin", 90_000)
        self.assertTrue(old.disconnecting)
        self.assertEqual(self.uploads.takeovers, 1)
        # Late bytes from the dead connection are not written anywhere.
        protocol.dataReceived(b"\0" * 5000)
        new_protocol.dataReceived(self.body[90_000:])
        self.assertEqual(status_of(new.value()), 201)
        self.assertEqual((self.store_dir / UUID / "x.bin").read_bytes(), self.body)

    def test_takeover_with_wrong_offset_still_409(self) -> None:
        """Taking over does not skip the offset check: the old writer's bytes decide it."""
        protocol, _old = self.harness.connect()
        protocol.dataReceived(
            head("PUT", f"{UUID}/y.bin", len(self.body),
                 (f"Content-Length: {len(self.body)}", f"X-Session-Token: {TOKEN}"))
        )
        protocol.dataReceived(self.body[:90_000])
        _p, new = self.resume("y.bin", 80_000)
        self.assertEqual(status_of(new.value()), 409)
        self.assertEqual(header_value(new.value(), b"Upload-Offset"), b"90000")

    def test_plain_put_never_takes_over(self) -> None:
        """A second fresh PUT while one is in flight is 409; the first goes on untouched."""
        protocol, first = self.harness.connect()
        protocol.dataReceived(
            head("PUT", f"{UUID}/p.bin", len(self.body), (f"Content-Length: {len(self.body)}",))
        )
        protocol.dataReceived(self.body[:1000])
        _p, second = self.send(head("PUT", f"{UUID}/p.bin", len(self.body), (f"Content-Length: {len(self.body)}",)))
        self.assertEqual(status_of(second.value()), 409)
        protocol.dataReceived(self.body[1000:])
        self.assertEqual(status_of(first.value()), 201)

    def test_writer_in_another_process_asked_to_let_go(self) -> None:
        """
        When another process holds the upload's file lock, the resume gets 409 with
        Retry-After and leaves a takeover request the other process polls for.
        """
        self.start("o.bin", 10_000)
        part = self.partial_dir / f"{path_key((UUID, 'o.bin'))}.part"
        fd = os.open(part, os.O_RDONLY)  # stands in for the other process's writer
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            _p, transport = self.resume("o.bin", 10_000)
        finally:
            os.close(fd)
        self.assertEqual(status_of(transport.value()), 409)
        self.assertEqual(header_value(transport.value(), b"Retry-After"), b"2")
        self.assertTrue((self.partial_dir / f"{path_key((UUID, 'o.bin'))}.takeover").exists())
        # With the other writer gone, the retry goes through.
        protocol, again = self.resume("o.bin", 10_000)
        protocol.dataReceived(self.body[10_000:])
        self.assertEqual(status_of(again.value()), 201)
        self.assertEqual(self.partial_files(), [])

    def test_takeover_request_from_another_process_closes_our_writer(self) -> None:
        """A takeover marker newer than our writer makes the poll close its connection."""
        protocol, transport = self.harness.connect()
        protocol.dataReceived(
            head("PUT", f"{UUID}/q.bin", len(self.body),
                 (f"Content-Length: {len(self.body)}", f"X-Session-Token: {TOKEN}"))
        )
        protocol.dataReceived(self.body[:3000])
        self.uploads.poll_takeovers()
        self.assertFalse(transport.disconnecting)
        lease = self.uploads.active[path_key((UUID, "q.bin"))]
        lease.started -= 10  # the marker below is newer than the writer
        self.harness.server.store.request_takeover((UUID, "q.bin"))
        self.uploads.poll_takeovers()
        self.assertTrue(transport.disconnecting)
        self.assertEqual(self.upload_offset("q.bin"), 3000)
        self.assertEqual(self.uploads.active, {})


class ChecksumAcrossResumeTests(ResumeMixin, SynchronousTestCase):
    def overrides(self) -> dict:
        return {"checksum_verification": True, "enable_get_retries": False}

    def digest(self) -> str:
        return hashlib.sha256(self.body).hexdigest()

    def test_whole_file_checksum_covers_earlier_bytes(self) -> None:
        """The X-Checksum of the first request is checked over the whole file after a resume."""
        self.start("c.bin", 100_000, extra=(f"X-Checksum: {self.digest()}",))
        protocol, transport = self.resume("c.bin", 100_000)
        protocol.dataReceived(self.body[100_000:])
        self.assertEqual(status_of(transport.value()), 201)
        meta = stored_metadata(self.store_dir, (UUID, "c.bin"))
        self.assertEqual(meta["sha256"], self.digest())

    def test_corrupted_earlier_bytes_are_caught(self) -> None:
        """
        The hash of the bytes written before the interruption is recomputed from the partial
        file, never skipped: a byte changed on disk meanwhile fails the upload (400, no file).
        """
        self.start("k.bin", 100_000, extra=(f"X-Checksum: {self.digest()}",))
        part = self.partial_dir / f"{path_key((UUID, 'k.bin'))}.part"
        with open(part, "r+b") as f:
            f.seek(500)
            f.write(bytes([self.body[500] ^ 1]))
        protocol, transport = self.resume("k.bin", 100_000)
        protocol.dataReceived(self.body[100_000:])
        self.assertEqual(status_of(transport.value()), 400)
        self.assertIn(b"checksum mismatch", transport.value())
        self.assertFalse((self.store_dir / UUID / "k.bin").exists())
        self.assertEqual(self.partial_files(), [])

    def test_checksum_announced_on_resume(self) -> None:
        """A checksum first announced by the resuming request is checked over the whole file too."""
        self.start("l.bin", 100_000)
        wrong = hashlib.sha256(b"other").hexdigest()
        protocol, transport = self.resume("l.bin", 100_000, extra=(f"X-Checksum: {wrong}",))
        protocol.dataReceived(self.body[100_000:])
        self.assertEqual(status_of(transport.value()), 400)

    def test_conflicting_checksums_refused_early(self) -> None:
        """A resume announcing another checksum than the upload started with is 400 at header time."""
        self.start("n.bin", 100_000, extra=(f"X-Checksum: {self.digest()}",))
        other = hashlib.sha256(b"other").hexdigest()
        _p, transport = self.resume("n.bin", 100_000, extra=(f"X-Checksum: {other}",))
        self.assertEqual(status_of(transport.value()), 400)


class HeldState:
    """A state backend whose lock answers when the test says (a slow Redis)."""

    def __init__(self) -> None:
        self.inner = EmbeddedState(None)  # type: ignore[arg-type]
        self.pending: list[tuple[Deferred, str, str]] = []
        self.progress_calls: list[tuple[str, int]] = []

    def acquire(self, key: str, owner: str) -> Deferred:
        d: Deferred = Deferred()
        self.pending.append((d, key, owner))
        return d

    def answer(self, held: bool) -> None:
        d, key, owner = self.pending.pop(0)
        d.callback(held)

    def release(self, key: str, owner: str) -> Deferred:
        return succeed(None)

    def record_progress(self, token: str, binding: str, offset: int, ttl: float) -> Deferred:
        self.progress_calls.append((token, offset))
        return succeed(None)

    def forget(self, token: str) -> Deferred:
        return succeed(None)


class DeferredAdmissionTests(ResumeMixin, SynchronousTestCase):
    """Admission that waits for I/O pauses the socket and holds the body back."""

    def setUp(self) -> None:
        super().setUp()
        self.state = HeldState()
        self.uploads.state = self.state

    def put(self, name: str, expect: bool = True) -> tuple[Any, Any]:
        extra = [f"Content-Length: {len(self.body)}"]
        if expect:
            extra.append("Expect: 100-continue")
        protocol, transport = self.harness.connect()
        protocol.dataReceived(head("PUT", f"{UUID}/{name}", len(self.body), tuple(extra)))
        return protocol, transport

    def test_accept_after_wait(self) -> None:
        """No 100 Continue and no reading until the lock is in; then 100, body, 201."""
        protocol, transport = self.put("a.bin")
        self.assertEqual(transport.value(), b"")
        self.assertEqual(transport.producerState, "paused")
        self.state.answer(True)
        self.assertEqual(transport.value(), b"HTTP/1.1 100 Continue\r\n\r\n")
        self.assertEqual(transport.producerState, "producing")
        protocol.dataReceived(self.body)
        self.assertEqual(status_of(transport.value()), 201)
        self.assertEqual((self.store_dir / UUID / "a.bin").read_bytes(), self.body)

    def test_bytes_arriving_while_waiting_are_kept(self) -> None:
        """Body bytes that came with the headers are held and written once admitted."""
        protocol, transport = self.harness.connect()
        protocol.dataReceived(
            head("PUT", f"{UUID}/b.bin", len(self.body), (f"Content-Length: {len(self.body)}",))
            + self.body[:5000]
        )
        self.state.answer(True)
        protocol.dataReceived(self.body[5000:])
        self.assertEqual(status_of(transport.value()), 201)
        self.assertEqual((self.store_dir / UUID / "b.bin").read_bytes(), self.body)

    def test_whole_small_body_while_waiting(self) -> None:
        """A body complete before the decision is processed once the decision comes (with a
        session token: an upload that may be resumed takes the lease)."""
        small = b"tiny body"
        protocol, transport = self.harness.connect()
        protocol.dataReceived(
            head("PUT", f"{UUID}/s.bin", len(small),
                 (f"Content-Length: {len(small)}", "X-Session-Token: waiting-token-1")) + small
        )
        self.assertEqual(transport.value(), b"")
        self.state.answer(True)
        self.assertEqual(status_of(transport.value()), 201)
        self.assertEqual((self.store_dir / UUID / "s.bin").read_bytes(), small)

    def test_one_step_upload_takes_no_lease(self) -> None:
        """A whole small body without a token is stored at once: no lock asked of the state
        backend (no Redis round trip), and nothing left in it."""
        small = b"tiny body"
        protocol, transport = self.harness.connect()
        protocol.dataReceived(
            head("PUT", f"{UUID}/n.bin", len(small), (f"Content-Length: {len(small)}",)) + small
        )
        self.assertEqual(status_of(transport.value()), 201)
        self.assertEqual(self.state.pending, [])
        self.assertEqual(self.state.progress_calls, [])
        self.assertEqual((self.store_dir / UUID / "n.bin").read_bytes(), small)
        self.assertEqual(self.harness.server.resumable.uploads.active, {})

    def test_refused_after_wait(self) -> None:
        """A lock held on another node: 409 with Retry-After, never a 100, connection closed."""
        _protocol, transport = self.put("c.bin")
        self.state.answer(False)
        answer = transport.value()
        self.assertNotIn(b"100 Continue", answer)
        self.assertEqual(status_of(answer), 409)
        self.assertIsNotNone(header_value(answer, b"Retry-After"))
        self.assertIn(b"Connection: close", answer)
        self.assertEqual(self.partial_files(), [])

    def test_client_gone_while_waiting(self) -> None:
        """A client that leaves during the wait leaves no partial file and no lease."""
        protocol, _transport = self.put("d.bin")
        protocol.connectionLost(Failure(ConnectionLost()))
        self.state.answer(True)
        self.assertEqual(self.partial_files(), [])
        self.assertEqual(self.uploads.active, {})


class ProgressCheckpointTests(ResumeMixin, SynchronousTestCase):
    body = os.urandom(20 * 1024 * 1024)

    def setUp(self) -> None:
        super().setUp()
        self.state = HeldState()
        self.state.acquire = lambda key, owner: succeed(True)  # type: ignore[method-assign]
        self.uploads.state = self.state
        self.uploads.record_progress = True

    def test_checkpoints_are_few_and_never_ahead_of_disk(self) -> None:
        """
        20 MiB in 64 KiB reads writes a handful of progress records (every 8 MiB), never one
        per chunk, each no larger than what the file held; the interruption records the end.
        """
        protocol, _transport = self.harness.connect()
        protocol.dataReceived(
            head("PUT", f"{UUID}/big.bin", len(self.body),
                 (f"Content-Length: {len(self.body)}", f"X-Session-Token: {TOKEN}"))
        )
        part = self.partial_dir / f"{path_key((UUID, 'big.bin'))}.part"
        offsets = []
        original = self.state.record_progress

        def record(token: str, binding: str, offset: int, ttl: float) -> Deferred:
            self.assertLessEqual(offset, part.stat().st_size)
            offsets.append(offset)
            return original(token, binding, offset, ttl)

        self.state.record_progress = record  # type: ignore[method-assign]
        cut = 19 * 1024 * 1024 + 5
        for start in range(0, cut, 65536):
            protocol.dataReceived(self.body[start : min(start + 65536, cut)])
        protocol.connectionLost(Failure(ConnectionLost()))
        self.assertLessEqual(len(offsets), 4)
        self.assertEqual(offsets, sorted(offsets))
        self.assertEqual(offsets[-1], cut)
        self.assertEqual({token for token, _ in self.state.progress_calls}, {TOKEN})

    def test_time_checkpoint(self) -> None:
        """A slow upload records progress after a second even without 8 MiB more."""
        protocol, _transport = self.harness.connect()
        protocol.dataReceived(
            head("PUT", f"{UUID}/slow.bin", len(self.body),
                 (f"Content-Length: {len(self.body)}", f"X-Session-Token: {TOKEN}"))
        )
        protocol.dataReceived(self.body[:1000])
        self.assertEqual(self.state.progress_calls, [])
        self.harness.reactor.advance(1.5)
        protocol.dataReceived(self.body[1000:2000])
        self.assertEqual(self.state.progress_calls, [(TOKEN, 2000)])


class SweepTests(SynchronousTestCase):
    def test_abandoned_partials_removed_after_ttl(self) -> None:
        """
        The sweep removes partial files (and records) idle longer than the TTL that nobody
        holds, keeps fresh and locked ones, and counts what it removed.
        """
        root = Path(self.mktemp()).resolve()
        root.mkdir()
        now = [1_000_000.0]
        store = Store(root, now=lambda: now[0])
        runner = ManualRunner(auto=True)
        sweeper = PartialSweeper(FilesystemBackend(store, runner), ttl=600.0)
        old = store.open_partial(("u", "old"), "text/plain", 10)
        old.write([b"12345"])
        old.release()
        held = store.open_partial(("u", "held"), "text/plain", 10)
        fresh = store.open_partial(("u", "fresh"), "text/plain", 10)
        fresh.release()
        for partial in (old, held):
            os.utime(partial.path, (now[0] - 700, now[0] - 700))
            os.utime(store.record_path(partial.segments), (now[0] - 700, now[0] - 700))
        results: list[int] = []
        sweeper.sweep().addCallback(results.append)
        self.assertEqual(results, [1])
        self.assertEqual(sweeper.removed_total, 1)
        self.assertFalse(old.path.exists())
        self.assertFalse(store.record_path(old.segments).exists())
        self.assertTrue(held.path.exists())
        self.assertTrue(fresh.path.exists())
        held.abort()


class ParserTests(SynchronousTestCase):
    @settings(derandomize=True, deadline=None, max_examples=200)
    @given(st.integers(0, 2**40), st.integers(0, 2**40), st.integers(1, 2**41))
    def test_content_range_roundtrip(self, first: int, span: int, extra: int) -> None:
        """Every valid bytes first-last/total parses back to its numbers."""
        last = first + span
        total = last + extra
        self.assertEqual(
            parse_content_range(f"bytes {first}-{last}/{total}".encode()), (first, last, total)
        )

    @settings(derandomize=True, deadline=None, max_examples=200)
    @given(st.binary(max_size=40))
    def test_content_range_garbage(self, value: bytes) -> None:
        """Anything else is a ValueError, never a wrong triple."""
        try:
            first, last, total = parse_content_range(value)
        except ValueError:
            return
        self.assertTrue(first <= last < total)

    def test_fingerprint_follows_strongest_mac(self) -> None:
        """The fingerprint is of the MAC the Authenticator checks, case-insensitive, never the MAC."""
        mac = "ab" * 32
        fp = mac_fingerprint({b"v": [mac.encode()]})
        self.assertEqual(fp, mac_fingerprint({b"v": [mac.upper().encode()]}))
        self.assertNotIn(mac, fp)
        self.assertNotEqual(fp, mac_fingerprint({b"v": [mac.encode()], b"v2": [b"cd" * 32]}))
        self.assertIsNone(mac_fingerprint({}))

    def test_record_roundtrip_and_bad_records(self) -> None:
        """Records survive the sidecar; unusable sidecars read as None (the upload starts over)."""
        record = UploadRecord(path="a/b", size=5, content_type="text/plain", signed_type=None, mac="m", token="t")
        self.assertEqual(UploadRecord.from_dict(record.to_dict()), record)
        self.assertIsNone(UploadRecord.from_dict({"path": "a", "size": "5", "mac": "m"}))
        self.assertIsNone(UploadRecord.from_dict({"path": "a", "size": 5}))
