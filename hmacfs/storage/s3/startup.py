# -*- test-case-name: tests.test_s3_store -*-
"""
The S3 backend's start-up check: the bucket answers to these credentials, and whether the
server refuses to replace a key (``If-None-Match: *``), decided before hmacfs listens.

It runs before the reactor does (``twistd`` builds its services first), so it talks
plain blocking HTTP with the standard library; the requests are built, signed and read
by the same ``S3Protocol`` as every other S3 call.  A refusal becomes an
``S3StartupError`` that names the configuration key to change.
"""

from __future__ import annotations

import http.client
import secrets
import ssl
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

import attrs

from .errors import AccessDenied, NotFound, S3Error, S3Unavailable
from .protocol import ParsedResponse, S3Protocol
from .settings import S3Settings

__all__ = ["S3StartupError", "StartupReport", "check_bucket"]


class S3StartupError(Exception):
    """The S3 backend cannot start: ``key`` is the configuration key to look at."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"{key}: {message}")
        self.key = key
        self.message = message


@attrs.frozen
class StartupReport:
    #: the server answers 412 to a create over an existing key (else: HEAD before create)
    conditional_writes: bool


def _exchange(
    protocol: S3Protocol, settings: S3Settings, name: str, params: Mapping[str, Any], timeout: float
) -> ParsedResponse:
    # An empty create goes as the client sends every body: streamed, UNSIGNED-PAYLOAD.
    signed = protocol.build(name, params, streaming=name == "PutObject")
    url = urlsplit(signed.url.decode("ascii"))
    connection: http.client.HTTPConnection
    if url.scheme == "https":
        context = ssl.create_default_context(cafile=settings.ca_file or None)
        connection = http.client.HTTPSConnection(url.netloc, timeout=timeout, context=context)
    else:
        connection = http.client.HTTPConnection(url.netloc, timeout=timeout)
    path = url.path or "/"
    if url.query:
        path += "?" + url.query
    headers = {k.decode("latin-1"): v[0].decode("latin-1") for k, v in signed.headers.items()}
    if signed.method in (b"PUT", b"POST"):
        headers["Content-Length"] = str(len(signed.body))
    try:
        connection.request(signed.method.decode("ascii"), path, body=signed.body or None, headers=headers)
        response = connection.getresponse()
        body = response.read()
        answer = {k: v for k, v in response.getheaders()}
        status = response.status
    except (OSError, http.client.HTTPException) as error:
        raise S3Unavailable(0, type(error).__name__, str(error), name) from error
    finally:
        connection.close()
    return protocol.parse(name, status, answer, body)


def check_bucket(settings: S3Settings, timeout: float = 10.0) -> StartupReport:
    """HeadBucket, then the conditional-write probe (two creates of one probe key, deleted)."""
    protocol = S3Protocol(settings)
    where = settings.endpoint_url
    try:
        _exchange(protocol, settings, "HeadBucket", {}, timeout)
    except NotFound as error:
        raise S3StartupError(
            "S3Bucket", f"{settings.bucket!r} does not exist at {where} ({error.code}); create it first"
        ) from None
    except AccessDenied as error:
        raise S3StartupError(
            "S3AccessKey",
            f"{where} refused the credentials of {settings.access_key!r} for bucket "
            f"{settings.bucket!r} ({error.code}); check S3AccessKey and S3SecretKey",
        ) from None
    except S3Unavailable as error:
        raise S3StartupError("S3Endpoint", f"{where} cannot be reached: {error.message or error.code}") from None
    except S3Error as error:
        raise S3StartupError("S3Bucket", f"{where} answered {error.status} {error.code}") from None
    key = settings.prefix + f".hmacfs-probe/conditional-{secrets.token_hex(8)}"
    conditional = False
    try:
        for attempt in (1, 2):
            try:
                _exchange(protocol, settings, "PutObject", {"Key": key, "IfNoneMatch": "*"}, timeout)
            except S3Error as error:
                if error.status == 412 and attempt == 2:
                    conditional = True
                    break
                if error.status == 501:
                    break
                raise S3StartupError(
                    "S3Bucket", f"cannot write to {settings.bucket!r} at {where}: {error.status} {error.code}"
                ) from None
    finally:
        try:
            _exchange(protocol, settings, "DeleteObject", {"Key": key}, timeout)
        except S3Error:
            pass
    return StartupReport(conditional_writes=conditional)
