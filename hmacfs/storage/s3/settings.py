# -*- test-case-name: tests.test_s3_units,tests.test_s3_client -*-
"""
What the S3 client needs to know, as one frozen value (the config layer builds it from the
``S3*`` keys; the checks here are the ones the client itself relies on).
"""

from __future__ import annotations

from typing import Any, Literal

import attrs

MIB = 1024 * 1024
#: S3's smallest part (all but the last) of a multipart upload
MIN_PART_SIZE = 5 * MIB
#: S3's limit for a presigned URL's lifetime (SigV4: 7 days)
MAX_PRESIGN_EXPIRY = 7 * 24 * 3600
AddressingStyle = Literal["path", "virtual", "auto"]
ADDRESSING_STYLES = ("path", "virtual", "auto")


def _positive(instance: object, attribute: attrs.Attribute[Any], value: float) -> None:
    if value <= 0:
        raise ValueError(f"{attribute.name}: {value!r} must be positive")


def _part_size(instance: object, attribute: attrs.Attribute[int], value: int) -> None:
    if value < MIN_PART_SIZE:
        raise ValueError(f"part_size: {value!r} is below S3's minimum part of {MIN_PART_SIZE} bytes")


def _presign_expiry(instance: object, attribute: attrs.Attribute[int], value: int) -> None:
    if not 1 <= value <= MAX_PRESIGN_EXPIRY:
        raise ValueError(
            f"presign_expiry: {value!r} must be between 1 and {MAX_PRESIGN_EXPIRY} seconds"
        )


def _addressing_style(instance: object, attribute: attrs.Attribute[str], value: str) -> None:
    if value not in ADDRESSING_STYLES:
        raise ValueError(f"addressing_style: {value!r} must be one of {', '.join(ADDRESSING_STYLES)}")


def _bucket(instance: object, attribute: attrs.Attribute[str], value: str) -> None:
    if not value or "/" in value:
        raise ValueError(f"bucket: {value!r} must be a bucket name (not empty, no '/')")


def _endpoint(instance: object, attribute: attrs.Attribute[str], value: str) -> None:
    if value and not value.startswith(("http://", "https://")):
        raise ValueError(f"endpoint: {value!r} must be an http:// or https:// URL, or empty for AWS")


@attrs.frozen
class S3Settings:
    """
    One bucket on one S3 endpoint, and how to talk to it.

    ``secret_key`` is left out of ``repr`` (and so of every log line and traceback that
    shows the settings).  ``prefix`` is put in front of every key the client is given and
    taken off every key it lists, so callers work with keys relative to it.
    """

    bucket: str = attrs.field(validator=_bucket)
    access_key: str
    secret_key: str = attrs.field(repr=False)
    #: '' = AWS for ``region`` (https://s3.<region>.amazonaws.com)
    endpoint: str = attrs.field(default="", validator=_endpoint)
    region: str = "us-east-1"
    prefix: str = ""
    #: 'auto': virtual-hosted on AWS when the bucket is a DNS name, path style elsewhere
    addressing_style: AddressingStyle = attrs.field(default="auto", validator=_addressing_style)
    part_size: int = attrs.field(default=8 * MIB, validator=_part_size)
    presign_expiry: int = attrs.field(default=300, validator=_presign_expiry)
    #: PEM file of the CAs to trust instead of the system's (TLS is always verified)
    ca_file: str | None = None
    connect_timeout: float = attrs.field(default=10.0, validator=_positive)
    #: bound on a control call (request and response body), and on the answer after an upload's last byte
    request_timeout: float = attrs.field(default=30.0, validator=_positive)
    #: persistent connections kept per endpoint host
    max_connections: int = attrs.field(default=16, validator=_positive)
    #: idle pooled connections are closed after this (below S3's own idle close, ~20 s on AWS)
    idle_connection_timeout: int = attrs.field(default=10, validator=_positive)

    @property
    def endpoint_url(self) -> str:
        """The endpoint without a trailing slash."""
        return (self.endpoint or f"https://s3.{self.region}.amazonaws.com").rstrip("/")
