"""Retention sweeps, the deletion report, tombstones and empty-directory pruning."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from hmacfs.service.metrics import Metrics
from hmacfs.state.shared import EmbeddedLocks, RedisLocks
from hmacfs.storage.filesystem import StorageError, Store, path_key
from hmacfs.storage.fs_backend import FilesystemBackend
from hmacfs.storage.retention import (
    SWEEP_LOCK,
    FileEntry,
    RetentionService,
    RetentionSettings,
    Sweeper,
    SweepLock,
    Tombstones,
    plan_deletions,
)
from hmacfs.testing import ManualRunner, SiteHarness, make_config, put_head

DAY = 86400.0
NOW = 2_000_000_000.0


def make_sweeper(
    store: Store,
    tombstones: Tombstones,
    settings: RetentionSettings,
    report: Path,
    runner: Any = None,
    now: Any = None,
) -> Sweeper:
    """A Sweeper over the filesystem backend of ``store``, its calls run by ``runner``."""
    runner = runner if runner is not None else ManualRunner(auto=True)
    backend = FilesystemBackend(store, runner, tombstones)
    extra = {} if now is None else {"now": now}
    return Sweeper(
        backend, settings, report, run_blocking=runner, exclusive=backend.sweep_lock, **extra
    )


#: pool jobs of a sweep that deletes nothing: the lock file, the listing, the
#: tombstone purge, the lock's release
SWEEP_JOBS = 4
#: and for each file deleted: the deletion (with pruning) and its tombstone; once: the report
JOBS_PER_DELETION = 2


class PlanTests(SynchronousTestCase):
    def entry(self, name: str, size: int, age_days: float) -> FileEntry:
        return FileEntry(("u", name), size, NOW - age_days * DAY)

    def test_age_limit(self) -> None:
        """DeleteFiles removes files older than DeleteFilesAfterPeriod, and only those."""
        files = [self.entry("old", 1, 400), self.entry("new", 1, 10)]
        plan = plan_deletions(files, RetentionSettings(delete_files=True, delete_files_after=365 * DAY), NOW)
        self.assertEqual([(e.segments[-1], r) for e, r in plan], [("old", "age")])

    def test_size_cap_oldest_first(self) -> None:
        """Over MaxRetentionSize, the oldest files go first until the store fits."""
        files = [self.entry("a", 40, 3), self.entry("b", 40, 2), self.entry("c", 40, 1)]
        plan = plan_deletions(files, RetentionSettings(policy_enabled=True, max_size=50, max_time=30 * DAY), NOW)
        self.assertEqual([(e.segments[-1], r) for e, r in plan], [("a", "max-size"), ("b", "max-size")])

    def test_max_time(self) -> None:
        """RetentionPolicyEnabled removes files older than MaxRetentionTime."""
        files = [self.entry("a", 1, 31), self.entry("b", 1, 29)]
        plan = plan_deletions(files, RetentionSettings(policy_enabled=True, max_time=30 * DAY), NOW)
        self.assertEqual([(e.segments[-1], r) for e, r in plan], [("a", "max-time")])

    def test_disabled_deletes_nothing(self) -> None:
        """With both switches off nothing is planned, however old or large."""
        files = [self.entry("a", 10**12, 10**4)]
        self.assertEqual(plan_deletions(files, RetentionSettings(), NOW), [])

    @settings(derandomize=True, deadline=None, max_examples=200)
    @given(
        st.lists(st.tuples(st.integers(0, 1000), st.floats(0, 100)), max_size=30),
        st.integers(0, 5000),
    )
    def test_cap_property(self, specs: list[tuple[int, float]], cap: int) -> None:
        """After a size-capped plan the kept files fit the cap, and every kept file is
        newer than or as new as every file deleted for size."""
        files = [self.entry(f"f{i}", size, age) for i, (size, age) in enumerate(specs)]
        plan = plan_deletions(files, RetentionSettings(policy_enabled=True, max_size=cap, max_time=1000 * DAY), NOW)
        doomed = {e for e, _ in plan}
        kept = [f for f in files if f not in doomed]
        self.assertLessEqual(sum(f.size for f in kept), cap)
        for entry, _ in plan:
            for other in kept:
                self.assertGreaterEqual((other.mtime, other.segments), (entry.mtime, entry.segments))


class _Synchronous:
    """A sweeper whose ``sweep`` gives the result (its runner runs every job at once)."""

    def __init__(self, test: SynchronousTestCase, sweeper: Sweeper) -> None:
        self.test = test
        self.sweeper = sweeper

    def sweep(self) -> Any:
        return self.test.successResultOf(self.sweeper.sweep())


class SweeperTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.root = Path(self.mktemp()).resolve()
        self.root.mkdir()
        self.store = Store(self.root)
        self.tombstones = Tombstones(self.root, now=lambda: NOW)
        self.report = self.root.parent / "deletions.log"

    def put(self, segments: tuple[str, ...], data: bytes, age_days: float) -> None:
        partial = self.store.open_partial(segments, "text/plain", len(data))
        partial.write([data])
        partial.commit(None)
        when = NOW - age_days * DAY
        os.utime(self.root.joinpath(*segments), (when, when))

    def sweeper(self, **kw: Any) -> Any:
        sweeper = make_sweeper(self.store, self.tombstones, RetentionSettings(**kw), self.report, now=lambda: NOW)
        return _Synchronous(self, sweeper)

    def test_sweep_deletes_reports_tombstones_prunes(self) -> None:
        """Old files are deleted, reported one per line, tombstoned; emptied dirs go, partials stay."""
        self.put(("old", "a.txt"), b"12345", 400)
        self.put(("new", "b.txt"), b"xy", 1)
        partial = self.store.open_partial(("old", "inflight.bin"), "x/y", 10)
        partial.write([b"abc"])
        os.utime(partial.path, (NOW - 500 * DAY, NOW - 500 * DAY))
        result = self.sweeper(delete_files=True, delete_files_after=365 * DAY).sweep()
        self.assertEqual(result.deleted, {"age": 1})
        self.assertEqual(result.freed, 5)
        self.assertEqual((result.store_files, result.store_bytes), (1, 2))
        self.assertFalse((self.root / "old" / "a.txt").exists())
        self.assertTrue((self.root / "new" / "b.txt").exists())
        self.assertTrue(partial.path.exists())
        line = self.report.read_text().splitlines()
        self.assertEqual(len(line), 1)
        stamp, path, size, reason = line[0].split("\t")
        self.assertEqual((path, size, reason), ("old/a.txt", "5", "age"))
        self.assertTrue(self.tombstones.blocks(("old", "a.txt")))
        self.assertFalse(self.tombstones.blocks(("new", "b.txt")))
        partial.abort()

    def test_empty_directories_pruned(self) -> None:
        """A directory emptied by the sweep is removed, up to (not including) the store root."""
        self.put(("x", "y", "z.txt"), b"1", 400)
        self.sweeper(delete_files=True, delete_files_after=DAY).sweep()
        self.assertFalse((self.root / "x").exists())
        self.assertTrue(self.root.exists())

    def test_size_cap(self) -> None:
        """The oldest files are deleted until the store is under MaxRetentionSize."""
        for index, age in enumerate((5, 4, 3, 2)):
            self.put(("s", f"{index}.bin"), b"x" * 100, age)
        result = self.sweeper(policy_enabled=True, max_size=250, max_time=30 * DAY).sweep()
        self.assertEqual(result.deleted, {"max-size": 2})
        self.assertEqual(sorted(os.listdir(self.root / "s")), ["2.bin", "3.bin"])

    def test_one_sweeper_at_a_time(self) -> None:
        """While another process holds the sweep lock, a sweep is skipped."""
        self.put(("old", "a.txt"), b"1", 400)
        with open(self.root / ".hmacfs" / "sweep.lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            result = self.sweeper(delete_files=True, delete_files_after=DAY).sweep()
        self.assertTrue(result.skipped)
        self.assertTrue((self.root / "old" / "a.txt").exists())

    def test_tombstones_expire(self) -> None:
        """A tombstone ends at the retention horizon and is purged."""
        self.tombstones.add(("a", "b"), NOW - 1)
        self.assertFalse(self.tombstones.blocks(("a", "b")))
        self.assertEqual(self.tombstones.purge_expired(), 1)

    def test_tombstone_blocks_until_horizon(self) -> None:
        """A live tombstone blocks its path only; an unreadable one blocks nothing."""
        self.tombstones.add(("a", "b"), NOW + 10)
        self.assertTrue(self.tombstones.blocks(("a", "b")))
        self.assertFalse(self.tombstones.blocks(("a", "c")))
        self.tombstones.add(("x", "y"), NOW + 10)
        (self.tombstones.directory / path_key(("x", "y"))).write_text("garbage\n")
        self.assertFalse(self.tombstones.blocks(("x", "y")))


class ServiceTests(SynchronousTestCase):
    def test_sweeps_at_start_and_every_interval(self) -> None:
        """The timer sweeps on start and every RetentionInterval, on the disk runner,
        and publishes counts and store size to the metrics."""
        root = Path(self.mktemp()).resolve()
        root.mkdir()
        harness = SiteHarness(make_config(root))
        store = harness.server.store
        now = [NOW]
        runner = ManualRunner()
        sweeper = make_sweeper(
            store, Tombstones(root, now=lambda: now[0]),
            RetentionSettings(delete_files=True, delete_files_after=DAY, interval=600),
            root.parent / "report.log", runner, now=lambda: now[0],
        )
        metrics = Metrics()
        service = RetentionService(clock=harness.reactor, sweeper=sweeper, metrics=metrics)
        partial = store.open_partial(("d", "f"), "a/b", 3)
        partial.write([b"abc"])
        partial.commit(None)
        os.utime(root / "d" / "f", (NOW, NOW))
        service.startService()
        self.assertEqual(runner.run_all(), SWEEP_JOBS)
        self.assertEqual(metrics.registry.get_sample_value("hmacfs_store_files"), 1)
        now[0] += 2 * DAY
        harness.reactor.advance(600)
        self.assertEqual(runner.run_all(), SWEEP_JOBS + JOBS_PER_DELETION + 1)
        self.assertEqual(
            metrics.registry.get_sample_value("hmacfs_retention_deletions_total", {"reason": "age"}), 1
        )
        self.assertEqual(metrics.registry.get_sample_value("hmacfs_retention_freed_bytes_total"), 3)
        self.assertEqual(metrics.registry.get_sample_value("hmacfs_store_files"), 0)
        service.stopService()

    def test_sighup_turns_retention_on_and_off(self) -> None:
        """Started with retention off (and no metrics) nothing sweeps; new settings
        with DeleteFiles on (SIGHUP) start the sweeps at once, and off stops them."""
        root = Path(self.mktemp()).resolve()
        root.mkdir()
        harness = SiteHarness(make_config(root))
        runner = ManualRunner()
        sweeper = make_sweeper(
            harness.server.store, Tombstones(root), RetentionSettings(interval=600),
            root.parent / "report.log", runner,
        )
        service = RetentionService(clock=harness.reactor, sweeper=sweeper)
        service.startService()
        self.addCleanup(service.stopService)
        harness.reactor.advance(600)
        self.assertEqual(runner.run_all(), 0)
        service.apply(RetentionSettings(delete_files=True, delete_files_after=DAY, interval=600))
        self.assertEqual(runner.run_all(), SWEEP_JOBS)
        harness.reactor.advance(600)
        self.assertEqual(runner.run_all(), SWEEP_JOBS)
        service.apply(RetentionSettings(interval=600))
        harness.reactor.advance(600)
        self.assertEqual(runner.run_all(), 0)


class SweepLockServiceTests(SynchronousTestCase):
    """The sweep asks the lock shared by the nodes (``SweepLock``) before it runs."""

    def service(self, lock: Any) -> tuple[RetentionService, ManualRunner]:
        root = Path(self.mktemp()).resolve()
        root.mkdir()
        runner = ManualRunner()
        sweeper = make_sweeper(Store(root), Tombstones(root), RetentionSettings(interval=600), root.parent / "r.log", runner)
        return RetentionService(clock=Clock(), sweeper=sweeper, lock=lock), runner

    def test_lock_taken_sweeps(self) -> None:
        """Granted (the embedded locks always are), the sweep runs; the lock is asked
        by name for one interval."""
        asked: list[tuple[str, float]] = []

        class Granting(EmbeddedLocks):
            def try_lock(self, name: str, owner: str, ttl: float) -> Deferred[bool]:
                asked.append((name, ttl))
                return super().try_lock(name, owner, ttl)

        service, runner = self.service(Granting())
        d = service.sweep()
        self.assertEqual(runner.run_all(), SWEEP_JOBS)
        self.assertFalse(self.successResultOf(d).skipped)
        self.assertEqual(asked, [(SWEEP_LOCK, 600)])

    def test_lock_held_elsewhere_skips(self) -> None:
        """Another node holds the lock: this node's sweep is skipped."""
        refusing = EmbeddedLocks()
        self.patch(refusing, "try_lock", lambda name, owner, ttl: succeed(False))
        service, runner = self.service(refusing)
        d = service.sweep()
        self.assertEqual(runner.run_all(), 0)
        self.assertTrue(self.successResultOf(d).skipped)

    def test_lock_error_falls_back_to_the_lock_file(self) -> None:
        """A failing lock (Redis trouble) does not stop the sweep: the lock file still guards it."""
        broken = EmbeddedLocks()
        self.patch(broken, "try_lock", lambda name, owner, ttl: fail(ConnectionError("gone")))
        service, runner = self.service(broken)
        d = service.sweep()
        self.assertEqual(runner.run_all(), SWEEP_JOBS)
        self.assertFalse(self.successResultOf(d).skipped)

    def test_redis_locks_unreachable_grant(self) -> None:
        """Redis locks without a connection grant (no one else can be asked) and release quietly."""
        locks = RedisLocks(lambda: None)
        self.assertTrue(self.successResultOf(locks.try_lock("x", "me", 1.0)))
        self.assertIsNone(self.successResultOf(locks.release("x", "me")))
        embedded = EmbeddedLocks()
        self.assertTrue(self.successResultOf(embedded.try_lock("x", "me", 1.0)))
        self.assertTrue(self.successResultOf(embedded.try_lock("x", "other", 1.0)))
        self.assertIsNone(self.successResultOf(embedded.release("x", "me")))
        interface: list[SweepLock] = [locks, embedded]  # both fit what storage asks (mypy)
        self.assertEqual(len(interface), 2)


class PrivateDirTests(SynchronousTestCase):
    """Retention's state under .hmacfs is reached without links and survives its removal."""

    def setUp(self) -> None:
        self.root = Path(self.mktemp()).resolve()
        self.root.mkdir()
        self.store = Store(self.root)
        self.tombstones = Tombstones(self.root, now=lambda: NOW)
        self.outside = Path(self.mktemp()).resolve()
        self.outside.mkdir()

    def test_tombstones_removed_are_recreated(self) -> None:
        import shutil

        shutil.rmtree(self.tombstones.directory)
        self.tombstones.add(("a", "b"), NOW + 10)
        self.assertTrue(self.tombstones.blocks(("a", "b")))
        self.assertTrue(self.tombstones.directory.is_dir())

    def test_tombstones_and_lock_never_through_a_link(self) -> None:
        import shutil

        shutil.rmtree(self.tombstones.directory)
        os.symlink(self.outside, self.tombstones.directory)
        self.assertRaises(StorageError, self.tombstones.add, ("a", "b"), NOW + 10)
        os.unlink(self.tombstones.directory)
        os.symlink(self.outside / "lock", self.root / ".hmacfs" / "sweep.lock")
        sweeper = make_sweeper(
            self.store, self.tombstones, RetentionSettings(), self.root.parent / "r.log",
            now=lambda: NOW,
        )
        self.failureResultOf(sweeper.sweep(), OSError)
        self.assertEqual(os.listdir(self.outside), [])

    def test_prune_never_through_a_link(self) -> None:
        """Emptied directories are removed by openat walk: an empty one behind a link stays."""
        partial = self.store.open_partial(("d", "e", "f"), "text/plain", 1)
        partial.write([b"x"])
        partial.commit(None)
        os.utime(self.root / "d" / "e" / "f", (NOW - 400 * DAY, NOW - 400 * DAY))
        sweeper = make_sweeper(
            self.store, self.tombstones,
            RetentionSettings(delete_files=True, delete_files_after=365 * DAY),
            self.root.parent / "r.log", now=lambda: NOW,
        )
        real_delete = self.store.delete

        def delete_then_swap(segments):
            done = real_delete(segments)
            (self.outside / "e").mkdir()
            shutil.rmtree(self.root / "d")
            os.symlink(self.outside, self.root / "d")
            return done

        import shutil

        self.store.delete = delete_then_swap  # type: ignore[method-assign]
        self.assertEqual(self.successResultOf(sweeper.sweep()).deleted, {"age": 1})
        self.assertTrue((self.outside / "e").is_dir())


class TombstoneAdmissionTests(SynchronousTestCase):
    def test_leaked_url_cannot_recreate(self) -> None:
        """A valid PUT URL for a path that retention deleted gets 403 with a clear reason."""
        root = Path(self.mktemp()).resolve()
        root.mkdir()
        harness = SiteHarness(make_config(root))
        harness.server.tombstones.add(("u1", "gone.txt"), 10**12)
        protocol, transport = harness.connect()
        protocol.dataReceived(put_head("u1/gone.txt", 3, extra=("Expect: 100-continue",)))
        answer = transport.value()
        self.assertTrue(answer.startswith(b"HTTP/1.1 403 "), answer)
        self.assertIn(b"deleted by the retention policy", answer)
        self.assertFalse((root / "u1" / "gone.txt").exists())
