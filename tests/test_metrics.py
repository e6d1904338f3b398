"""`kvd serve --metrics-port`: exact counts from real daemons, scraped and parsed as Prometheus
would; the collector, the event feed and the RPC interceptor on tiny inputs; the Grafana
dashboard against docs/metrics.md and a real scrape."""

from __future__ import annotations

import asyncio
import json
import re
import socket
import subprocess
import sys
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from kvd.client import ClientError
from kvd.core.eventbuffer import EventBuffer
from kvd.core.events import BlockStored, SessionChanged
from kvd.core.manager import BlockSpec, CoreConfig, KvCore, StoreGrant, Wait
from kvd.core.sessions import SessionTable
from kvd.core.types import Moved, Outcome
from kvd.policies import TypedPolicy
from kvd.server.metrics import DaemonMetrics, RpcMetricsInterceptor, Snapshot, StateCollector, TierGauge
from kvd.tiers import ExtentAllocator

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs" / "metrics.md"
DASHBOARD = ROOT / "deploy" / "grafana" / "kvd-dashboard.json"
NS = "llama"
BLOCK = 64 << 10  # 16 blocks fill a 1 MiB DRAM tier


def block(h: int) -> bytes:
    return h.to_bytes(8, "little") * (BLOCK // 8)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def metrics_daemon(daemon_factory, *extra: str, **kwargs):
    port = free_port()
    d = daemon_factory(extra=["--metrics-port", str(port), "--metrics-host", "127.0.0.1", *extra], **kwargs)
    d.metrics_port = port
    return d.start()


def scrape_text(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
        assert reply.status == 200
        return reply.read().decode()


def samples(text: str) -> dict[tuple[str, frozenset], float]:
    """(sample name, its labels) -> value, for every sample of a scrape."""
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[s.name, frozenset(s.labels.items())] = s.value
    return out


class Scrape:
    def __init__(self, text: str) -> None:
        self.text = text
        self.values = samples(text)

    def __call__(self, name: str, **labels: str) -> float:
        """One sample's value; 0 for a labelled counter never incremented (no sample yet)."""
        return self.values.get((name, frozenset(labels.items())), 0.0)

    def total(self, name: str, **labels: str) -> float:
        """The sum over samples of ``name`` whose labels include ``labels``."""
        want = set(labels.items())
        return sum(v for (n, ls), v in self.values.items() if n == name and want <= ls)


def scrape(d) -> Scrape:
    return Scrape(scrape_text(d.metrics_port))


# -- real daemons ---------------------------------------------------------------------------


def test_hits_misses_sessions_and_tiers_after_real_traffic(daemon_factory, wait_until):
    d = metrics_daemon(daemon_factory)
    with d.client(shared_memory=False) as c:
        c.register_namespace(NS, 16, BLOCK)
        assert c.store(NS, [1, 2, 3, 4], [block(h) for h in (1, 2, 3, 4)]) == 4
        assert [b is not None for b in c.load(NS, [1, 2, 99])] == [True, True, False]
        assert c.lookup(NS, [1, 2, 3, 9, 4]) == ["dram"] * 3
        with pytest.raises(ClientError):
            c.lookup("no-such-namespace", [1])
        c.session_event(NS, "s1", "turn_start", [10, 11])
        c.session_event(NS, "s1", "turn_end")
        c.session_event(NS, "s1", "tool_pause", tool="grep")
        assert c.sync() == 0
        m = scrape(d)
        status = c.status()

    assert m("kvd_load_hits_total", tier="dram", **{"class": "session"}) == 2
    assert m.total("kvd_load_hits_total") == 2
    assert m("kvd_load_misses_total") == 1
    assert m("kvd_lookup_hits_total", tier="dram") == 3
    assert m.total("kvd_lookup_hits_total") == 3
    assert m("kvd_lookup_misses_total") == 2
    # The store's chain is an inferred session (active); s1 is paused.
    assert {s: m("kvd_sessions", state=s) for s in ("active", "idle", "tool_pause", "ended")} == {
        "active": 1, "idle": 0, "tool_pause": 1, "ended": 0,
    }
    assert m("kvd_namespaces") == 1 and m("kvd_leases") == 0 and m("kvd_write_behind_pending_blocks") == 0
    # Write-behind copied the four blocks down: bytes on the dram->nvme link, and the gauges
    # agree with the daemon's own Status.
    assert m("kvd_tier_moved_bytes_total", src="dram", dst="nvme", kind="write_behind") == 4 * BLOCK
    for t in status.tiers:
        assert m("kvd_tier_capacity_bytes", tier=t.name) == t.capacity_bytes
        assert m("kvd_tier_used_bytes", tier=t.name) == t.used_bytes
        assert m("kvd_tier_blocks", tier=t.name) == t.blocks == 4
    assert m("kvd_info", policy="typed", version=status.version) == 1
    # RPCs by method and status code (histogram counts).
    assert m("kvd_rpc_duration_seconds_count", service="kvd.v1.Engine", method="Lookup", code="OK") == 1
    assert m("kvd_rpc_duration_seconds_count", service="kvd.v1.Engine", method="Lookup", code="NOT_FOUND") == 1
    assert m("kvd_rpc_duration_seconds_count", service="kvd.v1.Engine", method="SessionEvent", code="OK") == 3
    assert m("kvd_rpc_duration_seconds_count", service="kvd.v1.Admin", method="Sync", code="OK") == 1
    assert m("kvd_rpc_duration_seconds_bucket", service="kvd.v1.Engine", method="Lookup", code="OK", le="+Inf") == 1
    assert m.total("kvd_rpc_duration_seconds_count", service="grpc.health.v1.Health", method="Check") >= 1
    assert not re.search(r"^kvd_\w+_created", m.text, re.M)  # no *_created series


def test_events_evictions_and_watch_streams_agree_with_the_watch_stream(daemon_factory, wait_until):
    d = metrics_daemon(daemon_factory)
    with d.client(shared_memory=False) as c:
        c.register_namespace(NS, 16, BLOCK)
        c.store(NS, [1, 2, 3, 4], [block(h) for h in (1, 2, 3, 4)])
        c.session_event(NS, "s1", "turn_start", [10])
        assert c.sync() == 0
        assert c.clear_namespace(NS) == (4, 0)  # four blocks, each in DRAM and on NVMe
        watch = c.watch(from_seq=1, with_cleared=True, with_sessions=True)
        seen: dict[str, int] = {}
        while "cleared" not in seen:
            for e in next(watch).events:
                seen[e.kind] = seen.get(e.kind, 0) + 1
        # The open stream has sent everything: one stream, no lag.
        wait_until(lambda: scrape(d)("kvd_watch_lag_events") == 0, what="the Watch stream to catch up")
        m = scrape(d)
        assert m("kvd_watch_streams") == 1
        watch.close()
        wait_until(lambda: scrape(d)("kvd_watch_streams") == 0, what="the closed Watch stream to go")
        watch_calls = {"service": "kvd.v1.View", "method": "Watch"}
        wait_until(lambda: scrape(d).total("kvd_rpc_duration_seconds_count", **watch_calls) == 1, what="its timing")
        assert scrape(d)("kvd_rpc_duration_seconds_count", code="CANCELLED", **watch_calls) == 1

    assert {k: int(m("kvd_events_total", kind=k)) for k in seen} == seen
    assert seen["stored"] == 8 and seen["removed"] == 8  # 4 in DRAM, 4 written behind
    for tier in ("dram", "nvme"):
        assert m("kvd_evictions_total", tier=tier, reason="cleared", **{"class": "session"}) == 4
        assert m("kvd_tier_blocks", tier=tier) == 0
    assert m.total("kvd_demotions_total") == 0


def test_demotions_by_class_and_reason_without_write_behind(daemon_factory):
    d = metrics_daemon(daemon_factory, "--no-write-behind", dram="1MiB", nvme="64MiB")
    first, second = list(range(100, 116)), list(range(200, 204))
    with d.client(shared_memory=False) as c:
        c.register_namespace(NS, 16, BLOCK)
        assert c.store(NS, first, [block(h) for h in first]) == 16  # DRAM is full
        assert c.store(NS, second, [block(h) for h in second]) == 4  # four of the first go down
        assert c.lookup(NS, first) == ["dram"] * 12 + ["nvme"] * 4  # the chain's tail went first
        m = scrape(d)
        assert [b is not None for b in c.load(NS, first[-1:])] == [True]  # promoted back up
        after = scrape(d)
        assert c.check() == []
    assert m("kvd_demotions_total", tier="dram", reason="capacity", **{"class": "session"}) == 4
    assert m.total("kvd_demotions_total") == 4 and m.total("kvd_evictions_total") == 0
    assert m("kvd_tier_moved_bytes_total", src="dram", dst="nvme", kind="demote") == 4 * BLOCK
    assert (m("kvd_tier_blocks", tier="dram"), m("kvd_tier_blocks", tier="nvme")) == (16, 4)
    assert after("kvd_load_hits_total", tier="nvme", **{"class": "session"}) == 1
    assert after("kvd_tier_moved_bytes_total", src="nvme", dst="dram", kind="promote") == BLOCK


def test_prefetches_and_the_evictions_that_made_way(daemon_factory, wait_until):
    # As tests/test_daemon_sessions.py: a's context leaves DRAM for b's, b ends, a pauses
    # for a short tool call, and the typed policy brings a's blocks back before it resumes.
    a, b = list(range(100, 108)), list(range(200, 216))
    d = metrics_daemon(daemon_factory, dram="1MiB", nvme="64MiB")
    with d.client(shared_memory=False) as c:
        c.register_namespace(NS, 16, BLOCK)
        c.session_event(NS, "a", "turn_start", a)
        assert c.store(NS, a, [block(h) for h in a], session_id="a") == 8
        c.session_event(NS, "a", "turn_end")
        assert c.sync() == 0
        c.session_event(NS, "b", "turn_start", b)
        assert c.store(NS, b, [block(h) for h in b], session_id="b") == 16
        c.session_event(NS, "b", "session_end")
        assert c.lookup(NS, a) == ["nvme"] * 8
        c.session_event(NS, "a", "tool_pause", tool="run_tests", expected_pause_s=1.0)
        wait_until(lambda: c.lookup(NS, a) == ["dram"] * 8, timeout=20, what="a's blocks prefetched to DRAM")
        m = scrape(d)
    assert m("kvd_evictions_total", tier="dram", reason="capacity", **{"class": "session"}) == 8  # for b
    assert m("kvd_evictions_total", tier="dram", reason="prefetch", **{"class": "ephemeral"}) == 8  # for a
    assert m("kvd_prefetches_total", tier="dram", **{"class": "tool_pause"}) == 8
    assert m.total("kvd_prefetches_total") == 8
    assert m("kvd_tier_moved_bytes_total", src="nvme", dst="dram", kind="prefetch") == 8 * BLOCK
    assert (m("kvd_sessions", state="tool_pause"), m("kvd_sessions", state="ended")) == (1, 1)


def run_serve(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [
            sys.executable, "-m", "kvd.cli.kvd_main", "serve", "--socket", str(tmp_path / "kvd.sock"),
            "--dram-bytes", "4MiB", "--nvme-bytes", "0", "--shm-dir", str(tmp_path / "shm"), *args,
        ],
        capture_output=True, text=True, timeout=60,
    )


def test_a_port_in_use_stops_the_daemon_with_one_line(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        r = run_serve(tmp_path, "--metrics-port", str(port), "--metrics-host", "127.0.0.1")
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1] == (
        f"kvd serve: --metrics-port {port}: cannot serve metrics on 127.0.0.1:{port}: Address already in use"
    )
    assert not (tmp_path / "kvd.sock").exists()  # it never served


@pytest.mark.parametrize("args", [("--metrics-port", "65536"), ("--metrics-port", "-1"), ("--metrics-host", "a b")])
def test_a_bad_metrics_setting_exits_2_naming_it(tmp_path, args):
    r = run_serve(tmp_path, *args)
    assert r.returncode == 2
    assert len(r.stderr.strip().splitlines()) == 1 and args[0] in r.stderr


# -- the dashboard --------------------------------------------------------------------------


def documented_metrics() -> set[str]:
    """The metric names docs/metrics.md documents: its table's first column."""
    return set(re.findall(r"^\| `(kvd_\w+)`", DOCS.read_text(), re.M))


def dashboard_exprs() -> list[str]:
    def walk(node):
        if isinstance(node, dict):
            if isinstance(node.get("expr"), str):
                yield node["expr"]
            for value in node.values():
                yield from walk(value)
        elif isinstance(node, list):
            for value in node:
                yield from walk(value)

    return list(walk(json.loads(DASHBOARD.read_text())))


def test_the_dashboard_uses_only_documented_metrics_that_a_daemon_exports(daemon_factory):
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["title"] and dashboard["panels"] and dashboard["schemaVersion"] >= 36
    titles = [p["title"] for p in dashboard["panels"]]
    assert len(titles) == len(set(titles)) >= 7
    exprs = dashboard_exprs()
    used = {re.sub(r"_(bucket|sum|count)$", "", n) for e in exprs for n in re.findall(r"\bkvd_\w+", e)}
    assert len(used) >= 10
    assert used <= documented_metrics(), used - documented_metrics()
    d = metrics_daemon(daemon_factory)
    exported = {f.name for f in text_string_to_metric_families(scrape_text(d.metrics_port))}
    # prometheus_client names a counter's family without its _total suffix
    exported |= {f"{n}_total" for n in exported}
    assert used <= exported, used - exported
    assert documented_metrics() <= exported, documented_metrics() - exported


# -- units: the event feed, the collector, the interceptor ----------------------------------

PAGE = 4096


@dataclass
class FakeState:
    """What DaemonMetrics reads of a DaemonState."""

    core: KvCore
    policy_name: str = "typed"
    watch_cursors: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.events = EventBuffer(1000, next_seq=self.core.events.next_seq)


def tiny_core() -> KvCore:
    spaces = {"dram": ExtentAllocator([(0, 4 * PAGE)], PAGE), "nvme": ExtentAllocator([(0, 8 * PAGE)], PAGE)}
    sessions = SessionTable()  # the policy classifies from the core's own session table
    core = KvCore(spaces, TypedPolicy(sessions), lambda: 1000.0, CoreConfig(write_behind=False), sessions=sessions)
    core.register_namespace(NS, 16, PAGE)
    core.take_events()
    return core


def chain(*hashes: int) -> list[BlockSpec]:
    return [BlockSpec(h, p, PAGE) for h, p in zip(hashes, (None, *hashes[:-1]))]


def test_events_and_transfers_feed_exact_counters():
    core = tiny_core()
    state = FakeState(core)
    metrics = DaemonMetrics(state)

    def pump():
        events = core.take_events()
        state.events.extend(events)
        metrics.on_events(events)

    grant = core.prepare_store(NS, chain(1, 2, 3, 4))
    core.commit_store(grant.lease_id)
    pump()
    assert isinstance(core.prepare_store(NS, chain(5, 6)), Wait)  # two demotions planned
    transfers = core.take_demotions()
    for t in transfers:
        core.complete_transfer(t)
    metrics.landed([Moved(t, Outcome.OK) for t in transfers])
    pump()
    grant = core.prepare_store(NS, chain(5, 6))
    assert isinstance(grant, StoreGrant)
    core.commit_store(grant.lease_id)
    pump()
    assert [u.blocks for u in core.stats().tiers] == [4, 2]  # 1, 2, 5, 6 in DRAM; 3, 4 went down
    m = Scrape(generate_latest(metrics.registry).decode())
    assert (m("kvd_tier_blocks", tier="dram"), m("kvd_tier_blocks", tier="nvme")) == (4, 2)
    assert core.pin(NS, [1]) == (1, 0)  # an operator's pin: class pinned, whatever the policy says
    load = core.prepare_load(NS, [1, 5, 99])
    assert load.found == ["dram", "dram", None]
    metrics.loaded(NS, [1, 5, 99], load.found)
    core.complete_load(load.lease_id)
    core.clear_namespace(NS)
    pump()

    m = Scrape(generate_latest(metrics.registry).decode())
    cls = {"class": "session"}
    assert m("kvd_demotions_total", tier="dram", reason="capacity", **cls) == 2
    assert m.total("kvd_demotions_total") == 2
    assert m("kvd_tier_moved_bytes_total", src="dram", dst="nvme", kind="demote") == 2 * PAGE
    assert m("kvd_load_hits_total", tier="dram", **cls) == 1 and m("kvd_load_misses_total") == 1
    assert m("kvd_load_hits_total", tier="dram", **{"class": "pinned"}) == 1
    assert m("kvd_evictions_total", tier="dram", reason="cleared", **cls) == 3
    assert m("kvd_evictions_total", tier="dram", reason="cleared", **{"class": "pinned"}) == 1
    assert m("kvd_evictions_total", tier="nvme", reason="cleared", **cls) == 2
    assert m.total("kvd_evictions_total") == 6
    kinds = {"stored": 4 + 2 + 2, "removed": 2 + 6, "cleared": 1}  # stores, demotions, the clear
    assert {k: m("kvd_events_total", kind=k) for k in kinds} == kinds
    assert sum(isinstance(e, BlockStored) for e in state.events.since(state.events.first_seq)) == kinds["stored"]
    assert (m("kvd_tier_blocks", tier="dram"), m("kvd_tier_blocks", tier="nvme")) == (0, 0)


def test_the_collector_reports_each_gauge_from_one_snapshot():
    snap = Snapshot(
        tiers=[TierGauge("dram", 1000, 250, 3), TierGauge("nvme", 8000, 0, 0)],
        sessions={"active": 2, "tool_pause": 1},
        namespaces=2,
        leases=5,
        write_behind_pending=7,
        watch_lags=[0, 12, 4],
    )
    calls = []
    registry = CollectorRegistry()
    registry.register(StateCollector(lambda: calls.append(1) or snap))
    m = Scrape(generate_latest(registry).decode())
    assert len(calls) == 1  # one snapshot per scrape: every gauge from the same instant
    assert (m("kvd_tier_capacity_bytes", tier="dram"), m("kvd_tier_used_bytes", tier="dram")) == (1000, 250)
    assert (m("kvd_tier_blocks", tier="dram"), m("kvd_tier_capacity_bytes", tier="nvme")) == (3, 8000)
    assert {s: m("kvd_sessions", state=s) for s in ("active", "idle", "tool_pause", "ended")} == {
        "active": 2, "idle": 0, "tool_pause": 1, "ended": 0,
    }
    assert (m("kvd_namespaces"), m("kvd_leases"), m("kvd_write_behind_pending_blocks")) == (2, 5, 7)
    assert (m("kvd_watch_streams"), m("kvd_watch_lag_events")) == (3, 12)  # the furthest behind


def test_watch_lag_is_the_published_events_a_stream_has_not_sent():
    core = tiny_core()
    state = FakeState(core)
    first = state.events.next_seq
    state.events.extend([SessionChanged(seq, NS, "s", "active", None, 0.0) for seq in range(first, first + 10)])
    state.watch_cursors.update({object(): first + 10, object(): first + 3})  # the next seq each sends
    snap = DaemonMetrics(state).snapshot()
    assert snap.watch_lags == [0, 7]


def test_the_interceptor_times_calls_by_method_and_code():
    class Health(health.aio.HealthServicer):
        async def Check(self, request, context):
            if request.service == "boom":
                raise RuntimeError("a bug")  # escapes the servicer: UNKNOWN
            return await super().Check(request, context)

    registry = CollectorRegistry()
    histogram = Histogram("t_rpc_seconds", "t", ["service", "method", "code"], registry=registry)

    async def run() -> None:
        server = grpc.aio.server(interceptors=[RpcMetricsInterceptor(histogram)])
        health_pb2_grpc.add_HealthServicer_to_server(Health(), server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                stub = health_pb2_grpc.HealthStub(channel)
                await stub.Check(health_pb2.HealthCheckRequest())
                for service, code in (("nope", grpc.StatusCode.NOT_FOUND), ("boom", grpc.StatusCode.UNKNOWN)):
                    with pytest.raises(grpc.aio.AioRpcError) as info:
                        await stub.Check(health_pb2.HealthCheckRequest(service=service))
                    assert info.value.code() == code
                async for reply in stub.Watch(health_pb2.HealthCheckRequest()):
                    assert reply.status == health_pb2.HealthCheckResponse.SERVING
                    break  # the client cancels the stream
        finally:
            await server.stop(None)

    asyncio.run(run())
    m = Scrape(generate_latest(registry).decode())
    count = "t_rpc_seconds_count"
    assert m(count, service="grpc.health.v1.Health", method="Check", code="OK") == 1
    assert m(count, service="grpc.health.v1.Health", method="Check", code="NOT_FOUND") == 1
    assert m(count, service="grpc.health.v1.Health", method="Check", code="UNKNOWN") == 1
    assert m.total(count, method="Watch") == 1
