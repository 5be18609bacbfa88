"""
Tests for L{hmacfs.config}: every key's default, every accepted form, the
error message for every bad value, and that the secret never leaks.
"""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path
from typing import Any

import attrs
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.endpoints import (
    TCP4ServerEndpoint,
    TCP6ServerEndpoint,
    UNIXServerEndpoint,
    serverFromString,
)
from twisted.internet.testing import MemoryReactor
from twisted.trial.unittest import SynchronousTestCase

from hmacfs.config import (
    KNOWN_KEYS,
    OBSOLETE_KEYS,
    Config,
    ConfigError,
    default_config,
    listen_to_endpoint,
    load_config,
    parse_config,
    parse_duration,
    parse_size,
)
from hmacfs.testing import short_tempdir, small_filesystem

SECRET = "s3cr3t-Value-0123456789abcdef"
PROPERTY = settings(derandomize=True, deadline=None, max_examples=200)

# The size convention, written out independently of the module under test.
SIZE_UNITS = {
    "": 1,
    "B": 1,
    "K": 1024,
    "KB": 1000,
    "KiB": 1024,
    "M": 1024**2,
    "MB": 1000**2,
    "MiB": 1024**2,
    "G": 1024**3,
    "GB": 1000**3,
    "GiB": 1024**3,
    "T": 1024**4,
    "TB": 1000**4,
    "TiB": 1024**4,
}


def endpoint_for(description: str) -> Any:
    """Parse a description the way twistd will, without touching the network."""
    return serverFromString(MemoryReactor(), description)


class ConfigTestCase(SynchronousTestCase):
    """Shared helpers: a fresh base directory and a parser that always supplies a secret."""

    def setUp(self) -> None:
        self.base = Path(self.mktemp()).absolute()
        self.base.mkdir(parents=True)

    def parse(self, **data: object) -> tuple[Config, list[str]]:
        data.setdefault("Secret", SECRET)
        return parse_config(data, base_dir=self.base)

    def parse_error(self, **data: object) -> ConfigError:
        return self.assertRaises(ConfigError, self.parse, **data)


class ConfigErrorTests(SynchronousTestCase):
    def test_message_format(self) -> None:
        """The message reads "<Key>: <repr(value)> <problem> (allowed: <what>)"."""
        error = ConfigError("StoreDir", "/x", "a writable directory", "is not a directory")
        self.assertEqual(
            str(error), "StoreDir: '/x' is not a directory (allowed: a writable directory)"
        )
        self.assertEqual(
            (error.key, error.value, error.allowed, error.problem),
            ("StoreDir", "/x", "a writable directory", "is not a directory"),
        )

    def test_source_recorded(self) -> None:
        """parse_config records where the bad value came from on the error."""
        error = self.assertRaises(
            ConfigError,
            parse_config,
            {"Secret": SECRET, "LogLevel": "loud"},
            base_dir=Path(self.mktemp()),
            source="/etc/hmacfs/config.toml",
        )
        self.assertEqual(error.source, "/etc/hmacfs/config.toml")


class ParseDurationTests(SynchronousTestCase):
    def test_forms(self) -> None:
        """Every documented duration form converts to the right number of seconds."""
        cases: dict[str | float, float] = {
            "45s": 45,
            "90m": 5400,
            "24h": 86400,
            "30d": 30 * 86400,
            "1w": 7 * 86400,
            "1y": 365 * 86400,
            "1d12h": 86400 + 12 * 3600,
            "1h30m": 5400,
            "1h 30m 15s": 5415,
            "1H30M": 5400,
            "8760h": 365 * 86400,
            "1.5h": 5400,
            "500ms": 0.5,
            "0s": 0,
            " 30 ": 30,
            "30": 30,
            "2.5": 2.5,
            30: 30,
            2.5: 2.5,
            0: 0,
        }
        for value, seconds in cases.items():
            self.assertEqual(parse_duration(value, key="K"), seconds, value)

    def test_result_is_float(self) -> None:
        """Durations are floats even when given as integers, so callers can do arithmetic uniformly."""
        self.assertIsInstance(parse_duration(30, key="K"), float)
        self.assertIsInstance(parse_duration("1h", key="K"), float)

    def test_rejects(self) -> None:
        """Negative, unknown-unit and garbage durations are errors that name the key, value and forms."""
        for value in [
            "-5s",
            "-5",
            -1,
            -0.5,
            "5x",
            "h",
            "",
            "1h-30m",
            "soon",
            "1 hour",
            float("inf"),
            float("nan"),
            "1e3s",
        ]:
            error = self.assertRaises(ConfigError, parse_duration, value, key="RetryDelay")
            self.assertEqual(error.key, "RetryDelay")
            self.assertIn("RetryDelay", str(error))
            self.assertIn(repr(value), str(error))
            self.assertIn("1h30m", str(error))

    def test_wrong_type(self) -> None:
        """A boolean or an array is refused with its TOML type named."""
        self.assertIn(
            "is a boolean", str(self.assertRaises(ConfigError, parse_duration, True, key="K"))
        )
        self.assertIn(
            "is an array", str(self.assertRaises(ConfigError, parse_duration, [1], key="K"))
        )

    @PROPERTY
    @given(
        seconds=st.integers(0, 10**10),
        units=st.sets(st.sampled_from("ywdhm")),
        upper=st.booleans(),
        spaced=st.booleans(),
    )
    def test_combination_round_trip(
        self, seconds: int, units: set[str], upper: bool, spaced: bool
    ) -> None:
        """Any whole number of seconds written as a y/w/d/h/m/s combination parses back to itself."""
        parts = []
        rest = seconds
        for unit, factor in (
            ("y", 365 * 86400),
            ("w", 7 * 86400),
            ("d", 86400),
            ("h", 3600),
            ("m", 60),
        ):
            if unit in units:
                count, rest = divmod(rest, factor)
                parts.append(f"{count}{unit}")
        parts.append(f"{rest}s")
        text = (" " if spaced else "").join(parts)
        if upper:
            text = text.upper()
        self.assertEqual(parse_duration(text, key="K"), seconds)


class ParseSizeTests(SynchronousTestCase):
    def test_forms(self) -> None:
        """Every documented size form converts to the right number of bytes."""
        cases: dict[str | int, int] = {
            65536: 65536,
            0: 0,
            "65536": 65536,
            "10GiB": 10 * 1024**3,
            "500MB": 500 * 1000**2,
            "64KiB": 64 * 1024,
            "1K": 1024,
            "1KB": 1000,
            "1kb": 1000,
            "1 MiB": 1024**2,
            "2g": 2 * 1024**3,
            "1TB": 1000**4,
            "1.5KB": 1500,
            "1.5KiB": 1536,
            "100B": 100,
            " 7 ": 7,
        }
        for value, size in cases.items():
            self.assertEqual(parse_size(value, key="K"), size, value)

    def test_rejects(self) -> None:
        """Negative, unknown-unit and garbage sizes are errors naming the key, value and forms."""
        for value in [-1, "-1", "10XB", "GiB", "", "ten", "1.5.5MB", "1 0MB"]:
            error = self.assertRaises(ConfigError, parse_size, value, key="MaxUploadSize")
            self.assertIn("MaxUploadSize", str(error))
            self.assertIn(repr(value), str(error))
            self.assertIn("GiB", str(error))

    def test_wrong_type(self) -> None:
        """A float or boolean is refused with its TOML type named."""
        self.assertIn("is a float", str(self.assertRaises(ConfigError, parse_size, 1.5, key="K")))
        self.assertIn(
            "is a boolean", str(self.assertRaises(ConfigError, parse_size, True, key="K"))
        )

    @PROPERTY
    @given(
        count=st.integers(0, 10**6),
        unit=st.sampled_from(sorted(SIZE_UNITS)),
        lower=st.booleans(),
        spaced=st.booleans(),
    )
    def test_unit_round_trip(self, count: int, unit: str, lower: bool, spaced: bool) -> None:
        """ "<n><unit>" in any case, with or without a space, is n times the unit's factor."""
        text = f"{count}{' ' if spaced else ''}{unit.lower() if lower else unit}"
        self.assertEqual(parse_size(text, key="K"), count * SIZE_UNITS[unit])

    @PROPERTY
    @given(st.integers(0, 2**63))
    def test_bytes_round_trip(self, size: int) -> None:
        """A byte count as TOML integer or digit string is itself."""
        self.assertEqual(parse_size(size, key="K"), size)
        self.assertEqual(parse_size(str(size), key="K"), size)


class ListenToEndpointTests(SynchronousTestCase):
    def listen(self, value: str, **kwargs: object) -> str:
        options: dict[str, object] = {
            "unix_socket": False,
            "socket_mode": 0o660,
            "key": "ListenPort",
        }
        options.update(kwargs)
        return listen_to_endpoint(value, **options)  # type: ignore[arg-type]

    def test_tcp_forms(self) -> None:
        """Go-style addresses become descriptions Twisted parses into the intended port and interface."""
        cases = [
            (":8080", "tcp:port=8080:backlog=511", TCP4ServerEndpoint, 8080, ""),
            ("8080", "tcp:port=8080:backlog=511", TCP4ServerEndpoint, 8080, ""),
            (":0", "tcp:port=0:backlog=511", TCP4ServerEndpoint, 0, ""),
            (
                "127.0.0.1:8080",
                "tcp:port=8080:interface=127.0.0.1:backlog=511",
                TCP4ServerEndpoint,
                8080,
                "127.0.0.1",
            ),
            (
                "0.0.0.0:65535",
                "tcp:port=65535:interface=0.0.0.0:backlog=511",
                TCP4ServerEndpoint,
                65535,
                "0.0.0.0",
            ),
            (
                "localhost:80",
                "tcp:port=80:interface=127.0.0.1:backlog=511",
                TCP4ServerEndpoint,
                80,
                "127.0.0.1",
            ),
            ("[::1]:8080", r"tcp6:port=8080:interface=\:\:1:backlog=511", TCP6ServerEndpoint, 8080, "::1"),
            ("[::]:443", r"tcp6:port=443:interface=\:\::backlog=511", TCP6ServerEndpoint, 443, "::"),
            (
                "[2001:db8::5]:1",
                r"tcp6:port=1:interface=2001\:db8\:\:5:backlog=511",
                TCP6ServerEndpoint,
                1,
                "2001:db8::5",
            ),
            (" :8080 ", "tcp:port=8080:backlog=511", TCP4ServerEndpoint, 8080, ""),
        ]
        for value, description, kind, port, interface in cases:
            self.assertEqual(self.listen(value), description, value)
            endpoint = endpoint_for(description)
            self.assertIsInstance(endpoint, kind)
            self.assertEqual((endpoint._port, endpoint._interface), (port, interface), value)

    @PROPERTY
    @given(address=st.ip_addresses(), port=st.integers(0, 65535))
    def test_any_address_round_trips(
        self, address: ipaddress.IPv4Address | ipaddress.IPv6Address, port: int
    ) -> None:
        """Every IPv4 "a:port" and IPv6 "[a]:port" parses back to the same address and port."""
        text = f"{address}:{port}" if address.version == 4 else f"[{address}]:{port}"
        endpoint = endpoint_for(self.listen(text))
        self.assertIsInstance(
            endpoint, TCP4ServerEndpoint if address.version == 4 else TCP6ServerEndpoint
        )
        self.assertEqual(endpoint._port, port)
        self.assertEqual(ipaddress.ip_address(endpoint._interface), address)

    def test_unix_socket_path(self) -> None:
        """With unix_socket, an absolute path becomes a unix: endpoint with the mode and a lock
        file (the lock is what lets Twisted replace a stale socket left by a crash)."""
        description = self.listen("/run/hmacfs/hmacfs.sock", unix_socket=True, socket_mode=0o640)
        self.assertEqual(description, "unix:/run/hmacfs/hmacfs.sock:mode=640:lockfile=1:backlog=511")
        endpoint = endpoint_for(description)
        self.assertIsInstance(endpoint, UNIXServerEndpoint)
        self.assertEqual(
            (endpoint._address, endpoint._mode, endpoint._wantPID),
            ("/run/hmacfs/hmacfs.sock", 0o640, True),
        )

    def test_unix_socket_relative(self) -> None:
        """A relative socket path is taken relative to base_dir, not the working directory."""
        endpoint = endpoint_for(
            self.listen("run/h.sock", unix_socket=True, base_dir=Path("/srv/hmacfs"))
        )
        self.assertEqual(endpoint._address, "/srv/hmacfs/run/h.sock")

    @PROPERTY
    @given(
        name=st.text(
            st.characters(codec="utf-8", exclude_characters="\0/"), min_size=1, max_size=20
        ),
        mode=st.integers(0, 0o777),
    )
    def test_unix_path_escaping(self, name: str, mode: int) -> None:
        """Any socket file name, including ':', '=' and '\\', reaches Twisted unchanged, with the mode."""
        text = "/tmp/" + name
        endpoint = endpoint_for(self.listen(text, unix_socket=True, socket_mode=mode))
        self.assertEqual(endpoint._address, str(Path(text.strip())))
        self.assertEqual(endpoint._mode, mode)

    def test_unix_path_too_long(self) -> None:
        """A socket path longer than AF_UNIX allows is refused at load, not at bind."""
        error = self.assertRaises(ConfigError, self.listen, "/tmp/" + "s" * 120, unix_socket=True)
        self.assertIn("too long", str(error))

    def test_passthrough(self) -> None:
        """A value that already is a Twisted endpoint description is used unchanged."""
        for description in [
            "tcp:port=8443:interface=127.0.0.1:backlog=511",
            "tcp:8443",
            r"tcp6:port=80:interface=\:\:1:backlog=511",
            "unix:/tmp/x.sock:mode=600",
            "systemd:domain=INET:index=0",
            "systemd:domain=UNIX:name=hmacfs",
        ]:
            self.assertEqual(self.listen(description), description)
            self.assertEqual(self.listen(description, unix_socket=True), description)

    def test_passthrough_invalid(self) -> None:
        """A description Twisted cannot parse, or with a port out of range, is an error naming it."""
        for description in [
            "tcp:port=abc:backlog=511",
            "tcp:port=70000:backlog=511",
            "tcp6:port=80:interface=::1:backlog=511",
            "tcp:port=80:bogus=1:backlog=511",
            "ssl:443:privateKey=/nonexistent/key.pem",
            "systemd:domain=BOGUS:index=0",
        ]:
            error = self.assertRaises(ConfigError, self.listen, description)
            self.assertEqual(error.key, "ListenPort")
            self.assertIn(repr(description), str(error))

    def test_endpoint_check_uses_no_test_fake_and_no_global_reactor(self) -> None:
        """
        Checking an explicit description (port range included) neither imports
        twisted.internet.testing (a test fake, with trial and unittest) nor installs
        the global reactor, which an application embedding hmacfs may choose later.
        """
        import subprocess
        import sys

        script = (
            "import sys\n"
            "from hmacfs.config import ConfigError, listen_to_endpoint\n"
            "options = dict(unix_socket=False, socket_mode=0o660, key='ListenPort')\n"
            "listen_to_endpoint('tcp:port=8080:interface=127.0.0.1', **options)\n"
            "try:\n"
            "    listen_to_endpoint('tcp:port=70000', **options)\n"
            "except ConfigError as error:\n"
            "    print('refused' if 'outside 0..65535' in str(error) else error)\n"
            "modules = ('twisted.internet.testing', 'twisted.trial', 'twisted.internet.reactor')\n"
            "print(sorted(m for m in modules if m in sys.modules))\n"
        )
        result = subprocess.run(
            [sys.executable, "-c", script], capture_output=True, text=True, timeout=60
        )
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertEqual(result.stdout.split("\n")[:2], ["refused", "[]"])

    def test_bad_addresses(self) -> None:
        """Out-of-range ports, host names, bare IPv6 and stray paths are errors with a fitting hint."""
        cases = {
            ":65536": "above 65535",
            "[::1]:70000": "above 65535",
            "example.org:80": "IP address",
            "::1:8080": "brackets",
            "/run/hmacfs.sock": "UnixSocket is false",
            "abc": "not a listen address",
            "127.0.0.1": "not a listen address",
            "127.0.0.1:": "not a listen address",
        }
        for value, hint in cases.items():
            error = self.assertRaises(ConfigError, self.listen, value)
            self.assertIn("ListenPort", str(error))
            self.assertIn(repr(value), str(error))
            self.assertIn(hint, str(error))


class DefaultsTests(ConfigTestCase):
    def test_every_default(self) -> None:
        """With only a secret, every key takes its documented default."""
        config, warnings = self.parse()
        expected = {
            "listen": "tcp:port=8080:backlog=511",
            "listen_raw": ":8080",
            "unix_socket": False,
            "socket_mode": 0o660,
            "secret": SECRET.encode(),
            "secret_file": None,
            "store_dir": self.base.resolve() / "data",
            "upload_subdir": "upload",
            "storage_backend": "filesystem",
            "s3_endpoint": "",
            "s3_region": "us-east-1",
            "s3_bucket": "",
            "s3_prefix": "",
            "s3_access_key": "",
            "s3_secret_key": "",
            "s3_secret_key_file": None,
            "s3_addressing_style": "auto",
            "s3_part_size": 8 * 1024**2,
            "s3_redirect_downloads": False,
            "s3_presign_expiry": 300,
            "s3_ca_file": None,
            "log_level": "info",
            "log_file": None,
            "max_retries": 5,
            "retry_delay": 2.0,
            "enable_get_retries": True,
            "block_after_fails": 5,
            "block_duration": 300.0,
            "auto_unban": True,
            "auto_ban_time": 600.0,
            "delete_files": False,
            "delete_files_after_period": 365 * 86400.0,
            "num_cores": os.cpu_count(),
            "reask_secret_enabled": False,
            "reask_secret_interval": 3600.0,
            "metrics_enabled": False,
            "metrics_listen": "tcp:port=9090:backlog=511",
            "checksum_verification": False,
            "retention_policy_enabled": False,
            "max_retention_size": 10 * 1024**3,
            "max_retention_time": 30 * 86400.0,
            "redis_addr": "",
            "redis_password": "",
            "redis_db": 0,
            "resume_ttl": 600.0,
            "read_timeout": 120.0,
            "write_timeout": 120.0,
            "header_timeout": 30.0,
            "max_connections_per_client": 64,
            "buffer_size": 65536,
            "max_upload_size": 0,
            "min_free_bytes": 100 * 1024**2,
            "metadata_xattr": True,
            "trusted_proxies": (
                ipaddress.ip_network("127.0.0.1/32"),
                ipaddress.ip_network("::1/128"),
            ),
            "clock_skew": 30.0,
            "drain_timeout": 30.0,
            "log_access": True,
            "secret_grace_period": 3600.0,
            "retention_interval": 3600.0,
            "deletion_report_file": None,
            "component_jid": "",
            "component_secret": "",
            "component_server": "tcp:host=127.0.0.1:port=5347",
            "public_url": "",
            "upload_access": (),
            "user_quota": 0,
            "slot_expiry": 300.0,
            "health_on_main_port": False,
        }
        self.assertEqual(set(expected), {field.name for field in attrs.fields(Config)})
        for name, value in expected.items():
            self.assertEqual(getattr(config, name), value, name)
        self.assertEqual(warnings, [])

    def test_default_store_created(self) -> None:
        """The default StoreDir, ./data next to the config, is created at load."""
        config, _ = self.parse()
        self.assertTrue(config.store_dir.is_dir())

    def test_known_keys(self) -> None:
        """KNOWN_KEYS lists every current key once, and none of the obsolete ones."""
        self.assertEqual(len(KNOWN_KEYS), len(set(KNOWN_KEYS)))
        self.assertEqual(len(KNOWN_KEYS), 67)
        self.assertEqual(set(KNOWN_KEYS) & set(OBSOLETE_KEYS), set())
        self.assertIn("TrustedProxies", KNOWN_KEYS)

    def test_default_config(self) -> None:
        """default_config uses the given store and secret, the defaults, and applies overrides as given."""
        store = self.base / "store"
        config = default_config(
            store, b"\x00binary-secret\xff", max_upload_size=1024, listen="tcp:0"
        )
        self.assertEqual(config.store_dir, store.resolve())
        self.assertTrue(store.is_dir())
        self.assertEqual(config.secret, b"\x00binary-secret\xff")
        self.assertEqual((config.max_upload_size, config.listen), (1024, "tcp:0"))
        self.assertEqual(config.read_timeout, 120.0)

    def test_default_config_needs_secret(self) -> None:
        """default_config refuses an empty secret, as the loader does."""
        error = self.assertRaises(ConfigError, default_config, self.base, b"")
        self.assertEqual(error.key, "Secret")


# One bad value per key; (value, text that must appear in the message).
BAD_VALUES: dict[str, tuple[object, str]] = {
    "ListenPort": ("example.org:80", "'example.org:80'"),
    "UnixSocket": ("true", "'true'"),
    "SocketMode": ("999", "'999'"),
    "SecretFile": ("missing-secret", "missing-secret"),
    "StoreDir": ("afile/sub", "afile/sub"),
    "UploadSubDir": ("up/../x", "'up/../x'"),
    "LogLevel": ("verbose", "'verbose'"),
    "LogFile": ("nodir/hmacfs.log", "nodir/hmacfs.log"),
    "MaxRetries": (-1, "-1"),
    "RetryDelay": ("soon", "'soon'"),
    "EnableGetRetries": ("yes", "'yes'"),
    "BlockAfterFails": (0, "0"),
    "BlockDuration": ("-5s", "'-5s'"),
    "AutoUnban": (1, "1"),
    "AutoBanTime": ("10 minutes", "'10 minutes'"),
    "DeleteFiles": ("false", "'false'"),
    "DeleteFilesAfterPeriod": ("0s", "'0s'"),
    "NumCores": (0, "0"),
    "ReaskSecretEnabled": ("true", "'true'"),
    "ReaskSecretInterval": ("500ms", "'500ms'"),
    "MetricsEnabled": ("on", "'on'"),
    "MetricsPort": (":99999", "':99999'"),
    "ChecksumVerification": (0, "0"),
    "RetentionPolicyEnabled": ("false", "'false'"),
    "MaxRetentionSize": ("10 parsecs", "'10 parsecs'"),
    "MaxRetentionTime": ("forever", "'forever'"),
    "RedisAddr": ("localhost", "'localhost'"),
    "RedisDB": (16, "16"),
    "ResumeTTL": ("0s", "'0s'"),
    "ReadTimeout": (0, "0"),
    "WriteTimeout": ("0s", "'0s'"),
    "HeaderTimeout": ("-1s", "'-1s'"),
    "MaxConnectionsPerClient": (-1, "-1"),
    "BufferSize": ("1KiB", "'1KiB'"),
    "MaxUploadSize": (-1, "-1"),
    "MinFreeBytes": (1.5, "1.5"),
    "MetadataXattr": ("yes", "'yes'"),
    "TrustedProxies": (["10.0.0.300"], "'10.0.0.300'"),
    "ClockSkew": ("-1", "'-1'"),
    "DrainTimeout": ([30], "[30]"),
    "AccessLog": ("true", "'true'"),
    "SecretGracePeriod": ("a while", "'a while'"),
    "RetentionInterval": ("0s", "'0s'"),
    "DeletionReportFile": ("/nonexistent-dir/x.log", "/nonexistent-dir/x.log"),
    "ComponentJID": ("upload@example.org", "'upload@example.org'"),
    "ComponentServer": ("localhost", "'localhost'"),
    "PublicURL": ("https://upload.example.org/upload/", "'https://upload.example.org/upload/'"),
    "UploadAccess": (["not a jid"], "'not a jid'"),
    "UserQuota": ("lots", "'lots'"),
    "SlotExpiry": ("0s", "'0s'"),
    "HealthOnMainPort": ("yes", "'yes'"),
    "StorageBackend": ("S3-compatible", "'S3-compatible'"),
    "S3Endpoint": ("s3.example.org", "'s3.example.org'"),
    "S3Region": ("us east 1", "'us east 1'"),
    "S3Bucket": ("My_Bucket", "'My_Bucket'"),
    "S3Prefix": ("/uploads", "'/uploads'"),
    "S3AccessKey": ("AKIA/EXAMPLE", "'AKIA/EXAMPLE'"),
    "S3SecretKeyFile": (["secret"], "['secret']"),
    "S3AddressingStyle": ("dns", "'dns'"),
    "S3PartSize": ("4MiB", "'4MiB'"),
    "S3RedirectDownloads": ("true", "'true'"),
    "S3PresignExpiry": ("8d", "'8d'"),
    "S3CAFile": (True, "True"),
}
SENSITIVE_KEYS = ("Secret", "RedisPassword", "ComponentSecret", "S3SecretKey")


class BadValueTests(ConfigTestCase):
    def test_table_covers_every_key(self) -> None:
        """Every key has a bad-value case here (the secrets have their own tests)."""
        self.assertEqual(set(BAD_VALUES) | set(SENSITIVE_KEYS), set(KNOWN_KEYS))

    def test_each_bad_value(self) -> None:
        """Each bad value raises a ConfigError whose message names the key and shows the value."""
        (self.base / "afile").write_text("not a directory")
        for key, (value, shown) in BAD_VALUES.items():
            data: dict[str, object] = {key: value}
            if key == "SecretFile":
                data["Secret"] = ""
            error = self.assertRaises(ConfigError, self.parse, **data)
            self.assertEqual(error.key, key, str(error))
            self.assertTrue(str(error).startswith(f"{key}: "), str(error))
            self.assertIn(shown, str(error))
            self.assertIn("(allowed: ", str(error))

    def test_type_names(self) -> None:
        """A value of the wrong TOML type is refused with the type it has and the one expected."""
        cases = [
            ("MaxRetries", "five", ["is a string", "an integer"]),
            ("UnixSocket", "true", ["is a string", "true or false, without quotes"]),
            ("MinFreeBytes", 1.5, ["is a float"]),
            ("TrustedProxies", "127.0.0.1", ["is a string", "an array"]),
            ("ListenPort", True, ["is a boolean"]),
            ("LogLevel", 3, ["is an integer", "debug"]),
            ("StoreDir", ["a"], ["is an array", "a writable directory"]),
        ]
        for key, value, fragments in cases:
            message = str(self.parse_error(**{key: value}))
            for fragment in fragments:
                self.assertIn(fragment, message, key)

    def test_first_error_wins(self) -> None:
        """With several bad keys, the one earliest in the key table is reported, whatever the file order."""
        error = self.parse_error(MaxRetries=-1, LogLevel="loud")
        self.assertEqual(error.key, "LogLevel")

    def test_table_value(self) -> None:
        """A [section] is refused (keys are flat), without printing its contents."""
        error = self.parse_error(server={"Secret": "nested-" + SECRET})
        self.assertEqual(error.key, "server")
        self.assertIn("is a table", str(error))
        self.assertNotIn(SECRET, str(error))

    def test_bounds_in_message(self) -> None:
        """Range errors say what the range is, in the units an operator writes."""
        self.assertIn("4KiB to 16MiB", str(self.parse_error(BufferSize="32MiB")))
        self.assertIn("0 to 15", str(self.parse_error(RedisDB=-1)))
        self.assertIn("at least 1s", str(self.parse_error(ReaskSecretInterval=0)))
        self.assertIn("greater than 0s", str(self.parse_error(ReadTimeout="0m")))


class KeyValueTests(ConfigTestCase):
    def test_listen_port_integer(self) -> None:
        """ListenPort may be a TOML integer, as in the Go configs; listen_raw keeps what was written."""
        config, _ = self.parse(ListenPort=8443)
        self.assertEqual((config.listen, config.listen_raw), ("tcp:port=8443:backlog=511", "8443"))

    def test_unix_socket(self) -> None:
        """With UnixSocket = true, ListenPort is a socket path (relative to the config) with SocketMode."""
        # A short base: trial's temp directory under a deep checkout (CI clones into
        # /check/...) would exceed the 107-byte sun_path limit, which is a separate test.
        base = short_tempdir(self)
        config, _ = parse_config(
            {"Secret": SECRET, "UnixSocket": True, "ListenPort": "run/hmacfs.sock", "SocketMode": "600"},
            base_dir=base,
        )
        endpoint = endpoint_for(config.listen)
        self.assertEqual((endpoint._address, endpoint._mode), (str(base / "run/hmacfs.sock"), 0o600))

    def test_unix_socket_with_port(self) -> None:
        """UnixSocket = true with a TCP port in ListenPort is an error, not a socket file named ':8080'."""
        error = self.parse_error(UnixSocket=True)
        self.assertEqual(error.key, "ListenPort")
        self.assertIn("UnixSocket = true", str(error))

    def test_unix_socket_path_alias(self) -> None:
        """The Go UnixSocketPath is used as the socket path when ListenPort is a port, with a warning."""
        config, warnings = self.parse(
            UnixSocket=True, ListenPort="8080", UnixSocketPath="/run/h.sock"
        )
        self.assertEqual(endpoint_for(config.listen)._address, "/run/h.sock")
        self.assertEqual(len(warnings), 1)
        self.assertIn("UnixSocketPath", warnings[0])
        self.assertIn("ListenPort", warnings[0])

    def test_unix_socket_path_ignored(self) -> None:
        """UnixSocketPath is ignored, with a warning, when UnixSocket is false or ListenPort is a path."""
        config, warnings = self.parse(UnixSocketPath="/run/h.sock")
        self.assertEqual(config.listen, "tcp:port=8080:backlog=511")
        self.assertIn("'UnixSocketPath' is ignored", warnings[0])
        config, warnings = self.parse(
            UnixSocket=True, ListenPort="/run/a.sock", UnixSocketPath="/run/b.sock"
        )
        self.assertEqual(endpoint_for(config.listen)._address, "/run/a.sock")
        self.assertIn("'UnixSocketPath' is ignored", warnings[0])

    def test_metrics_port(self) -> None:
        """MetricsPort takes the ListenPort forms; a leading '/' or unix: means a UNIX socket."""
        cases = {
            ":9100": "tcp:port=9100:backlog=511",
            "9100": "tcp:port=9100:backlog=511",
            "127.0.0.1:9100": "tcp:port=9100:interface=127.0.0.1:backlog=511",
            "/run/hmacfs/metrics.sock": "unix:/run/hmacfs/metrics.sock:mode=660:lockfile=1:backlog=511",
            "unix:/run/m.sock:mode=600": "unix:/run/m.sock:mode=600",
        }
        for value, description in cases.items():
            config, _ = self.parse(MetricsPort=value)
            self.assertEqual(config.metrics_listen, description)
            endpoint_for(config.metrics_listen)

    def test_socket_mode(self) -> None:
        """SocketMode accepts octal strings and TOML octal integers; a decimal-looking 660 is refused."""
        for value, mode in {
            "600": 0o600,
            "0640": 0o640,
            "0o660": 0o660,
            0o640: 0o640,
            "0": 0,
        }.items():
            config, _ = self.parse(SocketMode=value)
            self.assertEqual(config.socket_mode, mode, value)
        self.assertIn("0o660", str(self.parse_error(SocketMode=660)))
        for value in ["1777", "rw-rw----", "8", True]:
            self.assertEqual(self.parse_error(SocketMode=value).key, "SocketMode")

    def test_store_dir(self) -> None:
        """StoreDir is resolved against the config directory and created with its parents."""
        config, _ = self.parse(StoreDir="srv/files/../uploads")
        self.assertEqual(config.store_dir, self.base.resolve() / "srv" / "uploads")
        self.assertTrue(config.store_dir.is_dir())
        absolute = self.base / "abs"
        config, _ = self.parse(StoreDir=str(absolute))
        self.assertEqual(config.store_dir, absolute.resolve())

    def test_store_dir_is_file(self) -> None:
        """A StoreDir that is a file is refused as not a directory."""
        (self.base / "plain").write_text("")
        self.assertIn("is not a directory", str(self.parse_error(StoreDir="plain")))

    def test_store_dir_not_writable(self) -> None:
        """A StoreDir this user cannot write to is refused at load."""
        if os.geteuid() == 0:
            # Root writes through any mode bits, but not to a read-only filesystem.
            locked = small_filesystem(self, "1m", read_only=True)
        else:
            locked = self.base / "locked"
            locked.mkdir(mode=0o500)
            self.addCleanup(locked.chmod, 0o700)
        self.assertIn("not writable", str(self.parse_error(StoreDir=str(locked))))

    def test_upload_subdir(self) -> None:
        """UploadSubDir loses its slashes at both ends; "" and "/" mean the root."""
        for value, normalized in {
            "upload": "upload",
            "/files/xmpp/": "files/xmpp",
            "": "",
            "/": "",
            "a.b~c_d-e": "a.b~c_d-e",
        }.items():
            config, _ = self.parse(UploadSubDir=value)
            self.assertEqual(config.upload_subdir, normalized)
        for value in ["a//b", "..", "./x", "a b", "caf\u00e9", "a?b", "a%20b"]:
            self.assertEqual(self.parse_error(UploadSubDir=value).key, "UploadSubDir", value)

    def test_log_level(self) -> None:
        """LogLevel is case-insensitive and "warning" is normalised to "warn"."""
        for value, level in {
            "DEBUG": "debug",
            "Info": "info",
            "warn": "warn",
            "warning": "warn",
            "error": "error",
        }.items():
            config, _ = self.parse(LogLevel=value)
            self.assertEqual(config.log_level, level)

    def test_log_file(self) -> None:
        """LogFile "" means stdout; a path is relative to the config; a directory is refused."""
        self.assertIsNone(self.parse(LogFile="")[0].log_file)
        self.assertEqual(self.parse(LogFile="hmacfs.log")[0].log_file, self.base / "hmacfs.log")
        self.assertIn("is a directory", str(self.parse_error(LogFile=str(self.base))))

    def test_num_cores(self) -> None:
        """NumCores is "auto" (all CPUs), an integer or a digit string, at least 1."""
        for value, cores in {"auto": os.cpu_count(), "AUTO": os.cpu_count(), 3: 3, "4": 4}.items():
            self.assertEqual(self.parse(NumCores=value)[0].num_cores, cores)
        for value in [0, -2, "four", "", 2.0]:
            self.assertEqual(self.parse_error(NumCores=value).key, "NumCores")

    def test_redis_addr(self) -> None:
        """RedisAddr accepts host:port, [v6]:port, redis(s):// URLs and unix: paths, kept verbatim."""
        for value in [
            "",
            "localhost:6379",
            "10.0.0.5:6380",
            "[::1]:6379",
            "redis://localhost",
            "redis://:pw@redis.example.org:6379/2",
            "rediss://user:pw@[2001:db8::1]:6380",
            "unix:/run/redis/redis.sock",
        ]:
            self.assertEqual(self.parse(RedisAddr=value)[0].redis_addr, value)
        for value in [
            "localhost",
            ":6379",
            "host:0",
            "host:70000",
            "bad_host!:6379",
            "redis://",
            "redis://host/notadb",
            "redis://host:99999",
            "unix:relative.sock",
            "http://host:80",
        ]:
            self.assertEqual(self.parse_error(RedisAddr=value).key, "RedisAddr", value)

    def test_trusted_proxies(self) -> None:
        """TrustedProxies takes addresses (as /32 or /128) and CIDR networks; [] trusts nobody."""
        config, _ = self.parse(TrustedProxies=["10.0.0.1", "2001:db8::/32", "192.168.0.0/16"])
        self.assertEqual(
            config.trusted_proxies,
            (
                ipaddress.ip_network("10.0.0.1/32"),
                ipaddress.ip_network("2001:db8::/32"),
                ipaddress.ip_network("192.168.0.0/16"),
            ),
        )
        self.assertEqual(self.parse(TrustedProxies=[])[0].trusted_proxies, ())
        self.assertIn("is an integer", str(self.parse_error(TrustedProxies=[1])))

    def test_durations_and_sizes_through_keys(self) -> None:
        """Keys holding durations and sizes accept every form the parsers accept."""
        config, _ = self.parse(
            RetryDelay=5,
            BlockDuration="1h30m",
            DeleteFilesAfterPeriod="8760h",
            MaxRetentionSize="500MB",
            MaxUploadSize="1 GiB",
            BufferSize="1MiB",
        )
        self.assertEqual(
            (config.retry_delay, config.block_duration, config.delete_files_after_period),
            (5.0, 5400.0, 365 * 86400.0),
        )
        self.assertEqual(
            (config.max_retention_size, config.max_upload_size, config.buffer_size),
            (500 * 1000**2, 1024**3, 1024**2),
        )


class SecretTests(ConfigTestCase):
    def write_secret(self, content: bytes, name: str = "secret") -> Path:
        path = self.base / name
        path.write_bytes(content)
        path.chmod(0o600)
        return path

    def assertNoSecret(self, text: str) -> None:
        self.assertNotIn(SECRET, text)
        self.assertNotIn(SECRET[:12], text)

    def test_secret_inline(self) -> None:
        """Secret is used as UTF-8 bytes."""
        config, _ = self.parse(Secret="k\u00e9y-0123456789abcdef")
        self.assertEqual(config.secret, "k\u00e9y-0123456789abcdef".encode())

    def test_secret_required(self) -> None:
        """Without Secret or SecretFile the load fails, telling the operator to set one."""
        error = self.parse_error(Secret="")
        self.assertEqual(error.key, "Secret")
        self.assertIn("set Secret or SecretFile", str(error))

    def test_secret_and_file(self) -> None:
        """Setting both Secret and SecretFile is an error that shows neither secret."""
        path = self.write_secret(b"file-" + SECRET.encode())
        error = self.parse_error(SecretFile=str(path))
        self.assertEqual(error.key, "Secret")
        self.assertIn("SecretFile", str(error))
        self.assertNoSecret(str(error))
        self.assertNoSecret(repr(error.value))

    def test_secret_file(self) -> None:
        """SecretFile is read at load (relative to the config) with one trailing newline removed."""
        cases = {
            SECRET.encode() + b"\n": SECRET.encode(),
            SECRET.encode() + b"\r\n": SECRET.encode(),
            SECRET.encode(): SECRET.encode(),
            SECRET.encode() + b"\n\n": SECRET.encode() + b"\n",
            b" " + SECRET.encode() + b" \n": b" " + SECRET.encode() + b" ",
        }
        for content, secret in cases.items():
            self.write_secret(content)
            config, warnings = self.parse(Secret="", SecretFile="secret")
            self.assertEqual(config.secret, secret)
            self.assertEqual(config.secret_file, self.base / "secret")
            self.assertEqual(warnings, [])

    def test_secret_file_unreadable(self) -> None:
        """A missing or empty SecretFile is an error naming the file, not its content."""
        error = self.parse_error(Secret="", SecretFile="nope")
        self.assertEqual(error.key, "SecretFile")
        self.assertIn(str(self.base / "nope"), str(error))
        self.write_secret(b"\n", "empty")
        self.assertIn("is empty", str(self.parse_error(Secret="", SecretFile="empty")))

    def test_secret_file_world_readable(self) -> None:
        """A SecretFile every user can read is accepted with a warning."""
        path = self.write_secret(SECRET.encode())
        path.chmod(0o644)
        _, warnings = self.parse(Secret="", SecretFile=str(path))
        self.assertEqual(len(warnings), 1)
        self.assertIn("readable by every user", warnings[0])

    def test_short_secret_warns(self) -> None:
        """A secret under 16 bytes loads with a warning that gives its length, not its value."""
        config, warnings = self.parse(Secret="tiny-secret")
        self.assertEqual(config.secret, b"tiny-secret")
        self.assertEqual(len(warnings), 1)
        self.assertIn("11 bytes", warnings[0])
        self.assertNotIn("tiny-secret", warnings[0])
        self.assertEqual(self.parse(Secret="x" * 16)[1], [])

    def test_read_secret_rereads(self) -> None:
        """read_secret picks up a rotated SecretFile; the loaded config keeps the old one."""
        path = self.write_secret(b"first-secret-0123456789\n")
        config, _ = self.parse(Secret="", SecretFile=str(path))
        path.write_bytes(b"second-secret-0123456789\n")
        self.assertEqual(config.read_secret(), b"second-secret-0123456789")
        self.assertEqual(config.secret, b"first-secret-0123456789")
        path.unlink()
        self.assertEqual(self.assertRaises(ConfigError, config.read_secret).key, "SecretFile")

    def test_read_secret_inline(self) -> None:
        """Without SecretFile, read_secret returns the configured secret."""
        config, _ = self.parse()
        self.assertEqual(config.read_secret(), SECRET.encode())

    def test_secret_never_shown(self) -> None:
        """The secret appears in neither repr(config), redacted(), warnings nor errors of the same load."""
        config, warnings = self.parse(Secret=SECRET, UnknownKey=SECRET)
        self.assertNoSecret(repr(config))
        self.assertNoSecret(repr(config.redacted()))
        self.assertNoSecret(repr(warnings))
        self.assertEqual(config.redacted()["Secret"], "<redacted>")
        for bad in ([SECRET], 12345, {"x": SECRET}):
            error = self.parse_error(Secret=bad)
            self.assertEqual(error.key, "Secret")
            self.assertNoSecret(str(error))
            self.assertNotIn("12345", str(error))

    def test_redis_password_never_shown(self) -> None:
        """RedisPassword and a password inside RedisAddr are hidden from repr, redacted() and errors."""
        config, _ = self.parse(RedisPassword=SECRET, RedisAddr=f"redis://user:{SECRET}@host:6379/0")
        self.assertEqual(config.redis_password, SECRET)
        self.assertNoSecret(repr(config))
        self.assertNoSecret(repr(config.redacted()))
        self.assertEqual(config.redacted()["RedisPassword"], "<redacted>")
        self.assertEqual(config.redacted()["RedisAddr"], "redis://user:***@host:6379/0")
        self.assertNoSecret(str(self.parse_error(RedisAddr=f"redis://:{SECRET}@host:99999")))
        self.assertNoSecret(str(self.parse_error(RedisAddr=f"redis://:{SECRET}@h@st/x")))
        self.assertNoSecret(str(self.parse_error(RedisPassword=[SECRET])))


class RedactedTests(ConfigTestCase):
    def test_keys(self) -> None:
        """redacted() has every known key, in table order."""
        config, _ = self.parse()
        self.assertEqual(tuple(config.redacted()), KNOWN_KEYS)

    def test_reloads_to_same_config(self) -> None:
        """redacted() shows effective values in accepted forms: fed back, it gives the same config."""
        config, _ = self.parse(
            ListenPort="[::1]:8443",
            SocketMode="640",
            StoreDir="files",
            MaxUploadSize="1GiB",
            TrustedProxies=["10.0.0.0/8"],
            MetricsPort="/run/m.sock",
        )
        shown = config.redacted()
        again, _ = parse_config({**shown, "Secret": SECRET}, base_dir=self.base)
        self.assertEqual(again, attrs.evolve(config, listen_raw=config.listen))


class WarningTests(ConfigTestCase):
    def test_unknown_key_hint(self) -> None:
        """An unknown key is a warning suggesting the closest known key."""
        _, warnings = self.parse(ListenPot=":8080")
        self.assertEqual(warnings, ["unknown key 'ListenPot' (did you mean 'ListenPort'?)"])

    def test_unknown_key_case(self) -> None:
        """A known key in the wrong case is suggested in the right one."""
        _, warnings = self.parse(storedir="x", REDISDB=1)
        self.assertEqual(
            warnings,
            [
                "unknown key 'storedir' (did you mean 'StoreDir'?)",
                "unknown key 'REDISDB' (did you mean 'RedisDB'?)",
            ],
        )

    def test_unknown_key_no_hint(self) -> None:
        """A key resembling nothing gets no hint, and its value is not used."""
        _, warnings = self.parse(Frobnicate=1)
        self.assertEqual(warnings, ["unknown key 'Frobnicate'"])

    def test_obsolete_keys(self) -> None:
        """Each obsolete Go key is reported by name as ignored, not as unknown."""
        for key in [
            "EnableVersioning",
            "VersioningDirectory",
            "MaxVersions",
            "VersioningStrategy",
            "DeleteFilesReport",
            "DeleteFilesReportPath",
            "LoggingEnabled",
        ]:
            _, warnings = self.parse(**{key: True})
            self.assertEqual(len(warnings), 1, key)
            self.assertTrue(warnings[0].startswith(f"obsolete key {key!r} is ignored"), warnings[0])
        self.assertIn("LogLevel", self.parse(LoggingEnabled=True)[1][0])

    def test_min_free_space_alias(self) -> None:
        """MinFreeSpaceThreshold is honoured as MinFreeBytes, with a warning to rename it."""
        config, warnings = self.parse(MinFreeSpaceThreshold="1GB")
        self.assertEqual(config.min_free_bytes, 1000**3)
        self.assertEqual(len(warnings), 1)
        self.assertIn("MinFreeBytes", warnings[0])

    def test_min_free_space_alias_overridden(self) -> None:
        """When MinFreeBytes is set, MinFreeSpaceThreshold is ignored with a warning."""
        config, warnings = self.parse(MinFreeSpaceThreshold="1GB", MinFreeBytes="5MiB")
        self.assertEqual(config.min_free_bytes, 5 * 1024**2)
        self.assertIn("ignored", warnings[0])

    def test_min_free_space_alias_checked(self) -> None:
        """A bad MinFreeSpaceThreshold is an error naming that key."""
        self.assertEqual(
            self.parse_error(MinFreeSpaceThreshold="lots").key, "MinFreeSpaceThreshold"
        )


class LoadConfigTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.directory = Path(self.mktemp()).absolute()
        self.directory.mkdir()

    def test_load(self) -> None:
        """A real TOML file loads, with relative paths taken from its directory and warnings returned."""
        path = self.directory / "config.toml"
        path.write_text(
            "# hmacfs\n"
            'ListenPort = "127.0.0.1:8080"\n'
            f'Secret = "{SECRET}"\n'
            'StoreDir = "uploads"\n'
            'MaxRetentionTime = "7d"\n'
            "DeleteFiles = true\n"
            'TrustedProxies = ["10.0.0.0/8"]\n'
            "EnableVersoning = false\n"
        )
        config, warnings = load_config(str(path))
        self.assertEqual(config.listen, "tcp:port=8080:interface=127.0.0.1:backlog=511")
        self.assertEqual(config.store_dir, self.directory.resolve() / "uploads")
        self.assertEqual(config.max_retention_time, 7 * 86400.0)
        self.assertTrue(config.delete_files)
        self.assertEqual(
            warnings, ["unknown key 'EnableVersoning' (did you mean 'EnableVersioning'?)"]
        )

    def test_broken_toml(self) -> None:
        """A TOML syntax error is a ConfigError for "<file>" with the position, never the line's text."""
        path = self.directory / "broken.toml"
        path.write_text(f'ListenPort = ":8080"\nSecret = "{SECRET}\n')
        error = self.assertRaises(ConfigError, load_config, path)
        self.assertEqual(error.key, "<file>")
        self.assertEqual(error.source, str(path))
        self.assertIn("line 2", str(error))
        self.assertIn(str(path), str(error))
        self.assertNotIn(SECRET, str(error))

    def test_missing_file(self) -> None:
        """A file that cannot be read is a ConfigError for "<file>"."""
        error = self.assertRaises(ConfigError, load_config, self.directory / "absent.toml")
        self.assertEqual(error.key, "<file>")
        self.assertIn("cannot be read", str(error))

    def test_bad_value_source(self) -> None:
        """A bad value in a file is reported with the file as its source."""
        path = self.directory / "config.toml"
        path.write_text(f'Secret = "{SECRET}"\nRedisDB = 99\n')
        error = self.assertRaises(ConfigError, load_config, path)
        self.assertEqual((error.key, error.source), ("RedisDB", str(path)))


class BacklogTests(SynchronousTestCase):
    def test_translated_listen_forms_use_a_long_backlog(self) -> None:
        """ListenPort forms we translate listen with backlog 511, not Twisted's 50:
        bursts of reconnecting clients must not be reset by the kernel."""
        from hmacfs.config import listen_to_endpoint

        for value, unix in ((":8080", False), ("[::1]:8080", False), ("/run/x.sock", True)):
            description = listen_to_endpoint(value, unix_socket=unix, socket_mode=0o660, key="ListenPort")
            endpoint = serverFromString(MemoryReactor(), description)
            self.assertEqual(endpoint._backlog, 511, description)


class PiecesTests(SynchronousTestCase):
    """The key table, the converters and the address parsers, used on their own."""

    def test_table_fills_every_config_field(self) -> None:
        """Each row fills one Config attribute; only the resolved listen endpoint is derived."""
        import attrs

        from hmacfs.config.keys import KEYS

        attributes = [spec.attr for spec in KEYS]
        self.assertEqual(len(attributes), len(set(attributes)))
        self.assertEqual(set(attributes) | {"listen"}, set(attrs.fields_dict(Config)))
        self.assertEqual(tuple(spec.name for spec in KEYS), KNOWN_KEYS)

    def test_converter_message_names_key_value_and_bounds(self) -> None:
        """A converter factory bakes its bounds into the ConfigError it raises."""
        from hmacfs.config.validators import Context, duration, integer, size

        ctx = Context(base_dir=Path("/"), warnings=[])
        self.assertEqual(integer(1, 3)(2, "X", ctx), 2)
        error = self.assertRaises(ConfigError, integer(1, 3), 5, "X", ctx)
        self.assertEqual(str(error), "X: 5 is out of range (allowed: an integer from 1 to 3)")
        error = self.assertRaises(ConfigError, size(4096), "1K", "B", ctx)
        self.assertEqual(str(error), "B: '1K' is out of range (allowed: a size of at least 4KiB)")
        error = self.assertRaises(ConfigError, duration(1), "0s", "T", ctx)
        self.assertEqual(str(error), "T: '0s' is too short (allowed: a duration of at least 1s)")
        self.assertEqual(ctx.warnings, [])

    def test_split_host_port(self) -> None:
        """The Go address forms, split without resolving anything."""
        from hmacfs.config.endpoints import split_host_port

        self.assertEqual(split_host_port("8080"), ("", "8080"))
        self.assertEqual(split_host_port(":8080"), ("", "8080"))
        self.assertEqual(split_host_port("[::1]:5347"), ("::1", "5347"))
        self.assertEqual(split_host_port("redis.example.org:6379"), ("redis.example.org", "6379"))
        self.assertIsNone(split_host_port("/run/x.sock"))
        self.assertIsNone(split_host_port("::1:8080"))

    def test_mask_password(self) -> None:
        """A Redis URL's password (which may hold '@') is hidden; the rest is kept."""
        from hmacfs.config.addresses import mask_password

        self.assertEqual(mask_password("redis://u:p@ss@h:6379/1"), "redis://u:***@h:6379/1")
        self.assertEqual(mask_password("redis://h:6379"), "redis://h:6379")
        self.assertEqual(mask_password("h:6379"), "h:6379")
