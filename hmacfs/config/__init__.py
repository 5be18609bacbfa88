# -*- test-case-name: tests.test_config -*-
"""
Load and check the hmacfs configuration.

The file is flat TOML with the PascalCase keys of the Go "HMAC File Server",
so an operator can keep their old file: obsolete keys are reported and
ignored (or mapped onto their replacement) and unknown keys get a typo hint.
Every value is checked and converted exactly once, here, into a frozen
L{Config} of seconds, bytes, paths and Twisted endpoint descriptions, so the
rest of the server never parses a string.  The first bad value stops the load
with a L{ConfigError} naming the key, the value and what would be accepted.
The secrets (C{Secret}, the file behind C{SecretFile}, C{RedisPassword},
C{ComponentSecret}, C{S3SecretKey} and the file behind C{S3SecretKeyFile})
never appear in an error, a warning, C{repr(config)} or L{Config.redacted}.

The package is split along that path: L{keys} (the table and L{Config}),
L{validators}, L{addresses} and L{s3} (one converter per kind of value), L{units}
(sizes, durations), L{endpoints} (listen addresses), L{load} (TOML in, the
cross-key rules, L{Config} out).  This module names the public API.
"""

from __future__ import annotations

from hmacfs.config.addresses import (
    COMPONENT_SERVER_FORMS,
    PUBLIC_URL_FORMS,
    REDIS_FORMS,
    UPLOAD_ACCESS_FORMS,
)
from hmacfs.config.endpoints import (
    ENDPOINT_PREFIXES,
    LISTEN_BACKLOG,
    LISTEN_FORMS,
    listen_to_endpoint,
)
from hmacfs.config.error import REDACTED, ConfigError
from hmacfs.config.keys import KEY_ATTRIBUTES, KNOWN_KEYS, OBSOLETE_KEYS, Config
from hmacfs.config.load import default_config, load_config, parse_config
from hmacfs.config.units import DURATION_FORMS, SIZE_FORMS, parse_duration, parse_size

__all__ = [
    "COMPONENT_SERVER_FORMS",
    "DURATION_FORMS",
    "ENDPOINT_PREFIXES",
    "KEY_ATTRIBUTES",
    "KNOWN_KEYS",
    "LISTEN_BACKLOG",
    "LISTEN_FORMS",
    "OBSOLETE_KEYS",
    "PUBLIC_URL_FORMS",
    "REDACTED",
    "REDIS_FORMS",
    "SIZE_FORMS",
    "UPLOAD_ACCESS_FORMS",
    "Config",
    "ConfigError",
    "default_config",
    "listen_to_endpoint",
    "load_config",
    "parse_config",
    "parse_duration",
    "parse_size",
]
