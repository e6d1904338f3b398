"""The replay's engines, its measures of placement (KV wait, HBM share, the floor), what it
tells the node ahead of time (announced turns, conversation ends), and open-loop traces
whose turns overlap. Hand-worked with test_replay's cost model: 4-token blocks of 4,096
bytes, recompute 1 ms a token, a DRAM block loads in 1 ms, decode 10 ms a token."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from test_replay import COST, MS, write_trace

from kvd.core.sessions import SessionEvent
from kvd.replay.schedule import conversation_ends
from kvd.replay.sim import Replay, ReplayConfig, floor, replay
from kvd.replay.trace import read_trace

BLOCK = 4096


def line(t: float, chain: list[int], out: int = 1, **extra) -> dict:
    return {"timestamp": t, "input_length": 4 * len(chain), "output_length": out, "hash_ids": chain, "block_size": 4, **extra}


def trace(tmp_path, lines: list[dict]):
    return read_trace(write_trace(tmp_path / "t.jsonl", lines))


def config(**kw) -> ReplayConfig:
    return ReplayConfig(dram_bytes=kw.pop("dram_blocks", 16) * BLOCK, cost=COST, **kw)


def test_one_engine_serves_in_arrival_order_and_a_turns_ttft_counts_its_wait(tmp_path):
    # Two misses of 2 blocks (8 ms each) 1 ms apart: the second waits 7 ms for the engine.
    t = trace(tmp_path, [line(0.0, [1, 2]), line(0.001, [3, 4])])
    one = replay(t, "lru", config(engines=1))
    assert one.queue_s == pytest.approx([0.0, 7 * MS])
    assert one.ttft_s == pytest.approx([8 * MS, 15 * MS])
    assert one.kv_transfer_s == [0.0, 0.0]
    assert one.summary()["queue_s"] == {"mean": pytest.approx(3.5 * MS), "p90": pytest.approx(6.3 * MS)}
    two = replay(t, "lru", config(engines=2))
    assert two.queue_s == [0.0, 0.0] and two.ttft_s == pytest.approx([8 * MS, 8 * MS])
    assert replay(t, "lru", config()).queue_s is None and "queue_s" not in replay(t, "lru", config()).summary()


def test_the_kv_wait_is_the_load_of_the_held_prefix_and_the_hbm_share_counts_hbm_hits(tmp_path):
    # [1,2] then [1,2,3]: the second finds 2 blocks (8 tokens) in the top tier.
    t = trace(tmp_path, [line(0.0, [1, 2]), line(10.0, [1, 2, 3])])
    dram = replay(t, "lru", config())
    assert dram.kv_transfer_s == pytest.approx([0.0, 2 * MS])  # 2 DRAM blocks at 1 ms
    assert dram.ttft_s == pytest.approx([8 * MS, 2 * MS + 4 * MS])
    assert dram.hbm_share_reused == 0.0
    hbm = replay(t, "lru", ReplayConfig(hbm_bytes=16 * BLOCK, dram_bytes=16 * BLOCK, cost=COST))
    assert hbm.hbm_share_reused == 1.0 and hbm.summary()["hbm_share_reused"] == 1.0
    assert hbm.kv_transfer_s[1] == pytest.approx(2 * BLOCK / (COST.hbm_read_gbps * 1e9))


def test_the_floor_holds_every_block_in_one_hbm_tier_and_moves_nothing(tmp_path):
    t = trace(tmp_path, [line(0.0, [1, 2]), line(10.0, [3, 4]), line(20.0, [1, 2, 5])])
    tight = config(dram_blocks=2)
    assert replay(t, "lru", tight).hit_tokens == 0  # 1 and 2 went for 3 and 4
    base = floor(t, tight)
    assert base.hit_tokens == 8 and base.hit_tokens_by_tier == {"hbm": 8}
    assert base.bytes_moved == {} and base.problems == []


def test_a_turn_that_overlaps_its_predecessor_is_replayed_and_nothing_is_refused(tmp_path):
    # Open loop: turn 0 decodes for 1 s; turn 1 (the last) arrives at 0.1 s and ends first.
    t = trace(tmp_path, [
        line(0.0, [1, 2], out=100, session_id="s", turn=0),
        line(0.1, [1, 2, 3], session_id="s", turn=1, last=True),
    ])
    r = replay(t, "typed", config())
    assert r.requests == 2 and r.refused_session_events == 0 and r.problems == []
    assert r.session_completion_s == pytest.approx([0.1 + 4 * MS + 2 * MS + 0.01])  # from 0 to turn 1's end


def test_a_turn_that_arrives_after_its_session_ended_starts_it_anew(tmp_path):
    # The node ends a session idle for an hour; its next turn comes 4,000 s later.
    t = trace(tmp_path, [
        line(0.0, [1, 2], session_id="s", turn=0),
        line(4000.0, [1, 2, 3], session_id="s", turn=1, last=True),
    ])
    r = replay(t, "typed", config())
    assert r.requests == 2 and r.refused_session_events == 0 and r.problems == []
    assert r.session_completion_s == pytest.approx([4000.0 + 4 * MS + 2 * MS + 0.01], rel=1e-6)


def test_conversation_ends_are_the_requests_nothing_later_continues():
    lines = [
        {"timestamp": 0, "input_length": 10, "output_length": 1, "hash_ids": [1, 2, 3]},  # 3 partial
        {"timestamp": 1, "input_length": 10, "output_length": 1, "hash_ids": [7, 8]},
        {"timestamp": 2, "input_length": 18, "output_length": 1, "hash_ids": [1, 2, 4, 5, 6]},  # continues r0
        {"timestamp": 3, "input_length": 4, "output_length": 1, "hash_ids": [9]},
    ]
    from kvd.replay.trace import TraceRequest, Trace  # noqa: I001 - the records as read_trace makes them
    reqs = [TraceRequest(i, l["timestamp"], l["input_length"], 1, tuple(l["hash_ids"]), 4) for i, l in enumerate(lines)]
    assert conversation_ends(Trace("mooncake", reqs, 4)) == {1, 2, 3}


def test_a_prompt_continued_only_through_a_system_prompt_everyone_carries_ends_its_conversation():
    from kvd.replay.trace import TraceRequest, Trace  # noqa: I001 - the records as read_trace makes them
    chains = [
        [0, 5, 6],  # a conversation after the system prompt 0
        [0, 7],  # a short one: 0 is not its own, so only its last block (7) continues it
        [0, 5, 6, 8, 9],  # continues r0 (through 5, which r0 brought in)
        [0, 10, 11],  # a new conversation: it carries 0, not 7
    ]
    reqs = [TraceRequest(i, float(i), 4 * len(c), 1, tuple(c), 4) for i, c in enumerate(chains)]
    assert conversation_ends(Trace("mooncake", reqs, 4)) == {1, 2, 3}


def test_ends_reported_after_a_delay_name_each_conversation_by_its_hashes(tmp_path, monkeypatch):
    t = trace(tmp_path, [
        {"timestamp": 0.0, "input_length": 10, "output_length": 1, "hash_ids": [1, 2, 3], "block_size": 4},
        {"timestamp": 5.0, "input_length": 18, "output_length": 1, "hash_ids": [1, 2, 4, 5, 6], "block_size": 4},
    ])
    sent = []
    real = Replay._session_event

    def spy(self, req, kind, hashes=(), **kw):
        sent.append((round(self.clock.now, 3), kind, list(hashes)))
        return real(self, req, kind, hashes, **kw)

    monkeypatch.setattr(Replay, "_session_event", spy)
    r = replay(t, "typed", config(session_end_after_s=30.0))
    ends = [s for s in sent if s[1] is SessionEvent.SESSION_END]
    assert ends == [(pytest.approx(35.0, abs=0.1), SessionEvent.SESSION_END, [1, 2, 4, 5, 6])]
    assert r.refused_session_events == 0
    sent.clear()
    replay(t, "typed", config())
    assert sent == []  # no session ids, no delay given: nothing is said


def test_turns_are_announced_their_lead_ahead_and_queued_ones_while_they_wait(tmp_path, monkeypatch):
    t = trace(tmp_path, [
        line(0.0, [1, 2], session_id="s", turn=0),
        {**line(0.0, [1, 2, 3], session_id="s", turn=1, last=True), "pause_s": 2.0, "tool": "bash"},
        line(0.001, [7, 8]),
    ])
    announced = []
    real = Replay._announce

    def spy(self, req, arrives_in_s):
        announced.append((req.index, round(self.clock.now, 4), round(arrives_in_s, 4)))
        return real(self, req, arrives_in_s)

    monkeypatch.setattr(Replay, "_announce", spy)
    replay(t, "typed", config(resume_lead_s=0.5))
    # Turn 0 and request 2 (open loop) half a second before their timestamps (clamped at 0);
    # turn 1 half a second before it arrives, 2 s after turn 0 ends (at 8 ms + 10 ms).
    assert announced == [(0, 0.0, 0.0), (2, 0.0, 0.001), (1, 1.518, 0.5)]
    announced.clear()
    replay(t, "typed", config(engines=1))
    assert announced == [(2, 0.001, 0.0)]  # it waits for turn 0's prefill: the node knows its hashes


@pytest.mark.parametrize(
    ("flag", "value"), [("--engines", "-1"), ("--resume-lead-s", "-0.5"), ("--session-end-after", "nan")]
)
def test_bad_schedule_flags_exit_2_naming_the_flag(tmp_path, flag, value):
    path = write_trace(tmp_path / "t.jsonl", [line(0.0, [1, 2])])
    out = subprocess.run(
        [sys.executable, "-m", "kvd.cli.kvd_main", "replay", str(path), "--dram", "8blocks", flag, value],
        capture_output=True, text=True,
    )
    assert out.returncode == 2 and flag in out.stderr and "Traceback" not in out.stderr


def test_the_report_gives_the_floor_the_kv_wait_and_the_queue(tmp_path):
    path = write_trace(tmp_path / "t.jsonl", [line(0.0, [1, 2]), line(0.001, [1, 2, 3])])
    report = tmp_path / "r.json"
    out = subprocess.run(
        [sys.executable, "-m", "kvd.cli.kvd_main", "replay", str(path), "--dram", "8blocks", "--policy", "lru",
         "--engines", "1", "--json", str(report), "--no-progress"],
        capture_output=True, text=True, check=True,
    )
    data = json.loads(report.read_text())
    assert set(data["floor"]) == {"ttft_s", "session_completion_s"} and data["engines"] == 1
    lru = data["policies"]["lru"]
    assert {"kv_transfer_s", "hbm_share_reused", "queue_s"} <= set(lru)
    assert "floor" in out.stdout and "KV wait" in out.stdout


def test_an_aiperf_trace_replays_as_a_closed_loop(tmp_path):
    rows = [
        {"session_id": "a", "input_length": 8, "output_length": 4, "hash_ids": [1, 2], "timestamp": 0.0, "group_id": 0},
        {"session_id": "a", "input_length": 4, "output_length": 1, "hash_ids": [3], "delay": 1000.0},
    ]
    path = write_trace(tmp_path / "a.jsonl", rows)
    t = read_trace(path, block_size=4)
    r = replay(t, "typed", config())
    # Turn 1 (the first prompt, its answer's block, its piece: 16 tokens) finds turn 0's
    # two blocks; it arrives 1 s after turn 0's end (8 ms prefill, 40 ms decode).
    assert r.prompt_tokens == 8 + 16 and r.hit_tokens == 8 and r.refused_session_events == 0
    assert r.session_completion_s == pytest.approx([0.008 + 0.04 + 1.0 + 2 * MS + 8 * MS + 0.01])
