# -*- test-case-name: tests.test_bans -*-
"""
Blocking addresses that keep failing authentication.

A client that fails BlockAfterFails times within AutoBanTime seconds is
blocked for BlockDuration seconds (or, with AutoUnban = false, until an
operator lifts it).  A client is an IPv4 address or an IPv6 /64 (``ban_key``):
whoever holds one /64 holds 2**64 addresses.  Blocked clients get 429 with Retry-After before any other
work.  The decision must be synchronous (it runs at header time), so every
process keeps a local ``BanList``; with Redis, failures and blocks are also
shared (``hmacfs.state.shared.BanShare``) and ``SharedBans`` mirrors other
nodes' blocks into the local list.
"""

from __future__ import annotations

import contextlib
import heapq
import ipaddress
import math
import os
import time
from collections import OrderedDict
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import attrs
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from hmacfs.errors import Refusal
from hmacfs.logs import log_router
from hmacfs.periodic import PeriodicService
from hmacfs.signing.paths import PRIVATE_DIR
from hmacfs.state.shared import FOREVER, BanShare

log = Logger(observer=log_router)

#: Retry-After sent for a block without expiry (AutoUnban = false).
FOREVER_RETRY_AFTER = 86400


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


#: Most client keys the failure counters track, and most timed blocks held, per process:
#: beyond it the oldest counter (or the block closest to its end) goes first.  About
#: 300 bytes each at most, so the table stays below ~30 MiB under any scan.
MAX_TRACKED = 100_000


def ban_key(address: str) -> str:
    """
    The client a failure or a block is counted for: an IPv4 address (IPv4-mapped IPv6
    included), the /64 of an IPv6 address (one end site: its owner has 2**64 addresses
    to rotate through), or the text unchanged (``unix``, a name).  A key is its own key,
    so blocks read back from Redis map to themselves.
    """
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        if "/" not in address:
            return address
        try:
            network = ipaddress.ip_network(address, strict=False)
        except ValueError:
            return address
        if isinstance(network, ipaddress.IPv6Network) and network.prefixlen > 64:
            network = network.supernet(new_prefix=64)
        return str(network)
    if isinstance(ip, ipaddress.IPv4Address):
        return str(ip)
    if ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    return str(ipaddress.IPv6Network((int(ip) >> 64 << 64, 64)))


class BanList:
    """
    Per-process failure counters and blocks, keyed by ``ban_key``.

    Every operation is amortised O(1) whatever the table size: failure counters
    sit in an OrderedDict in the order of their last failure, and every counter
    has the same window (AutoBanTime), so the expired ones are always at the
    front; timed blocks sit in a heap by expiry.  Both are capped at
    ``max_entries``.  ``on_ban`` is called with (key, seconds or FOREVER) when
    this process decides a block, so a shared backend can publish it.
    """

    def __init__(
        self,
        clock: IReactorTime,
        settings: BanSettings,
        on_ban: Callable[[str, float], object] | None = None,
        *,
        max_entries: int = MAX_TRACKED,
    ) -> None:
        self.clock = clock
        self.settings = settings
        self.on_ban = on_ban
        self.max_entries = max_entries
        #: key -> times of its recent failures; least recently failing key first
        self._failures: OrderedDict[str, list[float]] = OrderedDict()
        self._blocked: dict[str, float] = {}  # key -> until (FOREVER when no auto unban)
        #: (until, key) of timed blocks; entries of lifted or renewed blocks are left to expire
        self._expiries: list[tuple[float, str]] = []
        self.bans_total = 0

    def retry_after(self, address: str) -> float | None:
        """Seconds until ``address`` may try again, FOREVER, or None if it is not blocked."""
        key = ban_key(address)
        until = self._blocked.get(key)
        if until is None:
            return None
        now = self.clock.seconds()
        if until <= now:
            del self._blocked[key]
            return None
        return until - now if until != FOREVER else FOREVER

    def record_failure(self, address: str) -> bool:
        """Count an authentication failure; True if it blocked the address's client."""
        key = ban_key(address)
        now = self.clock.seconds()
        window_start = now - self.settings.auto_ban_time
        self._prune_failures(window_start)
        self._prune_blocks(now)
        earlier = self._failures.pop(key, None)  # re-inserted at the end: the newest
        recent = [t for t in earlier if t > window_start] if earlier else []
        recent.append(now)
        if len(recent) < self.settings.block_after_fails:
            self._failures[key] = recent
            while len(self._failures) > self.max_entries:
                self._failures.popitem(last=False)
            return False
        seconds = self.settings.block_duration if self.settings.auto_unban else FOREVER
        self.block(key, seconds)
        if self.on_ban is not None:
            self.on_ban(key, seconds)
        return True

    def block(self, address: str, seconds: float, *, mirrored: bool = False) -> None:
        """Block ``address``'s client for ``seconds`` (FOREVER: until unblocked by hand).

        ``mirrored``: a block another process decided (counted and logged there).
        """
        key = ban_key(address)
        until = FOREVER if seconds == FOREVER else self.clock.seconds() + seconds
        new = key not in self._blocked
        self._failures.pop(key, None)
        self._blocked[key] = until
        if until != FOREVER:
            heapq.heappush(self._expiries, (until, key))
            self._bound_blocks()
        if mirrored:
            return
        if new:
            self.bans_total += 1
        log.warn(
            "blocked {address} for {duration} after repeated authentication failures",
            address=key,
            duration="ever (AutoUnban = false)" if until == FOREVER else f"{seconds:.0f}s",
        )

    def has_blocks(self) -> bool:
        """Whether any client is blocked here (per request: O(1) unless blocks just ended)."""
        if self._expiries:
            self._prune_blocks(self.clock.seconds())
        return bool(self._blocked)

    def unblock(self, address: str) -> bool:
        key = ban_key(address)
        self._failures.pop(key, None)
        return self._blocked.pop(key, None) is not None

    def active(self) -> int:
        self._prune_blocks(self.clock.seconds())
        return len(self._blocked)

    def prune(self) -> None:
        """Forget what has expired (the ban timer calls this, so an idle table shrinks too)."""
        now = self.clock.seconds()
        self._prune_failures(now - self.settings.auto_ban_time)
        self._prune_blocks(now)

    def _prune_failures(self, window_start: float) -> None:
        # Oldest last failure first: stop at the first counter still inside the window.
        failures = self._failures
        while failures:
            key = next(iter(failures))
            if failures[key][-1] > window_start:
                return
            del failures[key]

    def _prune_blocks(self, now: float) -> None:
        expiries = self._expiries
        while expiries and expiries[0][0] <= now:
            until, key = heapq.heappop(expiries)
            if self._blocked.get(key) == until:
                del self._blocked[key]

    def _bound_blocks(self) -> None:
        expiries = self._expiries
        while len(self._blocked) > self.max_entries and expiries:
            # The timed block closest to its end goes first (blocks forever stay).
            until, key = heapq.heappop(expiries)
            if self._blocked.get(key) == until:
                del self._blocked[key]
        if len(expiries) > 2 * len(self._blocked) + 64:
            # Entries of lifted or renewed blocks: rebuild (amortised over the pushes).
            self._expiries = [(u, k) for k, u in self._blocked.items() if u != FOREVER]
            heapq.heapify(self._expiries)


def ban_check(bans: BanList, client_of: Callable[[object], str]) -> Callable[[object], Refusal | None]:
    """An admission check: 429 + Retry-After for a blocked client, before any other work."""

    def check(request: object) -> Refusal | None:
        if not bans.has_blocks():
            return None  # the common case: no need to resolve the client address
        wait = bans.retry_after(client_of(request))
        if wait is None:
            return None
        seconds = FOREVER_RETRY_AFTER if wait == FOREVER else max(1, math.ceil(wait))
        return Refusal(
            429,
            "too many failed authentication attempts from this address",
            ((b"Retry-After", str(seconds).encode("ascii")),),
        )

    return check


class SharedBans:
    """
    Failure counters and blocks shared by every node and worker (``BanShare``:
    Redis, or nothing shared when embedded).

    Failures are counted in the share (with AutoBanTime expiry) besides the
    local count, a block is published with BlockDuration expiry (none with
    AutoUnban = false), and every process mirrors the shared blocks into its
    local ``BanList`` about once a second, so the header-time check stays a
    local, synchronous lookup.  An operator's ``hmacfs unban`` lifts the shared
    block; the mirror then lifts it everywhere.  While the share is unreachable
    the local BanList goes on alone.
    """

    def __init__(self, *, bans: BanList, share: BanShare) -> None:
        self.bans = bans
        self.share = share
        self._mirrored: set[str] = set()
        bans.on_ban = self.publish

    def failure(self, address: str) -> Deferred[None] | None:
        """Count a shared failure; block everywhere when the shared count is reached."""
        settings = self.bans.settings
        client = ban_key(address)  # one counter per IPv4 address or IPv6 /64, as locally
        counted = self.share.count_failure(client, settings.auto_ban_time)
        if counted is None:
            return None

        async def count() -> None:
            failures = await counted
            if failures >= settings.block_after_fails and self.bans.retry_after(client) is None:
                seconds = settings.block_duration if settings.auto_unban else FOREVER
                self.bans.block(client, seconds)
                self.publish(client, seconds)

        return _background(count(), "counting a failure in Redis")

    def publish(self, address: str, seconds: float) -> Deferred[None] | None:
        """Share a block decided here, for every other process."""
        address = ban_key(address)
        written = self.share.publish_block(address, seconds)
        if written is None:
            return None
        self._mirrored.add(address)

        async def write() -> None:
            await written

        return _background(write(), "publishing a block to Redis")

    def sync(self) -> Deferred[None] | None:
        """Mirror the shared blocks into the local list (and lift the ones lifted there)."""
        reading = self.share.read_blocks()
        if reading is None:
            return None

        async def mirror() -> None:
            blocks = await reading
            for address, seconds in blocks.items():
                if self.bans.retry_after(address) is None:
                    self.bans.block(address, seconds, mirrored=True)
            for address in self._mirrored - set(blocks):
                self.bans.unblock(address)
            self._mirrored = set(blocks)

        return _background(mirror(), "mirroring blocks from Redis")


def _background(coroutine: Coroutine[Any, Any, None], what: str) -> Deferred[None]:
    d = Deferred.fromCoroutine(coroutine)
    d.addErrback(lambda failure: log.info("{what} failed: {error}", what=what, error=failure.getErrorMessage()))
    return d


def unban_shared(share: BanShare, address: str) -> Deferred[bool] | None:
    """What ``hmacfs unban`` does with a shared backend: lift the block and the count
    of the address's client (its /64 for IPv6; the address's own too, as older
    versions keyed them).  None: nothing shared, or unreachable."""
    return share.unban(address, ban_key(address))


#: ``StoreDir/.hmacfs/unban``: the ban list's own subdirectory of the private directory
UNBAN_DIR = "unban"
#: how long an unban request file stays for every process to see it
UNBAN_REQUEST_LIFETIME = 120.0


def request_unban(store_dir: Path, address: str) -> Path:
    """
    Ask every process that uses this store to lift its block of ``address``
    (what ``hmacfs unban`` does with the embedded backend): a file under
    ``StoreDir/.hmacfs/unban/`` that each process's ban timer picks up.
    """
    canonical = str(ipaddress.ip_address(address))  # also keeps the name a plain file name
    directory = store_dir / PRIVATE_DIR / UNBAN_DIR
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / canonical
    path.write_text(f"{time.time():.3f}\n")
    return path


class BanSyncService(PeriodicService):
    """
    Every second: mirror shared blocks from Redis and apply unban requests.

    The unban requests are files in ``StoreDir/.hmacfs/unban``; with
    ``run_blocking`` (the disk pool) they are read there, so a slow store never
    holds the reactor thread once a second.  Without it (tests, tools) they are
    read in place.
    """

    def __init__(
        self,
        *,
        clock: IReactorTime,
        bans: BanList,
        store_dir: Path,
        shared: SharedBans | None = None,
        interval: float = 1.0,
        run_blocking: Callable[..., Deferred[Any]] | None = None,
    ) -> None:
        super().__init__(clock, interval, self.tick, what="ban sync")
        self.bans = bans
        self.shared = shared
        self.unban_dir = store_dir / PRIVATE_DIR / UNBAN_DIR
        self.run_blocking = run_blocking
        self._applied: dict[str, float] = {}

    def tick(self) -> Deferred[None] | None:
        if self.shared is not None:
            self.shared.sync()
        if self.run_blocking is None:
            self.apply_unban_requests()
            self.bans.prune()
            return None
        reading = self.run_blocking(read_unban_requests, self.unban_dir, time.time())
        reading.addCallback(self._apply)
        reading.addCallback(lambda _: self.bans.prune())
        return reading

    def apply_unban_requests(self) -> None:
        self._apply(read_unban_requests(self.unban_dir, time.time()))

    def _apply(self, requests: list[tuple[str, float, bool]]) -> None:
        for name, mtime, expired in requests:
            if self._applied.get(name) != mtime:
                self._applied[name] = mtime
                if self.bans.unblock(name):
                    log.info("block of {address} lifted by an operator", address=name)
            if expired:
                self._applied.pop(name, None)


def read_unban_requests(unban_dir: Path, now: float) -> list[tuple[str, float, bool]]:
    """
    The unban requests as ``(address, mtime, expired)``, the expired ones removed
    (blocking: on the disk pool).
    """
    try:
        entries = list(os.scandir(unban_dir))
    except FileNotFoundError:
        return []
    requests = []
    for entry in entries:
        try:
            mtime = entry.stat().st_mtime
        except FileNotFoundError:
            continue
        expired = now - mtime > UNBAN_REQUEST_LIFETIME
        if expired:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(entry.path)
        requests.append((entry.name, mtime, expired))
    return requests
