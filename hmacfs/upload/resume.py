# -*- test-case-name: tests.test_resume -*-
"""
Resumable uploads: what binds an interrupted upload to the client that may
finish it, who is writing which upload right now, and the clean-up of
uploads nobody comes back for.

An interrupted upload keeps its partial data in the store (``IStore``) and a sidecar
``UploadRecord``: the signed size, the signed Content-Type, a fingerprint of
the MAC and the client's ``X-Session-Token``.  A request may continue the
upload only if its MAC verifies for that size and type and its fingerprint,
session token and offset match; the offset is always the partial file's
length, the bytes that actually reached the disk.

``Uploads`` is the one-writer rule.  A request that wants to write takes a
``Lease`` on the upload: the in-process registry and the state backend's lock
(Redis when configured, so across nodes), and then the partial file's
``flock``.  A second request either takes over (a resume by the same client:
its old connection is dead, so it is closed and its bytes are kept up to the
last write) or gets 409.  A writer in another process or on another node is
asked to let go through a marker file it polls, and the client is told to
retry in a second.

Progress goes to the state backend at most every ``checkpoint_bytes`` or
``checkpoint_seconds`` (the receiver decides, after an ``fdatasync``, so the
number is never ahead of the disk), never per chunk.
"""

from __future__ import annotations

import hashlib
import re
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import attrs
from twisted.application.service import Service
from twisted.internet.defer import Deferred, fail, gatherResults, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from hmacfs.errors import Refusal
from hmacfs.logs import log_router
from hmacfs.periodic import PeriodicService
from hmacfs.signing.auth import SCHEMES
from hmacfs.state.store import StateService, node_identity
from hmacfs.storage.interface import IStore
from hmacfs.storage.layout import path_key

log = Logger(observer=log_router)

#: Write progress records at most this often (bytes, seconds), whichever first.
CHECKPOINT_BYTES = 8 * 1024 * 1024
CHECKPOINT_SECONDS = 1.0
#: How often a writer looks for a takeover request from another process.
TAKEOVER_POLL = 1.0
#: What a client is told to wait before retrying when another process lets go.
TAKEOVER_RETRY_AFTER = 2

_CONTENT_RANGE = re.compile(rb"^\s*bytes\s+([0-9]{1,19})-([0-9]{1,19})/([0-9]{1,19})\s*$", re.I)


def _retry_after() -> tuple[tuple[bytes, bytes], ...]:
    return ((b"Retry-After", str(TAKEOVER_RETRY_AFTER).encode("ascii")),)


def offset_header(offset: int) -> tuple[bytes, bytes]:
    return (b"Upload-Offset", str(offset).encode("ascii"))


def parse_content_range(value: bytes) -> tuple[int, int, int]:
    """
    ``bytes first-last/total`` of a resumed PUT as ``(first, last, total)``.

    Raises ``ValueError`` for anything else (``*``, a missing total, last
    before first or at/after the total).
    """
    match = _CONTENT_RANGE.match(value)
    if match is None:
        raise ValueError("Content-Range must be bytes <first>-<last>/<total>")
    first, last, total = (int(group) for group in match.groups())
    if not first <= last < total:
        raise ValueError("Content-Range: need first <= last < total")
    return first, last, total


def mac_fingerprint(query: Mapping[bytes, Sequence[bytes]]) -> str | None:
    """
    A fingerprint of the MAC that authorised a request (the strongest present
    parameter, as the Authenticator checks it), so a record can say which
    signed URL it belongs to without storing the MAC itself.
    """
    for scheme in SCHEMES:
        values = query.get(scheme.encode("ascii"))
        if values:
            digest = hashlib.sha256(b"hmacfs-upload\0" + scheme.encode() + b"\0")
            digest.update(values[0].strip().lower())
            return digest.hexdigest()[:32]
    return None


@attrs.frozen
class UploadRecord:
    """The sidecar of an upload in progress: who may continue it, and what it is."""

    path: str
    size: int
    content_type: str
    #: the Content-Type the MAC signed (v2/token), None when the client sent none
    signed_type: str | None
    #: ``mac_fingerprint`` of the signed URL
    mac: str
    #: the client's X-Session-Token, if it sent one
    token: str | None = None
    #: whole-file SHA-256 the client announced (hex), checked at the end
    sha256: str | None = None
    #: "put" or "tus": which protocol created it
    protocol: str = "put"
    #: tus Upload-Metadata as the client sent it
    metadata: str | None = None
    created: float = 0.0

    def to_dict(self) -> dict[str, object]:
        return attrs.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, object]) -> UploadRecord | None:
        """The record, or None for a sidecar this version cannot use (then the upload starts over)."""
        try:
            size = data["size"]
            mac = data["mac"]
            if not isinstance(size, int) or isinstance(size, bool) or not isinstance(mac, str):
                return None
            return cls(
                path=str(data["path"]),
                size=size,
                content_type=str(data.get("content_type") or "application/octet-stream"),
                signed_type=_optional_str(data.get("signed_type")),
                mac=mac,
                token=_optional_str(data.get("token")),
                sha256=_optional_str(data.get("sha256")),
                protocol=str(data.get("protocol") or "put"),
                metadata=_optional_str(data.get("metadata")),
                created=float(data.get("created") or 0.0),  # type: ignore[arg-type]
            )
        except (KeyError, TypeError, ValueError):
            return None

    @property
    def signed_type_bytes(self) -> bytes | None:
        return None if self.signed_type is None else self.signed_type.encode("latin-1")

    def binding(self) -> str:
        """What a progress record names: the upload (path key), its size and its URL."""
        return f"{path_key(self.path.split('/'))} {self.size} {self.mac}"

    def progress_token(self) -> str:
        """The key of this upload's progress record: the session token, else the path key."""
        return self.token or path_key(self.path.split("/"))


def _optional_str(value: object) -> str | None:
    return value if isinstance(value, str) else None


@attrs.frozen
class UploadEnd:
    """How a writer finished with its partial file."""

    #: "stored" (committed), "kept" (resumable) or "removed"
    outcome: str
    #: bytes in the partial file (or in the stored file)
    offset: int
    #: False when the request was cut off (client gone, taken over, write error)
    clean: bool = True


class Lease:
    """One request's right to write one upload, from admission to the end of its writer."""

    __slots__ = (
        "uploads", "key", "segments", "owner", "started", "receiver", "record", "released",
        "clear_marker", "_waiters",
    )

    def __init__(self, uploads: Uploads, key: str, segments: tuple[str, ...], owner: str) -> None:
        self.uploads = uploads
        self.key = key
        self.segments = segments
        self.owner = owner
        self.started = time.time()
        self.receiver: Any = None
        self.record: UploadRecord | None = None
        self.released = False
        #: whether a takeover marker may name this upload (a resume took it, or another
        #: process asked for it): only then is the marker removed at the end, so that a
        #: plain upload costs no store call for it (``sweep_uploads`` removes strays)
        self.clear_marker = False
        self._waiters: list[Deferred[None]] = []

    def attach(self, receiver: Any, record: UploadRecord | None) -> None:
        """The writer is running: a takeover now closes its connection."""
        self.receiver = receiver
        self.record = record

    def when_released(self) -> Deferred[None]:
        if self.released:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._waiters.append(d)
        return d

    def release(self, end: UploadEnd | None = None) -> None:
        """The writer closed the partial file (or never opened it). Idempotent."""
        if self.released:
            return
        self.released = True
        self.uploads._released(self, end)
        waiters, self._waiters = self._waiters, []
        for d in waiters:
            d.callback(None)


class Uploads:
    """
    The uploads this process is writing, their locks, progress and takeovers.

    Knows nothing of HTTP: the upload policy asks for a lease, opens the
    partial file, attaches its receiver and releases when the receiver ends.
    """

    def __init__(
        self,
        *,
        store: IStore,
        state: Any,
        clock: IReactorTime,
        ttl: float = 600.0,
        record_progress: bool = False,
        checkpoint_bytes: int = CHECKPOINT_BYTES,
        checkpoint_seconds: float = CHECKPOINT_SECONDS,
        owner_prefix: str | None = None,
        now: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.state = state
        self.clock = clock
        self.ttl = ttl
        #: whether progress records are worth writing (only a shared backend reads them)
        self.record_progress = record_progress
        self.checkpoint_bytes = checkpoint_bytes
        self.checkpoint_seconds = checkpoint_seconds
        self.owner_prefix = owner_prefix or node_identity()
        self._now = now
        self._serial = 0
        self.active: dict[str, Lease] = {}
        #: uploads whose last writer here ended normally (so the next one is no "resume")
        self._ended_cleanly: set[str] = set()
        self.takeovers = 0

    # leases

    def lock(self, segments: Sequence[str], *, takeover: bool) -> Deferred[Lease]:
        """
        Fire a ``Lease`` on the upload of ``segments``, or fail with a ``Refusal``.

        With ``takeover``, a writer of the same upload in this process is cut
        off first (its bytes are kept up to its last write); without, it means 409.
        """
        segs = tuple(segments)
        key = path_key(segs)
        current = self.active.get(key)
        if current is None:
            return self._acquire(key, segs, takeover)
        if not takeover or current.receiver is None:
            return fail(Refusal(409, "upload already in progress", _retry_after()))
        log.info("upload {path} taken over by a new request", path="/".join(segs))
        self.takeovers += 1
        released = current.when_released()
        current.receiver.take_over()
        return released.addCallback(lambda _: self.lock(segs, takeover=False))

    def _acquire(self, key: str, segments: tuple[str, ...], takeover: bool) -> Deferred[Lease]:
        self._serial += 1
        lease = Lease(self, key, segments, f"{self.owner_prefix}/{self._serial}")
        lease.clear_marker = takeover
        self.active[key] = lease

        def decided(held: bool) -> Lease | Deferred[Lease]:
            if held:
                return lease
            lease.released = True
            if self.active.get(key) is lease:
                del self.active[key]
            return self.busy_elsewhere(segments, takeover=takeover)

        def broken(failure: Failure) -> Lease:
            # The state backend promises local fallback; anything else is a bug,
            # but it must not wedge the upload: go on with the local lease.
            log.failure("upload state backend failed; using the local lock", failure)
            return lease

        return self.state.acquire(key, lease.owner).addCallbacks(decided, broken)

    def busy_elsewhere(self, segments: Sequence[str], *, takeover: bool) -> Deferred[Any]:
        """
        Fails with the refusal for an upload another process holds; with ``takeover``,
        once that process was asked to let go (so the client's retry succeeds).
        """
        if not takeover:
            return fail(Refusal(409, "upload already in progress", _retry_after()))
        refusal = Refusal(
            409, "upload in progress on another connection; it is being closed, retry",
            _retry_after(),
        )

        def asked(result: object) -> Any:
            if isinstance(result, Failure):
                log.failure("could not request a takeover of {path}", result, path="/".join(segments))
            raise refusal

        return self.store.request_takeover(segments).addBoth(asked)

    def _released(self, lease: Lease, end: UploadEnd | None) -> None:
        if self.active.get(lease.key) is lease:
            del self.active[lease.key]
        release = self.state.release(lease.key, lease.owner)
        release.addErrback(lambda f: log.failure("releasing upload lock", f))
        if end is not None and end.clean and end.outcome == "kept":
            if len(self._ended_cleanly) > 10_000:  # uploads swept away leave keys behind
                self._ended_cleanly.clear()
            self._ended_cleanly.add(lease.key)
        else:
            self._ended_cleanly.discard(lease.key)
        record = lease.record
        if end is not None and record is not None:
            token = record.progress_token()
            if end.outcome == "kept":
                self._write_progress(record, end.offset)
            else:
                self.state.forget(token).addErrback(lambda f: log.failure("forget progress", f))
        if end is not None and lease.clear_marker:
            self.store.clear_takeover(lease.segments).addErrback(lambda _: None)

    def continues_cleanly(self, segments: Sequence[str]) -> bool:
        """Whether the last writer of this upload (in this process) ended normally."""
        return path_key(tuple(segments)) in self._ended_cleanly

    # progress

    def progress_callback(self, record: UploadRecord) -> Callable[[int], None] | None:
        """What a receiver calls at its checkpoints (None: no records wanted)."""
        if not self.record_progress:
            return None
        return lambda offset: self._write_progress(record, offset)

    def _write_progress(self, record: UploadRecord, offset: int) -> None:
        if not self.record_progress:
            return
        d = self.state.record_progress(record.progress_token(), record.binding(), offset, self.ttl)
        d.addErrback(lambda f: log.failure("recording upload progress", f))

    def expires_at(self, segments: Sequence[str]) -> Deferred[float]:
        """When an idle upload will be removed (epoch seconds), for tus ``Upload-Expires``."""
        return self.store.upload_mtime(segments).addCallback(
            lambda mtime: (mtime if mtime is not None else self._now()) + self.ttl
        )

    def expires_after_write(self) -> float:
        """``expires_at`` of an upload that has just been written to (its mtime is now)."""
        return self._now() + self.ttl

    # other processes asking us to let go

    def poll_takeovers(self) -> Deferred[None]:
        """
        Close the connections of uploads another process has asked to take over.

        One store call for all the uploads written here (``IStore.takeovers_requested``),
        none on the reactor thread; the next poll waits for this one (``PeriodicService``),
        so a slow disk cannot pile them up.
        """
        leases = [lease for lease in self.active.values() if lease.receiver is not None]
        if not leases:
            return succeed(None)
        d = self.store.takeovers_requested([(lease.segments, lease.started) for lease in leases])
        return d.addCallbacks(self._asked, lambda _: None, callbackArgs=(leases,))

    def _asked(self, asked: list[bool], leases: list[Lease]) -> None:
        for lease, wanted in zip(leases, asked, strict=True):
            if wanted and not lease.released and lease.receiver is not None:
                log.info("upload {path} taken over by another process", path="/".join(lease.segments))
                self.takeovers += 1
                lease.clear_marker = True
                lease.receiver.take_over()


class PartialSweeper:
    """Removes uploads nobody has written to for ``ttl`` seconds (a reactor timer)."""

    def __init__(self, store: IStore, ttl: float) -> None:
        self.store = store
        self.ttl = ttl
        #: abandoned uploads removed since start (for metrics)
        self.removed_total = 0
        self._running = False

    def sweep(self) -> Deferred[int]:
        if self._running:
            return succeed(0)
        self._running = True

        def done(count: int) -> int:
            self._running = False
            self.removed_total += count
            if count:
                log.info("removed {count} abandoned partial uploads", count=count)
            return count

        def failed(failure: Failure) -> int:
            self._running = False
            log.failure("sweeping abandoned uploads failed", failure)
            return 0

        return self.store.sweep_uploads(self.ttl).addCallbacks(done, failed)


class ResumeService(Service):
    """The timers of resumable uploads: the abandoned-upload sweep and takeover polling."""

    def __init__(self, clock: IReactorTime, uploads: Uploads, sweeper: PartialSweeper) -> None:
        self.clock = clock
        self.uploads = uploads
        self.sweeper = sweeper
        self._timers: list[PeriodicService] = []

    @property
    def sweep_interval(self) -> float:
        return min(max(self.sweeper.ttl / 4, 1.0), 300.0)

    def startService(self) -> None:
        super().startService()
        self._timers = [
            PeriodicService(
                self.clock, self.sweep_interval, self.sweeper.sweep, what="sweeping abandoned uploads"
            ),
            PeriodicService(
                self.clock, TAKEOVER_POLL, self.uploads.poll_takeovers, what="polling for takeovers"
            ),
        ]
        for timer in self._timers:
            timer.startService()

    def stopService(self) -> Deferred[list[None]]:
        """Fires once a sweep still running has finished."""
        super().stopService()
        timers, self._timers = self._timers, []
        return gatherResults([timer.stopService() for timer in timers])


@attrs.define
class Resumable:
    """Everything resumable uploads add to a site: wired by ``hmacfs.service.site``."""

    uploads: Uploads
    state_service: StateService
    sweeper: PartialSweeper
    service: ResumeService

    @property
    def services(self) -> list[Service]:
        """Attach these to the serving process's MultiService (state first)."""
        return [self.state_service, self.service]


def make_resumable(config: Any, reactor: Any, store: IStore) -> Resumable:
    """The state backend, the upload registry and the timers for ``config``."""
    state_service = StateService(
        reactor,
        redis_addr=config.redis_addr,
        redis_password=config.redis_password,
        redis_db=config.redis_db,
        max_retries=config.max_retries,
        retry_delay=config.retry_delay,
        writer_lock_free=store.writer_lock_free,
    )
    ttl = float(getattr(config, "resume_ttl", 600.0))
    uploads = Uploads(
        store=store,
        state=state_service.state,
        clock=reactor,
        ttl=ttl,
        record_progress=state_service.address is not None,
    )
    sweeper = PartialSweeper(store, ttl)
    return Resumable(
        uploads=uploads,
        state_service=state_service,
        sweeper=sweeper,
        service=ResumeService(reactor, uploads, sweeper),
    )
