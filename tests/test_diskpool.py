"""
Tests for hmacfs.service.diskpool: the disk threads.

They run real threads with the real reactor (the point of the pool is how
results cross from its threads to the reactor thread), each bounded by a
timeout.
"""

from __future__ import annotations

import threading
import time
from typing import Any

from twisted.internet import defer, reactor, task
from twisted.trial.unittest import TestCase

from hmacfs.service import diskpool
from hmacfs.service.diskpool import DiskThreadPoolService


class DiskPoolTests(TestCase):
    timeout = 30

    def pool(self, size: int = 4, start: bool = True) -> DiskThreadPoolService:
        pool = DiskThreadPoolService(reactor, size=size, name="test-disk")
        if start:
            pool.startService()

        def stop() -> None:
            if pool.running:
                pool.stopService()

        self.addCleanup(stop)
        return pool

    @defer.inlineCallbacks
    def test_result_on_reactor_thread(self) -> Any:
        """The call runs on a pool thread; its result arrives on the reactor thread."""
        pool = self.pool()
        ran_on = yield pool.run_blocking(lambda: threading.current_thread().name)
        self.assertTrue(ran_on.startswith("test-disk-"), ran_on)
        self.assertIs(threading.current_thread(), threading.main_thread())

    @defer.inlineCallbacks
    def test_exception_is_errback(self) -> Any:
        """An exception in the call fails the Deferred with that exception."""
        pool = self.pool()

        def broken() -> None:
            raise OSError(28, "No space left on device")

        error = yield self.assertFailure(pool.run_blocking(broken), OSError)
        self.assertEqual(error.errno, 28)

    @defer.inlineCallbacks
    def test_many_concurrent_jobs(self) -> Any:
        """A thousand jobs in flight: every result matches its call, and no more than size threads."""
        pool = self.pool(size=3)
        results = yield defer.gatherResults(
            [pool.run_blocking(pow, i, 2) for i in range(1000)]
        )
        self.assertEqual(results, [i * i for i in range(1000)])
        self.assertLessEqual(pool.threads, 3)

    @defer.inlineCallbacks
    def test_threads_start_as_needed(self) -> Any:
        """One job at a time needs one thread; a blocked thread makes the pool start another."""
        pool = self.pool(size=4)
        for _ in range(20):
            yield pool.run_blocking(int, "1")
        self.assertEqual(pool.threads, 1)
        release = threading.Event()
        blocked = pool.run_blocking(release.wait, 10)
        quick = yield pool.run_blocking(int, "7")
        self.assertEqual(quick, 7)
        self.assertFalse(blocked.called)
        self.assertEqual(pool.threads, 2)
        release.set()
        self.assertTrue((yield blocked))

    @defer.inlineCallbacks
    def test_work_before_start(self) -> Any:
        """Work offered before the service starts runs once it starts."""
        pool = self.pool(start=False)
        early = pool.run_blocking(int, "5")
        yield task.deferLater(reactor, 0.05, lambda: None)
        self.assertFalse(early.called)
        self.assertEqual(pool.threads, 0)
        pool.startService()
        self.assertEqual((yield early), 5)

    def test_stop_finishes_queued_work(self) -> None:
        """Stopping runs what was queued, delivers every result, then refuses new work."""
        pool = self.pool(size=2)
        gate = threading.Event()
        done: list[int] = []
        first = pool.run_blocking(gate.wait, 10)
        rest = [pool.run_blocking(done.append, i) for i in range(50)]
        gate.set()
        pool.stopService()
        self.assertEqual(sorted(done), list(range(50)))
        self.assertTrue(first.called)
        self.assertTrue(all(d.called for d in rest))
        self.assertEqual(pool.threads, 0)
        late = pool.run_blocking(int, "1")
        self.failureResultOf(late, RuntimeError)

    def test_bad_size(self) -> None:
        """A pool needs at least one thread."""
        self.assertRaises(ValueError, DiskThreadPoolService, reactor, size=0)


class RunShortTests(TestCase):
    """``run_short``: the reactor thread waits a moment for a job of a few system calls."""

    timeout = 30

    def pool(self) -> DiskThreadPoolService:
        pool = DiskThreadPoolService(reactor, size=2, name="test-short")
        pool.startService()
        self.addCleanup(lambda: pool.running and pool.stopService())
        return pool

    @defer.inlineCallbacks
    def test_quick_job_answered_at_once(self) -> Any:
        """Back within the wait: fired when run_short returns, its value or its error, and
        run on a pool thread (the reactor thread only waited)."""
        self.patch(diskpool, "SHORT_WAIT", 10.0)  # a loaded machine is slow to switch threads
        pool = self.pool()
        yield pool.run_blocking(int, "0")  # the first thread is running
        d = pool.run_short(lambda: threading.current_thread().name)
        self.assertTrue(d.called)
        self.assertTrue((yield d).startswith("test-short-"))
        failed = pool.run_short(int, "x")
        self.assertTrue(failed.called)
        yield self.assertFailure(failed, ValueError)
        self.assertEqual((pool.short_waited, pool.short_missed), (2, 0))

    @defer.inlineCallbacks
    def test_slow_job_delivered_later(self) -> Any:
        """Slower than SHORT_WAIT: not waited for any longer; delivered as any job."""
        pool = self.pool()
        yield pool.run_blocking(int, "0")
        gate = threading.Event()
        started = time.monotonic()
        d = pool.run_short(lambda: gate.wait(10) and 7)
        self.assertLess(time.monotonic() - started, diskpool.SHORT_WAIT + 0.5)
        self.assertFalse(d.called)
        gate.set()
        self.assertEqual((yield d), 7)
        self.assertEqual(pool.short_missed, 1)

    @defer.inlineCallbacks
    def test_waits_pause_after_repeated_timeouts(self) -> Any:
        """SHORT_TIMEOUTS waits that ran out (a slow disk): for SHORT_PAUSE none is waited
        for at all, so a slow disk costs the reactor at most that many short stalls."""
        pool = self.pool()
        yield pool.run_blocking(int, "0")
        gate = threading.Event()
        slow = [pool.run_short(gate.wait, 10) for _ in range(diskpool.SHORT_TIMEOUTS)]
        self.assertEqual(pool.short_missed, diskpool.SHORT_TIMEOUTS)
        started = time.monotonic()
        more = pool.run_short(gate.wait, 10)
        self.assertLess(time.monotonic() - started, diskpool.SHORT_WAIT)
        self.assertEqual(pool.short_missed, diskpool.SHORT_TIMEOUTS)  # not even tried
        gate.set()
        yield defer.gatherResults(slow + [more])
