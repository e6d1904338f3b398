"""Loads: a pinned top-tier copy of each held block, promotions from below, the chain kept."""

from __future__ import annotations

import pytest
from core_helpers import (
    NS,
    PAGE,
    FakeClock,
    NotDemoted,
    Overcounting,
    make_core,
    nvme_only,
    removed,
    restore,
    run_mover,
    store,
    store_or_wait,
)

from kvd.core.errors import NoSpace
from kvd.core.manager import CoreConfig, KvCore, LoadGrant, Wait
from kvd.policies import LruPolicy
from kvd.tiers import ExtentAllocator


def test_a_load_makes_its_room_without_dropping_the_chain_it_reads():
    # DRAM 3 over NVMe 1: chain 1 <- 2 <- 3 <- 4 with 3 in NVMe. Promoting 3 for a load
    # needs a DRAM slot: 4 (not yet pinned by the load) must go, and NVMe's only block is
    # 3, which the load reads. Dropping 3 would cut the chain at 3 (the load would find 1
    # and 2 only, and 4 would go as its orphan); 4 goes instead, and the load finds 1-3.
    core, _ = make_core(3, nvme_blocks=1, policy=LruPolicy())
    store(core, 1, 2, 3)
    store_or_wait(core, 4, parent=3)
    assert core.lookup(NS, [1, 2, 3, 4]) == ["dram", "dram", "nvme", "dram"]
    core.take_events()
    grant = core.prepare_load(NS, [1, 2, 3, 4])
    assert isinstance(grant, LoadGrant)
    assert grant.found == ["dram", "dram", "nvme", None]
    assert [(t.record.hash, t.src_tier, t.dst_tier) for t in grant.promotions] == [(3, "nvme", "dram")]
    assert removed(core.take_events()) == [(4, "dram", "evicted")]
    core.complete_transfer(grant.promotions[0])
    core.complete_load(grant.lease_id)
    assert core.lookup(NS, [1, 2, 3, 4]) == ["dram", "dram", "dram"]
    assert core.check() == []


def test_a_load_drops_an_ancestor_of_what_it_reads_when_nothing_else_makes_its_room():
    # DRAM 2 over NVMe 2: 1 and 3 in DRAM, 1's child 2 in NVMe. Loading 2 needs a DRAM slot:
    # 3 is pinned, and 1 would not be kept below. 1 goes (last of all) and the load is
    # served, rather than refused.
    policy = NotDemoted()
    core, clock = make_core(2, nvme_blocks=2, policy=policy)
    store(core, 1)
    store(core, 2, parent=1)
    clock.now += 1
    store_or_wait(core, 3)  # 2, the least recent (its ancestor was touched after it), goes down
    run_mover(core)
    assert core.lookup(NS, [1, 2]) == ["dram", "nvme"] and core.lookup(NS, [3]) == ["dram"]
    policy.dropped.add((NS, 1))
    core.pin(NS, [3])
    grant = core.prepare_load(NS, [2])
    assert isinstance(grant, LoadGrant) and grant.found == ["nvme"]
    core.complete_transfer(grant.promotions[0])
    core.complete_load(grant.lease_id)
    assert core.lookup(NS, [1]) == [] and core.check() == []


def test_a_load_from_below_makes_room_for_all_its_promotions_at_once():
    # DRAM 2 over NVMe 4, no write-behind: 1 and 2 on NVMe, 3 and 4 filling DRAM. Loading
    # [1, 2] plans both demotions in one answer; asked block by block, each Wait planned one,
    # a mover round per block of the load.
    core, _ = make_core(2, nvme_blocks=4)
    for h in (1, 2, 3, 4):
        store_or_wait(core, h)
        run_mover(core)
    assert core.lookup(NS, [1]) == ["nvme"] and core.lookup(NS, [2]) == ["nvme"]
    assert isinstance(core.prepare_load(NS, [1, 2]), Wait)
    demotions = core.take_demotions()
    assert sorted(t.record.hash for t in demotions) == [3, 4]
    for transfer in demotions:
        core.complete_transfer(transfer)
    grant = core.prepare_load(NS, [1, 2])
    assert isinstance(grant, LoadGrant) and len(grant.promotions) == 2
    for transfer in grant.promotions:
        core.complete_transfer(transfer)
    core.complete_load(grant.lease_id)
    assert core.lookup(NS, [1]) == ["dram"] and core.lookup(NS, [3]) == ["nvme"]
    assert core.check() == []


def test_load_touches_and_protects_from_eviction():
    core, _ = make_core(3)
    store(core, 1)
    store(core, 2)
    store(core, 3)
    grant = core.prepare_load(NS, [1])  # 1 becomes most recent and is pinned
    assert isinstance(grant, LoadGrant) and grant.promotions == []
    core.take_events()
    store(core, 4)
    assert removed(core.take_events()) == [(2, "dram", "evicted")]
    core.complete_load(grant.lease_id)
    assert core.check() == []


def test_load_promotes_nvme_only_block_through_dram():
    core, _ = make_core(1, nvme_blocks=4, write_behind=True)
    nvme_only(core)
    assert core.lookup(NS, [1, 2]) == ["nvme", "dram"]
    grant = core.prepare_load(NS, [1])
    assert isinstance(grant, LoadGrant)
    assert [(t.record.hash, t.src_tier, t.dst_tier) for t in grant.promotions] == [(1, "nvme", "dram")]
    assert core.load_slots(grant.lease_id) == [None]  # not readable before the read lands
    core.complete_transfer(grant.promotions[0])
    slots = core.load_slots(grant.lease_id)
    assert slots[0] is not None and slots[0][1] == PAGE
    assert core.check() == []
    core.complete_load(grant.lease_id)
    assert core.lookup(NS, [1]) == ["dram"]
    assert core.check() == []


def test_a_load_refused_after_its_first_promotion_files_no_promotion():
    """DRAM holds 3 and 4 (4 leased), NVMe holds 1 to 4. A load of 1 and 2 evicts 3 for
    1's promotion and finds no room for 2's: NoSpace, and 1's promotion is undone, also in
    the table a later load consults for promotions in flight."""
    core, _ = make_core(2, nvme_blocks=4, write_behind=True)
    store(core, 1)
    store(core, 2)
    run_mover(core)
    store(core, 3)
    store(core, 4)
    run_mover(core)
    assert core.lookup(NS, [1, 2, 3, 4]) == ["nvme", "nvme", "dram", "dram"]
    pin = core.prepare_load(NS, [4])
    with pytest.raises(NoSpace):
        core.prepare_load(NS, [1, 2])
    assert core.check() == []
    core.complete_load(pin.lease_id)
    grant = core.prepare_load(NS, [1])
    assert isinstance(grant, LoadGrant) and [t.record.hash for t in grant.promotions] == [1]
    core.complete_transfer(grant.promotions[0])
    core.complete_load(grant.lease_id)
    assert core.lookup(NS, [1]) == ["dram"] and core.check() == []


def test_a_second_load_waits_for_a_promotion_in_flight():
    core, _ = make_core(1, nvme_blocks=4, write_behind=True)
    nvme_only(core)
    first = core.prepare_load(NS, [1])
    second = core.prepare_load(NS, [1, 1])
    assert second.promotions == [] and second.awaiting == first.promotions * 2
    assert core.check() == []
    core.complete_transfer(first.promotions[0])
    assert not core.is_inflight(first.promotions[0])
    assert core.load_slots(second.lease_id) == core.load_slots(first.lease_id) * 2
    core.complete_load(first.lease_id)
    core.complete_load(second.lease_id)
    assert core.check() == []


def test_a_load_whose_promotion_room_the_allocator_cannot_cut_waits_and_keeps_nothing():
    dram = Overcounting(ExtentAllocator([(0, PAGE)], PAGE))
    nvme = ExtentAllocator([(0, 2 * PAGE)], PAGE)
    core = KvCore({"dram": dram, "nvme": nvme}, LruPolicy(), FakeClock(), CoreConfig(write_behind=False))
    core.register_namespace(NS, 16, PAGE)
    restore(core, "nvme", 1)
    restore(core, "dram", 2)  # DRAM is full; the space says it has a slot more
    assert core.prepare_load(NS, [1]) == Wait(0)
    assert core.lease_count == 0 and not core.transfers.inflight and core.check() == []
    dram.lie = False
    grant = core.prepare_load(NS, [1])
    assert isinstance(grant, Wait)  # now 2 goes down to NVMe first
    run_mover(core)
    grant = core.prepare_load(NS, [1])
    assert isinstance(grant, LoadGrant) and [t.record.hash for t in grant.promotions] == [1]
