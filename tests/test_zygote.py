"""
The zygote (hmacfs.service.zygote) and the supervisor's restart policy.

The zygote's loop runs in a child interpreter here (trial's own process has a
reactor and threads, which is exactly what the zygote refuses to fork from);
its workers are stubs.  tests/test_workers.py runs the real daemon.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.trial.unittest import SynchronousTestCase

from hmacfs.service.workers import MAX_RESTART_DELAY, WorkerSupervisor, ZygoteControl
from hmacfs.service.zygote import status_text

ROOT = Path(__file__).resolve().parent.parent


def run_python(script: str, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=str(ROOT))


_FORK_SAFETY = """
import json, sys, threading
from hmacfs.service.zygote import ForkRefused, Zygote, assert_fork_safe
import socket
results = {}
def refused():
    try:
        assert_fork_safe()
    except ForkRefused as refusal:
        return str(refusal)
    return None
results["alone"] = refused()
stop = threading.Event()
thread = threading.Thread(target=stop.wait)
thread.start()
results["thread"] = refused()
ours, theirs = socket.socketpair()
zygote = Zygote(theirs, "unused.toml")
zygote.listen_fd = ours.fileno()
try:
    zygote.fork(0)
    results["zygote_fork"] = None
except ForkRefused as refusal:
    results["zygote_fork"] = str(refusal)
results["forks"] = zygote._forks
stop.set()
thread.join()
# join() returns when Python is done with the thread; the kernel's task can linger a
# moment longer (it is still a thread, and forking would still be refused): wait for it.
import time
from hmacfs.service.zygote import thread_count
deadline = time.monotonic() + 5
while thread_count() != 1 and time.monotonic() < deadline:
    time.sleep(0.005)
results["joined"] = refused()
import twisted.internet.reactor
results["reactor"] = refused()
print(json.dumps(results))
"""


class ForkSafetyTests(SynchronousTestCase):
    def test_refuses_with_a_thread_or_a_reactor(self) -> None:
        """
        assert_fork_safe passes in a process with one thread and no reactor, and
        refuses (naming why) while a second thread runs or once a reactor is
        installed; the zygote's fork refuses too, and forks no child.
        """
        result = run_python(_FORK_SAFETY)
        self.assertEqual(result.returncode, 0, result.stderr)
        found: dict[str, Any] = json.loads(result.stdout.strip().splitlines()[-1])
        self.assertIsNone(found["alone"])
        self.assertIn("2 threads", found["thread"])
        self.assertIn("2 threads", found["zygote_fork"])
        self.assertEqual(found["forks"], 0)
        self.assertIsNone(found["joined"])
        self.assertIn("reactor", found["reactor"])


# A zygote on the control socket argv[2] whose "workers" record their stdin (the secrets line) and
# wait for a signal; argv[1] is where they write.
_ZYGOTE = """
import os, signal, socket, sys
from hmacfs.service.zygote import Zygote
out = sys.argv[1]
def stub(config_path, fd, family, index):
    from hmacfs.service.worker_process import die_with_parent
    die_with_parent()
    data = b""
    while not data.endswith(b"\\n"):
        data += os.read(0, 4096)
    with open(os.path.join(out, f"{index}-{os.getpid()}"), "wb") as f:
        f.write(data + f"{config_path} {family} {os.fstat(fd).st_mode}".encode())
    signal.pause()
    return 0
sys.exit(Zygote(socket.socket(fileno=int(sys.argv[2])), "the.toml", run_worker=stub).run())
"""


class ZygoteLoopTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.out = Path(self.mktemp()).resolve()
        self.out.mkdir(parents=True)
        ours, theirs = socket.socketpair()
        self.control = ours
        self.addCleanup(ours.close)
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
        self.process = subprocess.Popen(
            [sys.executable, "-c", _ZYGOTE, str(self.out), str(theirs.fileno())], env=env,
            cwd=str(ROOT), pass_fds=(theirs.fileno(),),
        )
        theirs.close()
        self.addCleanup(self.kill)
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen()
        self.addCleanup(self.listener.close)
        self.buffer = b""

    def kill(self) -> None:
        """End of file first (the zygote ends its workers), SIGKILL only if that failed."""
        try:
            self.control.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        try:
            self.process.wait(15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(10)

    def send(self, message: dict[str, Any], fds: list[int] | None = None) -> None:
        socket.send_fds(self.control, [json.dumps(message).encode() + b"\n"], fds or [])

    def hello(self, split: bool = False) -> None:
        umask = os.umask(0)
        os.umask(umask)
        line = json.dumps({"hello": {
            "uid": list(os.getresuid()), "gid": list(os.getresgid()), "groups": os.getgroups(),
            "cwd": str(self.out), "umask": umask, "family": int(socket.AF_INET), "drain_timeout": 1,
        }}).encode() + b"\n"
        if not split:
            socket.send_fds(self.control, [line], [self.listener.fileno()])
            return
        # The descriptor rides on the first bytes; the line ends in a later read.
        socket.send_fds(self.control, [line[:10]], [self.listener.fileno()])
        time.sleep(0.2)
        self.control.sendall(line[10:])

    def report(self, timeout: float = 20) -> dict[str, Any]:
        self.control.settimeout(timeout)
        while b"\n" not in self.buffer:
            data = self.control.recv(4096)
            self.assertTrue(data, "the zygote closed its control socket")
            self.buffer += data
        line, self.buffer = self.buffer.split(b"\n", 1)
        found: dict[str, Any] = json.loads(line)
        return found

    def parent_of(self, pid: int) -> int:
        with open(f"/proc/{pid}/stat") as handle:
            return int(handle.read().rsplit(")", 1)[1].split()[1])

    def test_forks_on_request_single_threaded(self) -> None:
        """
        Each "fork" starts one worker, a child of the zygote, forked with one
        thread; it gets the secrets line on its stdin and the listening socket.
        """
        self.hello()
        self.send({"secrets": {"current": "s1"}})
        self.send({"fork": 0})
        self.send({"fork": 1})
        reports = [self.report(), self.report()]
        self.assertEqual(sorted(r["forked"] for r in reports), [0, 1])
        self.assertEqual([r["threads"] for r in reports], [1, 1])
        for r in reports:
            self.assertEqual(self.parent_of(r["pid"]), self.process.pid)
        self.assertEqual(len(os.listdir(f"/proc/{self.process.pid}/task")), 1)
        deadline = time.monotonic() + 20
        while len(list(self.out.iterdir())) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        for r in reports:
            written = (self.out / f"{r['forked']}-{r['pid']}").read_bytes()
            line, rest = written.split(b"\n", 1)
            self.assertEqual(json.loads(line), {"secrets": {"current": "s1"}})
            path, family, mode = rest.decode().split()
            self.assertEqual((path, int(family)), ("the.toml", socket.AF_INET))
            self.assertTrue(int(mode) & 0o140000 == 0o140000, mode)  # a socket

    def test_signal_to_a_new_worker_is_its_own(self) -> None:
        """
        SIGTERM sent to a worker the moment it is forked ends that worker, never
        the zygote (whose handlers the child had for an instant): it forks on.
        """
        self.hello()
        for _ in range(5):
            self.send({"fork": 0})
            pid = self.report()["pid"]
            os.kill(pid, signal.SIGTERM)
            self.assertEqual(self.report(), {"ended": 0, "pid": pid,
                                             "status": "killed by signal 15 (SIGTERM)"})
        self.send({"fork": 1})
        self.assertEqual(self.report()["forked"], 1)

    def test_hello_split_across_reads(self) -> None:
        """The listening socket arrives with the hello's first bytes, whatever read ends the line."""
        self.hello(split=True)
        self.send({"fork": 0})
        self.assertEqual(self.report()["forked"], 0)

    def test_reports_a_killed_worker_and_reforks(self) -> None:
        """A worker killed with SIGKILL is reported ended with its status; a new fork replaces it."""
        self.hello()
        self.send({"fork": 0})
        first = self.report()
        os.kill(first["pid"], signal.SIGKILL)
        ended = self.report()
        self.assertEqual(ended, {"ended": 0, "pid": first["pid"], "status": "killed by signal 9 (SIGKILL)"})
        self.send({"fork": 0})
        second = self.report()
        self.assertEqual((second["forked"], second["threads"]), (0, 1))
        self.assertNotEqual(second["pid"], first["pid"])
        self.assertEqual(self.parent_of(second["pid"]), self.process.pid)

    def test_signal_then_end_of_file(self) -> None:
        """"signal" reaches every worker; end of file makes the zygote exit once they are gone."""
        self.hello()
        self.send({"fork": 0})
        self.send({"fork": 1})
        pids = {self.report()["pid"], self.report()["pid"]}
        self.send({"signal": int(signal.SIGTERM)})
        ended = [self.report(), self.report()]
        self.assertEqual({e["pid"] for e in ended}, pids)
        self.assertEqual({e["status"] for e in ended}, {"killed by signal 15 (SIGTERM)"})
        self.control.shutdown(socket.SHUT_WR)
        self.assertEqual(self.process.wait(20), 0)

    def test_end_of_file_terminates_workers(self) -> None:
        """The supervisor gone (end of file): the zygote sends SIGTERM to its workers and exits."""
        self.hello()
        self.send({"fork": 0})
        pid = self.report()["pid"]
        self.control.shutdown(socket.SHUT_WR)
        self.assertEqual(self.process.wait(20), 0)
        self.assertFalse(os.path.exists(f"/proc/{pid}"))


class StatusTextTests(SynchronousTestCase):
    def test_exit_code_and_signal(self) -> None:
        self.assertEqual(status_text(1 << 8), "exit code 1")
        self.assertEqual(status_text(signal.SIGKILL), "killed by signal 9 (SIGKILL)")


class RestartPolicyTests(SynchronousTestCase):
    """The supervisor's side: what it asks of the zygote when workers start and end."""

    def supervisor(self) -> tuple[WorkerSupervisor, MemoryReactorClock, StringTransport]:
        reactor = MemoryReactorClock()
        supervisor = WorkerSupervisor(
            reactor=reactor, listen="tcp:0", count=2, config_path="c.toml", drain_timeout=5.0,
            secret_state=lambda: {"current": "x"},
        )
        control = ZygoteControl(supervisor)
        transport = StringTransport()
        control.makeConnection(transport)
        supervisor.control = control
        return supervisor, reactor, transport

    def sent(self, transport: StringTransport) -> list[dict[str, Any]]:
        lines = transport.value().splitlines()
        transport.clear()
        return [json.loads(line) for line in lines]

    def report(self, supervisor: WorkerSupervisor, event: dict[str, Any]) -> None:
        assert supervisor.control is not None
        supervisor.control.dataReceived(json.dumps(event).encode() + b"\n")

    def test_fork_asked_once_until_reported(self) -> None:
        """A second fork of an index the zygote has not reported yet is not sent."""
        supervisor, _reactor, transport = self.supervisor()
        supervisor.fork(0)
        supervisor.fork(0)
        self.assertEqual(self.sent(transport), [{"fork": 0}])
        self.report(supervisor, {"forked": 0, "pid": 100, "threads": 1})
        supervisor.fork(0)
        self.assertEqual(self.sent(transport), [])
        self.assertEqual(supervisor.workers[0].pid, 100)

    def test_dead_worker_refork_with_backoff(self) -> None:
        """A worker that ends is forked again after 0.5 s, later each time it dies young."""
        supervisor, reactor, transport = self.supervisor()
        supervisor.fork(1)
        delays = []
        for pid in range(200, 206):
            self.report(supervisor, {"forked": 1, "pid": pid, "threads": 1})
            self.sent(transport)
            self.report(supervisor, {"ended": 1, "pid": pid, "status": "exit code 1"})
            waited = 0.0
            while not transport.value():
                reactor.advance(0.25)
                waited += 0.25
            delays.append(waited)
            self.assertEqual(self.sent(transport), [{"fork": 1}])
        self.assertEqual(delays, [1.0, 2.0, 4.0, 8.0, 16.0, MAX_RESTART_DELAY])

    def test_ended_report_of_an_older_pid_is_ignored(self) -> None:
        """An "ended" for a pid that is not the index's current worker changes nothing."""
        supervisor, reactor, transport = self.supervisor()
        self.report(supervisor, {"forked": 0, "pid": 300, "threads": 1})
        self.report(supervisor, {"ended": 0, "pid": 299, "status": "exit code 0"})
        reactor.advance(60)
        self.assertEqual(supervisor.workers[0].pid, 300)
        self.assertEqual(self.sent(transport), [])

    def test_no_restart_while_stopping(self) -> None:
        """stopService sends SIGTERM to the workers and forks none of them again."""
        supervisor, reactor, transport = self.supervisor()
        self.report(supervisor, {"forked": 0, "pid": 400, "threads": 1})
        supervisor.running = True
        stopped = supervisor.stopService()
        self.assertEqual(self.sent(transport), [{"signal": int(signal.SIGTERM)}])
        self.report(supervisor, {"ended": 0, "pid": 400, "status": "killed by signal 15 (SIGTERM)"})
        reactor.advance(60)
        self.assertEqual(self.sent(transport), [])
        self.assertTrue(transport.disconnecting)
        self.successResultOf(stopped)
