"""`kvd bench cluster`: the cluster tier against Mooncake Store's own client, same run.

A real ``mooncake_master`` and two real daemons (nodes A and B, each contributing a segment)
on this machine. Measured:

- **store**: node A commits a session's blocks; the seconds until its puts have all landed
  (``published``), against this process's own batched ``batch_put_from`` of the same bytes
  (same batch size and replica count) from a registered buffer;
- **load**: node B loads the chain, which only the cluster holds, into caller buffers
  (``Client.load_into``: B's lookup, its get into DRAM with every value checked, the copy
  out), against this process's ``batch_get_into`` of the same keys' bytes;
- **lookup**: node B's Lookup of a chain of ``--lookup-blocks`` blocks that only the cluster
  holds (p50/p99 over ``--repeats``), against one ``batch_is_exist`` of the same keys.

The bench's own Mooncake client contributes no segment, so its values land where kvd's do:
on the nodes' segments.
"""

from __future__ import annotations

import argparse
import random
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kvd.bench import run_and_report
from kvd.client import Client
from kvd.cluster.local_master import LocalMaster
from kvd.cluster.tier import ClusterSettings
from kvd.cluster.values import HEADER_BYTES

NS, LOOKUP_NS = "bench", "bench-lookup"
LOOKUP_BLOCK = 4096


@dataclass(frozen=True)
class ClusterBenchConfig:
    block_bytes: int = 256 << 10
    blocks: int = 512  # the chain stored and loaded (128 MiB at 256 KiB)
    lookup_blocks: int = 10_000
    repeats: int = 20
    replicas: int = 2
    dir: Path | None = None

    def validate(self) -> None:
        if self.block_bytes < 4096 or self.block_bytes % 4096:
            raise ValueError("--block-bytes must be a positive multiple of 4KiB")
        if self.blocks <= 0 or self.blocks > ClusterSettings().max_fetch:
            raise ValueError(f"--blocks must be 1..{ClusterSettings().max_fetch} (one load's fetch)")
        if not 0 < self.lookup_blocks <= ClusterSettings().max_lookup:
            raise ValueError(f"--lookup-blocks must be 1..{ClusterSettings().max_lookup}")
        if self.repeats <= 0:
            raise ValueError("--repeats must be positive")
        if not 1 <= self.replicas <= 2:
            raise ValueError("--replicas must be 1 or 2 (the bench runs two nodes)")


class Node:
    """`kvd serve` joined to the cluster, in a private directory."""

    def __init__(self, root: Path, master: LocalMaster, dram_bytes: int, segment_bytes: int, replicas: int) -> None:
        root.mkdir(parents=True, exist_ok=True)
        self.socket = root / "kvd.sock"
        self.log = root / "kvd.log"
        args = [
            sys.executable, "-m", "kvd.cli.kvd_main", "serve", "--socket", str(self.socket),
            "--dram-bytes", str(dram_bytes), "--nvme-bytes", "0", "--shm-dir", str(root / "shm"),
            "--log-level", "WARNING", "--cluster-master", master.master, "--cluster-metadata", master.metadata,
            "--cluster-bytes", str(segment_bytes), "--cluster-replicas", str(replicas),
            "--cluster-timeout-seconds", "30",
        ]
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT)
        self.address = f"unix://{self.socket}"
        deadline = time.monotonic() + 120
        while not self.socket.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"kvd serve did not start: {self.log.read_text(errors='replace')[-2000:]}")
            time.sleep(0.05)  # polling while the daemon starts
        with Client(self.address) as c:
            c.wait_ready(60)
            _until(lambda: c.status().cluster.state == "up", 120, "the node joins the cluster")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def _until(predicate, timeout: float, what: str, interval: float = 0.002) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(interval)  # polling the daemon's status


def _pct(values: list[float]) -> dict:
    ordered = sorted(values)
    return {"p50": statistics.median(ordered), "p99": ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]}


def run(cfg: ClusterBenchConfig) -> dict:
    from mooncake.store import MooncakeDistributedStore, ReplicateConfig

    rng = random.Random(0)
    total = cfg.blocks * cfg.block_bytes
    lookup_bytes = cfg.lookup_blocks * LOOKUP_BLOCK
    # Each node's segment holds a replica of everything both sides put: kvd's chain, the
    # baseline's copy of it, the lookup chain, with headers.
    segment = int(1.25 * (2 * total + lookup_bytes + (2 * cfg.blocks + cfg.lookup_blocks) * HEADER_BYTES)) + (64 << 20)
    dram = int(1.25 * (total + lookup_bytes)) + (64 << 20)
    dram -= dram % 4096
    with tempfile.TemporaryDirectory(dir=cfg.dir) as scratch:
        root = Path(scratch)
        with LocalMaster(root / "master.log") as master:
            nodes = []
            try:
                nodes = [Node(root / n, master, dram, segment, cfg.replicas) for n in ("a", "b")]
                kvd = _measure_kvd(cfg, nodes, rng)
                own = MooncakeDistributedStore()
                rc = own.setup(
                    "127.0.0.1", master.metadata, 0, 64 << 20, "tcp", "", master.master,
                )
                if rc != 0:
                    raise RuntimeError(f"the bench's own Mooncake client cannot join (code {rc})")
                try:
                    replicate = ReplicateConfig()
                    replicate.replica_num = cfg.replicas
                    mooncake = _measure_mooncake(cfg, own, replicate, kvd.pop("lookup_keys"))
                finally:
                    own.close()
            finally:
                for n in nodes:
                    n.stop()
    gb = total / 1e9
    return {
        "bytes": total,
        "block_bytes": cfg.block_bytes,
        "blocks": cfg.blocks,
        "replicas": cfg.replicas,
        "kvd": {
            "store_gbps": gb / kvd["store_s"],
            "load_gbps": gb / kvd["load_s"],
            "lookup_ms": kvd["lookup_ms"],
        },
        "mooncake": {
            "put_gbps": gb / mooncake["put_s"],
            "get_gbps": gb / mooncake["get_s"],
            "exists_ms": mooncake["exists_ms"],
        },
        "ratio": {
            "store": mooncake["put_s"] / kvd["store_s"],
            "load": mooncake["get_s"] / kvd["load_s"],
            "lookup_p50": mooncake["exists_ms"]["p50"] / kvd["lookup_ms"]["p50"],
        },
        "lookup_blocks": cfg.lookup_blocks,
    }


def _measure_kvd(cfg: ClusterBenchConfig, nodes: list[Node], rng: random.Random) -> dict:
    a, b = nodes
    hashes = [rng.getrandbits(63) for _ in range(cfg.blocks)]
    data = np.frombuffer(rng.randbytes(cfg.block_bytes * cfg.blocks), dtype=np.uint8).reshape(cfg.blocks, -1)
    lookup = [rng.getrandbits(63) for _ in range(cfg.lookup_blocks)]
    with Client(a.address) as ca, Client(b.address) as cb:
        for c in (ca, cb):
            c.register_namespace(NS, 16, cfg.block_bytes)
            c.register_namespace(LOOKUP_NS, 16, LOOKUP_BLOCK)
        ca.lookup(NS, hashes, session_id="bench")  # a live session's chain: worth sharing
        ca.store(NS, hashes, list(data), session_id="bench")
        start = time.perf_counter()
        # Polled every 10 ms: each status call costs the daemon's loop time the puts share.
        _until(lambda: ca.status().cluster.published_blocks >= cfg.blocks, 600, "A's puts", interval=0.01)
        store_s = time.perf_counter() - start
        step = 1024
        zeros = bytes(LOOKUP_BLOCK)
        ca.lookup(LOOKUP_NS, lookup, session_id="bench-lookup")
        for i in range(0, len(lookup), step):
            part = lookup[i : i + step]
            parents = [lookup[i - 1] if i else None, *part[:-1]]  # one chain, stored in parts
            ca.store(LOOKUP_NS, part, [zeros] * len(part), parents=parents, session_id="bench-lookup")
        published = cfg.blocks + cfg.lookup_blocks
        _until(lambda: ca.status().cluster.published_blocks >= published, 600, "A's lookup chain")
        out = np.zeros_like(data)
        start = time.perf_counter()
        found = cb.load_into(NS, hashes, list(out))
        load_s = time.perf_counter() - start
        if not all(found) or not np.array_equal(out, data):
            raise RuntimeError(f"node B loaded {sum(found)} of {cfg.blocks} blocks, or other bytes")
        lookup_ms = []
        for _ in range(cfg.repeats):
            t = time.perf_counter()
            tiers = cb.lookup(LOOKUP_NS, lookup)
            lookup_ms.append(1e3 * (time.perf_counter() - t))
            if tiers != ["cluster"] * cfg.lookup_blocks:
                raise RuntimeError(f"node B's lookup found {len(tiers)} blocks, not the chain in the cluster")
    return {"store_s": store_s, "load_s": load_s, "lookup_ms": _pct(lookup_ms), "lookup_keys": lookup}


def _measure_mooncake(cfg: ClusterBenchConfig, store, replicate, lookup: list[int]) -> dict:
    from kvd.cluster.values import cluster_key

    value = cfg.block_bytes + HEADER_BYTES
    buf = np.frombuffer(random.Random(1).randbytes(value * cfg.blocks), dtype=np.uint8).copy()
    if store.register_buffer(buf.ctypes.data, buf.nbytes) != 0:
        raise RuntimeError("the bench's buffer cannot be registered")
    keys = [f"bench-own/{i}" for i in range(cfg.blocks)]
    ptrs = [buf.ctypes.data + i * value for i in range(cfg.blocks)]
    batch = ClusterSettings().put_blocks
    start = time.perf_counter()
    for i in range(0, cfg.blocks, batch):
        codes = store.batch_put_from(keys[i : i + batch], ptrs[i : i + batch], [value] * len(keys[i : i + batch]), replicate)
        if any(c != 0 for c in codes):
            raise RuntimeError(f"Mooncake's own put failed (codes {sorted(set(codes))[:4]})")
    put_s = time.perf_counter() - start
    buf[:] = 0
    start = time.perf_counter()
    sizes = store.batch_get_into(keys, ptrs, [value] * cfg.blocks)
    get_s = time.perf_counter() - start
    if any(s != value for s in sizes):
        raise RuntimeError("Mooncake's own get failed")
    lookup_keys = [cluster_key(LOOKUP_NS, h) for h in lookup]
    exists_ms = []
    for _ in range(cfg.repeats):
        t = time.perf_counter()
        codes = store.batch_is_exist(lookup_keys)
        exists_ms.append(1e3 * (time.perf_counter() - t))
        if any(c != 1 for c in codes):
            raise RuntimeError("the lookup chain is not all in the cluster")
    store.unregister_buffer(buf.ctypes.data)
    return {"put_s": put_s, "get_s": get_s, "exists_ms": _pct(exists_ms)}


def add_arguments(p: argparse.ArgumentParser, size) -> None:
    d = ClusterBenchConfig()
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--block-bytes", type=size, default=d.block_bytes, metavar="SIZE", help="block size (default 256KiB)")
    p.add_argument("--blocks", type=int, default=d.blocks, help=f"blocks stored and loaded (default {d.blocks})")
    p.add_argument(
        "--lookup-blocks", type=int, default=d.lookup_blocks,
        help=f"blocks of the chain looked up in the cluster (default {d.lookup_blocks})",
    )
    p.add_argument("--repeats", type=int, default=d.repeats, help=f"lookups timed (default {d.repeats})")
    p.add_argument("--replicas", type=int, default=d.replicas, help=f"copies of each value (default {d.replicas})")
    p.add_argument("--dir", type=Path, help="scratch directory (default: the system's)")


def run_cli(args: argparse.Namespace) -> int:
    """Bad settings exit 2 with one line naming the flag, before anything starts."""
    try:
        cfg = ClusterBenchConfig(
            block_bytes=args.block_bytes, blocks=args.blocks, lookup_blocks=args.lookup_blocks,
            repeats=args.repeats, replicas=args.replicas, dir=args.dir,
        )
        cfg.validate()
    except ValueError as exc:
        print(f"kvd bench cluster: {exc}", file=sys.stderr)
        return 2
    try:
        import mooncake.store  # noqa: F401 - the cluster extra
    except ImportError:
        print("kvd bench cluster: needs Mooncake Store (pip install 'kvd[cluster]')", file=sys.stderr)
        return 2
    return run_and_report("cluster", lambda: run(cfg), args.json)


__all__ = ["ClusterBenchConfig", "add_arguments", "run", "run_cli"]
