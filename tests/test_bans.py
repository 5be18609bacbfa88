"""Blocking addresses that keep failing authentication."""

from __future__ import annotations

import ipaddress
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from hmacfs.state.bans import FOREVER, BanList, BanSettings, ban_key
from hmacfs.testing import SiteHarness, make_config, put_head

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
