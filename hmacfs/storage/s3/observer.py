# -*- test-case-name: tests.test_s3_units,tests.test_s3_client -*-
"""
The client's metrics seam.

hmacfs.storage must not import hmacfs.service (where the Prometheus registry lives), so the
client reports each finished request to an :class:`S3Observer`, and the service layer
passes one that updates its counters and histograms.  Labels stay bounded: ``operation`` is
one of :data:`OPERATIONS`, ``outcome`` one of :data:`OUTCOMES`.
"""

from __future__ import annotations

from typing import Protocol

from .errors import (
    AccessDenied,
    NotFound,
    NotModified,
    PreconditionFailed,
    RangeNotSatisfiable,
    S3Aborted,
    S3Error,
    S3Unavailable,
)

OPERATIONS = frozenset({
    "HeadBucket", "CreateBucket", "HeadObject", "GetObject", "PutObject", "DeleteObject",
    "DeleteObjects", "ListObjectsV2", "CreateMultipartUpload", "UploadPart", "ListParts",
    "CompleteMultipartUpload", "AbortMultipartUpload", "ListMultipartUploads",
})
OUTCOMES = (
    "ok", "not_modified", "not_found", "precondition_failed", "range_not_satisfiable",
    "denied", "client_error", "unavailable", "aborted",
)


def outcome_of(error: BaseException | None) -> str:
    """The bounded outcome label for a request that ended with ``error`` (None: success)."""
    if error is None:
        return "ok"
    for kind, label in (
        (S3Aborted, "aborted"),
        (S3Unavailable, "unavailable"),
        (NotModified, "not_modified"),
        (NotFound, "not_found"),
        (PreconditionFailed, "precondition_failed"),
        (RangeNotSatisfiable, "range_not_satisfiable"),
        (AccessDenied, "denied"),
        (S3Error, "client_error"),
    ):
        if isinstance(error, kind):
            return label
    return "unavailable"


class S3Observer(Protocol):
    def request_finished(
        self, operation: str, outcome: str, seconds: float, sent: int, received: int
    ) -> None:
        """One S3 request ended: its latency (to the end of its body) and the body bytes moved."""


class NullObserver:
    """No metrics."""

    def request_finished(
        self, operation: str, outcome: str, seconds: float, sent: int, received: int
    ) -> None:
        pass
