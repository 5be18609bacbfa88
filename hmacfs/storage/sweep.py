# -*- test-case-name: tests.test_storage_parts -*-
"""
The sweep of abandoned uploads: partial files nobody has written to for ResumeTTL and
nobody holds (their writer's lock is free), and records, temporary files and takeover
markers left without their partial file.  Works only inside ``.hmacfs/partial`` (given as
a descriptor), never through a link.  Blocking: run it on a worker thread.
"""

from __future__ import annotations

import errno
import os

from hmacfs.storage.fsio import READ_FLAGS, lexists, log, same_file, unlink_quietly
from hmacfs.storage.layout import JSON_SUFFIX, PART_SUFFIX, TAKEOVER_SUFFIX, TMP_SUFFIX
from hmacfs.storage.locks import try_lock

_LEFTOVERS = (JSON_SUFFIX, TMP_SUFFIX, TAKEOVER_SUFFIX)


def sweep_partials(directory: int, now: float, max_idle: float) -> int:
    """Remove what has been idle for ``max_idle`` seconds in ``directory``; how many uploads."""
    removed = 0
    for name in os.listdir(directory):
        try:
            idle = now - os.stat(name, dir_fd=directory, follow_symlinks=False).st_mtime
        except FileNotFoundError:
            continue
        if idle < max_idle:
            continue
        if name.endswith(PART_SUFFIX):
            if sweep_one(directory, name):
                removed += 1
        elif name.endswith(_LEFTOVERS):
            stem = name.split(".", 1)[0]
            if not lexists(stem + PART_SUFFIX, directory):
                unlink_quietly(name, directory)
    return removed


def sweep_one(directory: int, name: str) -> bool:
    """Remove the partial file ``name`` and its record unless a writer holds it."""
    try:
        fd = os.open(name, READ_FLAGS, dir_fd=directory)
    except FileNotFoundError:
        return False
    except OSError as e:
        if e.errno == errno.ELOOP:  # not ours: a link someone put there
            return False
        raise
    try:
        if not try_lock(fd) or not same_file(fd, name, directory):
            return False
        log.info(
            "removing abandoned upload {name} ({size} bytes)",
            name=name,
            size=os.fstat(fd).st_size,
        )
        unlink_quietly(name, directory)
        unlink_quietly(name[: -len(PART_SUFFIX)] + JSON_SUFFIX, directory)
        return True
    finally:
        os.close(fd)
