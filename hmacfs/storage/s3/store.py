# -*- test-case-name: tests.test_s3_store -*-
"""
The S3 backend: ``IStore`` on one bucket, so that nodes share no filesystem.

Keys (all under ``S3Prefix``): a finished file is the object named by its path; what only
uploads in progress need lives under the reserved ``.hmacfs/`` (the path parser refuses
that name from clients, in any case):

- ``.hmacfs/uploads/<path key>``: the upload's record (what binds it to its signed URL and
  session), its multipart upload id, its size and content type, as JSON;
- ``.hmacfs/incomplete/<path key>``: the bytes a request left after the last whole part
  (a tus PATCH smaller than a part), prepended to the next request's bytes, as tusd's
  s3store does; so no node keeps any part of an upload on its own disk or in memory;
- ``.hmacfs/tombstones/<path key>`` and ``.hmacfs/takeover/<path key>``: the tombstone
  (its expiry) and takeover marker (when it was asked), as on disk.

How an upload is written: a one-request upload with no checksum to verify (the whole body
in hand, no session token) is one streamed PutObject with ``If-None-Match: *``.  Every
other upload is a multipart upload created at admission: each request streams whole parts
(``S3PartSize``, the last one shorter) as its bytes arrive, and the tail that does not fill
a part goes to the incomplete-part object; ``Upload-Offset`` is where the parts and that
object end.  ``commit`` completes it with ``If-None-Match: *``.  An interrupted request
loses only the part it was streaming (S3 drops a part cut short).  Memory per upload is
the socket's few buffers: no part is ever held.

Where the server answers 501 to conditional writes (detected at start-up), a HEAD right
before the create stands in; the upload's writer lock (in the shared state) keeps two
hmacfs writers of one path apart.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Sequence
from pathlib import PurePosixPath
from typing import TYPE_CHECKING, Any

import attrs
from twisted.internet.defer import Deferred, DeferredList, fail, succeed
from twisted.internet.interfaces import IConsumer
from twisted.logger import Logger
from zope.interface import implementer

from hmacfs.errors import STORAGE_RETRY_AFTER
from hmacfs.logs import log_router
from hmacfs.storage.interface import (
    TOMBSTONED,
    ByteRange,
    FileEntry,
    Hasher,
    IByteSource,
    IStore,
    IUpload,
    ListPage,
    StorageError,
    StoredFile,
    Usage,
)

from .client import ObjectInfo, Part, S3Client, S3Download, S3Upload
from .errors import NotFound, PreconditionFailed, S3Error, S3Unavailable

log = Logger(observer=log_router)

__all__ = ["S3Store", "storage_error"]

INTERNAL = ".hmacfs/"
UPLOADS = INTERNAL + "uploads/"
INCOMPLETE = INTERNAL + "incomplete/"
TOMBSTONES = INTERNAL + "tombstones/"
TAKEOVER = INTERNAL + "takeover/"
#: how long a HEAD that found a finished file is believed (files are never replaced)
EXISTS_CACHE_SECONDS = 5.0


def storage_error(error: S3Error) -> StorageError:
    """What a client is told when S3 failed under its request (never a 500); a 503 says
    when to come back, as the filesystem's does (``Retry-After``, which resuming clients
    and tuspy wait for)."""
    retry = ((b"Retry-After", STORAGE_RETRY_AFTER),)
    if isinstance(error, S3Unavailable):
        return StorageError(503, "the object store is unavailable; try again later", retry)
    if isinstance(error, PreconditionFailed):
        return StorageError(409, "file already exists")
    return StorageError(503, f"the object store refused: {error.code or error.status}", retry)


def _as_storage_error(failure: Any) -> Any:
    if failure.check(S3Error):
        raise storage_error(failure.value) from failure.value
    return failure


def path_key(segments: Sequence[str]) -> str:
    """An upload's name under ``.hmacfs/``: hashed, so it never depends on client input
    (the filesystem's ``storage.layout.path_key``, so both name an upload alike)."""
    return hashlib.sha256("/".join(segments).encode("utf-8")).hexdigest()


async def _settled(asked: Sequence[Deferred[Any]]) -> list[Any]:
    """Every request's answer, waiting for all of them to settle: on the first failure
    the others are still in flight, and an operation must not return (or fail) while
    requests it started live on; the first failure is raised, the others consumed."""
    results = await DeferredList(list(asked), consumeErrors=True)
    for ok, value in results:
        if not ok:
            value.raiseException()
    return [value for _, value in results]


async def _both(first: Any, second: Any) -> tuple[Any, Any]:
    """Two coroutines at once (one round trip of latency), see `_settled`."""
    a, b = await _settled([Deferred.fromCoroutine(first), Deferred.fromCoroutine(second)])
    return a, b


def _key(segments: Sequence[str]) -> str:
    return "/".join(segments)


def _epoch(info: ObjectInfo | Any) -> float:
    modified = getattr(info, "last_modified", None)
    return modified.timestamp() if modified is not None else time.time()


@implementer(IConsumer)
class _Pipe:
    """
    The consumer an S3 download writes into, passing each chunk on to an ``S3Upload`` one
    write at a time and pausing the download while the upload holds back (the incomplete
    part prepended to the next part).  What the download delivers after a pause (the rest
    of one socket read) waits in ``_queue``: a few socket buffers at most.
    """

    def __init__(self, sink: S3Upload) -> None:
        self.sink = sink
        self.producer: Any = None
        self.failed: BaseException | None = None
        self._queue: list[bytes] = []
        self._busy = False
        self._idle: Deferred[None] | None = None

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        self.producer = producer

    def unregisterProducer(self) -> None:
        self.producer = None

    def write(self, data: bytes) -> None:
        if self.failed is not None:
            return
        if self._busy:
            self._queue.append(data)
            return
        self._send(data)

    def _send(self, data: bytes) -> None:
        self._busy = True
        waiting = self.sink.write(data)
        if not waiting.called and self.producer is not None:
            self.producer.pauseProducing()
        waiting.addCallbacks(self._sent, self._fail)

    def _sent(self, _: object) -> None:
        self._busy = False
        if self._queue:
            self._send(self._queue.pop(0))
            return
        if self.producer is not None:
            self.producer.resumeProducing()
        idle, self._idle = self._idle, None
        if idle is not None:
            idle.callback(None)

    def _fail(self, failure: Any) -> None:
        self._busy = False
        self._queue.clear()
        self.failed = failure.value
        if self.producer is not None:
            self.producer.stopProducing()
        idle, self._idle = self._idle, None
        if idle is not None:
            idle.callback(None)

    def drained(self) -> Deferred[None]:
        """Fires once every byte delivered so far was handed to the sink (or it failed)."""
        if not self._busy:
            return succeed(None)
        self._idle = Deferred()
        return self._idle


class S3Range:
    """
    ``IByteSource`` of an object: the ranged GetObject is sent when the range is streamed
    (after ``select``), with ``If-Match`` on the ETag the lookup saw, so a file replaced
    meanwhile is never served under the old headers.  No descriptor (``fd`` is None).
    """

    def __init__(self, client: S3Client, stored: StoredFile, byte_range: ByteRange) -> None:
        self.fd: int | None = None
        self.stored = stored
        self.byte_range = byte_range
        self._client = client
        self._download: S3Download | None = None
        self._closed = False

    def select(self, byte_range: ByteRange) -> None:
        end = self.byte_range.first + self.byte_range.length
        if (
            byte_range.length < 0
            or byte_range.first < self.byte_range.first
            or byte_range.first + byte_range.length > end
        ):
            raise ValueError(f"{byte_range} is outside the opened {self.byte_range}")
        self.byte_range = byte_range

    def stream(self, consumer: IConsumer) -> Deferred[None]:
        return Deferred.fromCoroutine(self._stream(consumer))

    async def _stream(self, consumer: IConsumer) -> None:
        wanted = self.byte_range
        if wanted.length == 0 or self._closed:
            return
        last = wanted.first + wanted.length - 1
        key = str(self.stored.path)
        try:
            download = await self._client.get_object(
                key, range=f"bytes={wanted.first}-{last}", if_match=self.stored.etag
            )
        except (NotFound, PreconditionFailed) as error:
            raise FileNotFoundError(2, "the object is gone or changed", key) from error
        except S3Error as error:
            raise storage_error(error) from error
        if self._closed:
            download.discard()
            return
        if download.content_length != wanted.length:
            download.discard()
            raise FileNotFoundError(2, "the object changed size", key)
        self._download = download
        await download.deliver(consumer)

    def close(self) -> None:
        self._closed = True
        download, self._download = self._download, None
        if download is not None:
            download.discard()


class S3FileUpload:
    """
    ``IUpload`` on S3 (see the module docstring).  ``_boundary`` is where the completed
    parts end, ``_pending`` how many bytes after it the incomplete-part object holds; a
    request's bytes go to the part being streamed (``_sink``) and are counted in
    ``written`` as they are handed on.
    """

    def __init__(
        self,
        store: S3Store,
        segments: tuple[str, ...],
        content_type: str,
        size: int,
        *,
        upload_id: str | None,
        parts: list[Part],
        pending: int,
        record: dict[str, object] | None,
        metadata: dict[str, str],
        resumable: bool = True,
    ) -> None:
        self._store = store
        #: whether the upload has a record under ``.hmacfs/uploads/`` (to update and drop)
        self._resumable = resumable
        self._client = store.client
        self.segments = segments
        self.key = _key(segments)
        self.pkey = path_key(segments)
        self.content_type = content_type
        self.size = size
        self.upload_id = upload_id
        self.parts = parts
        self._boundary = sum(p.size for p in parts)
        self._pending = pending
        self.written = self._boundary + pending
        self.offset = self.written
        self.record = record
        self._metadata = metadata
        self._sink: S3Upload | None = None
        self._sink_kind = ""
        self._sink_left = 0
        self._request_left: int | None = None
        self._done = False

    # -- IUpload

    def expect(self, count: int) -> None:
        """This request brings ``count`` bytes (a tus PATCH may bring less than the rest)."""
        self._request_left = count

    def write(self, chunks: Sequence[bytes], hashers: Sequence[Hasher] = ()) -> Deferred[int]:
        # Hashed here, on the reactor thread: only uploads that announce a checksum ask.
        for hasher in hashers:
            for chunk in chunks:
                hasher.update(chunk)
        return Deferred.fromCoroutine(self._write(chunks)).addErrback(_as_storage_error)

    def write_and_commit(
        self,
        chunks: Sequence[bytes],
        hashers: Sequence[Hasher] = (),
        digest: Callable[[], str | None] | None = None,
    ) -> Deferred[StoredFile]:
        return Deferred.fromCoroutine(self._write_and_commit(chunks, hashers, digest)).addErrback(
            _as_storage_error
        )

    async def _write_and_commit(
        self,
        chunks: Sequence[bytes],
        hashers: Sequence[Hasher],
        digest: Callable[[], str | None] | None,
    ) -> StoredFile:
        # The digest is decided before the last bytes go out: a PutObject's object exists
        # as soon as S3 has its last byte, so a checksum that fails must stop it first.
        for hasher in hashers:
            for chunk in chunks:
                hasher.update(chunk)
        try:
            sha256_hex = digest() if digest is not None else None
        except BaseException:
            # A one-PutObject upload whose every byte already went out is in the bucket
            # by now (S3 takes an object with its last byte): it goes too.
            sink = self._sink
            if self.upload_id is None and sink is not None and not self._sink_left:
                # Let S3 answer first: a delete sent while it still takes the object in
                # could come before the object is there.
                self._sink = None
                try:
                    await sink.finish()
                except S3Error:
                    pass  # not stored (a 412 included): nothing to take back
                else:
                    await self._client.delete_object(self.key)
                    self._store._known.pop(self.key, None)
            await self._abort()
            raise
        if chunks:
            await self._write(chunks)
        return await self._commit(sha256_hex)

    async def _write(self, chunks: Sequence[bytes]) -> int:
        taken = 0
        for chunk in chunks:
            offset, size = 0, len(chunk)
            while offset < size:
                if self._sink is None:
                    await self._open_sink()
                assert self._sink is not None
                count = min(size - offset, self._sink_left)
                # A chunk is copied only where a part boundary cuts it.
                piece = chunk if count == size else chunk[offset : offset + count]
                offset += count
                await self._sink.write(piece)
                taken += count
                self.written += count
                self._sink_left -= count
                if self._request_left is not None:
                    self._request_left -= count
                if self._sink_left == 0 and self._sink_kind != "final":
                    await self._close_sink()
        return taken

    def _request_end(self) -> int:
        left = self._request_left
        return self.size if left is None else min(self.size, self.written + left)

    async def _open_sink(self) -> None:
        end = self._request_end()
        if end <= self.written:
            raise StorageError(400, "more bytes than the request announced")
        client = self._client
        if self.upload_id is None and not self.parts and not self._pending and (
            end == self.size and self.size <= self._store.part_size
        ):  # one PutObject: the whole file, no bigger than a part, in this request
            await self._no_file_yet()
            self._sink = client.put_object(
                self.key, self.size, content_type=self.content_type,
                metadata=self._metadata, if_none_match=self._store.conditional,
            )
            self._sink_kind, self._sink_left = "final", self.size - self.written
            return
        if self.upload_id is None:
            # Parts from here on: the multipart upload is created by the first request
            # that needs one, and the record learns its id so any node can resume it.
            self.upload_id = await client.create_multipart_upload(
                self.key, content_type=self.content_type, metadata=self._metadata
            )
            if self._resumable:
                await self._store._put_record(
                    self.pkey, self.key, self.size, self.content_type, self.upload_id,
                    self.record, self._metadata,
                )
        part_end = min(self._boundary + self._store.part_size, self.size)
        if end >= part_end:
            length = part_end - self._boundary
            self._sink = client.upload_part(self.key, self.upload_id, len(self.parts) + 1, length)
            self._sink_kind = "part"
        else:
            length = end - self._boundary
            self._sink = client.put_object(INCOMPLETE + self.pkey, length)
            self._sink_kind = "incomplete"
        self._sink_left = length - self._pending
        if self._pending:
            await self._prepend(self._sink)

    async def _prepend(self, sink: S3Upload) -> None:
        """Stream the incomplete-part object into ``sink`` (it starts the part or the new tail)."""
        download = await self._client.get_object(INCOMPLETE + self.pkey)
        if download.content_length != self._pending:
            download.discard()
            sink.abort()
            self._sink = None
            raise StorageError(409, "the upload changed under this request; resume it")
        pipe = _Pipe(sink)
        await download.deliver(pipe)
        await pipe.drained()
        if pipe.failed is not None:
            raise pipe.failed

    async def _close_sink(self) -> None:
        sink, kind = self._sink, self._sink_kind
        assert sink is not None
        self._sink = None
        result = await sink.finish()
        if kind == "part":
            length = min(self._boundary + self._store.part_size, self.size) - self._boundary
            self.parts.append(Part(len(self.parts) + 1, result.etag, length))
            self._boundary += length
            if self._pending:
                self._pending = 0
                await self._client.delete_object(INCOMPLETE + self.pkey)
        else:
            self._pending = self.written - self._boundary

    def checkpoint(self) -> Deferred[int]:
        # Parts and the incomplete-part object are durable once S3 answered for them.
        return succeed(self._boundary + self._pending)

    def truncate(self, length: int) -> Deferred[None]:
        return Deferred.fromCoroutine(self._truncate(length)).addErrback(_as_storage_error)

    async def _truncate(self, length: int) -> None:
        self._drop_sink()
        if length < self._boundary + self._pending:
            # Whole parts cannot be cut: keep those ending at or before ``length``.
            keep: list[Part] = []
            end = 0
            for part in self.parts:
                if end + part.size > length:
                    break
                keep.append(part)
                end += part.size
            self.parts = keep
            self._boundary = end
            if self._pending:
                self._pending = 0
                await self._client.delete_object(INCOMPLETE + self.pkey)
        self.written = self._boundary + self._pending

    def hash_prefix(self, hasher: Hasher, length: int) -> Deferred[None]:
        if length == 0:
            return succeed(None)
        # The parts of an unfinished multipart upload cannot be read back.
        return Deferred.fromCoroutine(self._refuse_hash())

    async def _refuse_hash(self) -> None:
        raise StorageError(
            409, "a checksum over a resumed upload cannot be verified on object storage; "
            "upload the file again without Content-Range"
        )

    def commit(self, sha256_hex: str | None) -> Deferred[StoredFile]:
        return Deferred.fromCoroutine(self._commit(sha256_hex)).addErrback(_as_storage_error)

    async def _commit(self, sha256_hex: str | None = None) -> StoredFile:
        if self.written != self.size:
            raise StorageError(400, "the upload is not complete")
        try:
            if self.upload_id is None:
                assert self._sink is not None
                sink, self._sink = self._sink, None
                await sink.finish()
            else:
                await self._no_file_yet()
                await self._client.complete_multipart_upload(
                    self.key, self.upload_id, self.parts, if_none_match=self._store.conditional
                )
        except BaseException:
            await self._abort()
            raise
        self._done = True
        if self.upload_id is not None or self._resumable:
            await self._store._forget_upload(self.pkey, None)
        stored = await self._store.lookup(self.segments)
        if stored is None:
            raise StorageError(503, "the object store lost the file it just stored")
        if sha256_hex and not stored.sha256:
            # The object's metadata was fixed before its bytes were known (S3 takes it at
            # the create); the commit knows the checksum, later lookups do not.
            stored = attrs.evolve(stored, sha256=sha256_hex)
        self._store._known[self.key] = time.monotonic()
        return stored

    async def _no_file_yet(self) -> None:
        """Where the server cannot refuse to replace (no If-None-Match), look first."""
        if not self._store.conditional and await self._store._head(self.key) is not None:
            raise StorageError(409, "file already exists")

    def abort(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self._abort()).addErrback(_as_storage_error)

    async def _abort(self) -> None:
        self._drop_sink()
        if self._done:
            return
        self._done = True
        if self.upload_id is None and not self._resumable:
            return  # a PutObject cut short leaves nothing, and there is no record
        await self._store._forget_upload(self.pkey, self.key, upload_id=self.upload_id)

    def release(self) -> Deferred[int]:
        self._drop_sink()
        self.written = self._boundary + self._pending
        return succeed(self.written)

    def _drop_sink(self) -> None:
        sink, self._sink = self._sink, None
        if sink is not None:
            sink.abort()  # S3 discards a part (or object) cut short


class S3Store:
    """``IStore`` on one bucket (see the module docstring)."""

    local = False
    #: its admission drops what an earlier attempt of the path left: under the path's lease
    whole_uploads_isolated = False

    def __init__(
        self,
        client: S3Client,
        *,
        conditional: bool = True,
        redirect_downloads: bool = False,
        now: Callable[[], float] = time.time,
    ) -> None:
        self.client = client
        self.part_size = client.settings.part_size
        #: whether the server refuses to replace a key with If-None-Match: * (start-up probe)
        self.conditional = conditional
        self.redirect_downloads = redirect_downloads
        self._now = now
        #: keys seen to exist lately (monotonic time): a finished file never goes away but
        #: by retention, and a stale "exists" only turns a PUT into a 409 it would get anyway
        self._known: dict[str, float] = {}

    # -- helpers

    async def _head(self, key: str) -> ObjectInfo | None:
        try:
            return await self.client.head_object(key)
        except NotFound:
            return None

    async def _get_small(self, key: str) -> tuple[bytes, ObjectInfo] | None:
        """A small internal object's bytes (a record, a tombstone), or None."""
        try:
            download = await self.client.get_object(key)
        except NotFound:
            return None
        chunks: list[bytes] = []

        @implementer(IConsumer)
        class Gather:
            def registerProducer(self, producer: Any, streaming: bool) -> None: ...

            def unregisterProducer(self) -> None: ...

            def write(self, data: bytes) -> None:
                chunks.append(data)

        await download.deliver(Gather())
        return b"".join(chunks), download.info

    async def _put_small(self, key: str, data: bytes) -> None:
        upload = self.client.put_object(key, len(data), content_type="application/json")
        if data:
            await upload.write(data)
        await upload.finish()

    def _run(self, coroutine: Any) -> Deferred[Any]:
        return Deferred.fromCoroutine(coroutine).addErrback(_as_storage_error)

    # -- finished files

    def lookup(self, segments: Sequence[str]) -> Deferred[StoredFile | None]:
        return self._run(self._lookup(tuple(segments)))

    async def _lookup(self, segments: tuple[str, ...]) -> StoredFile | None:
        key = _key(segments)
        info = await self._head(key)
        if info is None:
            self._known.pop(key, None)
            return None
        return StoredFile(
            path=PurePosixPath(key),
            size=info.size,
            mtime=_epoch(info),
            content_type=info.content_type or "application/octet-stream",
            etag=info.etag if info.etag.startswith('"') else f'"{info.etag}"',
            sha256=info.metadata.get("sha256"),
        )

    def exists(self, segments: Sequence[str]) -> Deferred[bool]:
        key = _key(segments)
        seen = self._known.get(key)
        if seen is not None and time.monotonic() - seen < EXISTS_CACHE_SECONDS:
            return succeed(True)
        return self._run(self._exists(key))

    async def _exists(self, key: str) -> bool:
        found = await self._head(key) is not None
        if found:
            self._known[key] = time.monotonic()
            if len(self._known) > 4096:
                self._known.clear()
        return found

    def open_file(self, segments: Sequence[str], read_ahead: int = 0) -> Deferred[IByteSource | None]:
        # One HEAD; the GetObject goes out when the selected range is streamed.
        return self.lookup(segments).addCallback(
            lambda stored: None
            if stored is None
            else S3Range(self.client, stored, ByteRange(0, stored.size))
        )

    def open_range(self, stored: StoredFile, byte_range: ByteRange) -> Deferred[IByteSource]:
        if byte_range.first + byte_range.length > stored.size:
            return fail(FileNotFoundError(2, "the range is past the file's end", str(stored.path)))
        return succeed(S3Range(self.client, stored, byte_range))

    def download_url(self, stored: StoredFile, content_type: bytes, disposition: bytes) -> str | None:
        if not self.redirect_downloads:
            return None
        return self.client.presign_get(
            str(stored.path),
            content_type=content_type.decode("latin-1"),
            content_disposition=disposition.decode("latin-1"),
        )

    def delete(self, segments: Sequence[str]) -> Deferred[bool]:
        return self._run(self._delete(_key(segments)))

    async def _delete(self, key: str) -> bool:
        if await self._head(key) is None:
            return False
        await self.client.delete_object(key)
        self._known.pop(key, None)
        log.info("deleted {path}", path=key)
        return True

    def list_files(self, cursor: str | None = None, limit: int = 1000) -> Deferred[ListPage]:
        return self._run(self._list(cursor, limit))

    async def _list(self, cursor: str | None, limit: int) -> ListPage:
        page = await self.client.list_objects_v2(continuation_token=cursor, max_keys=limit)
        entries = tuple(
            FileEntry(
                tuple(o.key.split("/")),
                o.size,
                o.last_modified.timestamp() if o.last_modified else self._now(),
            )
            for o in page.objects
            if not o.key.startswith(INTERNAL) and not o.key.startswith(".hmacfs-probe/")
        )
        return ListPage(entries, page.next_token)

    def usage(self) -> Deferred[Usage]:
        return self._run(self._usage())

    async def _usage(self) -> Usage:
        files = total = 0
        cursor: str | None = None
        while True:
            page = await self._list(cursor, 1000)
            files += len(page.entries)
            total += sum(e.size for e in page.entries)
            cursor = page.cursor
            if cursor is None:
                return Usage(files=files, bytes=total, free=None)

    def probe(self) -> Deferred[None]:
        return self._run(self._probe())

    async def _probe(self) -> None:
        await self.client.head_bucket()

    # -- tombstones

    def add_tombstone(self, segments: Sequence[str], until: float) -> Deferred[None]:
        data = f"{until:.0f}\n".encode("ascii")
        return self._run(self._put_small(TOMBSTONES + path_key(segments), data))

    def tombstoned(self, segments: Sequence[str]) -> Deferred[bool]:
        return self._run(self._tombstoned(path_key(segments)))

    async def _tombstoned(self, pkey: str) -> bool:
        found = await self._get_small(TOMBSTONES + pkey)
        if found is None:
            return False
        try:
            return float(found[0]) > self._now()
        except ValueError:
            return False

    def purge_tombstones(self) -> Deferred[int]:
        return self._run(self._purge_tombstones())

    async def _purge_tombstones(self) -> int:
        removed = 0
        token: str | None = None
        now = self._now()
        while True:
            page = await self.client.list_objects_v2(TOMBSTONES, continuation_token=token)
            for item in page.objects:
                found = await self._get_small(item.key)
                try:
                    expired = found is None or float(found[0]) <= now
                except ValueError:
                    expired = True
                if expired:
                    await self.client.delete_object(item.key)
                    removed += 1
            token = page.next_token
            if token is None:
                return removed

    # -- uploads in progress

    def admit(
        self,
        segments: Sequence[str],
        content_type: str,
        size: int | None,
        *,
        record: dict[str, object] | None = None,
        resumable: bool = True,
    ) -> Deferred[IUpload]:
        return self._run(self._admit(tuple(segments), content_type, size, record, resumable))

    async def _admit(
        self,
        segments: tuple[str, ...],
        content_type: str,
        size: int | None,
        record: dict[str, object] | None,
        resumable: bool,
    ) -> IUpload:
        if size is None:
            raise StorageError(411, "object storage needs the upload's length")
        key = _key(segments)
        pkey = path_key(segments)
        # Both questions at once: one round trip of latency, not two.
        blocked, found = await _both(self._tombstoned(pkey), self._exists(key))
        if blocked:
            raise StorageError(403, TOMBSTONED)
        if found:
            raise StorageError(409, "file already exists")
        # Whatever an earlier attempt left is dropped: this upload starts over.
        await self._forget_upload(pkey, key)
        metadata: dict[str, str] = {}
        sha = record.get("sha256") if record else None
        if isinstance(sha, str):
            metadata["sha256"] = sha
        if resumable:
            # The record, so that a session-token HEAD on any node sees the upload (at 0).
            await self._put_record(pkey, key, size, content_type, None, record, metadata)
        return S3FileUpload(
            self, segments, content_type, size, upload_id=None, parts=[], pending=0,
            record=record, metadata=metadata, resumable=resumable,
        )

    async def _put_record(
        self,
        pkey: str,
        key: str,
        size: int,
        content_type: str,
        upload_id: str | None,
        record: dict[str, object] | None,
        metadata: dict[str, str],
    ) -> None:
        await self._put_small(
            UPLOADS + pkey,
            json.dumps({
                "path": key, "size": size, "content_type": content_type,
                "upload_id": upload_id, "record": record, "metadata": metadata,
            }).encode("utf-8"),
        )

    async def _state(self, segments: tuple[str, ...]) -> tuple[dict[str, Any], list[Part], int, float] | None:
        """An upload in progress: its record object, completed parts, pending bytes, mtime."""
        pkey = path_key(segments)
        found = await self._get_small(UPLOADS + pkey)
        if found is None:
            return None
        try:
            state = json.loads(found[0])
        except ValueError:
            return None
        mtime = _epoch(found[1])
        parts: list[Part] = []
        marker: int | None = None
        try:
            while state.get("upload_id"):
                page = await self.client.list_parts(
                    state["path"], state["upload_id"], part_number_marker=marker
                )
                parts.extend(page.parts)
                marker = page.next_marker
                if marker is None:
                    break
        except NotFound:
            return None  # the multipart upload was aborted (expired): nothing to resume
        parts.sort(key=lambda p: p.part_number)
        # Only the parts that follow on from part 1 without a gap count.
        contiguous: list[Part] = []
        for part in parts:
            if part.part_number != len(contiguous) + 1:
                break
            contiguous.append(part)
        pending = 0
        incomplete = await self._head(INCOMPLETE + pkey)
        if incomplete is not None:
            pending = incomplete.size
            mtime = max(mtime, _epoch(incomplete))
        return state, contiguous, pending, mtime

    def store_whole(
        self,
        segments: Sequence[str],
        content_type: str,
        chunks: Sequence[bytes],
        hashers: Sequence[Hasher] = (),
        digest: Callable[[], str | None] | None = None,
    ) -> Deferred[StoredFile]:
        return self._run(self._store_whole(tuple(segments), content_type, chunks, hashers, digest))

    async def _store_whole(
        self,
        segments: tuple[str, ...],
        content_type: str,
        chunks: Sequence[bytes],
        hashers: Sequence[Hasher],
        digest: Callable[[], str | None] | None,
    ) -> StoredFile:
        size = sum(len(chunk) for chunk in chunks)
        upload = await self._admit(segments, content_type, size, None, False)
        upload.expect(size)
        try:
            return await upload.write_and_commit(chunks, hashers, digest)
        except BaseException:
            try:
                await upload.abort()
            except StorageError:
                pass  # the answer is the first failure; a PutObject cut short leaves nothing
            raise

    def resume(self, segments: Sequence[str], remaining: int | None) -> Deferred[IUpload | None]:
        return self._run(self._resume(tuple(segments)))

    async def _resume(self, segments: tuple[str, ...]) -> IUpload | None:
        blocked, found = await _both(
            self._tombstoned(path_key(segments)), self._exists(_key(segments))
        )
        if blocked:
            raise StorageError(403, TOMBSTONED)
        if found:
            raise StorageError(409, "file already exists")
        progress = await self._state(segments)
        if progress is None:
            return None
        state, parts, pending, _ = progress
        return S3FileUpload(
            self, segments, str(state["content_type"]), int(state["size"]),
            upload_id=state.get("upload_id") or None, parts=parts, pending=pending,
            record=state.get("record"), metadata=dict(state.get("metadata") or {}),
        )

    def upload_status(self, segments: Sequence[str]) -> Deferred[tuple[int, dict[str, object]] | None]:
        return self._run(self._status(tuple(segments)))

    async def _status(self, segments: tuple[str, ...]) -> tuple[int, dict[str, object]] | None:
        found = await self._state(segments)
        if found is None or not found[0].get("record"):
            return None
        state, parts, pending, _ = found
        return sum(p.size for p in parts) + pending, dict(state["record"])

    def upload_mtime(self, segments: Sequence[str]) -> Deferred[float | None]:
        return self._run(self._mtime(tuple(segments)))

    async def _mtime(self, segments: tuple[str, ...]) -> float | None:
        found = await self._state(segments)
        return None if found is None else found[3]

    def remove_upload(self, segments: Sequence[str]) -> Deferred[bool]:
        return self._run(self._remove(tuple(segments)))

    async def _remove(self, segments: tuple[str, ...]) -> bool:
        pkey = path_key(segments)
        if await self._head(UPLOADS + pkey) is None:
            return False
        await self._forget_upload(pkey, _key(segments))
        return True

    async def _forget_upload(self, pkey: str, key: str | None, *, upload_id: str | None = None) -> None:
        """Drop an upload's multipart upload, incomplete part and record (what exists of them)."""
        if key is not None and upload_id is None:
            found = await self._get_small(UPLOADS + pkey)
            if found is None:
                # No record, nothing else: the incomplete part is written after the record
                # and deleted before it.  (Spares a fresh upload two DELETEs.)
                return
            try:
                upload_id = json.loads(found[0]).get("upload_id")
            except ValueError:
                upload_id = None
        if key is not None and upload_id:
            try:
                await self.client.abort_multipart_upload(key, upload_id)
            except NotFound:
                pass
        await self.client.delete_object(INCOMPLETE + pkey)
        await self.client.delete_object(UPLOADS + pkey)

    def sweep_uploads(self, max_idle: float) -> Deferred[int]:
        return self._run(self._sweep(max_idle))

    async def _sweep(self, max_idle: float) -> int:
        """Uploads idle longer than ``max_idle`` (their record, parts and incomplete part) go."""
        horizon = self._now() - max_idle
        removed = 0
        token: str | None = None
        while True:
            page = await self.client.list_objects_v2(UPLOADS, continuation_token=token)
            for item in page.objects:
                pkey = item.key[len(UPLOADS):]
                modified = item.last_modified.timestamp() if item.last_modified else self._now()
                if modified >= horizon:
                    continue
                found = await self._get_small(item.key)
                state = {}
                if found is not None:
                    try:
                        state = json.loads(found[0])
                    except ValueError:
                        state = {}
                incomplete = await self._head(INCOMPLETE + pkey)
                if incomplete is not None and _epoch(incomplete) >= horizon:
                    continue  # a tus client is still sending, one short PATCH at a time
                await self._forget_upload(pkey, state.get("path"), upload_id=state.get("upload_id"))
                removed += 1
            token = page.next_token
            if token is None:
                break
        # Multipart uploads nobody recorded (a node died between create and record).
        markers: tuple[str, str] | None = None
        while True:
            uploads = await self.client.list_multipart_uploads(
                key_marker=markers[0] if markers else None,
                upload_id_marker=markers[1] if markers else None,
            )
            for upload in uploads.uploads:
                started = upload.initiated.timestamp() if upload.initiated else self._now()
                if started >= horizon or upload.key.startswith(INTERNAL):
                    continue
                if await self._head(UPLOADS + path_key(upload.key.split("/"))) is not None:
                    continue
                try:
                    await self.client.abort_multipart_upload(upload.key, upload.upload_id)
                    removed += 1
                except NotFound:
                    pass
            markers = uploads.next_markers
            if markers is None:
                return removed

    # -- one writer per upload: the shared state's lock (Redis across nodes) is the guard

    def writer_lock_free(self, key: str) -> Deferred[bool]:
        """
        Never known to be free: nothing in the bucket says whether the writer holding the
        lock is alive (a filesystem has its flock for that).  "Free" would let a process on
        the same host (another node, a worker) take the Redis lock of a live writer and start
        the upload over under it; so a dead writer's lock is taken over once it expires
        (``LOCK_TTL``, 30 s), and a live one lets go when asked (the takeover marker).
        """
        return succeed(False)

    def request_takeover(self, segments: Sequence[str]) -> Deferred[None]:
        data = f"{self._now():.3f}\n".encode("ascii")
        return self._run(self._put_small(TAKEOVER + path_key(segments), data))

    def takeover_requested(self, segments: Sequence[str], since: float) -> Deferred[bool]:
        return self._run(self._takeover_requested(path_key(segments), since))

    async def _takeover_requested(self, pkey: str, since: float) -> bool:
        found = await self._get_small(TAKEOVER + pkey)
        if found is None:
            return False
        try:
            return float(found[0]) >= since
        except ValueError:
            return False

    def takeovers_requested(
        self, uploads: Sequence[tuple[Sequence[str], float]]
    ) -> Deferred[list[bool]]:
        return self._run(self._takeovers(uploads))

    async def _takeovers(self, uploads: Sequence[tuple[Sequence[str], float]]) -> list[bool]:
        asked = [
            Deferred.fromCoroutine(self._takeover_requested(path_key(segments), since))
            for segments, since in uploads
        ]
        if not asked:
            return []
        return await _settled(asked)

    def clear_takeover(self, segments: Sequence[str]) -> Deferred[None]:
        return self.client.delete_object(TAKEOVER + path_key(segments)).addErrback(_as_storage_error)


if TYPE_CHECKING:
    def _implements(store: S3Store, upload: S3FileUpload, source: S3Range) -> tuple[IStore, IUpload, IByteSource]:
        return store, upload, source
