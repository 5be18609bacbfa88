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
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Awaitable, Callable
from fnmatch import fnmatchcase
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import unquote, urlsplit

from twisted.trial.unittest import SkipTest, SynchronousTestCase

from hmacfs.testing import SECRET, free_port, in_ci
from tests.s3_bucket import BlockingBucket
from tests.s3_server import S3Server, shared_s3
from tests.test_integration import TWISTD, VENV_BIN, Daemon

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


class Storage(Protocol):
    """Where the daemon under test keeps uploads, as a test reads them back."""

    #: config lines for the daemon ("" = its default, the filesystem)
    config: str

    def attach(self, daemon: Daemon) -> None:
        """The daemon now runs with ``config``."""

    def stored(self, name: str) -> bytes:
        """The bytes stored for upload ``name`` (its path under the upload URL)."""

    def names(self, pattern: str) -> list[str]:
        """The uploads whose name matches ``pattern`` (glob, ``*`` within one segment)."""

    def describe(self) -> str:
        """Everything stored, for a failure message."""


class FilesystemStorage:
    """The default backend: each upload a file under the daemon's StoreDir."""

    config = ""

    def attach(self, daemon: Daemon) -> None:
        self.root = daemon.store

    def stored(self, name: str) -> bytes:
        return (self.root / name).read_bytes()

    def names(self, pattern: str) -> list[str]:
        return [str(path.relative_to(self.root)) for path in self.root.glob(pattern)]

    def describe(self) -> str:
        return repr(list(self.root.rglob("*")))


class S3Storage:
    """
    ``StorageBackend = "s3"``: each upload an object in a fresh bucket (under a prefix) on
    the test S3 server.  ``stored`` finds the key in a listing of the bucket first, so an
    upload that went anywhere else fails even if hmacfs could serve it back.
    """

    prefix = "xmpp/"

    def __init__(self, server: S3Server | None = None) -> None:
        self.bucket = BlockingBucket(server or shared_s3(), prefix=self.prefix).create()
        self.config = self.bucket.daemon_config()

    def attach(self, daemon: Daemon) -> None:
        pass

    def stored(self, name: str) -> bytes:
        key = self.prefix + name
        listing = self.bucket.uploads()
        if key not in listing:
            raise AssertionError(f"{key!r} is not in bucket {self.bucket.name}: {listing}")
        data = self.bucket.get(key)
        if len(data) != listing[key]:
            raise AssertionError(f"{key!r}: listed with {listing[key]} bytes, read {len(data)}")
        return data

    def names(self, pattern: str) -> list[str]:
        wanted = pattern.split("/")
        found = []
        for key in self.bucket.uploads():
            name = key[len(self.prefix) :]
            segments = name.split("/")
            if len(segments) == len(wanted) and all(map(fnmatchcase, segments, wanted)):
                found.append(name)
        return found

    def describe(self) -> str:
        return repr(self.bucket.objects())


def upload_name(get_url: str, base: str) -> str:
    """The upload's path under the upload URL (what the store names it by), unescaped."""
    path = urlsplit(get_url).path
    prefix = urlsplit(base).path + "/"
    assert path.startswith(prefix), (get_url, base)
    return unquote(path[len(prefix) :])


class UploadRoundTrip:
    """The client's half of an upload: PUT with the slot's headers, GET, PUT again."""

    def check(
        self,
        test: SynchronousTestCase,
        slot: dict[str, Any],
        content_type: str,
        base: str,
        storage: Storage | None = None,
    ) -> None:
        """With ``storage``, the stored upload must also hold exactly the bytes sent."""
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
        if storage is not None:
            stored = storage.stored(upload_name(slot["get"], base))
            test.assertEqual(hashlib.sha256(stored).hexdigest(), hashlib.sha256(payload).hexdigest())


# The round-trip tests are mixins (no TestCase base at run time, so trial does not collect
# them alone): each suite runs them once on the filesystem and once on S3.
if TYPE_CHECKING:
    RoundTripCase = SynchronousTestCase
else:
    RoundTripCase = object


class ExternalModuleRoundTrips(RoundTripCase):
    """Prosody's mod_http_upload_external signs, hmacfs stores."""

    #: where the daemon stores (a subclass runs the same tests on S3)
    make_storage: Callable[[], Storage] = FilesystemStorage

    def setUp(self) -> None:
        require_prosody()
        require_slixmpp()
        self.storage = self.make_storage()
        self.daemon = Daemon(extra=self.storage.config)
        self.addCleanup(self.daemon.stop)
        self.storage.attach(self.daemon)

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
        UploadRoundTrip().check(self, slot, content_type, self.daemon.base(), self.storage)

    def test_v1_then_v2(self) -> None:
        """Protocol v1, then v2 (type bound): 201, same SHA-256 back (and in the store), 409 on a second PUT."""
        self.roundtrip("v1", "application/octet-stream")
        self.roundtrip("v2", "image/png")


class ExternalModuleTests(ExternalModuleRoundTrips, SynchronousTestCase):
    """Prosody's mod_http_upload_external signs, hmacfs stores on its filesystem."""

    def test_v2_type_is_bound(self) -> None:
        """With v2 a PUT whose Content-Type differs from the slot request is refused (403)."""
        prosody = self.prosody_with_module("v2")

        async def scenario(client: Any) -> dict[str, Any]:
            return await request_slot(client, UPLOAD_JID, "pic.png", 10, "image/png")

        slot = run_client(prosody, scenario)
        status, _ = http("PUT", slot["put"], b"0123456789", {"Content-Type": "image/jpeg"})
        self.assertEqual(status, 403)


class S3ExternalModuleTests(ExternalModuleRoundTrips, SynchronousTestCase):
    """The same round trips with the daemon on the S3 backend (Swift's s3api)."""

    make_storage = S3Storage


class ComponentDaemon(Daemon):
    """The daemon with PublicURL pointing at its own loopback port."""

    def listen_config(self) -> str:
        return super().listen_config() + f'PublicURL = "http://127.0.0.1:{self.port}"\n'


class ComponentRoundTrips(RoundTripCase):
    """hmacfs logs in to Prosody as an XEP-0114 component and hands out slots itself."""

    max_size = 10 * MIB
    make_storage: Callable[[], Storage] = FilesystemStorage
    daemon_class: type[ComponentDaemon] = ComponentDaemon
    #: more config lines for the daemon
    daemon_extra = ""

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
        self.storage = self.make_storage()
        self.daemon = self.daemon_class(
            max_upload_size="10MiB",
            extra=(
                f'ComponentJID = "{UPLOAD_JID}"\n'
                f'ComponentSecret = "{COMPONENT_SECRET}"\n'
                f'ComponentServer = "127.0.0.1:{self.prosody.component_port}"\n'
                'SlotExpiry = "2m"\n'
                + self.storage.config
                + self.daemon_extra
            ),
        )
        self.addCleanup(self.daemon.stop)
        self.storage.attach(self.daemon)
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
        UploadRoundTrip().check(self, result["slot"], "application/pdf", base, self.storage)
        UploadRoundTrip().check(self, result["legacy"], "application/octet-stream", base, self.storage)

        error = result["too_large"]
        self.assertIsNotNone(error, "a too-large request got a slot")
        self.assertEqual(error["error"]["condition"], "not-acceptable")
        size = error.xml.find(f".//{{{NS_UPLOAD}}}file-too-large/{{{NS_UPLOAD}}}max-file-size")
        self.assertEqual(size.text, str(self.max_size))



class ComponentTests(ComponentRoundTrips, SynchronousTestCase):
    """hmacfs as Prosody's component, storing on its filesystem."""

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


class DebugComponentDaemon(ComponentDaemon):
    """The component daemon logging everything it can (LogLevel debug)."""

    log_level = "debug"


#: the S3 secret of the S3 component tests' own Swift: long and random, so that finding it
#: in a log line or a metric means it leaked (swift_saio.sh's default is a common word)
S3_SECRET = "s3-secret-" + secrets.token_hex(16)
_secret_server: S3Server | None = None


def secret_s3() -> S3Server:
    """A second test S3 server, with ``S3_SECRET``, started once per process."""
    global _secret_server
    if _secret_server is None:
        import atexit

        server = S3Server(secret=S3_SECRET)
        try:
            _secret_server = server.start()
        except BaseException:
            server.cleanup()
            raise
        atexit.register(server.cleanup)
    return _secret_server


class S3ComponentTests(ComponentRoundTrips, SynchronousTestCase):
    """
    The component's round trips with the daemon on the S3 backend (Swift's s3api), two
    workers, debug logging and metrics on: and the S3 secret shown nowhere.
    """

    daemon_class = DebugComponentDaemon

    def setUp(self) -> None:
        self.metrics_port = free_port()
        self.daemon_extra = (
            'NumCores = 2\nMetricsEnabled = true\n'
            f'MetricsPort = "127.0.0.1:{self.metrics_port}"\n'
        )
        super().setUp()

    def make_storage(self) -> Storage:
        self.s3 = S3Storage(secret_s3())
        return self.s3

    def test_s3_secret_never_shown(self) -> None:
        """
        After S3 traffic of every kind (a create, a 409, downloads, a miss) the S3 secret is
        in no line of the daemon's log or output, not in /metrics, not in ``check-config``,
        nor in the error of a daemon refused for a wrong secret; /metrics counts the S3
        requests by operation and outcome, each label from its bounded set.
        """
        from prometheus_client.parser import text_string_to_metric_families

        from hmacfs.storage.s3.observer import OPERATIONS, OUTCOMES

        async def scenario(client: Any) -> dict[str, Any]:
            return await request_slot(client, UPLOAD_JID, "secret check.bin", 3 * MIB, "text/plain")

        slot = run_client(self.prosody, scenario)
        base = self.daemon.base()
        UploadRoundTrip().check(self, slot, "text/plain", base, self.storage)
        status, _ = http("GET", base + "/no/such-upload.bin")
        self.assertEqual(status, 404)

        status, body = http("GET", f"http://127.0.0.1:{self.metrics_port}/metrics")
        self.assertEqual(status, 200)
        metrics = body.decode()
        self.assertNotIn(S3_SECRET, metrics)
        requests: dict[tuple[str, str], float] = {}
        moved: dict[str, float] = {}
        for family in text_string_to_metric_families(metrics):
            for sample in family.samples:
                if sample.name in ("hmacfs_s3_sent_bytes_total", "hmacfs_s3_received_bytes_total"):
                    self.assertEqual(sample.labels, {}, sample)
                    moved[sample.name] = sample.value
                elif sample.name == "hmacfs_s3_requests_total":
                    self.assertEqual(set(sample.labels), {"operation", "outcome"}, sample)
                    self.assertIn(sample.labels["operation"], OPERATIONS, sample)
                    self.assertIn(sample.labels["outcome"], OUTCOMES, sample)
                    requests[sample.labels["operation"], sample.labels["outcome"]] = sample.value
                elif sample.name.startswith("hmacfs_s3_request_seconds"):
                    self.assertEqual(set(sample.labels) - {"le"}, {"operation"}, sample)
                    self.assertIn(sample.labels["operation"], OPERATIONS, sample)
        self.assertGreaterEqual(requests.get(("PutObject", "ok"), 0), 1, requests)
        self.assertGreaterEqual(requests.get(("GetObject", "ok"), 0), 2, requests)
        # one upload of 3 MiB went to S3, and came back from it twice
        self.assertGreaterEqual(moved.get("hmacfs_s3_sent_bytes_total", 0), 3 * MIB, moved)
        self.assertGreaterEqual(moved.get("hmacfs_s3_received_bytes_total", 0), 6 * MIB, moved)

        cli = subprocess.run(
            [str(VENV_BIN / "hmacfs"), "check-config", str(self.daemon.config)],
            capture_output=True, timeout=60,
        )
        self.assertEqual(cli.returncode, 0, cli.stderr)
        self.assertIn(b"S3AccessKey", cli.stdout + cli.stderr)
        self.assertNotIn(S3_SECRET.encode(), cli.stdout + cli.stderr)

        self.daemon.terminate()
        # LogFile, and twistd's own log (stdout here), which has the lines from before
        # LogFile is opened: the start-up's storage line among them
        logs = b"".join((self.daemon.dir / name).read_bytes() for name in ("hmacfs.log", "twistd.out"))
        self.assertIn(f"storage: S3 bucket {self.s3.bucket.name}".encode(), logs)
        self.assertIn(b"PUT /upload/", logs)
        self.assertNotIn(S3_SECRET.encode(), logs)

        # Refused credentials: the daemon stops at start, naming the key, not the secret.
        wrong = "wrong-" + S3_SECRET
        config = self.daemon.dir / "wrong.toml"
        config.write_text(self.daemon.config.read_text().replace(S3_SECRET, wrong))
        refused = subprocess.run(
            [TWISTD, "--nodaemon", "--pidfile=", "hmacfs", "--config", str(config)],
            capture_output=True, timeout=60, cwd=self.daemon.cwd,
        )
        output = refused.stdout + refused.stderr + (self.daemon.dir / "hmacfs.log").read_bytes()
        self.assertNotEqual(refused.returncode, 0, output)
        self.assertIn(b"S3AccessKey", output)
        self.assertNotIn(S3_SECRET.encode(), output)




def _legacy_request(filename: str, size: int) -> Any:
    import xml.etree.ElementTree as ET

    request = ET.Element(f"{{{NS_UPLOAD_LEGACY}}}request")
    ET.SubElement(request, f"{{{NS_UPLOAD_LEGACY}}}filename").text = filename
    ET.SubElement(request, f"{{{NS_UPLOAD_LEGACY}}}size").text = str(size)
    ET.SubElement(request, f"{{{NS_UPLOAD_LEGACY}}}content-type").text = "application/octet-stream"
    return request
