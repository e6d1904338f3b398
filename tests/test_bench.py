"""The benchmarks run end to end at a small size and report every key (no timing asserted:
targets belong to the benchmark's own report, not to tests)."""

from __future__ import annotations

import json
import subprocess
import sys


def kvd(*args: str) -> dict:
    out = subprocess.run([sys.executable, "-m", "kvd.cli.kvd_main", *args], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def test_bench_datapath_reports_every_figure(tmp_path):
    r = kvd("bench", "datapath", "--json", "--total-bytes", "16MiB", "--dir", str(tmp_path), "--lookups", "5")
    for key in ("memcpy_gbps", "disk_write_gbps", "disk_read_gbps", "redis_gbps", "lookup_10k_ms_p50"):
        assert key in r
    for key in ("dram_store_gbps", "dram_load_gbps", "nvme_store_gbps", "nvme_load_gbps"):
        assert r["kvd"][key] > 0
    assert r["kvd"]["check_problems"] == []
    assert set(r["targets_met"]) == {
        "dram_store_ge_0.7x_memcpy", "dram_load_ge_0.7x_memcpy", "nvme_store_ge_0.7x_disk",
        "nvme_load_ge_0.7x_disk", "dram_ge_10x_redis", "lookup_le_2ms",
    }


def test_bench_router_reports_every_figure():
    r = kvd("bench", "router", "--json", "--blocks", "100000", "--repeat", "2")
    assert r["indexed_blocks"] == 100_000 and r["nodes"] == 8
    assert r["matched_blocks_by_node"]["node-0"] == 10_000
    assert r["score_us_per_key"] > 0 and r["ingest_blocks_per_s"] > 0


def test_bench_rejects_bad_sizes_with_one_line():
    out = subprocess.run(
        [sys.executable, "-m", "kvd.cli.kvd_main", "bench", "datapath", "--block-bytes", "1000"],
        capture_output=True, text=True, timeout=60,
    )
    assert out.returncode == 1 and len(out.stderr.splitlines()) == 1
