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
from twisted.internet.defer import Deferred
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
    """``run_short``: the jobs of a reactor iteration, one pool job the reactor waits for."""

    timeout = 30

    def pool(self) -> DiskThreadPoolService:
        pool = DiskThreadPoolService(reactor, size=2, name="test-short")
        pool.startService()
        self.addCleanup(lambda: pool.running and pool.stopService())
        return pool

    def turn(self) -> Deferred[None]:
        """The end of this reactor iteration (where a batch is handed over) and a bit."""
        return task.deferLater(reactor, 0.001, lambda: None)

    @defer.inlineCallbacks
    def test_jobs_of_an_iteration_are_one_job(self) -> Any:
        """Asked for in one iteration: not run at once, but together at its end, on one pool
        thread, in order, each with its own value or error, while the reactor waited."""
        self.patch(diskpool, "SHORT_WAIT", 10.0)  # a loaded machine is slow to switch threads
        self.patch(diskpool, "SHORT_WAIT_MAX", 10.0)
        pool = self.pool()
        yield pool.run_blocking(int, "0")  # the first thread is running
        order: list[int] = []

        def job(n: int) -> str:
            order.append(n)
            return threading.current_thread().name

        submitted: list[Any] = []
        real_submit = pool._submit

        def submit(*args: Any) -> None:
            submitted.append(args[1])
            real_submit(*args)

        self.patch(pool, "_submit", submit)
        first, second = pool.run_short(job, 1), pool.run_short(job, 2)
        failed = pool.run_short(int, "x")
        self.assertEqual((first.called, second.called, failed.called), (False, False, False))
        yield self.turn()
        self.assertEqual(submitted, [diskpool._run_batch])
        self.assertEqual(order, [1, 2])
        names = [(yield first), (yield second)]
        self.assertEqual(names[0], names[1])
        self.assertTrue(names[0].startswith("test-short-"))
        yield self.assertFailure(failed, ValueError)
        self.assertEqual((pool.short_waited, pool.short_batches, pool.short_missed), (3, 1, 0))

    @defer.inlineCallbacks
    def test_fired_before_the_reactor_goes_on(self) -> Any:
        """Back within the wait: fired by the hand-over itself, before any other event of the
        next iteration (a timer due at once runs after it)."""
        self.patch(diskpool, "SHORT_WAIT", 10.0)
        self.patch(diskpool, "SHORT_WAIT_MAX", 10.0)
        pool = self.pool()
        yield pool.run_blocking(int, "0")
        seen: list[str] = []
        d = pool.run_short(lambda: 7)
        d.addCallback(lambda value: seen.append(f"job {value}"))
        reactor.callLater(0, lambda: seen.append("timer"))
        yield self.turn()
        self.assertEqual(seen, ["job 7", "timer"])

    @defer.inlineCallbacks
    def test_slow_job_does_not_hold_up_the_batch(self) -> Any:
        """A job slower than SHORT_WAIT: the reactor stops waiting at once, the jobs behind
        it run on another thread meanwhile, and the slow one is delivered as any job."""
        pool = self.pool()
        yield pool.run_blocking(int, "0")
        gate = threading.Event()
        started = time.monotonic()
        slow = pool.run_short(lambda: gate.wait(10) and 7)
        quick = [pool.run_short(lambda n=n: n) for n in range(3)]
        yield self.turn()
        self.assertLess(time.monotonic() - started, 2 * diskpool.SHORT_WAIT + 0.5)
        self.assertEqual((yield defer.gatherResults(quick)), [0, 1, 2])  # the gate still shut
        self.assertFalse(slow.called)
        gate.set()
        self.assertEqual((yield slow), 7)
        self.assertEqual((pool.short_missed, pool.short_batches), (1, 0))

    @defer.inlineCallbacks
    def test_wait_bounded_for_a_big_batch(self) -> Any:
        """Jobs that keep finishing are waited for, but a batch for SHORT_WAIT_MAX at most;
        the rest then go to the pool as ordinary jobs."""
        self.patch(diskpool, "SHORT_WAIT", 0.05)
        self.patch(diskpool, "SHORT_WAIT_MAX", 0.2)
        pool = self.pool()
        yield pool.run_blocking(int, "0")

        def job(n: int) -> int:
            time.sleep(0.01)
            return n

        jobs = [pool.run_short(job, n) for n in range(100)]
        started = time.monotonic()
        yield self.turn()
        waited = time.monotonic() - started
        self.assertGreaterEqual(waited, 0.2)
        self.assertLess(waited, 0.2 + 0.5)
        self.assertFalse(all(d.called for d in jobs))
        self.assertEqual((yield defer.gatherResults(jobs)), list(range(100)))
        self.assertEqual((pool.short_missed, pool.short_batches), (1, 0))

    @defer.inlineCallbacks
    def test_waits_pause_after_repeated_timeouts(self) -> Any:
        """SHORT_TIMEOUTS batches whose wait ran out (a slow disk): for SHORT_PAUSE none is
        waited for at all, so a slow disk costs the reactor at most that many short stalls."""
        pool = self.pool()
        yield pool.run_blocking(int, "0")
        gate = threading.Event()
        slow = []
        for _ in range(diskpool.SHORT_TIMEOUTS):
            slow.append(pool.run_short(gate.wait, 10))
            yield self.turn()
        self.assertEqual(pool.short_missed, diskpool.SHORT_TIMEOUTS)
        started = time.monotonic()
        more = pool.run_short(gate.wait, 10)
        yield self.turn()
        self.assertLess(time.monotonic() - started, diskpool.SHORT_WAIT + 0.5)
        self.assertEqual(pool.short_missed, diskpool.SHORT_TIMEOUTS)  # not even tried
        gate.set()
        yield defer.gatherResults(slow + [more])

    @defer.inlineCallbacks
    def test_stop_runs_the_jobs_not_handed_over(self) -> Any:
        """Stopped before the iteration ended: the batch's jobs run as plain jobs, not lost."""
        pool = self.pool()
        yield pool.run_blocking(int, "0")
        d = pool.run_short(lambda: 9)
        pool.stopService()
        self.assertEqual((yield d), 9)
        yield self.turn()  # the hand-over finds nothing left
        self.assertEqual(pool.short_batches, 0)
