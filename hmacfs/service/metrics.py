# -*- test-case-name: tests.test_metrics -*-
"""
Prometheus metrics.

The original server's names are kept so existing dashboards keep working
(``hmac_file_server_*``); what it lacked is added under ``hmacfs_*`` with
bounded labels only (never a path or an address).  Nearly everything is
counted from one place, the end of each request (``request_finished``, called
by the site's log hook), so the upload and download code carries no metrics
calls on its hot path.

With several worker processes (NumCores > 1) every process writes its values
to files in a shared directory (prometheus-client's multiprocess mode) and the
metrics listener sums them, so the numbers are the totals of all workers.
"""

from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING, Any, Literal

from twisted.internet.defer import Deferred
from twisted.web.resource import Resource
from twisted.web.server import Site

from hmacfs.periodic import PeriodicService

if TYPE_CHECKING:
    from hmacfs.http.channel import StreamingRequest

#: upload durations from 1 s to 1 h (plus the sub-second small files)
UPLOAD_BUCKETS = (0.1, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600, 1200, 1800, 3600)
METHODS = frozenset({"GET", "HEAD", "PUT", "POST", "PATCH", "DELETE", "OPTIONS"})
#: Auth failure reasons as labels: a fixed vocabulary, "other" for anything else.
AUTH_REASONS = {
    "missing MAC": "missing_mac",
    "malformed MAC": "malformed_mac",
    "bad MAC": "bad_mac",
    "expired": "expired",
    "malformed expires": "malformed_expires",
    "missing size": "missing_size",
}
#: set (with the value class) by hmacfs.service.process.MultiprocessMetrics, in the supervisor only
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


def multiprocess_enabled() -> bool:
    return MULTIPROC_ENV in os.environ


def mark_process_dead(pid: int) -> None:
    """Drop a dead worker's live gauges (its counters stay in the sums)."""
    if multiprocess_enabled():
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid)


class Metrics:
    """The metric objects, on their own registry."""

    def __init__(self, registry: Any = None) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        r = self.registry
        # How a gauge's values from several worker processes add up.
        live: dict[str, Literal["livesum"]] = {"multiprocess_mode": "livesum"}
        latest: dict[str, Literal["max"]] = {"multiprocess_mode": "max"}
        # The original's names.
        self.uploads = Counter("hmac_file_server_uploads", "Uploads stored", registry=r)
        self.upload_errors = Counter(
            "hmac_file_server_upload_errors", "Upload requests answered with an error", registry=r
        )
        self.upload_duration = Histogram(
            "hmac_file_server_upload_duration_seconds",
            "Time from request start to stored file",
            buckets=UPLOAD_BUCKETS,
            registry=r,
        )
        self.in_flight = Gauge(
            "hmac_file_server_goroutines",
            "Requests in flight (the original counted goroutines; Python has none)",
            registry=r,
            **live,
        )
        # What the original lacked.
        self.downloads = Counter("hmacfs_downloads", "Downloads served (GET 200/206)", registry=r)
        self.download_bytes = Counter("hmacfs_download_bytes", "Bytes sent in GET responses", registry=r)
        self.upload_bytes = Counter("hmacfs_upload_bytes", "Request body bytes received", registry=r)
        self.requests = Counter(
            "hmacfs_requests", "Requests by method and status class", ["method", "status"], registry=r
        )
        self.auth_failures = Counter(
            "hmacfs_auth_failures", "Failed authentications by reason", ["reason"], registry=r
        )
        self.active_uploads = Gauge("hmacfs_active_uploads", "Uploads in progress", registry=r, **live)
        self.resumed_uploads = Counter("hmacfs_resumed_uploads", "Uploads resumed", registry=r)
        self.bans_active = Gauge("hmacfs_bans_active", "Addresses blocked now", registry=r, **latest)
        self.bans = Counter("hmacfs_bans", "Blocks imposed", registry=r)
        self.retention_deletions = Counter(
            "hmacfs_retention_deletions", "Files deleted by retention", ["reason"], registry=r
        )
        self.retention_freed = Counter(
            "hmacfs_retention_freed_bytes", "Bytes freed by retention", registry=r
        )
        self.store_bytes = Gauge("hmacfs_store_bytes", "Bytes of finished files in the store", registry=r, **latest)
        self.store_files = Gauge("hmacfs_store_files", "Finished files in the store", registry=r, **latest)
        # The S3 backend's requests: operation and outcome are bounded sets (storage.s3.observer).
        self.s3_requests = Counter(
            "hmacfs_s3_requests", "Requests to S3, by operation and outcome",
            ["operation", "outcome"], registry=r,
        )
        self.s3_seconds = Histogram(
            "hmacfs_s3_request_seconds", "Latency of S3 requests (to the end of the body)",
            ["operation"], registry=r,
        )
        self.s3_bytes_sent = Counter("hmacfs_s3_sent_bytes", "Body bytes sent to S3", registry=r)
        self.s3_bytes_received = Counter(
            "hmacfs_s3_received_bytes", "Body bytes received from S3", registry=r
        )
        self.redis_connected = Gauge(
            "hmacfs_redis_connected", "1 while the Redis state backend is connected", registry=r, **latest
        )
        # Pre-create the label sets, so a dashboard sees zeros instead of gaps.
        for reason in set(AUTH_REASONS.values()) | {"other"}:
            self.auth_failures.labels(reason=reason)
        for reason in ("age", "max-time", "max-size"):
            self.retention_deletions.labels(reason=reason)
        for method in ("GET", "HEAD", "PUT"):
            for status in ("2xx", "4xx", "5xx"):
                self.requests.labels(method=method, status=status)

    # hooks

    def request_started(self) -> None:
        self.in_flight.inc()

    def request_ended(self, _: object = None) -> None:
        """A request finished or lost its connection (notifyFinish fired)."""
        self.in_flight.dec()

    def request_finished(self, request: StreamingRequest) -> None:
        """Count one answered request (the site's log hook calls this)."""
        method = request.method.decode("latin-1") if request.method else "other"
        if method not in METHODS:
            method = "other"
        code = int(request.code or 0)
        self.requests.labels(method=method, status=f"{code // 100}xx").inc()
        received = request.body_received
        if received:
            self.upload_bytes.inc(received)
        if method == "GET" and code in (200, 206):
            self.downloads.inc()
            self.download_bytes.inc(request.sentLength)
        elif method in ("PUT", "POST", "PATCH"):
            if code >= 400:
                self.upload_errors.inc()
            elif code == 201 or (method == "PATCH" and code == 204):
                stored = request.upload_state.stored
                if code == 201 if stored is None else stored:
                    self.uploads.inc()
                    self.upload_duration.observe(time.monotonic() - request.started)
            if request.upload_state.resumed:
                self.resumed_uploads.inc()

    def auth_failure(self, reason: str) -> None:
        self.auth_failures.labels(reason=AUTH_REASONS.get(reason, "other")).inc()


def render_metrics(registry: Any, accept: bytes | None) -> tuple[bytes, bytes]:
    """(body, content type) in the format the scraper asked for (OpenMetrics or text)."""
    from prometheus_client.exposition import choose_encoder

    if multiprocess_enabled():
        from prometheus_client import CollectorRegistry, multiprocess

        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
    encoder, content_type = choose_encoder((accept or b"").decode("latin-1"))
    return encoder(registry), content_type.encode("ascii")


class MetricsResource(Resource):
    """``/metrics``, rendered on the reactor thread (a scrape takes milliseconds)."""

    isLeaf = True

    def __init__(self, registry: Any, health: Resource | None = None) -> None:
        super().__init__()
        self.registry = registry
        #: the /healthz resource (hmacfs.http.health), or None
        self.health = health

    def render_GET(self, request: Any) -> bytes | int:
        if request.path == b"/healthz" and self.health is not None:
            return self.health.render(request)
        if request.path != b"/metrics":
            request.setResponseCode(404)
            return b"not found: metrics are at /metrics\n"
        body, content_type = render_metrics(self.registry, request.getHeader(b"accept"))
        request.setHeader(b"Content-Type", content_type)
        request.setHeader(b"Cache-Control", b"no-store")
        return body


class GaugeService(PeriodicService):
    """Refreshes the gauges that mirror state held elsewhere (bans, uploads in flight)."""

    def __init__(self, clock: Any, metrics: Metrics, site: Any, interval: float = 5.0) -> None:
        super().__init__(clock, interval, self.refresh, what="refreshing the gauges", now=True)
        self.metrics = metrics
        self.site = site
        self._bans_seen = 0

    def refresh(self) -> None:
        bans = getattr(self.site, "bans", None)
        if bans is not None:
            self.metrics.bans_active.set(bans.active())
            if bans.bans_total > self._bans_seen:
                self.metrics.bans.inc(bans.bans_total - self._bans_seen)
                self._bans_seen = bans.bans_total
        policy = getattr(self.site, "body_policy", None)
        if policy is not None:
            self.metrics.active_uploads.set(getattr(policy, "active", 0))
        resumable = getattr(self.site, "resumable", None)
        if resumable is not None and resumable.state_service.address is not None:
            self.metrics.redis_connected.set(1 if resumable.state_service.connected else 0)

    def stopService(self) -> Deferred[None]:
        stopped = super().stopService()
        self.refresh()  # once more after the last tick
        return stopped


def metrics_site(metrics: Metrics, reactor: Any, health: Resource | None = None) -> Site:
    """The metrics listener's Site (MetricsPort): /metrics, and /healthz when given."""
    site = Site(MetricsResource(metrics.registry, health), reactor=reactor)
    site.displayTracebacks = False
    site.noisy = False
    return site
