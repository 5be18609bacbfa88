"""The hmacfs command: signing URLs that the server accepts, checking configs."""

from __future__ import annotations

import io
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from hmacfs.service.cli import main
from hmacfs.signing.auth import Authenticator
from hmacfs.signing.paths import parse_slot_path


class CLITests(SynchronousTestCase):
    def setUp(self) -> None:
        self.dir = Path(self.mktemp()).resolve()
        self.dir.mkdir()
        self.config = self.dir / "c.toml"
        self.config.write_text(
            f'Secret = "cli-secret-0123456789"\nStoreDir = "{self.dir}"\nListenPort = "127.0.0.1:9999"\n'
        )

    def run_cli(self, *argv: str) -> tuple[int, str, str]:
        out, err = io.StringIO(), io.StringIO()
        with redirect_stdout(out), redirect_stderr(err):
            code = main(list(argv))
        return code, out.getvalue(), err.getvalue()

    def test_sign_urls_verify(self) -> None:
        """`hmacfs sign` prints a PUT URL whose MAC the server's Authenticator accepts."""
        for protocol in ("v", "v2", "token", "v3"):
            code, out, _ = self.run_cli(
                "sign", "--config", str(self.config), "--protocol", protocol, "--type", "image/png",
                "abc/My Photo.png", "1234",
            )
            self.assertEqual(code, 0)
            put = out.splitlines()[0].split(" ", 1)[1]
            self.assertTrue(put.startswith("http://127.0.0.1:9999/upload/abc/My%20Photo.png?"), put)
            parts = urlsplit(put)
            query = {k.encode(): [v.encode() for v in vs] for k, vs in parse_qs(parts.query).items()}
            slot = parse_slot_path(parts.path.encode(), "upload")
            import time

            clock = Clock()
            clock.advance(time.time())
            auth = Authenticator(lambda: (b"cli-secret-0123456789",), clock)
            from urllib.parse import unquote_to_bytes

            result = auth.verify_upload(
                method=b"PUT", full_path=unquote_to_bytes(parts.path), slot=slot, query=query,
                size=1234, content_type=b"image/png",
            )
            self.assertEqual(result.scheme, protocol)

    def test_check_config_ok_redacted(self) -> None:
        """check-config exits 0 and prints the effective config without the secret."""
        code, out, _ = self.run_cli("check-config", str(self.config))
        self.assertEqual(code, 0)
        self.assertIn("ListenPort", out)
        self.assertNotIn("cli-secret-0123456789", out)

    def test_check_config_error(self) -> None:
        """check-config exits 1 and names the bad key."""
        self.config.write_text(self.config.read_text() + 'MaxUploadSize = "huge"\n')
        code, _, err = self.run_cli("check-config", str(self.config))
        self.assertEqual(code, 1)
        self.assertIn("MaxUploadSize", err)

    def test_check_config_never_prints_s3_secret(self) -> None:
        """check-config of an S3 configuration, with the secret inline or in S3SecretKeyFile
        (world-readable, so there is a warning about it), prints the S3 keys but the secret
        nowhere, on stdout or stderr, whole or in part."""
        s3_secret = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"
        secret_file = self.dir / "s3-secret"
        secret_file.write_text(s3_secret + "\n")
        secret_file.chmod(0o644)
        s3 = (
            'StorageBackend = "s3"\nS3Endpoint = "https://s3.example.org"\n'
            'S3Bucket = "hmacfs-uploads"\nS3AccessKey = "AKIAIOSFODNN7EXAMPLE"\n'
        )
        base = self.config.read_text()
        for secret_line in (f'S3SecretKey = "{s3_secret}"\n', f'S3SecretKeyFile = "{secret_file}"\n'):
            self.config.write_text(base + s3 + secret_line + f'S3Secretkey = "{s3_secret}"\n')
            code, out, err = self.run_cli("check-config", str(self.config))
            self.assertEqual(code, 0, err)
            self.assertIn('"S3Bucket": "hmacfs-uploads"', out)
            self.assertIn('"S3AccessKey": "AKIAIOSFODNN7EXAMPLE"', out)
            self.assertIn("unknown key 'S3Secretkey'", err)
            for part in (s3_secret, s3_secret[:10], s3_secret[10:20], s3_secret[-10:]):
                self.assertNotIn(part, out + err)
        self.assertIn("S3SecretKeyFile", err)  # the world-readable warning, by name only

    def test_check_config_s3_error_names_key(self) -> None:
        """An S3 configuration without its bucket exits 1 naming S3Bucket; a bad secret value
        is refused without showing it."""
        s3_secret = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"
        base = self.config.read_text() + 'StorageBackend = "s3"\nS3AccessKey = "AKIA"\n'
        self.config.write_text(base + f'S3SecretKey = "{s3_secret}"\n')
        code, out, err = self.run_cli("check-config", str(self.config))
        self.assertEqual((code, out), (1, ""))
        self.assertIn("S3Bucket: '' is empty, but StorageBackend = \"s3\"", err)
        self.assertNotIn(s3_secret, err)
        self.config.write_text(base + f'S3Bucket = "b-1"\nS3SecretKey = "{s3_secret}\\n"\n')
        code, out, err = self.run_cli("check-config", str(self.config))
        self.assertEqual((code, out), (1, ""))
        self.assertIn("S3SecretKey: <redacted> has a control character", err)
        self.assertNotIn(s3_secret[:10], err)

    def test_check_config_does_not_create_store_dir(self) -> None:
        """check-config on a config whose StoreDir does not exist leaves it absent,
        and exits 0 without a warning (the server will create it: its parent is writable)."""
        store = self.dir / "missing" / "store"
        self.config.write_text(f'Secret = "cli-secret-0123456789"\nStoreDir = "{store}"\n')
        code, out, err = self.run_cli("check-config", str(self.config))
        self.assertEqual(code, 0, err)
        self.assertFalse((self.dir / "missing").exists())
        self.assertEqual(err, "")
        self.assertIn(str(store), out)

    def test_check_config_store_dir_cannot_be_created(self) -> None:
        """A StoreDir that could not be created (below a regular file) is an error
        naming StoreDir, and nothing is created."""
        (self.dir / "file").write_text("")
        store = self.dir / "file" / "store"
        self.config.write_text(f'Secret = "cli-secret-0123456789"\nStoreDir = "{store}"\n')
        code, _, err = self.run_cli("check-config", str(self.config))
        self.assertEqual(code, 1)
        self.assertIn("StoreDir", err)
        self.assertIn("cannot be created", err)


class UnbanCLITests(SynchronousTestCase):
    def test_unban_embedded_writes_request(self) -> None:
        """`hmacfs unban` without Redis leaves a request every local process applies."""
        directory = Path(self.mktemp()).resolve()
        directory.mkdir()
        config = directory / "c.toml"
        config.write_text(f'Secret = "cli-secret-0123456789"\nStoreDir = "{directory}"\n')
        out = io.StringIO()
        with redirect_stdout(out):
            code = main(["unban", "--config", str(config), "203.0.113.77"])
        self.assertEqual(code, 0)
        self.assertTrue((directory / ".hmacfs" / "unban" / "203.0.113.77").exists())

    def test_unban_bad_address(self) -> None:
        """A non-address is refused with exit status 1."""
        directory = Path(self.mktemp()).resolve()
        directory.mkdir()
        config = directory / "c.toml"
        config.write_text(f'Secret = "cli-secret-0123456789"\nStoreDir = "{directory}"\n')
        err = io.StringIO()
        with redirect_stderr(err):
            code = main(["unban", "--config", str(config), "not-an-ip"])
        self.assertEqual(code, 1)
