"""
A real S3 server for tests: OpenStack Swift with its s3api middleware, one node on
127.0.0.1, set up by tests/servers/swift_saio.sh in a temporary directory (2-5 s).

Swift runs from its own virtualenv (``make .venv-swift``; point ``HMACFS_SWIFT_PYTHON`` at
another interpreter that can import swift).  Outside CI a missing Swift skips the test; in
CI (``hmacfs.testing.in_ci()``) it is a failure, since ``make test`` installs it.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

from twisted.trial.unittest import SkipTest

from hmacfs.testing import in_ci

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "tests" / "servers" / "swift_saio.sh"
SWIFT_PYTHON = Path(os.environ.get("HMACFS_SWIFT_PYTHON", str(ROOT / ".venv-swift" / "bin" / "python")))


def require_swift() -> Path:
    """The interpreter that runs Swift, or SkipTest (outside CI) / AssertionError (in CI)."""
    problem = None
    if not SWIFT_PYTHON.exists():
        problem = f"no Swift interpreter at {SWIFT_PYTHON} (make .venv-swift, or set HMACFS_SWIFT_PYTHON)"
    elif subprocess.run(
        [str(SWIFT_PYTHON), "-c", "import swift"], capture_output=True, timeout=60
    ).returncode != 0:
        problem = f"{SWIFT_PYTHON} cannot import swift (make .venv-swift)"
    if problem is not None:
        if in_ci():
            raise AssertionError(f"the S3 server is required in CI: {problem}")
        raise SkipTest(problem)
    return SWIFT_PYTHON


class S3Server:
    """``start()`` / ``stop()`` one Swift all-in-one; its endpoint and credentials once started."""

    def __init__(self, secret: str | None = None) -> None:
        """``secret``: the S3 secret key the server accepts (swift_saio.sh's default otherwise)."""
        self.python = require_swift()
        self.secret = secret
        # on disk (/tmp here), not /dev/shm: the big-object tests would hold their bytes in RAM
        self.dir = Path(tempfile.mkdtemp(prefix="hmacfs-s3-"))
        self.workdir = self.dir / "saio"
        self.process: subprocess.Popen[str] | None = None
        self.env: dict[str, str] = {}

    @property
    def endpoint(self) -> str:
        return self.env["S3_ENDPOINT"]

    @property
    def access_key(self) -> str:
        return self.env["S3_ACCESS_KEY"]

    @property
    def secret_key(self) -> str:
        return self.env["S3_SECRET_KEY"]

    @property
    def region(self) -> str:
        return self.env["S3_REGION"]

    @property
    def port(self) -> int:
        return int(self.endpoint.rsplit(":", 1)[1])

    def start(self, timeout: float = 90.0) -> S3Server:
        env = dict(os.environ, SAIO_PYTHON=str(self.python), SAIO_LOG_LEVEL="WARNING")
        if self.secret is not None:
            env["SAIO_SECRET"] = self.secret
        with open(self.dir / "saio.stderr", "w") as stderr:
            self.process = subprocess.Popen(
                ["bash", str(SCRIPT), "run", str(self.workdir)],
                stdout=subprocess.PIPE,
                stderr=stderr,
                text=True,
                env=env,
            )
        assert self.process.stdout is not None
        deadline = time.monotonic() + timeout
        for line in self.process.stdout:
            key, _, value = line.strip().partition("=")
            if key.startswith("S3_"):
                self.env[key] = value
            if line.startswith("SAIO_READY"):
                return self
            if time.monotonic() > deadline:
                break
        self.stop()
        raise AssertionError(f"the S3 server did not start within {timeout}s: {self.log_tail()}")

    def stop(self) -> None:
        """SIGTERM to the script: it stops the Swift servers by their PIDs and exits."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                subprocess.run(["bash", str(SCRIPT), "stop", str(self.workdir)], timeout=30)
                self.process.kill()
                self.process.wait(5)
        if self.process is not None and self.process.stdout is not None:
            self.process.stdout.close()
        self.process = None

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    def log_tail(self) -> str:
        parts = []
        for path in [self.dir / "saio.stderr", *sorted((self.workdir / "log").glob("*.log"))]:
            if path.exists():
                parts.append(f"{path.name}: {path.read_text(errors='replace')[-1500:]}")
        return "\n".join(parts)


_shared: S3Server | None = None
_failed: BaseException | None = None


def shared_s3() -> S3Server:
    """
    One server for the whole test process (started on first use, stopped at exit).  A start
    that failed is not retried by every later test: they get the same skip or failure.
    """
    global _shared, _failed
    if _failed is not None:
        raise _failed
    if _shared is None:
        import atexit

        try:
            server = S3Server()
        except BaseException as e:
            _failed = e
            raise
        try:
            _shared = server.start()
        except BaseException as e:
            _failed = e
            server.cleanup()  # its log tail is in the error already
            raise
        atexit.register(server.cleanup)
    return _shared
