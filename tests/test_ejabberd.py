"""
SLOW SUITE: a real ejabberd (Debian ``ejabberd``) signs upload slots with
``mod_http_upload`` and ``external_secret``, configured from the shipped
``packaging/ejabberd.yml``; a real XMPP client (slixmpp's ``xep_0363``) asks
for a slot and uploads to the real hmacfs daemon, then downloads.

ejabberd's slots differ from Prosody's: three segments (SHA-1 of the JID, a
random part, the file name with everything but letters, digits, ``_ . -``
replaced), ``misc:url_encode`` escaping, and the ``v`` MAC over path and size
(REFERENCE.md B).  This suite proves hmacfs accepts exactly those URLs.

ejabberd runs as its own system user (ejabberdctl switches to it), on a
loopback c2s port, with Erlang distribution on a loopback port and no epmd.
``make test-fast`` skips this suite.  In CI a missing ejabberd, or not being
root (ejabberdctl needs it to switch users), is a failure, never a skip.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from twisted.trial.unittest import SynchronousTestCase

from hmacfs.testing import SECRET, free_port, wait_for
from tests.test_integration import Daemon
from tests.test_prosody import (
    COMPONENT_SECRET,
    DOMAIN,
    MIB,
    NS_UPLOAD,
    PASSWORD,
    USER,
    ComponentDaemon,
    FilesystemStorage,
    RoundTripCase,
    S3Storage,
    Storage,
    UploadRoundTrip,
    discover,
    http,
    missing,
    request_slot,
    require_slixmpp,
    run_client,
)

EJABBERDCTL = shutil.which("ejabberdctl") or "/usr/sbin/ejabberdctl"
PACKAGED = Path(__file__).resolve().parent.parent / "packaging" / "ejabberd.yml"
UPLOAD_JID = f"upload.{DOMAIN}"
MAX_SIZE = 50 * MIB


def require_ejabberd() -> None:
    if not os.access(EJABBERDCTL, os.X_OK):
        missing("ejabberd (Debian package ejabberd)")
    if os.geteuid() != 0:
        missing("root (ejabberdctl runs ejabberd as the ejabberd user)")


def packaged_upload_module(put_url: str, secret: str, max_size: int) -> str:
    """packaging/ejabberd.yml with this test's URL, secret and size: what an operator pastes."""
    text = PACKAGED.read_text()
    replacements = {
        r'put_url: "[^"]*"': f'put_url: "{put_url}"',
        r'external_secret: "[^"]*"': f'external_secret: "{secret}"',
        r"max_size: \d+": f"max_size: {max_size}",
    }
    for pattern, value in replacements.items():
        text, count = re.subn(pattern, value, text)
        assert count == 1, f"{pattern!r} not found once in {PACKAGED}"
    return text


class Ejabberd:
    """One ejabberd node with its own config, spool and logs, on loopback ports."""

    def __init__(self, modules: str) -> None:
        """``modules`` is the ``modules:`` section; mod_disco and mod_roster are added to it."""
        self.dir = Path(tempfile.mkdtemp(prefix="hmacfs-ejabberd-"))
        self.c2s_port = free_port()
        self.component_port = free_port()
        dist_port = free_port()
        (self.dir / "ejabberd.yml").write_text(
            f"""
hosts:
  - {DOMAIN}
loglevel: info
certfiles: []
listen:
  -
    port: {self.c2s_port}
    ip: "127.0.0.1"
    module: ejabberd_c2s
    starttls: false
  -
    port: {self.component_port}
    ip: "127.0.0.1"
    module: ejabberd_service
    hosts:
      "{UPLOAD_JID}":
        password: "{COMPONENT_SECRET}"
auth_method: internal
acl:
  local:
    user_regexp: ""
access_rules:
  local:
    allow: local
  c2s:
    allow: all
shaper_rules:
  c2s_shaper: none
{modules}
  mod_roster: {{}}
"""
        )
        # ejabberdctl reads this instead of /etc/ejabberd/ejabberdctl.cfg (which would
        # point it back at /etc/ejabberd/ejabberd.yml).  A fixed distribution port means
        # no epmd, and nothing listens beyond loopback.
        (self.dir / "ejabberdctl.cfg").write_text(
            f'ERL_OPTIONS="-env ERL_CRASH_DUMP_BYTES 0"\n'
            f"EJABBERD_CONFIG_PATH={self.dir / 'ejabberd.yml'}\n"
            f"EJABBERD_PID_PATH={self.dir / 'ejabberd.pid'}\n"
            f"INET_DIST_INTERFACE=127.0.0.1\n"
            f"ERL_DIST_PORT={dist_port}\n"
        )
        (self.dir / "inetrc").write_text("{lookup, [file, native]}.\n")
        shutil.chown(self.dir, "ejabberd", "ejabberd")
        for path in self.dir.iterdir():
            shutil.chown(path, "ejabberd", "ejabberd")
        self.ctl = [
            EJABBERDCTL,
            "--config-dir", str(self.dir),
            "--ctl-config", str(self.dir / "ejabberdctl.cfg"),
            "--config", str(self.dir / "ejabberd.yml"),
            "--spool", str(self.dir),
            "--logs", str(self.dir),
            "--node", f"hmacfs{self.c2s_port}@localhost",
        ]
        self.output = open(self.dir / "foreground.out", "wb")
        self.process: subprocess.Popen | None = subprocess.Popen(
            [*self.ctl, "foreground"],
            cwd=self.dir, stdout=self.output, stderr=subprocess.STDOUT,
            start_new_session=True,  # su, sh and beam.smp: stopped as one group
        )
        try:
            self.wait_listening()
            self.run_ctl("register", USER, DOMAIN, PASSWORD)
        except BaseException:
            self.remove()
            raise

    def wait_listening(self, timeout: float = 60) -> None:
        assert self.process is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"ejabberd exited {self.process.returncode}: {self.log_tail()}")
            try:
                socket.create_connection(("127.0.0.1", self.c2s_port), timeout=1).close()
                return
            except OSError:
                time.sleep(0.1)
        raise AssertionError(f"ejabberd did not listen within {timeout}s: {self.log_tail()}")

    def run_ctl(self, *args: str) -> str:
        result = subprocess.run(
            [*self.ctl, *args], cwd=self.dir, capture_output=True, timeout=60
        )
        if result.returncode != 0:
            raise AssertionError(
                f"ejabberdctl {' '.join(args)} failed: {result.stdout!r} {result.stderr!r}"
            )
        return result.stdout.decode(errors="replace")

    def remove(self) -> None:
        process, self.process = self.process, None
        if process is not None and process.poll() is None:
            try:
                subprocess.run([*self.ctl, "stop"], cwd=self.dir, capture_output=True, timeout=30)
                process.wait(20)
            except subprocess.TimeoutExpired:
                pass
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(10)
        self.output.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    def log_tail(self) -> str:
        texts = []
        for name in ("foreground.out", "ejabberd.log", "error.log"):
            path = self.dir / name
            if path.exists():
                texts.append(path.read_text(errors="replace")[-3000:])
        return "\n".join(texts)


class EjabberdExternalRoundTrips(RoundTripCase):
    """ejabberd's mod_http_upload (external_secret) signs, hmacfs stores and serves."""

    #: where the daemon stores (a subclass runs the same tests on S3)
    make_storage: Callable[[], Storage] = FilesystemStorage

    def setUp(self) -> None:
        require_ejabberd()
        require_slixmpp()
        self.storage = self.make_storage()
        self.daemon = Daemon(extra=self.storage.config)
        self.addCleanup(self.daemon.stop)
        self.storage.attach(self.daemon)
        self.ejabberd = Ejabberd(
            packaged_upload_module(self.daemon.base(), SECRET.decode(), MAX_SIZE)
            + "  mod_disco: {}\n"
        )
        self.addCleanup(self.ejabberd.remove)

    def slot(self, name: str, size: int, content_type: str) -> dict[str, Any]:
        async def scenario(client: Any) -> dict[str, Any]:
            service = await discover(client)
            self.assertEqual(service, UPLOAD_JID)
            return await request_slot(client, service, name, size, content_type)

        return run_client(self.ejabberd, scenario)

    def test_upload_roundtrip(self) -> None:
        """A slot ejabberd signed (three segments, its escaping): 201, same bytes back (and in the store), then 409."""
        slot = self.slot("holiday photo ü.bin", 3 * MIB, "application/octet-stream")
        put = urlsplit(slot["put"])
        self.assertTrue(put.query.startswith("v="), slot["put"])
        segments = put.path.split("/")[2:]  # after "/upload"
        self.assertEqual(len(segments), 3, put.path)
        # ejabberd replaces the space and keeps the letter (escaped in the URL).
        self.assertEqual(segments[2], "holiday_photo_%C3%BC.bin")
        UploadRoundTrip().check(self, slot, "application/octet-stream", self.daemon.base(), self.storage)
        stored = self.storage.names("*/*/holiday_photo_ü.bin")
        self.assertEqual(len(stored), 1, self.storage.describe())


class EjabberdExternalSecretTests(EjabberdExternalRoundTrips, SynchronousTestCase):
    """ejabberd signs, hmacfs stores on its filesystem."""

    def test_size_is_bound(self) -> None:
        """ejabberd's MAC covers the size: a PUT of another length is refused and stores nothing."""
        slot = self.slot("notes.txt", 1000, "text/plain")
        status, _ = http("PUT", slot["put"], b"x" * 1001, {"Content-Type": "text/plain"})
        self.assertEqual(status, 403)
        status, _ = http("GET", slot["get"])
        self.assertEqual(status, 404)
        status, _ = http("PUT", slot["put"], b"x" * 1000, {"Content-Type": "text/plain"})
        self.assertEqual(status, 201)


class S3EjabberdExternalSecretTests(EjabberdExternalRoundTrips, SynchronousTestCase):
    """The same round trip with the daemon on the S3 backend (Swift's s3api)."""

    make_storage = S3Storage


class EjabberdComponentTests(SynchronousTestCase):
    """hmacfs as an XEP-0114 component of ejabberd (ejabberd_service), as README shows."""

    max_size = 10 * MIB
    #: where the daemon stores (a subclass runs the same test on S3)
    make_storage: Callable[[], Storage] = FilesystemStorage

    def setUp(self) -> None:
        require_ejabberd()
        require_slixmpp()
        # README: without mod_http_upload, list the component in mod_disco's extra_domains.
        self.ejabberd = Ejabberd(
            f"modules:\n  mod_disco:\n    extra_domains: [\"{UPLOAD_JID}\"]\n"
        )
        self.addCleanup(self.ejabberd.remove)
        self.storage = self.make_storage()
        self.daemon = ComponentDaemon(
            max_upload_size="10MiB",
            extra=(
                f'ComponentJID = "{UPLOAD_JID}"\n'
                f'ComponentSecret = "{COMPONENT_SECRET}"\n'
                f'ComponentServer = "127.0.0.1:{self.ejabberd.component_port}"\n'
                + self.storage.config
            ),
        )
        self.addCleanup(self.daemon.stop)
        self.storage.attach(self.daemon)
        logged_in = f"logged in to the XMPP server as component {UPLOAD_JID}"
        log = self.daemon.dir / "hmacfs.log"
        if not wait_for(lambda: log.exists() and logged_in in log.read_text(errors="replace"), 30):
            raise AssertionError(
                f"no component login:\n{self.daemon.log_tail()}\n{self.ejabberd.log_tail()}"
            )

    def test_discover_upload_download_too_large(self) -> None:
        """Disco finds hmacfs through ejabberd; its slot uploads and downloads; too large gets the max."""

        async def scenario(client: Any) -> dict[str, Any]:
            from slixmpp.exceptions import IqError

            service = await discover(client)
            slot = await request_slot(client, service, "report ü.pdf", 3 * MIB, "application/pdf")
            try:
                await request_slot(client, service, "huge.iso", self.max_size + 1, "application/octet-stream")
            except IqError as error:
                too_large: Any = error.iq
            else:
                too_large = None
            return {"service": service, "slot": slot, "too_large": too_large}

        result = run_client(self.ejabberd, scenario)
        self.assertEqual(result["service"], UPLOAD_JID)
        self.assertIn("v3=", result["slot"]["put"])
        UploadRoundTrip().check(self, result["slot"], "application/pdf", self.daemon.base(), self.storage)
        error = result["too_large"]
        self.assertIsNotNone(error, "a too-large request got a slot")
        self.assertEqual(error["error"]["condition"], "not-acceptable")
        size = error.xml.find(f".//{{{NS_UPLOAD}}}file-too-large/{{{NS_UPLOAD}}}max-file-size")
        self.assertEqual(size.text, str(self.max_size))


class S3EjabberdComponentTests(EjabberdComponentTests):
    """The component's round trip with the daemon on the S3 backend (Swift's s3api)."""

    make_storage = S3Storage
