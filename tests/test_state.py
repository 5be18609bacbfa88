"""
The upload state backends: one contract (``StateContractMixin``) run against
the embedded state and against a real ``redis-server``; then what only Redis
does: shared locks, taking over a dead process's lock, outages and
reconnection (``StateService``).
"""

from __future__ import annotations

import socket
from collections.abc import Callable, Coroutine
from functools import wraps
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock, deferLater
from twisted.logger import LogLevel, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase, TestCase

from hmacfs.state.connection import parse_redis_address
from hmacfs.state.shared import (
    FOREVER,
    EmbeddedBanShare,
    EmbeddedLocks,
    RedisBanShare,
    RedisLocks,
)
from hmacfs.state.store import (
    SLOW_RETRY,
    EmbeddedState,
    IUploadState,
    RedisState,
    StateService,
    lock_key,
    progress_key,
    session_key,
)
from tests.redis_server import RedisServer, redis_for


def inline(test: Callable[..., Coroutine[Any, Any, None]]) -> Callable[..., Deferred]:
    """Run an ``async def`` test method as a Deferred (what trial waits for)."""

    @wraps(test)
    def run(self: Any) -> Deferred:
        return Deferred.fromCoroutine(test(self))

    return run


class StateContractMixin:
    """What every ``IUploadState`` does; ``state`` and ``wait`` come from the subclass."""

    state: Any
    wait: Callable[[float], Deferred]

    def test_provides_interface(self) -> None:
        """The backend declares the interface the upload code programs against."""
        self.assertTrue(IUploadState.providedBy(self.state))  # type: ignore[attr-defined]

    @inline
    async def test_lock_is_exclusive(self) -> None:
        """A held lock refuses another owner, is re-entrant for its owner, and frees on release."""
        self.assertTrue(await self.state.acquire("k1", "host/1/a"))
        self.assertFalse(await self.state.acquire("k1", "host/1/b"))
        self.assertTrue(await self.state.acquire("k1", "host/1/a"))
        self.assertTrue(await self.state.acquire("k2", "host/1/b"))
        await self.state.release("k1", "host/1/a")
        self.assertTrue(await self.state.acquire("k1", "host/1/b"))

    @inline
    async def test_release_by_other_owner_is_ignored(self) -> None:
        """Only the holder's release frees a lock (a late release never frees a newer holder's)."""
        self.assertTrue(await self.state.acquire("k3", "host/1/a"))
        await self.state.release("k3", "host/1/b")
        self.assertFalse(await self.state.acquire("k3", "host/1/c"))

    @inline
    async def test_progress_roundtrip_and_forget(self) -> None:
        """Progress is read back with its binding, replaced by newer records and forgotten."""
        self.assertIsNone(await self.state.progress("tok-1"))
        await self.state.record_progress("tok-1", "key 100 mac", 40, 60.0)
        self.assertEqual(await self.state.progress("tok-1"), ("key 100 mac", 40))
        await self.state.record_progress("tok-1", "key 100 mac", 80, 60.0)
        self.assertEqual(await self.state.progress("tok-1"), ("key 100 mac", 80))
        await self.state.forget("tok-1")
        self.assertIsNone(await self.state.progress("tok-1"))

    @inline
    async def test_progress_expires(self) -> None:
        """A progress record disappears after its TTL unless refreshed."""
        await self.state.record_progress("tok-2", "b", 1, 0.2)
        await self.wait(0.1)
        await self.state.record_progress("tok-2", "b", 2, 0.2)
        await self.wait(0.15)
        self.assertEqual(await self.state.progress("tok-2"), ("b", 2))
        await self.wait(0.15)
        self.assertIsNone(await self.state.progress("tok-2"))


class EmbeddedStateTests(StateContractMixin, TestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.state = EmbeddedState(self.clock)

    def wait(self, seconds: float) -> Deferred:
        self.clock.advance(seconds)
        d: Deferred = Deferred()
        d.callback(None)
        return d


class RedisMixin:
    """A real redis-server and a connected StateService on the real reactor."""

    retry_delay = 0.2

    def start_service(self, server: RedisServer, **kw: Any) -> Deferred:
        self.service = StateService(
            reactor,
            redis_addr=kw.pop("addr", server.addr),
            max_retries=kw.pop("max_retries", 3),
            retry_delay=self.retry_delay,
            **kw,
        )
        self.service.startService()
        self.addCleanup(self.service.stopService)  # type: ignore[attr-defined]
        return self.until(lambda: self.service.connected)

    def until(self, condition: Callable[[], bool], timeout: float = 10.0) -> Deferred:
        async def poll() -> None:
            waited = 0.0
            while not condition():
                if waited > timeout:
                    raise AssertionError(f"condition not met within {timeout}s")
                await deferLater(reactor, 0.02, lambda: None)
                waited += 0.02

        return Deferred.fromCoroutine(poll())


class RedisStateContractTests(StateContractMixin, RedisMixin, TestCase):
    def setUp(self) -> Deferred:
        self.redis = redis_for(self)
        d = self.start_service(self.redis)
        d.addCallback(lambda _: setattr(self, "state", self.service.state))
        return d

    def wait(self, seconds: float) -> Deferred:
        return deferLater(reactor, seconds, lambda: None)


class RedisOnlyTests(RedisMixin, TestCase):
    """Shared locks, dead holders, progress keys, outages."""

    def setUp(self) -> Deferred:
        self.redis = redis_for(self)
        self.free_keys: set[str] = set()
        return self.start_service(self.redis, writer_lock_free=self.free_keys.__contains__)

    @inline
    async def test_lock_lives_in_redis_with_expiry(self) -> None:
        """The lock is a Redis key with a PX expiry (SET NX PX), deleted on release."""
        state = self.service.state
        self.assertIsInstance(state, RedisState)
        self.assertTrue(await state.acquire("k", "me/1/a"))
        self.assertEqual(self.redis.command("GET", lock_key("k")), b"me/1/a")
        ttl = int(self.redis.command("PTTL", lock_key("k"))[1:])
        self.assertTrue(0 < ttl <= 30000, ttl)
        await state.release("k", "me/1/a")
        self.assertEqual(self.redis.command("EXISTS", lock_key("k")), b":0")

    @inline
    async def test_lock_shared_with_another_node(self) -> None:
        """A lock another node holds in Redis refuses us, though our local lock is free."""
        self.redis.command("SET", lock_key("k"), "otherhost/5/x", "PX", "30000")
        self.assertFalse(await self.service.state.acquire("k", f"{socket.gethostname()}/1/a"))
        # ... and our local lock was given back, so a later try is not blocked locally.
        self.redis.command("DEL", lock_key("k"))
        self.assertTrue(await self.service.state.acquire("k", f"{socket.gethostname()}/1/b"))

    @inline
    async def test_dead_local_holder_is_taken_over(self) -> None:
        """
        A lock left by a process on this host that no longer holds the partial file's
        flock (it was killed) is taken over at once; one whose file lock is still held
        (a live process) is not.
        """
        host = socket.gethostname()
        self.redis.command("SET", lock_key("dead"), f"{host}/99999/old", "PX", "30000")
        self.redis.command("SET", lock_key("alive"), f"{host}/99998/old", "PX", "30000")
        self.free_keys.add("dead")
        self.assertTrue(await self.service.state.acquire("dead", f"{host}/1/new"))
        self.assertEqual(self.redis.command("GET", lock_key("dead")), f"{host}/1/new".encode())
        self.assertFalse(await self.service.state.acquire("alive", f"{host}/1/new"))

    @inline
    async def test_progress_keys(self) -> None:
        """Progress is upload_progress:<token> (bytes) plus its binding, both with the TTL."""
        await self.service.state.record_progress("tok-abc", "key 10 mac", 7, 600.0)
        self.assertEqual(self.redis.command("GET", progress_key("tok-abc")), b"7")
        self.assertEqual(self.redis.command("GET", session_key("tok-abc")), b"key 10 mac")
        ttl = int(self.redis.command("PTTL", progress_key("tok-abc"))[1:])
        self.assertTrue(590000 < ttl <= 600000, ttl)

    @inline
    async def test_outage_local_fallback_and_reconnect(self) -> None:
        """
        With Redis down: connected goes False, locks and progress work locally and never
        raise, one warning is logged however many commands fail; when Redis is back the
        service reconnects and re-registers the locks taken meanwhile.
        """
        warnings: list[str] = []

        def observe(event: dict) -> None:
            if event.get("log_level") == LogLevel.warn and "unreachable" in event.get("log_format", ""):
                warnings.append(event["log_format"])

        globalLogPublisher.addObserver(observe)
        self.addCleanup(globalLogPublisher.removeObserver, observe)
        state = self.service.state
        self.redis.stop()
        await self.until(lambda: not self.service.connected)
        for n in range(5):
            self.assertTrue(await state.acquire(f"o{n}", "me/1/a"))
            await state.record_progress("t", "b", n, 60.0)
        self.assertFalse(await state.acquire("o1", "me/1/b"))  # the local lock still holds
        self.assertEqual(self.service.outages, 1)
        self.assertEqual(len(warnings), 1, warnings)
        self.redis.start()
        await self.until(lambda: self.service.connected)
        await self.until(lambda: self.redis.command("GET", lock_key("o3")) == b"me/1/a")

    @inline
    async def test_command_timeout_counts_as_outage(self) -> None:
        """A Redis that stops answering (SIGSTOP) is an outage after the reply timeout, not a hang."""
        import os
        import signal

        assert self.redis.process is not None
        os.kill(self.redis.process.pid, signal.SIGSTOP)
        try:
            started = reactor.seconds()
            self.assertTrue(await self.service.state.acquire("slow", "me/1/a"))
            self.assertLess(reactor.seconds() - started, 5.0)
            self.assertFalse(self.service.connected)
        finally:
            os.kill(self.redis.process.pid, signal.SIGCONT)
        await self.until(lambda: self.service.connected)

    @inline
    async def test_password_and_database(self) -> None:
        """redis://:password@host:port/db authenticates and selects the database."""
        server = redis_for(self, password="s3cret-pw")
        service = StateService(reactor, redis_addr=f"redis://:s3cret-pw@127.0.0.1:{server.port}/3")
        service.startService()
        self.addCleanup(service.stopService)
        await self.until(lambda: service.connected)
        await service.state.record_progress("tok-db", "b", 5, 60.0)
        self.assertEqual(server.command("SELECT", "3"), b"+OK")

    @inline
    async def test_wrong_password_never_connects_never_raises(self) -> None:
        """A refused AUTH leaves the service disconnected and working on local state."""
        server = redis_for(self, password="right")
        service = StateService(reactor, redis_addr=server.addr, redis_password="wrong", retry_delay=0.2)
        service.startService()
        self.addCleanup(service.stopService)
        await deferLater(reactor, 0.5, lambda: None)
        self.assertFalse(service.connected)
        self.assertTrue(await service.state.acquire("k", "me/1/a"))
        self.flushLoggedErrors()


class SharedOverServiceTests(RedisMixin, TestCase):
    """The bans and named locks of hmacfs.state.shared, through StateService's own connection."""

    def setUp(self) -> Deferred:
        self.redis = redis_for(self)
        return self.start_service(self.redis)

    @inline
    async def test_named_lock(self) -> None:
        """A named lock is ``hmacfs:<name>`` with a PX expiry; another owner is refused;
        release is compare-and-delete."""
        locks = self.service.locks
        self.assertIsInstance(locks, RedisLocks)
        self.assertTrue(await locks.try_lock("retention-sweep", "a", 60.0))
        self.assertEqual(self.redis.command("GET", "hmacfs:retention-sweep"), b"a")
        ttl = int(self.redis.command("PTTL", "hmacfs:retention-sweep")[1:])
        self.assertTrue(50_000 < ttl <= 60_000, ttl)
        self.assertFalse(await locks.try_lock("retention-sweep", "b", 60.0))
        await locks.release("retention-sweep", "b")  # not b's: stays
        self.assertEqual(self.redis.command("GET", "hmacfs:retention-sweep"), b"a")
        await locks.release("retention-sweep", "a")
        self.assertEqual(self.redis.command("EXISTS", "hmacfs:retention-sweep"), b":0")
        self.assertTrue(await locks.try_lock("retention-sweep", "b", 60.0))

    @inline
    async def test_ban_share_keys(self) -> None:
        """Failures are ``hmacfs:fail:<client>`` counters expiring after the window, a block is
        ``hmacfs:ban:<client>`` (its seconds, or ``forever`` without expiry) and clears the count;
        unban deletes both."""
        bans = self.service.bans
        self.assertIsInstance(bans, RedisBanShare)
        self.assertEqual(await bans.count_failure("192.0.2.1", 600.0), 1)
        self.assertEqual(await bans.count_failure("192.0.2.1", 600.0), 2)
        ttl = int(self.redis.command("TTL", "hmacfs:fail:192.0.2.1")[1:])
        self.assertTrue(590 < ttl <= 600, ttl)
        await bans.publish_block("192.0.2.1", 300.0)
        self.assertEqual(self.redis.command("GET", "hmacfs:ban:192.0.2.1"), b"300")
        self.assertEqual(self.redis.command("EXISTS", "hmacfs:fail:192.0.2.1"), b":0")
        await bans.publish_block("192.0.2.2", FOREVER)
        self.assertEqual(self.redis.command("GET", "hmacfs:ban:192.0.2.2"), b"forever")
        blocks = await bans.read_blocks()
        self.assertEqual(blocks["192.0.2.2"], FOREVER)
        self.assertTrue(290 < blocks["192.0.2.1"] <= 300)
        self.assertTrue(await bans.unban("192.0.2.1", "192.0.2.1"))
        self.assertFalse(await bans.unban("192.0.2.1", "192.0.2.1"))
        self.assertEqual(set(await bans.read_blocks()), {"192.0.2.2"})

    @inline
    async def test_connected_within(self) -> None:
        """A connected service says so at once."""
        self.assertTrue(await self.service.connected_within(1.0))

    @inline
    async def test_sweep_lock_asked_at_start_waits_for_the_connection(self) -> None:
        """
        The sweep lock asked the moment a process starts (its first retention sweep) is
        taken in Redis once the connection is up, not granted locally: a second node
        asking then is refused (two nodes on one bucket do not both sweep at start).
        """
        fresh = StateService(reactor, redis_addr=self.redis.addr, retry_delay=0.2)
        fresh.startService()
        self.addCleanup(fresh.stopService)
        taking = fresh.sweep_locks().try_lock("retention-sweep", "fresh", 60.0)
        self.assertFalse(fresh.connected)
        self.assertTrue(await taking)
        self.assertEqual(self.redis.command("GET", "hmacfs:retention-sweep"), b"fresh")
        self.assertFalse(await self.service.sweep_locks().try_lock("retention-sweep", "other", 60.0))


class RetryPolicyTests(SynchronousTestCase):
    def test_quick_then_slow(self) -> None:
        """Reconnection tries RetryDelay apart for MaxRetries attempts, then every 30 s."""
        service = StateService(Clock(), redis_addr="127.0.0.1:1", max_retries=3, retry_delay=2.0)
        self.assertEqual([service._retry_policy(n) for n in (1, 2, 3)], [2.0, 2.0, 2.0])
        self.assertEqual(service._retry_policy(4), SLOW_RETRY)
        long = StateService(Clock(), redis_addr="127.0.0.1:1", max_retries=0, retry_delay=45.0)
        self.assertEqual(long._retry_policy(1), 45.0)

    def test_embedded_without_addr(self) -> None:
        """Without RedisAddr the backend is the embedded one and nothing connects."""
        service = StateService(Clock())
        service.startService()
        self.assertIsInstance(service.state, EmbeddedState)
        self.assertEqual(service.backend, "embedded")
        self.assertIsNone(service.client())
        self.assertIsInstance(service.bans, EmbeddedBanShare)
        self.assertIsInstance(service.locks, EmbeddedLocks)
        self.assertFalse(self.successResultOf(service.connected_within(10.0)))

    def test_redis_backends_with_addr(self) -> None:
        """With RedisAddr every backend reaches Redis through this service's connection,
        and answers "nothing shared" while it is not connected."""
        service = StateService(Clock(), redis_addr="127.0.0.1:1")
        self.assertIsInstance(service.bans, RedisBanShare)
        self.assertIsInstance(service.locks, RedisLocks)
        self.assertIsNone(service.bans.read_blocks())
        self.assertTrue(self.successResultOf(service.locks.try_lock("n", "me", 1.0)))

    def test_sweep_lock_without_redis_is_granted_after_the_wait(self) -> None:
        """With Redis unreachable the sweep lock is granted once ``wait`` s passed (each node
        sweeps alone, as documented); embedded, the locks are the embedded ones."""
        clock = Clock()
        service = StateService(clock, redis_addr="127.0.0.1:1")
        d = service.sweep_locks(wait=2.0).try_lock("retention-sweep", "me", 60.0)
        clock.pump([0.05] * 30)
        self.assertNoResult(d)
        clock.pump([0.05] * 15)
        self.assertTrue(self.successResultOf(d))
        embedded = StateService(Clock())
        self.assertIs(embedded.sweep_locks(), embedded.locks)

    def test_connected_within_gives_up(self) -> None:
        """Waiting for a Redis that does not answer fires False after the timeout."""
        clock = Clock()
        service = StateService(clock, redis_addr="127.0.0.1:1")
        d = service.connected_within(1.0)
        self.assertNoResult(d)
        clock.pump([0.05] * 19)
        self.assertNoResult(d)
        clock.pump([0.05] * 3)
        self.assertFalse(self.successResultOf(d))


class AddressTests(SynchronousTestCase):
    def test_forms(self) -> None:
        """Every RedisAddr form splits into kind, host, port, db and credentials."""
        cases = {
            "127.0.0.1:6380": ("tcp", "127.0.0.1", 6380, 0, None, None),
            "[::1]:6379": ("tcp", "::1", 6379, 0, None, None),
            "redis://cache.example:7000/2": ("tcp", "cache.example", 7000, 2, None, None),
            "redis://user:p%40ss@h/1": ("tcp", "h", 6379, 1, "user", "p@ss"),
            "rediss://secure.example": ("tls", "secure.example", 6379, 0, None, None),
        }
        for text, (kind, host, port, db, user, password) in cases.items():
            address = parse_redis_address(text)
            self.assertEqual(
                (address.kind, address.host, address.port, address.db, address.username, address.password),
                (kind, host, port, db, user, password),
                text,
            )
        unix = parse_redis_address("unix:/run/redis.sock", "pw", 4)
        self.assertEqual((unix.kind, unix.path, unix.db, unix.password), ("unix", "/run/redis.sock", 4, "pw"))

    def test_password_never_shown(self) -> None:
        """The address as logged carries no password."""
        address = parse_redis_address("redis://u:topsecret@h:1/0", "other")
        self.assertNotIn("topsecret", address.shown + repr(address))
        self.assertNotIn("other", parse_redis_address("h:1", "other").shown)

    def test_tls_endpoint_verifies_hostname(self) -> None:
        """rediss:// builds TLS options for the server's name (verified through service-identity)."""
        from twisted.internet import ssl
        from twisted.internet.testing import MemoryReactor

        from hmacfs.state.connection import redis_endpoint

        names: list[str] = []
        real = ssl.optionsForClientTLS

        def spy(hostname: str, *args: Any, **kw: Any) -> Any:
            names.append(hostname)
            return real(hostname, *args, **kw)

        self.patch(ssl, "optionsForClientTLS", spy)
        redis_endpoint(MemoryReactor(), parse_redis_address("rediss://secure.example:6390"))
        self.assertEqual(names, ["secure.example"])
        redis_endpoint(MemoryReactor(), parse_redis_address("redis://plain.example:6390"))
        self.assertEqual(names, ["secure.example"])
