# -*- test-case-name: tests.test_s3_client -*-
"""
S3Client: S3 operations as Deferreds, over Twisted's Agent with a persistent connection pool.

What a request is (its URL, headers, signature) and what an answer means come from botocore
(:mod:`.protocol`); this module only moves bytes.  Control calls are bounded by
``request_timeout`` end to end; the streamed data path (``put_object``/``upload_part``
bodies, ``get_object`` bodies) is bounded by the caller's pace, and its answer after the
last byte by ``request_timeout`` again.  No call retries: the store decides what to do with
an :class:`S3Unavailable`.

Keys are relative to ``settings.prefix``: it is put in front on the way out and taken off
the keys a listing returns.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

import attrs
from twisted.internet.defer import CancelledError, Deferred, TimeoutError, succeed
from twisted.internet.error import ConnectError, ConnectingCancelledError, DNSLookupError
from twisted.internet.interfaces import IConsumer, IDelayedCall, IReactorTime
from twisted.internet.protocol import Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import (
    Agent,
    BrowserLikePolicyForHTTPS,
    HTTPConnectionPool,
    ResponseFailed,
    readBody,
)
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgent, IBodyProducer, IPolicyForHTTPS, IResponse
from zope.interface import implementer

from hmacfs.logs import log_router

from .bodies import DownloadReceiver, UploadBody
from .errors import S3Aborted, S3Error, S3Unavailable
from .observer import NullObserver, S3Observer, outcome_of
from .protocol import ParsedResponse, S3Protocol, SignedRequest
from .settings import S3Settings

log = Logger(observer=log_router)
T = TypeVar("T")


@attrs.frozen
class ObjectInfo:
    """What HeadObject/GetObject say about an object."""

    size: int
    etag: str
    last_modified: datetime | None
    content_type: str | None
    #: x-amz-meta-* without the prefix
    metadata: dict[str, str]
    #: every response header, lower-case names
    headers: dict[str, str]

    @classmethod
    def from_parsed(cls, parsed: ParsedResponse) -> ObjectInfo:
        data = parsed.data
        return cls(
            size=int(data.get("ContentLength", 0)),
            etag=str(data.get("ETag", "")),
            last_modified=data.get("LastModified"),
            content_type=data.get("ContentType"),
            metadata=dict(data.get("Metadata", {})),
            headers=parsed.headers,
        )


@attrs.frozen
class ListedObject:
    key: str
    size: int
    etag: str
    last_modified: datetime | None


@attrs.frozen
class ObjectPage:
    """One page of ListObjectsV2; pass ``next_token`` back for the next (None: the last)."""

    objects: list[ListedObject]
    common_prefixes: list[str]
    next_token: str | None


@attrs.frozen
class Part:
    part_number: int
    etag: str
    size: int = 0


@attrs.frozen
class PartPage:
    parts: list[Part]
    #: pass as ``part_number_marker`` for the next page (None: the last)
    next_marker: int | None


@attrs.frozen
class MultipartUpload:
    key: str
    upload_id: str
    initiated: datetime | None


@attrs.frozen
class UploadPage:
    uploads: list[MultipartUpload]
    #: (key marker, upload id marker) for the next page, None on the last
    next_markers: tuple[str, str] | None


@attrs.frozen
class DeleteResult:
    deleted: list[str]
    #: key -> (code, message) for the keys S3 did not delete
    errors: dict[str, tuple[str, str]]


@attrs.frozen
class PutResult:
    etag: str
    headers: dict[str, str]


class S3Download:
    """
    A GetObject whose headers arrived (200 or 206); the body is still on the connection.
    Call ``deliver(consumer)`` at most once, and ``discard()`` when done with it (always:
    it frees the connection of a body that was not, or not wholly, delivered).
    """

    def __init__(
        self, client: S3Client, response: IResponse, parsed: ParsedResponse, started: float
    ) -> None:
        self._client = client
        self._response = response
        self.status = parsed.status
        self.info = ObjectInfo.from_parsed(parsed)
        #: the length of this response's body (the range's, on a 206)
        self.content_length = int(parsed.data.get("ContentLength", 0))
        self.content_range: str | None = parsed.data.get("ContentRange")
        self._started = started
        self._receiver: DownloadReceiver | None = None
        self._discarded = False

    @property
    def headers(self) -> dict[str, str]:
        return self.info.headers

    def deliver(self, consumer: IConsumer) -> Deferred[int]:
        """
        Write the body into ``consumer`` (which gets us as its push producer, so pausing it
        pauses the S3 connection); fires with the byte count at its end.  S3 sending nothing
        for ``request_timeout`` while we are not paused fails it with S3Unavailable.
        """
        if self._receiver is not None or self._discarded:
            raise RuntimeError("the body was delivered or discarded already")
        receiver = self._receiver = DownloadReceiver(
            consumer,
            "GetObject",
            self._client._reactor,
            self._client.settings.request_timeout,
        )
        self._response.deliverBody(receiver)

        def report(result: int | Failure) -> int | Failure:
            error = result.value if isinstance(result, Failure) else None
            self._client._report("GetObject", self._started, error, 0, receiver.received)
            return result

        return receiver.done.addBoth(report)

    def discard(self) -> None:
        """
        Let go of the body: unread, it is dropped (closing the connection; S3 would send it
        all otherwise); mid-delivery, the delivery stops; after it, nothing.  Idempotent, so
        it suits a ``close()`` that is always called.
        """
        if self._discarded:
            return
        self._discarded = True
        if self._receiver is None:
            self._response.deliverBody(_Discard())
            self._client._report("GetObject", self._started, S3Aborted(0, "Aborted"), 0, 0)
        elif not self._receiver.done.called:
            self._receiver.stopProducing()


class S3Upload:
    """
    One streamed PutObject or UploadPart of a known length: ``write()`` chunks (wait for each
    Deferred: that is the back-pressure), then ``finish()`` for S3's answer, or ``abort()``.
    """

    def __init__(self, client: S3Client, signed: SignedRequest, length: int) -> None:
        self._client = client
        self._operation = signed.operation
        self.body = UploadBody(length)
        self._stall: IDelayedCall | None = None
        self._started = time.monotonic()
        self._aborted = False
        self._timed_out = False
        self._outcome: PutResult | S3Error | None = None
        self._waiters: list[Deferred[PutResult]] = []
        self._request = client._agent.request(
            signed.method, signed.url, Headers(signed.headers), self.body
        )
        self._answer = Deferred.fromCoroutine(self._read_answer())
        self._answer.addBoth(self._settle)

    async def _read_answer(self) -> PutResult:
        try:
            response = await self._request
            body = await readBody(response)
        except Exception as e:
            if self._timed_out:
                raise S3Unavailable(0, "Timeout", "S3 took no data in time", self._operation) from e
            raise self._client._unavailable(self._operation, e, aborted=self._aborted) from e
        parsed = self._client._protocol.parse(
            self._operation, response.code, _flat(response), body
        )
        return PutResult(etag=str(parsed.data.get("ETag", "")), headers=parsed.headers)

    def _settle(self, result: PutResult | Failure) -> None:
        if isinstance(result, Failure):
            error = result.value
            self._outcome = (
                error if isinstance(error, S3Error) else S3Unavailable(0, "Error", str(error))
            )
            self.body.fail(self._outcome)
        else:
            self._outcome = result
        self._client._report(
            self._operation,
            self._started,
            self._outcome if isinstance(self._outcome, S3Error) else None,
            self.body.sent,
            0,
        )
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            self._fire(waiter)

    def _fire(self, waiter: Deferred[PutResult]) -> None:
        if isinstance(self._outcome, S3Error):
            waiter.errback(Failure(self._outcome))
        elif self._outcome is not None:
            waiter.callback(self._outcome)

    def write(self, data: bytes) -> Deferred[None]:
        """
        Hand ``data`` on (wait for the Deferred before the next write).  If S3 takes nothing
        for ``request_timeout`` while a write waits, the upload fails with S3Unavailable.
        """
        written = self.body.write(data)
        if not written.called and self._outcome is None:
            self._stall = self._client._reactor.callLater(
                self._client.settings.request_timeout, self._stalled
            )
            written.addBoth(self._unstall)
        return written

    def _stalled(self) -> None:
        self._stall = None
        self._timed_out = True
        self._request.cancel()

    def _unstall(self, result: T) -> T:
        if self._stall is not None and self._stall.active():
            self._stall.cancel()
        self._stall = None
        return result

    def finish(self) -> Deferred[PutResult]:
        """Fires with S3's answer (``PreconditionFailed`` for an If-None-Match: * loss)."""
        waiter: Deferred[PutResult] = Deferred()
        if self._outcome is not None:
            self._fire(waiter)
            return waiter
        self.body.finish()
        self._waiters.append(waiter)
        timeout = self._client.settings.request_timeout
        self._answer.addTimeout(timeout, self._client._reactor)
        return waiter

    def abort(self) -> None:
        """Stop sending (closes the connection: S3 discards a PutObject/UploadPart cut short)."""
        if self._outcome is None:
            self._aborted = True
            self._request.cancel()


class S3Client:
    """One bucket's S3 operations (see the module docstring for timeouts and keys)."""

    def __init__(
        self,
        settings: S3Settings,
        reactor: IReactorTime,
        *,
        observer: S3Observer | None = None,
        agent: IAgent | None = None,
        pool: HTTPConnectionPool | None = None,
    ) -> None:
        self.settings = settings
        self._reactor = reactor
        self._protocol = S3Protocol(settings)
        self._observer: S3Observer = observer or NullObserver()
        if agent is None:
            if pool is None:
                pool = HTTPConnectionPool(reactor, persistent=True)
                pool.maxPersistentPerHost = settings.max_connections
                pool.cachedConnectionTimeout = settings.idle_connection_timeout
                pool.retryAutomatically = True
            # No TLS machinery for a plain-http endpoint: the daemon may have left
            # pyOpenSSL out (hmacfs.service.process.leave_out_tls).
            https = settings.endpoint_url.startswith("https://")
            agent = Agent(
                reactor,
                contextFactory=tls_policy(settings.ca_file) if https else _NoTLS(),
                connectTimeout=settings.connect_timeout,
                pool=pool,
            )
        self._pool = pool
        self._agent = agent

    def close(self) -> Deferred[None]:
        """Close the pooled connections (service stop)."""
        if self._pool is None:
            return succeed(None)
        closed: Deferred[None] = self._pool.closeCachedConnections()
        return closed

    # -- keys
    def full_key(self, key: str) -> str:
        if not key:
            raise ValueError("empty S3 key")
        return self.settings.prefix + key

    def relative_key(self, full: str) -> str:
        prefix = self.settings.prefix
        return full[len(prefix) :] if prefix and full.startswith(prefix) else full

    # -- bucket
    def head_bucket(self) -> Deferred[dict[str, str]]:
        """Fires with the headers; NotFound (NoSuchBucket / 404), AccessDenied, S3Unavailable."""
        return self._control("HeadBucket", {}, lambda p: p.headers)

    def create_bucket(self) -> Deferred[None]:
        params: dict[str, Any] = {}
        if self.settings.region != "us-east-1":
            params["CreateBucketConfiguration"] = {"LocationConstraint": self.settings.region}
        return self._control("CreateBucket", params, lambda p: None)

    # -- objects
    def head_object(
        self, key: str, *, if_match: str | None = None, if_none_match: str | None = None
    ) -> Deferred[ObjectInfo]:
        params = _drop_none(
            {"Key": self.full_key(key), "IfMatch": if_match, "IfNoneMatch": if_none_match}
        )
        return self._control("HeadObject", params, ObjectInfo.from_parsed)

    def delete_object(self, key: str) -> Deferred[None]:
        """Deleting a key that is not there succeeds (S3 answers 204 either way)."""
        return self._control("DeleteObject", {"Key": self.full_key(key)}, lambda p: None)

    def delete_objects(self, keys: Iterable[str]) -> Deferred[DeleteResult]:
        """Up to 1000 keys in one request."""
        objects = [{"Key": self.full_key(k)} for k in keys]
        if not 1 <= len(objects) <= 1000:
            raise ValueError(f"delete_objects takes 1 to 1000 keys, not {len(objects)}")

        def result(parsed: ParsedResponse) -> DeleteResult:
            return DeleteResult(
                deleted=[self.relative_key(d["Key"]) for d in parsed.data.get("Deleted", [])],
                errors={
                    self.relative_key(e.get("Key", "")): (e.get("Code", ""), e.get("Message", ""))
                    for e in parsed.data.get("Errors", [])
                },
            )

        params = {"Delete": {"Objects": objects, "Quiet": False}}
        return self._control("DeleteObjects", params, result)

    def list_objects_v2(
        self,
        prefix: str = "",
        *,
        continuation_token: str | None = None,
        max_keys: int = 1000,
        delimiter: str | None = None,
        start_after: str | None = None,
    ) -> Deferred[ObjectPage]:
        params = _drop_none({
            "Prefix": self.settings.prefix + prefix,
            "ContinuationToken": continuation_token,
            "MaxKeys": max_keys,
            "Delimiter": delimiter,
            "StartAfter": self.full_key(start_after) if start_after else None,
        })

        def page(parsed: ParsedResponse) -> ObjectPage:
            data = parsed.data
            return ObjectPage(
                objects=[
                    ListedObject(
                        key=self.relative_key(o["Key"]),
                        size=int(o.get("Size", 0)),
                        etag=str(o.get("ETag", "")),
                        last_modified=o.get("LastModified"),
                    )
                    for o in data.get("Contents", [])
                ],
                common_prefixes=[
                    self.relative_key(p["Prefix"]) for p in data.get("CommonPrefixes", [])
                ],
                next_token=data.get("NextContinuationToken") if data.get("IsTruncated") else None,
            )

        return self._control("ListObjectsV2", params, page)

    def put_object(
        self,
        key: str,
        length: int,
        *,
        content_type: str | None = None,
        metadata: Mapping[str, str] | None = None,
        if_none_match: bool = False,
    ) -> S3Upload:
        """
        Start a streamed PutObject of exactly ``length`` bytes.  ``if_none_match``: never
        replace (``finish()`` fails with PreconditionFailed if the key exists).
        """
        params = _drop_none({
            "Key": self.full_key(key),
            "ContentType": content_type,
            "Metadata": dict(metadata) if metadata else None,
            "IfNoneMatch": "*" if if_none_match else None,
        })
        return S3Upload(self, self._protocol.build("PutObject", params, streaming=True), length)

    def get_object(
        self,
        key: str,
        *,
        range: str | None = None,
        if_match: str | None = None,
        if_none_match: str | None = None,
        if_modified_since: datetime | None = None,
        if_unmodified_since: datetime | None = None,
    ) -> Deferred[S3Download]:
        """
        Fires once the headers are in, with an :class:`S3Download` (``range`` is a Range
        header value, ``bytes=0-99``, ``bytes=-10``).  NotModified (304),
        PreconditionFailed (412), RangeNotSatisfiable (416), NotFound (404) as errors.
        """
        params = _drop_none({
            "Key": self.full_key(key),
            "Range": range,
            "IfMatch": if_match,
            "IfNoneMatch": if_none_match,
            "IfModifiedSince": if_modified_since,
            "IfUnmodifiedSince": if_unmodified_since,
        })
        return Deferred.fromCoroutine(self._get(self._protocol.build("GetObject", params)))

    async def _get(self, signed: SignedRequest) -> S3Download:
        started = time.monotonic()
        try:
            try:
                response = await self._send(signed).addTimeout(
                    self.settings.request_timeout, self._reactor
                )
                headers = _flat(response)
                if response.code in (200, 206):
                    parsed = self._protocol.parse(signed.operation, response.code, headers, b"")
                    return S3Download(self, response, parsed, started)
                body = await readBody(response).addTimeout(
                    self.settings.request_timeout, self._reactor
                )
            except S3Error:
                raise
            except Exception as e:
                raise self._unavailable(signed.operation, e) from e
            raise self._protocol.error(signed.operation, response.code, headers, body)
        except S3Error as e:
            self._report(signed.operation, started, e, 0, 0)
            raise

    def presign_get(
        self,
        key: str,
        *,
        content_type: str | None = None,
        content_disposition: str | None = None,
        expires: int | None = None,
    ) -> str:
        """A presigned GetObject URL whose response carries these Content-Type/Disposition."""
        params = _drop_none({
            "Key": self.full_key(key),
            "ResponseContentType": content_type,
            "ResponseContentDisposition": content_disposition,
        })
        return self._protocol.presign(
            "GetObject", params, expires if expires is not None else self.settings.presign_expiry
        )

    # -- multipart
    def create_multipart_upload(
        self,
        key: str,
        *,
        content_type: str | None = None,
        metadata: Mapping[str, str] | None = None,
    ) -> Deferred[str]:
        """Fires with the upload id.  Content type and metadata are set here, as S3 wants."""
        params = _drop_none({
            "Key": self.full_key(key),
            "ContentType": content_type,
            "Metadata": dict(metadata) if metadata else None,
        })
        return self._control("CreateMultipartUpload", params, lambda p: str(p.data["UploadId"]))

    def upload_part(self, key: str, upload_id: str, part_number: int, length: int) -> S3Upload:
        """A streamed UploadPart of exactly ``length`` bytes; ``finish()`` gives its ETag."""
        params = {"Key": self.full_key(key), "UploadId": upload_id, "PartNumber": part_number}
        return S3Upload(self, self._protocol.build("UploadPart", params, streaming=True), length)

    def list_parts(
        self, key: str, upload_id: str, *, part_number_marker: int | None = None, max_parts: int = 1000
    ) -> Deferred[PartPage]:
        params = _drop_none({
            "Key": self.full_key(key),
            "UploadId": upload_id,
            "PartNumberMarker": part_number_marker,
            "MaxParts": max_parts,
        })

        def page(parsed: ParsedResponse) -> PartPage:
            data = parsed.data
            marker = data.get("NextPartNumberMarker")
            return PartPage(
                parts=[
                    Part(int(p["PartNumber"]), str(p.get("ETag", "")), int(p.get("Size", 0)))
                    for p in data.get("Parts", [])
                ],
                next_marker=int(marker) if data.get("IsTruncated") and marker else None,
            )

        return self._control("ListParts", params, page)

    def complete_multipart_upload(
        self, key: str, upload_id: str, parts: Sequence[Part], *, if_none_match: bool = False
    ) -> Deferred[PutResult]:
        """Assemble ``parts`` (in part-number order); ``if_none_match``: never replace."""
        params = _drop_none({
            "Key": self.full_key(key),
            "UploadId": upload_id,
            "MultipartUpload": {
                "Parts": [{"PartNumber": p.part_number, "ETag": p.etag} for p in parts]
            },
            "IfNoneMatch": "*" if if_none_match else None,
        })
        return self._control(
            "CompleteMultipartUpload",
            params,
            lambda p: PutResult(etag=str(p.data.get("ETag", "")), headers=p.headers),
        )

    def abort_multipart_upload(self, key: str, upload_id: str) -> Deferred[None]:
        params = {"Key": self.full_key(key), "UploadId": upload_id}
        return self._control("AbortMultipartUpload", params, lambda p: None)

    def list_multipart_uploads(
        self,
        prefix: str = "",
        *,
        key_marker: str | None = None,
        upload_id_marker: str | None = None,
        max_uploads: int = 1000,
    ) -> Deferred[UploadPage]:
        params = _drop_none({
            "Prefix": self.settings.prefix + prefix,
            "KeyMarker": self.full_key(key_marker) if key_marker else None,
            "UploadIdMarker": upload_id_marker,
            "MaxUploads": max_uploads,
        })

        def page(parsed: ParsedResponse) -> UploadPage:
            data = parsed.data
            truncated = data.get("IsTruncated")
            return UploadPage(
                uploads=[
                    MultipartUpload(
                        self.relative_key(u["Key"]), str(u["UploadId"]), u.get("Initiated")
                    )
                    for u in data.get("Uploads", [])
                ],
                next_markers=(
                    (self.relative_key(data.get("NextKeyMarker", "")), data.get("NextUploadIdMarker", ""))
                    if truncated
                    else None
                ),
            )

        return self._control("ListMultipartUploads", params, page)

    # -- start-up
    def probe_conditional_writes(self) -> Deferred[bool]:
        """
        Whether PutObject honours If-None-Match: * (a second create of one probe key answers
        412: True; 501 NotImplemented, or a second create that succeeds: False).  The probe
        key is deleted afterwards.
        """
        return Deferred.fromCoroutine(self._probe())

    async def _probe(self) -> bool:
        key = f".hmacfs-probe/conditional-{secrets.token_hex(8)}"
        try:
            for attempt in (1, 2):
                upload = self.put_object(key, 0, if_none_match=True)
                try:
                    await upload.finish()
                except S3Error as e:
                    if e.status == 412 and attempt == 2:
                        return True
                    if e.status == 501:
                        return False
                    raise
            return False
        finally:
            try:
                await self.delete_object(key)
            except S3Error:
                log.warn("could not delete the S3 probe object {key}", key=key)

    # -- plumbing
    def _send(self, signed: SignedRequest) -> Deferred[IResponse]:
        producer: IBodyProducer | None = None
        if signed.body:
            producer = BytesProducer(signed.body)
        return self._agent.request(signed.method, signed.url, Headers(signed.headers), producer)

    def _control(
        self, operation: str, params: Mapping[str, Any], result: Callable[[ParsedResponse], T]
    ) -> Deferred[T]:
        signed = self._protocol.build(operation, params)
        call = Deferred.fromCoroutine(self._exchange(signed))
        call.addTimeout(self.settings.request_timeout, self._reactor)
        started = time.monotonic()

        def done(outcome: ParsedResponse | Failure) -> T:
            if isinstance(outcome, Failure):
                error = outcome.value
                if not isinstance(error, S3Error):
                    error = self._unavailable(operation, error)
                self._report(operation, started, error, len(signed.body), 0)
                raise error
            self._report(operation, started, None, len(signed.body), outcome.body_size)
            return result(outcome)

        return call.addBoth(done)

    async def _exchange(self, signed: SignedRequest) -> ParsedResponse:
        try:
            response = await self._send(signed)
            body = await readBody(response)
        except CancelledError:
            raise
        except Exception as e:
            raise self._unavailable(signed.operation, e) from e
        return self._protocol.parse(signed.operation, response.code, _flat(response), body)

    def _unavailable(self, operation: str, error: BaseException, aborted: bool = False) -> S3Error:
        if aborted:
            return S3Aborted(0, "Aborted", "aborted by the caller", operation)
        if isinstance(error, TimeoutError | CancelledError):
            return S3Unavailable(0, "Timeout", "S3 did not answer in time", operation)
        if isinstance(error, ConnectError | DNSLookupError | ConnectingCancelledError):
            return S3Unavailable(0, "ConnectFailed", str(error), operation)
        reasons = getattr(error, "reasons", None)
        if isinstance(error, ResponseFailed) or reasons:
            text = "; ".join(f.getErrorMessage() for f in reasons or [])
            return S3Unavailable(0, "ConnectionLost", text or str(error), operation)
        return S3Unavailable(0, type(error).__name__, str(error), operation)

    def _report(
        self, operation: str, started: float, error: BaseException | None, sent: int, received: int
    ) -> None:
        try:
            self._observer.request_finished(
                operation, outcome_of(error), time.monotonic() - started, sent, received
            )
        except Exception:
            log.failure("S3 metrics observer failed")


@implementer(IPolicyForHTTPS)
class _NoTLS:
    """The policy for an http:// endpoint: an https URL (a redirect, a bug) is refused."""

    def creatorForNetloc(self, hostname: bytes, port: int) -> Any:
        raise ValueError("this S3 endpoint is plain http: no TLS configured")


def tls_policy(ca_file: str | None) -> BrowserLikePolicyForHTTPS:
    """Verified TLS (service-identity checks the host name); ``ca_file``: trust only its CAs."""
    from twisted.internet.ssl import Certificate, trustRootFromCertificates

    if not ca_file:
        return BrowserLikePolicyForHTTPS()
    text = Path(ca_file).read_bytes()
    marker = b"-----END CERTIFICATE-----"
    blocks = [block + marker for block in text.split(marker) if b"-----BEGIN" in block]
    if not blocks:
        raise ValueError(f"ca_file: {ca_file!r} holds no PEM certificate")
    return BrowserLikePolicyForHTTPS(
        trustRoot=trustRootFromCertificates([Certificate.loadPEM(b) for b in blocks])
    )


def _flat(response: IResponse) -> dict[str, str]:
    """The response's headers, lower-case names; Content-Length (which Twisted's parser keeps
    as ``response.length``, not among the headers, except on a HEAD) put back for botocore."""
    headers = {
        name.decode("latin-1").lower(): ", ".join(v.decode("latin-1") for v in values)
        for name, values in response.headers.getAllRawHeaders()
    }
    if isinstance(response.length, int) and "content-length" not in headers:
        headers["content-length"] = str(response.length)
    return headers


def _drop_none(params: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in params.items() if v is not None}


@implementer(IBodyProducer)
class BytesProducer:
    """A small in-memory request body (control calls' XML), written at once."""

    def __init__(self, body: bytes) -> None:
        self.body = body
        self.length = len(body)

    def startProducing(self, consumer: IConsumer) -> Deferred[None]:
        consumer.write(self.body)
        return succeed(None)

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        pass


class _Discard(Protocol):
    """Takes a response body only to drop it: stopping the transport closes the connection."""

    def connectionMade(self) -> None:
        self.transport.stopProducing()  # type: ignore[union-attr]

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        pass
