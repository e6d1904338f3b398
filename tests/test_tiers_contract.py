"""The Tier contract, run against every tier: each test holds for DRAM, NVMe and HBM alike,
and ``check()`` must stay empty after every operation. The HBM pool runs on a GPU (marked
``gpu``) and, with torch, on the CPU device too, so its own code is exercised everywhere."""

from __future__ import annotations

import mmap
import random
from collections.abc import Iterator
from pathlib import Path

import pytest

from kvd.media import Slot
from kvd.tiers import Tier
from kvd.tiers.dram import DramArena
from kvd.tiers.nvme import NvmeStore

PAGE = 4096
PAGES = 8


def make_tier(kind: str, root: Path) -> Tier:
    if kind == "dram":
        return DramArena(root / "arena.shm", PAGES * PAGE, PAGE)
    if kind in ("hbm", "hbm-cpu"):
        pytest.importorskip("torch")
        from kvd.tiers.hbm import HbmPool

        return HbmPool(PAGES * PAGE, PAGE, device="cuda" if kind == "hbm" else "cpu")
    # Slabs of 3 pages: capacity 8 pages = slabs of 3 + 3 + 2, so slab edges are exercised.
    return NvmeStore(root / "nvme", PAGES * PAGE, slab_bytes=3 * PAGE, page_bytes=PAGE)


@pytest.fixture(params=["dram", "nvme", "hbm-cpu", pytest.param("hbm", marks=pytest.mark.gpu)])
def tier(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Tier]:
    t = make_tier(request.param, tmp_path)
    ok(t)
    yield t
    ok(t)
    t.close()


def ok(t: Tier) -> None:
    assert t.check() == []


def aligned_buffer(nbytes: int) -> memoryview:
    """Page-aligned memory (what the daemon passes: views into its shm arena)."""
    return memoryview(mmap.mmap(-1, max(nbytes, 1)))[:nbytes]


def test_name_and_capacity(tier: Tier) -> None:
    assert tier.name in ("dram", "nvme", "hbm")
    assert tier.capacity_bytes == PAGES * PAGE
    assert tier.used_bytes == 0


def test_allocate_until_full_returns_none(tier: Tier) -> None:
    slots = []
    while (slot := tier.allocate(PAGE)) is not None:
        slots.append(slot)
        ok(tier)
        assert len(slots) <= PAGES
    assert len(slots) == PAGES
    assert len({s.offset for s in slots}) == PAGES
    assert tier.used_bytes == tier.capacity_bytes
    assert tier.allocate(1) is None
    ok(tier)


@pytest.mark.parametrize("nbytes", [1, 100, PAGE - 1, PAGE, PAGE + 1, 2 * PAGE + 123])
def test_round_trip_random_bytes(tier: Tier, nbytes: int) -> None:
    rng = random.Random(nbytes)
    data = rng.randbytes(nbytes)
    slot = tier.allocate(nbytes)
    assert slot is not None and slot.length >= nbytes and slot.length % PAGE == 0
    ok(tier)
    tier.write(slot, data)
    ok(tier)
    out = bytearray(nbytes)
    tier.read_into(slot, nbytes, out)
    assert bytes(out) == data
    ok(tier)


def test_round_trip_through_aligned_and_unaligned_buffers(tier: Tier) -> None:
    nbytes = PAGE + 777
    data = random.Random(7).randbytes(nbytes)
    slot = tier.allocate(nbytes)
    assert slot is not None
    src = aligned_buffer(nbytes)
    src[:] = data
    tier.write(slot, src)
    ok(tier)
    dst = aligned_buffer(nbytes)
    tier.read_into(slot, nbytes, dst)
    assert bytes(dst) == data
    # One byte off page alignment, and a larger-than-needed output whose tail must survive.
    backing = bytearray(b"\xee" * (nbytes + 64))
    tier.read_into(slot, nbytes, memoryview(backing)[1:])
    assert bytes(backing[1 : nbytes + 1]) == data
    assert backing[0] == 0xEE and set(backing[nbytes + 1 :]) == {0xEE}
    ok(tier)


def test_overwrite_replaces_contents(tier: Tier) -> None:
    slot = tier.allocate(3000)
    assert slot is not None
    tier.write(slot, b"a" * 3000)
    tier.write(slot, b"b" * 2000)
    ok(tier)
    out = bytearray(2000)
    tier.read_into(slot, 2000, out)
    assert out == b"b" * 2000


def test_free_and_reuse(tier: Tier) -> None:
    slots = [tier.allocate(PAGE) for _ in range(PAGES)]
    assert all(s is not None for s in slots)
    victim = slots[5]
    assert victim is not None
    tier.write(victim, b"old" * 100)
    tier.free(victim)
    ok(tier)
    assert tier.used_bytes == (PAGES - 1) * PAGE
    again = tier.allocate(PAGE)
    assert again == victim  # the only free page
    ok(tier)
    tier.write(again, b"new" * 50)
    out = bytearray(150)
    tier.read_into(again, 150, out)
    assert out == b"new" * 50
    ok(tier)


def test_write_larger_than_slot_raises(tier: Tier) -> None:
    slot = tier.allocate(PAGE)
    assert slot is not None
    with pytest.raises(ValueError):
        tier.write(slot, bytes(PAGE + 1))
    ok(tier)


def test_free_twice_raises(tier: Tier) -> None:
    slot = tier.allocate(100)
    assert slot is not None
    tier.free(slot)
    ok(tier)
    with pytest.raises(ValueError):
        tier.free(slot)
    ok(tier)
    assert tier.used_bytes == 0


def test_write_to_unallocated_slot_raises(tier: Tier) -> None:
    slot = tier.allocate(PAGE)
    assert slot is not None
    tier.free(slot)
    with pytest.raises(ValueError):
        tier.write(slot, b"x")
    ok(tier)


def test_read_into_too_small_buffer_raises(tier: Tier) -> None:
    slot = tier.allocate(500)
    assert slot is not None
    tier.write(slot, bytes(500))
    with pytest.raises(ValueError):
        tier.read_into(slot, 500, bytearray(499))
    with pytest.raises(ValueError):
        tier.read_into(slot, 500, bytes(500))  # read-only
    ok(tier)


def test_slots_of_a_full_tier_hold_independent_data(tier: Tier) -> None:
    rng = random.Random(1)
    blocks: list[tuple[Slot, bytes]] = []
    while (slot := tier.allocate(PAGE)) is not None:
        data = rng.randbytes(rng.randint(1, PAGE))
        tier.write(slot, data)
        blocks.append((slot, data))
    ok(tier)
    for slot, data in blocks:
        out = bytearray(len(data))
        tier.read_into(slot, len(data), out)
        assert out == data
