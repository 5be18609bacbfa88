# -*- test-case-name: tests.test_tap -*-
"""
The request-serving parts of one process, built from a Config: the store, the
state backend and resumable uploads, bans and tombstones, the upload policy,
the resource and the StreamingSite.

L{build_server} returns them as one typed L{ServerParts}, so the services
around the site (reload, retention, gauges, health on the metrics port) are
handed what they need instead of looking it up on the Site.
"""

from __future__ import annotations

import time
from typing import Any

import attrs
from twisted.logger import Logger

from hmacfs.config import Config
from hmacfs.http.channel import StreamingSite
from hmacfs.http.clientaddr import ClientAddressResolver, request_client
from hmacfs.http.health import HealthCheck, HealthGate, HealthResource
from hmacfs.http.resource import DownloadSettings, UploadResource
from hmacfs.logs import log_router
from hmacfs.service.storage import build_store
from hmacfs.signing.auth import Authenticator
from hmacfs.signing.rotation import SecretRing
from hmacfs.state.bans import BanList, BanSettings, BanSyncService, SharedBans, ban_check
from hmacfs.storage.filesystem import Store
from hmacfs.storage.interface import IStore
from hmacfs.storage.retention import Tombstones
from hmacfs.upload.policy import UploadLimits, UploadPolicy
from hmacfs.upload.resume import Resumable, make_resumable

access_log = Logger(namespace="hmacfs.access", observer=log_router)


@attrs.define(eq=False, kw_only=True)
class ServerParts:
    """What L{build_server} assembled around one StreamingSite."""

    site: StreamingSite
    #: the blocking store (retention, operations); everything on the request path uses ``backend``
    store: Store
    #: the one asynchronous store (``IStore``) the upload policy, resume and resources share
    backend: IStore
    ring: SecretRing
    policy: UploadPolicy
    resumable: Resumable
    bans: BanList
    ban_sync: BanSyncService
    tombstones: Tombstones
    health: HealthResource

    @property
    def body_policy(self) -> Any:
        """The site's body policy now (an embedder may have wrapped ``policy``)."""
        return self.site.body_policy


def make_access_logger(resolver: ClientAddressResolver) -> Any:
    """One line per request: client, method, path (never the query: it holds the MAC)."""

    def log_request(request: Any) -> None:
        reason = request.upload_state.reason
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


def make_upload_policy(
    config: Config,
    *,
    store: IStore,
    authenticator: Authenticator,
    reactor: Any,
    on_auth_failure: Any,
    resumable: Resumable,
) -> UploadPolicy:
    """The channel's body policy for ``config`` (the one place UploadPolicy is built)."""
    return UploadPolicy(
        limits=UploadLimits(
            prefix=config.upload_subdir,
            max_upload_size=config.max_upload_size,
            checksum_verification=config.checksum_verification,
            buffer_size=config.buffer_size,
        ),
        store=store,
        authenticator=authenticator,
        clock=reactor,
        on_auth_failure=on_auth_failure,
        uploads=resumable.uploads,
    )


def build_server(
    config: Config,
    reactor: Any,
    run_blocking: Any,
    ring: SecretRing | None = None,
    metrics: Any = None,
    run_short: Any = None,
) -> ServerParts:
    """The upload Site for a configuration and the parts behind it; ``.site`` is what
    embedding applications mount.  ``run_short``: the disk pool's ``run_short``, for the
    few jobs a request waits a moment for (default: ``run_blocking``)."""
    store = Store(
        config.store_dir,
        min_free_bytes=config.min_free_bytes,
        metadata_xattr=config.metadata_xattr,
    )
    tombstones = Tombstones(store.root)
    # Built once: the filesystem's every call on the disk pool, never on the reactor
    # thread; or the S3 bucket (StorageBackend).
    backend = build_store(config, reactor, store, run_blocking, metrics, tombstones, run_short)
    if ring is None:
        ring = SecretRing(config.secret, reactor, config.secret_grace_period)
    authenticator = Authenticator(ring.secrets, reactor, config.clock_skew)
    resolver = ClientAddressResolver(config.trusted_proxies)

    def client_of(request: Any) -> str:
        return request_client(request, resolver)

    bans = BanList(reactor, BanSettings.from_config(config))
    # Resumable uploads: state backend (embedded or Redis), registry, timers.
    resumable = make_resumable(config, reactor, backend)
    # Failures and blocks shared by every node and worker (with Redis; embedded: nothing shared).
    shared_bans = SharedBans(bans=bans, share=resumable.state_service.bans)

    def auth_failed(request: Any, reason: str) -> None:
        if metrics is not None:
            metrics.auth_failure(reason)
        address = client_of(request)
        bans.record_failure(address)
        shared_bans.failure(address)

    policy = make_upload_policy(
        config,
        store=backend,
        authenticator=authenticator,
        reactor=reactor,
        on_auth_failure=auth_failed,
        resumable=resumable,
    )
    resource = UploadResource(
        prefix=config.upload_subdir,
        store=backend,
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
            store=backend,
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
    # Bans at header time, before any other work; tombstones are the store's
    # admission's (``IStore.admit``/``resume``: 403 before the body is read).
    site.admission_checks.append(ban_check(bans, client_of))
    return ServerParts(
        site=site,
        store=store,
        backend=backend,
        ring=ring,
        policy=policy,
        resumable=resumable,
        bans=bans,
        ban_sync=BanSyncService(
            clock=reactor, bans=bans, store_dir=store.root, shared=shared_bans,
            run_blocking=run_blocking,
        ),
        tombstones=tombstones,
        health=health,
    )
