"""The cluster tier end to end: two real daemons ("nodes": own sockets, arenas, NVMe dirs)
share a real mooncake_master; a session stored through one loads byte-exact through the
other, through a node's kill -9 and the master's."""

from __future__ import annotations

import json
import os
import random

import pytest
from conftest import run_kvctl, wait_until

from kvd.cluster.local_master import LocalMaster, master_binary

NS = "m"
BLOCK = 64 << 10


@pytest.fixture
def master(tmp_path):
    if master_binary() is None:
        if os.environ.get("CI"):
            pytest.fail("mooncake_master is missing: make install installs the cluster extra")
        pytest.skip("mooncake_master is not installed (pip install 'kvd[cluster]')")
    m = LocalMaster(tmp_path / "master.log", client_ttl_s=3).start()
    yield m
    m.stop()


def node(daemon_factory, master, *extra: str):
    d = daemon_factory(
        dram="16MiB",
        extra=[
            "--cluster-master", master.master, "--cluster-metadata", master.metadata, "--cluster-bytes", "32MiB",
            "--cluster-timeout-seconds", "2", *extra,
        ],
    ).start()
    with d.client() as c:
        wait_until(lambda: c.status().cluster.state == "up", timeout=60, what="the node joins the cluster")
    return d


def chain(seed: int, n: int) -> tuple[list[int], list[bytes]]:
    rng = random.Random(seed)
    return [rng.getrandbits(63) for _ in range(n)], [rng.randbytes(BLOCK) for _ in range(n)]


def store_session(d, hashes, blocks, session: str) -> None:
    with d.client() as c:
        c.register_namespace(NS, 16, BLOCK)
        c.lookup(NS, hashes, session_id=session)
        assert c.store(NS, hashes, blocks, session_id=session) == len(hashes)
        wait_until(
            lambda: c.status().cluster.published_blocks >= len(hashes) and not c.status().cluster.pending_blocks,
            timeout=30, what="the session's blocks reach the cluster",
        )


def test_a_session_stored_through_one_node_loads_byte_exact_through_another(daemon_factory, master):
    a, b = node(daemon_factory, master), node(daemon_factory, master)
    hashes, blocks = chain(1, 12)
    store_session(a, hashes, blocks, "s1")
    with b.client() as c:
        c.register_namespace(NS, 16, BLOCK)
        assert c.lookup(NS, hashes) == ["cluster"] * 12
        assert c.lookup(NS, [*hashes[:4], 999]) == ["cluster"] * 4  # the chain stops where the cluster's does
        assert c.load(NS, hashes) == blocks
        assert c.lookup(NS, hashes) == ["dram"] * 12  # brought into B's DRAM, held there now
        st = c.status()
        assert st.cluster.read_blocks == 12 and st.cluster.corrupt_blocks == 0
        assert st.cluster.published_blocks == 0  # B does not put back what it read
        assert c.check() == []
    shown = json.loads(run_kvctl(a.address, "status", "-o", "json").stdout)["cluster"]
    assert shown[0]["state"] == "up" and shown[0]["published_blocks"] == 12 and shown[0]["master"] == master.master
    assert "cluster:" in run_kvctl(a.address, "status").stdout
    a.stop()  # SIGTERM: the drain and the stop say what stays in the cluster
    assert a.proc.returncode == 0
    assert "cluster tier up: 12 blocks this node put stay there" in a.log()
    assert "leaving the cluster at" in a.log() and "12 blocks this node put stay there as replicas" in a.log()


def test_after_kill_9_of_the_storing_node_the_other_still_loads(daemon_factory, master):
    a, b = node(daemon_factory, master), node(daemon_factory, master)
    hashes, blocks = chain(2, 8)
    store_session(a, hashes, blocks, "s2")
    a.kill()
    with b.client() as c:
        c.register_namespace(NS, 16, BLOCK)
        assert c.lookup(NS, hashes) == ["cluster"] * 8
        assert c.load(NS, hashes) == blocks  # from its replica on B's own segment


def test_a_master_down_degrades_to_local_and_its_return_resumes_cluster_reads(daemon_factory, master):
    a, b = node(daemon_factory, master), node(daemon_factory, master)
    local, local_blocks = chain(3, 4)
    with b.client() as c:
        c.register_namespace(NS, 16, BLOCK)
        c.store(NS, local, local_blocks)
    remote, remote_blocks = chain(4, 4)
    store_session(a, remote, remote_blocks, "s3")

    master.kill()
    with b.client() as c:
        # Lookups answer from B's own tiers, without an error, while the master is gone.
        assert c.lookup(NS, local) == ["dram"] * 4
        c.lookup(NS, remote)  # may still find the cluster's values until a call fails: no error either way
        wait_until(lambda: c.status().cluster.state == "down", timeout=30, what="B sees the master gone")
        assert c.lookup(NS, remote) == []
        assert c.load(NS, local) == local_blocks
        assert c.load(NS, remote) == [None] * 4
        assert "master" in b.log() or "cluster tier down" in b.log()

    master.restart()
    with a.client() as ca, b.client() as cb:
        wait_until(lambda: cb.status().cluster.state == "up", timeout=60, what="B rejoins")
        wait_until(lambda: ca.status().cluster.state == "up", timeout=60, what="A rejoins")
        # The restarted master lost every value: A's audit forgets what it had published.
        wait_until(lambda: ca.status().cluster.published_blocks == 0, timeout=60, what="A forgets the lost blocks")
        fresh, fresh_blocks = chain(5, 6)
        store_session(a, fresh, fresh_blocks, "s4")
        assert cb.lookup(NS, fresh) == ["cluster"] * 6
        assert cb.load(NS, fresh) == fresh_blocks


def test_the_global_view_counts_a_cluster_block_for_every_node(daemon_factory, master):
    from kvd.router import GlobalView

    a, b = node(daemon_factory, master), node(daemon_factory, master)
    with b.client() as c:
        c.register_namespace(NS, 16, BLOCK)
    watching = GlobalView([a.address, b.address])  # from the Watch stream's events
    try:
        assert watching.wait_connected(30)
        hashes, blocks = chain(6, 5)
        store_session(a, hashes, blocks, "s5")
        wait_until(
            lambda: watching.score(NS, hashes).nodes.get(b.address) is not None, timeout=30,
            what="the view learns of the cluster copies",
        )
        late = GlobalView([a.address, b.address])  # from a Snapshot taken after the puts
        try:
            assert late.wait_connected(30)
            for view in (watching, late):
                route = view.score(NS, hashes)
                assert route.nodes[b.address].tokens_by_tier == {"cluster": 5 * 16}
                assert route.nodes[a.address].tokens_by_tier == {"dram": 5 * 16}
                assert route.best == a.address  # its own copies outrank the cluster's
        finally:
            late.close()
    finally:
        watching.close()
