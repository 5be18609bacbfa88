# -*- test-case-name: tests.test_paths -*-
"""The one exception shape for "answer this request with that status"."""

from __future__ import annotations


class Refusal(Exception):
    """A request that is answered with ``status``, ``reason`` and extra ``headers``.

    Path parsing, storage and upload admission all refuse with a subclass, so
    the HTTP layer turns any of them into a response the same way.
    """

    def __init__(
        self, status: int, reason: str, headers: tuple[tuple[bytes, bytes], ...] = ()
    ) -> None:
        super().__init__(f"{status} {reason}")
        self.status = status
        self.reason = reason
        self.headers = headers

    def __str__(self) -> str:
        return f"{self.status} {self.reason}"
