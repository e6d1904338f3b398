"""KvCore.plan_prefetch with a hand-written scripted policy: exact transfers and victims."""

from __future__ import annotations

import pytest

from kvd.core.errors import NoSpace
from kvd.core.manager import BlockSpec, CoreConfig, KvCore, StoreGrant, Wait
from kvd.policies import LruPolicy, Prefetch
from kvd.tiers import ExtentAllocator

PAGE = 4096
NS = "m"


class ScriptedPolicy(LruPolicy):
    """LRU, plus prefetches and priorities the test sets (switches, not mocks)."""

    def __init__(self) -> None:
        super().__init__()
        self.due: dict[str, list[tuple[str, int]]] = {}
        self.value: dict[tuple[str, int], float] = {}
        self.keep_below = True
        self.announced = False  # what it names is a guess, or a turn a client announced

    def prefetches(self, tier, now):
        due = self.due.get(tier)
        return iter([Prefetch(list(due), self.announced)] if due else [])

    def priority(self, key, tier, now):
        return self.value.get(key, 0.0)

    def worth_demoting(self, key, tier, now):
        return self.keep_below


def make(dram: int, nvme: int, write_behind: bool = True) -> tuple[KvCore, ScriptedPolicy]:
    policy = ScriptedPolicy()
    spaces = {"dram": ExtentAllocator([(0, dram * PAGE)], PAGE), "nvme": ExtentAllocator([(0, nvme * PAGE)], PAGE)}
    core = KvCore(spaces, policy, lambda: 0.0, CoreConfig(write_behind=write_behind))
    core.register_namespace(NS, 16, PAGE)
    return core, policy


def store(core: KvCore, *hashes: int) -> None:
    grant = core.prepare_store(NS, [BlockSpec(h, None, PAGE) for h in hashes])
    assert isinstance(grant, StoreGrant)
    core.commit_store(grant.lease_id)


def settle(core: KvCore) -> None:
    while transfers := core.take_demotions() or core.plan_write_behind(100):
        for t in transfers:
            core.complete_transfer(t)


def nvme_only(core: KvCore, *hashes: int, filler: list[int]) -> None:
    """``hashes`` end up on NVMe only: stored, written behind, then pushed out by ``filler``."""
    store(core, *hashes)
    settle(core)
    store(core, *filler)
    settle(core)
    assert core.lookup(NS, list(hashes)) == ["nvme"] * len(hashes)


def test_a_due_block_moves_up_into_free_space_and_a_load_waits_for_it():
    core, policy = make(dram=2, nvme=8)
    nvme_only(core, 1, filler=[2, 3])
    core.take_events()
    # Free one DRAM slot by dropping block 3 (its NVMe copy stays).
    core.spaces["dram"].free(core.namespace(NS).blocks[3].copies.pop("dram").slot)
    policy.on_removed("dram", (NS, 3))
    core.namespace(NS).refresh(core.namespace(NS).blocks[3])
    policy.due["dram"] = [(NS, 1)]
    [transfer] = core.plan_prefetch(8)
    assert (transfer.kind, transfer.src_tier, transfer.dst_tier, transfer.record.hash) == ("prefetch", "nvme", "dram", 1)
    assert core.lookup(NS, [1]) == ["nvme"]  # not readable up there until it lands
    grant = core.prepare_load(NS, [1])
    assert grant.promotions == [] and grant.awaiting == [transfer]  # the load waits for it
    core.complete_transfer(transfer)
    assert core.lookup(NS, [1]) == ["dram"]
    assert core.load_slots(grant.lease_id)[0] is not None
    core.complete_load(grant.lease_id)
    assert core.plan_prefetch(8) == []  # up already: not again
    assert core.check() == []


def test_an_announced_turn_makes_way_from_what_is_worth_less_all_or_nothing():
    core, policy = make(dram=2, nvme=8)
    nvme_only(core, 1, 2, filler=[3, 4])  # 3 and 4 are on NVMe too: leaving DRAM costs nothing
    core.take_events()
    policy.announced = True
    # 1 and 2 are due (5.0). 4 is worth less; 3 is worth more: room for one of two, so nothing
    # moves, and nothing is evicted for nothing (the plan is not applied).
    policy.value.update({(NS, 1): 5.0, (NS, 2): 5.0, (NS, 4): 0.0, (NS, 3): 6.0})
    policy.due["dram"] = [(NS, 1), (NS, 2)]
    assert core.plan_prefetch(8) == []
    assert core.take_events() == [] and core.lookup(NS, [3]) == ["dram"] and core.lookup(NS, [4]) == ["dram"]
    policy.value[(NS, 3)] = 1.0  # now both are worth less than what is due
    transfers = core.plan_prefetch(8)
    assert sorted(t.record.hash for t in transfers) == [1, 2]
    removed = [(e.hash, e.tier, e.reason, e.cause) for e in core.take_events() if hasattr(e, "reason")]
    assert sorted(removed) == [(3, "dram", "evicted", "prefetch"), (4, "dram", "evicted", "prefetch")]
    for t in transfers:
        core.complete_transfer(t)
    assert core.lookup(NS, [1, 2]) == ["dram", "dram"] and core.lookup(NS, [3]) == ["nvme"]
    assert core.check() == []


def test_a_guess_makes_way_only_from_worthless_copies():
    core, policy = make(dram=2, nvme=8)
    nvme_only(core, 1, 2, filler=[3, 4])
    core.take_events()
    policy.value.update({(NS, 1): 5.0, (NS, 2): 5.0, (NS, 4): 0.0, (NS, 3): 1.0})
    policy.due["dram"] = [(NS, 1), (NS, 2)]
    assert core.plan_prefetch(8) == [] and core.take_events() == []  # room for one of two: none
    policy.due["dram"] = [(NS, 1)]
    [transfer] = core.plan_prefetch(8)
    assert [(e.hash, e.tier, e.reason) for e in core.take_events() if hasattr(e, "reason")] == [(4, "dram", "evicted")]
    core.complete_transfer(transfer)
    assert core.lookup(NS, [1]) == ["dram"] and core.lookup(NS, [3]) == ["dram"]
    assert core.check() == []


def guess_or_announced(announced: bool) -> tuple[KvCore, ScriptedPolicy]:
    """DRAM 1 holds 5 (no NVMe copy, worth 1.0); NVMe 2 holds the due block 1 (worth 5.0) and
    9 (worth 0.5)."""
    core, policy = make(dram=1, nvme=2, write_behind=False)
    for h in (9, 1):
        core.restore_block(NS, h, None, PAGE, "nvme", core.spaces["nvme"].allocate(PAGE))
    store(core, 5)
    policy.value.update({(NS, 1): 5.0, (NS, 5): 1.0, (NS, 9): 0.5})
    policy.due["dram"] = [(NS, 1)]
    policy.announced = announced
    core.take_events()
    return core, policy


def test_a_guess_pushes_nothing_out_of_the_tier_below():
    # 5 (worthless to a guess) would go down only by pushing 9 out of NVMe: nobody weighed that.
    core, policy = guess_or_announced(announced=False)
    policy.value[(NS, 5)] = 0.0
    assert core.plan_prefetch(8) == [] and core.take_demotions() == [] and core.take_events() == []
    policy.keep_below = False  # now 5 is not worth keeping below: it is dropped, 1 comes up
    [transfer] = core.plan_prefetch(8)
    core.complete_transfer(transfer)
    assert core.lookup(NS, [1]) == ["dram"] and core.lookup(NS, [5]) == []
    assert core.check() == []


def test_an_announced_turn_pushes_what_it_displaces_down_as_a_store_would():
    # 5 goes down and NVMe drops 9, worth less than 5; 1 moves up once 5's move has landed.
    core, policy = guess_or_announced(announced=True)
    assert core.plan_prefetch(8) == []  # its room comes as the demotion lands
    [demotion] = core.take_demotions()
    assert (demotion.record.hash, demotion.dst_tier, demotion.cause) == (5, "nvme", "prefetch")
    assert [(e.hash, e.tier, e.reason) for e in core.take_events() if hasattr(e, "reason")] == [(9, "nvme", "evicted")]
    core.complete_transfer(demotion)
    [transfer] = core.plan_prefetch(8)
    core.complete_transfer(transfer)
    assert core.lookup(NS, [1]) == ["dram"] and core.lookup(NS, [5]) == ["nvme"] and core.lookup(NS, [9]) == []
    assert core.check() == []


def test_a_block_named_twice_is_prefetched_once():
    # A system prompt shared by two paused sessions: the policy names it for each.
    core, policy = make(dram=2, nvme=8)
    nvme_only(core, 1, filler=[2, 3])
    for h in (2, 3):  # free DRAM (the filler keeps its NVMe copies)
        core.spaces["dram"].free(core.namespace(NS).blocks[h].copies.pop("dram").slot)
        policy.on_removed("dram", (NS, h))
        core.namespace(NS).refresh(core.namespace(NS).blocks[h])
    policy.due["dram"] = [(NS, 1), (NS, 1)]
    [transfer] = core.plan_prefetch(8)
    assert transfer.record.hash == 1
    assert core.spaces["dram"].used_bytes == PAGE  # one slot, not two
    core.complete_transfer(transfer)
    assert core.lookup(NS, [1]) == ["dram"]
    assert core.check() == []


def test_a_store_into_a_tier_full_of_prefetches_under_way_waits_instead_of_being_refused():
    core, policy = make(dram=2, nvme=8)
    nvme_only(core, 1, 2, filler=[3, 4])
    policy.value.update({(NS, 1): 1.0, (NS, 2): 1.0})  # 3 and 4 are worthless: they make way
    policy.due["dram"] = [(NS, 1), (NS, 2)]
    transfers = core.plan_prefetch(8)
    assert sorted(t.record.hash for t in transfers) == [1, 2]
    assert core.spaces["dram"].used_bytes == core.spaces["dram"].capacity_bytes
    policy.due.clear()
    # Nothing in DRAM is readable, so nothing can go yet; once the prefetches land it can.
    assert isinstance(core.prepare_store(NS, [BlockSpec(5, None, PAGE)]), Wait)
    for transfer in transfers:
        core.complete_transfer(transfer)
    store(core, 5)
    assert core.lookup(NS, [5]) == ["dram"]
    assert core.check() == []


def test_a_store_into_a_tier_full_of_prefetches_of_pinned_blocks_is_refused_at_once():
    # As above, but an operator pinned 1 and 2: once they land nothing can go, so the
    # store is refused now instead of waiting for them and being refused then.
    core, policy = make(dram=2, nvme=8)
    nvme_only(core, 1, 2, filler=[3, 4])
    core.pin(NS, [1, 2])
    policy.value.update({(NS, 1): 1.0, (NS, 2): 1.0})
    policy.due["dram"] = [(NS, 1), (NS, 2)]
    transfers = core.plan_prefetch(8)
    assert sorted(t.record.hash for t in transfers) == [1, 2]
    policy.due.clear()
    with pytest.raises(NoSpace, match="protected by leases or pins"):
        core.prepare_store(NS, [BlockSpec(5, None, PAGE)])
    for transfer in transfers:
        core.complete_transfer(transfer)
    assert core.lookup(NS, [1, 2]) == ["dram", "dram"] and core.check() == []


def test_a_store_waiting_for_prefetches_to_land_evicts_nothing_meanwhile():
    # DRAM 4: 7 and 8 (valued) and two prefetches under way. A store of three blocks cannot
    # fit until the prefetches land; evicting 7 and 8 now would only hand their slots to
    # the mover's next prefetches, and the store would wait again, round after round.
    core, policy = make(dram=4, nvme=8)
    nvme_only(core, 1, 2, filler=[5, 6, 7, 8])
    core.complete_load(core.prepare_load(NS, [7, 8]).lease_id)  # 7 and 8 are the most recent
    policy.value.update({(NS, 7): 1.0, (NS, 8): 1.0, (NS, 1): 1.0, (NS, 2): 1.0})
    policy.due["dram"] = [(NS, 1), (NS, 2)]  # 5 and 6 are worthless: they make way
    transfers = core.plan_prefetch(8)
    assert sorted(t.record.hash for t in transfers) == [1, 2]
    policy.due["dram"] = [(NS, h) for h in (1, 2, 3, 4)]
    assert core.prepare_store(NS, [BlockSpec(h, None, PAGE) for h in (100, 101, 102)]) == Wait(0)
    assert core.lookup(NS, [7]) == ["dram"] and core.lookup(NS, [8]) == ["dram"]
    for transfer in transfers:
        core.complete_transfer(transfer)
    store(core, 100, 101, 102)
    assert core.check() == []
