# -*- test-case-name: tests.test_paths -*-
"""The one exception shape for "answer this request with that status"."""

from __future__ import annotations

import errno


class Refusal(Exception):
    """A request that is answered with ``status``, ``reason`` and extra ``headers``.

    Path parsing, storage and upload admission all refuse with a subclass, so
    the HTTP layer turns any of them into a response the same way.
    """

    def __init__(
        self, status: int, reason: str, headers: tuple[tuple[bytes, bytes], ...] = ()
    ) -> None:
        super().__init__(f"{status} {reason}")
        self.status = status
        self.reason = reason
        self.headers = headers

    def __str__(self) -> str:
        return f"{self.status} {self.reason}"


#: errno values that mean "no such file here": a name that is not (or no longer) a stored file.
_NOT_FOUND = frozenset((errno.ENOENT, errno.ENOTDIR, errno.ELOOP, errno.ENAMETOOLONG))
_REFUSED = frozenset((errno.EACCES, errno.EPERM))
_NO_SPACE = frozenset((errno.ENOSPC, errno.EDQUOT))
#: Retry-After of a 503 for a storage error that may pass (EIO, ESTALE on NFS, ...).
STORAGE_RETRY_AFTER = b"5"


def storage_refusal(error: OSError, *, reading: bool = True) -> Refusal:
    """
    The answer to a request whose store lookup raised ``error``, so that no
    storage error a client can reach (a broken mount, a bad name) is a 500.

    Reading (GET, HEAD): ENOENT-like errors are 404, EACCES/EPERM 403.  Either
    way ENOSPC/EDQUOT is 507 and anything else (EIO, ESTALE, ..., and for a
    write also ENOENT and EACCES: our own directories) 503 with Retry-After;
    the caller logs a 503.
    """
    if reading and error.errno in _NOT_FOUND:
        return Refusal(404, "no such file")
    if reading and error.errno in _REFUSED:
        return Refusal(403, "not readable")
    if error.errno in _NO_SPACE:
        return Refusal(507, "insufficient storage")
    return Refusal(503, "storage unavailable", ((b"Retry-After", STORAGE_RETRY_AFTER),))
