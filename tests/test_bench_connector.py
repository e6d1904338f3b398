"""`kvd bench connector` runs end to end at a tiny size and reports every figure (no timing
asserted: targets belong to the benchmark's report, not to tests)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytest.importorskip("torch")


def _bench(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "kvd.cli.kvd_main", "bench", "connector", *args],
        capture_output=True, text=True, timeout=300,
    )


@pytest.mark.parametrize("layout", ["kv_first", "blocks_first"])
def test_bench_connector_reports_every_figure(layout):
    out = _bench("--json", "--tokens", "1000", "--layers", "3", "--kv-heads", "2", "--head-size", "64",
                 "--cache-blocks", "16", "--window-blocks", "8", "--repeat", "1", "--layout", layout, "--device", "cpu")
    assert out.returncode == 0, out.stderr
    r = json.loads(out.stdout)
    g = r["geometry"]
    assert g["context_blocks"] == 63 and g["slot_bytes"] == 3 * 2 * 16 * 2 * 64 * 2
    assert g["context_bytes"] == 63 * g["slot_bytes"] and g["layout"] == layout
    assert r["device"] == "cpu" and r["e2e"] is None
    assert r["limits"]["limit_gbps"] == max(r["limits"]["memcpy_numpy_gbps"], r["limits"]["memcpy_torch_gbps"]) > 0
    rows = r["destinations"]["arena"]
    assert [row["backend"] for row in rows] == ["host", "torch"]
    for row in rows:
        for key in ("gather_gbps", "scatter_gbps", "gather_s", "scatter_s", "gather_vs_limit", "scatter_vs_limit"):
            assert row[key] > 0


def test_bench_connector_rejects_bad_sizes_with_one_line():
    out = _bench("--tokens", "0")
    assert out.returncode == 1
    assert out.stderr.strip().splitlines() == ["kvd bench connector: --tokens must be positive"]
