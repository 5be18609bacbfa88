# -*- test-case-name: tests.test_workers -*-
"""
One worker process's life, from the moment the zygote forked it.

L{hmacfs.service.zygote} forks each worker with the listening socket open
and a pipe from the zygote on its stdin, and calls L{serve}: it installs this
process's own reactor (the zygote never had one), reads the configuration
afresh (a worker restarted after a SIGHUP serves the new one) and serves
until SIGTERM, which stops accepting and lets uploads in flight finish within
DrainTimeout, or until its stdin ends (the zygote is gone).  SIGHUP re-reads
the configuration, like the single-process server.  Importing this module
changes nothing.
"""

from __future__ import annotations

import signal
import sys


def serve(config_path: str, fd: int, family: int, index: int) -> int:
    """Run worker ``index`` on the listening socket ``fd`` until it stops; returns the exit code."""
    # Before anything slow: a SIGHUP forwarded while this process is still
    # starting must not kill it (its default action) nor be lost: remember it and
    # reload once the services (and the real handler) are up.
    early_sighup: list[int] = []
    signal.signal(signal.SIGHUP, lambda signum, frame: early_sighup.append(signum))
    # The zygote forked this process with SIGHUP held: one sent meanwhile arrives now.
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGHUP})

    from hmacfs.service.worker_process import die_with_parent

    die_with_parent()

    # The first import of the reactor installs this process's own.
    from twisted.internet import reactor
    from twisted.logger import globalLogBeginner, textFileLogObserver

    from hmacfs.config import load_config
    from hmacfs.service.process import tune_allocator
    from hmacfs.service.worker_process import build_worker, connect_supervisor

    # discardBuffer: the events twistd's process buffered before the fork are its own.
    globalLogBeginner.beginLoggingTo(
        [textFileLogObserver(sys.stdout)], discardBuffer=True, redirectStandardIO=False
    )
    config, _warnings = load_config(config_path)
    tune_allocator(config.buffer_size)
    worker = build_worker(config, config_path, fd, family, index, reactor)

    def start() -> None:
        worker.service.startService()
        connect_supervisor(reactor, worker.messages)
        if early_sighup:
            worker.reload.reload()

    reactor.callWhenRunning(start)
    reactor.addSystemEventTrigger("before", "shutdown", worker.service.stopService)
    reactor.run()
    return 0
