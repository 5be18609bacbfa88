# -*- test-case-name: tests.test_bans,tests.test_bans_redis,tests.test_state -*-
"""
What the nodes share besides upload state, as typed operations: failure counts
and blocks of clients (``BanShare``) and named locks that expire
(``NamedLocks``).  Callers never hold a Redis client.

Each interface has an embedded implementation (one process: nothing to share,
every lock granted; the process's own ``BanList`` and the sweep's lock file
are the whole truth) and a Redis one, which reaches Redis through the
``StateService`` connection and answers None (nothing shared) while it is
unreachable.  ``StateService`` picks the pair for ``RedisAddr``.

The Redis keys are those of earlier versions, which may share the same Redis
during an upgrade: ``hmacfs:fail:<client>`` (INCR, expiring AutoBanTime after
the first failure), ``hmacfs:ban:<client>`` (seconds, or ``forever`` with no
expiry), and ``hmacfs:<name>`` for a named lock (``SET NX PX``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Protocol

import attrs
from twisted.internet.defer import Deferred, succeed

BAN_PREFIX = "hmacfs:ban:"
FAIL_PREFIX = "hmacfs:fail:"
LOCK_PREFIX = "hmacfs:"
#: the value of a block without expiry (AutoUnban = false)
FOREVER_MARK = "forever"
FOREVER = math.inf

#: compare-and-delete: only the owner lets go of a lock
RELEASE_SCRIPT = """
if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end
return 0
"""


class BanShare(Protocol):
    """
    Failure counts and blocks of clients (``ban_key``s), shared by every node.

    Each operation answers None when nothing is shared (embedded, or Redis
    unreachable): then the caller's local ``BanList`` goes on alone.  A
    Deferred fails on a command error.
    """

    def count_failure(self, client: str, window: float) -> Deferred[int] | None:
        """Count one failure of ``client`` in a window of ``window`` s from its first; fire the count."""

    def publish_block(self, client: str, seconds: float) -> Deferred[None] | None:
        """Block ``client`` for ``seconds`` (FOREVER: until unbanned) and drop its count."""

    def read_blocks(self) -> Deferred[dict[str, float]] | None:
        """Fire every shared block: client -> seconds left (FOREVER: no expiry)."""

    def unban(self, address: str, client: str) -> Deferred[bool] | None:
        """Lift the block and the count of ``client`` (and of ``address`` itself, as older
        versions keyed them); fire whether there was any."""


class NamedLocks(Protocol):
    """Locks shared by the nodes, taken by name for ``ttl`` seconds."""

    def try_lock(self, name: str, owner: str, ttl: float) -> Deferred[bool]:
        """
        Fire True if ``owner`` now holds ``name`` for ``ttl`` s, False if another
        owner does.  True too when no one else can be asked (embedded, Redis
        unreachable): the caller's local locks are then all there is.  Fails on
        a command error.
        """

    def release(self, name: str, owner: str) -> Deferred[None]:
        """Let go of ``name`` if ``owner`` holds it."""


class EmbeddedBanShare:
    """One process: nothing is shared (``hmacfs unban`` reaches it through the store)."""

    def count_failure(self, client: str, window: float) -> None:
        return None

    def publish_block(self, client: str, seconds: float) -> None:
        return None

    def read_blocks(self) -> None:
        return None

    def unban(self, address: str, client: str) -> None:
        return None


class EmbeddedLocks:
    """One process: every lock is granted (processes on one host lock files instead)."""

    def try_lock(self, name: str, owner: str, ttl: float) -> Deferred[bool]:
        return succeed(True)

    def release(self, name: str, owner: str) -> Deferred[None]:
        return succeed(None)


#: the connected txredisapi protocol, or None while Redis is unreachable
RedisClient = Callable[[], Any]


@attrs.define
class RedisBanShare:
    """Failure counts and blocks in Redis (``StateService.client`` gives the connection)."""

    redis: RedisClient

    def count_failure(self, client: str, window: float) -> Deferred[int] | None:
        redis = self.redis()
        if redis is None:
            return None
        key = FAIL_PREFIX + client

        async def count() -> int:
            failures = int(await redis.incr(key))
            if failures == 1:
                await redis.expire(key, max(1, math.ceil(window)))
            return failures

        return Deferred.fromCoroutine(count())

    def publish_block(self, client: str, seconds: float) -> Deferred[None] | None:
        redis = self.redis()
        if redis is None:
            return None

        async def write() -> None:
            if seconds == FOREVER:
                await redis.set(BAN_PREFIX + client, FOREVER_MARK)
            else:
                await redis.set(
                    BAN_PREFIX + client, str(int(seconds)), pexpire=max(1, int(seconds * 1000))
                )
            await redis.delete(FAIL_PREFIX + client)

        return Deferred.fromCoroutine(write())

    def read_blocks(self) -> Deferred[dict[str, float]] | None:
        redis = self.redis()
        if redis is None:
            return None

        async def scan() -> dict[str, float]:
            blocks: dict[str, float] = {}
            cursor = 0
            for _ in range(1000):  # bounded: at most 1000 pages of 1000 keys
                cursor, keys = await redis.scan(cursor, pattern=BAN_PREFIX + "*", count=1000)
                for key in keys:
                    key = key.decode() if isinstance(key, bytes) else key
                    ttl = await redis.execute_command("PTTL", key)
                    if ttl == -1:
                        blocks[key[len(BAN_PREFIX) :]] = FOREVER
                    elif ttl > 0:
                        blocks[key[len(BAN_PREFIX) :]] = ttl / 1000.0
                if int(cursor) == 0:
                    break
            return blocks

        return Deferred.fromCoroutine(scan())

    def unban(self, address: str, client: str) -> Deferred[bool] | None:
        redis = self.redis()
        if redis is None:
            return None
        names = {prefix + name for prefix in (BAN_PREFIX, FAIL_PREFIX) for name in (client, address)}

        async def delete() -> bool:
            return bool(await redis.delete(*sorted(names)))

        return Deferred.fromCoroutine(delete())


@attrs.define
class RedisLocks:
    """Named locks in Redis: ``SET hmacfs:<name> <owner> NX PX``, compare-and-delete to release."""

    redis: RedisClient

    def try_lock(self, name: str, owner: str, ttl: float) -> Deferred[bool]:
        redis = self.redis()
        if redis is None:
            return succeed(True)

        async def take() -> bool:
            px = max(1, int(ttl * 1000))
            return bool(await redis.set(LOCK_PREFIX + name, owner, pexpire=px, only_if_not_exists=True))

        return Deferred.fromCoroutine(take())

    def release(self, name: str, owner: str) -> Deferred[None]:
        redis = self.redis()
        if redis is None:
            return succeed(None)

        async def release() -> None:
            await redis.eval(RELEASE_SCRIPT, [LOCK_PREFIX + name], [owner])

        return Deferred.fromCoroutine(release())


@attrs.define
class ConnectedLocks:
    """
    Named locks asked once Redis is connected, waiting up to ``wait`` s for the connection.

    A process that has just started has none yet, and ``RedisLocks`` then grants every
    lock; the retention sweep runs at start, so two nodes started together would both
    sweep.  On a shared filesystem the sweep's flock still keeps them apart, on an object
    store nothing does.  If Redis does not come within ``wait`` s the lock is granted as
    before (each node sweeps alone: the documented degradation).
    """

    locks: NamedLocks
    connected_within: Callable[[float], Deferred[bool]]
    wait: float = 5.0

    def try_lock(self, name: str, owner: str, ttl: float) -> Deferred[bool]:
        async def take() -> bool:
            await self.connected_within(self.wait)
            return bool(await self.locks.try_lock(name, owner, ttl))

        return Deferred.fromCoroutine(take())

    def release(self, name: str, owner: str) -> Deferred[None]:
        return self.locks.release(name, owner)


__all__ = [
    "BAN_PREFIX",
    "FAIL_PREFIX",
    "FOREVER",
    "BanShare",
    "ConnectedLocks",
    "EmbeddedBanShare",
    "EmbeddedLocks",
    "NamedLocks",
    "RedisBanShare",
    "RedisLocks",
]
