# -*- test-case-name: tests.test_tap -*-
"""
``twistd hmacfs``: the options, and the daemon's start.

``Options.postOptions`` and ``makeService`` are where the daemon's process
begins, so they are the one place (with ``hmacfs.tac`` and the worker's
``main``) that sets process-wide state (L{hmacfs.service.process}); the
service tree itself comes from L{hmacfs.service.assembly}, which an embedding
application uses too.  This module imports the rest of hmacfs only once the
options have decided whether the process needs TLS (L{leave_out_tls}).
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from twisted.logger import Logger
from twisted.python import usage

from hmacfs.logs import log_router
from hmacfs.service.process import leave_out_tls

if TYPE_CHECKING:
    from twisted.application.service import MultiService

    from hmacfs.config import Config

log = Logger(observer=log_router)


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
        # Before hmacfs.config, which imports Twisted's endpoints (and with them
        # pyOpenSSL, when TLS is not left out).
        leave_out_tls(path)
        from hmacfs.config import ConfigError, load_config

        try:
            config, warnings = load_config(path)
        except ConfigError as error:
            raise usage.UsageError(str(error)) from None
        for warning in warnings:
            log.warn("config {path}: {problem}", path=path, problem=warning)
        if config.storage_backend == "s3":
            # Before anything listens: a missing bucket or refused credentials stop the
            # daemon here, naming the key, instead of answering 503s later.
            from hmacfs.service.storage import check_storage
            from hmacfs.storage.s3.startup import S3StartupError

            try:
                check_storage(config)
            except S3StartupError as error:
                raise usage.UsageError(str(error)) from None
        self["config"] = path
        self.config_obj = config


def daemon_service(
    config: Config, config_path: str, reactor: Any = None, *, prefork: bool = False
) -> MultiService:
    """
    The daemon's process: tune the allocator, enter prometheus-client's
    multiprocess mode when this process will run workers and count metrics
    (before any metric exists; undone when the tree stops), then assemble.

    With workers and ``prefork`` (twistd in the foreground: L{can_prefork}),
    fork the zygote here, after the imports and before anything installs the
    reactor, so that the workers share this process's pages
    (L{hmacfs.service.zygote}); otherwise the supervisor starts one.
    """
    from hmacfs.service.assembly import assemble, supervises
    from hmacfs.service.process import MultiprocessMetrics, tune_allocator

    tune_allocator(config.buffer_size)
    multiprocess = None
    if config.metrics_enabled and supervises(config, config_path):
        multiprocess = MultiprocessMetrics.enable()
    zygote = None
    if prefork and reactor is None and supervises(config, config_path):
        from hmacfs.service.zygote import ForkRefused, fork_zygote

        try:
            zygote = fork_zygote(config_path)
        except ForkRefused as refusal:
            log.warn("the zygote will be a process of its own: {why}", why=str(refusal))
    return assemble(config, reactor, config_path, multiprocess=multiprocess, zygote=zygote).service


def can_prefork(options: Options) -> bool:
    """
    Whether twistd's process may fork the zygote in ``makeService``: twistd
    parsed these options (tests that build Options alone never fork) and
    stays in the foreground without a chroot (daemon mode forks this process
    away, and a chroot comes after ``makeService``).  Its later uid, gid,
    directory and umask the zygote takes over from the supervisor's hello.
    """
    parent = getattr(options, "parent", None)
    if parent is None:
        return False
    try:
        return bool(parent["nodaemon"]) and parent["chroot"] is None
    except KeyError:
        return False


def makeService(options: Options) -> MultiService:
    """twistd entry point."""
    return daemon_service(options.config_obj, options["config"], prefork=can_prefork(options))


__all__ = ["Options", "can_prefork", "daemon_service", "makeService"]
