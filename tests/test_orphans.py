"""Orphans: a block's held descendants go with its last copy; those in use go when that ends."""

from __future__ import annotations

from core_helpers import (
    NS,
    Valued,
    child_on_its_way_down,
    make_core,
    removed,
    restore,
    run_mover,
    specs,
    store,
    store_or_wait,
    two_tiers,
)

from kvd.core.manager import KvCore, LoadGrant, StoreGrant, Wait
from kvd.core.types import Outcome
from kvd.policies import LruPolicy


def test_a_dropped_blocks_held_descendants_go_with_it_in_every_tier():
    # DRAM 4 over NVMe 2. Chain 1 <- 2 <- 3 <- 4 and a branch 2 <- 5: 1 and 2 sit in NVMe,
    # 3, 4 and 5 in DRAM, beside 7, DRAM's victim and worth more than 1. 7 goes down; NVMe
    # drops 1: every block below it is unreachable, wherever it is.
    core = two_tiers(4, 2, Valued(b1=2.0, b2=2.0, b3=1.0, b4=1.0, b5=1.0, b6=9.0, b7=9.0))
    restore(core, "nvme", 1)
    restore(core, "nvme", 2, parent=1)
    restore(core, "dram", 7)
    restore(core, "dram", 3, parent=2)
    restore(core, "dram", 4, parent=3)
    restore(core, "dram", 5, parent=2)
    core.take_events()
    store_or_wait(core, 6)
    gone = removed(core.take_events())
    assert gone[0] == (1, "nvme", "evicted")
    assert sorted(gone[1:]) == [(2, "nvme", "orphaned"), (3, "dram", "orphaned"), (4, "dram", "orphaned"), (5, "dram", "orphaned")]
    run_mover(core)
    assert core.lookup(NS, [6]) == ["dram"] and core.lookup(NS, [7]) == ["nvme"]
    assert all(core.lookup(NS, [h]) == [] for h in (1, 2, 3, 4, 5))
    assert core.check() == []


def head_below_two_children() -> KvCore:
    """DRAM 3 over NVMe 1: 1 in NVMe, its children 2 and 3 in DRAM beside a root 4, DRAM's
    next victim and worth more than 1."""
    core = two_tiers(3, 1, Valued(b1=2.0, b2=1.0, b3=1.0, b4=5.0, b5=9.0))
    restore(core, "nvme", 1)
    restore(core, "dram", 4)
    restore(core, "dram", 2, parent=1)
    restore(core, "dram", 3, parent=1)
    return core


def test_an_orphan_being_read_stays_until_the_read_ends_and_a_pinned_one_stays():
    core = head_below_two_children()
    assert core.lookup(NS, [1, 2]) == ["nvme", "dram"] and core.lookup(NS, [1, 3]) == ["nvme", "dram"]
    grant = core.prepare_load(NS, [2])
    assert isinstance(grant, LoadGrant)
    core.pin(NS, [3])
    core.take_events()
    store_or_wait(core, 5)  # 4 goes down; NVMe drops 1, its only block; 2 is read, 3 pinned
    assert removed(core.take_events()) == [(1, "nvme", "evicted"), (4, "dram", "demoted")]
    assert core.lookup(NS, [2]) == ["dram"] and core.lookup(NS, [3]) == ["dram"]
    assert core.load_slots(grant.lease_id)[0] is not None  # the reader still has its copy
    core.complete_load(grant.lease_id)
    assert removed(core.take_events()) == [(2, "dram", "orphaned")]
    assert core.lookup(NS, [2]) == [] and core.lookup(NS, [3]) == ["dram"]
    assert core.check() == []


def test_an_orphan_being_moved_down_goes_when_its_move_lands():
    # DRAM 2 over NVMe 2. 1 sits in NVMe, its child 2 is on its way down when making NVMe
    # room for 3 drops 1: 2's copies are being read and written, so they stay until the
    # move lands, and then the copy it made goes too, instead of holding NVMe's slot.
    core, moving = child_on_its_way_down()
    assert (moving.record.hash, moving.dst_tier) == (2, "nvme")
    core.take_events()
    assert isinstance(core.prepare_store(NS, specs(4)), Wait)  # 3 must go down: NVMe drops 1
    assert removed(core.take_events()) == [(1, "nvme", "evicted")]
    assert core.lookup(NS, [2]) == ["dram"]  # still read by its move
    core.complete_transfer(moving)
    assert removed(core.take_events()) == [(2, "dram", "demoted"), (2, "nvme", "orphaned")]
    store_or_wait(core, 4)  # into 2's old slot
    run_mover(core)  # 3's move down lands
    assert core.lookup(NS, [2]) == [] and core.lookup(NS, [3]) == ["nvme"] and core.lookup(NS, [4]) == ["dram"]
    assert core.check() == []


def test_an_orphan_whose_head_is_stored_again_before_its_read_ends_stays():
    core = head_below_two_children()
    grant = core.prepare_load(NS, [2])
    store_or_wait(core, 5)  # 4 goes down: NVMe drops 1, and 3 goes with it; 2 is read
    assert core.lookup(NS, [1]) == [] and core.lookup(NS, [3]) == [] and core.lookup(NS, [2]) == ["dram"]
    store_or_wait(core, 1)  # the engine recomputed 1 and stores it again
    core.take_events()
    core.complete_load(grant.lease_id)
    assert removed(core.take_events()) == []
    assert core.lookup(NS, [1, 2]) == ["dram", "dram"]
    assert core.check() == []


def test_an_orphan_goes_when_the_store_that_would_have_reconnected_it_expires():
    core, clock = make_core(2)
    store(core, 1)
    store(core, 2, parent=1)
    grant = core.prepare_load(NS, [2])
    store(core, 9)  # 1 goes; 2, being read, stays
    restore = core.prepare_store(NS, specs(1))  # the engine writes 1 again (9 makes way)
    assert isinstance(restore, StoreGrant)
    core.complete_load(grant.lease_id)
    assert core.lookup(NS, [2]) == ["dram"]  # 1 is coming back: 2 stays
    core.take_events()
    clock.now += 11  # the store of 1 never commits
    core.expire_leases()
    assert removed(core.take_events()) == [(2, "dram", "orphaned")]
    assert core.lookup(NS, [2]) == [] and core.lookup(NS, [1]) == []
    assert core.check() == []


def test_a_corrupt_last_copys_healthy_descendants_stay():
    # Unlike an eviction's: the engine's next store of the chain writes the lost block
    # alone and finds the rest held.
    core, _ = make_core(1, nvme_blocks=4, write_behind=True)
    store(core, 1)
    run_mover(core)
    store(core, 2, parent=1)  # 1 leaves DRAM: NVMe has it
    run_mover(core)
    assert core.lookup(NS, [1, 2]) == ["nvme", "dram"]
    grant = core.prepare_load(NS, [1])  # 2's DRAM copy makes way (NVMe has it too)
    core.take_events()
    core.complete_transfer(grant.promotions[0], Outcome.CORRUPT)
    assert removed(core.take_events()) == [(1, "nvme", "corrupt")]
    core.complete_load(grant.lease_id)
    assert core.lookup(NS, [2]) == ["nvme"]
    store(core, 1)
    assert core.lookup(NS, [1, 2]) == ["dram", "nvme"]
    assert core.check() == []


def test_a_write_behind_whose_block_making_room_orphaned_is_not_planned():
    # DRAM 1 over NVMe 1, write-behind. 1 is in NVMe only, its child 2 in DRAM: writing 2
    # down needs NVMe's one slot, and the only block there is 1. It goes, and 2, its
    # orphan, with it: nothing is left to write, and the slot made for it is free again.
    core, _ = make_core(1, nvme_blocks=1, write_behind=True, policy=LruPolicy())
    store(core, 1)
    run_mover(core)  # 1 in DRAM and NVMe
    store(core, 2, parent=1)  # 1 leaves DRAM for free; 2 waits for write-behind
    assert core.lookup(NS, [1, 2]) == ["nvme", "dram"]
    core.take_events()
    assert core.plan_write_behind(8) == []
    assert removed(core.take_events()) == [(1, "nvme", "evicted"), (2, "dram", "orphaned")]
    assert core.spaces["nvme"].used_bytes == 0 and core.spaces["dram"].used_bytes == 0
    assert core.check() == []
