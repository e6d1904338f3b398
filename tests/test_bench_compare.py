"""kvd.bench.compare: which numbers are figures, which way is better, and the text table."""

from __future__ import annotations

from kvd.bench.compare import compare, figures, format_table


def test_figures_are_gbps_and_ms_leaves_at_any_depth():
    result = {"bulk_memcpy_gbps": 12.0, "total_bytes": 1 << 30, "ok": True, "each_gbps": [1.0, 2.0],
              "kvd": {"dram_load_gbps": 10.0, "check_problems": []}, "lookup_10k_ms_p50": 0.4, "x_ms": 3,
              "targets_met": {"dram_load_ge_0.8x_bulk_memcpy": True}}
    assert figures(result) == {"bulk_memcpy_gbps": 12.0, "kvd.dram_load_gbps": 10.0, "lookup_10k_ms_p50": 0.4,
                               "x_ms": 3.0}


def test_verdicts_follow_the_direction_and_the_noise():
    now = {"a_gbps": 10.0, "b_gbps": 8.5, "c_gbps": 9.5, "d_ms": 2.0, "e_gbps": 1.0, "new_gbps": 1.0}
    base = {"a_gbps": 8.0, "b_gbps": 10.0, "c_gbps": 10.0, "d_ms": 1.0, "e_gbps": 0.0, "old_gbps": 1.0,
            "measured": {"commit": "a2e621e"}}
    cmp = compare(now, base, renamed={"old_gbps": "older_gbps"})
    verdicts = {k: r["verdict"] for k, r in cmp["figures"].items()}
    assert verdicts == {"a_gbps": "better", "b_gbps": "worse", "c_gbps": "same", "d_ms": "worse"}  # e: baseline 0
    assert cmp["figures"]["a_gbps"]["ratio"] == 1.25
    assert cmp["only_now"] == ["new_gbps"] and cmp["only_baseline"] == ["older_gbps"]
    assert cmp["baseline_measured"] == {"commit": "a2e621e"}
    text = format_table(cmp)
    assert "a_gbps" in text and "1.25" in text and "only in the baseline: older_gbps" in text
