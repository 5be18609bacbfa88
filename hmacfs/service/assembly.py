# -*- test-case-name: tests.test_tap -*-
"""
The service tree of one hmacfs process, and the typed parts its callers use.

Three shapes: the single server (it serves and sweeps), one worker (it serves
on an inherited socket; tree from L{assemble_server}), the supervisor
(NumCores > 1: it runs the workers, sweeps and serves /metrics).  Nothing
listens, opens a thread or connects before ``startService``; every part takes
the reactor, so tests pass a ``MemoryReactorClock``.  Nothing here touches
process-wide state (see L{hmacfs.service.process}).
"""

from __future__ import annotations

import signal
from typing import Any

import attrs
from twisted.application import strports
from twisted.application.service import Service

from hmacfs.config import Config
from hmacfs.http.channel import StreamingSite
from hmacfs.http.health import HealthCheck, HealthResource
from hmacfs.service.diskpool import DiskThreadPoolService
from hmacfs.service.lifecycle import DrainService, LoggingService, SequentialMultiService
from hmacfs.service.metrics import GaugeService, Metrics
from hmacfs.service.operations import add_component, add_metrics_listener, add_retention
from hmacfs.service.process import MultiprocessMetrics, UndoOnStop
from hmacfs.service.reload import ReloadService
from hmacfs.service.site import ServerParts, build_server
from hmacfs.service.storage import build_store
from hmacfs.service.workers import WorkerSupervisor
from hmacfs.service.zygote import ForkedZygote
from hmacfs.signing.rotation import SecretRing
from hmacfs.state.bans import BanSettings
from hmacfs.storage.filesystem import Store
from hmacfs.storage.retention import RetentionService, Tombstones


@attrs.define(eq=False, kw_only=True)
class ProcessTree:
    """One process's service tree (``service``) and the parts of it callers reach."""

    service: SequentialMultiService
    ring: SecretRing
    reload: ReloadService
    disk: DiskThreadPoolService
    metrics: Metrics | None
    retention: RetentionService | None = None
    component: Service | None = None


@attrs.define(eq=False, kw_only=True)
class ServerTree(ProcessTree):
    """A process that serves requests: the single server, or one worker."""

    parts: ServerParts
    listener: Service | None = None

    @property
    def site(self) -> StreamingSite:
        return self.parts.site


@attrs.define(eq=False, kw_only=True)
class SupervisorTree(ProcessTree):
    """NumCores > 1: the process that runs the workers."""

    supervisor: WorkerSupervisor
    multiprocess: MultiprocessMetrics | None = None


def supervises(config: Config, config_path: str | None) -> bool:
    """Whether this process runs workers (they need a config file to read)."""
    return config.num_cores > 1 and config_path is not None


def assemble_server(
    config: Config,
    reactor: Any,
    *,
    config_path: str | None = None,
    worker_index: int | None = None,
) -> ServerTree:
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
    parts = build_server(config, reactor, disk.run_blocking, ring, metrics, disk.run_short)
    for service in parts.resumable.services:
        service.setServiceParent(top)
    parts.ban_sync.setServiceParent(top)
    if metrics is not None:
        # The gauges read bans, body_policy and resumable: the parts have all three.
        GaugeService(reactor, metrics, parts).setServiceParent(top)
    reload = ReloadService(
        reactor=reactor,
        config=config,
        config_path=config_path,
        ring=ring,
        manage_secret=worker_index is None,
    )
    bans = parts.bans
    reload.appliers.append(lambda new: setattr(bans, "settings", BanSettings.from_config(new)))
    reload.setServiceParent(top)
    DrainService(reactor, parts.site, config.drain_timeout).setServiceParent(top)
    return ServerTree(service=top, ring=ring, reload=reload, disk=disk, metrics=metrics, parts=parts)


def assemble_single(config: Config, reactor: Any, config_path: str | None = None) -> ServerTree:
    """The single process: serve, sweep, /metrics, listen on ListenPort."""
    tree = assemble_server(config, reactor, config_path=config_path)
    top, parts = tree.service, tree.parts
    if tree.metrics is not None:
        add_metrics_listener(top, config, reactor, tree.metrics, parts.health)
    tree.retention = add_retention(
        top, config, reactor, backend=parts.backend,
        run_blocking=tree.disk.run_blocking, metrics=tree.metrics, reload=tree.reload,
        lock=parts.resumable.state_service.sweep_locks(),
    )
    # strports.service raises a bind error from privilegedStartService, so twistd
    # exits with it instead of running (and logging that it is up) without a port.
    listener = strports.service(config.listen, parts.site, reactor)
    listener.setServiceParent(top)
    tree.listener = listener
    return tree


def make_supervisor(
    config: Config, reactor: Any, config_path: str,
    multiprocess: MultiprocessMetrics | None = None,
    zygote: ForkedZygote | None = None,
) -> SupervisorTree:
    """
    NumCores > 1: workers serve; this process supervises, sweeps and serves /metrics.

    With MetricsEnabled every process writes its metrics to a shared directory:
    ``multiprocess`` is that mode, entered by the daemon's start
    (L{hmacfs.service.tap.daemon_service}) before anything here creates a metric;
    a caller that did not is given it here.  Either way it is undone when the
    tree stops.  ``zygote`` is the one the daemon's start forked, if it could
    (else the supervisor starts one).
    """
    top = SequentialMultiService()
    LoggingService(config, reactor).setServiceParent(top)
    metrics = None
    if config.metrics_enabled:
        if multiprocess is None:
            multiprocess = MultiprocessMetrics.enable()
        UndoOnStop(multiprocess.undo).setServiceParent(top)
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
        zygote=zygote,
    )
    reload = ReloadService(reactor=reactor, config=config, config_path=config_path, ring=ring)
    reload.appliers.append(lambda new: supervisor.signal_workers(signal.SIGHUP))
    reload.rotation_listeners.append(supervisor.broadcast_secrets)
    reload.setServiceParent(top)
    store = Store(
        config.store_dir,
        min_free_bytes=config.min_free_bytes,
        metadata_xattr=config.metadata_xattr,
    )
    lock = None
    if config.redis_addr:
        # The sweep lock shared with other nodes (the workers hold their own connections).
        from hmacfs.state.store import StateService

        state = StateService(
            reactor, redis_addr=config.redis_addr, redis_password=config.redis_password,
            redis_db=config.redis_db, max_retries=config.max_retries, retry_delay=config.retry_delay,
        )
        state.setServiceParent(top)
        lock = state.sweep_locks()
    tombstones = Tombstones(store.root)
    backend = build_store(config, reactor, store, disk.run_blocking, metrics, tombstones)
    if metrics is not None:
        health = HealthResource(
            HealthCheck(
                store=backend,
                clock=reactor,
                redis_connected=(lambda: state.connected) if config.redis_addr else None,
            )
        )
        add_metrics_listener(top, config, reactor, metrics, health)
    retention = add_retention(
        top, config, reactor, backend=backend,
        run_blocking=disk.run_blocking, metrics=metrics, reload=reload, lock=lock,
    )
    supervisor.setServiceParent(top)
    return SupervisorTree(
        service=top, ring=ring, reload=reload, disk=disk, metrics=metrics, retention=retention,
        supervisor=supervisor, multiprocess=multiprocess,
    )


def assemble(
    config: Config,
    reactor: Any = None,
    config_path: str | None = None,
    *,
    multiprocess: MultiprocessMetrics | None = None,
    zygote: ForkedZygote | None = None,
) -> ServerTree | SupervisorTree:
    """Assemble the hmacfs services for ``config`` (nothing starts here).

    ``config_path`` is the file SIGHUP re-reads (None when embedded).  With
    NumCores > 1 (and a config file the workers can read) this process
    supervises worker processes instead of serving requests itself.
    """
    if reactor is None:
        from twisted.internet import reactor as default_reactor

        reactor = default_reactor
    tree: ServerTree | SupervisorTree
    if config_path is not None and supervises(config, config_path):
        tree = make_supervisor(config, reactor, config_path, multiprocess, zygote)
    else:
        tree = assemble_single(config, reactor, config_path)
    tree.component = add_component(tree.service, config, reactor, tree.ring)
    return tree


def make_service_from_config(
    config: Config, reactor: Any = None, config_path: str | None = None
) -> SequentialMultiService:
    """The service tree of L{assemble}, for twistd and .tac files."""
    return assemble(config, reactor, config_path).service
