"""
Tests for the storage keys of L{hmacfs.config}: StorageBackend and the S3*
keys, their forms and messages, the rules between them, and that the S3
secret never leaks.
"""

from __future__ import annotations

import ipaddress
import re
import string
from pathlib import Path
from urllib.parse import urlsplit

import attrs
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from hmacfs.config import Config, ConfigError, parse_config
from hmacfs.config.s3 import (
    s3_bucket,
    s3_endpoint,
    s3_prefix,
)
from hmacfs.config.validators import Context

SECRET = "s3cr3t-Value-0123456789abcdef"
S3_SECRET = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"
PROPERTY = settings(derandomize=True, deadline=None, max_examples=300)
PEM = (
    b"-----BEGIN CERTIFICATE-----\nMIIBszCCAVmgAwIBAgIUexample\n-----END CERTIFICATE-----\n"
)

#: The smallest S3 configuration: the backend, a bucket and credentials.
S3 = {
    "StorageBackend": "s3",
    "S3Bucket": "hmacfs-uploads",
    "S3AccessKey": "test:tester",
    "S3SecretKey": S3_SECRET,
    # one process: several need RedisAddr (WorkerLockTests)
    "NumCores": 1,
}


class S3TestCase(SynchronousTestCase):
    def setUp(self) -> None:
        self.base = Path(self.mktemp()).absolute()
        self.base.mkdir(parents=True)
        self.ctx = Context(base_dir=self.base, warnings=[])

    def parse(self, **data: object) -> tuple[Config, list[str]]:
        data.setdefault("Secret", SECRET)
        return parse_config(data, base_dir=self.base)

    def parse_s3(self, **data: object) -> tuple[Config, list[str]]:
        return self.parse(**{**S3, **data})

    def error(self, **data: object) -> ConfigError:
        return self.assertRaises(ConfigError, self.parse, **data)

    def error_s3(self, **data: object) -> ConfigError:
        return self.assertRaises(ConfigError, self.parse_s3, **data)

    def write(self, name: str, content: bytes, mode: int = 0o600) -> Path:
        path = self.base / name
        path.write_bytes(content)
        path.chmod(mode)
        return path

    def assertNoS3Secret(self, text: str) -> None:
        self.assertNotIn(S3_SECRET, text)
        self.assertNotIn(S3_SECRET[:12], text)
        self.assertNotIn(S3_SECRET[-12:], text)


class WorkerLockTests(S3TestCase):
    def test_several_workers_without_redis_warn(self) -> None:
        """Workers on S3 share a writer lock only through Redis: without it, a warning."""
        _, warnings = self.parse_s3(NumCores=2)
        self.assertEqual(len(warnings), 1, warnings)
        self.assertIn("NumCores", warnings[0])
        self.assertIn("RedisAddr", warnings[0])
        _, warnings = self.parse_s3(NumCores=2, RedisAddr="127.0.0.1:6379")
        self.assertEqual(warnings, [])
        _, warnings = self.parse(NumCores=2)  # the filesystem's flock spans workers
        self.assertEqual(warnings, [])


class BackendTests(S3TestCase):
    def test_values(self) -> None:
        """A full S3 configuration gives the attributes the backend reads, normalised."""
        ca = self.write("ca.pem", PEM, 0o644)
        config, warnings = self.parse_s3(
            S3Endpoint="HTTPS://S3.Example.ORG:8443/",
            S3Region="eu-central-1",
            S3Prefix="xmpp/uploads",
            S3AddressingStyle=" Virtual ",
            S3PartSize="16MiB",
            S3RedirectDownloads=True,
            S3PresignExpiry="1h",
            S3CAFile="ca.pem",
        )
        self.assertEqual(warnings, [])
        self.assertEqual(config.storage_backend, "s3")
        self.assertEqual(config.s3_endpoint, "https://s3.example.org:8443")
        self.assertEqual(config.s3_region, "eu-central-1")
        self.assertEqual(config.s3_bucket, "hmacfs-uploads")
        self.assertEqual(config.s3_prefix, "xmpp/uploads/")
        self.assertEqual(config.s3_access_key, "test:tester")
        self.assertEqual(config.s3_secret_key, S3_SECRET)
        self.assertIsNone(config.s3_secret_key_file)
        self.assertEqual(config.s3_addressing_style, "virtual")
        self.assertEqual(config.s3_addressing(), "virtual")
        self.assertEqual(config.s3_part_size, 16 * 1024**2)
        self.assertTrue(config.s3_redirect_downloads)
        self.assertEqual(config.s3_presign_expiry, 3600)
        self.assertIsInstance(config.s3_presign_expiry, int)
        self.assertEqual(config.s3_ca_file, ca)

    def test_backend_names(self) -> None:
        """StorageBackend is "filesystem" or "s3", in any case; anything else names the choices."""
        self.assertEqual(self.parse(StorageBackend=" Filesystem ")[0].storage_backend, "filesystem")
        self.assertEqual(self.parse_s3(StorageBackend="S3")[0].storage_backend, "s3")
        for bad in ("minio", "", "file"):
            error = self.error(StorageBackend=bad)
            self.assertEqual(error.key, "StorageBackend")
            self.assertIn(repr(bad), str(error))
            self.assertIn('"filesystem"', str(error))
            self.assertIn('"s3"', str(error))
        self.assertIn("is an integer", str(self.error(StorageBackend=3)))

    def test_required_with_s3(self) -> None:
        """With "s3", a missing bucket, access key or secret is an error naming that key."""
        for key in ("S3Bucket", "S3AccessKey", "S3SecretKey"):
            error = self.error_s3(**{key: ""})
            self.assertEqual(error.key, key)
            self.assertIn('StorageBackend = "s3"', str(error))
        self.assertIn("S3SecretKeyFile", str(self.error_s3(S3SecretKey="")))

    def test_filesystem_ignores_s3_keys_with_a_warning(self) -> None:
        """With "filesystem", S3 keys set to something else than their default load (their
        forms still checked) with one warning naming them; files they name are not read."""
        config, warnings = self.parse(
            S3Bucket="some-bucket", S3CAFile="missing-ca.pem", S3SecretKeyFile="missing-secret"
        )
        self.assertEqual(config.storage_backend, "filesystem")
        self.assertEqual(
            warnings,
            ['StorageBackend is "filesystem", so these keys are unused: '
             "S3Bucket, S3SecretKeyFile, S3CAFile"],
        )
        self.assertEqual(config.s3_secret_key, "")
        self.assertEqual(self.error(S3Bucket="Bad_Bucket").key, "S3Bucket")

    def test_filesystem_defaults_written_out_warn_nothing(self) -> None:
        """Every S3 key written with its default (as packaging/config.toml does), in any
        accepted form, is no reason for a warning."""
        _, warnings = self.parse(
            StorageBackend="filesystem", S3Endpoint="", S3Region="us-east-1", S3Bucket="",
            S3Prefix="", S3AccessKey="", S3SecretKey="", S3SecretKeyFile="",
            S3AddressingStyle="AUTO", S3PartSize="8 MiB", S3RedirectDownloads=False,
            S3PresignExpiry=300, S3CAFile="",
        )
        self.assertEqual(warnings, [])

    def test_round_trip_through_redacted(self) -> None:
        """redacted() of an S3 config, fed back with the secret, gives the same config."""
        from hmacfs.config.error import REDACTED

        config, _ = self.parse_s3(S3Endpoint="http://127.0.0.1:8080", S3Prefix="a/b", S3PresignExpiry="2h")
        shown = config.redacted()
        self.assertEqual(shown["S3SecretKey"], repr(REDACTED))
        again, _ = parse_config({**shown, "Secret": SECRET, "S3SecretKey": S3_SECRET}, base_dir=self.base)
        self.assertEqual(again, attrs.evolve(config, listen_raw=config.listen))
        self.assertEqual(
            [getattr(again, name) for name in ("s3_endpoint", "s3_prefix", "s3_presign_expiry")],
            ["http://127.0.0.1:8080", "a/b/", 7200],
        )


class SecretKeyTests(S3TestCase):
    def test_file(self) -> None:
        """S3SecretKeyFile is read at load (relative to the config), one trailing newline removed."""
        path = self.write("s3-secret", S3_SECRET.encode() + b"\n")
        config, warnings = self.parse_s3(S3SecretKey="", S3SecretKeyFile="s3-secret")
        self.assertEqual(config.s3_secret_key, S3_SECRET)
        self.assertEqual(config.s3_secret_key_file, path)
        self.assertEqual(warnings, [])

    def test_file_problems_name_the_file_key(self) -> None:
        """A missing, empty, non-UTF-8 or world-readable S3SecretKeyFile is reported under
        S3SecretKeyFile with its path, never its content."""
        error = self.error_s3(S3SecretKey="", S3SecretKeyFile="nope")
        self.assertEqual(error.key, "S3SecretKeyFile")
        self.assertIn(str(self.base / "nope"), str(error))
        self.assertIn("cannot be read", str(error))
        self.write("empty", b"\n")
        self.assertIn("is empty", str(self.error_s3(S3SecretKey="", S3SecretKeyFile="empty")))
        self.write("latin1", b"caf\xe9-" + S3_SECRET.encode())
        error = self.error_s3(S3SecretKey="", S3SecretKeyFile="latin1")
        self.assertEqual(error.key, "S3SecretKeyFile")
        self.assertIn("UTF-8", str(error))
        self.assertNoS3Secret(str(error))
        self.write("open", S3_SECRET.encode(), 0o644)
        _, warnings = self.parse_s3(S3SecretKey="", S3SecretKeyFile="open")
        self.assertEqual(len(warnings), 1)
        self.assertTrue(warnings[0].startswith("S3SecretKeyFile "), warnings[0])
        self.assertIn("readable by every user", warnings[0])
        self.assertNoS3Secret(warnings[0])

    def test_control_characters_refused(self) -> None:
        """A secret with a line break inside (or two at the end of its file) is refused,
        without showing it."""
        self.write("two-lines", S3_SECRET.encode() + b"\n\n")
        error = self.error_s3(S3SecretKey="", S3SecretKeyFile="two-lines")
        self.assertEqual(error.key, "S3SecretKeyFile")
        self.assertIn("control character", str(error))
        self.assertNoS3Secret(str(error))
        error = self.error_s3(S3SecretKey=S3_SECRET + "\t")
        self.assertEqual(error.key, "S3SecretKey")
        self.assertIn("<redacted>", str(error))
        self.assertNoS3Secret(str(error))

    def test_both_set(self) -> None:
        """S3SecretKey and S3SecretKeyFile together are an error that shows neither secret,
        whatever the backend."""
        self.write("s3-secret", b"file-" + S3_SECRET.encode())
        for parse in (self.error, self.error_s3):
            error = parse(S3SecretKey=S3_SECRET, S3SecretKeyFile="s3-secret")
            self.assertEqual(error.key, "S3SecretKey")
            self.assertIn("S3SecretKeyFile", str(error))
            self.assertNoS3Secret(str(error))
            self.assertNoS3Secret(repr(error.value))

    def test_never_shown(self) -> None:
        """The S3 secret, inline or from its file, appears in neither repr(config), redacted(),
        the warnings nor the errors of a load; the access key id (no secret) is shown."""
        for data in ({}, {"S3SecretKey": "", "S3SecretKeyFile": "s3-secret"}):
            self.write("s3-secret", S3_SECRET.encode() + b"\n")
            config, warnings = self.parse_s3(UnknownKey=S3_SECRET, **data)
            self.assertEqual(config.s3_secret_key, S3_SECRET)
            self.assertNoS3Secret(repr(config))
            self.assertNoS3Secret(str(config))
            self.assertNoS3Secret(repr(config.redacted()))
            self.assertNoS3Secret(repr(warnings))
            self.assertIn("test:tester", repr(config.redacted()))
        for bad in ([S3_SECRET], 12345, {"x": S3_SECRET}):
            error = self.error_s3(S3SecretKey=bad)
            self.assertEqual(error.key, "S3SecretKey")
            self.assertNoS3Secret(str(error))
            self.assertNotIn("12345", str(error))

    def test_redacted_forms(self) -> None:
        """redacted() shows "<redacted>" for an inline secret, and "" (beside the path)
        for one read from S3SecretKeyFile, so fed back it loads again."""
        config, _ = self.parse_s3()
        self.assertEqual(config.redacted()["S3SecretKey"], "<redacted>")
        path = self.write("s3-secret", S3_SECRET.encode())
        config, _ = self.parse_s3(S3SecretKey="", S3SecretKeyFile=str(path))
        self.assertEqual(config.redacted()["S3SecretKey"], "")
        self.assertEqual(config.redacted()["S3SecretKeyFile"], str(path))
        self.assertEqual(parse_config({**config.redacted(), "Secret": SECRET}, base_dir=self.base)[0].s3_secret_key, S3_SECRET)
        self.assertEqual(self.parse()[0].redacted()["S3SecretKey"], "")


class EndpointTests(S3TestCase):
    def test_accepted_forms(self) -> None:
        """http(s) URLs with a host name, IPv4 or IPv6 address and optional port, normalised
        to lower-case scheme://host[:port]; "" is AWS."""
        cases = {
            "": "",
            "  ": "",
            "https://s3.example.org": "https://s3.example.org",
            "https://s3.example.org/": "https://s3.example.org",
            "HTTP://LocalHost:8080": "http://localhost:8080",
            "http://127.0.0.1:8080": "http://127.0.0.1:8080",
            "https://[2001:DB8::1]:9000/": "https://[2001:db8::1]:9000",
            "https://s3.eu-central-1.amazonaws.com": "https://s3.eu-central-1.amazonaws.com",
            "https://xn--bcher-kva.example:443": "https://xn--bcher-kva.example:443",
            " https://minio.lan:9000 ": "https://minio.lan:9000",
        }
        for value, endpoint in cases.items():
            self.assertEqual(s3_endpoint(value, "S3Endpoint", self.ctx), endpoint, value)
        self.assertEqual(self.ctx.warnings, [])

    def test_refused_forms(self) -> None:
        """Each refused endpoint names the key, the value and says why."""
        cases = {
            "s3.example.org": "is not an http:// or https:// URL",
            "localhost:9000": "is not an http:// or https:// URL",
            "ftp://s3.example.org": "is not an http:// or https:// URL",
            "https://": "has a host that is not valid",
            "https://s3.example.org/bucket": "has a path",
            "https://s3.example.org/?x=1": "has a query or fragment",
            "https://s3.example.org#top": "has a query or fragment",
            "https://s3.example.org:0": "has a port outside 1..65535",
            "https://s3.example.org:": "has a port outside 1..65535",
            "https://s3.example.org:65536": "has a port or host that is not valid",
            "https://s3.example.org:http": "has a port or host that is not valid",
            "https://s3 .example.org": "has a space or control character",
            "https://s3.exa\tmple.org": "has a space or control character",
            "https://bücher.example": "is not ASCII",
            "https://[::1": "has a port or host that is not valid",
            "https://[::1]x": "has a port or host that is not valid",
            "https://[::1]:80x": "has a port or host that is not valid",
            "https://h]:80": "has a port or host that is not valid",
            "https://[fe80::1%25eth0]": "has an IPv6 address that is not valid",
            "https://10.0.0.300": "has a host that is not valid",
            "https://s3.example.org.": "has a host that is not valid",
            "https://-s3.example.org": "has a host that is not valid",
            "https://s3_1.example.org": "has a host that is not valid",
            "https://user@s3.example.org": "has a user part",
        }
        for value, problem in cases.items():
            error = self.assertRaises(ConfigError, s3_endpoint, value, "S3Endpoint", self.ctx)
            self.assertEqual(error.key, "S3Endpoint")
            self.assertIn(problem, str(error), value)
            self.assertIn("(allowed: the http:// or https:// URL", str(error))
        # "\n" at the end is stripped like other outer spaces: it is then a valid URL.
        self.assertEqual(s3_endpoint("https://s3.example.org\n", "S3Endpoint", self.ctx), "https://s3.example.org")

    def test_password_in_url_never_shown(self) -> None:
        """A URL with user:password is refused without repeating the password."""
        error = self.error_s3(S3Endpoint=f"https://AKIA:{S3_SECRET}@s3.example.org")
        self.assertEqual(error.key, "S3Endpoint")
        self.assertIn("user part", str(error))
        self.assertNoS3Secret(str(error))
        error = self.error_s3(S3Endpoint=f"https://AKIA:{S3_SECRET}@s3.example.org/path")
        self.assertNoS3Secret(str(error))

    def test_plain_http_warns_unless_loopback(self) -> None:
        """http:// to another host loads with a warning (data unencrypted); to loopback it does not."""
        _, warnings = self.parse_s3(S3Endpoint="http://minio.lan:9000")
        self.assertEqual(len(warnings), 1)
        self.assertIn("'http://minio.lan:9000' is not https", warnings[0])
        for loopback in ("http://127.0.0.1:8080", "http://[::1]:8080", "http://localhost:8080"):
            self.assertEqual(self.parse_s3(S3Endpoint=loopback)[1], [], loopback)
        self.assertEqual(self.parse_s3(S3Endpoint="https://s3.example.org")[1], [])
        self.assertEqual(self.parse_s3()[1], [])

    @PROPERTY
    @given(
        scheme=st.sampled_from(["http", "https", "HTTP", "Https"]),
        host=st.one_of(
            st.from_regex(r"[a-z0-9]([a-z0-9-]{0,10}[a-z0-9])?(\.[a-z]([a-z0-9-]{0,8}[a-z0-9])?){0,3}", fullmatch=True),
            st.ip_addresses(v=4).map(str),
            st.ip_addresses(v=6).map(lambda address: f"[{address}]"),
        ),
        port=st.one_of(st.none(), st.integers(1, 65535)),
        slash=st.booleans(),
        upper=st.booleans(),
    )
    def test_valid_urls_normalise(
        self, scheme: str, host: str, port: int | None, slash: bool, upper: bool
    ) -> None:
        """Any http(s) URL of a host name or address and a port is accepted, in normal form
        (lower case, no trailing slash), and the normal form is a fixed point."""
        if host.rpartition(".")[2].isdigit() and not host.startswith("["):
            try:
                ipaddress.IPv4Address(host)
            except ValueError:
                return  # all-digit last label: not a host name (the refusal is tested above)
        text = f"{scheme}://{host.upper() if upper else host}{'' if port is None else f':{port}'}"
        text += "/" if slash else ""
        endpoint = s3_endpoint(text, "S3Endpoint", self.ctx)
        expected_host = host if not host.startswith("[") else f"[{ipaddress.IPv6Address(host[1:-1])}]"
        self.assertEqual(
            endpoint, f"{scheme.lower()}://{expected_host}{'' if port is None else f':{port}'}"
        )
        self.assertEqual(s3_endpoint(endpoint, "S3Endpoint", self.ctx), endpoint)

    @PROPERTY
    @given(
        st.text(alphabet=string.printable + "é[]@:/?#%", max_size=40).map(
            lambda t: t if t[:1] == "h" else "http://" + t
        )
        | st.tuples(
            st.sampled_from(["http://", "https://"]),
            st.sampled_from(["s3.example.org", "127.0.0.1", "[::1]", "[2001:db8::1]", "h"]),
            st.text(alphabet="x]:[09/@%.", max_size=5),
        ).map("".join)
    )
    def test_anything_is_refused_or_normal(self, text: str) -> None:
        """For any text the converter either raises a ConfigError naming S3Endpoint or returns
        an http(s) URL with a host and nothing but an optional port (no path, query,
        fragment or user), which converts to itself and names the host and port written:
        nothing of the input is dropped but a trailing "/"."""
        try:
            endpoint = s3_endpoint(text, "S3Endpoint", self.ctx)
        except ConfigError as error:
            self.assertEqual(error.key, "S3Endpoint")
            return
        if not endpoint:
            self.assertEqual(text.strip(), "")
            return
        parts = urlsplit(endpoint)
        self.assertIn(parts.scheme, ("http", "https"))
        self.assertTrue(parts.hostname)
        self.assertEqual((parts.path, parts.query, parts.fragment, parts.username), ("", "", "", None))
        self.assertIsNot(parts.port, 0)
        self.assertEqual(endpoint, endpoint.lower())
        self.assertEqual(s3_endpoint(endpoint, "S3Endpoint", self.ctx), endpoint)
        written = text.strip().partition("://")[2].removesuffix("/").lower()
        match = re.fullmatch(r"(\[[^\]]*\]|[^:]*)(?::([0-9]+))?", written)
        assert match is not None, (text, endpoint)
        host, port = match.groups()
        if host.startswith("["):
            self.assertEqual(ipaddress.IPv6Address(host[1:-1]), ipaddress.IPv6Address(parts.hostname))
        else:
            self.assertEqual(host, parts.hostname)
        self.assertEqual(None if port is None else int(port), parts.port)


# An independent statement of AWS's bucket naming rules (general purpose buckets), with the
# DNS label rule; written as a character scan so that it shares nothing with the module's regexes.
def bucket_allowed(name: str) -> bool:
    if not 3 <= len(name) <= 63:
        return False
    if any(char not in "abcdefghijklmnopqrstuvwxyz0123456789.-" for char in name):
        return False
    for label in name.split("."):
        if not label or label[0] == "-" or label[-1] == "-":
            return False
    labels = name.split(".")
    if len(labels) == 4 and all(label.isdigit() for label in labels):
        return False
    reserved_start = ("xn--", "sthree-", "amzn-s3-demo-")
    reserved_end = ("-s3alias", "--ol-s3", ".mrap", "--x-s3", "--table-s3")
    return not any(name[: len(p)] == p for p in reserved_start) and not any(
        name[-len(s) :] == s for s in reserved_end
    )


class BucketTests(S3TestCase):
    def test_accepted(self) -> None:
        """Names AWS, Swift's s3api and MinIO all accept."""
        for name in ("abc", "hmacfs-uploads", "my.bucket.name", "a" * 63, "0-9", "123", "1.2.3"):
            self.assertEqual(s3_bucket(name, "S3Bucket", self.ctx), name)
        self.assertEqual(s3_bucket("", "S3Bucket", self.ctx), "")

    def test_refused(self) -> None:
        """Each rule's refusal names the key, the value and the rule broken."""
        cases = {
            "ab": "is 2 characters long",
            "a" * 64: "is 64 characters long",
            "My-Bucket": "has upper-case letters",
            "my_bucket": "has a character other than",
            "my bucket": "has a character other than",
            "-bucket": "has a label that is empty or begins or ends with '-'",
            "bucket-": "has a label",
            "my..bucket": "has a label",
            "my.-bucket": "has a label",
            "my-.bucket": "has a label",
            ".bucket": "has a label",
            "192.168.5.4": "is formatted as an IP address",
            "xn--bucket": "reserved prefix 'xn--'",
            "sthree-bucket": "reserved prefix 'sthree-'",
            "amzn-s3-demo-bucket": "reserved prefix 'amzn-s3-demo-'",
            "bucket-s3alias": "reserved suffix '-s3alias'",
            "bucket--ol-s3": "reserved suffix '--ol-s3'",
            "bucket.mrap": "reserved suffix '.mrap'",
            "bucket--x-s3": "reserved suffix '--x-s3'",
            "bucket--table-s3": "reserved suffix '--table-s3'",
        }
        for name, problem in cases.items():
            error = self.assertRaises(ConfigError, s3_bucket, name, "S3Bucket", self.ctx)
            self.assertEqual(error.key, "S3Bucket")
            self.assertIn(repr(name), str(error))
            self.assertIn(problem, str(error), name)
            self.assertIn("(allowed: an S3 bucket name: 3 to 63", str(error))

    @PROPERTY
    @given(st.text(alphabet="abcxyz019.-_A", min_size=0, max_size=70))
    def test_matches_the_rules(self, name: str) -> None:
        """A name is accepted exactly when the rules, stated independently, allow it."""
        if not name.strip():
            return  # "" means unset
        try:
            s3_bucket(name, "S3Bucket", self.ctx)
        except ConfigError as error:
            self.assertEqual(error.key, "S3Bucket")
            self.assertFalse(bucket_allowed(name), name)
        else:
            self.assertTrue(bucket_allowed(name), name)

    @PROPERTY
    @given(
        st.lists(st.from_regex(r"[a-z0-9]([a-z0-9-]{0,8}[a-z0-9])?", fullmatch=True), min_size=1, max_size=5)
        .map(".".join)
        .filter(lambda name: 3 <= len(name) <= 63 and bucket_allowed(name))
    )
    def test_rule_abiding_names_accepted(self, name: str) -> None:
        """Dot-joined DNS labels of the right total length are accepted unchanged."""
        self.assertEqual(s3_bucket(name, "S3Bucket", self.ctx), name)


class PrefixTests(S3TestCase):
    def test_forms(self) -> None:
        """A prefix is normalised to end with "/"; "" is the bucket's root."""
        cases = {
            "": "",
            "hmacfs": "hmacfs/",
            "hmacfs/": "hmacfs/",
            "xmpp/uploads": "xmpp/uploads/",
            "a b/c~d.e": "a b/c~d.e/",
            "ünïcode/": "ünïcode/",
            "...": ".../",
        }
        for value, prefix in cases.items():
            self.assertEqual(s3_prefix(value, "S3Prefix", self.ctx), prefix, value)

    def test_refused(self) -> None:
        cases = {
            "/uploads": "begins with '/'",
            "/": "begins with '/'",
            "a//b": "has a bad segment ''",
            "a/../b": "has a bad segment '..'",
            "..": "has a bad segment '..'",
            "./a": "has a bad segment '.'",
            "a\nb": "has a control character",
            "a\x00": "has a control character",
            "a\x7f": "has a control character",
            "a\x85": "has a control character",
            "a" * 256: "is too long",
            "é" * 128: "is too long",
        }
        for value, problem in cases.items():
            error = self.assertRaises(ConfigError, s3_prefix, value, "S3Prefix", self.ctx)
            self.assertEqual(error.key, "S3Prefix")
            self.assertIn(repr(value), str(error))
            self.assertIn(problem, str(error), value)
        self.assertEqual(s3_prefix("a" * 255, "S3Prefix", self.ctx), "a" * 255 + "/")

    @PROPERTY
    @given(st.text(alphabet=st.characters(codec="utf-8", exclude_categories=["Cs"]), max_size=40)
           | st.text(alphabet="ab./\n\x7f ", max_size=20))
    def test_anything_is_refused_or_a_folder(self, text: str) -> None:
        """For any text the converter refuses with S3Prefix or returns text (+ "/") that begins
        with no "/", has no empty, "." or ".." segment and no control character, and is its own
        normal form."""
        try:
            prefix = s3_prefix(text, "S3Prefix", self.ctx)
        except ConfigError as error:
            self.assertEqual(error.key, "S3Prefix")
            return
        if not text:
            self.assertEqual(prefix, "")
            return
        self.assertIn(prefix, (text, text + "/"))
        self.assertTrue(prefix.endswith("/"))
        self.assertFalse(prefix.startswith("/"))
        self.assertFalse({"", ".", ".."} & set(prefix[:-1].split("/")))
        self.assertFalse(any(char < " " or "\x7f" <= char <= "\x9f" for char in prefix))
        self.assertLessEqual(len(prefix.encode()), 256)
        self.assertEqual(s3_prefix(prefix, "S3Prefix", self.ctx), prefix)


class OtherKeyTests(S3TestCase):
    def test_region(self) -> None:
        """S3Region: a non-empty name that fits SigV4's credential scope."""
        for region in ("us-east-1", "eu-central-1", "garage", "RegionOne", "my_region.2"):
            self.assertEqual(self.parse(S3Region=region)[0].s3_region, region)
        for bad, problem in (("", "is empty"), ("us/east", "is not a region"), ("a b", "is not a region"),
                             ("-x", "is not a region"), ("r" * 65, "is not a region")):
            error = self.error(S3Region=bad)
            self.assertEqual(error.key, "S3Region")
            self.assertIn(problem, str(error))

    def test_access_key(self) -> None:
        """S3AccessKey: printable ASCII without "/" or ","; AWS's and Swift's forms pass."""
        for key in ("AKIAIOSFODNN7EXAMPLE", "test:tester", "admin"):
            self.assertEqual(self.parse(S3AccessKey=key)[0].s3_access_key, key)
        for bad in ("AKIA/X", "a,b", "a b", "ключ", "a\x00"):
            error = self.error(S3AccessKey=bad)
            self.assertEqual(error.key, "S3AccessKey")
            self.assertIn(repr(bad), str(error))

    def test_part_size_bounds(self) -> None:
        """S3PartSize: from 5 MiB (S3's smallest part) to 5 GiB (its largest)."""
        self.assertEqual(self.parse(S3PartSize="5MiB")[0].s3_part_size, 5 * 1024**2)
        self.assertEqual(self.parse(S3PartSize="5GiB")[0].s3_part_size, 5 * 1024**3)
        for bad in ("5MB", 5 * 1024**2 - 1, "6GiB"):
            error = self.error(S3PartSize=bad)
            self.assertEqual(error.key, "S3PartSize")
            self.assertIn("a size from 5MiB to 5GiB", str(error))

    def test_part_size_against_max_upload(self) -> None:
        """With "s3", MaxUploadSize must fit in 10,000 parts and in S3's 5 TiB object; the
        error says what part size would do."""
        self.assertEqual(self.parse_s3(MaxUploadSize="78GiB")[0].max_upload_size, 78 * 1024**3)
        error = self.error_s3(MaxUploadSize="100GiB")
        self.assertEqual(error.key, "S3PartSize")
        self.assertIn("'8MiB'", str(error))
        self.assertIn("at least 11MiB", str(error))
        self.assertIn("10,000 parts", str(error))
        self.parse_s3(MaxUploadSize="100GiB", S3PartSize="11MiB")
        error = self.error_s3(MaxUploadSize="6TiB", S3PartSize="1GiB")
        self.assertEqual(error.key, "MaxUploadSize")
        self.assertIn("5TiB", str(error))
        # The filesystem backend has neither limit.
        self.assertEqual(self.parse(MaxUploadSize="6TiB")[0].max_upload_size, 6 * 1024**4)

    def test_presign_expiry(self) -> None:
        """S3PresignExpiry: whole seconds from 1 s to 7 days, SigV4's limit."""
        for value, seconds in (("5m", 300), ("7d", 604800), (1, 1), ("1h30m", 5400), (604800, 604800)):
            self.assertEqual(self.parse(S3PresignExpiry=value)[0].s3_presign_expiry, seconds, value)
        for bad, problem in (("7d1s", "is too long"), ("0s", "is too short"), ("500ms", "is not a whole"),
                             ("1.5s", "is not a whole"), ("soon", "is not a duration")):
            error = self.error(S3PresignExpiry=bad)
            self.assertEqual(error.key, "S3PresignExpiry")
            self.assertIn(problem, str(error))

    def test_addressing_style(self) -> None:
        """S3AddressingStyle: auto, path or virtual; "auto" is virtual on AWS for a bucket
        without dots and path on any other endpoint."""
        cases = [
            ({}, "virtual"),
            ({"S3Bucket": "with.dots"}, "path"),
            ({"S3Endpoint": "https://s3.example.org"}, "path"),
            ({"S3Endpoint": "http://127.0.0.1:8080"}, "path"),
            ({"S3AddressingStyle": "path"}, "path"),
            ({"S3AddressingStyle": "virtual", "S3Endpoint": "https://s3.example.org"}, "virtual"),
            ({"S3AddressingStyle": "virtual", "S3Endpoint": "http://s3.lan", "S3Bucket": "a.b"}, "virtual"),
        ]
        for data, addressing in cases:
            config, _ = self.parse_s3(**data)
            self.assertEqual(config.s3_addressing(), addressing, data)
        error = self.error(S3AddressingStyle="dns")
        self.assertEqual(error.key, "S3AddressingStyle")
        self.assertIn('"auto"', str(error))

    def test_virtual_needs_a_host_name_and_no_dots_over_https(self) -> None:
        """"virtual" with an IP endpoint, or with a dotted bucket over https, is an error
        (BUCKET.1.2.3.4 is no host; BUCKET.HOST does not match a wildcard certificate)."""
        error = self.error_s3(S3AddressingStyle="virtual", S3Endpoint="http://127.0.0.1:8080")
        self.assertEqual(error.key, "S3AddressingStyle")
        self.assertIn("IP address", str(error))
        for endpoint in ("", "https://s3.example.org"):
            error = self.error_s3(S3AddressingStyle="virtual", S3Endpoint=endpoint, S3Bucket="a.b.c")
            self.assertEqual(error.key, "S3AddressingStyle")
            self.assertIn("'a.b.c'", str(error))
            self.assertIn("wildcard certificate", str(error))

    def test_ca_file(self) -> None:
        """S3CAFile (with "s3" over https): a readable PEM file, else an error naming it;
        over plain http it is unused and said so."""
        self.write("ca.pem", PEM, 0o644)
        self.assertEqual(self.parse_s3(S3CAFile="ca.pem")[0].s3_ca_file, self.base / "ca.pem")
        (self.base / "dir").mkdir()
        self.write("ca.der", b"\x30\x82\x01\x00" * 10)
        for name, problem in (("missing.pem", "cannot be read"), ("dir", "is a directory"),
                              ("ca.der", "holds no PEM certificate")):
            error = self.error_s3(S3CAFile=name, S3Endpoint="https://s3.example.org")
            self.assertEqual(error.key, "S3CAFile")
            self.assertIn(str(self.base / name), str(error))
            self.assertIn(problem, str(error))
        config, warnings = self.parse_s3(S3CAFile="missing.pem", S3Endpoint="http://127.0.0.1:1")
        self.assertEqual(warnings, ["S3CAFile is unused: S3Endpoint 'http://127.0.0.1:1' is not https"])


class ReloadTests(SynchronousTestCase):
    def test_storage_keys_are_restart_only(self) -> None:
        """No storage key is applied by SIGHUP: a changed one is named as needing a restart,
        the secret by its key name only."""
        from hmacfs.config.keys import KEYS
        from hmacfs.service.reload import APPLIED_ON_RELOAD, RESTART_ONLY, restart_needed

        storage = {spec.name for spec in KEYS if spec.name.startswith(("S3", "StorageBackend"))}
        self.assertEqual(len(storage), 13)
        self.assertEqual(storage & APPLIED_ON_RELOAD, set())
        self.assertLessEqual(storage, set(RESTART_ONLY))
        base = Path(self.mktemp()).absolute()
        base.mkdir()
        running, _ = parse_config({"Secret": SECRET, **S3}, base_dir=base)
        loaded, _ = parse_config({"Secret": SECRET, **S3, "S3SecretKey": "rotated-" + S3_SECRET,
                                  "S3Prefix": "p"}, base_dir=base)
        self.assertEqual(restart_needed(running, loaded), ["S3Prefix", "S3SecretKey"])
