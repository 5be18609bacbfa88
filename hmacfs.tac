# -*- test-case-name: tests.test_integration -*-
"""
twistd -y hmacfs.tac: the same service as ``twistd hmacfs``, with the config
file taken from $HMACFS_CONFIG (default ./config.toml).
"""

import os
import sys

from twisted.application.service import Application

from hmacfs.config import ConfigError, load_config
from hmacfs.service.tap import daemon_service

_path = os.environ.get("HMACFS_CONFIG", "config.toml")
try:
    _config, _warnings = load_config(_path)
except ConfigError as error:
    sys.stderr.write(f"hmacfs: {_path}: {error}\n")
    raise SystemExit(2)
for _warning in _warnings:
    sys.stderr.write(f"hmacfs: {_path}: warning: {_warning}\n")

application = Application("hmacfs")
# The daemon's start, as in `twistd hmacfs`: allocator tuning, multiprocess metrics.
daemon_service(_config, config_path=_path).setServiceParent(application)
