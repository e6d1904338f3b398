"""Stores: top-tier slots under a lease, all or nothing, then a commit of what no lookup could miss."""

from __future__ import annotations

import pytest
from core_helpers import (
    NS,
    PAGE,
    FakeClock,
    Overcounting,
    child_on_its_way_down,
    make_core,
    removed,
    run_mover,
    specs,
    store,
    store_or_wait,
)

from kvd.core.errors import InvalidArgument, NoSpace, UnknownLease
from kvd.core.manager import BlockSpec, CoreConfig, KvCore, StoreGrant, Wait
from kvd.policies import LruPolicy
from kvd.tiers import ExtentAllocator


def test_uncommitted_blocks_are_invisible_and_abort_frees_them():
    core, _ = make_core(4)
    grant = core.prepare_store(NS, specs(1, 2))
    assert core.lookup(NS, [1, 2]) == []
    assert core.spaces["dram"].used_bytes == 2 * PAGE
    core.commit_store(grant.lease_id, abort=True)
    assert core.spaces["dram"].used_bytes == 0
    assert core.check() == []
    with pytest.raises(UnknownLease):
        core.commit_store(grant.lease_id)


def test_commit_discards_failed_indexes_and_the_blocks_after_them():
    core, _ = make_core(4)
    grant = core.prepare_store(NS, specs(1, 2, 3))
    assert core.commit_store(grant.lease_id, failed=[1]) == 1
    assert core.lookup(NS, [1, 2, 3]) == ["dram"]
    assert core.lookup(NS, [3]) == []  # unreachable behind the failed block: not kept
    assert core.spaces["dram"].used_bytes == PAGE
    assert core.check() == []


def test_store_of_held_block_asks_for_no_write():
    core, _ = make_core(4)
    store(core, 1)
    grant = core.prepare_store(NS, specs(1, 2, parent=None))
    assert grant.slots[0] is None and grant.slots[1] is not None


def test_bad_block_size_duplicates_and_empty_are_invalid():
    core, _ = make_core(4)
    with pytest.raises(InvalidArgument):
        core.prepare_store(NS, [BlockSpec(1, None, PAGE + 1)])
    with pytest.raises(InvalidArgument):
        core.prepare_store(NS, [BlockSpec(1, None, PAGE), BlockSpec(1, None, PAGE)])
    with pytest.raises(InvalidArgument):
        core.prepare_store(NS, [])
    with pytest.raises(InvalidArgument):
        core.prepare_store(NS, [BlockSpec(1 << 64, None, PAGE)])
    assert core.check() == []


def test_parents_that_would_make_a_cycle_are_invalid():
    core, _ = make_core(8)
    with pytest.raises(InvalidArgument, match="block 0: its parents lead back to itself"):
        core.prepare_store(NS, [BlockSpec(41, 42, PAGE), BlockSpec(42, 41, PAGE)])
    with pytest.raises(InvalidArgument, match="block 0: its parents lead back to itself"):
        core.prepare_store(NS, [BlockSpec(1, 3, PAGE), BlockSpec(2, 1, PAGE), BlockSpec(3, 2, PAGE)])
    with pytest.raises(InvalidArgument, match="cannot be its own parent"):
        core.prepare_store(NS, [BlockSpec(7, 7, PAGE)])
    # 42 held with parent 41 (not held): storing 41 under 42 would close the loop.
    store(core, 42, parent=41)
    with pytest.raises(InvalidArgument, match="block 0: its parents lead back to itself"):
        core.prepare_store(NS, [BlockSpec(41, 42, PAGE)])
    # The same blocks the right way round are a chain.
    store(core, 41)
    assert core.check() == []


def test_a_commit_discards_before_anything_becomes_readable_whatever_the_blocks_order():
    # A child listed before its parent, and the parent fails: both go, and the policy never
    # hears of a block that is gone.
    core, _ = make_core(4)
    grant = core.prepare_store(NS, [BlockSpec(2, 1, PAGE), BlockSpec(1, None, PAGE)])
    assert core.commit_store(grant.lease_id, failed=[1]) == 0
    assert core.lookup(NS, [2]) == [] and core.spaces["dram"].used_bytes == 0
    assert core.check() == []


def test_a_store_continuing_a_chain_whose_parent_is_not_held_yet_is_stored():
    # A client pipelines a long chain's batches: the second batch's prepare may reach the
    # core before the first's. It is stored; once the first lands, the chain is whole.
    core, _ = make_core(4)
    second = core.prepare_store(NS, specs(3, 4, parent=2))
    store(core, 1, 2)
    assert core.commit_store(second.lease_id) == 2
    assert core.lookup(NS, [1, 2, 3, 4]) == ["dram"] * 4
    assert core.check() == []


def test_a_store_whose_room_cut_the_chain_it_continues_writes_nothing():
    # DRAM 2 over NVMe 2, a tier-local LRU. Chain 1 <- 2 sits in NVMe, 7 and 8 in DRAM.
    # Storing 3 after 2 pushes 7 down, and NVMe drops its oldest block, 2: 3 would be
    # unreachable behind it, so the store writes nothing.
    core, clock = make_core(2, nvme_blocks=2, policy=LruPolicy())
    for hashes, parent in (((1,), None), ((2,), 1), ((7,), None), ((8,), None)):
        store_or_wait(core, *hashes, parent=parent)
        clock.now += 1
    assert core.lookup(NS, [1, 2]) == ["nvme", "nvme"] and core.lookup(NS, [7]) == ["dram"]
    core.take_events()
    store_or_wait(core, 3, parent=2)
    run_mover(core)
    assert removed(core.take_events()) == [(2, "nvme", "evicted"), (7, "dram", "demoted")]
    assert core.lookup(NS, [1, 2, 3]) == ["nvme"] and core.lookup(NS, [3]) == []
    assert core.spaces["dram"].used_bytes == PAGE  # 8 alone
    assert core.check() == []


def test_a_store_whose_room_cut_the_chain_above_its_parent_writes_nothing():
    # As in the move test above: 1 in NVMe, its child 2 on its way down. Storing 5 after 2
    # sends 3 down, and NVMe drops 1 for it: 2 is still held (being moved) but no lookup
    # can reach it, nor 5 behind it.
    core, moving = child_on_its_way_down()
    grant = core.prepare_store(NS, specs(5, parent=2))
    assert isinstance(grant, StoreGrant) and grant.slots == [None]
    assert core.commit_store(grant.lease_id) == 0
    core.complete_transfer(moving)  # and the orphan it carried goes
    assert core.lookup(NS, [2]) == [] and core.lookup(NS, [5]) == []
    assert core.check() == []


def test_a_store_whose_parent_goes_before_its_commit_commits_nothing_after_it():
    core, _ = make_core(3)
    store(core, 1)
    grant = core.prepare_store(NS, specs(2, 3, parent=1))  # fills DRAM: 1 is the only victim
    store(core, 9)  # 1 goes; 2 and 3, being written, stay until the commit
    assert core.commit_store(grant.lease_id) == 0
    assert core.lookup(NS, [2]) == [] and core.lookup(NS, [9]) == ["dram"]
    assert core.spaces["dram"].used_bytes == PAGE
    assert core.check() == []


def test_all_leased_is_no_space():
    core, _ = make_core(2)
    store(core, 1, 2)
    grant = core.prepare_load(NS, [1, 2])
    with pytest.raises(NoSpace):
        core.prepare_store(NS, specs(3))
    assert core.check() == []
    core.complete_load(grant.lease_id)
    store(core, 3)


def test_a_store_is_refused_when_only_quarantined_written_and_loaded_slots_fill_the_tier():
    # DRAM 3: an expired store's quarantined slot, a store being written, a block a load
    # pins. Nothing can go, so a store of one more block is refused and evicts nothing;
    # once the load ends, the pinned block is its victim.
    core, clock = make_core(3)
    store(core, 1)
    core.prepare_store(NS, specs(2))
    clock.now += 10.1
    assert core.expire_leases() == 1
    writing = core.prepare_store(NS, specs(3))
    load = core.prepare_load(NS, [1])
    core.take_events()
    with pytest.raises(NoSpace, match="tier is smaller, or full of blocks protected by leases"):
        core.prepare_store(NS, specs(4))  # refused before any victim is looked for
    assert removed(core.take_events()) == [] and core.lookup(NS, [1]) == ["dram"]
    core.complete_load(load.lease_id)
    store(core, 4)
    assert removed(core.take_events()) == [(1, "dram", "evicted")]
    assert core.commit_store(writing.lease_id) == 1
    assert core.lookup(NS, [3, 4]) == ["dram", "dram"]
    assert core.check() == []


def test_a_store_that_only_pinned_blocks_keep_out_is_refused_before_evicting_anything():
    core, _ = make_core(2)
    store(core, 1)
    store(core, 2)
    core.pin(NS, [1])
    core.take_events()
    with pytest.raises(NoSpace, match="tier is smaller, or full of blocks protected by leases or pins"):
        core.prepare_store(NS, specs(3, 4))
    assert removed(core.take_events()) == [] and core.lookup(NS, [2]) == ["dram"]
    store(core, 3)  # one block fits: 2 makes room
    assert removed(core.take_events()) == [(2, "dram", "evicted")]
    assert core.check() == []


def test_a_refused_store_evicts_nothing_even_with_page_rounding():
    clock = FakeClock()
    core = KvCore({"dram": ExtentAllocator([(0, 4 * PAGE)], PAGE)}, LruPolicy(), clock)
    core.register_namespace("r", 16, 3000)  # each block takes a whole 4 KiB page
    grant = core.prepare_store("r", [BlockSpec(1, None, 3000), BlockSpec(2, 1, 3000)])
    core.commit_store(grant.lease_id)
    load = core.prepare_load("r", [1])
    core.take_events()
    four = [BlockSpec(h, None, 3000) for h in (6, 7, 8, 9)]  # 12000 bytes, but 4 pages
    with pytest.raises(NoSpace):
        core.prepare_store("r", four)
    assert removed(core.take_events()) == []
    assert core.lookup("r", [1, 2]) == ["dram", "dram"]
    with pytest.raises(NoSpace, match="the DRAM tier holds"):
        core.prepare_store("r", [BlockSpec(h, None, 3000) for h in range(10, 15)])
    core.complete_load(load.lease_id)
    assert core.check() == []


def test_a_store_whose_room_the_allocator_cannot_cut_waits_and_keeps_nothing():
    dram = Overcounting(ExtentAllocator([(0, 2 * PAGE)], PAGE))
    core = KvCore({"dram": dram}, LruPolicy(), FakeClock(), CoreConfig(write_behind=False))
    core.register_namespace(NS, 16, PAGE)
    store(core, 1, 2)  # full; the space says one slot is still free
    assert core.prepare_store(NS, specs(3)) == Wait(0)
    assert dram.used_bytes == 2 * PAGE and core.lease_count == 0 and core.check() == []
    dram.lie = False
    store(core, 3)  # the store asks again: 2, the tail, makes the room
    assert core.lookup(NS, [1, 2]) == ["dram"] and core.lookup(NS, [3]) == ["dram"]
