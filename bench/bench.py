#!/usr/bin/env python3
"""Loopback benchmark: hmacfs against nginx ``dav_methods PUT`` on the workloads of PERFORMANCE.md.

Run from the repository root::

    python bench/bench.py [--quick] [--server hmacfs|nginx|both] [--venv .venv]

Both servers run fresh from a temp dir on /dev/shm (tmpfs, like the reference figures), on
127.0.0.1 only; each workload is interleaved server by server, the repeated ones reported as a
median. Every stored byte that a figure depends on is checked (size and SHA-256 samples): a
server that loses data gets "FAIL", not a number. Results go to stdout as one table and to
bench-out/results.json.

Stdlib only: the load comes from curl (big bodies), wrk with bench/wrk_put.lua and
bench/wrk_get.lua (small requests) and a selectors loop in this file (slow uploads).
"""

from __future__ import annotations

import argparse
import atexit
import datetime
import hashlib
import heapq
import hmac
import http.client
import json
import os
import platform
import random
import re
import resource
import secrets
import selectors
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any, Self

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
LOOPBACK = "127.0.0.1"
KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30
CLK_TCK = os.sysconf("SC_CLK_TCK")
SMALL_FILLER = b"0123456789abcdef" * 256  # wrk_put.lua builds the same bodies
GET_FILES = 16  # distinct 64 KiB files the GET load cycles through
WRK_THREADS = max(1, min(os.cpu_count() or 2, 4))
CONCURRENT_SIZE = 16 * MiB  # the body of each of the concurrent uploads (two default S3 parts)


class BenchError(Exception):
    """A workload could not produce a trustworthy figure (the message says why)."""


class Deadline:
    """A hard time budget, so no loop or child process can run unbounded."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.end = time.monotonic() + seconds

    def remaining(self) -> float:
        left = self.end - time.monotonic()
        if left <= 0:
            raise BenchError(f"timed out (workload budget {self.seconds:.0f} s)")
        return left

    def expired(self) -> bool:
        return time.monotonic() >= self.end


# --------------------------------------------------------------------------------------------
# /proc accounting of a server's process tree (nginx master + workers, twistd + any children)


def _read_stat(pid: int) -> tuple[int, int] | None:
    """(ppid, utime+stime+cutime+cstime ticks) of one process, None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    fields = data[data.rindex(b")") + 2 :].split()
    # fields[0] is field 3 (state): ppid is field 4, utime..cstime are fields 14..17.
    return int(fields[1]), sum(int(x) for x in fields[11:15])


def tree_pids(root: int) -> list[int]:
    """The root and all its descendants, found by scanning /proc for parent links."""
    children: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        st = _read_stat(int(name))
        if st is not None:
            children.setdefault(st[0], []).append(int(name))
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo.extend(children.get(pid, ()))
    return found


def tree_cpu_seconds(root: int) -> float:
    """User+system CPU of the whole tree, including children it has already reaped."""
    ticks = 0
    for pid in tree_pids(root):
        st = _read_stat(pid)
        if st is not None:
            ticks += st[1]
    return ticks / CLK_TCK


def tree_rss_bytes(root: int) -> int:
    """Sum of VmRSS over the tree (shared pages count once per process, as `ps` shows them)."""
    total = 0
    for pid in tree_pids(root):
        try:
            with open(f"/proc/{pid}/status", "rb") as f:
                for line in f:
                    if line.startswith(b"VmRSS:"):
                        total += int(line.split()[1]) * KiB
                        break
        except OSError:
            pass
    return total


def tree_pss_bytes(root: int) -> int:
    """
    Sum of Pss over the tree, from /proc/PID/smaps_rollup: a page shared by a
    supervisor and its forked workers counts once in total, not once per process.
    """
    total = 0
    for pid in tree_pids(root):
        try:
            with open(f"/proc/{pid}/smaps_rollup", "rb") as f:
                for line in f:
                    if line.startswith(b"Pss:"):
                        total += int(line.split()[1]) * KiB
                        break
        except OSError:
            pass
    return total


class RssSampler:
    """Samples the tree's RSS (and with pss=True its PSS) every 50 ms in a thread; keeps peaks."""

    def __init__(self, root: int, interval: float = 0.05, pss: bool = False) -> None:
        self.root = root
        self.interval = interval
        self.pss = pss
        self.peak = tree_rss_bytes(root)
        self.peak_pss = tree_pss_bytes(root) if pss else 0
        self.samples = 1
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def _sample(self) -> None:
        self.peak = max(self.peak, tree_rss_bytes(self.root))
        if self.pss:
            self.peak_pss = max(self.peak_pss, tree_pss_bytes(self.root))

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()
            self.samples += 1

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._sample()


def listen_overflows() -> dict[str, int]:
    """Kernel counters of connections dropped at a full accept queue (a too small backlog)."""
    wanted = ("ListenOverflows", "ListenDrops", "SyncookiesSent", "SyncookiesFailed")
    counters: dict[str, int] = {}
    try:
        with open("/proc/net/netstat") as f:
            lines = f.read().splitlines()
    except OSError:
        return counters
    # A header line then its values line; a trailing unpaired line (none in practice) is ignored.
    for names, values in zip(lines[::2], lines[1::2], strict=False):
        if names.startswith("TcpExt:"):
            for name, value in zip(names.split()[1:], values.split()[1:], strict=True):
                if name in wanted:
                    counters[name] = int(value)
    return counters


def children_cpu_seconds() -> float:
    """CPU of reaped child processes (curl, wrk): the load generator's share of the cores."""
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def self_cpu_seconds() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


# --------------------------------------------------------------------------------------------
# Servers


def free_port() -> int:
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


def tail(path: Path, lines: int = 30) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError as e:
        return f"(no log: {e})"
    return "\n".join(text.splitlines()[-lines:]) or "(empty log)"


class Server:
    """One server under test: started in its own session so the whole tree can be stopped."""

    name = "?"

    def __init__(self, workdir: Path, secret: str, options: argparse.Namespace) -> None:
        self.workdir = workdir
        self.secret = secret
        self.options = options
        self.store = workdir / "store"
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self.start_error: str | None = None
        self.logs: list[Path] = []

    # -- subclass hooks
    def command(self) -> tuple[list[str], dict[str, str], Path]:
        raise NotImplementedError

    def stored_candidates(self, a: str, b: str) -> list[Path]:
        raise NotImplementedError

    # -- lifecycle
    def start(self, timeout: float = 30.0) -> None:
        self.stop()
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.store.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        argv, env, out = self.command()
        self.logs = [out] + [p for p in self.logs if p != out]
        with open(out, "ab") as log:
            self.proc = subprocess.Popen(
                argv,
                cwd=self.workdir,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        _STARTED.append(self)
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise BenchError(
                    f"{self.name} exited with status {self.proc.returncode} while starting:\n"
                    + self.log_tail()
                )
            try:
                with socket.create_connection((LOOPBACK, self.port), timeout=1):
                    pass
            except OSError:
                time.sleep(0.1)
                continue
            self.settle(end)
            return
        raise BenchError(
            f"{self.name} did not listen on {LOOPBACK}:{self.port} within {timeout:.0f} s:\n"
            + self.log_tail()
        )

    def settle(self, deadline: float, quiet: float = 0.02, interval: float = 0.25) -> None:
        """
        Wait until the server's process tree is idle: a listening socket does not
        mean its worker processes have finished starting, and their start-up CPU
        and memory must not be charged to the first workload.
        """
        before = tree_cpu_seconds(self.pid)
        while time.monotonic() < deadline:
            time.sleep(interval)
            now = tree_cpu_seconds(self.pid)
            if now - before < quiet:
                return
            before = now

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def stop(self) -> None:
        """SIGTERM to the server's own process group, SIGKILL after 10 s."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.poll() is None:
            for sig, wait in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
                try:
                    os.killpg(proc.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    proc.wait(timeout=wait)
                    break
                except subprocess.TimeoutExpired:
                    continue
        # Workers that outlived their master are still in its process group.
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass

    def log_tail(self, lines: int = 30) -> str:
        return "\n".join(f"--- {p.name} (last {lines} lines)\n{tail(p, lines)}" for p in self.logs)

    # -- addressing
    @property
    def base_url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}/"

    def signed_path(self, a: str, b: str, size: int) -> str:
        """Prosody v1: HMAC-SHA256(secret, "<a>/<b> <size>"), lowercase hex, as `?v=`."""
        mac = hmac.new(self.secret.encode(), f"{a}/{b} {size}".encode(), hashlib.sha256)
        return f"/upload/{a}/{b}?v={mac.hexdigest()}"

    def find_stored(self, a: str, b: str) -> Path | None:
        for path in self.stored_candidates(a, b):
            if path.is_file():
                return path
        return None


class NginxServer(Server):
    name = "nginx"

    def command(self) -> tuple[list[str], dict[str, str], Path]:
        prefix = self.workdir / "prefix"
        for sub in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"):
            (prefix / sub).mkdir(parents=True, exist_ok=True)
        template = (BENCH_DIR / "nginx.conf.template").read_text()
        values = {
            "USER_LINE": "user root;" if os.geteuid() == 0 else "# not root: no user directive",
            "WORKERS": str(self.options.nginx_workers),
            "PREFIX": str(prefix),
            "PORT": str(self.port),
            "STORE": str(self.store),
            "BODY_BUFFER": self.options.nginx_body_buffer,
        }
        conf = re.sub(r"@@([A-Z_]+)@@", lambda m: values[m.group(1)], template)
        conf_path = prefix / "nginx.conf"
        conf_path.write_text(conf)
        error_log = prefix / "error.log"
        self.logs = [error_log]
        argv = [find_tool("nginx"), "-p", str(prefix), "-c", str(conf_path), "-e", str(error_log)]
        return argv, dict(os.environ), prefix / "stderr.log"

    def stored_candidates(self, a: str, b: str) -> list[Path]:
        return [self.store / "upload" / a / b]


class HmacfsServer(Server):
    name = "hmacfs"

    def command(self) -> tuple[list[str], dict[str, str], Path]:
        twistd = venv_path(self.options) / "bin" / "twistd"
        missing = [
            str(p)
            for p in (
                twistd,
                REPO / "twisted" / "plugins" / "hmacfs_plugin.py",
                REPO / "hmacfs" / "service" / "tap.py",
            )
            if not p.exists()
        ]
        if missing:
            raise BenchError("hmacfs is not runnable yet, missing: " + ", ".join(missing))
        config = {
            "ListenPort": f"{LOOPBACK}:{self.port}",
            "Secret": self.secret,
            "StoreDir": str(self.store),
            "UploadSubDir": "upload",
            "LogLevel": "warn",
            "AccessLog": False,
            "BufferSize": 262144,
            "NumCores": self.options.hmacfs_cores,
            "MaxUploadSize": 0,
            "MinFreeBytes": 0,
            **getattr(self, "extra_config", {}),
        }
        config_path = self.workdir / "config.toml"
        config_path.write_text(
            "# written by bench/bench.py\n"
            + "".join(f"{k} = {toml_value(v)}\n" for k, v in config.items())
        )
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            [str(REPO)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
        )
        env["PYTHONUNBUFFERED"] = "1"
        argv = [str(twistd), "-n", "--pidfile=", "hmacfs", "--config", str(config_path)]
        return argv, env, self.workdir / "twistd.out"

    def stored_candidates(self, a: str, b: str) -> list[Path]:
        return [self.store / "upload" / a / b, self.store / a / b]


def venv_path(options: argparse.Namespace) -> Path:
    venv = Path(options.venv)
    return venv if venv.is_absolute() else REPO / venv


class PlainTwistedServer(Server):
    """bench/plain_twisted.py on the venv's interpreter and Twisted: the floor of hmacfs's stack."""

    name = "plain"

    def command(self) -> tuple[list[str], dict[str, str], Path]:
        python = venv_path(self.options) / "bin" / "python"
        if not python.exists():
            raise BenchError(f"plain twisted.web needs {python}")
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        # Twisted spools bodies over 100 kB to a temp file: keep it on the tmpfs too.
        env["TMPDIR"] = str(self.workdir)
        argv = [str(python), str(BENCH_DIR / "plain_twisted.py"), str(self.port), str(self.store)]
        return argv, env, self.workdir / "plain.out"

    def stored_candidates(self, a: str, b: str) -> list[Path]:
        return [self.store / a / b]


class ProsodyFilerServer(Server):
    """prosody-filer (Go), built by `make bench-peers`; it checks Prosody's v1 HMAC in ?v=."""

    name = "prosody-filer"

    def command(self) -> tuple[list[str], dict[str, str], Path]:
        binary = Path(self.options.prosody_filer)
        config_path = self.workdir / "config.toml"
        config_path.write_text(
            "# written by bench/bench.py\n"
            f"listenport = {toml_value(f'{LOOPBACK}:{self.port}')}\n"
            f"secret = {toml_value(self.secret)}\n"
            f"storeDir = {toml_value(str(self.store) + '/')}\n"
            'uploadSubDir = "upload/"\n'
        )
        # It logs every request to stderr/stdout; the log file lives on the tmpfs.
        return [str(binary), "-config", str(config_path)], dict(os.environ), self.workdir / "filer.out"

    def stored_candidates(self, a: str, b: str) -> list[Path]:
        return [self.store / a / b]


def toml_value(value: object) -> str:
    """The few TOML scalars our config needs."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    return json.dumps(str(value))  # a TOML basic string for these plain ASCII values


# --------------------------------------------------------------------------------------------
# The S3 backend: a Swift all-in-one with s3api (tests/servers/swift_saio.sh) on 127.0.0.1


SWIFT_SCRIPT = REPO / "tests" / "servers" / "swift_saio.sh"


def find_swift_python(options: argparse.Namespace) -> tuple[Path | None, str]:
    """The interpreter that runs Swift (as tests/s3_server.py finds it), or None and why not."""
    candidates = [options.swift_python] if options.swift_python else [
        os.environ.get("HMACFS_SWIFT_PYTHON") or str(REPO / ".venv-swift" / "bin" / "python")
    ]
    for candidate in candidates:
        python = Path(candidate)
        if not python.exists():
            return None, f"no Swift interpreter at {python} (make .venv-swift, or --swift-python)"
        try:
            ok = subprocess.run(
                [str(python), "-c", "import swift"], capture_output=True, timeout=60
            ).returncode == 0
        except (OSError, subprocess.TimeoutExpired) as e:
            return None, f"{python} cannot run: {e}"
        if not ok:
            return None, f"{python} cannot import swift (make .venv-swift)"
        return python, ""
    return None, "no Swift interpreter"


class SwiftS3:
    """
    One Swift all-in-one (proxy with s3api + object, container, account servers, one process
    each) under swift_saio.sh `run`: the script and the servers are one process tree, so its
    CPU and memory are measured like a server's.  Buckets are made and listed with Swift's
    with botocore on the venv's interpreter (S3_ADMIN), so the bench signs nothing itself.
    """

    def __init__(self, python: Path, workdir: Path) -> None:
        self.python = python
        self.workdir = workdir
        self.proc: subprocess.Popen[str] | None = None
        self.env: dict[str, str] = {}
        workdir.mkdir(parents=True, exist_ok=True)
        self.log = workdir / "saio.stderr"

    def start(self, timeout: float = 90.0) -> None:
        env = dict(os.environ, SAIO_PYTHON=str(self.python), SAIO_LOG_LEVEL="WARNING")
        with open(self.log, "w") as stderr:
            self.proc = subprocess.Popen(
                ["bash", str(SWIFT_SCRIPT), "run", str(self.workdir)],
                stdout=subprocess.PIPE, stderr=stderr, stdin=subprocess.DEVNULL, text=True,
                env=env, start_new_session=True,
            )
        assert self.proc.stdout is not None
        ready: list[bool] = []

        def read() -> None:  # a thread, so the deadline holds even if the script goes silent
            assert self.proc is not None and self.proc.stdout is not None
            for line in self.proc.stdout:
                key, _, value = line.strip().partition("=")
                if key.startswith("S3_"):
                    self.env[key] = value
                if line.startswith("SAIO_READY"):
                    ready.append(True)
                    return

        reader = threading.Thread(target=read, name="swift-start", daemon=True)
        reader.start()
        reader.join(timeout)
        if not ready:
            self.stop()
            raise BenchError(f"Swift did not start within {timeout:.0f} s: {tail(self.log, 10)}")

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    @property
    def endpoint(self) -> str:
        return self.env["S3_ENDPOINT"]

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> None:
        """SIGTERM to the script (it stops its servers by PID), then the group if need be."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            pass
        if proc.stdout is not None:
            proc.stdout.close()

    # -- the bucket, through botocore on the venv's interpreter (hmacfs depends on it): the
    # bench itself stays stdlib only, and SigV4 is not written again here
    def s3_admin(self, options: argparse.Namespace, op: str, bucket: str, arg: str = "") -> Any:
        python = venv_path(options) / "bin" / "python"
        env = dict(os.environ, **self.env)
        try:
            out = subprocess.run(
                [str(python), "-c", S3_ADMIN, op, bucket, arg], capture_output=True, text=True,
                timeout=120, env=env, check=False,
            )
        except subprocess.TimeoutExpired as e:
            raise BenchError(f"S3 {op} on {bucket} timed out") from e
        if out.returncode != 0:
            raise BenchError(f"S3 {op} on {bucket}: {out.stderr.strip()[-300:]}")
        return json.loads(out.stdout)


# op bucket arg: create (arg unused), list (arg = prefix; name -> size), delete (arg = key)
S3_ADMIN = """
import json, os, sys
import botocore.session
from botocore.config import Config
op, bucket, arg = sys.argv[1:4]
s3 = botocore.session.get_session().create_client(
    "s3", endpoint_url=os.environ["S3_ENDPOINT"], region_name=os.environ["S3_REGION"],
    aws_access_key_id=os.environ["S3_ACCESS_KEY"], aws_secret_access_key=os.environ["S3_SECRET_KEY"],
    config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 2}))
if op == "create":
    s3.create_bucket(Bucket=bucket)
    print("{}")
elif op == "delete":
    s3.delete_object(Bucket=bucket, Key=arg)
    print("{}")
elif op == "list":
    found, token = {}, None
    for _ in range(1000):  # pages of 1,000: at most a million objects
        kw = {"ContinuationToken": token} if token else {}
        page = s3.list_objects_v2(Bucket=bucket, Prefix=arg, **kw)
        found.update((o["Key"], o["Size"]) for o in page.get("Contents", ()))
        token = page.get("NextContinuationToken")
        if not page.get("IsTruncated") or not token:
            break
    print(json.dumps(found))
"""


class HmacfsS3Server(HmacfsServer):
    """hmacfs with StorageBackend = "s3" on the bench's Swift; files are checked in the bucket."""

    def __init__(self, workdir: Path, secret: str, options: argparse.Namespace, swift: SwiftS3,
                 bucket: str) -> None:
        super().__init__(workdir, secret, options)
        self.swift = swift
        self.bucket = bucket
        self.metrics_port = 0  # with MetricsEnabled: where s3_requests() scrapes
        self.extra_config = {
            "StorageBackend": "s3",
            "S3Endpoint": swift.endpoint,
            "S3Region": swift.env.get("S3_REGION", "us-east-1"),
            "S3Bucket": bucket,
            "S3AccessKey": swift.env["S3_ACCESS_KEY"],
            "S3SecretKey": swift.env["S3_SECRET_KEY"],
            "MaxUploadSize": 5 * GiB,
        }

    def stored_candidates(self, a: str, b: str) -> list[Path]:
        return []  # nothing on disk: BigFile.check downloads it and hashes every byte

    def object_key(self, a: str, b: str) -> str:
        return f"{a}/{b}"  # the URL's path below UploadSubDir, S3Prefix ""

    def stored_sizes(self, a: str) -> dict[str, int]:
        """file name -> size of the finished objects under upload/<a>/ in the bucket."""
        prefix = self.object_key(a, "")
        listed = self.swift.s3_admin(self.options, "list", self.bucket, prefix)
        return {k[len(prefix):]: int(v) for k, v in listed.items()}

    def remove(self, a: str, b: str) -> None:
        self.swift.s3_admin(self.options, "delete", self.bucket, self.object_key(a, b))


_STARTED: list[Server] = []

SERVER_CLASSES: dict[str, type[Server]] = {
    "hmacfs": HmacfsServer,
    "nginx": NginxServer,
    "plain": PlainTwistedServer,
    "prosody-filer": ProsodyFilerServer,
}
DEFAULT_PROSODY_FILER = REPO / "bench-out" / "peers" / "prosody-filer"


def parse_servers(options: argparse.Namespace) -> tuple[list[str], list[str]]:
    """The servers to run, in SERVER_CLASSES order, and a line for each optional one skipped."""
    spec = options.server.strip()
    optional = spec == "all"
    if spec == "all":
        names = set(SERVER_CLASSES)
    elif spec == "both":
        names = {"hmacfs", "nginx"}
    else:
        names = {n.strip() for n in spec.split(",") if n.strip()}
        unknown = names - set(SERVER_CLASSES)
        if unknown or not names:
            raise SystemExit(
                f"--server: unknown {', '.join(sorted(unknown)) or '(empty)'}; "
                f"choose from {', '.join(SERVER_CLASSES)}, all or both"
            )
    skipped = []
    binary = Path(options.prosody_filer)
    if "prosody-filer" in names and not os.access(binary, os.X_OK):
        if not optional:
            raise SystemExit(f"prosody-filer: {binary} is not built (run `make bench-peers`)")
        names.discard("prosody-filer")
        skipped.append(
            f"prosody-filer: skipped, not built ({binary} missing; `make bench-peers` builds it)"
        )
    return [n for n in SERVER_CLASSES if n in names], skipped


# --------------------------------------------------------------------------------------------
# Tools


def find_tool(name: str) -> str:
    path = shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin")
    if path is None:
        raise BenchError(f"{name} not found")
    return path


def ensure_tools(need_nginx: bool) -> None:
    """Install the Debian packages only when missing (and only as root)."""
    wanted = {"curl": "curl", "wrk": "wrk"}
    if need_nginx:
        wanted["nginx"] = "nginx"
    missing = []
    for tool, package in wanted.items():
        try:
            find_tool(tool)
        except BenchError:
            missing.append(package)
    if not missing:
        return
    if os.geteuid() != 0:
        raise SystemExit(
            f"missing {', '.join(missing)}: run `apt-get install -y {' '.join(missing)}`"
        )
    print(f"installing {' '.join(missing)} with apt-get", flush=True)
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    install = ["apt-get", "install", "-y", "--no-install-recommends", *missing]
    if subprocess.run(install, check=False, env=env, timeout=900).returncode != 0:
        subprocess.run(["apt-get", "update"], env=env, timeout=600, check=False)
        subprocess.run(install, env=env, timeout=900, check=True)


def tool_version(argv: list[str]) -> str:
    try:
        out = subprocess.run(argv, check=False, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"? ({e})"
    text = (out.stdout + out.stderr).strip().splitlines()
    return text[0] if text else "?"


# --------------------------------------------------------------------------------------------
# HTTP helpers (loopback only)


def _conn(server: Server, timeout: float) -> http.client.HTTPConnection:
    return http.client.HTTPConnection(LOOPBACK, server.port, timeout=timeout)


def http_put(server: Server, path: str, body: bytes, timeout: float = 30.0) -> int:
    conn = _conn(server, timeout)
    try:
        conn.request("PUT", path, body=body, headers={"Content-Type": "application/octet-stream"})
        resp = conn.getresponse()
        resp.read()
        return resp.status
    finally:
        conn.close()


def http_get(
    server: Server, path: str, timeout: float = 30.0, limit: int = 8 * MiB
) -> tuple[int, bytes]:
    conn = _conn(server, timeout)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, resp.read(limit)
    finally:
        conn.close()


def http_get_digest(server: Server, path: str, deadline: Deadline) -> tuple[int, int, str]:
    """Stream a (big) download and hash it: the data check when the file is not on disk."""
    conn = _conn(server, min(60.0, deadline.remaining()))
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        digest, size = hashlib.sha256(), 0
        while chunk := resp.read(4 * MiB):
            digest.update(chunk)
            size += len(chunk)
            deadline.remaining()
        return resp.status, size, digest.hexdigest()
    finally:
        conn.close()


def curl(args: list[str], deadline: Deadline) -> dict[str, float]:
    """Run curl with a machine-readable -w line; returns http_code, size and time."""
    fmt = "%{http_code} %{size_upload} %{size_download} %{time_total}"
    argv = [find_tool("curl"), "-sS", "--noproxy", "*", "-w", fmt, *args]
    try:
        out = subprocess.run(
            argv, check=False, capture_output=True, text=True, timeout=deadline.remaining()
        )
    except subprocess.TimeoutExpired as e:
        raise BenchError("curl timed out") from e
    if out.returncode != 0:
        raise BenchError(f"curl exit {out.returncode}: {out.stderr.strip()[:300]}")
    code, up, down, total = out.stdout.strip().split()[-4:]
    return {
        "code": int(code),
        "size_upload": float(up),
        "size_download": float(down),
        "time": float(total),
    }


# --------------------------------------------------------------------------------------------
# Test data


class BigFile:
    """One file of random-ish content (1 MiB of urandom, each MiB stamped with its index)."""

    def __init__(self, path: Path, size: int) -> None:
        self.path = path
        self.size = size
        block = bytearray(os.urandom(MiB))
        digest = hashlib.sha256()
        self.samples: dict[int, str] = {}
        count = size // MiB
        with open(path, "wb") as f:
            for i in range(count):
                block[:8] = i.to_bytes(8, "little")
                f.write(block)
                digest.update(block)
                if i in (0, count // 2, count - 1):
                    self.samples[i * MiB] = hashlib.sha256(block).hexdigest()
        self.sha256 = digest.hexdigest()

    def check(self, server: Server, a: str, b: str, deadline: Deadline) -> str:
        """Raise unless the server kept every byte; return how it was checked."""
        path = server.find_stored(a, b)
        if path is not None:
            size = path.stat().st_size
            if size != self.size:
                raise BenchError(f"stored {path} has {size} bytes, sent {self.size}")
            with open(path, "rb") as f:
                for offset, want in self.samples.items():
                    f.seek(offset)
                    if hashlib.sha256(f.read(MiB)).hexdigest() != want:
                        raise BenchError(f"stored {path}: SHA-256 of the MiB at {offset} differs")
            return f"on disk: size + SHA-256 of {len(self.samples)} MiB samples"
        status, size, digest = http_get_digest(server, f"/upload/{a}/{b}", deadline)
        if status != 200 or size != self.size or digest != self.sha256:
            raise BenchError(
                f"not found on disk; GET gave status {status}, {size} bytes, "
                f"sha256 {'matches' if digest == self.sha256 else 'differs'}"
            )
        return "via GET: size + full SHA-256"


def small_body(index: int, size: int) -> bytes:
    """The body wrk_put.lua sends for 1-based index `index`."""
    return b"%08d" % index + SMALL_FILLER[: size - 8]


# --------------------------------------------------------------------------------------------
# Workloads


class Bench:
    def __init__(self, options: argparse.Namespace, tmp: Path) -> None:
        self.options = options
        self.tmp = tmp
        self.token = secrets.token_hex(4)
        q = options.quick
        self.big_size = (options.big_size or (256 if q else 1024)) * MiB
        self.small_count = options.small_puts or (500 if q else 2000)
        self.get_seconds = options.get_seconds or (5 if q else 10)
        self.slow_count = options.slow_count or (100 if q else 500)
        self.slow_seconds = options.slow_seconds or (5 if q else 10)
        self.runs = options.runs or (1 if q else 3)
        self.only = {w.strip() for w in options.only.split(",") if w.strip()}
        self.big: BigFile | None = None
        self.slow_pattern = os.urandom(MiB)
        self.s3_small_count = options.s3_small_puts or (200 if q else 500)
        self.concurrent_count = options.concurrent_uploads
        self.concurrent_seconds = options.concurrent_seconds or (3 if q else 5)
        self.concurrent_pattern = os.urandom(CONCURRENT_SIZE)
        self.get_paths: dict[str, list[tuple[str, bytes]]] = {}

    # a. one big PUT with curl -T
    def put_big(
        self,
        server: Server,
        run: int,
        deadline: Deadline,
        headers: tuple[str, ...] = (),
        pss: bool = False,
    ) -> dict[str, Any]:
        assert self.big is not None
        a, b = f"big-{self.token}-{run}-{server.name}", "file.bin"
        url = f"http://{LOOPBACK}:{server.port}" + server.signed_path(a, b, self.big.size)
        rss0 = tree_rss_bytes(server.pid)
        pss0 = tree_pss_bytes(server.pid) if pss else 0
        cpu0, gen0 = tree_cpu_seconds(server.pid), children_cpu_seconds()
        swift0, s3_0 = companion_cpu(server), s3_requests(server)
        extra = [arg for header in headers for arg in ("-H", header)]
        with RssSampler(server.pid, pss=pss) as sampler:
            res = curl(
                ["-T", str(self.big.path), "-o", str(self.tmp / "put-response.txt"), *extra, url],
                deadline,
            )
        cpu1, gen1 = tree_cpu_seconds(server.pid), children_cpu_seconds()
        swift1, s3_1 = companion_cpu(server), s3_requests(server)
        if res["code"] not in (200, 201, 204):
            body = (self.tmp / "put-response.txt").read_text(errors="replace")[:300]
            raise BenchError(f"PUT status {res['code']}: {body}")
        if int(res["size_upload"]) != self.big.size:
            raise BenchError(f"curl uploaded {res['size_upload']:.0f} of {self.big.size} bytes")
        checked = self.big.check(server, a, b, deadline)
        gib = self.big.size / GiB
        more: dict[str, Any] = s3_requests_delta(s3_0, s3_1, 1)
        if pss:
            more.update(pss_before_mib=pss0 / MiB, pss_peak_mib=sampler.peak_pss / MiB,
                        pss_added_mib=(sampler.peak_pss - pss0) / MiB)
        if swift0 is not None and swift1 is not None:
            more["swift_cpu_s_per_gib"] = (swift1 - swift0) / gib
        return {
            **more,
            "mib_s": self.big.size / MiB / res["time"],
            "seconds": res["time"],
            "cpu_s_per_gib": (cpu1 - cpu0) / gib,
            "rss_before_mib": rss0 / MiB,
            "rss_peak_mib": sampler.peak / MiB,
            "rss_added_mib": (sampler.peak - rss0) / MiB,
            "rss_samples": sampler.samples,
            "client_cpu_s": gen1 - gen0,
            "status": res["code"],
            "verified": checked,
            "_stored": (a, b),
        }

    # c. the same big file back with curl -o /dev/null
    def get_big(
        self, server: Server, stored: tuple[str, str], deadline: Deadline
    ) -> dict[str, Any]:
        assert self.big is not None
        a, b = stored
        url = f"http://{LOOPBACK}:{server.port}/upload/{a}/{b}"
        cpu0, gen0 = tree_cpu_seconds(server.pid), children_cpu_seconds()
        swift0 = companion_cpu(server)
        res = curl(["-o", "/dev/null", url], deadline)
        cpu1, gen1 = tree_cpu_seconds(server.pid), children_cpu_seconds()
        swift1 = companion_cpu(server)
        if res["code"] != 200 or int(res["size_download"]) != self.big.size:
            raise BenchError(
                f"GET status {res['code']}, {res['size_download']:.0f} of {self.big.size} bytes"
            )
        more: dict[str, Any] = {}
        if swift0 is not None and swift1 is not None:
            more["swift_cpu_s_per_gib"] = (swift1 - swift0) / (self.big.size / GiB)
        return {
            **more,
            "mib_s": self.big.size / MiB / res["time"],
            "seconds": res["time"],
            "cpu_s_per_gib": (cpu1 - cpu0) / (self.big.size / GiB),
            "client_cpu_s": gen1 - gen0,
        }

    # f. memory of the freshly started, idle deployment (every process of the server's tree)
    def idle(self, server: Server, deadline: Deadline) -> dict[str, Any]:
        rss, pss = [], []
        for _ in range(5):
            deadline.remaining()
            rss.append(tree_rss_bytes(server.pid))
            pss.append(tree_pss_bytes(server.pid))
            time.sleep(0.2)
        more: dict[str, Any] = {}
        swift = getattr(server, "swift", None)
        if swift is not None and swift.alive():
            more.update(swift_rss_mib=tree_rss_bytes(swift.pid) / MiB,
                        swift_pss_mib=tree_pss_bytes(swift.pid) / MiB)
        return {
            **more,
            "rss_mib": statistics.median(rss) / MiB,
            "pss_mib": statistics.median(pss) / MiB,
            "processes": len(tree_pids(server.pid)),
        }

    # b. many 4 KiB PUTs through wrk, each signed URL used once
    def put_small(
        self, server: Server, run: int, deadline: Deadline, count: int | None = None
    ) -> dict[str, Any]:
        n, size, conns = count or self.small_count, 4 * KiB, self.options.connections
        threads = min(WRK_THREADS, conns, n)
        a = f"small-{self.token}-{run}"
        work = self.tmp / "wrk" / f"put-{server.name}-{run}"
        done_dir = work / "done"
        done_dir.mkdir(parents=True)
        paths = [server.signed_path(a, f"{i}.bin", size) for i in range(1, n + 1)]
        spec = work / "spec.lua"
        spec.write_text(
            "return {\n"
            f"  host = {lua_str(f'{LOOPBACK}:{server.port}')},\n"
            f"  threads = {threads},\n  size = {size},\n  done_dir = {lua_str(str(done_dir))},\n"
            "  paths = {\n" + "".join(f"    {lua_str(p)},\n" for p in paths) + "  },\n}\n"
        )
        cpu0, gen0 = tree_cpu_seconds(server.pid), children_cpu_seconds()
        swift0, s3_0 = companion_cpu(server), s3_requests(server)
        wall = int(min(deadline.remaining(), 600)) + 1
        summary, stderr = run_wrk(
            [
                "-t",
                str(threads),
                "-c",
                str(conns),
                "-d",
                f"{wall}s",
                "--timeout",
                "60s",
                "-s",
                str(BENCH_DIR / "wrk_put.lua"),
                server.base_url,
            ],
            spec,
            work,
            deadline,
            done_dir=done_dir,
            threads=threads,
        )
        cpu1, gen1 = tree_cpu_seconds(server.pid), children_cpu_seconds()
        swift1, s3_1 = companion_cpu(server), s3_requests(server)
        if summary.get("ok") != n or summary.get("bad"):
            raise BenchError(
                f"{summary.get('ok', 0)} of {n} PUTs succeeded, "
                f"{summary.get('bad', 0)} bad statuses (errors: connect "
                f"{summary.get('connect_errors')}, read {summary.get('read_errors')}, "
                f"write {summary.get('write_errors')}); wrk stderr: {stderr[:300]}"
            )
        seconds = (summary["last_us"] - summary["first_us"]) / 1e6
        checked = self.check_small(server, a, n, size, deadline)
        more: dict[str, Any] = s3_requests_delta(s3_0, s3_1, n)
        if swift0 is not None and swift1 is not None:
            more["swift_cpu_ms_per_req"] = (swift1 - swift0) * 1000 / n
        return {
            **more,
            "rps": n / seconds,
            "seconds": seconds,
            "p50_ms": summary["p50_us"] / 1000,
            "p90_ms": summary["p90_us"] / 1000,
            "p99_ms": summary["p99_us"] / 1000,
            "max_ms": summary["max_us"] / 1000,
            "server_cpu_s": cpu1 - cpu0,
            "cpu_ms_per_req": (cpu1 - cpu0) * 1000 / n,
            "wrk_cpu_s": gen1 - gen0,
            "verified": checked,
        }

    def check_small(self, server: Server, a: str, n: int, size: int, deadline: Deadline) -> str:
        sample = sorted({1, n, *random.sample(range(1, n + 1), min(n, 8))})
        for i in sample:
            deadline.remaining()
            status, body = http_get(
                server, f"/upload/{a}/{i}.bin", timeout=min(30, deadline.remaining())
            )
            if status != 200 or body != small_body(i, size):
                raise BenchError(
                    f"GET /upload/{a}/{i}.bin: status {status}, {len(body)} bytes, content differs"
                )
        if isinstance(server, HmacfsS3Server):
            sizes = server.stored_sizes(a)
            stored = sum(1 for i in range(1, n + 1) if sizes.get(f"{i}.bin") == size)
            if stored != n:
                raise BenchError(f"{stored} of {n} objects of {size} bytes in the bucket")
            return f"{n} objects of {size} bytes listed in the bucket, {len(sample)} samples via GET"
        where = [p.parent for p in server.stored_candidates(a, "x") if p.parent.is_dir()]
        if not where:
            return f"{len(sample)} samples via GET (store layout unknown: no file count)"
        on_disk = sum(1 for i in range(1, n + 1) if (where[0] / f"{i}.bin").is_file())
        if on_disk != n:
            raise BenchError(f"{on_disk} of {n} files in {where[0]}")
        return f"{n} files on disk, {len(sample)} samples via GET"

    # d. GET load on pre-uploaded 64 KiB files
    def prepare_get(self, server: Server, deadline: Deadline) -> None:
        files = []
        a = f"get-{self.token}"
        for i in range(GET_FILES):
            body = os.urandom(64 * KiB)
            status = http_put(
                server,
                server.signed_path(a, f"{i}.bin", len(body)),
                body,
                timeout=min(30, deadline.remaining()),
            )
            if status not in (200, 201, 204):
                raise BenchError(f"pre-upload of 64 KiB file {i}: status {status}")
            files.append((f"/upload/{a}/{i}.bin", body))
        self.get_paths[server.name] = files

    def get_small(self, server: Server, run: int, deadline: Deadline) -> dict[str, Any]:
        if server.name not in self.get_paths:
            self.prepare_get(server, deadline)
        files = self.get_paths[server.name]
        work = self.tmp / "wrk" / f"get-{server.name}-{run}"
        work.mkdir(parents=True)
        spec = work / "spec.lua"
        spec.write_text(
            "return {\n"
            f"  host = {lua_str(f'{LOOPBACK}:{server.port}')},\n"
            "  paths = {\n" + "".join(f"    {lua_str(p)},\n" for p, _ in files) + "  },\n}\n"
        )
        conns = self.options.connections
        cpu0, gen0 = tree_cpu_seconds(server.pid), children_cpu_seconds()
        summary, stderr = run_wrk(
            [
                "-t",
                str(WRK_THREADS),
                "-c",
                str(conns),
                "-d",
                f"{self.get_seconds}s",
                "--timeout",
                "10s",
                "-s",
                str(BENCH_DIR / "wrk_get.lua"),
                server.base_url,
            ],
            spec,
            work,
            deadline,
        )
        cpu1, gen1 = tree_cpu_seconds(server.pid), children_cpu_seconds()
        errors = {
            k: summary[k]
            for k in ("status_errors", "connect_errors", "read_errors", "write_errors", "timeouts")
        }
        if summary["requests"] == 0 or any(errors.values()):
            raise BenchError(
                f"{summary['requests']} requests, errors {errors}; wrk stderr: {stderr[:300]}"
            )
        if summary["bytes"] < summary["requests"] * 64 * KiB:
            raise BenchError(
                f"{summary['bytes']} bytes for {summary['requests']} responses of 64 KiB"
            )
        for path, body in files[:4]:
            status, got = http_get(server, path, timeout=min(30, deadline.remaining()))
            if status != 200 or got != body:
                raise BenchError(f"GET {path} after the load: status {status}, content differs")
        seconds = summary["duration_us"] / 1e6
        return {
            "rps": summary["requests"] / seconds,
            "mib_s": summary["bytes"] / MiB / seconds,
            "p50_ms": summary["p50_us"] / 1000,
            "p99_ms": summary["p99_us"] / 1000,
            "server_cpu_s": cpu1 - cpu0,
            "cpu_ms_per_req": (cpu1 - cpu0) * 1000 / summary["requests"],
            "wrk_cpu_s": gen1 - gen0,
            "requests": summary["requests"],
        }

    # e. many slow uploads at once
    def put_slow(self, server: Server, run: int, deadline: Deadline) -> dict[str, Any]:
        n, seconds = self.slow_count, self.slow_seconds
        a = f"slow-{self.token}-{run}"
        rss0, pss0 = tree_rss_bytes(server.pid), tree_pss_bytes(server.pid)
        cpu0, self0 = tree_cpu_seconds(server.pid), self_cpu_seconds()
        net0 = listen_overflows()
        with RssSampler(server.pid, pss=True) as sampler:
            statuses, errors, elapsed = trickle_uploads(
                server, a, n, MiB, seconds, self.slow_pattern, deadline
            )
        cpu1, self1 = tree_cpu_seconds(server.pid), self_cpu_seconds()
        net1 = listen_overflows()
        ok = sum(1 for s in statuses.values() if s in (200, 201, 204))
        result = {
            "ok": ok,
            "peak_rss_mib": sampler.peak / MiB,
            "peak_pss_mib": sampler.peak_pss / MiB,
            "rss_before_mib": rss0 / MiB,
            "pss_before_mib": pss0 / MiB,
            "rss_added_mib": (sampler.peak - rss0) / MiB,
            "seconds": elapsed,
            "server_cpu_s": cpu1 - cpu0,
            "client_cpu_s": self1 - self0,
            # Host-wide counters, but nothing else on loopback should be overflowing meanwhile.
            "listen_queue": {k: v - net0.get(k, 0) for k, v in net1.items()},
        }
        if ok != n:
            kinds: dict[str, int] = {}
            for i in range(n):
                why = errors.get(i) or f"status {statuses.get(i)}"
                if statuses.get(i) not in (200, 201, 204):
                    kinds[why] = kinds.get(why, 0) + 1
            top = ", ".join(
                f"{k} x{v}" for k, v in sorted(kinds.items(), key=lambda kv: -kv[1])[:4]
            )
            queue = ", ".join(f"{k} +{v}" for k, v in result["listen_queue"].items() if v)
            raise BenchError(
                f"{ok} of {n} slow uploads stored ({top}; kernel: {queue or 'no listen drops'})",
                result,
            )
        for i in sorted({0, n - 1, *random.sample(range(n), min(n, 4))}):
            status, body = http_get(
                server, f"/upload/{a}/{i}.bin", timeout=min(30, deadline.remaining())
            )
            want = hashlib.sha256(slow_body_piece(self.slow_pattern, i, 0, MiB)).digest()
            if status != 200 or hashlib.sha256(body).digest() != want:
                raise BenchError(
                    f"slow upload {i}: GET status {status}, {len(body)} bytes, content differs",
                    result,
                )
        result["verified"] = "all statuses 201/204, samples via GET"
        return result


    # g. many uploads of a part-sized body in flight at once (memory per in-flight upload)
    def put_concurrent(self, server: Server, deadline: Deadline) -> dict[str, Any]:
        n, size = self.concurrent_count, CONCURRENT_SIZE
        a = f"conc-{self.token}-{server.name}"
        pattern = self.concurrent_pattern
        rss0, pss0 = tree_rss_bytes(server.pid), tree_pss_bytes(server.pid)
        cpu0, swift0 = tree_cpu_seconds(server.pid), companion_cpu(server)
        s3_0 = s3_requests(server)
        with RssSampler(server.pid, pss=True) as sampler:
            statuses, errors, elapsed = trickle_uploads(
                server, a, n, size, self.concurrent_seconds, pattern, deadline
            )
        cpu1, swift1 = tree_cpu_seconds(server.pid), companion_cpu(server)
        s3_1 = s3_requests(server)
        ok = sum(1 for st in statuses.values() if st in (200, 201, 204))
        result: dict[str, Any] = {
            **s3_requests_delta(s3_0, s3_1, n),
            "ok": ok,
            "seconds": elapsed,
            "rss_before_mib": rss0 / MiB,
            "pss_before_mib": pss0 / MiB,
            "peak_rss_mib": sampler.peak / MiB,
            "peak_pss_mib": sampler.peak_pss / MiB,
            "rss_per_upload_mib": (sampler.peak - rss0) / n / MiB,
            "pss_per_upload_mib": (sampler.peak_pss - pss0) / n / MiB,
            "server_cpu_s": cpu1 - cpu0,
        }
        if swift0 is not None and swift1 is not None:
            result["swift_cpu_s"] = swift1 - swift0
        if ok != n:
            why = sorted({errors.get(i) or f"status {statuses.get(i)}" for i in range(n)
                          if statuses.get(i) not in (200, 201, 204)})
            raise BenchError(f"{ok} of {n} uploads stored ({'; '.join(why[:3])})", result)
        want = [
            hashlib.sha256(slow_body_piece(pattern, i, 0, size)).hexdigest() for i in range(n)
        ]
        for i in range(n):  # every one, every byte
            status, got, digest = http_get_digest(server, f"/upload/{a}/{i}.bin", deadline)
            if status != 200 or got != size or digest != want[i]:
                raise BenchError(
                    f"upload {i}: GET status {status}, {got} bytes, content "
                    f"{'matches' if digest == want[i] else 'differs'}", result)
        result["verified"] = f"all {n} statuses 201, all {n} downloaded: size + full SHA-256"
        return result


def companion_cpu(server: Server) -> float | None:
    """CPU seconds of the S3 server an hmacfs stores into (it shares the machine), else None."""
    swift = getattr(server, "swift", None)
    return tree_cpu_seconds(swift.pid) if swift is not None and swift.alive() else None


S3_REQUESTS_LINE = re.compile(
    r'^hmacfs_s3_requests_total\{operation="(\w+)",outcome="(\w+)"\} ([0-9.e+]+)$', re.MULTILINE
)


def s3_requests(server: Server) -> dict[str, float] | None:
    """hmacfs_s3_requests_total by "Operation/outcome" from the server's /metrics, None
    for a server without S3 or metrics (a failed scrape is an error: the row would lie)."""
    port = getattr(server, "metrics_port", None)
    if not isinstance(server, HmacfsS3Server) or not port:
        return None
    conn = http.client.HTTPConnection(LOOPBACK, port, timeout=30)
    try:
        conn.request("GET", "/metrics", headers={"Accept": "text/plain"})
        resp = conn.getresponse()
        text = resp.read().decode("utf-8", "replace")
    except OSError as e:
        raise BenchError(f"scraping {server.name}'s metrics: {e}") from e
    finally:
        conn.close()
    if resp.status != 200:
        raise BenchError(f"scraping {server.name}'s metrics: status {resp.status}")
    return {f"{op}/{outcome}": float(n) for op, outcome, n in S3_REQUESTS_LINE.findall(text)}


def s3_requests_delta(
    before: dict[str, float] | None, after: dict[str, float] | None, per: int
) -> dict[str, Any]:
    """The S3 requests made between two scrapes, per upload: the total and by operation."""
    if before is None or after is None:
        return {}
    delta = {k: (v - before.get(k, 0.0)) / per for k, v in sorted(after.items())}
    delta = {k: round(v, 2) for k, v in delta.items() if v}
    return {"s3_requests_per_upload": sum(delta.values()), "s3_requests_by_operation": delta}


def lua_str(text: str) -> str:
    return json.dumps(text)  # ASCII paths: JSON string escapes are valid Lua


def run_wrk(
    args: list[str],
    spec: Path,
    work: Path,
    deadline: Deadline,
    done_dir: Path | None = None,
    threads: int = 0,
) -> tuple[dict[str, Any], str]:
    """Run wrk with BENCH_SPEC; with done_dir, SIGINT it once every thread wrote its marker."""
    env = dict(os.environ, BENCH_SPEC=str(spec))
    out_path, err_path = work / "wrk.out", work / "wrk.err"
    with open(out_path, "wb") as out, open(err_path, "wb") as err:
        proc = subprocess.Popen(
            [find_tool("wrk"), *args], stdout=out, stderr=err, env=env, stdin=subprocess.DEVNULL
        )
        started = time.monotonic()
        try:
            if done_dir is not None:
                while proc.poll() is None and not deadline.expired():
                    if len(os.listdir(done_dir)) >= threads and time.monotonic() - started > 0.5:
                        proc.send_signal(signal.SIGINT)
                        break
                    time.sleep(0.01)
                else:
                    if proc.poll() is None:
                        proc.send_signal(signal.SIGINT)  # out of time: collect what wrk has
            proc.wait(timeout=max(5.0, deadline.end - time.monotonic() + 5))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)
            raise BenchError("wrk did not finish in time") from None
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=5)
    stdout = out_path.read_text(errors="replace")
    stderr = err_path.read_text(errors="replace")
    match = re.search(r"^BENCH_JSON (\{.*\})$", stdout, re.MULTILINE)
    if match is None:
        raise BenchError(
            f"wrk exit {proc.returncode}, no summary; "
            f"stdout: {stdout[-300:]!r} stderr: {stderr[-300:]!r}"
        )
    return json.loads(match.group(1)), stderr


def slow_body_piece(pattern: bytes, index: int, offset: int, length: int) -> bytes:
    """Bytes [offset, offset+length) of slow upload `index`: "%08d" % index, then the pattern."""
    if offset >= 8:
        return pattern[offset : offset + length]
    return (b"%08d" % index + pattern[8 : offset + length])[offset:]


class _Slow:
    __slots__ = ("index", "offset", "out", "response", "sock", "state", "status")

    def __init__(self, index: int, sock: socket.socket) -> None:
        self.index = index
        self.sock = sock
        self.state = "connecting"
        self.out = bytearray()
        self.offset = 0  # body bytes queued so far
        self.response = bytearray()
        self.status: int | None = None


def trickle_uploads(
    server: Server, a: str, n: int, size: int, seconds: float, pattern: bytes, deadline: Deadline
) -> tuple[dict[int, int], dict[int, str], float]:
    """n sockets each send a `size` body in pieces every 100 ms over `seconds` (one selector)."""
    interval = 0.1
    piece = -(-size // max(1, round(seconds / interval)))
    sel = selectors.DefaultSelector()
    conns: list[_Slow] = []
    timers: list[tuple[float, int]] = []
    statuses: dict[int, int] = {}
    errors: dict[int, str] = {}
    open_count = 0
    start = time.monotonic()

    def close(c: _Slow, error: str | None = None) -> None:
        nonlocal open_count
        if c.state == "closed":
            return
        if error and c.status is None:
            errors[c.index] = error
        try:
            sel.unregister(c.sock)
        except (KeyError, ValueError):
            pass
        c.sock.close()
        c.state = "closed"
        open_count -= 1

    def want(c: _Slow) -> None:
        events = selectors.EVENT_READ | (selectors.EVENT_WRITE if c.out else 0)
        sel.modify(c.sock, events, c)

    def queue_piece(c: _Slow, delay: float = interval) -> None:
        length = min(piece, size - c.offset)
        c.out += slow_body_piece(pattern, c.index, c.offset, length)
        c.offset += length
        if c.offset < size:
            heapq.heappush(timers, (time.monotonic() + delay, c.index))

    try:
        for i in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.setblocking(False)
            s.connect_ex((LOOPBACK, server.port))
            c = _Slow(i, s)
            conns.append(c)
            sel.register(s, selectors.EVENT_WRITE, c)
            open_count += 1
        while open_count and not deadline.expired():
            now = time.monotonic()
            while timers and timers[0][0] <= now:
                _, i = heapq.heappop(timers)
                c = conns[i]
                if c.state == "sending":
                    queue_piece(c)
                    want(c)
            wait = min(0.05, max(0.0, timers[0][0] - now)) if timers else 0.05
            for key, mask in sel.select(wait):
                c = key.data
                if c.state == "closed":
                    continue
                if c.state == "connecting":
                    err = c.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                    if err:
                        close(c, f"connect: {os.strerror(err)}")
                        continue
                    c.state = "sending"
                    path = server.signed_path(a, f"{c.index}.bin", size)
                    c.out += (
                        f"PUT {path} HTTP/1.1\r\nHost: {LOOPBACK}:{server.port}\r\n"
                        f"Content-Type: application/octet-stream\r\nContent-Length: {size}\r\n\r\n"
                    ).encode()
                    queue_piece(c, random.uniform(0, interval))  # spread the ticks
                    want(c)
                    continue
                if mask & selectors.EVENT_READ:
                    try:
                        data = c.sock.recv(65536)
                    except OSError as e:
                        close(c, f"recv: {e.strerror}")
                        continue
                    if not data:
                        close(c, "closed by server before a response")
                        continue
                    c.response += data
                    head, sep, _ = bytes(c.response).partition(b"\r\n\r\n")
                    if sep:
                        parts = head.split(b" ", 2)
                        c.status = int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else -1
                        statuses[c.index] = c.status
                        if c.offset < size or c.out:
                            errors[c.index] = f"early response {c.status}"
                            statuses[c.index] = -c.status
                        close(c)
                        continue
                if mask & selectors.EVENT_WRITE and c.out:
                    try:
                        sent = c.sock.send(c.out)
                    except BlockingIOError:
                        sent = 0
                    except OSError as e:
                        close(c, f"send: {e.strerror}")
                        continue
                    del c.out[:sent]
                    if not c.out:
                        if c.offset >= size:
                            c.state = "waiting"
                        want(c)
        for c in conns:
            if c.state != "closed":
                close(c, f"no response within the budget (state {c.state})")
    finally:
        for c in conns:
            if c.state != "closed":
                c.sock.close()
        sel.close()
    return statuses, errors, time.monotonic() - start


# --------------------------------------------------------------------------------------------
# Report


ROWS: list[tuple[str, str, str, str, str]] = [
    # (workload, metric, label template, better, target for hmacfs; "a | b": the first
    # alternative whose peer has a figure, as issue 12 words its targets)
    ("put_big", "mib_s", "{big} PUT (curl -T): MiB/s", "higher", ""),
    (
        "put_big",
        "cpu_s_per_gib",
        "{big} PUT: server CPU s per GiB",
        "lower",
        "<= 1.2 x prosody-filer | <= 0.85 x nginx",
    ),
    ("put_big", "rss_added_mib", "{big} PUT: RSS added MiB", "lower", "<= 5"),
    (
        "put_small",
        "rps",
        "{small} x 4 KiB PUTs, {conns} conns: req/s",
        "higher",
        ">= 1.0 x prosody-filer | >= 2 x plain",
    ),
    (
        "put_small",
        "cpu_ms_per_req",
        "4 KiB PUT: server CPU ms per request",
        "lower",
        "<= 1.5 x plain",
    ),
    ("put_small", "p50_ms", "4 KiB PUTs: p50 latency ms", "lower", ""),
    ("put_small", "p99_ms", "4 KiB PUTs: p99 latency ms", "lower", ""),
    ("get_big", "mib_s", "{big} GET (curl): MiB/s", "higher", ">= 0.9 x nginx"),
    (
        "get_small",
        "rps",
        "64 KiB GETs, {conns} conns, {get_s} s: req/s",
        "higher",
        ">= 1.0 x prosody-filer",
    ),
    ("get_small", "cpu_ms_per_req", "64 KiB GET: server CPU ms per request", "lower", ""),
    ("get_small", "p99_ms", "64 KiB GETs: p99 latency ms", "lower", "<= 2 x plain"),
    (
        "put_slow",
        "peak_pss_mib",
        "{slow} slow 1 MiB PUTs: server peak PSS MiB",
        "lower",
        "<= 100",
    ),
    ("put_slow", "peak_rss_mib", "{slow} slow 1 MiB PUTs: server peak RSS MiB", "lower", ""),
    ("put_slow", "ok", "{slow} slow 1 MiB PUTs: stored", "higher", "= {slow}"),
    ("idle", "pss_mib", "idle, whole deployment: PSS MiB", "lower", "<= 60"),
    ("idle", "rss_mib", "idle, whole deployment: RSS MiB", "lower", ""),
]

# The peers, in table order, with their column titles.
PEERS = {"nginx": "nginx", "plain": "plain twisted.web", "prosody-filer": "prosody-filer"}
RATIO_TITLES = {"nginx": "h/nginx", "plain": "h/plain", "prosody-filer": "h/filer"}
# Cells with a figure that is not comparable with hmacfs's (no ratio, marked with a dagger):
# the plain server has Twisted spool the whole body to a temp file before it stores it.
NOT_COMPARABLE = {("plain", "put_big"): "plain twisted.web spools the body to a temp file first"}


def aggregate(runs: list[dict[str, Any]], metric: str) -> tuple[float | None, str | None]:
    """Median over runs; no figure at all if any run failed (a lost byte voids the workload)."""
    if not runs:
        return None, "not run"
    for r in runs:
        if "error" in r:
            return None, r["error"]
    values = [r[metric] for r in runs if metric in r]
    if not values:
        return None, "no value"
    return statistics.median(values), None


def choose_target(target: str, refs: dict[str, float | None]) -> str:
    """The first alternative of "a | b" whose peer has a figure (or that names no peer)."""
    for alt in (t.strip() for t in target.split("|")):
        m = re.search(r" x ([a-z-]+)$", alt)
        if m is None or refs.get(m.group(1)) is not None:
            return alt
    return ""


def meets(target: str, value: float | None, refs: dict[str, float | None]) -> str:
    if value is None or not target:
        return ""
    m = re.match(r"(<=|>=|=) ([\d.]+)(?: x ([a-z-]+))?$", target)
    if not m:
        return ""
    op, bound = m.group(1), float(m.group(2))
    if m.group(3):
        ref = refs.get(m.group(3))
        if ref is None:
            return ""
        bound *= ref
    ok = {"<=": value <= bound, ">=": value >= bound, "=": value == bound}[op]
    return "ok" if ok else "MISS"


def fmt(value: float | None) -> str:
    if value is None:
        return "-"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def server_figure(
    results: dict[str, dict[str, list[dict[str, Any]]]], server: str, workload: str, metric: str
) -> tuple[float | None, str | None]:
    value, error = aggregate(results.get(server, {}).get(workload, []), metric)
    if workload == "put_slow" and metric == "ok" and error:
        # The count is the point of this row: show it even when some uploads failed.
        runs = results.get(server, {}).get(workload, [])
        counts = [r.get("ok") for r in runs if isinstance(r.get("ok"), int)]
        if counts:
            value = float(min(counts))
    return value, error


def build_rows(
    bench: Bench,
    results: dict[str, dict[str, list[dict[str, Any]]]],
    servers: list[str],
    rows_spec: list[tuple[str, str, str, str, str]] = ROWS,
) -> list[dict[str, Any]]:
    names = {
        "big": f"{bench.big_size // MiB} MiB"
        if bench.big_size < GiB
        else f"{bench.big_size // GiB} GiB",
        "small": f"{bench.small_count:,}",
        "conns": bench.options.connections,
        "get_s": bench.get_seconds,
        "slow": bench.slow_count,
    }
    rows = []
    for workload, metric, label, better, target in rows_spec:
        if workload not in bench.only:
            continue
        row: dict[str, Any] = {
            "workload": workload,
            "metric": metric,
            "label": label.format(**names),
            "better": better,
        }
        for server in servers:
            row[server], row[f"{server}_error"] = server_figure(results, server, workload, metric)
        h = row.get("hmacfs")
        refs: dict[str, float | None] = {}
        for peer in servers:
            if peer == "hmacfs" or (peer, workload) in NOT_COMPARABLE:
                continue
            x = row[peer] if not row[f"{peer}_error"] else None
            refs[peer] = x
            row[f"ratio_{peer}"] = h / x if h is not None and x else None
        row["ratio"] = row.get("ratio_nginx")  # hmacfs/nginx, as before the other peers
        row["target"] = choose_target(target.format(**names), refs)
        row["meets_target"] = meets(row["target"], h, refs)
        rows.append(row)
    return rows


def markdown(lines: list[list[str]]) -> str:
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]
    out = []
    for k, line in enumerate(lines):
        out.append("| " + " | ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)) + " |")
        if k == 0:
            out.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(out)


def cell(row: dict[str, Any], server: str) -> str:
    if server not in row:
        return "(not run)"
    mark = " †" if (server, row["workload"]) in NOT_COMPARABLE else ""
    if row[server] is not None and not row[f"{server}_error"]:
        return fmt(row[server]) + mark
    err = row[f"{server}_error"] or "?"
    shown = fmt(row[server]) + " " if row[server] is not None else ""
    return f"{shown}FAIL: {err.splitlines()[0][:60]}"


def ratio_cell(row: dict[str, Any], peer: str) -> str:
    if (peer, row["workload"]) in NOT_COMPARABLE:
        return "—"
    ratio = row.get(f"ratio_{peer}")
    return f"{ratio:.2f}" if ratio is not None else "-"


def render_table(rows: list[dict[str, Any]], servers: list[str], hmacfs_title: str) -> str:
    peers = [p for p in PEERS if p in servers]
    header = ["workload", hmacfs_title]
    for peer in peers:
        header += [PEERS[peer], RATIO_TITLES[peer]]
    header += ["better", "hmacfs target"]
    lines = [header]
    for row in rows:
        target = row["target"]
        if target and row["meets_target"]:
            target += f" ({row['meets_target']})"
        line = [row["label"], cell(row, "hmacfs")]
        for peer in peers:
            line += [cell(row, peer), ratio_cell(row, peer)]
        lines.append(line + [f"{row['better']} is better", target])
    return markdown(lines)


# Single process against single process: hmacfs with NumCores=1 (and NumCores=auto beside it)
# against the plain twisted.web server, which is always one process.
SINGLE_ROWS: list[tuple[str, str, str, str, str]] = [
    ("put_small", "rps", "4 KiB PUTs: req/s", "higher", ""),
    ("put_small", "cpu_ms_per_req", "4 KiB PUT: server CPU ms per request", "lower", "<= 1.5"),
    ("get_small", "rps", "64 KiB GETs: req/s", "higher", ">= 1.0"),
    ("get_small", "cpu_ms_per_req", "64 KiB GET: server CPU ms per request", "lower", ""),
    ("get_small", "p99_ms", "64 KiB GETs: p99 latency ms", "lower", "<= 2"),
    ("idle", "pss_mib", "idle, whole deployment: PSS MiB", "lower", "<= 40 MiB"),
    ("idle", "rss_mib", "idle, whole deployment: RSS MiB", "lower", ""),
]


def render_single_table(
    bench: Bench, results: dict[str, dict[str, list[dict[str, Any]]]], variants: dict[str, str]
) -> tuple[str, list[dict[str, Any]]]:
    """
    variants maps a NumCores value ("1", "auto", ...) to the results key of that hmacfs.
    The ratio column is NumCores=1 over the plain server; its target is the issue 12 one.
    """
    order = sorted(variants, key=lambda c: (c != "auto", c))
    header = ["workload", *(f"hmacfs NumCores={c}" for c in order), "plain twisted.web"]
    header += ["ratio h1/plain", "target (NumCores=1)"]
    lines, data = [header], []
    for workload, metric, label, _better, target in SINGLE_ROWS:
        if workload not in bench.only:
            continue
        figures = {c: server_figure(results, variants[c], workload, metric) for c in order}
        plain, plain_error = server_figure(results, "plain", workload, metric)
        one, one_error = figures.get("1", (None, "not run"))
        ratio = None
        if one is not None and not one_error and plain and not plain_error:
            ratio = one / plain
        verdict = ""
        if target.endswith("MiB") and one is not None and not one_error:
            verdict = "ok" if one <= float(target.split()[1]) else "MISS"
        elif target and ratio is not None:
            verdict = meets(target, ratio, {}) or ""
        shown = [fmt(v) if not e else "FAIL" for v, e in figures.values()]
        lines.append(
            [
                label,
                *shown,
                fmt(plain) if not plain_error else "FAIL",
                f"{ratio:.2f}" if ratio is not None else "-",
                f"{target} ({verdict})" if verdict else target,
            ]
        )
        data.append(
            {"workload": workload, "metric": metric, "hmacfs": {c: v for c, (v, _) in figures.items()},
             "plain": plain, "ratio_1_over_plain": ratio, "target": target, "meets": verdict}
        )
    return markdown(lines), data


# --------------------------------------------------------------------------------------------
# Orchestration


def run_workload(
    bench: Bench,
    results: dict[str, dict[str, list[dict[str, Any]]]],
    server: Server,
    workload: str,
    fn: Callable[[Deadline], dict[str, Any]],
    budget: float | None = None,
) -> dict[str, Any]:
    """Run one workload under its hard time budget; failures become an "error" entry."""
    slot = results.setdefault(server.name, {}).setdefault(workload, [])
    if server.start_error:
        entry: dict[str, Any] = {"error": "did not start (see below the table)"}
    elif not server.alive():
        entry = {"error": "server is not running (crashed earlier)"}
    else:
        label = f"[{time.strftime('%H:%M:%S')}] {server.name:13} {workload:9} run {len(slot) + 1}"
        print(label + " ...", end="", flush=True)
        try:
            entry = fn(Deadline(budget or bench.options.timeout))
        except BenchError as e:
            partial = e.args[1] if len(e.args) > 1 and isinstance(e.args[1], dict) else {}
            entry = {**partial, "error": str(e.args[0])}
        except Exception as e:  # noqa: BLE001 - a broken workload must not stop the others
            entry = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}
        if not server.alive():
            code = server.proc.returncode if server.proc else None
            entry.setdefault("error", "")
            entry["error"] = (entry["error"] + f"; server died (exit {code})").lstrip("; ")
            entry["log_tail"] = server.log_tail()
        elif "error" in entry:
            entry["log_tail"] = server.log_tail(10)
        if "error" in entry:
            print(f" FAIL: {entry['error']}")
            if "log_tail" in entry:
                print(entry["log_tail"])
        else:
            shown = {
                k: round(v, 3) if isinstance(v, float) else v
                for k, v in entry.items()
                if not k.startswith("_")
                and k != "verified"
                and not (k == "listen_queue" and not any(v.values()))
            }
            print(" " + json.dumps(shown))
    slot.append(entry)
    return entry


def measure_resume_cost(
    bench: Bench,
    tmp: Path,
    secret: str,
    options: argparse.Namespace,
    results: dict[str, dict[str, list[dict[str, Any]]]],
) -> dict[str, Any]:
    """
    The cost of resumability: the same 1 GiB PUT on two fresh hmacfs servers,
    one plain and one with Redis state and an X-Session-Token (progress
    checkpoints, the shared writer lock), runs interleaved.
    """
    redis_bin = shutil.which("redis-server") or "/usr/bin/redis-server"
    if not Path(redis_bin).exists():
        print("resume cost: redis-server not installed, skipped", file=sys.stderr)
        return {}
    redis_port = free_port()
    redis_dir = tmp / "redis"
    redis_dir.mkdir()
    redis = subprocess.Popen(
        [redis_bin, "--port", str(redis_port), "--bind", LOOPBACK, "--dir", str(redis_dir),
         "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    plain = HmacfsServer(tmp / "hmacfs-plain", secret, options)
    plain.name = "hmacfs-plain"
    with_redis = HmacfsServer(tmp / "hmacfs-redis", secret, options)
    with_redis.name = "hmacfs-redis"
    with_redis.extra_config = {"RedisAddr": f"{LOOPBACK}:{redis_port}"}
    try:
        time.sleep(0.5)
        start_server(plain)
        start_server(with_redis)
        for run in range(bench.runs):
            pair = [(plain, ()), (with_redis, (f"X-Session-Token: bench-{bench.token}-{run}",))]
            for server, headers in pair if run % 2 == 0 else pair[::-1]:
                entry = run_workload(
                    bench, results, server, "put_big",
                    lambda d, s=server, h=headers, run=run: bench.put_big(s, run, d, h),
                )
                if entry.get("_stored"):
                    remove_stored(server, *entry.pop("_stored"))
    finally:
        plain.stop()
        with_redis.stop()
        redis.terminate()
        redis.wait(10)
    plain_mib, _ = aggregate(results.get("hmacfs-plain", {}).get("put_big", []), "mib_s")
    redis_mib, _ = aggregate(results.get("hmacfs-redis", {}).get("put_big", []), "mib_s")
    return {
        "plain": plain_mib,
        "redis": redis_mib,
        "ratio": redis_mib / plain_mib if plain_mib and redis_mib else None,
    }


BACKEND_WORKLOADS = ("idle", "put_big", "get_big", "put_small", "put_concurrent")


def measure_backends(
    bench: Bench,
    tmp: Path,
    secret: str,
    options: argparse.Namespace,
    results: dict[str, dict[str, list[dict[str, Any]]]],
) -> dict[str, Any]:
    """
    The storage backends side by side: two fresh hmacfs servers, the same config except
    StorageBackend ("filesystem" on the tmpfs, "s3" on a Swift all-in-one that the bench
    starts on 127.0.0.1 with its data on the same tmpfs), runs interleaved.  Swift's own CPU
    is measured apart, as it shares the cores.  Returns {"skipped": why} when there is no
    Swift outside CI; in CI (CI=true) a missing Swift is an error.
    """
    python, why = find_swift_python(options)
    if python is None:
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            return {"error": f"the S3 rows need Swift in CI: {why}"}
        return {"skipped": why}
    budget = max(options.timeout, options.s3_timeout)  # Swift all-in-one is slow
    swift = SwiftS3(python, tmp / "swift")
    fs = HmacfsServer(tmp / "hmacfs-fs", secret, options)
    fs.name = "hmacfs-fs"
    # Metrics on both (the same config but the backend): the S3 requests per upload.
    fs.extra_config = {"MetricsEnabled": True, "MetricsPort": f"{LOOPBACK}:{free_port()}"}
    s3: HmacfsS3Server | None = None
    started: list[Server] = [fs]
    try:
        t0 = time.monotonic()
        try:
            try:
                swift.start()
            except BenchError as e:
                if "xattr" not in str(e):
                    raise
                # A tmpfs before Linux 6.6 has no user xattrs, which Swift needs: use disk.
                swift = SwiftS3(python, Path(tempfile.mkdtemp(prefix="hmacfs-bench-swift-")))
                print(f"Swift: {tmp} has no user xattrs, its data goes to {swift.workdir}")
                swift.start()
            bucket = f"bench-{bench.token}"
            swift.s3_admin(options, "create", bucket)
        except BenchError as e:
            return {"error": f"Swift: {e}"}
        print(f"Swift s3api on {swift.endpoint} (pid {swift.pid}), bucket {bucket}, "
              f"up in {time.monotonic() - t0:.1f} s")
        s3 = HmacfsS3Server(tmp / "hmacfs-s3", secret, options, swift, bucket)
        s3.name = "hmacfs-s3"
        s3.metrics_port = free_port()
        s3.extra_config.update(MetricsEnabled=True, MetricsPort=f"{LOOPBACK}:{s3.metrics_port}")
        started.append(s3)
        pair: list[Server] = [fs, s3]
        only = bench.only
        for s in pair:
            start_server(s)
        if "idle" in only:
            for s in pair:
                run_workload(bench, results, s, "idle", lambda d, s=s: bench.idle(s, d), budget)
        for run in range(bench.runs):
            for s in pair if run % 2 == 0 else pair[::-1]:
                if "put_big" in only:
                    put = run_workload(
                        bench, results, s, "put_big",
                        lambda d, s=s, run=run: bench.put_big(s, run, d, pss=True), budget,
                    )
                    stored = put.get("_stored")
                    if "get_big" in only:
                        if stored:
                            run_workload(
                                bench, results, s, "get_big",
                                lambda d, s=s, stored=stored: bench.get_big(s, stored, d),
                                budget,
                            )
                        else:
                            results.setdefault(s.name, {}).setdefault("get_big", []).append(
                                {"error": "no verified upload to download"}
                            )
                    if stored:
                        remove_stored(s, *put.pop("_stored"))
        for run in range(bench.runs):
            if "put_small" in only:
                for s in pair if run % 2 == 0 else pair[::-1]:
                    run_workload(
                        bench, results, s, "put_small",
                        lambda d, s=s, run=run: bench.put_small(s, run, d, bench.s3_small_count),
                        budget,
                    )
        if "put_concurrent" in only:
            # Fresh processes, as for put_slow: the peak is this workload's alone.
            for s in pair:
                start_server(s)
            for s in pair:
                run_workload(
                    bench, results, s, "put_concurrent",
                    lambda d, s=s: bench.put_concurrent(s, d), budget,
                )
    finally:
        for s in started:
            s.stop()
        keep_logs(started, Path(options.out).parent / "logs")
        swift.stop()
        if swift.log.is_file():
            shutil.copyfile(swift.log, Path(options.out).parent / "logs" / "swift-saio.stderr")
        if not swift.workdir.is_relative_to(tmp):
            shutil.rmtree(swift.workdir, ignore_errors=True)
    return {"endpoint": swift.env.get("S3_ENDPOINT"), "swift_python": str(python)}


# (workload, metric, label, better): the filesystem and s3 columns of the backends table
BACKEND_ROWS: list[tuple[str, str, str, str]] = [
    ("put_big", "mib_s", "{big} PUT (curl -T): MiB/s", "higher"),
    ("put_big", "cpu_s_per_gib", "{big} PUT: hmacfs CPU s per GiB", "lower"),
    ("put_big", "swift_cpu_s_per_gib", "{big} PUT: Swift CPU s per GiB (apart)", "lower"),
    ("put_big", "s3_requests_per_upload", "{big} PUT: S3 requests", "lower"),
    ("put_big", "rss_added_mib", "{big} PUT: hmacfs RSS added MiB", "lower"),
    ("put_big", "pss_added_mib", "{big} PUT: hmacfs PSS added MiB", "lower"),
    ("get_big", "mib_s", "{big} GET (curl): MiB/s", "higher"),
    ("get_big", "cpu_s_per_gib", "{big} GET: hmacfs CPU s per GiB", "lower"),
    ("get_big", "swift_cpu_s_per_gib", "{big} GET: Swift CPU s per GiB (apart)", "lower"),
    ("put_small", "rps", "{small} x 4 KiB PUTs, {conns} conns: req/s", "higher"),
    ("put_small", "cpu_ms_per_req", "4 KiB PUT: hmacfs CPU ms per request", "lower"),
    ("put_small", "swift_cpu_ms_per_req", "4 KiB PUT: Swift CPU ms per request (apart)", "lower"),
    ("put_small", "p99_ms", "4 KiB PUTs: p99 latency ms", "lower"),
    ("put_small", "s3_requests_per_upload", "4 KiB PUT: S3 requests per upload", "lower"),
    ("put_concurrent", "peak_rss_mib", "{conc} concurrent 16 MiB uploads: hmacfs peak RSS MiB",
     "lower"),
    ("put_concurrent", "peak_pss_mib", "{conc} concurrent 16 MiB uploads: hmacfs peak PSS MiB",
     "lower"),
    ("put_concurrent", "rss_before_mib", "  the same, hmacfs RSS before MiB", "lower"),
    ("put_concurrent", "rss_per_upload_mib", "  RSS per in-flight upload MiB (peak - before) / "
     "{conc}", "lower"),
    ("put_concurrent", "pss_per_upload_mib", "  PSS per in-flight upload MiB (peak - before) / "
     "{conc}", "lower"),
    ("put_concurrent", "ok", "{conc} concurrent 16 MiB uploads: stored", "higher"),
    ("put_concurrent", "s3_requests_per_upload", "  S3 requests per 16 MiB upload", "lower"),
    ("idle", "rss_mib", "idle hmacfs: RSS MiB", "lower"),
    ("idle", "pss_mib", "idle hmacfs: PSS MiB", "lower"),
    ("idle", "swift_rss_mib", "idle Swift, its process tree: RSS MiB (apart)", "lower"),
]


def render_backends_table(
    bench: Bench, results: dict[str, dict[str, list[dict[str, Any]]]]
) -> tuple[str, list[dict[str, Any]]]:
    """hmacfs on the filesystem against hmacfs on S3 (Swift), with the ratio s3 / filesystem."""
    names = {
        "big": f"{bench.big_size // MiB} MiB" if bench.big_size < GiB
        else f"{bench.big_size // GiB} GiB",
        "small": f"{bench.s3_small_count:,}",
        "conns": bench.options.connections,
        "conc": bench.concurrent_count,
    }
    lines = [["workload", "filesystem", "s3 (Swift)", "s3/fs", "better"]]
    data = []
    for workload, metric, label, better in BACKEND_ROWS:
        if workload not in bench.only:
            continue
        figures = {}
        for column, server in (("filesystem", "hmacfs-fs"), ("s3", "hmacfs-s3")):
            runs = results.get(server, {}).get(workload, [])
            if metric.startswith(("swift_", "s3_")) and column == "filesystem":
                figures[column] = (None, "")
            else:
                figures[column] = aggregate(runs, metric)
        cells = []
        for value, error in figures.values():
            if error:
                cells.append(f"FAIL: {error.splitlines()[0][:50]}" if error != "not run"
                             else "(not run)")
            else:
                cells.append(fmt(value) if value is not None else "—")
        fs_value, s3_value = figures["filesystem"][0], figures["s3"][0]
        ok = not figures["filesystem"][1] and not figures["s3"][1]
        ratio = s3_value / fs_value if ok and fs_value and s3_value is not None else None
        lines.append([label.format(**names), *cells,
                      f"{ratio:.2f}" if ratio is not None else "-", f"{better} is better"])
        data.append({"workload": workload, "metric": metric, "filesystem": fs_value,
                     "s3": s3_value, "ratio_s3_over_fs": ratio,
                     "errors": {k: e for k, (_, e) in figures.items() if e}})
    return markdown(lines), data


def start_server(server: Server) -> None:
    try:
        server.start()
        server.start_error = None
        print(
            f"{server.name} listening on {LOOPBACK}:{server.port} (pid {server.pid}, "
            f"RSS {tree_rss_bytes(server.pid) / MiB:.1f} MiB)"
        )
    except BenchError as e:
        server.start_error = str(e)
        server.stop()
        print(f"ERROR: {server.name} failed to start: {e}", file=sys.stderr)


def machine_load(seconds: float = 1.0) -> dict[str, Any]:
    """How busy the CPUs are before we start, and with what: other work skews every figure."""

    def snapshot() -> tuple[list[int], dict[int, int]]:
        with open("/proc/stat") as f:
            total = [int(x) for x in f.readline().split()[1:]]
        per_pid = {}
        for name in os.listdir("/proc"):
            if name.isdigit():
                st = _read_stat(int(name))
                if st is not None:
                    per_pid[int(name)] = st[1]
        return total, per_pid

    (t0, p0), start = snapshot(), time.monotonic()
    time.sleep(seconds)
    (t1, p1), wall = snapshot(), time.monotonic() - start
    delta = [b - a for a, b in zip(t0, t1, strict=True)]
    idle = delta[3] + delta[4]  # idle + iowait
    busy = 1 - idle / max(1, sum(delta))
    top = []
    for pid, ticks in p1.items():
        used = (ticks - p0.get(pid, ticks)) / CLK_TCK / wall
        if used >= 0.05 and pid != os.getpid():
            try:
                comm = Path(f"/proc/{pid}/comm").read_text().strip()
            except OSError:
                comm = "?"
            top.append({"pid": pid, "comm": comm, "cpu": round(used, 2)})
    top.sort(key=lambda t: -t["cpu"])
    return {"busy_fraction": round(busy, 3), "cpus": os.cpu_count(), "busy_processes": top[:5]}


def warm_up_memory(tmp: Path, size: int) -> None:
    """Write and delete a scratch file on the tmpfs before measuring anything.

    In a fresh VM the first touch of guest memory is several times dearer than later ones
    (seen here: 3.3 then 1.3 then 0.6 CPU s/GiB for the same nginx PUT), which would charge
    whichever server runs first. One pass over the pages the workloads will need evens that out.
    """
    t0 = time.monotonic()
    scratch = tmp / "warm-up.bin"
    block = os.urandom(MiB)
    with open(scratch, "wb") as f:
        f.writelines(block for _ in range(size // MiB))
    scratch.unlink()
    print(
        f"memory warm-up: {size // MiB} MiB through {tmp.parent} in {time.monotonic() - t0:.1f} s"
    )


def keep_logs(servers: list[Server], where: Path) -> None:
    """Copy the servers' logs out of the temp dir before it goes (the last start's only)."""
    where.mkdir(parents=True, exist_ok=True)
    for server in servers:
        for path in server.logs:
            if path.is_file():
                shutil.copyfile(path, where / f"{server.name}-{path.name}")


def remove_stored(server: Server, a: str, b: str) -> None:
    """Free the tmpfs space of a finished big upload (the store is ours, not the server's data)."""
    if isinstance(server, HmacfsS3Server):
        server.remove(a, b)
        return
    path = server.find_stored(a, b)
    if path is not None:
        path.unlink(missing_ok=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke check: 256 MiB, 1 run, 500 small PUTs, 5 s GET load, 100 slow uploads over 5 s",
    )
    parser.add_argument(
        "--server",
        default="all",
        help="comma-separated servers out of hmacfs,nginx,plain,prosody-filer; "
        '"all" (the default: prosody-filer only if built) or "both" (hmacfs,nginx)',
    )
    parser.add_argument(
        "--prosody-filer",
        default=str(DEFAULT_PROSODY_FILER),
        help="the prosody-filer binary `make bench-peers` builds (default bench-out/peers/)",
    )
    parser.add_argument(
        "--venv", default=".venv", help="virtualenv holding twistd (relative to the repo root)"
    )
    parser.add_argument(
        "--runs", type=int, help="repetitions of each repeated workload (default 3, quick 1)"
    )
    parser.add_argument(
        "--hmacfs-cores",
        type=lambda v: v if v == "auto" else int(v),
        default="auto",
        help='NumCores in the hmacfs config: a number or "auto" (default auto, like nginx\'s 2 workers)',
    )
    parser.add_argument(
        "--nginx-workers", default="2", help="worker_processes for nginx (default 2)"
    )
    parser.add_argument(
        "--nginx-body-buffer",
        default="256k",
        help="client_body_buffer_size for nginx (default 256k; nginx's own default is 16k)",
    )
    parser.add_argument("--connections", type=int, default=64, help="wrk connections (default 64)")
    parser.add_argument(
        "--no-resume-cost", action="store_true",
        help="skip the 1 GiB PUT with X-Session-Token against an hmacfs using Redis",
    )
    parser.add_argument(
        "--no-scaling", action="store_true",
        help="skip the second hmacfs (the other NumCores, run beside the first on put_small, "
        "get_small and idle) that shows worker scaling and single-process figures",
    )
    parser.add_argument(
        "--small-puts", type=int, help="number of 4 KiB PUTs (default 2000, quick 500)"
    )
    parser.add_argument("--get-seconds", type=int, help="GET load duration (default 10, quick 5)")
    parser.add_argument(
        "--slow-count", type=int, help="concurrent slow uploads (default 500, quick 100)"
    )
    parser.add_argument(
        "--slow-seconds", type=float, help="slow upload duration (default 10, quick 5)"
    )
    parser.add_argument(
        "--only",
        default="put_big,get_big,put_small,get_small,put_slow,idle,put_concurrent",
        help="comma-separated workloads to run (put_concurrent runs in the backends table only)",
    )
    parser.add_argument(
        "--big-size", type=int, metavar="MiB",
        help="size of the big PUT/GET file in MiB (default 1024, quick 256)",
    )
    parser.add_argument(
        "--s3-only", action="store_true",
        help="run only the storage backends table (hmacfs on the filesystem against hmacfs "
        "on S3, a Swift the bench starts): no peers, no resume cost",
    )
    parser.add_argument(
        "--no-s3", action="store_true", help="leave out the storage backends table"
    )
    parser.add_argument(
        "--swift-python",
        help="an interpreter that can import swift (default $HMACFS_SWIFT_PYTHON, "
        "else .venv-swift/bin/python)",
    )
    parser.add_argument(
        "--s3-small-puts", type=int,
        help="number of 4 KiB PUTs in the backends table, for both backends (default 500, "
        "quick 200: Swift all-in-one takes a few per second)",
    )
    parser.add_argument(
        "--s3-timeout", type=float, default=600.0,
        help="hard budget per workload run in the backends table, seconds (default 600, "
        "or --timeout if larger)",
    )
    parser.add_argument(
        "--concurrent-uploads", type=int, default=50,
        help="uploads of 16 MiB in flight at once in put_concurrent (default 50)",
    )
    parser.add_argument(
        "--concurrent-seconds", type=float,
        help="how long each of those uploads takes to send (default 5, quick 3)",
    )
    parser.add_argument(
        "--timeout", type=float, default=180.0, help="hard budget per workload run, seconds"
    )
    parser.add_argument(
        "--tmp-root", default="/dev/shm", help="where the temp dir (stores, files) goes"
    )
    parser.add_argument("--out", default=str(REPO / "bench-out" / "results.json"))
    options = parser.parse_args(argv)
    if options.s3_only and options.no_s3:
        parser.error("--s3-only and --no-s3 exclude each other")
    if not 1 <= options.concurrent_uploads <= 1000:
        parser.error("--concurrent-uploads: 1 to 1000")
    if options.big_size is not None and options.big_size < 1:
        parser.error("--big-size: at least 1 (MiB)")

    servers_wanted, skipped = ([], []) if options.s3_only else parse_servers(options)
    for line in skipped:
        print(line, flush=True)
    command = " ".join(shlex.quote(a) for a in [Path(sys.executable).name, *sys.argv])
    started_at = datetime.datetime.now(datetime.UTC).astimezone()
    ensure_tools(need_nginx="nginx" in servers_wanted)

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = (options.slow_count or 500) + 1024
    if soft < need:
        new = need if hard == resource.RLIM_INFINITY else min(hard, max(need, soft))
        resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))  # the servers inherit it too

    tmp_root = Path(options.tmp_root)
    if not tmp_root.is_dir():
        print(
            f"warning: {tmp_root} missing, using the default temp dir (not tmpfs)", file=sys.stderr
        )
        tmp_root = Path(tempfile.gettempdir())
    tmp = Path(tempfile.mkdtemp(prefix="hmacfs-bench-", dir=tmp_root))
    servers: list[Server] = []
    with_alt: list[Server] = []

    def cleanup() -> None:
        for s in _STARTED:
            s.stop()
        shutil.rmtree(tmp, ignore_errors=True)

    atexit.register(cleanup)

    def interrupted(signum: int, frame: object) -> None:
        print(
            f"\ninterrupted by signal {signum}: stopping the servers, removing {tmp}",
            file=sys.stderr,
        )
        sys.exit(128 + signum)

    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, interrupted)

    results: dict[str, dict[str, list[dict[str, Any]]]] = {}
    resume_results: dict[str, dict[str, list[dict[str, Any]]]] = {}
    resume_cost: dict[str, Any] = {}
    backend_results: dict[str, dict[str, list[dict[str, Any]]]] = {}
    backends: dict[str, Any] = {}
    scaling_cores: dict[str, Any] = {}
    load_before: dict[str, Any] = {}
    try:
        bench = Bench(options, tmp)
        only = bench.only
        unknown = only - {w for w, *_ in ROWS} - set(BACKEND_WORKLOADS)
        if unknown:
            raise SystemExit(f"unknown workload(s) in --only: {', '.join(sorted(unknown))}")
        st = os.statvfs(tmp)
        need_bytes = bench.big_size * 4 + GiB
        if not options.no_s3:
            need_bytes += bench.big_size + 2 * bench.concurrent_count * CONCURRENT_SIZE
        if st.f_bavail * st.f_frsize < need_bytes:
            raise SystemExit(
                f"{tmp_root} has {st.f_bavail * st.f_frsize / GiB:.1f} GiB free, "
                f"need {need_bytes / GiB:.1f} GiB"
            )
        secret = secrets.token_hex(16)
        load_before = machine_load()
        if load_before["busy_fraction"] > 0.1:
            hogs = ", ".join(
                f"{t['comm']} (pid {t['pid']}) {t['cpu']:.0%}"
                for t in load_before["busy_processes"]
            )
            print(
                f"WARNING: the CPUs were {load_before['busy_fraction']:.0%} busy before the bench "
                f"({hogs or 'short-lived processes'}): figures will be low and noisy; ratios from "
                "one run are still comparable, absolute figures are not.",
                file=sys.stderr,
                flush=True,
            )
        for name in servers_wanted:
            servers.append(SERVER_CLASSES[name](tmp / name, secret, options))
        alt: Server | None = None
        if only & {"put_small", "get_small", "idle"} and "hmacfs" in servers_wanted and not options.no_scaling:
            # The other NumCores setting (1 vs all cores) in the same run, interleaved with
            # the others: worker scaling, and hmacfs single process against the plain server.
            alt_cores = 1 if options.hmacfs_cores != 1 else "auto"
            alt = HmacfsServer(tmp / "hmacfs-alt", secret, argparse.Namespace(
                **{**vars(options), "hmacfs_cores": alt_cores}))
            alt.name = "hmacfs-alt"
            scaling_cores = {"main": options.hmacfs_cores, "alt": alt_cores}
        with_alt = servers + ([alt] if alt else [])
        print(
            f"{command}\n{started_at:%Y-%m-%d %H:%M:%S %z}; temp dir {tmp}; "
            f"{bench.runs} run(s) per repeated workload"
        )
        if only & {"put_big", "get_big"}:
            t0 = time.monotonic()
            bench.big = BigFile(tmp / "big.bin", bench.big_size)
            print(f"test file {bench.big_size // MiB} MiB written in {time.monotonic() - t0:.1f} s")
        warm_up_memory(tmp, 2 * bench.big_size if only & {"put_big", "get_big"} else GiB // 4)
        for s in with_alt:
            start_server(s)
        if "idle" in only:
            # Fresh and settled, before any request: the deployment's resting footprint.
            for s in with_alt:
                run_workload(bench, results, s, "idle", lambda d, s=s: bench.idle(s, d))

        def order(run: int, among: list[Server] = servers) -> list[Server]:
            # Alternate who goes first, so no server always meets a cold cache or page pool.
            return among if run % 2 == 0 else among[::-1]

        for run in range(bench.runs):
            if "put_big" in only:
                for s in order(run):
                    put = run_workload(
                        bench,
                        results,
                        s,
                        "put_big",
                        lambda d, s=s, run=run: bench.put_big(s, run, d),
                    )
                    stored = put.get("_stored")
                    if "get_big" in only:
                        if stored:
                            run_workload(
                                bench,
                                results,
                                s,
                                "get_big",
                                lambda d, s=s, stored=stored: bench.get_big(s, stored, d),
                            )
                        else:
                            results.setdefault(s.name, {}).setdefault("get_big", []).append(
                                {"error": "no verified upload to download"}
                            )
                    if stored:
                        remove_stored(s, *stored)
        if "put_big" in only and "hmacfs" in servers_wanted and not options.no_resume_cost:
            resume_cost = measure_resume_cost(bench, tmp, secret, options, resume_results)
        for run in range(bench.runs):
            if "put_small" in only:
                for s in order(run, with_alt):
                    run_workload(
                        bench,
                        results,
                        s,
                        "put_small",
                        lambda d, s=s, run=run: bench.put_small(s, run, d),
                    )
        for run in range(bench.runs):
            if "get_small" in only:
                for s in order(run, with_alt):
                    run_workload(
                        bench,
                        results,
                        s,
                        "get_small",
                        lambda d, s=s, run=run: bench.get_small(s, run, d),
                    )
        if alt is not None:
            alt.stop()
        if "put_slow" in only:
            # Fresh processes: the peak reflects this workload, not what earlier ones left behind.
            for s in servers:
                if not s.start_error or s.alive():
                    start_server(s)
            for s in servers:
                run_workload(bench, results, s, "put_slow", lambda d, s=s: bench.put_slow(s, 0, d))
        for s in with_alt:
            s.stop()
        if not options.no_s3 and only & set(BACKEND_WORKLOADS) - {"idle"}:
            print("storage backends: hmacfs on the filesystem and on S3 (Swift on 127.0.0.1)")
            backends = measure_backends(bench, tmp, secret, options, backend_results)
            if "skipped" in backends:
                print(f"S3 rows: skipped, {backends['skipped']}")
    finally:
        for s in with_alt:
            s.stop()
        keep_logs(with_alt, Path(options.out).parent / "logs")

    rows = build_rows(bench, results, servers_wanted)
    table = render_table(rows, servers_wanted, f"hmacfs NumCores={options.hmacfs_cores}")
    print()
    print(f"command: {command}")
    print(f"date:    {started_at:%Y-%m-%d %H:%M:%S %z}")
    print(
        f"host:    {os.cpu_count()} CPUs, {platform.release()}, store on {tmp_root}; "
        f"{tool_version([find_tool('wrk'), '-v'])}"
    )
    if servers_wanted:
        print(table)
        print(
            "h/X = hmacfs / X, median of the runs; a FAIL cell means the workload errored or "
            "lost data (no figure)."
        )
    backends_table, backend_rows = "", []
    if backends and "skipped" not in backends and "error" not in backends:
        backends_table, backend_rows = render_backends_table(bench, backend_results)
        print(
            f"\nstorage backends, hmacfs NumCores={options.hmacfs_cores} "
            "(the same config but StorageBackend; S3 = Swift s3api on 127.0.0.1, its data "
            f"on {tmp_root}; Swift's CPU is its own process tree, not in hmacfs's):"
        )
        print(backends_table)
        memo = next((r for r in backend_rows if r["metric"] == "rss_per_upload_mib"), None)
        if memo and memo["s3"] is not None:
            print(
                f"memory per in-flight S3 upload: {memo['s3'] * KiB:,.0f} KiB RSS "
                f"(peak during {bench.concurrent_count} concurrent 16 MiB uploads minus idle, "
                f"/ {bench.concurrent_count})"
            )
    elif "skipped" in backends:
        print(f"S3 rows: skipped, {backends['skipped']}")
    elif "error" in backends:
        print(f"S3 rows: FAIL, {backends['error']}")
    for (peer, workload), why in NOT_COMPARABLE.items():
        if peer in servers_wanted and workload in bench.only:
            print(f"† {workload}: {why}; no ratio.")
    for line in skipped:
        print(line)
    single_table, single_rows = "", []
    variants = {str(options.hmacfs_cores): "hmacfs"} if "hmacfs" in servers_wanted else {}
    if scaling_cores:
        variants[str(scaling_cores["alt"])] = "hmacfs-alt"
    if "1" in variants and "plain" in servers_wanted:
        single_table, single_rows = render_single_table(bench, results, variants)
        if single_rows:
            print("\nsingle process against single process (hmacfs NumCores=1 / plain twisted.web):")
            print(single_table)
    if resume_cost:
        ratio = resume_cost.get("ratio")
        print(
            "cost of resumability, big PUT MiB/s: hmacfs without a token {plain}, "
            "with X-Session-Token + Redis {redis}, "
            "ratio {ratio} (target >= 0.95)".format(
                plain=fmt(resume_cost.get("plain")), redis=fmt(resume_cost.get("redis")),
                ratio=f"{ratio:.2f}" if ratio else "-",
            )
        )
    scaling: dict[str, Any] = {}
    if scaling_cores and "put_small" in bench.only:
        main_rps, _ = aggregate(results.get("hmacfs", {}).get("put_small", []), "rps")
        alt_rps, alt_error = aggregate(results.get("hmacfs-alt", {}).get("put_small", []), "rps")
        by_cores = {str(scaling_cores["main"]): main_rps, str(scaling_cores["alt"]): alt_rps}
        one, many = by_cores.get("1"), by_cores.get("auto") or next(
            (v for k, v in by_cores.items() if k != "1"), None)
        scaling = {"rps_by_numcores": by_cores, "alt_error": alt_error,
                   "speedup": many / one if one and many else None}
        print(
            f"worker scaling, 4 KiB PUTs req/s: NumCores=1 {fmt(one)}, "
            f"NumCores=auto ({os.cpu_count()} CPUs) {fmt(many)}, "
            f"speedup {scaling['speedup']:.2f}x" if scaling["speedup"] else
            f"worker scaling: incomplete ({alt_error or 'no figure'})"
        )
    if load_before.get("busy_fraction", 0) > 0.1:
        print(
            f"note: CPUs were {load_before['busy_fraction']:.0%} busy with other work "
            "before the start "
            f"(see machine_load_before in the JSON)."
        )

    for s in servers:
        if s.start_error:
            print(f"\n{s.name} start failure:\n{s.start_error}")
    out = Path(options.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for per_server in results.values():
        for entries in per_server.values():
            for e in entries:
                e.pop("_stored", None)
    report = {
        "command": command,
        "date": started_at.isoformat(timespec="seconds"),
        "host": {
            "cpus": os.cpu_count(),
            "kernel": platform.release(),
            "python": platform.python_version(),
            "nginx": tool_version([find_tool("nginx"), "-v"])
            if "nginx" in servers_wanted
            else None,
            "wrk": tool_version([find_tool("wrk"), "-v"]),
            "curl": tool_version([find_tool("curl"), "--version"]),
            "tmp_root": str(tmp_root),
        },
        "parameters": {
            "quick": options.quick,
            "runs": bench.runs,
            "big_bytes": bench.big_size,
            "small_puts": bench.small_count,
            "connections": options.connections,
            "wrk_threads": WRK_THREADS,
            "get_seconds": bench.get_seconds,
            "slow_count": bench.slow_count,
            "slow_seconds": bench.slow_seconds,
            "s3_small_puts": bench.s3_small_count,
            "concurrent_uploads": bench.concurrent_count,
            "concurrent_seconds": bench.concurrent_seconds,
            "servers": servers_wanted,
            "hmacfs_cores": options.hmacfs_cores,
            "hmacfs_alt_cores": scaling_cores.get("alt"),
            "nginx_workers": options.nginx_workers,
            "nginx_body_buffer": options.nginx_body_buffer,
            "workloads": sorted(bench.only),
        },
        "machine_load_before": load_before,
        "machine_load_after": machine_load(),
        "start_errors": {s.name: s.start_error for s in servers if s.start_error},
        "rows": rows,
        "runs": results,
        "scaling": scaling,
        "resume_cost": resume_cost,
        "resume_runs": resume_results,
        "scaling_runs": results.get("hmacfs-alt", {}),
        "single_process": single_rows,
        "table": table,
        "single_process_table": single_table,
        "backends": {**backends, "rows": backend_rows, "runs": backend_results,
                     "table": backends_table},
    }
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")
    failed = any(r.get(f"{n}_error") for r in rows for n in servers_wanted)
    failed = failed or "error" in backends or any(r["errors"] for r in backend_rows)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
