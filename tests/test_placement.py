"""Placement through the core: exact victims and where each goes, rule by rule."""

from __future__ import annotations

import pytest
from core_helpers import (
    NS,
    PAGE,
    FakeClock,
    HeadsFirst,
    NotDemoted,
    Valued,
    full_two_tiers,
    make_core,
    removed,
    restore,
    run_mover,
    specs,
    store,
    store_or_wait,
    two_tiers,
)

from kvd.core.events import BlockStored
from kvd.core.manager import CoreConfig, KvCore, Wait
from kvd.core.placement import Protect, apply, ends_in_drop, fate, outranked_below, shadowed_victims
from kvd.core.types import Cause, TransferKind
from kvd.policies import LruPolicy
from kvd.tiers import ExtentAllocator


def test_lru_evicts_oldest_chain_tail_first_without_nvme():
    core, _ = make_core(4)
    store(core, 1, 2, 3)  # chain 1 <- 2 <- 3: LRU order (oldest first) 3, 2, 1
    store(core, 10)
    core.take_events()
    store(core, 20)  # DRAM full: the victim is 3, the tail of the oldest chain
    assert removed(core.take_events()) == [(3, "dram", "evicted")]
    store(core, 30, 31)  # two more: 2, then 1
    assert removed(core.take_events()) == [(2, "dram", "evicted"), (1, "dram", "evicted")]
    assert core.lookup(NS, [10]) == ["dram"] and core.lookup(NS, [1]) == []


def test_dram_victim_is_demoted_to_nvme_then_freed():
    core, _ = make_core(2, nvme_blocks=4)
    store(core, 1)
    store(core, 2)
    result = core.prepare_store(NS, specs(3))
    assert isinstance(result, Wait)
    demotions = core.take_demotions()
    assert [(t.record.hash, t.src_tier, t.dst_tier) for t in demotions] == [(1, "dram", "nvme")]
    assert core.check() == []
    assert core.lookup(NS, [1]) == ["dram"]  # still readable while it moves
    core.complete_transfer(demotions[0])
    assert core.lookup(NS, [1]) == ["nvme"]
    store(core, 3)
    events = core.take_events()
    assert [(e.hash, e.tier) for e in events if isinstance(e, BlockStored)][-2:] == [(1, "nvme"), (3, "dram")]
    assert removed(events) == [(1, "dram", "demoted")]


def test_write_behind_makes_dram_eviction_free_and_nvme_drops_last():
    core, _ = make_core(2, nvme_blocks=2, write_behind=True)
    store(core, 1)
    store(core, 2)
    assert run_mover(core) == 2
    assert core.write_behind_pending == 0
    core.take_events()
    store(core, 3)  # 1 has an NVMe copy: dropping its DRAM copy is immediate
    assert removed(core.take_events()) == [(1, "dram", "evicted")]
    assert core.lookup(NS, [1]) == ["nvme"]
    run_mover(core)  # 3 goes down; NVMe is full, its LRU victim (1) is dropped
    assert removed(core.take_events()) == [(1, "nvme", "evicted")]
    assert core.lookup(NS, [1]) == []
    assert core.check() == []


def test_the_last_copy_of_a_block_with_held_descendants_goes_after_the_rest():
    clock = FakeClock()
    core = KvCore({"dram": ExtentAllocator([(0, 3 * PAGE)], PAGE)}, HeadsFirst(1), clock, CoreConfig())
    core.register_namespace(NS, 16, PAGE)
    store(core, 1, 2)  # chain 1 <- 2
    store(core, 3)
    store(core, 4)  # the policy offers 1 first: dropping it would strand 2, so 2 goes
    assert removed(core.take_events()) == [(2, "dram", "evicted")]
    assert core.lookup(NS, [1]) == ["dram"]
    store(core, 5)  # 1 has no held child now: it goes first
    assert removed(core.take_events()) == [(1, "dram", "evicted")]
    assert core.check() == []


def test_when_only_heads_can_go_a_head_goes():
    # NVMe's only block is 1, the head of the chain 1 <- 2 (2 in DRAM). DRAM's victim 3 is
    # worth more than 1: it goes down, and 1 — a head, but all NVMe has — goes, and 2, an
    # orphan now that no lookup can reach, goes with it instead of holding DRAM's slot.
    core = two_tiers(2, 1, Valued(b1=2.0, b2=1.0, b3=5.0, b4=9.0))
    restore(core, "nvme", 1)
    restore(core, "dram", 3)
    restore(core, "dram", 2, parent=1)
    core.take_events()
    store_or_wait(core, 4)
    assert removed(core.take_events()) == [(1, "nvme", "evicted"), (2, "dram", "orphaned")]
    run_mover(core)
    assert core.lookup(NS, [3]) == ["nvme"] and core.lookup(NS, [4]) == ["dram"] and core.lookup(NS, [1, 2]) == []
    assert core.check() == []


def test_lru_drops_a_tail_older_than_everything_below_instead_of_pushing_its_head_out():
    # DRAM 1 over NVMe 1. 2 extends 1; storing 3 evicts 2 from DRAM. Demoting it would push
    # out 1, its parent and the more recent (a chain is touched root last): the hierarchy
    # drops 2, its least recently used block, as one tier of two would.
    core, _ = make_core(1, nvme_blocks=1)
    store(core, 1)
    store_or_wait(core, 2, parent=1)  # 1 goes down to NVMe
    core.take_events()
    store_or_wait(core, 3)
    assert removed(core.take_events()) == [(2, "dram", "evicted")]
    assert core.lookup(NS, [1, 2]) == ["nvme"] and core.lookup(NS, [3]) == ["dram"]
    assert core.check() == []


@pytest.mark.parametrize(
    ("policy", "gone", "nvme"),
    [
        # 3 is worth less than 1, which its demotion would push out of the last tier: 3 goes.
        (Valued(b1=5.0, b2=6.0, b3=1.0, b4=9.0), 3, {1, 2}),
        # 3 is worth more: it goes down and the last tier drops 1, as before.
        (Valued(b1=5.0, b2=6.0, b3=7.0, b4=9.0), 1, {2, 3}),
        # Recency ranks a tier's own copies only: the cascade as always.
        (LruPolicy(), 1, {2, 3}),
    ],
    ids=["outranked-dropped", "demoted", "lru-demotes"],
)
def test_a_block_worth_less_than_what_its_demotion_pushes_out_is_dropped(policy, gone, nvme):
    core = full_two_tiers(policy)
    store_or_wait(core, 5)
    assert [h for h, _, reason in removed(core.take_events()) if reason == "evicted"] == [gone]
    assert {h for h in (1, 2, 3, 4, 5) if core.lookup(NS, [h]) == ["nvme"]} == nvme
    assert core.lookup(NS, [4]) == ["dram"] and core.lookup(NS, [5]) == ["dram"]
    assert core.check() == []


def test_a_demotion_into_free_room_is_never_dropped_however_little_it_is_worth():
    core = two_tiers(1, 2, Valued(b1=9.0, b2=0.5, b3=1.0))
    for h in (1, 2, 3):  # 1 goes down, then 2: worth less than 1, but NVMe has room for it
        store_or_wait(core, h)
    assert [core.lookup(NS, [h]) for h in (1, 2, 3)] == [["nvme"], ["nvme"], ["dram"]]
    assert core.check() == []


def test_a_victim_below_that_another_tier_also_holds_is_not_weighed():
    # NVMe's victim 1 is also in DRAM (written behind), so pushing it out loses nothing:
    # 2, worth less than 1, still goes down rather than being dropped.
    core = two_tiers(2, 1, Valued(b1=5.0, b2=1.0, b3=1.0), write_behind=True)
    store_or_wait(core, 1)
    run_mover(core)  # 1 in DRAM and NVMe: NVMe is full
    store_or_wait(core, 2)  # 2 in DRAM only (its write-behind waits for room)
    grant = core.prepare_load(NS, [1])
    core.complete_load(grant.lease_id)  # 1 is more recent than 2: 2 is DRAM's victim
    core.take_events()
    store_or_wait(core, 3)
    assert [h for h, tier, reason in removed(core.take_events()) if reason == "evicted"] == [1]
    assert [core.lookup(NS, [h]) for h in (1, 2, 3)] == [["dram"], ["nvme"], ["dram"]]
    assert core.check() == []


def test_a_copy_a_faster_tier_holds_goes_first_and_ends_the_cascade():
    # HBM holds R (1) and V (2), DRAM holds V too, NVMe holds W (3); R < W < V. Storing X
    # evicts R; demoting it needs DRAM's slot, and V's DRAM copy — shadowed by its HBM
    # copy, never read — goes for nothing. (It used to go down in turn and push W out of
    # NVMe, so R was dropped instead: one block fewer held for the same slots.)
    spaces = {t: ExtentAllocator([(0, n * PAGE)], PAGE) for t, n in (("hbm", 2), ("dram", 1), ("nvme", 1))}
    core = KvCore(spaces, Valued(b1=1.0, b2=9.0, b3=5.0, b4=9.0), FakeClock(), CoreConfig(write_behind=False))
    core.register_namespace(NS, 16, PAGE)
    core.restore_block(NS, 3, None, PAGE, "nvme", spaces["nvme"].allocate(PAGE))
    core.restore_block(NS, 2, None, PAGE, "dram", spaces["dram"].allocate(PAGE))
    store_or_wait(core, 1)
    grant = core.prepare_load(NS, [2])  # V is promoted into HBM; DRAM keeps its copy
    for transfer in grant.promotions:
        core.complete_transfer(transfer)
    core.complete_load(grant.lease_id)
    core.take_events()
    store_or_wait(core, 4)
    assert [(h, tier) for h, tier, reason in removed(core.take_events()) if reason == "evicted"] == [(2, "dram")]
    run_mover(core)
    assert [core.lookup(NS, [h]) for h in (1, 2, 3, 4)] == [["dram"], ["hbm"], ["nvme"], ["hbm"]]
    assert core.check() == []


def shadowed_scenario(nvme_blocks: int) -> KvCore:
    """HBM 2, DRAM 2, NVMe ``nvme_blocks``, LRU. NVMe holds W (1); DRAM holds X (2) and Y
    (3); HBM holds Q (4), then a load promotes Y beside it (DRAM keeps its copy). Then Z (5)
    is stored, which demotes Q into a full DRAM."""
    spaces = {t: ExtentAllocator([(0, n * PAGE)], PAGE) for t, n in (("hbm", 2), ("dram", 2), ("nvme", nvme_blocks))}
    core = KvCore(spaces, LruPolicy(), FakeClock(), CoreConfig(write_behind=False))
    core.register_namespace(NS, 16, PAGE)
    core.restore_block(NS, 1, None, PAGE, "nvme", spaces["nvme"].allocate(PAGE))
    core.restore_block(NS, 2, None, PAGE, "dram", spaces["dram"].allocate(PAGE))
    core.restore_block(NS, 3, None, PAGE, "dram", spaces["dram"].allocate(PAGE))
    store_or_wait(core, 4)
    grant = core.prepare_load(NS, [3])
    for transfer in grant.promotions:
        core.complete_transfer(transfer)
    core.complete_load(grant.lease_id)
    core.take_events()
    store_or_wait(core, 5)
    run_mover(core)
    return core


def test_a_shadowed_copy_goes_before_an_older_copy_held_nowhere_else():
    # NVMe full: DRAM gives up Y's copy, shadowed by HBM's, though X is older — X would have
    # gone down and pushed W out of the hierarchy. All five blocks stay held.
    core = shadowed_scenario(nvme_blocks=1)
    assert [(h, tier) for h, tier, reason in removed(core.take_events()) if reason == "evicted"] == [(3, "dram")]
    assert [core.lookup(NS, [h]) for h in (1, 2, 3, 4, 5)] == [["nvme"], ["dram"], ["hbm"], ["dram"], ["hbm"]]
    assert core.check() == []


def test_while_a_tier_below_has_room_the_policys_victim_goes_down_and_the_shadowed_copy_stays():
    # Room for one more block on NVMe: demoting X loses nothing, so DRAM keeps the policy's
    # order and Y's copy, which saves a write when Y leaves HBM.
    core = shadowed_scenario(nvme_blocks=2)
    assert [r for r in removed(core.take_events()) if r[2] == "evicted"] == []
    assert [core.lookup(NS, [h]) for h in (1, 2, 3, 4, 5)] == [["nvme"], ["nvme"], ["hbm"], ["dram"], ["hbm"]]
    assert core.namespace(NS).blocks[3].ready_tiers() == ["hbm", "dram"]
    assert core.check() == []


def test_a_tier_full_of_demotions_under_way_makes_the_tier_above_wait_not_drop():
    # DRAM of 2 blocks over NVMe of 1. Storing 3 demotes 2 (the chain's tail) into NVMe's
    # only slot: the store waits for it. Asked again before it lands, DRAM's next victim is
    # 1, and NVMe holds nothing it could evict yet — only 2's copy being written. That is
    # room once the write lands, not "nothing below can take it": the store waits again,
    # and 1 (the head of the chain 1-2) is not dropped.
    core = two_tiers(2, 1, LruPolicy())
    store(core, 1, 2)
    assert isinstance(core.prepare_store(NS, specs(3)), Wait)
    assert isinstance(core.prepare_store(NS, specs(3)), Wait)
    assert core.lookup(NS, [1, 2]) == ["dram", "dram"]  # 2 is read from DRAM until it lands
    assert core.check() == []


# -- the planner and its rules, asked directly ----------------------------------------------
def snapshot(core: KvCore) -> tuple:
    """What a plan must not change: every copy, the spaces, the policy's order, the events."""
    copies = sorted((r.hash, t, c.slot.offset, c.ready, c.readers) for r in core.blocks(NS) for t, c in r.copies.items())
    used = {t: core.spaces[t].used_bytes for t in core.tiers}
    order = {t: list(core.policy.victims(t, 0)) for t in core.tiers}
    return copies, used, order, core.events.next_seq


def chain_over_two_full_tiers() -> KvCore:
    """DRAM 2 over NVMe 2, LRU, both full: NVMe holds 1 and 2 (oldest first), DRAM 3 and 4."""
    core = two_tiers(2, 2, LruPolicy())
    for h in (1, 2):
        restore(core, "nvme", h)
    for h in (3, 4):
        restore(core, "dram", h)
    core.take_events()
    return core


def steps(plan) -> list[tuple[str, int, str]]:
    return [(type(s).__name__, s.record.hash, s.tier) for s in plan.steps]


def test_a_plan_changes_nothing_until_it_is_applied_and_then_all_of_it():
    core = chain_over_two_full_tiers()
    before = snapshot(core)
    planner = core.planner()
    assert planner.slot("dram", PAGE) == Wait(PAGE)  # 3 goes down once NVMe drops 1
    assert steps(planner.plan) == [("Drop", 1, "nvme"), ("Demote", 3, "dram")]
    assert snapshot(core) == before and core.take_demotions() == []
    apply(planner.plan, core.holdings, core.transfers)
    assert removed(core.take_events()) == [(1, "nvme", "evicted")]
    (demotion,) = core.take_demotions()
    assert (demotion.record.hash, demotion.src_tier, demotion.dst_tier) == (3, "dram", "nvme")
    assert core.check() == []


def test_each_call_of_one_planner_sees_the_steps_before_it():
    core = chain_over_two_full_tiers()
    planner = core.planner()
    assert planner.slot("nvme", PAGE) is True and planner.slot("nvme", PAGE) is True  # 1, then 2
    assert steps(planner.plan) == [("Drop", 1, "nvme"), ("Drop", 2, "nvme")]
    assert planner.slot("nvme", PAGE) is None  # nothing left that may go
    assert not planner.has_slot("nvme", PAGE) and planner.free_bytes("nvme") == 0


def test_ends_in_drop_when_every_tier_below_is_full():
    core = chain_over_two_full_tiers()
    planner = core.planner()
    assert ends_in_drop(planner, "dram") and ends_in_drop(planner, "nvme")  # the last tier always
    planner.drop(core.namespace(NS).blocks[1], "nvme", core.namespace(NS).blocks[1].copies["nvme"], Cause.CAPACITY)
    assert not ends_in_drop(planner, "dram")  # NVMe has room once 1 goes
    written = two_tiers(2, 2, LruPolicy(), write_behind=True)
    assert not ends_in_drop(written.planner(), "nvme")  # write-behind's copies are the durable ones


def test_shadowed_victims_are_the_copies_a_faster_tier_holds_oldest_shadowed_first():
    core = two_tiers(3, 2, LruPolicy())
    for h in (1, 2, 3):
        restore(core, "nvme" if h < 3 else "dram", h)
    for h in (2, 1):  # promoted into DRAM in this order: NVMe keeps both copies
        grant = core.prepare_load(NS, [h])
        run_promotions(core, grant)
    planner = core.planner()
    assert [r.hash for r, _ in shadowed_victims(planner, "nvme", 2 * PAGE)] == [2, 1]
    assert [r.hash for r, _ in shadowed_victims(planner, "nvme", PAGE)] == [2]
    assert shadowed_victims(planner, "dram", PAGE) == []
    assert [r.hash for r, _ in planner.victims("nvme", PAGE)] == [2]  # first: the eviction ends in a drop


def test_heads_last_and_only_when_nothing_else_makes_the_room():
    # NVMe holds 1 (head of 1 <- 2, 2 in DRAM) and 5, newer: 1 goes last, though LRU
    # names it first.
    core = two_tiers(2, 2, LruPolicy())
    restore(core, "nvme", 1)
    restore(core, "dram", 2, parent=1)
    restore(core, "nvme", 5)
    planner = core.planner()
    assert [r.hash for r, _ in planner.victims("nvme", PAGE)] == [5]
    assert [r.hash for r, _ in planner.victims("nvme", 2 * PAGE)] == [5, 1]


def test_the_chain_a_load_reads_goes_last_in_the_top_tier_and_never_below():
    core = chain_over_two_full_tiers()
    chain = frozenset({(NS, 3), (NS, 1)})
    planner = core.planner(Protect(chain=chain))
    assert [r.hash for r, _ in planner.victims("dram", 2 * PAGE)] == [3, 4]  # demoted, not dropped: in order
    only_drops = KvCore(
        {"dram": ExtentAllocator([(0, 2 * PAGE)], PAGE)}, LruPolicy(), FakeClock(), CoreConfig(write_behind=False)
    )
    only_drops.register_namespace(NS, 16, PAGE)
    restore(only_drops, "dram", 3)
    restore(only_drops, "dram", 4)
    planner = only_drops.planner(Protect(chain=frozenset({(NS, 3)})))
    assert [r.hash for r, _ in planner.victims("dram", PAGE)] == [4]
    assert [r.hash for r, _ in planner.victims("dram", 2 * PAGE)] == [4, 3]  # last of all
    below = core.planner(Protect(chain=chain))
    assert [r.hash for r, _ in below.victims("nvme", 2 * PAGE)] == [2]  # 1 is never dropped below


def test_protected_copies_stay_and_an_orphan_drop_leaves_them():
    core = two_tiers(2, 1, LruPolicy())
    restore(core, "nvme", 1)
    restore(core, "dram", 2, parent=1)
    restore(core, "dram", 9)
    two = core.namespace(NS).blocks[2]
    planner = core.planner(Protect(copies=frozenset({two.copies["dram"]})))
    assert [r.hash for r, _ in planner.victims("dram", 2 * PAGE)] == [9]
    planner.room("nvme", PAGE)  # drops 1: 2 is its orphan, but protected
    assert planner.copy_in(two, "dram") is two.copies["dram"]
    apply(planner.plan, core.holdings, core.transfers, keep=frozenset({two.copies["dram"]}))
    assert core.lookup(NS, [2]) == ["dram"]


def test_fate_drops_what_another_tier_holds_or_the_policy_would_not_keep_else_demotes():
    policy = NotDemoted()
    policy.dropped.add((NS, 4))
    core = two_tiers(2, 2, policy)
    restore(core, "dram", 3)
    restore(core, "dram", 4)
    planner = core.planner()
    ns = core.namespace(NS)
    assert fate(planner, ns.blocks[3], "dram", "nvme") is TransferKind.DEMOTE  # NVMe has room
    assert fate(planner, ns.blocks[4], "dram", "nvme") is None  # not worth keeping below
    assert fate(planner, ns.blocks[3], "nvme", None) is None  # the last tier
    store_or_wait(core, 5)  # 4 is dropped for it
    core.queue_write_down()
    run_mover(core)  # 3 and 5 written down: their DRAM copies go for nothing
    assert fate(core.planner(), ns.blocks[5], "dram", "nvme") is None
    assert core.check() == []


def test_outranked_below_weighs_the_block_against_what_its_demotion_would_push_out():
    core = full_two_tiers(Valued(b1=5.0, b2=6.0, b3=1.0, b4=9.0))
    ns = core.namespace(NS)
    assert outranked_below(core.planner(), ns.blocks[3], "nvme")  # 1 (5.0) would go for 3 (1.0)
    assert not outranked_below(core.planner(), ns.blocks[4], "nvme")  # 4 (9.0) is worth more
    assert not outranked_below(core.planner(Protect(chain=frozenset({(NS, 3)}))), ns.blocks[3], "nvme")
    roomy = two_tiers(1, 2, Valued(b1=5.0, b3=1.0))
    restore(roomy, "nvme", 1)
    restore(roomy, "dram", 3)
    assert not outranked_below(roomy.planner(), roomy.namespace(NS).blocks[3], "nvme")  # free room below


def run_promotions(core: KvCore, grant) -> None:
    for transfer in grant.promotions:
        core.complete_transfer(transfer)
    core.complete_load(grant.lease_id)
