"""
One request's body writer on its own (hmacfs.upload.receiver): a fake partial
file behind the filesystem backend's ``FilesystemUpload`` (so every store call
is a job of the runner), a fake channel and a disk that runs when the test
says, no socket.

``UploadFinish`` is the commit protocol (commit after the checksums, keep for
a resume, remove) and ``UploadReceiver`` the write pipeline (batches, pausing
the socket, the last batch and the commit in one job).
"""

from __future__ import annotations

import errno
import hashlib
from pathlib import Path
from typing import Any

import attrs
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from hmacfs.storage.fs_backend import FilesystemUpload
from hmacfs.storage.interface import StorageError, StoredFile
from hmacfs.testing import ManualRunner
from hmacfs.upload import tus
from hmacfs.upload.receiver import (
    MAX_BATCH_BUFFERS,
    Progress,
    UploadFailed,
    UploadFinish,
    UploadReceiver,
)
from hmacfs.upload.resume import UploadEnd


@attrs.define
class FakePartial:
    """A partial file in memory, recording what was done to it."""

    data: bytearray = attrs.field(factory=bytearray)
    segments: tuple[str, ...] = ("u", "a.bin")
    content_type: str = "text/plain"
    size: int | None = None
    offset: int = 0
    record: dict[str, object] | None = None
    calls: list[str] = attrs.field(factory=list)
    commit_error: BaseException | None = None
    write_error: BaseException | None = None
    digests: list[str | None] = attrs.field(factory=list)
    writes: list[int] = attrs.field(factory=list)

    @property
    def written(self) -> int:
        return len(self.data)

    def write(self, batch: list[bytes]) -> int:
        if self.write_error is not None:
            raise self.write_error
        self.writes.append(len(batch))
        count = sum(len(chunk) for chunk in batch)
        self.data += b"".join(batch)
        return count

    def datasync(self) -> None:
        self.calls.append("datasync")

    def hash_prefix(self, hasher: Any, length: int) -> None:
        hasher.update(bytes(self.data[:length]))

    def truncate(self, length: int) -> None:
        self.calls.append(f"truncate {length}")
        del self.data[length:]

    def release(self) -> int:
        self.calls.append("release")
        return len(self.data)

    def abort(self) -> None:
        self.calls.append("abort")

    def commit(self, digest: str | None) -> StoredFile:
        if self.commit_error is not None:
            raise self.commit_error
        self.calls.append("commit")
        self.digests.append(digest)
        return StoredFile(Path("/x"), len(self.data), 0.0, "text/plain", "etag", digest)


class FinishTests(SynchronousTestCase):
    """How the partial file ends and what ``done`` says, with the disk run at once."""

    def finish(self, partial: FakePartial | None = None, **kw: Any) -> UploadFinish:
        self.partial = partial or FakePartial()
        self.ends: list[UploadEnd] = []
        finish = UploadFinish(
            FilesystemUpload(self.partial, ManualRunner(auto=True)),  # type: ignore[arg-type]
            on_end=self.ends.append,
            **kw,
        )
        self.results: list[Any] = []
        finish.done.addBoth(self.results.append)
        return finish

    def failure(self) -> UploadFailed:
        [result] = self.results
        self.assertIsInstance(result, Failure)
        self.assertIsInstance(result.value, UploadFailed)
        return result.value

    def test_commit_when_complete(self) -> None:
        """All signed bytes in the file: commit, ``done`` is the stored file, on_end says stored."""
        finish = self.finish(FakePartial(bytearray(b"hello")), total=5)
        finish.body_done(5)
        self.assertEqual(self.partial.calls, ["commit"])
        [stored] = self.results
        self.assertEqual(stored.size, 5)
        self.assertEqual(self.ends, [UploadEnd("stored", 5)])
        self.assertTrue(finish.finishing)

    def test_keep_when_short(self) -> None:
        """Fewer bytes than the upload's size: kept for the next request, ``done`` is Progress."""
        finish = self.finish(FakePartial(bytearray(b"hel")), total=5)
        finish.body_done(3)
        self.assertEqual(self.partial.calls, ["release"])
        self.assertEqual(self.results, [Progress(3, 5)])
        self.assertEqual(self.ends, [UploadEnd("kept", 3, True)])

    def test_whole_file_checksum_covers_earlier_requests(self) -> None:
        """The SHA-256 is over the whole file: bytes an earlier request wrote are hashed first."""
        partial = FakePartial(bytearray(b"hel"))
        finish = self.finish(partial, total=5, expected_sha256=hashlib.sha256(b"hello").digest())
        finish.write([b"lo"])
        finish.body_done(5)
        self.assertEqual(partial.digests, [hashlib.sha256(b"hello").hexdigest()])
        self.assertEqual(self.ends, [UploadEnd("stored", 5)])

    def test_checksum_mismatch_removes(self) -> None:
        """A whole-file SHA-256 that differs: nothing is stored, the partial is removed, 400."""
        finish = self.finish(FakePartial(), total=5, expected_sha256=hashlib.sha256(b"other").digest())
        finish.write([b"hello"])
        finish.body_done(5)
        self.assertEqual(self.partial.calls, ["abort"])
        self.assertEqual(self.failure().status, 400)
        self.assertEqual(self.ends, [UploadEnd("removed", 0)])

    def test_chunk_checksum_mismatch_cuts_the_chunk(self) -> None:
        """A tus chunk whose Upload-Checksum differs is cut off; the upload stays where it was."""
        partial = FakePartial(bytearray(b"abc"))
        finish = self.finish(partial, total=10, chunk_checksum=("sha1", hashlib.sha1(b"xyz").digest()))
        self.assertTrue(finish.checks_chunk)
        finish.write([b"def"])
        finish.body_done(6)
        self.assertEqual(partial.calls, ["truncate 3", "release"])
        self.assertEqual(bytes(partial.data), b"abc")
        error = self.failure()
        self.assertEqual((error.status, error.headers), (tus.CHECKSUM_MISMATCH, ((b"Upload-Offset", b"3"),)))
        self.assertEqual(self.ends, [UploadEnd("kept", 3, True)])

    def test_chunk_checksum_match_keeps(self) -> None:
        """A matching chunk checksum: the chunk stays, as any short request's bytes."""
        partial = FakePartial(bytearray(b"abc"))
        finish = self.finish(partial, total=10, chunk_checksum=("sha1", hashlib.sha1(b"def").digest()))
        finish.write([b"de", b"f"])
        finish.body_done(6)
        self.assertEqual(self.results, [Progress(6, 10)])

    def test_interrupted(self) -> None:
        """A client gone: its bytes are kept if resumable, an empty file only for tus."""
        for keep, keep_empty, data, outcome in (
            (True, False, b"abc", "kept"),
            (True, False, b"", "removed"),
            (True, True, b"", "kept"),
            (False, False, b"abc", "removed"),
        ):
            finish = self.finish(FakePartial(bytearray(data)), total=10, keep_on_interrupt=keep,
                                 keep_empty=keep_empty)
            finish.interrupted(len(data))
            self.assertEqual([end.outcome for end in self.ends], [outcome])
            self.assertFalse(self.ends[0].clean)
            self.assertEqual(self.results, [])  # nobody to answer

    def test_commit_failures(self) -> None:
        """A full disk is 507, a store refusal keeps its status, anything else 500; all removed."""
        for error, status in (
            (OSError(errno.ENOSPC, "full"), 507),
            (OSError(errno.EDQUOT, "quota"), 507),
            (StorageError(409, "file already exists"), 409),
            (RuntimeError("bug"), 500),
        ):
            finish = self.finish(FakePartial(bytearray(b"hello"), commit_error=error), total=5)
            finish.body_done(5)
            self.assertEqual(self.failure().status, status, error)
            self.assertEqual(self.ends, [UploadEnd("removed", 0)])
        self.flushLoggedErrors(RuntimeError)

    def test_write_failure_classified(self) -> None:
        """A failed write: (the answer, whether the disk is full)."""
        finish = self.finish()
        for error, expected in (
            (OSError(errno.ENOSPC, "full"), (507, True)),
            (StorageError(507, "insufficient storage"), (507, True)),
            (StorageError(503, "storage unavailable"), (503, False)),
            (RuntimeError("bug"), (500, False)),
        ):
            answer, full = finish.write_failure(Failure(error))
            self.assertEqual((answer.status, full), expected, error)
        self.flushLoggedErrors(RuntimeError)

    def test_write_failure_keeps_the_answer_headers(self) -> None:
        """A refusal already made an answer (a one-step upload's admission: 409 with
        Retry-After) goes out as it is; a store error keeps its headers too."""
        from hmacfs.errors import Refusal

        finish = self.finish()
        retry = ((b"Retry-After", b"5"),)
        for error in (
            Refusal(409, "upload already in progress", retry),
            UploadFailed(409, "file already exists", retry),
            StorageError(503, "storage unavailable", retry),
        ):
            answer, full = finish.write_failure(Failure(error))
            self.assertEqual((answer.status, answer.reason, answer.headers, full),
                             (error.status, error.reason, retry, False), error)
            self.assertIsInstance(answer, UploadFailed)
        self.assertEqual(self.flushLoggedErrors(), [])

    def test_on_end_once(self) -> None:
        """``on_end`` hears exactly once, however many endings are reported."""
        finish = self.finish(total=5)
        finish.ended(UploadEnd("kept", 1))
        finish.ended(UploadEnd("removed", 0))
        self.assertEqual(self.ends, [UploadEnd("kept", 1)])


@attrs.define
class FakeFlow:
    """The channel's flow control as the receiver calls it."""

    calls: list[str] = attrs.field(factory=list)
    transport: Any = None

    def pause_body(self) -> None:
        self.calls.append("pause")

    def resume_body(self) -> None:
        self.calls.append("resume")

    def refuse_body(self, consumer: Any) -> None:
        self.calls.append("refuse")


class PipelineTests(SynchronousTestCase):
    """Batches, back-pressure and the one-job finish, with the disk held back."""

    def receiver(self, total: int, partial: FakePartial | None = None, **kw: Any) -> UploadReceiver:
        self.partial = partial or FakePartial()
        self.runner = ManualRunner()
        self.flow = FakeFlow()
        self.ends: list[UploadEnd] = []
        finish = UploadFinish(
            FilesystemUpload(self.partial, self.runner),  # type: ignore[arg-type]
            total=total, on_end=self.ends.append, keep_on_interrupt=True,
        )
        receiver = UploadReceiver(finish, flow=self.flow, high_water=100, **kw)
        self.results: list[Any] = []
        receiver.done.addBoth(self.results.append)
        return receiver

    def test_pauses_above_high_water_and_resumes_below_half(self) -> None:
        """While a write is in flight, more than high_water queued bytes pause the socket."""
        receiver = self.receiver(1000)
        receiver.write(b"a" * 10)  # starts a write
        for _ in range(9):
            receiver.write(b"b" * 10)
        self.assertEqual(self.flow.calls, [])
        receiver.write(b"c" * 10)
        receiver.write(b"d" * 10)
        self.assertEqual(self.flow.calls, ["pause"])
        self.runner.run_all()
        self.assertEqual(self.flow.calls, ["pause", "resume"])
        self.assertEqual(receiver.offset, 120)
        self.assertEqual(self.partial.writes, [1, 11])  # the queue went as one batch

    def test_batches_are_bounded(self) -> None:
        """At most MAX_BATCH_BUFFERS buffers go to one write."""
        receiver = self.receiver(10**6)
        receiver.write(b"x")
        for _ in range(MAX_BATCH_BUFFERS + 10):
            receiver.write(b"y")
        self.runner.run_all()
        self.assertEqual(self.partial.writes, [1, MAX_BATCH_BUFFERS, 10])

    def test_whole_small_body_is_one_job(self) -> None:
        """A body that completes the upload in one read: write and commit in one disk job."""
        receiver = self.receiver(5)
        receiver.write(b"hello")
        self.assertEqual(self.runner.jobs, [])  # waits for body_complete
        receiver.body_complete()
        self.assertEqual(len(self.runner.jobs), 1)
        self.assertEqual(self.runner.run_all(), 1)
        self.assertEqual(self.partial.calls, ["commit"])
        self.assertEqual(self.results[0].size, 5)
        self.assertEqual(self.ends, [UploadEnd("stored", 5)])

    def test_short_body_is_kept(self) -> None:
        """A request that ends before the upload does: written, kept, Progress."""
        receiver = self.receiver(10)
        receiver.write(b"abc")
        receiver.body_complete()
        self.runner.run_all()
        self.assertEqual(self.results, [Progress(3, 10)])
        self.assertEqual(self.ends, [UploadEnd("kept", 3, True)])

    def test_connection_lost_keeps_what_was_written(self) -> None:
        """The client leaves with a write in flight: that write lands, then the file is kept."""
        receiver = self.receiver(10)
        receiver.write(b"abc")
        receiver.write(b"def")
        receiver.connection_lost()
        self.runner.run_all()
        self.assertEqual(bytes(self.partial.data), b"abc")
        self.assertEqual(self.ends, [UploadEnd("kept", 3, False)])
        self.assertEqual(self.results, [])

    def test_write_failure_mid_body_refuses_the_rest(self) -> None:
        """A write that fails before the body ends: the channel is asked to refuse the rest,
        the answer comes when the body ends, and a full disk's bytes are not kept."""
        receiver = self.receiver(10, FakePartial(write_error=OSError(errno.ENOSPC, "full")))
        receiver.write(b"abc")
        self.runner.run_all()
        self.assertEqual(self.flow.calls, ["refuse"])
        self.assertEqual(self.ends, [UploadEnd("removed", 0, False)])
        self.assertEqual(self.results, [])
        receiver.body_complete()
        [failure] = self.results
        self.assertEqual(failure.value.status, 507)

    def test_checkpoints_sync_and_report(self) -> None:
        """
        Once checkpoint_bytes are on disk since the last checkpoint, the next write is
        synced and the offset after it reported (never ahead of the disk).
        """
        reported: list[int] = []
        receiver = self.receiver(
            100, progress=reported.append, checkpoint_bytes=5, checkpoint_seconds=10**9,
            clock=_Clock(),
        )
        receiver.write(b"abcdef")
        self.runner.run_all()
        self.assertEqual((self.partial.calls, reported), ([], []))
        receiver.write(b"gh")
        self.runner.run_all()
        self.assertEqual((self.partial.calls, reported), (["datasync"], [8]))
        receiver.write(b"ijk")
        self.runner.run_all()
        self.assertEqual((self.partial.calls, reported), (["datasync"], [8]))


class _Clock:
    def seconds(self) -> float:
        return 0.0
