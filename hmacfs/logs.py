# -*- test-case-name: tests.test_logs -*-
"""
Where hmacfs's log events go, filtered by LogLevel.

Every hmacfs module logs through ``log_router`` (``Logger(observer=log_router)``)
so that LogLevel applies to our events without touching the observers twistd
installs for its own messages; with LogFile set, our events go to that file
(reopened on SIGHUP for logrotate), otherwise to twistd's log (stdout with -n).
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

from twisted.logger import (
    FilteringLogObserver,
    ILogObserver,
    LogLevel,
    LogLevelFilterPredicate,
    formatEventAsClassicLogText,
    globalLogPublisher,
)
from zope.interface import implementer

LEVELS = {
    "debug": LogLevel.debug,
    "info": LogLevel.info,
    "warn": LogLevel.warn,
    "error": LogLevel.error,
}


@implementer(ILogObserver)
class ReopenableFileObserver:
    """Writes classic text lines to a file that can be reopened (logrotate)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._file: io.TextIOWrapper = open(path, "a", encoding="utf-8")

    def __call__(self, event: dict[str, Any]) -> None:
        text = formatEventAsClassicLogText(event)
        if text:
            self._file.write(text)
            self._file.flush()

    def reopen(self) -> None:
        old, self._file = self._file, open(self.path, "a", encoding="utf-8")
        old.close()

    def close(self) -> None:
        self._file.close()


@implementer(ILogObserver)
class LogRouter:
    """The observer every hmacfs Logger emits to."""

    def __init__(self) -> None:
        self.predicate = LogLevelFilterPredicate(defaultLogLevel=LogLevel.info)
        self.file_observer: ReopenableFileObserver | None = None
        self._target: ILogObserver = FilteringLogObserver(globalLogPublisher, [self.predicate])

    def __call__(self, event: dict[str, Any]) -> None:
        self._target(event)

    def configure(self, level: str, log_file: Path | None) -> None:
        """Apply LogLevel and LogFile (called at start and on SIGHUP)."""
        self.predicate.setLogLevelForNamespace("", LEVELS[level])
        if log_file is None:
            self.close()
            self._target = FilteringLogObserver(globalLogPublisher, [self.predicate])
        elif self.file_observer is None or self.file_observer.path != log_file:
            self.close()
            self.file_observer = ReopenableFileObserver(log_file)
            self._target = FilteringLogObserver(self.file_observer, [self.predicate])

    def reopen(self) -> None:
        if self.file_observer is not None:
            self.file_observer.reopen()

    def close(self) -> None:
        if self.file_observer is not None:
            self.file_observer.close()
            self.file_observer = None


log_router = LogRouter()
