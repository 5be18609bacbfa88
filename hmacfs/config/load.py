# -*- test-case-name: tests.test_config -*-
"""
Reading and building: TOML in, a frozen L{Config} and the warnings out.

Unknown keys get a typo hint, obsolete keys a warning (or their replacement's
role), then every key is converted in table order and the cross-key rules run
(one of Secret/SecretFile, the component's secret and URL, the socket path,
the S3 backend's required keys and files).
"""

from __future__ import annotations

import difflib
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import attrs

from hmacfs.config.addresses import PUBLIC_URL_FORMS
from hmacfs.config.endpoints import (
    ENDPOINT_PREFIXES,
    listen_to_endpoint,
    split_host_port,
)
from hmacfs.config.error import REDACTED, ConfigError, Shown
from hmacfs.config.keys import (
    ALIASED,
    FLAT,
    IGNORED,
    KEYS,
    KNOWN_KEYS,
    OBSOLETE_KEYS,
    Config,
)
from hmacfs.config.s3 import (
    MAX_OBJECT_SIZE,
    MAX_PARTS,
    MIN_PART_SIZE,
    S3_ACCESS_KEY_FORMS,
    S3_ADDRESSING_FORMS,
    S3_BUCKET_FORMS,
    check_ca_file,
    endpoint_is_ip,
    endpoint_is_loopback,
    endpoint_uses_tls,
)
from hmacfs.config.units import format_size
from hmacfs.config.validators import Context, read_secret_file, size, string


def _check_component(values: dict[str, object]) -> None:
    """With C{ComponentJID} set, the secret and the public URL are required."""
    if not values["component_jid"]:
        return
    if not values["component_secret"]:
        raise ConfigError(
            "ComponentSecret", "", "the component password set on the XMPP server", "is empty"
        )
    if not values["public_url"]:
        raise ConfigError(
            "PublicURL", "", PUBLIC_URL_FORMS, "is empty, but ComponentJID is set"
        )


def _resolve_secret(text: str, secret_file: Path | None, ctx: Context) -> bytes:
    if text and secret_file is not None:
        raise ConfigError(
            "Secret",
            REDACTED,
            "set exactly one of Secret or SecretFile",
            "is set and so is SecretFile",
        )
    if secret_file is not None:
        secret = read_secret_file(secret_file, ctx.warnings)
    elif text:
        secret = text.encode("utf-8")
    else:
        raise ConfigError("Secret", "", "set Secret or SecretFile", "is empty")
    if len(secret) < 16:
        ctx.warnings.append(
            f"the secret is only {len(secret)} bytes long; use at least 16 "
            "(for example the output of `openssl rand -hex 32`)"
        )
    return secret


#: The keys only the S3 backend reads.
_S3_KEYS = tuple(spec for spec in KEYS if spec.name.startswith("S3"))
_S3_SECRET_FILE_FORMS = "a readable file holding the S3 secret access key"
_WITH_S3 = 'is empty, but StorageBackend = "s3"'


def _resolve_storage(data: Mapping[str, object], values: dict[str, object], ctx: Context) -> None:
    """
    With C{StorageBackend = "s3"}: the bucket, the access key and exactly one
    of C{S3SecretKey}/C{S3SecretKeyFile} are required, that file and
    C{S3CAFile} are read, and the addressing style and part size must work
    with the endpoint, the bucket and C{MaxUploadSize}.  With
    C{"filesystem"} the S3 keys are unused: one warning names those set to
    something else than their default, and no file they name is read.
    """
    secret_text = str(values["s3_secret_key"])
    secret_file = values["s3_secret_key_file"]
    assert secret_file is None or isinstance(secret_file, Path)
    if secret_text and secret_file is not None:
        raise ConfigError(
            "S3SecretKey",
            REDACTED,
            "set exactly one of S3SecretKey or S3SecretKeyFile",
            "is set and so is S3SecretKeyFile",
        )
    if values["storage_backend"] != "s3":
        scratch = Context(base_dir=ctx.base_dir, warnings=[], create_store_dir=False)
        unused = [
            spec.name
            for spec in _S3_KEYS
            if spec.name in data and values[spec.attr] != spec.convert(spec.default, spec.name, scratch)
        ]
        if unused:
            ctx.warnings.append(
                'StorageBackend is "filesystem", so these keys are unused: ' + ", ".join(unused)
            )
        return

    endpoint, bucket = str(values["s3_endpoint"]), str(values["s3_bucket"])
    if not bucket:
        raise ConfigError("S3Bucket", "", S3_BUCKET_FORMS, _WITH_S3)
    if not values["s3_access_key"]:
        raise ConfigError("S3AccessKey", "", S3_ACCESS_KEY_FORMS, _WITH_S3)
    shown: object
    if secret_file is not None:
        raw = read_secret_file(
            secret_file, ctx.warnings, key="S3SecretKeyFile", allowed=_S3_SECRET_FILE_FORMS
        )
        try:
            secret_text = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise ConfigError(
                "S3SecretKeyFile", str(secret_file), _S3_SECRET_FILE_FORMS, "is not UTF-8 text"
            ) from None
        key, shown = "S3SecretKeyFile", str(secret_file)
    elif secret_text:
        key, shown = "S3SecretKey", REDACTED
    else:
        raise ConfigError("S3SecretKey", "", "set S3SecretKey or S3SecretKeyFile", _WITH_S3)
    if any(ord(char) < 0x20 or ord(char) == 0x7F for char in secret_text):
        raise ConfigError(
            key, shown, "the secret access key, without control characters",
            "has a control character (a line break inside, or a second one at the end?)",
        )
    values["s3_secret_key"] = secret_text

    if values["s3_ca_file"] is not None:
        if endpoint_uses_tls(endpoint):
            check_ca_file(values["s3_ca_file"], "S3CAFile")
        else:
            ctx.warnings.append(f"S3CAFile is unused: S3Endpoint {endpoint!r} is not https")
    if not endpoint_uses_tls(endpoint) and not endpoint_is_loopback(endpoint):
        ctx.warnings.append(
            f"S3Endpoint {endpoint!r} is not https: uploads and downloads cross the network "
            "unencrypted (requests are signed, so the secret key itself is never sent)"
        )
    if int(values["num_cores"]) > 1 and not values["redis_addr"]:  # type: ignore[call-overload]
        # The filesystem's writer lock is a flock every worker sees; on S3 the only one
        # that spans processes is Redis's.
        ctx.warnings.append(
            f'StorageBackend = "s3" with {values["num_cores"]} worker processes (NumCores) '
            "and no RedisAddr: the workers share no writer lock, so two connections to one "
            "upload on different workers could both write it; set RedisAddr (several nodes "
            "need it anyway) or NumCores = 1"
        )
    if values["s3_addressing_style"] == "virtual":
        if endpoint_is_ip(endpoint):
            raise ConfigError(
                "S3AddressingStyle", "virtual", S3_ADDRESSING_FORMS,
                f"needs a host name in S3Endpoint, not the IP address in {endpoint!r} "
                "(the bucket name goes in front of the host); use \"path\"",
            )
        if endpoint_uses_tls(endpoint) and "." in bucket:
            raise ConfigError(
                "S3AddressingStyle", "virtual", S3_ADDRESSING_FORMS,
                f"cannot be used over https with the bucket {bucket!r}, which has a dot "
                "(BUCKET.HOST does not match the wildcard certificate); use \"path\" or \"auto\"",
            )
    _check_part_size(data, values)


def _raw(data: Mapping[str, object], key: str) -> object:
    """A key's value as the file has it, or its default as TOML would hold it, for a message."""
    return data.get(key, _KEYS_BY_NAME[key].default)


def _check_part_size(data: Mapping[str, object], values: dict[str, object]) -> None:
    """An S3 object has at most 10,000 parts and 5 TiB: MaxUploadSize must fit in both."""
    part_size, max_upload = int(values["s3_part_size"]), int(values["max_upload_size"])  # type: ignore[call-overload]
    if max_upload > MAX_OBJECT_SIZE:
        raise ConfigError(
            "MaxUploadSize", _raw(data, "MaxUploadSize"),
            f"a size of at most {format_size(MAX_OBJECT_SIZE)} (S3's largest object), or 0",
            'is larger than S3 allows, and StorageBackend = "s3"',
        )
    if max_upload > MAX_PARTS * part_size:
        needed = max(-(-max_upload // MAX_PARTS), MIN_PART_SIZE)
        needed = -(-needed // 1024**2) * 1024**2  # whole MiB, for an operator to write
        raise ConfigError(
            "S3PartSize", _raw(data, "S3PartSize"),
            f"a size of at least {format_size(needed)}: S3 allows {MAX_PARTS:,} parts per "
            f"object, and MaxUploadSize is {format_size(max_upload)}",
            "is too small",
        )


def _resolve_listen(data: Mapping[str, object], values: dict[str, object], ctx: Context) -> str:
    raw = str(values["listen_raw"])
    unix_socket = bool(values["unix_socket"])
    key = "ListenPort"
    if "UnixSocketPath" in data:
        legacy = string(data["UnixSocketPath"], "UnixSocketPath", ctx).strip()
        if unix_socket and legacy and split_host_port(raw) is not None:
            ctx.warnings.append(
                "obsolete key 'UnixSocketPath' is used as the socket path for now; "
                "with UnixSocket = true, put the path in ListenPort instead"
            )
            raw, key = legacy, "UnixSocketPath"
        else:
            ctx.warnings.append(
                "obsolete key 'UnixSocketPath' is ignored: with UnixSocket = true, "
                "ListenPort holds the socket path"
            )
    if unix_socket and not raw.startswith(ENDPOINT_PREFIXES) and split_host_port(raw) is not None:
        raise ConfigError(
            key,
            raw,
            "a socket path such as /run/hmacfs/hmacfs.sock when UnixSocket = true",
            "is a TCP port, but UnixSocket = true",
        )
    return listen_to_endpoint(
        raw,
        unix_socket=unix_socket,
        socket_mode=int(values["socket_mode"]),  # type: ignore[call-overload]
        key=key,
        base_dir=ctx.base_dir,
    )


def _min_free_alias(data: Mapping[str, object], values: dict[str, object], ctx: Context) -> None:
    if "MinFreeSpaceThreshold" not in data:
        return
    if "MinFreeBytes" in data:
        ctx.warnings.append(
            "obsolete key 'MinFreeSpaceThreshold' is ignored because MinFreeBytes is set"
        )
        return
    values["min_free_bytes"] = size()(data["MinFreeSpaceThreshold"], "MinFreeSpaceThreshold", ctx)
    ctx.warnings.append(
        "obsolete key 'MinFreeSpaceThreshold' is used as MinFreeBytes for now; "
        "rename it to MinFreeBytes"
    )


def _key_warning(key: str) -> str | None:
    """The warning for a key hmacfs does not use, or None for a key it knows."""
    if key in _KEYS_BY_NAME or key in ALIASED:
        return None
    if key in IGNORED:
        return f"obsolete key {key!r} {IGNORED[key]}"
    # Obsolete keys are candidates too: a typo of one should be recognised as that key.
    candidates = KNOWN_KEYS + OBSOLETE_KEYS
    by_lower = {known.lower(): known for known in candidates}
    guess = by_lower.get(key.lower()) or next(
        iter(difflib.get_close_matches(key, candidates, n=1)), None
    )
    hint = f" (did you mean {guess!r}?)" if guess else ""
    return f"unknown key {key!r}{hint}"


_KEYS_BY_NAME = {spec.name: spec for spec in KEYS}


# --- entry points -----------------------------------------------------------------------------


def _parse(
    data: Mapping[str, object],
    base_dir: Path,
    secret: bytes | None = None,
    create_store_dir: bool = True,
) -> tuple[Config, list[str]]:
    ctx = Context(base_dir=base_dir.absolute(), warnings=[], create_store_dir=create_store_dir)
    for key, value in data.items():
        if isinstance(value, Mapping):
            raise ConfigError(key, Shown("{...}"), FLAT, "is a table")
        warning = _key_warning(key)
        if warning is not None:
            ctx.warnings.append(warning)

    values: dict[str, object] = {}
    for spec in KEYS:
        try:
            values[spec.attr] = spec.convert(data.get(spec.name, spec.default), spec.name, ctx)
        except ConfigError as error:
            if spec.sensitive:
                raise ConfigError(spec.name, REDACTED, error.allowed, error.problem) from None
            raise

    _min_free_alias(data, values, ctx)
    _check_component(values)
    _resolve_storage(data, values, ctx)
    if secret is None:
        secret_file = values["secret_file"]
        assert secret_file is None or isinstance(secret_file, Path)
        secret = _resolve_secret(str(values["secret"]), secret_file, ctx)
    values["secret"] = secret
    values["listen"] = _resolve_listen(data, values, ctx)
    metrics_raw = str(values["metrics_listen"])
    values["metrics_listen"] = listen_to_endpoint(
        metrics_raw,
        unix_socket=metrics_raw.startswith("/"),
        socket_mode=int(values["socket_mode"]),  # type: ignore[call-overload]
        key="MetricsPort",
        base_dir=ctx.base_dir,
    )
    return Config(**values), ctx.warnings  # type: ignore[arg-type]


def parse_config(
    data: Mapping[str, object],
    *,
    base_dir: Path,
    source: str = "<config>",
    create_store_dir: bool = True,
) -> tuple[Config, list[str]]:
    """
    Check and convert already-parsed TOML data into a L{Config}.

    Relative paths are taken relative to C{base_dir} (the config file's
    directory).  C{StoreDir} is created if missing (with
    C{create_store_dir=False} only checked: its nearest existing ancestor
    must be a writable directory) and C{SecretFile} is read.
    Returns the config and the warnings (unknown and obsolete keys, a short
    secret) for the caller to log; raises the first L{ConfigError}, with
    C{source} recorded on it.
    """
    try:
        return _parse(data, Path(base_dir), create_store_dir=create_store_dir)
    except ConfigError as error:
        error.source = source
        raise


def load_config(path: str | Path, *, create_store_dir: bool = True) -> tuple[Config, list[str]]:
    """
    Read a TOML config file; relative paths in it are relative to its directory.
    C{create_store_dir} as for L{parse_config}.

    An unreadable file or a TOML syntax error is a L{ConfigError} whose key is
    C{"<file>"}.
    """
    path = Path(path)
    try:
        with path.open("rb") as file:
            data = tomllib.load(file)
    except OSError as exc:
        error = ConfigError(
            "<file>", str(path), "a readable TOML file", f"cannot be read ({exc.strerror or exc})"
        )
        error.source = str(path)
        raise error from exc
    except tomllib.TOMLDecodeError as exc:
        error = ConfigError(
            "<file>", str(path), "TOML syntax, see https://toml.io", f"is not valid TOML: {exc}"
        )
        error.source = str(path)
        raise error from exc
    return parse_config(
        data, base_dir=path.absolute().parent, source=str(path), create_store_dir=create_store_dir
    )


def default_config(store_dir: Path, secret: bytes, **overrides: Any) -> Config:
    """
    The built-in defaults around a given store and secret, for tests and for
    embedding hmacfs in another program.

    C{overrides} are L{Config} attribute names with final values (seconds,
    bytes, endpoint strings); they are taken as given, not parsed.
    """
    if not secret:
        raise ConfigError("Secret", "", "a non-empty secret", "is empty")
    config, _ = _parse({"StoreDir": str(store_dir)}, Path(store_dir), secret=secret)
    return attrs.evolve(config, **overrides)
