# -*- test-case-name: tests.test_s3_daemon -*-
"""
Which store a process serves from (``StorageBackend``), built once per process.

The filesystem backend needs the disk pool; the S3 backend needs its client, the start-up
check (``check_storage``: run before anything listens, so a missing bucket or refused
credentials stop the daemon with the key to fix), and the metrics seam.  botocore is
imported only here and below ``hmacfs.storage.s3``, and only for ``StorageBackend = "s3"``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from twisted.internet.defer import Deferred
from twisted.logger import Logger

from hmacfs.config import Config
from hmacfs.logs import log_router
from hmacfs.storage.filesystem import Store
from hmacfs.storage.fs_backend import FilesystemBackend
from hmacfs.storage.interface import IStore
from hmacfs.storage.retention import Tombstones

if TYPE_CHECKING:
    from hmacfs.service.metrics import Metrics
    from hmacfs.storage.s3.settings import S3Settings

log = Logger(observer=log_router)

__all__ = ["build_store", "check_storage", "s3_settings"]

#: the start-up check's answer per bucket, once per process
_checked: dict[tuple[str, str, str], bool] = {}


def s3_settings(config: Config) -> S3Settings:
    from hmacfs.storage.s3.settings import S3Settings

    return S3Settings(
        bucket=config.s3_bucket,
        access_key=config.s3_access_key,
        secret_key=config.s3_secret_key,
        endpoint=config.s3_endpoint,
        region=config.s3_region,
        prefix=config.s3_prefix,
        addressing_style=config.s3_addressing(),
        part_size=config.s3_part_size,
        presign_expiry=config.s3_presign_expiry,
        ca_file=str(config.s3_ca_file) if config.s3_ca_file else None,
    )


def check_storage(config: Config) -> bool | None:
    """
    For the S3 backend: the bucket answers, and whether it refuses to replace a key
    (True), or not (False: a HEAD before each create stands in; logged).  Raises
    ``S3StartupError`` naming the key to fix.  Blocking: call it before the reactor runs.
    None for the filesystem backend.
    """
    if config.storage_backend != "s3":
        return None
    key = (config.s3_endpoint, config.s3_bucket, config.s3_access_key)
    if key not in _checked:
        from hmacfs.storage.s3.startup import check_bucket

        report = check_bucket(s3_settings(config))
        _checked[key] = report.conditional_writes
        if not report.conditional_writes:
            log.warn(
                "S3 bucket {bucket}: the server does not refuse to replace an object "
                "(If-None-Match: * answered 501); hmacfs checks with a HEAD before each "
                "create, under the upload's writer lock (Redis across nodes)",
                bucket=config.s3_bucket,
            )
    return _checked[key]


class _PrometheusS3Observer:
    """The S3 client's requests as Prometheus counters and a histogram (bounded labels)."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def request_finished(
        self, operation: str, outcome: str, seconds: float, sent: int, received: int
    ) -> None:
        m = self.metrics
        m.s3_requests.labels(operation, outcome).inc()
        m.s3_seconds.labels(operation).observe(seconds)
        if sent:
            m.s3_bytes_sent.inc(sent)
        if received:
            m.s3_bytes_received.inc(received)


def build_store(
    config: Config,
    reactor: Any,
    store: Store,
    run_blocking: Callable[..., Deferred],
    metrics: Metrics | None = None,
    tombstones: Tombstones | None = None,
    run_short: Callable[..., Deferred] | None = None,
) -> IStore:
    """The process's ``IStore``: over ``store`` on the disk pool (``run_short`` for its
    shortest jobs, see ``DiskThreadPoolService.run_short``), or on the S3 bucket."""
    if config.storage_backend != "s3":
        return FilesystemBackend(store, run_blocking, tombstones, run_short)
    from hmacfs.storage.s3.client import S3Client
    from hmacfs.storage.s3.store import S3Store

    conditional = check_storage(config)
    observer = _PrometheusS3Observer(metrics) if metrics is not None else None
    settings = s3_settings(config)
    client = S3Client(settings, reactor, observer=observer)
    # Which bucket this process serves from (never the secret: S3Settings leaves it out of repr).
    log.info(
        "storage: S3 bucket {bucket} at {endpoint}, prefix {prefix!r}, access key {access_key}, "
        "{writes}",
        bucket=settings.bucket,
        endpoint=settings.endpoint_url,
        prefix=settings.prefix,
        access_key=settings.access_key,
        writes="conditional writes" if conditional else "HEAD before each create",
    )
    return S3Store(
        client,
        conditional=bool(conditional),
        redirect_downloads=config.s3_redirect_downloads,
    )
