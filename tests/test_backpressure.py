"""Backpressure: when NVMe writes cannot keep up with demotions, stores slow down
or are refused with RESOURCE_EXHAUSTED after a bounded wait, and nothing queues without bound.

The disk is slowed or stalled through the fault seam (a delay rule in --fault-plan), against
a real `kvd serve` process; the tests wait on what the daemon reports, never on sleeps.
"""

from __future__ import annotations

import json
import os
import statistics
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from test_daemon_integration import assert_never_wrong, load_batched

from kvd.client import ClientError

pytestmark = pytest.mark.timeout(180)

NS = "bp"
TOKENS = 16
BLOCK = 64 << 10
MiB = 1 << 20


@pytest.fixture
def allow_faults(monkeypatch):
    monkeypatch.setenv("KVD_ALLOW_FAULTS", "1")


def slow_disk_daemon(daemon_factory, tmp_path, rule: dict, room_wait_s: float, **kwargs):
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"rules": [rule]}))
    return daemon_factory(
        extra=["--fault-plan", str(plan), "--room-wait-seconds", str(room_wait_s)], **kwargs
    ).start()


def timed_store(c, h: int, data: bytes) -> tuple[float, ClientError | None]:
    start = time.perf_counter()
    try:
        c.store(NS, [h], [data], parents=[None])
        return time.perf_counter() - start, None
    except ClientError as exc:
        return time.perf_counter() - start, exc


def test_stalled_disk_refuses_stores_after_the_bounded_wait(daemon_factory, tmp_path, allow_faults):
    """NVMe writes hang: once DRAM is full of blocks that can only leave through the disk,
    a store waits --room-wait-seconds and is refused; loads of held blocks go on, and
    refused stores leave no lease, slot or queue entry behind."""
    wait_s = 0.5
    d = slow_disk_daemon(daemon_factory, tmp_path, {"op": "write", "delay_s": 60}, wait_s, dram="1MiB", nvme="32MiB")
    blocks = [os.urandom(BLOCK) for _ in range(16)]
    with d.client() as c:
        c.register_namespace(NS, TOKENS, BLOCK)
        assert c.store(NS, list(range(1, 17)), blocks) == 16  # the whole arena
        with ThreadPoolExecutor(8) as pool:
            outcomes = list(pool.map(lambda h: timed_store(c, h, os.urandom(BLOCK)), range(100, 124)))
        for seconds, exc in outcomes:
            assert exc is not None and exc.code == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert f"no DRAM room after waiting {wait_s:g} s: writes to NVMe are not keeping up" in exc.details
            assert wait_s <= seconds < wait_s + 10
        assert c.load(NS, list(range(1, 17))) == blocks  # held blocks still load
        st = c.status()
        dram = next(t for t in st.tiers if t.name == "dram")
        assert (st.leases, dram.blocks, dram.used_bytes) == (0, 16, 1 * MiB)
        assert st.write_behind_queue <= 16  # bounded by the blocks DRAM holds, not by demand
        assert dram.degraded and dram.faults[0].count == len(outcomes)
        assert c.check() == []
    d.kill()  # the stalled writes would hold a clean shutdown for their 60 s


def test_slow_disk_slows_stores_to_its_pace(daemon_factory, tmp_path, allow_faults, capsys):
    """NVMe writes at 4 MiB/s under stores offered as fast as one client can: stores slow to
    the disk's pace (or are refused after the bounded wait), every block stored is kept
    exactly, and the figures are reported (docs/benchmarks.md)."""
    rate = 4 * MiB
    wait_s = 2.0
    n = 160  # 10 MiB: five times the arena
    d = slow_disk_daemon(
        daemon_factory, tmp_path, {"op": "write", "bytes_per_s": rate}, wait_s, dram="2MiB", nvme="64MiB"
    )
    data = {h: os.urandom(BLOCK) for h in range(1, n + 1)}
    with d.client() as c:
        c.register_namespace(NS, TOKENS, BLOCK)
        start = time.perf_counter()
        outcomes = [timed_store(c, h, data[h]) for h in data]
        elapsed = time.perf_counter() - start
        stored = [h for h, (_, exc) in zip(data, outcomes) if exc is None]
        for seconds, exc in outcomes:
            assert exc is None or exc.code == grpc.StatusCode.RESOURCE_EXHAUSTED, exc
            assert seconds < wait_s + 5
        assert len(stored) >= n // 2
        assert c.sync(timeout_s=60) == 0
        loaded = load_batched(c, NS, stored, 8)
        assert assert_never_wrong(loaded, [data[h] for h in stored]) == []
        assert c.check() == []
    latencies = sorted(s for s, exc in outcomes if exc is None)
    achieved = len(stored) * BLOCK / elapsed
    with capsys.disabled():
        print(
            f"\nbackpressure: {n} stores of {BLOCK >> 10} KiB into a 2 MiB arena, NVMe writes at "
            f"{rate / MiB:.0f} MiB/s, room wait {wait_s:g} s: {len(stored)} stored, {n - len(stored)} refused; "
            f"store p50 {1e3 * statistics.median(latencies):.1f} ms, "
            f"p99 {1e3 * latencies[int(0.99 * (len(latencies) - 1))]:.1f} ms, max {1e3 * latencies[-1]:.1f} ms; "
            f"accepted {achieved / MiB:.2f} MiB/s = {achieved / rate:.2f}x the disk's rate"
        )
