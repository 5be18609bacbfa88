"""LogLevel and LogFile routing of hmacfs's own events."""

from __future__ import annotations

import os
from pathlib import Path

from twisted.logger import Logger
from twisted.trial.unittest import SynchronousTestCase

from hmacfs.logs import LogRouter


class RouterTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.router = LogRouter()
        self.addCleanup(self.router.close)
        self.path = Path(self.mktemp()).resolve()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.log = Logger(namespace="hmacfs.test", observer=self.router)

    def test_level_filters(self) -> None:
        """With LogLevel = warn, info events are dropped and warnings written."""
        self.router.configure("warn", self.path)
        self.log.info("quiet {x}", x=1)
        self.log.warn("loud {x}", x=2)
        text = self.path.read_text()
        self.assertNotIn("quiet", text)
        self.assertIn("loud 2", text)

    def test_debug_level(self) -> None:
        """With LogLevel = debug, debug events are written."""
        self.router.configure("debug", self.path)
        self.log.debug("details {x}", x=3)
        self.assertIn("details 3", self.path.read_text())

    def test_reopen_after_rotation(self) -> None:
        """After logrotate moves the file, reopen() starts a new file at the same path."""
        self.router.configure("info", self.path)
        self.log.info("before")
        rotated = self.path.with_suffix(".1")
        os.rename(self.path, rotated)
        self.router.reopen()
        self.log.info("after")
        self.assertIn("before", rotated.read_text())
        self.assertNotIn("after", rotated.read_text())
        self.assertIn("after", self.path.read_text())
