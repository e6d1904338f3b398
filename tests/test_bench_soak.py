"""`kvd bench soak`, tiny: the real daemon on loopback TCP, concurrent clients, disconnects
mid-store; the report's shape and its verdicts (no errors, no leaked lease or slot, check ok).
The full run (64 clients, 60 s) and its figures are in docs/benchmarks.md."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from kvd.bench.soak import SoakConfig, block_data, block_hash

pytestmark = pytest.mark.timeout(180)

SESSION_KINDS = ("turn_start", "tool_pause", "tool_resume", "turn_end", "session_end")
RPCS = {"store", "load", "lookup", "prepare_store_abandoned", "store_inline_cancelled"} | {
    f"session_{kind}" for kind in SESSION_KINDS
}


def kvd(*args: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "kvd.cli.kvd_main", *args], capture_output=True, text=True, timeout=150, cwd=cwd
    )


def test_a_tiny_soak_reports_no_errors_and_no_leaks(tmp_path):
    r = kvd(  # a relative --dir, as the default var/bench is: the daemon's socket path must work
        "bench", "soak", "--json", "--clients", "4", "--seconds", "3", "--processes", "2",
        "--lease-seconds", "1", "--disconnect-every", "3", "--dir", "scratch", cwd=tmp_path,
    )
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert (report["errors"], report["error_samples"], report["wrong_bytes"]) == (0, [], 0)
    assert report["check_ok"] is True and report["check_problems"] == []
    assert (report["leases_end"], report["dram_leaked_bytes"], report["abandoned_blocks_visible"]) == (0, 0, 0)
    assert report["disconnects"] >= 4  # every client disconnected mid-store at least once
    assert report["sessions"] >= 4 and report["load_blocks_found"] > 0
    assert set(report["rpc"]) == RPCS
    for name, figures in report["rpc"].items():
        assert figures["count"] > 0, name
        assert 0 < figures["p50_ms"] <= figures["p99_ms"] <= figures["max_ms"], name
        assert figures["ops_per_s"] == pytest.approx(figures["count"] / report["elapsed_s"]), name
    assert report["elapsed_s"] >= 3
    assert 0 < report["rss_start_bytes"] and 0 < report["rss_end_bytes"]
    assert report["rss_growth"] == pytest.approx(report["rss_end_bytes"] / report["rss_start_bytes"] - 1)
    assert isinstance(report["tiers_full_at_rss_start"], bool) and 0 < report["warmup_s"] <= report["elapsed_s"]
    assert list((tmp_path / "scratch").iterdir()) == []  # the daemon's scratch directory is gone


def test_a_lean_soak_sends_one_session_event_a_turn(tmp_path):
    r = kvd(
        "bench", "soak", "--json", "--clients", "2", "--seconds", "2", "--processes", "1",
        "--session-events", "lean", "--dir", "scratch", cwd=tmp_path,
    )
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert (report["errors"], report["wrong_bytes"], report["check_ok"]) == (0, 0, True)
    assert report["config"]["session_events"] == "lean"
    rpc = report["rpc"]
    assert "session_turn_start" not in rpc and "session_tool_resume" not in rpc
    turns = rpc["session_tool_pause"]["count"] + rpc["session_turn_end"]["count"]
    assert turns > 0 and rpc["lookup"]["count"] == turns  # one Lookup (with the session id) a turn


def test_an_unknown_session_event_style_is_one_line_and_exit_2(tmp_path):
    r = kvd("bench", "soak", "--session-events", "some", "--dir", str(tmp_path / "scratch"))
    assert (r.returncode, r.stdout, r.stderr.count("\n")) == (2, "", 1)
    assert "--session-events: invalid choice: 'some' (choose from 'all', 'lean')" in r.stderr
    with pytest.raises(ValueError, match="--session-events must be one of all, lean"):
        SoakConfig(session_events="some").validate()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--clients", "0"], "--clients, --processes, --max-ops and --disconnect-every must be positive"),
        (["--block-bytes", "1000"], "--block-bytes must be a positive multiple of 4096"),
        (["--clients", "64", "--dram-bytes", "8MiB"], "--dram-bytes must hold every client's longest chain"),
        (["--seconds", "0"], "--seconds and --lease-seconds must be positive"),
    ],
)
def test_bad_settings_are_one_line_before_any_daemon_starts(tmp_path, args, message):
    r = kvd("bench", "soak", "--json", "--dir", str(tmp_path / "scratch"), *args)
    assert (r.returncode, r.stdout) == (1, "")
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("kvd bench soak: ") and message in r.stderr
    assert not (tmp_path / "scratch").exists()


def test_block_contents_follow_from_the_hash():
    h = block_hash(0, "c1-s0", 2, 1)
    assert h == block_hash(0, "c1-s0", 2, 1) != block_hash(1, "c1-s0", 2, 1)
    assert 0 <= h < 1 << 64
    assert block_data(h, 4096) == block_data(h, 4096) != block_data(h + 1, 4096)
    assert len(block_data(h, 8192)) == 8192
    SoakConfig().validate()  # the defaults (64 clients) fit the default DRAM


def test_a_daemon_that_does_not_come_up_is_not_left_running(tmp_path, monkeypatch):
    from kvd.bench import soak

    started = []
    real_popen = subprocess.Popen

    def spy(*args, **kwargs):
        started.append(real_popen(*args, **kwargs))
        return started[-1]

    monkeypatch.setattr(soak, "START_TIMEOUT_S", 0.0)  # give up before the socket can appear
    monkeypatch.setattr(soak.subprocess, "Popen", spy)
    with pytest.raises(RuntimeError, match="kvd serve did not start"):
        soak.SoakDaemon(tmp_path, SoakConfig())
    assert len(started) == 1 and started[0].poll() is not None  # killed and reaped
