"""`kvd bench datapath`: kvd's store/load against the limits, measured in one run.

Every figure comes from this run on this machine:
- ``memcpy_gbps``: copying the same blocks between two pre-faulted buffers (the DRAM limit);
- ``disk_write_gbps``/``disk_read_gbps``: raw O_DIRECT writes (then fdatasync) and reads of
  the same blocks in the NVMe directory (the NVMe limit; the best of 1 and 4 threads);
- ``redis_gbps``: pipelined SET then GET of the same blocks on a loopback redis-server, when
  one is on PATH (null otherwise);
- ``kvd.*``: a real `kvd serve` process and the Python client over its unix socket and
  shared-memory arena: ``dram_store``/``dram_load`` into an arena with room to spare
  (``load_into`` buffers the caller owns; ``dram_load_bytes`` is ``load()``, which allocates
  a new bytes object per block), ``nvme_store`` from the first store until Sync says every
  block is durable on NVMe, ``nvme_load`` of the same blocks after a restart, when they are
  on NVMe only;
- ``lookup_10k_ms_p50``: median latency of a Lookup of a 10,000-hash held prefix.

GB/s are 10^9 bytes per second. Targets are reported with the ratio measured, never assumed.
"""

from __future__ import annotations

import argparse
import mmap
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from kvd.bench import run_and_report
from kvd.bench.redis_server import loopback_redis
from kvd.client import Client

GB = 1e9


def _filled(nbytes: int, seed: int = 0) -> mmap.mmap:
    """A page-aligned, pre-faulted buffer of random bytes."""
    buf = mmap.mmap(-1, nbytes)
    arr = np.frombuffer(buf, dtype=np.uint8)
    arr[:] = np.random.default_rng(seed).integers(0, 256, nbytes, dtype=np.uint8)
    return buf


def _timed(fn, repeat: int = 3) -> float:
    """Best-of-``repeat`` seconds of fn()."""
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def bench_memcpy(src: mmap.mmap, block: int) -> float:
    dst = mmap.mmap(-1, len(src))
    dst.write(b"\0" * len(src))  # fault the pages in first: the limit copies, it does not fault
    s, d = memoryview(src), memoryview(dst)

    def copy():
        for off in range(0, len(src), block):
            d[off : off + block] = s[off : off + block]

    seconds = _timed(copy)
    s.release()
    d.release()
    dst.close()
    return len(src) / seconds / GB


def _direct_io(directory: Path, src: mmap.mmap, block: int, threads: int, repeat: int = 3) -> tuple[float, float]:
    """Raw O_DIRECT writes into a freshly preallocated file (the state kvd's slab files
    start in), fdatasync, then reads of it; the best of ``repeat`` runs each."""
    total = len(src)
    view = memoryview(src)
    offsets = list(range(0, total, block))
    chunks = [offsets[i::threads] for i in range(threads)]
    out = mmap.mmap(-1, total)
    oview = memoryview(out)

    def run(op):
        def worker(mine):
            for off in mine:
                op(off)

        ts = [threading.Thread(target=worker, args=(c,)) for c in chunks]
        for t in ts:
            t.start()
        for t in ts:
            t.join()

    best_w = best_r = float("inf")
    path = directory / f"raw-{threads}.dat"
    try:
        for _ in range(repeat):
            path.unlink(missing_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_DIRECT, 0o600)
            try:
                os.posix_fallocate(fd, 0, total)
                t0 = time.perf_counter()
                run(lambda off, fd=fd: os.pwrite(fd, view[off : off + block], off))
                os.fdatasync(fd)
                best_w = min(best_w, time.perf_counter() - t0)
                t0 = time.perf_counter()
                run(lambda off, fd=fd: os.preadv(fd, [oview[off : off + block]], off))
                best_r = min(best_r, time.perf_counter() - t0)
            finally:
                os.close(fd)
        if oview[:block] != view[:block] or oview[-block:] != view[-block:]:
            raise RuntimeError("raw direct I/O read back different bytes")
    finally:
        path.unlink(missing_ok=True)
        oview.release()
        view.release()
        out.close()
    return total / best_w / GB, total / best_r / GB


def bench_disk(directory: Path, src: mmap.mmap, block: int) -> dict:
    results = {t: _direct_io(directory, src, block, t) for t in (1, 4)}
    return {
        "disk_write_gbps": max(w for w, _ in results.values()),
        "disk_read_gbps": max(r for _, r in results.values()),
        "disk_by_threads": {str(t): {"write_gbps": w, "read_gbps": r} for t, (w, r) in results.items()},
    }


def bench_redis(src: mmap.mmap, block: int) -> dict | None:
    with loopback_redis() as r:
        if r is None:
            return None
        view = memoryview(src)
        offsets = list(range(0, len(src), block))
        batch = 64

        def set_all():
            for i in range(0, len(offsets), batch):
                pipe = r.pipeline(transaction=False)
                for off in offsets[i : i + batch]:
                    pipe.set(f"b{off}", view[off : off + block])
                pipe.execute()

        def get_all():
            for i in range(0, len(offsets), batch):
                pipe = r.pipeline(transaction=False)
                for off in offsets[i : i + batch]:
                    pipe.get(f"b{off}")
                pipe.execute()

        t_set = _timed(set_all, 1)
        t_get = _timed(get_all, 1)
        if r.get(f"b{offsets[0]}") != bytes(view[:block]):
            raise RuntimeError("redis returned different bytes")
        view.release()
        total = len(src)
        return {
            "redis_set_gbps": total / t_set / GB,
            "redis_get_gbps": total / t_get / GB,
            "redis_gbps": 2 * total / (t_set + t_get) / GB,
        }


class _Daemon:
    """`kvd serve` as a child process on a private socket and arena."""

    def __init__(self, root: Path, dram: int, nvme: int, nvme_dir: Path) -> None:
        self.root = root
        self.socket = root / "kvd.sock"
        self.args = [
            sys.executable, "-m", "kvd.cli.kvd_main", "serve",
            "--socket", str(self.socket),
            "--dram-bytes", str(dram),
            "--nvme-dir", str(nvme_dir),
            "--nvme-bytes", str(nvme),
            "--log-level", "WARNING",
        ]
        self.address = f"unix://{self.socket}"
        self.start()

    def start(self) -> None:
        self.log = open(self.root / "kvd.log", "ab")
        self.proc = subprocess.Popen(self.args, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 120
        while not self.socket.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"kvd serve did not start; see {self.root / 'kvd.log'}")
            time.sleep(0.05)  # polling while the daemon starts
        with Client(self.address) as probe:
            probe.wait_ready(30)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=120)
        self.log.close()


def bench_kvd(directory: Path, src: mmap.mmap, block: int, lookups: int, rounds: int = 3) -> dict:
    """DRAM figures, best of ``rounds`` (each stores the data under new hashes) on an arena
    with room for all rounds (no eviction pressure), like the limits' best of 3; NVMe store
    from the first round; NVMe load of the last round after a restart, when its blocks are
    on NVMe only (recovered from the manifest)."""
    total = len(src)
    nblocks = total // block
    root = Path(tempfile.mkdtemp(prefix="kvd-bench-"))
    nvme_dir = directory / "kvd-nvme"
    shutil.rmtree(nvme_dir, ignore_errors=True)
    margin = 64 << 20
    daemon = _Daemon(root, dram=rounds * total + margin, nvme=total + 2 * margin, nvme_dir=nvme_dir)
    view = memoryview(src)
    blocks = [view[i * block : (i + 1) * block] for i in range(nblocks)]
    out = mmap.mmap(-1, total)
    out.write(b"\0" * total)
    oview = memoryview(out)
    outs = [oview[i * block : (i + 1) * block] for i in range(nblocks)]

    def same(what: str) -> None:
        for i in (0, nblocks // 2, nblocks - 1):
            if oview[i * block : (i + 1) * block] != view[i * block : (i + 1) * block]:
                raise RuntimeError(f"{what} returned different bytes")

    try:
        client = Client(daemon.address, shared_memory=True)
        client.register_namespace("bench", 16, block)
        if not client.shared_memory:  # maps the arena now: a one-time cost per client, not per byte
            raise RuntimeError("the client could not map the daemon's arena")

        t_store, t_load, t_load_bytes = [], [], []
        for r in range(rounds):
            hashes = list(range(r * nblocks + 1, (r + 1) * nblocks + 1))
            t0 = time.perf_counter()
            stored = client.store("bench", hashes, blocks)
            t_store.append(time.perf_counter() - t0)
            if stored != nblocks:
                raise RuntimeError(f"stored {stored} of {nblocks} blocks")
            t0 = time.perf_counter()
            pending = client.sync(600)
            if r == 0:
                t_until_durable = t_store[0] + (time.perf_counter() - t0)
            if pending:
                raise RuntimeError(f"{pending} blocks still not durable")
            oview[:] = b"\0" * total
            t0 = time.perf_counter()
            found = client.load_into("bench", hashes, outs)
            t_load.append(time.perf_counter() - t0)
            if not all(found):
                raise RuntimeError("DRAM load missed blocks")
            same("DRAM load")
        # load() allocates a bytes object per block; freeing 1 GiB of them disturbs what
        # follows, so it runs once, after the rounds.
        t0 = time.perf_counter()
        loaded = client.load("bench", hashes)
        t_load_bytes.append(time.perf_counter() - t0)
        if loaded[7] != bytes(blocks[7]):
            raise RuntimeError("DRAM load() returned different bytes")
        del loaded

        # Lookup of a 10,000-block held prefix, from this (separate) process.
        client.register_namespace("lookup", 16, 4096)
        page = bytes(4096)
        prefix = list(range(10**6, 10**6 + 10_000))
        client.store("lookup", prefix, [page] * len(prefix))
        if len(client.lookup("lookup", prefix)) != len(prefix):
            raise RuntimeError("lookup did not see the whole prefix")
        client.sync(600)  # time lookups on a quiet daemon, not against its write-behind
        times = []
        for _ in range(lookups):
            t0 = time.perf_counter()
            client.lookup("lookup", prefix)
            times.append(time.perf_counter() - t0)
        client.close()

        # Restart: the blocks come back from the manifest, on NVMe only.
        daemon.stop()
        daemon.start()
        client = Client(daemon.address, shared_memory=True)
        if not client.shared_memory:
            raise RuntimeError("the client could not map the restarted daemon's arena")
        tiers = client.lookup("bench", hashes)
        if tiers != ["nvme"] * nblocks:
            raise RuntimeError(f"expected every block on NVMe only after a restart, lookup says {set(tiers)}")
        oview[:] = b"\0" * total
        t0 = time.perf_counter()
        found = client.load_into("bench", hashes, outs)
        t_nvme_load = time.perf_counter() - t0
        if not all(found):
            raise RuntimeError("NVMe load missed blocks")
        same("NVMe load")
        problems = client.check()
        client.close()
        return {
            "kvd": {
                "dram_store_gbps": total / min(t_store) / GB,
                "dram_load_gbps": total / min(t_load) / GB,
                "dram_load_bytes_gbps": total / min(t_load_bytes) / GB,
                "dram_store_gbps_each_round": [total / t / GB for t in t_store],
                "dram_load_gbps_each_round": [total / t / GB for t in t_load],
                "nvme_store_gbps": total / t_until_durable / GB,
                "nvme_load_gbps": total / t_nvme_load / GB,
                "check_problems": problems,
            },
            "lookup_10k_ms_p50": statistics.median(times) * 1000,
            "lookup_10k_ms_p90": sorted(times)[int(0.9 * len(times))] * 1000,
        }
    finally:
        daemon.stop()
        for v in outs + blocks:
            v.release()
        oview.release()
        view.release()
        out.close()
        shutil.rmtree(root, ignore_errors=True)
        shutil.rmtree(nvme_dir, ignore_errors=True)


def run(directory: Path, total_bytes: int, block_bytes: int, lookups: int) -> dict:
    if block_bytes % 4096 or total_bytes < block_bytes:
        raise ValueError("--block-bytes must be a multiple of 4096 and at most --total-bytes")
    total = total_bytes - total_bytes % block_bytes
    directory.mkdir(parents=True, exist_ok=True)
    src = _filled(total)
    result: dict = {
        "block_bytes": block_bytes,
        "total_bytes": total,
        "memcpy_gbps": bench_memcpy(src, block_bytes),
    }
    result.update(bench_disk(directory, src, block_bytes))
    redis_result = bench_redis(src, block_bytes)
    result["redis_gbps"] = redis_result["redis_gbps"] if redis_result else None
    result["redis"] = redis_result
    result.update(bench_kvd(directory, src, block_bytes, lookups))
    k = result["kvd"]
    result["ratios"] = {
        "dram_store_vs_memcpy": k["dram_store_gbps"] / result["memcpy_gbps"],
        "dram_load_vs_memcpy": k["dram_load_gbps"] / result["memcpy_gbps"],
        "nvme_store_vs_disk_write": k["nvme_store_gbps"] / result["disk_write_gbps"],
        "nvme_load_vs_disk_read": k["nvme_load_gbps"] / result["disk_read_gbps"],
        "dram_vs_redis": (
            min(k["dram_store_gbps"], k["dram_load_gbps"]) / result["redis_gbps"] if result["redis_gbps"] else None
        ),
    }
    r = result["ratios"]
    result["targets_met"] = {
        "dram_store_ge_0.7x_memcpy": r["dram_store_vs_memcpy"] >= 0.7,
        "dram_load_ge_0.7x_memcpy": r["dram_load_vs_memcpy"] >= 0.7,
        "nvme_store_ge_0.7x_disk": r["nvme_store_vs_disk_write"] >= 0.7,
        "nvme_load_ge_0.7x_disk": r["nvme_load_vs_disk_read"] >= 0.7,
        "dram_ge_10x_redis": None if r["dram_vs_redis"] is None else r["dram_vs_redis"] >= 10,
        "lookup_le_2ms": result["lookup_10k_ms_p50"] <= 2.0,
    }
    return result


def run_cli(args: argparse.Namespace) -> int:
    return run_and_report("datapath", lambda: run(args.dir, args.total_bytes, args.block_bytes, args.lookups), args.json)
