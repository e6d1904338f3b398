"""KvCore's operator actions: pin/unpin, evict a session or everything, switch the policy,
drain. Tiny capacities, a fake clock, exact victims."""

from __future__ import annotations

import pytest
from core_helpers import NS, PAGE, FakeClock, make_core, removed, run_mover, specs, store

from kvd.core.errors import InvalidArgument, UnknownNamespace, UnknownSession
from kvd.core.manager import CoreConfig, KvCore, LoadGrant, Wait
from kvd.core.sessions import SessionTable
from kvd.policies import LruPolicy, make_policy
from kvd.tiers import ExtentAllocator


def test_a_pinned_block_is_never_a_victim_and_unpin_restores_lru_order():
    core, _ = make_core(3)
    store(core, 1)
    store(core, 2)
    store(core, 3)
    assert core.pin(NS, [1, 99]) == (1, 1)  # 99 is not held
    assert core.pin(NS, [1]) == (0, 0)  # already pinned
    core.take_events()
    store(core, 4)  # LRU would drop 1; it is pinned, so 2 goes
    assert removed(core.take_events()) == [(2, "dram", "evicted")]
    assert core.unpin(NS, [1, 1, 7]) == (1, 1)
    store(core, 5)
    assert removed(core.take_events()) == [(1, "dram", "evicted")]
    assert core.pinned_count == 0 and core.check() == []


def test_everything_pinned_refuses_a_store_and_errors_are_typed():
    core, _ = make_core(2)
    store(core, 1)
    store(core, 2)
    core.pin(NS, [1, 2])
    with pytest.raises(Exception) as info:
        store(core, 3)
    assert type(info.value).__name__ == "NoSpace"
    with pytest.raises(UnknownNamespace):
        core.pin("other", [1])
    with pytest.raises(InvalidArgument):
        core.pin(NS, [])
    with pytest.raises(InvalidArgument):
        core.unpin(NS, [])


def test_pinned_blocks_stay_in_place_and_an_operator_evict_unpins_them():
    core, _ = make_core(2, nvme_blocks=4)
    store(core, 1)
    store(core, 2)
    core.pin(NS, [1])
    core.take_events()
    assert isinstance(core.prepare_store(NS, specs(3)), Wait)  # 2 is demoted, not the pinned 1
    run_mover(core)
    store(core, 3)
    assert core.lookup(NS, [1]) == ["dram"] and core.lookup(NS, [2]) == ["nvme"]
    assert core.evict_all() == (3, 0)
    assert core.pinned_count == 0 and core.check() == []
    assert {(h, r) for h, _, r in removed(core.take_events())} >= {(1, "cleared"), (2, "cleared")}


def session_core() -> tuple[KvCore, FakeClock]:
    clock = FakeClock()
    sessions = SessionTable()
    core = KvCore(
        {"dram": ExtentAllocator([(0, 16 * PAGE)], PAGE)},
        make_policy("lru", sessions),
        clock,
        CoreConfig(write_behind=False),
        sessions=sessions,
    )
    core.register_namespace(NS, 16, PAGE)
    return core, clock


def test_evicting_a_session_drops_only_its_own_blocks():
    core, _ = session_core()
    core.session_event(NS, "a", "turn_start", [1, 2, 3])
    core.session_event(NS, "b", "turn_start", [1, 2, 7])  # 1, 2: a shared prefix
    store(core, 1, 2, 3)
    store(core, 7, parent=2)
    core.take_events()
    assert core.evict_session(NS, "a") == (1, 0)  # only 3 is a's alone
    assert removed(core.take_events()) == [(3, "dram", "evicted_by_operator")]
    assert core.lookup(NS, [1, 2, 7]) == ["dram"] * 3
    with pytest.raises(UnknownSession):
        core.evict_session(NS, "nobody")
    with pytest.raises(UnknownNamespace):
        core.evict_session("other", "a")


def test_a_block_being_read_stays_and_is_counted_as_remaining():
    core, _ = session_core()
    core.session_event(NS, "a", "turn_start", [1, 2])
    store(core, 1, 2)
    grant = core.prepare_load(NS, [2])
    assert isinstance(grant, LoadGrant)
    assert core.evict_session(NS, "a") == (1, 1)
    core.complete_load(grant.lease_id)
    assert core.evict_session(NS, "a") == (1, 0)
    assert core.check() == []


def test_switching_policy_keeps_the_recency_order_of_held_blocks():
    core, _ = make_core(4)
    store(core, 1)
    store(core, 2)
    store(core, 3)
    store(core, 4)
    grant = core.prepare_load(NS, [1])  # 1 is now the most recent
    core.complete_load(grant.lease_id)
    core.set_policy(LruPolicy())
    assert core.check() == []
    core.take_events()
    store(core, 5)
    store(core, 6)
    assert removed(core.take_events()) == [(2, "dram", "evicted"), (3, "dram", "evicted")]


def test_switching_from_typed_to_lru_and_back_passes_check():
    core, _ = session_core()
    core.session_event(NS, "a", "turn_start", [1, 2])
    store(core, 1, 2)
    core.set_policy(make_policy("typed", core.sessions))
    assert core.check() == []
    core.set_policy(make_policy("lru", core.sessions))
    assert core.check() == []


def test_drain_writes_kept_blocks_down_without_write_behind():
    core, _ = make_core(4, nvme_blocks=8, write_behind=False)
    store(core, 1, 2)
    assert core.plan_write_behind(10) == []  # write-behind is off
    assert core.start_drain() == 2
    assert core.write_behind_pending == 2
    assert run_mover(core) == 2
    assert core.lookup(NS, [1, 2]) == ["dram", "dram"] and core.write_behind_pending == 0
    assert sorted(r.hash for r in core.blocks(NS) if "nvme" in r.copies) == [1, 2]
    store(core, 3, parent=2)  # stored while draining: queued too
    assert run_mover(core) == 1
    core.stop_drain()
    store(core, 4, parent=3)
    assert run_mover(core) == 0
    assert core.check() == []


def test_drain_with_hbm_on_top_writes_each_block_down_from_its_fastest_copy():
    clock = FakeClock()
    spaces = {t: ExtentAllocator([(0, n * PAGE)], PAGE) for t, n in (("hbm", 2), ("dram", 2), ("nvme", 8))}
    core = KvCore(spaces, LruPolicy(), clock, CoreConfig(write_behind=True, lease_seconds=10))
    core.register_namespace(NS, 16, PAGE)
    store(core, 1, 2)
    assert core.plan_write_behind(10) == []  # with HBM on top, blocks go down by demotion
    # Prefix LRU demotes the chain's tail, 2, keeping its ancestor 1 in HBM.
    assert isinstance(core.prepare_store(NS, specs(3, parent=2)), Wait)
    run_mover(core)
    store(core, 3, parent=2)
    assert core.lookup(NS, [1, 2, 3]) == ["hbm", "dram", "hbm"]
    assert core.start_drain() == 3
    transfers = core.plan_write_behind(10)
    links = sorted((t.record.hash, t.src_tier, t.dst_tier) for t in transfers)
    assert links == [(1, "hbm", "nvme"), (2, "dram", "nvme"), (3, "hbm", "nvme")]
    for t in transfers:
        core.complete_transfer(t)
    assert core.write_behind_pending == 0 and core.check() == []
    assert sorted(r.hash for r in core.blocks(NS) if "nvme" in r.copies) == [1, 2, 3]


def test_without_write_behind_a_sync_queues_what_has_no_nvme_copy():
    core, _ = make_core(4, nvme_blocks=8, write_behind=False)
    store(core, 1, 2)
    assert not core.writes_behind and core.write_behind_pending == 0
    assert core.queue_write_down() == 2 and core.write_behind_pending == 2
    assert run_mover(core) == 2 and core.write_behind_pending == 0
    assert core.queue_write_down() == 0  # both have their NVMe copy now
    assert make_core(4)[0].queue_write_down() == 0  # no NVMe tier: nothing to write down


def test_drain_without_nvme_queues_nothing():
    core, _ = make_core(4)
    store(core, 1)
    assert core.start_drain() == 0 and core.write_behind_pending == 0


def test_check_reports_a_pinned_key_without_a_block():
    core, _ = make_core(2)
    store(core, 1)
    core.pin(NS, [1])
    core.holdings.pins.add((NS, 42))  # corrupt the state as a bug would
    assert any("pinned" in p for p in core.check())
