# -*- test-case-name: tests.test_config -*-
"""
Sizes and durations: the two value forms shared by many keys (and by other modules).

"64KiB" and "500MB", "1h30m" and "45" become bytes and seconds once, here.
"""

from __future__ import annotations

import math
import re
from fractions import Fraction

from hmacfs.config.error import ConfigError, wrong_type

DURATION_FORMS = (
    "a duration such as 45s, 90m, 24h, 30d, 1w, 1y or 1h30m "
    "(units ms, s, m, h, d, w = 7d, y = 365d; a bare number means seconds)"
)
_DURATION_UNITS = {
    "ms": Fraction(1, 1000),
    "s": Fraction(1),
    "m": Fraction(60),
    "h": Fraction(3600),
    "d": Fraction(86400),
    "w": Fraction(7 * 86400),
    "y": Fraction(365 * 86400),
}
_NUMBER = r"[0-9]+(?:\.[0-9]+)?"
_BARE_NUMBER = re.compile(rf"\s*{_NUMBER}\s*")
_DURATION = re.compile(rf"\s*(?:{_NUMBER}\s*(?:ms|[smhdwy])\s*)+", re.IGNORECASE)
_DURATION_PART = re.compile(rf"({_NUMBER})\s*(ms|[smhdwy])", re.IGNORECASE)


def parse_duration(value: str | float, *, key: str) -> float:
    """
    Turn C{"1d12h"}, C{"90m"}, C{45} or C{"45"} into seconds.

    Units may be combined, in any order and any case, with optional spaces;
    a bare number (TOML integer, float or digit string) means seconds, which
    is what the Go server's plain integers meant.
    """
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise wrong_type(key, value, DURATION_FORMS)
    if isinstance(value, str):
        if _BARE_NUMBER.fullmatch(value):
            seconds = float(value)
        elif _DURATION.fullmatch(value):
            seconds = float(
                sum(
                    Fraction(number) * _DURATION_UNITS[unit.lower()]
                    for number, unit in _DURATION_PART.findall(value)
                )
            )
        else:
            raise ConfigError(key, value, DURATION_FORMS, "is not a duration")
    else:
        seconds = float(value)
    if not math.isfinite(seconds):
        raise ConfigError(key, value, DURATION_FORMS, "is not a duration")
    if seconds < 0:
        raise ConfigError(key, value, DURATION_FORMS, "is negative")
    return seconds


SIZE_FORMS = (
    'a size such as 65536, "64KiB", "500MB" or "10GiB" '
    "(KB/MB/GB/TB = 1000^n; KiB/MiB/GiB/TiB and bare K/M/G/T = 1024^n)"
)
_SIZE_UNITS = {"": 1, "b": 1}
for _power, _letter in enumerate("kmgtp", start=1):
    _SIZE_UNITS[_letter] = 1024**_power
    _SIZE_UNITS[_letter + "ib"] = 1024**_power
    _SIZE_UNITS[_letter + "b"] = 1000**_power
_SIZE = re.compile(rf"\s*({_NUMBER})\s*([a-z]*)\s*", re.IGNORECASE)


def parse_size(value: str | int, *, key: str) -> int:
    """
    Turn C{"10GiB"}, C{"500 MB"}, C{65536} or C{"65536"} into bytes.

    Units follow the common convention: KB, MB, GB, TB (and PB) are powers
    of 1000; KiB, MiB, GiB, TiB and the bare letters K, M, G, T are powers of
    1024, because C{"64K"} in the Go configs meant 65536.  Units are
    case-insensitive and may be separated by a space.  A fractional result
    (C{"1.5KB"} is exact, C{"0.3KiB"} is not) is rounded down to whole bytes.
    """
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise wrong_type(key, value, SIZE_FORMS)
    if isinstance(value, int):
        if value < 0:
            raise ConfigError(key, value, SIZE_FORMS, "is negative")
        return value
    match = _SIZE.fullmatch(value)
    if match is None or match.group(2).lower() not in _SIZE_UNITS:
        raise ConfigError(key, value, SIZE_FORMS, "is not a size")
    return int(Fraction(match.group(1)) * _SIZE_UNITS[match.group(2).lower()])


def format_size(size: int) -> str:
    for unit, factor in (("TiB", 1024**4), ("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if size >= factor and size % factor == 0:
            return f"{size // factor}{unit}"
    return f"{size} bytes"
