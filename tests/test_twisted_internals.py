"""
Every Twisted internal hmacfs uses, pinned, and confined to its two modules.

``hmacfs.http.channel`` (the streaming channel) and ``hmacfs.http.sendfile`` (the
sendfile producer) use private attributes of Twisted's classes and replace
some of its methods with edited copies.  A Twisted release that renames such
an attribute or changes such a method must fail here, naming the internal,
instead of misbehaving in production.  CI runs this module on the oldest and
the newest Twisted that pyproject.toml allows (``make test``).

When a test here fails after a Twisted upgrade: read the upstream change, adapt
the hmacfs module named in the message, then add the new fingerprint for that
release to ``UPSTREAM`` (and widen SUPPORTED_TWISTED in hmacfs/http/_twisted_compat.py
and the bounds in pyproject.toml).
"""

from __future__ import annotations

import ast
import hashlib
import inspect
import re
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

from twisted.internet import abstract, tcp, unix
from twisted.internet.interfaces import IPushProducer
from twisted.internet.testing import StringTransport
from twisted.protocols.policies import TimeoutMixin
from twisted.trial.unittest import SynchronousTestCase
from twisted.web import http, server
from twisted.web.resource import Resource
from zope.interface import implementer

import twisted
from hmacfs.http import _twisted_compat
from hmacfs.http import channel as request
from hmacfs.http._twisted_compat import SUPPORTED_TWISTED, UnsupportedTwisted, check_twisted_version

ROOT = Path(__file__).resolve().parent.parent
#: The only modules allowed to use Twisted internals (and the version check they import).
INTERNALS_MODULES = {"http/channel.py", "http/sendfile.py", "http/_twisted_compat.py"}
#: Shared test helpers shipped in the package (StringTransport, MemoryReactorClock); never
#: imported by the daemon (tests/test_tap.py checks its import footprint).
TEST_HELPERS = {"testing.py"}


def fingerprint(function: Callable[..., Any]) -> str:
    """A hash of a function's code: its AST without the docstring (comments and layout do not count)."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(function)))
    node = tree.body[0]
    assert isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
    first = node.body[0] if node.body else None
    if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
        if isinstance(first.value.value, str):
            node.body = node.body[1:]
    return hashlib.sha256(ast.dump(tree).encode()).hexdigest()[:16]


#: Upstream methods hmacfs copies, replaces or depends on line by line:
#: name -> (the method, what in hmacfs depends on it, {Twisted release: fingerprint}).
UPSTREAM: dict[str, tuple[Callable[..., Any], str, dict[str, str]]] = {
    "HTTPChannel.allHeadersReceived": (
        http.HTTPChannel.allHeadersReceived,
        "hmacfs.http.channel.StreamingChannel.allHeadersReceived is an edited copy of it",
        {"24.11.0": "1d6a1bf08fe1fbe6", "26.10.0": "1d6a1bf08fe1fbe6"},
    ),
    "HTTPChannel.lineReceived": (
        http.HTTPChannel.lineReceived,
        "it sets _command/_path/_version and calls allHeadersReceived, then "
        "allContentReceived when length is 0 (StreamingChannel._reject_before_body resets length)",
        {"24.11.0": "d024119422ee17b7", "26.10.0": "d024119422ee17b7"},
    ),
    "HTTPChannel.allContentReceived": (
        http.HTTPChannel.allContentReceived,
        "StreamingChannel._reject_before_body calls it to answer before the body",
        {"24.11.0": "8c814ab7f363929a", "26.10.0": "8c814ab7f363929a"},
    ),
    "HTTPChannel.loseConnection": (
        http.HTTPChannel.loseConnection,
        "StreamingChannel.loseConnection replaces it while lingering after an early refusal",
        {"24.11.0": "6afc30ecb36987cc", "26.10.0": "6afc30ecb36987cc"},
    ),
    "Request.gotLength": (
        http.Request.gotLength,
        "hmacfs.http.channel.StreamingRequest.gotLength replaces it (no spool file)",
        {"24.11.0": "8b015a9b64053f40", "26.10.0": "8b015a9b64053f40"},
    ),
    "Request.requestReceived": (
        http.Request.requestReceived,
        "hmacfs.http.channel.StreamingRequest.requestReceived replaces it without calling it "
        "(method, URI and args are set at header time)",
        {"24.11.0": "b05881ecafffedbb", "26.10.0": "30057b85dd68b4ed"},
    ),
    "HTTPChannel._maybeChooseTransferDecoder": (
        http.HTTPChannel._maybeChooseTransferDecoder,
        "GuardedChannel._maybeChooseTransferDecoder refuses an absurd Content-Length "
        "before it reaches this method's int()",
        {"24.11.0": "ddfa2376c8ba824b", "26.10.0": "ddfa2376c8ba824b"},
    ),
    "HTTPChannel.rawDataReceived": (
        http.HTTPChannel.rawDataReceived,
        "after an early refusal StreamingChannel replaces it on the instance with the discard; "
        "it pauses through _networkProducer, which the pause arbiter wraps",
        {"24.11.0": "738484af55fb7a3c", "26.10.0": "738484af55fb7a3c"},
    ),
    "HTTPChannel.requestDone": (
        http.HTTPChannel.requestDone,
        "GuardedChannel.requestDone ends the request's pauses, then relies on it to restore "
        "the saved idle timeout and resume through _networkProducer",
        {"24.11.0": "883a6b3682f6709b", "26.10.0": "883a6b3682f6709b"},
    ),
    "HTTPChannel.dataReceived": (
        http.HTTPChannel.dataReceived,
        "GuardedChannel.dataReceived arms the head deadline, then calls it",
        {"24.11.0": "4231f37f9c00dc35", "26.10.0": "4231f37f9c00dc35"},
    ),
    "HTTPChannel.pauseProducing": (
        http.HTTPChannel.pauseProducing,
        "a full send buffer pauses reading through _networkProducer (the arbiter's 'twisted' reason)",
        {"24.11.0": "1b3064b5d5666058", "26.10.0": "1b3064b5d5666058"},
    ),
    "HTTPChannel.resumeProducing": (
        http.HTTPChannel.resumeProducing,
        "the arbiter's 'twisted' reason is released only through _networkProducer",
        {"24.11.0": "0fc9798c88793c87", "26.10.0": "0fc9798c88793c87"},
    ),
    "FileDescriptor.doWrite": (
        abstract.FileDescriptor.doWrite,
        "hmacfs.http.sendfile waits for dataBuffer/_tempDataLen to drain and is resumed "
        "through producerPaused once the socket is writable",
        {"24.11.0": "261157599206c334", "26.10.0": "261157599206c334"},
    ),
}


class VersionCheckTests(SynchronousTestCase):
    def test_supported_releases_pass(self) -> None:
        for version in ("24.11.0", "25.5.0", "26.10.0", "26.11.0rc1", twisted.__version__):
            check_twisted_version(version)

    def test_unsupported_release_named_with_supported_range(self) -> None:
        """The error names the installed release and the supported ones."""
        for version in ("24.10.0", "27.1.0", "trunk"):
            error = self.assertRaises(UnsupportedTwisted, check_twisted_version, version)
            self.assertIn(f"Twisted {version} is installed", str(error))
            self.assertIn("supports Twisted 24.11 to 26.x", str(error))

    def test_internals_modules_refuse_unsupported_twisted_at_import(self) -> None:
        """Importing either internals module under an unsupported Twisted stops with that error."""
        for module in ("hmacfs.http.channel", "hmacfs.http.sendfile"):
            script = f"import twisted\ntwisted.__version__ = '27.1.0'\nimport {module}\n"
            result = subprocess.run(
                [sys.executable, "-c", script], capture_output=True, text=True, timeout=60
            )
            self.assertNotEqual(result.returncode, 0, module)
            self.assertIn("UnsupportedTwisted", result.stderr, module)
            self.assertIn("Twisted 27.1.0 is installed", result.stderr, module)

    def test_bounds_agree_with_packaging_and_ci(self) -> None:
        """pyproject.toml, the Makefile's oldest-Twisted run and SUPPORTED_TWISTED say the same."""
        (low_major, low_minor), (high_major, high_minor) = SUPPORTED_TWISTED
        pyproject = (ROOT / "pyproject.toml").read_text()
        bounds = re.search(r'"twisted\[tls\]>=(\d+)\.(\d+),<(\d+)"', pyproject)
        self.assertIsNotNone(bounds, "pyproject.toml: twisted[tls]>=X.Y,<Z")
        assert bounds is not None
        self.assertEqual((int(bounds[1]), int(bounds[2])), (low_major, low_minor))
        self.assertEqual((int(bounds[3]), high_minor), (high_major + 1, 99))
        oldest = re.search(r"^TWISTED_OLDEST := (\S+)$", (ROOT / "Makefile").read_text(), re.M)
        self.assertIsNotNone(oldest, "Makefile: TWISTED_OLDEST := X.Y.Z")
        assert oldest is not None
        self.assertEqual(oldest[1], f"{low_major}.{low_minor}.0")
        self.assertIn(oldest[1], next(iter(UPSTREAM.values()))[2])


class UpstreamMethodTests(SynchronousTestCase):
    def test_copied_methods_match_upstream(self) -> None:
        """Each upstream method hmacfs copies or depends on is one a reviewed release has."""
        changed = []
        for name, (function, why, known) in UPSTREAM.items():
            print_ = fingerprint(function)
            if print_ not in known.values():
                changed.append(
                    f"{name} (fingerprint {print_}) differs from every reviewed release "
                    f"{sorted(known)}: {why}"
                )
        self.assertEqual(changed, [], f"Twisted {twisted.__version__} changed internals")


class _RecordingChannel(http.HTTPChannel):
    """Twisted's own channel, noting its state at the point hmacfs's channel looks at it."""

    seen: dict[str, Any]

    def allHeadersReceived(self) -> None:
        self.seen = {
            name: getattr(self, name, AttributeError)
            for name in ("_command", "_path", "_version", "_buffer", "length", "persistent")
        }
        super().allHeadersReceived()


class AttributeTests(SynchronousTestCase):
    def missing(self, obj: object, names: tuple[str, ...]) -> list[str]:
        return [name for name in names if not hasattr(obj, name)]

    def test_channel_state_at_end_of_headers(self) -> None:
        """
        At allHeadersReceived the channel holds the request line in _command/_path/_version
        and the body bytes read with the headers in LineReceiver's _buffer.
        """
        channel = _RecordingChannel()
        channel.makeConnection(StringTransport())
        channel.dataReceived(b"PUT /upload/a?x=1 HTTP/1.1\r\nContent-Length: 9\r\n\r\nbody")
        seen = channel.seen
        self.assertEqual(
            (seen["_command"], seen["_path"], seen["_version"]),
            (b"PUT", b"/upload/a?x=1", b"HTTP/1.1"),
        )
        self.assertEqual(seen["_buffer"], b"body")
        self.assertEqual(seen["length"], 9)
        used = (
            "_transferDecoder",
            "_networkProducer",
            "_send100Continue",
            "checkPersistence",
            "allContentReceived",
            "timeOut",
            "setTimeout",
            "requests",
        )
        self.assertEqual(self.missing(channel, used), [], "used by hmacfs.http.channel")
        self.assertTrue(hasattr(channel._networkProducer, "unregisterProducer"))

    def test_request_attributes(self) -> None:
        channel = http.HTTPChannel()
        channel.site = server.Site(Resource())  # type: ignore[attr-defined]  # Site.buildProtocol sets it undeclared
        channel.makeConnection(StringTransport())
        req = server.Request(channel)
        self.assertIs(req._disconnected, False)  # hmacfs.http.channel: the client left
        self.assertIsNone(req._encoder)  # hmacfs.http.sendfile: gzip keeps the pread path
        self.assertEqual(req.sentLength, 0)  # hmacfs.http.sendfile counts sendfile'd bytes
        used = ("parseCookies", "gotLength", "handleContentChunk", "requestReceived", "processingFailed")
        self.assertEqual(self.missing(req, used), [], "used by hmacfs.http.channel")

    def test_file_descriptor_attributes(self) -> None:
        """The socket transports are FileDescriptors with the buffer state hmacfs.http.sendfile reads."""
        self.assertTrue(issubclass(tcp.Server, abstract.FileDescriptor))
        self.assertTrue(issubclass(unix.Server, abstract.FileDescriptor))
        descriptor = abstract.FileDescriptor()
        self.assertEqual((descriptor.dataBuffer, descriptor._tempDataLen), (b"", 0))
        self.assertIs(descriptor.producerPaused, False)
        self.assertEqual(self.missing(descriptor, ("startWriting", "fileno")), [])

    def test_paused_producer_resumed_once_flushed(self) -> None:
        """What sendfile's wait relies on: a paused streaming producer is resumed when the buffer drains."""

        @implementer(IPushProducer)
        class Producer:
            resumed = 0

            def resumeProducing(self) -> None:
                self.resumed += 1

            def pauseProducing(self) -> None:
                pass

            def stopProducing(self) -> None:
                pass

        class Descriptor(abstract.FileDescriptor):
            def writeSomeData(self, data: bytes) -> int:
                return len(data)

            def startWriting(self) -> None:
                pass

            def stopWriting(self) -> None:
                pass

        descriptor = Descriptor()
        producer = Producer()
        descriptor.registerProducer(producer, True)
        descriptor.write(b"headers")
        descriptor.producerPaused = True
        descriptor.doWrite()
        self.assertEqual((descriptor.dataBuffer, descriptor._tempDataLen), (b"", 0))
        self.assertEqual(producer.resumed, 1)


class ContainmentTests(SynchronousTestCase):
    """Outside the internals modules, hmacfs uses only Twisted's public API."""

    maxDiff = None

    #: FileDescriptor machinery that is public by name but not part of any interface
    #: hmacfs may rely on outside hmacfs.http.sendfile.
    DESCRIPTOR_NAMES = {"startReading", "stopReading", "startWriting", "stopWriting",
                        "producerPaused", "dataBuffer"}
    #: namedtuple's public API
    PUBLIC_UNDERSCORE = {"_replace", "_asdict", "_fields", "_make"}
    PRIVATE_MODULES = ("twisted.internet.testing", "twisted.test", "twisted.trial",
                       "twisted.internet.abstract", "twisted.internet.fdesc")

    def modules(self) -> dict[str, ast.Module]:
        package = ROOT / "hmacfs"
        trees = {
            path.relative_to(package).as_posix(): ast.parse(path.read_text(), str(path))
            for path in sorted(package.rglob("*.py"))
        }
        # the whole package, folders included (a scan of the top level alone would pass anything)
        self.assertIn("http/resource.py", trees)
        return trees

    def own_private_names(self, trees: dict[str, ast.Module]) -> set[str]:
        """Private names hmacfs defines itself (functions, classes, attributes it assigns)."""
        names: set[str] = set()
        for name, tree in trees.items():
            if name in INTERNALS_MODULES:
                continue
            for node in ast.walk(tree):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                    names.add(node.name)
                elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
                    if isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"):
                        names.add(node.attr)
                elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                    names.add(node.id)
                elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
                    names.add(node.target.id)
        return {name for name in names if name.startswith("_")}

    def test_twisted_internals_only_in_internals_modules(self) -> None:
        trees = self.modules()
        ours = self.own_private_names(trees)
        found = []
        for name, tree in trees.items():
            if name in INTERNALS_MODULES:
                continue
            for node in ast.walk(tree):
                where = f"hmacfs/{name}:{getattr(node, 'lineno', '?')}"
                if isinstance(node, (ast.Import, ast.ImportFrom)) and name not in TEST_HELPERS:
                    if isinstance(node, ast.Import):
                        modules = [alias.name for alias in node.names]
                    else:
                        modules = [node.module or ""]
                        modules += [f"{node.module}.{alias.name}" for alias in node.names]
                    for module in modules:
                        if module.startswith(self.PRIVATE_MODULES) or re.search(r"(^|\.)_", module):
                            if module.startswith(("twisted", "zope")):
                                found.append(f"{where}: imports {module}")
                    if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("twisted"):
                        found.extend(f"{where}: imports {alias.name} from {node.module}"
                                     for alias in node.names if alias.name.startswith("_"))
                elif isinstance(node, ast.Attribute):
                    owner = node.value.id if isinstance(node.value, ast.Name) else None
                    if owner in ("self", "cls"):
                        continue
                    if (owner, node.attr) == ("os", "_exit"):
                        continue  # the standard library's exit for a forked child (hmacfs.service.zygote)
                    if node.attr.startswith("_") and not node.attr.startswith("__"):
                        if node.attr not in ours | self.PUBLIC_UNDERSCORE:
                            if node.attr.startswith("_hmacfs"):
                                continue
                            found.append(f"{where}: .{node.attr}")
                    elif node.attr in self.DESCRIPTOR_NAMES:
                        found.append(f"{where}: .{node.attr} (FileDescriptor machinery)")
                elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
                    if node.func.id in ("getattr", "hasattr", "setattr") and len(node.args) > 1:
                        key = node.args[1]
                        if isinstance(key, ast.Constant) and isinstance(key.value, str):
                            if key.value.startswith("_") and key.value not in ours:
                                if not key.value.startswith("_hmacfs"):
                                    found.append(f"{where}: {node.func.id}(..., {key.value!r})")
                elif isinstance(node, ast.ClassDef):
                    for base in node.bases:
                        if isinstance(base, ast.Name) and base.id == "FileDescriptor":
                            found.append(f"{where}: subclasses FileDescriptor")
        self.assertEqual(
            found, [], "Twisted internals outside hmacfs/http/channel.py and hmacfs/http/sendfile.py"
        )

    def test_internals_modules_check_the_version(self) -> None:
        """Both internals modules import the version check before using anything."""
        for name in ("http/channel.py", "http/sendfile.py"):
            tree = self.modules()[name]
            imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import)
                        for alias in node.names}
            imported |= {node.module for node in ast.walk(tree)
                         if isinstance(node, ast.ImportFrom) and node.module}
            self.assertIn("hmacfs.http._twisted_compat", imported, name)
        self.assertIs(_twisted_compat.SUPPORTED_TWISTED, SUPPORTED_TWISTED)


class ChannelInternalsTests(SynchronousTestCase):
    """
    The HTTPChannel internals the channel relies on are there and behave as
    assumed, so a Twisted upgrade that moves them fails here, not in production.
    """

    def test_internals_exist(self) -> None:
        """Every name in TWISTED_INTERNALS is on a connected HTTPChannel."""
        channel = http.HTTPChannel()
        channel.makeConnection(StringTransport())
        channel.dataReceived(b"GET / HTTP/1.1\r\nHost: x")
        for name in request.TWISTED_INTERNALS:
            self.assertTrue(hasattr(channel, name), name)
        self.assertIsInstance(channel._buffer, bytes)
        self.assertIsInstance(channel._dataBuffer, list)
        self.assertIsInstance(channel._handlingRequest, bool)

    def test_network_producer_callers(self) -> None:
        """
        Twisted pauses and resumes the transport only through _networkProducer,
        from these methods; the arbiter wraps that attribute.
        """
        callers = {
            name
            for name, method in inspect.getmembers(http.HTTPChannel, inspect.isfunction)
            if "_networkProducer" in inspect.getsource(method)
        }
        self.assertEqual(
            callers,
            {"connectionMade", "rawDataReceived", "requestDone", "loseConnection",
             "pauseProducing", "resumeProducing"},
        )
        for name in ("rawDataReceived", "requestDone", "pauseProducing", "resumeProducing",
                     "allContentReceived", "_send100Continue", "allHeadersReceived"):
            source = inspect.getsource(getattr(http.HTTPChannel, name))
            self.assertNotIn("transport.pauseProducing", source, name)
            self.assertNotIn("transport.resumeProducing", source, name)

    def test_timeout_save_and_restore(self) -> None:
        """
        TimeoutMixin forgets the period on setTimeout(None), and HTTPChannel saves
        it around a request being answered only while it is set (pause_body relies on both).
        """
        mixin = TimeoutMixin()
        mixin.timeOut = 5
        mixin.setTimeout(None)
        self.assertIsNone(mixin.timeOut)
        self.assertIn("if self.timeOut:", inspect.getsource(http.HTTPChannel.allContentReceived))
        self.assertIn("self._savedTimeOut = self.setTimeout(None)",
                      inspect.getsource(http.HTTPChannel.allContentReceived))
        self.assertIn("self.setTimeout(self._savedTimeOut)", inspect.getsource(http.HTTPChannel.requestDone))

    def test_content_length_parsing(self) -> None:
        """Twisted's Content-Length parsing is the method overridden (it int()s the digits)."""
        source = inspect.getsource(http.HTTPChannel._maybeChooseTransferDecoder)
        self.assertIn('header == b"Content-Length"', source)
        self.assertIn("int(data)", source)
