# -*- test-case-name: tests.test_tap -*-
"""
What only the daemon's own processes do to process-wide state.

glibc's heap thresholds and prometheus-client's multiprocess mode belong to
the whole process, so hmacfs sets them only where it owns the process: the
entry points ``twistd hmacfs`` (``tap.makeService``), ``hmacfs.tac`` and the
worker's ``main``.  Never on import, never for ``hmacfs.embed``; and the
multiprocess mode is undone (the environment variable and prometheus-client's
value class restored, the directory removed) when the service tree stops.
"""

from __future__ import annotations

import ctypes
import os
import platform
import shutil
import sys
import tempfile
import tomllib
from pathlib import Path
from typing import Any

import attrs
from twisted.application.service import Service
from twisted.logger import Logger

from hmacfs.logs import log_router
from hmacfs.service.metrics import MULTIPROC_ENV

log = Logger(observer=log_router)

#: glibc's mallopt(3) parameters
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


def tune_allocator(buffer_size: int, libc: Any = None) -> tuple[int, int] | None:
    """
    Keep socket-read buffers in the heap, and the heap from shrinking after each one.

    Every socket read allocates a fresh ``BufferSize`` bytes object.  glibc's
    defaults serve such a block with mmap, or from the top of the heap, which
    it hands back (``brk``) as soon as more than twice that is free: a 1 GiB
    PUT then pays over a thousand ``brk`` calls and re-faults every page it
    gets back, about a quarter of its CPU.  Returns the (mmap, trim)
    thresholds set, or None where the C library is not glibc.  Only for the
    daemon's own processes: an application embedding hmacfs owns its malloc.
    """
    mmap_threshold = min(max(4 * buffer_size, 1024**2), 32 * 1024**2)
    trim_threshold = 4 * mmap_threshold
    if libc is None:
        if platform.libc_ver()[0] != "glibc":
            return None
        libc = ctypes.CDLL(None)
    if not (
        libc.mallopt(_M_MMAP_THRESHOLD, mmap_threshold)
        and libc.mallopt(_M_TRIM_THRESHOLD, trim_threshold)
    ):
        log.warn("mallopt refused the heap thresholds; keeping the C library's defaults")
        return None
    return mmap_threshold, trim_threshold


#: Endpoint descriptions that use TLS (the listeners, ComponentServer).
_TLS_PREFIXES = ("ssl:", "tls:")


def _s3_needs_tls(raw: dict[str, Any]) -> bool:
    """
    The S3 backend over https: ``StorageBackend = "s3"`` with an ``https://``
    ``S3Endpoint`` or none (AWS).  Read from the raw table, as
    ``hmacfs.config`` would read it (case and spaces ignored), because that
    package cannot be imported yet (it imports Twisted's endpoints).  Only a
    plain ``http://`` endpoint, or another backend, leaves TLS out.
    """
    backend = raw.get("StorageBackend", "filesystem")
    if isinstance(backend, str) and backend.strip().lower() == "filesystem":
        return False
    endpoint = raw.get("S3Endpoint", "")
    return not (isinstance(endpoint, str) and endpoint.strip().lower().startswith("http://"))


def tls_needed(raw: dict[str, Any]) -> bool:
    """
    Whether the configuration file's table ``raw`` can need TLS: a ``ssl:`` or
    ``tls:`` endpoint anywhere, RedisAddr (txredisapi imports Twisted's TLS
    module, and ``rediss://`` uses it), or the S3 backend over https.
    """
    if raw.get("RedisAddr") or _s3_needs_tls(raw):
        return True

    def strings(value: object) -> list[str]:
        if isinstance(value, str):
            return [value]
        if isinstance(value, dict):
            return [s for v in value.values() for s in strings(v)]
        if isinstance(value, list):
            return [s for v in value for s in strings(v)]
        return []

    return any(s.strip().lower().startswith(_TLS_PREFIXES) for s in strings(raw))


def leave_out_tls(config_path: str | os.PathLike[str]) -> bool:
    """
    Keep pyOpenSSL (and the cryptography and service-identity it brings) out of
    a daemon process whose configuration uses no TLS: about 12 MiB per process.

    Twisted imports pyOpenSSL when it is installed (``twisted.internet.endpoints``,
    ``tcp`` and ``posixbase`` try it), and falls back to no TLS when the import
    fails; this makes it fail, so it must run before any of them is imported.
    Returns whether it did.  A file that cannot be read or parsed counts as
    needing TLS (``load_config`` reports it).  Only for the daemon's own
    processes, like L{tune_allocator}.
    """
    if "OpenSSL" in sys.modules:
        return False
    try:
        with open(config_path, "rb") as file:
            raw = tomllib.load(file)
    except (OSError, tomllib.TOMLDecodeError, UnicodeDecodeError):
        return False
    if tls_needed(raw):
        return False
    sys.modules["OpenSSL"] = None  # type: ignore[assignment]
    return True


@attrs.define(eq=False)
class MultiprocessMetrics:
    """
    prometheus-client's multiprocess mode, for this process and the workers it
    starts (they inherit the environment variable): every metric created from
    now on writes its values to files in ``directory``, and /metrics sums them.

    Made by L{enable}; L{undo} puts back what was there before.
    """

    directory: Path
    _previous_env: str | None
    _previous_value_class: Any
    _undone: bool = False

    @classmethod
    def enable(cls) -> MultiprocessMetrics:
        from prometheus_client import values

        directory = Path(tempfile.mkdtemp(prefix="hmacfs-metrics-"))
        enabled = cls(directory, os.environ.get(MULTIPROC_ENV), values.ValueClass)
        os.environ[MULTIPROC_ENV] = str(directory)
        values.ValueClass = values.MultiProcessValue()
        return enabled

    def undo(self) -> None:
        """Restore the environment and the value class, remove the directory (once)."""
        if self._undone:
            return
        self._undone = True
        from prometheus_client import values

        if os.environ.get(MULTIPROC_ENV) == str(self.directory):
            if self._previous_env is None:
                del os.environ[MULTIPROC_ENV]
            else:
                os.environ[MULTIPROC_ENV] = self._previous_env
        values.ValueClass = self._previous_value_class
        shutil.rmtree(self.directory, ignore_errors=True)


class UndoOnStop(Service):
    """Runs ``undo`` when the service tree stops (added early, so it runs late)."""

    def __init__(self, undo: Any) -> None:
        self.undo = undo

    def stopService(self) -> None:
        super().stopService()
        self.undo()
