"""SIGHUP reloads and the periodic secret re-read."""

from __future__ import annotations

from pathlib import Path
from typing import Any, cast

import attrs
from twisted.internet.task import Clock
from twisted.logger import ILogObserver, formatEvent, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from hmacfs.config import KEY_ATTRIBUTES, KNOWN_KEYS, load_config
from hmacfs.logs import log_router
from hmacfs.service.reload import APPLIED_ON_RELOAD, RESTART_ONLY, ReloadService
from hmacfs.signing.rotation import SecretRing


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


class RestartNeededTests(SynchronousTestCase):
    """The restart warning covers every key SIGHUP does not apply, from the key table."""

    def setUp(self) -> None:
        self.dir = Path(self.mktemp()).resolve()
        self.dir.mkdir()
        self.path = self.dir / "c.toml"
        self.path.write_text(f'Secret = "0123456789abcdef0123"\nStoreDir = "{self.dir}"\n')
        self.config, _ = load_config(self.path)
        self.clock = Clock()
        self.ring = SecretRing(self.config.secret, self.clock, 0)
        self.events: list[dict] = []
        self.addCleanup(log_router.configure, "info", None)

    def reload_with(self, **changes: Any) -> list[str]:
        """Reload a config that differs from the running one in ``changes``; the warnings."""
        loaded = attrs.evolve(self.config, **changes)
        service = ReloadService(reactor=self.clock, config=self.config, config_path=None, ring=self.ring)
        service._load = lambda: loaded  # type: ignore[method-assign]
        observer = cast(ILogObserver, self.events.append)
        globalLogPublisher.addObserver(observer)
        try:
            service.reload()
        finally:
            globalLogPublisher.removeObserver(observer)
        return [formatEvent(e) for e in self.events if "need a restart" in e.get("log_format", "")]

    def test_every_key_is_applied_or_reported(self) -> None:
        """Each key of the config table is either applied by SIGHUP or, when changed,
        named in the restart warning (BufferSize, MaxUploadSize, ... too, not six)."""
        self.assertEqual(set(RESTART_ONLY) | APPLIED_ON_RELOAD, set(KNOWN_KEYS))
        self.assertEqual(set(RESTART_ONLY) & APPLIED_ON_RELOAD, set())
        for key in RESTART_ONLY:
            self.events.clear()
            warnings = self.reload_with(**{KEY_ATTRIBUTES[key]: object()})
            self.assertEqual(len(warnings), 1, key)
            self.assertTrue(warnings[0].endswith(f": {key}"), (key, warnings))

    def test_buffer_size_needs_restart(self) -> None:
        """A changed BufferSize (one of the keys the old list of six missed) is named."""
        warnings = self.reload_with(buffer_size=4 * self.config.buffer_size, read_timeout=5.0)
        self.assertEqual(len(warnings), 1)
        self.assertIn("ReadTimeout", warnings[0])
        self.assertIn("BufferSize", warnings[0])

    def test_applied_keys_are_not_reported(self) -> None:
        """Changing only keys SIGHUP applies logs no restart warning."""
        self.assertEqual(self.reload_with(block_after_fails=9, log_level="debug", delete_files=True), [])
