# -*- test-case-name: tests.test_s3_units,tests.test_s3_client -*-
"""
What can go wrong talking to S3, as types a store can map onto HTTP answers.

Every failure of the client is an :class:`S3Error`; the subclasses are the ones a caller
acts on differently (503 for :class:`S3Unavailable`, 409 for :class:`PreconditionFailed`
on a create, 304/412/416 on a download).
"""

from __future__ import annotations

from collections.abc import Mapping


class S3Error(Exception):
    """S3 answered with an error (``status`` is 0 when there was no answer)."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str = "",
        operation: str = "",
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(status, code, message)
        self.status = status
        self.code = code
        self.message = message
        self.operation = operation
        #: the response headers (lower-case names), for Content-Range on a 416 and the like
        self.headers: Mapping[str, str] = dict(headers or {})

    def __str__(self) -> str:
        where = f"{self.operation}: " if self.operation else ""
        return f"{where}S3 {self.status or 'no answer'} {self.code}: {self.message}".rstrip(": ")

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.status!r}, {self.code!r}, {self.message!r})"


class S3Unavailable(S3Error):
    """No usable answer: connection refused or lost, a timeout, or a 5xx."""


class S3Aborted(S3Error):
    """The caller aborted the transfer (upload ``abort()``, download ``stop``)."""


class NotFound(S3Error):
    """404: NoSuchKey, NoSuchBucket, NoSuchUpload (``code`` says which)."""


class PreconditionFailed(S3Error):
    """412: an If-None-Match: * create over an existing key, or an If-Match that failed."""


class NotModified(S3Error):
    """304 on a conditional GET/HEAD (``headers`` carries the ETag)."""


class RangeNotSatisfiable(S3Error):
    """416 on a ranged GET (``headers`` may carry ``content-range: bytes */size``)."""


class AccessDenied(S3Error):
    """403: bad credentials, a wrong signature, or a policy refusal."""


def error_for_status(status: int) -> type[S3Error]:
    """The exception type for an HTTP error status from S3."""
    if status >= 500 or status == 0:
        return S3Unavailable
    return {
        304: NotModified,
        403: AccessDenied,
        404: NotFound,
        412: PreconditionFailed,
        416: RangeNotSatisfiable,
    }.get(status, S3Error)
