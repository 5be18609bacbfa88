"""
Tests for hmacfs.signing.auth: the HMAC schemes and the URL signer.

Expected MACs are computed here with hmac/hashlib from the message formats in
REFERENCE.md A.3 and B, independently of the code under test.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Sequence
from typing import Any
from urllib.parse import parse_qs, unquote_to_bytes, urlsplit

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from hmacfs.signing.auth import (
    Authenticator,
    AuthError,
    AuthResult,
    SignedSlot,
    ejabberd_quote,
    mac_for,
    prosody_quote,
    sign_slot,
)
from hmacfs.signing.paths import SlotPath, parse_slot_path
from tests.test_paths import segment_lists

PROFILE = settings(derandomize=True, deadline=None, max_examples=200)

SECRET = b"correct horse battery staple"
OLD_SECRET = b"the secret before the rotation"
NOW = 1_700_000_000

UUID = "c1f0a1d2-9b3e-4f5a-8c7d-0e1f2a3b4c5d"
PROSODY_PATH = f"{UUID}/my photo.jpg"
PROSODY_RAW = f"/upload/{UUID}/my%20photo.jpg".encode()

EJABBERD_USER = hashlib.sha1(b"juliet@capulet.lit").hexdigest()
EJABBERD_RAND = "Qw3rTy7uIoP1aSdF9gHjK2lZxC8vBnM4qWeR5tYu"
EJABBERD_FILE = "Gr\u00fc\u00dfe_\u00fc.txt"
EJABBERD_PATH = f"{EJABBERD_USER}/{EJABBERD_RAND}/{EJABBERD_FILE}"


def hex_hmac(secret: bytes, message: bytes) -> bytes:
    """The reference MAC: HMAC-SHA256, lowercase hex."""
    return hmac.new(secret, message, hashlib.sha256).hexdigest().encode("ascii")


def query_of(url: str) -> dict[bytes, list[bytes]]:
    """The query of a URL as Twisted's request.args holds it."""
    return parse_qs(urlsplit(url).query.encode("ascii"), keep_blank_values=True)


def raw_path_of(url: str) -> bytes:
    """The still-encoded request path of a URL."""
    return urlsplit(url).path.encode("ascii")


class AuthenticatorTests(SynchronousTestCase):
    """Authenticator.verify_upload against hand-computed vectors."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(NOW)
        self.secrets: list[bytes] = [SECRET]
        self.auth = Authenticator(lambda: self.secrets, self.clock)
        self.slot = parse_slot_path(PROSODY_RAW, "upload")

    def verify(
        self,
        query: dict[bytes, list[bytes]],
        *,
        size: int | None = 1234,
        content_type: bytes | None = None,
        slot: SlotPath | None = None,
        raw_path: bytes = PROSODY_RAW,
        method: bytes = b"PUT",
    ) -> AuthResult:
        """Verify an upload of the Prosody slot (or ``slot``) with ``query``."""
        return self.auth.verify_upload(
            method=method,
            full_path=unquote_to_bytes(raw_path),
            slot=slot if slot is not None else self.slot,
            query=query,
            size=size,
            content_type=content_type,
        )

    def assert_refused(
        self, reason: str, query: dict[bytes, list[bytes]], **kwargs: object
    ) -> None:
        """verify_upload raises AuthError with ``reason``."""
        error = self.assertRaises(AuthError, self.verify, query, **kwargs)
        self.assertEqual(error.reason, reason)

    def test_prosody_v1(self) -> None:
        """v signs '<path> <size>' over the decoded slot path (Prosody v1)."""
        mac = hex_hmac(SECRET, PROSODY_PATH.encode() + b" 1234")
        self.assertEqual(self.verify({b"v": [mac]}), AuthResult(scheme="v", expires=None))

    def test_v1_ignores_content_type(self) -> None:
        """v does not bind the content type, so any type is accepted."""
        mac = hex_hmac(SECRET, PROSODY_PATH.encode() + b" 1234")
        self.assertEqual(self.verify({b"v": [mac]}, content_type=b"text/html").scheme, "v")

    def test_v2_with_type(self) -> None:
        """v2 signs path NUL size NUL content-type."""
        mac = hex_hmac(SECRET, PROSODY_PATH.encode() + b"\x001234\x00image/jpeg")
        self.assertEqual(self.verify({b"v2": [mac]}, content_type=b"image/jpeg").scheme, "v2")

    def test_v2_without_type(self) -> None:
        """v2 without a Content-Type header verifies against application/octet-stream."""
        mac = hex_hmac(SECRET, PROSODY_PATH.encode() + b"\x001234\x00application/octet-stream")
        self.assertEqual(self.verify({b"v2": [mac]}, content_type=None).scheme, "v2")
        self.assert_refused("bad MAC", {b"v2": [mac]}, content_type=b"image/jpeg")

    def test_token(self) -> None:
        """token (Metronome) uses the v2 message under another parameter name."""
        mac = hex_hmac(SECRET, PROSODY_PATH.encode() + b"\x001234\x00image/png")
        self.assertEqual(self.verify({b"token": [mac]}, content_type=b"image/png").scheme, "token")

    def v3_query(
        self, expires: int, full_path: bytes, method: bytes = b"PUT"
    ) -> dict[bytes, list[bytes]]:
        """A v3 query for ``full_path``, signed with the reference HMAC."""
        mac = hex_hmac(SECRET, method + b"\n" + str(expires).encode() + b"\n" + full_path)
        return {b"v3": [mac], b"expires": [str(expires).encode()]}

    def test_v3_fresh(self) -> None:
        """v3 signs method LF expires LF decoded full path, and needs no size."""
        query = self.v3_query(NOW + 300, f"/upload/{PROSODY_PATH}".encode())
        self.assertEqual(self.verify(query, size=None), AuthResult(scheme="v3", expires=NOW + 300))

    def test_v3_expired(self) -> None:
        """A v3 URL is accepted up to expires + clock_skew and refused after."""
        query = self.v3_query(NOW + 300, f"/upload/{PROSODY_PATH}".encode())
        self.clock.advance(330)
        self.assertEqual(self.verify(query).scheme, "v3")
        self.clock.advance(1)
        self.assert_refused("expired", query)

    def test_v3_clock_skew(self) -> None:
        """clock_skew is configurable."""
        auth = Authenticator(lambda: [SECRET], self.clock, clock_skew=0)
        query = self.v3_query(NOW - 1, f"/upload/{PROSODY_PATH}".encode())
        error = self.assertRaises(
            AuthError,
            auth.verify_upload,
            method=b"PUT",
            full_path=unquote_to_bytes(PROSODY_RAW),
            slot=self.slot,
            query=query,
            size=None,
            content_type=None,
        )
        self.assertEqual(error.reason, "expired")

    def test_v3_binds_method_and_prefix(self) -> None:
        """v3 covers the method and the upload prefix, not just the slot path."""
        for_put = self.v3_query(NOW + 300, f"/upload/{PROSODY_PATH}".encode())
        self.assert_refused("bad MAC", for_put, method=b"POST")
        for_get = self.v3_query(NOW + 300, f"/upload/{PROSODY_PATH}".encode(), b"GET")
        self.assert_refused("bad MAC", for_get)
        self.assert_refused("bad MAC", self.v3_query(NOW + 300, f"/{PROSODY_PATH}".encode()))
        self.assert_refused("bad MAC", self.v3_query(NOW + 300, PROSODY_PATH.encode()))

    def test_v3_forged_expires(self) -> None:
        """Moving expires into the future invalidates the MAC."""
        query = self.v3_query(NOW - 3600, f"/upload/{PROSODY_PATH}".encode())
        query[b"expires"] = [str(NOW + 3600).encode()]
        self.assert_refused("bad MAC", query)

    def test_v3_malformed_expires(self) -> None:
        """A missing or non-decimal expires is refused before any MAC check."""
        mac = self.v3_query(NOW + 300, f"/upload/{PROSODY_PATH}".encode())[b"v3"]
        self.assert_refused("malformed expires", {b"v3": mac})
        for bad in (b"", b"abc", b"-5", b"+5", b" 5", b"1.5", b"1e9", b"9" * 40):
            self.assert_refused("malformed expires", {b"v3": mac, b"expires": [bad]})

    def test_expired_only_for_genuine_urls(self) -> None:
        """An old v3 URL with a wrong MAC is reported as a bad MAC, not as expired."""
        query = self.v3_query(NOW - 3600, f"/upload/{PROSODY_PATH}".encode())
        query[b"v3"] = [b"0" * 64]
        self.assert_refused("bad MAC", query)

    def test_ejabberd_slot(self) -> None:
        """An ejabberd URL with uppercase UTF-8 escapes verifies against the decoded UTF-8 path."""
        url = (
            f"https://xmpp.example.org:5443/upload/{EJABBERD_USER}/{EJABBERD_RAND}"
            "/Gr%C3%BC%C3%9Fe_%C3%BC.txt"
        )
        mac = hex_hmac(SECRET, EJABBERD_PATH.encode("utf-8") + b" 5678")
        slot = parse_slot_path(raw_path_of(url), "upload")
        self.assertEqual(slot.signed, EJABBERD_PATH.encode("utf-8"))
        self.assertEqual(slot.segments, (EJABBERD_USER, EJABBERD_RAND, EJABBERD_FILE))
        result = self.verify({b"v": [mac]}, size=5678, slot=slot, raw_path=raw_path_of(url))
        self.assertEqual(result.scheme, "v")

        signed = sign_slot(
            base_url="https://xmpp.example.org:5443/upload",
            path=EJABBERD_PATH,
            size=5678,
            secret=SECRET,
            style="ejabberd",
        )
        expected = SignedSlot(put_url=f"{url}?v={mac.decode()}", get_url=url, headers={})
        self.assertEqual(signed, expected)

    def test_uppercase_mac(self) -> None:
        """A MAC presented in uppercase hex is accepted."""
        mac = hex_hmac(SECRET, PROSODY_PATH.encode() + b" 1234").upper()
        self.assertEqual(self.verify({b"v": [mac]}).scheme, "v")

    def test_tampered_mac(self) -> None:
        """Changing one hex digit of the MAC is refused."""
        mac = bytearray(hex_hmac(SECRET, PROSODY_PATH.encode() + b" 1234"))
        mac[10] = ord("0") if mac[10] != ord("0") else ord("1")
        self.assert_refused("bad MAC", {b"v": [bytes(mac)]})

    def test_wrong_size(self) -> None:
        """The size is bound: a MAC for 1234 bytes does not authorise 1235."""
        mac = hex_hmac(SECRET, PROSODY_PATH.encode() + b" 1234")
        self.assert_refused("bad MAC", {b"v": [mac]}, size=1235)

    def test_wrong_content_type(self) -> None:
        """v2 compares the Content-Type byte for byte: parameters or case changes break it."""
        mac = hex_hmac(SECRET, PROSODY_PATH.encode() + b"\x001234\x00image/jpeg")
        for sent in (b"image/jpeg; charset=x", b"Image/JPEG", b"", b"image/jpeg "):
            self.assert_refused("bad MAC", {b"v2": [mac]}, content_type=sent)

    def test_other_path(self) -> None:
        """A MAC for one slot does not authorise another."""
        mac = hex_hmac(SECRET, f"{UUID}/other.jpg 1234".encode())
        self.assert_refused("bad MAC", {b"v": [mac]})

    def test_mac_over_path_alone(self) -> None:
        """There is no fallback to a MAC over the path without the size."""
        mac = hex_hmac(SECRET, PROSODY_PATH.encode())
        for name in (b"v", b"v2", b"token"):
            self.assert_refused("bad MAC", {name: [mac]})

    def test_wrong_secret(self) -> None:
        """A MAC under another secret is refused."""
        mac = hex_hmac(b"not the secret", PROSODY_PATH.encode() + b" 1234")
        self.assert_refused("bad MAC", {b"v": [mac]})

    def test_precedence(self) -> None:
        """Only the strongest parameter is checked: a valid v next to a bad v2 is refused."""
        good_v = hex_hmac(SECRET, PROSODY_PATH.encode() + b" 1234")
        self.assert_refused("malformed MAC", {b"v": [good_v], b"v2": [b"garbage"]})
        self.assert_refused("bad MAC", {b"v": [good_v], b"v2": [b"ab" * 32]})
        self.assert_refused("bad MAC", {b"v": [good_v], b"token": [b"ab" * 32]})
        self.assert_refused("malformed expires", {b"v": [good_v], b"v3": [b"ab" * 32]})

    def test_precedence_strongest_wins(self) -> None:
        """When the strongest parameter is valid, weaker ones are ignored."""
        good_v2 = hex_hmac(SECRET, PROSODY_PATH.encode() + b"\x001234\x00application/octet-stream")
        self.assertEqual(self.verify({b"v": [b"garbage"], b"v2": [good_v2]}).scheme, "v2")
        query = self.v3_query(NOW + 300, f"/upload/{PROSODY_PATH}".encode())
        query[b"token"] = [b"garbage"]
        self.assertEqual(self.verify(query).scheme, "v3")

    def test_rotation(self) -> None:
        """A MAC under the previous secret is accepted while secrets() still returns it."""
        mac = hex_hmac(OLD_SECRET, PROSODY_PATH.encode() + b" 1234")
        self.secrets[:] = [SECRET, OLD_SECRET]
        self.assertEqual(self.verify({b"v": [mac]}).scheme, "v")
        self.secrets[:] = [SECRET]
        self.assert_refused("bad MAC", {b"v": [mac]})

    def test_empty_secret_ignored(self) -> None:
        """An empty secret authorises nothing (anyone could compute its MACs)."""
        self.secrets[:] = [b""]
        mac = hex_hmac(b"", PROSODY_PATH.encode() + b" 1234")
        self.assert_refused("bad MAC", {b"v": [mac]})

    def test_missing_mac(self) -> None:
        """No MAC parameter at all, or one without a value in the mapping, is 'missing MAC'."""
        self.assert_refused("missing MAC", {})
        self.assert_refused("missing MAC", {b"expires": [b"1"], b"other": [b"x"]})
        self.assert_refused("missing MAC", {b"v": []})

    def test_malformed_mac(self) -> None:
        """A MAC that is not 64 hex digits is 'malformed MAC'."""
        good = hex_hmac(SECRET, PROSODY_PATH.encode() + b" 1234")
        for bad in (b"", good[:-1], good + b"0", b"g" * 64, good[:-1] + b" ", b"\xff" * 64):
            self.assert_refused("malformed MAC", {b"v": [bad]})

    def test_missing_size(self) -> None:
        """v, v2 and token need a size; without one they are refused."""
        mac = hex_hmac(SECRET, PROSODY_PATH.encode() + b" 1234")
        for name in (b"v", b"v2", b"token"):
            self.assert_refused("missing size", {name: [mac]}, size=None)

    def test_repeated_parameter(self) -> None:
        """A parameter given twice is taken from its first occurrence."""
        good = hex_hmac(SECRET, PROSODY_PATH.encode() + b" 1234")
        self.assertEqual(self.verify({b"v": [good, b"0" * 64]}).scheme, "v")
        self.assert_refused("bad MAC", {b"v": [b"0" * 64, good]})

    def test_error_text(self) -> None:
        """AuthError carries its reason and says it when printed."""
        error = AuthError("expired")
        self.assertEqual((error.reason, str(error)), ("expired", "expired"))


class SignerTests(SynchronousTestCase):
    """mac_for, the quoting functions and sign_slot."""

    def test_prosody_quote(self) -> None:
        """Prosody keeps [A-Za-z0-9.~_-] and escapes every other byte in lowercase."""
        self.assertEqual(prosody_quote("my photo~_-.JPG"), "my%20photo~_-.JPG")
        self.assertEqual(prosody_quote("a/b:\u00fc+%"), "a%2fb%3a%c3%bc%2b%25")

    def test_ejabberd_quote(self) -> None:
        """ejabberd keeps [A-Za-z0-9_.-/:] and escapes every other byte in uppercase."""
        self.assertEqual(ejabberd_quote("a/b:\u00fc ~+"), "a/b:%C3%BC%20%7E%2B")

    def test_prosody_slot_urls(self) -> None:
        """sign_slot reproduces Prosody's GET and PUT URLs for each scheme."""
        base = "https://upload.example.org/upload/"
        get_url = f"https://upload.example.org/upload/{UUID}/my%20photo.jpg"
        v1 = hex_hmac(SECRET, PROSODY_PATH.encode() + b" 1234").decode()
        v2 = hex_hmac(SECRET, PROSODY_PATH.encode() + b"\x001234\x00image/jpeg").decode()
        v3 = hex_hmac(SECRET, b"PUT\n1700000300\n/upload/" + PROSODY_PATH.encode()).decode()
        cases: list[tuple[dict[str, Any], str]] = [
            (dict(scheme="v"), f"?v={v1}"),
            (dict(scheme="v2", content_type="image/jpeg"), f"?v2={v2}"),
            (dict(scheme="token", content_type="image/jpeg"), f"?token={v2}"),
            (dict(scheme="v3", expires=NOW + 300), f"?v3={v3}&expires={NOW + 300}"),
        ]
        for options, query in cases:
            signed = sign_slot(
                base_url=base, path=PROSODY_PATH, size=1234, secret=SECRET, **options
            )
            self.assertEqual(signed, SignedSlot(put_url=get_url + query, get_url=get_url))

    def test_v3_full_path_decodes_base(self) -> None:
        """For v3 the signed full path is the decoded path of base_url plus the slot path."""
        signed = sign_slot(
            base_url="https://h.example/files/x%20y",
            path="a/b",
            size=1,
            secret=SECRET,
            scheme="v3",
            expires=NOW,
        )
        mac = hex_hmac(SECRET, f"PUT\n{NOW}\n/files/x y/a/b".encode()).decode()
        expected = f"https://h.example/files/x%20y/a/b?v3={mac}&expires={NOW}"
        self.assertEqual(signed.put_url, expected)

    def test_mac_for(self) -> None:
        """mac_for computes the lowercase hex MAC of every scheme's message."""
        path = PROSODY_PATH.encode()
        self.assertEqual(
            mac_for("v", SECRET, signed_path=path, size=5),
            hex_hmac(SECRET, path + b" 5").decode(),
        )
        self.assertEqual(
            mac_for("token", SECRET, signed_path=path, size=5),
            hex_hmac(SECRET, path + b"\x005\x00application/octet-stream").decode(),
        )
        self.assertEqual(
            mac_for("v3", SECRET, signed_path=path, method=b"PUT", full_path=b"/x", expires=7),
            hex_hmac(SECRET, b"PUT\n7\n/x").decode(),
        )

    def test_mac_for_errors(self) -> None:
        """mac_for refuses unknown schemes and missing inputs."""
        self.assertRaises(ValueError, mac_for, "v4", SECRET, signed_path=b"a", size=1)
        self.assertRaises(ValueError, mac_for, "v", SECRET, signed_path=b"a")
        self.assertRaises(ValueError, mac_for, "v3", SECRET, signed_path=b"a", full_path=b"/a")
        self.assertRaises(ValueError, mac_for, "v3", SECRET, signed_path=b"a", expires=1)

    def test_sign_slot_errors(self) -> None:
        """sign_slot refuses bad options and paths this server would refuse."""
        common = dict(base_url="https://h/upload", size=1, secret=SECRET)
        self.assertRaises(ValueError, sign_slot, path="a/b", style="metronome", **common)
        self.assertRaises(ValueError, sign_slot, path="a/b", scheme="v4", **common)
        self.assertRaises(ValueError, sign_slot, path="a/b", scheme="v3", **common)
        self.assertRaises(ValueError, sign_slot, path="a/b", scheme="v", expires=1, **common)
        for path in ("a/../b", "a//b", "", "a/", ".hmacfs/x", "a/b\x00"):
            self.assertRaises(ValueError, sign_slot, path=path, **common)


_BASES = st.sampled_from(
    [
        ("https://upload.example.org/upload", "upload"),
        ("https://upload.example.org/", ""),
        ("https://h.example:5443/a/b/", "a/b"),
        ("https://h.example/files/x%20y", "files/x y"),
    ]
)
_CONTENT_TYPES = st.none() | st.text(
    st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=40
)


class SignVerifyPropertyTests(SynchronousTestCase):
    """sign_slot and Authenticator agree on every scheme and style."""

    @PROFILE
    @given(
        segments=segment_lists,
        base=_BASES,
        size=st.integers(min_value=0, max_value=2**63),
        content_type=_CONTENT_TYPES,
        scheme=st.sampled_from(["v", "v2", "token", "v3"]),
        style=st.sampled_from(["prosody", "ejabberd"]),
        lifetime=st.integers(min_value=0, max_value=10**6),
        flip_at=st.integers(min_value=0, max_value=63),
        flip_to=st.sampled_from("0123456789abcdef"),
    )
    def test_round_trip(
        self,
        segments: Sequence[str],
        base: tuple[str, str],
        size: int,
        content_type: str | None,
        scheme: str,
        style: str,
        lifetime: int,
        flip_at: int,
        flip_to: str,
    ) -> None:
        """A signed URL parses and verifies under its scheme; changing one MAC digit breaks it."""
        base_url, prefix = base
        clock = Clock()
        clock.advance(NOW)
        auth = Authenticator(lambda: [SECRET], clock)
        signed = sign_slot(
            base_url=base_url,
            path="/".join(segments),
            size=size,
            secret=SECRET,
            scheme=scheme,
            content_type=content_type,
            style=style,
            expires=NOW + lifetime if scheme == "v3" else None,
        )
        self.assertTrue(signed.put_url.startswith(signed.get_url + "?"))
        raw_path = raw_path_of(signed.put_url)
        slot = parse_slot_path(raw_path, prefix)
        self.assertEqual(slot.segments, tuple(segments))

        def verify(query: dict[bytes, list[bytes]]) -> AuthResult:
            return auth.verify_upload(
                method=b"PUT",
                full_path=unquote_to_bytes(raw_path),
                slot=slot,
                query=query,
                size=size,
                content_type=None if content_type is None else content_type.encode(),
            )

        query = query_of(signed.put_url)
        self.assertEqual(verify(query).scheme, scheme)

        mac = query[scheme.encode()][0]
        if mac[flip_at : flip_at + 1] == flip_to.encode():
            flip_to = "f" if flip_to != "f" else "0"
        query[scheme.encode()] = [mac[:flip_at] + flip_to.encode() + mac[flip_at + 1 :]]
        error = self.assertRaises(AuthError, verify, query)
        self.assertEqual(error.reason, "bad MAC")
