"""
Slots as Prosody, Metronome and ejabberd build them, and hmacfs's expiring v3
slots.  The vectors below were written from the servers' formats (REFERENCE A
and B) and their MACs computed with ``openssl dgst -sha256 -hmac``, not with
the code under test.
"""

from __future__ import annotations

import re
import unicodedata
from pathlib import Path
from urllib.parse import unquote_to_bytes, urlsplit

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from hmacfs.signing.auth import Authenticator, AuthError
from hmacfs.signing.paths import parse_slot_path
from hmacfs.signing.slots import (
    SlotError,
    ejabberd_file_string,
    ejabberd_slot,
    ejabberd_slot_path,
    ejabberd_user_string,
    expiring_slot,
    metronome_slot,
    prosody_slot,
    prosody_slot_path,
)
from hmacfs.testing import SECRET as SECRET_OF_HARNESS
from hmacfs.testing import SiteHarness, make_config

PROPERTY = settings(derandomize=True, deadline=None, max_examples=200)
SECRET = b"s3cr3t"
UUID = "0e47a3ae-3d1b-4bd6-a7a9-f48d4a1a0a66"
PROSODY_BASE = "https://upload.example.org/upload/"
PROSODY_GET = (
    "https://upload.example.org/upload/0e47a3ae-3d1b-4bd6-a7a9-f48d4a1a0a66/my%20photo%20%c3%bc.jpg"
)
# printf '%s/my photo ü.jpg 12345' $UUID | openssl dgst -sha256 -hmac s3cr3t
V1_MAC = "483f2ebf5095269027bc8760962e6e3699afff3a2c6596a7d4cfc82514dda4db"
# printf '%s/my photo ü.jpg\0%s\0%s' $UUID 12345 image/jpeg | openssl ...
V2_MAC = "356da87f63df5a853d007ba224424214d45144c73257c76003f4cdb5295bddcb"
# ... with application/octet-stream, Prosody's default type
V2_DEFAULT_TYPE_MAC = "e1464cdf3f5af6367eacbc2c1d0c422e6ca4594adfeba3a711a54f995694dd60"
# printf alice@example.org | openssl dgst -sha1
ALICE_SHA1 = "45a6b241a242c97f0492d382c390dfa335aac986"
EJABBERD_RANDOM = "abcDEF0123456789abcDEF0123456789abcDEF01"
# printf '%s/%s/Grüße___co__1_.tar.gz 4096' $ALICE_SHA1 $EJABBERD_RANDOM | openssl ...
EJABBERD_MAC = "cfea299268cef5d385d71b836c2fc24065afe9db2a4674e7bc9fa5c3523d8043"
# printf 'PUT\n1700000300\n/upload/%s/file.txt' $UUID | openssl ...
V3_MAC = "10aaf7093e42d3a5788ff07fed1758ed7d6f3eb43251eae33b68b543893ed97e"


class ProsodyTests(SynchronousTestCase):
    """``mod_http_upload_external`` slots, v1 and v2."""

    def test_v1_vector(self) -> None:
        """v1: uuid/filename with lowercase escapes and ?v= over "path size"."""
        slot = prosody_slot(
            base_url=PROSODY_BASE, secret=SECRET, filename="my photo ü.jpg", size=12345,
            content_type="image/jpeg", random_part=UUID,
        )
        self.assertEqual(slot.get_url, PROSODY_GET)
        self.assertEqual(slot.put_url, f"{PROSODY_GET}?v={V1_MAC}")
        self.assertEqual(slot.headers, {})

    def test_v2_vector(self) -> None:
        """v2: the same URL with ?v2= over "path NUL size NUL type"."""
        slot = prosody_slot(
            base_url=PROSODY_BASE, secret=SECRET, filename="my photo ü.jpg", size=12345,
            content_type="image/jpeg", protocol="v2", random_part=UUID,
        )
        self.assertEqual(slot.put_url, f"{PROSODY_GET}?v2={V2_MAC}")
        self.assertEqual(slot.get_url, PROSODY_GET)

    def test_v2_default_type(self) -> None:
        """Without a content type, v2 signs application/octet-stream as Prosody does."""
        slot = prosody_slot(
            base_url=PROSODY_BASE, secret=SECRET, filename="my photo ü.jpg", size=12345,
            protocol="v2", random_part=UUID,
        )
        self.assertEqual(slot.put_url, f"{PROSODY_GET}?v2={V2_DEFAULT_TYPE_MAC}")

    def test_any_other_protocol_is_v2(self) -> None:
        """Prosody uses v2 for every protocol value other than "v1"."""
        slot = prosody_slot(
            base_url=PROSODY_BASE, secret=SECRET, filename="my photo ü.jpg", size=12345,
            content_type="image/jpeg", protocol="v3-whatever", random_part=UUID,
        )
        self.assertTrue(slot.put_url.endswith(f"?v2={V2_MAC}"))

    def test_random_part_is_uuid4(self) -> None:
        """Without a given random part, the first segment is a fresh RFC 4122 v4 UUID."""
        first = prosody_slot_path("a.txt").split("/")[0]
        second = prosody_slot_path("a.txt").split("/")[0]
        pattern = r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}"
        self.assertRegex(first, pattern)
        self.assertNotEqual(first, second)

    def test_refuses_slash_and_missing_name(self) -> None:
        """A filename with / or no filename at all is refused, as Prosody refuses it."""
        for name in ("a/b.txt", ""):
            error = self.assertRaises(
                SlotError, prosody_slot, base_url=PROSODY_BASE, secret=SECRET, filename=name,
                size=1,
            )
            self.assertTrue(error.reason)

    def test_refuses_what_hmacfs_refuses(self) -> None:
        """Names hmacfs would never store (.., control characters) are SlotErrors, not URLs."""
        for name in ("..", ".", "tab\there", "x" * 300):
            self.assertRaises(
                SlotError, prosody_slot, base_url=PROSODY_BASE, secret=SECRET, filename=name,
                size=1,
            )


class MetronomeTests(SynchronousTestCase):
    """Metronome's external upload protocol."""

    def test_token_vector(self) -> None:
        """token= carries the v2 message under another parameter name."""
        slot = metronome_slot(
            base_url=PROSODY_BASE, secret=SECRET, filename="my photo ü.jpg", size=12345,
            content_type="image/jpeg", random_part=UUID,
        )
        self.assertEqual(slot.put_url, f"{PROSODY_GET}?token={V2_MAC}")
        self.assertEqual(slot.get_url, PROSODY_GET)


class EjabberdTests(SynchronousTestCase):
    """``mod_http_upload`` with ``external_secret``."""

    def test_user_string_sha1(self) -> None:
        """The first segment is the SHA-1 of the lowercased bare JID, resource dropped."""
        self.assertEqual(ejabberd_user_string("Alice@Example.ORG/phone"), ALICE_SHA1)

    def test_user_string_node(self) -> None:
        """jid_in_url: node uses the sanitised user name instead."""
        self.assertEqual(ejabberd_user_string("Jo.Doe+x@example.org", "node"), "jo.doe_x")

    def test_file_string(self) -> None:
        """Every character but Unicode letters/digits, _ . - becomes _ (umlauts stay)."""
        self.assertEqual(ejabberd_file_string("Grüße & co (1).tar.gz"), "Grüße___co__1_.tar.gz")
        self.assertEqual(ejabberd_file_string("日本語 ٣.txt"), "日本語_٣.txt")
        self.assertEqual(ejabberd_file_string("a%2Fb?c#d"), "a_2Fb_c_d")

    def test_vector(self) -> None:
        """Three segments, uppercase escapes over the whole path, ?v= over "path size"."""
        slot = ejabberd_slot(
            put_url="https://xmpp.example.org:5443/upload/", secret=SECRET,
            jid="Alice@Example.ORG/phone", filename="Grüße & co (1).tar.gz", size=4096,
            random_part=EJABBERD_RANDOM,
        )
        get = (
            f"https://xmpp.example.org:5443/upload/{ALICE_SHA1}/{EJABBERD_RANDOM}/"
            "Gr%C3%BC%C3%9Fe___co__1_.tar.gz"
        )
        self.assertEqual(slot.get_url, get)
        self.assertEqual(slot.put_url, f"{get}?v={EJABBERD_MAC}")

    def test_host_placeholder_and_get_url(self) -> None:
        """@HOST@ becomes the user's domain; a separate get_url gets the same path, no query."""
        slot = ejabberd_slot(
            put_url="https://@HOST@:5443/upload", get_url="https://files.@HOST@/dl/",
            secret=SECRET, jid="alice@example.org", filename="Grüße & co (1).tar.gz",
            size=4096, random_part=EJABBERD_RANDOM,
        )
        path = f"{ALICE_SHA1}/{EJABBERD_RANDOM}/Gr%C3%BC%C3%9Fe___co__1_.tar.gz"
        self.assertEqual(slot.put_url, f"https://example.org:5443/upload/{path}?v={EJABBERD_MAC}")
        self.assertEqual(slot.get_url, f"https://files.example.org/dl/{path}")

    def test_random_part(self) -> None:
        """The random segment has secret_length alphanumerics."""
        path = ejabberd_slot_path("a@b.c", "f.txt", secret_length=12)
        random = path.split("/")[1]
        self.assertRegex(random, r"[A-Za-z0-9]{12}")
        self.assertEqual(len(path.split("/")), 3)

    def test_refuses_server_jid(self) -> None:
        """A JID without a user part has no slot."""
        self.assertRaises(SlotError, ejabberd_slot_path, "example.org", "f.txt")

    @PROPERTY
    @given(st.text(min_size=1, max_size=60).filter(lambda name: "/" not in name))
    def test_file_string_always_storable(self, name: str) -> None:
        """Any filename without / sanitises to letters, digits and _ . - only."""
        sanitised = ejabberd_file_string(name)
        self.assertEqual(len(sanitised), len(name))
        for char in sanitised:
            self.assertTrue(char in "_.-" or unicodedata.category(char)[0] in "LN", char)


def verify(clock_seconds: float, put_url: str, prefix: str, size: int) -> str:
    """Check a PUT URL with the Authenticator at a given time; the scheme that passed."""
    clock = Clock()
    clock.advance(clock_seconds)
    parts = urlsplit(put_url)
    query: dict[bytes, list[bytes]] = {}
    for pair in parts.query.split("&"):
        name, _, value = pair.partition("=")
        query.setdefault(name.encode(), []).append(value.encode())
    raw_path = parts.path.encode()
    authenticator = Authenticator(lambda: (SECRET,), clock, clock_skew=30)
    result = authenticator.verify_upload(
        method=b"PUT",
        full_path=unquote_to_bytes(raw_path),
        slot=parse_slot_path(raw_path, prefix),
        query=query,
        size=size,
        content_type=None,
    )
    return result.scheme


class ExpiringSlotTests(SynchronousTestCase):
    """hmacfs's own v3 slots (what the component hands out)."""

    def test_vector(self) -> None:
        """v3 over "PUT LF expires LF /upload/<uuid>/<file>", the GET URL without query."""
        slot = expiring_slot(
            base_url="https://upload.example.org/upload", secret=SECRET, filename="file.txt",
            size=10, expires=1700000300, random_part=UUID,
        )
        get = f"https://upload.example.org/upload/{UUID}/file.txt"
        self.assertEqual(slot.get_url, get)
        self.assertEqual(slot.put_url, f"{get}?v3={V3_MAC}&expires=1700000300")

    def test_authenticator_accepts_until_expiry(self) -> None:
        """The Authenticator accepts the slot before expires (+ skew) and refuses it after."""
        slot = expiring_slot(
            base_url="https://upload.example.org/files/xmpp", secret=SECRET,
            filename="naïve résumé.pdf", size=10, expires=1000,
        )
        self.assertEqual(verify(999, slot.put_url, "files/xmpp", 10), "v3")
        self.assertEqual(verify(1030, slot.put_url, "files/xmpp", 10), "v3")
        error = self.assertRaises(
            AuthError, verify, 1031, slot.put_url, "files/xmpp", 10
        )
        self.assertEqual(error.reason, "expired")

    def test_other_signers_verify(self) -> None:
        """Prosody and ejabberd slots from this module verify with the Authenticator too."""
        prosody = prosody_slot(
            base_url="http://h/upload/", secret=SECRET, filename="x y.bin", size=7
        )
        self.assertEqual(verify(0, prosody.put_url, "upload", 7), "v")
        ejabberd = ejabberd_slot(
            put_url="http://h/upload", secret=SECRET, jid="bob@example.org",
            filename="Ünïcode name.bin", size=7,
        )
        self.assertEqual(verify(0, ejabberd.put_url, "upload", 7), "v")

    def test_put_through_site(self) -> None:
        """A v3 slot PUT through the real site is stored (201), and refused once expired (403)."""
        store = Path(self.mktemp()).resolve()
        store.mkdir()
        harness = SiteHarness(make_config(store, min_free_bytes=0))
        harness.reactor.advance(5000)
        slot = expiring_slot(
            base_url="http://localhost/upload", secret=SECRET_OF_HARNESS, filename="a b.txt",
            size=5, expires=5300,
        )
        path = slot.put_url.split("localhost", 1)[1]
        protocol, transport = harness.connect()
        protocol.dataReceived(
            f"PUT {path} HTTP/1.1\r\nHost: localhost\r\nContent-Length: 5\r\n\r\nhello".encode()
        )
        self.assertRegex(transport.value().decode("latin-1"), r"^HTTP/1.1 201 ")
        stored = store / urlsplit(slot.get_url).path.split("/", 2)[2].replace("%20", " ")
        self.assertEqual(stored.read_bytes(), b"hello")

        harness.reactor.advance(400)
        late = expiring_slot(
            base_url="http://localhost/upload", secret=SECRET_OF_HARNESS, filename="b.txt",
            size=5, expires=5300,
        )
        protocol, transport = harness.connect(40001)
        protocol.dataReceived(
            f"PUT {late.put_url.split('localhost', 1)[1]} HTTP/1.1\r\nHost: localhost\r\n"
            "Content-Length: 5\r\n\r\nhello".encode()
        )
        self.assertTrue(re.match(rb"HTTP/1.1 403 ", transport.value()), transport.value())

