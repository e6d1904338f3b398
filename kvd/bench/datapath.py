"""`kvd bench datapath`: kvd's store/load against the limits, measured in one run.

Every figure comes from this run on this machine:
- ``bulk_memcpy_gbps``: one numpy ``copyto`` of the whole buffer into a pre-faulted one,
  best of ``--bulk-repeat``: the machine's bulk memcpy, and the limit of the DRAM figures.
  A copy this large streams past the cache (glibc's non-temporal stores), so it is the rate
  the memory moves bytes at;
- ``block_memcpy_gbps``: the same bytes copied block by block (numpy slice copies): a second,
  labelled reference, not the limit. Each block's copy goes through the cache (it is below
  glibc's non-temporal threshold) and reads every destination line before writing it, at
  ~60% of the bulk rate; a data path copying the way it does is held to that much;
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

``ratios`` gives every kvd figure against its limit (and the DRAM ones against the block
copy too); ``measured`` the commit, date and copy backend (kvd.native.copy) of the run. With
``--compare BASELINE.json`` (an earlier run's ``--json``) each figure's ratio to that run is
printed too (:mod:`kvd.bench.compare`).

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
from kvd.bench.compare import compare, format_table, load_baseline
from kvd.bench.redis_server import loopback_redis
from kvd.client import Client
from kvd.native import copy as native_copy

GB = 1e9


def filled_buffer(nbytes: int, seed: int = 0) -> mmap.mmap:
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


def bulk_memcpy(src: mmap.mmap, repeat: int) -> float:
    """GB/s of one numpy ``copyto`` of all of ``src`` into a pre-faulted buffer, best of
    ``repeat``: the machine's bulk memcpy (the DRAM limit)."""
    dst = mmap.mmap(-1, len(src))
    a, d = np.frombuffer(src, dtype=np.uint8), np.frombuffer(dst, dtype=np.uint8)
    d[:] = 0  # fault the pages in first: the limit copies, it does not fault
    seconds = _timed(lambda: np.copyto(d, a), repeat)
    a = d = None  # the views go before the unmap
    dst.close()
    return len(src) / seconds / GB


def block_memcpy(src: mmap.mmap, block: int) -> float:
    """GB/s of copying ``src`` block by block (slice copies, best of 3): a reference for a
    data path that copies a block at a time, not the limit (see the module's docstring)."""
    dst = mmap.mmap(-1, len(src))
    dst.write(b"\0" * len(src))  # fault the pages in first
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


def add_arguments(p: argparse.ArgumentParser, size) -> None:
    """The options of `kvd bench datapath`; ``size`` parses a size (``256KiB``)."""
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--total-bytes", type=size, default=1 << 30, metavar="SIZE", help="bytes moved per measurement (default 1GiB)")
    p.add_argument("--block-bytes", type=size, default=256 << 10, metavar="SIZE", help="block size (default 256KiB)")
    p.add_argument("--dir", type=Path, default=Path("var/bench"), help="scratch directory on the NVMe filesystem")
    p.add_argument("--lookups", type=int, default=200, help="lookups of a 10,000-hash prefix to time")
    p.add_argument("--bulk-repeat", type=int, default=5, metavar="N", help="bulk memcpy: best of N copies (default 5)")
    p.add_argument("--compare", type=Path, metavar="BASELINE.json",
                   help="an earlier run's --json: print each figure's ratio to it")


def _measured() -> dict:
    """When and with what this run measured: commit (None outside a git checkout), UTC
    date, and the copy backend of kvd.native.copy ("c" or "numpy")."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10,
            cwd=Path(__file__).resolve().parent,
        ).stdout.strip() or None
    except OSError:
        commit = None
    return {
        "commit": commit,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "copy_backend": native_copy.BACKEND,
    }


def run(directory: Path, total_bytes: int, block_bytes: int, lookups: int, bulk_repeat: int = 5) -> dict:
    if block_bytes % 4096 or total_bytes < block_bytes:
        raise ValueError("--block-bytes must be a multiple of 4096 and at most --total-bytes")
    if bulk_repeat < 1:
        raise ValueError("--bulk-repeat must be at least 1")
    total = total_bytes - total_bytes % block_bytes
    directory.mkdir(parents=True, exist_ok=True)
    src = filled_buffer(total)
    result: dict = {
        "block_bytes": block_bytes,
        "total_bytes": total,
        "measured": _measured(),
        "bulk_memcpy_gbps": bulk_memcpy(src, bulk_repeat),
        "block_memcpy_gbps": block_memcpy(src, block_bytes),
    }
    result.update(bench_disk(directory, src, block_bytes))
    redis_result = bench_redis(src, block_bytes)
    result["redis_gbps"] = redis_result["redis_gbps"] if redis_result else None
    result["redis"] = redis_result
    result.update(bench_kvd(directory, src, block_bytes, lookups))
    k = result["kvd"]
    bulk, block = result["bulk_memcpy_gbps"], result["block_memcpy_gbps"]
    result["ratios"] = {
        "dram_store_vs_bulk_memcpy": k["dram_store_gbps"] / bulk,
        "dram_load_vs_bulk_memcpy": k["dram_load_gbps"] / bulk,
        "dram_load_bytes_vs_bulk_memcpy": k["dram_load_bytes_gbps"] / bulk,
        "dram_store_vs_block_memcpy": k["dram_store_gbps"] / block,
        "dram_load_vs_block_memcpy": k["dram_load_gbps"] / block,
        "nvme_store_vs_disk_write": k["nvme_store_gbps"] / result["disk_write_gbps"],
        "nvme_load_vs_disk_read": k["nvme_load_gbps"] / result["disk_read_gbps"],
        "dram_vs_redis": (
            min(k["dram_store_gbps"], k["dram_load_gbps"]) / result["redis_gbps"] if result["redis_gbps"] else None
        ),
    }
    r = result["ratios"]
    result["targets_met"] = {
        "dram_store_ge_0.8x_bulk_memcpy": r["dram_store_vs_bulk_memcpy"] >= 0.8,
        "dram_load_ge_0.8x_bulk_memcpy": r["dram_load_vs_bulk_memcpy"] >= 0.8,
        "nvme_store_ge_0.8x_disk": r["nvme_store_vs_disk_write"] >= 0.8,
        "nvme_load_ge_0.8x_disk": r["nvme_load_vs_disk_read"] >= 0.8,
        "dram_ge_10x_redis": None if r["dram_vs_redis"] is None else r["dram_vs_redis"] >= 10,
        "lookup_le_2ms": result["lookup_10k_ms_p50"] <= 2.0,
    }
    return result


# Figures an earlier version of this bench named otherwise (for --compare).
RENAMED = {"memcpy_gbps": "block_memcpy_gbps"}


def run_cli(args: argparse.Namespace) -> int:
    baseline = None
    if args.compare is not None:
        try:
            baseline = load_baseline(args.compare)
        except ValueError as exc:  # checked before the run, not after minutes of it
            print(f"kvd bench datapath: {exc}", file=sys.stderr)
            return 1

    def measure() -> dict:
        result = run(args.dir, args.total_bytes, args.block_bytes, args.lookups, args.bulk_repeat)
        if baseline is not None:
            result["compare"] = compare(result, baseline, RENAMED)
        return result

    if args.json or baseline is None:
        return run_and_report("datapath", measure, args.json)
    try:
        result = measure()
    except (ValueError, RuntimeError, OSError) as exc:
        print(f"kvd bench datapath: {exc}", file=sys.stderr)
        return 1
    cmp = result.pop("compare")
    for key, value in result.items():
        print(f"{key}: {value}")
    print(f"compared with {args.compare} (measured {cmp['baseline_measured'] or 'at an unknown commit'}):")
    print(format_table(cmp))
    return 0
