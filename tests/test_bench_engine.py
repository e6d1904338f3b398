"""`kvd bench engine`, tiny: engine processes drive a real daemon with the connector's call
sequence at two rates; the report's shape and what it must say (no errors, every load found
its blocks, the daemon's check passes). The full run and its figures are in
docs/benchmarks.md."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from kvd.bench.engine import CALLS, EngineBenchConfig, summarize

pytestmark = pytest.mark.timeout(180)

TINY = ["--engines", "2", "--rates", "20,100", "--seconds", "1.5", "--workers", "2", "--block-bytes", "16KiB",
        "--shared-blocks", "200", "--new-blocks", "4", "--load-blocks", "8", "--turns", "3", "--dram-bytes", "64MiB"]


def kvd(*args: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "kvd.cli.kvd_main", *args], capture_output=True, text=True, timeout=150, cwd=cwd
    )


def test_a_tiny_run_reports_each_call_and_the_control_overhead_per_rate(tmp_path):
    r = kvd("bench", "engine", "--json", *TINY, "--dir", "scratch", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert report["check_ok"] is True and report["bulk_memcpy_gbps"] > 0
    assert [rate["rate_rps"] for rate in report["rates"]] == [20.0, 100.0]
    for rate in report["rates"]:
        assert rate["errors"] == 0 and rate["error_samples"] == [] and rate["missed_blocks"] == 0
        assert rate["requests"] > 0 and rate["achieved_rps"] == pytest.approx(rate["requests"] / 1.5, abs=0.1)
        for call in CALLS:
            assert 0 < rate[f"{call}_ms"]["p50"] <= rate[f"{call}_ms"]["p99"], call
        assert rate["control_overhead_ms"]["p50"] <= rate["control_overhead_ms"]["p99"]
        assert rate["daemon_cpu_ms_per_request"] > 0
    at_100 = report["at_100_rps"]
    assert at_100["control_overhead_ms"] == report["rates"][1]["control_overhead_ms"]
    assert at_100["session_event_ms"] == report["rates"][1]["session_event_ms"]
    assert report["max_rps_p99_overhead_le_10ms"] in (None, 20.0, 100.0)
    assert list((tmp_path / "scratch").iterdir()) == []  # the daemon's scratch directory is gone


def test_the_overhead_is_the_time_in_calls_less_the_bytes_at_the_bulk_copy_rate():
    rows = [{"lookup": 0.001, "load": 0.004, "store": 0.002, "session_event": 0.001, "bytes": 4_000_000,
             "missed": 0, "late": 0.0}] * 10 + [{"error": "Unavailable: gone"}]
    out = summarize(50.0, 2.0, rows, bulk_bps=1e9)  # 4 MB at 1 GB/s: 4 ms of the 8 are the bytes
    assert out["control_overhead_ms"] == {"p50": 4.0, "p99": 4.0}
    assert (out["requests"], out["errors"], out["error_samples"], out["achieved_rps"]) == (10, 1, ["Unavailable: gone"], 5.0)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--rates", "50,x"], "--rates must be numbers"),
        (["--rates", "0"], "--rates must be positive"),
        (["--engines", "0"], "--engines and --workers must be at least 1"),
        (["--load-blocks", "4000"], "--load-blocks must not exceed --shared-blocks"),
        (["--dram-bytes", "1MiB"], "--dram-bytes must hold the shared prefix"),
        (["--seconds", "0"], "--seconds must be positive"),
    ],
)
def test_bad_settings_fail_before_anything_starts_with_one_line(args, message, tmp_path):
    r = kvd("bench", "engine", *args, "--dir", str(tmp_path))
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and message in r.stderr
    assert list(tmp_path.iterdir()) == []


def test_the_default_request_is_the_issue_shape():
    d = EngineBenchConfig()
    assert (d.engines, d.block_bytes, d.new_blocks, d.load_blocks) == (4, 256 << 10, 8, 32)
    assert 1_800 <= d.shared_blocks + d.turns * d.new_blocks <= 2_100  # a Lookup of about 2,000 hashes
