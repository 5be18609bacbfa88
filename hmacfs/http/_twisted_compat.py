"""
The Twisted releases hmacfs's two internals modules were checked against.

``hmacfs.http.channel`` (the streaming channel) and ``hmacfs.http.sendfile`` (the
sendfile producer) are the only modules that use Twisted internals: private
attributes and copies of private methods.  Both import this module first, so a
Twisted outside ``SUPPORTED_TWISTED`` stops the daemon at import with a
message naming both versions, instead of misbehaving under load.
``tests/test_twisted_internals.py`` pins every internal they use.
"""

from __future__ import annotations

import re

import twisted

__all__ = ["SUPPORTED_TWISTED", "UnsupportedTwisted", "check_twisted_version"]

#: The oldest and the newest (major, minor) release of Twisted whose internals
#: were checked; a minor of 99 means any release of that year.  Keep it in step
#: with pyproject.toml's bound and the Makefile's TWISTED_OLDEST.
SUPPORTED_TWISTED = ((24, 11), (26, 99))


class UnsupportedTwisted(ImportError):
    """The installed Twisted is not one hmacfs's internals were checked against."""


def _describe(supported: tuple[tuple[int, int], tuple[int, int]]) -> str:
    (low_major, low_minor), (high_major, high_minor) = supported
    high = f"{high_major}.x" if high_minor == 99 else f"{high_major}.{high_minor}"
    return f"{low_major}.{low_minor} to {high}"


def check_twisted_version(
    version: str = twisted.__version__,
    supported: tuple[tuple[int, int], tuple[int, int]] = SUPPORTED_TWISTED,
) -> None:
    """Raise ``UnsupportedTwisted`` unless ``version`` lies within ``supported``."""
    match = re.match(r"(\d+)\.(\d+)", version)
    low, high = supported
    if match is not None and low <= (int(match[1]), int(match[2])) <= high:
        return
    raise UnsupportedTwisted(
        f"hmacfs supports Twisted {_describe(supported)} (the releases whose internals "
        f"hmacfs.http.channel and hmacfs.http.sendfile were checked against); "
        f"Twisted {version} is installed"
    )


check_twisted_version()
