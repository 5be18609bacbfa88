# -*- test-case-name: tests.test_workers -*-
"""
One worker process: ``python -m hmacfs.service.worker --config FILE --fd 3 --family inet``.

Started by ``hmacfs.service.workers.WorkerSupervisor``; serves requests on the
listening socket it inherited.  SIGHUP re-reads the configuration (like the
single-process server), SIGTERM stops accepting and lets uploads in flight
finish within DrainTimeout.  Importing this module changes nothing: ``main``
sets the process up (signals first, then the allocator) and imports the rest
(L{hmacfs.service.worker_process}) after that.
"""

from __future__ import annotations

import argparse
import signal
import sys


def main(argv: list[str] | None = None) -> int:
    # Before anything slow: a SIGHUP forwarded while this process is still
    # starting must not kill it (its default action) nor be lost: remember it and
    # reload once the services (and the real handler) are up.
    early_sighup: list[int] = []
    signal.signal(signal.SIGHUP, lambda signum, frame: early_sighup.append(signum))

    parser = argparse.ArgumentParser(prog="hmacfs.service.worker")
    parser.add_argument("--config", required=True)
    parser.add_argument("--fd", type=int, required=True)
    parser.add_argument("--family", choices=("inet", "inet6", "unix"), required=True)
    parser.add_argument("--index", type=int, default=0)
    args = parser.parse_args(argv)

    from hmacfs.service.process import leave_out_tls

    # Before the reactor and hmacfs.config, which import Twisted's TLS when they may.
    leave_out_tls(args.config)
    from hmacfs.service.worker_process import FAMILIES, die_with_parent

    die_with_parent()

    from twisted.internet import reactor
    from twisted.logger import globalLogBeginner, textFileLogObserver

    from hmacfs.config import load_config
    from hmacfs.service.process import tune_allocator
    from hmacfs.service.worker_process import build_worker, connect_supervisor

    globalLogBeginner.beginLoggingTo([textFileLogObserver(sys.stdout)], redirectStandardIO=False)
    config, _warnings = load_config(args.config)
    tune_allocator(config.buffer_size)
    worker = build_worker(config, args.config, args.fd, FAMILIES[args.family], args.index, reactor)

    def start() -> None:
        worker.service.startService()
        connect_supervisor(reactor, worker.messages)
        if early_sighup:
            worker.reload.reload()

    reactor.callWhenRunning(start)
    reactor.addSystemEventTrigger("before", "shutdown", worker.service.stopService)
    reactor.run()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
