# -*- test-case-name: tests.test_reload -*-
"""
SIGHUP and the periodic secret re-read.

SIGHUP (``systemctl reload``, logrotate's postrotate) reopens the log file and
re-reads the config file: LogLevel, LogFile and the secret take effect at once,
and the ban and retention settings are handed to the registered appliers
(``APPLIED_ON_RELOAD``).  Every other key of the config table needs a
restart, and a reload that finds one changed logs its name.
With ReaskSecretEnabled the secret is also re-read every ReaskSecretInterval.
A config that no longer loads is logged and the running settings stay.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.logger import Logger

from hmacfs.config import KEY_ATTRIBUTES, KNOWN_KEYS, Config, ConfigError, load_config
from hmacfs.logs import log_router
from hmacfs.periodic import PeriodicService
from hmacfs.signing.rotation import SecretRing

log = Logger(observer=log_router)

#: The keys a SIGHUP applies at once: here (LogLevel, LogFile, the secret) and
#: through the appliers ``hmacfs.service.tap`` registers (bans, retention).
APPLIED_ON_RELOAD: frozenset[str] = frozenset({
    "LogLevel", "LogFile", "Secret", "SecretFile",
    "BlockAfterFails", "BlockDuration", "AutoUnban", "AutoBanTime",
    "DeleteFiles", "DeleteFilesAfterPeriod", "RetentionPolicyEnabled",
    "MaxRetentionSize", "MaxRetentionTime", "RetentionInterval",
})
#: Every other key of the config table only takes effect on a restart; a
#: reload that sees one changed names it.
RESTART_ONLY: tuple[str, ...] = tuple(key for key in KNOWN_KEYS if key not in APPLIED_ON_RELOAD)


def restart_needed(running: Config, loaded: Config) -> list[str]:
    """The keys, in table order, whose new value only a restart would apply."""
    return [
        key for key in RESTART_ONLY
        if getattr(loaded, KEY_ATTRIBUTES[key]) != getattr(running, KEY_ATTRIBUTES[key])
    ]


class ReloadService(Service):
    """Re-reads configuration on SIGHUP and the secret on a timer."""

    def __init__(
        self,
        *,
        reactor: Any,
        config: Config,
        config_path: str | None,
        ring: SecretRing,
        appliers: list[Callable[[Config], None]] | None = None,
        manage_secret: bool = True,
    ) -> None:
        """``manage_secret=False``: a worker process, whose secrets come from the
        supervisor (so that a worker started after a rotation still knows the
        previous secret)."""
        self.manage_secret = manage_secret
        self.reactor = reactor
        self.config = config
        self.config_path = config_path
        self.ring = ring
        self.appliers = list(appliers or [])
        self._timer: PeriodicService | None = None
        #: called after the secret changed (the supervisor tells its workers)
        self.rotation_listeners: list[Callable[[], None]] = []
        self._previous_handler: Any = None

    def startService(self) -> None:
        super().startService()
        if threading.current_thread() is threading.main_thread():
            self._previous_handler = signal.signal(signal.SIGHUP, self._on_sighup)
        if self.config.reask_secret_enabled and self.manage_secret:
            self._timer = PeriodicService(
                self.reactor,
                self.config.reask_secret_interval,
                self.reask_secret,
                what="re-reading the secret (ReaskSecretInterval)",
            )
            self._timer.startService()

    def stopService(self) -> Deferred[None] | None:
        super().stopService()
        stopped = None
        if self._timer is not None:
            stopped, self._timer = self._timer.stopService(), None
        if self._previous_handler is not None:
            signal.signal(signal.SIGHUP, self._previous_handler)
            self._previous_handler = None
        return stopped

    def _on_sighup(self, signum: int, frame: Any) -> None:
        self.reactor.callFromThread(self.reload)

    def _load(self) -> Config | None:
        if self.config_path is None:
            return self.config
        try:
            config, warnings = load_config(self.config_path)
        except ConfigError as error:
            log.error("reload of {path} failed, keeping the running settings: {error}",
                      path=self.config_path, error=str(error))
            return None
        for warning in warnings:
            log.warn("config {path}: {problem}", path=self.config_path, problem=warning)
        return config

    def reload(self) -> Config | None:
        """What SIGHUP does; returns the new config, or None if it did not load."""
        log_router.reopen()
        config = self._load()
        if config is None:
            return None
        changed = restart_needed(self.config, config)
        if changed:
            log.warn("changed settings need a restart to take effect: {names}", names=", ".join(changed))
        log_router.configure(config.log_level, config.log_file)
        if self.manage_secret:
            self._rotate(config)
        for apply in self.appliers:
            apply(config)
        self.config = config
        log.info("configuration reloaded")
        return config

    def reask_secret(self) -> None:
        """Re-read just the secret (ReaskSecretInterval)."""
        config = self._load()
        if config is not None:
            self._rotate(config)

    def _rotate(self, config: Config) -> None:
        try:
            secret = config.read_secret()
        except ConfigError as error:
            log.error("could not re-read the secret, keeping the current one: {error}", error=str(error))
            return
        if self.ring.rotate(secret):
            for listener in self.rotation_listeners:
                listener()
