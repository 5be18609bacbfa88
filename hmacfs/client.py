# -*- test-case-name: tests.test_client -*-
"""
A small resumable upload client for hmacfs's session-token protocol.

    python -m hmacfs.client [--type image/jpeg] PUT_URL FILE

It PUTs the file to the signed URL with an ``X-Session-Token``; when the
connection breaks (or the server answers 5xx), it waits, asks how far the
upload got with ``HEAD`` (``Upload-Offset``) and sends the rest with
``Content-Range: bytes N-(S-1)/S``, up to ``--retries`` times.  A 409 with
``Upload-Offset`` (another offset than ours) or ``Retry-After`` (the server is
closing our previous connection) is followed too.  On a terminal it draws a
progress bar on stderr.

Only the standard library is used (``http.client``), so the module works in
any Python 3.11 without hmacfs's server dependencies, and the file is read in
pieces: memory stays small for any file size.
"""

from __future__ import annotations

import argparse
import http.client
import os
import secrets
import sys
import time
from collections.abc import Callable
from typing import BinaryIO, TextIO
from urllib.parse import urlsplit

import attrs

#: Statuses worth another attempt: the server (or a proxy) had a problem.
RETRY_STATUSES = frozenset({408, 429, 500, 502, 503, 504})
CHUNK = 256 * 1024

Progress = Callable[[int, int], None]


class UploadError(Exception):
    """The upload failed for good (a refusal, or no more retries)."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


@attrs.frozen
class UploadResult:
    """How an upload went: the final status, where to GET the file, how often it resumed."""

    status: int
    location: str | None
    attempts: int
    resumes: int


@attrs.frozen
class _Answer:
    status: int
    headers: dict[str, str]
    body: bytes

    def number(self, name: str) -> int | None:
        value = self.headers.get(name.lower())
        return int(value) if value is not None and value.strip().isdigit() else None


def _connection(url: str, timeout: float) -> tuple[http.client.HTTPConnection, str]:
    parts = urlsplit(url)
    target = parts.path + (f"?{parts.query}" if parts.query else "")
    if parts.scheme == "https":
        return http.client.HTTPSConnection(parts.netloc, timeout=timeout), target
    if parts.scheme == "http":
        return http.client.HTTPConnection(parts.netloc, timeout=timeout), target
    raise UploadError(f"not an http(s) URL: {url!r}")


def _read(response: http.client.HTTPResponse) -> _Answer:
    body = response.read(65536)
    return _Answer(response.status, {k.lower(): v for k, v in response.getheaders()}, body)


def ask_offset(url: str, token: str, *, timeout: float = 30.0) -> _Answer:
    """``HEAD`` with the session token: ``Upload-Offset`` of the upload (404: nothing yet)."""
    conn, target = _connection(url, timeout)
    try:
        conn.request("HEAD", target, headers={"X-Session-Token": token})
        return _read(conn.getresponse())
    finally:
        conn.close()


def send_from(
    url: str,
    source: BinaryIO,
    *,
    offset: int,
    size: int,
    token: str,
    content_type: str | None,
    progress: Progress | None,
    timeout: float = 60.0,
) -> _Answer:
    """PUT bytes ``offset``..``size-1`` of ``source`` (the whole file when ``offset`` is 0)."""
    conn, target = _connection(url, timeout)
    try:
        conn.putrequest("PUT", target, skip_accept_encoding=True)
        conn.putheader("Content-Length", str(size - offset))
        conn.putheader("X-Session-Token", token)
        if content_type is not None:
            conn.putheader("Content-Type", content_type)
        if offset:
            conn.putheader("Content-Range", f"bytes {offset}-{size - 1}/{size}")
        conn.endheaders()
        source.seek(offset)
        sent = offset
        try:
            while sent < size:
                chunk = source.read(min(CHUNK, size - sent))
                if not chunk:
                    raise UploadError("the file got shorter while uploading")
                conn.send(chunk)
                sent += len(chunk)
                if progress is not None:
                    progress(sent, size)
        except OSError:
            # The server may have refused early and closed: its answer is what matters.
            try:
                return _read(conn.getresponse())
            except (OSError, http.client.HTTPException):
                pass
            raise
        return _read(conn.getresponse())
    finally:
        conn.close()


def upload_file(
    put_url: str,
    path: str | os.PathLike[str],
    *,
    content_type: str | None = None,
    token: str | None = None,
    retries: int = 10,
    retry_delay: float = 1.0,
    timeout: float = 60.0,
    progress: Progress | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> UploadResult:
    """
    Upload ``path`` to the signed ``put_url``, resuming after every interruption.

    ``content_type`` must be the type the URL was signed for (Prosody v2).
    With an explicit ``token`` (an earlier run's), the first step is a HEAD, so
    an upload begun by that run is continued instead of started over.
    Raises ``UploadError`` on a refusal (403, 413, ...) or when ``retries``
    further attempts did not finish it.
    """
    size = os.stat(path).st_size
    ask_first = token is not None
    token = token or secrets.token_urlsafe(24)
    offset = 0
    resumes = 0
    wait = 0.0
    last_problem = "no attempt made"
    with open(path, "rb") as source:
        for attempt in range(retries + 1):
            if attempt or ask_first:
                if attempt:
                    sleep(max(wait, retry_delay * min(2 ** (attempt - 1), 16)))
                wait = 0.0
                try:
                    state = ask_offset(put_url, token, timeout=timeout)
                except (OSError, http.client.HTTPException) as error:
                    last_problem = f"HEAD failed: {error}"
                    continue
                known = state.number("Upload-Offset")
                if state.status == 200 and known is not None:
                    if known == size and state.number("Upload-Length") == size:
                        # The last attempt stored it; only its answer was lost.
                        return UploadResult(201, _get_url(put_url), attempt + 1, resumes)
                    if known:
                        resumes += 1
                    offset = known
                elif state.status == 404:
                    offset = 0
                elif state.status in RETRY_STATUSES:
                    last_problem = f"HEAD answered {state.status}"
                    continue
                else:
                    raise UploadError(_describe(state), state.status)
            try:
                answer = send_from(
                    put_url, source, offset=offset, size=size, token=token,
                    content_type=content_type, progress=progress, timeout=timeout,
                )
            except (OSError, http.client.HTTPException) as error:
                last_problem = f"connection failed: {error}"
                continue
            if answer.status == 201:
                return UploadResult(201, answer.headers.get("location"), attempt + 1, resumes)
            if answer.status == 409 and (
                answer.number("Upload-Offset") is not None or "retry-after" in answer.headers
            ):
                wait = float(answer.number("Retry-After") or 0)
                last_problem = _describe(answer)
                continue
            if answer.status in RETRY_STATUSES:
                wait = float(answer.number("Retry-After") or 0)
                last_problem = _describe(answer)
                continue
            raise UploadError(_describe(answer), answer.status)
    raise UploadError(f"gave up after {retries + 1} attempts: {last_problem}")


def _describe(answer: _Answer) -> str:
    text = answer.body.decode("utf-8", "replace").strip()
    return f"{answer.status}: {text}" if text else str(answer.status)


def _get_url(put_url: str) -> str:
    return urlsplit(put_url)._replace(query="").geturl()


class TerminalProgress:
    """A one-line progress bar on a terminal (nothing when ``stream`` is not one)."""

    def __init__(self, stream: TextIO = sys.stderr, width: int = 30, interval: float = 0.1) -> None:
        self.stream = stream
        self.width = width
        self.interval = interval
        self.enabled = stream.isatty()
        self._started = time.monotonic()
        self._last = 0.0
        self._first: int | None = None

    def __call__(self, done: int, total: int) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if self._first is None:
            self._first = done
        if done < total and now - self._last < self.interval:
            return
        self._last = now
        fraction = done / total if total else 1.0
        filled = int(fraction * self.width)
        rate = (done - self._first) / max(now - self._started, 1e-6)
        self.stream.write(
            f"\r[{'#' * filled}{'.' * (self.width - filled)}] {fraction * 100:5.1f}% "
            f"{done / 2**20:8.1f}/{total / 2**20:.1f} MiB {rate / 2**20:6.1f} MiB/s"
        )
        if done >= total:
            self.stream.write("\n")
        self.stream.flush()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m hmacfs.client", description="Upload a file to hmacfs, resuming after interruptions."
    )
    parser.add_argument("url", help="the signed PUT URL")
    parser.add_argument("file", help="the file to upload")
    parser.add_argument("--type", dest="content_type", help="Content-Type (as signed, for v2 URLs)")
    parser.add_argument("--token", help="X-Session-Token to use (default: a random one)")
    parser.add_argument("--retries", type=int, default=10, help="further attempts after a failure (10)")
    parser.add_argument("--retry-delay", type=float, default=1.0, help="seconds before the first retry (1)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    progress = None if args.quiet else TerminalProgress()
    try:
        result = upload_file(
            args.url, args.file, content_type=args.content_type, token=args.token,
            retries=args.retries, retry_delay=args.retry_delay, progress=progress,
        )
    except (UploadError, OSError) as error:
        print(f"upload failed: {error}", file=sys.stderr)
        return 1
    resumed = f" (resumed {result.resumes}x)" if result.resumes else ""
    print(f"stored{resumed}: {_get_url(args.url)}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
