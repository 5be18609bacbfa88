"""
Tests for bench/plain_twisted.py, the plain twisted.web peer of the benchmark.

Unit level, no sockets: the bench only trusts its figures if the peer stores
what it was sent, durably and without replacing a file.
"""

from __future__ import annotations

import importlib.util
import io
import os
import shutil
import tempfile
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase
from twisted.web import static
from twisted.web.test.requesthelper import DummyRequest

_PATH = Path(__file__).resolve().parent.parent / "bench" / "plain_twisted.py"
_spec = importlib.util.spec_from_file_location("bench_plain_twisted", _PATH)
assert _spec is not None and _spec.loader is not None
plain = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(plain)


class StoreTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.root = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, self.root, ignore_errors=True)

    def test_stores_body_and_creates_parents(self) -> None:
        body = io.BytesIO(b"x" * (3 << 20) + b"tail")
        self.assertEqual(plain.store(self.root, [b"a", b"b", b"c.bin"], body), 201)
        target = Path(self.root, "a", "b", "c.bin")
        self.assertEqual(target.read_bytes(), b"x" * (3 << 20) + b"tail")
        self.assertEqual(os.listdir(target.parent), ["c.bin"])  # no temp file left

    def test_existing_target_is_409_and_kept(self) -> None:
        self.assertEqual(plain.store(self.root, [b"a", b"f"], io.BytesIO(b"first")), 201)
        self.assertEqual(plain.store(self.root, [b"a", b"f"], io.BytesIO(b"second")), 409)
        self.assertEqual(Path(self.root, "a", "f").read_bytes(), b"first")
        self.assertEqual(os.listdir(Path(self.root, "a")), ["f"])

    def test_dot_segments_are_refused(self) -> None:
        for parts in ([b"..", b"x"], [b"a", b"."], [b"a", b""], []):
            self.assertEqual(plain.store(self.root, parts, io.BytesIO(b"x")), 403, parts)
        self.assertEqual(os.listdir(self.root), [])

    def test_routing(self) -> None:
        root = plain.Root(self.root)
        put, get = DummyRequest([b"upload", b"a"]), DummyRequest([b"upload", b"a"])
        put.method = b"PUT"
        self.assertIs(root.getChild(b"upload", put), root.put)
        self.assertIsInstance(root.getChild(b"upload", get), static.File)
        self.assertNotIsInstance(root.getChild(b"other", get), static.File)
