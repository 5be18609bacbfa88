"""Which address a request is attributed to, with and without trusted proxies."""

from __future__ import annotations

import ipaddress

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.http_headers import Headers

from hmacfs.http.clientaddr import ClientAddressResolver

LOOPBACK = (ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128"))


def headers(**values: str) -> Headers:
    result = Headers()
    for name, value in values.items():
        result.addRawHeader(name.replace("_", "-").encode(), value.encode())
    return result


class ResolverTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.resolver = ClientAddressResolver(LOOPBACK)

    def test_untrusted_peer_headers_ignored(self) -> None:
        """A direct client's X-Forwarded-For / X-Real-IP never change its address."""
        peer = IPv4Address("TCP", "203.0.113.7", 5555)
        got = self.resolver.resolve(peer, headers(x_forwarded_for="1.2.3.4", x_real_ip="5.6.7.8"))
        self.assertEqual(got, "203.0.113.7")

    def test_trusted_proxy_xff_from_the_right(self) -> None:
        """Behind a trusted proxy, the right-most untrusted X-Forwarded-For hop is the client."""
        peer = IPv4Address("TCP", "127.0.0.1", 5555)
        got = self.resolver.resolve(peer, headers(x_forwarded_for="6.6.6.6, 198.51.100.9, 127.0.0.2"))
        self.assertEqual(got, "198.51.100.9")

    def test_unix_peer_is_trusted(self) -> None:
        """A UNIX-socket peer (nginx) is a trusted proxy."""
        got = self.resolver.resolve(UNIXAddress(b"/run/x.sock"), headers(x_forwarded_for="198.51.100.1"))
        self.assertEqual(got, "198.51.100.1")

    def test_real_ip_used_without_xff(self) -> None:
        """X-Real-IP from a trusted proxy is used when there is no X-Forwarded-For."""
        got = self.resolver.resolve(UNIXAddress(b"/run/x.sock"), headers(x_real_ip="2001:db8::5"))
        self.assertEqual(got, "2001:db8::5")

    def test_mapped_ipv6_peer(self) -> None:
        """An IPv4-mapped IPv6 peer is reported as the IPv4 address."""
        got = self.resolver.resolve(IPv6Address("TCP", "::ffff:203.0.113.9", 1), Headers())
        self.assertEqual(got, "203.0.113.9")

    def test_garbage_hop_stops_the_walk(self) -> None:
        """A malformed hop ends the walk: nothing to its left is believed."""
        got = self.resolver.resolve(UNIXAddress(b"/s"), headers(x_forwarded_for="1.1.1.1, junk, 127.0.0.1"))
        self.assertEqual(got, "127.0.0.1")

    @settings(derandomize=True, deadline=None, max_examples=200)
    @given(st.lists(st.ip_addresses(v=4).map(str), max_size=5))
    def test_spoofed_prefix_never_wins(self, spoofed: list[str]) -> None:
        """Whatever a client prepends, a trusted proxy's appended hop decides."""
        real = "198.51.100.77"
        value = ", ".join(spoofed + [real])
        got = self.resolver.resolve(UNIXAddress(b"/s"), headers(x_forwarded_for=value))
        self.assertEqual(got, real)
