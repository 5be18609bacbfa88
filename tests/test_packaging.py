"""
The files in packaging/: the example config loads and documents every key, the
nginx site passes ``nginx -t``, the systemd units pass ``systemd-analyze
verify``, the logrotate file passes ``logrotate -d``, and the files agree with
each other.  The helpers that render them for a test machine live here too;
tests/test_nginx.py (slow) runs the rendered files for real.
"""

from __future__ import annotations

import datetime
import io
import ipaddress
import os
import re
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Mapping
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

from twisted.trial.unittest import SkipTest, SynchronousTestCase

from hmacfs.config import KNOWN_KEYS, load_config, parse_duration, parse_size
from hmacfs.config.keys import KEYS
from hmacfs.service.cli import main as cli_main
from hmacfs.testing import in_ci, short_tempdir

ROOT = Path(__file__).resolve().parent.parent
PACKAGING = ROOT / "packaging"
VENV_BIN = Path(sys.executable).parent

#: The machine paths of the packaged deployment, as written in packaging/.
SOCKET_PATH = "/run/hmacfs/hmacfs.sock"
STORE_DIR = "/var/lib/hmacfs"
LOG_FILE = "/var/log/hmacfs/hmacfs.log"
SECRET_FILE = "/etc/hmac-file-server/secret"
CONFIG_FILE = "/etc/hmac-file-server/config.toml"
TWISTD_DIR = "/opt/hmacfs/venv/bin/"

#: Keys whose packaged value is the deployment's, not the built-in default.
DEPLOYMENT_KEYS = {
    "ListenPort", "UnixSocket", "SecretFile", "StoreDir", "MaxUploadSize", "LogFile", "MetricsPort",
}

_MARKER = re.compile(
    r"^(?P<indent>[ \t]*)(?P<line>.*?)[ \t]*# \[test: (?P<name>[a-z_0-9]+)\][ \t]*$"
)


def find_program(name: str, *, required_in_ci: bool = True) -> str:
    """
    The path of a system program; a skip when it is missing, a failure in CI
    (scripts/install-system-deps.sh installs it there).
    """
    path = shutil.which(name) or next(
        (str(p) for p in (Path("/usr/sbin") / name, Path("/sbin") / name) if p.exists()), None
    )
    if path is None:
        if in_ci() and required_in_ci:
            raise AssertionError(f"{name} is required in CI (scripts/install-system-deps.sh)")
        raise SkipTest(f"{name} is not installed")
    return path


def render_marked(text: str, values: Mapping[str, str]) -> str:
    """
    Rewrite the lines of a shipped file that end in ``# [test: NAME]``.

    Each such line becomes ``values[NAME]`` (same indentation; "" drops the
    line).  Every marked name needs a value and every value a marked line, so
    a changed shipped file cannot silently run untested.
    """
    out, seen = [], set()
    for line in text.splitlines():
        match = _MARKER.match(line)
        if match is None:
            out.append(line)
            continue
        name = match.group("name")
        if name not in values:
            raise AssertionError(f"no test value for the marked line {line.strip()!r}")
        seen.add(name)
        if values[name]:
            out.append(match.group("indent") + values[name])
    unused = set(values) - seen
    if unused:
        raise AssertionError(f"no marked line for {sorted(unused)}")
    return "\n".join(out) + "\n"


def replace_literals(text: str, replacements: Mapping[str, str]) -> str:
    """Replace literal strings of a shipped file, each of which must occur."""
    for old, new in replacements.items():
        if old not in text:
            raise AssertionError(f"{old!r} is no longer in the shipped file")
        text = text.replace(old, new)
    return text


def make_certificate(directory: Path, host: str = "upload.example.org") -> tuple[Path, Path]:
    """A throwaway self-signed certificate for ``host`` and 127.0.0.1 (EC P-256, one day)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName(host), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    key_path.chmod(0o600)
    return cert_path, key_path


def render_nginx(
    prefix: Path, *, socket_path: Path, port: int, http_port: int, cert: Path, key: Path
) -> Path:
    """
    packaging/nginx/hmacfs.conf for this machine, inside a minimal nginx.conf
    of its own (loopback ports, temp dirs under ``prefix``); returns nginx.conf.
    """
    prefix.mkdir(parents=True, exist_ok=True)
    site = render_marked(
        (PACKAGING / "nginx" / "hmacfs.conf").read_text(),
        {
            "upstream": f"server unix:{socket_path};",
            "listen_http": f"listen 127.0.0.1:{http_port};",
            "listen_http6": "",
            "listen": f"listen 127.0.0.1:{port} ssl http2;",
            "listen6": "",
            "certificate": f"ssl_certificate {cert};",
            "certificate_key": f"ssl_certificate_key {key};",
            "access_log": f"access_log {prefix / 'access.log'};",
            "error_log": f"error_log {prefix / 'error.log'} info;",
        },
    )
    (prefix / "hmacfs.conf").write_text(site)
    for name in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"):
        (prefix / name).mkdir(exist_ok=True)
    user_line = "user root root;\n" if os.geteuid() == 0 else ""
    main_conf = prefix / "nginx.conf"
    main_conf.write_text(
        f"# Rendered by tests/test_packaging.py around packaging/nginx/hmacfs.conf.\n"
        f"{user_line}daemon off;\nworker_processes 1;\npid {prefix / 'nginx.pid'};\n"
        f"error_log {prefix / 'error.log'} info;\n"
        "events { worker_connections 256; }\n"
        "http {\n"
        "    default_type application/octet-stream;\n"
        f"    client_body_temp_path {prefix / 'client_body'};\n"
        f"    proxy_temp_path {prefix / 'proxy'};\n"
        f"    fastcgi_temp_path {prefix / 'fastcgi'};\n"
        f"    uwsgi_temp_path {prefix / 'uwsgi'};\n"
        f"    scgi_temp_path {prefix / 'scgi'};\n"
        f"    include {prefix / 'hmacfs.conf'};\n"
        "}\n"
    )
    return main_conf


def render_config(directory: Path, **paths: Path) -> Path:
    """
    packaging/config.toml with its machine paths moved under ``directory``
    (and a secret file made there); returns the rendered file.
    """
    directory.mkdir(parents=True, exist_ok=True)
    run, log_dir, etc = directory / "run", directory / "log", directory / "etc"
    for path in (run, log_dir, etc):
        path.mkdir(exist_ok=True)
    secret = etc / "secret"
    secret.write_text("packaging-test-secret-0123456789abcdef\n")
    secret.chmod(0o640)
    text = replace_literals(
        (PACKAGING / "config.toml").read_text(),
        {
            SOCKET_PATH: str(paths.get("socket", run / "hmacfs.sock")),
            STORE_DIR: str(paths.get("store", directory / "store")),
            LOG_FILE: str(paths.get("log", log_dir / "hmacfs.log")),
            SECRET_FILE: str(secret),
        },
    )
    target = directory / "config.toml"
    target.write_text(text)
    return target


def unit_entries(path: Path) -> dict[str, dict[str, list[str]]]:
    """A systemd unit as {section: {key: [values in order]}} (keys may repeat)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] | None = None
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        assert current is not None, f"{path}: {raw!r} outside a section"
        key, _, value = line.partition("=")
        current.setdefault(key, []).append(value)
    return sections


def _config_lines() -> list[str]:
    return (PACKAGING / "config.toml").read_text().splitlines()


class ConfigTomlTests(SynchronousTestCase):
    """packaging/config.toml: a complete, documented, loadable configuration."""

    def test_every_key_once(self) -> None:
        """Every key hmacfs knows is set exactly once, and nothing else is."""
        assigned = [
            line.split("=", 1)[0].strip()
            for line in _config_lines()
            if line and not line.startswith("#") and "=" in line
        ]
        self.assertEqual(sorted(set(KNOWN_KEYS) - set(assigned)), [], "keys missing from the file")
        self.assertEqual(sorted(set(assigned) - set(KNOWN_KEYS)), [], "keys hmacfs does not know")
        self.assertEqual(len(assigned), len(set(assigned)), "a key is set twice")

    def test_defaults_documented(self) -> None:
        """
        The comment line above each key ends in "(default: X)" with X the
        built-in default, and says something before it.
        """
        lines = _config_lines()
        defaults = {spec.name: spec.default for spec in KEYS}
        for number, line in enumerate(lines):
            if not line or line.startswith("#"):
                continue
            key = line.split("=", 1)[0].strip()
            comment = lines[number - 1]
            match = re.fullmatch(r"# (?P<text>.+) \(default: (?P<default>.+)\)", comment)
            self.assertIsNotNone(match, f"{key}: the line above must be '# ... (default: X)'")
            assert match is not None
            self.assertGreater(len(match.group("text")), 5, key)
            documented = tomllib.loads(f"x = {match.group('default')}")["x"]
            self.assertEqual(documented, defaults[key], key)

    def test_only_deployment_keys_differ(self) -> None:
        """Values other than the deployment's own (socket, paths, size limit) are the defaults."""
        data = tomllib.loads((PACKAGING / "config.toml").read_text())
        differing = {
            spec.name for spec in KEYS if spec.name in data and data[spec.name] != spec.default
        }
        self.assertEqual(differing, DEPLOYMENT_KEYS)

    def test_loads_without_warnings(self) -> None:
        """With its paths moved to a temp dir, the file loads cleanly as a UNIX-socket server."""
        directory = short_tempdir(self)
        path = render_config(directory)
        config, warnings = load_config(path)
        self.assertEqual(warnings, [])
        self.assertTrue(config.unix_socket)
        self.assertTrue(config.listen.startswith(f"unix:{directory / 'run' / 'hmacfs.sock'}:"))
        self.assertIn(":mode=660", config.listen)
        self.assertEqual(config.store_dir, directory / "store")
        self.assertEqual(config.log_file, directory / "log" / "hmacfs.log")
        self.assertEqual(config.secret, b"packaging-test-secret-0123456789abcdef")
        self.assertEqual(config.max_upload_size, 1024**3)

    def test_check_config_command(self) -> None:
        """`hmacfs check-config` accepts the rendered file (exit 0) and never prints the secret."""
        path = render_config(short_tempdir(self))
        out, err = io.StringIO(), io.StringIO()
        with redirect_stdout(out), redirect_stderr(err):
            code = cli_main(["check-config", str(path)])
        self.assertEqual((code, err.getvalue()), (0, ""))
        self.assertIn('"UnixSocket": true', out.getvalue())
        self.assertNotIn("packaging-test-secret", out.getvalue())

    def test_check_config_refuses_missing_secret_file(self) -> None:
        """Copied without creating the secret file, the config is refused, naming SecretFile."""
        directory = short_tempdir(self)
        path = render_config(directory)
        (directory / "etc" / "secret").unlink()
        out, err = io.StringIO(), io.StringIO()
        with redirect_stdout(out), redirect_stderr(err):
            code = cli_main(["check-config", str(path)])
        self.assertEqual(code, 1)
        self.assertIn("SecretFile", err.getvalue())


B2_EXAMPLE = ROOT / "examples" / "s3-backblaze-b2.toml"
S3_SECRET_FILE = "/etc/hmac-file-server/s3-secret"


class S3ExampleTests(SynchronousTestCase):
    """examples/s3-backblaze-b2.toml: a valid S3 configuration for a real provider (no network)."""

    def render(self, directory: Path) -> Path:
        """The example with its machine paths moved under ``directory``, secret files made."""
        for sub in ("run", "log", "etc"):
            (directory / sub).mkdir()
        secret, s3_secret = directory / "etc" / "secret", directory / "etc" / "s3-secret"
        secret.write_text("example-test-secret-0123456789abcdef\n")
        s3_secret.write_text("K003exampleApplicationKey0123456789\n")
        for path in (secret, s3_secret):
            path.chmod(0o640)
        text = replace_literals(
            B2_EXAMPLE.read_text(),
            {
                SOCKET_PATH: str(directory / "run" / "hmacfs.sock"),
                STORE_DIR: str(directory / "store"),
                LOG_FILE: str(directory / "log" / "hmacfs.log"),
                S3_SECRET_FILE: str(s3_secret),
                SECRET_FILE: str(secret),
            },
        )
        target = directory / "config.toml"
        target.write_text(text)
        return target

    def test_loads_as_s3_on_b2(self) -> None:
        """
        The real loader accepts it without a warning: the S3 backend on B2's endpoint for
        its region, path style, the prefix, the key read from S3SecretKeyFile.
        """
        config, warnings = load_config(self.render(short_tempdir(self)))
        self.assertEqual(warnings, [])
        self.assertEqual(config.storage_backend, "s3")
        self.assertEqual(config.s3_endpoint, "https://s3.eu-central-003.backblazeb2.com")
        self.assertEqual(config.s3_region, "eu-central-003")
        self.assertEqual(
            config.s3_endpoint, f"https://s3.{config.s3_region}.backblazeb2.com",
            "B2's endpoint names the bucket's region",
        )
        self.assertEqual(config.s3_bucket, "example-xmpp-uploads")
        self.assertEqual(config.s3_prefix, "xmpp-uploads/")
        self.assertEqual(config.s3_addressing(), "path")
        self.assertEqual(config.s3_access_key, "003a1b2c3d4e5f60000000001")
        self.assertEqual(config.s3_secret_key, "K003exampleApplicationKey0123456789")

    def test_only_known_keys(self) -> None:
        """Every key the example sets is one hmacfs knows (a typo would only warn at start)."""
        data = tomllib.loads(B2_EXAMPLE.read_text())
        self.assertEqual(sorted(set(data) - set(KNOWN_KEYS)), [])

    def test_check_config_never_prints_the_key(self) -> None:
        """`hmacfs check-config` accepts it (exit 0) and shows the key file's path, not the key."""
        path = self.render(short_tempdir(self))
        out, err = io.StringIO(), io.StringIO()
        with redirect_stdout(out), redirect_stderr(err):
            code = cli_main(["check-config", str(path)])
        self.assertEqual((code, err.getvalue()), (0, ""))
        self.assertIn('"StorageBackend": "s3"', out.getvalue())
        self.assertNotIn("K003exampleApplicationKey", out.getvalue())


class ConsistencyTests(SynchronousTestCase):
    """The packaged files describe one deployment: paths and limits agree."""

    def setUp(self) -> None:
        self.config = tomllib.loads((PACKAGING / "config.toml").read_text())
        self.nginx = (PACKAGING / "nginx" / "hmacfs.conf").read_text()

    def test_nginx_matches_config(self) -> None:
        """nginx proxies UploadSubDir to the ListenPort socket and allows MaxUploadSize."""
        self.assertIn(f"server unix:{self.config['ListenPort']};", self.nginx)
        self.assertIn(f"location /{self.config['UploadSubDir']}/ {{", self.nginx)
        limit = re.search(r"^\s*client_max_body_size (\d+)([kmg]?);", self.nginx, re.M)
        assert limit is not None
        unit = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3}[limit.group(2)]
        nginx_bytes = int(limit.group(1)) * unit
        self.assertGreaterEqual(nginx_bytes, parse_size(self.config["MaxUploadSize"], key="x"))

    def test_nginx_streams(self) -> None:
        """The directives that make nginx stream and pass the client address are all there."""
        for directive in (
            "proxy_request_buffering off;", "proxy_buffering off;", "proxy_http_version 1.1;",
            "proxy_read_timeout 1h;", "proxy_send_timeout 1h;", "gzip off;",
            "proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;",
            "proxy_set_header X-Real-IP $remote_addr;",
            "proxy_set_header X-Forwarded-Proto $scheme;",
        ):
            self.assertIn(directive, self.nginx)
        self.assertNotIn("proxy_intercept_errors on", self.nginx)

    def test_systemd_matches_config(self) -> None:
        """The service may write StoreDir and LogFile's directory; the socket unit is ListenPort."""
        service = unit_entries(PACKAGING / "systemd" / "hmacfs.service")["Service"]
        writable = " ".join(service["ReadWritePaths"]).split()
        self.assertIn(self.config["StoreDir"], writable)
        self.assertIn(str(Path(self.config["LogFile"]).parent), writable)
        self.assertIn(f"--config {CONFIG_FILE}", service["ExecStart"][0])
        socket_unit = unit_entries(PACKAGING / "systemd" / "hmacfs.socket")["Socket"]
        self.assertEqual(socket_unit["ListenStream"], [self.config["ListenPort"]])
        self.assertEqual(socket_unit["SocketMode"], ["0" + self.config["SocketMode"]])

    def test_service_settings(self) -> None:
        """The service runs twistd unprivileged and hardened; on-failure restarts; reload = HUP."""
        service = unit_entries(PACKAGING / "systemd" / "hmacfs.service")["Service"]
        self.assertEqual(
            service["ExecStart"],
            [f"{TWISTD_DIR}twistd --nodaemon --pidfile= hmacfs --config {CONFIG_FILE}"],
        )
        self.assertNotIn(service["User"][0], ("", "root", "0"))
        self.assertEqual(service["ExecReload"], ["/bin/kill -HUP $MAINPID"])
        expected = {
            "Restart": "on-failure", "LimitNOFILE": "65535", "NoNewPrivileges": "true",
            "ProtectSystem": "strict", "PrivateTmp": "true", "ProtectHome": "true",
        }
        for key, value in expected.items():
            self.assertEqual(service[key], [value], key)
        self.assertEqual(
            set(service["RestrictAddressFamilies"][0].split()), {"AF_UNIX", "AF_INET", "AF_INET6"}
        )
        # The supervisor gives its workers DrainTimeout + 10 s before SIGKILL.
        drain = parse_duration(self.config["DrainTimeout"], key="DrainTimeout")
        stop = parse_duration(service["TimeoutStopSec"][0], key="TimeoutStopSec")
        self.assertGreater(stop, drain + 10)

    def test_socket_units_name_the_descriptor(self) -> None:
        """Both socket units hand hmacfs.service a descriptor named "hmacfs" (ListenPort name=)."""
        for name in ("hmacfs.socket", "hmacfs-tcp.socket"):
            socket_unit = unit_entries(PACKAGING / "systemd" / name)["Socket"]
            self.assertEqual(socket_unit["FileDescriptorName"], ["hmacfs"], name)
            self.assertEqual(socket_unit["Service"], ["hmacfs.service"], name)

    def test_logrotate_matches_config(self) -> None:
        """logrotate rotates LogFile and reloads the service (SIGHUP) afterwards."""
        text = (PACKAGING / "logrotate" / "hmacfs").read_text()
        self.assertIn(f"{self.config['LogFile']} {{", text)
        self.assertIn("systemctl reload hmacfs.service", text)
        self.assertNotRegex(text, r"(?m)^\s*copytruncate")

    def test_xmpp_snippets_match_config(self) -> None:
        """Prosody's base URLs end in /UploadSubDir/ (v1, v2); ejabberd's put_url has no slash."""
        subdir = self.config["UploadSubDir"]
        prosody = (PACKAGING / "prosody.cfg.lua").read_text()
        urls = re.findall(r'http_upload_external_base_url = "([^"]+)"', prosody)
        self.assertEqual(len(urls), 2)
        for url in urls:
            self.assertTrue(url.startswith("https://") and url.endswith(f"/{subdir}/"), url)
        self.assertIn('http_upload_external_protocol = "v2"', prosody)
        self.assertIn('http_upload_external_protocol = "v1"', prosody)
        ejabberd = (PACKAGING / "ejabberd.yml").read_text()
        put_url = re.search(r'put_url: "([^"]+)"', ejabberd)
        assert put_url is not None
        self.assertTrue(put_url.group(1).endswith(f"/{subdir}"), put_url.group(1))
        self.assertIn("external_secret:", ejabberd)


class RealToolTests(SynchronousTestCase):
    """The packaged files pass the checks of the programs that read them."""

    def test_nginx_t(self) -> None:
        """`nginx -t` accepts the site file rendered for loopback, with no warning."""
        nginx = find_program("nginx")
        prefix = short_tempdir(self)
        cert, key = make_certificate(prefix)
        conf = render_nginx(
            prefix, socket_path=prefix / "hmacfs.sock", port=18443, http_port=18080,
            cert=cert, key=key,
        )
        result = subprocess.run(
            [nginx, "-t", "-p", str(prefix), "-c", str(conf), "-e", str(prefix / "error.log")],
            capture_output=True, timeout=30,
        )
        output = result.stderr.decode()
        self.assertEqual(result.returncode, 0, output)
        self.assertIn("test is successful", output)
        # nginx >= 1.25.1 calls "listen ... http2" deprecated; anything else is a real problem.
        warnings = [
            line for line in output.splitlines() if "[warn]" in line and "deprecated" not in line
        ]
        self.assertEqual(warnings, [])

    def test_systemd_analyze_verify(self) -> None:
        """`systemd-analyze verify` accepts the service and both socket units without a word."""
        analyze = find_program("systemd-analyze", required_in_ci=False)
        directory = short_tempdir(self)
        config = render_config(directory / "etc")
        service = replace_literals(
            (PACKAGING / "systemd" / "hmacfs.service").read_text(),
            {TWISTD_DIR: f"{VENV_BIN}/", CONFIG_FILE: str(config)},
        )
        (directory / "hmacfs.service").write_text(service)
        for name in ("hmacfs.socket", "hmacfs-tcp.socket"):
            shutil.copy(PACKAGING / "systemd" / name, directory / name)
        result = subprocess.run(
            [analyze, "verify", "hmacfs.service", "hmacfs.socket", "hmacfs-tcp.socket"],
            cwd=directory, capture_output=True, timeout=60,
        )
        output = (result.stdout + result.stderr).decode()
        self.assertEqual((result.returncode, output), (0, ""))

    def test_systemd_analyze_catches_errors(self) -> None:
        """The check above can fail: a unit with an unknown key is reported."""
        analyze = find_program("systemd-analyze", required_in_ci=False)
        directory = Path(self.mktemp()).resolve()
        directory.mkdir()
        service = replace_literals(
            (PACKAGING / "systemd" / "hmacfs.service").read_text(),
            {TWISTD_DIR: f"{VENV_BIN}/", "LimitNOFILE=": "LimitNOFILES="},
        )
        (directory / "hmacfs.service").write_text(service)
        result = subprocess.run(
            [analyze, "verify", "hmacfs.service"], cwd=directory, capture_output=True, timeout=60
        )
        self.assertIn(b"LimitNOFILES", result.stdout + result.stderr)

    def test_logrotate_d(self) -> None:
        """`logrotate -d` (dry run) accepts the file pointed at a temp log."""
        logrotate = find_program("logrotate")
        directory = Path(self.mktemp()).resolve()
        directory.mkdir()
        log = directory / "hmacfs.log"
        log.write_text("a line\n")
        conf = directory / "hmacfs.logrotate"
        conf.write_text(
            replace_literals(
                (PACKAGING / "logrotate" / "hmacfs").read_text(),
                {LOG_FILE: str(log), "create 0640 hmacfs hmacfs": "create 0640"},
            )
        )
        result = subprocess.run(
            [logrotate, "-d", "-s", str(directory / "state"), str(conf)],
            capture_output=True, timeout=60,
        )
        output = (result.stdout + result.stderr).decode()
        self.assertEqual(result.returncode, 0, output)
        self.assertNotIn("error", output.lower())
        self.assertIn(str(log), output)
