"""kvd.router: the in-memory index (unit) and GlobalView over real daemons (integration)."""

from __future__ import annotations

import os
import random

import pytest

from kvd.router import GlobalView, MemoryIndex, RedisIndex
from kvd.router.view import _Feed
from kvd.v1 import view_pb2

pytestmark = pytest.mark.timeout(180)

NS = "route"
BLOCK = 64 << 10


# -- the index: one contract over every backend ----------------------------------------------


@pytest.fixture(params=["memory", "redis"])
def make_index(request):
    if request.param == "memory":
        return MemoryIndex
    client = request.getfixturevalue("redis_server")
    prefixes = iter(range(10**6))
    return lambda: RedisIndex(client, prefix=f"t{request.node.name}:{next(prefixes)}:")


def test_index_matches_each_nodes_unbroken_prefix_by_fastest_tier(make_index):
    index = make_index()
    index.apply("a", [(NS, h, "dram") for h in (1, 2, 3)] + [(NS, 3, "nvme")], [])
    index.apply("b", [(NS, 1, "nvme"), (NS, 2, "nvme"), (NS, 4, "dram")], [])
    m = index.match(NS, [1, 2, 3, 4])
    assert (m["a"].blocks, m["a"].by_tier) == (3, {"dram": 3})
    assert (m["b"].blocks, m["b"].by_tier) == (2, {"nvme": 2})
    index.apply("a", [], [(NS, 3, "dram")])  # the NVMe copy of 3 remains
    assert index.match(NS, [1, 2, 3])["a"].by_tier == {"dram": 2, "nvme": 1}
    assert {n: m.blocks for n, m in index.match(NS, [4, 1]).items()} == {"b": 2}  # a lacks 4
    assert index.match(NS, [9, 1]) == {} and index.match("other", [1]) == {}
    assert set(index.match(NS, [1], nodes=["b"])) == {"b"}


def test_index_forgets_removed_copies_and_dropped_nodes(make_index):
    index = make_index()
    index.apply("a", [(NS, 1, "dram"), (NS, 2, "dram")], [])
    index.apply("b", [(NS, 1, "dram")], [])
    index.apply("a", [], [(NS, 2, "dram"), (NS, 7, "nvme")])  # an unknown removal is a no-op
    assert index.blocks_of("a") == {(NS, 1, "dram")}
    index.drop_node("a")
    assert index.blocks_of("a") == set() and index.blocks_of("b") == {(NS, 1, "dram")}


def test_index_drops_one_namespace_of_one_node(make_index):
    index = make_index()
    index.apply("a", [(NS, 1, "dram"), (NS, 1, "nvme"), (NS, 2, "nvme"), ("other", 1, "dram")], [])
    index.apply("b", [(NS, 1, "dram")], [])
    index.drop_namespace("a", NS)
    assert index.blocks_of("a") == {("other", 1, "dram")}
    assert index.blocks_of("b") == {(NS, 1, "dram")}
    assert set(index.match(NS, [1])) == {"b"}
    index.drop_namespace("a", "never-held")  # nothing to forget is a no-op
    index.apply("a", [(NS, 5, "dram")], [])  # the node may hold the namespace again
    assert index.match(NS, [5])["a"].by_tier == {"dram": 1}


def feed_applying(index) -> _Feed:
    """A _Feed that only applies batches (no thread, no daemon): the unit under test."""
    feed = _Feed.__new__(_Feed)
    feed.address, feed.index, feed.block_tokens = "n", index, {}
    return feed


def stored(h: int, tier: int = 2, ns: str = NS) -> view_pb2.Event:
    return view_pb2.Event(stored=view_pb2.BlockStoredEvent(namespace=ns, hash=h, tier=tier))


def removed(h: int, tier: int = 2, ns: str = NS) -> view_pb2.Event:
    return view_pb2.Event(removed=view_pb2.BlockRemovedEvent(namespace=ns, hash=h, tier=tier, reason="evicted"))


def test_feed_applies_a_batch_in_order_and_a_cleared_namespace_drops_its_blocks():
    index = MemoryIndex()
    feed = feed_applying(index)
    # 1 leaves DRAM and comes back in the same batch: it is held (adds go before removes
    # inside one BlockIndex.apply, so the feed must not merge the two runs).
    feed._apply([stored(1), stored(2), removed(1), stored(1), stored(7, ns="other")])
    assert index.blocks_of("n") == {(NS, 1, "dram"), (NS, 2, "dram"), ("other", 7, "dram")}
    # A cleared namespace: gone even without removals before it (a view that missed them).
    registered = view_pb2.Event(registered=view_pb2.NamespaceRegisteredEvent(namespace=NS, block_tokens=16))
    cleared = view_pb2.Event(cleared=view_pb2.NamespaceClearedEvent(namespace=NS))
    feed._apply([registered, stored(3), cleared, stored(4)])
    assert index.blocks_of("n") == {(NS, 4, "dram"), ("other", 7, "dram")}
    assert feed.block_tokens == {NS: 16}


# -- GlobalView over real daemons -------------------------------------------------------------


def caught_up(view: GlobalView, d) -> None:
    with d.client() as c:
        snap = c.snapshot()
    assert view.wait_for(d.address, snap.epoch, snap.as_of_seq, timeout=30), f"view behind {d.address}"


def test_score_finds_the_node_and_tier_and_follows_demotion(daemon_factory):
    a = daemon_factory(dram="1MiB", nvme="32MiB").start()
    b = daemon_factory(dram="1MiB", nvme="32MiB").start()
    prefix = [11, 12, 13, 14]
    with a.client() as c:
        c.register_namespace(NS, 16, BLOCK)
        c.store(NS, prefix, [os.urandom(BLOCK)] * 4)
    with b.client() as c:
        c.register_namespace(NS, 16, BLOCK)
        c.store(NS, prefix[:2], [os.urandom(BLOCK)] * 2)
    with GlobalView([a.address, b.address]) as view:
        caught_up(view, a)
        caught_up(view, b)
        score = view.score(NS, prefix)
        assert score.best == a.address
        assert score.nodes[a.address].matched_blocks == 4
        assert score.nodes[a.address].tokens_by_tier == {"dram": 64}
        assert score.nodes[b.address].matched_blocks == 2
        assert score.nodes[a.address].score == pytest.approx(4 * 0.8)
        # Push a's prefix out of DRAM: it is on NVMe now, and the view says so.
        with a.client() as c:
            assert c.sync() == 0
            c.store(NS, list(range(100, 117)), [os.urandom(BLOCK)] * 17)
            assert c.sync() == 0
            tiers = c.lookup(NS, prefix)
        caught_up(view, a)
        assert "nvme" in tiers
        got = view.score(NS, prefix).nodes[a.address]
        want = {t: 16 * tiers.count(t) for t in set(tiers)}
        assert got.tokens_by_tier == want


def test_view_converges_after_a_daemon_restart_and_drops_a_node_that_left(daemon_factory):
    a = daemon_factory(dram="8MiB", nvme="32MiB").start()
    b = daemon_factory(dram="8MiB", nvme="32MiB").start()
    for d in (a, b):
        with d.client() as c:
            c.register_namespace(NS, 16, 4096)
            c.store(NS, [1, 2, 3], [bytes(4096)] * 3)
            assert c.sync() == 0
    with GlobalView([a.address, b.address], retry_s=0.1) as view:
        caught_up(view, a)
        caught_up(view, b)
        a.kill()  # kill -9: its DRAM copies are gone, its NVMe copies come back
        a.start()
        caught_up(view, a)  # through resync: a restart is a new epoch
        assert view.index.blocks_of(a.address) == {(NS, h, "nvme") for h in (1, 2, 3)}
        assert view.score(NS, [1, 2, 3]).nodes[a.address].tokens_by_tier == {"nvme": 48}
        view.remove_node(b.address)
        assert view.index.blocks_of(b.address) == set()
        assert set(view.score(NS, [1, 2, 3]).nodes) == {a.address}


@pytest.mark.parametrize("backend", ["memory", "redis"])
def test_index_equals_each_daemons_block_list_after_a_random_workload(daemon_factory, request, backend):
    index = MemoryIndex() if backend == "memory" else RedisIndex(request.getfixturevalue("redis_server"), "rw:")
    daemons = [daemon_factory(dram="1MiB", nvme="4MiB").start() for _ in range(2)]
    rng = random.Random(5)
    with GlobalView([d.address for d in daemons], index=index) as view:
        for d in daemons:
            with d.client() as c:
                c.register_namespace(NS, 16, BLOCK)
        for _ in range(12):
            d = rng.choice(daemons)
            with d.client() as c:
                start = rng.randrange(0, 200)
                hashes = list(range(start, start + rng.randrange(1, 12)))
                if rng.random() < 0.7:
                    c.store(NS, hashes, [os.urandom(BLOCK)] * len(hashes))
                else:
                    c.load(NS, hashes)
        for d in daemons:
            with d.client() as c:
                assert c.sync() == 0
                truth = {(b.namespace, b.hash, t) for b in c.list_blocks() for t in b.tiers}
            caught_up(view, d)
            assert view.index.blocks_of(d.address) == truth


def test_routing_a_turn_tells_the_chosen_node_it_is_coming(daemon_factory):
    a = daemon_factory(dram="1MiB", nvme="32MiB").start()
    b = daemon_factory(dram="1MiB", nvme="32MiB").start()
    prefix = [21, 22, 23]
    for d in (a, b):
        with d.client() as c:
            c.register_namespace(NS, 16, BLOCK)
    with a.client() as c:
        c.session_event(NS, "s", "turn_start", prefix)
        c.store(NS, prefix, [os.urandom(BLOCK)] * 3, session_id="s")
        c.session_event(NS, "s", "turn_end")
    with GlobalView([a.address, b.address]) as view:
        caught_up(view, a)
        caught_up(view, b)
        route = view.route(NS, prefix + [24], session_id="s", arrives_in_s=5.0)
        assert route.best == a.address
        with a.client() as c:
            (info,) = c.sessions(NS, "s")
        assert info.ahead_blocks == 4 and 0 < info.ahead_in_s <= 5.0
        with b.client() as c:
            assert c.sessions(NS) == []  # only the chosen node is told
        # Nobody holds a new prompt's first block: the fallback node is told, and a node that
        # cannot be reached is no error.
        assert view.route(NS, [90, 91], session_id="t", fallback=b.address).best is None
        with b.client() as c:
            assert [x.session_id for x in c.sessions(NS)] == ["t"]
        assert view.announce("unix:///nonexistent/kvd.sock", NS, [1], "u", 1.0) is False
