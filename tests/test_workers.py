"""
SLOW SUITE: NumCores worker processes behind one socket, with the real daemon.
"""

from __future__ import annotations

import os
import re
import signal
import urllib.request
import uuid
from collections.abc import Callable

from twisted.trial.unittest import SynchronousTestCase

from hmacfs.testing import free_port, v1_mac, wait_for
from tests.test_integration import Daemon, require_curl


def processes() -> dict[int, tuple[int, str]]:
    """Every process: pid -> (parent pid, name as in /proc/PID/comm)."""
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as handle:
                head, tail = handle.read().rsplit(")", 1)
            found[int(entry)] = (int(tail.split()[1]), head.split("(", 1)[1])
        except (OSError, IndexError, ValueError):
            continue
    return found


def descendants(pid: int, table: dict[int, tuple[int, str]] | None = None) -> list[int]:
    """All processes below ``pid`` (its children, theirs, ...)."""
    table = processes() if table is None else table
    below = [child for child, (parent, _name) in table.items() if parent == pid]
    return below + [grandchild for child in below for grandchild in descendants(child, table)]


def children(pid: int) -> list[int]:
    """The worker processes of a supervisor: the processes below it named hmacfs-worker-N
    (the zygote forks them, and names them so)."""
    table = processes()
    return sorted(p for p in descendants(pid, table) if table[p][1].startswith("hmacfs-worker"))


def zygotes(pid: int) -> list[int]:
    """The supervisor's zygote (hmacfs.service.zygote): the one process that forks workers."""
    table = processes()
    return sorted(p for p in descendants(pid, table) if table[p][1] == "hmacfs-zygote")


def gone(pid: int) -> Callable[[], bool]:
    """A wait_for predicate: process ``pid`` has exited (its /proc entry is gone)."""
    return lambda: not os.path.exists(f"/proc/{pid}")



class WorkerTests(SynchronousTestCase):
    def start(self, extra: str = "", unix: bool = False) -> Daemon:
        require_curl()
        daemon = Daemon(extra='NumCores = 2\n' + extra, unix=unix)
        self.addCleanup(daemon.stop)
        self.assertTrue(wait_for(lambda: len(children(daemon.process.pid)) == 2), daemon.log_tail())
        return daemon

    def put(self, daemon: Daemon, body: bytes = b"hello") -> int:
        slot = f"{uuid.uuid4()}/w.txt"
        url = f"{daemon.base()}/{slot}?v={v1_mac(slot, len(body))}"
        result = daemon.curl("-X", "PUT", "--data-binary", body.decode(), "-o", "/dev/null",
                             "-w", "%{http_code}", url)
        return int(result.stdout)

    def test_two_workers_serve(self) -> None:
        """NumCores = 2 starts two worker processes that both serve uploads."""
        daemon = self.start()
        statuses = [self.put(daemon) for _ in range(20)]
        self.assertEqual(statuses, [201] * 20)
        self.assertEqual(len(list(daemon.store.glob("*/w.txt"))), 20)

    def test_dead_worker_is_restarted(self) -> None:
        """A worker killed with SIGKILL is replaced and service continues."""
        daemon = self.start()
        before = children(daemon.process.pid)
        os.kill(before[0], signal.SIGKILL)
        self.assertTrue(
            wait_for(lambda: len(children(daemon.process.pid)) == 2 and children(daemon.process.pid) != before),
            daemon.log_tail(),
        )
        daemon.wait_listening()
        self.assertEqual([self.put(daemon) for _ in range(6)], [201] * 6)
        self.assertIn("restarting", daemon.log_tail())

    def test_every_fork_single_threaded(self) -> None:
        """
        The zygote is forked from twistd's process before its reactor (it runs
        twistd's code: the same command line, no exec) and every worker, the
        replacement of a killed one too, is forked by the zygote while it has
        one thread: each fork is logged with the thread count the process had,
        and the zygote never runs a second thread.
        """
        daemon = self.start()
        supervisor = daemon.process.pid
        [zygote] = zygotes(supervisor)
        self.assertEqual(processes()[zygote][0], supervisor)
        with open(f"/proc/{zygote}/cmdline", "rb") as a, open(f"/proc/{supervisor}/cmdline", "rb") as b:
            self.assertEqual(a.read(), b.read())
        before = children(supervisor)
        os.kill(before[0], signal.SIGKILL)
        self.assertTrue(
            wait_for(lambda: len(children(supervisor)) == 2 and children(supervisor) != before),
            daemon.log_tail(),
        )
        log = (daemon.dir / "hmacfs.log").read_text()
        self.assertEqual(
            re.findall(r"the zygote \(pid (\d+)\) was forked from this process with (\d+) thread", log),
            [(str(zygote), "1")],
        )
        self.assertTrue(
            wait_for(lambda: len(re.findall(r"forked by the zygote with",
                                            (daemon.dir / "hmacfs.log").read_text())) == 3),
            daemon.log_tail(),
        )
        log = (daemon.dir / "hmacfs.log").read_text()
        self.assertEqual(re.findall(r"forked by the zygote with (\d+) thread", log), ["1", "1", "1"])
        self.assertEqual(len(os.listdir(f"/proc/{zygote}/task")), 1)
        self.assertNotIn("a process of its own", log + daemon.log_tail())

    def test_killed_workers_reforked_by_the_zygote(self) -> None:
        """Each worker killed with SIGKILL, one after the other, is replaced by a fork of the same zygote."""
        daemon = self.start()
        supervisor = daemon.process.pid
        [zygote] = zygotes(supervisor)
        original = children(supervisor)
        for victim in original:
            os.kill(victim, signal.SIGKILL)
            self.assertTrue(wait_for(gone(victim), 10), victim)
            self.assertTrue(wait_for(lambda: len(children(supervisor)) == 2, 20), daemon.log_tail())
        replaced = children(supervisor)
        self.assertEqual(set(replaced) & set(original), set())
        self.assertEqual([processes()[pid][0] for pid in replaced], [zygote, zygote])
        self.assertEqual(zygotes(supervisor), [zygote])
        daemon.wait_listening()
        self.assertEqual([self.put(daemon) for _ in range(6)], [201] * 6)
        self.assertEqual(daemon.log_tail().count("killed by signal 9 (SIGKILL)"), 2)

    def test_dead_zygote_replaced(self) -> None:
        """
        A zygote killed with SIGKILL takes its workers with it (they drain and
        exit); the supervisor starts a new zygote (python -m hmacfs.service.zygote)
        whose workers serve.
        """
        daemon = self.start()
        supervisor = daemon.process.pid
        [zygote] = zygotes(supervisor)
        old_workers = children(supervisor)
        os.kill(zygote, signal.SIGKILL)
        for pid in old_workers:
            self.assertTrue(wait_for(gone(pid), 20), pid)

        def replaced() -> bool:
            found = zygotes(supervisor)
            return len(found) == 1 and found != [zygote] and len(children(supervisor)) == 2

        self.assertTrue(wait_for(replaced, 30), daemon.log_tail())
        [new] = zygotes(supervisor)
        with open(f"/proc/{new}/cmdline", "rb") as handle:
            self.assertIn(b"hmacfs.service.zygote", handle.read())
        daemon.wait_listening()
        self.assertEqual([self.put(daemon) for _ in range(6)], [201] * 6)
        self.assertIn("the zygote process ended", daemon.log_tail())

    def test_metrics_summed_over_workers(self) -> None:
        """The metrics listener reports the sum over all workers."""
        port = free_port()
        daemon = self.start(f'MetricsEnabled = true\nMetricsPort = "127.0.0.1:{port}"\n')
        count = 16
        self.assertEqual([self.put(daemon) for _ in range(count)], [201] * count)
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
        match = re.search(r"^hmac_file_server_uploads_total ([0-9.e+]+)$", text, re.MULTILINE)
        self.assertIsNotNone(match, text[:2000])
        assert match is not None
        self.assertEqual(float(match.group(1)), count)

    def test_sigterm_stops_all_and_removes_socket(self) -> None:
        """SIGTERM stops the supervisor and every worker; the UNIX socket file is removed."""
        daemon = self.start(unix=True)
        workers = children(daemon.process.pid)
        daemon.process.send_signal(signal.SIGTERM)
        daemon.process.wait(30)
        for pid in workers:
            self.assertTrue(wait_for(gone(pid), 10), pid)
        self.assertFalse(daemon.socket.exists())

    def test_workers_die_with_a_killed_supervisor(self) -> None:
        """If the supervisor is killed outright, its workers do not linger as orphans."""
        daemon = self.start()
        workers = children(daemon.process.pid)
        daemon.process.kill()
        daemon.process.wait(10)
        for pid in workers:
            self.assertTrue(wait_for(gone(pid), 15), pid)


class SharedBanTests(SynchronousTestCase):
    def test_ban_visible_from_every_worker_with_redis(self) -> None:
        """With RedisAddr, failures counted by any worker block the client on all of them."""
        from tests.redis_server import RedisServer

        redis = RedisServer().start()
        self.addCleanup(redis.stop)
        require_curl()
        daemon = Daemon(extra=f'NumCores = 2\nRedisAddr = "{redis.addr}"\nBlockAfterFails = 3\n')
        self.addCleanup(daemon.stop)
        self.assertTrue(wait_for(lambda: len(children(daemon.process.pid)) == 2), daemon.log_tail())
        # Failures are shared once a process is connected to Redis (before that,
        # and during an outage, each process counts alone): wait for the two
        # workers and the supervisor to connect.
        log_path = daemon.dir / "hmacfs.log"
        self.assertTrue(
            wait_for(lambda: log_path.read_text().count("upload state: Redis at") >= 3, 20),
            daemon.log_tail(),
        )

        def put(mac: str | None) -> bytes:
            slot = f"{uuid.uuid4()}/b.txt"
            mac = mac or v1_mac(slot, 1)
            return daemon.curl("-X", "PUT", "--data-binary", "x", "-o", "/dev/null", "-w", "%{http_code}",
                               f"{daemon.base()}/{slot}?v={mac}").stdout

        for _ in range(3):
            self.assertIn(put("0" * 64), (b"403", b"429"))
        # Correctly signed uploads from now on: a worker that did not learn of the
        # block would store them (201), since they add no failures of their own.
        self.assertTrue(wait_for(lambda: [put(None) for _ in range(8)] == [b"429"] * 8, 10),
                        daemon.log_tail())
        # The block lives in Redis, with BlockDuration as its expiry.
        import socket as socketlib

        with socketlib.create_connection(("127.0.0.1", redis.port), timeout=5) as sock:
            sock.sendall(b"PTTL hmacfs:ban:127.0.0.1\r\n")
            reply = sock.recv(100)
        self.assertTrue(reply.startswith(b":"), reply)
        self.assertGreater(int(reply[1:].strip()), 200_000)
