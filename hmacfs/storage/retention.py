# -*- test-case-name: tests.test_retention -*-
"""
Retention: deleting old files, keeping the store under its size cap.

A reactor timer starts a sweep at startup and every RetentionInterval; the
sweep works through the ``IStore`` alone (``list_files`` pages, ``delete``,
``add_tombstone``, ``purge_tombstones``), so it never touches the store from
the reactor thread, and the deletion report is appended on the disk pool.
Only one process or node sweeps at a time: the lock shared by the nodes
(Redis, when configured) and the store's own lock (``ExclusiveLock``: the
filesystem backend's flock'd file, for processes on one host and nodes on a
shared mount).

- DeleteFiles: files older than DeleteFilesAfterPeriod are deleted ("age").
- RetentionPolicyEnabled: files older than MaxRetentionTime are deleted
  ("max-time"), then the oldest go while the store exceeds MaxRetentionSize
  ("max-size").

Every deletion is a line in the deletion report (time, path, size, reason)
and leaves a tombstone until the retention horizon, so a leaked PUT URL that
never expires (v, v2, token) cannot bring the file back.  Partial uploads and
our own state under ``.hmacfs`` are never touched; the backend prunes the
directories a deletion empties.

``Tombstones`` and ``scan_store`` are the filesystem backend's pieces (blocking,
run on the pool by ``fs_backend``).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol

import attrs
from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.logger import Logger

from hmacfs.logs import log_router
from hmacfs.periodic import PeriodicService
from hmacfs.storage.fs_dirs import PrivateDir
from hmacfs.storage.fsio import write_file
from hmacfs.storage.interface import FileEntry, IStore
from hmacfs.storage.layout import PRIVATE_DIR, TMP_SUFFIX, TOMBSTONES_DIR, path_key

log = Logger(observer=log_router)

#: the shared lock held by the node that sweeps, for one RetentionInterval
#: (the Redis key ``hmacfs:retention-sweep``)
SWEEP_LOCK = "retention-sweep"


class SweepLock(Protocol):
    """
    What a sweep needs of a lock shared by the nodes: ``hmacfs.state.shared.NamedLocks``
    is one (declared here, since storage does not import the state layer).
    """

    def try_lock(self, name: str, owner: str, ttl: float) -> Deferred[bool]:
        """True if ``owner`` holds ``name`` for ``ttl`` s (or no one else can be asked)."""


class ExclusiveLock(Protocol):
    """
    A lock the store itself offers for the sweep (the filesystem backend: a flock'd
    file in ``.hmacfs``), held for the sweep's duration.
    """

    def acquire(self) -> Deferred[Callable[[], Deferred[None]] | None]:
        """The release if this process now holds it, None if another does."""


#: finished files asked of the store per ``list_files`` call
LIST_PAGE = 10_000


@attrs.define
class RetentionSettings:
    """The reloadable retention settings."""

    delete_files: bool = False
    delete_files_after: float = 365 * 86400.0
    policy_enabled: bool = False
    max_size: int = 10 * 1024**3
    max_time: float = 30 * 86400.0
    interval: float = 3600.0

    @classmethod
    def from_config(cls, config: Any) -> RetentionSettings:
        return cls(
            delete_files=config.delete_files,
            delete_files_after=config.delete_files_after_period,
            policy_enabled=config.retention_policy_enabled,
            max_size=config.max_retention_size,
            max_time=config.max_retention_time,
            interval=config.retention_interval,
        )

    @property
    def active(self) -> bool:
        return self.delete_files or self.policy_enabled

    @property
    def horizon(self) -> float:
        """How long a tombstone lives: the longest age limit in force."""
        ages = []
        if self.delete_files:
            ages.append(self.delete_files_after)
        if self.policy_enabled:
            ages.append(self.max_time)
        return max(ages) if ages else 0.0


@attrs.define
class SweepResult:
    deleted: dict[str, int] = attrs.Factory(dict)  # reason -> count
    freed: int = 0
    store_bytes: int = 0
    store_files: int = 0
    skipped: bool = False  # another process held the lock


def plan_deletions(
    files: Sequence[FileEntry], settings: RetentionSettings, now: float
) -> list[tuple[FileEntry, str]]:
    """Which files to delete and why; pure, so the policy is easy to test."""
    doomed: list[tuple[FileEntry, str]] = []
    keep: list[FileEntry] = []
    for entry in files:
        age = now - entry.mtime
        if settings.delete_files and age > settings.delete_files_after:
            doomed.append((entry, "age"))
        elif settings.policy_enabled and age > settings.max_time:
            doomed.append((entry, "max-time"))
        else:
            keep.append(entry)
    if settings.policy_enabled:
        total = sum(entry.size for entry in keep)
        for entry in sorted(keep, key=lambda e: (e.mtime, e.segments)):
            if total <= settings.max_size:
                break
            doomed.append((entry, "max-size"))
            total -= entry.size
    return doomed


def scan_store(root: Path) -> Iterator[FileEntry]:
    """Every finished file under ``root`` (our ``.hmacfs`` state excluded); no symlinks."""
    root_str = str(root)
    for dirpath, dirnames, filenames in os.walk(root_str):
        if dirpath == root_str and PRIVATE_DIR in dirnames:
            dirnames.remove(PRIVATE_DIR)
        for name in filenames:
            full = os.path.join(dirpath, name)
            try:
                st = os.lstat(full)
            except FileNotFoundError:
                continue
            if not (st.st_mode & 0o170000 == 0o100000):  # regular files only
                continue
            rel = os.path.relpath(full, root_str)
            yield FileEntry(tuple(rel.split(os.sep)), st.st_size, st.st_mtime)


class Tombstones:
    """
    Marks of deleted paths, so a never-expiring PUT URL cannot re-create them.

    Kept in ``.hmacfs/tombstones``, reached through a descriptor (never a link) and
    recreated if it is removed under a running server.
    """

    def __init__(self, root: Path, now: Callable[[], float] = time.time) -> None:
        self._dir = PrivateDir(root, TOMBSTONES_DIR)
        self.directory = self._dir.path
        self.now = now

    def add(self, segments: Sequence[str], until: float) -> None:
        key = path_key(segments)
        data = f"{until:.0f}\n".encode("ascii")
        handle = self._dir.handle
        try:
            write_file(key + TMP_SUFFIX, data, sync=False, dir_fd=handle.fd)
        except FileNotFoundError:
            handle = self._dir.reopen()
            write_file(key + TMP_SUFFIX, data, sync=False, dir_fd=handle.fd)
        os.replace(key + TMP_SUFFIX, key, src_dir_fd=handle.fd, dst_dir_fd=handle.fd)

    def blocks(self, segments: Sequence[str]) -> bool:
        # Asked on every PUT, and almost always for a path with no tombstone:
        # one failing openat(2), no pathlib or text layer.
        handle = self._dir.handle
        try:
            fd = os.open(
                path_key(segments), os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW, dir_fd=handle.fd
            )
        except OSError:  # missing (or a link someone planted: not a tombstone of ours)
            return False
        try:
            until = float(os.read(fd, 64))
        except ValueError:
            return False
        finally:
            os.close(fd)
        return until > self.now()

    def purge_expired(self) -> int:
        removed = 0
        now = self.now()
        handle = self._dir.handle
        for name in os.listdir(handle.fd):
            try:
                fd = os.open(name, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW, dir_fd=handle.fd)
                try:
                    until = float(os.read(fd, 64))
                finally:
                    os.close(fd)
                if until <= now:
                    os.unlink(name, dir_fd=handle.fd)
                    removed += 1
            except (OSError, ValueError):
                continue
        return removed


class Sweeper:
    """One sweep, through the ``IStore``: every store call a Deferred, none on the reactor thread."""

    def __init__(
        self,
        store: IStore,
        settings: RetentionSettings,
        report_file: Path,
        *,
        run_blocking: Callable[..., Deferred[Any]],
        exclusive: ExclusiveLock | None = None,
        now: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.settings = settings
        self.report_file = report_file
        self.run_blocking = run_blocking
        self.exclusive = exclusive
        self.now = now

    def sweep(self) -> Deferred[SweepResult]:
        return Deferred.fromCoroutine(self._held_sweep())

    async def _held_sweep(self) -> SweepResult:
        release = None
        if self.exclusive is not None:
            release = await self.exclusive.acquire()
            if release is None:
                return SweepResult(skipped=True)
        try:
            return await self._sweep()
        finally:
            if release is not None:
                await release()

    async def _sweep(self) -> SweepResult:
        now = self.now()
        files: list[FileEntry] = []
        cursor: str | None = None
        while True:
            page = await self.store.list_files(cursor, LIST_PAGE)
            files.extend(page.entries)
            cursor = page.cursor
            if cursor is None:
                break
        result = SweepResult()
        doomed = plan_deletions(files, self.settings, now) if self.settings.active else []
        gone: set[tuple[str, ...]] = set()
        lines = []
        for entry, reason in doomed:
            if await self.store.delete(entry.segments):
                await self.store.add_tombstone(entry.segments, now + self.settings.horizon)
                gone.add(entry.segments)
                result.deleted[reason] = result.deleted.get(reason, 0) + 1
                result.freed += entry.size
                stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now))
                lines.append(f"{stamp}\t{'/'.join(entry.segments)}\t{entry.size}\t{reason}\n")
        if lines:
            await self.run_blocking(append_report, self.report_file, lines)
        await self.store.purge_tombstones()
        kept = [entry for entry in files if entry.segments not in gone]
        result.store_files = len(kept)
        result.store_bytes = sum(entry.size for entry in kept)
        return result


def append_report(report_file: Path, lines: list[str]) -> None:
    """Append deletion lines to the report (blocking: on the disk pool)."""
    with open(report_file, "a", encoding="utf-8") as report:
        report.writelines(lines)


class RetentionService(Service):
    """Starts a sweep at startup and every RetentionInterval; counts what it did."""

    def __init__(
        self,
        *,
        clock: Any,
        sweeper: Sweeper,
        metrics: Any = None,
        lock: SweepLock | None = None,
    ) -> None:
        self.clock = clock
        self.sweeper = sweeper
        self.metrics = metrics
        #: the lock shared by the nodes (embedded: always granted): only the node
        #: holding SWEEP_LOCK sweeps in an interval (the sweeper's ExclusiveLock,
        #: a flock'd file on the filesystem, covers processes on one host and
        #: stores whose filesystem supports flock)
        self.lock = lock
        self._timer = PeriodicService(
            clock, sweeper.settings.interval, self.sweep, what="retention sweep", now=True
        )
        self._running: Any = None

    @property
    def settings(self) -> RetentionSettings:
        return self.sweeper.settings

    @property
    def wanted(self) -> bool:
        """Sweeps run when something may be deleted, or to keep the store gauges fresh."""
        return self.sweeper.settings.active or self.metrics is not None

    def apply(self, settings: RetentionSettings) -> None:
        """New settings (SIGHUP): retention turned on or off starts or stops the
        timer, a changed interval restarts it."""
        interval_changed = settings.interval != self.sweeper.settings.interval
        self.sweeper.settings = settings
        if not self.running:
            return
        if not self.wanted:
            self._timer.stopService()
        elif not self._timer.running or interval_changed:
            self._timer.interval = settings.interval
            self._timer.stopService()
            self._timer.startService()

    def startService(self) -> None:
        super().startService()
        if self.wanted:
            self._timer.interval = self.sweeper.settings.interval
            self._timer.startService()

    def stopService(self) -> Any:
        super().stopService()
        self._timer.stopService()
        return self._running

    def sweep(self) -> Any:
        """One sweep (its store calls on the disk pool); overlapping sweeps are skipped."""
        if self._running is not None:
            return None
        d = Deferred.fromCoroutine(self._locked_sweep())
        self._running = d
        d.addCallback(self._swept)
        d.addErrback(lambda f: log.failure("retention sweep failed", f))

        def done(result: Any) -> Any:
            self._running = None
            return result

        d.addBoth(done)
        return d

    async def _locked_sweep(self) -> SweepResult:
        if self.lock is not None:
            owner = f"{os.getpid()}-{id(self)}"
            ttl = max(1.0, self.sweeper.settings.interval)
            try:
                taken = await self.lock.try_lock(SWEEP_LOCK, owner, ttl)
            except Exception as error:  # noqa: BLE001 - Redis trouble: fall back to the lock file
                log.info("sweep lock in Redis unavailable ({error}); using the store's lock", error=error)
                taken = True
            if not taken:
                return SweepResult(skipped=True)
        return await self.sweeper.sweep()

    def _swept(self, result: SweepResult) -> SweepResult:
        if result.skipped:
            log.info("retention sweep skipped: another process is sweeping")
            return result
        if result.deleted:
            log.info(
                "retention deleted {count} files ({freed} bytes): {reasons}",
                count=sum(result.deleted.values()),
                freed=result.freed,
                reasons=result.deleted,
            )
        if self.metrics is not None:
            for reason, count in result.deleted.items():
                self.metrics.retention_deletions.labels(reason=reason).inc(count)
            self.metrics.retention_freed.inc(result.freed)
            self.metrics.store_bytes.set(result.store_bytes)
            self.metrics.store_files.set(result.store_files)
        return result
