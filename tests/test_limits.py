"""
The channel's connection limits (hmacfs.http.limits) alone: the counting table
and the keys connections count against (an IPv6 client's /64); the channel's
use of them is in tests.test_request.
"""

from __future__ import annotations

import ipaddress

from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.trial.unittest import SynchronousTestCase

from hmacfs.http.clientaddr import ClientAddressResolver
from hmacfs.http.limits import NO_LIMITS, ConnectionLimits, ConnectionTable


class ConnectionTableTests(SynchronousTestCase):
    def test_claims_up_to_the_limit(self) -> None:
        table = ConnectionTable()
        self.assertEqual([table.claim("a", 3) for _ in range(4)], [True, True, True, False])
        self.assertEqual(table.counts, {"a": 3})
        self.assertEqual(table.open("a"), 3)

    def test_refused_claim_counts_nothing(self) -> None:
        table = ConnectionTable()
        table.claim("a", 1)
        self.assertFalse(table.claim("a", 1))
        table.release("a")
        self.assertEqual(table.counts, {})

    def test_keys_counted_apart(self) -> None:
        table = ConnectionTable()
        table.claim("a", 1)
        self.assertTrue(table.claim("b", 1))
        self.assertEqual(table.counts, {"a": 1, "b": 1})

    def test_release_frees_a_slot_and_forgets_the_last(self) -> None:
        """A release frees one slot; the key's entry goes with its last connection."""
        table = ConnectionTable()
        table.claim("a", 2)
        table.claim("a", 2)
        table.release("a")
        self.assertEqual(table.counts, {"a": 1})
        self.assertTrue(table.claim("a", 2))
        table.release("a")
        table.release("a")
        self.assertEqual(table.counts, {})
        self.assertEqual(table.open("a"), 0)

    def test_release_of_unknown_key(self) -> None:
        table = ConnectionTable()
        table.release("nobody")
        self.assertEqual(table.counts, {})


class ConnectionLimitsTests(SynchronousTestCase):
    def test_no_limits(self) -> None:
        self.assertEqual((NO_LIMITS.header_timeout, NO_LIMITS.max_per_client), (0.0, 0))

    def test_default_key_per_ipv4_address_and_ipv6_64(self) -> None:
        """Without trusted proxies: an IPv4 address, an IPv6 /64, no key for a UNIX peer."""
        key = ConnectionLimits().key_of
        self.assertEqual(key(IPv4Address("TCP", "203.0.113.5", 1)), "203.0.113.5")
        self.assertEqual(key(IPv6Address("TCP", "2001:db8:1:2::1", 1)), "2001:db8:1:2::/64")
        self.assertEqual(
            key(IPv6Address("TCP", "2001:db8:1:2:aaaa::5", 1)),
            key(IPv6Address("TCP", "2001:db8:1:2::ffff", 1)),
        )
        self.assertNotEqual(
            key(IPv6Address("TCP", "2001:db8:1:3::1", 1)), key(IPv6Address("TCP", "2001:db8:1:2::1", 1))
        )
        self.assertEqual(key(IPv6Address("TCP", "::ffff:203.0.113.5", 1)), "203.0.113.5")
        self.assertIsNone(key(UNIXAddress(b"/run/hmacfs.sock")))

    def test_trusted_proxy_not_counted(self) -> None:
        limits = ConnectionLimits(
            max_per_client=2,
            key_of=ClientAddressResolver([ipaddress.ip_network("10.0.0.0/8")]).connection_key,
        )
        self.assertIsNone(limits.key_of(IPv4Address("TCP", "10.1.2.3", 1)))
        self.assertEqual(limits.key_of(IPv4Address("TCP", "11.1.2.3", 1)), "11.1.2.3")

    def test_one_64_shares_a_cap(self) -> None:
        """Keys and table together: a /64 is one client, another /64 another."""
        limits = ConnectionLimits(max_per_client=2)
        table = ConnectionTable()

        def connect(host: str) -> bool:
            key = limits.key_of(IPv6Address("TCP", host, 1))
            assert key is not None
            return table.claim(key, limits.max_per_client)

        self.assertEqual(
            [connect(host) for host in ("2001:db8::1", "2001:db8::2", "2001:db8::3", "2001:db8:0:1::1")],
            [True, True, False, True],
        )
        self.assertEqual(table.counts, {"2001:db8::/64": 2, "2001:db8:0:1::/64": 1})
