"""Bans shared through a real redis-server (started by the test)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import attrs
import txredisapi
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase, TestCase

from hmacfs.state.bans import BanList, BanSettings, SharedBans, unban_shared
from hmacfs.state.shared import RedisBanShare
from tests.redis_server import RedisServer

ROOT = str(Path(__file__).resolve().parent.parent)


class SharedBansTests(TestCase):
    async def connect(self):
        redis = await txredisapi.Connection("127.0.0.1", self.server.port, reconnect=False)
        self.addCleanup(redis.disconnect)
        return redis

    def setUp(self):
        self.server = RedisServer().start()
        self.addCleanup(self.server.stop)
        return self._setUp()

    async def _async_setup(self):
        self.redis_a = await self.connect()
        self.redis_b = await self.connect()
        self.clock = Clock()
        settings = BanSettings(block_after_fails=3, block_duration=300, auto_ban_time=600)
        self.node_a = BanList(self.clock, settings)
        self.node_b = BanList(self.clock, attrs.evolve(settings))
        self.shared_a = SharedBans(bans=self.node_a, share=RedisBanShare(lambda: self.redis_a))
        self.shared_b = SharedBans(bans=self.node_b, share=RedisBanShare(lambda: self.redis_b))

    def _setUp(self):
        from twisted.internet.defer import Deferred

        return Deferred.fromCoroutine(self._async_setup())

    async def fail(self, node: BanList, shared: SharedBans, address: str) -> None:
        node.record_failure(address)
        d = shared.failure(address)
        if d is not None:
            await d

    async def test_failures_on_two_nodes_add_up(self) -> None:
        """Two failures on one node and one on another block the address on both."""
        await self.fail(self.node_a, self.shared_a, "198.51.100.20")
        await self.fail(self.node_a, self.shared_a, "198.51.100.20")
        self.assertIsNone(self.node_a.retry_after("198.51.100.20"))
        await self.fail(self.node_b, self.shared_b, "198.51.100.20")
        self.assertEqual(self.node_b.retry_after("198.51.100.20"), 300)
        self.assertIsNone(self.node_a.retry_after("198.51.100.20"))
        await self.shared_a.sync()
        remaining = self.node_a.retry_after("198.51.100.20")
        self.assertIsNotNone(remaining)
        self.assertGreater(remaining, 290)
        ttl = await self.redis_a.execute_command("PTTL", "hmacfs:ban:198.51.100.20")
        self.assertGreater(ttl, 290_000)

    async def test_local_ban_published(self) -> None:
        """A block decided by one process's local count reaches the others."""
        for _ in range(3):
            self.node_a.record_failure("203.0.113.50")
        await self.redis_a.ping()  # the publish sent on this connection has been applied
        await self.shared_b.sync()
        self.assertIsNotNone(self.node_b.retry_after("203.0.113.50"))

    async def test_unban_lifts_everywhere(self) -> None:
        """Deleting the block in Redis (hmacfs unban) lifts it on every node at the next sync."""
        for _ in range(3):
            await self.fail(self.node_a, self.shared_a, "192.0.2.9")
        await self.shared_b.sync()
        self.assertIsNotNone(self.node_b.retry_after("192.0.2.9"))
        self.assertTrue(await unban_shared(self.shared_a.share, "192.0.2.9"))
        await self.shared_a.sync()
        await self.shared_b.sync()
        self.assertIsNone(self.node_b.retry_after("192.0.2.9"))

    async def test_no_auto_unban_has_no_expiry(self) -> None:
        """With AutoUnban = false the shared block has no TTL."""
        self.node_a.settings.auto_unban = False
        for _ in range(3):
            await self.fail(self.node_a, self.shared_a, "192.0.2.10")
        ttl = await self.redis_a.execute_command("PTTL", "hmacfs:ban:192.0.2.10")
        self.assertEqual(ttl, -1)

    async def test_ipv6_64_is_one_shared_client(self) -> None:
        """Failures from three addresses of one /64 on two nodes add up; the shared block is the
        /64's, every node applies it to any of its addresses, and unban of any of them lifts it."""
        await self.fail(self.node_a, self.shared_a, "2001:db8:5:6::1")
        await self.fail(self.node_a, self.shared_a, "2001:db8:5:6:ffff::2")
        await self.fail(self.node_b, self.shared_b, "2001:db8:5:7::1")  # another /64
        self.assertIsNone(self.node_b.retry_after("2001:db8:5:6::3"))
        await self.fail(self.node_b, self.shared_b, "2001:db8:5:6::3")
        self.assertEqual(self.node_b.retry_after("2001:db8:5:6:1::9"), 300)
        ttl = await self.redis_a.execute_command("PTTL", "hmacfs:ban:2001:db8:5:6::/64")
        self.assertGreater(ttl, 290_000)
        await self.shared_a.sync()
        self.assertIsNotNone(self.node_a.retry_after("2001:db8:5:6::42"))
        self.assertIsNone(self.node_a.retry_after("2001:db8:5:7::42"))
        self.assertTrue(await unban_shared(self.shared_a.share, "2001:db8:5:6::77"))
        await self.shared_a.sync()
        await self.shared_b.sync()
        self.assertIsNone(self.node_a.retry_after("2001:db8:5:6::42"))
        self.assertIsNone(self.node_b.retry_after("2001:db8:5:6::42"))

    async def test_redis_gone_falls_back_to_local(self) -> None:
        """Without a Redis client the local list still blocks."""
        shared = SharedBans(
            bans=BanList(self.clock, BanSettings(block_after_fails=2)), share=RedisBanShare(lambda: None)
        )
        self.assertIsNone(shared.failure("x"))
        self.assertIsNone(shared.sync())
        shared.bans.record_failure("x")
        shared.bans.record_failure("x")
        self.assertIsNotNone(shared.bans.retry_after("x"))


class UnbanCommandTests(SynchronousTestCase):
    """`hmacfs unban` with RedisAddr: through the state layer's connection, the same keys."""

    def unban(self, config: Path, address: str, *extra: str) -> subprocess.CompletedProcess[str]:
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])))
        return subprocess.run(
            [sys.executable, "-m", "hmacfs.service.cli", "unban", "--config", str(config), *extra, address],
            capture_output=True, text=True, timeout=60, env=env, check=False,
        )

    def test_unban_deletes_the_shared_block(self) -> None:
        """The /64's block and count and the address's own keys (older versions') go; a
        second unban finds nothing; with Redis gone the command says so and fails."""
        server = RedisServer().start()
        self.addCleanup(server.cleanup)
        directory = Path(self.mktemp()).resolve()
        directory.mkdir()
        config = directory / "c.toml"
        config.write_text(
            f'Secret = "cli-secret-0123456789"\nStoreDir = "{directory}"\nRedisAddr = "{server.addr}"\n'
        )
        keys = ["hmacfs:ban:2001:db8:5:6::/64", "hmacfs:fail:2001:db8:5:6::/64",
                "hmacfs:ban:2001:db8:5:6::77", "hmacfs:ban:2001:db8:5:7::/64"]
        for key in keys:
            server.command("SET", key, "300")
        done = self.unban(config, "2001:db8:5:6::77")
        self.assertEqual(done.returncode, 0, done.stderr)
        self.assertIn("removed shared block of 2001:db8:5:6::77 in Redis", done.stdout)
        self.assertEqual([server.command("EXISTS", key) for key in keys], [b":0", b":0", b":0", b":1"])
        self.assertTrue((directory / ".hmacfs" / "unban" / "2001:db8:5:6::77").exists())
        again = self.unban(config, "2001:db8:5:6::77")
        self.assertEqual(again.returncode, 0, again.stderr)
        self.assertIn("no shared block", again.stdout)
        server.stop()
        gone = self.unban(config, "2001:db8:5:6::77", "--timeout", "0.5")
        self.assertEqual(gone.returncode, 1)
        self.assertIn("Redis was not reachable", gone.stderr)
