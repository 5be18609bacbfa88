"""Only one node sweeps per interval when nodes share Redis (real redis-server)."""

from __future__ import annotations

from pathlib import Path

import txredisapi
from twisted.internet.defer import maybeDeferred
from twisted.trial.unittest import TestCase

from hmacfs.state.shared import RedisLocks
from hmacfs.storage.filesystem import Store
from hmacfs.storage.fs_backend import FilesystemBackend
from hmacfs.storage.retention import RetentionService, RetentionSettings, Sweeper, Tombstones
from tests.redis_server import RedisServer


class SweepLockTests(TestCase):
    async def test_one_sweep_per_interval(self) -> None:
        """Two nodes sharing Redis: the second node's sweep in the same interval is skipped."""
        server = RedisServer().start()
        self.addCleanup(server.stop)
        redis = await txredisapi.Connection("127.0.0.1", server.port, reconnect=False)
        self.addCleanup(redis.disconnect)
        root = Path(self.mktemp()).resolve()
        root.mkdir()
        store = Store(root)
        from twisted.internet import reactor

        def service() -> RetentionService:
            backend = FilesystemBackend(store, maybeDeferred, Tombstones(root))
            sweeper = Sweeper(
                backend, RetentionSettings(interval=60), root.parent / "r.log",
                run_blocking=maybeDeferred, exclusive=backend.sweep_lock,
            )
            return RetentionService(clock=reactor, sweeper=sweeper, lock=RedisLocks(lambda: redis))

        first = await service().sweep()
        second = await service().sweep()
        self.assertFalse(first.skipped)
        self.assertTrue(second.skipped)
        ttl = await redis.execute_command("PTTL", "hmacfs:retention-sweep")
        self.assertGreater(ttl, 50_000)
