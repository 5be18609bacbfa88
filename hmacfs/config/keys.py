# -*- test-case-name: tests.test_config -*-
"""
The key table: every TOML key, the attribute it fills, its default and its
converter, in the order they are checked; the obsolete keys of the Go server;
and the frozen L{Config} they fill.

Adding a key is one row here and one attribute on L{Config}.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Literal

import attrs

from hmacfs.config.addresses import (
    component_jid,
    component_server,
    mask_password,
    public_url,
    redis_addr,
    upload_access,
)
from hmacfs.config.error import REDACTED
from hmacfs.config.s3 import (
    MAX_PART_SIZE,
    MIN_PART_SIZE,
    resolve_addressing,
    s3_access_key,
    s3_addressing_style,
    s3_bucket,
    s3_endpoint,
    s3_prefix,
    s3_presign_expiry,
    s3_region,
    storage_backend,
)
from hmacfs.config.validators import (
    Converter,
    boolean,
    duration,
    integer,
    listen_text,
    log_file,
    log_level,
    networks,
    num_cores,
    optional_path,
    read_secret_file,
    size,
    socket_mode,
    store_dir,
    string,
    upload_subdir,
)


@attrs.frozen
class Key:
    """One TOML key: the attribute it fills, its default as TOML would hold it, its converter."""

    name: str
    attr: str
    default: object
    convert: Converter
    sensitive: bool = False


# In this order: the first bad key in this order is the one reported.
KEYS: tuple[Key, ...] = (
    Key("ListenPort", "listen_raw", ":8080", listen_text),
    Key("UnixSocket", "unix_socket", False, boolean),
    Key("SocketMode", "socket_mode", "660", socket_mode),
    Key("Secret", "secret", "", string, sensitive=True),
    Key("SecretFile", "secret_file", "", optional_path),
    Key("StoreDir", "store_dir", "./data", store_dir),
    Key("UploadSubDir", "upload_subdir", "upload", upload_subdir),
    Key("StorageBackend", "storage_backend", "filesystem", storage_backend),
    Key("S3Endpoint", "s3_endpoint", "", s3_endpoint),
    Key("S3Region", "s3_region", "us-east-1", s3_region),
    Key("S3Bucket", "s3_bucket", "", s3_bucket),
    Key("S3Prefix", "s3_prefix", "", s3_prefix),
    Key("S3AccessKey", "s3_access_key", "", s3_access_key),
    Key("S3SecretKey", "s3_secret_key", "", string, sensitive=True),
    Key("S3SecretKeyFile", "s3_secret_key_file", "", optional_path),
    Key("S3AddressingStyle", "s3_addressing_style", "auto", s3_addressing_style),
    Key("S3PartSize", "s3_part_size", "8MiB", size(MIN_PART_SIZE, MAX_PART_SIZE)),
    Key("S3RedirectDownloads", "s3_redirect_downloads", False, boolean),
    Key("S3PresignExpiry", "s3_presign_expiry", "5m", s3_presign_expiry),
    Key("S3CAFile", "s3_ca_file", "", optional_path),
    Key("LogLevel", "log_level", "info", log_level),
    Key("LogFile", "log_file", "", log_file),
    Key("MaxRetries", "max_retries", 5, integer(0)),
    Key("RetryDelay", "retry_delay", 2, duration()),
    Key("EnableGetRetries", "enable_get_retries", True, boolean),
    Key("BlockAfterFails", "block_after_fails", 5, integer(1)),
    Key("BlockDuration", "block_duration", "300s", duration()),
    Key("AutoUnban", "auto_unban", True, boolean),
    Key("AutoBanTime", "auto_ban_time", "600s", duration()),
    Key("DeleteFiles", "delete_files", False, boolean),
    Key("DeleteFilesAfterPeriod", "delete_files_after_period", "1y", duration(0, exclusive=True)),
    Key("NumCores", "num_cores", "auto", num_cores),
    Key("ReaskSecretEnabled", "reask_secret_enabled", False, boolean),
    Key("ReaskSecretInterval", "reask_secret_interval", "1h", duration(1)),
    Key("MetricsEnabled", "metrics_enabled", False, boolean),
    Key("MetricsPort", "metrics_listen", ":9090", listen_text),
    Key("ChecksumVerification", "checksum_verification", False, boolean),
    Key("RetentionPolicyEnabled", "retention_policy_enabled", False, boolean),
    Key("MaxRetentionSize", "max_retention_size", "10GiB", size(1)),
    Key("MaxRetentionTime", "max_retention_time", "30d", duration(0, exclusive=True)),
    Key("RedisAddr", "redis_addr", "", redis_addr),
    Key("RedisPassword", "redis_password", "", string, sensitive=True),
    Key("RedisDB", "redis_db", 0, integer(0, 15)),
    Key("ResumeTTL", "resume_ttl", "600s", duration(1)),
    Key("ReadTimeout", "read_timeout", "2m", duration(0, exclusive=True)),
    Key("WriteTimeout", "write_timeout", "2m", duration(0, exclusive=True)),
    Key("HeaderTimeout", "header_timeout", "30s", duration()),
    Key("MaxConnectionsPerClient", "max_connections_per_client", 64, integer(0)),
    Key("BufferSize", "buffer_size", 65536, size(4 * 1024, 16 * 1024**2)),
    Key("MaxUploadSize", "max_upload_size", 0, size()),
    Key("MinFreeBytes", "min_free_bytes", "100MiB", size()),
    Key("MetadataXattr", "metadata_xattr", True, boolean),
    Key("TrustedProxies", "trusted_proxies", ["127.0.0.1/32", "::1/128"], networks),
    Key("ClockSkew", "clock_skew", "30s", duration()),
    Key("DrainTimeout", "drain_timeout", "30s", duration()),
    Key("AccessLog", "log_access", True, boolean),
    Key("SecretGracePeriod", "secret_grace_period", "1h", duration()),
    Key("RetentionInterval", "retention_interval", "1h", duration(1)),
    Key("DeletionReportFile", "deletion_report_file", "", log_file),
    Key("ComponentJID", "component_jid", "", component_jid),
    Key("ComponentSecret", "component_secret", "", string, sensitive=True),
    Key("ComponentServer", "component_server", "127.0.0.1:5347", component_server),
    Key("PublicURL", "public_url", "", public_url),
    Key("UploadAccess", "upload_access", [], upload_access),
    Key("UserQuota", "user_quota", 0, size()),
    Key("SlotExpiry", "slot_expiry", "5m", duration(1)),
    Key("HealthOnMainPort", "health_on_main_port", False, boolean),
)
KNOWN_KEYS: tuple[str, ...] = tuple(spec.name for spec in KEYS)
#: TOML key -> the L{Config} attribute it fills (what SIGHUP compares).
KEY_ATTRIBUTES: dict[str, str] = {spec.name: spec.attr for spec in KEYS}

_NO_VERSIONS = "is ignored: uploads are never overwritten, so there are no versions to keep"
_NO_REPORT = "is ignored: files removed by DeleteFiles are reported in the log"
IGNORED = {
    "EnableVersioning": _NO_VERSIONS,
    "VersioningDirectory": _NO_VERSIONS,
    "MaxVersions": _NO_VERSIONS,
    "VersioningStrategy": _NO_VERSIONS,
    "DeleteFilesReport": _NO_REPORT,
    "DeleteFilesReportPath": _NO_REPORT,
    "LoggingEnabled": "is ignored: logging is always on; use LogLevel and LogFile",
}
# Still honoured when their replacement is not set; see _min_free_alias and _resolve_listen.
ALIASED = ("MinFreeSpaceThreshold", "UnixSocketPath")
# Keys of the Go server that hmacfs recognises but no longer uses as such.
OBSOLETE_KEYS: tuple[str, ...] = (*IGNORED, *ALIASED)
FLAT = 'flat top-level keys such as ListenPort = ":8080"; hmacfs reads no [sections]'


# --- the Config value -------------------------------------------------------------------------


@attrs.frozen(kw_only=True)
class Config:
    """
    The effective configuration, already checked and converted.

    Durations are seconds, sizes bytes, paths absolute, listen addresses
    Twisted endpoint descriptions.  Build one with L{load_config},
    L{parse_config} or (in tests) L{default_config}.
    """

    listen: str
    listen_raw: str
    unix_socket: bool
    socket_mode: int
    secret: bytes = attrs.field(repr=False)
    secret_file: Path | None
    store_dir: Path
    upload_subdir: str
    storage_backend: Literal["filesystem", "s3"]
    #: normalised ``scheme://host[:port]``; "" = AWS's endpoint for s3_region
    s3_endpoint: str
    s3_region: str
    s3_bucket: str
    #: "" or ending in "/"
    s3_prefix: str
    s3_access_key: str
    #: the secret access key, from S3SecretKey or read from S3SecretKeyFile ("" unless
    #: StorageBackend = "s3" or S3SecretKey is set)
    s3_secret_key: str = attrs.field(repr=False)
    s3_secret_key_file: Path | None
    s3_addressing_style: Literal["path", "virtual", "auto"]
    s3_part_size: int
    s3_redirect_downloads: bool
    #: whole seconds, 1 to 604800
    s3_presign_expiry: int
    s3_ca_file: Path | None
    log_level: str
    log_file: Path | None
    max_retries: int
    retry_delay: float
    enable_get_retries: bool
    block_after_fails: int
    block_duration: float
    auto_unban: bool
    auto_ban_time: float
    delete_files: bool
    delete_files_after_period: float
    num_cores: int
    reask_secret_enabled: bool
    reask_secret_interval: float
    metrics_enabled: bool
    metrics_listen: str
    checksum_verification: bool
    retention_policy_enabled: bool
    max_retention_size: int
    max_retention_time: float
    redis_addr: str = attrs.field(repr=lambda addr: repr(mask_password(addr)))
    redis_password: str = attrs.field(repr=False)
    redis_db: int
    resume_ttl: float
    read_timeout: float
    write_timeout: float
    header_timeout: float
    max_connections_per_client: int
    buffer_size: int
    max_upload_size: int
    min_free_bytes: int
    #: finished files' metadata in their user.hmacfs attribute (where the filesystem has them)
    metadata_xattr: bool
    trusted_proxies: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]
    clock_skew: float
    drain_timeout: float
    log_access: bool
    secret_grace_period: float
    retention_interval: float
    deletion_report_file: Path | None
    component_jid: str
    component_secret: str = attrs.field(repr=False)
    component_server: str
    public_url: str
    upload_access: tuple[str, ...]
    user_quota: int
    slot_expiry: float
    health_on_main_port: bool

    def redacted(self) -> dict[str, object]:
        """
        The effective configuration under its TOML key names, for
        C{--print-config} and the startup log: secrets replaced by
        C{"<redacted>"}, listen addresses shown as the endpoints in use.
        """
        special: dict[str, object] = {
            "ListenPort": self.listen,
            "SocketMode": f"{self.socket_mode:03o}",
            "Secret": repr(REDACTED),
            "RedisAddr": mask_password(self.redis_addr),
            "RedisPassword": repr(REDACTED) if self.redis_password else "",
            "ComponentSecret": repr(REDACTED) if self.component_secret else "",
            # Read from S3SecretKeyFile (shown as its path) or given inline.
            "S3SecretKey": (
                repr(REDACTED) if self.s3_secret_key and self.s3_secret_key_file is None else ""
            ),
        }
        shown: dict[str, object] = {}
        for spec in KEYS:
            value = special.get(spec.name, getattr(self, spec.attr))
            if value is None:
                value = ""
            elif isinstance(value, Path):
                value = str(value)
            elif isinstance(value, tuple):
                value = [str(item) for item in value]
            shown[spec.name] = value
        return shown

    def s3_addressing(self) -> Literal["path", "virtual"]:
        """
        The addressing the S3 backend uses: C{S3AddressingStyle} with
        C{"auto"} resolved (virtual-hosted on AWS for a bucket without dots,
        path style on every other endpoint).
        """
        return resolve_addressing(self.s3_addressing_style, self.s3_endpoint, self.s3_bucket)

    def read_secret(self) -> bytes:
        """
        The current secret: read again from C{SecretFile} when there is one,
        so a rotated secret is picked up without a restart.
        """
        if self.secret_file is None:
            return self.secret
        return read_secret_file(self.secret_file)
