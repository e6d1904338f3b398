"""Transfers: demotions, write-behind and promotions landing, failing, or corrupt."""

from __future__ import annotations

from core_helpers import (
    NS,
    PAGE,
    make_core,
    nvme_only,
    removed,
    run_mover,
    specs,
    store,
)

from kvd.core.manager import Wait
from kvd.core.types import Outcome


def test_a_corrupt_copy_a_load_pins_is_dropped_but_its_slot_is_quarantined():
    # The write-behind of 1 finds its DRAM copy corrupt while a load pins it, and the
    # load's client may be reading the slot: the block goes, the slot waits a lease period.
    core, clock = make_core(2, nvme_blocks=2, write_behind=True)
    store(core, 1)
    load = core.prepare_load(NS, [1])
    assert core.load_slots(load.lease_id)[0] is not None
    (write,) = core.plan_write_behind(4)
    core.take_events()
    core.complete_transfer(write, Outcome.CORRUPT)
    assert removed(core.take_events()) == [(1, "dram", "corrupt")]
    assert core.lookup(NS, [1]) == [] and core.load_slots(load.lease_id) == [None]
    assert core.spaces["dram"].used_bytes == PAGE and core.check() == []
    core.complete_load(load.lease_id)
    clock.now += 10
    core.expire_leases()
    assert core.spaces["dram"].used_bytes == 0 and core.check() == []


def test_corrupt_promotion_drops_the_block():
    core, _ = make_core(1, nvme_blocks=4, write_behind=True)
    nvme_only(core)
    grant = core.prepare_load(NS, [1])
    core.take_events()
    core.complete_transfer(grant.promotions[0], Outcome.CORRUPT)
    assert core.load_slots(grant.lease_id) == [None]
    assert removed(core.take_events()) == [(1, "nvme", "corrupt")]
    core.complete_load(grant.lease_id)
    assert core.lookup(NS, [1]) == []
    assert core.check() == []


def test_failed_promotion_after_its_lease_expired_keeps_counts_sane():
    core, clock = make_core(1, nvme_blocks=4, write_behind=True)
    nvme_only(core)
    grant = core.prepare_load(NS, [1])
    clock.now += 11
    assert core.expire_leases() == 1
    core.complete_transfer(grant.promotions[0], Outcome.ERROR)
    assert core.check() == []
    assert core.lookup(NS, [1]) == ["nvme"]


def test_a_demotion_that_lands_under_a_load_pin_keeps_the_source():
    core, _ = make_core(2, nvme_blocks=4)
    store(core, 1)
    store(core, 2)
    assert isinstance(core.prepare_store(NS, specs(3)), Wait)
    (demotion,) = core.take_demotions()
    load = core.prepare_load(NS, [1])  # pins 1's DRAM copy while it moves down
    core.complete_transfer(demotion)
    assert core.load_slots(load.lease_id)[0] is not None  # still readable where it was pinned
    assert core.lookup(NS, [1]) == ["dram"]
    assert core.check() == []
    core.complete_load(load.lease_id)
    assert core.check() == []
    assert [b.ready_tiers() for b in core.blocks(NS) if b.hash == 1] == [["dram", "nvme"]]


def test_a_failed_write_behind_is_queued_again():
    core, _ = make_core(2, nvme_blocks=4, write_behind=True)
    store(core, 1)
    (t,) = core.plan_write_behind(10)
    core.complete_transfer(t, Outcome.ERROR)
    assert core.write_behind_pending == 1 and core.lookup(NS, [1]) == ["dram"]
    assert core.check() == []
    assert run_mover(core) == 1
    assert core.write_behind_pending == 0
    assert core.check() == []
