# -*- test-case-name: tests.test_storage_parts -*-
"""
Path safety of the upload tree: which segments may name a file, and the walk that reaches
a file's directory one ``openat`` at a time without following a link.

Paths come from ``hmacfs.signing.paths.SlotPath.segments``, already validated; the checks
here are repeated on purpose, so a bug elsewhere cannot write outside the store root.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Sequence
from typing import NoReturn

from hmacfs.storage.fsio import DIR_MODE, close_all, is_link, log, open_dir
from hmacfs.storage.interface import StorageError
from hmacfs.storage.layout import PRIVATE_DIR


def check_segments(segments: Sequence[str]) -> tuple[str, ...]:
    """Refuse anything that is not a plain list of plain names (SlotPath already did)."""
    if isinstance(segments, (str, bytes)):
        raise TypeError("segments must be a sequence of path segments, not a string")
    segs = tuple(segments)
    if not segs:
        raise StorageError(403, "empty path")
    for seg in segs:
        if (
            not isinstance(seg, str)
            or seg in ("", ".", "..")
            or "/" in seg
            or os.sep in seg
            or (os.altsep is not None and os.altsep in seg)
            or "\0" in seg
        ):
            raise StorageError(403, "forbidden path")
        try:
            seg.encode("utf-8")
        except UnicodeEncodeError:
            raise StorageError(403, "forbidden path") from None
    # casefold: on a case-insensitive filesystem ".HMACFS" is the same directory.
    if segs[0].casefold() == PRIVATE_DIR:
        raise StorageError(403, "forbidden path")
    return segs


def target_of(root_prefix: str, segs: tuple[str, ...]) -> str:
    """Where checked segments' file lives (a string: GETs are hot); 403 if outside root."""
    target = root_prefix + os.sep.join(segs)
    # What commonpath([root, normed]) == root says for a normalised absolute
    # path, without its cost on every request.
    if not os.path.normpath(target).startswith(root_prefix):
        raise StorageError(403, "forbidden path")
    return target


def open_parents(
    root_fd: int, segs: tuple[str, ...], *, create: bool, root_prefix: str = ""
) -> list[int] | None:
    """
    Open the directories between the root (``root_fd``) and the target, one ``openat``
    below the other (creating them if asked, each made durable in its parent with an
    fsync of the parent); the caller closes the descriptors (the last one is the target's
    parent; none for a file in the root).

    A symlink among them is refused (403): no link below root is followed, even one
    swapped in after a check, so an upload can never land outside it.  A regular file
    where a directory is needed is a conflict (409).  Returns None if a directory is
    missing and ``create`` is False.  ``root_prefix`` is only for the log message.
    """
    fds: list[int] = []
    parent = root_fd
    try:
        for seg in segs[:-1]:
            try:
                # Open first: the directory nearly always exists, and a mkdir that
                # fails with EEXIST would cost every upload one syscall per level.
                fd = open_dir(seg, parent)
            except FileNotFoundError:
                if not create:
                    close_all(fds)
                    return None
                try:
                    os.mkdir(seg, DIR_MODE, dir_fd=parent)
                except FileExistsError:
                    pass  # made meanwhile by another upload (whose fsync may not be done)
                # The new entry is made durable now, once: a commit into this directory
                # later fsyncs only the directory itself, not every one up to the root.
                os.fsync(parent)
                try:
                    fd = open_dir(seg, parent)
                except OSError as e:
                    _refuse(e, seg, parent, segs, len(fds), root_prefix)
            except OSError as e:
                _refuse(e, seg, parent, segs, len(fds), root_prefix)
            fds.append(fd)
            parent = fd
    except BaseException:
        close_all(fds)
        raise
    return fds


def _refuse(
    e: OSError, seg: str, parent: int, segs: tuple[str, ...], level: int, root_prefix: str
) -> NoReturn:
    """Why ``seg`` could not be opened as a directory: a link (403), a file (409), or ``e``."""
    if e.errno not in (errno.ENOTDIR, errno.ELOOP):
        raise e
    if is_link(seg, parent):
        log.warn("refusing symlinked directory {path}", path=root_prefix + os.sep.join(segs[: level + 1]))
        raise StorageError(403, "forbidden path") from None
    raise StorageError(409, "path conflicts with an existing file") from None
