# -*- test-case-name: tests.test_logs -*-
"""
Where hmacfs's log events go, filtered by LogLevel.

Every hmacfs module logs through ``log_router`` (``Logger(observer=log_router)``)
so that LogLevel applies to our events without touching the observers twistd
installs for its own messages; with LogFile set, our events go to that file
(reopened on SIGHUP for logrotate), otherwise to twistd's log (stdout with -n).

Two rules keep logging from ever breaking a request:

- A failing observer costs log lines, never the caller.  An event is logged
  from inside ``Request.finish()`` (the access line) and from error paths, so
  an exception out of a log write (ENOSPC, a closed file) would escape into
  Twisted's cleanup and leave the request unfinished.  Twisted's
  ``LogPublisher`` catches observer errors too, but reports each one (with a
  traceback) to the other observers, for every failing event: with a full
  disk that is a traceback per request in journald.  ``LogRouter`` catches
  instead, counts the lost events, reports the first of a run once to
  twistd's log and the recovery when a write works again, and keeps the file:
  one ENOSPC does not silence the log for good.
- The file is written from one thread, the reactor's.  Events from other
  threads (the disk pool) are handed over with ``callFromThread`` rather than
  written where they happen, so no write can meet the file that SIGHUP is
  closing.  The reactor thread, which logs every access line, pays nothing
  for this but one thread-id comparison; a writer thread with a queue would
  have cost every access line a queue put and a thread wake-up.  An event
  below LogLevel is dropped before that hand-over: the commit's debug line,
  logged on a disk thread, would otherwise cost every upload a reactor wake-up.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any, BinaryIO

from twisted.logger import (
    FilteringLogObserver,
    ILogObserver,
    Logger,
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

#: Reports about the log itself go to twistd's log (journald, stdout), which
#: is a LogPublisher: an observer of its own that fails is contained there.
_fallback = Logger(namespace="hmacfs.logs", observer=globalLogPublisher)


@implementer(ILogObserver)
class ReopenableFileObserver:
    """
    Writes classic text lines to a file that can be reopened (logrotate).

    Unbuffered: one ``write(2)`` per event, so a failed write leaves nothing
    behind in a buffer to be retried (or to grow) with the next event.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._file: BinaryIO = open(path, "ab", buffering=0)

    def __call__(self, event: dict[str, Any]) -> None:
        text = formatEventAsClassicLogText(event)
        if text:
            self._file.write(text.encode("utf-8", "backslashreplace"))

    def reopen(self) -> None:
        """Open the path again (after logrotate moved the file); raises OSError if it cannot."""
        old, self._file = self._file, open(self.path, "ab", buffering=0)
        old.close()

    def close(self) -> None:
        self._file.close()


@implementer(ILogObserver)
class LogRouter:
    """The observer every hmacfs Logger emits to."""

    def __init__(self) -> None:
        self.predicate = LogLevelFilterPredicate(defaultLogLevel=LogLevel.info)
        #: LogLevel (set by ``configure``, the only place levels are set): events
        #: below it are dropped at once, as the predicate would drop them later
        self._floor = LogLevel.info
        self.file_observer: ReopenableFileObserver | None = None
        self._target: ILogObserver = FilteringLogObserver(globalLogPublisher, [self.predicate])
        #: events that no observer could take (a failed write), since the start
        self.lost = 0
        self._failing = False
        #: set by ``configure(reactor=...)``: the thread that writes, and how
        #: other threads hand it their events
        self._writer_thread: int | None = None
        self._call_from_thread: Any = None

    def __call__(self, event: dict[str, Any]) -> None:
        level = event.get("log_level")
        if level is not None and level < self._floor:
            return
        if self._call_from_thread is not None and threading.get_ident() != self._writer_thread:
            try:
                self._call_from_thread(self._publish, event)
            except Exception:  # noqa: BLE001 - a reactor that is gone: the line is lost
                self.lost += 1
            return
        self._publish(event)

    def _publish(self, event: dict[str, Any]) -> None:
        try:
            self._target(event)
        except Exception as error:  # noqa: BLE001 - logging must never fail the caller
            self.lost += 1
            if not self._failing:
                self._failing = True
                self._report("hmacfs could not write its log ({error}); dropping log lines until it can",
                             error=_describe(error))
        else:
            if self._failing:
                self._failing = False
                self._report("hmacfs can write its log again; {lost} lines lost so far", lost=self.lost)

    @staticmethod
    def _report(text: str, **fields: Any) -> None:
        try:
            _fallback.error(text, **fields)
        except Exception:  # noqa: BLE001 - nowhere left to say it
            pass

    def configure(self, level: str, log_file: Path | None, reactor: Any = None) -> None:
        """
        Apply LogLevel and LogFile (called at start and on SIGHUP).

        ``reactor``: call this on its thread; from then on events logged on
        any other thread are handed to it instead of written where they happen.
        """
        call_from_thread = getattr(reactor, "callFromThread", None)
        if call_from_thread is not None:  # not a test clock
            self._writer_thread = threading.get_ident()
            self._call_from_thread = call_from_thread
        self.predicate.setLogLevelForNamespace("", LEVELS[level])
        self._floor = LEVELS[level]
        if log_file is None:
            self.close()
        elif self.file_observer is None or self.file_observer.path != log_file:
            try:
                observer = ReopenableFileObserver(log_file)
            except OSError as error:
                # Keep what we had: a SIGHUP with a LogFile that cannot be opened
                # must not stop the reload (at start the config check opened it).
                self._report("cannot open LogFile {path} ({error}); logging where it did",
                             path=str(log_file), error=_describe(error))
                return
            self.close()
            self.file_observer = observer
            self._target = FilteringLogObserver(observer, [self.predicate])

    def reopen(self) -> None:
        """Reopen LogFile (SIGHUP after logrotate); on failure keep writing the old file."""
        if self.file_observer is not None:
            try:
                self.file_observer.reopen()
            except OSError as error:
                self._report("cannot reopen LogFile {path} ({error}); still writing the old file",
                             path=str(self.file_observer.path), error=_describe(error))

    def close(self) -> None:
        """Close LogFile; later events go to twistd's log instead of a closed file."""
        self._target = FilteringLogObserver(globalLogPublisher, [self.predicate])
        if self.file_observer is not None:
            observer, self.file_observer = self.file_observer, None
            try:
                observer.close()
            except OSError:
                pass


def _describe(error: BaseException) -> str:
    return getattr(error, "strerror", None) or str(error) or type(error).__name__


log_router = LogRouter()
