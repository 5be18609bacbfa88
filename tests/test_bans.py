"""Blocking addresses that keep failing authentication."""

from __future__ import annotations

import ipaddress
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TypeVar

import attrs
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from hmacfs.state.bans import BanList, BanSettings, SharedBans, ban_key, unban_shared
from hmacfs.state.shared import FOREVER, BanShare, EmbeddedBanShare, RedisBanShare
from hmacfs.testing import SiteHarness, make_config, put_head

T = TypeVar("T")

UUID = "7a0e1f8e-9b7c-4c55-8a44-2b1d3c4e5f60"


class BanListTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.bans = BanList(self.clock, BanSettings(block_after_fails=3, block_duration=100, auto_ban_time=60))

    def test_blocks_after_n_failures_in_window(self) -> None:
        """The Nth failure inside AutoBanTime blocks the address for BlockDuration."""
        self.assertFalse(self.bans.record_failure("198.51.100.1"))
        self.assertFalse(self.bans.record_failure("198.51.100.1"))
        self.assertIsNone(self.bans.retry_after("198.51.100.1"))
        self.assertTrue(self.bans.record_failure("198.51.100.1"))
        self.assertEqual(self.bans.retry_after("198.51.100.1"), 100)
        self.assertIsNone(self.bans.retry_after("198.51.100.2"))
        self.clock.advance(99)
        self.assertEqual(self.bans.retry_after("198.51.100.1"), 1)
        self.clock.advance(1)
        self.assertIsNone(self.bans.retry_after("198.51.100.1"))

    def test_failures_outside_window_do_not_count(self) -> None:
        """Failures older than AutoBanTime are forgotten."""
        self.bans.record_failure("a")
        self.bans.record_failure("a")
        self.clock.advance(61)
        self.assertFalse(self.bans.record_failure("a"))
        self.assertIsNone(self.bans.retry_after("a"))

    def test_no_auto_unban(self) -> None:
        """With AutoUnban = false a block lasts until lifted by hand."""
        self.bans.settings.auto_unban = False
        for _ in range(3):
            self.bans.record_failure("b")
        self.clock.advance(10**9)
        self.assertEqual(self.bans.retry_after("b"), FOREVER)
        self.assertTrue(self.bans.unblock("b"))
        self.assertIsNone(self.bans.retry_after("b"))

    def test_counts(self) -> None:
        """Active and total bans are counted for the metrics."""
        for _ in range(3):
            self.bans.record_failure("c")
        self.assertEqual((self.bans.active(), self.bans.bans_total), (1, 1))
        self.clock.advance(101)
        self.assertEqual((self.bans.active(), self.bans.bans_total), (0, 1))


class CountingDict(OrderedDict):
    """The failure table, counting every entry handed out by iteration (the work of a scan)."""

    examined = 0

    def __iter__(self) -> Iterator[Any]:
        for key in super().__iter__():
            CountingDict.examined += 1
            yield key

    def items(self) -> Any:
        for item in super().items():
            CountingDict.examined += 1
            yield item

    def values(self) -> Any:
        for value in super().values():
            CountingDict.examined += 1
            yield value


def v4(index: int) -> str:
    return str(ipaddress.IPv4Address(0x0A000000 + index))


class BanTableCostTests(SynchronousTestCase):
    """
    The ban table's work per failure does not grow with its size (counted, not timed),
    its memory is capped, and blocks are forgotten when they end, looked up or not.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.settings = BanSettings(block_after_fails=3, block_duration=100, auto_ban_time=60)

    def counting(self, bans: BanList) -> None:
        bans._failures = CountingDict(bans._failures)
        CountingDict.examined = 0

    def test_recording_in_a_full_table_examines_few_entries(self) -> None:
        """With 20,000 recent counters a failure looks at one or two of them, not all."""
        bans = BanList(self.clock, self.settings)
        for index in range(20_000):
            bans.record_failure(v4(index))
        self.assertEqual(len(bans._failures), 20_000)
        self.counting(bans)
        for index in range(20_000, 20_100):
            self.assertFalse(bans.record_failure(v4(index)))
        self.assertLessEqual(CountingDict.examined, 200)
        self.assertEqual(len(bans._failures), 20_100)

    def test_pruning_touches_only_expired_counters(self) -> None:
        """Counters leave oldest first, exactly when their last failure leaves the window."""
        bans = BanList(self.clock, self.settings)
        for index in range(100):
            bans.record_failure(v4(index))
            self.clock.advance(1)
        bans.record_failure(v4(5))  # its last failure is now the newest
        self.clock.advance(30)  # now 130: failures at or before 70 are out of the window
        self.counting(bans)
        bans.record_failure(v4(1000))
        kept = {v4(index) for index in range(71, 100)} | {v4(5), v4(1000)}
        self.assertLessEqual(CountingDict.examined, 71 + 1)
        self.assertEqual(set(bans._failures), kept)
        self.counting(bans)
        bans.record_failure(v4(1001))
        self.assertLessEqual(CountingDict.examined, 2)

    def test_counter_memory_is_capped(self) -> None:
        """Beyond max_entries the counter whose last failure is oldest goes; the others still count."""
        bans = BanList(self.clock, self.settings, max_entries=100)
        for index in range(1000):
            bans.record_failure(v4(index))
            bans.record_failure(v4(index))
        self.assertEqual(len(bans._failures), 100)
        self.assertEqual(set(bans._failures), {v4(index) for index in range(900, 1000)})
        self.assertTrue(bans.record_failure(v4(999)))
        self.assertFalse(bans.record_failure(v4(0)))  # evicted: counting starts again

    def test_block_memory_is_capped(self) -> None:
        """Beyond max_entries the timed block closest to its end goes first; blocks forever stay."""
        self.settings.block_after_fails = 1
        bans = BanList(self.clock, self.settings, max_entries=10)
        bans.block("192.0.2.1", FOREVER)
        for index in range(30):
            bans.record_failure(v4(index))
            self.clock.advance(1)
        self.assertEqual(len(bans._blocked), 10)
        self.assertEqual(bans.retry_after("192.0.2.1"), FOREVER)
        self.assertIsNotNone(bans.retry_after(v4(29)))
        self.assertIsNone(bans.retry_after(v4(0)))
        self.assertLessEqual(len(bans._expiries), 2 * 10 + 64)

    def test_blocks_are_forgotten_when_they_end(self) -> None:
        """Ended blocks leave the table without a lookup of their address, only the ended ones."""
        bans = BanList(self.clock, self.settings)
        for index in range(50):
            bans.block(v4(index), 10 + index)
        bans.block("192.0.2.1", FOREVER)
        self.clock.advance(30)  # blocks of 10..30 s have ended: v4(0)..v4(20)
        self.assertTrue(bans.has_blocks())
        self.assertEqual(len(bans._blocked), 50 - 21 + 1)
        self.assertEqual(len(bans._expiries), 50 - 21)
        self.assertEqual(bans.active(), 30)
        self.assertTrue(bans.unblock("192.0.2.1"))
        self.clock.advance(100)
        self.assertFalse(bans.has_blocks())
        self.assertEqual((bans._blocked, bans._expiries), ({}, []))

    def test_sync_timer_prunes_an_idle_table(self) -> None:
        """Without further failures the ban timer still frees expired counters and blocks."""
        from hmacfs.state.bans import BanSyncService

        bans = BanList(self.clock, self.settings)
        bans.record_failure("198.51.100.1")
        bans.block("198.51.100.2", 5)
        service = BanSyncService(clock=self.clock, bans=bans, store_dir=Path(self.mktemp()))
        service.startService()
        self.addCleanup(service.stopService)
        for _ in range(61):
            self.clock.advance(1)
        self.assertEqual((len(bans._failures), len(bans._blocked)), (0, 0))


class ClientKeyTests(SynchronousTestCase):
    """Who is one client for failure counting and blocks."""

    def setUp(self) -> None:
        self.bans = BanList(Clock(), BanSettings(block_after_fails=3, block_duration=100, auto_ban_time=60))

    def test_one_ipv6_64_is_one_client(self) -> None:
        """Two addresses in one /64 share a counter and a block; another /64 does not."""
        self.bans.record_failure("2001:db8:1:2::1")
        self.bans.record_failure("2001:db8:1:2:ffff:ffff:ffff:fffe")
        self.bans.record_failure("2001:db8:1:3::1")  # the next /64: its own counter
        self.assertTrue(self.bans.record_failure("2001:db8:1:2:a::b"))
        self.assertEqual(self.bans.retry_after("2001:db8:1:2:1234::1"), 100)
        self.assertIsNone(self.bans.retry_after("2001:db8:1:3::1"))
        self.assertIsNone(self.bans.retry_after("2001:db8:1:1::1"))
        self.assertTrue(self.bans.unblock("2001:db8:1:2::99"))
        self.assertIsNone(self.bans.retry_after("2001:db8:1:2::1"))

    def test_ipv4_stays_per_address(self) -> None:
        """IPv4 addresses are counted one by one, IPv4-mapped IPv6 as the IPv4 address."""
        self.bans.record_failure("198.51.100.1")
        self.bans.record_failure("198.51.100.2")
        self.bans.record_failure("::ffff:198.51.100.1")
        self.assertIsNone(self.bans.retry_after("198.51.100.2"))
        self.assertTrue(self.bans.record_failure("198.51.100.1"))
        self.assertIsNotNone(self.bans.retry_after("::ffff:198.51.100.1"))
        self.assertIsNone(self.bans.retry_after("198.51.100.2"))

    @settings(derandomize=True, deadline=None, max_examples=300)
    @given(value=st.integers(min_value=0, max_value=2**128 - 1), other=st.integers(min_value=0, max_value=2**64 - 1))
    def test_ipv6_key(self, value: int, other: int) -> None:
        """Every address of a /64 has that /64's key, written canonically; keys are their own keys."""
        address = ipaddress.IPv6Address(value)
        key = ban_key(str(address))
        self.assertEqual(ban_key(key), key)
        if address.ipv4_mapped is not None:
            self.assertEqual(key, str(address.ipv4_mapped))
            return
        network = ipaddress.IPv6Network(key)
        self.assertEqual(network.prefixlen, 64)
        self.assertIn(address, network)
        sibling = ipaddress.IPv6Address((value >> 64 << 64) | other)
        if sibling.ipv4_mapped is None:
            self.assertEqual(ban_key(sibling.exploded), key)
            self.assertEqual(ban_key(sibling.exploded.upper()), key)

    @settings(derandomize=True, deadline=None, max_examples=200)
    @given(value=st.integers(min_value=0, max_value=2**32 - 1))
    def test_ipv4_key(self, value: int) -> None:
        """An IPv4 address is its own key, and its IPv4-mapped IPv6 form has the same key."""
        address = ipaddress.IPv4Address(value)
        self.assertEqual(ban_key(str(address)), str(address))
        self.assertEqual(ban_key(f"::ffff:{address}"), str(address))

    @settings(derandomize=True, deadline=None, max_examples=200)
    @given(text=st.text(max_size=60))
    def test_anything_else_is_kept(self, text: str) -> None:
        """Text that is no address (``unix``, garbage) is a key of its own and never raises."""
        key = ban_key(text)
        self.assertEqual(ban_key(key), key)
        try:
            ipaddress.ip_address(text)
        except ValueError:
            if "/" not in text:
                self.assertEqual(key, text)


class MemoryBanShare:
    """A ``BanShare`` in a dict, shared by the ``SharedBans`` given it (what Redis is to nodes)."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.failures: dict[str, int] = {}
        self.blocks: dict[str, float] = {}  # client -> until (FOREVER)
        self.calls: list[tuple[object, ...]] = []
        self.broken = False

    def count_failure(self, client: str, window: float) -> Deferred[int] | None:
        self.calls.append(("count", client, window))
        if self.broken:
            return fail(ConnectionError("gone"))
        self.failures[client] = self.failures.get(client, 0) + 1
        return succeed(self.failures[client])

    def publish_block(self, client: str, seconds: float) -> Deferred[None] | None:
        self.calls.append(("publish", client, seconds))
        if self.broken:
            return fail(ConnectionError("gone"))
        self.blocks[client] = FOREVER if seconds == FOREVER else self.clock.seconds() + seconds
        self.failures.pop(client, None)
        return succeed(None)

    def read_blocks(self) -> Deferred[dict[str, float]] | None:
        now = self.clock.seconds()
        return succeed(
            {c: (u if u == FOREVER else u - now) for c, u in self.blocks.items() if u > now}
        )

    def unban(self, address: str, client: str) -> Deferred[bool] | None:
        self.calls.append(("unban", address, client))
        found = self.blocks.pop(client, None) is not None
        return succeed(found)


class SharedBansTests(SynchronousTestCase):
    """SharedBans's policy over the BanShare interface, without Redis."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.share = MemoryBanShare(self.clock)
        settings = BanSettings(block_after_fails=3, block_duration=300, auto_ban_time=600)
        self.a = SharedBans(bans=BanList(self.clock, settings), share=self.share)
        self.b = SharedBans(bans=BanList(self.clock, BanSettings(**attrs.asdict(settings))), share=self.share)

    def done(self, d: Deferred[T] | None) -> T:
        """What a shared operation fired (it must have been one)."""
        self.assertIsNotNone(d)
        assert d is not None
        return self.successResultOf(d)

    def fail_on(self, node: SharedBans, address: str) -> None:
        node.bans.record_failure(address)
        self.done(node.failure(address))

    def test_memory_share_is_a_ban_share(self) -> None:
        """The fake (and both real implementations) satisfy the interface (checked by mypy)."""
        shares: list[BanShare] = [self.share, EmbeddedBanShare(), RedisBanShare(lambda: None)]
        self.assertEqual(len(shares), 3)

    def test_shared_count_blocks_and_publishes(self) -> None:
        """Failures on two nodes add up in the share: the node that reaches the count blocks
        locally and publishes; the other mirrors it at its next sync."""
        self.fail_on(self.a, "198.51.100.1")
        self.fail_on(self.a, "198.51.100.1")
        self.fail_on(self.b, "198.51.100.1")
        self.assertEqual(self.b.bans.retry_after("198.51.100.1"), 300)
        self.assertIn(("publish", "198.51.100.1", 300), self.share.calls)
        self.assertEqual(self.share.calls[0], ("count", "198.51.100.1", 600))
        self.assertIsNone(self.a.bans.retry_after("198.51.100.1"))
        self.done(self.a.sync())
        self.assertEqual(self.a.bans.retry_after("198.51.100.1"), 300)

    def test_counts_per_client_key(self) -> None:
        """An IPv6 address is counted as its /64, as locally."""
        self.fail_on(self.a, "2001:db8:1:2::5")
        self.assertEqual(self.share.calls, [("count", "2001:db8:1:2::/64", 600)])

    def test_local_block_published_forever(self) -> None:
        """A block the local count decides is published too; AutoUnban = false: FOREVER."""
        self.a.bans.settings.auto_unban = False
        for _ in range(3):
            self.a.bans.record_failure("192.0.2.1")
        self.assertEqual(self.share.calls, [("publish", "192.0.2.1", FOREVER)])
        self.done(self.b.sync())
        self.assertEqual(self.b.bans.retry_after("192.0.2.1"), FOREVER)

    def test_unban_lifts_mirrored_blocks(self) -> None:
        """Lifting the shared block (hmacfs unban) lifts it on every node at the next sync,
        keyed by the client (and the address, as older versions keyed it)."""
        for _ in range(3):
            self.fail_on(self.a, "2001:db8:9:9::1")
        self.done(self.b.sync())
        self.assertIsNotNone(self.b.bans.retry_after("2001:db8:9:9::2"))
        self.assertTrue(self.done(unban_shared(self.share, "2001:db8:9:9::3")))
        self.assertIn(("unban", "2001:db8:9:9::3", "2001:db8:9:9::/64"), self.share.calls)
        self.done(self.a.sync())
        self.done(self.b.sync())
        self.assertIsNone(self.a.bans.retry_after("2001:db8:9:9::1"))
        self.assertIsNone(self.b.bans.retry_after("2001:db8:9:9::1"))

    def test_share_errors_are_logged_not_raised(self) -> None:
        """A failing share leaves the local list working; the error is a log line."""
        self.share.broken = True
        for _ in range(3):
            self.fail_on(self.a, "192.0.2.2")
        self.assertIsNotNone(self.a.bans.retry_after("192.0.2.2"))

    def test_embedded_shares_nothing(self) -> None:
        """The embedded share answers None everywhere: SharedBans does nothing, the
        local list blocks alone, and unban has nothing shared to lift."""
        share = EmbeddedBanShare()
        shared = SharedBans(bans=BanList(self.clock, BanSettings(block_after_fails=2)), share=share)
        self.assertIsNone(shared.failure("192.0.2.3"))
        self.assertIsNone(shared.sync())
        shared.bans.record_failure("192.0.2.3")
        shared.bans.record_failure("192.0.2.3")
        self.assertIsNotNone(shared.bans.retry_after("192.0.2.3"))
        self.assertIsNone(shared.publish("192.0.2.3", 5))
        self.assertIsNone(unban_shared(share, "192.0.2.3"))

    def test_redis_share_unreachable_is_nothing_shared(self) -> None:
        """The Redis share without a connection answers None, like the embedded one."""
        share = RedisBanShare(lambda: None)
        self.assertIsNone(share.count_failure("k", 1))
        self.assertIsNone(share.publish_block("k", 1))
        self.assertIsNone(share.read_blocks())
        self.assertIsNone(share.unban("k", "k"))


class SiteBanTests(SynchronousTestCase):
    def setUp(self) -> None:
        store = Path(self.mktemp()).resolve()
        store.mkdir()
        self.harness = SiteHarness(
            make_config(store, block_after_fails=3, block_duration=300.0, auto_ban_time=600.0)
        )

    def fail_auth(self, host: str, extra: tuple[str, ...] = ()) -> bytes:
        protocol, transport = self.harness.connect(host=host)
        protocol.dataReceived(put_head(f"{UUID}/x", 5, mac="0" * 64, extra=extra))
        return transport.value()

    def test_blocked_client_gets_429_before_other_work(self) -> None:
        """After BlockAfterFails bad MACs every request from the address gets 429 + Retry-After,
        even a GET and even a correctly signed upload; other addresses are unaffected."""
        for _ in range(3):
            self.assertIn(b" 403 ", self.fail_auth("203.0.113.5"))
        protocol, transport = self.harness.connect(host="203.0.113.5")
        protocol.dataReceived(put_head(f"{UUID}/good", 5, extra=("Expect: 100-continue",)))
        answer = transport.value()
        self.assertTrue(answer.startswith(b"HTTP/1.1 429 "), answer)
        self.assertIn(b"Retry-After: 300", answer)
        self.assertNotIn(b"100 Continue", answer)
        protocol, transport = self.harness.connect(host="203.0.113.5")
        protocol.dataReceived(f"GET /upload/{UUID}/good HTTP/1.1\r\n\r\n".encode())
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 429 "))
        other, transport = self.harness.connect(host="203.0.113.6")
        other.dataReceived(put_head(f"{UUID}/good", 5))
        other.dataReceived(b"hello")
        self.assertIn(b"HTTP/1.1 201 ", transport.value())

    def test_block_expires(self) -> None:
        """With AutoUnban the block ends after BlockDuration."""
        for _ in range(3):
            self.fail_auth("203.0.113.7")
        for _ in range(300):
            self.harness.reactor.advance(1)
        protocol, transport = self.harness.connect(host="203.0.113.7")
        protocol.dataReceived(f"OPTIONS /upload/{UUID}/a HTTP/1.1\r\n\r\n".encode())
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 204 "), transport.value())

    def test_forged_xff_does_not_escape(self) -> None:
        """A direct client cannot rotate its address with X-Forwarded-For."""
        for index in range(3):
            self.fail_auth("203.0.113.8", extra=(f"X-Forwarded-For: 10.0.0.{index}",))
        answer = self.fail_auth("203.0.113.8", extra=("X-Forwarded-For: 10.9.9.9",))
        self.assertTrue(answer.startswith(b"HTTP/1.1 429 "), answer)


class UnbanRequestTests(SynchronousTestCase):
    def test_unban_request_lifts_block_in_every_process(self) -> None:
        """`hmacfs unban` drops a request file that each process's ban timer applies once."""
        from hmacfs.state.bans import BanSyncService, request_unban

        store = Path(self.mktemp()).resolve()
        store.mkdir()
        clock = Clock()
        processes = [BanList(clock, BanSettings(block_after_fails=1, auto_unban=False)) for _ in range(2)]
        services = [BanSyncService(clock=clock, bans=bans, store_dir=store) for bans in processes]
        for bans in processes:
            bans.record_failure("2001:db8::7")
            self.assertEqual(bans.retry_after("2001:db8::7"), FOREVER)
        request_unban(store, "2001:0db8::7")
        for service in services:
            service.startService()
            self.addCleanup(service.stopService)
        clock.advance(1)
        for bans in processes:
            self.assertIsNone(bans.retry_after("2001:db8::7"))
        # Applied once: a new block after the unban stays.
        processes[0].record_failure("2001:db8::7")
        clock.advance(1)
        self.assertEqual(processes[0].retry_after("2001:db8::7"), FOREVER)

    def test_unban_rejects_non_addresses(self) -> None:
        """Only IP addresses become request files (no path tricks)."""
        from hmacfs.state.bans import request_unban

        store = Path(self.mktemp()).resolve()
        store.mkdir()
        self.assertRaises(ValueError, request_unban, store, "../../etc/passwd")
