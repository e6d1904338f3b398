"""The View service of a real daemon: Watch (resumed, live, resync), Snapshot, Score, kvctl watch.

Streams start from a sequence number taken before the change they wait for (a snapshot's
``as_of_seq``), so no event can slip past a subscription that is still being set up.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import threading
from types import SimpleNamespace

import grpc
import pytest
from prometheus_client import generate_latest
from test_metrics import FakeState, Scrape, tiny_core

from kvd.cli import render
from kvd.cli.kvctl import _event_fields
from kvd.client import Client
from kvd.media import ALL_TIERS
from kvd.server.metrics import DaemonMetrics
from kvd.server.view import ViewService, load_s_per_byte
from kvd.v1 import view_pb2, view_pb2_grpc

pytestmark = pytest.mark.timeout(120)

BLOCK = 64 << 10
NS = "view"


def collect(client: Client, until_seq: int, **watch_args) -> list:
    """Events of a Watch stream up to (not including) ``until_seq``, read in a thread."""
    events: list = []
    done = threading.Event()

    def run() -> None:
        for batch in client.watch(**watch_args):
            assert not batch.resync
            events.extend(batch.events)
            if batch.next_seq >= until_seq:
                break
        done.set()

    threading.Thread(target=run, daemon=True).start()
    assert done.wait(30), f"only {len(events)} events arrived"
    return [e for e in events if e.seq < until_seq]


def every_kind(address: str, from_seq: int, until_seq: int, **request) -> list[view_pb2.Event]:
    """Events of a Watch that asks for every kind (cleared, session), up to ``until_seq``."""
    req = view_pb2.WatchRequest(from_seq=from_seq, with_cleared=True, with_sessions=True, **request)
    out: list[view_pb2.Event] = []
    with grpc.insecure_channel(address) as channel:
        for batch in view_pb2_grpc.ViewStub(channel).Watch(req, timeout=30):
            assert not batch.resync
            out.extend(batch.events)
            if batch.next_seq >= until_seq:
                break
    return [e for e in out if e.seq < until_seq]


def test_watch_replays_stores_write_behind_and_evictions_in_order(daemon_factory):
    d = daemon_factory(dram="1MiB", nvme="32MiB").start()  # 16 blocks of DRAM
    with d.client() as c:
        c.register_namespace(NS, 16, BLOCK)
        start = c.snapshot(NS).as_of_seq
        c.store(NS, [1, 2, 3, 4], [os.urandom(BLOCK) for _ in range(4)])
        assert c.sync() == 0
        end = c.snapshot(NS).as_of_seq
        events = collect(c, end, from_seq=start, namespace=NS)
        # Every kind together is the whole log; a plain watch gets it less the session kind.
        everything = every_kind(d.address, start, end, namespace=NS)
        assert [e.seq for e in everything] == list(range(start, end))
        kinds = [e.WhichOneof("kind") for e in everything]
        assert "session" in kinds
        assert [e.seq for e in events] == [e.seq for e, k in zip(everything, kinds) if k != "session"]
        stored = sorted((e.hash, e.tier) for e in events if e.kind == "stored")
        assert stored == sorted((h, t) for h in (1, 2, 3, 4) for t in ("dram", "nvme"))
        assert {e.parent for e in events if e.hash == 2} == {1}
        # Resuming from a sequence number replays exactly what followed it.
        resumed = collect(c, end, from_seq=events[1].seq, namespace=NS)
        assert resumed == events[1:]
        # 17 more blocks push the oldest out of DRAM: removals are events too.
        c.store(NS, list(range(100, 117)), [os.urandom(BLOCK)] * 17)
        assert c.sync() == 0
        later = collect(c, c.snapshot(NS).as_of_seq, from_seq=end, namespace=NS)
        removed = [e for e in later if e.kind == "removed"]
        assert removed and {e.tier for e in removed} == {"dram"}
        assert {e.reason for e in removed} <= {"evicted", "demoted"}


def test_live_watch_gets_events_as_they_happen(daemon_factory):
    d = daemon_factory().start()
    with d.client() as c, d.client() as writer:
        c.register_namespace(NS, 16, 4096)
        start = c.snapshot(NS).as_of_seq
        got = []
        ready = threading.Event()

        def watch() -> None:
            for batch in c.watch(from_seq=start):
                got.extend(batch.events)
                if any(e.kind == "stored" and e.hash == 7 for e in got):
                    break
            ready.set()

        threading.Thread(target=watch, daemon=True).start()
        writer.store(NS, [7], [bytes(4096)])
        assert ready.wait(30)
        assert [(e.kind, e.hash, e.tier) for e in got][0] == ("stored", 7, "dram")


def test_snapshot_plus_events_equal_the_daemons_block_list(daemon_factory):
    d = daemon_factory(dram="1MiB", nvme="32MiB").start()
    with d.client() as c:
        c.register_namespace(NS, 16, BLOCK)
        c.store(NS, list(range(1, 11)), [os.urandom(BLOCK)] * 10)
        snap = c.snapshot(NS, page_size=3)  # paged
        state = {(b.hash, t) for b in snap.blocks for t in b.tiers}
        c.store(NS, list(range(20, 40)), [os.urandom(BLOCK)] * 20)
        assert c.sync() == 0
        truth = {(b.hash, t) for b in c.list_blocks(NS) for t in b.tiers}
        for e in collect(c, c.snapshot(NS).as_of_seq, from_seq=snap.as_of_seq, namespace=NS):
            if e.kind == "stored":
                state.add((e.hash, e.tier))
            elif e.kind == "removed":
                state.discard((e.hash, e.tier))
        assert state == truth


def test_a_resume_point_that_fell_out_or_another_epoch_asks_for_resync(daemon_factory):
    d = daemon_factory(extra=["--event-buffer", "8"]).start()
    with d.client() as c:
        c.register_namespace(NS, 16, 4096)
        c.store(NS, list(range(1, 21)), [bytes(4096)] * 20)
        (batch,) = list(c.watch(from_seq=1))
        assert batch.resync and batch.events == []
        assert batch.next_seq > 20
        (other,) = list(c.watch(from_seq=batch.next_seq, epoch=b"not-this-one"))
        assert other.resync
        # A position far beyond the head (no epoch given) is answered at once, not awaited.
        (ahead,) = list(c.watch(from_seq=batch.next_seq + 1_000_000))
        assert ahead.resync and ahead.next_seq == batch.next_seq
    d.kill()
    d.start()
    with d.client() as c:
        (after,) = list(c.watch(from_seq=1, epoch=batch.epoch))
        assert after.resync and after.epoch != batch.epoch  # a restart is a new epoch


def test_score_counts_the_prefix_per_tier_with_a_load_time(daemon_factory):
    d = daemon_factory(dram="1MiB", nvme="32MiB").start()
    with d.client() as c:
        c.register_namespace(NS, 16, BLOCK)
        c.store(NS, list(range(1, 17)), [os.urandom(BLOCK)] * 16)
        assert c.sync() == 0
        c.store(NS, [50, 51, 52, 53], [os.urandom(BLOCK)] * 4)  # pushes 4 of the first out
        tiers = c.lookup(NS, list(range(1, 17)))
        score = c.score(NS, [*range(1, 17), 999])
        assert score.matched_blocks == 16 and score.matched_tokens == 16 * 16
        assert score.by_tier == {t: tiers.count(t) for t in set(tiers)} and "nvme" in score.by_tier
        dram, nvme = score.by_tier.get("dram", 0), score.by_tier["nvme"]
        expected = dram * BLOCK / 25e9 + nvme * BLOCK * (1 / 6e9 + 1 / 25e9)
        assert score.estimated_load_s == pytest.approx(expected)
        assert c.score(NS, [999]).matched_blocks == 0


def test_kvctl_watch_prints_events_as_json_lines(daemon_factory):
    d = daemon_factory(extra=["--event-buffer", "8"]).start()
    with d.client() as c:
        c.register_namespace(NS, 16, 4096)
        start = c.snapshot(NS).as_of_seq
        c.store(NS, [1, 2, 3], [bytes(4096)] * 3)
        assert c.sync() == 0  # 7 events since start: a session, 3 stored in dram, then 3 in nvme
    cmd = [sys.executable, "-m", "kvd.cli.kvctl", "--addr", d.address, "watch", "-o", "json"]
    out = subprocess.run([*cmd, "--from-seq", str(start), "--count", "4"], capture_output=True, text=True, timeout=60)
    lines = [json.loads(line) for line in out.stdout.splitlines()]
    assert out.returncode == 0, out.stderr
    # The store's (inferred) session became active, then its blocks landed in DRAM.
    session, *stored = lines
    assert (session["kind"], session["state"]) == ("session", "active")
    assert [(e["kind"], e["hash"], e["tier"], e["session_id"]) for e in stored] == [
        ("stored", h, "dram", session["session_id"]) for h in (1, 2, 3)
    ]
    with d.client() as c:
        c.store(NS, [4, 5, 6, 7], [bytes(4096)] * 4)  # the first events fall out of the buffer
        assert c.sync() == 0
    stale = subprocess.run([*cmd, "--from-seq", str(start), "--count", "1"], capture_output=True, text=True, timeout=60)
    assert stale.returncode == 1 and stale.stdout == ""
    assert len(stale.stderr.splitlines()) == 1 and "resynchronize" in stale.stderr


def test_session_changes_reach_only_a_watcher_that_asks_and_kvctl_prints_them(daemon_factory, kvctl):
    d = daemon_factory(extra=["--no-write-behind"]).start()  # no NVMe copy lands in between
    with d.client() as c:
        c.register_namespace(NS, 16, 4096)
        start = c.snapshot(NS).as_of_seq
        c.session_event(NS, "s1", "turn_start", [1])
        c.store(NS, [1], [bytes(4096)], session_id="s1")
        c.session_event(NS, "s1", "turn_end")
        c.session_event(NS, "s1", "tool_pause", tool="pytest")
        end = c.snapshot(NS).as_of_seq
        plain = collect(c, end, from_seq=start, namespace=NS)
    assert [e.kind for e in plain] == ["stored"]
    sessions = [
        (e.session.session_id, e.session.state, e.session.tool)
        for e in every_kind(d.address, start, end, namespace=NS)
        if e.WhichOneof("kind") == "session"
    ]
    assert sessions[0] == ("s1", "active", "") and sessions[-1] == ("s1", "tool_pause", "pytest")
    out = kvctl(d, "watch", "--from-seq", str(start), "--count", str(end - start))
    assert out.returncode == 0, out.stderr
    lines = [line.split()[2:] for line in out.stdout.splitlines()]
    assert [line for line in lines if line[0] == "kind=stored"] == [
        ["kind=stored", f"namespace={NS}", "hash=1", "parent=-", "tier=dram", "nbytes=4096", "session_id=s1"]
    ]
    assert lines[-1] == ["kind=session", f"namespace={NS}", "session_id=s1", "state=tool_pause", "tool=pytest"]


# -- the cluster tier in the view's answers (no daemon: the pieces on tiny inputs) ------------


def test_load_cost_per_byte_of_each_tier_up_to_hbm():
    costs = load_s_per_byte(25.0, 6.0)
    assert costs == {
        "hbm": 0.0,
        "dram": pytest.approx(1 / 25e9),
        "nvme": pytest.approx(1 / 6e9 + 1 / 25e9),
        "cluster": pytest.approx(1 / 3.3e9 + 1 / 25e9),  # a get into DRAM, then up
    }
    assert load_s_per_byte(25.0, 6.0, cluster_get_gbps=10.0)["cluster"] == pytest.approx(1 / 10e9 + 1 / 25e9)


def test_score_weighs_a_run_of_cluster_blocks_at_the_clusters_cost():
    class Core:
        def namespace(self, name):
            return SimpleNamespace(block_bytes=1000, block_tokens=16)

        def lookup_codes(self, namespace, hashes):
            return [2, 2, 3][: len(hashes)]  # two in DRAM, one on NVMe

    class Cluster:
        async def extend(self, namespace, hashes, held):
            assert held == 3
            return 3  # the cluster holds the next three

    state = SimpleNamespace(core=Core(), cluster=Cluster(), after_core=lambda: None)
    service = ViewService(state, 25.0, 6.0, cluster_get_gbps=2.0)
    context = SimpleNamespace(invocation_metadata=lambda: ())
    got = asyncio.run(service.Score(view_pb2.ScoreRequest(namespace=NS, hashes=range(1, 8)), context))
    assert (got.matched_blocks, got.matched_tokens) == (6, 96)
    assert [(t.tier, t.blocks) for t in got.by_tier] == [(2, 2), (3, 1), (4, 3)]
    expected = 2 * 1000 / 25e9 + 1000 * (1 / 6e9 + 1 / 25e9) + 3 * 1000 * (1 / 2e9 + 1 / 25e9)
    assert got.estimated_load_s == pytest.approx(expected)


def test_kvctl_watch_names_the_cluster_tier():
    stored = view_pb2.Event(seq=5, stored=view_pb2.BlockStoredEvent(namespace=NS, hash=7, tier=4, nbytes=4096))
    removed = view_pb2.Event(seq=6, removed=view_pb2.BlockRemovedEvent(namespace=NS, hash=7, tier=4, reason="audit"))
    assert _event_fields(stored)["tier"] == "cluster"
    assert {k: v for k, v in _event_fields(removed).items() if k != "unix_time"} == {
        "seq": 6, "kind": "removed", "namespace": NS, "hash": 7, "tier": "cluster", "reason": "audit",
    }
    assert render.pairs(_event_fields(stored)).split()[2:] == [
        "kind=stored", f"namespace={NS}", "hash=7", "parent=-", "tier=cluster", "nbytes=4096", "session_id=-",
    ]


def test_lookup_hits_have_a_cluster_series_from_the_start():
    metrics = DaemonMetrics(FakeState(tiny_core()))
    m = Scrape(generate_latest(metrics.registry).decode())
    assert {t: m("kvd_lookup_hits_total", tier=t) for t in ALL_TIERS} == {t: 0 for t in ALL_TIERS}
    metrics.looked_up([(2, 3), (4, 2)], misses=1)
    m = Scrape(generate_latest(metrics.registry).decode())
    assert (m("kvd_lookup_hits_total", tier="dram"), m("kvd_lookup_hits_total", tier="cluster")) == (3, 2)
    assert m("kvd_lookup_misses_total") == 1
