"""Prometheus metrics: what each request counts, and the exposition."""

from __future__ import annotations

from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase
from twisted.web.test.requesthelper import DummyRequest

from hmacfs.service.metrics import GaugeService, Metrics, MetricsResource
from hmacfs.testing import SiteHarness, make_config, put_head

UUID = "1b2c3d4e-5f60-4a7b-8c9d-0e1f2a3b4c5d"


class MetricsTests(SynchronousTestCase):
    def setUp(self) -> None:
        store = Path(self.mktemp()).resolve()
        store.mkdir()
        self.metrics = Metrics()
        self.harness = SiteHarness(make_config(store, block_after_fails=2), metrics=self.metrics)

    def value(self, name: str, **labels: str) -> float:
        result = self.metrics.registry.get_sample_value(name, labels or None)
        return 0.0 if result is None else result

    def test_upload_counted(self) -> None:
        """A stored upload counts in uploads_total, upload bytes, the duration histogram
        and the PUT/2xx request count; in-flight returns to zero."""
        protocol, transport = self.harness.connect()
        protocol.dataReceived(put_head(f"{UUID}/a.bin", 1000) + b"x" * 1000)
        self.assertIn(b" 201 ", transport.value())
        self.assertEqual(self.value("hmac_file_server_uploads_total"), 1)
        self.assertEqual(self.value("hmacfs_upload_bytes_total"), 1000)
        self.assertEqual(self.value("hmac_file_server_upload_duration_seconds_count"), 1)
        self.assertEqual(self.value("hmacfs_requests_total", method="PUT", status="2xx"), 1)
        self.assertEqual(self.value("hmac_file_server_goroutines"), 0)

    def test_auth_failure_counted_by_reason(self) -> None:
        """A bad MAC counts as an upload error and an auth failure with a bounded reason label."""
        protocol, _ = self.harness.connect()
        protocol.dataReceived(put_head(f"{UUID}/b.bin", 10, mac="0" * 64))
        protocol, _ = self.harness.connect()
        protocol.dataReceived(f"PUT /upload/{UUID}/b.bin HTTP/1.1\r\nContent-Length: 3\r\n\r\n".encode())
        self.assertEqual(self.value("hmacfs_auth_failures_total", reason="bad_mac"), 1)
        self.assertEqual(self.value("hmacfs_auth_failures_total", reason="missing_mac"), 1)
        self.assertEqual(self.value("hmac_file_server_upload_errors_total"), 2)
        self.assertEqual(self.value("hmacfs_requests_total", method="PUT", status="4xx"), 2)

    def test_download_counted(self) -> None:
        """A GET counts a download and its bytes."""
        protocol, transport = self.harness.connect()
        protocol.dataReceived(put_head(f"{UUID}/c.bin", 500) + b"y" * 500)
        protocol.dataReceived(f"GET /upload/{UUID}/c.bin HTTP/1.1\r\n\r\n".encode())
        self.assertEqual(self.value("hmacfs_downloads_total"), 1)
        self.assertGreaterEqual(self.value("hmacfs_download_bytes_total"), 500)

    def test_unknown_method_label_bounded(self) -> None:
        """An invented method is counted under method="other", never as itself."""
        protocol, _ = self.harness.connect()
        protocol.dataReceived(f"BREW /upload/{UUID}/c HTTP/1.1\r\n\r\n".encode())
        self.assertEqual(self.value("hmacfs_requests_total", method="other", status="4xx"), 1)

    def test_gauges_refresh_bans(self) -> None:
        """The gauge refresher publishes active and total bans."""
        for _ in range(2):
            protocol, _ = self.harness.connect(host="198.51.100.3")
            protocol.dataReceived(put_head(f"{UUID}/d", 1, mac="1" * 64))
        GaugeService(self.harness.reactor, self.metrics, self.harness.server).refresh()
        self.assertEqual(self.value("hmacfs_bans_active"), 1)
        self.assertEqual(self.value("hmacfs_bans_total"), 1)


class PathRequest(DummyRequest):
    """A DummyRequest with the path a Request has (DummyRequest declares none)."""

    path: bytes = b""


class ExpositionTests(SynchronousTestCase):
    def render(self, accept: bytes | None) -> tuple[bytes, bytes]:
        metrics = Metrics()
        metrics.uploads.inc()
        request = PathRequest([b"metrics"])
        request.path = b"/metrics"
        if accept:
            request.requestHeaders.setRawHeaders(b"accept", [accept])
        body = MetricsResource(metrics.registry).render_GET(request)
        assert isinstance(body, bytes)
        content_type = request.responseHeaders.getRawHeaders(b"content-type")
        assert content_type is not None
        return body, content_type[0]

    def test_text_format(self) -> None:
        """Without Accept, the Prometheus text format with the original's names."""
        body, content_type = self.render(None)
        self.assertTrue(content_type.startswith(b"text/plain"))
        self.assertIn(b"hmac_file_server_uploads_total 1.0", body)

    def test_openmetrics(self) -> None:
        """With an OpenMetrics Accept header, OpenMetrics (ending in # EOF)."""
        body, content_type = self.render(b"application/openmetrics-text; version=1.0.0")
        self.assertTrue(content_type.startswith(b"application/openmetrics-text"))
        self.assertTrue(body.rstrip().endswith(b"# EOF"))


class DashboardTests(SynchronousTestCase):
    def test_dashboard_queries_existing_metrics(self) -> None:
        """Every metric the shipped Grafana dashboard queries is one hmacfs exports."""
        import json
        import re

        root = Path(__file__).resolve().parent.parent
        dashboard = json.loads((root / "packaging" / "grafana-dashboard.json").read_text())
        exprs = [t["expr"] for panel in dashboard["panels"] for t in panel.get("targets", [])]
        used = {name for expr in exprs for name in re.findall(r"\b(?:hmac_file_server|hmacfs)_[a-z_]+", expr)}
        self.assertGreater(len(used), 10)
        exported = {
            sample.name
            for family in Metrics().registry.collect()
            for sample in family.samples
        } | {family.name for family in Metrics().registry.collect()}
        # Histograms expose _bucket/_count/_sum; counters _total: all are samples above.
        self.assertEqual(sorted(used - exported), [])
