"""
Tests for the storage backends table of bench/bench.py (hmacfs on the filesystem against
hmacfs on S3): no sockets, no servers; what it prints and when it skips.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
from pathlib import Path
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

_PATH = Path(__file__).resolve().parent.parent / "bench" / "bench.py"
_spec = importlib.util.spec_from_file_location("bench_bench", _PATH)
assert _spec is not None and _spec.loader is not None
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)


def options(**changes: Any) -> argparse.Namespace:
    values: dict[str, Any] = {
        "quick": True, "small_puts": None, "get_seconds": None, "slow_count": None,
        "slow_seconds": None, "runs": None, "only": ",".join(bench.BACKEND_WORKLOADS),
        "big_size": 64, "s3_small_puts": None, "concurrent_uploads": 50,
        "concurrent_seconds": None, "connections": 64, "swift_python": None,
        "timeout": 180.0, "s3_timeout": 600.0, "venv": ".venv", "out": "bench-out/x.json",
    }
    values.update(changes)
    return argparse.Namespace(**values)


class BackendsTableTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.tmp = Path(self.mktemp())
        self.tmp.mkdir()
        self.bench = bench.Bench(options(), self.tmp)

    def test_ratio_and_memory_per_upload(self) -> None:
        """The s3 column is over the filesystem's; Swift's rows have no filesystem figure."""
        results = {
            "hmacfs-fs": {"put_big": [{"mib_s": 400.0, "cpu_s_per_gib": 2.0}],
                          "put_concurrent": [{"rss_per_upload_mib": 0.1, "ok": 50}]},
            "hmacfs-s3": {"put_big": [{"mib_s": 100.0, "cpu_s_per_gib": 1.0,
                                       "swift_cpu_s_per_gib": 9.0}],
                          "put_concurrent": [{"rss_per_upload_mib": 1.5, "ok": 50}]},
        }
        table, rows = bench.render_backends_table(self.bench, results)
        by_metric = {(r["workload"], r["metric"]): r for r in rows}
        self.assertEqual(by_metric[("put_big", "mib_s")]["ratio_s3_over_fs"], 0.25)
        self.assertEqual(by_metric[("put_concurrent", "rss_per_upload_mib")]["s3"], 1.5)
        swift = by_metric[("put_big", "swift_cpu_s_per_gib")]
        self.assertEqual((swift["filesystem"], swift["s3"], swift["errors"]), (None, 9.0, {}))
        self.assertIn("| 64 MiB PUT (curl -T): MiB/s", table)
        self.assertIn("50 concurrent 16 MiB uploads", table)

    def test_a_failed_run_is_a_fail_cell_without_ratio(self) -> None:
        """A run that lost data shows FAIL and no ratio, and counts as an error."""
        results = {
            "hmacfs-fs": {"put_small": [{"rps": 800.0}]},
            "hmacfs-s3": {"put_small": [{"error": "499 of 500 objects of 4096 bytes"}]},
        }
        table, rows = bench.render_backends_table(self.bench, results)
        row = next(r for r in rows if r["metric"] == "rps")
        self.assertIsNone(row["ratio_s3_over_fs"])
        self.assertEqual(row["errors"], {"s3": "499 of 500 objects of 4096 bytes"})
        self.assertIn("FAIL: 499 of 500 objects", table)


class SwiftMissingTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.tmp = Path(self.mktemp())
        self.tmp.mkdir()
        self.opts = options(swift_python=str(self.tmp / "no-such-python"))
        self.bench = bench.Bench(self.opts, self.tmp)
        saved = os.environ.get("CI")
        self.addCleanup(
            lambda: os.environ.__setitem__("CI", saved) if saved is not None
            else os.environ.pop("CI", None)
        )

    def test_skipped_outside_ci(self) -> None:
        """Without a Swift interpreter and outside CI, the rows are skipped, saying why."""
        os.environ.pop("CI", None)
        found = bench.measure_backends(self.bench, self.tmp, "s" * 32, self.opts, {})
        self.assertEqual(list(found), ["skipped"])
        self.assertIn("no Swift interpreter at", found["skipped"])

    def test_an_error_in_ci(self) -> None:
        """With CI=true the same is an error (the bench then exits 1), never a skip."""
        os.environ["CI"] = "true"
        found = bench.measure_backends(self.bench, self.tmp, "s" * 32, self.opts, {})
        self.assertEqual(list(found), ["error"])
        self.assertIn("need Swift in CI", found["error"])
