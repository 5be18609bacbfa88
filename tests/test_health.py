"""GET /healthz: the store probe (off the reactor, cached), Redis state, wiring."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.server import NOT_DONE_YET
from twisted.web.test.requesthelper import DummyRequest

from hmacfs.http.health import HealthCheck, HealthReport, HealthResource
from hmacfs.service.metrics import Metrics, MetricsResource
from hmacfs.storage.fs_backend import probe_store
from hmacfs.storage.interface import StorageError
from hmacfs.testing import ManualRunner, SiteHarness, make_config, status_of


class FakeProbe:
    """Stands in for the store probe: answers what the test says, counts calls."""

    def __init__(self, problem: str | None = None) -> None:
        self.problem = problem
        self.calls = 0

    def __call__(self, root: Path) -> str | None:
        self.calls += 1
        return self.problem


class ProbedStore:
    """What the health check uses of an ``IStore``: ``probe``, run by the runner given."""

    root = Path("/store")

    def __init__(self, run_blocking: Any, probe: FakeProbe) -> None:
        self.run_blocking = run_blocking
        self.fake = probe

    def probe(self) -> Deferred[None]:
        return self.run_blocking(self._probe)

    def _probe(self) -> None:
        problem = self.fake(self.root)
        if problem is not None:
            raise StorageError(503, problem)


class HealthCheckTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.runner = ManualRunner()
        self.probe = FakeProbe()
        self.redis: list[bool] = []

    def make(self, redis: bool = False) -> HealthCheck:
        return HealthCheck(
            store=ProbedStore(self.runner, self.probe), clock=self.clock,
            redis_connected=(lambda: self.redis[-1]) if redis else None,
        )

    def report(self, check: HealthCheck) -> HealthReport:
        results: list[HealthReport] = []
        check.check().addCallback(results.append)
        self.runner.run_all()
        self.assertEqual(len(results), 1)
        return results[0]

    def test_probe_runs_on_the_disk_runner(self) -> None:
        """The store probe is a disk job: nothing is answered until the runner runs it."""
        results: list[HealthReport] = []
        self.make().check().addCallback(results.append)
        self.assertEqual((results, self.probe.calls, len(self.runner.jobs)), ([], 0, 1))
        self.runner.run_all()
        self.assertEqual(results, [HealthReport(True, {"store": "writable"})])

    def test_store_problem_named(self) -> None:
        """A store that cannot be written makes the report unhealthy and says why."""
        self.probe.problem = "not writable: No space left on device"
        report = self.report(self.make())
        self.assertFalse(report.healthy)
        self.assertEqual(json.loads(report.body()),
                         {"status": "fail", "store": "not writable: No space left on device"})

    def test_redis_state(self) -> None:
        """With Redis configured its state is reported; disconnected is unhealthy."""
        check = self.make(redis=True)
        self.redis.append(True)
        self.assertEqual(self.report(check), HealthReport(True, {"store": "writable", "redis": "connected"}))
        self.redis.append(False)
        report = self.report(check)
        self.assertEqual(report, HealthReport(False, {"store": "writable", "redis": "disconnected"}))

    def test_probe_cached(self) -> None:
        """Checks within cache_seconds reuse the last probe; checks while a probe is in
        flight share it; after cache_seconds the store is probed again."""
        check = self.make()
        first: list[HealthReport] = []
        check.check().addCallback(first.append)
        check.check().addCallback(first.append)
        self.assertEqual(len(self.runner.jobs), 1)
        self.runner.run_all()
        self.assertEqual(len(first), 2)
        self.clock.advance(1.5)
        self.report(check)
        self.assertEqual(self.probe.calls, 1)
        self.clock.advance(1)
        self.report(check)
        self.assertEqual(self.probe.calls, 2)

    def test_failed_probe_job_is_a_problem(self) -> None:
        """A probe job that fails (the pool stopped) is an unhealthy store, not an error."""
        def broken(function: object, *args: object) -> Deferred:
            d: Deferred = Deferred()
            d.errback(RuntimeError("the disk thread pool is stopped"))
            return d
        check = HealthCheck(store=ProbedStore(broken, FakeProbe()), clock=self.clock)
        results: list[HealthReport] = []
        check.check().addCallback(results.append)
        self.assertEqual(results[0].fields["store"], "not checked: the disk thread pool is stopped")


class ProbeStoreTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.root = Path(self.mktemp()).resolve()
        self.root.mkdir()

    def test_writable_store(self) -> None:
        """A writable store passes, and the probe leaves no file behind."""
        self.assertIsNone(probe_store(self.root))
        self.assertEqual(os.listdir(self.root / ".hmacfs"), [])

    def test_private_dir_symlink_not_followed(self) -> None:
        """StoreDir/.hmacfs replaced by a symlink fails the probe; nothing is written there."""
        elsewhere = Path(self.mktemp()).resolve()
        elsewhere.mkdir()
        (self.root / ".hmacfs").symlink_to(elsewhere)
        self.assertIn("not writable", probe_store(self.root) or "")
        self.assertEqual(os.listdir(elsewhere), [])

    def test_missing_store(self) -> None:
        """A StoreDir that is gone fails the probe with the reason."""
        self.assertEqual(probe_store(self.root / "gone"), "not writable: No such file or directory")


class PathRequest(DummyRequest):
    """A DummyRequest with the path a Request has (DummyRequest declares none)."""

    path: bytes = b""


class ResourceTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.probe = FakeProbe()
        self.check = HealthCheck(
            store=ProbedStore(ManualRunner(auto=True), self.probe), clock=Clock()
        )

    def get(self, resource: object, method: bytes = b"GET") -> DummyRequest:
        request = PathRequest([b"healthz"])
        request.path = b"/healthz"
        request.method = method
        self.assertEqual(resource.render(request), NOT_DONE_YET)  # type: ignore[attr-defined]
        self.assertEqual(request.finished, 1)
        return request

    def test_200_json(self) -> None:
        """Healthy: 200, JSON, not cacheable."""
        request = self.get(HealthResource(self.check))
        self.assertEqual(request.responseCode, 200)
        self.assertEqual(json.loads(b"".join(request.written)), {"status": "ok", "store": "writable"})
        self.assertEqual(request.responseHeaders.getRawHeaders(b"content-type"), [b"application/json"])
        self.assertEqual(request.responseHeaders.getRawHeaders(b"cache-control"), [b"no-store"])

    def test_503_names_problem(self) -> None:
        """Unhealthy: 503 whose JSON names what is wrong."""
        self.probe.problem = "not writable: Read-only file system"
        request = self.get(HealthResource(self.check))
        self.assertEqual(request.responseCode, 503)
        self.assertIn(b"Read-only file system", b"".join(request.written))

    def test_on_metrics_listener(self) -> None:
        """The metrics listener serves /healthz beside /metrics."""
        request = self.get(MetricsResource(Metrics().registry, HealthResource(self.check)))
        self.assertEqual(request.responseCode, 200)

    def test_client_gone_before_answer(self) -> None:
        """A client that left before the probe finished gets nothing written (no error)."""
        runner = ManualRunner()
        check = HealthCheck(store=ProbedStore(runner, self.probe), clock=Clock())
        request = DummyRequest([b"healthz"])
        request.method = b"GET"
        HealthResource(check).render(request)
        request.processingFailed(Exception("gone"))  # fires notifyFinish with a failure
        written = list(request.written)
        runner.run_all()
        self.assertEqual(request.written, written)


class MainPortTests(SynchronousTestCase):
    """HealthOnMainPort puts /healthz on the upload listener; off by default."""

    def setUp(self) -> None:
        self.store = Path(self.mktemp()).resolve()
        self.store.mkdir()

    def get(self, **overrides: object) -> bytes:
        harness = SiteHarness(make_config(self.store, enable_get_retries=False, **overrides))
        protocol, transport = harness.connect()
        protocol.dataReceived(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        return transport.value()

    def test_enabled(self) -> None:
        """With HealthOnMainPort = true, GET /healthz on the main port is 200 JSON."""
        response = self.get(health_on_main_port=True)
        self.assertEqual(status_of(response), 200)
        self.assertTrue(response.endswith(b'{"status": "ok", "store": "writable"}\n'), response)

    def test_disabled_by_default(self) -> None:
        """By default the main port has no /healthz (it is not an upload path: 404)."""
        self.assertEqual(status_of(self.get()), 404)
