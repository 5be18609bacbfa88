"""Blocking addresses that keep failing authentication."""

from __future__ import annotations

from pathlib import Path

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from hmacfs.bans import FOREVER, BanList, BanSettings
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
        from hmacfs.bans import BanSyncService, request_unban

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
        from hmacfs.bans import request_unban

        store = Path(self.mktemp()).resolve()
        store.mkdir()
        self.assertRaises(ValueError, request_unban, store, "../../etc/passwd")
