# -*- test-case-name: tests.test_config -*-
"""
A rejected configuration value, and the words for what TOML held.

Every message reads "<Key>: <repr(value)> <problem> (allowed: <what>)", so
an operator sees what to change without reading code.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import date, time


class Shown:
    """A stand-in for a value that must not be printed; its repr is its text."""

    def __init__(self, text: str) -> None:
        self._text = text

    def __repr__(self) -> str:
        return self._text


REDACTED = Shown("<redacted>")


class ConfigError(Exception):
    """
    A configuration value was rejected.

    The message always reads C{"<Key>: <repr(value)> <problem> (allowed:
    <what>)"} so an operator sees what to change without reading code.
    C{source} names the file (or C{"<config>"}) once L{parse_config} has seen
    the error.
    """

    def __init__(
        self, key: str, value: object, allowed: str, problem: str = "is not valid"
    ) -> None:
        super().__init__(key, value, allowed, problem)
        self.key = key
        self.value = value
        self.allowed = allowed
        self.problem = problem
        self.source: str | None = None

    def __str__(self) -> str:
        return f"{self.key}: {self.value!r} {self.problem} (allowed: {self.allowed})"


def toml_type(value: object) -> str:
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a float"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, (list, tuple)):
        return "an array"
    if isinstance(value, Mapping):
        return "a table"
    if isinstance(value, (date, time)):
        return "a date/time"
    return f"a {type(value).__name__}"


def wrong_type(key: str, value: object, allowed: str) -> ConfigError:
    return ConfigError(key, value, allowed, f"is {toml_type(value)}")
