# -*- test-case-name: tests.test_storage_parts -*-
"""
Free space promised to uploads in flight, so that two uploads admitted together cannot
both count the same free bytes.  Per process (each worker has its own ledger); pure
bookkeeping: the store passes in what ``statvfs`` says is free.
"""

from __future__ import annotations

import threading

from hmacfs.storage.interface import StorageError


class ReservationLedger:
    """
    The bytes promised to uploads in flight and not written yet, and the admission rule:
    an upload may use space down to exactly ``min_free_bytes``, not one byte more.
    """

    __slots__ = ("min_free_bytes", "reserved", "written", "_lock")

    def __init__(self, min_free_bytes: int = 0) -> None:
        self.min_free_bytes = min_free_bytes
        #: bytes promised to uploads in flight and not written yet
        self.reserved = 0
        #: bytes this process's uploads have written so far (``Reservation.consume``)
        self.written = 0
        self._lock = threading.Lock()

    def reserve(self, free: int, incoming: int) -> Reservation:
        """
        Promise ``incoming`` bytes to one upload, or refuse it (507) if with what is
        already promised that would leave less than ``min_free_bytes`` of ``free``.
        """
        incoming = max(0, incoming)
        with self._lock:
            if free - self.reserved - incoming < self.min_free_bytes:
                raise StorageError(507, "insufficient storage")
            self.reserved += incoming
        return Reservation(self, incoming)

    def _give_back(self, reservation: Reservation, count: int | None) -> None:
        """Take ``count`` bytes (all if None) off ``reservation`` and off the ledger."""
        with self._lock:
            taken = reservation.remaining if count is None else min(count, reservation.remaining)
            reservation.remaining -= taken
            self.reserved -= taken
            if count is not None:
                self.written += count


class Reservation:
    """
    Free space promised to one upload in flight (``Store.reserve``): counted by every
    later admission in this process until the upload ends, and shrunk as its bytes reach
    the disk (they are then counted by ``statvfs`` instead).  ``release`` is idempotent.
    """

    __slots__ = ("_ledger", "remaining")

    def __init__(self, ledger: ReservationLedger, amount: int) -> None:
        self._ledger = ledger
        self.remaining = amount

    def consume(self, count: int) -> None:
        """``count`` bytes of the upload were written: no longer promised, now used."""
        self._ledger._give_back(self, count)

    def release(self) -> None:
        self._ledger._give_back(self, None)
