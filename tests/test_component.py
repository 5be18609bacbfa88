"""
The XEP-0114 upload component without a server: the real twisted.words
XmlStream and component authenticator on a StringTransport, fed the stanzas
an XMPP server would route to us, plus the plain policy objects and the
reconnect back-off on a fake endpoint and a Clock.
"""

from __future__ import annotations

import hashlib
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote_to_bytes, urlsplit

from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionDone, ConnectionRefusedError
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from hmacfs.config import ConfigError, parse_config
from hmacfs.signing.auth import Authenticator, AuthError
from hmacfs.signing.paths import parse_slot_path
from hmacfs.xmpp.component import (
    NS_UPLOAD,
    NS_UPLOAD_LEGACY,
    ComponentService,
    DailyQuota,
    FileTooLarge,
    QuotaExceeded,
    SlotPolicy,
    SlotRequest,
    UploadAccess,
    UploadHandler,
    component_from_config,
    default_access,
)

SECRET = b"upload-secret-0123456789"
PASSWORD = "component-password"
JID = "upload.example.org"
NS_STANZAS = "urn:ietf:params:xml:ns:xmpp-stanzas"
NS_DISCO_INFO = "http://jabber.org/protocol/disco#info"
NS_XDATA = "jabber:x:data"
DAY = 86400


@implementer(IStreamClientEndpoint)
class FakeEndpoint:
    """Records connection attempts; the test decides how each one ends."""

    def __init__(self) -> None:
        self.attempts: list[tuple[Any, Deferred]] = []

    def connect(self, factory: Any) -> Deferred:
        attempt: Deferred = Deferred()
        self.attempts.append((factory, attempt))
        return attempt


def make_policy(clock: Clock, **overrides: Any) -> SlotPolicy:
    arguments: dict[str, Any] = dict(
        secret=lambda: SECRET,
        base_url="https://upload.example.org/upload",
        max_size=10_000_000,
        access=UploadAccess(default_access(JID)),
        quota=DailyQuota(0, clock),
        expiry=300.0,
        clock=clock,
    )
    arguments.update(overrides)
    return SlotPolicy(**arguments)


class Server:
    """The XMPP server's side of one component connection."""

    def __init__(self, factory: Any) -> None:
        self.transport = StringTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 5347))
        self.protocol = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 5347))
        self.protocol.makeConnection(self.transport)

    def sent(self) -> bytes:
        data = self.transport.value()
        self.transport.clear()
        return data

    def receive(self, data: str) -> None:
        self.protocol.dataReceived(data.encode("utf-8"))

    def open_stream(self, stream_id: str = "s1d") -> bytes:
        """Answer the component's stream header; returns the handshake it then sends."""
        header = self.sent()
        assert b"jabber:component:accept" in header, header
        assert f"to='{JID}'".encode() in header or f'to="{JID}"'.encode() in header, header
        self.receive(
            "<stream:stream xmlns='jabber:component:accept' "
            "xmlns:stream='http://etherx.jabber.org/streams' "
            f"from='{JID}' id='{stream_id}'>"
        )
        return self.sent()

    def log_in(self) -> None:
        handshake = self.open_stream()
        expected = hashlib.sha1(b"s1d" + PASSWORD.encode()).hexdigest().encode()
        assert expected in handshake, handshake
        self.receive("<handshake/>")

    def iq(self, body: str, *, sender: str = "alice@example.org/phone", kind: str = "get") -> ET.Element:
        """Route one IQ to the component and parse the single reply."""
        self.sent()
        self.receive(f"<iq type='{kind}' id='q1' from='{sender}' to='{JID}'>{body}</iq>")
        reply = ET.fromstring(self.sent())
        assert reply.tag == "iq" and reply.get("id") == "q1", reply
        assert reply.get("to") == sender and reply.get("from") == JID, reply.attrib
        return reply


def connected_component(
    clock: Clock | None = None, **overrides: Any
) -> tuple[ComponentService, Server, FakeEndpoint, Clock]:
    clock = clock or Clock()
    clock.advance(1_700_000_000)
    endpoint = FakeEndpoint()
    service = ComponentService(
        jid=JID,
        password=PASSWORD,
        endpoint=endpoint,
        handler=UploadHandler(make_policy(clock, **overrides)),
        clock=clock,
        jitter=lambda: 0.0,
    )
    service.startService()
    factory, attempt = endpoint.attempts[-1]
    server = Server(factory)
    attempt.callback(server.protocol)
    server.log_in()
    return service, server, endpoint, clock


def error_of(reply: ET.Element) -> tuple[str | None, str]:
    """The error type and the defined condition of an error reply."""
    assert reply.get("type") == "error", ET.tostring(reply)
    element = reply.find("error")
    assert element is not None
    conditions = [child.tag for child in element if child.tag.startswith("{" + NS_STANZAS + "}")]
    condition = next(tag for tag in conditions if not tag.endswith("}text"))
    return element.get("type"), condition.split("}")[1]


class ComponentStanzaTests(SynchronousTestCase):
    """What the component answers on a live (string) stream."""

    def setUp(self) -> None:
        self.service, self.server, self.endpoint, self.clock = connected_component()
        self.assertTrue(self.service.connected)

    def request(self, filename: str | None = "photo.jpg", size: str | None = "1000", **kw: Any) -> ET.Element:
        attributes = ""
        if filename is not None:
            attributes += f" filename='{filename}'"
        if size is not None:
            attributes += f" size='{size}'"
        return self.server.iq(
            f"<request xmlns='{NS_UPLOAD}'{attributes} content-type='image/jpeg'/>", **kw
        )

    def test_disco_info(self) -> None:
        """disco#info: store/file identity, both upload features, a form per namespace."""
        reply = self.server.iq(f"<query xmlns='{NS_DISCO_INFO}'/>")
        self.assertEqual(reply.get("type"), "result")
        query = reply.find(f"{{{NS_DISCO_INFO}}}query")
        identity = query.find(f"{{{NS_DISCO_INFO}}}identity")
        self.assertEqual((identity.get("category"), identity.get("type")), ("store", "file"))
        features = {f.get("var") for f in query.findall(f"{{{NS_DISCO_INFO}}}feature")}
        self.assertIn(NS_UPLOAD, features)
        self.assertIn(NS_UPLOAD_LEGACY, features)
        forms = {}
        for form in query.findall(f"{{{NS_XDATA}}}x"):
            values = {
                field.get("var"): field.find(f"{{{NS_XDATA}}}value").text
                for field in form.findall(f"{{{NS_XDATA}}}field")
            }
            self.assertEqual(form.get("type"), "result")
            forms[values["FORM_TYPE"]] = values
        self.assertEqual(forms[NS_UPLOAD]["max-file-size"], "10000000")
        self.assertEqual(forms[NS_UPLOAD_LEGACY]["max-file-size"], "10000000")

    def test_disco_info_unknown_node(self) -> None:
        """A disco#info query for a node we do not have is item-not-found."""
        reply = self.server.iq(f"<query xmlns='{NS_DISCO_INFO}' node='x'/>")
        self.assertEqual(error_of(reply)[1], "item-not-found")

    def test_slot_v0(self) -> None:
        """A :0 request gets put/get URLs as attributes; the PUT is v3, expiring in 5 minutes."""
        reply = self.request()
        self.assertEqual(reply.get("type"), "result")
        slot = reply.find(f"{{{NS_UPLOAD}}}slot")
        put = slot.find(f"{{{NS_UPLOAD}}}put").get("url")
        get = slot.find(f"{{{NS_UPLOAD}}}get").get("url")
        self.assertTrue(get.startswith("https://upload.example.org/upload/"), get)
        self.assertTrue(get.endswith("/photo.jpg"), get)
        self.assertEqual(put.split("?")[0], get)
        query = parse_qs(urlsplit(put).query)
        self.assertEqual(query["expires"], [str(1_700_000_000 + 300)])
        self.assertEqual(len(query["v3"][0]), 64)
        self.assertEqual(slot.find(f"{{{NS_UPLOAD}}}put").findall(f"{{{NS_UPLOAD}}}header"), [])

    def test_slot_verifies_with_authenticator(self) -> None:
        """The PUT URL is accepted by hmacfs's Authenticator until expires + skew, not after."""
        put = self.request(filename="my file ü.txt").find(f"{{{NS_UPLOAD}}}slot/{{{NS_UPLOAD}}}put").get("url")
        parts = urlsplit(put)
        query = {k.encode(): [v.encode() for v in vs] for k, vs in parse_qs(parts.query).items()}
        authenticator = Authenticator(lambda: (SECRET,), self.clock, clock_skew=30)

        def check() -> str:
            return authenticator.verify_upload(
                method=b"PUT",
                full_path=unquote_to_bytes(parts.path),
                slot=parse_slot_path(parts.path.encode(), "upload"),
                query=query,
                size=1000,
                content_type=b"image/jpeg",
            ).scheme

        self.assertEqual(check(), "v3")
        self.clock.advance(330)
        self.assertEqual(check(), "v3")
        self.clock.advance(1)
        self.assertEqual(self.assertRaises(AuthError, check).reason, "expired")

    def test_slot_legacy(self) -> None:
        """A legacy request (child elements) gets <put>/<get> text children."""
        reply = self.server.iq(
            f"<request xmlns='{NS_UPLOAD_LEGACY}'><filename>old.txt</filename>"
            "<size>42</size><content-type>text/plain</content-type></request>"
        )
        self.assertEqual(reply.get("type"), "result")
        slot = reply.find(f"{{{NS_UPLOAD_LEGACY}}}slot")
        put = slot.find(f"{{{NS_UPLOAD_LEGACY}}}put").text
        get = slot.find(f"{{{NS_UPLOAD_LEGACY}}}get").text
        self.assertTrue(get.endswith("/old.txt"))
        self.assertEqual(put.split("?")[0], get)
        self.assertIn("v3=", put)

    def test_each_slot_is_new(self) -> None:
        """Two requests for the same name get different random segments."""
        first = self.request().find(f"{{{NS_UPLOAD}}}slot/{{{NS_UPLOAD}}}get").get("url")
        second = self.request().find(f"{{{NS_UPLOAD}}}slot/{{{NS_UPLOAD}}}get").get("url")
        self.assertNotEqual(first, second)

    def test_too_large(self) -> None:
        """Over MaxUploadSize: modify/not-acceptable with <file-too-large><max-file-size>."""
        reply = self.request(size="10000001")
        self.assertEqual(error_of(reply), ("modify", "not-acceptable"))
        too_large = reply.find(f"error/{{{NS_UPLOAD}}}file-too-large")
        self.assertEqual(too_large.find(f"{{{NS_UPLOAD}}}max-file-size").text, "10000000")

    def test_too_large_legacy(self) -> None:
        """The legacy namespace gets the same error in its own namespace."""
        reply = self.server.iq(
            f"<request xmlns='{NS_UPLOAD_LEGACY}'><filename>a</filename><size>99999999</size></request>"
        )
        too_large = reply.find(f"error/{{{NS_UPLOAD_LEGACY}}}file-too-large")
        self.assertEqual(too_large.find(f"{{{NS_UPLOAD_LEGACY}}}max-file-size").text, "10000000")

    def test_bad_requests(self) -> None:
        """A / in the filename, no filename, no or a bad size, a ".." name: modify/bad-request."""
        for filename, size in (("a/b", "1"), (None, "1"), ("a", None), ("a", "-1"), ("a", "1e3"), ("..", "1")):
            reply = self.request(filename=filename, size=size)
            self.assertEqual(error_of(reply), ("modify", "bad-request"), (filename, size))

    def test_forbidden_outside_access(self) -> None:
        """A requester outside UploadAccess (default: the parent domain) gets auth/forbidden."""
        reply = self.request(sender="mallory@elsewhere.net/x")
        self.assertEqual(error_of(reply), ("auth", "forbidden"))

    def test_unknown_iq(self) -> None:
        """An IQ we do not understand gets service-unavailable; a set request too."""
        reply = self.server.iq("<query xmlns='jabber:iq:version'/>")
        self.assertEqual(error_of(reply)[1], "service-unavailable")
        reply = self.server.iq(f"<request xmlns='{NS_UPLOAD}' filename='a' size='1'/>", kind="set")
        self.assertEqual(error_of(reply)[1], "service-unavailable")

    def test_ping(self) -> None:
        """XEP-0199 pings from the server are answered."""
        reply = self.server.iq("<ping xmlns='urn:xmpp:ping'/>")
        self.assertEqual(reply.get("type"), "result")

    def test_results_ignored(self) -> None:
        """IQ results and messages get no reply (no loops with the server)."""
        self.server.sent()
        self.server.receive(f"<iq type='result' id='x' from='example.org' to='{JID}'/>")
        self.server.receive(f"<message from='a@example.org' to='{JID}'><body>hi</body></message>")
        self.assertEqual(self.server.sent(), b"")


class QuotaOnStreamTests(SynchronousTestCase):
    """UserQuota as the client sees it."""

    def test_quota_used_up(self) -> None:
        """Past the daily quota: wait/resource-constraint with <retry stamp> at next UTC midnight."""
        clock = Clock()
        _, server, _, _ = connected_component(clock, quota=DailyQuota(1500, clock))
        body = f"<request xmlns='{NS_UPLOAD}' filename='a.bin' size='1000'/>"
        self.assertEqual(server.iq(body).get("type"), "result")
        reply = server.iq(body)
        self.assertEqual(error_of(reply), ("wait", "resource-constraint"))
        retry = reply.find(f"error/{{{NS_UPLOAD}}}retry")
        # 1_700_000_000 is 2023-11-14T22:13:20Z.
        self.assertEqual(retry.get("stamp"), "2023-11-15T00:00:00Z")
        # Another user still has their whole quota.
        self.assertEqual(server.iq(body, sender="bob@example.org/pc").get("type"), "result")


class PolicyTests(SynchronousTestCase):
    """The plain objects behind the stanzas."""

    def test_default_access(self) -> None:
        """Without UploadAccess, users of the parent domain (and the component's own) may upload."""
        self.assertEqual(default_access("upload.example.org"), ("example.org", "upload.example.org"))
        self.assertEqual(default_access("localhost"), ("localhost",))

    def test_access_entries(self) -> None:
        """Domains allow all their users, bare JIDs one user, * anyone."""
        access = UploadAccess(["example.org", "Bob@Other.net"])
        self.assertTrue(access.allows("alice@example.org/phone"))
        self.assertTrue(access.allows("bob@other.net/pc"))
        self.assertFalse(access.allows("carol@other.net"))
        self.assertFalse(access.allows("alice@sub.example.org"))
        self.assertTrue(UploadAccess(["*"]).allows("anyone@anywhere.example"))

    def test_quota_resets_daily(self) -> None:
        """The quota counts per UTC day and starts again at midnight."""
        clock = Clock()
        clock.advance(10 * DAY + 100)
        quota = DailyQuota(100, clock)
        quota.reserve("a@x", 60)
        error = self.assertRaises(QuotaExceeded, quota.reserve, "a@x", 41)
        self.assertEqual(error.retry_at, 11 * DAY)
        quota.reserve("a@x", 40)
        self.assertEqual(quota.used("a@x"), 100)
        clock.advance(DAY)
        self.assertEqual(quota.used("a@x"), 0)
        quota.reserve("a@x", 100)

    def test_refused_request_costs_nothing(self) -> None:
        """A refused request (too large) does not count against the quota."""
        clock = Clock()
        quota = DailyQuota(1000, clock)
        policy = make_policy(clock, quota=quota, max_size=500)
        request = SlotRequest("a@example.org/r", "f", "600", None, NS_UPLOAD)
        self.assertRaises(FileTooLarge, policy.issue, request)
        self.assertEqual(quota.used("a@example.org"), 0)

    def test_secret_read_per_slot(self) -> None:
        """A rotated secret is used for the next slot at once."""
        clock = Clock()
        secrets = [b"first-secret-0123456789"]
        policy = make_policy(clock, secret=lambda: secrets[-1])
        request = SlotRequest("a@example.org/r", "f.txt", "10", None, NS_UPLOAD)
        first = policy.issue(request)
        secrets.append(b"second-secret-012345678")
        second = policy.issue(request)
        for slot, secret in ((first, secrets[0]), (second, secrets[1])):
            parts = urlsplit(slot.put_url)
            query = {k.encode(): [v.encode() for v in vs] for k, vs in parse_qs(parts.query).items()}
            Authenticator(lambda secret=secret: (secret,), clock).verify_upload(
                method=b"PUT", full_path=unquote_to_bytes(parts.path),
                slot=parse_slot_path(parts.path.encode(), "upload"), query=query, size=10,
                content_type=None,
            )


class ReconnectTests(SynchronousTestCase):
    """The connection comes back after the server restarts, with back-off."""

    def make(self) -> tuple[ComponentService, FakeEndpoint, Clock]:
        clock = Clock()
        endpoint = FakeEndpoint()
        service = ComponentService(
            jid=JID, password=PASSWORD, endpoint=endpoint,
            handler=UploadHandler(make_policy(clock)), clock=clock, jitter=lambda: 0.0,
        )
        service.startService()
        self.addCleanup(lambda: service.running and service.stopService())
        return service, endpoint, clock

    def assertNextAttemptAfter(self, endpoint: FakeEndpoint, clock: Clock, delay: float) -> None:
        count = len(endpoint.attempts)
        clock.advance(delay - 0.01)
        self.assertEqual(len(endpoint.attempts), count, f"retried before {delay}s")
        clock.advance(0.01)
        self.assertEqual(len(endpoint.attempts), count + 1, f"no retry after {delay}s")

    def test_backoff_while_refused(self) -> None:
        """Refused connections are retried after 2, 4, 8 ... seconds, capped at 60."""
        _, endpoint, clock = self.make()
        delays = []
        for _ in range(8):
            endpoint.attempts[-1][1].errback(ConnectionRefusedError())
            delay = clock.getDelayedCalls()[0].getTime() - clock.seconds()
            delays.append(delay)
            clock.advance(delay)
        self.assertEqual(delays, [2.0, 4.0, 8.0, 16.0, 32.0, 60.0, 60.0, 60.0])

    def test_reconnect_after_server_restart(self) -> None:
        """A dropped, authenticated connection is re-established quickly and handlers work again."""
        service, endpoint, clock = self.make()
        factory, attempt = endpoint.attempts[-1]
        server = Server(factory)
        attempt.callback(server.protocol)
        server.log_in()
        self.assertTrue(service.connected)
        server.protocol.connectionLost(Failure(ConnectionDone()))
        self.assertFalse(service.connected)
        self.assertNextAttemptAfter(endpoint, clock, 2.0)
        factory, attempt = endpoint.attempts[-1]
        server = Server(factory)
        attempt.callback(server.protocol)
        server.log_in()
        reply = server.iq(f"<request xmlns='{NS_UPLOAD}' filename='a' size='1'/>")
        self.assertEqual(reply.get("type"), "result")

    def test_wrong_secret_backs_off(self) -> None:
        """Connections the server closes before the handshake count as failures for the back-off."""
        service, endpoint, clock = self.make()
        for delay in (4.0, 8.0, 16.0):
            factory, attempt = endpoint.attempts[-1]
            server = Server(factory)
            attempt.callback(server.protocol)
            server.open_stream()
            server.receive(
                "<stream:error><not-authorized xmlns='urn:ietf:params:xml:ns:xmpp-streams'/>"
                "</stream:error></stream:stream>"
            )
            server.protocol.connectionLost(Failure(ConnectionDone()))
            self.assertFalse(service.connected)
            self.assertNextAttemptAfter(endpoint, clock, delay)
        self.assertEqual(service.unauthenticated, 3)

    def test_handshake_timeout(self) -> None:
        """A server that never answers the handshake is dropped after the handshake timeout."""
        service, endpoint, clock = self.make()
        factory, attempt = endpoint.attempts[-1]
        server = Server(factory)
        attempt.callback(server.protocol)
        server.open_stream()
        clock.advance(29)
        self.assertFalse(server.transport.disconnecting)
        clock.advance(1)
        self.assertTrue(server.transport.disconnecting)

    def test_stop_stops_retrying(self) -> None:
        """After stopService no further connection attempts are made."""
        service, endpoint, clock = self.make()
        endpoint.attempts[-1][1].errback(ConnectionRefusedError())
        service.stopService()
        clock.advance(3600)
        self.assertEqual(len(endpoint.attempts), 1)


class ComponentConfigTests(SynchronousTestCase):
    """The component keys in config.toml."""

    def parse(self, **data: object):
        base = Path(self.mktemp()).absolute()
        base.mkdir()
        data.setdefault("Secret", "s3cr3t-Value-0123456789abcdef")
        return parse_config(data, base_dir=base)

    def test_values(self) -> None:
        """The keys convert to a client endpoint, a bare base URL, lowercased access, bytes and seconds."""
        config, warnings = self.parse(
            ComponentJID="Upload.Example.org", ComponentSecret="pw",
            ComponentServer="[::1]:5347", PublicURL="https://upload.example.org/",
            UploadAccess=["Example.org", "bob@other.net"], UserQuota="1GiB", SlotExpiry="10m",
        )
        self.assertEqual(config.component_jid, "upload.example.org")
        self.assertEqual(config.component_server, "tcp:host=\\:\\:1:port=5347")
        self.assertEqual(config.public_url, "https://upload.example.org")
        self.assertEqual(config.upload_access, ("example.org", "bob@other.net"))
        self.assertEqual((config.user_quota, config.slot_expiry), (1024**3, 600.0))
        self.assertEqual(warnings, [])

    def test_required_with_jid(self) -> None:
        """ComponentJID without ComponentSecret or PublicURL is an error naming the missing key."""
        error = self.assertRaises(ConfigError, self.parse, ComponentJID="upload.example.org", PublicURL="https://u.example.org")
        self.assertEqual(error.key, "ComponentSecret")
        error = self.assertRaises(ConfigError, self.parse, ComponentJID="upload.example.org", ComponentSecret="pw")
        self.assertEqual(error.key, "PublicURL")

    def test_secret_never_shown(self) -> None:
        """ComponentSecret is redacted in repr and redacted()."""
        config, _ = self.parse(ComponentJID="upload.example.org", ComponentSecret="very-secret-pw", PublicURL="https://u.example.org")
        self.assertNotIn("very-secret-pw", repr(config))
        self.assertNotIn("very-secret-pw", str(config.redacted()))
        error = self.assertRaises(ConfigError, self.parse, ComponentSecret=["very-secret-pw"])
        self.assertNotIn("very-secret-pw", str(error))

    def test_plain_http_warns(self) -> None:
        """An http PublicURL on a public host warns (clients need https); loopback does not."""
        _, warnings = self.parse(PublicURL="http://upload.example.org")
        self.assertEqual(len(warnings), 1)
        self.assertIn("https", warnings[0])
        _, warnings = self.parse(PublicURL="http://127.0.0.1:8080")
        self.assertEqual(warnings, [])

    def test_from_config(self) -> None:
        """component_from_config signs under PublicURL/UploadSubDir with SlotExpiry and the limits."""
        config, _ = self.parse(
            ComponentJID="upload.example.org", ComponentSecret="pw",
            PublicURL="https://files.example.org:8443", UploadSubDir="x/y",
            MaxUploadSize="1MiB", SlotExpiry="2m", UserQuota=5,
        )
        clock = Clock()
        service = component_from_config(config, clock, secret=lambda: SECRET)
        policy = service.handler.policy
        slot = policy.issue(SlotRequest("a@example.org/r", "f", "3", None, NS_UPLOAD))
        self.assertTrue(slot.get_url.startswith("https://files.example.org:8443/x/y/"))
        self.assertIn("expires=120", slot.put_url)
        self.assertEqual((policy.max_size, policy.quota.limit), (1024**2, 5))


class ServiceWiringTests(SynchronousTestCase):
    """ComponentJID in config.toml puts the component into the daemon's and the embedded services."""

    def config(self, **overrides: Any):
        from hmacfs.testing import make_config

        store = Path(self.mktemp()).resolve()
        store.mkdir(parents=True)
        settings = dict(
            component_jid=JID, component_secret=PASSWORD, public_url="https://upload.example.org"
        )
        settings.update(overrides)
        return make_config(store, **settings)

    def test_daemon_service(self) -> None:
        """The assembly adds one ComponentService signing with the ring's current secret."""
        from twisted.internet.testing import MemoryReactorClock

        from hmacfs.service.assembly import assemble

        tree = assemble(self.config(), MemoryReactorClock())
        components = [child for child in tree.service if isinstance(child, ComponentService)]
        self.assertEqual(components, [tree.component])
        assert isinstance(tree.component, ComponentService)
        policy = tree.component.handler.policy
        self.assertEqual(policy.secret(), tree.reload.ring.current)
        tree.reload.ring.rotate(b"rotated-secret-0123456789")
        self.assertEqual(policy.secret(), b"rotated-secret-0123456789")

    def test_no_component_without_jid(self) -> None:
        """Without ComponentJID there is no component service."""
        from twisted.internet.testing import MemoryReactorClock

        from hmacfs.service.assembly import make_service_from_config

        top = make_service_from_config(self.config(component_jid=""), MemoryReactorClock())
        self.assertFalse(any(isinstance(child, ComponentService) for child in top))

    def test_embedded_service(self) -> None:
        """An embedded hmacfs with ComponentJID runs the component as part of its service."""
        from twisted.internet.testing import MemoryReactorClock

        from hmacfs.embed import embed

        uploads = embed(self.config(), reactor=MemoryReactorClock())
        self.assertTrue(any(isinstance(child, ComponentService) for child in uploads.service))
