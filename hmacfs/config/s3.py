# -*- test-case-name: tests.test_config_s3 -*-
"""
The converters of the storage keys: C{StorageBackend} and the C{S3*} keys.

Each checks the form of one value, whatever the backend, so a typo is found
before it matters; what depends on other keys (required with C{"s3"}, unused
with C{"filesystem"}, files read, addressing against the endpoint) is checked
in L{hmacfs.config.load}.  Nothing here resolves a host or opens a socket, and
nothing imports botocore or a TLS library: the config stays cheap to load.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Literal
from urllib.parse import urlsplit

from hmacfs.config.addresses import HOSTNAME, mask_password
from hmacfs.config.error import ConfigError
from hmacfs.config.units import parse_duration
from hmacfs.config.validators import Context, as_text

# --- StorageBackend -----------------------------------------------------------------------------

STORAGE_BACKENDS = ("filesystem", "s3")
STORAGE_BACKEND_FORMS = '"filesystem" (files under StoreDir) or "s3" (an S3-compatible bucket)'


def storage_backend(value: object, key: str, ctx: Context) -> str:
    text = as_text(value, key, STORAGE_BACKEND_FORMS).strip().lower()
    if text not in STORAGE_BACKENDS:
        raise ConfigError(key, value, STORAGE_BACKEND_FORMS, "is not a storage backend")
    return text


# --- S3Endpoint ---------------------------------------------------------------------------------

S3_ENDPOINT_FORMS = (
    'the http:// or https:// URL of an S3-compatible service, host and optional port only, '
    'such as "https://s3.example.org", "http://127.0.0.1:8080" or "https://[2001:db8::1]:9000", '
    'or "" for AWS in S3Region'
)
# urlsplit drops tabs and newlines silently, and a space is never part of a URL: refuse them first.
_NOT_IN_URL = re.compile(r"[\x00-\x20\x7f]")
#: host or [IPv6], then an optional port: what urlsplit leaves unchecked (such as "[::1]x").
_NETLOC = re.compile(r"(?:\[[0-9A-Za-z:.%]*\]|[^\[\]:]*)(?::[0-9]*)?")


def s3_endpoint(value: object, key: str, ctx: Context) -> str:
    """
    The service's base URL, normalised to C{scheme://host[:port]} in lower
    case without a trailing slash; C{""} for AWS.  A path is refused (the
    bucket and key go there, or the bucket goes in the host), and so is a
    user part: credentials belong in C{S3AccessKey}/C{S3SecretKey}, and an
    error never repeats a password written into the URL.
    """
    text = as_text(value, key, S3_ENDPOINT_FORMS).strip()
    if not text:
        return ""
    shown = mask_password(text)
    if _NOT_IN_URL.search(text):
        raise ConfigError(key, shown, S3_ENDPOINT_FORMS, "has a space or control character")
    if not text.isascii():
        raise ConfigError(
            key, shown, S3_ENDPOINT_FORMS,
            "is not ASCII (write an international domain name in its xn-- form)",
        )
    scheme, separator, _ = text.partition("://")
    if not separator or scheme.lower() not in ("http", "https"):
        raise ConfigError(key, shown, S3_ENDPOINT_FORMS, "is not an http:// or https:// URL")
    if "@" in text:
        raise ConfigError(
            key, shown, S3_ENDPOINT_FORMS,
            "has a user part (put the credentials in S3AccessKey and S3SecretKey)",
        )
    try:
        parts = urlsplit(text)
        port = parts.port
    except ValueError:
        raise ConfigError(key, shown, S3_ENDPOINT_FORMS, "has a port or host that is not valid") from None
    if "?" in text or "#" in text:
        raise ConfigError(key, shown, S3_ENDPOINT_FORMS, "has a query or fragment")
    if parts.path not in ("", "/"):
        raise ConfigError(key, shown, S3_ENDPOINT_FORMS, "has a path")
    if not _NETLOC.fullmatch(parts.netloc):
        raise ConfigError(key, shown, S3_ENDPOINT_FORMS, "has a port or host that is not valid")
    if parts.netloc.endswith(":") or port == 0:
        raise ConfigError(key, shown, S3_ENDPOINT_FORMS, "has a port outside 1..65535")
    host = parts.hostname or ""
    if parts.netloc.startswith("["):
        try:
            if "%" in host:
                raise ValueError("a zone id is no use to a service URL")
            hostport = f"[{ipaddress.IPv6Address(host)}]"
        except ValueError:
            raise ConfigError(key, shown, S3_ENDPOINT_FORMS, "has an IPv6 address that is not valid") from None
    elif not _is_ipv4(host):
        if not HOSTNAME.fullmatch(host) or host.endswith("."):
            raise ConfigError(key, shown, S3_ENDPOINT_FORMS, "has a host that is not valid")
        if host.rpartition(".")[2].isdigit():
            # "10.0.0.300" or "1.2.3": neither an IPv4 address nor a domain (no numeric TLD).
            raise ConfigError(key, shown, S3_ENDPOINT_FORMS, "has a host that is not valid")
        hostport = host
    else:
        hostport = host
    if port is not None:
        hostport = f"{hostport}:{port}"
    return f"{parts.scheme.lower()}://{hostport}"


def _is_ipv4(host: str) -> bool:
    try:
        ipaddress.IPv4Address(host)
    except ValueError:
        return False
    return True


def endpoint_host(endpoint: str) -> str:
    """The host of a normalised C{S3Endpoint} (an IPv6 address without brackets); C{""} for AWS."""
    return (urlsplit(endpoint).hostname or "") if endpoint else ""


def endpoint_is_ip(endpoint: str) -> bool:
    """Whether a normalised C{S3Endpoint} names its host by IP address (so no bucket subdomain)."""
    host = endpoint_host(endpoint)
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def endpoint_uses_tls(endpoint: str) -> bool:
    """Whether a normalised C{S3Endpoint} is reached over TLS: https, or AWS (C{""})."""
    return not endpoint.startswith("http://")


def endpoint_is_loopback(endpoint: str) -> bool:
    host = endpoint_host(endpoint)
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost" or host.endswith(".localhost")


# --- S3Region -----------------------------------------------------------------------------------

S3_REGION_FORMS = (
    'a region name such as "us-east-1" or "eu-central-1": 1 to 64 letters, digits, "-", "_" '
    'or "." ("us-east-1" for most S3-compatible servers, Swift and MinIO included)'
)
_REGION = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


def s3_region(value: object, key: str, ctx: Context) -> str:
    """The SigV4 signing region: it goes into every request's credential scope, so no C{/} or space."""
    text = as_text(value, key, S3_REGION_FORMS).strip()
    if not text:
        raise ConfigError(key, value, S3_REGION_FORMS, "is empty")
    if not _REGION.fullmatch(text):
        raise ConfigError(key, value, S3_REGION_FORMS, "is not a region name")
    return text


# --- S3Bucket -----------------------------------------------------------------------------------

S3_BUCKET_FORMS = (
    'an S3 bucket name: 3 to 63 lowercase letters, digits, "." and "-", each dot-separated label '
    'beginning and ending with a letter or digit, not an IP address, none of S3\'s reserved '
    'prefixes (xn--, sthree-, amzn-s3-demo-) or suffixes (-s3alias, --ol-s3, .mrap, --x-s3, '
    '--table-s3); required with StorageBackend = "s3"'
)
_BUCKET_CHARS = re.compile(r"[a-z0-9.-]+")
_BUCKET_LABEL = re.compile(r"[a-z0-9](?:[a-z0-9-]*[a-z0-9])?")
_IPV4_LIKE = re.compile(r"[0-9]+\.[0-9]+\.[0-9]+\.[0-9]+")
_RESERVED_PREFIXES = ("xn--", "sthree-", "amzn-s3-demo-")
_RESERVED_SUFFIXES = ("-s3alias", "--ol-s3", ".mrap", "--x-s3", "--table-s3")


def bucket_problem(name: str) -> str | None:
    """
    Why C{name} is not a bucket name under AWS's rules for general purpose
    buckets (which Swift's s3api, MinIO and Ceph enforce too), or None.
    The label rule is the stricter DNS form: a bucket that is valid here is
    also a valid host name label sequence, so virtual-hosted addressing works.
    """
    if not 3 <= len(name) <= 63:
        return f"is {len(name)} characters long"
    if not _BUCKET_CHARS.fullmatch(name):
        if _BUCKET_CHARS.fullmatch(name.lower()):
            return "has upper-case letters"
        return "has a character other than a-z, 0-9, '.' and '-'"
    if not all(_BUCKET_LABEL.fullmatch(label) for label in name.split(".")):
        return "has a label that is empty or begins or ends with '-' ('..', '.-', '-.', or at an end)"
    if _IPV4_LIKE.fullmatch(name):
        return "is formatted as an IP address"
    for prefix in _RESERVED_PREFIXES:
        if name.startswith(prefix):
            return f"begins with the reserved prefix {prefix!r}"
    for suffix in _RESERVED_SUFFIXES:
        if name.endswith(suffix):
            return f"ends with the reserved suffix {suffix!r}"
    return None


def s3_bucket(value: object, key: str, ctx: Context) -> str:
    text = as_text(value, key, S3_BUCKET_FORMS + ', or ""').strip()
    if not text:
        return ""
    problem = bucket_problem(text)
    if problem is not None:
        raise ConfigError(key, value, S3_BUCKET_FORMS, problem)
    return text


# --- S3Prefix -----------------------------------------------------------------------------------

MAX_PREFIX_BYTES = 256
S3_PREFIX_FORMS = (
    'a key prefix such as "hmacfs/" or "xmpp/uploads" (a "/" is added at the end): no leading '
    f'"/", no empty, "." or ".." segment, no control character, at most {MAX_PREFIX_BYTES} bytes '
    'of UTF-8; or "" for the bucket\'s root'
)


def s3_prefix(value: object, key: str, ctx: Context) -> str:
    """
    The key prefix of every object hmacfs writes, normalised to end with
    C{"/"} so that it is a folder: listing C{"uploads/"} for retention can
    never reach a neighbour's C{"uploads-old/..."}, as C{"uploads"} would.
    Dot segments are refused because a path-style URL may be normalised by
    a proxy or server, which would turn C{a/../b} into another key.
    """
    text = as_text(value, key, S3_PREFIX_FORMS)
    if not text:
        return ""
    if any(ord(char) < 0x20 or 0x7F <= ord(char) <= 0x9F for char in text):
        raise ConfigError(key, value, S3_PREFIX_FORMS, "has a control character")
    if text.startswith("/"):
        raise ConfigError(key, value, S3_PREFIX_FORMS, "begins with '/'")
    normalized = text if text.endswith("/") else text + "/"
    for segment in normalized[:-1].split("/"):
        if segment in ("", ".", ".."):
            raise ConfigError(key, value, S3_PREFIX_FORMS, f"has a bad segment {segment!r}")
    if len(normalized.encode("utf-8", "surrogatepass")) > MAX_PREFIX_BYTES:
        raise ConfigError(key, value, S3_PREFIX_FORMS, "is too long")
    return normalized


# --- S3AccessKey --------------------------------------------------------------------------------

S3_ACCESS_KEY_FORMS = (
    'the access key id, such as "AKIAIOSFODNN7EXAMPLE" or Swift\'s "account:user": printable '
    'ASCII without spaces, "/" or ","; required with StorageBackend = "s3"'
)
_ACCESS_KEY = re.compile(r"[!-~]{1,256}")


def s3_access_key(value: object, key: str, ctx: Context) -> str:
    """
    The access key id.  Not a secret (it is in every signed request and
    presigned URL), so it is shown; it must fit SigV4's C{Credential=} field,
    whose parts are split at C{/} and C{,}.
    """
    text = as_text(value, key, S3_ACCESS_KEY_FORMS + ', or ""').strip()
    if not text:
        return ""
    if not _ACCESS_KEY.fullmatch(text) or "/" in text or "," in text:
        raise ConfigError(key, value, S3_ACCESS_KEY_FORMS, "is not an access key id")
    return text


# --- S3AddressingStyle --------------------------------------------------------------------------

AddressingStyle = Literal["path", "virtual", "auto"]
S3_ADDRESSING_FORMS = (
    '"auto" (virtual-hosted on AWS for a bucket without dots, path everywhere else), "path" '
    '(ENDPOINT/BUCKET/KEY: Swift, MinIO, Ceph, any IP address) or "virtual" (BUCKET.ENDPOINT/KEY)'
)


def s3_addressing_style(value: object, key: str, ctx: Context) -> str:
    text = as_text(value, key, S3_ADDRESSING_FORMS).strip().lower()
    if text not in ("path", "virtual", "auto"):
        raise ConfigError(key, value, S3_ADDRESSING_FORMS, "is not an addressing style")
    return text


def resolve_addressing(style: str, endpoint: str, bucket: str) -> Literal["path", "virtual"]:
    """
    What C{"auto"} means: virtual-hosted addressing on AWS (C{S3Endpoint}
    empty), which AWS recommends, unless the bucket has a dot (then
    C{BUCKET.s3.REGION.amazonaws.com} does not match AWS's wildcard
    certificate); path style on every other endpoint, since it needs no
    wildcard DNS or certificate and is what self-hosted servers (Swift's
    s3api, MinIO, Ceph, Garage) answer out of the box.
    """
    if style == "path":
        return "path"
    if style == "virtual":
        return "virtual"
    return "virtual" if not endpoint and "." not in bucket else "path"


# --- S3CAFile -----------------------------------------------------------------------------------

S3_CA_FILE_FORMS = (
    'a readable PEM file of the certificate authorities to trust for S3Endpoint, or "" for the '
    "system's trust store"
)
_PEM_CERTIFICATE = b"-----BEGIN CERTIFICATE-----"
MAX_CA_FILE_BYTES = 16 * 1024**2


def check_ca_file(path: object, key: str) -> None:
    """
    Refuse a CA file that cannot be read or holds no PEM certificate, now,
    rather than as a TLS failure on the first upload.  Only the form is
    checked: the certificates are parsed by the TLS library when the
    backend starts.
    """
    shown = str(path)
    try:
        with open(shown, "rb") as file:
            content = file.read(MAX_CA_FILE_BYTES + 1)
    except IsADirectoryError:
        raise ConfigError(key, shown, S3_CA_FILE_FORMS, "is a directory") from None
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise ConfigError(key, shown, S3_CA_FILE_FORMS, f"cannot be read ({reason})") from exc
    if len(content) > MAX_CA_FILE_BYTES:
        raise ConfigError(key, shown, S3_CA_FILE_FORMS, "is larger than 16MiB")
    if _PEM_CERTIFICATE not in content:
        raise ConfigError(
            key, shown, S3_CA_FILE_FORMS, f"holds no PEM certificate ({_PEM_CERTIFICATE.decode()})"
        )


# --- S3PartSize, S3PresignExpiry: bounds S3 itself sets -----------------------------------------

#: S3's smallest part (but the last) and largest part of a multipart upload.
MIN_PART_SIZE = 5 * 1024**2
MAX_PART_SIZE = 5 * 1024**3
#: S3's most parts in one multipart upload, and its largest object.
MAX_PARTS = 10_000
MAX_OBJECT_SIZE = 5 * 1024**4
#: SigV4's longest presigned URL validity: 7 days.
MAX_PRESIGN_EXPIRY = 7 * 86400


S3_PRESIGN_EXPIRY_FORMS = (
    "a whole number of seconds from 1s to 7d (SigV4's longest), such as 5m, 1h or 3600"
)


def s3_presign_expiry(value: object, key: str, ctx: Context) -> int:
    """Seconds, whole: a presigned URL's C{X-Amz-Expires} is an integer from 1 to 604800."""
    seconds = parse_duration(value, key=key)  # type: ignore[arg-type]
    if seconds != int(seconds):
        raise ConfigError(key, value, S3_PRESIGN_EXPIRY_FORMS, "is not a whole number of seconds")
    if seconds < 1:
        raise ConfigError(key, value, S3_PRESIGN_EXPIRY_FORMS, "is too short")
    if seconds > MAX_PRESIGN_EXPIRY:
        raise ConfigError(key, value, S3_PRESIGN_EXPIRY_FORMS, "is too long")
    return int(seconds)
