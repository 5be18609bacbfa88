# -*- test-case-name: tests.test_tap -*-
"""
The operational services around the serving parts: the metrics listener, the
retention sweeps, the XEP-0114 component.  Each is built from what it needs,
passed in, and attached to the tree it is given.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from twisted.application import strports
from twisted.application.service import MultiService, Service

from hmacfs.config import Config
from hmacfs.http.health import HealthResource
from hmacfs.service.metrics import Metrics, metrics_site
from hmacfs.service.reload import ReloadService
from hmacfs.signing.paths import PRIVATE_DIR
from hmacfs.signing.rotation import SecretRing
from hmacfs.storage.fs_backend import FilesystemBackend
from hmacfs.storage.interface import IStore
from hmacfs.storage.retention import RetentionService, RetentionSettings, Sweeper, SweepLock


def deletion_report_path(config: Config) -> Path:
    """DeletionReportFile, by default beside the log file (or in the store's state dir)."""
    if config.deletion_report_file is not None:
        return config.deletion_report_file
    if config.log_file is not None:
        return config.log_file.parent / "deletions.log"
    return config.store_dir / PRIVATE_DIR / "deletions.log"


def add_metrics_listener(
    top: MultiService, config: Config, reactor: Any, metrics: Metrics, health: HealthResource
) -> Service:
    """MetricsPort: /metrics and /healthz."""
    # strports.service: a port that cannot be bound fails twistd's start, not a log line.
    listener = strports.service(
        config.metrics_listen, metrics_site(metrics, reactor, health), reactor
    )
    listener.setServiceParent(top)
    return listener


def add_retention(
    top: MultiService, config: Config, reactor: Any, *, backend: IStore,
    run_blocking: Any, metrics: Metrics | None, reload: ReloadService, lock: SweepLock | None = None,
) -> RetentionService:
    """The retention sweeps (and the store gauges), re-configured by SIGHUP."""
    sweeper = Sweeper(
        backend,
        RetentionSettings.from_config(config),
        deletion_report_path(config),
        run_blocking=run_blocking,
        # Nodes sharing a filesystem take its flock; an object store has the Redis lock only.
        exclusive=backend.sweep_lock if isinstance(backend, FilesystemBackend) else None,
    )
    retention = RetentionService(clock=reactor, sweeper=sweeper, metrics=metrics, lock=lock)
    # Always a child, idle unless retention or metrics need sweeps: a SIGHUP
    # that turns retention on then starts it without a restart.
    retention.setServiceParent(top)
    reload.appliers.append(lambda new: retention.apply(RetentionSettings.from_config(new)))
    return retention


def add_component(
    top: MultiService, config: Config, reactor: Any, ring: SecretRing
) -> Service | None:
    """
    With ComponentJID set, log in to the XMPP server as the XEP-0114 upload
    component (once per machine: in the supervisor when there are workers),
    signing slots with the current secret of ``ring``.
    """
    if not config.component_jid:
        return None
    from hmacfs.xmpp.component import component_from_config

    component = component_from_config(config, reactor, secret=lambda: ring.current)
    component.setServiceParent(top)
    return component
