# -*- test-case-name: tests.test_state -*-
"""
Where the state of uploads in progress lives besides the store: the
one-writer locks and the progress records of resumable uploads.

Two backends behind one interface (``IUploadState``):

* ``EmbeddedState`` (``RedisAddr`` empty, the default): locks in this
  process.  The store itself does the rest: the partial file's length is the
  progress and its sidecar record the binding, so nothing is lost when the
  daemon restarts, and ``flock`` on the partial file keeps other processes
  out.
* ``RedisState`` (``RedisAddr`` set): the same locks shared by every node
  through Redis (``SET NX PX``, compare-and-delete on release, refreshed while
  held), plus ``upload_progress:<token>`` records for other nodes and tools.
  It always keeps the embedded lock too, so when Redis is unreachable it
  carries on with local state: it never fails an upload because of Redis, and
  it re-registers the locks it holds once Redis is back.

``StateService`` owns the Redis connection, the one way to reach Redis, and
the backends that use it: ``state`` (the above), ``bans`` and ``locks`` (the
shared bans and named locks of ``hmacfs.state.shared``).  It connects at ``startService``,
reconnects in the background (``RetryDelay`` apart for ``MaxRetries`` tries,
then every 30 s or ``RetryDelay`` if longer), says whether it is
``connected`` and logs an outage once, not once per command.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable
from typing import Any

from twisted.application.internet import ClientService
from twisted.application.service import Service
from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import Interface, implementer

from hmacfs.logs import log_router
from hmacfs.periodic import PeriodicService
from hmacfs.state.connection import RedisFactory, parse_redis_address, redis_endpoint
from hmacfs.state.shared import (
    RELEASE_SCRIPT,
    BanShare,
    EmbeddedBanShare,
    EmbeddedLocks,
    NamedLocks,
    RedisBanShare,
    RedisLocks,
)

log = Logger(observer=log_router)

#: Lifetime of a Redis writer lock; the holder refreshes it every third of it,
#: so a node that dies lets go of its uploads within this time.
LOCK_TTL = 30.0
#: The slow retry pace once MaxRetries quick reconnection attempts have failed.
SLOW_RETRY = 30.0

# 1: refreshed, 2: taken again (it had expired, e.g. during an outage), 0: someone else's.
_REFRESH = """
local holder = redis.call('get', KEYS[1])
if holder == ARGV[1] then redis.call('pexpire', KEYS[1], ARGV[2]) return 1 end
if not holder then redis.call('set', KEYS[1], ARGV[1], 'PX', ARGV[2]) return 2 end
return 0
"""
_STEAL = """
if redis.call('get', KEYS[1]) == ARGV[1] then
  redis.call('set', KEYS[1], ARGV[2], 'PX', ARGV[3]) return 1
end
return 0
"""


def node_identity() -> str:
    """This process, as a lock owner: host, pid and a random part (pids are reused)."""
    return f"{socket.gethostname()}/{os.getpid()}/{os.urandom(4).hex()}"


def owner_host(owner: str) -> str:
    return owner.split("/", 1)[0]


def lock_key(key: str) -> str:
    return f"hmacfs:lock:{key}"


def progress_key(token: str) -> str:
    """The original server's name for a session's progress, kept for its tools."""
    return f"upload_progress:{token}"


def session_key(token: str) -> str:
    """Which upload a progress record belongs to (path key, size, MAC fingerprint)."""
    return f"upload_session:{token}"


class IUploadState(Interface):
    """Writer locks and progress records of uploads in progress."""

    def acquire(key: str, owner: str) -> Deferred[bool]:
        """Fire True if ``owner`` now holds the writer lock of upload ``key``, else False."""

    def release(key: str, owner: str) -> Deferred[None]:
        """Let go of the lock if ``owner`` still holds it."""

    def record_progress(token: str, binding: str, offset: int, ttl: float) -> Deferred[None]:
        """Remember that ``offset`` bytes of the upload ``binding`` are on disk, for ``ttl`` s."""

    def progress(token: str) -> Deferred[tuple[str, int] | None]:
        """Fire ``(binding, offset)`` recorded for ``token``, or None."""

    def forget(token: str) -> Deferred[None]:
        """Drop the progress record (the upload is stored or gone)."""


@implementer(IUploadState)
class EmbeddedState:
    """
    The state of one process: locks in a dict, progress records in a dict with
    expiry.  The durable truth (bytes, binding) is the store's partial file and
    sidecar record; these records only serve whoever asks this process.
    """

    def __init__(self, clock: IReactorTime) -> None:
        self.clock = clock
        self.locks: dict[str, str] = {}
        self._progress: dict[str, tuple[str, int, float]] = {}

    def acquire(self, key: str, owner: str) -> Deferred[bool]:
        holder = self.locks.get(key)
        if holder is not None and holder != owner:
            return succeed(False)
        self.locks[key] = owner
        return succeed(True)

    def release(self, key: str, owner: str) -> Deferred[None]:
        if self.locks.get(key) == owner:
            del self.locks[key]
        return succeed(None)

    def record_progress(self, token: str, binding: str, offset: int, ttl: float) -> Deferred[None]:
        self._progress[token] = (binding, offset, self.clock.seconds() + ttl)
        return succeed(None)

    def progress(self, token: str) -> Deferred[tuple[str, int] | None]:
        entry = self._progress.get(token)
        if entry is None:
            return succeed(None)
        binding, offset, expires = entry
        if self.clock.seconds() >= expires:
            del self._progress[token]
            return succeed(None)
        return succeed((binding, offset))

    def forget(self, token: str) -> Deferred[None]:
        self._progress.pop(token, None)
        return succeed(None)


@implementer(IUploadState)
class RedisState:
    """
    Locks and progress in Redis, shared by every node, with the embedded state
    underneath for when Redis is unreachable.

    ``writer_lock_free(key)`` says (or fires a Deferred saying: the store's
    ``IStore.writer_lock_free``, off the reactor thread) whether no process on
    this host holds the upload's partial file: a Redis lock held by an owner on this host whose
    file lock is free belongs to a process that died (``kill -9``), and is
    taken over at once instead of after ``LOCK_TTL``.
    """

    def __init__(
        self,
        service: StateService,
        local: EmbeddedState,
        *,
        writer_lock_free: Callable[[str], bool | Deferred[bool]] = lambda key: False,
        lock_ttl: float = LOCK_TTL,
    ) -> None:
        self.service = service
        self.local = local
        self.writer_lock_free = writer_lock_free
        self.lock_ttl = lock_ttl
        #: locks this process holds (or should hold) in Redis: key -> owner
        self.held: dict[str, str] = {}
        self.host = socket.gethostname()

    def _redis(self) -> Any:
        return self.service.client()

    def acquire(self, key: str, owner: str) -> Deferred[bool]:
        return Deferred.fromCoroutine(self._acquire(key, owner))

    async def _acquire(self, key: str, owner: str) -> bool:
        if not await self.local.acquire(key, owner):
            return False
        client = self._redis()
        if client is None:
            self.held[key] = owner
            return True
        px = int(self.lock_ttl * 1000)
        try:
            if await client.set(lock_key(key), owner, pexpire=px, only_if_not_exists=True):
                self.held[key] = owner
                return True
            holder = await client.get(lock_key(key))
            if holder == owner:
                taken = True
            elif holder is None:  # expired between the two commands
                taken = await client.set(lock_key(key), owner, pexpire=px, only_if_not_exists=True)
            elif owner_host(str(holder)) == self.host and await maybeDeferred(
                self.writer_lock_free, key  # type: ignore[call-overload]  # bool or Deferred
            ):
                log.info("taking over the lock of {key} from a dead process", key=key)
                taken = await client.eval(_STEAL, [lock_key(key)], [holder, owner, px])
            else:
                taken = False
        except Exception as error:  # noqa: BLE001 - any Redis failure means local state
            self.service.command_failed(error)
            self.held[key] = owner
            return True
        if taken:
            self.held[key] = owner
            return True
        await self.local.release(key, owner)
        return False

    def release(self, key: str, owner: str) -> Deferred[None]:
        self.local.release(key, owner)
        if self.held.get(key) == owner:
            del self.held[key]
        return self._command(lambda c: c.eval(RELEASE_SCRIPT, [lock_key(key)], [owner]))

    def record_progress(self, token: str, binding: str, offset: int, ttl: float) -> Deferred[None]:
        self.local.record_progress(token, binding, offset, ttl)
        px = max(1, int(ttl * 1000))

        def write(client: Any) -> Deferred[object]:
            first: Deferred[object] = client.set(session_key(token), binding, pexpire=px)
            second: Deferred[object] = client.set(progress_key(token), offset, pexpire=px)
            return first.addCallback(lambda _: second)

        return self._command(write)

    def progress(self, token: str) -> Deferred[tuple[str, int] | None]:
        return Deferred.fromCoroutine(self._progress(token))

    async def _progress(self, token: str) -> tuple[str, int] | None:
        client = self._redis()
        if client is not None:
            try:
                binding = await client.get(session_key(token))
                offset = await client.get(progress_key(token))
            except Exception as error:  # noqa: BLE001
                self.service.command_failed(error)
            else:
                if binding is None or offset is None:
                    return None
                return str(binding), int(offset)
        return await self.local.progress(token)

    def forget(self, token: str) -> Deferred[None]:
        self.local.forget(token)
        return self._command(lambda c: c.delete([progress_key(token), session_key(token)]))

    def refresh_locks(self) -> Deferred[None]:
        """Extend every lock held here; take again those that expired during an outage."""
        return Deferred.fromCoroutine(self._refresh_locks())

    async def _refresh_locks(self) -> None:
        client = self._redis()
        if client is None:
            return
        px = int(self.lock_ttl * 1000)
        for key, owner in list(self.held.items()):
            try:
                result = await client.eval(_REFRESH, [lock_key(key)], [owner, px])
            except Exception as error:  # noqa: BLE001
                self.service.command_failed(error)
                return
            if result == 0 and self.held.get(key) == owner:
                log.warn(
                    "the Redis lock of upload {key} is held elsewhere; this node keeps "
                    "writing it under its local lock",
                    key=key,
                )

    def _command(self, run: Callable[[Any], Deferred[Any]]) -> Deferred[None]:
        client = self._redis()
        if client is None:
            return succeed(None)
        try:
            d = run(client)
        except Exception as error:  # noqa: BLE001 - e.g. "Not connected" raised synchronously
            self.service.command_failed(error)
            return succeed(None)
        d.addErrback(lambda failure: self.service.command_failed(failure.value))
        return d


class StateService(Service):
    """
    Owns the Redis connection (when ``RedisAddr`` is set) and the backends:
    ``state`` (upload locks and progress), ``bans`` (shared failure counts and
    blocks) and ``locks`` (named locks between nodes), embedded or Redis.

    They are usable before and without a connection: while Redis is
    unreachable ``RedisState`` works on local state and the others share nothing.
    """

    def __init__(
        self,
        reactor: Any,
        *,
        redis_addr: str = "",
        redis_password: str = "",
        redis_db: int = 0,
        max_retries: int = 5,
        retry_delay: float = 2.0,
        writer_lock_free: Callable[[str], bool | Deferred[bool]] = lambda key: False,
        endpoint: Any = None,
    ) -> None:
        self.reactor = reactor
        self.local = EmbeddedState(reactor)
        self.address = parse_redis_address(redis_addr, redis_password, redis_db) if redis_addr else None
        self.max_retries = max_retries
        self.retry_delay = retry_delay
        self.connected = False
        self.state: Any
        self.bans: BanShare
        self.locks: NamedLocks
        if self.address is None:
            self.state = self.local
            self.bans = EmbeddedBanShare()
            self.locks = EmbeddedLocks()
        else:
            self.state = RedisState(self, self.local, writer_lock_free=writer_lock_free)
            self.bans = RedisBanShare(self.client)
            self.locks = RedisLocks(self.client)
        self._endpoint = endpoint
        self._client_service: ClientService | None = None
        self._protocol: Any = None
        self._refresh = PeriodicService(
            reactor, LOCK_TTL / 3, self._refresh_locks, what="refreshing Redis locks"
        )
        self._down_since: float | None = None
        self._failed_attempts = 0
        self._slow_logged = False
        #: times Redis went from reachable to unreachable (for tests and metrics)
        self.outages = 0

    @property
    def backend(self) -> str:
        return "embedded" if self.address is None else "redis"

    def client(self) -> Any:
        """The connected txredisapi protocol, or None while Redis is unreachable."""
        return self._protocol if self.connected else None

    def connected_within(self, timeout: float) -> Deferred[bool]:
        """Fire whether Redis is connected, waiting up to ``timeout`` s for it (a
        one-shot command such as ``hmacfs unban``; embedded: False at once)."""
        return Deferred.fromCoroutine(self._connected_within(timeout))

    async def _connected_within(self, timeout: float) -> bool:
        if self.address is None:
            return False
        deadline = self.reactor.seconds() + timeout
        while not self.connected and self.reactor.seconds() < deadline:
            await deferLater(self.reactor, 0.05)
        return self.connected

    # lifecycle

    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]  # Twisted: unannotated
        if self.address is None:
            log.info("upload state: embedded (no RedisAddr)")
            return
        endpoint = self._endpoint or redis_endpoint(self.reactor, self.address)
        factory = RedisFactory(self.reactor, self.address, self)
        self._down_since = time.monotonic()
        self._client_service = ClientService(
            endpoint,
            factory,
            retryPolicy=self._retry_policy,
            clock=self.reactor,
            prepareConnection=self._prepare,
        )
        self._client_service.startService()
        assert isinstance(self.state, RedisState)
        self._refresh.startService()

    def stopService(self) -> Deferred[None]:
        super().stopService()  # type: ignore[no-untyped-call]  # Twisted: unannotated
        self._refresh.stopService()  # a refresh is synchronous: nothing to wait for
        if self._client_service is None:
            return succeed(None)
        service, self._client_service = self._client_service, None
        self.connected = False
        d = service.stopService()
        return d if d is not None else succeed(None)

    # connection events

    def _retry_policy(self, attempt: int) -> float:
        self._failed_attempts = attempt
        if attempt <= self.max_retries:
            return self.retry_delay
        if not self._slow_logged:
            self._slow_logged = True
            assert self.address is not None
            log.warn(
                "Redis at {address} still unreachable after {attempts} attempts; "
                "serving from local state and retrying every {delay:.0f}s",
                address=self.address.shown,
                attempts=attempt,
                delay=max(self.retry_delay, SLOW_RETRY),
            )
        return max(self.retry_delay, SLOW_RETRY)

    def _prepare(self, proto: Any) -> Deferred[Any]:
        """Ready once AUTH/SELECT went through; fail if the connection drops first."""
        ready: Deferred[Any] = Deferred()

        def connected(p: object) -> None:
            if not ready.called:
                ready.callback(p)

        proto.whenConnected().addCallback(connected)

        def dropped(inner: object) -> None:
            # txredisapi fires this with its own protocol (``proto`` is
            # ClientService's proxy around it), the same object ``_ready`` got.
            if not ready.called:
                ready.errback(Failure(ConnectionError("Redis closed the connection")))
            else:
                self._lost(inner)

        proto.whenDisconnected().addCallback(dropped)
        ready.addCallback(self._ready)
        return ready

    def _ready(self, proto: Any) -> None:
        assert self.address is not None
        self._protocol = proto
        self.connected = True
        self._failed_attempts = 0
        self._slow_logged = False
        if self._down_since is not None and self.outages:
            log.info(
                "Redis at {address} reachable again after {seconds:.1f}s",
                address=self.address.shown,
                seconds=time.monotonic() - self._down_since,
            )
        else:
            log.info("upload state: Redis at {address}", address=self.address.shown)
        self._down_since = None
        # Locks taken while Redis was away are registered there now.
        self._refresh_locks()

    def _lost(self, proto: Any) -> None:
        if proto is not self._protocol:
            return
        self._protocol = None
        self._went_down("connection lost")

    def _went_down(self, why: str) -> None:
        was_connected = self.connected
        self.connected = False
        if was_connected and self.running:
            self.outages += 1
            self._down_since = time.monotonic()
            assert self.address is not None
            log.warn(
                "Redis at {address} unreachable ({why}): uploads continue on local "
                "state; reconnecting in the background",
                address=self.address.shown,
                why=why,
            )

    def command_failed(self, error: BaseException) -> None:
        """A command failed (timeout, lost connection): count Redis as down until it is back."""
        if not self.connected:
            return
        self._went_down(f"{type(error).__name__}: {error}")
        proto = self._protocol
        self._protocol = None
        transport = getattr(proto, "transport", None)
        if transport is not None:
            # Let ClientService notice and reconnect.
            transport.abortConnection()

    def note_refused(self, why: str) -> None:
        log.error("{why}", why=why)

    def _refresh_locks(self) -> None:
        state = self.state
        if isinstance(state, RedisState) and self.connected:
            state.refresh_locks().addErrback(lambda f: log.failure("refreshing Redis locks", f))


__all__ = [
    "EmbeddedState",
    "IUploadState",
    "RedisState",
    "StateService",
    "node_identity",
]
