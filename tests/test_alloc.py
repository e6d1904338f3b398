"""ExtentAllocator: exact answers for best fit, coalescing, region boundaries, reserve, and a
seeded random walk checked page by page against a bitmap model."""

from __future__ import annotations

import random

import pytest

from kvd.media import Slot
from kvd.tiers.alloc import ExtentAllocator

P = 4096  # page bytes used throughout


def healthy(a: ExtentAllocator) -> None:
    assert a.check() == []


def pages(start: int, n: int) -> Slot:
    return Slot(start * P, n * P)


def test_fresh_allocator_accounts_all_pages_free() -> None:
    a = ExtentAllocator([(0, 8 * P), (16 * P, 4 * P)], P)
    healthy(a)
    assert a.capacity_bytes == 12 * P
    assert a.free_bytes == 12 * P
    assert a.used_bytes == 0
    assert a.allocated() == []


def test_sizes_round_up_to_whole_pages() -> None:
    a = ExtentAllocator([(0, 8 * P)], P)
    assert a.pages_for(0) == 1
    assert a.pages_for(1) == 1
    assert a.pages_for(P) == 1
    assert a.pages_for(P + 1) == 2
    assert a.slot_bytes(P + 1) == 2 * P
    assert a.allocate(0) == pages(0, 1)
    assert a.allocate(P + 1) == pages(1, 2)
    assert a.used_bytes == 3 * P
    healthy(a)
    with pytest.raises(ValueError):
        a.allocate(-1)
    healthy(a)


def test_best_fit_picks_smallest_sufficient_hole() -> None:
    a = ExtentAllocator([(0, 16 * P)], P)
    s_a = a.allocate(3 * P)  # pages 0-2
    a.allocate(1 * P)  # page 3
    s_c = a.allocate(2 * P)  # pages 4-5
    a.allocate(1 * P)  # page 6; pages 7-15 stay free (9 pages)
    assert (s_a, s_c) == (pages(0, 3), pages(4, 2))
    a.free(s_a)
    a.free(s_c)
    healthy(a)
    # Holes: 3 pages at 0, 2 pages at 4, 9 pages at 7.
    assert a.allocate(2 * P) == pages(4, 2)  # exact fit, not the first hole
    assert a.allocate(1 * P) == pages(0, 1)  # smallest hole that fits is the 3-page one
    assert a.allocate(4 * P) == pages(7, 4)  # only the 9-page hole fits
    assert a.allocate(6 * P) is None  # 5 pages left at 11, 2 at 1
    healthy(a)


def test_equal_holes_tie_break_on_lowest_address() -> None:
    a = ExtentAllocator([(0, 6 * P)], P)
    slots = [a.allocate(P) for _ in range(6)]
    a.free(slots[4])
    a.free(slots[1])
    healthy(a)
    assert a.allocate(P) == pages(1, 1)
    assert a.allocate(P) == pages(4, 1)
    assert a.allocate(P) is None


def test_full_is_none_not_an_error() -> None:
    a = ExtentAllocator([(0, 4 * P)], P)
    assert a.allocate(4 * P) == pages(0, 4)
    assert a.allocate(1) is None
    assert a.free_bytes == 0
    healthy(a)


@pytest.mark.parametrize("order", [(0, 1, 2), (1, 0, 2), (1, 2, 0), (2, 0, 1), (0, 2, 1)])
def test_free_coalesces_neighbours_in_any_order(order: tuple[int, int, int]) -> None:
    a = ExtentAllocator([(0, 6 * P)], P)
    slots = [a.allocate(2 * P) for _ in range(3)]
    assert slots == [pages(0, 2), pages(2, 2), pages(4, 2)]
    for i in order:
        a.free(slots[i])
        healthy(a)
    assert a.allocate(6 * P) == pages(0, 6)  # one run again
    healthy(a)


def test_no_run_across_adjacent_region_boundary() -> None:
    # Two slab files laid end to end in the address space: contiguous addresses, but a run
    # must not straddle them.
    a = ExtentAllocator([(0, 2 * P), (2 * P, 2 * P)], P)
    assert a.allocate(3 * P) is None
    first, second = a.allocate(2 * P), a.allocate(2 * P)
    assert {first, second} == {pages(0, 2), pages(2, 2)}
    a.free(first)
    a.free(second)
    healthy(a)
    assert a.allocate(3 * P) is None  # freeing did not merge across the boundary
    assert a.free_bytes == 4 * P


def test_regions_with_gaps_and_unsorted_input() -> None:
    a = ExtentAllocator([(10 * P, 2 * P), (0, 3 * P)], P)
    assert a.capacity_bytes == 5 * P
    assert a.allocate(3 * P) == pages(0, 3)
    assert a.allocate(P) == pages(10, 1)
    assert a.allocate(2 * P) is None
    healthy(a)


def test_bad_regions_and_page_sizes_rejected() -> None:
    with pytest.raises(ValueError):
        ExtentAllocator([(0, 4 * P)], 3000)
    with pytest.raises(ValueError):
        ExtentAllocator([(0, 4 * P)], 0)
    with pytest.raises(ValueError):
        ExtentAllocator([(100, 4 * P)], P)
    with pytest.raises(ValueError):
        ExtentAllocator([(0, 4 * P + 1)], P)
    with pytest.raises(ValueError):
        ExtentAllocator([(0, 0)], P)
    with pytest.raises(ValueError):
        ExtentAllocator([(0, 4 * P), (3 * P, 4 * P)], P)


def test_reserve_splits_free_run_and_rejects_taken_pages() -> None:
    a = ExtentAllocator([(0, 8 * P), (8 * P, 4 * P)], P)
    a.reserve(pages(3, 2))
    healthy(a)
    assert a.is_allocated(pages(3, 2))
    assert a.used_bytes == 2 * P
    # Free runs now: 3 pages at 0, 3 pages at 5, 4 pages at 8 (second region).
    assert a.allocate(3 * P) == pages(0, 3)
    assert a.allocate(3 * P) == pages(5, 3)
    healthy(a)
    for bad in (pages(4, 1), pages(2, 2), pages(7, 2), pages(12, 1), pages(20, 1)):
        with pytest.raises(ValueError):
            a.reserve(bad)
        healthy(a)
    a.reserve(pages(8, 4))  # a whole region
    assert a.free_bytes == 0
    healthy(a)


def test_reserve_cannot_straddle_regions() -> None:
    a = ExtentAllocator([(0, 2 * P), (2 * P, 2 * P)], P)
    with pytest.raises(ValueError):
        a.reserve(pages(1, 2))
    healthy(a)
    assert a.free_bytes == 4 * P


def test_reserved_slot_frees_and_coalesces_like_allocated() -> None:
    a = ExtentAllocator([(0, 8 * P)], P)
    a.reserve(pages(2, 3))
    a.free(pages(2, 3))
    healthy(a)
    assert a.allocate(8 * P) == pages(0, 8)


def test_free_of_unallocated_or_misshapen_slot_raises() -> None:
    a = ExtentAllocator([(0, 8 * P)], P)
    s = a.allocate(2 * P)
    with pytest.raises(ValueError):
        a.free(pages(4, 1))  # never allocated
    with pytest.raises(ValueError):
        a.free(Slot(s.offset, P))  # wrong length
    with pytest.raises(ValueError):
        a.free(Slot(s.offset + P, P))  # interior of an allocation
    with pytest.raises(ValueError):
        a.free(Slot(1, P))  # not page aligned
    healthy(a)
    a.free(s)
    with pytest.raises(ValueError):
        a.free(s)  # twice
    healthy(a)
    assert a.free_bytes == 8 * P


def test_allocated_lists_slots_in_address_order() -> None:
    a = ExtentAllocator([(0, 8 * P)], P)
    s1, s2, s3 = a.allocate(P), a.allocate(3 * P), a.allocate(2 * P)
    a.free(s2)
    assert a.allocated() == [s1, s3]
    assert a.is_allocated(s3) and not a.is_allocated(s2)


def test_reserve_many_scattered_slots_is_fast() -> None:
    # Warm restart reserves one slot per manifest entry: must not be quadratic.
    n = 20_000
    a = ExtentAllocator([(0, 2 * n * P)], P)
    for i in range(n):
        a.reserve(pages(2 * i + 1, 1))
    assert a.used_bytes == n * P
    assert a.allocate(2 * P) is None
    assert a.allocate(P) == pages(0, 1)


# -- randomized comparison against a page bitmap ----------------------------------------


class BitmapModel:
    """The allocator's contract spelled out page by page: free runs are the maximal runs
    of free pages inside one region; allocation takes the shortest run that fits, lowest
    address on ties, from its start."""

    def __init__(self, regions: list[tuple[int, int]]) -> None:
        self.regions = [(s // P, n // P) for s, n in sorted(regions)]
        top = max(s + n for s, n in self.regions)
        self.used = [True] * top  # pages outside every region are never free
        for s, n in self.regions:
            for p in range(s, s + n):
                self.used[p] = False
        self.slots: dict[int, int] = {}  # start page -> pages

    def free_runs(self) -> list[tuple[int, int]]:
        runs = []
        for s, n in self.regions:
            p = s
            while p < s + n:
                if self.used[p]:
                    p += 1
                    continue
                q = p
                while q < s + n and not self.used[q]:
                    q += 1
                runs.append((p, q - p))
                p = q
        return runs

    def allocate(self, n: int) -> Slot | None:
        fits = [(length, start) for start, length in self.free_runs() if length >= n]
        if not fits:
            return None
        _, start = min(fits)
        self.mark(start, n)
        return pages(start, n)

    def mark(self, start: int, n: int) -> None:
        for p in range(start, start + n):
            self.used[p] = True
        self.slots[start] = n

    def free(self, start: int) -> None:
        for p in range(start, start + self.slots.pop(start)):
            self.used[p] = False

    def free_pages(self) -> int:
        return sum(length for _, length in self.free_runs())


@pytest.mark.parametrize("seed", range(6))
def test_random_walk_matches_bitmap_model(seed: int) -> None:
    rng = random.Random(seed)
    regions = [(0, 13 * P), (13 * P, 7 * P), (24 * P, 16 * P), (40 * P, 1 * P)]
    a = ExtentAllocator(regions, P)
    model = BitmapModel(regions)
    for _ in range(600):
        op = rng.random()
        if op < 0.45:
            nbytes = rng.randint(0, 6 * P)
            got = a.allocate(nbytes)
            assert got == model.allocate(a.pages_for(nbytes))
        elif op < 0.85 and model.slots:
            start = rng.choice(sorted(model.slots))
            a.free(pages(start, model.slots[start]))
            model.free(start)
        elif op < 0.95:
            runs = model.free_runs()
            if runs:
                start, length = rng.choice(runs)
                off = rng.randrange(length)
                n = rng.randint(1, length - off)
                a.reserve(pages(start + off, n))
                model.mark(start + off, n)
        else:
            # Reserving anything that touches a used page must fail and change nothing.
            taken = [p for p in range(len(model.used)) if model.used[p]]
            p = rng.choice(taken)
            with pytest.raises(ValueError):
                a.reserve(pages(p, 1))
        healthy(a)
        assert a.free_bytes == model.free_pages() * P
        assert a.allocated() == [pages(s, n) for s, n in sorted(model.slots.items())]


def test_allocate_many_cuts_runs_from_few_extents():
    alloc = ExtentAllocator([(0, 10 * 4096)], 4096)
    hole = alloc.allocate(4096)
    rest = alloc.allocate(9 * 4096)
    alloc.free(hole)  # free: page 0 alone
    alloc.free(rest)  # coalesces: all 10 pages free again
    slots = alloc.allocate_many(8192, 4)
    assert [s.offset // 4096 for s in slots] == [0, 2, 4, 6]
    assert alloc.allocate_many(8192, 4) == [Slot(8 * 4096, 8192)]  # fewer when full
    assert alloc.allocate_many(4096, 1) == []
    assert alloc.check() == []
    for s in slots:
        alloc.free(s)
    assert alloc.check() == [] and alloc.free_bytes == 8 * 4096
    with pytest.raises(ValueError):
        alloc.allocate_many(4096, -1)
