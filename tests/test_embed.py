"""
hmacfs inside a host application: the embedding API and the example
application under examples/, served on a loopback port by the test's own
reactor and driven with treq.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import signal
from pathlib import Path
from typing import Any

import treq
from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import MultiService
from twisted.internet import reactor
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.task import deferLater
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web import server
from twisted.web.client import HTTPConnectionPool
from twisted.web.resource import Resource
from twisted.web.static import Data

from hmacfs.embed import EmbeddedUpload, embed
from hmacfs.http.resource import UploadResource
from hmacfs.signing.auth import sign_slot
from hmacfs.testing import SECRET, make_config

ROOT = Path(__file__).resolve().parent.parent


def load_example() -> Any:
    """examples/ is not a package: import the example the way `python file.py` would."""
    path = ROOT / "examples" / "embedded_site.py"
    spec = importlib.util.spec_from_file_location("embedded_site_example", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class LiveTestCase(TestCase):
    """Starts a service tree and a listener on 127.0.0.1:0; stops both afterwards."""

    def setUp(self) -> None:
        self.store = Path(self.mktemp()).resolve()
        self.store.mkdir(parents=True)
        self.pool = HTTPConnectionPool(reactor, persistent=False)

    async def serve(self, application: MultiService, site: Any) -> str:
        endpoint = TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1")
        listener = StreamServerEndpointService(endpoint, site)
        listener.setServiceParent(application)
        application.startService()
        self.addCleanup(self.settle)
        self.addCleanup(application.stopService)
        port = await listener._waitingForPort
        return f"http://127.0.0.1:{port.getHost().port}"

    async def settle(self) -> None:
        """
        Let closed connections finish closing (a refused request keeps its
        socket half-open a moment, see request.LINGER_SECONDS), within 5 s.
        """
        await self.pool.closeCachedConnections()
        for _ in range(100):
            pending = [
                call for call in reactor.getDelayedCalls()
                if "_stop_lingering" in repr(call) or "Cooperator._tick" in repr(call)
            ]
            if not pending:
                return
            await deferLater(reactor, 0.05, lambda: None)

    async def request(self, method: str, url: str, **kwargs: Any) -> tuple[int, bytes, Any]:
        response = await treq.request(method, url, pool=self.pool, **kwargs)
        body = await treq.content(response)
        return response.code, body, response.headers


class ExampleApplicationTests(LiveTestCase):
    """examples/embedded_site.py: host pages and uploads on one port."""

    async def start(self) -> tuple[str, EmbeddedUpload]:
        example = load_example()
        application, site, uploads = example.build(
            self.store, SECRET, reactor=reactor, min_free_bytes=0, handle_sighup=False
        )
        return await self.serve(application, site), uploads

    def test_host_page_and_upload_roundtrip(self) -> Deferred[None]:
        """The index page, a slot from the host's form handler, PUT 201, GET the same bytes."""

        async def scenario() -> None:
            base, _ = await self.start()
            code, body, _ = await self.request("GET", base + "/")
            self.assertEqual(code, 200)
            self.assertIn(b"Example chat", body)

            payload = os.urandom(300_000)
            code, body, _ = await self.request(
                "POST", base + "/slot",
                data={"filename": "photo ü.jpg", "size": str(len(payload))},
            )
            self.assertEqual(code, 200, body)
            slot = json.loads(body)
            self.assertTrue(slot["get"].startswith(base + "/upload/"))
            self.assertIn("v3=", slot["put"])

            code, _, headers = await self.request("PUT", slot["put"], data=payload)
            self.assertEqual(code, 201)
            code, body, headers = await self.request("GET", slot["get"])
            self.assertEqual(code, 200)
            self.assertEqual(hashlib.sha256(body).digest(), hashlib.sha256(payload).digest())
            self.assertEqual(headers.getRawHeaders(b"X-Content-Type-Options"), [b"nosniff"])
            code, _, _ = await self.request("PUT", slot["put"], data=payload)
            self.assertEqual(code, 409)

        return ensureDeferred(scenario())

    def test_upload_refusals_come_from_hmacfs(self) -> Deferred[None]:
        """A bad MAC is hmacfs's 403 with CORS headers; the file is not stored."""

        async def scenario() -> None:
            base, _ = await self.start()
            url = base + "/upload/0e47a3ae-3d1b-4bd6-a7a9-f48d4a1a0a66/x.bin?v=" + "0" * 64
            code, body, headers = await self.request("PUT", url, data=b"hello")
            self.assertEqual(code, 403)
            self.assertIn(b"bad MAC", body)
            self.assertEqual(headers.getRawHeaders(b"Access-Control-Allow-Origin"), [b"*"])
            self.assertFalse((self.store / "0e47a3ae-3d1b-4bd6-a7a9-f48d4a1a0a66").exists())

        return ensureDeferred(scenario())

    def test_host_body_limit(self) -> Deferred[None]:
        """A host page's body over host_body_limit gets 413 before the host resource runs."""

        async def scenario() -> None:
            base, _ = await self.start()
            code, body, _ = await self.request(
                "POST", base + "/slot", data={"filename": "a" * (2 * 1024 * 1024), "size": "1"}
            )
            self.assertEqual(code, 413)
            self.assertIn(b"request body too large", body)

        return ensureDeferred(scenario())

    def test_host_paths_stay_the_hosts(self) -> Deferred[None]:
        """Unknown host paths are the host's 404s; a PUT there is not an upload."""

        async def scenario() -> None:
            base, _ = await self.start()
            code, _, _ = await self.request("GET", base + "/nothing-here")
            self.assertEqual(code, 404)
            code, _, _ = await self.request("PUT", base + "/slot", data=b"abc")
            self.assertEqual(code, 501)  # Twisted: no render_PUT anywhere; not an upload
            self.assertEqual(sorted(p.name for p in self.store.iterdir() if p.name != ".hmacfs"), [])

        return ensureDeferred(scenario())


class InstallTests(LiveTestCase):
    """install(): upgrading a Site the host built itself."""

    def test_install_into_plain_site(self) -> Deferred[None]:
        """A plain Site keeps its pages and gains a streaming upload tree at a two-segment prefix."""

        async def scenario() -> None:
            uploads = embed(
                make_config(self.store, upload_subdir="files/xmpp", min_free_bytes=0),
                reactor=reactor, handle_sighup=False,
            )
            root = Resource()
            root.putChild(b"hello", Data(b"hi there", "text/plain"))
            site = uploads.install(server.Site(root))
            # The channel's HeaderTimeout and per-client cap come along.
            limits = vars(site)["connection_limits"]  # set by install(); Site declares none
            self.assertEqual(limits.header_timeout, 30.0)
            self.assertEqual(limits.max_per_client, 64)
            application = MultiService()
            uploads.service.setServiceParent(application)
            base = await self.serve(application, site)

            code, body, _ = await self.request("GET", base + "/hello")
            self.assertEqual((code, body), (200, b"hi there"))
            slot = sign_slot(
                base_url=base + "/files/xmpp", path="0e47a3ae-3d1b-4bd6-a7a9-f48d4a1a0a66/a.txt",
                size=5, secret=SECRET,
            )
            code, _, _ = await self.request("PUT", slot.put_url, data=b"hello")
            self.assertEqual(code, 201)
            code, body, _ = await self.request("GET", slot.get_url)
            self.assertEqual((code, body), (200, b"hello"))

        return ensureDeferred(scenario())


class EmbedAPITests(SynchronousTestCase):
    """Building the pieces, without serving."""

    def setUp(self) -> None:
        self.store = Path(self.mktemp()).resolve()
        self.store.mkdir(parents=True)

    def test_keyword_settings(self) -> None:
        """embed() builds a config from keyword arguments, secret as text or bytes."""
        uploads = embed(store_dir=self.store, secret="text-secret-0123456789", max_upload_size=1234)
        self.assertEqual(uploads.config.secret, b"text-secret-0123456789")
        self.assertEqual(uploads.config.max_upload_size, 1234)
        self.assertEqual(uploads.prefix, "upload")
        self.assertIsInstance(uploads.resource, UploadResource)

    def test_argument_errors(self) -> None:
        """A missing secret, a config plus settings, or an empty prefix are refused."""
        self.assertRaises(TypeError, embed, store_dir=self.store)
        self.assertRaises(TypeError, embed, make_config(self.store), max_upload_size=1)
        self.assertRaises(ValueError, embed, make_config(self.store, upload_subdir=""))

    def test_service_has_no_listener(self) -> None:
        """The host listens: the embedded service tree holds no listener of its own."""
        uploads = embed(make_config(self.store))
        kinds = [type(child).__name__ for child in uploads.service]
        self.assertNotIn("StreamServerEndpointService", kinds)
        self.assertIn("DiskThreadPoolService", kinds)
        self.assertIn("DrainService", kinds)

    def test_handle_sighup(self) -> None:
        """By default the service handles SIGHUP while running; handle_sighup=False leaves it alone."""
        before = signal.getsignal(signal.SIGHUP)
        quiet = embed(make_config(self.store), handle_sighup=False)
        quiet.service.startService()
        try:
            self.assertIs(signal.getsignal(signal.SIGHUP), before)
        finally:
            quiet.service.stopService()
        loud = embed(make_config(self.store))
        loud.service.startService()
        try:
            self.assertIsNot(signal.getsignal(signal.SIGHUP), before)
        finally:
            loud.service.stopService()
        self.assertIs(signal.getsignal(signal.SIGHUP), before)

    def test_mount_nested(self) -> None:
        """mount() creates the intermediate resources of a multi-segment prefix, keeping existing ones."""
        uploads = embed(make_config(self.store, upload_subdir="a/b/c"))
        root = Resource()
        existing = Resource()
        root.putChild(b"a", existing)
        uploads.mount(root)
        self.assertIs(root.getStaticEntity(b"a"), existing)
        self.assertIs(
            existing.getStaticEntity(b"b").getStaticEntity(b"c"), uploads.resource
        )

    def test_install_refuses_custom_request(self) -> None:
        """install() refuses a Site whose request factory would spool uploads."""

        class MyRequest(server.Request):
            pass

        uploads = embed(make_config(self.store))
        site = server.Site(Resource(), requestFactory=MyRequest)
        self.assertRaises(TypeError, uploads.install, site)
