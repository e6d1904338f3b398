"""Extent allocator: contiguous runs of fixed-size pages inside one or more regions.

Pure bookkeeping, no I/O. A tier's address space (bytes of the DRAM arena, bytes of the
NVMe slab files) is cut into pages of ``page_bytes``; a block takes one contiguous run of
pages, so it moves with a single memcpy or a single direct-I/O call.

Invariants (checked by :meth:`check`):
- every page of every region is either in exactly one free extent or in exactly one
  allocated extent;
- free extents never touch each other (they are coalesced on free) and never cross a
  region boundary (a region is one slab file; a run may not straddle two files);
- ``used_bytes + free_bytes == capacity_bytes``.

Allocation is best-fit by run length (a sorted index of free extents by length), so a node
that serves one block geometry never fragments: every freed run fits the next block exactly.
"""

from __future__ import annotations

from sortedcontainers import SortedList

from kvd.media import Slot

__all__ = ["ExtentAllocator", "Slot"]


class ExtentAllocator:
    """Best-fit allocator of page runs over regions ``[(start_bytes, length_bytes), ...]``."""

    def __init__(self, regions: list[tuple[int, int]], page_bytes: int = 4096) -> None:
        if page_bytes <= 0 or page_bytes & (page_bytes - 1):
            raise ValueError(f"page_bytes must be a power of two, got {page_bytes}")
        self.page_bytes = page_bytes
        self._regions: list[tuple[int, int]] = []
        self._free_by_start: dict[int, int] = {}  # start page -> length in pages
        self._free_by_end: dict[int, int] = {}  # end page (exclusive) -> start page
        self._free_sorted: SortedList = SortedList()  # (length, start)
        # Free run starts in address order: reserve() finds the run holding a page by
        # bisection instead of scanning every free run (warm restart reserves one slot per
        # manifest entry, so a scan would make recovery quadratic).
        self._free_starts: SortedList = SortedList()
        self._allocated: dict[int, int] = {}  # start page -> length in pages
        self._region_starts: set[int] = set()
        self._region_ends: set[int] = set()
        self._free_pages = 0
        total = 0
        for start, length in sorted(regions):
            if start % page_bytes or length % page_bytes or length <= 0:
                raise ValueError(f"region ({start}, {length}) is not page aligned")
            if self._regions and start < self._regions[-1][0] + self._regions[-1][1]:
                raise ValueError("regions overlap")
            self._regions.append((start, length))
            p0, n = start // page_bytes, length // page_bytes
            self._region_starts.add(p0)
            self._region_ends.add(p0 + n)
            self._add_free(p0, n)
            total += n
        self._total_pages = total
        self._free_pages = total

    # -- public API -----------------------------------------------------------------------
    @property
    def capacity_bytes(self) -> int:
        return self._total_pages * self.page_bytes

    @property
    def free_bytes(self) -> int:
        return self._free_pages * self.page_bytes

    @property
    def used_bytes(self) -> int:
        return (self._total_pages - self._free_pages) * self.page_bytes

    @property
    def largest_region_bytes(self) -> int:
        """The longest run one slot can ever have (a slot never spans two regions)."""
        return max(length for _, length in self._regions)

    def pages_for(self, nbytes: int) -> int:
        return max(1, -(-nbytes // self.page_bytes))

    def slot_bytes(self, nbytes: int) -> int:
        """Bytes a block of ``nbytes`` occupies (rounded up to whole pages)."""
        return self.pages_for(nbytes) * self.page_bytes

    def free_slots(self, nbytes: int, at_most: int) -> int:
        """How many runs for ``nbytes`` :meth:`allocate_many` would find now, counted up to
        ``at_most`` (longest free extents first, so a roomy space answers at once)."""
        n = self.pages_for(nbytes)
        found = 0
        for length, _ in reversed(self._free_sorted):
            if found >= at_most or length < n:
                break
            found += length // n
        return min(found, at_most)

    def allocate(self, nbytes: int) -> Slot | None:
        """A run for ``nbytes``, or None when no free run is long enough ("full" is a result).

        Raises ValueError for a negative size.
        """
        if nbytes < 0:
            raise ValueError(f"nbytes must be >= 0, got {nbytes}")
        n = self.pages_for(nbytes)
        i = self._free_sorted.bisect_left((n, -1))
        if i == len(self._free_sorted):
            return None
        length, start = self._free_sorted[i]
        self._remove_free(start, length)
        if length > n:
            self._add_free(start + n, length - n)
        self._allocated[start] = n
        self._free_pages -= n
        return Slot(start * self.page_bytes, n * self.page_bytes)

    def allocate_many(self, nbytes: int, count: int) -> list[Slot]:
        """Up to ``count`` runs of ``nbytes`` each (fewer when space runs out), cut from as
        few free extents as possible: one index update per extent, not per run."""
        if count < 0:
            raise ValueError(f"count must not be negative, got {count}")
        n = self.pages_for(nbytes)
        out: list[Slot] = []
        pb = self.page_bytes
        while len(out) < count and self._free_sorted:
            want = count - len(out)
            i = self._free_sorted.bisect_left((want * n, -1))
            length, start = self._free_sorted[min(i, len(self._free_sorted) - 1)]
            take = min(want, length // n)
            if take == 0:
                break  # even the largest free extent is too short
            self._remove_free(start, length)
            if length > take * n:
                self._add_free(start + take * n, length - take * n)
            for j in range(take):
                self._allocated[start + j * n] = n
                out.append(Slot((start + j * n) * pb, n * pb))
            self._free_pages -= take * n
        return out

    def reserve(self, slot: Slot) -> None:
        """Mark a specific run allocated (warm restart rebuilds the map from a manifest).

        Raises ValueError when any page of the run is not free.
        """
        p0, n = self._pages_of(slot)
        i = self._free_starts.bisect_right(p0) - 1
        if i < 0:
            raise ValueError(f"{slot} is not free")
        start = self._free_starts[i]
        length = self._free_by_start[start]
        if p0 + n > start + length:
            raise ValueError(f"{slot} is not free")
        self._remove_free(start, length)
        if p0 > start:
            self._add_free(start, p0 - start)
        if start + length > p0 + n:
            self._add_free(p0 + n, start + length - p0 - n)
        self._allocated[p0] = n
        self._free_pages -= n

    def free(self, slot: Slot) -> None:
        """Return a run. Raises ValueError for a run that is not allocated exactly so."""
        p0, n = self._pages_of(slot)
        if self._allocated.get(p0) != n:
            raise ValueError(f"{slot} is not allocated")
        del self._allocated[p0]
        self._free_pages += n
        start, length = p0, n
        # Coalesce with neighbours, but never across a region (slab file) boundary.
        if start not in self._region_starts and start in self._free_by_end:
            left = self._free_by_end[start]
            left_len = self._free_by_start[left]
            self._remove_free(left, left_len)
            start, length = left, left_len + length
        end = start + length
        if end not in self._region_ends and end in self._free_by_start:
            right_len = self._free_by_start[end]
            self._remove_free(end, right_len)
            length += right_len
        self._add_free(start, length)

    def is_allocated(self, slot: Slot) -> bool:
        p0, n = self._pages_of(slot)
        return self._allocated.get(p0) == n

    def allocated(self) -> list[Slot]:
        pb = self.page_bytes
        return [Slot(s * pb, n * pb) for s, n in sorted(self._allocated.items())]

    def check(self) -> list[str]:
        """Invariant violations, as human-readable lines; empty when healthy."""
        problems: list[str] = []
        pb = self.page_bytes
        runs = [(s, n, "free") for s, n in self._free_by_start.items()]
        runs += [(s, n, "used") for s, n in self._allocated.items()]
        runs.sort()
        covered = 0
        for region_start, region_len in self._regions:
            p, end = region_start // pb, (region_start + region_len) // pb
            in_region = [r for r in runs if p <= r[0] < end]
            for s, n, kind in in_region:
                if s != p:
                    problems.append(f"pages {p}..{s} of region at {region_start} are lost")
                if s + n > end:
                    problems.append(f"{kind} run at page {s} crosses a region boundary")
                p = s + n
            if p != end:
                problems.append(f"region at {region_start}: pages {p}..{end} unaccounted")
            covered += len(in_region)
        if covered != len(runs):
            problems.append("runs outside every region")
        for s, n in self._free_by_start.items():
            if self._free_by_end.get(s + n) != s:
                problems.append(f"free run at page {s}: end index disagrees")
            nxt = s + n
            if nxt in self._free_by_start and nxt not in self._region_ends:
                problems.append(f"free runs at pages {s} and {nxt} are not coalesced")
        if len(self._free_sorted) != len(self._free_by_start):
            problems.append("size index disagrees with the free map")
        if list(self._free_starts) != sorted(self._free_by_start):
            problems.append("start index disagrees with the free map")
        if self._free_pages != sum(self._free_by_start.values()):
            problems.append("free page count disagrees with the free map")
        if self.used_bytes + self.free_bytes != self.capacity_bytes:
            problems.append("used + free != capacity")
        return problems

    # -- internals ------------------------------------------------------------------------
    def _pages_of(self, slot: Slot) -> tuple[int, int]:
        if slot.offset % self.page_bytes or slot.length % self.page_bytes or slot.length <= 0:
            raise ValueError(f"{slot} is not page aligned")
        return slot.offset // self.page_bytes, slot.length // self.page_bytes

    def _add_free(self, start: int, length: int) -> None:
        self._free_by_start[start] = length
        self._free_by_end[start + length] = start
        self._free_sorted.add((length, start))
        self._free_starts.add(start)

    def _remove_free(self, start: int, length: int) -> None:
        del self._free_by_start[start]
        del self._free_by_end[start + length]
        self._free_sorted.remove((length, start))
        self._free_starts.remove(start)
