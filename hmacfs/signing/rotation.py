# -*- test-case-name: tests.test_rotation -*-
"""
The secrets a MAC may be signed with, across a rotation.

When the operator changes the secret (config file or SecretFile, picked up on
SIGHUP or every ReaskSecretInterval), slots that the XMPP server handed out a
moment before were signed with the old one.  The previous secret therefore
stays valid for SecretGracePeriod seconds.  Secrets are never logged: only a
short fingerprint of the new one, so an operator can tell that it changed.
"""

from __future__ import annotations

import hashlib

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from hmacfs.logs import log_router

log = Logger(observer=log_router)


def fingerprint(secret: bytes) -> str:
    """8 hex digits of SHA-256: enough to tell secrets apart, useless to an attacker."""
    return hashlib.sha256(b"hmacfs-fingerprint:" + secret).hexdigest()[:8]


class SecretRing:
    """The current secret, plus the previous one during its grace period."""

    def __init__(self, secret: bytes, clock: IReactorTime, grace_period: float) -> None:
        self.clock = clock
        self.grace_period = grace_period
        self.current = secret
        self.previous: bytes | None = None
        self.previous_until = 0.0

    def secrets(self) -> tuple[bytes, ...]:
        """What ``Authenticator`` checks MACs against, current first."""
        if self.previous is not None and self.clock.seconds() < self.previous_until:
            return (self.current, self.previous)
        return (self.current,)

    def rotate(self, secret: bytes) -> bool:
        """Make ``secret`` current; True if it changed."""
        if secret == self.current:
            return False
        self.previous = self.current
        self.previous_until = self.clock.seconds() + self.grace_period
        self.current = secret
        log.info(
            "secret rotated to {fingerprint}; the previous one stays valid for {grace:.0f}s",
            fingerprint=fingerprint(secret),
            grace=self.grace_period,
        )
        return True

    def state(self) -> dict[str, object]:
        """What a worker process needs to check MACs exactly like this ring."""
        previous = None
        if self.previous is not None and self.clock.seconds() < self.previous_until:
            previous = [self.previous.hex(), self.previous_until]
        return {"current": self.current.hex(), "previous": previous}

    def load_state(self, state: dict[str, object]) -> None:
        """Adopt a state produced by ``state()`` (in the supervisor)."""
        self.current = bytes.fromhex(str(state["current"]))
        previous = state.get("previous")
        if previous:
            assert isinstance(previous, list | tuple), previous
            secret, until = previous
            self.previous, self.previous_until = bytes.fromhex(str(secret)), float(until)
        else:
            self.previous, self.previous_until = None, 0.0
