"""Leases: what a prepared store or load holds until its commit, its completion or its expiry.

A store lease holds the top-tier slots its client writes; a load lease pins the top-tier
copies its client reads (each pin counts in the copy's ``readers``). The slots of an expired
store lease are *quarantined* for another lease period before reuse: a client that stalled
mid-copy and resumes late then writes into space nobody owns, not into another block.

Invariants (checked by :mod:`kvd.core.check`): a load lease's pin is counted once in its
copy's ``readers`` while the copy is its block's top-tier copy; a quarantined slot stays
allocated in the top tier until its release time.
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass

from kvd.core.catalog import BlockRecord, Copy
from kvd.core.errors import InvalidArgument, UnknownLease
from kvd.core.types import CoreConfig
from kvd.media import Slot


@dataclass(slots=True)
class StoreLease:
    id: str
    namespace: str
    expires_at: float
    session_id: str | None
    # One entry per requested block: (record, new top-tier copy) to write, or None (held).
    items: list[tuple[BlockRecord, Copy] | None]
    # Hashes this store's chain runs through that were held when it was granted: the held
    # blocks it names and the parent it continues. One gone by the commit cuts the chain.
    held: frozenset[int] = frozenset()


@dataclass(slots=True)
class LoadLease:
    id: str
    namespace: str
    expires_at: float
    # One entry per requested hash: (record, pinned top-tier copy), or None (not held).
    items: list[tuple[BlockRecord, Copy] | None]


class LeaseTable:
    """The leases under way, their ids and durations, and the quarantined slots.

    ``prefix`` starts every lease id (a daemon's epoch, so that ids never repeat across
    restarts). Durations are seconds on the core's clock."""

    def __init__(self, config: CoreConfig, prefix: str = "") -> None:
        self.config = config
        self.stores: dict[str, StoreLease] = {}
        self.loads: dict[str, LoadLease] = {}
        self._ids = itertools.count(1)
        self._prefix = prefix
        self._quarantine: deque[tuple[float, Slot]] = deque()  # (release time, top-tier slot)

    def __len__(self) -> int:
        return len(self.stores) + len(self.loads)

    def duration(self, requested: float) -> float:
        """Seconds a lease asked for ``requested`` seconds lasts (0: the default); raises
        InvalidArgument for a negative request."""
        if requested < 0:
            raise InvalidArgument("lease_seconds must not be negative")
        return min(requested or self.config.lease_seconds, self.config.max_lease_seconds)

    def new_id(self, kind: str) -> str:
        return f"{self._prefix}{kind}{next(self._ids)}"

    def store(self, lease_id: str) -> StoreLease:
        lease = self.stores.get(lease_id)
        if lease is None:
            raise UnknownLease(f"store lease {lease_id!r} is unknown or expired")
        return lease

    def load(self, lease_id: str) -> LoadLease:
        lease = self.loads.get(lease_id)
        if lease is None:
            raise UnknownLease(f"load lease {lease_id!r} is unknown or expired")
        return lease

    def alive(self, lease_id: str, now: float) -> bool:
        """Whether a store or load lease exists and its time is not up."""
        lease = self.stores.get(lease_id) or self.loads.get(lease_id)
        return lease is not None and lease.expires_at > now

    def expired_stores(self, now: float) -> list[StoreLease]:
        """Take out and return the store leases whose time is up."""
        return [self.stores.pop(i) for i in [i for i, lease in self.stores.items() if lease.expires_at <= now]]

    def expired_loads(self, now: float) -> list[str]:
        """Ids of the load leases whose time is up (they stay until completed)."""
        return [i for i, lease in self.loads.items() if lease.expires_at <= now]

    def items(self) -> Iterator[tuple[BlockRecord, Copy]]:
        """Every (record, copy) a lease names, stores first."""
        for leases in (self.stores, self.loads):
            for lease in leases.values():
                for item in lease.items:
                    if item is not None:
                        yield item

    # -- quarantine -----------------------------------------------------------------------
    def quarantine(self, slot: Slot, now: float) -> None:
        """Hold ``slot`` (still allocated) for a lease period from ``now``."""
        self._quarantine.append((now + self.config.lease_seconds, slot))

    def release_due(self, now: float) -> list[Slot]:
        """Take out the quarantined slots whose time is up; the caller frees them."""
        out = []
        while self._quarantine and self._quarantine[0][0] <= now:
            out.append(self._quarantine.popleft()[1])
        return out

    def quarantined(self) -> list[Slot]:
        return [slot for _, slot in self._quarantine]
