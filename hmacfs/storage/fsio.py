# -*- test-case-name: tests.test_storage_parts -*-
"""
The store's file primitives, all relative to a directory descriptor (``dir_fd``) and none
following a link: the store reaches every name through descriptors so that a symlink
swapped in below StoreDir is never followed.
"""

from __future__ import annotations

import errno
import json
import os
import stat as stat_mod
from collections.abc import Sequence
from pathlib import Path

from twisted.logger import Logger

from hmacfs.logs import log_router
from hmacfs.storage.interface import StorageError
from hmacfs.storage.layout import TMP_SUFFIX

#: The store's one logger, shared by its modules: its events keep the namespace they had
#: when the store was one module (operators' log filters match on it).
log = Logger(namespace="hmacfs.storage.filesystem", observer=log_router)

FILE_MODE = 0o640
DIR_MODE = 0o750
DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
READ_FLAGS = os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW
NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


def open_dir(name: str, dir_fd: int | None) -> int:
    """Open a directory below ``dir_fd`` without following a link (ENOTDIR/ELOOP if one)."""
    return os.open(name, DIR_FLAGS, dir_fd=dir_fd)


def is_link(name: str, dir_fd: int) -> bool:
    try:
        return stat_mod.S_ISLNK(os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode)
    except OSError:
        return False


def lexists(name: str, dir_fd: int) -> bool:
    try:
        os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return False
    return True


def close_all(fds: Sequence[int]) -> None:
    for fd in reversed(fds):
        os.close(fd)


def unlink_quietly(name: str | Path, dir_fd: int | None = None) -> None:
    try:
        os.unlink(name, dir_fd=dir_fd)
    except FileNotFoundError:
        pass


def identity(st: os.stat_result) -> tuple[int, int]:
    return st.st_dev, st.st_ino


def opened_stat(fd: int, name: str, dir_fd: int) -> os.stat_result | None:
    """The ``fstat`` of ``fd`` if ``name`` (in ``dir_fd``) still names that file, else None."""
    try:
        named = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return None
    opened = os.fstat(fd)
    if (named.st_ino, named.st_dev) != (opened.st_ino, opened.st_dev):
        return None
    return opened


def same_file(fd: int, name: str, dir_fd: int) -> bool:
    """Whether ``name`` still names the file open as ``fd`` (not unlinked or replaced)."""
    return opened_stat(fd, name, dir_fd) is not None


def etag(st: os.stat_result) -> str:
    """A strong validator: changes when the file is replaced, stable while it is not."""
    return f'"{st.st_size:x}-{st.st_mtime_ns:x}-{st.st_ino:x}"'


def translate(e: OSError) -> OSError | StorageError:
    """Map the OS errors a client can cause or should hear about; others stay 500s."""
    if e.errno in NO_SPACE:
        return StorageError(507, "insufficient storage")
    if e.errno == errno.ENAMETOOLONG:
        return StorageError(400, "file name too long")
    return e


def read_small(name: str, dir_fd: int) -> bytes:
    """
    The whole of a small file, with bare ``read`` calls: open, read, read (EOF), close.
    A buffered file object costs five more system calls (fstat twice, ioctl, lseek twice),
    and on the disk pool each system call hands the GIL back and forth.
    """
    fd = os.open(name, READ_FLAGS, dir_fd=dir_fd)
    try:
        parts: list[bytes] = []
        while True:
            part = os.read(fd, 65536)
            if not part:
                return b"".join(parts)
            parts.append(part)
    finally:
        os.close(fd)


def read_json(name: str, dir_fd: int) -> dict[str, object] | None:
    """A JSON object stored at ``name``, or None (missing, unreadable, not an object)."""
    try:
        raw = read_small(name, dir_fd)
    except FileNotFoundError:
        return None
    except OSError:
        log.failure("unreadable upload record {name}", name=name)
        return None
    try:
        data = json.loads(raw)
    except ValueError:
        log.failure("unreadable upload record {name}", name=name)
        return None
    return data if isinstance(data, dict) else None


def write_file(name: str | Path, data: bytes, *, sync: bool, dir_fd: int | None = None) -> None:
    """
    Create or truncate ``name`` (never through a symlink), write all of ``data``, maybe
    fsync.  On failure (a full disk) the file is removed again: nothing half-written stays.
    """
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC | os.O_NOFOLLOW
    fd = os.open(name, flags, FILE_MODE, dir_fd=dir_fd)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        if sync:
            os.fsync(fd)
    except BaseException:
        os.close(fd)
        unlink_quietly(name, dir_fd)
        raise
    os.close(fd)


def write_json(name: str, data: dict[str, object], *, sync: bool, dir_fd: int) -> None:
    """Write ``data`` to a temporary name and rename it over ``name`` (both in ``dir_fd``)."""
    tmp = name + TMP_SUFFIX
    write_file(tmp, json.dumps(data, sort_keys=True).encode("utf-8"), sync=sync, dir_fd=dir_fd)
    try:
        os.rename(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    except BaseException:
        unlink_quietly(tmp, dir_fd)
        raise
