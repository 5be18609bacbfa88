"""Secret rotation with a grace period for slots signed just before it."""

from __future__ import annotations

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from hmacfs.signing.rotation import SecretRing, fingerprint


class SecretRingTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.ring = SecretRing(b"old-secret", self.clock, grace_period=600)

    def test_previous_valid_during_grace(self) -> None:
        """After a rotation both secrets are accepted until the grace period ends."""
        self.assertTrue(self.ring.rotate(b"new-secret"))
        self.assertEqual(self.ring.secrets(), (b"new-secret", b"old-secret"))
        self.clock.advance(599)
        self.assertEqual(self.ring.secrets(), (b"new-secret", b"old-secret"))
        self.clock.advance(2)
        self.assertEqual(self.ring.secrets(), (b"new-secret",))

    def test_same_secret_is_not_a_rotation(self) -> None:
        """Re-reading an unchanged secret keeps no stale previous secret alive."""
        self.assertFalse(self.ring.rotate(b"old-secret"))
        self.assertEqual(self.ring.secrets(), (b"old-secret",))

    def test_fingerprint_hides_secret(self) -> None:
        """The fingerprint that is logged is short and differs per secret."""
        self.assertEqual(len(fingerprint(b"a")), 8)
        self.assertNotEqual(fingerprint(b"a"), fingerprint(b"b"))
        self.assertNotIn("old-secret", fingerprint(b"old-secret"))
