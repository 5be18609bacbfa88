"""
No filesystem call on the store from the reactor thread (issue 11, section 1).

A real server (``hmacfs.embed``: the daemon's service tree and Site, the real
disk pool) listens on 127.0.0.1 on the trial reactor; real clients
(``http.client`` in a thread) make a PUT, a resumed PUT, a tus PATCH, GETs
and a HEAD.  Meanwhile every ``os``/``open``/``fcntl`` call that concerns the
store is recorded with its thread: a path under the store root, a ``dir_fd``
or descriptor opened from such a path (descriptors are tracked from the
moment the server is built, so those it opened at start-up count too).  Each
test fails listing every such call made on the reactor thread, and checks
that the recorder saw the pool's calls (so it cannot pass by seeing nothing).
"""

from __future__ import annotations

import builtins
import fcntl
import hashlib
import http.client
import io
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import attrs
from twisted.internet import reactor, task, threads
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.trial.unittest import TestCase

from hmacfs.embed import embed
from hmacfs.service import diskpool
from hmacfs.service.diskpool import DiskThreadPoolService
from hmacfs.storage.retention import RetentionService
from hmacfs.testing import make_config, v1_mac

UUID = "5f0e3c1a-2b4d-4e6f-8a9b-0c1d2e3f4a5b"

#: The store calls a small request makes today (``bench/bench.py`` measures what they
#: cost): lower them when a change saves calls, never raise them without a measurement.
SMALL_PUT_CALLS = 13
SMALL_GET_CALLS = 8


@attrs.frozen
class Call:
    """One filesystem call on the store."""

    function: str
    target: str
    thread: str
    on_reactor: bool


class StoreCallRecorder:
    """
    Wraps the filesystem functions of ``os``, ``os.path``, ``fcntl``, ``builtins``
    and ``io``; records the calls that concern the store under ``root`` while
    ``recording`` is set.  Descriptors opened on the store are tracked always.
    """

    #: function -> (positions of path-or-descriptor arguments, dir_fd keywords)
    PATHS: dict[str, tuple[tuple[int, ...], tuple[str, ...]]] = {
        "open": ((0,), ("dir_fd",)),
        "stat": ((0,), ("dir_fd",)),
        "lstat": ((0,), ("dir_fd",)),
        "link": ((0, 1), ("src_dir_fd", "dst_dir_fd")),
        "rename": ((0, 1), ("src_dir_fd", "dst_dir_fd")),
        "replace": ((0, 1), ("src_dir_fd", "dst_dir_fd")),
        "unlink": ((0,), ("dir_fd",)),
        "remove": ((0,), ("dir_fd",)),
        "mkdir": ((0,), ("dir_fd",)),
        "rmdir": ((0,), ("dir_fd",)),
        "listdir": ((0,), ()),
        "scandir": ((0,), ()),
        "statvfs": ((0,), ()),
        "utime": ((0,), ("dir_fd",)),
        "chmod": ((0,), ("dir_fd",)),
        "truncate": ((0,), ()),
        "access": ((0,), ("dir_fd",)),
        "readlink": ((0,), ("dir_fd",)),
        "getxattr": ((0,), ()),
        "setxattr": ((0,), ()),
        "listxattr": ((0,), ()),
        "removexattr": ((0,), ()),
    }
    #: function -> position of the descriptor argument
    DESCRIPTORS: dict[str, int] = {
        "fstat": 0, "read": 0, "pread": 0, "readv": 0, "preadv": 0, "write": 0, "pwrite": 0,
        "writev": 0, "pwritev": 0, "fsync": 0, "fdatasync": 0, "ftruncate": 0, "close": 0,
        "dup": 0, "sendfile": 1, "fchmod": 0, "fstatvfs": 0, "posix_fadvise": 0, "lseek": 0,
    }

    def __init__(self, root: Path) -> None:
        self.root = os.path.normpath(os.fspath(root))
        self.calls: list[Call] = []
        self.recording = False
        self._tracked: set[int] = set()
        self._lock = threading.Lock()
        self._local = threading.local()
        self._reactor_thread = threading.get_ident()

    def install(self, patch: Callable[[Any, str, Any], None]) -> None:
        for name in self.PATHS:
            patch(os, name, self._wrap_paths(name, getattr(os, name)))
        for name, position in self.DESCRIPTORS.items():
            if hasattr(os, name):
                patch(os, name, self._wrap_descriptor(name, getattr(os, name), position))
        patch(os.path, "lexists", self._wrap_paths("path.lexists", os.path.lexists, (0,)))
        patch(builtins, "open", self._wrap_paths("builtins.open", builtins.open, (0,)))
        patch(io, "open", self._wrap_paths("io.open", io.open, (0,)))
        for name in ("flock", "lockf"):
            patch(fcntl, name, self._wrap_descriptor(f"fcntl.{name}", getattr(fcntl, name), 0))

    # what concerns the store

    def _is_store(self, path: Any, dir_fd: Any = None) -> bool:
        if isinstance(path, int):
            return path in self._tracked
        if path is None:
            return False
        if dir_fd is not None and dir_fd in self._tracked:
            return True
        try:
            text = os.fsdecode(os.fspath(path))
        except TypeError:
            return False
        if not os.path.isabs(text):
            if dir_fd is not None:
                return False
            text = os.path.join(os.getcwd(), text)
        text = os.path.normpath(text)
        return text == self.root or text.startswith(self.root + os.sep)

    def _record(self, function: str, target: Any) -> None:
        if not self.recording:
            return
        thread = threading.current_thread()
        self.calls.append(
            Call(function, str(target), thread.name, threading.get_ident() == self._reactor_thread)
        )

    # the wrappers

    def _outermost(self) -> bool:
        depth = getattr(self._local, "depth", 0)
        return depth == 0

    def _call(self, concerns: bool, name: str, target: Any, real: Any, args: Any, kwargs: Any) -> Any:
        outer = self._outermost()
        if concerns and outer:
            self._record(name, target)
        self._local.depth = getattr(self._local, "depth", 0) + 1
        try:
            return real(*args, **kwargs)
        finally:
            self._local.depth -= 1

    def _wrap_paths(
        self, name: str, real: Any, positions: tuple[int, ...] | None = None
    ) -> Callable[..., Any]:
        spec_positions, dir_fds = self.PATHS.get(name, ((0,), ()))
        positions = positions if positions is not None else spec_positions

        def wrapper(*args: Any, **kwargs: Any) -> Any:
            if self._outermost():
                concerns = False
                target: Any = None
                for index, position in enumerate(positions):
                    if position < len(args):
                        dir_fd = kwargs.get(dir_fds[index]) if index < len(dir_fds) else None
                        if self._is_store(args[position], dir_fd):
                            concerns, target = True, args[position]
                            break
                if name == "listdir" and not args:
                    concerns = False
            else:
                concerns, target = False, None
            result = self._call(concerns, name, target, real, args, kwargs)
            if concerns and name == "open" and isinstance(result, int):
                with self._lock:
                    self._tracked.add(result)
            return result

        return wrapper

    def _wrap_descriptor(self, name: str, real: Any, position: int) -> Callable[..., Any]:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            fd = args[position] if position < len(args) else None
            if fd is not None and not isinstance(fd, int) and hasattr(fd, "fileno"):
                fd = fd.fileno()
            concerns = isinstance(fd, int) and fd in self._tracked
            result = self._call(concerns, name, fd, real, args, kwargs)
            if concerns:
                with self._lock:
                    if name == "close":
                        self._tracked.discard(fd)
                    elif name == "dup" and isinstance(result, int):
                        self._tracked.add(result)
            return result

        return wrapper

    # the verdict

    def on_reactor(self) -> list[Call]:
        return [call for call in self.calls if call.on_reactor]

    def on_pool(self) -> list[Call]:
        return [call for call in self.calls if call.thread.startswith("hmacfs-disk")]


def put_in_one_write(port: int, target: str, body: bytes) -> int:
    """A PUT whose head and body go out in one ``sendall`` (as most clients send a small
    upload; ``http.client`` writes them separately, and the server may read them apart)."""
    import socket

    head = (
        f"PUT {target} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: {len(body)}\r\n"
        "Connection: close\r\n\r\n"
    ).encode()
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(head + body)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    return int(answer.split(b" ", 2)[1])


def request(
    port: int, method: str, target: str, headers: dict[str, str] | None = None, body: bytes = b""
) -> tuple[int, dict[str, str], bytes]:
    """One request on a fresh connection (in a thread): status, headers, body."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        connection.request(method, target, body=body or None, headers=headers or {})
        response = connection.getresponse()
        data = response.read()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, data
    finally:
        connection.close()


def interrupted_put(port: int, target: str, size: int, token: str, part: bytes) -> None:
    """A PUT that sends ``part`` of its ``size`` bytes, then drops the connection."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    connection.putrequest("PUT", target)
    connection.putheader("Content-Length", str(size))
    connection.putheader("X-Session-Token", token)
    connection.endheaders()
    connection.send(part)
    time.sleep(0.3)  # the server reads and writes what came
    connection.close()


class ReactorThreadTests(TestCase):
    """Every filesystem call on the store is made on the disk pool, none on the reactor thread."""

    timeout = 60

    def setUp(self) -> Deferred[None]:  # type: ignore[override]
        self.root = Path(self.mktemp()).resolve()
        self.root.mkdir(parents=True)
        self.recorder = StoreCallRecorder(self.root)
        self.recorder.install(self.patch)
        #: disk-pool jobs started while recording (each is a GIL hand-off each way)
        self.jobs: list[str] = []
        #: those of them the reactor thread waited a moment for (``run_short``)
        self.short_jobs: list[str] = []
        real_submit = DiskThreadPoolService._submit

        def counted(pool: DiskThreadPoolService, deferred: Any, function: Any, args: Any, waiter: Any) -> Any:
            if self.recorder.recording:
                # A run_short batch is one pool job: recorded as the jobs it holds.
                inner = args[0].jobs if function is diskpool._run_batch else [(None, function, ())]
                for _, job, _ in inner:
                    name = getattr(job, "__qualname__", repr(job))
                    self.jobs.append(name)
                    if waiter is not None:
                        self.short_jobs.append(name)
            return real_submit(pool, deferred, function, args, waiter)

        self.patch(DiskThreadPoolService, "_submit", counted)
        uploads = embed(
            make_config(
                self.root, enable_get_retries=False, max_upload_size=50 * 1024 * 1024,
                health_on_main_port=True, delete_files=True, delete_files_after_period=86400.0,
            ),
            reactor=reactor,
            handle_sighup=False,
        )
        self.retention = next(s for s in uploads.service if isinstance(s, RetentionService))
        uploads.service.startService()
        self.addCleanup(uploads.service.stopService)
        site: Any = uploads.site
        port = reactor.listenTCP(0, site, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        self.port = cast(IPv4Address, port.getHost()).port
        return task.deferLater(reactor, 0.05, lambda: None)

    def url(self, name: str, size: int) -> str:
        path = f"{UUID}/{name}"
        return f"/upload/{path}?v={v1_mac(path, size)}"

    def get_path(self, name: str) -> str:
        return f"/upload/{UUID}/{name}"

    def client(self, function: Callable[..., Any], *args: Any, **kwargs: Any) -> Deferred[Any]:
        return threads.deferToThread(function, *args, **kwargs)

    @inlineCallbacks
    def put(self, name: str, data: bytes) -> Any:
        status, _, _ = yield self.client(request, self.port, "PUT", self.url(name, len(data)), body=data)
        self.assertEqual(status, 201)

    @inlineCallbacks
    def recorded(self, scenario: Callable[[], Deferred[Any]]) -> Any:
        """Run ``scenario`` with the recorder on, and a moment after (closes, cleanups)."""
        self.recorder.calls.clear()
        self.jobs.clear()
        self.short_jobs.clear()
        self.recorder.recording = True
        try:
            yield scenario()
            yield task.deferLater(reactor, 0.3, lambda: None)
        finally:
            self.recorder.recording = False

    @inlineCallbacks
    def recorded_request(self, method: str, name: str) -> Any:
        """One request for the file ``name``, recorded: (status, headers, body)."""
        answers: list[Any] = []

        @inlineCallbacks
        def scenario() -> Any:
            answers.append((yield self.client(request, self.port, method, self.get_path(name))))

        yield self.recorded(scenario)
        return answers[0]

    def assert_off_reactor(self, *expected_on_pool: str) -> None:
        """No call on the reactor thread; the pool made (at least) ``expected_on_pool``."""
        pool = {call.function for call in self.recorder.on_pool()}
        for function in expected_on_pool:
            self.assertIn(function, pool, f"the recorder saw no {function} on the pool: {pool}")
        bad = self.recorder.on_reactor()
        if bad:
            self.fail(
                f"{len(bad)} filesystem calls on the store from the reactor thread:\n"
                + "\n".join(f"  {call.function}({call.target})" for call in bad)
            )

    # -- the download side

    @inlineCallbacks
    def test_get(self) -> Any:
        """GETs of a small file, a big file (sendfile) and a Range of it: every call on the pool."""
        small, big = os.urandom(5000), os.urandom(3 * 1024 * 1024 + 17)
        yield self.put("small.bin", small)
        yield self.put("big.bin", big)
        answers: list[Any] = []

        @inlineCallbacks
        def scenario() -> Any:
            answers.append((yield self.client(request, self.port, "GET", self.get_path("small.bin"))))
            answers.append((yield self.client(request, self.port, "GET", self.get_path("big.bin"))))
            answers.append(
                (yield self.client(
                    request, self.port, "GET", self.get_path("big.bin"), {"Range": "bytes=1000-"}
                ))
            )

        yield self.recorded(scenario)
        self.assertEqual([status for status, _, _ in answers], [200, 200, 206])
        self.assertEqual(answers[0][2], small)
        self.assertEqual(hashlib.sha256(answers[1][2]).digest(), hashlib.sha256(big).digest())
        self.assertEqual(answers[2][2], big[1000:])
        self.assert_off_reactor("stat", "open", "fstat", "pread", "sendfile", "close")

    @inlineCallbacks
    def test_head(self) -> Any:
        """HEAD looks the file up on the pool and never opens it."""
        yield self.put("h.txt", b"hello")
        status, headers, _ = yield self.recorded_request("HEAD", "h.txt")
        self.assertEqual(status, 200)
        self.assertEqual(headers["content-length"], "5")
        self.assert_off_reactor("stat")
        opened = [call for call in self.recorder.calls if call.function == "open"
                  and call.target.endswith("h.txt")]
        self.assertEqual(opened, [])

    # -- housekeeping

    @inlineCallbacks
    def test_housekeeping(self) -> Any:
        """
        A retention sweep that deletes an old file (listing, delete and pruning,
        tombstone, report, the sweep lock), a /healthz probe and a second of the
        timers (ban sync's unban requests): every call on the pool.
        """
        yield self.put("old.bin", b"o" * 1000)
        yield self.put("new.bin", b"n" * 10)
        os.utime(self.root / UUID / "old.bin", (1_000_000_000, 1_000_000_000))
        answers: list[Any] = []

        @inlineCallbacks
        def scenario() -> Any:
            for _ in range(100):  # the start-up sweep may still be running
                sweeping = self.retention.sweep()
                if sweeping is not None:
                    break
                yield task.deferLater(reactor, 0.05, lambda: None)
            answers.append((yield sweeping))
            answers.append((yield self.client(request, self.port, "GET", "/healthz")))
            yield task.deferLater(reactor, 1.2, lambda: None)

        yield self.recorded(scenario)
        result, (status, _, body) = answers
        self.assertEqual(result.deleted, {"age": 1})
        self.assertFalse((self.root / UUID / "old.bin").exists())
        self.assertEqual((status, body), (200, b'{"status": "ok", "store": "writable"}\n'))
        self.assert_off_reactor("scandir", "unlink", "fcntl.flock", "mkdir", "write")

    # -- the upload side

    @inlineCallbacks
    def test_put(self) -> Any:
        """A PUT: admission, the body's writes, the commit, all on the pool."""
        data = os.urandom(300_000)
        yield self.recorded(lambda: self.put("p.bin", data))
        self.assertEqual((self.root / UUID / "p.bin").read_bytes(), data)
        self.assert_off_reactor("open", "write", "link")


    # -- what a small request costs on the pool (counts, not times: issue 12)

    @inlineCallbacks
    def test_small_put_budget(self) -> Any:
        """A 4 KiB PUT whose body came with its headers: one pool job (admit, write, commit)."""
        # counts, not times: never give up waiting
        self.patch(diskpool, "SHORT_WAIT", 10.0)
        self.patch(diskpool, "SHORT_WAIT_MAX", 10.0)
        yield self.put("warm.bin", b"w" * 4096)  # the parent directory exists, as in operation
        data = os.urandom(4096)
        statuses: list[int] = []

        @inlineCallbacks
        def put() -> Any:
            statuses.append((yield self.client(put_in_one_write, self.port, self.url("small.bin", 4096), data)))

        yield self.recorded(put)
        self.assertEqual(statuses, [201])
        self.assertEqual((self.root / UUID / "small.bin").read_bytes(), data)
        self.assertEqual(self.jobs, ["FilesystemBackend._store_whole"])
        self.assertEqual(self.short_jobs, self.jobs)  # the reactor waited for it, off its thread
        self.assert_off_reactor("open", "writev", "setxattr", "link", "fsync")
        calls = [call.function for call in self.recorder.calls]
        self.assertLessEqual(len(calls), SMALL_PUT_CALLS, calls)

    @inlineCallbacks
    def test_uncached_get_budget(self) -> Any:
        """The first GET of a small file: one pool job, metadata read from the file's attribute."""
        data = os.urandom(4096)
        yield self.put("g.bin", data)
        status, _, body = yield self.recorded_request("GET", "g.bin")
        self.assertEqual(status, 200)
        self.assertEqual(body, data)
        self.assertEqual(len(self.jobs), 1, self.jobs)
        self.assertEqual(self.short_jobs, self.jobs)  # a run_short job: the stat, open and read
        self.assert_off_reactor("open", "getxattr", "pread")
        calls = [call.function for call in self.recorder.calls]
        # A buffered file object (open(), io.open, os.fdopen) costs hidden fstat, ioctl
        # and lseek calls: none on the request path.
        self.assertEqual([c for c in calls if c in ("builtins.open", "io.open")], [], calls)
        self.assertLessEqual(len(calls), SMALL_GET_CALLS, calls)

    @inlineCallbacks
    def test_resumed_put(self) -> Any:
        """An X-Session-Token PUT dropped part-way, its offset asked with HEAD, resumed with Content-Range."""
        data = os.urandom(400_000)
        token = "reactor-thread-token-1"
        name = "r.bin"
        answers: list[Any] = []

        @inlineCallbacks
        def scenario() -> Any:
            yield self.client(interrupted_put, self.port, self.url(name, len(data)), len(data), token,
                              data[:150_000])
            offset = 0
            for _ in range(100):
                status, headers, _ = yield self.client(
                    request, self.port, "HEAD", self.url(name, len(data)), {"X-Session-Token": token}
                )
                if status == 200 and int(headers.get("upload-offset", 0)) > 0:
                    offset = int(headers["upload-offset"])
                    break
                yield task.deferLater(reactor, 0.05, lambda: None)
            self.assertGreater(offset, 0)
            answers.append((yield self.client(
                request, self.port, "PUT", self.url(name, len(data)),
                {"X-Session-Token": token,
                 "Content-Range": f"bytes {offset}-{len(data) - 1}/{len(data)}"},
                data[offset:],
            )))

        yield self.recorded(scenario)
        self.assertEqual(answers[0][0], 201)
        self.assertEqual((self.root / UUID / name).read_bytes(), data)
        self.assert_off_reactor("open", "write", "link")


    @inlineCallbacks
    def test_tus_patch(self) -> Any:
        """tus: a creation POST, then two PATCHes that finish the upload."""
        data = os.urandom(200_000)
        name = "t.bin"
        tus = {"Tus-Resumable": "1.0.0"}
        statuses: list[int] = []

        @inlineCallbacks
        def scenario() -> Any:
            status, _, _ = yield self.client(
                request, self.port, "POST", self.url(name, len(data)),
                {**tus, "Upload-Length": str(len(data)), "Content-Length": "0"},
            )
            statuses.append(status)
            for offset in (0, 120_000):
                chunk = data[offset : offset + 120_000]
                status, _, _ = yield self.client(
                    request, self.port, "PATCH", self.url(name, len(data)),
                    {**tus, "Content-Type": "application/offset+octet-stream",
                     "Upload-Offset": str(offset)},
                    chunk,
                )
                statuses.append(status)

        yield self.recorded(scenario)
        self.assertEqual(statuses, [201, 204, 204])
        self.assertEqual((self.root / UUID / name).read_bytes(), data)
        self.assert_off_reactor("open", "write", "link")



class RecorderTests(TestCase):
    """The recorder itself: it sees store calls on any thread and ignores the rest."""

    def test_sees_calls_and_threads(self) -> Any:
        """A store open/read/close on a thread and a stat on this one are recorded as such."""
        root = Path(self.mktemp()).resolve()
        root.mkdir()
        (root / "f").write_bytes(b"abc")
        recorder = StoreCallRecorder(root)
        recorder.install(self.patch)
        recorder.recording = True
        os.stat(root / "f")
        outside = Path(self.mktemp()).resolve()
        outside.write_bytes(b"x")
        os.stat(outside)

        def on_thread() -> None:
            fd = os.open(root / "f", os.O_RDONLY)
            os.pread(fd, 3, 0)
            os.close(fd)

        thread = threading.Thread(target=on_thread, name="hmacfs-disk-test")
        thread.start()
        thread.join()
        recorder.recording = False
        self.assertEqual(
            [(call.function, call.on_reactor) for call in recorder.calls],
            [("stat", True), ("open", False), ("pread", False), ("close", False)],
        )
