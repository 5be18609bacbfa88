# -*- test-case-name: tests.test_resource -*-
"""
The HTTP face of hmacfs: one thin leaf resource for the upload tree.

Every decision is made elsewhere (``UploadPolicy`` at header time, the
``IStore`` for files, ``render_download`` for GET/HEAD); this module turns the
outcomes into status codes, CORS and tus headers and short plain-text reasons.
GET and HEAD ask the store one question each (HEAD: ``lookup``; GET:
``open_file``, the lookup and the open in one job), answer with
``NOT_DONE_YET`` and finish when it answers, unless the client left meanwhile.
"""

from __future__ import annotations

import base64
import os
import re
from typing import TYPE_CHECKING, Any, cast

import attrs
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import http
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from hmacfs.errors import Refusal, storage_refusal
from hmacfs.http.download import render_download
from hmacfs.logs import log_router
from hmacfs.signing.paths import PathError, parse_slot_path
from hmacfs.upload import tus
from hmacfs.upload.policy import ALLOW
from hmacfs.upload.receiver import Progress

if TYPE_CHECKING:
    from hmacfs.upload.resume import Uploads

if TYPE_CHECKING:
    from twisted.internet.interfaces import IReactorTime

    from hmacfs.storage.interface import IByteSource, IStore, StoredFile

log = Logger(observer=log_router)

#: Every method the upload tree serves: POST, PATCH and DELETE only to tus
#: clients (``Tus-Resumable``).  Without it they get 405 with ``Allow: ALLOW``.
ALLOWED_METHODS = b"GET, HEAD, PUT, POST, PATCH, DELETE, OPTIONS"

#: Request headers a browser client may send (Authorization must be named:
#: a ``*`` does not cover it).  Later features append to these lists.
CORS_ALLOW_HEADERS = [
    b"Authorization",
    b"Content-Type",
    b"X-Session-Token",
    b"X-Checksum",
    b"Content-Digest",
    b"Range",
    # resumable uploads: the session-token PUT and tus 1.0
    b"Content-Range",
    b"Tus-Resumable",
    b"Upload-Length",
    b"Upload-Offset",
    b"Upload-Metadata",
    b"Upload-Checksum",
    b"Upload-Defer-Length",
    b"Upload-Concat",
    b"X-HTTP-Method-Override",
    b"X-Requested-With",
]
CORS_EXPOSE_HEADERS = [
    b"X-Session-Token",
    b"Content-Range",
    b"Content-Length",
    b"Accept-Ranges",
    b"ETag",
    b"Location",
    b"Range",
    b"Retry-After",
    b"Upload-Offset",
    b"Upload-Length",
    b"Upload-Expires",
    b"Upload-Metadata",
    b"Tus-Resumable",
    b"Tus-Version",
    b"Tus-Extension",
    b"Tus-Max-Size",
    b"Tus-Checksum-Algorithm",
]
#: Reason phrases Twisted does not know.
_PHRASES = {tus.CHECKSUM_MISMATCH: b"Checksum Mismatch"}
CORS_MAX_AGE = b"7200"
SESSION_TOKEN = b"X-Session-Token"
_TOKEN = re.compile(rb"[A-Za-z0-9._~-]{8,128}")


@attrs.define
class DownloadSettings:
    """How GET/HEAD behave: retries for shared storage and the write idle timeout."""

    enable_get_retries: bool = True
    max_retries: int = 5
    retry_delay: float = 2.0
    write_timeout: float = 120.0
    chunk_size: int = 262144
    #: files up to this size are read with the open (one job on the disk pool per
    #: GET); the same as SENDFILE_MIN, below which a body is read, not sendfile'd
    read_ahead: int = 262144


_ALLOW_HEADERS = b", ".join(CORS_ALLOW_HEADERS)
_EXPOSE_HEADERS = b", ".join(CORS_EXPOSE_HEADERS)


def add_cors_headers(request: Any, *, preflight: bool = True) -> None:
    """
    CORS headers for every response, errors included (else scripts see status 0).  What a
    browser reads from the answer to a request itself is ``Allow-Origin`` and
    ``Expose-Headers`` (Fetch standard, "CORS check"); ``Allow-Methods``, ``Allow-Headers``
    and ``Max-Age`` are read from the preflight only, so other answers leave them out
    (three headers and 450 bytes less per response).
    """
    headers = request.responseHeaders
    headers.setRawHeaders(b"Access-Control-Allow-Origin", [b"*"])
    headers.setRawHeaders(b"Access-Control-Expose-Headers", [_EXPOSE_HEADERS])
    if preflight:
        headers.setRawHeaders(b"Access-Control-Allow-Methods", [ALLOWED_METHODS])
        headers.setRawHeaders(b"Access-Control-Allow-Headers", [_ALLOW_HEADERS])
        headers.setRawHeaders(b"Access-Control-Max-Age", [CORS_MAX_AGE])


class _TokenSource:
    """
    Fresh session tokens, 24 random bytes each, from ``os.urandom`` in batches.

    Every response carries a token, so one ``getrandom`` call per 256 tokens
    instead of one per response.  The batch belongs to the process that read
    it (a forked child drops it and reads its own), and no part of it is
    handed out twice.
    """

    BATCH = 256
    SIZE = 24

    def __init__(self) -> None:
        self._pool = b""
        self._offset = 0

    def forget(self) -> None:
        """Drop the batch (after a fork: parent and child must not share tokens)."""
        self._pool = b""
        self._offset = 0

    def token(self) -> bytes:
        offset = self._offset
        if offset + self.SIZE > len(self._pool):
            self._pool = os.urandom(self.SIZE * self.BATCH)
            offset = 0
        self._offset = offset + self.SIZE
        # The same alphabet and length as secrets.token_urlsafe(24).
        return base64.urlsafe_b64encode(self._pool[offset : offset + self.SIZE])


_tokens = _TokenSource()
os.register_at_fork(after_in_child=_tokens.forget)


def session_token(request: Any) -> bytes:
    """The client's ``X-Session-Token`` if well-formed, or a fresh unpredictable one."""
    given = request.requestHeaders.getRawHeaders(SESSION_TOKEN)
    if given and _TOKEN.fullmatch(given[0]):
        return given[0]
    return _tokens.token()


def error_page(request: Any, status: int, reason: str, headers: tuple = ()) -> bytes:
    """A short plain-text error: the status line's phrase and why."""
    request.setResponseCode(status, _PHRASES.get(status))
    for name, value in headers:
        request.responseHeaders.setRawHeaders(name, [value])
    request.responseHeaders.setRawHeaders(b"Content-Type", [b"text/plain; charset=utf-8"])
    request.responseHeaders.setRawHeaders(b"Cache-Control", [b"no-store"])
    phrase = (_PHRASES.get(status) or http.RESPONSES.get(status, b"Error")).decode("ascii")
    body = f"{status} {phrase}: {reason}\n".encode()
    request.responseHeaders.setRawHeaders(b"Content-Length", [str(len(body)).encode()])
    request.upload_state.reason = reason
    if request.method == b"HEAD":
        return b""
    return body


class UploadResource(Resource):
    """GET/HEAD/PUT/OPTIONS, and tus POST/PATCH/DELETE, on ``/<UploadSubDir>/<slot path>``."""

    isLeaf = True

    def __init__(
        self,
        *,
        prefix: str,
        store: IStore,
        clock: IReactorTime,
        downloads: DownloadSettings,
        uploads: Uploads | None = None,
        max_upload_size: int = 0,
    ) -> None:
        super().__init__()
        self.prefix = prefix
        self.store = store
        self.clock = clock
        self.downloads = downloads
        self.uploads = uploads
        self.max_upload_size = max_upload_size

    def render(self, request: Any) -> bytes | int:
        request.responseHeaders.setRawHeaders(b"Server", [b"hmacfs"])
        add_cors_headers(request, preflight=request.method == b"OPTIONS")
        request.responseHeaders.setRawHeaders(SESSION_TOKEN, [session_token(request)])
        if tus.is_tus(request):
            request.responseHeaders.setRawHeaders(b"Tus-Resumable", [tus.TUS_VERSION])
        state = request.upload_state
        rejection = state.rejection
        if rejection is not None:
            return error_page(request, rejection.status, rejection.reason, rejection.headers)
        answer = state.answer
        if answer is not None:
            request.setResponseCode(answer.status)
            for name, value in answer.headers:
                request.responseHeaders.setRawHeaders(name, [value])
            # An answer has no body; say so (Twisted would add text/html and no length).
            request.defaultContentType = None
            if answer.status != 204:
                request.responseHeaders.setRawHeaders(b"Content-Length", [b"0"])
            return b""
        method = request.method
        if method == b"OPTIONS":
            request.setResponseCode(204)
            request.responseHeaders.setRawHeaders(b"Allow", [ALLOWED_METHODS])
            for name, value in tus.options_headers(self.max_upload_size):
                request.responseHeaders.setRawHeaders(name, [value])
            return b""
        if method in (b"PUT", b"POST", b"PATCH"):
            return self._render_upload(request)
        if method in (b"GET", b"HEAD"):
            return self._render_get(request)
        return error_page(request, 405, "method not allowed", ((b"Allow", ALLOW),))

    # PUT, tus POST and PATCH

    def _render_upload(self, request: Any) -> bytes | int:
        receiver = request.upload_state.receiver
        if receiver is None:
            if request.method != b"PUT":
                return error_page(request, 405, "method not allowed", ((b"Allow", ALLOW),))
            return error_page(request, 500, "uploads are not configured")
        # notifyFinish fails when the client leaves: then there is nobody to answer.
        gone: list[Failure] = []
        request.notifyFinish().addErrback(gone.append)
        receiver.done.addCallbacks(
            self._created,
            self._not_created,
            callbackArgs=(request, gone),
            errbackArgs=(request, gone),
        )
        return NOT_DONE_YET

    def _created(self, result: StoredFile | Progress, request: Any, gone: list[Failure]) -> None:
        if gone:
            return
        state = request.upload_state
        kind = state.kind
        stored = not isinstance(result, Progress)
        state.stored = stored
        headers = request.responseHeaders
        if kind == "put":
            request.setResponseCode(201)
            headers.setRawHeaders(b"Location", [request.path])
        else:
            offset = result.size if stored else result.offset  # type: ignore[union-attr]
            headers.setRawHeaders(b"Upload-Offset", [str(offset).encode("ascii")])
            if not stored and self.uploads is not None and state.slot is not None:
                name, value = tus.expires_header(self.uploads.expires_after_write())
                headers.setRawHeaders(name, [value])
            if kind == "tus-create":
                request.setResponseCode(201)
                # The upload URL is the signed URL itself: later requests carry the MAC too.
                headers.setRawHeaders(b"Location", [request.uri])
            else:
                request.setResponseCode(204)
                request.write(b"")
                request.finish()
                return
        if stored:
            headers.setRawHeaders(b"ETag", [result.etag.encode("ascii")])  # type: ignore[union-attr]
        headers.setRawHeaders(b"Content-Type", [b"text/plain; charset=utf-8"])
        body = b"201 Created\n"
        headers.setRawHeaders(b"Content-Length", [str(len(body)).encode()])
        request.write(body)
        request.finish()

    def _not_created(self, failure: Failure, request: Any, gone: list[Failure]) -> None:
        headers: tuple = ()
        if failure.check(Refusal):
            status, reason = failure.value.status, failure.value.reason
            headers = failure.value.headers
        else:
            log.failure("upload failed", failure)
            status, reason = 500, "internal error"
        if gone:
            return
        body = error_page(request, status, reason, headers)
        request.write(body)
        request.finish()

    # GET / HEAD

    def _render_get(self, request: Any) -> bytes | int:
        try:
            slot = parse_slot_path(request.path, self.prefix)
        except PathError as error:
            return error_page(request, error.status, error.reason)
        # notifyFinish fails when the client leaves: then there is nobody to answer.
        gone: list[Failure] = []
        request.notifyFinish().addErrback(gone.append)
        retries = self.downloads.max_retries if self.downloads.enable_get_retries else 0
        self._look(request, slot.segments, max(0, retries), gone)
        return NOT_DONE_YET

    def _look(
        self, request: Any, segments: tuple[str, ...], retries: int, gone: list[Failure]
    ) -> None:
        """
        One call to the store: HEAD looks the file up, GET opens it whole (the
        lookup and the open are one job on the disk pool).
        """
        looking: Deferred[Any]
        if request.method == b"HEAD":
            looking = self.store.lookup(segments)
        else:
            looking = self.store.open_file(segments, self.downloads.read_ahead)
        looking.addCallbacks(
            self._found,
            self._look_failed,
            callbackArgs=(request, segments, retries, gone),
            errbackArgs=(request, gone),
        )
        looking.addErrback(self._answer_failed, request, gone)

    def _found(
        self,
        found: StoredFile | IByteSource | None,
        request: Any,
        segments: tuple[str, ...],
        retries: int,
        gone: list[Failure],
    ) -> None:
        # GET opened a source, HEAD looked up a StoredFile.  (Not isinstance on the
        # runtime Protocol: that costs some 15 us a call, a tenth of a small GET.)
        is_get = request.method != b"HEAD"
        if gone:
            if found is not None and is_get:
                cast("IByteSource", found).close()
            return
        if found is None:
            if retries > 0:
                # Look again later: on shared storage the file may not be visible here yet.
                self.clock.callLater(
                    self.downloads.retry_delay, self._look_again, request, segments, retries - 1, gone
                )
                return
            self._answer(request, error_page(request, 404, "no such file"))
            return
        if is_get:
            source = cast("IByteSource", found)
            result = self._serve(request, source.stored, source)
        else:
            result = self._serve(request, cast("StoredFile", found), None)
        if isinstance(result, bytes):
            self._answer(request, result)

    def _look_again(
        self, request: Any, segments: tuple[str, ...], retries: int, gone: list[Failure]
    ) -> None:
        if not gone:
            self._look(request, segments, retries, gone)

    def _look_failed(self, failure: Failure, request: Any, gone: list[Failure]) -> None:
        if gone:
            return
        if failure.check(FileNotFoundError):
            self._answer(request, error_page(request, 404, "no such file"))
        elif failure.check(Refusal, OSError):
            self._answer(request, _storage_failed(request, failure.value))
        else:
            failure.raiseException()

    def _answer_failed(self, failure: Failure, request: Any, gone: list[Failure]) -> None:
        """Anything unexpected: logged once, and a plain 500 if nothing was sent yet."""
        log.failure("GET/HEAD failed", failure)
        if gone or request.finished or getattr(request, "startedWriting", False):
            return
        self._answer(request, error_page(request, 500, "internal error"))

    @staticmethod
    def _answer(request: Any, body: bytes) -> None:
        request.write(body)
        request.finish()

    def _serve(self, request: Any, stored: StoredFile, source: IByteSource | None) -> bytes | int:
        return render_download(
            request,
            stored,
            source=source,
            local=self.store.local,
            download_url=self.store.download_url,
            clock=self.clock,
            write_timeout=self.downloads.write_timeout,
            chunk_size=self.downloads.chunk_size,
        )


def _storage_failed(request: Any, error: Refusal | OSError) -> bytes:
    """
    The answer to a GET/HEAD whose store lookup failed: never a 500 and never a
    traceback, since a client can reach these (a private name, a broken mount).
    A refusal keeps its status; an OSError is mapped by ``storage_refusal``.
    """
    if isinstance(error, OSError):
        refusal = storage_refusal(error)
        if refusal.status == 503:
            _log_storage_error(request, error)
        error = refusal
    return error_page(request, error.status, error.reason, error.headers)


def _log_storage_error(request: Any, error: OSError) -> None:
    """One warn line, no traceback: an EIO under a request is the disk's problem, not ours."""
    log.warn(
        "{method} {path}: storage error: {error}",
        method=request.method.decode("ascii", "replace"),
        path=request.path.decode("ascii", "replace")[:200],
        error=error.strerror or error,
    )
