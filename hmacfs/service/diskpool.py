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
"""

from __future__ import annotations

import collections
import queue
import threading
from collections.abc import Callable
from typing import Any, TypeVar

from twisted.application.service import Service
from twisted.internet.defer import Deferred, fail, succeed
from twisted.python.failure import Failure

__all__ = ["DiskThreadPoolService"]

T = TypeVar("T")

_Job = tuple[Deferred, Callable[..., Any], tuple[Any, ...]]
_STOP = None


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

    @property
    def threads(self) -> int:
        """Threads started so far (they are never more than ``size``)."""
        return len(self._threads)

    def run_blocking(self, function: Callable[..., T], *args: Any) -> Deferred[T]:
        """Run ``function(*args)`` on a pool thread; the Deferred fires on the reactor thread."""
        if self._stopped:
            return fail(RuntimeError("the disk thread pool is stopped"))
        deferred: Deferred[T] = Deferred()
        with self._lock:
            self._pending += 1
            # More work waiting than threads ready to take it (one may be about
            # to take an earlier job, or be stuck in a slow fsync): add a thread.
            spawn = (
                self.running and self._pending > self._idle and len(self._threads) < self.size
            )
        self._jobs.put((deferred, function, args))
        if spawn:
            self._spawn()
        return deferred

    def startService(self) -> None:
        super().startService()
        with self._lock:
            waiting = self._pending
        for _ in range(max(1, min(self.size, waiting))):
            self._spawn()

    def stopService(self) -> Deferred[None]:
        super().stopService()
        self._stopped = True
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
            deferred, function, args = job
            try:
                outcome = (deferred, True, function(*args))
            except BaseException:
                outcome = (deferred, False, Failure())
            del job, function, args
            results.append(outcome)
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
            deferred, ok, value = results.popleft()
            if ok:
                deferred.callback(value)
            else:
                deferred.errback(value)
