"""`kvd bench router`: the router's index at fleet scale, measured in one run.

8 simulated nodes hold 1,000,000 blocks between them (chains of 10,000 blocks, the first
20 % of every node's blocks in DRAM, the rest on NVMe). A 10,000-block request is held in
full by two nodes, half of it by three, not at all by three. Reported:

- ``score_us_per_key``: median time of one ``match`` of the request in the in-memory index,
  per key;
- ``redis.score_us_per_key``: the same against a loopback redis-server (pipelined
  SMISMEMBER), when one is on PATH (null otherwise);
- ``ingest_blocks_per_s``: decoding View ``WatchResponse`` messages (1,000 events each) and
  applying them to the in-memory index, as a GlobalView feed does; and the same into Redis.
"""

from __future__ import annotations

import argparse
import statistics
import time

from kvd.bench import run_and_report
from kvd.bench.redis_server import loopback_redis
from kvd.router.index import BlockIndex, MemoryIndex
from kvd.router.redis_index import RedisIndex
from kvd.v1 import types_pb2, view_pb2

NS = "bench"
CHAIN = 10_000


def _layout(nodes: int, blocks: int) -> dict[str, list[tuple[int, str]]]:
    """Per node, (hash, tier) of what it holds: chains of CHAIN blocks; the shared request
    chain (hashes 0..CHAIN-1) fully on nodes 0-1, its first half on nodes 2-4."""
    per_node = blocks // nodes
    layout: dict[str, list[tuple[int, str]]] = {}
    for n in range(nodes):
        held = []
        if n < 2:
            held += [(h, "dram" if h < CHAIN // 5 else "nvme") for h in range(CHAIN)]
        elif n < 5:
            held += [(h, "dram") for h in range(CHAIN // 2)]
        base = (n + 1) * 10**9
        held += [(base + i, "dram" if i < per_node // 5 else "nvme") for i in range(per_node - len(held))]
        layout[f"node-{n}"] = held
    return layout


def _batches(held: list[tuple[int, str]], node_seq: int) -> list[bytes]:
    """The node's blocks as serialized WatchResponse messages of 1,000 stored events."""
    out = []
    for lo in range(0, len(held), 1000):
        msg = view_pb2.WatchResponse(epoch=b"e", next_seq=node_seq + lo + 1000)
        for i, (h, tier) in enumerate(held[lo : lo + 1000]):
            ev = msg.events.add(seq=node_seq + lo + i)
            ev.stored.namespace = NS
            ev.stored.hash = h
            ev.stored.tier = types_pb2.TIER_DRAM if tier == "dram" else types_pb2.TIER_NVME
            ev.stored.nbytes = 1 << 21
        out.append(msg.SerializeToString())
    return out


def _ingest(index: BlockIndex, payloads: dict[str, list[bytes]]) -> float:
    """Blocks per second: decode each message and apply it, as a feed does."""
    names = {types_pb2.TIER_DRAM: "dram", types_pb2.TIER_NVME: "nvme"}
    total = 0
    t0 = time.perf_counter()
    for node, messages in payloads.items():
        for raw in messages:
            msg = view_pb2.WatchResponse.FromString(raw)
            stored = [(e.stored.namespace, e.stored.hash, names[e.stored.tier]) for e in msg.events]
            index.apply(node, stored, ())
            total += len(stored)
    return total / (time.perf_counter() - t0)


def _score_us_per_key(index: BlockIndex, request: list[int], repeat: int) -> tuple[float, dict]:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        matches = index.match(NS, request)
        times.append(time.perf_counter() - t0)
    return statistics.median(times) / len(request) * 1e6, {n: m.blocks for n, m in sorted(matches.items())}


def run(nodes: int, blocks: int, repeat: int) -> dict:
    layout = _layout(nodes, blocks)
    payloads = {node: _batches(held, 1) for node, held in layout.items()}
    request = list(range(CHAIN))
    expected = {f"node-{n}": CHAIN if n < 2 else CHAIN // 2 for n in range(min(nodes, 5))}
    memory = MemoryIndex()
    ingest = _ingest(memory, payloads)
    us, matched = _score_us_per_key(memory, request, repeat)
    if matched != expected:
        raise RuntimeError(f"the in-memory index matched {matched}, expected {expected}")
    result = {
        "nodes": nodes,
        "indexed_blocks": sum(len(h) for h in layout.values()),
        "request_blocks": len(request),
        "matched_blocks_by_node": matched,
        "score_us_per_key": us,
        "ingest_blocks_per_s": ingest,
        "redis": _redis(payloads, request, repeat, expected),
    }
    result["targets_met"] = {
        "score_le_0.4us_per_key": us <= 0.4,
        "ingest_ge_200k_blocks_per_s": ingest >= 200_000,
        "redis_score_le_5us_per_key": None if result["redis"] is None else result["redis"]["score_us_per_key"] <= 5,
    }
    return result


def _redis(payloads: dict[str, list[bytes]], request: list[int], repeat: int, expected: dict) -> dict | None:
    with loopback_redis() as client:
        if client is None:
            return None
        index = RedisIndex(client)
        ingest = _ingest(index, payloads)
        us, matched = _score_us_per_key(index, request, repeat)
        if matched != expected:
            raise RuntimeError(f"the Redis index matched {matched}, expected {expected}")
        return {"score_us_per_key": us, "ingest_blocks_per_s": ingest}


def run_cli(args: argparse.Namespace) -> int:
    return run_and_report("router", lambda: run(args.nodes, args.blocks, args.repeat), args.json)
