"""`kvd bench cluster` on a small run: two real nodes and a real mooncake_master; its figures
are this run's (no thresholds: the machine is shared), its bad flags one line each."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from kvd.cluster.local_master import master_binary


def bench(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "kvd.cli.kvd_main", "bench", "cluster", *args],
        capture_output=True, text=True, timeout=timeout,
    )


@pytest.mark.skipif(master_binary() is None, reason="mooncake_master is not installed")
def test_a_small_run_reports_kvd_beside_mooncake(tmp_path):
    r = bench("--json", "--blocks", "16", "--block-bytes", "64KiB", "--lookup-blocks", "200", "--repeats", "3",
              "--dir", str(tmp_path))
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout)
    assert out["bytes"] == 16 * 65536 and out["lookup_blocks"] == 200
    for side, keys in (("kvd", ("store_gbps", "load_gbps")), ("mooncake", ("put_gbps", "get_gbps"))):
        assert all(out[side][k] > 0 for k in keys)
    assert out["kvd"]["lookup_ms"]["p50"] > 0 and out["mooncake"]["exists_ms"]["p50"] > 0
    assert out["ratio"]["load"] == pytest.approx(out["kvd"]["load_gbps"] / out["mooncake"]["get_gbps"])


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--blocks", "0"], "--blocks must be"),
        (["--blocks", "5000"], "--blocks must be"),
        (["--block-bytes", "1000"], "--block-bytes must be"),
        (["--lookup-blocks", "0"], "--lookup-blocks must be"),
        (["--repeats", "0"], "--repeats must be"),
        (["--replicas", "3"], "--replicas must be"),
    ],
)
def test_bad_flags_are_one_line(args, message):
    r = bench(*args, timeout=60)
    assert r.returncode == 2 and r.stderr.strip() == r.stderr.strip().splitlines()[0]
    assert r.stderr.startswith(f"kvd bench cluster: {message}")
