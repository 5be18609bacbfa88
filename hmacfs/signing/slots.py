# -*- test-case-name: tests.test_slots -*-
"""
Upload slots as the XMPP servers make them, for embedding and for our component.

``hmacfs.signing.auth.sign_slot`` turns a finished slot path into signed URLs.  What
an XMPP server adds on top is how it *chooses* that path, and this module
reproduces it:

Prosody (``mod_http_upload_external``)
    ``<uuid4>/<filename>``, each segment encoded with lowercase escapes,
    ``?v=`` (protocol ``v1``) or ``?v2=`` (any other protocol).
Metronome
    the same layout with ``?token=`` (the ``v2`` message under another name).
ejabberd (``mod_http_upload`` with ``external_secret``)
    ``<sha1 of user@server>/<40 random alphanumerics>/<sanitised filename>``,
    the whole path encoded with uppercase escapes, ``?v=``.
hmacfs itself (the XEP-0114 component)
    the Prosody layout signed with ``v3``: method, expiry and the full path,
    so a slot URL stops working a few minutes after it was handed out.

Everything here is a pure function of its arguments (randomness can be passed
in), so the tests can compare it byte for byte with vectors written from those
servers' formats.
"""

from __future__ import annotations

import hashlib
import secrets
import string
import unicodedata
import uuid

from hmacfs.signing.auth import SignedSlot, ejabberd_quote, sign_slot

__all__ = [
    "EJABBERD_SECRET_LENGTH",
    "SlotError",
    "ejabberd_file_string",
    "ejabberd_slot",
    "ejabberd_slot_path",
    "ejabberd_user_string",
    "expiring_slot",
    "metronome_slot",
    "prosody_slot",
    "prosody_slot_path",
]

#: ejabberd's default ``secret_length`` (its minimum is 8).
EJABBERD_SECRET_LENGTH = 40
_ALPHANUMERIC = string.ascii_letters + string.digits


class SlotError(ValueError):
    """
    A slot cannot be made for this request.

    ``reason`` is a short text fit for the ``<text/>`` of an XMPP
    ``bad-request`` error.
    """

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _check_filename(filename: str) -> None:
    """What every XMPP server refuses: a missing filename or one with a ``/``."""
    if not filename:
        raise SlotError("missing filename")
    if "/" in filename:
        raise SlotError("filename must not contain '/'")


def _sign(**arguments: object) -> SignedSlot:
    try:
        return sign_slot(**arguments)  # type: ignore[arg-type]
    except ValueError as error:
        # sign_slot refuses paths this server would refuse (dot segments,
        # control characters, over-long names): a bad request, not a bug.
        raise SlotError(str(error)) from None


# --- Prosody and Metronome ---------------------------------------------------------------------


def prosody_slot_path(filename: str, *, random_part: str | None = None) -> str:
    """``<uuid4>/<filename>``, as ``mod_http_upload_external`` builds it (decoded)."""
    _check_filename(filename)
    return f"{random_part or uuid.uuid4()}/{filename}"


def prosody_slot(
    *,
    base_url: str,
    secret: bytes,
    filename: str,
    size: int,
    content_type: str | None = None,
    protocol: str = "v1",
    random_part: str | None = None,
) -> SignedSlot:
    """
    The slot Prosody hands out for ``filename`` of ``size`` bytes.

    ``protocol`` is ``http_upload_external_protocol``: ``"v1"`` signs path and
    size (``?v=``), anything else also the content type (``?v2=``), which
    Prosody defaults to ``application/octet-stream`` when the request has none.
    """
    scheme = "v" if protocol == "v1" else "v2"
    return _sign(
        base_url=base_url,
        path=prosody_slot_path(filename, random_part=random_part),
        size=size,
        secret=secret,
        scheme=scheme,
        content_type=None if scheme == "v" else content_type,
        style="prosody",
    )


def metronome_slot(
    *,
    base_url: str,
    secret: bytes,
    filename: str,
    size: int,
    content_type: str | None = None,
    random_part: str | None = None,
) -> SignedSlot:
    """Metronome's external upload slot: the Prosody layout, the v2 message, ``?token=``."""
    return _sign(
        base_url=base_url,
        path=prosody_slot_path(filename, random_part=random_part),
        size=size,
        secret=secret,
        scheme="token",
        content_type=content_type,
        style="prosody",
    )


# --- ejabberd ----------------------------------------------------------------------------------


def _replace_special_chars(text: str) -> str:
    """
    ejabberd's ``replace_special_chars``: ``re:replace(S, "[^\\p{Xan}_.-]", "_")``.

    ``\\p{Xan}`` is any Unicode letter or number, so ``Grüße 2.txt`` keeps its
    umlauts and becomes ``Grüße_2.txt``.
    """
    return "".join(
        char if char in "_.-" or unicodedata.category(char)[0] in "LN" else "_" for char in text
    )


def _bare_jid(jid: str) -> tuple[str, str]:
    """``(localpart, domain)`` of a JID, lowercased as nodeprep/nameprep would (ASCII-wise)."""
    bare = jid.partition("/")[0]
    local, at, domain = bare.rpartition("@")
    if not at or not local or not domain:
        raise SlotError(f"{jid!r} is not a user JID")
    return local.lower(), domain.lower()


def ejabberd_user_string(jid: str, jid_in_url: str = "sha1") -> str:
    """
    The first segment of an ejabberd slot: the lowercase hex SHA-1 of
    ``user@server`` (``jid_in_url: sha1``, the default) or the sanitised
    user name (``jid_in_url: node``).
    """
    local, domain = _bare_jid(jid)
    if jid_in_url == "sha1":
        return hashlib.sha1(f"{local}@{domain}".encode()).hexdigest()
    if jid_in_url == "node":
        return _replace_special_chars(local)
    raise ValueError(f"unknown jid_in_url {jid_in_url!r} (known: sha1, node)")


def ejabberd_file_string(filename: str) -> str:
    """The last segment of an ejabberd slot: the filename with specials replaced by ``_``."""
    _check_filename(filename)
    return _replace_special_chars(filename)


def ejabberd_slot_path(
    jid: str,
    filename: str,
    *,
    random_part: str | None = None,
    secret_length: int = EJABBERD_SECRET_LENGTH,
    jid_in_url: str = "sha1",
) -> str:
    """``<user>/<random>/<file>`` as ejabberd's ``create_slot`` builds it (decoded)."""
    if random_part is None:
        random_part = "".join(secrets.choice(_ALPHANUMERIC) for _ in range(secret_length))
    return "/".join(
        (ejabberd_user_string(jid, jid_in_url), random_part, ejabberd_file_string(filename))
    )


def _expand_host(url: str, host: str) -> str:
    return url.replace("@HOST@", host)


def ejabberd_slot(
    *,
    put_url: str,
    secret: bytes,
    jid: str,
    filename: str,
    size: int,
    get_url: str | None = None,
    random_part: str | None = None,
    secret_length: int = EJABBERD_SECRET_LENGTH,
    jid_in_url: str = "sha1",
) -> SignedSlot:
    """
    The slot ejabberd hands ``jid`` with ``external_secret`` set.

    ``put_url``/``get_url`` are the module options (``@HOST@`` is replaced by
    the user's domain, a trailing ``/`` dropped); ejabberd signs only the
    three-segment path, with the ``v`` message, and never binds the type.
    """
    path = ejabberd_slot_path(
        jid, filename, random_part=random_part, secret_length=secret_length, jid_in_url=jid_in_url
    )
    domain = _bare_jid(jid)[1]
    slot = _sign(
        base_url=_expand_host(put_url, domain),
        path=path,
        size=size,
        secret=secret,
        scheme="v",
        style="ejabberd",
    )
    if get_url is None:
        return slot
    get = f"{_expand_host(get_url, domain).rstrip('/')}/{ejabberd_quote(path)}"
    return SignedSlot(put_url=slot.put_url, get_url=get, headers=slot.headers)


# --- hmacfs's own expiring slots -----------------------------------------------------------------


def expiring_slot(
    *,
    base_url: str,
    secret: bytes,
    filename: str,
    size: int,
    expires: int,
    random_part: str | None = None,
) -> SignedSlot:
    """
    A ``v3`` slot that hmacfs refuses after ``expires`` (a unix time).

    ``base_url`` must be where hmacfs serves its upload tree, prefix included
    (``https://upload.example.org/upload``): ``v3`` signs the full decoded
    request path, exactly as ``hmacfs.signing.auth.Authenticator`` recomputes it.
    The ``v3`` message does not cover the size: the caller checks it against
    its limits before signing, and ``MaxUploadSize`` still caps the PUT.
    """
    return _sign(
        base_url=base_url,
        path=prosody_slot_path(filename, random_part=random_part),
        size=size,
        secret=secret,
        scheme="v3",
        expires=expires,
        style="prosody",
    )
