"""The twistd plugin: option parsing and service assembly (nothing listens here)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import IServiceMaker
from twisted.internet.error import CannotListenError
from twisted.internet.testing import MemoryReactorClock
from twisted.plugin import getPlugins
from twisted.python import usage
from twisted.trial.unittest import SkipTest, SynchronousTestCase

from hmacfs.service.assembly import make_service_from_config
from hmacfs.service.process import tune_allocator
from hmacfs.service.tap import Options
from hmacfs.testing import make_config


class OptionsTests(SynchronousTestCase):
    def write(self, text: str) -> str:
        path = Path(self.mktemp()).resolve()
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        return str(path)

    def test_plugin_discoverable(self) -> None:
        """`twistd hmacfs` finds the plugin through twisted.plugins."""
        names = [maker.tapname for maker in getPlugins(IServiceMaker)]
        self.assertIn("hmacfs", names)

    def test_bad_value_is_usage_error_naming_key(self) -> None:
        """A bad value stops twistd before listening, naming key and value."""
        store = Path(self.mktemp()).resolve()
        store.mkdir()
        path = self.write(f'Secret = "0123456789abcdefXYZ"\nStoreDir = "{store}"\nReadTimeout = "soon"\n')
        options = Options()
        error = self.assertRaises(usage.UsageError, options.parseOptions, ["--config", path])
        self.assertIn("ReadTimeout", str(error))
        self.assertIn("soon", str(error))
        self.assertNotIn("0123456789abcdefXYZ", str(error))

    def test_missing_file(self) -> None:
        """A config path that does not exist is a usage error."""
        options = Options()
        error = self.assertRaises(usage.UsageError, options.parseOptions, ["--config", "/nonexistent/c.toml"])
        self.assertIn("does not exist", str(error))

    def test_s3_error_is_usage_error_naming_key(self) -> None:
        """An S3 configuration without a secret stops twistd before listening, naming
        S3SecretKey; a bad S3 value is named with its value."""
        store = Path(self.mktemp()).resolve()
        store.mkdir()
        base = (
            f'Secret = "0123456789abcdefXYZ"\nStoreDir = "{store}"\n'
            'StorageBackend = "s3"\nS3Bucket = "b-1"\nS3AccessKey = "AKIA"\n'
        )
        error = self.assertRaises(
            usage.UsageError, Options().parseOptions, ["--config", self.write(base)]
        )
        self.assertIn("S3SecretKey: '' is empty", str(error))
        path = self.write(base + 'S3SecretKey = "s3-secret-XYZ-0123"\nS3PartSize = "1MiB"\n')
        error = self.assertRaises(usage.UsageError, Options().parseOptions, ["--config", path])
        self.assertIn("S3PartSize: '1MiB' is out of range", str(error))
        self.assertNotIn("s3-secret-XYZ-0123", str(error))

    def test_good_config_loads(self) -> None:
        """A valid file gives a Config on the options."""
        store = Path(self.mktemp()).resolve()
        store.mkdir()
        path = self.write(f'Secret = "0123456789abcdef0123"\nStoreDir = "{store}"\nListenPort = "127.0.0.1:0"\n')
        options = Options()
        options.parseOptions(["--config", path])
        self.assertEqual(options.config_obj.store_dir, store)


class AssemblyTests(SynchronousTestCase):
    def test_assembly_does_not_listen(self) -> None:
        """makeService assembles services; the endpoint listens only when started."""
        store = Path(self.mktemp()).resolve()
        store.mkdir()
        reactor = MemoryReactorClock()
        config = make_config(store, listen="tcp:port=8123:interface=127.0.0.1")
        service = make_service_from_config(config, reactor)
        self.assertEqual(reactor.tcpServers, [])
        listeners = [s for s in service if isinstance(s, StreamServerEndpointService)]
        self.assertEqual(len(listeners), 1)
        service.startService()
        self.assertEqual(reactor.tcpServers[0][0], 8123)
        self.assertEqual(reactor.tcpServers[0][3], "127.0.0.1")
        service.stopService()

    def assertBindFailureRaised(self, **overrides: object) -> None:
        store = Path(self.mktemp()).resolve()
        store.mkdir()
        reactor = RefusingReactor()
        service = make_service_from_config(make_config(store, **overrides), reactor)
        self.assertRaises(CannotListenError, service.privilegedStartService)

    def test_bind_failure_is_raised_at_start(self) -> None:
        """
        A ListenPort that cannot be bound raises from privilegedStartService, so twistd
        exits with the error instead of running (and saying it started) without a port.
        """
        self.assertBindFailureRaised(listen="tcp:port=8123:interface=127.0.0.1")

    def test_metrics_bind_failure_is_raised_at_start(self) -> None:
        """The same for MetricsPort."""
        self.assertBindFailureRaised(
            metrics_enabled=True,
            listen="unix:/nonexistent/never-bound.sock",
            metrics_listen="tcp:port=9123:interface=127.0.0.1",
        )


class RefusingReactor(MemoryReactorClock):
    """Every TCP port is taken."""

    def listenTCP(self, port: int, *args: object, **kwargs: object) -> object:
        raise CannotListenError("127.0.0.1", port, OSError(98, "Address already in use"))


class FakeLibc:
    """Records mallopt calls; ``accept`` is what mallopt returns (1 = done)."""

    def __init__(self, accept: int = 1) -> None:
        self.calls: list[tuple[int, int]] = []
        self.accept = accept

    def mallopt(self, param: int, value: int) -> int:
        self.calls.append((param, value))
        return self.accept


class AllocatorTests(SynchronousTestCase):
    def test_thresholds_follow_buffer_size(self) -> None:
        """Socket-read buffers stay below the mmap threshold; the heap keeps 4x that before trimming."""
        M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
        for buffer_size, mmap in ((65536, 1024**2), (262144, 1024**2), (1024**2, 4 * 1024**2),
                                  (16 * 1024**2, 32 * 1024**2)):
            libc = FakeLibc()
            self.assertEqual(tune_allocator(buffer_size, libc), (mmap, 4 * mmap))
            self.assertEqual(libc.calls, [(M_MMAP_THRESHOLD, mmap), (M_TRIM_THRESHOLD, 4 * mmap)])

    def test_refused(self) -> None:
        """A C library that refuses the setting leaves its defaults, and we say so."""
        self.assertIsNone(tune_allocator(65536, FakeLibc(accept=0)))

    def test_real_glibc(self) -> None:
        """On this machine's glibc the call succeeds (the daemon's own processes make it)."""
        import platform

        if platform.libc_ver()[0] != "glibc":
            raise SkipTest("not glibc")
        self.assertEqual(tune_allocator(65536), (1024**2, 4 * 1024**2))


class ImportFootprintTests(SynchronousTestCase):
    def test_daemon_does_not_import_test_machinery(self) -> None:
        """Building the server for a plain config loads neither twisted.trial nor unittest
        (every worker process would carry them: about 2 MiB and 15 ms each)."""
        import subprocess
        import sys
        import tempfile

        script = (
            "import sys, tempfile\n"
            "from twisted.internet import reactor\n"
            "from hmacfs.config import default_config\n"
            "from hmacfs.service.assembly import assemble_server\n"
            "assemble_server(default_config(tempfile.mkdtemp(), b'secret-secret-secret-1234'),"
            " reactor, config_path=None)\n"
            "print(sorted(m for m in ('twisted.trial', 'unittest', 'pdb') if m in sys.modules))\n"
        )
        with tempfile.TemporaryDirectory() as cwd:
            result = subprocess.run(
                [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, cwd=cwd
            )
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertEqual(result.stdout.strip(), "[]")


#: Modules a configuration without TLS, Redis and metrics never needs: pyOpenSSL and
#: what comes with it (about 12 MiB per process), txredisapi, prometheus-client.
_OPTIONAL = ("OpenSSL", "cryptography", "service_identity", "twisted.internet.ssl",
             "txredisapi", "prometheus_client")

# The daemon's start (twistd's Options and makeService, then the reactor, as twistd
# imports it) or a worker's (leave_out_tls, the reactor, build_worker), in a fresh
# interpreter: prints which of _OPTIONAL ended up imported.
_FOOTPRINT = """
import socket, sys, types
kind, path, optional = sys.argv[1], sys.argv[2], sys.argv[3].split(",")
# What is measured is the imports: the S3 start-up check (a real S3 in tests.test_s3_store
# and tests.test_s3_daemon) answers here without a server, and imports nothing itself.
startup = types.ModuleType("hmacfs.storage.s3.startup")
startup.S3StartupError = type("S3StartupError", (Exception,), {})
startup.check_bucket = lambda settings, timeout=10.0: types.SimpleNamespace(conditional_writes=True)
sys.modules["hmacfs.storage.s3.startup"] = startup
if kind == "daemon":
    from hmacfs.service.tap import Options, makeService
    options = Options()
    options.parseOptions(["--config", path])
    makeService(options)
    from twisted.internet import reactor
else:
    from hmacfs.service.process import leave_out_tls
    leave_out_tls(path)
    from twisted.internet import reactor
    from hmacfs.config import load_config
    from hmacfs.service.worker_process import build_worker
    build_worker(load_config(path)[0], path, 99, socket.AF_INET, 0, reactor)
print(",".join(sorted(m for m in optional if sys.modules.get(m) is not None)))
"""


class ConfigFootprintTests(SynchronousTestCase):
    """
    What a daemon process imports depends on its configuration: the savings of
    leaving out TLS, Redis and prometheus-client are pinned here per shape.
    """

    def config(self, extra: str) -> str:
        store = Path(self.mktemp()).resolve()
        store.mkdir(parents=True)
        path = store.parent / "config.toml"
        path.write_text(
            f'Secret = "0123456789abcdef0123"\nStoreDir = "{store}"\n'
            'ListenPort = "127.0.0.1:0"\n' + extra
        )
        return str(path)

    def imported(self, kind: str, extra: str) -> list[str]:
        import subprocess
        import sys
        import tempfile

        with tempfile.TemporaryDirectory() as cwd:
            result = subprocess.run(
                [sys.executable, "-c", _FOOTPRINT, kind, self.config(extra), ",".join(_OPTIONAL)],
                capture_output=True, text=True, timeout=60, cwd=cwd,
            )
        self.assertEqual(result.returncode, 0, result.stderr)
        line = result.stdout.strip().splitlines()[-1] if result.stdout.strip() else ""
        return [name for name in line.split(",") if name]

    def test_single_process_plain(self) -> None:
        """NumCores = 1, no TLS, Redis or metrics: none of them is imported."""
        self.assertEqual(self.imported("daemon", "NumCores = 1\n"), [])

    def test_supervisor_plain(self) -> None:
        self.assertEqual(self.imported("daemon", "NumCores = 2\n"), [])

    def test_worker_plain(self) -> None:
        self.assertEqual(self.imported("worker", "NumCores = 2\n"), [])

    def test_metrics_bring_prometheus_only(self) -> None:
        extra = 'NumCores = 1\nMetricsEnabled = true\nMetricsPort = "127.0.0.1:0"\n'
        self.assertEqual(self.imported("daemon", extra), ["prometheus_client"])
        self.assertEqual(self.imported("worker", extra), ["prometheus_client"])

    def test_redis_keeps_tls(self) -> None:
        """RedisAddr: txredisapi (imported when the connection starts) needs Twisted's TLS
        module, so pyOpenSSL is not left out."""
        found = self.imported("worker", 'NumCores = 2\nRedisAddr = "127.0.0.1:1"\n')
        self.assertIn("OpenSSL", found)
        self.assertIn("twisted.internet.ssl", found)

    def test_s3_over_https_keeps_tls(self) -> None:
        """StorageBackend = "s3" with an https endpoint, or none (AWS): pyOpenSSL is not
        left out, in the daemon or a worker."""
        for endpoint in ('S3Endpoint = "https://s3.example.org"\n', ""):
            extra = f"NumCores = 2\n{_S3}{endpoint}"
            for kind in ("daemon", "worker"):
                self.assertIn("OpenSSL", self.imported(kind, extra), (kind, endpoint))

    def test_s3_over_http_leaves_tls_out(self) -> None:
        """The S3 backend on a plain http endpoint, or S3 keys with the filesystem backend
        (unused), still leave pyOpenSSL out."""
        http = f'NumCores = 2\n{_S3}S3Endpoint = "http://127.0.0.1:1"\n'
        self.assertEqual(self.imported("worker", http), [])
        unused = 'NumCores = 2\nS3Endpoint = "https://s3.example.org"\n'
        self.assertEqual(self.imported("worker", unused), [])


#: The S3 backend's required keys, for a config file.
_S3 = (
    'StorageBackend = "s3"\nS3Bucket = "hmacfs-uploads"\nS3AccessKey = "test:tester"\n'
    'S3SecretKey = "s3-secret-0123456789"\n'
)


class TlsNeededTests(SynchronousTestCase):
    def test_plain_config(self) -> None:
        from hmacfs.service.process import tls_needed

        self.assertFalse(tls_needed({"ListenPort": "127.0.0.1:8080", "MetricsPort": ":9090"}))

    def test_tls_endpoints_and_redis(self) -> None:
        from hmacfs.service.process import tls_needed

        for raw in (
            {"ListenPort": "ssl:8443:privateKey=k.pem"},
            {"ComponentServer": " TLS:host=xmpp.example:port=5347"},
            {"RedisAddr": "127.0.0.1:6379"},
            {"Nested": {"list": ["tls:x"]}},
        ):
            self.assertTrue(tls_needed(raw), raw)

    def test_s3_backend(self) -> None:
        """The S3 backend needs TLS unless its endpoint is plain http (read as the config
        loader reads it: case and spaces ignored); S3 keys with the filesystem backend do not,
        and a StorageBackend the loader will refuse decides nothing."""
        from hmacfs.service.process import tls_needed

        for raw in (
            {"StorageBackend": "s3"},
            {"StorageBackend": " S3 ", "S3Endpoint": ""},
            {"StorageBackend": "s3", "S3Endpoint": "https://s3.example.org"},
            {"StorageBackend": "s3", "S3Endpoint": "HTTPS://s3.example.org"},
            {"StorageBackend": "s3", "S3Endpoint": 443},
            {"StorageBackend": ["s3"]},
        ):
            self.assertTrue(tls_needed(raw), raw)
        for raw in (
            {"StorageBackend": "s3", "S3Endpoint": "http://127.0.0.1:8080"},
            {"StorageBackend": "s3", "S3Endpoint": " HTTP://minio.lan:9000"},
            {"StorageBackend": "filesystem", "S3Endpoint": "https://s3.example.org"},
            {"StorageBackend": " FileSystem"},
            {"S3Endpoint": "https://s3.example.org", "S3CAFile": "/etc/ca.pem"},
        ):
            self.assertFalse(tls_needed(raw), raw)

    def test_unreadable_config_keeps_tls(self) -> None:
        """A file that cannot be read decides nothing (load_config reports it)."""
        import sys

        from hmacfs.service.process import leave_out_tls

        before = sys.modules.get("OpenSSL", "absent")
        self.assertFalse(leave_out_tls(self.mktemp()))
        self.assertEqual(sys.modules.get("OpenSSL", "absent"), before)


# Run in a fresh interpreter: records what a snippet does to the process's
# environment, signal handlers and glibc's malloc (ctypes.CDLL is patched, so
# no mallopt call reaches the C library).
_PROBE = '''
import ctypes, json, os, signal, sys

mallopt_calls = []


class RecordingLibc:
    def __init__(self, real):
        self._real = real

    def mallopt(self, param, value):
        mallopt_calls.append([param, value])
        return 1

    def __getattr__(self, name):
        return getattr(self._real, name)


_RealCDLL = ctypes.CDLL
ctypes.CDLL = lambda *args, **kwargs: RecordingLibc(_RealCDLL(*args, **kwargs))


def handlers():
    return {int(s): repr(signal.getsignal(s)) for s in signal.valid_signals()
            if signal.getsignal(s) is not None}


env_before, handlers_before = dict(os.environ), handlers()
from prometheus_client import values
value_class_before = values.ValueClass
exec(sys.argv[1])
print(json.dumps({
    "env": {k: v for k, v in os.environ.items() if env_before.get(k) != v},
    "env_removed": sorted(set(env_before) - set(os.environ)),
    "signals": sorted(s for s, h in handlers().items() if handlers_before.get(s) != h),
    "mallopt": mallopt_calls,
    "value_class_changed": values.ValueClass is not value_class_before,
    "result": globals().get("result"),
}))
'''


class SideEffectTests(SynchronousTestCase):
    """
    Nothing process-wide changes on import or for an embedder: no environment
    variable, no signal handler, no mallopt, no prometheus-client mode.  Only
    the daemon's start (twistd's makeService, hmacfs.tac, the worker's main)
    sets them, and the multiprocess mode is undone when its tree stops.
    """

    def probe(self, snippet: str) -> dict[str, object]:
        import json
        import subprocess
        import sys
        import tempfile

        with tempfile.TemporaryDirectory() as cwd:
            result = subprocess.run(
                [sys.executable, "-c", _PROBE, snippet], capture_output=True, text=True,
                timeout=60, cwd=cwd,
            )
        self.assertEqual(result.returncode, 0, result.stderr)
        found: dict[str, object] = json.loads(result.stdout.strip().splitlines()[-1])
        return found

    def assertNoSideEffects(self, found: dict[str, object]) -> None:
        self.assertEqual(
            {key: found[key] for key in ("env", "env_removed", "signals", "mallopt", "value_class_changed")},
            {"env": {}, "env_removed": [], "signals": [], "mallopt": [], "value_class_changed": False},
        )

    def test_imports_change_nothing(self) -> None:
        """Importing the twistd plugin's module, the worker's main module and the embedding API."""
        self.assertNoSideEffects(self.probe(
            "import hmacfs.service.tap, hmacfs.service.worker, hmacfs.service.worker_process\n"
            "import hmacfs.embed\n"
        ))

    def test_embed_changes_nothing(self) -> None:
        """embed() with metrics and NumCores > 1 is still a single process that owns nothing."""
        self.assertNoSideEffects(self.probe(
            "import tempfile\n"
            "from twisted.internet.testing import MemoryReactorClock\n"
            "from hmacfs.embed import embed\n"
            "uploads = embed(store_dir=tempfile.mkdtemp(), secret=b'secret-secret-secret-1234',\n"
            "                reactor=MemoryReactorClock(), metrics_enabled=True, num_cores=4)\n"
            "result = type(uploads.site).__name__\n"
        ))

    def daemon_config(self, extra: str) -> str:
        store = Path(self.mktemp()).resolve()
        store.mkdir(parents=True)
        path = store.parent / "config.toml"
        path.write_text(
            f'Secret = "0123456789abcdef0123"\nStoreDir = "{store}"\nListenPort = "127.0.0.1:0"\n'
            'BufferSize = "256KiB"\n' + extra
        )
        return str(path)

    def test_daemon_start_tunes_allocator(self) -> None:
        """makeService (twistd hmacfs) raises glibc's malloc thresholds; nothing else for one process."""
        import platform

        path = self.daemon_config("NumCores = 1\nMetricsEnabled = true\n")
        found = self.probe(
            "from hmacfs.service.tap import Options, makeService\n"
            "options = Options()\n"
            f"options.parseOptions(['--config', {path!r}])\n"
            "makeService(options)\n"
        )
        if platform.libc_ver()[0] == "glibc":
            self.assertEqual(found["mallopt"], [[-3, 1024**2], [-1, 4 * 1024**2]])
        self.assertEqual((found["env"], found["value_class_changed"]), ({}, False))

    def test_daemon_start_supervisor_multiprocess_metrics(self) -> None:
        """
        With workers and metrics, makeService enters prometheus-client's multiprocess
        mode (the workers inherit the directory); stopping the tree undoes it.
        """
        path = self.daemon_config("NumCores = 2\nMetricsEnabled = true\nMetricsPort = \"127.0.0.1:0\"\n")
        found = self.probe(
            "import os\n"
            "from hmacfs.service.process import UndoOnStop\n"
            "from hmacfs.service.tap import Options, makeService\n"
            "options = Options()\n"
            f"options.parseOptions(['--config', {path!r}])\n"
            "service = makeService(options)\n"
            "directory = os.environ['PROMETHEUS_MULTIPROC_DIR']\n"
            "from prometheus_client import values\n"
            "started = [os.path.isdir(directory), getattr(values.ValueClass, '_multiprocess', False)]\n"
            "for child in service:\n"
            "    if isinstance(child, UndoOnStop):\n"
            "        child.stopService()\n"
            "result = started + [os.path.exists(directory), 'PROMETHEUS_MULTIPROC_DIR' in os.environ]\n"
        )
        self.assertEqual(found["result"], [True, True, False, False])
        self.assertNoSideEffects({**found, "mallopt": []})


class MultiprocessMetricsTests(SynchronousTestCase):
    def test_undo_restores_what_was_there(self) -> None:
        """undo() puts back a previous value of the variable and prometheus-client's value class."""
        import os

        from prometheus_client import values

        from hmacfs.service.metrics import MULTIPROC_ENV
        from hmacfs.service.process import MultiprocessMetrics

        self.patch(os, "environ", {**os.environ, MULTIPROC_ENV: "/elsewhere"})
        before = values.ValueClass
        self.addCleanup(setattr, values, "ValueClass", before)
        enabled = MultiprocessMetrics.enable()
        self.assertEqual(os.environ[MULTIPROC_ENV], str(enabled.directory))
        self.assertIsNot(values.ValueClass, before)
        self.assertTrue(enabled.directory.is_dir())
        enabled.undo()
        enabled.undo()
        self.assertEqual(os.environ[MULTIPROC_ENV], "/elsewhere")
        self.assertIs(values.ValueClass, before)
        self.assertFalse(enabled.directory.exists())


class CanPreforkTests(SynchronousTestCase):
    """Only twistd in the foreground, without a chroot, forks the zygote in makeService."""

    def config(self) -> str:
        store = Path(self.mktemp()).resolve()
        store.mkdir(parents=True)
        path = store.parent / "config.toml"
        path.write_text(f'Secret = "0123456789abcdef0123"\nStoreDir = "{store}"\nNumCores = 2\n')
        return str(path)

    def twistd_options(self, *flags: str) -> Any:
        from twisted.scripts.twistd import ServerOptions

        options = ServerOptions()
        options.parseOptions([*flags, "hmacfs", "--config", self.config()])
        return options.subOptions

    def test_options_alone_never_fork(self) -> None:
        """Options parsed on their own (tests, tools) have no twistd around them."""
        from hmacfs.service.tap import Options, can_prefork

        options = Options()
        options.parseOptions(["--config", self.config()])
        self.assertFalse(can_prefork(options))

    def test_foreground_twistd(self) -> None:
        from hmacfs.service.tap import can_prefork

        self.assertTrue(can_prefork(self.twistd_options("--nodaemon")))

    def test_daemon_mode_or_chroot(self) -> None:
        """Daemon mode forks twistd's process away after makeService; a chroot comes after it too."""
        from hmacfs.service.tap import can_prefork

        self.assertFalse(can_prefork(self.twistd_options()))
        self.assertFalse(can_prefork(self.twistd_options("--nodaemon", "--chroot", "/")))


class DrainTests(SynchronousTestCase):
    """``DrainService``: SIGTERM lets uploads in flight finish, and their answers go out."""

    def drain(self, active: list[int]) -> tuple[MemoryReactorClock, Any]:
        from types import SimpleNamespace

        from hmacfs.service.lifecycle import DrainService

        class Policy:
            @property
            def active(self) -> int:
                return active[0]

        clock = MemoryReactorClock()
        site: Any = SimpleNamespace(body_policy=Policy())
        service = DrainService(clock, site, timeout=20.0)
        service.startService()
        return clock, service.stopService()

    def test_nothing_in_flight_stops_at_once(self) -> None:
        _, stopped = self.drain([0])
        self.assertIsNone(self.successResultOf(stopped))

    def test_answer_of_the_last_upload_gets_written(self) -> None:
        """The upload ends: the stop waits a moment more, so that the reactor writes its
        201 before its shutdown drops what the transport has not sent (issue 12's CI run:
        nginx got no answer although the access log had the 201)."""
        from hmacfs.service.lifecycle import ANSWER_GRACE

        active = [1]
        clock, stopped = self.drain(active)
        clock.advance(0.5)
        self.assertNoResult(stopped)
        active[0] = 0
        clock.advance(0.1)  # the next check sees it ended
        self.assertNoResult(stopped)
        clock.advance(ANSWER_GRACE)
        self.assertIsNone(self.successResultOf(stopped))

    def test_gives_up_after_the_timeout(self) -> None:
        clock, stopped = self.drain([1])
        clock.pump([0.1] * 199)
        self.assertNoResult(stopped)
        clock.pump([0.1] * 2)
        self.assertIsNone(self.successResultOf(stopped))
