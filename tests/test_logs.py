"""LogLevel and LogFile routing of hmacfs's own events."""

from __future__ import annotations

import errno
import os
import threading
from pathlib import Path
from typing import Any, cast

from twisted.logger import ILogObserver, Logger, formatEvent, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from hmacfs.logs import LogRouter
from hmacfs.testing import SiteHarness, make_config, put_head, status_of

UUID = "5e8f4c1a-0b7d-4c3e-9f2a-6d1b8e7c4a90"


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


class FailingFile:
    """A log file whose every write fails as a full disk does."""

    def __init__(self) -> None:
        self.writes = 0

    def write(self, data: bytes) -> int:
        self.writes += 1
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def close(self) -> None:
        pass


class ThreadHandOff:
    """Stands in for the reactor's callFromThread: keeps the calls for the test to run."""

    def __init__(self) -> None:
        self.calls: list[tuple[Any, tuple[Any, ...]]] = []

    def callFromThread(self, function: Any, *args: Any) -> None:
        self.calls.append((function, args))

    def run(self) -> None:
        calls, self.calls = self.calls, []
        for function, args in calls:
            function(*args)


class ContainmentTests(SynchronousTestCase):
    """A failing log file costs log lines, never the caller."""

    def setUp(self) -> None:
        self.router = LogRouter()
        self.addCleanup(self.router.close)
        self.path = Path(self.mktemp()).resolve()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.log = Logger(namespace="hmacfs.test", observer=self.router)
        self.reports: list[dict] = []
        observer = cast(ILogObserver, self.reports.append)
        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)

    def fallback_reports(self) -> list[str]:
        return [formatEvent(e) for e in self.reports if e.get("log_namespace") == "hmacfs.logs"]

    def test_enospc_loses_lines_and_recovers(self) -> None:
        """ENOSPC on write: the event is lost and counted, reported once; the file is
        kept, and lines are written again once the disk has room."""
        self.router.configure("info", self.path)
        assert self.router.file_observer is not None
        real, failing = self.router.file_observer._file, FailingFile()
        self.router.file_observer._file = failing  # type: ignore[assignment]
        self.log.info("lost one")
        self.log.info("lost two")
        self.assertEqual((failing.writes, self.router.lost), (2, 2))
        reports = self.fallback_reports()
        self.assertEqual(len(reports), 1, reports)
        self.assertIn("No space left on device", reports[0])
        self.router.file_observer._file = real
        self.log.info("back")
        self.assertIn("back", self.path.read_text())
        self.assertIn("2 lines lost", self.fallback_reports()[-1])

    def test_closed_file_loses_lines(self) -> None:
        """A write to a file that was closed under the router raises nothing to the caller."""
        self.router.configure("info", self.path)
        assert self.router.file_observer is not None
        self.router.file_observer._file.close()
        self.log.info("into a closed file")
        self.assertEqual(self.router.lost, 1)

    def test_events_after_close_go_to_twistd_log(self) -> None:
        """After close() (service stop), events reach twistd's log, not the closed file."""
        self.router.configure("info", self.path)
        self.router.close()
        self.log.info("after stop {n}", n=7)
        self.assertEqual(self.router.lost, 0)
        self.assertIn("after stop 7", [formatEvent(e) for e in self.reports])

    def test_reopen_failure_keeps_old_file(self) -> None:
        """A SIGHUP whose reopen fails (a directory where the file was) keeps
        writing the open file, and the reload goes on."""
        self.router.configure("info", self.path)
        rotated = self.path.with_suffix(".1")
        os.rename(self.path, rotated)
        self.path.mkdir()
        self.router.reopen()
        self.log.info("still logging")
        self.assertEqual(self.router.lost, 0)
        self.assertIn("still logging", rotated.read_text())
        self.assertIn("cannot reopen LogFile", self.fallback_reports()[-1])

    def test_other_threads_hand_events_to_the_reactor(self) -> None:
        """An event logged on a disk-pool thread is not written there: it is handed
        to the reactor thread with callFromThread, and written when that runs it."""
        handoff = ThreadHandOff()
        self.router.configure("info", self.path, reactor=handoff)
        thread = threading.Thread(target=self.log.info, args=("from a pool thread",))
        thread.start()
        thread.join()
        self.assertEqual(self.path.read_text(), "")
        self.assertEqual(len(handoff.calls), 1)
        handoff.run()
        self.assertIn("from a pool thread", self.path.read_text())

    def test_events_below_the_level_are_not_handed_over(self) -> None:
        """A debug event on a pool thread (the commit's line) with LogLevel = info is
        dropped where it is logged: no callFromThread, so no reactor wake-up for it."""
        handoff = ThreadHandOff()
        self.router.configure("info", self.path, reactor=handoff)
        thread = threading.Thread(target=self.log.debug, args=("committed",))
        thread.start()
        thread.join()
        self.assertEqual(handoff.calls, [])
        self.router.configure("debug", self.path, reactor=handoff)
        thread = threading.Thread(target=self.log.debug, args=("committed",))
        thread.start()
        thread.join()
        self.assertEqual(len(handoff.calls), 1)
        handoff.run()
        self.assertIn("committed", self.path.read_text())

    def test_reactor_thread_writes_at_once(self) -> None:
        """Events on the reactor thread (the access log) are written without a hand-off."""
        handoff = ThreadHandOff()
        self.router.configure("info", self.path, reactor=handoff)
        self.log.info("on the reactor")
        self.assertEqual(handoff.calls, [])
        self.assertIn("on the reactor", self.path.read_text())


class RequestsSurviveTests(SynchronousTestCase):
    """With the packaged LogFile failing, requests through the real site still finish."""

    def setUp(self) -> None:
        from hmacfs.logs import log_router

        self.store = Path(self.mktemp()).resolve()
        self.store.mkdir()
        self.router = log_router
        self.router.configure("info", self.store.parent / "hmacfs-test.log")
        self.addCleanup(self.router.configure, "info", None)
        self.harness = SiteHarness(make_config(self.store, enable_get_retries=False))

    def break_log(self, how: str) -> None:
        observer = self.router.file_observer
        assert observer is not None
        if how == "enospc":
            observer._file = FailingFile()  # type: ignore[assignment]
        else:
            observer._file.close()

    def roundtrip(self, how: str) -> None:
        self.break_log(how)
        lost = getattr(self.router, "lost", 0)
        body = b"x" * 1000
        protocol, transport = self.harness.connect()
        protocol.dataReceived(put_head(f"{UUID}/a.bin", len(body)) + body)
        self.assertEqual(status_of(transport.value()), 201)
        self.assertEqual((self.store / UUID / "a.bin").read_bytes(), body)
        # The request finished (the access line was lost): the connection is
        # ready for the next one, which is answered too.
        self.assertFalse(transport.disconnecting)
        transport.clear()
        protocol.dataReceived(f"GET /upload/{UUID}/a.bin HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        response = transport.value()
        self.assertTrue(response.startswith(b"HTTP/1.1 200 "), response[:200])
        self.assertTrue(response.endswith(body))
        self.assertEqual(protocol.requests, [])
        self.assertGreater(self.router.lost, lost)

    def test_enospc_log_file(self) -> None:
        """ENOSPC on every log write: the PUT gets its 201 and the GET its 200."""
        self.roundtrip("enospc")

    def test_closed_log_file(self) -> None:
        """A log file closed under the server: the PUT gets its 201 and the GET its 200."""
        self.roundtrip("closed")
