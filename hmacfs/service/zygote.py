# -*- test-case-name: tests.test_zygote -*-
"""
The zygote: the one process that forks the workers (NumCores > 1).

Workers forked from a process that has imported hmacfs share those pages with
it (about 25 MiB of module objects each) instead of importing everything
again.  A fork is only safe from a process that runs one thread (a lock held
by another thread at that moment would stay held forever in the child) and
has no reactor (the child needs its own: an inherited epoll set is shared
with the parent).  The zygote is such a process for its whole life, so the
first workers and every restarted one are forked from the same clean state:
it runs a plain ``select`` loop, never a thread or a reactor, and checks both
before each fork (L{assert_fork_safe}).

twistd's process forks the zygote in ``makeService``, after the imports and
before its reactor exists (L{fork_zygote}), so the supervisor, the zygote and
the workers share their pages; where that cannot be done (twistd's daemon
mode, a .tac file, a zygote that died) the supervisor starts one as
``python -m hmacfs.service.zygote --config FILE --control-fd 3`` instead,
which imports on its own and shares with the workers only.

The zygote obeys its control socket, JSON lines from the supervisor
(L{hmacfs.service.workers}): ``hello`` (the listening socket, passed as
SCM_RIGHTS, and the credentials, directory and umask twistd set up after the
fork), ``secrets`` (for every worker, and each new one, on its stdin),
``fork`` (start worker N) and ``signal`` (to every worker).  It answers with
``forked`` and ``ended`` lines; the restart policy and the logging stay in
the supervisor.  End of file on the control socket, SIGTERM or SIGINT: it
sends SIGTERM to every worker, waits for them (SIGKILL after the drain
timeout and 10 s more) and exits.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import select
import signal
import socket
import sys
import threading
import time
import traceback
from collections.abc import Callable
from typing import Any

import attrs

#: The name (``/proc/PID/comm``, what ``ps -o comm`` and ``pgrep`` show) of each process kind.
ZYGOTE_NAME = "hmacfs-zygote"
WORKER_NAME = "hmacfs-worker"
#: The zygote's end of the control socket in ``python -m hmacfs.service.zygote``.
CONTROL_FD = 3
#: How long the zygote waits for its workers after SIGKILL, beyond the drain timeout.
KILL_GRACE = 10.0


#: The signals the zygote handles itself (its children must not).
_HANDLED = {signal.SIGCHLD, signal.SIGTERM, signal.SIGINT, signal.SIGHUP}


class ForkRefused(RuntimeError):
    """This process cannot fork safely: another thread, or a reactor, exists."""


def thread_count() -> int:
    """Threads of this process: the kernel's count (C threads too), else Python's."""
    try:
        return len(os.listdir("/proc/self/task"))
    except OSError:  # pragma: no cover - not Linux
        return threading.active_count()


def assert_fork_safe() -> None:
    """Refuse to fork unless this process has one thread and no reactor (see the module docstring)."""
    threads = thread_count()
    if threads != 1 or threading.active_count() != 1:
        names = [t.name for t in threading.enumerate()]
        raise ForkRefused(f"refusing to fork with {threads} threads running ({names})")
    if "twisted.internet.reactor" in sys.modules:
        raise ForkRefused("refusing to fork after a reactor was installed")


def set_process_name(name: str) -> None:
    """Name this process (Linux ``prctl(PR_SET_NAME)``, 15 bytes): ``pgrep hmacfs-worker`` finds workers."""
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        PR_SET_NAME = 15
        libc.prctl(PR_SET_NAME, name.encode()[:15], 0, 0, 0)
    except (OSError, AttributeError):  # pragma: no cover - not Linux
        pass


def preload() -> None:
    """
    Import what a worker imports, so that its pages are shared from the zygote.

    Not txredisapi (it installs the default reactor when imported: a worker
    imports it once its own reactor exists), and only what the configuration
    left in (TLS: L{hmacfs.service.process.leave_out_tls}).
    """
    import twisted.internet.epollreactor  # noqa: F401  (the module only: no reactor yet)
    import twisted.internet.stdio  # noqa: F401
    import twisted.protocols.basic  # noqa: F401

    import hmacfs.service.worker  # noqa: F401
    import hmacfs.service.worker_process  # noqa: F401


def status_text(status: int) -> str:
    """A wait status for the log: ``exit code 1``, ``killed by signal 9 (SIGKILL)``."""
    code = os.waitstatus_to_exitcode(status)
    if code >= 0:
        return f"exit code {code}"
    try:
        name = signal.Signals(-code).name
    except ValueError:
        name = "?"
    return f"killed by signal {-code} ({name})"


@attrs.define(eq=False)
class ForkedWorker:
    """One worker, as the zygote knows it: its stdin (a pipe) and what is waiting to go there."""

    index: int
    pid: int
    stdin: int
    outbox: bytearray = attrs.field(factory=bytearray)


def _read_credentials(hello: dict[str, Any]) -> None:
    """Become what twistd made the supervisor after the fork (uid, gid, groups, directory, umask)."""
    uid = tuple(hello["uid"])
    gid = tuple(hello["gid"])
    if os.getresuid() != uid or os.getresgid() != gid:
        if os.geteuid() == 0:
            os.setgroups(hello["groups"])
        os.setresgid(*gid)
        os.setresuid(*uid)
    os.chdir(hello["cwd"])
    os.umask(hello["umask"])


class Zygote:
    """The select loop of the zygote process (see the module docstring)."""

    def __init__(
        self,
        control: socket.socket,
        config_path: str,
        *,
        run_worker: Callable[..., int] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.control: socket.socket | None = control
        self.config_path = config_path
        self.run_worker = run_worker or _run_worker
        self.clock = clock
        self.workers: dict[int, ForkedWorker] = {}
        self.listen_fd: int | None = None
        self.family: int = socket.AF_INET
        self.drain_timeout = 30.0
        self.secrets_line = b""
        self._buffer = b""
        #: Descriptors received (SCM_RIGHTS) that no message has taken yet.
        self._fds: list[int] = []
        self._stopping = False
        self._kill_at: float | None = None
        self._wake_r, self._wake_w = os.pipe()
        self._forks = 0

    # -- the loop ---------------------------------------------------------

    def run(self) -> int:
        """Serve until told to stop and every worker has ended; returns the exit code."""
        set_process_name(ZYGOTE_NAME)
        os.set_blocking(self._wake_w, False)
        signal.set_wakeup_fd(self._wake_w)
        for signum in _HANDLED:
            # The byte on the wakeup pipe tells the loop which signal came;
            # SIGHUP is the supervisor's to handle (it sends "signal" lines).
            signal.signal(signum, _note_signal)
        while True:
            self.reap()
            if self._stopping and not self.workers:
                return 0
            now = self.clock()
            if self._kill_at is not None and now >= self._kill_at:
                self.signal_all(signal.SIGKILL)
                self._kill_at = None
            readers = [self._wake_r] + ([self.control] if self.control is not None else [])
            writers = [w.stdin for w in self.workers.values() if w.outbox]
            timeout = None if self._kill_at is None else max(0.0, self._kill_at - now)
            if timeout is None and self.workers:
                timeout = 1.0  # a missed SIGCHLD costs at most this
            readable, writable, _ = select.select(readers, writers, [], timeout)
            if self._wake_r in readable:
                self.on_signals(os.read(self._wake_r, 512))
            if self.control is not None and self.control in readable:
                self.on_control()
            for fd in writable:
                self.flush(fd)

    def on_signals(self, data: bytes) -> None:
        for signum in set(data):
            if signum in (signal.SIGTERM, signal.SIGINT):
                self.stop()

    def stop(self) -> None:
        """Stop forking; SIGTERM every worker; SIGKILL what is left after the drain timeout."""
        if self._stopping:
            return
        self._stopping = True
        self.signal_all(signal.SIGTERM)
        self._kill_at = self.clock() + self.drain_timeout + KILL_GRACE

    def on_control(self) -> None:
        assert self.control is not None
        try:
            data, fds, _flags, _addr = socket.recv_fds(self.control, 65536, 4)
        except OSError:
            data, fds = b"", []
        if not data:
            self.control.close()
            self.control = None
            self.stop()
            return
        # A descriptor comes with the first byte of its message, which may end in a later read.
        self._fds.extend(fds)
        self._buffer += data
        while b"\n" in self._buffer:
            line, self._buffer = self._buffer.split(b"\n", 1)
            if line.strip():
                self.on_message(json.loads(line), self._fds)

    def on_message(self, message: dict[str, Any], fds: list[int]) -> None:
        if "hello" in message:
            hello = message["hello"]
            _read_credentials(hello)
            self.listen_fd = fds.pop(0)
            self.family = int(hello["family"])
            self.drain_timeout = float(hello["drain_timeout"])
        if "secrets" in message:
            self.secrets_line = json.dumps({"secrets": message["secrets"]}).encode() + b"\n"
            for worker in self.workers.values():
                worker.outbox += self.secrets_line
                self.flush(worker.stdin)
        if "fork" in message and not self._stopping:
            self.fork(int(message["fork"]))
        if "signal" in message:
            self.signal_all(int(message["signal"]))

    def report(self, event: dict[str, Any]) -> None:
        """Tell the supervisor (a gone supervisor is noticed by the loop as end of file)."""
        if self.control is None:
            return
        try:
            self.control.sendall(json.dumps(event).encode() + b"\n")
        except OSError:
            pass

    # -- workers ----------------------------------------------------------

    def fork(self, index: int) -> int:
        """Fork worker ``index``; the child never returns from here."""
        if self.listen_fd is None:
            raise ForkRefused("no listening socket yet (the supervisor's hello comes first)")
        assert_fork_safe()
        read_end, write_end = os.pipe()
        gc.collect()
        gc.freeze()
        threads = thread_count()
        # Until the child has dropped the zygote's handlers, a signal sent to it
        # would reach them (and the zygote's wakeup pipe): hold signals over the fork.
        signal.pthread_sigmask(signal.SIG_BLOCK, _HANDLED)
        try:
            pid = os.fork()
        except BaseException:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, _HANDLED)
            raise
        if pid == 0:  # pragma: no cover - the child (tests see it from outside)
            code = 1
            try:
                os.close(write_end)
                self.leave_in_child()
                # SIGHUP stays held until the worker's own handler is in (hmacfs.service.worker).
                signal.pthread_sigmask(signal.SIG_UNBLOCK, _HANDLED - {signal.SIGHUP})
                os.dup2(read_end, 0)
                os.close(read_end)
                code = self.run_worker(self.config_path, self.listen_fd, self.family, index)
            except SystemExit as exit:
                code = exit.code if isinstance(exit.code, int) else 1
            except BaseException:
                traceback.print_exc()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _HANDLED)
        os.close(read_end)
        os.set_blocking(write_end, False)
        self._forks += 1
        worker = ForkedWorker(index, pid, write_end, bytearray(self.secrets_line))
        self.workers[pid] = worker
        self.flush(write_end)
        self.report({"forked": index, "pid": pid, "threads": threads})
        return pid

    def leave_in_child(self) -> None:
        """What a forked worker must not keep of the zygote: its descriptors and signal handlers."""
        signal.set_wakeup_fd(-1)
        for signum in _HANDLED:
            signal.signal(signum, signal.SIG_DFL)
        os.close(self._wake_r)
        os.close(self._wake_w)
        if self.control is not None:
            self.control.close()
        for worker in self.workers.values():
            os.close(worker.stdin)

    def flush(self, fd: int) -> None:
        for worker in self.workers.values():
            if worker.stdin == fd and worker.outbox:
                try:
                    sent = os.write(fd, worker.outbox)
                except BlockingIOError:
                    return
                except OSError:  # the worker is gone: reap() notices
                    worker.outbox.clear()
                    return
                del worker.outbox[:sent]

    def signal_all(self, signum: int) -> None:
        for pid in list(self.workers):
            try:
                os.kill(pid, signum)
            except ProcessLookupError:  # pragma: no cover - a zombie is still there to kill
                pass

    def reap(self) -> None:
        while self.workers:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            worker = self.workers.pop(pid, None)
            if worker is None:
                continue
            os.close(worker.stdin)
            self.report({"ended": worker.index, "pid": pid, "status": status_text(status)})


def _note_signal(signum: int, frame: Any) -> None:
    """The signal's number reaches the loop through the wakeup pipe."""


def _run_worker(config_path: str, fd: int, family: int, index: int) -> int:
    set_process_name(f"{WORKER_NAME}-{index}")
    from hmacfs.service.worker import serve

    return serve(config_path, fd, family, index)


@attrs.define(eq=False)
class ForkedZygote:
    """The twistd process's side of a zygote it forked: the pid and the control socket."""

    pid: int
    control: socket.socket
    #: This process's threads when it forked (1: L{assert_fork_safe} refuses more).
    threads: int


def fork_zygote(config_path: str) -> ForkedZygote:
    """
    Fork the zygote from this process, which must not have started a thread or
    a reactor yet (twistd's ``makeService``): the zygote and, through it, the
    workers then share this process's imports.
    """
    preload()
    assert_fork_safe()
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    gc.collect()
    gc.freeze()
    threads = thread_count()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child (tests see it from outside)
        code = 1
        try:
            ours.close()
            die_with_parent()
            code = Zygote(theirs, config_path).run()
        except BaseException:
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    theirs.close()
    return ForkedZygote(pid, ours, threads)


def die_with_parent() -> None:
    from hmacfs.service.worker_process import die_with_parent as set_death_signal

    set_death_signal()


def main(argv: list[str] | None = None) -> int:
    """``python -m hmacfs.service.zygote``: a zygote the supervisor starts where it could not fork one."""
    signal.signal(signal.SIGHUP, _note_signal)
    parser = argparse.ArgumentParser(prog="hmacfs.service.zygote")
    parser.add_argument("--config", required=True)
    parser.add_argument("--control-fd", type=int, default=CONTROL_FD)
    args = parser.parse_args(argv)
    from hmacfs.service.process import leave_out_tls, tune_allocator

    # Before the imports, which bring Twisted's TLS when they may.
    leave_out_tls(args.config)
    die_with_parent()
    preload()
    from hmacfs.config import load_config

    tune_allocator(load_config(args.config)[0].buffer_size)
    control = socket.socket(fileno=args.control_fd)
    return Zygote(control, args.config).run()


if __name__ == "__main__":
    raise SystemExit(main())
