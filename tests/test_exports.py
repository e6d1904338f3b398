"""The core's cluster-tier ledger: what a node offers, pins, publishes and forgets."""

from __future__ import annotations

import random

import pytest
from core_helpers import NS, PAGE, FakeClock, make_core, run_mover, specs, store

from kvd.core.errors import NoSpace
from kvd.core.events import BlockRemoved, BlockStored
from kvd.core.manager import KvCore, StoreGrant
from kvd.core.sessions import SessionTable
from kvd.policies import TypedPolicy
from kvd.tiers import ExtentAllocator


def cluster_events(events):
    return [
        (type(e).__name__, e.hash, getattr(e, "reason", None)) for e in events
        if isinstance(e, BlockStored | BlockRemoved) and e.tier == "cluster"
    ]


def joined(dram_blocks: int = 4, **kw):
    core, clock = make_core(dram_blocks, **kw)
    core.exports.enabled = True
    return core, clock


def test_nothing_is_offered_before_the_node_joins_a_cluster():
    core, _ = make_core(4)
    store(core, 1, 2)
    assert core.prepare_export(8) is None and core.exports.pending == 0


def test_committed_blocks_are_pinned_root_first_and_published_when_they_land():
    core, _ = joined()
    store(core, 1, 2, 3)
    batch = core.prepare_export(2)
    assert [(i.hash, i.parent, i.nbytes) for i in batch.items] == [(1, None, PAGE), (2, 1, PAGE)]
    assert [c.readers for c in (core.namespace(NS).blocks[h].copies["dram"] for h in (1, 2, 3))] == [1, 1, 0]
    assert core.check() == []
    core.take_events()
    assert core.complete_export(batch.id, [True, False]) == 1
    assert cluster_events(core.take_events()) == [("BlockStored", 1, None)]
    assert core.exports.published == {(NS, 1): (None, PAGE)}
    assert all(c.readers == 0 for r in core.blocks(NS) for c in r.copies.values()) and core.check() == []
    # 2 failed: it is not offered again by itself; 3 is still a candidate.
    assert [i.hash for i in core.prepare_export(8).items] == [3]


def test_a_pinned_source_survives_the_eviction_that_would_take_it():
    core, _ = joined(dram_blocks=2)
    store(core, 1)
    batch = core.prepare_export(1)
    store(core, 2)
    grant = core.prepare_store(NS, specs(3, parent=2))  # needs 1's slot: pinned, so 2 goes
    assert isinstance(grant, StoreGrant)
    assert core.lookup(NS, [1]) == ["dram"] and core.lookup(NS, [2]) == []
    core.commit_store(grant.lease_id)
    core.complete_export(batch.id, [True])
    assert core.check() == []


def test_blocks_evicted_or_published_already_are_not_put_again():
    core, _ = joined(dram_blocks=1)
    store(core, 1)
    store(core, 2)  # evicts 1 before its turn
    batch = core.prepare_export(8)
    assert [i.hash for i in batch.items] == [2]
    core.complete_export(batch.id, [True])
    grant = core.prepare_store(NS, specs(2))
    assert grant.slots == [None]  # held: nothing to write, nothing offered
    assert core.prepare_export(8) is None


def test_blocks_read_from_the_cluster_are_not_offered_back():
    core, _ = joined()
    grant = core.prepare_store(NS, specs(5, 6))
    core.commit_store(grant.lease_id, share=False)
    assert core.prepare_export(8) is None


def test_a_block_only_on_nvme_when_its_turn_comes_is_skipped():
    core, _ = joined(dram_blocks=1, nvme_blocks=4, write_behind=True)
    store(core, 1)
    run_mover(core)
    store(core, 2)  # 1 leaves DRAM (kept on NVMe)
    run_mover(core)
    batch = core.prepare_export(8)
    assert [i.hash for i in batch.items] == [2] and core.exports.skipped == 1


def test_ephemeral_blocks_are_not_worth_sharing_under_typed():
    sessions = SessionTable()
    clock = FakeClock()
    core = KvCore({"dram": ExtentAllocator([(0, 8 * PAGE)], PAGE)}, TypedPolicy(sessions), clock, sessions=sessions)
    core.register_namespace(NS, 16, PAGE)
    core.exports.enabled = True
    # An ended session's turns are ephemeral: not worth a put.
    grant = core.prepare_store(NS, specs(1, 2), session_id="gone")
    core.commit_store(grant.lease_id)
    core.session_event(NS, "gone", "session_end", [1, 2])
    assert core.retention_class((NS, 1), "dram") == "ephemeral"
    assert core.prepare_export(8) is None
    # A live session's chain is.
    grant = core.prepare_store(NS, specs(3, 4), session_id="s1")
    core.commit_store(grant.lease_id)
    assert core.retention_class((NS, 3), "dram") == "session"
    assert [i.hash for i in core.prepare_export(8).items] == [3, 4]


def test_forget_and_clear_remove_published_blocks_with_events():
    core, _ = joined()
    store(core, 1, 2, 3)
    batch = core.prepare_export(8)
    core.complete_export(batch.id, [True, True, True])
    core.take_events()
    assert core.forget_published([(NS, 2), (NS, 9)]) == 1
    assert cluster_events(core.take_events()) == [("BlockRemoved", 2, "gone")]
    core.clear_namespace(NS)
    assert ("BlockRemoved", 1, "cleared") in cluster_events(core.take_events())
    assert core.exports.published == {} and core.check() == []


def test_complete_refuses_an_unknown_batch_or_a_wrong_count():
    core, _ = joined()
    store(core, 1, 2)
    batch = core.prepare_export(8)
    with pytest.raises(ValueError, match="has 2 blocks"):
        core.complete_export(batch.id, [True])
    with pytest.raises(ValueError, match="not in flight"):
        core.complete_export(batch.id + 1, [True])
    core.complete_export(batch.id, [True, True])
    with pytest.raises(ValueError, match="not in flight"):
        core.complete_export(batch.id, [True, True])


def test_the_candidate_queue_is_bounded_and_drops_the_oldest():
    core, _ = joined(dram_blocks=8)
    core.exports.candidates = type(core.exports.candidates)(maxlen=2)
    store(core, 1, 2, 3)
    assert [i.hash for i in core.prepare_export(8).items] == [2, 3]


@pytest.mark.parametrize("seed", range(4))
def test_random_stores_exports_evictions_and_clears_keep_every_invariant(seed):
    rng = random.Random(seed)
    core, clock = joined(dram_blocks=6, nvme_blocks=6, write_behind=True)
    open_batches = []
    next_hash = 1
    for _ in range(300):
        action = rng.random()
        if action < 0.4:
            n = rng.randint(1, 3)
            hashes = list(range(next_hash, next_hash + n))
            next_hash += n
            try:
                grant = core.prepare_store(NS, specs(*hashes))
            except NoSpace:  # every slot pinned by exports in flight
                grant = None
            if isinstance(grant, StoreGrant):
                core.commit_store(grant.lease_id, abort=rng.random() < 0.1)
        elif action < 0.6:
            batch = core.prepare_export(rng.randint(1, 4))
            if batch is not None:
                open_batches.append(batch)
        elif action < 0.8 and open_batches:
            batch = open_batches.pop(rng.randrange(len(open_batches)))
            core.complete_export(batch.id, [rng.random() < 0.8 for _ in batch.items])
        elif action < 0.9:
            run_mover(core)
        elif action < 0.95 and core.exports.published:
            core.forget_published(rng.sample(sorted(core.exports.published), 1))
        else:
            core.clear_namespace(NS)
        clock.now += 1
        assert core.check() == []
    for batch in open_batches:
        core.complete_export(batch.id, [True] * len(batch.items))
    assert core.check() == []
