# -*- test-case-name: tests.test_s3_units,tests.test_s3_client -*-
"""
botocore for everything S3 is (the service model, serialisation, SigV4, presigning, response
and error parsing), and nothing of how bytes travel: the client sends what this module
builds through Twisted's Agent and hands back what arrived.

Only public botocore modules are used: ``loaders``/``model`` for the S3 service model,
``serialize`` to turn parameters into a request, ``awsrequest.prepare_request_dict`` /
``create_request_object`` for the URL and the request object, ``utils`` for virtual-hosted
addressing and Content-MD5, ``auth.S3SigV4Auth`` / ``S3SigV4QueryAuth`` to sign and presign,
``parsers`` for responses and errors.  This is the only module of hmacfs that imports botocore.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import attrs
from botocore.auth import S3SigV4Auth, S3SigV4QueryAuth
from botocore.awsrequest import (
    AWSRequest,
    HeadersDict,
    create_request_object,
    prepare_request_dict,
)
from botocore.config import Config
from botocore.credentials import Credentials
from botocore.loaders import Loader
from botocore.model import OperationModel, ServiceModel
from botocore.parsers import create_parser
from botocore.serialize import create_serializer
from botocore.utils import calculate_md5, check_dns_name, switch_to_virtual_host_style

from .errors import S3Error, error_for_status
from .settings import S3Settings

#: a streamed body is sent as UNSIGNED-PAYLOAD: S3SigV4Auth honours this client config
_UNSIGNED = Config(s3={"payload_signing_enabled": False})
#: headers the Agent writes itself from the body producer (never signed, never sent twice)
_FRAMING = frozenset({"content-length", "transfer-encoding"})


@attrs.frozen
class SignedRequest:
    """One request ready for the Agent: method, URL and headers as bytes, the (small) body."""

    operation: str
    method: bytes
    url: bytes
    headers: dict[bytes, list[bytes]]
    body: bytes


@attrs.frozen
class ParsedResponse:
    status: int
    headers: dict[str, str]
    #: botocore's parsed output (the operation's output shape, ResponseMetadata removed)
    data: dict[str, Any]
    body_size: int = 0


class S3Protocol:
    """Builds signed requests and parses responses for one bucket of :class:`S3Settings`."""

    def __init__(self, settings: S3Settings) -> None:
        self.settings = settings
        loader = Loader()
        self._model = ServiceModel(loader.load_service_model("s3", "service-2"), "s3")
        self._serializer = create_serializer(self._model.metadata["protocol"], include_validation=True)
        self._parser = create_parser(self._model.metadata["protocol"])
        self._credentials = Credentials(settings.access_key, settings.secret_key)
        self._virtual = settings.addressing_style == "virtual" or (
            settings.addressing_style == "auto"
            and not settings.endpoint
            and check_dns_name(settings.bucket)
        )

    def operation(self, name: str) -> OperationModel:
        return self._model.operation_model(name)

    def _request(self, name: str, params: Mapping[str, Any]) -> tuple[AWSRequest, OperationModel]:
        model = self.operation(name)
        request_dict = self._serializer.serialize_to_request(
            {"Bucket": self.settings.bucket, **params}, model
        )
        if name == "DeleteObjects":
            # S3 requires a body checksum here; Content-MD5 is the one every S3 (Swift too) takes.
            request_dict["headers"]["Content-MD5"] = calculate_md5(request_dict["body"])
        prepare_request_dict(request_dict, endpoint_url=self.settings.endpoint_url)
        request = create_request_object(request_dict)
        if self._virtual:
            switch_to_virtual_host_style(request, "s3v4")
        return request, model

    def build(self, name: str, params: Mapping[str, Any], *, streaming: bool = False) -> SignedRequest:
        """
        Serialise and sign ``name`` with ``params`` (Bucket added).  ``streaming``: the body is
        sent separately by a producer, so the payload is signed as UNSIGNED-PAYLOAD.
        """
        request, _ = self._request(name, params)
        if streaming:
            request.context["client_config"] = _UNSIGNED
        S3SigV4Auth(self._credentials, "s3", self.settings.region).add_auth(request)
        prepared = request.prepare()
        headers: dict[bytes, list[bytes]] = {}
        for key, value in prepared.headers.items():
            if key.lower() not in _FRAMING:
                headers[key.encode("latin-1")] = [
                    value if isinstance(value, bytes) else value.encode("latin-1")
                ]
        body = prepared.body or b""
        if isinstance(body, str):
            body = body.encode("utf-8")
        return SignedRequest(
            operation=name,
            method=prepared.method.encode("ascii"),
            url=prepared.url.encode("ascii"),
            headers=headers,
            body=b"" if streaming else body,
        )

    def presign(self, name: str, params: Mapping[str, Any], expires: int) -> str:
        """A presigned URL for ``name`` (S3SigV4QueryAuth: the signature is in the query)."""
        request, _ = self._request(name, params)
        S3SigV4QueryAuth(self._credentials, "s3", self.settings.region, expires=expires).add_auth(
            request
        )
        return str(request.url)

    def parse(self, name: str, status: int, headers: Mapping[str, str], body: bytes) -> ParsedResponse:
        """
        botocore's reading of a response; an error (status >= 300, or S3's 200-with-an-error
        body on CompleteMultipartUpload) raises the typed :class:`S3Error` for its status.
        """
        model = self.operation(name)
        lowered = {k.lower(): v for k, v in headers.items()}
        if (
            status == 200
            and name == "CompleteMultipartUpload"
            and b"<Error>" in body
            and b"<CompleteMultipartUploadResult" not in body
        ):
            # S3 answers 200 and then fails in the body (it sends whitespace to keep the
            # connection alive while it assembles); botocore's handler makes that a 500, so does this.
            status = 500
        # the parser looks headers up by their modelled names (Content-Length): case-insensitive
        response = {"status_code": status, "headers": HeadersDict(lowered), "body": body}
        parsed = self._parser.parse(response, model.output_shape)
        parsed.pop("ResponseMetadata", None)
        if status >= 300:
            error = parsed.get("Error", {})
            code = str(error.get("Code") or status)
            message = str(error.get("Message") or "")
            raise error_for_status(status)(status, code, message, name, lowered)
        return ParsedResponse(status=status, headers=lowered, data=parsed, body_size=len(body))

    def error(self, name: str, status: int, headers: Mapping[str, str], body: bytes) -> S3Error:
        """The typed error for an error response (for callers that must not raise)."""
        try:
            self.parse(name, status, headers, body)
        except S3Error as e:
            return e
        return error_for_status(status)(status, str(status), "", name, headers)
