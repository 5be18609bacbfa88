"""
A tiny Twisted web application that serves XEP-0363 uploads with hmacfs next
to its own pages.

    python examples/embedded_site.py --store ./data --port 8080

* ``GET /``            the application's own index page;
* ``POST /slot``       form fields ``filename`` and ``size``: the application
                       (which would check its user's login first) hands out a
                       signed, expiring upload slot as JSON;
* ``/upload/...``      hmacfs: PUT to the slot's URL, GET the file back.

Everything is served by one Site on one port; hmacfs's background services
run as a child of the application's own service tree.  See ``hmacfs.embed``.
"""

from __future__ import annotations

import argparse
import json
import secrets
import sys
from pathlib import Path
from typing import Any

from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import MultiService
from twisted.internet.endpoints import serverFromString
from twisted.web.resource import Resource

from hmacfs.embed import EmbeddedUpload, embed
from hmacfs.signing.slots import SlotError, expiring_slot

INDEX = b"""<!doctype html>
<title>Example chat</title>
<h1>Example chat</h1>
<p>This page is the host application; uploads live under <code>/upload/</code>.</p>
<form method="post" action="/slot">
  <input name="filename" value="hello.txt"> <input name="size" value="5">
  <button>Get an upload slot</button>
</form>
"""


class IndexPage(Resource):
    """The host application's own page."""

    isLeaf = True

    def render_GET(self, request: Any) -> bytes:
        request.setHeader(b"Content-Type", b"text/html; charset=utf-8")
        return INDEX


class SlotPage(Resource):
    """Hands out upload slots; a real application would authenticate the user here."""

    isLeaf = True

    def __init__(self, uploads: EmbeddedUpload, slot_lifetime: float = 300.0) -> None:
        super().__init__()
        self.uploads = uploads
        self.slot_lifetime = slot_lifetime

    def render_POST(self, request: Any) -> bytes:
        request.setHeader(b"Content-Type", b"application/json")
        filename = request.args.get(b"filename", [b""])[0].decode("utf-8", "replace")
        size_text = request.args.get(b"size", [b""])[0]
        if not size_text.isdigit():
            request.setResponseCode(400)
            return b'{"error": "size must be a whole number"}\n'
        host = request.getRequestHostname().decode("ascii", "replace")
        port = request.getHost().port
        base_url = f"http://{host}:{port}/{self.uploads.prefix}"
        expires = int(self.uploads.site.reactor.seconds() + self.slot_lifetime)
        try:
            slot = expiring_slot(
                base_url=base_url,
                secret=self.uploads.config.read_secret(),
                filename=filename,
                size=int(size_text),
                expires=expires,
            )
        except SlotError as error:
            request.setResponseCode(400)
            return json.dumps({"error": error.reason}).encode() + b"\n"
        return json.dumps({"put": slot.put_url, "get": slot.get_url}).encode() + b"\n"


def build(store_dir: Path, secret: bytes, *, reactor: Any = None, **settings: Any) -> tuple[
    MultiService, Any, EmbeddedUpload
]:
    """
    The application's service tree and Site (not listening yet): its own
    pages at ``/`` and ``/slot``, hmacfs at ``/upload``.
    """
    settings.setdefault("upload_subdir", "upload")
    uploads = embed(store_dir=store_dir, secret=secret, reactor=reactor, **settings)
    root = Resource()
    root.putChild(b"", IndexPage())
    root.putChild(b"slot", SlotPage(uploads))
    site = uploads.site_for(root)
    application = MultiService()
    uploads.service.setServiceParent(application)
    return application, site, uploads


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--store", type=Path, default=Path("data"))
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--secret", default=None, help="HMAC secret (default: a random one)")
    args = parser.parse_args(argv)
    from twisted.internet import reactor
    from twisted.logger import globalLogBeginner, textFileLogObserver

    globalLogBeginner.beginLoggingTo([textFileLogObserver(sys.stdout)])
    secret = (args.secret or secrets.token_hex(32)).encode()
    args.store.mkdir(parents=True, exist_ok=True)
    application, site, _ = build(args.store, secret, reactor=reactor, min_free_bytes=0)
    endpoint = serverFromString(reactor, f"tcp:{args.port}:interface=127.0.0.1")
    StreamServerEndpointService(endpoint, site).setServiceParent(application)
    application.startService()
    reactor.addSystemEventTrigger("before", "shutdown", application.stopService)
    print(f"serving on http://127.0.0.1:{args.port}/")
    reactor.run()


if __name__ == "__main__":
    main()
