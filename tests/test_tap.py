"""The twistd plugin: option parsing and service assembly (nothing listens here)."""

from __future__ import annotations

from pathlib import Path

from twisted.application.internet import StreamServerEndpointService
from twisted.internet.testing import MemoryReactorClock
from twisted.plugin import getPlugins
from twisted.application.service import IServiceMaker
from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase

from hmacfs.tap import Options, make_service_from_config
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
