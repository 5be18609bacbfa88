# -*- test-case-name: tests.test_storage_parts -*-
"""
The metadata of finished files (Content-Type, SHA-256), and the description of a stored
file GET/HEAD serve from it.

Where the filesystem has user extended attributes, the metadata is the ``user.hmacfs``
attribute of the file itself, set on the partial file before its data fsync: one
``fsetxattr`` per commit instead of a sidecar file's open, write, fsync, close, rename and
directory fsync (each a GIL hand-off on the disk pool), and never a moment when a finished
file has no metadata.  Elsewhere (or with ``MetadataXattr = false``) it is a sidecar file,
``.hmacfs/meta/<key>.json``; a file without the attribute (stored before, or copied without
its attributes) is described from its sidecar, so both kinds can share one store.

Each process keeps the metadata of recently served files in memory, keyed by the identity
of the file (its ``ctime`` changes with its attributes) and, for a sidecar, of the sidecar:
no call beyond the ``lstat`` per GET for an attribute, one ``stat`` for a sidecar.
"""

from __future__ import annotations

import errno
import json
import os
import secrets
from collections.abc import Callable
from pathlib import Path

from hmacfs.storage.fs_dirs import Dirs
from hmacfs.storage.fsio import etag, log, read_small, write_file
from hmacfs.storage.interface import StorageError, StoredFile
from hmacfs.storage.layout import meta_name, path_key

#: finished files whose metadata (Content-Type, SHA-256) each process keeps in memory
META_CACHE_SIZE = 4096
DEFAULT_CONTENT_TYPE = "application/octet-stream"


#: the extended attribute that holds a finished file's metadata
XATTR = "user.hmacfs"
#: errors that say the filesystem (or its mount) keeps no user attributes
_NO_XATTRS = {errno.ENOTSUP, errno.EOPNOTSUPP, errno.EPERM, errno.EACCES, errno.ENOSYS}


def _decode(raw: bytes, path: str) -> dict[str, object]:
    try:
        meta = json.loads(raw)
    except ValueError:
        log.failure("unreadable metadata for {path}", path=path)
        return {}
    return meta if isinstance(meta, dict) else {}


def read_meta(name: str, dir_fd: int, path: str) -> dict[str, object]:
    """The metadata stored as ``name`` in ``dir_fd``; {} if missing or unreadable."""
    try:
        raw = read_small(name, dir_fd)
    except FileNotFoundError:
        return {}
    except OSError:
        log.failure("unreadable metadata for {path}", path=path)
        return {}
    return _decode(raw, path)


def read_meta_xattr(target: str, path: str) -> dict[str, object] | None:
    """The metadata attribute of the file at ``target`` (not followed if a link); None if it
    has none (then its sidecar says), {} if it cannot be read."""
    try:
        raw = os.getxattr(target, XATTR, follow_symlinks=False)
    except OSError as error:
        if error.errno == errno.ENODATA or error.errno in _NO_XATTRS:
            return None
        if error.errno in (errno.ENOENT, errno.ENOTDIR):
            return {}
        log.failure("unreadable metadata for {path}", path=path)
        return {}
    return _decode(raw, path)


def encode_meta(
    *, path: str, content_type: str, size: int, sha256: str | None, created: float
) -> bytes:
    """The metadata of a file being committed, as stored (sidecar or attribute)."""
    meta = {
        "path": path,
        "content_type": content_type,
        "size": size,
        "sha256": sha256,
        "created": created,
    }
    return json.dumps(meta).encode("utf-8")


def write_meta(name: str, dir_fd: int, **fields: object) -> None:
    """Write (and fsync) the sidecar metadata of a file being committed (``encode_meta``)."""
    write_file(name, encode_meta(**fields), sync=True, dir_fd=dir_fd)  # type: ignore[arg-type]


def set_meta_xattr(fd: int, **fields: object) -> None:
    """Set the metadata attribute on the file being committed (its data fsync keeps it)."""
    os.setxattr(fd, XATTR, encode_meta(**fields))  # type: ignore[arg-type]


def xattrs_work(dir_fd: int) -> bool:
    """Whether files created in ``dir_fd`` take our attribute: a probe file, removed again."""
    name = f".xattr-probe-{os.getpid()}-{secrets.token_hex(4)}"
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW
    try:
        fd = os.open(name, flags, 0o600, dir_fd=dir_fd)
    except OSError:
        return False
    try:
        os.setxattr(fd, XATTR, b"{}")
        return os.getxattr(fd, XATTR) == b"{}"
    except OSError:
        return False
    finally:
        os.close(fd)
        try:
            os.unlink(name, dir_fd=dir_fd)
        except OSError:
            pass


class MetadataCache:
    """Describes finished files, their metadata read once per change (``META_CACHE_SIZE``)."""

    __slots__ = ("_entries", "size")

    def __init__(self, size: int = META_CACHE_SIZE) -> None:
        #: (segments, the file's identity) -> (metadata, the sidecar's identity or None)
        self._entries: dict[tuple[object, ...], tuple[dict[str, object], tuple[int, int] | None]] = {}
        self.size = size

    def stored_file(
        self,
        dirs: Callable[[], Dirs],
        segs: tuple[str, ...],
        st: os.stat_result,
        target: str,
        xattrs: bool = False,
    ) -> StoredFile:
        """The file ``target`` (whose ``lstat`` is ``st``) with its metadata (``xattrs``:
        its attribute first, where the store keeps them)."""
        key = (segs, st.st_ino, st.st_mtime_ns, st.st_size, st.st_ctime_ns)
        entry = self._entries.get(key)
        meta: dict[str, object] | None = None
        if entry is not None:
            meta, sidecar = entry
            if sidecar is not None and self._sidecar_identity(dirs, segs) != sidecar:
                meta = None
        if meta is None:
            meta = self._read(dirs, segs, target, xattrs, key)
        content_type = meta.get("content_type")
        sha256 = meta.get("sha256")
        return StoredFile(
            path=Path(target),
            size=st.st_size,
            mtime=st.st_mtime,
            content_type=content_type if isinstance(content_type, str) else DEFAULT_CONTENT_TYPE,
            etag=etag(st),
            sha256=sha256 if isinstance(sha256, str) else None,
        )

    def _read(
        self,
        dirs: Callable[[], Dirs],
        segs: tuple[str, ...],
        target: str,
        xattrs: bool,
        key: tuple[object, ...],
    ) -> dict[str, object]:
        path = "/".join(segs)
        sidecar: tuple[int, int] | None = None
        meta = read_meta_xattr(target, path) if xattrs else None
        if meta is None:
            sidecar = self._sidecar_identity(dirs, segs)
            if sidecar is None:
                return {}  # no metadata (yet): never cached
            meta = read_meta(meta_name(path_key(segs)), dirs().meta, path)
        if meta:
            if len(self._entries) >= self.size:
                self._entries.pop(next(iter(self._entries)))
            self._entries[key] = (meta, sidecar)
        return meta

    @staticmethod
    def _sidecar_identity(dirs: Callable[[], Dirs], segs: tuple[str, ...]) -> tuple[int, int] | None:
        try:
            meta_st = os.stat(meta_name(path_key(segs)), dir_fd=dirs().meta, follow_symlinks=False)
        except (OSError, StorageError):
            return None
        return (meta_st.st_ino, meta_st.st_mtime_ns)
