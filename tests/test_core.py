"""KvCore unit tests: tiny capacities, a fake clock, exact victims and events."""

from __future__ import annotations

import pytest

from kvd.core.errors import GeometryConflict, InvalidArgument, NoSpace, UnknownLease, UnknownNamespace
from kvd.core.events import BlockRemoved, BlockStored, NamespaceRegistered
from kvd.core.manager import BlockSpec, CoreConfig, KvCore, LoadGrant, StoreGrant, Transfer, Wait
from kvd.core.types import Outcome
from kvd.policies import LruPolicy
from kvd.tiers import ExtentAllocator

PAGE = 4096
NS = "m"


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make_core(
    dram_blocks: int, nvme_blocks: int = 0, write_behind: bool = False, policy: LruPolicy | None = None
) -> tuple[KvCore, FakeClock]:
    clock = FakeClock()
    spaces = {"dram": ExtentAllocator([(0, dram_blocks * PAGE)], PAGE)}
    if nvme_blocks:
        spaces["nvme"] = ExtentAllocator([(0, nvme_blocks * PAGE)], PAGE)
    policy = policy if policy is not None else LruPolicy()
    core = KvCore(spaces, policy, clock, CoreConfig(write_behind=write_behind, lease_seconds=10))
    core.register_namespace(NS, 16, PAGE)
    return core, clock


def specs(*hashes: int, parent: int | None = None) -> list[BlockSpec]:
    out = []
    for h in hashes:
        out.append(BlockSpec(h, parent, PAGE))
        parent = h
    return out


def store(core: KvCore, *hashes: int, parent: int | None = None) -> StoreGrant:
    grant = core.prepare_store(NS, specs(*hashes, parent=parent))
    assert isinstance(grant, StoreGrant)
    core.commit_store(grant.lease_id)
    assert core.check() == []
    return grant


def run_mover(core: KvCore) -> int:
    """Complete every planned transfer successfully, as the daemon's mover would."""
    done = 0
    while True:
        transfers = core.take_demotions() or core.plan_write_behind(100)
        if not transfers:
            return done
        for t in transfers:
            core.complete_transfer(t)
            done += 1


def nvme_only(core: KvCore) -> None:
    """Block 1 on NVMe only, block 2 in DRAM (a one-block DRAM tier with write-behind)."""
    store(core, 1)
    run_mover(core)
    store(core, 2)  # evicts 1 from DRAM: it has an NVMe copy
    run_mover(core)


def removed(events) -> list[tuple[int, str, str]]:
    return [(e.hash, e.tier, e.reason) for e in events if isinstance(e, BlockRemoved)]


def test_register_namespace_is_idempotent_and_rejects_other_geometry():
    core, _ = make_core(4)
    assert core.register_namespace(NS, 16, PAGE) is False
    with pytest.raises(GeometryConflict):
        core.register_namespace(NS, 32, PAGE)
    with pytest.raises(InvalidArgument):
        core.register_namespace("", 16, PAGE)
    with pytest.raises(InvalidArgument):
        core.register_namespace("x", 0, PAGE)
    assert isinstance(core.take_events()[0], NamespaceRegistered)


def test_lookup_longest_prefix_and_unknown_namespace():
    core, _ = make_core(8)
    store(core, 1, 2, 3)
    assert core.lookup(NS, [1, 2, 3, 4]) == ["dram"] * 3
    assert core.lookup(NS, [1, 9, 3]) == ["dram"]
    assert core.lookup(NS, [9, 1]) == []
    assert core.lookup(NS, []) == []
    with pytest.raises(UnknownNamespace):
        core.lookup("nope", [1])


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


class HeadsFirst(LruPolicy):
    """LRU, except that the keys in ``first`` are offered as victims before all others (a
    policy that ranks a chain's head below its tail): a switch, not a mock."""

    roots_rank_first = False

    def __init__(self, *first: int) -> None:
        super().__init__()
        self.first = [(NS, h) for h in first]

    def victims(self, tier, now):
        held = list(super().victims(tier, now))
        ahead = [k for k in self.first if k in held]
        return iter(ahead + [k for k in held if k not in ahead])


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


class TierLocal(LruPolicy):
    """LRU whose ranks order a tier's own copies only (a switch): the core cannot weigh a
    block against the tier below's, so a demotion always goes down."""

    values_across_tiers = False
    roots_rank_first = False


class TierLocalHeadsFirst(HeadsFirst):
    """HeadsFirst whose ranks order a tier's own copies only, as TierLocal's do."""

    values_across_tiers = False


def test_when_only_heads_can_go_a_head_goes():
    def store_after_demotions(*hashes: int, parent: int | None = None) -> None:
        assert isinstance(core.prepare_store(NS, specs(*hashes, parent=parent)), Wait)
        run_mover(core)
        store(core, *hashes, parent=parent)

    core, _ = make_core(1, nvme_blocks=1, policy=TierLocal())
    store(core, 1)
    store_after_demotions(2, parent=1)  # 1 goes down to NVMe
    core.take_events()
    # 2 must go down; NVMe holds only 1, the last copy of 2's parent: it goes, and 2 — an
    # orphan now, which no lookup can reach — goes with it instead of taking its slot.
    store(core, 3)
    assert removed(core.take_events()) == [(1, "nvme", "evicted"), (2, "dram", "orphaned")]
    assert core.lookup(NS, [3]) == ["dram"] and core.lookup(NS, [1, 2]) == []
    assert core.check() == []


def test_a_dropped_blocks_held_descendants_go_with_it_in_every_tier():
    # DRAM 3 over NVMe 2, a tier-local policy that sends heads down first. Chain
    # 1 <- 2 <- 3 <- 4 and a branch 2 <- 5: 1 and 2 sit in NVMe, 3, 4 and 5 in DRAM. Storing
    # 6 pushes 4 down; NVMe drops 1: every block below it is unreachable, wherever it is —
    # 4 included, which goes instead of taking NVMe's slot.
    core, _ = make_core(3, nvme_blocks=2, policy=TierLocalHeadsFirst(1, 2))
    store(core, 1)
    store(core, 2, parent=1)
    store(core, 3, parent=2)
    store_or_wait(core, 4, parent=3)
    store_or_wait(core, 5, parent=2)
    assert core.lookup(NS, [1, 2, 3, 4]) == ["nvme", "nvme", "dram", "dram"]
    assert core.lookup(NS, [1, 2, 5]) == ["nvme", "nvme", "dram"]
    core.take_events()
    store_or_wait(core, 6)
    gone = removed(core.take_events())
    assert (1, "nvme", "evicted") in gone
    assert {(h, r) for h, _, r in gone if r == "orphaned"} == {(2, "orphaned"), (3, "orphaned"), (4, "orphaned"), (5, "orphaned")}
    assert core.lookup(NS, [6]) == ["dram"]
    assert all(core.lookup(NS, [h]) == [] for h in (1, 2, 3, 4, 5))
    assert core.check() == []


def head_below_two_children() -> KvCore:
    """DRAM 3 over NVMe 1, heads first: 1 in NVMe, its children 2 and 3 and a root 4 in DRAM."""
    core, _ = make_core(3, nvme_blocks=1, policy=TierLocalHeadsFirst(1))
    store(core, 1)
    store(core, 2, parent=1)
    store(core, 3, parent=1)
    store_or_wait(core, 4)  # 1 goes down to NVMe
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


def child_on_its_way_down() -> tuple[KvCore, Transfer]:
    """DRAM 2 over NVMe 2, heads first: 1 in NVMe, 3 in DRAM, and 1's child 2 being moved
    down into NVMe's other slot (returned: the demotion, not landed)."""
    core, _ = make_core(2, nvme_blocks=2, policy=TierLocalHeadsFirst(1))
    store(core, 1)
    store(core, 2, parent=1)
    store_or_wait(core, 3)  # 1 goes down
    assert isinstance(core.prepare_store(NS, specs(4)), Wait)  # 2 starts down
    (moving,) = core.take_demotions()
    return core, moving


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
    store_or_wait(core, 5)  # 3 must go down: NVMe drops 1, and 3 goes with it; 2 is read
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
    core, _ = make_core(1, nvme_blocks=1, write_behind=True, policy=TierLocal())
    store(core, 1)
    run_mover(core)  # 1 in DRAM and NVMe
    store(core, 2, parent=1)  # 1 leaves DRAM for free; 2 waits for write-behind
    assert core.lookup(NS, [1, 2]) == ["nvme", "dram"]
    core.take_events()
    assert core.plan_write_behind(8) == []
    assert removed(core.take_events()) == [(1, "nvme", "evicted"), (2, "dram", "orphaned")]
    assert core.spaces["nvme"].used_bytes == 0 and core.spaces["dram"].used_bytes == 0
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
    core, clock = make_core(2, nvme_blocks=2, policy=TierLocal())
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


def test_a_load_makes_its_room_without_dropping_the_chain_it_reads():
    # DRAM 3 over NVMe 1: chain 1 <- 2 <- 3 <- 4 with 3 in NVMe. Promoting 3 for a load
    # needs a DRAM slot: 4 (not yet pinned by the load) must go, and NVMe's only block is
    # 3, which the load reads. Dropping 3 would cut the chain at 3 (the load would find 1
    # and 2 only, and 4 would go as its orphan); 4 goes instead, and the load finds 1-3.
    core, _ = make_core(3, nvme_blocks=1, policy=TierLocal())
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


class NotDemoted(LruPolicy):
    """LRU that would not keep the keys in ``dropped`` below (a switch: say, ephemeral)."""

    def __init__(self) -> None:
        super().__init__()
        self.dropped: set[tuple[str, int]] = set()

    def worth_demoting(self, key, tier, now):
        return key not in self.dropped


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


def test_check_finds_a_shadowed_index_that_disagrees_with_the_copies():
    core, _ = make_core(4)
    store(core, 1, 2)
    core.namespace(NS).shadowed.setdefault("dram", {})[1] = None  # DRAM is the only tier
    assert any("filed as shadowed" in p for p in core.check())


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


def test_check_finds_a_children_index_that_disagrees_with_the_parents():
    core, _ = make_core(4)
    store(core, 1, 2)
    core.namespace(NS).children[2] = {7}  # 2 has no child
    assert any("children index disagrees" in p for p in core.check())


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


def test_all_leased_is_no_space():
    core, _ = make_core(2)
    store(core, 1, 2)
    grant = core.prepare_load(NS, [1, 2])
    with pytest.raises(NoSpace):
        core.prepare_store(NS, specs(3))
    assert core.check() == []
    core.complete_load(grant.lease_id)
    store(core, 3)


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


def test_leases_expire_on_the_injected_clock():
    core, clock = make_core(2)
    grant = core.prepare_store(NS, specs(1, 2))
    clock.now += 9.9
    assert core.expire_leases() == 0
    clock.now += 0.2
    assert core.expire_leases() == 1
    assert core.lookup(NS, [1]) == []
    with pytest.raises(UnknownLease):
        core.commit_store(grant.lease_id)
    # The slots stay quarantined for one more lease period (a stalled writer may resume).
    assert core.spaces["dram"].used_bytes == 2 * PAGE
    assert core.check() == []
    clock.now += 10
    core.expire_leases()
    assert core.spaces["dram"].used_bytes == 0
    store(core, 1, 2)
    load = core.prepare_load(NS, [1, 2])
    clock.now += 11
    assert core.expire_leases() == 1
    with pytest.raises(UnknownLease):
        core.complete_load(load.lease_id)
    assert core.check() == []


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


def test_restore_block_and_check_catches_corruption_of_state():
    core, _ = make_core(2, nvme_blocks=2)
    slot = core.spaces["nvme"].allocate(PAGE)
    core.restore_block(NS, 7, None, PAGE, "nvme", slot)
    assert core.lookup(NS, [7]) == ["nvme"]
    assert core.check() == []
    core.namespace(NS).visible[99] = 2  # break an invariant on purpose
    assert any("visible" in p for p in core.check())


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


def test_geometry_that_no_tier_can_hold_is_invalid():
    core, _ = make_core(2, nvme_blocks=4)
    with pytest.raises(InvalidArgument, match="do not fit the dram tier"):
        core.register_namespace("big", 16, 3 * PAGE)
    assert core.check_geometry("ok", 16, 2 * PAGE) is True
    assert core.check_geometry(NS, 16, PAGE) is False


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


class Valued(LruPolicy):
    """LRU order, with values the test sets that rank a block in any tier (a switch)."""

    values_across_tiers = True
    roots_rank_first = False  # the values a test sets may rank a head below its tail

    def __init__(self, **value: float) -> None:
        super().__init__()
        self.value = {(NS, int(h[1:])): v for h, v in value.items()}

    def priority(self, key, tier, now):
        return self.value.get(key, 0.0)


def store_or_wait(core: KvCore, *hashes: int, parent: int | None = None) -> None:
    """Store; when the core asks to wait, run just the demotions it planned, then retry."""
    grant = core.prepare_store(NS, specs(*hashes, parent=parent))
    while isinstance(grant, Wait):
        for transfer in core.take_demotions():
            core.complete_transfer(transfer)
        grant = core.prepare_store(NS, specs(*hashes, parent=parent))
    core.commit_store(grant.lease_id)


def two_tiers(dram: int, nvme: int, policy: LruPolicy, write_behind: bool = False) -> KvCore:
    """A core over DRAM and NVMe of ``dram`` and ``nvme`` blocks."""
    spaces = {"dram": ExtentAllocator([(0, dram * PAGE)], PAGE), "nvme": ExtentAllocator([(0, nvme * PAGE)], PAGE)}
    core = KvCore(spaces, policy, FakeClock(), CoreConfig(write_behind=write_behind))
    core.register_namespace(NS, 16, PAGE)
    return core


def full_two_tiers(policy: LruPolicy) -> KvCore:
    """DRAM holds 3 and 4, NVMe holds 1 and 2 (each block in one tier): both are full."""
    core = two_tiers(2, 2, policy)
    for h in (1, 2, 3, 4):
        store_or_wait(core, h)
    assert [core.lookup(NS, [h]) for h in (1, 2, 3, 4)] == [["nvme"], ["nvme"], ["dram"], ["dram"]]
    core.take_events()
    return core


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


def test_a_chain_head_whose_children_are_held_is_demoted_however_little_it_is_worth():
    core = two_tiers(2, 2, Valued(b1=1.0, b2=10.0, b3=9.0, b4=9.0, b5=9.0, b6=9.0))
    for chain in ((5,), (6,), (1, 2), (3,), (4,)):
        store_or_wait(core, *chain)
        run_mover(core)
    # 1 is worth less than anything NVMe holds, but dropping it would strand 2 below.
    assert core.lookup(NS, [1, 2]) == ["nvme", "nvme"]
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
