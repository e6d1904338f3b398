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


def test_bench_datapath_reports_every_figure_against_its_limit_and_a_baseline(tmp_path):
    old = tmp_path / "old.json"  # as an earlier version of the bench wrote it
    old.write_text(json.dumps({"memcpy_gbps": 5.0, "kvd": {"dram_load_gbps": 1e-6, "gone_gbps": 1.0},
                               "lookup_10k_ms_p50": 1e6}))
    r = kvd("bench", "datapath", "--json", "--total-bytes", "16MiB", "--dir", str(tmp_path), "--lookups", "5",
            "--bulk-repeat", "2", "--compare", str(old))
    for key in ("bulk_memcpy_gbps", "block_memcpy_gbps", "disk_write_gbps", "disk_read_gbps", "redis_gbps",
                "lookup_10k_ms_p50"):
        assert key in r
    for key in ("dram_store_gbps", "dram_load_gbps", "nvme_store_gbps", "nvme_load_gbps"):
        assert r["kvd"][key] > 0
    assert r["kvd"]["check_problems"] == []
    assert r["ratios"]["dram_load_vs_bulk_memcpy"] == r["kvd"]["dram_load_gbps"] / r["bulk_memcpy_gbps"]
    assert r["measured"]["copy_backend"] in ("c", "numpy") and r["measured"]["date"]
    assert set(r["targets_met"]) == {
        "dram_store_ge_0.8x_bulk_memcpy", "dram_load_ge_0.8x_bulk_memcpy", "nvme_store_ge_0.8x_disk",
        "nvme_load_ge_0.8x_disk", "dram_ge_10x_redis", "lookup_le_2ms",
    }
    cmp = r["compare"]
    assert set(cmp["figures"]) == {"block_memcpy_gbps", "kvd.dram_load_gbps", "lookup_10k_ms_p50"}  # memcpy renamed
    assert cmp["figures"]["kvd.dram_load_gbps"]["verdict"] == "better"
    assert cmp["figures"]["lookup_10k_ms_p50"]["verdict"] == "better"  # lower is better
    assert cmp["only_baseline"] == ["kvd.gone_gbps"] and "bulk_memcpy_gbps" in cmp["only_now"]


def test_bench_datapath_compare_needs_a_readable_baseline_before_it_runs(tmp_path):
    for bad, content in (("missing.json", None), ("list.json", "[1, 2]"), ("broken.json", "{")):
        path = tmp_path / bad
        if content is not None:
            path.write_text(content)
        out = subprocess.run(
            [sys.executable, "-m", "kvd.cli.kvd_main", "bench", "datapath", "--dir", str(tmp_path), "--compare", str(path)],
            capture_output=True, text=True, timeout=60,
        )
        assert out.returncode == 1 and len(out.stderr.splitlines()) == 1 and bad in out.stderr


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
