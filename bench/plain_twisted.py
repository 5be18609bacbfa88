"""The floor of hmacfs's stack for the benchmark: plain twisted.web in one process.

No auth, no metadata, no resume, no access log. PUT /upload/<path> takes the body Twisted
spooled (request.content) and stores it the shortest durable way, on the reactor thread:
O_EXCL temp file, write, fsync, link to the target (409 if it exists), unlink the temp,
fsync the directory, 201. GET/HEAD /upload/<path> is twisted.web.static.File.

    python bench/plain_twisted.py PORT STORE_DIR   (listens on 127.0.0.1 only)
"""

from __future__ import annotations

import os
import sys

from twisted.internet import reactor
from twisted.web import pages, resource, server, static

CHUNK = 1 << 20


def store(root: str, parts: list[bytes], body) -> int:  # noqa: ANN001 - a file-like object
    """Write `body` to root/parts durably; return the HTTP status."""
    names = [p.decode() for p in parts]
    if not names or any(n in ("", ".", "..") or "\0" in n for n in names):
        return 403
    folder = os.path.join(root, *names[:-1])
    os.makedirs(folder, exist_ok=True)
    target = os.path.join(folder, names[-1])
    temp = os.path.join(folder, f".tmp-{os.getpid()}-{os.urandom(6).hex()}")
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        body.seek(0)
        while chunk := body.read(CHUNK):
            os.write(fd, chunk)  # a short write on a regular file only comes with an error
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        os.link(temp, target)
    except FileExistsError:
        return 409
    finally:
        os.unlink(temp)
    dfd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)
    return 201


class Put(resource.Resource):
    isLeaf = True

    def __init__(self, root: str) -> None:
        super().__init__()
        self.root = root

    def render_PUT(self, request: server.Request) -> bytes:
        request.setResponseCode(store(self.root, request.postpath, request.content))
        return b""


class Root(resource.Resource):
    def __init__(self, root: str) -> None:
        super().__init__()
        self.put, self.files = Put(root), static.File(root)

    def getChild(self, name: bytes, request: server.Request) -> resource.Resource:  # noqa: N802
        if name != b"upload":
            return pages.notFound()
        return self.put if request.method == b"PUT" else self.files


class QuietSite(server.Site):
    def log(self, request: server.Request) -> None:
        """No access log (hmacfs runs with AccessLog = false in the bench)."""


if __name__ == "__main__":
    port, root = int(sys.argv[1]), os.path.abspath(sys.argv[2])
    reactor.listenTCP(port, QuietSite(Root(root)), backlog=511, interface="127.0.0.1")
    reactor.run()
