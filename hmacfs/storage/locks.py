# -*- test-case-name: tests.test_storage_parts -*-
"""
One writer per upload: an exclusive ``flock`` on its partial file, held from open to
commit, abort or release, and takeover markers that ask the writer to let go.

The lock refuses a second writer in this process, in another worker process or (where the
filesystem supports it) on another node sharing the store, and a writer that dies (even
``kill -9``) lets go at once.  Every function works in the ``partial`` directory, given as
a descriptor (``directory``).
"""

from __future__ import annotations

import errno
import fcntl
import os

from hmacfs.storage.fsio import FILE_MODE, READ_FLAGS, log, opened_stat, same_file, unlink_quietly
from hmacfs.storage.interface import StorageError
from hmacfs.storage.layout import partial_name, takeover_name

_WRITE_FLAGS = os.O_WRONLY | os.O_CLOEXEC | os.O_NOFOLLOW


def try_lock(fd: int) -> bool:
    """Take the one-writer lock of a partial file without waiting; False if someone holds it."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def open_locked(directory: int, name: str, *, create: bool, where: str = "") -> int | None:
    """
    Open a partial file for writing and take its one-writer lock.

    Returns None if it does not exist (and ``create`` is false); 409 if another writer
    holds it.  A name unlinked or replaced between our open and our lock (a commit or a
    sweep that won the race) is opened again, so the lock is always on the file that
    the name designates.  ``where`` names the directory in the log.
    """
    flags = _WRITE_FLAGS | (os.O_CREAT if create else 0)
    for _attempt in range(5):
        try:
            fd = os.open(name, flags, FILE_MODE, dir_fd=directory)
        except FileNotFoundError:
            if create:
                raise
            return None
        except OSError as e:
            if e.errno != errno.ELOOP:
                raise
            # Not ours: a link someone planted at a partial file's name.  Removing the
            # link (never what it points to) gives the name back to the upload.
            log.warn("removing a symlink in {dir}: {name}", dir=where, name=name)
            unlink_quietly(name, directory)
            continue
        if not try_lock(fd):
            os.close(fd)
            raise StorageError(409, "upload already in progress")
        if same_file(fd, name, directory):
            return fd
        os.close(fd)
    raise StorageError(409, "upload already in progress")


def open_locked_new(directory: int, name: str, *, where: str = "") -> tuple[int, bool]:
    """
    ``open_locked(create=True)``, and whether the file was created just now (empty, and
    no record of an earlier upload beside it can be ours to reuse).

    ``O_EXCL`` tells a new file from a leftover in the same ``open``; the lock and the
    check that the name still designates the locked file are the same as for a leftover.
    """
    try:
        fd = os.open(name, _WRITE_FLAGS | os.O_CREAT | os.O_EXCL, FILE_MODE, dir_fd=directory)
    except FileExistsError:
        return _open_leftover(directory, name, where), False
    if not try_lock(fd):
        os.close(fd)
        raise StorageError(409, "upload already in progress")
    st = opened_stat(fd, name, directory)
    if st is None or st.st_size:
        # Someone else got at the new name between our create and our lock (a commit or
        # a sweep that won the race, another writer): take the general path.
        os.close(fd)
        return _open_leftover(directory, name, where), False
    return fd, True


def _open_leftover(directory: int, name: str, where: str) -> int:
    fd = open_locked(directory, name, create=True, where=where)
    assert fd is not None  # create=True: missing raises
    return fd


def lock_free(directory: int, key: str) -> bool:
    """Whether no process here holds the writer lock of the upload with this path key."""
    try:
        fd = os.open(partial_name(key), READ_FLAGS, dir_fd=directory)
    except FileNotFoundError:
        return True
    try:
        return try_lock(fd)
    finally:
        os.close(fd)  # closing drops the probe's lock


def request_takeover(directory: int, key: str) -> None:
    """Touch the upload's takeover marker (its writer checks for it every second)."""
    fd = os.open(takeover_name(key), _WRITE_FLAGS | os.O_CREAT, FILE_MODE, dir_fd=directory)
    try:
        os.utime(fd)
    finally:
        os.close(fd)


def takeover_requested(directory: int, key: str, since: float) -> bool:
    """Whether a takeover marker newer than ``since`` (epoch seconds) exists."""
    try:
        st = os.stat(takeover_name(key), dir_fd=directory, follow_symlinks=False)
    except FileNotFoundError:
        return False
    return st.st_mtime >= since


def clear_takeover(directory: int, key: str) -> None:
    unlink_quietly(takeover_name(key), directory)
