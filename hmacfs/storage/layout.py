# -*- test-case-name: tests.test_storage_parts -*-
"""
The names of the store's private tree, each defined once::

    <root>/<segments...>                    finished files, served as they are
    <root>/.hmacfs/partial/<key>.part       uploads in progress or interrupted (resumable)
    <root>/.hmacfs/partial/<key>.json       the sidecar record of that upload (who may resume it)
    <root>/.hmacfs/partial/<key>.takeover   a new connection asks the writer to let go
    <root>/.hmacfs/meta/<key>.json          metadata of finished files
    <root>/.hmacfs/tombstones/<key>         paths retention deleted (no re-upload)
    <root>/.hmacfs/sweep.lock               one retention sweep at a time

``key`` is the SHA-256 hex digest of ``"/".join(segments)`` in UTF-8, so our private names
never depend on what a client chose.  ``.hmacfs`` itself is named in
``hmacfs.signing.paths`` (the lowest layer that must refuse it as a first segment).
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Sequence

from hmacfs.signing.paths import PRIVATE_DIR

__all__ = [
    "META_DIR",
    "PARTIAL_DIR",
    "PRIVATE_DIR",
    "SWEEP_LOCK_FILE",
    "TOMBSTONES_DIR",
    "is_path_key",
    "meta_name",
    "partial_name",
    "path_key",
    "record_name",
    "takeover_name",
]

PARTIAL_DIR = "partial"
META_DIR = "meta"
TOMBSTONES_DIR = "tombstones"
SWEEP_LOCK_FILE = "sweep.lock"

PART_SUFFIX = ".part"
#: the sidecar record in ``partial``, the metadata in ``meta``
JSON_SUFFIX = ".json"
TAKEOVER_SUFFIX = ".takeover"
#: a file being written before it is renamed into place
TMP_SUFFIX = ".tmp"
_HEX_DIGITS = frozenset("0123456789abcdef")


def path_key(segments: Sequence[str]) -> str:
    """The name of a path's private files; hashed so it never depends on client input."""
    return _path_key("/".join(segments))


@functools.lru_cache(maxsize=1024)
def _path_key(joined: str) -> str:
    # One upload asks for its key several times (lock, partial, record, meta).
    return hashlib.sha256(joined.encode("utf-8")).hexdigest()


def is_path_key(text: str) -> bool:
    """Whether ``text`` could be a ``path_key`` (so it is safe as a private file name)."""
    return len(text) == 64 and _HEX_DIGITS.issuperset(text)


def partial_name(key: str) -> str:
    return key + PART_SUFFIX


def record_name(key: str) -> str:
    return key + JSON_SUFFIX


def meta_name(key: str) -> str:
    return key + JSON_SUFFIX


def takeover_name(key: str) -> str:
    return key + TAKEOVER_SUFFIX
