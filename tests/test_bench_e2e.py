"""`kvd bench e2e`'s own parts: the trace, the figures of a run from aiperf's exports and
metric deltas, the summary over runs, the processes it starts, and its flags. The benchmark
itself runs vLLM, aiperf and LMCache (``make e2e``); these need none of them."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest

from kvd.bench.e2e.bench import summarize
from kvd.bench.e2e.model import SPECIALS, words
from kvd.bench.e2e.procs import Proc, delta, scrape
from kvd.bench.e2e.run import figures
from kvd.bench.e2e.trace import TEMPLATE_TOKENS, TraceShape, make_trace


def test_trace_sessions_share_the_system_text_and_grow_turn_by_turn():
    shape = TraceShape(sessions=3, turns=4, first_tokens=600, last_tokens=1500, system_tokens=200, output_tokens=8,
                       pause_ms=1000, jitter_ms=500, seed=1)
    trace = make_trace(shape, vocab=512)
    vocabulary = set(words(512 - len(SPECIALS)))
    assert [s["session_id"] for s in trace] == ["agent-000", "agent-001", "agent-002"]
    assert len({s["turns"][0]["text"] for s in trace}) == 1  # one system text for all
    for s in trace:
        system, *turns = s["turns"]
        assert system["role"] == "system" and len(system["text"].split()) == 200
        assert len(turns) == 4 and "delay" not in turns[0]
        assert all(500 <= t["delay"] <= 1500 for t in turns[1:])
        assert all(set(t["text"].split()) <= vocabulary for t in s["turns"])
        # The first prompt: the system message, the first user message, the answer marker.
        first = 200 + len(turns[0]["text"].split()) + 2 * TEMPLATE_TOKENS + 1
        assert abs(first - 600) <= TEMPLATE_TOKENS
    assert make_trace(shape, vocab=512) == trace  # the same shape, the same trace
    with pytest.raises(ValueError, match="system tokens < first"):
        make_trace(TraceShape(first_tokens=100, system_tokens=200))


def write_exports(tmp_path, records):
    (tmp_path / "profile_export_aiperf.json").write_text(json.dumps({
        "time_to_first_token": {"p50": 100.0, "p90": 300.0}, "inter_token_latency": {"avg": 20.0},
        "request_latency": {"p50": 900.0, "avg": 1000.0}, "request_count": {"avg": len(records)},
        "benchmark_duration": {"avg": 60.0},
    }))
    (tmp_path / "profile_export.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def test_figures_from_aiperf_exports_and_vllm_counters(tmp_path):
    records = [
        {"metadata": {"conversation_id": "a", "request_start_ns": 0, "request_end_ns": 2_000_000_000}},
        {"metadata": {"conversation_id": "a", "request_start_ns": 5_000_000_000, "request_end_ns": 6_000_000_000}},
        {"metadata": {"conversation_id": "b", "request_start_ns": 1_000_000_000, "request_end_ns": 3_000_000_000},
         "error": {"code": 500}},
    ]
    write_exports(tmp_path, records)
    engine = {"vllm:prompt_tokens_total": 1000.0,
              "vllm:prompt_tokens_by_source_total{source=local_compute}": 300.0,
              "vllm:prompt_tokens_by_source_total{source=local_cache_hit}": 200.0,
              "vllm:prompt_tokens_by_source_total{source=external_kv_transfer}": 500.0,
              "vllm:inter_token_latency_seconds_sum": 2.0, "vllm:inter_token_latency_seconds_count": 100.0}
    f = figures(tmp_path, engine, {"kvd_blocks": 3.0, "kvd_zero": 0.0, "other": 1.0})
    assert f["ttft_ms"] == {"p50": 100.0, "p90": 300.0} and f["itl_ms"] == {"mean": 20.0}
    assert f["session_wall_s"] == {"mean": 4.0}  # a: 0..6 s, b: 1..3 s
    assert f["requests_completed"] == 2 and f["request_errors"] == 1
    assert (f["prompt_tokens_prefilled"], f["tokens_from_engine_cache"], f["tokens_from_cache"]) == (300, 200, 500)
    assert f["engine_itl_ms"] == 20.0 and f["engine_prefill_ms"] is None
    assert f["layer_metrics"] == {"kvd_blocks": 3.0}


def run_result(ttft, prefilled, wall):
    return {"ttft_ms": {"p50": ttft, "p90": 2 * ttft}, "itl_ms": {"mean": 10.0}, "session_wall_s": {"mean": wall},
            "prompt_tokens_prefilled": prefilled, "requests_completed": 48}


def test_summary_reports_medians_spreads_and_ratios_to_no_cache_layer():
    runs = {
        "none": {"roomy": [run_result(100, 1000, 50), run_result(300, 1000, 70), run_result(200, 1000, 60)]},
        "kvd_typed": {"roomy": [run_result(50, 300, 40), run_result(70, 300, 45), run_result(60, 400, 30)],
                      "tight": [run_result(90, 900, 55)]},
    }
    s = summarize(runs)
    none, typed = s["configs"]["none"]["roomy"], s["configs"]["kvd_typed"]["roomy"]
    assert none["ttft_ms"] == {"p50": 200, "p90": 400} and none["runs"] == 3
    assert typed["spread"]["ttft_ms.p50"] == [50, 70] and typed["prompt_tokens_prefilled"] == 300
    assert s["vs_none"]["kvd_typed"]["roomy"] == {
        "ttft_ms.p50": 0.3, "ttft_ms.p90": 0.3, "itl_ms.mean": 1.0, "session_wall_s.mean": 40 / 60,
        "prompt_tokens_prefilled": 0.3,
    }
    assert "tight" not in s["vs_none"]["kvd_typed"]  # no baseline at that size: no ratio


class Metrics(BaseHTTPRequestHandler):
    body = b""

    def do_GET(self):
        self.send_response(200)
        self.end_headers()
        self.wfile.write(self.body)

    def log_message(self, *args):
        pass


def test_scrape_sums_labels_but_keeps_sources(monkeypatch):
    Metrics.body = (b'# TYPE vllm:prompt_tokens_by_source counter\n'
                    b'vllm:prompt_tokens_by_source_total{engine="0",source="local_compute"} 5.0\n'
                    b'vllm:prompt_tokens_by_source_total{engine="1",source="local_compute"} 2.0\n'
                    b'vllm:prompt_tokens_by_source_total{engine="0",source="local_cache_hit"} 1.0\n')
    server = HTTPServer(("127.0.0.1", 0), Metrics)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        got = scrape(f"http://127.0.0.1:{server.server_port}/metrics")
    finally:
        server.shutdown()
    assert got["vllm:prompt_tokens_by_source_total"] == 8.0
    assert got["vllm:prompt_tokens_by_source_total{source=local_compute}"] == 7.0
    assert delta({"a": 1.0}, {"a": 4.0, "b": 2.0}) == {"a": 3.0, "b": 2.0}


def test_a_process_that_dies_while_awaited_names_its_log(tmp_path):
    p = Proc("quitter", [sys.executable, "-c", "print('bye')"], tmp_path / "q.log").start()
    with pytest.raises(RuntimeError, match=r"quitter exited with 0 while starting; see .*q.log"):
        p.wait_http("http://127.0.0.1:9/never", 30)
    assert (tmp_path / "q.log").read_text() == "bye\n"


def test_stop_ends_the_whole_process_group(tmp_path):
    # A parent that ignores SIGTERM and a child: both end.
    script = ("import signal, subprocess, sys, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
              "c = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)']); print(c.pid, flush=True); "
              "time.sleep(600)")
    p = Proc("stubborn", [sys.executable, "-c", script], tmp_path / "s.log").start()
    for _ in range(500):
        text = (tmp_path / "s.log").read_text()
        if text.strip():
            break
        threading.Event().wait(0.01)
    child = int(text.split()[0])
    p.stop(grace_s=1)
    assert not p.alive()
    import os

    with pytest.raises(ProcessLookupError):
        for _ in range(500):  # the child is reaped by init once killed
            os.kill(child, 0)
            threading.Event().wait(0.01)


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--configs", "none,vllm"], "--configs takes none, kvd_typed, kvd_lru, lmcache; got 'none,vllm'"),
        (["--sizes", "huge"], "--sizes takes roomy, tight; got 'huge'"),
        (["--repeats", "0"], "--repeats must be positive"),
        (["--tight-bytes", "0"], "--tight-bytes must be positive"),
        (["--trace", "/nowhere.jsonl"], "--trace /nowhere.jsonl: no such file"),
    ],
)
def test_bad_flags_are_one_line_and_exit_2(flags, message):
    r = subprocess.run([sys.executable, "-m", "kvd.cli.kvd_main", "bench", "e2e", *flags], capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.strip() == f"kvd bench e2e: {message}"


def test_a_missing_environment_is_one_line_and_exit_1(tmp_path):
    r = subprocess.run([sys.executable, "-m", "kvd.cli.kvd_main", "bench", "e2e", "--aiperf", str(tmp_path / "aiperf"),
                        "--out", str(tmp_path / "out")], capture_output=True, text=True)
    assert r.returncode == 1
    assert r.stderr.strip().splitlines()[-1].startswith("kvd bench e2e: ")
    assert "(make e2e-env builds it)" in r.stderr
