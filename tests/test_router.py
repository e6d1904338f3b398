"""kvd.router: the in-memory index (unit) and GlobalView over real daemons (integration)."""

from __future__ import annotations

import os
import random
import threading
from types import SimpleNamespace

import pytest

from kvd.media import ALL_TIERS
from kvd.router import DEFAULT_TIER_WEIGHTS, GlobalView, MemoryIndex, RedisIndex
from kvd.router.view import _Feed
from kvd.server.view import load_s_per_byte
from kvd.v1 import types_pb2, view_pb2

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


def test_a_nodes_prefix_goes_on_through_any_nodes_cluster_blocks(make_index):
    index = make_index()
    index.apply("a", [(NS, 1, "dram"), (NS, 2, "dram")], [])
    index.apply("b", [(NS, 1, "nvme")] + [(NS, h, "cluster") for h in (2, 3, 4)], [])  # b put 2, 3, 4
    index.apply("c", [("other", 7, "dram")], [])  # known, holds nothing of NS
    m = index.match(NS, [1, 2, 3, 4, 5])
    # a's own DRAM copy of 2 counts before the cluster's; 1 is nobody's in the cluster.
    assert {n: (x.blocks, x.by_tier) for n, x in m.items()} == {
        "a": (4, {"dram": 2, "cluster": 2}),
        "b": (4, {"nvme": 1, "cluster": 3}),
    }
    assert (m["a"].own_blocks, m["b"].own_blocks) == (2, 1)
    # Starting in the cluster, every known node reads the prefix, up to the cluster's gap.
    m = index.match(NS, [2, 3, 9, 4])
    assert {n: (x.blocks, x.by_tier) for n, x in m.items()} == {
        "a": (2, {"dram": 1, "cluster": 1}),
        "b": (2, {"cluster": 2}),
        "c": (2, {"cluster": 2}),
    }
    assert m["c"].own_blocks == 0
    assert {n: x.by_tier for n, x in index.match(NS, [3, 4], nodes=["d", "a"]).items()} == {
        "d": {"cluster": 2},  # a node the index never heard of reads the cluster too
        "a": {"cluster": 2},
    }
    assert index.match("other", [2, 3]) == {} and index.match(NS, [9, 2]) == {}
    assert index.blocks_of("b") == {(NS, 1, "nvme"), (NS, 2, "cluster"), (NS, 3, "cluster"), (NS, 4, "cluster")}


def test_a_cluster_block_stays_while_one_announcer_keeps_it_and_leaves_with_the_last(make_index):
    index = make_index()
    index.apply("a", [(NS, 1, "cluster"), (NS, 2, "cluster")], [])
    index.apply("b", [(NS, 2, "cluster"), (NS, 2, "cluster")], [])  # both put 2; a repeat is one announcement
    index.apply("c", [(NS, 5, "dram")], [(NS, 2, "cluster")])  # c never announced 2: no retraction
    assert index.match(NS, [1, 2], nodes=["c"])["c"].by_tier == {"cluster": 2}
    index.apply("b", [], [(NS, 2, "cluster")])  # a still announces it
    assert index.match(NS, [1, 2], nodes=["c"])["c"].by_tier == {"cluster": 2}
    assert index.blocks_of("b") == set()
    index.apply("a", [], [(NS, 1, "cluster")])
    assert index.match(NS, [1, 2]) == {}
    assert {n: x.blocks for n, x in index.match(NS, [2]).items()} == {"a": 1, "b": 1, "c": 1}
    index.drop_node("a")  # the last announcer of 2 left: 2 leaves the view with it
    assert index.match(NS, [2]) == {} and index.blocks_of("a") == set()
    index.apply("b", [(NS, 2, "cluster")], [])  # announced again
    assert {n: x.by_tier for n, x in index.match(NS, [2]).items()} == {"b": {"cluster": 1}, "c": {"cluster": 1}}


def test_a_nodes_cleared_namespace_takes_its_cluster_announcements_there_only(make_index):
    index = make_index()
    index.apply("a", [(NS, 1, "cluster"), (NS, 2, "cluster"), ("other", 1, "cluster"), (NS, 1, "dram")], [])
    index.apply("b", [(NS, 1, "cluster")], [])
    index.drop_namespace("a", NS)
    assert index.blocks_of("a") == {("other", 1, "cluster")}
    assert {n: x.by_tier for n, x in index.match(NS, [1, 2]).items()} == {"a": {"cluster": 1}, "b": {"cluster": 1}}
    index.drop_namespace("b", NS)
    assert index.match(NS, [1]) == {}
    assert set(index.match("other", [1])) == {"a", "b"}


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


def test_feed_reads_the_cluster_tier_from_events_and_from_every_page_of_a_snapshot():
    index = MemoryIndex()
    index.apply("n", [(NS, 99, "dram")], [])  # before the resync: forgotten by it
    feed = feed_applying(index)
    feed.changed = threading.Condition()
    pages = {
        "": view_pb2.SnapshotResponse(
            epoch=b"e1", as_of_seq=40, next_page_token="p2",
            blocks=[types_pb2.BlockInfo(namespace=NS, hash=1, tiers=[2, 4])],
            namespaces=[view_pb2.NamespaceGeometry(namespace=NS, block_tokens=16)],
        ),
        "p2": view_pb2.SnapshotResponse(epoch=b"e1", as_of_seq=41, blocks=[types_pb2.BlockInfo(namespace=NS, hash=2,
                                                                                                tiers=[4])]),
    }

    class Stub:
        def Snapshot(self, request, timeout):
            return pages[request.page_token]

    feed._resync(SimpleNamespace(timeout=5.0), Stub())
    assert index.blocks_of("n") == {(NS, 1, "dram"), (NS, 1, "cluster"), (NS, 2, "cluster")}
    assert (feed.epoch, feed.next_seq, feed.block_tokens, feed.connected) == (b"e1", 40, {NS: 16}, True)
    feed._apply([stored(3, tier=4), removed(1, tier=4)])  # TIER_CLUSTER on the Watch stream
    assert index.blocks_of("n") == {(NS, 1, "dram"), (NS, 2, "cluster"), (NS, 3, "cluster")}


def view_over(index, tokens: dict[str, int]) -> GlobalView:
    """A GlobalView over ``index`` whose nodes are connected feeds that apply nothing (no
    thread, no daemon): ``tokens`` maps each node to its namespace's tokens per block."""
    view = GlobalView(index=index)
    for node, n in tokens.items():
        feed = feed_applying(index)
        feed.address, feed.connected, feed.block_tokens = node, True, {NS: n}
        view._feeds[node] = feed
    return view


def test_score_counts_cluster_blocks_for_every_node_and_favours_none_on_them_alone():
    index = MemoryIndex()
    index.apply("a", [(NS, 1, "dram")], [])
    index.apply("b", [(NS, h, "cluster") for h in (1, 2, 3)], [])
    view = view_over(index, {"a": 16, "b": 16, "c": 16})  # c holds nothing
    score = view.score(NS, [1, 2, 3, 4])
    assert {n: (s.matched_blocks, s.tokens_by_tier) for n, s in score.nodes.items()} == {
        "a": (3, {"dram": 16, "cluster": 32}),
        "b": (3, {"cluster": 48}),
        "c": (3, {"cluster": 48}),
    }
    assert score.nodes["a"].score == pytest.approx(0.8 + 2 * 0.3)
    assert score.nodes["c"].score == pytest.approx(3 * 0.3)
    assert score.best == "a"
    # The cluster alone: every node reads the same prefix, none is favoured.
    alone = view.score(NS, [2, 3])
    assert {n: s.tokens_by_tier for n, s in alone.nodes.items()} == {n: {"cluster": 32} for n in "abc"}
    assert alone.best is None
    # b cannot be reached: it is not scored, but what it put into the cluster still counts.
    view._feeds["b"].connected = False
    assert {n: s.tokens_by_tier for n, s in view.score(NS, [1, 2]).nodes.items()} == {
        "a": {"dram": 16, "cluster": 16},
        "c": {"cluster": 32},
    }
    # Weights that leave the cluster out give its blocks nothing.
    view.tier_weights = {"dram": 1.0}
    assert view.score(NS, [1, 2, 3]).nodes["a"].score == pytest.approx(1.0)


def test_default_weights_order_the_tiers_by_their_load_cost():
    costs = load_s_per_byte(25.0, 6.0)  # the daemon's defaults
    assert sorted(ALL_TIERS, key=costs.get) == list(ALL_TIERS)  # hbm < dram < nvme < cluster
    assert sorted(ALL_TIERS, key=DEFAULT_TIER_WEIGHTS.get, reverse=True) == list(ALL_TIERS)
    # The cluster weighs NVMe's weight in the ratio of their costs, to one decimal.
    assert DEFAULT_TIER_WEIGHTS["cluster"] == round(DEFAULT_TIER_WEIGHTS["nvme"] * costs["nvme"] / costs["cluster"], 1)
    assert DEFAULT_TIER_WEIGHTS["cluster"] > 0


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


@pytest.mark.parametrize("backend", ["memory", "redis"])
def test_a_real_nodes_prefix_continues_in_the_cluster_another_node_announced(daemon_factory, request, backend):
    index = MemoryIndex() if backend == "memory" else RedisIndex(request.getfixturevalue("redis_server"), "rc:")
    a = daemon_factory().start()
    with a.client() as c:
        c.register_namespace(NS, 16, 4096)
        c.store(NS, [1, 2], [bytes(4096)] * 2)
    index.apply("10.0.0.9:7070", [(NS, h, "cluster") for h in (2, 3)], [])  # a node the view does not follow
    with GlobalView([a.address], index=index) as view:
        caught_up(view, a)
        score = view.score(NS, [1, 2, 3, 4])
        assert score.best == a.address
        assert score.nodes[a.address].tokens_by_tier == {"dram": 32, "cluster": 16}
        view.remove_node(a.address)  # a's own entries go; the other node's announcements stay
        assert index.blocks_of(a.address) == set()
        assert index.match(NS, [2, 3], nodes=["x"])["x"].by_tier == {"cluster": 2}


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
