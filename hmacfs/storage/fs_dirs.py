# -*- test-case-name: tests.test_storage_parts -*-
"""
Descriptors of the store's private directories, opened without following a link and
recreated when an operator (or a cleanup script) removes them under a running server.

Everything in the private tree is done relative to these descriptors, so a symlink swapped
in for ``.hmacfs`` or one of its subdirectories is never followed: it is refused (503) and
logged once, until the operator fixes it.
"""

from __future__ import annotations

import errno
import os
import threading
import time
from pathlib import Path

from hmacfs.storage.fsio import DIR_MODE, close_all, identity, log, open_dir
from hmacfs.storage.interface import StorageError
from hmacfs.storage.layout import META_DIR, PARTIAL_DIR, PRIVATE_DIR

#: How often (seconds) the cached private-directory descriptors are checked against the
#: names (a directory removed or replaced under a running server is reopened or recreated).
DIR_RECHECK_SECONDS = 1.0
_ROOT_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC


class Dirs:
    """
    Descriptors of the store root and of ``.hmacfs``, ``.hmacfs/partial`` and
    ``.hmacfs/meta``.  A snapshot: when a directory is replaced (deleted and recreated),
    ``PrivateDirs`` opens a new ``Dirs``; the old one closes its descriptors when the last
    upload or call using it lets go of it (reference counting), so a descriptor is never
    closed under a thread that still uses it.
    """

    __slots__ = ("root", "private", "partial", "meta", "ids")

    def __init__(self, root: int, private: int, partial: int, meta: int) -> None:
        self.root, self.private, self.partial, self.meta = root, private, partial, meta
        self.ids = tuple(identity(os.fstat(fd)) for fd in (root, private, partial, meta))

    def __del__(self) -> None:
        for fd in (self.meta, self.partial, self.private, self.root):
            try:
                os.close(fd)
            except OSError:
                pass


class PrivateDirs:
    """
    The store's current ``Dirs``: checked against the names at most every
    ``DIR_RECHECK_SECONDS`` (or when ``get(force=True)`` is asked after a name was found
    missing), reopened when one was replaced and recreated when one was removed, with a
    warning.  A link or a file in their place is refused (503) and logged once per change.
    """

    #: whether finished files keep their metadata in an attribute (``metadata``), not a
    #: sidecar under ``meta``: set by the ``Store`` once its probe found attributes work
    meta_xattr: bool = False

    def __init__(self, root: str) -> None:
        self.root = root
        #: the root with a trailing separator (what log messages and path checks prefix)
        self.root_prefix = root.rstrip(os.sep) + os.sep
        self.partial_path = Path(root) / PRIVATE_DIR / PARTIAL_DIR
        self.meta_path = Path(root) / PRIVATE_DIR / META_DIR
        #: ``partial_path`` as the log shows it
        self.partial_where = str(self.partial_path)
        self._lock = threading.Lock()
        #: what was last found wrong with the private directories (logged once per change)
        self._problem: str | None = None
        self._cached = self._open(None)
        self._checked = time.monotonic()

    def get(self, *, force: bool = False) -> Dirs:
        """The private-directory descriptors, rechecked against their names now and then."""
        if not force and time.monotonic() - self._checked < DIR_RECHECK_SECONDS:
            return self._cached
        with self._lock:
            dirs = self._cached
            if self._current(dirs):
                self._checked = time.monotonic()
                return dirs
            dirs = self._cached = self._open(dirs)
            self._checked = time.monotonic()
            return dirs

    def _open(self, old: Dirs | None) -> Dirs:
        """
        Open root, ``.hmacfs``, ``partial`` and ``meta`` without following links, creating
        what is missing (a warning when that happens under a running store).
        """
        created: list[str] = []
        fds: list[int] = []
        shown = ""
        try:
            fds.append(os.open(self.root, _ROOT_FLAGS))
            for parent, name, shown in (
                (0, PRIVATE_DIR, PRIVATE_DIR),
                (1, PARTIAL_DIR, f"{PRIVATE_DIR}/{PARTIAL_DIR}"),
                (1, META_DIR, f"{PRIVATE_DIR}/{META_DIR}"),
            ):
                fds.append(_open_or_create(name, fds[parent], shown, created))
        except OSError as e:
            close_all(fds)
            if e.errno in (errno.ENOTDIR, errno.ELOOP):
                problem = f"{self.root_prefix}{shown} is a symlink or not a directory"
                if problem != self._problem:
                    self._problem = problem
                    log.error("store unusable: {problem}; refusing uploads", problem=problem)
                raise StorageError(503, "store unavailable") from None
            raise
        self._problem = None
        if created and old is not None:
            log.warn(
                "recreated missing store directories under {root}: {dirs}",
                root=self.root,
                dirs=", ".join(created),
            )
        return Dirs(*fds)

    def _current(self, dirs: Dirs) -> bool:
        """Whether each cached descriptor is still the directory its name designates."""
        try:
            found = (
                identity(os.stat(self.root)),
                identity(os.stat(PRIVATE_DIR, dir_fd=dirs.root, follow_symlinks=False)),
                identity(os.stat(PARTIAL_DIR, dir_fd=dirs.private, follow_symlinks=False)),
                identity(os.stat(META_DIR, dir_fd=dirs.private, follow_symlinks=False)),
            )
        except OSError:
            return False
        return found == dirs.ids and self._problem is None


def _open_or_create(name: str, parent: int, shown: str, created: list[str]) -> int:
    """Open the directory ``name`` below ``parent``, creating it first if it is missing."""
    try:
        return open_dir(name, parent)
    except FileNotFoundError:
        try:
            os.mkdir(name, DIR_MODE, dir_fd=parent)
            created.append(shown)
        except FileExistsError:
            pass
        return open_dir(name, parent)


class Handle:
    """One directory descriptor, closed when the last user lets go of it (see ``Dirs``)."""

    __slots__ = ("fd",)

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def __del__(self) -> None:
        try:
            os.close(self.fd)
        except OSError:
            pass


class PrivateDir:
    """
    ``StoreDir/.hmacfs/<name>`` (tombstones), reached without following a link: a link or
    a file in its place or in place of ``.hmacfs`` is refused (503); removed, it is
    recreated on ``reopen`` with one warning.
    """

    def __init__(self, root: Path, name: str) -> None:
        self._root = os.path.realpath(root)
        self.name = name
        self.path = Path(self._root) / PRIVATE_DIR / name
        self._lock = threading.Lock()
        self.handle = self._open(warn=False)

    def _open(self, *, warn: bool) -> Handle:
        created: list[str] = []
        fds: list[int] = []
        try:
            fds.append(os.open(self._root, _ROOT_FLAGS))
            for name in (PRIVATE_DIR, self.name):
                fds.append(_open_or_create(name, fds[-1], name, created))
        except OSError as e:
            close_all(fds)
            if e.errno in (errno.ENOTDIR, errno.ELOOP):
                log.error("{path} is a symlink or not a directory", path=str(self.path))
                raise StorageError(503, "store unavailable") from None
            raise
        if created and warn:
            log.warn("recreated missing store directory {path}", path=str(self.path))
        close_all(fds[:-1])
        return Handle(fds[-1])

    def reopen(self) -> Handle:
        """The directory was found missing: open it again (recreating it)."""
        with self._lock:
            self.handle = self._open(warn=True)
            return self.handle
