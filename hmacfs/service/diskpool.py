# -*- test-case-name: tests.test_diskpool -*-
"""
The threads that do the blocking disk work: writes, fsync, link, rename.

Not ``twisted.python.threadpool.ThreadPool``: under load its per-job
bookkeeping (the team coordinator, context and log wrappers, one reactor
wake-up per result) costs about 35 µs of CPU per job, and an upload runs one
job per socket read, so a 1 GiB PUT pays it four thousand times.  Here a job
is one ``SimpleQueue.put``, and results come back in batches: a single
reactor wake-up delivers every result that finished in the meantime (about
4 µs per job with 64 uploads in flight; ``bench/bench.py`` measures the
effect).

A job of a few system calls that the caller expects back in microseconds (a
small upload's admit, write and commit; a GET's stat, open and read) may be run
with ``run_short``.  The short jobs asked for during one reactor iteration go to
a pool thread together, as one job, when the iteration ends, and the reactor
thread waits for them, the GIL released, as long as they keep up: it gives up
when the batch falls more than ``SHORT_SLACK`` jobs of ``SHORT_WAIT`` behind (the
k-th job not done after (k + ``SHORT_SLACK``) × ``SHORT_WAIT``), or after
``SHORT_WAIT_MAX``.  Two things are saved: while the reactor runs Python, every
system call of a pool thread hands the GIL over and waits to get it back (a
futex round trip each way), and with the reactor waiting the jobs run through;
and the hand-over to a thread and back (a wake-up each way) is paid once per
batch, not per job.  Under load a batch holds tens of jobs.  When the reactor
gives up (a job blocked in a slow fsync), the jobs of the batch not started yet
go to the other pool threads as ordinary jobs, so one slow disk call does not
hold up the rest, and every outcome is delivered as any other.  When waits keep
running out (a slow disk, a busy NFS server), none is waited for until
``SHORT_PAUSE`` has passed: the reactor never stalls for more than
``SHORT_WAIT_MAX`` a batch, and for ``SHORT_TIMEOUTS`` batches a pause.
"""

from __future__ import annotations

import collections
import queue
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

from twisted.application.service import Service
from twisted.internet.defer import Deferred, fail, succeed
from twisted.python.failure import Failure

__all__ = ["DiskThreadPoolService"]

T = TypeVar("T")

_Job = tuple["Deferred | None", Callable[..., Any], tuple[Any, ...], "_Waiter | None"]
_STOP = None

#: the time a ``run_short`` job may take while the reactor thread waits (seconds) ...
SHORT_WAIT = 0.001
#: ... and for a whole batch at most
SHORT_WAIT_MAX = 0.02
#: jobs' worth of SHORT_WAIT a batch may be behind (a thread's wake-up, a moment's preemption)
SHORT_SLACK = 3
#: waits that ran out within ``SHORT_PAUSE`` before ``run_short`` stops waiting ...
SHORT_TIMEOUTS = 3
#: ... for this long (seconds)
SHORT_PAUSE = 1.0


_Short = tuple[Deferred, Callable[..., Any], tuple[Any, ...]]


class _Batch:
    """The ``run_short`` jobs of one reactor iteration: taken one by one by the pool
    thread that runs them, or back by the reactor thread when it stops waiting."""

    __slots__ = ("jobs", "outcomes", "done")

    def __init__(self, jobs: list[_Short]) -> None:
        self.jobs = collections.deque(jobs)
        self.outcomes: list[tuple[Deferred, bool, Any]] = []
        #: jobs finished so far (read by the waiting reactor thread: is it progressing?)
        self.done = 0


def _run_batch(batch: _Batch) -> list[tuple[Deferred, bool, Any]]:
    """On a pool thread: the batch's jobs, in order, until none is left, and their outcomes."""
    jobs, outcomes = batch.jobs, batch.outcomes
    while True:
        try:
            deferred, function, args = jobs.popleft()  # atomic: the reactor may take the rest
        except IndexError:
            return outcomes
        try:
            outcomes.append((deferred, True, function(*args)))
        except BaseException:
            outcomes.append((deferred, False, Failure()))
        del deferred, function, args
        batch.done += 1


def _fire(deferred: Deferred, ok: bool, value: Any) -> None:
    """Deliver a job's outcome (reactor thread)."""
    if ok:
        deferred.callback(value)
    else:
        deferred.errback(value)


class _Waiter:
    """The hand-over of one ``run_short`` batch: its outcome, unless the caller gave up."""

    __slots__ = ("lock", "outcome", "abandoned")

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.lock.acquire()  # released by the thread that ran the job
        self.outcome: tuple[bool, Any] | None = None
        self.abandoned = False


class DiskThreadPoolService(Service):
    """
    Up to ``size`` threads, started as work arrives, that run blocking calls.

    ``run_blocking`` may be called before the service starts: the work waits
    for the start.  Stopping joins the threads after they finish the work
    already queued, then delivers the last results; work offered after that
    fails with ``RuntimeError``.
    """

    def __init__(self, reactor: Any, size: int = 8, name: str = "hmacfs-disk") -> None:
        if size < 1:
            raise ValueError(f"size must be at least 1, not {size!r}")
        self.reactor = reactor
        self.size = size
        self.setName(name)  # also the threads' name prefix
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._results: collections.deque[tuple[Deferred, bool, Any]] = collections.deque()
        self._lock = threading.Lock()
        self._idle = 0  # threads waiting for a job
        self._pending = 0  # jobs queued and not yet taken by a thread
        self._wake_pending = False
        self._threads: list[threading.Thread] = []
        self._stopped = False
        #: ``run_short``'s waits that ran out lately, and since when it counts them
        self._timeouts = 0
        self._timeouts_since = 0.0
        self._no_wait_until = 0.0
        #: ``run_short`` jobs answered while the reactor waited, the batches it waited
        #: for, and the batches it gave up on
        self.short_waited = 0
        self.short_batches = 0
        self.short_missed = 0
        #: ``run_short`` jobs asked for in this reactor iteration
        self._short: list[_Short] = []

    @property
    def threads(self) -> int:
        """Threads started so far (they are never more than ``size``)."""
        return len(self._threads)

    def run_blocking(self, function: Callable[..., T], *args: Any) -> Deferred[T]:
        """Run ``function(*args)`` on a pool thread; the Deferred fires on the reactor thread."""
        if self._stopped:
            return fail(RuntimeError("the disk thread pool is stopped"))
        deferred: Deferred[T] = Deferred()
        self._submit(deferred, function, args, None)
        return deferred

    def run_short(self, function: Callable[..., T], *args: Any) -> Deferred[T]:
        """
        ``run_blocking`` for a job expected back in microseconds: it goes to a pool
        thread with the other short jobs of this reactor iteration when the iteration
        ends, and the reactor thread waits for them a moment (see the module docstring
        for why, and for the limits).
        """
        if self._stopped or not self.running or time.monotonic() < self._no_wait_until:
            return self.run_blocking(function, *args)
        deferred: Deferred[T] = Deferred()
        self._short.append((deferred, function, args))
        if len(self._short) == 1:
            self.reactor.callLater(0, self._flush_short)
        return deferred

    def _flush_short(self) -> None:
        """The iteration's short jobs, as one pool job the reactor thread waits for."""
        jobs, self._short = self._short, []
        if not jobs:
            return  # handed to the pool as plain jobs by stopService
        batch = _Batch(jobs)
        waiter = _Waiter()
        self._submit(None, _run_batch, (batch,), waiter)
        started = time.monotonic()
        while not waiter.lock.acquire(timeout=SHORT_WAIT):
            # On time while the k-th job is done within (k + SHORT_SLACK) * SHORT_WAIT.
            budget = min((batch.done + SHORT_SLACK) * SHORT_WAIT, SHORT_WAIT_MAX)
            if time.monotonic() - started < budget:
                continue
            rest: list[_Short] = []
            with self._lock:
                if waiter.outcome is None:
                    # Too slow: its thread delivers what it ran as any other results,
                    # and the jobs not started yet go to the other threads.
                    waiter.abandoned = True
                    while batch.jobs:
                        try:
                            rest.append(batch.jobs.popleft())
                        except IndexError:  # the pool thread took the last one meanwhile
                            break
                    self._missed()
            if waiter.abandoned:
                for deferred, function, args in rest:
                    self._submit(deferred, function, args, None)
                return
            break  # it finished just now
        self.short_waited += len(jobs)
        self.short_batches += 1
        assert waiter.outcome is not None
        for outcome in waiter.outcome[1]:
            _fire(*outcome)

    def _missed(self) -> None:
        """A wait ran out (the pool lock held): after ``SHORT_TIMEOUTS``, pause waiting."""
        self.short_missed += 1
        now = time.monotonic()
        if now - self._timeouts_since > SHORT_PAUSE:
            self._timeouts_since, self._timeouts = now, 0
        self._timeouts += 1
        if self._timeouts >= SHORT_TIMEOUTS:
            self._no_wait_until = now + SHORT_PAUSE
            self._timeouts = 0

    def _submit(
        self, deferred: Deferred[Any] | None, function: Callable[..., Any], args: tuple[Any, ...],
        waiter: _Waiter | None,
    ) -> None:
        """Queue a job: one ``run_blocking`` call (``deferred``), or a ``run_short`` batch
        (no Deferred of its own: ``_run_batch`` returns each of its jobs' outcomes)."""
        with self._lock:
            self._pending += 1
            # More work waiting than threads ready to take it (one may be about
            # to take an earlier job, or be stuck in a slow fsync): add a thread.
            spawn = (
                self.running and self._pending > self._idle and len(self._threads) < self.size
            )
        self._jobs.put((deferred, function, args, waiter))
        if spawn:
            self._spawn()

    def startService(self) -> None:
        super().startService()
        with self._lock:
            waiting = self._pending
        for _ in range(max(1, min(self.size, waiting))):
            self._spawn()

    def stopService(self) -> Deferred[None]:
        super().stopService()
        self._stopped = True
        short, self._short = self._short, []
        for deferred, function, args in short:  # not flushed yet: finished as plain jobs
            self._submit(deferred, function, args, None)
        for _ in self._threads:
            self._jobs.put(_STOP)
        # Joins on the reactor thread, as ThreadPool.stop does: the threads only
        # finish short writes, fsyncs and renames.
        for thread in self._threads:
            thread.join()
        self._threads = []
        self._deliver()
        return succeed(None)

    # internals

    def _spawn(self) -> None:
        with self._lock:
            self._idle += 1  # ready from now on, though not yet running
        thread = threading.Thread(
            target=self._work, name=f"{self.name}-{len(self._threads)}", daemon=True
        )
        self._threads.append(thread)
        thread.start()

    def _work(self) -> None:
        jobs, results, lock = self._jobs, self._results, self._lock
        while True:
            job = jobs.get()
            with lock:
                self._idle -= 1
                if job is not _STOP:
                    self._pending -= 1
            if job is _STOP:
                return
            deferred, function, args, waiter = job
            try:
                outcome = (deferred, True, function(*args))
            except BaseException:
                outcome = (deferred, False, Failure())
            del job, function, args
            if waiter is not None:
                with lock:
                    handed = not waiter.abandoned
                    if handed:
                        waiter.outcome = (outcome[1], outcome[2])
                        self._idle += 1
                if handed:
                    waiter.lock.release()  # the reactor thread fires the Deferred
                    del outcome, waiter, deferred
                    continue
            del waiter
            if deferred is None:
                results.extend(outcome[2])  # a batch given up on: each job's outcome
            else:
                results.append((deferred, outcome[1], outcome[2]))
            del outcome
            with lock:
                self._idle += 1
                wake = not self._wake_pending
                self._wake_pending = True
            if wake:
                self.reactor.callFromThread(self._deliver)

    def _deliver(self) -> None:
        """Fire every finished job's Deferred (reactor thread)."""
        with self._lock:
            # Reset before draining: a result appended from now on schedules
            # another delivery, so none is left behind.
            self._wake_pending = False
        results = self._results
        while results:
            _fire(*results.popleft())
