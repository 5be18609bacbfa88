"""The twistd plugin: option parsing and service assembly (nothing listens here)."""

from __future__ import annotations

from pathlib import Path

from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import IServiceMaker
from twisted.internet.error import CannotListenError
from twisted.internet.testing import MemoryReactorClock
from twisted.plugin import getPlugins
from twisted.python import usage
from twisted.trial.unittest import SkipTest, SynchronousTestCase

from hmacfs.service.tap import Options, make_service_from_config, tune_allocator
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
            "from hmacfs.service.tap import assemble_server\n"
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
