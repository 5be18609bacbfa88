"""SIGHUP reloads and the periodic secret re-read."""

from __future__ import annotations

from pathlib import Path

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from hmacfs.config import load_config
from hmacfs.reload import ReloadService
from hmacfs.rotation import SecretRing


class ReloadTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.dir = Path(self.mktemp()).resolve()
        self.dir.mkdir()
        self.secret_file = self.dir / "secret"
        self.secret_file.write_text("first-secret-0123456789\n")
        self.path = self.dir / "c.toml"
        self.write()
        self.clock = Clock()
        config, _ = load_config(self.path)
        self.ring = SecretRing(config.secret, self.clock, config.secret_grace_period)
        self.applied: list = []
        self.service = ReloadService(
            reactor=self.clock, config=config, config_path=str(self.path), ring=self.ring,
            appliers=[self.applied.append],
        )

    def write(self, extra: str = "") -> None:
        self.path.write_text(
            f'SecretFile = "{self.secret_file}"\nStoreDir = "{self.dir}"\n'
            'ReaskSecretEnabled = true\nReaskSecretInterval = "10m"\nSecretGracePeriod = "5m"\n' + extra
        )

    def test_reload_rotates_secret_with_grace(self) -> None:
        """A reload picks up a changed secret; the old one stays valid for the grace period."""
        self.secret_file.write_text("second-secret-0123456789\n")
        self.assertIsNotNone(self.service.reload())
        self.assertEqual(self.ring.secrets(), (b"second-secret-0123456789", b"first-secret-0123456789"))
        self.clock.advance(301)
        self.assertEqual(self.ring.secrets(), (b"second-secret-0123456789",))

    def test_reload_applies_new_settings(self) -> None:
        """Reloadable settings reach the appliers."""
        self.write('BlockAfterFails = 9\n')
        self.service.reload()
        self.assertEqual(self.applied[-1].block_after_fails, 9)

    def test_broken_config_keeps_running_settings(self) -> None:
        """A config that no longer loads is refused; the secret stays."""
        self.path.write_text('BufferSize = "lots"\n')
        self.assertIsNone(self.service.reload())
        self.assertEqual(self.ring.secrets(), (b"first-secret-0123456789",))
        self.assertEqual(self.applied, [])

    def test_periodic_reask(self) -> None:
        """With ReaskSecretEnabled the secret is re-read every ReaskSecretInterval."""
        self.service.startService()
        self.addCleanup(self.service.stopService)
        self.secret_file.write_text("rotated-secret-0123456789\n")
        self.clock.advance(599)
        self.assertEqual(self.ring.current, b"first-secret-0123456789")
        self.clock.advance(2)
        self.assertEqual(self.ring.current, b"rotated-secret-0123456789")
