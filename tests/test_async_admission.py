"""
Admission through the asynchronous store (``IStore``): a fake store whose Deferreds
the test fires by hand, behind a real channel on a StringTransport.

What it proves: every store question of an upload is asked before the body is read,
the body stays unread (no 100 Continue, socket paused, nothing handed to a writer)
while the store has not answered, and the store's refusals (409, 507, 503, a raw
``OSError``) are the early answer.  Then the same for tombstones on the real
filesystem backend, and that no store call of an upload runs on the reactor thread.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.trial.unittest import SynchronousTestCase, TestCase

from hmacfs.storage.interface import TOMBSTONED, StorageError, StoredFile
from hmacfs.testing import ManualRunner, SiteHarness, make_config, put_head, status_of, v1_mac
from hmacfs.upload.policy import UploadLimits, UploadPolicy
from hmacfs.upload.resume import Uploads

UUID = "6f1c1b5e-2c59-4a55-9b0e-0d4f4a3f2b11"


class FakeUpload:
    """An ``IUpload`` in memory that answers at once."""

    def __init__(self, segments: tuple[str, ...], size: int | None) -> None:
        self.segments = segments
        self.content_type = "text/plain"
        self.size = size
        self.written = 0
        self.offset = 0
        self.record: dict[str, object] | None = None
        self.data = bytearray()
        self.committed = False
        self.expected: list[int] = []

    def expect(self, count: int) -> None:
        self.expected.append(count)

    def write(self, chunks: Any, hashers: Any = ()) -> Deferred[int]:
        for chunk in chunks:
            for hasher in hashers:
                hasher.update(chunk)
            self.data += chunk
        self.written = len(self.data)
        return succeed(sum(len(c) for c in chunks))

    def write_and_commit(self, chunks: Any, hashers: Any = (), digest: Any = None) -> Deferred[StoredFile]:
        self.write(chunks, hashers)
        sha = digest() if digest is not None else None
        self.committed = True
        return succeed(StoredFile(Path("/x"), self.written, 0.0, "text/plain", "e", sha))

    def checkpoint(self) -> Deferred[int]:
        return succeed(self.written)

    def truncate(self, length: int) -> Deferred[None]:
        del self.data[length:]
        self.written = length
        return succeed(None)

    def hash_prefix(self, hasher: Any, length: int) -> Deferred[None]:
        hasher.update(bytes(self.data[:length]))
        return succeed(None)

    def commit(self, sha256_hex: str | None) -> Deferred[StoredFile]:
        return self.write_and_commit([])

    def abort(self) -> Deferred[None]:
        return succeed(None)

    def release(self) -> Deferred[int]:
        return succeed(self.written)


class HandStore:
    """
    The store questions an upload asks, each a Deferred left in ``calls`` for the test
    to fire; the rest answer at once.
    """

    local = True
    whole_uploads_isolated = True

    def __init__(self) -> None:
        self.calls: list[tuple[str, tuple[Any, ...], Deferred[Any]]] = []

    def _held(self, name: str, *args: Any) -> Deferred[Any]:
        d: Deferred[Any] = Deferred()
        self.calls.append((name, args, d))
        return d

    def names(self) -> list[str]:
        return [name for name, _args, _d in self.calls]

    def admit(self, segments: Any, content_type: str, size: int | None, **kw: Any) -> Deferred[Any]:
        return self._held("admit", tuple(segments), size)

    def resume(self, segments: Any, remaining: int | None) -> Deferred[Any]:
        return self._held("resume", tuple(segments), remaining)

    def store_whole(self, segments: Any, content_type: str, chunks: Any, *args: Any) -> Deferred[Any]:
        return self._held("store_whole", tuple(segments), b"".join(chunks))

    def exists(self, segments: Any) -> Deferred[Any]:
        return self._held("exists", tuple(segments))

    def tombstoned(self, segments: Any) -> Deferred[Any]:
        return self._held("tombstoned", tuple(segments))

    def upload_status(self, segments: Any) -> Deferred[Any]:
        return self._held("upload_status", tuple(segments))

    def lookup(self, segments: Any) -> Deferred[Any]:
        return self._held("lookup", tuple(segments))

    def upload_mtime(self, segments: Any) -> Deferred[Any]:
        return succeed(None)

    def request_takeover(self, segments: Any) -> Deferred[None]:
        return succeed(None)

    def clear_takeover(self, segments: Any) -> Deferred[None]:
        return succeed(None)

    def takeover_requested(self, segments: Any, since: float) -> Deferred[bool]:
        return succeed(False)

    def takeovers_requested(self, uploads: Any) -> Deferred[list[bool]]:
        return succeed([False for _ in uploads])


class HandStoreAdmissionTests(SynchronousTestCase):
    """A real channel and UploadPolicy over a store the test answers for."""

    def setUp(self) -> None:
        root = Path(self.mktemp()).resolve()
        root.mkdir()
        self.harness = SiteHarness(make_config(root), ManualRunner(auto=True))
        self.store = HandStore()
        uploads = Uploads(store=self.store, state=self.harness.server.resumable.uploads.state,  # type: ignore[arg-type]
                          clock=self.harness.reactor)
        self.policy = UploadPolicy(
            limits=UploadLimits(prefix="upload"),
            store=self.store,  # type: ignore[arg-type]
            authenticator=self.harness.server.policy.admission.authenticator,
            clock=self.harness.reactor,
            uploads=uploads,
        )
        self.harness.site.body_policy = self.policy

    def send(self, name: str, body: bytes, *, with_body: bool, expect: bool = True) -> tuple[Any, Any]:
        """A PUT of ``body``: its head, and the body too ``with_body``."""
        protocol, transport = self.harness.connect()
        extra = ("Expect: 100-continue",) if expect else ()
        head = put_head(f"{UUID}/{name}", len(body), extra=extra)
        protocol.dataReceived(head + body if with_body else head)
        return protocol, transport

    def test_slow_admit_keeps_the_body_unread(self) -> None:
        """
        Until ``admit`` fires: no 100 Continue, the socket paused, nothing written (not even
        a body that came with the headers); then the body goes to the upload and 201.
        """
        body = b"hello world"
        protocol, transport = self.send("slow.txt", body, with_body=False)
        self.assertEqual(self.store.names(), ["admit"])
        self.assertNotIn(b"100 Continue", transport.value())
        self.assertEqual(transport.producerState, "paused")
        protocol.dataReceived(body)  # a client that did not wait for 100 Continue
        [request] = protocol.requests
        self.assertIsNone(request.upload_state.receiver)
        _name, (segments, size), admitted = self.store.calls[0]
        self.assertEqual((segments, size), ((UUID, "slow.txt"), len(body)))
        upload = FakeUpload(segments, size)
        admitted.callback(upload)
        self.assertEqual(bytes(upload.data), body)
        self.assertTrue(upload.committed)
        self.assertEqual(status_of(transport.value()), 201)

    def test_continue_only_after_admit(self) -> None:
        """A client that waits: 100 Continue is sent once the store admitted the upload."""
        _protocol, transport = self.send("wait.txt", b"abc", with_body=False)
        self.assertNotIn(b"100 Continue", transport.value())
        _name, (segments, size), admitted = self.store.calls[0]
        admitted.callback(FakeUpload(segments, size))
        self.assertIn(b"100 Continue", transport.value())
        self.assertEqual(transport.producerState, "producing")

    def refused_by(self, error: BaseException) -> bytes:
        self.store.calls = []
        protocol, transport = self.send("refused.txt", b"x" * 100, with_body=False)
        self.assertEqual(self.store.names(), ["admit"])
        [request] = protocol.requests
        self.store.calls[0][2].errback(error)
        response = transport.value()
        self.assertNotIn(b"100 Continue", response)
        self.assertIn(b"Connection: close", response)
        self.assertIsNone(request.upload_state.receiver)
        return response

    def test_admit_refusals_are_early(self) -> None:
        """409, 507 and 503 from the store's admission are the answer, before the body."""
        for status, reason in ((409, "file already exists"), (507, "insufficient storage")):
            response = self.refused_by(StorageError(status, reason))
            self.assertEqual(status_of(response), status, response)
            self.assertIn(reason.encode(), response)
        response = self.refused_by(
            StorageError(503, "storage unavailable", ((b"Retry-After", b"5"),))
        )
        self.assertEqual(status_of(response), 503)
        self.assertIn(b"Retry-After: 5", response)

    def test_admit_os_error_is_503(self) -> None:
        """A raw store failure (EIO) at admission: 503 with Retry-After, never a 500."""
        response = self.refused_by(OSError(errno.EIO, "I/O error"))
        self.assertEqual(status_of(response), 503)
        self.assertIn(b"Retry-After", response)

    def one_step(self, name: str, body: bytes, *, expect: bool = False) -> tuple[Any, Any, Deferred[Any]]:
        """A PUT whose whole body came with its headers: the store is asked once."""
        self.store.calls = []
        protocol, transport = self.send(name, body, with_body=True, expect=expect)
        self.assertEqual(self.store.names(), ["store_whole"])
        _name, (segments, data), stored = self.store.calls[0]
        self.assertEqual((segments, data), ((UUID, name), body))
        return protocol, transport, stored

    def test_body_in_hand_is_one_store_step(self) -> None:
        """No admission at the headers: one ``store_whole`` with the body, then 201."""
        body = b"all of it"
        protocol, transport, stored = self.one_step("whole.txt", body)
        self.assertEqual(transport.value(), b"")  # nothing is answered before the store
        stored.callback(StoredFile(Path("/x"), len(body), 0.0, "text/plain", "e", None))
        self.assertEqual(status_of(transport.value()), 201)
        self.assertNotIn(b"Connection: close", transport.value())

    def test_body_in_hand_refusals(self) -> None:
        """
        The refusals an admission gives come from the one step with their headers; the body
        was read already, so the connection stays open; a held upload is 409 with Retry-After.
        """
        cases = [
            (StorageError(409, "file already exists"), 409, b"file already exists"),
            (StorageError(403, TOMBSTONED), 403, TOMBSTONED.encode()),
            (StorageError(507, "insufficient storage"), 507, b"insufficient storage"),
            (StorageError(503, "storage unavailable", ((b"Retry-After", b"5"),)), 503, b"Retry-After: 5"),
            (StorageError(409, "upload already in progress"), 409, b"Retry-After"),
        ]
        for error, status, shown in cases:
            _protocol, transport, stored = self.one_step("refused.txt", b"x" * 100)
            stored.errback(error)
            response = transport.value()
            self.assertEqual(status_of(response), status, response)
            self.assertIn(shown, response)
            self.assertNotIn(b"Connection: close", response)
        self.assertEqual(self.flushLoggedErrors(), [])

    def test_no_continue_for_a_body_in_hand(self) -> None:
        """Expect: 100-continue on a body that came whole with its headers: no 100 (RFC 9110
        lets the server omit it once the content arrived), and the final answer as usual."""
        body = b"already here"
        _protocol, transport, stored = self.one_step("cont.txt", body, expect=True)
        stored.callback(StoredFile(Path("/x"), len(body), 0.0, "text/plain", "e", None))
        self.assertNotIn(b"100 Continue", transport.value())
        self.assertEqual(status_of(transport.value()), 201)

    def test_ranged_put_asks_before_the_body(self) -> None:
        """A resumed PUT: tombstone, existence and the upload's status, in turn, all early."""
        size = 10
        path = f"{UUID}/r.bin"
        head = (
            f"PUT /upload/{path}?v={v1_mac(path, size)} HTTP/1.1\r\nHost: x\r\n"
            "Content-Length: 5\r\nContent-Range: bytes 5-9/10\r\n"
            "X-Session-Token: token-token-1\r\nExpect: 100-continue\r\n\r\n"
        ).encode()
        protocol, transport = self.harness.connect()
        protocol.dataReceived(head)
        for name, answer in (("tombstoned", False), ("exists", False)):
            self.assertEqual(self.store.names()[-1], name)
            self.store.calls[-1][2].callback(answer)
        self.assertEqual(self.store.names()[-1], "upload_status")
        self.assertNotIn(b"100 Continue", transport.value())
        self.store.calls[-1][2].callback(None)
        response = transport.value()
        self.assertEqual(status_of(response), 409)
        self.assertIn(b"Upload-Offset: 0", response)
        self.assertEqual(
            self.store.names(), ["tombstoned", "exists", "upload_status"]
        )

    def test_ranged_put_to_an_existing_file_is_409(self) -> None:
        """``exists`` says yes: 409 with Upload-Offset at the whole size, before the body."""
        path = f"{UUID}/e.bin"
        head = (
            f"PUT /upload/{path}?v={v1_mac(path, 10)} HTTP/1.1\r\nHost: x\r\n"
            "Content-Length: 5\r\nContent-Range: bytes 5-9/10\r\nExpect: 100-continue\r\n\r\n"
        ).encode()
        protocol, transport = self.harness.connect()
        protocol.dataReceived(head)
        self.store.calls[-1][2].callback(False)  # no tombstone
        self.assertNotIn(b"100 Continue", transport.value())
        self.store.calls[-1][2].callback(True)  # exists
        response = transport.value()
        self.assertEqual(status_of(response), 409)
        self.assertIn(b"Upload-Offset: 10", response)
        self.assertNotIn(b"100 Continue", response)
        self.assertEqual(self.store.names(), ["tombstoned", "exists"])

    def test_ranged_put_to_a_tombstone_is_403(self) -> None:
        size = 10
        path = f"{UUID}/t.bin"
        head = (
            f"PUT /upload/{path}?v={v1_mac(path, size)} HTTP/1.1\r\nHost: x\r\n"
            "Content-Length: 5\r\nContent-Range: bytes 5-9/10\r\n\r\n"
        ).encode()
        protocol, transport = self.harness.connect()
        protocol.dataReceived(head)
        self.store.calls[-1][2].callback(True)
        response = transport.value()
        self.assertEqual(status_of(response), 403)
        self.assertIn(TOMBSTONED.encode(), response)
        self.assertEqual(self.store.names(), ["tombstoned"])


class TombstoneAdmissionTests(SynchronousTestCase):
    """The real backend: a path retention deleted is 403 for every way of uploading."""

    def setUp(self) -> None:
        root = Path(self.mktemp()).resolve()
        root.mkdir()
        self.root = root
        self.harness = SiteHarness(make_config(root), ManualRunner(auto=True))
        self.harness.server.tombstones.add((UUID, "gone.txt"), 4_000_000_000)

    def answer(self, head: bytes) -> bytes:
        protocol, transport = self.harness.connect()
        protocol.dataReceived(head)
        return transport.value()

    def test_put_to_a_tombstone_is_403_before_the_body(self) -> None:
        response = self.answer(put_head(f"{UUID}/gone.txt", 5, extra=("Expect: 100-continue",)))
        self.assertEqual(status_of(response), 403)
        self.assertNotIn(b"100 Continue", response)
        self.assertIn(TOMBSTONED.encode(), response)
        self.assertFalse((self.root / UUID / "gone.txt").exists())
        self.assertEqual(os.listdir(self.root / ".hmacfs" / "partial"), [])

    def test_tus_creation_and_patch_to_a_tombstone_are_403(self) -> None:
        path = f"{UUID}/gone.txt"
        mac = v1_mac(path, 5)
        create = (
            f"POST /upload/{path}?v={mac} HTTP/1.1\r\nHost: x\r\nTus-Resumable: 1.0.0\r\n"
            "Upload-Length: 5\r\nContent-Length: 0\r\n\r\n"
        ).encode()
        self.assertEqual(status_of(self.answer(create)), 403)
        patch = (
            f"PATCH /upload/{path}?v={mac} HTTP/1.1\r\nHost: x\r\nTus-Resumable: 1.0.0\r\n"
            "Upload-Offset: 0\r\nContent-Type: application/offset+octet-stream\r\n"
            "Content-Length: 5\r\n\r\n"
        ).encode()
        response = self.answer(patch)
        self.assertEqual(status_of(response), 403)
        self.assertIn(TOMBSTONED.encode(), response)


#: what the store test wraps: every call that reaches the disk
_WRAPPED_OS = ("open", "stat", "lstat", "write", "writev", "fsync", "fdatasync", "link", "unlink",
               "statvfs", "ftruncate", "pread", "rename", "replace", "mkdir", "utime", "listdir",
               "scandir", "rmdir", "fstat")


class UploadsOffTheReactorThreadTests(TestCase):
    """
    A real disk pool (threads): during a PUT, a resumed PUT and tus creation and PATCH,
    no filesystem call on the store runs on the reactor (main) thread.
    """

    def setUp(self) -> None:
        from twisted.internet import reactor
        from twisted.internet.threads import deferToThreadPool
        from twisted.python.threadpool import ThreadPool

        root = Path(self.mktemp()).resolve()
        root.mkdir()
        self.root = root
        pool = ThreadPool(1, 2, "test-disk")
        pool.start()
        self.addCleanup(pool.stop)

        def run_blocking(function: Callable[..., Any], *args: Any) -> Deferred[Any]:
            return deferToThreadPool(reactor, pool, function, *args)  # type: ignore[arg-type]

        self.harness = SiteHarness(make_config(root), run_blocking)  # type: ignore[arg-type]
        self.on_reactor: list[str] = []
        main = threading.main_thread()
        prefix = str(root)

        real_fstat = os.fstat

        def under_store(value: Any) -> bool:
            if isinstance(value, int):
                # a file or directory descriptor (the store's: the test opens none), not
                # the reactor's waker pipe or a socket
                try:
                    mode = real_fstat(value).st_mode
                except OSError:
                    return False
                return stat.S_ISREG(mode) or stat.S_ISDIR(mode)
            try:
                return os.fspath(value).startswith(prefix) or not os.path.isabs(os.fspath(value))
            except TypeError:
                return False

        def wrap(module: Any, name: str) -> None:
            real = getattr(module, name)

            def recorded(*args: Any, **kw: Any) -> Any:
                if threading.current_thread() is main and (
                    (args and under_store(args[0])) or "dir_fd" in kw
                ):
                    self.on_reactor.append(f"{name}{args[:2]!r}")
                return real(*args, **kw)

            self.patch(module, name, recorded)

        for name in _WRAPPED_OS:
            if hasattr(os, name):
                wrap(os, name)
        wrap(os.path, "lexists")
        wrap(fcntl, "flock")

    def request(self, data: bytes) -> Deferred[bytes]:
        """Send ``data`` on a connection; fires with what came back once it is answered."""
        from twisted.internet import reactor

        protocol, transport = self.harness.connect()
        done: Deferred[bytes] = Deferred()

        def poll(tries: int = 0) -> None:
            value = transport.value()
            if (b"\r\n\r\n" in value and not value.startswith(b"HTTP/1.1 100")) or tries > 400:
                done.callback(value)
            else:
                reactor.callLater(0.01, poll, tries + 1)

        protocol.dataReceived(data)
        poll()
        return done

    async def wait_idle(self) -> None:
        """Until no upload is held here (an interrupted one was released on the pool)."""
        from twisted.internet import reactor
        from twisted.internet.task import deferLater

        for _ in range(400):
            if not self.harness.server.resumable.uploads.active:
                return
            await deferLater(reactor, 0.01, lambda: None)

    async def exercise(self) -> None:
        # a whole PUT
        whole = await self.request(put_head(f"{UUID}/w.bin", 4) + b"abcd")
        self.assertEqual(status_of(whole), 201, whole)
        # a PUT cut off after 5 of 10 bytes, then resumed with Content-Range
        path = f"{UUID}/r.bin"
        query = f"v={v1_mac(path, 10)}"
        token = "X-Session-Token: token-token-1"
        protocol, _transport = self.harness.connect()
        protocol.dataReceived(
            f"PUT /upload/{path}?{query} HTTP/1.1\r\nHost: x\r\n{token}\r\n"
            "Content-Length: 10\r\n\r\n12345".encode()
        )
        await self.wait_idle_after_admission()
        # the takeover poll asks the store about the upload being written, off the reactor
        await self.harness.server.resumable.uploads.poll_takeovers()
        protocol.connectionLost(None)
        await self.wait_idle()
        head = await self.request(
            f"HEAD /upload/{path}?{query} HTTP/1.1\r\nHost: x\r\n{token}\r\n\r\n".encode()
        )
        self.assertIn(b"Upload-Offset: 5", head)
        resumed = await self.request(
            f"PUT /upload/{path}?{query} HTTP/1.1\r\nHost: x\r\n{token}\r\n"
            "Content-Length: 5\r\nContent-Range: bytes 5-9/10\r\n\r\n67890".encode()
        )
        self.assertEqual(status_of(resumed), 201, resumed)
        self.assertEqual((self.root / UUID / "r.bin").read_bytes(), b"1234567890")
        # tus: creation, HEAD, two PATCHes
        tpath = f"{UUID}/t.bin"
        tquery = f"v={v1_mac(tpath, 10)}"
        tus = "Tus-Resumable: 1.0.0"
        created = await self.request(
            f"POST /upload/{tpath}?{tquery} HTTP/1.1\r\nHost: x\r\n{tus}\r\n"
            "Upload-Length: 10\r\nContent-Length: 0\r\n\r\n".encode()
        )
        self.assertEqual(status_of(created), 201, created)
        for offset, data in ((0, b"abcde"), (5, b"fghij")):
            patched = await self.request(
                f"PATCH /upload/{tpath}?{tquery} HTTP/1.1\r\nHost: x\r\n{tus}\r\n"
                f"Upload-Offset: {offset}\r\nContent-Type: application/offset+octet-stream\r\n"
                f"Content-Length: {len(data)}\r\n\r\n".encode() + data
            )
            self.assertEqual(status_of(patched), 204, patched)
            if offset == 0:
                await self.wait_idle()
                theaded = await self.request(
                    f"HEAD /upload/{tpath}?{tquery} HTTP/1.1\r\nHost: x\r\n{tus}\r\n\r\n".encode()
                )
                self.assertIn(b"Upload-Offset: 5", theaded)
        await self.wait_idle()
        self.assertEqual((self.root / UUID / "t.bin").read_bytes(), b"abcdefghij")

    async def wait_idle_after_admission(self) -> None:
        from twisted.internet import reactor
        from twisted.internet.task import deferLater

        # (the registry, not the disk: the test itself runs on the reactor thread)
        uploads = self.harness.server.resumable.uploads
        for _ in range(400):
            if any(lease.receiver is not None for lease in uploads.active.values()):
                return
            await deferLater(reactor, 0.01, lambda: None)

    def test_no_store_call_on_the_reactor_thread(self) -> Deferred[None]:
        async def run() -> None:
            await self.exercise()
            self.maxDiff = None
            self.assertEqual(self.on_reactor, [])

        return Deferred.fromCoroutine(run())
