"""
Tests for hmacfs.signing.paths: request path -> validated slot path.

The encoders below are written out here, independently of hmacfs.signing.auth, from
the Prosody and ejabberd sources (REFERENCE.md A.2 and B).
"""

from __future__ import annotations

import os.path
from urllib.parse import unquote_to_bytes

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from hmacfs.signing.paths import (
    MAX_PATH_BYTES,
    MAX_SEGMENT_BYTES,
    MAX_SEGMENTS,
    PathError,
    SlotPath,
    parse_slot_path,
    validate_segments,
)

PROFILE = settings(derandomize=True, deadline=None, max_examples=200)

UUID = "c1f0a1d2-9b3e-4f5a-8c7d-0e1f2a3b4c5d"

_ALNUM = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"


def prosody_encode(segment: str) -> bytes:
    """Prosody util.http.urlencode: lowercase %xx for every byte outside [A-Za-z0-9.~_-]."""
    return b"".join(
        bytes([byte]) if byte in _ALNUM + b".~_-" else b"%%%02x" % byte
        for byte in segment.encode("utf-8")
    )


def ejabberd_encode(path: str) -> bytes:
    """ejabberd misc:url_encode: uppercase %XX for every byte outside [A-Za-z0-9_.-/:]."""
    return b"".join(
        bytes([byte]) if byte in _ALNUM + b"_.-/:" else b"%%%02X" % byte
        for byte in path.encode("utf-8")
    )


def _valid_segment(text: str) -> bool:
    raw = text.encode("utf-8")
    return raw.strip(b".") != b"" and len(raw) <= MAX_SEGMENT_BYTES


_FORBIDDEN = "/" + "".join(chr(code) for code in range(0x20)) + "\x7f"
segment_texts = st.text(
    alphabet=st.characters(codec="utf-8", exclude_characters=_FORBIDDEN)
    | st.sampled_from(list(".%+~ \\:?#\u00fc\u0301")),
    min_size=1,
    max_size=40,
).filter(_valid_segment)

segment_lists = st.lists(segment_texts, min_size=1, max_size=MAX_SEGMENTS).filter(
    lambda segments: len("/".join(segments).encode("utf-8")) <= MAX_PATH_BYTES
    and segments[0].casefold() != ".hmacfs"
)


def _spell(char: str, upper: bool, encode: int) -> bytes:
    """One character of the private name: either case, raw or as %xx / %XX."""
    byte = (char.upper() if upper else char).encode("ascii")
    if encode == 0:
        return byte
    return (b"%%%02x" if encode == 1 else b"%%%02X") % byte[0]


#: ".hmacfs" in any case, any mix of its bytes percent-encoded (lower or upper hex).
private_names = st.lists(
    st.tuples(st.booleans(), st.integers(min_value=0, max_value=2)), min_size=7, max_size=7
).map(lambda spelling: b"".join(_spell(c, u, e) for c, (u, e) in zip(".hmacfs", spelling, strict=True)))

prefixes = st.sampled_from(["upload", "", "a/b", "files/x y"])


def prefixed(prefix: str, rest: bytes) -> bytes:
    """A raw request path for ``rest`` under ``prefix`` (prefix segments Prosody-encoded)."""
    if not prefix:
        return b"/" + rest
    return b"/" + b"/".join(prosody_encode(part) for part in prefix.split("/")) + b"/" + rest


class ParseSlotPathTests(SynchronousTestCase):
    """Explicit cases for parse_slot_path."""

    def assert_rejected(self, raw_path: bytes, status: int, prefix: str = "upload") -> PathError:
        """parse_slot_path(raw_path) raises PathError with ``status``."""
        error = self.assertRaises(PathError, parse_slot_path, raw_path, prefix)
        self.assertEqual(error.status, status, f"{raw_path!r}: {error.reason}")
        self.assertIsInstance(error.reason, str)
        self.assertTrue(error.reason)
        return error

    def test_prosody_slot(self) -> None:
        """A Prosody URL decodes to its two segments and the bytes Prosody signed."""
        slot = parse_slot_path(f"/upload/{UUID}/my%20photo.jpg".encode(), "upload")
        expected = SlotPath(segments=(UUID, "my photo.jpg"), signed=f"{UUID}/my photo.jpg".encode())
        self.assertEqual(slot, expected)
        self.assertEqual(slot.text, f"{UUID}/my photo.jpg")

    def test_repeated_parse_is_the_same_slot(self) -> None:
        """A path parsed twice in one request (tombstone check, then the policy) gives the
        same immutable SlotPath; a refused path is refused every time, with a new error,
        and the prefix still decides."""
        raw = f"/upload/{UUID}/again.bin".encode()
        self.assertIs(parse_slot_path(raw, "upload"), parse_slot_path(raw, "upload"))
        first = self.assert_rejected(b"/elsewhere/x/y", 404)
        second = self.assert_rejected(b"/elsewhere/x/y", 404)
        self.assertIsNot(first, second)
        self.assert_rejected(raw, 404, prefix="other")
        self.assertEqual(parse_slot_path(raw, "").segments, ("upload", UUID, "again.bin"))

    def test_ejabberd_non_ascii(self) -> None:
        """ejabberd's uppercase UTF-8 escapes decode to the UTF-8 name it signed."""
        slot = parse_slot_path(b"/upload/abc/Gr%C3%BC%C3%9Fe.txt", "upload")
        self.assertEqual(slot.segments, ("abc", "Gr\u00fc\u00dfe.txt"))
        self.assertEqual(slot.signed, "abc/Gr\u00fc\u00dfe.txt".encode())

    def test_hex_case(self) -> None:
        """Upper, lower and mixed case escapes decode to the same byte."""
        expected = "a/\u00fc".encode()
        for raw in (b"/upload/a/%C3%BC", b"/upload/a/%c3%bc", b"/upload/a/%c3%Bc"):
            self.assertEqual(parse_slot_path(raw, "upload").signed, expected)

    def test_plus_is_literal(self) -> None:
        """'+' is a plus sign, not a space (paths are not form-encoded)."""
        self.assertEqual(parse_slot_path(b"/upload/a/b+c", "upload").segments, ("a", "b+c"))

    def test_literal_bytes_kept(self) -> None:
        """Unescaped sub-delims, backslash and an encoded percent pass through unchanged."""
        slot = parse_slot_path(b"/upload/a/x\\y;z=1,(2)!%25~", "upload")
        self.assertEqual(slot.segments, ("a", "x\\y;z=1,(2)!%~"))

    def test_no_unicode_normalisation(self) -> None:
        """A decomposed name stays decomposed: the signed bytes are kept as sent."""
        slot = parse_slot_path(b"/upload/a/e%CC%81", "upload")
        self.assertEqual(slot.signed, b"a/e\xcc\x81")
        self.assertEqual(slot.segments[1], "e\u0301")

    def test_encoded_slash(self) -> None:
        """%2F and %2f are refused: they must never become a segment boundary."""
        self.assert_rejected(b"/upload/a/b%2Fc", 400)
        self.assert_rejected(b"/upload/a/b%2fc", 400)
        self.assert_rejected(b"/upload/a%2F..%2F..%2Fetc/passwd", 400)

    def test_control_characters(self) -> None:
        """NUL, other C0 controls and DEL are refused, encoded or raw."""
        for tail in (b"b%00", b"b%0a", b"%1f", b"%7F", b"b\x01"):
            raw = b"/upload/a/" + tail
            self.assert_rejected(raw, 400)

    def test_dot_segments(self) -> None:
        """'.', '..' and all-dot segments are refused, encoded or not."""
        for raw in (
            b"/upload/a/..",
            b"/upload/../x",
            b"/upload/a/.",
            b"/upload/a/%2e%2e",
            b"/upload/a/%2E%2E",
            b"/upload/a/.%2e",
            b"/upload/a/%2e",
            b"/upload/a/...",
            b"/upload/..../b",
        ):
            self.assert_rejected(raw, 400)

    def test_dots_inside_names(self) -> None:
        """Names that merely contain dots are fine."""
        slot = parse_slot_path(b"/upload/.a/..b/c..", "upload")
        self.assertEqual(slot.segments, (".a", "..b", "c.."))

    def test_empty_segments(self) -> None:
        """'//', a trailing slash and an empty slot path are refused."""
        for raw in (b"/upload/a//b", b"/upload/a/b/", b"/upload/", b"/upload//a"):
            self.assert_rejected(raw, 400)
        self.assert_rejected(b"/", 400, prefix="")

    def test_malformed_escapes(self) -> None:
        """A '%' not followed by two hex digits is refused rather than taken literally."""
        for tail in (b"%zz", b"%4", b"b%", b"%+1", b"% 1", b"%1_"):
            raw = b"/upload/a/" + tail
            self.assert_rejected(raw, 400)

    def test_not_utf8(self) -> None:
        """Decoded segments must be UTF-8: stray, truncated and surrogate sequences are refused."""
        for tail in (b"%ff", b"%c3", b"%ed%a0%80", b"%c0%af", b"\xff"):
            raw = b"/upload/a/" + tail
            self.assert_rejected(raw, 400)

    def test_segment_length(self) -> None:
        """A decoded segment may have 255 bytes, not 256."""
        longest = "\u00fc" * 127 + "x"  # 255 bytes
        slot = parse_slot_path(b"/upload/a/" + prosody_encode(longest), "upload")
        self.assertEqual(slot.segments[1], longest)
        self.assert_rejected(b"/upload/a/" + prosody_encode(longest + "x"), 414)

    def test_total_length(self) -> None:
        """The decoded slot path may have 1024 bytes, not 1025."""
        segments = ["a" * 255] * 3 + ["b" * 254, "c"]  # 1020 bytes + 4 separators
        raw = "/".join(segments).encode()
        self.assertEqual(len(raw), MAX_PATH_BYTES)
        self.assertEqual(parse_slot_path(b"/upload/" + raw, "upload").signed, raw)
        self.assert_rejected(b"/upload/" + raw + b"b", 414)

    def test_total_length_fully_escaped(self) -> None:
        """The 1024-byte limit applies to decoded bytes: a fully escaped maximum path passes."""
        segments = ["~" * 255] * 3 + ["~" * 254, "~"]
        raw = ejabberd_encode("/".join(segments))
        self.assertEqual(len(raw), 3 * 1020 + 4)
        self.assertEqual(parse_slot_path(b"/upload/" + raw, "upload").segments, tuple(segments))

    def test_very_long_raw_path(self) -> None:
        """A huge raw path is refused as too long."""
        self.assert_rejected(b"/upload/" + b"%41" * 100_000, 414)
        self.assert_rejected(b"/upload/" + b"a/" * 100_000 + b"a", 414)

    def test_segment_count(self) -> None:
        """Eight segments are accepted, nine are not."""
        slot = parse_slot_path(b"/upload/" + b"/".join([b"s"] * 8), "upload")
        self.assertEqual(len(slot.segments), 8)
        self.assert_rejected(b"/upload/" + b"/".join([b"s"] * 9), 400)

    def test_reserved_first_segment(self) -> None:
        """'.hmacfs' as the first slot segment is our state directory: 403, even encoded."""
        self.assert_rejected(b"/upload/.hmacfs/state", 403)
        self.assert_rejected(b"/upload/%2ehmacfs/state", 403)
        self.assert_rejected(b"/.hmacfs/x", 403, prefix="")
        self.assertEqual(parse_slot_path(b"/upload/a/.hmacfs", "upload").segments, ("a", ".hmacfs"))

    @PROFILE
    @given(name=private_names, prefix=prefixes, rest=st.sampled_from([b"", b"/x", b"/partial/k.part"]))
    def test_reserved_in_any_case_and_encoding(self, name: bytes, prefix: str, rest: bytes) -> None:
        """'.HMACFS', '.hMaCfS', '%2EHMACFS', '%2e%68macfs'... are the private directory too: 403."""
        self.assert_rejected(prefixed(prefix, name + rest), 403, prefix=prefix)
        decoded = unquote_to_bytes(name)
        self.assertEqual(self.assertRaises(PathError, validate_segments, [decoded, b"x"]).status, 403)

    def test_outside_prefix(self) -> None:
        """Paths not below '/<prefix>/' are 404."""
        for raw in (
            b"/other/a/b", b"/upload", b"/uploadx/a", b"upload/a", b"", b"/%zz/a", b"/UPLOAD/a"
        ):
            self.assert_rejected(raw, 404)

    def test_multi_segment_prefix(self) -> None:
        """A prefix of several segments is stripped whole."""
        self.assertEqual(parse_slot_path(b"/a/b/c/d", "a/b").segments, ("c", "d"))
        self.assert_rejected(b"/a/c/d", 404, prefix="a/b")
        self.assert_rejected(b"/a/b", 404, prefix="a/b")

    def test_root_prefix(self) -> None:
        """With an empty prefix the whole path is the slot path."""
        self.assertEqual(parse_slot_path(b"/x/y.txt", "").segments, ("x", "y.txt"))

    def test_encoded_prefix(self) -> None:
        """The prefix is compared after decoding, like any other part of the path."""
        self.assertEqual(parse_slot_path(b"/upl%6fad/x", "upload").segments, ("x",))
        self.assertEqual(parse_slot_path(b"/files/x%20y/z", "files/x y").segments, ("z",))

    def test_validate_segments(self) -> None:
        """validate_segments applies the same rules to decoded segments."""
        self.assertEqual(validate_segments([b"a", b"b c"]).signed, b"a/b c")
        self.assertEqual(self.assertRaises(PathError, validate_segments, []).status, 400)
        self.assertEqual(self.assertRaises(PathError, validate_segments, [b"a/b"]).status, 400)
        self.assertEqual(self.assertRaises(PathError, validate_segments, [b".hmacfs"]).status, 403)
        self.assertEqual(self.assertRaises(PathError, validate_segments, [b"s"] * 9).status, 400)

    def test_error_text(self) -> None:
        """PathError carries status and reason, and says both when printed."""
        error = PathError(414, "path too long")
        self.assertEqual(
            (error.status, error.reason, str(error)), (414, "path too long", "414 path too long")
        )


_PIECES = st.sampled_from(
    [b"/", b"//", b"%", b"%2e", b"%2E", b".", b"..", b"%2f", b"%2F", b"%00", b"a", b"\\", b"%ff",
     b"%c3%bc", b"upload", b"%zz", b".hmacfs", b"%5c", b"~", b"+", b"\x00", b"\xc3"]
)
hostile_paths = st.one_of(
    st.binary(max_size=200),
    st.lists(_PIECES, max_size=30).map(b"".join),
    st.lists(_PIECES, max_size=30).map(lambda pieces: b"/upload/" + b"".join(pieces)),
)


class ParseSlotPathPropertyTests(SynchronousTestCase):
    """Properties of parse_slot_path over generated input."""

    @PROFILE
    @given(segments=segment_lists, prefix=prefixes)
    def test_prosody_round_trip(self, segments: list[str], prefix: str) -> None:
        """A valid slot path encoded Prosody-style parses back to its segments and signed bytes."""
        raw = prefixed(prefix, b"/".join(prosody_encode(segment) for segment in segments))
        slot = parse_slot_path(raw, prefix)
        self.assertEqual(slot.segments, tuple(segments))
        self.assertEqual(slot.signed, "/".join(segments).encode("utf-8"))

    @PROFILE
    @given(segments=segment_lists, prefix=prefixes)
    def test_ejabberd_round_trip(self, segments: list[str], prefix: str) -> None:
        """A valid slot path encoded ejabberd-style parses back to its segments and signed bytes."""
        raw = prefixed(prefix, ejabberd_encode("/".join(segments)))
        slot = parse_slot_path(raw, prefix)
        self.assertEqual(slot.segments, tuple(segments))
        self.assertEqual(slot.signed, "/".join(segments).encode("utf-8"))

    @PROFILE
    @given(raw=hostile_paths, prefix=st.sampled_from(["upload", ""]))
    def test_never_escapes_store(self, raw: bytes, prefix: str) -> None:
        """Whatever the input, a parsed slot path stays inside the store directory."""
        try:
            slot = parse_slot_path(raw, prefix)
        except PathError as error:
            self.assertIn(error.status, (400, 403, 404, 414))
            return
        self.assertTrue(slot.segments)
        for segment in slot.segments:
            self.assertNotIn(segment, ("", ".", ".."))
            self.assertNotIn("/", segment)
            self.assertNotIn("\x00", segment)
        joined = os.path.normpath(os.path.join("/store", *slot.segments))
        self.assertTrue(joined.startswith("/store/"), joined)
        self.assertEqual(joined, "/store/" + slot.text)
        self.assertEqual(slot.signed, slot.text.encode("utf-8"))
