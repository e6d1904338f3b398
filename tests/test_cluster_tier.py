"""The daemon's cluster tier over a hand-written backend: puts, lookups and loads, and every
way the cluster fails — down, hung, corrupt, refusing — answered from the node's own tiers."""

from __future__ import annotations

import asyncio
import logging
import random
import threading
import time

import pytest
from cluster_fake import FakeCluster

from kvd.cluster.health import TRANSITIONS, ClusterHealth, ClusterState, Signal
from kvd.cluster.tier import ClusterSettings, ClusterTier
from kvd.cluster.values import HEADER_BYTES, Header, cluster_key, cluster_keys, parse_cluster_key, verify
from kvd.core.events import BlockRemoved, BlockStored
from kvd.core.manager import StoreGrant
from kvd.server.config import ServeConfig
from kvd.server.daemon import build_state

NS = "m"
BLOCK = 8192
FAST = ClusterSettings(timeout_s=0.5, probe_s=0.02, audit_s=3600, put_blocks=4, max_fetch=64, foreground_threads=2)


def make_state(tmp_path):
    config = ServeConfig(
        socket=tmp_path / "k.sock", shm_dir=tmp_path / "shm", dram_bytes=64 * BLOCK, nvme_bytes=0, policy="lru",
    )
    state = build_state(config)
    state.kv_events = Published()
    state.core.register_namespace(NS, 16, BLOCK)
    state.after_core()
    return state


class Published:
    """Stands in for the KV-event publisher: keeps every event the state publishes."""

    def __init__(self) -> None:
        self.events = []

    def publish(self, events) -> None:
        self.events += events


def blocks_of(seed: int, n: int) -> tuple[list[int], list[bytes]]:
    rng = random.Random(seed)
    return [rng.getrandbits(63) for _ in range(n)], [rng.randbytes(BLOCK) for _ in range(n)]


def store(state, hashes, data, share=True) -> None:
    from kvd.core.manager import BlockSpec

    specs = [BlockSpec(h, hashes[i - 1] if i else None, BLOCK) for i, h in enumerate(hashes)]
    grant = state.core.prepare_store(NS, specs)
    for slot, d in zip(grant.slots, data, strict=True):
        state.arena.write(slot, d)
    state.core.commit_store(grant.lease_id, share=share)
    state.after_core()


def read(state, hashes) -> list[bytes]:
    grant = state.core.prepare_load(NS, hashes)
    out = [bytes(state.arena.view(slot)[:n]) for slot, n in state.core.load_slots(grant.lease_id)]
    state.core.complete_load(grant.lease_id)
    return out


def direct_store(state):
    async def prepare(namespace, specs, lease_seconds):
        grant = state.core.prepare_store(namespace, specs, lease_seconds)
        assert isinstance(grant, StoreGrant)
        return grant

    return prepare


async def until(predicate, timeout: float = 10.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)  # polling the tier's loop, not a race fix


async def started(cluster: FakeCluster, *states) -> list[ClusterTier]:
    """A tier on each node's state, started and joined."""
    tiers = [ClusterTier(cluster.connect, s, FAST) for s in states]
    for tier in tiers:
        tier.start()
    await until(lambda: all(tier.up for tier in tiers), what="the tiers join")
    return tiers


async def put(state, hashes, data) -> None:
    """Store a chain on a node and wait until its puts have landed."""
    store(state, hashes, data)
    await until(lambda: all((NS, h) in state.core.exports.published for h in hashes), what="the puts")


def cluster_events(state):
    """The cluster-tier events published since the last call."""
    state.after_core()
    events, state.kv_events.events = state.kv_events.events, []
    return [
        (type(e).__name__, e.hash, getattr(e, "reason", None))
        for e in events
        if isinstance(e, BlockStored | BlockRemoved) and e.tier == "cluster"
    ]


def run(coro):
    return asyncio.run(coro)


@pytest.fixture
def two_nodes(tmp_path):
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    a, b = make_state(tmp_path / "a"), make_state(tmp_path / "b")
    yield a, b
    a.arena.close(), b.arena.close()


# -- values and health, pure ---------------------------------------------------------------


def test_keys_carry_the_namespace_and_parse_back():
    assert cluster_key("tenant-a/llama", 0xABC) == "kvd/tenant-a/llama/0000000000000abc"
    assert cluster_keys("n", [0xABC, 2**64 - 1]) == [cluster_key("n", 0xABC), "kvd/n/ffffffffffffffff"]
    assert parse_cluster_key("kvd/tenant-a/llama/0000000000000abc") == ("tenant-a/llama", 0xABC)
    for bad in ("other/x/0000000000000abc", "kvd/0000000000000abc", "kvd/x/abc"):
        with pytest.raises(ValueError):
            parse_cluster_key(bad)


def test_a_value_is_served_only_when_its_header_and_checksum_agree():
    data = bytes(range(256)) * 4
    raw = Header.of(7, 6, data).pack()
    assert len(raw) == HEADER_BYTES and verify(raw, data, 7, 6, len(data)) is None
    assert verify(raw, data, 8, 6, len(data)) == "its header names another block"
    assert verify(raw, data, 7, None, len(data)) == "its header names another block"
    assert verify(raw, data[:-1] + b"\0", 7, 6, len(data)) == "checksum mismatch"
    assert verify(b"\0" * HEADER_BYTES, data, 7, 6, len(data)) == "not a kvd value"
    assert verify(raw[:-1], data, 7, 6, len(data)) == "not a kvd value"
    root = Header.of(7, None, data).pack()
    assert verify(root, data, 7, None, len(data)) is None


def test_every_state_and_signal_has_a_transition_and_changes_are_counted():
    assert set(TRANSITIONS) == {(s, g) for s in ClusterState for g in Signal}
    h = ClusterHealth()
    assert h.observe(Signal.FAILED, 1.0) is None  # joining stays joining
    assert h.observe(Signal.JOINED, 2.0) is ClusterState.UP
    assert h.observe(Signal.FAILED, 3.0, "timeout") is ClusterState.DOWN and h.reason == "timeout"
    assert h.observe(Signal.FAILED, 4.0) is None and h.since == 3.0
    assert h.observe(Signal.ANSWERED, 5.0) is ClusterState.UP
    assert h.changes == 3


# -- the tier over the fake ----------------------------------------------------------------


def test_blocks_put_by_one_node_are_found_and_read_byte_exact_by_another(two_nodes):
    a, b = two_nodes
    cluster = FakeCluster()
    hashes, data = blocks_of(1, 6)

    async def go():
        ta, tb = ClusterTier(cluster.connect, a, FAST), ClusterTier(cluster.connect, b, FAST)
        a.cluster, b.cluster = ta, tb
        ta.start(), tb.start()
        await until(lambda: ta.up and tb.up, what="both join")
        store(a, hashes, data)
        await until(lambda: len(a.core.exports.published) == 6, what="puts land")
        assert cluster_events(a) == [("BlockStored", h, None) for h in hashes]
        assert await tb.extend(NS, hashes, 0) == 6
        assert await tb.extend(NS, [*hashes[:3], 1], 0) == 3
        assert await tb.fetch(NS, hashes, direct_store(b)) == 6
        assert read(b, hashes) == data
        assert b.core.prepare_export(8) is None  # read from the cluster: not offered back
        assert await tb.fetch(NS, hashes, direct_store(b)) == 0  # held now: nothing to bring
        assert a.core.check() == [] and b.core.check() == []
        await ta.stop(), await tb.stop()

    run(go())
    assert all(addr and n for addr, n in cluster.registered)


def test_a_load_split_in_parts_reads_each_part_whose_first_parent_it_does_not_name(two_nodes):
    a, b = two_nodes
    cluster = FakeCluster()
    hashes, data = blocks_of(9, 6)

    async def go():
        ta, tb = await started(cluster, a, b)
        await put(a, hashes, data)
        assert await tb.fetch(NS, hashes[3:], direct_store(b)) == 3  # the second part first
        assert await tb.fetch(NS, hashes[:3], direct_store(b)) == 3
        assert read(b, hashes) == data and b.core.check() == []
        await ta.stop(), await tb.stop()

    run(go())


def test_a_corrupt_value_is_a_miss_and_cuts_the_chain_there(two_nodes, caplog):
    a, b = two_nodes
    cluster = FakeCluster()
    hashes, data = blocks_of(2, 5)

    async def go():
        ta, tb = await started(cluster, a, b)
        await put(a, hashes, data)
        cluster.corrupt(cluster_key(NS, hashes[2]))
        with caplog.at_level(logging.WARNING, "kvd.cluster"):
            assert await tb.fetch(NS, hashes, direct_store(b)) == 2
        assert b.core.lookup(NS, hashes) == ["dram", "dram"]
        assert read(b, hashes[:2]) == data[:2]
        assert tb.counters.corrupt == 1 and "checksum mismatch" in caplog.text
        assert b.core.check() == [] and b.arena.space.used_bytes == 2 * BLOCK
        await ta.stop(), await tb.stop()

    run(go())


def test_a_value_stored_under_another_blocks_key_is_a_miss(two_nodes):
    a, b = two_nodes
    cluster = FakeCluster()
    hashes, data = blocks_of(3, 2)

    async def go():
        ta, tb = await started(cluster, a, b)
        await put(a, hashes, data)
        k0, k1 = cluster_key(NS, hashes[0]), cluster_key(NS, hashes[1])
        cluster.values[k0] = cluster.values[k1]  # right size, right checksum, wrong block
        assert await tb.fetch(NS, hashes, direct_store(b)) == 0
        assert tb.counters.corrupt == 1 and b.core.check() == []
        await ta.stop(), await tb.stop()

    run(go())


def test_a_master_down_answers_from_local_tiers_then_recovers_and_audits(two_nodes, caplog):
    a, _ = two_nodes
    cluster = FakeCluster()
    hashes, data = blocks_of(4, 3)

    async def go():
        (ta,) = await started(cluster, a)
        await put(a, hashes, data)
        cluster_events(a)
        cluster.down = True
        with caplog.at_level(logging.INFO, "kvd.cluster"):
            assert await ta.extend(NS, [*hashes, 5, 6], 3) == 0
            assert ta.health.state is ClusterState.DOWN
            assert await ta.extend(NS, [*hashes, 5, 6], 3) == 0  # no call while down
            # The master restarts empty: the audit after recovery forgets what is gone.
            cluster.values.clear()
            cluster.down = False
            await until(lambda: ta.up, what="the probe finds the master")
            await until(lambda: not a.core.exports.published, what="the audit")
        assert sorted(cluster_events(a)) == sorted(("BlockRemoved", h, "gone") for h in hashes)
        lines = [r.getMessage() for r in caplog.records]
        assert sum("cluster tier down" in m for m in lines) == 1 and sum("cluster tier up" in m for m in lines) == 1
        assert ta.counters.audited_gone == 3 and a.core.check() == []
        await ta.stop()

    run(go())


def test_a_hung_read_answers_without_it_and_frees_its_slots_only_once_the_thread_returns(two_nodes):
    a, b = two_nodes
    cluster = FakeCluster()
    hashes, data = blocks_of(5, 4)

    async def go():
        ta, tb = await started(cluster, a, b)
        await put(a, hashes, data)
        cluster.hold_gets = threading.Event()
        assert await tb.fetch(NS, hashes, direct_store(b)) == 0
        assert tb.health.state is ClusterState.DOWN and tb.counters.timeouts == 1
        assert b.arena.space.used_bytes == 4 * BLOCK  # the thread may still write them: kept
        assert b.core.lookup(NS, hashes) == []
        cluster.hold_gets.set()
        await until(lambda: b.arena.space.used_bytes == 0 or b.core.lease_count == 0, what="the abort")
        assert b.core.lookup(NS, hashes) == [] and b.core.check() == []
        await ta.stop(), await tb.stop()

    run(go())


def test_a_failed_join_is_retried_and_failed_puts_are_not_published(two_nodes):
    a, _ = two_nodes
    cluster = FakeCluster()
    cluster.refuse_join = True
    hashes, data = blocks_of(6, 2)

    async def go():
        ta = ClusterTier(cluster.connect, a, FAST)
        ta.start()
        await until(lambda: "code -1" in ta.health.reason, what="a failed join")
        assert ta.health.state is ClusterState.JOINING and not a.core.exports.enabled
        cluster.refuse_join = False
        await until(lambda: ta.up, what="the retry")
        cluster.fail_puts = True
        store(a, hashes, data)
        await until(lambda: ta.counters.put_failed == 2, what="the failed puts")
        assert a.core.exports.published == {} and ta.up  # the master answers: not a fault of the tier
        assert a.core.check() == []
        await ta.stop()

    run(go())


def test_clearing_a_namespace_removes_what_this_node_published(two_nodes):
    a, _ = two_nodes
    cluster = FakeCluster()
    hashes, data = blocks_of(7, 3)

    async def go():
        ta = ClusterTier(cluster.connect, a, FAST)
        a.cluster = ta
        ta.start()
        await until(lambda: ta.up)
        await put(a, hashes, data)
        a.core.clear_namespace(NS)
        a.after_core()
        await until(lambda: len(cluster.removed) == 3, what="the removal")
        assert cluster.values == {} and a.core.exports.published == {}
        await ta.stop()

    run(go())


def test_stop_says_what_stays_in_the_cluster(two_nodes, caplog):
    a, _ = two_nodes
    cluster = FakeCluster()
    hashes, data = blocks_of(8, 2)

    async def go():
        ta = ClusterTier(cluster.connect, a, FAST, master="m:1", segment_bytes=1 << 20)
        ta.start()
        await until(lambda: ta.up)
        await put(a, hashes, data)
        with caplog.at_level(logging.INFO, "kvd.cluster"):
            await ta.stop()
        assert "2 blocks this node put stay there" in caplog.text and "1048576 bytes leaves with it" in caplog.text
        assert ta.backend is None

    run(go())


@pytest.mark.parametrize(
    ("flags", "flag"),
    [
        (["--cluster-master", "nohost"], "--cluster-master must be HOST:PORT"),
        (["--cluster-master", "h:1"], "--cluster-master needs --cluster-metadata"),
        (["--cluster-metadata", "http://h:1/metadata"], "--cluster-metadata needs --cluster-master"),
        (["--cluster-master", "h:1", "--cluster-metadata", "h:2"], "--cluster-metadata must be"),
        (["--cluster-master", "h:1", "--cluster-metadata", "http://h/m", "--cluster-bytes", "0"], "--cluster-bytes"),
        (["--cluster-master", "h:1", "--cluster-metadata", "http://h/m", "--cluster-replicas", "0"], "--cluster-replicas"),
        (["--cluster-master", "h:1", "--cluster-metadata", "http://h/m", "--cluster-host", "a b"], "--cluster-host"),
        (
            ["--cluster-master", "h:1", "--cluster-metadata", "http://h/m", "--cluster-timeout-seconds", "0"],
            "--cluster-timeout-seconds",
        ),
    ],
)
def test_bad_cluster_flags_are_one_line_naming_the_flag(tmp_path, flags, flag):
    from test_startup import serve

    r = serve(tmp_path, *flags)
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].startswith(f"kvd serve: {flag}"), r.stderr
    assert "Traceback" not in r.stderr


def test_an_idle_tier_notices_the_master_gone_without_a_request(two_nodes):
    a, _ = two_nodes
    cluster = FakeCluster()

    async def go():
        (ta,) = await started(cluster, a)
        cluster.down = True
        await until(lambda: ta.health.state is ClusterState.DOWN, what="the idle probe")
        assert "does not answer" in ta.health.reason
        cluster.down = False
        await until(lambda: ta.up, what="the recovery")
        await ta.stop()

    run(go())


def test_stop_is_bounded_when_the_backend_does_not_close(two_nodes, monkeypatch, caplog):
    import kvd.cluster.tier as tier_module

    a, _ = two_nodes
    cluster = FakeCluster()
    monkeypatch.setattr(tier_module, "CLOSE_TIMEOUT_S", 0.2)

    async def go():
        (ta,) = await started(cluster, a)
        cluster.hold_close = threading.Event()
        with caplog.at_level(logging.WARNING, "kvd.cluster"):
            await ta.stop()
        assert "did not close within 0.2 s" in caplog.text
        cluster.hold_close.set()

    run(go())
