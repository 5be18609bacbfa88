# -*- test-case-name: tests.test_bans -*-
"""
Blocking addresses that keep failing authentication.

A client address that fails BlockAfterFails times within AutoBanTime seconds
is blocked for BlockDuration seconds (or, with AutoUnban = false, until an
operator lifts it).  Blocked clients get 429 with Retry-After before any other
work.  The decision must be synchronous (it runs at header time), so every
process keeps a local ``BanList``; with Redis, failures and blocks are also
written there and a ``RedisBanSync`` mirrors other nodes' blocks into the
local list (see ``hmacfs.state``).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import attrs
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from hmacfs.logs import log_router
from hmacfs.request import Rejection

log = Logger(observer=log_router)

#: Retry-After sent for a block without expiry (AutoUnban = false).
FOREVER_RETRY_AFTER = 86400

FOREVER = math.inf


@attrs.define
class BanSettings:
    """The reloadable ban settings (BlockAfterFails, BlockDuration, AutoUnban, AutoBanTime)."""

    block_after_fails: int = 5
    block_duration: float = 300.0
    auto_unban: bool = True
    auto_ban_time: float = 600.0

    @classmethod
    def from_config(cls, config: object) -> BanSettings:
        return cls(
            block_after_fails=config.block_after_fails,  # type: ignore[attr-defined]
            block_duration=config.block_duration,  # type: ignore[attr-defined]
            auto_unban=config.auto_unban,  # type: ignore[attr-defined]
            auto_ban_time=config.auto_ban_time,  # type: ignore[attr-defined]
        )


class BanList:
    """
    Per-process failure counters and blocks.

    ``on_ban`` is called with (address, seconds or FOREVER) when this process
    decides a block, so a shared backend can publish it.
    """

    def __init__(
        self,
        clock: IReactorTime,
        settings: BanSettings,
        on_ban: Callable[[str, float], None] | None = None,
    ) -> None:
        self.clock = clock
        self.settings = settings
        self.on_ban = on_ban
        self._failures: dict[str, list[float]] = {}
        self._blocked: dict[str, float] = {}  # address -> until (FOREVER when no auto unban)
        self.bans_total = 0

    def retry_after(self, address: str) -> float | None:
        """Seconds until ``address`` may try again, FOREVER, or None if it is not blocked."""
        until = self._blocked.get(address)
        if until is None:
            return None
        now = self.clock.seconds()
        if until <= now:
            del self._blocked[address]
            return None
        return until - now if until != FOREVER else FOREVER

    def record_failure(self, address: str) -> bool:
        """Count an authentication failure; True if it blocked the address."""
        now = self.clock.seconds()
        window_start = now - self.settings.auto_ban_time
        recent = [t for t in self._failures.get(address, ()) if t > window_start]
        recent.append(now)
        if len(recent) < self.settings.block_after_fails:
            self._failures[address] = recent
            self._prune(window_start)
            return False
        self._failures.pop(address, None)
        seconds = self.settings.block_duration if self.settings.auto_unban else FOREVER
        self.block(address, seconds)
        if self.on_ban is not None:
            self.on_ban(address, seconds)
        return True

    def block(self, address: str, seconds: float) -> None:
        """Block ``address`` for ``seconds`` (FOREVER: until unblocked by hand)."""
        until = FOREVER if seconds == FOREVER else self.clock.seconds() + seconds
        if address not in self._blocked:
            self.bans_total += 1
        self._blocked[address] = until
        log.warn(
            "blocked {address} for {duration} after repeated authentication failures",
            address=address,
            duration="ever (AutoUnban = false)" if until == FOREVER else f"{seconds:.0f}s",
        )

    def unblock(self, address: str) -> bool:
        self._failures.pop(address, None)
        return self._blocked.pop(address, None) is not None

    def active(self) -> int:
        now = self.clock.seconds()
        return sum(1 for until in self._blocked.values() if until > now)

    def _prune(self, window_start: float) -> None:
        # Keep memory bounded under a scan from many addresses.
        if len(self._failures) > 10000:
            for address in [a for a, ts in self._failures.items() if ts[-1] <= window_start]:
                del self._failures[address]


def ban_check(bans: BanList, client_of: Callable[[object], str]) -> Callable[[object], Rejection | None]:
    """An admission check: 429 + Retry-After for a blocked client, before any other work."""

    def check(request: object) -> Rejection | None:
        wait = bans.retry_after(client_of(request))
        if wait is None:
            return None
        seconds = FOREVER_RETRY_AFTER if wait == FOREVER else max(1, math.ceil(wait))
        return Rejection(
            429,
            "too many failed authentication attempts from this address",
            ((b"Retry-After", str(seconds).encode("ascii")),),
        )

    return check
