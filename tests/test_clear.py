"""Clearing a namespace: KvCore.clear_namespace (unit, tiny capacities) and the Admin
ClearNamespace RPC of a real daemon — the Watch stream's cleared event, the router dropping
the node's blocks, `kvctl evict` and its errors, and a restart that serves none of them."""

from __future__ import annotations

import os

import grpc
import pytest
from core_helpers import NS, PAGE, make_core, run_mover, specs, store

from kvd.core.errors import UnknownNamespace
from kvd.core.events import BlockRemoved, NamespaceCleared
from kvd.core.manager import LoadGrant, StoreGrant
from kvd.router import GlobalView
from kvd.v1 import view_pb2, view_pb2_grpc

pytestmark = pytest.mark.timeout(120)


def cleared_events(events) -> list[tuple]:
    """The clear's events in order: ("removed", hash, tier) per copy, then ("cleared", ns)."""
    out = []
    for e in events:
        if isinstance(e, BlockRemoved):
            assert e.reason == "cleared"
            out.append(("removed", e.hash, e.tier))
        elif isinstance(e, NamespaceCleared):
            out.append(("cleared", e.namespace))
    return out


# -- the core -----------------------------------------------------------------------------------


def test_clear_drops_every_copy_in_every_tier_then_says_cleared():
    core, _ = make_core(3, nvme_blocks=4, write_behind=True)
    store(core, 1, 2)
    run_mover(core)  # 1 and 2 in DRAM and on NVMe
    store(core, 3)
    core.register_namespace("other", 16, PAGE)
    grant = core.prepare_store("other", specs(9))  # DRAM is full: 2, the chain's tail, leaves it
    core.commit_store(grant.lease_id)
    held = sorted((r.hash, sorted(r.copies)) for r in core.blocks(NS))
    assert held == [(1, ["dram", "nvme"]), (2, ["nvme"]), (3, ["dram"])]
    core.take_events()

    assert core.clear_namespace(NS) == 0
    events = cleared_events(core.take_events())
    assert events[-1] == ("cleared", NS)
    assert sorted(events[:-1]) == sorted(
        [("removed", 1, "dram"), ("removed", 1, "nvme"), ("removed", 2, "nvme"), ("removed", 3, "dram")]
    )
    assert core.lookup(NS, [1, 2, 3]) == [] and core.lookup("other", [9]) == ["dram"]
    usage = {u.tier: u for u in core.stats().tiers}
    assert usage["dram"].used_bytes == PAGE and usage["nvme"].used_bytes == 0  # only other's block
    assert core.check() == []
    store(core, 1, 2)  # the namespace and its geometry stay registered
    assert core.lookup(NS, [1, 2]) == ["dram", "dram"]


def test_a_block_being_read_stays_and_the_cleared_event_waits_for_it():
    core, _ = make_core(4)
    store(core, 1, 2)
    grant = core.prepare_load(NS, [1])
    assert isinstance(grant, LoadGrant)
    core.take_events()
    assert core.clear_namespace(NS) == 1  # 1 is being read: it stays
    assert cleared_events(core.take_events()) == [("removed", 2, "dram")]
    assert core.lookup(NS, [1, 2]) == ["dram"]
    core.complete_load(grant.lease_id)
    assert core.clear_namespace(NS) == 0
    assert cleared_events(core.take_events()) == [("removed", 1, "dram"), ("cleared", NS)]
    assert core.check() == []


def test_a_store_in_flight_is_left_to_its_writer():
    core, _ = make_core(4)
    store(core, 1)
    grant = core.prepare_store(NS, specs(5))
    assert isinstance(grant, StoreGrant)
    core.take_events()
    assert core.clear_namespace(NS) == 1  # 5 is leased to a writer, not yet readable
    assert cleared_events(core.take_events()) == [("removed", 1, "dram")]
    core.commit_store(grant.lease_id)
    assert core.lookup(NS, [5]) == ["dram"]
    assert core.clear_namespace(NS) == 0
    assert cleared_events(core.take_events()) == [("removed", 5, "dram"), ("cleared", NS)]
    assert core.check() == []


def test_clearing_an_empty_namespace_says_cleared_and_an_unknown_one_raises():
    core, _ = make_core(2)
    assert core.clear_namespace(NS) == 0
    assert cleared_events(core.take_events()) == [("cleared", NS)]
    with pytest.raises(UnknownNamespace):
        core.clear_namespace("nope")
    assert core.take_events() == []


# -- a real daemon ------------------------------------------------------------------------------

BLOCK = 64 << 10


def watch_until_cleared(address: str, from_seq: int, namespace: str) -> list[view_pb2.Event]:
    """Watch (asking for the cleared kind) from ``from_seq`` until ``namespace`` is cleared."""
    request = view_pb2.WatchRequest(from_seq=from_seq, with_cleared=True)
    events: list[view_pb2.Event] = []
    with grpc.insecure_channel(address) as channel:
        for batch in view_pb2_grpc.ViewStub(channel).Watch(request, timeout=30):
            assert not batch.resync
            events.extend(batch.events)
            if any(e.WhichOneof("kind") == "cleared" and e.cleared.namespace == namespace for e in events):
                return events
    raise AssertionError("the stream ended before the cleared event")


def test_evict_clears_a_namespace_for_watchers_routers_and_restarts(daemon_factory, kvctl, wait_until):
    d = daemon_factory(dram="1MiB", nvme="32MiB").start()
    with d.client() as c, GlobalView([d.address]) as view:
        c.register_namespace("a", 16, BLOCK)
        c.register_namespace("b", 16, BLOCK)
        c.store("a", [1, 2, 3], [os.urandom(BLOCK)] * 3)
        c.store("b", [1, 2], [os.urandom(BLOCK)] * 2)
        assert c.sync() == 0
        start = c.snapshot().as_of_seq
        wait_until(lambda: view.score("a", [1, 2, 3]).best == d.address and view.score("b", [1, 2]).best, what="view")

        out = kvctl(d, "evict", "--namespace", "a")
        assert out.returncode == 0, out.stderr
        assert "\nremoved: 3\n" in out.stdout

        events = watch_until_cleared(d.address, start, "a")
        kinds = [(e.WhichOneof("kind"), getattr(e, e.WhichOneof("kind")).namespace) for e in events]
        assert kinds == [("removed", "a")] * 6 + [("cleared", "a")]  # 3 blocks x (dram, nvme)
        assert {(e.removed.hash, e.removed.tier, e.removed.reason) for e in events[:-1]} == {
            (h, t, "cleared") for h in (1, 2, 3) for t in (2, 3)
        }
        # A plain Watch (an older client) gets the removals but not the cleared kind.
        assert [e.kind for e in next(c.watch(from_seq=start)).events] == ["removed"] * 6

        wait_until(lambda: view.score("a", [1, 2, 3]).nodes == {}, what="the router to drop a's blocks")
        assert view.score("b", [1, 2]).nodes[d.address].matched_blocks == 2
        assert {ns for ns, _, _ in view.index.blocks_of(d.address)} == {"b"}
        assert c.lookup("a", [1, 2, 3]) == [] and c.lookup("b", [1, 2]) == ["dram", "dram"]
        assert c.check() == []

        watch = kvctl(d, "watch", "--from-seq", str(events[-1].seq), "--count", "1")
        assert watch.returncode == 0, watch.stderr
        fields = watch.stdout.split()
        assert (fields[0], fields[2:]) == (f"seq={events[-1].seq}", ["kind=cleared", "namespace=a"])

    d.kill()  # the NVMe manifest forgot the cleared copies: a restart serves none of them
    d.start()
    with d.client() as c:
        assert c.lookup("a", [1]) == [] and c.lookup("b", [1, 2]) == ["nvme", "nvme"]
        assert {n.name: n.blocks for n in c.status().namespaces} == {"a": 0, "b": 2}


def test_evict_errors_are_one_line_and_exit_non_zero(daemon_factory, kvctl, tmp_path):
    d = daemon_factory().start()
    unknown = kvctl(d, "evict", "--namespace", "nope")
    assert unknown.returncode == 1 and unknown.stdout == ""
    assert unknown.stderr.splitlines() == ["kvctl: not_found: namespace 'nope' is not registered"]
    usage = kvctl(d, "evict")
    assert usage.returncode == 2 and "--namespace" in usage.stderr
    gone = kvctl(f"unix://{tmp_path}/no.sock", "evict", "--namespace", "a", "--timeout", "1")
    assert gone.returncode == 1 and len(gone.stderr.splitlines()) == 1 and "unavailable" in gone.stderr


def test_client_clears_and_watches_cleared_and_session_events(daemon_factory):
    d = daemon_factory(dram="1MiB", nvme="0").start()
    with d.client() as c:
        c.register_namespace("cl", 16, 65536)
        start = c.snapshot("cl").as_of_seq
        c.session_event("cl", "s1", "turn_start", [1, 2])
        assert c.store("cl", [1, 2], [os.urandom(65536)] * 2, session_id="s1") == 2
        c.session_event("cl", "s1", "tool_pause", tool="bash", expected_pause_s=3.0)
        assert c.clear_namespace("cl") == (2, 0)
        end = c.snapshot("cl").as_of_seq
        plain = [e for b in _until(c.watch(from_seq=start, namespace="cl"), end) for e in b.events]
        assert {e.kind for e in plain} == {"stored", "removed"}  # older watchers see what they saw
        every = [
            e
            for b in _until(c.watch(from_seq=start, namespace="cl", with_cleared=True, with_sessions=True), end)
            for e in b.events
        ]
        assert [e.seq for e in every] == list(range(start, end))
        stored = [e for e in every if e.kind == "stored"]
        assert {e.session_id for e in stored} == {"s1"}
        sessions = [(e.session_id, e.state, e.tool) for e in every if e.kind == "session"]
        assert sessions == [("s1", "active", None), ("s1", "tool_pause", "bash")]
        assert every[-1].kind == "cleared" and every[-1].namespace == "cl"
        with pytest.raises(Exception, match="not registered"):
            c.clear_namespace("nope")


def _until(batches, end_seq: int):
    for batch in batches:
        yield batch
        if batch.next_seq >= end_seq:
            return
