"""`kvd replay --nodes N` (kvd/replay/nodes.py): a session's turn that moves to another node,
without and with the cluster tier, worked out by hand; the cluster's LRU; the router; the CLI's
errors and report; and the two repository traces, checked for consistency only.

The hand-worked traces use test_replay's geometry and round numbers: 4-token blocks of 4,096
bytes; recompute 1 ms a token (4 ms a block); DRAM->HBM 1 ms a block; decode 10 ms a token.
The cluster: a get 2 ms a block (0.002048 GB/s) plus DRAM->HBM, so 3 ms a block read; a put
1 ms a block (0.004096 GB/s), one block at a time per node. Every node has DRAM for 16
blocks: nothing is evicted from a node.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from kvd.replay.cost import CostModel
from kvd.replay.nodes import ClusterStore, NodesConfig, replay_nodes
from kvd.replay.sim import ReplayConfig
from kvd.replay.trace import Trace, read_trace

BLOCK = 4096
MS = 1e-3
COST = CostModel(
    bytes_per_token=1024,
    prefill_tokens_per_s=1000.0,
    decode_s_per_token=0.01,
    dram_to_hbm_gbps=0.004096,
    nvme_to_dram_gbps=0.002048,
    dram_to_nvme_gbps=0.004096,
    cluster_to_dram_gbps=0.002048,
    dram_to_cluster_gbps=0.004096,
)
COST_FLAGS = [
    "--bytes-per-token", "1024",
    "--prefill-tokens-per-s", "1000",
    "--decode-s-per-token", "0.01",
    "--dram-to-hbm-gbps", "0.004096",
    "--cluster-to-dram-gbps", "0.002048",
    "--dram-to-cluster-gbps", "0.004096",
]
NODE = ReplayConfig(dram_bytes=16 * BLOCK, cost=COST)
POLICIES = ["lru", "typed", "belady"]
TRACES = Path(__file__).resolve().parents[1] / "traces"


def turn(session: str, n: int, chain: list[int], at: float = 0.0, pause_s: float | None = None, last=False) -> dict:
    line = {"timestamp": at, "input_length": 4 * len(chain), "output_length": 1, "hash_ids": chain,
            "block_size": 4, "session_id": session, "turn": n, "last": last}
    if pause_s is not None:
        line["pause_s"] = pause_s
    return line


def write(tmp_path: Path, lines: list[dict]) -> Path:
    path = tmp_path / "t.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


# One session: a first turn of 2 blocks at 0, a second of 3 (the first's 2 and a new one) 10 s
# after the first ends. With --migrate-p 1 the second turn goes to the other node.
MOVED = [turn("s", 0, [1, 2]), turn("s", 1, [1, 2, 3], pause_s=10.0, last=True)]


@pytest.mark.parametrize("policy", POLICIES)
def test_a_moved_turn_recomputes_its_prefix_without_the_cluster(tmp_path, policy):
    trace = read_trace(write(tmp_path, MOVED))
    r = replay_nodes(trace, policy, NodesConfig(NODE, nodes=2, migrate_p=1.0), check_every=1)
    assert r.served_by_node == [1, 1] and (r.migrations, r.forced_migrations) == (1, 1)
    assert r.total.recomputed_tokens == 8 + 12  # both turns whole: node 1 holds nothing of node 0's
    assert r.total.hit_tokens_by_tier == {"dram": 0}
    assert r.total.ttft_s == pytest.approx([8 * MS, 12 * MS])
    assert (r.cluster_put_bytes, r.cluster_read_bytes) == (0, 0)
    assert r.total.problems == []


@pytest.mark.parametrize("policy", POLICIES)
def test_a_moved_turn_reads_its_prefix_from_the_cluster(tmp_path, policy):
    trace = read_trace(write(tmp_path, MOVED))
    r = replay_nodes(trace, policy, NodesConfig(NODE, nodes=2, cluster_bytes=8 * BLOCK, migrate_p=1.0), check_every=1)
    assert r.served_by_node == [1, 1] and (r.migrations, r.forced_migrations) == (1, 1)
    # Node 0 put blocks 1 and 2 (1 ms each) long before the second turn; node 1 reads them
    # (3 ms each) and recomputes block 3 alone (4 ms).
    assert r.total.recomputed_tokens == 8 + 4
    assert r.total.hit_tokens_by_tier == {"dram": 0, "cluster": 8}
    assert r.total.ttft_s == pytest.approx([8 * MS, 2 * 3 * MS + 4 * MS])
    assert r.cluster_read_bytes == 2 * BLOCK and r.total.bytes_moved["cluster->dram"] == 2 * BLOCK
    # Node 0 put 1 and 2; node 1 put 3 alone: the blocks it read are not offered back.
    assert r.cluster_put_bytes == 3 * BLOCK and r.cluster_blocks_held == 3
    assert (r.cluster_evicted_blocks, r.cluster_refused_puts) == (0, 0)
    assert r.total.problems == []


@pytest.mark.parametrize("policy", POLICIES)
def test_a_turn_that_stays_home_hits_its_own_dram(tmp_path, policy):
    trace = read_trace(write(tmp_path, MOVED))
    r = replay_nodes(trace, policy, NodesConfig(NODE, nodes=2, cluster_bytes=8 * BLOCK, migrate_p=0.0))
    # The home node scores 2 blocks of DRAM; the other only the cluster's 2 (worth less).
    assert r.served_by_node == [2, 0] and (r.migrations, r.forced_migrations) == (0, 0)
    assert r.total.hit_tokens_by_tier == {"dram": 8, "cluster": 0}
    assert r.total.recomputed_tokens == 8 + 4 and r.cluster_read_bytes == 0


# Session a: [1, 2] at 0, then [1, 2, 3] 20 s after it ends, moved to node 1. Session b: one
# turn [5, 6] at 5 s, on node 0 (both nodes idle and neither holds it: the lowest node).
# With a cluster of 3 blocks, node 0's puts land in order 1, 2, 5, 6: putting 6 evicts the
# least recently used, 1 — so the moved turn finds no first block in the cluster, and block 2
# there is stranded; it recomputes all 12 tokens, as without a cluster. With 4 blocks nothing
# is evicted and it reads 1 and 2.
EVICTED = [
    turn("a", 0, [1, 2]),
    turn("b", 0, [5, 6], at=5.0, last=True),
    turn("a", 1, [1, 2, 3], pause_s=20.0, last=True),
]


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize(("cluster_blocks", "recomputed", "from_cluster"), [(3, 8 + 8 + 12, 0), (4, 8 + 8 + 4, 8)])
def test_a_cluster_too_small_evicts_the_least_recently_used(tmp_path, policy, cluster_blocks, recomputed, from_cluster):
    trace = read_trace(write(tmp_path, EVICTED))
    config = NodesConfig(NODE, nodes=2, cluster_bytes=cluster_blocks * BLOCK, migrate_p=1.0)
    r = replay_nodes(trace, policy, config, check_every=1)
    assert r.served_by_node == [2, 1] and (r.migrations, r.forced_migrations) == (1, 1)
    assert r.total.recomputed_tokens == recomputed
    assert r.total.hit_tokens_by_tier == {"dram": 0, "cluster": from_cluster}
    assert r.cluster_read_bytes == from_cluster // 4 * BLOCK
    assert r.total.problems == []
    if cluster_blocks == 3:
        # 6 evicted 1; then node 1's puts of 1, 2, 3 evicted 2, 5 and 6: the cluster ends
        # with the moved turn's chain.
        assert r.cluster_evicted_blocks == 4 and r.cluster_blocks_held == 3


def test_the_cluster_store_evicts_by_use_and_tells_who_put_each_block():
    forgotten: list[list] = []

    class Core:
        def forget_published(self, keys):
            forgotten.append(list(keys))

    class Owner:
        core = Core()

    store = ClusterStore(3 * BLOCK)
    for h in (1, 2, 3):
        assert store.put(h, BLOCK, Owner())
    assert not store.put(2, BLOCK, Owner()) and store.refused == 1  # one copy, whoever put it
    assert store.prefix([1, 2, 3, 4], 0) == 3 and store.prefix([9, 2, 3], 1) == 2
    assert store.read([1]) == BLOCK  # 1 is now the most recently used: 2 goes first
    assert store.put(4, BLOCK, Owner())
    assert forgotten == [[("replay", 2)]] and store.evicted == 1
    assert store.prefix([1, 2, 3], 0) == 1  # 2 is gone: 3 is stranded
    assert not store.put(5, 4 * BLOCK, Owner())  # bigger than the whole store: nothing moves
    assert len(store) == 3 and store.used_bytes == 3 * BLOCK


def test_nodes_config_refuses_what_no_run_can_mean():
    for bad in ({"nodes": 0}, {"migrate_p": 1.5}, {"migrate_p": -0.1}, {"cluster_bytes": -1}, {"put_batch_blocks": 0}):
        with pytest.raises(ValueError):
            NodesConfig(NODE, **bad)


# -- the CLI --------------------------------------------------------------------------------------


def kvd(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "kvd.cli.kvd_main", "replay", *args], capture_output=True, text=True, timeout=300
    )


def test_cli_errors_name_the_flag_in_one_line_and_exit_2(tmp_path):
    trace = str(write(tmp_path, MOVED))
    cases = {
        "--nodes must be at least 1": ["--nodes", "0"],
        "--migrate-p must be in [0, 1]": ["--nodes", "2", "--migrate-p", "1.5"],
        "--cluster needs --nodes 2 or more": ["--cluster", "8blocks"],
        "--migrate-p needs --nodes 2 or more": ["--nodes", "1", "--migrate-p", "0.5"],
        "--cluster-to-dram-gbps must be positive": ["--nodes", "2", "--cluster-to-dram-gbps", "0"],
        "--plot draws one node's replay": ["--nodes", "2", "--plot", str(tmp_path / "p.png")],
        "the cluster tier (100 bytes) cannot hold one block": ["--nodes", "2", "--cluster", "100"],
        "invalid size 'lots'": ["--nodes", "2", "--cluster", "lots"],
    }
    for says, args in cases.items():
        proc = kvd(trace, "--dram", "16blocks", *COST_FLAGS, *args, "--no-progress")
        assert proc.returncode == 2 and proc.stdout == "", (says, proc.stderr)
        lines = proc.stderr.splitlines()
        assert len(lines) == 1 and lines[0].startswith("kvd replay: ") and says in lines[0], (says, proc.stderr)


def test_cli_reports_both_configurations_side_by_side(tmp_path):
    trace = str(write(tmp_path, MOVED))
    out = tmp_path / "r.json"
    proc = kvd(trace, "--policy", "lru,typed", "--dram", "16blocks", *COST_FLAGS, "--nodes", "2",
               "--cluster", "8blocks", "--migrate-p", "1", "--json", str(out), "--no-progress")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(out.read_text())
    assert (report["nodes"], report["migrate_p"], report["seed"]) == (2, 1.0, 0)
    assert report["cluster"] == {"bytes": 8 * BLOCK, "blocks": 8}
    assert report["tiers_per_node"] == {"dram": {"bytes": 16 * BLOCK, "blocks": 16}}
    assert report["cost_model"]["cluster_to_dram_gbps"] == 0.002048
    configs = report["configurations"]
    assert list(configs) == ["without_cluster", "with_cluster"]
    for name in ("lru", "typed"):
        without, with_ = configs["without_cluster"][name], configs["with_cluster"][name]
        assert (without["recomputed_tokens"], with_["recomputed_tokens"]) == (20, 12)
        assert with_["recomputed_share"] == pytest.approx(12 / 20)
        assert with_["hit_rate_by_tier"] == {"dram": 0.0, "cluster": pytest.approx(8 / 20)}
        assert "cluster" not in without["hit_rate_by_tier"]
        assert (with_["migrations"], with_["forced_migrations"]) == (1, 1)
        assert with_["cluster"]["read_bytes"] == 2 * BLOCK and with_["cluster"]["put_bytes"] == 3 * BLOCK
        assert set(with_["ttft_s"]) == {"p50", "p90", "p99"}
    rows = [line.split() for line in proc.stdout.splitlines()]
    assert ["lru", "without", "20"] == rows[2][:3] and ["lru", "with", "12"] == rows[3][:3]
    assert "lru: the cluster tier recomputes 40.0% fewer tokens (20 -> 12)" in proc.stdout


def test_cli_one_node_reports_exactly_as_without_nodes(tmp_path):
    trace = str(write(tmp_path, MOVED))
    reports = []
    for extra in ([], ["--nodes", "1"]):
        out = tmp_path / f"r{len(reports)}.json"
        proc = kvd(trace, "--dram", "16blocks", *COST_FLAGS, *extra, "--json", str(out), "--no-progress")
        assert proc.returncode == 0, proc.stderr
        report = json.loads(out.read_text())
        for p in report["policies"].values():
            del p["wall_s"]
        reports.append(report)
    assert reports[0] == reports[1]
    assert "cluster_to_dram_gbps" not in reports[0]["cost_model"]  # a single node has no cluster link


# -- the repository's traces: consistency, not figures --------------------------------------------


def head(trace: Trace, keep) -> Trace:
    requests = [replace(r, index=i) for i, r in enumerate(r for r in trace.requests if keep(r))]
    return Trace(trace.format, requests, trace.block_size)


def consistent(trace: Trace, config: NodesConfig, policy: str):
    """Run ``trace`` without and with the cluster; assert what must hold whatever the figures."""
    block_bytes = trace.block_size * config.node.cost.bytes_per_token
    prompt = sum(r.input_length for r in trace.requests)
    results = {}
    for cluster in (0, config.cluster_bytes):
        r = replay_nodes(trace, policy, replace(config, cluster_bytes=cluster), check_every=25)
        t = r.total
        assert t.problems == []
        assert t.requests == len(trace.requests) == sum(r.served_by_node) and len(r.served_by_node) == config.nodes
        assert t.prompt_tokens == prompt and t.hit_tokens + t.recomputed_tokens == prompt
        assert sum(t.hit_tokens_by_tier.values()) == t.hit_tokens
        assert ("cluster" in t.hit_tokens_by_tier) == bool(cluster)
        assert len(t.ttft_s) == len(trace.requests) and min(t.ttft_s) >= 0
        assert 0 <= r.forced_migrations <= r.migrations
        assert r.cluster_put_bytes % block_bytes == 0 and r.cluster_read_bytes % block_bytes == 0
        # Every cluster hit was read, a block at a time (the last one possibly partial).
        cluster_tokens = t.hit_tokens_by_tier.get("cluster", 0)
        assert r.cluster_read_bytes // block_bytes * trace.block_size >= cluster_tokens
        assert (cluster_tokens > 0) == (r.cluster_read_bytes > 0)
        assert r.cluster_blocks_held * block_bytes <= cluster
        results[bool(cluster)] = r
    without, with_ = results[False], results[True]
    # The same draws move the same resumed turns in both configurations.
    assert without.forced_migrations == with_.forced_migrations > 0
    assert with_.cluster_put_bytes > 0 and with_.total.hit_tokens_by_tier["cluster"] > 0
    return without, with_


@pytest.mark.parametrize("policy", ["lru", "typed"])
def test_an_agentic_trace_over_four_nodes_is_consistent(policy):
    whole = read_trace(TRACES / "aiperf_agentic_code_300.jsonl", session_gap_s=2.0)
    sessions = sorted({r.session_id for r in whole.requests})[:12]
    trace = head(whole, lambda r: r.session_id in sessions)
    block = trace.block_size * CostModel().bytes_per_token
    node = ReplayConfig(dram_bytes=500 * block, nvme_bytes=500 * block)
    consistent(trace, NodesConfig(node, nodes=4, cluster_bytes=5000 * block, migrate_p=0.3), policy)


@pytest.mark.parametrize("policy", ["lru", "typed", "belady"])
def test_a_mooncake_trace_over_four_nodes_is_consistent(policy):
    whole = read_trace(TRACES / "mooncake_conversation.jsonl")
    trace = head(whole, lambda r: r.index < 400)
    block = trace.block_size * CostModel().bytes_per_token
    node = ReplayConfig(dram_bytes=40 * block, nvme_bytes=80 * block)
    without, _ = consistent(trace, NodesConfig(node, nodes=4, cluster_bytes=2000 * block, migrate_p=0.3), policy)
    assert without.total.hit_tokens_by_tier["nvme"] > 0  # the nodes were under pressure
