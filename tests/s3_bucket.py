"""
A bucket on the test S3 server (tests/s3_server.py) for synchronous tests that drive a real
daemon: create it, list it, read an object back, and the daemon's config lines for it.

Blocking HTTP from the test's own thread (no reactor runs in a SynchronousTestCase); the
requests are built, signed and parsed by hmacfs's ``S3Protocol`` (botocore), as the
daemon's are, so a listing here sees exactly the keys the daemon wrote.
"""

from __future__ import annotations

import http.client
import uuid
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

from hmacfs.storage.s3.protocol import ParsedResponse, S3Protocol
from hmacfs.storage.s3.settings import S3Settings

from .s3_server import S3Server


def toml_string(text: str) -> str:
    """A TOML basic string."""
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


class BlockingBucket:
    """A fresh bucket (a random name) on ``server``; ``create()`` makes it."""

    def __init__(self, server: S3Server, prefix: str = "") -> None:
        self.server = server
        self.name = f"x{uuid.uuid4().hex[:20]}"
        self.prefix = prefix
        self.protocol = S3Protocol(
            S3Settings(
                bucket=self.name,
                access_key=server.access_key,
                secret_key=server.secret_key,
                endpoint=server.endpoint,
                region=server.region,
                addressing_style="path",
            )
        )

    def call(self, name: str, params: Mapping[str, Any], timeout: float = 30) -> ParsedResponse:
        """One S3 operation; an error answer raises the typed ``S3Error``.  GetObject's
        bytes are in ``data["Body"]``, past botocore (which would decode them as text)."""
        signed = self.protocol.build(name, params)
        url = urlsplit(signed.url.decode("ascii"))
        connection = http.client.HTTPConnection(url.netloc, timeout=timeout)
        path = (url.path or "/") + (f"?{url.query}" if url.query else "")
        headers = {k.decode("latin-1"): v[0].decode("latin-1") for k, v in signed.headers.items()}
        if signed.method in (b"PUT", b"POST"):
            headers["Content-Length"] = str(len(signed.body))
        try:
            connection.request(signed.method.decode("ascii"), path, body=signed.body or None, headers=headers)
            response = connection.getresponse()
            body = response.read()
            headers = dict(response.getheaders())
            if name == "GetObject" and response.status < 300:
                parsed = self.protocol.parse(name, response.status, headers, b"")
                parsed.data["Body"] = body
                return parsed
            return self.protocol.parse(name, response.status, headers, body)
        finally:
            connection.close()

    def create(self) -> BlockingBucket:
        self.call("CreateBucket", {})
        return self

    def objects(self, prefix: str = "") -> dict[str, int]:
        """Every key under ``prefix`` (full keys, the bucket's own), with its size; all pages."""
        found: dict[str, int] = {}
        token: str | None = None
        for _ in range(1000):  # bounded: 1000 pages of 1000 keys is far beyond any test
            params: dict[str, Any] = {"Prefix": prefix, "MaxKeys": 1000}
            if token is not None:
                params["ContinuationToken"] = token
            data = self.call("ListObjectsV2", params).data
            for entry in data.get("Contents", []):
                found[entry["Key"]] = int(entry.get("Size", 0))
            token = data.get("NextContinuationToken") if data.get("IsTruncated") else None
            if token is None:
                return found
        raise AssertionError(f"bucket {self.name}: listing did not end after 1000 pages")

    def uploads(self) -> dict[str, int]:
        """The stored uploads: every key outside hmacfs's own ``.hmacfs/`` area."""
        return {
            key: size
            for key, size in self.objects(self.prefix).items()
            if not key[len(self.prefix) :].startswith(".hmacfs")
        }

    def get(self, key: str) -> bytes:
        """The object's bytes (small test objects only: read whole)."""
        return bytes(self.call("GetObject", {"Key": key}).data["Body"])

    def daemon_config(self) -> str:
        """The config lines that point a daemon at this bucket."""
        lines = {
            "StorageBackend": "s3",
            "S3Endpoint": self.server.endpoint,
            "S3Region": self.server.region,
            "S3Bucket": self.name,
            "S3Prefix": self.prefix,
            "S3AccessKey": self.server.access_key,
            "S3SecretKey": self.server.secret_key,
            "S3AddressingStyle": "path",
        }
        return "".join(f"{key} = {toml_string(value)}\n" for key, value in lines.items())
