# -*- test-case-name: tests.test_storage_parts -*-
"""
The metadata of finished files (``.hmacfs/meta/<key>.json``: Content-Type, SHA-256), and
the description of a stored file GET/HEAD serve from it.

Each process keeps the metadata of recently served files in memory, keyed by the identity
of the file and of its metadata file: one ``lstat`` per GET instead of open, read and JSON.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

from hmacfs.storage.fs_dirs import Dirs
from hmacfs.storage.fsio import etag, log, read_small, write_file
from hmacfs.storage.interface import StorageError, StoredFile
from hmacfs.storage.layout import meta_name, path_key

#: finished files whose metadata (Content-Type, SHA-256) each process keeps in memory
META_CACHE_SIZE = 4096
DEFAULT_CONTENT_TYPE = "application/octet-stream"


def read_meta(name: str, dir_fd: int, path: str) -> dict[str, object]:
    """The metadata stored as ``name`` in ``dir_fd``; {} if missing or unreadable."""
    try:
        meta = json.loads(read_small(name, dir_fd))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError):
        log.failure("unreadable metadata for {path}", path=path)
        return {}
    return meta if isinstance(meta, dict) else {}


def write_meta(
    name: str,
    dir_fd: int,
    *,
    path: str,
    content_type: str,
    size: int,
    sha256: str | None,
    created: float,
) -> None:
    """Write (and fsync) the metadata of a file being committed."""
    meta = {
        "path": path,
        "content_type": content_type,
        "size": size,
        "sha256": sha256,
        "created": created,
    }
    write_file(name, json.dumps(meta).encode("utf-8"), sync=True, dir_fd=dir_fd)


class MetadataCache:
    """Describes finished files, their metadata read once per change (``META_CACHE_SIZE``)."""

    __slots__ = ("_entries", "size")

    def __init__(self, size: int = META_CACHE_SIZE) -> None:
        self._entries: dict[tuple[object, ...], dict[str, object]] = {}
        self.size = size

    def stored_file(
        self, dirs: Callable[[], Dirs], segs: tuple[str, ...], st: os.stat_result, target: str
    ) -> StoredFile:
        """The file ``target`` (whose ``lstat`` is ``st``) with its metadata."""
        # Missing metadata (the instant between link and rename) is never cached.
        name = meta_name(path_key(segs))
        try:
            meta_fd = dirs().meta
            meta_st = os.stat(name, dir_fd=meta_fd, follow_symlinks=False)
        except (OSError, StorageError):
            meta: dict[str, object] = {}
        else:
            key = (segs, st.st_ino, st.st_mtime_ns, st.st_size, meta_st.st_ino, meta_st.st_mtime_ns)
            cached = self._entries.get(key)
            if cached is None:
                cached = read_meta(name, meta_fd, "/".join(segs))
                if cached:
                    if len(self._entries) >= self.size:
                        self._entries.pop(next(iter(self._entries)))
                    self._entries[key] = cached
            meta = cached
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
