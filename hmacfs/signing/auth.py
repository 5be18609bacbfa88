# -*- test-case-name: tests.test_auth -*-
"""
HMAC schemes for signed upload URLs, and the signer that produces them.

An XMPP server (Prosody ``mod_http_upload_external``, ejabberd
``external_secret``, Metronome) and this server share a secret; the XMPP
server puts an HMAC-SHA256 over the slot into the PUT URL's query and we
recompute it.  Four schemes exist in the wild, named by their query
parameter:

``v``      ``path + " " + size``                        (Prosody v1, ejabberd)
``v2``     ``path + NUL + size + NUL + content type``   (Prosody v2)
``token``  same message as ``v2``                       (Metronome)
``v3``     ``method + LF + expires + LF + full path``   (hmac-file-server),
           with ``expires`` a unix time also in the query

If several are present only the strongest is checked, so adding a weak
parameter to a URL can never downgrade it.  ``Authenticator`` knows nothing
of twisted.web: the resource hands it the decoded pieces of the request.
The MAC and the secret never reach a log line.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Callable, Mapping, Sequence
from urllib.parse import unquote_to_bytes, urlsplit

import attrs
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from hmacfs.logs import log_router
from hmacfs.signing.paths import PathError, SlotPath, validate_segments

__all__ = [
    "DEFAULT_CONTENT_TYPE",
    "SCHEMES",
    "AuthError",
    "AuthResult",
    "Authenticator",
    "SignedSlot",
    "ejabberd_quote",
    "mac_for",
    "prosody_quote",
    "sign_slot",
]

log = Logger(observer=log_router)

#: Content type signed for v2/token when the PUT carries none (Prosody's default).
DEFAULT_CONTENT_TYPE = b"application/octet-stream"
#: Query parameters carrying a MAC, strongest first: only the first present one is checked.
SCHEMES: tuple[str, ...] = ("v3", "token", "v2", "v")

_HEX_MAC = re.compile(rb"[0-9a-f]{64}")
# 20 digits reach far past any real date and keep int() cheap.
_EXPIRES = re.compile(rb"[0-9]{1,20}")


class AuthError(Exception):
    """
    The request is not authorised to upload.

    ``reason`` is short and fixed ("missing MAC", "bad MAC", "expired", ...):
    it goes into the 403 body and becomes a metrics label.
    """

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@attrs.frozen
class AuthResult:
    """Which scheme authorised the upload and, for v3, until when."""

    scheme: str
    expires: int | None = None


def _first(query: Mapping[bytes, Sequence[bytes]], name: bytes) -> bytes | None:
    """The first value of a query parameter, as Twisted's ``request.args`` holds it."""
    values = query.get(name)
    if not values:
        return None
    return values[0]


def _size_message(scheme: str, signed_path: bytes, size: int, content_type: bytes | None) -> bytes:
    size_bytes = str(size).encode("ascii")
    if scheme == "v":
        return signed_path + b" " + size_bytes
    if content_type is None:
        content_type = DEFAULT_CONTENT_TYPE
    return signed_path + b"\0" + size_bytes + b"\0" + content_type


def _v3_message(method: bytes, expires: bytes, full_path: bytes) -> bytes:
    return method + b"\n" + expires + b"\n" + full_path


def _hex_mac(secret: bytes, message: bytes) -> bytes:
    return hmac.new(secret, message, hashlib.sha256).hexdigest().encode("ascii")


class Authenticator:
    """
    Check the MAC of an upload request against the shared secrets.

    ``secrets()`` is called for every request so that a configuration reload
    or a rotation takes effect at once; it returns the current secret first
    and then any previous ones still within their grace period.  A MAC valid
    under any of them is accepted.
    """

    def __init__(
        self,
        secrets: Callable[[], Sequence[bytes]],
        clock: IReactorTime,
        clock_skew: float = 30.0,
    ) -> None:
        self._secrets = secrets
        self._clock = clock
        self._clock_skew = clock_skew

    def _valid_under_some_secret(self, message: bytes, presented: bytes) -> bool:
        # Compare against every secret, without stopping at the first match,
        # so the timing does not tell which secret (if any) matched.
        valid = False
        for secret in self._secrets():
            if not secret:
                # An empty key is no secret at all; config should refuse it.
                continue
            valid |= hmac.compare_digest(_hex_mac(secret, message), presented)
        return valid

    def verify_upload(
        self,
        *,
        method: bytes,
        full_path: bytes,
        slot: SlotPath,
        query: Mapping[bytes, Sequence[bytes]],
        size: int | None,
        content_type: bytes | None,
    ) -> AuthResult:
        """
        Authorise an upload or raise ``AuthError``.

        ``full_path`` is the percent-decoded request path including the
        upload prefix (what v3 signs); ``slot.signed`` is what the other
        schemes sign.  ``size`` is the ``Content-Length`` and ``content_type``
        the ``Content-Type`` header byte for byte (``None`` when absent).
        """
        try:
            return self._verify(method, full_path, slot, query, size, content_type)
        except AuthError as error:
            log.debug(
                "upload of {path} refused: {reason}",
                path=slot.text,
                reason=error.reason,
            )
            raise

    def _verify(
        self,
        method: bytes,
        full_path: bytes,
        slot: SlotPath,
        query: Mapping[bytes, Sequence[bytes]],
        size: int | None,
        content_type: bytes | None,
    ) -> AuthResult:
        for scheme in SCHEMES:
            value = _first(query, scheme.encode("ascii"))
            if value is not None:
                break
        else:
            raise AuthError("missing MAC")

        presented = value.lower()
        if _HEX_MAC.fullmatch(presented) is None:
            raise AuthError("malformed MAC")

        expires: int | None = None
        if scheme == "v3":
            raw_expires = _first(query, b"expires")
            if raw_expires is None or _EXPIRES.fullmatch(raw_expires) is None:
                raise AuthError("malformed expires")
            expires = int(raw_expires)
            # The presented digits are signed as they are, like the Go original.
            message = _v3_message(method, raw_expires, full_path)
        else:
            if size is None:
                raise AuthError("missing size")
            message = _size_message(scheme, slot.signed, size, content_type)

        if not self._valid_under_some_secret(message, presented):
            raise AuthError("bad MAC")
        # Checked after the MAC so that "expired" only ever counts genuine URLs.
        if expires is not None and self._clock.seconds() > expires + self._clock_skew:
            raise AuthError("expired")
        return AuthResult(scheme=scheme, expires=expires)


def mac_for(
    scheme: str,
    secret: bytes,
    *,
    signed_path: bytes,
    size: int | None = None,
    content_type: bytes | None = None,
    method: bytes = b"PUT",
    full_path: bytes | None = None,
    expires: int | None = None,
) -> str:
    """
    Compute the lowercase hex MAC an XMPP server would put into the URL.

    ``signed_path`` is the decoded slot path (v, v2, token); v3 signs
    ``full_path`` (the decoded request path with the upload prefix) instead.
    """
    if scheme == "v3":
        if expires is None or full_path is None:
            raise ValueError("v3 needs expires and full_path")
        message = _v3_message(method, str(expires).encode("ascii"), full_path)
    elif scheme in ("v", "v2", "token"):
        if size is None:
            raise ValueError(f"{scheme} needs size")
        message = _size_message(scheme, signed_path, size, content_type)
    else:
        raise ValueError(f"unknown scheme {scheme!r} (known: {', '.join(SCHEMES)})")
    return _hex_mac(secret, message).decode("ascii")


_PROSODY_SAFE = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789.~_-")
_EJABBERD_SAFE = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_.-/:")


def _quote(text: str, safe: frozenset[int], escape: str) -> str:
    return "".join(
        chr(byte) if byte in safe else escape % byte for byte in text.encode("utf-8")
    )


def prosody_quote(segment: str) -> str:
    """
    Encode a path segment like Prosody's ``util.http.urlencode``.

    Every UTF-8 byte outside ``[A-Za-z0-9.~_-]`` becomes a lowercase ``%xx``.
    """
    return _quote(segment, _PROSODY_SAFE, "%%%02x")


def ejabberd_quote(path: str) -> str:
    """
    Encode a whole slot path like ejabberd's ``misc:url_encode``.

    Keeps ``A-Za-z0-9_.-/:``; every other UTF-8 byte becomes an uppercase ``%XX``.
    """
    return _quote(path, _EJABBERD_SAFE, "%%%02X")


@attrs.frozen
class SignedSlot:
    """
    A slot as an XMPP server would hand it to a client.

    ``headers`` are the XEP-0363 ``<header/>`` elements of the PUT; all of our
    schemes travel in the query, so it is empty today.
    """

    put_url: str
    get_url: str
    headers: dict[str, str] = attrs.field(factory=dict)


def sign_slot(
    *,
    base_url: str,
    path: str,
    size: int,
    secret: bytes,
    scheme: str = "v",
    content_type: str | None = None,
    style: str = "prosody",
    expires: int | None = None,
    method: str = "PUT",
) -> SignedSlot:
    """
    Produce the PUT and GET URLs for ``path`` under ``base_url``.

    Used by the tests, the ``hmacfs sign`` command and the XMPP component.
    ``path`` is the decoded slot path (``"<uuid>/my photo.jpg"``); ``style``
    picks how it is percent-encoded (``"prosody"``: lowercase escapes per
    segment, ``"ejabberd"``: uppercase escapes over the whole path).  Refuses
    (``ValueError``) a path this server would not accept.
    """
    if style not in ("prosody", "ejabberd"):
        raise ValueError(f"unknown style {style!r} (known: prosody, ejabberd)")
    if scheme not in SCHEMES:
        raise ValueError(f"unknown scheme {scheme!r} (known: {', '.join(SCHEMES)})")
    if scheme == "v3" and expires is None:
        raise ValueError("v3 needs expires")
    if scheme != "v3" and expires is not None:
        raise ValueError(f"{scheme} does not carry expires (only v3 does)")

    segments = path.split("/")
    try:
        slot = validate_segments([segment.encode("utf-8") for segment in segments])
    except PathError as error:
        raise ValueError(f"path {path!r} would be refused: {error.reason}") from None

    base = base_url.rstrip("/")
    if style == "prosody":
        encoded = "/".join(prosody_quote(segment) for segment in segments)
    else:
        encoded = ejabberd_quote(path)
    get_url = f"{base}/{encoded}"

    full_path = unquote_to_bytes(urlsplit(base).path.rstrip("/")) + b"/" + slot.signed
    mac = mac_for(
        scheme,
        secret,
        signed_path=slot.signed,
        size=size,
        content_type=None if content_type is None else content_type.encode("utf-8"),
        method=method.encode("ascii"),
        full_path=full_path,
        expires=expires,
    )
    query = f"v3={mac}&expires={expires}" if scheme == "v3" else f"{scheme}={mac}"
    return SignedSlot(put_url=f"{get_url}?{query}", get_url=get_url)
