"""The tier interface: storage mechanism only — bytes at slots, no decisions.

A tier owns an address space (``space``, a pure :class:`ExtentAllocator`) and moves bytes in
and out of the slots it hands out. It never decides *what* to keep: the core asks the policy
for victims and calls ``free``. Tiers never import policies or the core.

Units: every size is bytes; slots are page-aligned runs (see :mod:`kvd.tiers.alloc`).
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod

from kvd.media import TIER_CODES, TIER_NAMES, Buffer, Slot, byte_view
from kvd.tiers.alloc import ExtentAllocator

__all__ = ["TIER_CODES", "TIER_NAMES", "Buffer", "CorruptBlockError", "Slot", "Tier", "byte_view"]


class CorruptBlockError(Exception):
    """A slot's bytes do not match the checksum recorded when they were written."""


class Tier(ABC):
    """Bytes at slots. Subclasses: DramArena (shared memory), NvmeStore (slab files),
    HbmPool (GPU memory). Slot bookkeeping is thread-safe under ``_lock`` (the core
    allocates on the event loop while I/O threads free)."""

    name: str
    space: ExtentAllocator
    _lock: threading.Lock

    @property
    def capacity_bytes(self) -> int:
        return self.space.capacity_bytes

    @property
    def used_bytes(self) -> int:
        return self.space.used_bytes

    @property
    def largest_region_bytes(self) -> int:
        return self.space.largest_region_bytes

    def slot_bytes(self, nbytes: int) -> int:
        """Bytes a block of ``nbytes`` occupies here (rounded up to whole pages)."""
        return self.space.slot_bytes(nbytes)

    def free_slots(self, nbytes: int, at_most: int) -> int:
        """How many slots for ``nbytes`` allocation would find now, counted up to ``at_most``."""
        with self._lock:
            return self.space.free_slots(nbytes, at_most)

    def allocate(self, nbytes: int) -> Slot | None:
        """A slot for ``nbytes`` or None when full. Pure bookkeeping, no I/O."""
        with self._lock:
            return self.space.allocate(nbytes)

    def allocate_many(self, nbytes: int, count: int) -> list[Slot]:
        """Up to ``count`` slots of ``nbytes`` (fewer when full). Pure bookkeeping."""
        with self._lock:
            return self.space.allocate_many(nbytes, count)

    def free(self, slot: Slot) -> None:
        """Return a slot. Raises ValueError for a slot that is not allocated."""
        with self._lock:
            self.space.free(slot)

    def is_allocated(self, slot: Slot) -> bool:
        return self.space.is_allocated(slot)

    @staticmethod
    def _fitting(slot: Slot, data: Buffer) -> memoryview:
        """``data`` as read-only bytes; ValueError when they do not fit in ``slot``."""
        src = byte_view(data, writable=False)
        if src.nbytes > slot.length:
            raise ValueError(f"{src.nbytes} bytes do not fit in {slot}")
        return src

    @abstractmethod
    def write(self, slot: Slot, data: Buffer) -> None:
        """Store ``data`` (at most ``slot.length`` bytes) in ``slot``.

        Durable on return for a persistent tier. Raises ValueError if ``data`` is longer
        than the slot or the slot is not allocated; OSError when the medium fails.
        """

    @abstractmethod
    def read_into(self, slot: Slot, nbytes: int, out: Buffer) -> None:
        """Copy the first ``nbytes`` of ``slot`` into the writable buffer ``out``.

        Raises CorruptBlockError when the tier keeps checksums and they disagree.
        """

    @abstractmethod
    def check(self) -> list[str]:
        """Invariant violations as human-readable lines; empty when healthy."""

    @abstractmethod
    def close(self) -> None:
        """Release OS resources (mappings, file descriptors, databases)."""
