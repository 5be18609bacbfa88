"""hmacfs.periodic.PeriodicService on a Clock: schedule, failures, start/stop, shutdown."""

from __future__ import annotations

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.logger import LogLevel, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from hmacfs.periodic import PeriodicService


class PeriodicServiceTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.calls = 0
        self.events: list[dict[str, object]] = []
        globalLogPublisher.addObserver(self.events.append)  # type: ignore[arg-type]
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)  # type: ignore[arg-type]

    def count(self) -> None:
        self.calls += 1

    def service(self, function: object = None, *, now: bool = False) -> PeriodicService:
        return PeriodicService(
            self.clock, 10.0, function or self.count, what="the job", now=now  # type: ignore[arg-type]
        )

    def failures(self) -> list[dict[str, object]]:
        return [e for e in self.events if e.get("log_level") == LogLevel.critical and e.get("what") == "the job"]

    def test_every_interval_after_start(self) -> None:
        """Not at start by default; then once per interval of the given clock."""
        service = self.service()
        service.startService()
        self.assertEqual(self.calls, 0)
        self.clock.advance(9.9)
        self.assertEqual(self.calls, 0)
        self.clock.advance(0.1)
        self.assertEqual(self.calls, 1)
        self.clock.advance(10)
        self.clock.advance(10)
        self.assertEqual(self.calls, 3)
        service.stopService()

    def test_now_runs_at_start(self) -> None:
        service = self.service(now=True)
        service.startService()
        self.assertEqual(self.calls, 1)
        self.clock.advance(10)
        self.assertEqual(self.calls, 2)
        service.stopService()

    def test_stop_stops_calling(self) -> None:
        service = self.service()
        service.startService()
        self.clock.advance(10)
        self.successResultOf(service.stopService())
        self.clock.advance(100)
        self.assertEqual(self.calls, 1)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_start_and_stop_are_idempotent(self) -> None:
        """A second start schedules nothing more; a second stop (or one before any start) is a no-op."""
        service = self.service()
        self.successResultOf(service.stopService())
        service.startService()
        service.startService()
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)
        self.clock.advance(10)
        self.assertEqual(self.calls, 1)
        self.successResultOf(service.stopService())
        self.successResultOf(service.stopService())
        self.assertFalse(service.running)

    def test_restart_after_stop(self) -> None:
        service = self.service()
        service.startService()
        service.stopService()
        service.startService()
        self.clock.advance(10)
        self.assertEqual(self.calls, 1)
        service.stopService()

    def test_changed_interval_applies_on_restart(self) -> None:
        service = self.service()
        service.startService()
        service.interval = 2.0
        service.restart()
        self.clock.advance(2)
        self.assertEqual(self.calls, 1)
        service.stopService()
        service.restart()  # stopped: stays stopped
        self.assertFalse(service.running)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_failure_does_not_stop_and_is_logged_once_per_streak(self) -> None:
        """A raising call is logged once, the timer goes on; after a success, a new streak logs again."""
        outcomes = [ValueError("one"), ValueError("two"), None, ValueError("three")]

        def job() -> None:
            self.calls += 1
            outcome = outcomes.pop(0)
            if outcome is not None:
                raise outcome

        service = self.service(job)
        service.startService()
        self.clock.advance(10)
        self.clock.advance(10)
        self.assertEqual(self.calls, 2)
        self.assertTrue(service.failing)
        self.assertEqual(len(self.failures()), 1)
        self.assertEqual(len(self.flushLoggedErrors(ValueError)), 1)
        self.clock.advance(10)
        self.assertFalse(service.failing)
        self.assertIn("works again", [e.get("log_format", "") for e in self.events][-1])
        self.clock.advance(10)
        self.assertEqual(self.calls, 4)
        self.assertEqual(len(self.failures()), 2)
        self.assertEqual(len(self.flushLoggedErrors(ValueError)), 1)
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)
        service.stopService()

    def test_failed_deferred_counts_as_failure(self) -> None:
        running: list[Deferred[None]] = []

        def job() -> Deferred[None]:
            running.append(Deferred())
            return running[-1]

        service = self.service(job)
        service.startService()
        self.clock.advance(10)
        running[-1].errback(RuntimeError("disk"))
        self.assertTrue(service.failing)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.clock.advance(10)
        self.assertEqual(len(running), 2)
        running[-1].callback(None)
        self.assertFalse(service.failing)
        service.stopService()

    def test_calls_do_not_overlap(self) -> None:
        """While a call's Deferred is pending, no next call starts."""
        running: list[Deferred[None]] = []

        def job() -> Deferred[None]:
            running.append(Deferred())
            return running[-1]

        service = self.service(job)
        service.startService()
        self.clock.advance(10)
        self.clock.advance(30)
        self.assertEqual(len(running), 1)
        running[0].callback(None)
        self.clock.advance(10)
        self.assertEqual(len(running), 2)
        running[1].callback(None)
        service.stopService()

    def test_stop_waits_for_a_running_call(self) -> None:
        """stopService's Deferred fires once the call in flight has finished, and nothing follows it."""
        running: list[Deferred[None]] = []

        def job() -> Deferred[None]:
            running.append(Deferred())
            return running[-1]

        service = self.service(job)
        service.startService()
        self.clock.advance(10)
        stopped = service.stopService()
        self.assertNoResult(stopped)
        running[0].callback(None)
        self.assertIsNone(self.successResultOf(stopped))
        self.clock.advance(100)
        self.assertEqual(len(running), 1)

    def test_stop_waits_for_a_failing_call_without_failing(self) -> None:
        running: list[Deferred[None]] = []

        def job() -> Deferred[None]:
            running.append(Deferred())
            return running[-1]

        service = self.service(job)
        service.startService()
        self.clock.advance(10)
        stopped = service.stopService()
        running[0].errback(RuntimeError("late"))
        self.assertIsNone(self.successResultOf(stopped))
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
