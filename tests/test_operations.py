"""
SLOW SUITE: operations features on the real daemon (retention sweeps with the
deletion report and tombstones, secret rotation with an upload in flight).
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
import uuid
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

from hmacfs.testing import SECRET, v1_mac, wait_for
from tests.test_integration import Daemon, make_file, require_curl


class RetentionDaemonTests(SynchronousTestCase):
    def test_sweep_enforces_size_cap_report_and_tombstones(self) -> None:
        """With a 250 KiB cap, a sweep deletes the oldest files until the store fits,
        writes one report line per file, and a leaked PUT URL cannot re-create them."""
        require_curl()
        report = None
        daemon = Daemon(extra='NumCores = 1\nRetentionPolicyEnabled = true\nMaxRetentionSize = "250KiB"\n'
                              'MaxRetentionTime = "30d"\nRetentionInterval = "2s"\n')
        self.addCleanup(daemon.stop)
        report = daemon.dir / "deletions.log"
        work = Path(self.mktemp())
        work.mkdir()
        source = make_file(work, 100 * 1024)
        urls = []
        for index in range(5):
            slot = f"{uuid.uuid4()}/f{index}.bin"
            url = f"{daemon.base()}/{slot}?v={v1_mac(slot, source.stat().st_size)}"
            result = daemon.curl("-T", str(source), "-o", "/dev/null", "-w", "%{http_code}", url)
            self.assertEqual(result.stdout, b"201")
            stamp = time.time() - (10 - index) * 60  # f0 oldest
            os.utime(daemon.store / slot, (stamp, stamp))
            urls.append((slot, url))
        self.assertTrue(wait_for(lambda: report.exists() and len(report.read_text().splitlines()) >= 3, 15),
                        daemon.log_tail())
        lines = report.read_text().splitlines()
        self.assertEqual([line.split("\t")[1] for line in lines], [slot for slot, _ in urls[:3]])
        self.assertTrue(all(line.endswith("\tmax-size") for line in lines))
        remaining = sorted(p.name for p in daemon.store.glob("*/f*.bin"))
        self.assertEqual(remaining, ["f3.bin", "f4.bin"])
        # The deleted file is gone for GET, and its old PUT URL cannot bring it back.
        slot, url = urls[0]
        self.assertIn(b"404", daemon.curl("-o", "/dev/null", "-w", "%{http_code}", f"{daemon.base()}/{slot}").stdout)
        again = daemon.curl("-T", str(source), "-w", "\n%{http_code}", url)
        self.assertTrue(again.stdout.endswith(b"403"), again.stdout)
        self.assertIn(b"retention", again.stdout)
        # Emptied directories were pruned.
        self.assertFalse((daemon.store / slot.split("/")[0]).exists())


class RotationDaemonTests(SynchronousTestCase):
    def test_upload_straddling_rotation_and_grace_end(self) -> None:
        """An upload that started before a rotation completes; slots signed with the old
        secret work during SecretGracePeriod and are refused after it."""
        require_curl()
        daemon = Daemon(extra='SecretGracePeriod = "4s"\nBlockAfterFails = 100\n')
        self.addCleanup(daemon.stop)
        work = Path(self.mktemp())
        work.mkdir()
        source = make_file(work, 2 * 1024 * 1024)
        slot = f"{uuid.uuid4()}/slow.bin"
        url = f"{daemon.base()}/{slot}?v={v1_mac(slot, source.stat().st_size)}"
        slow = subprocess.Popen(
            [require_curl(), "-sS", "--limit-rate", "1M", "-T", str(source), "-o", "/dev/null",
             "-w", "%{http_code}", url],
            stdout=subprocess.PIPE,
        )
        time.sleep(0.7)
        new_secret = "the-rotated-secret-0123456789"
        daemon.config.write_text(daemon.config.read_text().replace(SECRET.decode(), new_secret))
        daemon.process.send_signal(signal.SIGHUP)
        out, _ = slow.communicate(timeout=60)
        self.assertEqual(out, b"201")
        self.assertEqual((daemon.store / slot).stat().st_size, source.stat().st_size)

        def put(secret: bytes) -> bytes:
            path = f"{uuid.uuid4()}/g.txt"
            result = daemon.curl("-X", "PUT", "--data-binary", "ok", "-o", "/dev/null", "-w", "%{http_code}",
                                 f"{daemon.base()}/{path}?v={v1_mac(path, 2, secret)}")
            return result.stdout

        self.assertTrue(wait_for(lambda: put(new_secret.encode()) == b"201", 10))
        self.assertEqual(put(SECRET), b"201")
        time.sleep(4.5)
        self.assertEqual(put(SECRET), b"403")
        self.assertEqual(put(new_secret.encode()), b"201")


class HealthDaemonTests(SynchronousTestCase):
    def test_healthz_on_metrics_and_main_port(self) -> None:
        """The real daemon answers GET /healthz with 200 and its JSON on the metrics
        port and, with HealthOnMainPort, on the main port; HEAD has no body."""
        import json

        from hmacfs.testing import free_port

        curl = require_curl()
        metrics_port = free_port()
        daemon = Daemon(extra=f'NumCores = 1\nMetricsEnabled = true\nMetricsPort = "127.0.0.1:{metrics_port}"\n'
                              "HealthOnMainPort = true\n")
        self.addCleanup(daemon.stop)
        for port in (metrics_port, daemon.port):
            url = f"http://127.0.0.1:{port}/healthz"
            result = subprocess.run([curl, "-sS", "-w", "\n%{http_code}", url], capture_output=True, timeout=30)
            body, _, code = result.stdout.rpartition(b"\n")
            self.assertEqual(code, b"200", (port, result, daemon.log_tail()))
            self.assertEqual(json.loads(body), {"status": "ok", "store": "writable"})
            head = subprocess.run([curl, "-sS", "-I", url], capture_output=True, timeout=30)
            self.assertIn(b"200 OK", head.stdout)
            self.assertIn(b"application/json", head.stdout)
        self.assertEqual([n for n in os.listdir(daemon.store / ".hmacfs") if n.startswith("health")], [])
