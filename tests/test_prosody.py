"""
SLOW SUITE: a real Prosody (Debian ``prosody`` + ``prosody-modules``), a real
XMPP client (slixmpp with its ``xep_0363`` plugin) and the real hmacfs daemon,
all on loopback ports with their own temporary directories.

* Prosody's ``mod_http_upload_external`` (protocol v1, then v2) signs slots
  for hmacfs: the client discovers the service, asks for a slot, PUTs 3 MiB
  with the slot's headers, GETs them back (same SHA-256), and a second PUT to
  the same slot gets 409.
* hmacfs as an XEP-0114 component of Prosody: the client finds it through
  disco, gets a slot from it (``:0`` and legacy namespace), uploads and
  downloads; a too-large request gets ``file-too-large`` with hmacfs's
  ``MaxUploadSize``; after Prosody restarts, the component logs in again.

``make test-fast`` skips this suite.  In CI a missing prosody or slixmpp is
a failure, never a skip.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Protocol

from twisted.trial.unittest import SkipTest, SynchronousTestCase

from hmacfs.testing import SECRET, free_port, in_ci
from tests.test_integration import Daemon

PROSODY = shutil.which("prosody") or "/usr/bin/prosody"
PROSODYCTL = shutil.which("prosodyctl") or "/usr/bin/prosodyctl"
MODULES = Path("/usr/lib/prosody/modules")
UPLOAD_MODULE = MODULES / "mod_http_upload_external" / "mod_http_upload_external.lua"
DOMAIN = "localhost"
UPLOAD_JID = "upload.localhost"
USER, PASSWORD = "alice", "alice-password-123"
COMPONENT_SECRET = "component-secret-0123456789"
MIB = 1024 * 1024
NS_UPLOAD = "urn:xmpp:http:upload:0"
NS_UPLOAD_LEGACY = "urn:xmpp:http:upload"


def missing(what: str) -> None:
    if in_ci():
        raise AssertionError(f"{what} is required in CI (scripts/install-system-deps.sh, make test)")
    raise SkipTest(f"{what} not installed")


def require_prosody() -> None:
    if not (os.access(PROSODY, os.X_OK) and os.access(PROSODYCTL, os.X_OK)):
        missing("prosody (Debian package prosody)")
    if not UPLOAD_MODULE.exists():
        missing("mod_http_upload_external (Debian package prosody-modules)")


def require_slixmpp() -> Any:
    try:
        import slixmpp  # noqa: F401
        from slixmpp.plugins.xep_0363 import http_upload  # noqa: F401  (needs aiohttp)
    except ImportError as error:
        missing(f"slixmpp with its xep_0363 plugin ({error})")
    return slixmpp


def lua(text: str) -> str:
    """A Lua string literal."""
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


class Prosody:
    """One Prosody process with its own config and data directory on loopback ports."""

    def __init__(self, components: str) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="hmacfs-prosody-"))
        (self.dir / "data").mkdir()
        (self.dir / "certs").mkdir()
        self.c2s_port = free_port()
        self.component_port = free_port()
        self.config = self.dir / "prosody.cfg.lua"
        self.config.write_text(
            f"""
daemonize = false
run_as_root = true
pidfile = {lua(str(self.dir / "prosody.pid"))}
data_path = {lua(str(self.dir / "data"))}
certificates = {lua(str(self.dir / "certs"))}
plugin_paths = {{ {lua(str(MODULES))} }}
log = {{ {{ levels = {{ min = "debug" }}, to = "file", filename = {lua(str(self.dir / "prosody.log"))} }} }}
modules_enabled = {{ "disco", "saslauth", "roster", "ping" }}
modules_disabled = {{ "s2s", "posix" }}
interfaces = {{ "127.0.0.1" }}
c2s_ports = {{ {self.c2s_port} }}
component_interfaces = {{ "127.0.0.1" }}
component_ports = {{ {self.component_port} }}
c2s_require_encryption = false
allow_unencrypted_plain_auth = true
authentication = "internal_plain"
storage = "internal"
VirtualHost {lua(DOMAIN)}
{components}
"""
        )
        result = subprocess.run(
            [PROSODYCTL, "--config", str(self.config), "register", USER, DOMAIN, PASSWORD],
            capture_output=True, timeout=30,
        )
        if result.returncode != 0:
            raise AssertionError(f"prosodyctl register failed: {result.stdout!r} {result.stderr!r}")
        self.process: subprocess.Popen | None = None
        self.start()

    def start(self) -> None:
        self.output = open(self.dir / "prosody.out", "ab")
        self.process = subprocess.Popen(
            [PROSODY, "--config", str(self.config)],
            stdout=self.output, stderr=subprocess.STDOUT, cwd=self.dir,
        )
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"prosody exited {self.process.returncode}: {self.log_tail()}")
            try:
                socket.create_connection(("127.0.0.1", self.c2s_port), timeout=1).close()
                return
            except OSError:
                time.sleep(0.05)
        raise AssertionError(f"prosody did not listen within 20s: {self.log_tail()}")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        self.process = None
        self.output.close()

    def remove(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    def log_tail(self) -> str:
        texts = []
        for name in ("prosody.out", "prosody.log"):
            path = self.dir / name
            if path.exists():
                texts.append(path.read_text(errors="replace")[-3000:])
        return "\n".join(texts)


class XmppServer(Protocol):
    """What run_client needs of a server under test (Prosody, or test_ejabberd's Ejabberd)."""

    c2s_port: int


def run_client(prosody: XmppServer, scenario: Callable[[Any], Awaitable[Any]], timeout: float = 60) -> Any:
    """Log alice in with slixmpp, run ``scenario(client)`` on its event loop, log out."""
    slixmpp = require_slixmpp()

    async def session() -> Any:
        client = slixmpp.ClientXMPP(f"{USER}@{DOMAIN}/test", PASSWORD)
        # Plain TCP on loopback: no TLS offered, so do not try it.
        client.enable_direct_tls = False
        client.enable_starttls = False
        client.enable_plaintext = True
        client["feature_mechanisms"].unencrypted_plain = True
        client.register_plugin("xep_0030")
        client.register_plugin("xep_0363")
        started = asyncio.get_running_loop().create_future()

        def fail(_: Any) -> None:
            if not started.done():
                started.set_exception(AssertionError("login failed"))

        def start(_: Any) -> None:
            if not started.done():
                started.set_result(None)

        client.add_event_handler("session_start", start)
        client.add_event_handler("failed_all_auth", fail)
        client.connect("127.0.0.1", prosody.c2s_port)
        try:
            await asyncio.wait_for(started, 20)
            return await scenario(client)
        finally:
            await asyncio.wait_for(client.disconnect(wait=1), 10)

    loop = asyncio.new_event_loop()
    try:
        return loop.run_until_complete(asyncio.wait_for(session(), timeout))
    finally:
        # slixmpp leaves its filter task running after a disconnect: end it
        # here, while the loop can still run its cancellation.
        pending = asyncio.all_tasks(loop)
        for task in pending:
            task.cancel()
        loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
        loop.close()


def http(method: str, url: str, data: bytes | None = None, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    request = urllib.request.Request(url, data=data, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


async def discover(client: Any) -> str:
    """The upload service's JID, found as a real client does (disco#items, then disco#info)."""
    info = await client["xep_0363"].find_upload_service(domain=DOMAIN, timeout=10)
    assert info is not None, "no upload service found through disco"
    return str(info["from"])


async def request_slot(client: Any, service: str, name: str, size: int, content_type: str) -> dict[str, Any]:
    iq = await client["xep_0363"].request_slot(service, name, size, content_type, timeout=10)
    slot = iq["http_upload_slot"]
    return {
        "put": slot["put"]["url"],
        "get": slot["get"]["url"],
        "headers": {header["name"]: header["value"] for header in slot["put"]["headers"]},
    }


class UploadRoundTrip:
    """The client's half of an upload: PUT with the slot's headers, GET, PUT again."""

    def check(self, test: SynchronousTestCase, slot: dict[str, Any], content_type: str, base: str) -> None:
        payload = os.urandom(3 * MIB)
        test.assertTrue(slot["get"].startswith(base + "/"), slot["get"])
        headers = {"Content-Type": content_type, **slot["headers"]}
        status, body = http("PUT", slot["put"], payload, headers)
        test.assertEqual(status, 201, body)
        status, body = http("GET", slot["get"])
        test.assertEqual(status, 200)
        test.assertEqual(hashlib.sha256(body).hexdigest(), hashlib.sha256(payload).hexdigest())
        status, _ = http("PUT", slot["put"], os.urandom(3 * MIB), headers)
        test.assertEqual(status, 409)
        status, body = http("GET", slot["get"])
        test.assertEqual(hashlib.sha256(body).hexdigest(), hashlib.sha256(payload).hexdigest())


class ExternalModuleTests(SynchronousTestCase):
    """Prosody's mod_http_upload_external signs, hmacfs stores."""

    def setUp(self) -> None:
        require_prosody()
        require_slixmpp()
        self.daemon = Daemon()
        self.addCleanup(self.daemon.stop)

    def prosody_with_module(self, protocol: str) -> Prosody:
        prosody = Prosody(
            f"""
Component {lua(UPLOAD_JID)} "http_upload_external"
    http_upload_external_base_url = {lua(self.daemon.base() + "/")}
    http_upload_external_secret = {lua(SECRET.decode())}
    http_upload_external_protocol = {lua(protocol)}
    http_upload_external_file_size_limit = {50 * MIB}
"""
        )
        self.addCleanup(prosody.remove)
        return prosody

    def roundtrip(self, protocol: str, content_type: str) -> None:
        prosody = self.prosody_with_module(protocol)

        async def scenario(client: Any) -> dict[str, Any]:
            service = await discover(client)
            self.assertEqual(service, UPLOAD_JID)
            return await request_slot(client, service, "holiday photo ü.bin", 3 * MIB, content_type)

        slot = run_client(prosody, scenario)
        marker = "?v=" if protocol == "v1" else "?v2="
        self.assertIn(marker, slot["put"])
        UploadRoundTrip().check(self, slot, content_type, self.daemon.base())

    def test_v1_then_v2(self) -> None:
        """Protocol v1, then v2 (type bound): 201, same SHA-256 back, 409 on a second PUT."""
        self.roundtrip("v1", "application/octet-stream")
        self.roundtrip("v2", "image/png")

    def test_v2_type_is_bound(self) -> None:
        """With v2 a PUT whose Content-Type differs from the slot request is refused (403)."""
        prosody = self.prosody_with_module("v2")

        async def scenario(client: Any) -> dict[str, Any]:
            return await request_slot(client, UPLOAD_JID, "pic.png", 10, "image/png")

        slot = run_client(prosody, scenario)
        status, _ = http("PUT", slot["put"], b"0123456789", {"Content-Type": "image/jpeg"})
        self.assertEqual(status, 403)


class ComponentDaemon(Daemon):
    """The daemon with PublicURL pointing at its own loopback port."""

    def listen_config(self) -> str:
        return super().listen_config() + f'PublicURL = "http://127.0.0.1:{self.port}"\n'


class ComponentTests(SynchronousTestCase):
    """hmacfs logs in to Prosody as an XEP-0114 component and hands out slots itself."""

    max_size = 10 * MIB

    def setUp(self) -> None:
        require_prosody()
        require_slixmpp()
        self.prosody = Prosody(
            f"""
Component {lua(UPLOAD_JID)}
    component_secret = {lua(COMPONENT_SECRET)}
"""
        )
        self.addCleanup(self.prosody.remove)
        self.daemon = ComponentDaemon(
            max_upload_size="10MiB",
            extra=(
                f'ComponentJID = "{UPLOAD_JID}"\n'
                f'ComponentSecret = "{COMPONENT_SECRET}"\n'
                f'ComponentServer = "127.0.0.1:{self.prosody.component_port}"\n'
                'SlotExpiry = "2m"\n'
            ),
        )
        self.addCleanup(self.daemon.stop)
        self.wait_logged_in(1)

    def logins(self) -> int:
        log = self.daemon.dir / "hmacfs.log"
        text = log.read_text(errors="replace") if log.exists() else ""
        return text.count(f"logged in to the XMPP server as component {UPLOAD_JID}")

    def wait_logged_in(self, count: int, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.logins() >= count:
                return
            time.sleep(0.1)
        raise AssertionError(
            f"component login #{count} not seen within {timeout}s:\n{self.daemon.log_tail()}\n"
            f"{self.prosody.log_tail()}"
        )

    def test_discover_upload_download_too_large(self) -> None:
        """Disco finds hmacfs; :0 and legacy slots upload and download; too large gets the max size."""

        async def scenario(client: Any) -> dict[str, Any]:
            from slixmpp.exceptions import IqError

            service = await discover(client)
            info = await client["xep_0030"].get_info(service, timeout=10)
            features = set(info["disco_info"]["features"])
            slot = await request_slot(client, service, "report ü.pdf", 3 * MIB, "application/pdf")

            legacy = client.make_iq_get(ito=service)
            legacy.append(_legacy_request("old client.bin", 3 * MIB))
            legacy_reply = await legacy.send(timeout=10)
            legacy_slot = legacy_reply.xml.find(f"{{{NS_UPLOAD_LEGACY}}}slot")

            too_large: Any = None
            try:
                await request_slot(client, service, "huge.iso", self.max_size + 1, "application/octet-stream")
            except IqError as error:
                too_large = error.iq
            return {
                "service": service,
                "features": features,
                "max": info["disco_info"].xml.find(".//{jabber:x:data}field[@var='max-file-size']"),
                "slot": slot,
                "legacy": {
                    "put": legacy_slot.find(f"{{{NS_UPLOAD_LEGACY}}}put").text,
                    "get": legacy_slot.find(f"{{{NS_UPLOAD_LEGACY}}}get").text,
                    "headers": {},
                },
                "too_large": too_large,
            }

        result = run_client(self.prosody, scenario)
        self.assertEqual(result["service"], UPLOAD_JID)
        self.assertIn(NS_UPLOAD, result["features"])
        self.assertIn(NS_UPLOAD_LEGACY, result["features"])
        self.assertEqual(result["max"].find("{jabber:x:data}value").text, str(self.max_size))
        self.assertIn("v3=", result["slot"]["put"])
        self.assertIn("expires=", result["slot"]["put"])
        base = self.daemon.base()
        UploadRoundTrip().check(self, result["slot"], "application/pdf", base)
        UploadRoundTrip().check(self, result["legacy"], "application/octet-stream", base)

        error = result["too_large"]
        self.assertIsNotNone(error, "a too-large request got a slot")
        self.assertEqual(error["error"]["condition"], "not-acceptable")
        size = error.xml.find(f".//{{{NS_UPLOAD}}}file-too-large/{{{NS_UPLOAD}}}max-file-size")
        self.assertEqual(size.text, str(self.max_size))

    def test_reconnects_after_prosody_restart(self) -> None:
        """When Prosody restarts, the component logs in again by itself and serves slots."""
        self.prosody.stop()
        time.sleep(1.0)
        self.prosody.start()
        self.wait_logged_in(2)

        async def scenario(client: Any) -> dict[str, Any]:
            return await request_slot(client, UPLOAD_JID, "after.txt", 5, "text/plain")

        slot = run_client(self.prosody, scenario)
        status, _ = http("PUT", slot["put"], b"hello", {"Content-Type": "text/plain"})
        self.assertEqual(status, 201)


def _legacy_request(filename: str, size: int) -> Any:
    import xml.etree.ElementTree as ET

    request = ET.Element(f"{{{NS_UPLOAD_LEGACY}}}request")
    ET.SubElement(request, f"{{{NS_UPLOAD_LEGACY}}}filename").text = filename
    ET.SubElement(request, f"{{{NS_UPLOAD_LEGACY}}}size").text = str(size)
    ET.SubElement(request, f"{{{NS_UPLOAD_LEGACY}}}content-type").text = "application/octet-stream"
    return request
