# -*- test-case-name: tests.test_tap -*-
"""
Service wiring: twistd options and ``makeService``.

``makeService`` only assembles services; nothing listens, opens a thread or
connects before ``startService``.  Every part takes the reactor as an argument
so tests can pass a ``MemoryReactorClock``.
"""

from __future__ import annotations

import ctypes
import os
import platform
import signal
from pathlib import Path
from typing import Any

from twisted.application import strports
from twisted.application.service import MultiService, Service
from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.logger import Logger
from twisted.python import usage

from hmacfs.config import Config, ConfigError, load_config
from hmacfs.http.channel import StreamingSite
from hmacfs.http.clientaddr import ClientAddressResolver, request_client
from hmacfs.http.health import HealthCheck, HealthGate, HealthResource
from hmacfs.http.resource import DownloadSettings, UploadResource
from hmacfs.logs import log_router
from hmacfs.service.diskpool import DiskThreadPoolService
from hmacfs.service.metrics import GaugeService, Metrics, enable_multiprocess, metrics_site
from hmacfs.service.reload import ReloadService
from hmacfs.service.workers import WorkerSupervisor
from hmacfs.signing.auth import Authenticator
from hmacfs.signing.rotation import SecretRing
from hmacfs.state.bans import BanList, BanSettings, BanSyncService, SharedBans, ban_check
from hmacfs.storage.filesystem import Store
from hmacfs.storage.retention import (
    RetentionService,
    RetentionSettings,
    Sweeper,
    Tombstones,
    tombstone_check,
)
from hmacfs.upload.policy import UploadLimits, UploadPolicy
from hmacfs.upload.resume import make_resumable

log = Logger(observer=log_router)
access_log = Logger(namespace="hmacfs.access", observer=log_router)


class Options(usage.Options):
    """``twistd hmacfs --config FILE``"""

    optParameters = [
        ["config", "c", None, "Path to config.toml (default: $HMACFS_CONFIG or ./config.toml)."],
    ]

    config_obj: Config

    def postOptions(self) -> None:
        path = self["config"] or os.environ.get("HMACFS_CONFIG") or "config.toml"
        if not os.path.exists(path):
            raise usage.UsageError(f"config file {path!r} does not exist (use --config FILE)")
        try:
            config, warnings = load_config(path)
        except ConfigError as error:
            raise usage.UsageError(str(error)) from None
        for warning in warnings:
            log.warn("config {path}: {problem}", path=path, problem=warning)
        self["config"] = path
        self.config_obj = config


class SequentialMultiService(MultiService):
    """
    Stops its children one at a time, last added first.

    MultiService stops them all at once, which on SIGTERM would join the disk
    threads and close the log while uploads are still draining.  Added in
    order (logging, disk, state, …, drain, listener), they stop as a graceful
    shutdown needs: stop accepting, let uploads finish, then release the rest.
    """

    def stopService(self) -> Deferred:
        Service.stopService(self)
        return Deferred.fromCoroutine(self._stop_in_order())

    async def _stop_in_order(self) -> None:
        for service in reversed(list(self)):
            try:
                await maybeDeferred(service.stopService)
            except Exception:  # noqa: BLE001 - one failing child must not block the rest
                log.failure("stopping {service} failed", service=service)


class LoggingService(Service):
    """
    Applies LogLevel/LogFile when the service starts, closes the file at stop.

    Started on the reactor thread, which from then on is the only one that
    writes the log file (events from the disk pool are handed to it).
    """

    def __init__(self, config: Config, reactor: Any = None) -> None:
        self.config = config
        self.reactor = reactor

    def startService(self) -> None:
        super().startService()
        log_router.configure(self.config.log_level, self.config.log_file, reactor=self.reactor)

    def stopService(self) -> Deferred:
        super().stopService()
        log_router.close()
        return succeed(None)


class DrainService(Service):
    """On stop, give uploads in flight up to DrainTimeout seconds to finish."""

    def __init__(self, reactor: Any, site: StreamingSite, timeout: float) -> None:
        self.reactor = reactor
        self.site = site
        self.timeout = timeout

    def stopService(self) -> Deferred:
        super().stopService()
        done: Deferred[None] = Deferred()
        deadline = self.reactor.seconds() + self.timeout

        def check() -> None:
            active = self.site.body_policy.active if self.site.body_policy else 0
            if active == 0 or self.reactor.seconds() >= deadline:
                try:
                    if active:
                        log.warn("stopping with {active} uploads still in flight", active=active)
                finally:
                    done.callback(None)
            else:
                self.reactor.callLater(0.1, check)

        check()
        return done


def make_access_logger(resolver: ClientAddressResolver) -> Any:
    """One line per request: client, method, path (never the query: it holds the MAC)."""

    def log_request(request: Any) -> None:
        import time

        reason = getattr(request, "hmacfs_reason", None)
        access_log.info(
            '{client} "{method} {path}" {status} {bytes} {seconds:.3f}s{why}',
            client=request_client(request, resolver),
            method=request.method.decode("latin-1"),
            path=request.path.decode("latin-1"),
            status=request.code,
            bytes=request.sentLength,
            received=getattr(request, "body_received", 0),
            seconds=time.monotonic() - getattr(request, "started", time.monotonic()),
            why=f" ({reason})" if reason else "",
        )

    return log_request


def build_site(
    config: Config,
    reactor: Any,
    run_blocking: Any,
    ring: SecretRing | None = None,
    metrics: Any = None,
) -> StreamingSite:
    """The upload Site for a configuration; also what embedding applications mount."""
    store = Store(config.store_dir, min_free_bytes=config.min_free_bytes)
    if ring is None:
        ring = SecretRing(config.secret, reactor, config.secret_grace_period)
    authenticator = Authenticator(ring.secrets, reactor, config.clock_skew)
    resolver = ClientAddressResolver(config.trusted_proxies)

    def client_of(request: Any) -> str:
        return request_client(request, resolver)

    bans = BanList(reactor, BanSettings.from_config(config))
    # Resumable uploads: state backend (embedded or Redis), registry, timers.
    resumable = make_resumable(config, reactor, run_blocking, store)
    # With Redis, failures and blocks are shared by every node and worker.
    shared_bans = (
        SharedBans(bans=bans, client=resumable.state_service.client) if config.redis_addr else None
    )

    def auth_failed(request: Any, reason: str) -> None:
        if metrics is not None:
            metrics.auth_failure(reason)
        address = client_of(request)
        bans.record_failure(address)
        if shared_bans is not None:
            shared_bans.failure(address)

    policy = UploadPolicy(
        limits=UploadLimits(
            prefix=config.upload_subdir,
            max_upload_size=config.max_upload_size,
            checksum_verification=config.checksum_verification,
            buffer_size=config.buffer_size,
        ),
        store=store,
        authenticator=authenticator,
        run_blocking=run_blocking,
        clock=reactor,
        on_auth_failure=auth_failed,
        uploads=resumable.uploads,
    )
    resource = UploadResource(
        prefix=config.upload_subdir,
        store=store,
        clock=reactor,
        downloads=DownloadSettings(
            enable_get_retries=config.enable_get_retries,
            max_retries=config.max_retries,
            retry_delay=config.retry_delay,
            write_timeout=config.write_timeout,
            chunk_size=max(config.buffer_size, 65536),
        ),
        uploads=resumable.uploads,
        max_upload_size=config.max_upload_size,
    )
    state_service = resumable.state_service
    health = HealthResource(
        HealthCheck(
            store_dir=store.root,
            run_blocking=run_blocking,
            clock=reactor,
            redis_connected=(lambda: state_service.connected) if config.redis_addr else None,
        )
    )
    site = StreamingSite(
        HealthGate(resource, health) if config.health_on_main_port else resource,
        body_policy=policy,
        reactor=reactor,
        read_timeout=config.read_timeout,
        read_size=config.buffer_size,
        access_log=make_access_logger(resolver) if config.log_access else None,
        header_timeout=config.header_timeout,
        max_connections_per_client=config.max_connections_per_client,
        connection_key=resolver.connection_key,
    )
    site.metrics = metrics
    site.store = store  # type: ignore[attr-defined]
    site.admission_checks.append(ban_check(bans, client_of))
    site.tombstones = Tombstones(store.root)  # type: ignore[attr-defined]
    site.admission_checks.append(tombstone_check(site.tombstones, config.upload_subdir))
    site.bans = bans  # type: ignore[attr-defined]
    site.ban_sync = BanSyncService(  # type: ignore[attr-defined]
        clock=reactor, bans=bans, store_dir=store.root, shared=shared_bans
    )
    site.resumable = resumable  # type: ignore[attr-defined]
    site.health = health  # type: ignore[attr-defined]
    return site


def deletion_report_path(config: Config) -> Path:
    """DeletionReportFile, by default beside the log file (or in the store's state dir)."""
    if config.deletion_report_file is not None:
        return config.deletion_report_file
    if config.log_file is not None:
        return config.log_file.parent / "deletions.log"
    return config.store_dir / ".hmacfs" / "deletions.log"


def assemble_server(
    config: Config,
    reactor: Any,
    *,
    config_path: str | None = None,
    worker_index: int | None = None,
) -> tuple[MultiService, StreamingSite]:
    """
    The services of one serving process (the single process, or one worker):
    logging, the disk pool, the site, SIGHUP reload and graceful drain.
    Listening, retention and the metrics listener are added by the caller.
    """
    top = SequentialMultiService()
    LoggingService(config, reactor).setServiceParent(top)
    disk = DiskThreadPoolService(reactor)
    disk.setServiceParent(top)
    ring = SecretRing(config.secret, reactor, config.secret_grace_period)
    metrics = Metrics() if config.metrics_enabled else None
    site = build_site(config, reactor, disk.run_blocking, ring, metrics)
    for service in site.resumable.services:  # type: ignore[attr-defined]
        service.setServiceParent(top)
    site.ban_sync.setServiceParent(top)  # type: ignore[attr-defined]
    if metrics is not None:
        GaugeService(reactor, metrics, site).setServiceParent(top)
    reload = ReloadService(
        reactor=reactor,
        config=config,
        config_path=config_path,
        ring=ring,
        manage_secret=worker_index is None,
    )
    reload.appliers.append(lambda new: setattr(site.bans, "settings", BanSettings.from_config(new)))
    reload.setServiceParent(top)
    DrainService(reactor, site, config.drain_timeout).setServiceParent(top)
    top.site = site  # type: ignore[attr-defined]
    top.ring = ring  # type: ignore[attr-defined]
    top.reload = reload  # type: ignore[attr-defined]
    top.disk = disk  # type: ignore[attr-defined]
    top.metrics = metrics  # type: ignore[attr-defined]
    return top, site


def _add_metrics_listener(
    top: MultiService, config: Config, reactor: Any, metrics: Any, health: HealthResource
) -> None:
    # strports.service: a port that cannot be bound fails twistd's start, not a log line.
    listener = strports.service(
        config.metrics_listen, metrics_site(metrics, reactor, health), reactor
    )
    listener.setServiceParent(top)


def _add_retention(
    top: MultiService, config: Config, reactor: Any, *, store: Store, tombstones: Tombstones,
    run_blocking: Any, metrics: Any, reload: ReloadService, redis: Any = None,
) -> RetentionService:
    retention = RetentionService(
        clock=reactor,
        sweeper=Sweeper(store, tombstones, RetentionSettings.from_config(config), deletion_report_path(config)),
        run_blocking=run_blocking,
        metrics=metrics,
        redis=redis,
    )
    # Always a child, idle unless retention or metrics need sweeps: a SIGHUP
    # that turns retention on then starts it without a restart.
    retention.setServiceParent(top)
    reload.appliers.append(lambda new: retention.apply(RetentionSettings.from_config(new)))
    top.retention = retention  # type: ignore[attr-defined]
    return retention


def make_service_from_config(
    config: Config, reactor: Any = None, config_path: str | None = None
) -> MultiService:
    """Assemble the hmacfs services for ``config`` (nothing starts here).

    ``config_path`` is the file SIGHUP re-reads (None when embedded).  With
    NumCores > 1 (and a config file the workers can read) this process
    supervises worker processes instead of serving requests itself.
    """
    if reactor is None:
        from twisted.internet import reactor as default_reactor

        reactor = default_reactor
    if config.num_cores > 1 and config_path is not None:
        return add_component(make_supervisor(config, reactor, config_path), config, reactor)
    top, site = assemble_server(config, reactor, config_path=config_path)
    if top.metrics is not None:  # type: ignore[attr-defined]
        _add_metrics_listener(top, config, reactor, top.metrics, site.health)  # type: ignore[attr-defined]
    _add_retention(
        top, config, reactor, store=site.store, tombstones=site.tombstones,  # type: ignore[attr-defined]
        run_blocking=top.disk.run_blocking, metrics=top.metrics,  # type: ignore[attr-defined]
        reload=top.reload,  # type: ignore[attr-defined]
        redis=site.resumable.state_service.client if config.redis_addr else None,  # type: ignore[attr-defined]
    )
    # strports.service raises a bind error from privilegedStartService, so twistd
    # exits with it instead of running (and logging that it is up) without a port.
    listener = strports.service(config.listen, site, reactor)
    listener.setServiceParent(top)
    top.listener = listener  # type: ignore[attr-defined]
    return add_component(top, config, reactor)


def add_component(top: MultiService, config: Config, reactor: Any) -> MultiService:
    """
    With ComponentJID set, log in to the XMPP server as the XEP-0114 upload
    component (once per machine: in the supervisor when there are workers),
    signing slots with the current secret of ``top.reload``'s ring.
    """
    if config.component_jid:
        from hmacfs.xmpp.component import component_from_config

        ring = top.reload.ring  # type: ignore[attr-defined]
        component = component_from_config(config, reactor, secret=lambda: ring.current)
        component.setServiceParent(top)
        top.component = component  # type: ignore[attr-defined]
    return top


def make_supervisor(config: Config, reactor: Any, config_path: str) -> MultiService:
    """NumCores > 1: workers serve; this process supervises, sweeps and serves /metrics."""
    import shutil
    import tempfile

    top = SequentialMultiService()
    LoggingService(config, reactor).setServiceParent(top)
    metrics = None
    if config.metrics_enabled:
        directory = Path(tempfile.mkdtemp(prefix="hmacfs-metrics-"))
        enable_multiprocess(directory)
        reactor.addSystemEventTrigger("after", "shutdown", shutil.rmtree, directory, True)
        metrics = Metrics()
    disk = DiskThreadPoolService(reactor, size=2)
    disk.setServiceParent(top)
    ring = SecretRing(config.secret, reactor, config.secret_grace_period)
    supervisor = WorkerSupervisor(
        reactor=reactor,
        listen=config.listen,
        count=config.num_cores,
        config_path=config_path,
        drain_timeout=config.drain_timeout,
        secret_state=ring.state,
    )
    reload = ReloadService(reactor=reactor, config=config, config_path=config_path, ring=ring)
    reload.appliers.append(lambda new: supervisor.signal_workers(signal.SIGHUP))
    reload.rotation_listeners.append(supervisor.broadcast_secrets)
    reload.setServiceParent(top)
    store = Store(config.store_dir, min_free_bytes=config.min_free_bytes)
    redis = None
    if config.redis_addr:
        # The sweep lock shared with other nodes (the workers hold their own connections).
        from hmacfs.state.store import StateService

        state = StateService(
            reactor, redis_addr=config.redis_addr, redis_password=config.redis_password,
            redis_db=config.redis_db, max_retries=config.max_retries, retry_delay=config.retry_delay,
        )
        state.setServiceParent(top)
        redis = state.client
    if metrics is not None:
        health = HealthResource(
            HealthCheck(
                store_dir=store.root,
                run_blocking=disk.run_blocking,
                clock=reactor,
                redis_connected=(lambda: state.connected) if config.redis_addr else None,
            )
        )
        _add_metrics_listener(top, config, reactor, metrics, health)
    _add_retention(
        top, config, reactor, store=store, tombstones=Tombstones(store.root),
        run_blocking=disk.run_blocking, metrics=metrics, reload=reload, redis=redis,
    )
    supervisor.setServiceParent(top)
    top.supervisor = supervisor  # type: ignore[attr-defined]
    top.reload = reload  # type: ignore[attr-defined]
    top.metrics = metrics  # type: ignore[attr-defined]
    return top


#: glibc's mallopt(3) parameters
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


def tune_allocator(buffer_size: int, libc: Any = None) -> tuple[int, int] | None:
    """
    Keep socket-read buffers in the heap, and the heap from shrinking after each one.

    Every socket read allocates a fresh ``BufferSize`` bytes object.  glibc's
    defaults serve such a block with mmap, or from the top of the heap, which
    it hands back (``brk``) as soon as more than twice that is free: a 1 GiB
    PUT then pays over a thousand ``brk`` calls and re-faults every page it
    gets back, about a quarter of its CPU.  Returns the (mmap, trim)
    thresholds set, or None where the C library is not glibc.  Only for the
    daemon's own processes: an application embedding hmacfs owns its malloc.
    """
    mmap_threshold = min(max(4 * buffer_size, 1024**2), 32 * 1024**2)
    trim_threshold = 4 * mmap_threshold
    if libc is None:
        if platform.libc_ver()[0] != "glibc":
            return None
        libc = ctypes.CDLL(None)
    if not (
        libc.mallopt(_M_MMAP_THRESHOLD, mmap_threshold)
        and libc.mallopt(_M_TRIM_THRESHOLD, trim_threshold)
    ):
        log.warn("mallopt refused the heap thresholds; keeping the C library's defaults")
        return None
    return mmap_threshold, trim_threshold


def makeService(options: Options) -> MultiService:
    """twistd entry point."""
    tune_allocator(options.config_obj.buffer_size)
    return make_service_from_config(options.config_obj, config_path=options["config"])


__all__ = ["Options", "makeService", "make_service_from_config", "build_site", "tune_allocator"]
