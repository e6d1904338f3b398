"""`kvd replay` (kvd/replay/sim.py, kvd/replay/cli.py): tiny traces worked out by hand, a
textbook prefix LRU on the Mooncake samples, the closed loop, the CLI end to end, and the
core's own check() after every run.

The hand-worked traces use 4-token blocks and 1,024 KV bytes a token, so a block is 4,096
bytes (one page), and a cost model with round numbers:

- recompute: 1,000 tokens/s -> 1 ms a token, 4 ms a block;
- load from DRAM: 4,096 bytes at 0.004096 GB/s -> 1 ms a block;
- load from NVMe: NVMe->DRAM 0.002048 GB/s (2 ms) + DRAM->HBM (1 ms) -> 3 ms a block;
- write-behind DRAM->NVMe: 1 ms a block (lands long before the next request, 10 s later);
- decode: 10 ms a token (every request here generates 1 token).

TTFT = load time of the held prefix (per block, from the tier it was found in) + recompute
time of the rest.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from collections import OrderedDict
from pathlib import Path

import pytest

from kvd.replay.sim import PAGE, CostModel, Replay, ReplayConfig, replay
from kvd.replay.trace import Trace, read_trace

BLOCK = 4096
COST = CostModel(
    bytes_per_token=1024,
    prefill_tokens_per_s=1000.0,
    decode_s_per_token=0.01,
    dram_to_hbm_gbps=0.004096,
    nvme_to_dram_gbps=0.002048,
    dram_to_nvme_gbps=0.004096,
)
COST_FLAGS = [
    "--bytes-per-token", "1024",
    "--prefill-tokens-per-s", "1000",
    "--decode-s-per-token", "0.01",
    "--dram-to-hbm-gbps", "0.004096",
    "--nvme-to-dram-gbps", "0.002048",
    "--dram-to-nvme-gbps", "0.004096",
]
MS = 1e-3
TRACES = Path(__file__).resolve().parents[1] / "traces"


def write_trace(path: Path, lines: list[dict]) -> Path:
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def open_loop(path: Path, chains: list[list[int]], gap_s: float = 10.0) -> Trace:
    """One request every ``gap_s`` seconds, each prompt whole 4-token blocks, 1 output token."""
    lines = [
        {"timestamp": i * gap_s, "input_length": 4 * len(c), "output_length": 1, "hash_ids": c, "block_size": 4}
        for i, c in enumerate(chains)
    ]
    return read_trace(write_trace(path, lines))


def config(dram_blocks: int, nvme_blocks: int = 0) -> ReplayConfig:
    return ReplayConfig(dram_bytes=dram_blocks * BLOCK, nvme_bytes=nvme_blocks * BLOCK, cost=COST)


# -- (a) tiny traces worked out by hand ---------------------------------------------------------

# One tier, DRAM of 4 blocks; a request every 10 s.
ONE_TIER = [[1, 2], [3, 4], [1, 2], [5, 6], [3, 4], [1, 2], [3, 4]]
#
# lru (order least -> most recent; a chain is stored and touched leaf first, so its root is
# its most recent block):
#   r0 [1,2] miss 8             DRAM 2 1
#   r1 [3,4] miss 8             DRAM 2 1 4 3
#   r2 [1,2] hit 8 (touch)      DRAM 4 3 2 1
#   r3 [5,6] miss 8: evict 4 3  DRAM 2 1 6 5
#   r4 [3,4] miss 8: evict 2 1  DRAM 6 5 4 3
#   r5 [1,2] miss 8: evict 6 5  DRAM 4 3 2 1
#   r6 [3,4] hit 8              DRAM 2 1 4 3
#   hits 16 of 56 tokens; compulsory misses: r0, r1, r3 = 24 tokens.
#   TTFT: a hit of 2 DRAM blocks is 2 ms, a miss of 8 tokens 8 ms.
# belady (next uses: 1,2 at r0 r2 r5; 3,4 at r1 r4 r6; 5,6 at r3 only):
#   r3 at position 3: 1,2 next at 5, 3,4 at 4: evict 2 then 1 (the farthest; the deeper first)
#   r4 hit 8; r5 [1,2] miss 8: 5,6 are never used again: evict 6 then 5; r6 hit 8.
#   hits 24 of 56.
ONE_TIER_EXPECT = {
    "lru": (16, [8, 8, 2, 8, 8, 8, 2]),
    "belady": (24, [8, 8, 2, 8, 2, 8, 2]),
}


@pytest.mark.parametrize("policy", ["lru", "belady"])
def test_one_tier_hand_trace(tmp_path, policy):
    trace = open_loop(tmp_path / "t.jsonl", ONE_TIER)
    r = replay(trace, policy, config(dram_blocks=4))
    hits, ttft_ms = ONE_TIER_EXPECT[policy]
    assert r.requests == 7 and r.prompt_tokens == 56
    assert r.hit_tokens == hits and r.hit_tokens_by_tier == {"dram": hits}
    assert r.recomputed_tokens == 56 - hits
    assert r.compulsory_tokens == 24
    assert r.hit_rate == hits / 56
    assert r.ttft_s == pytest.approx([t * MS for t in ttft_ms], rel=1e-9)
    # A request without a session is its own program: TTFT + 1 token of decode.
    assert r.session_completion_s == pytest.approx([t * MS + 0.01 for t in ttft_ms], rel=1e-6)
    assert r.bytes_moved == {}  # one tier: nothing moves
    assert r.unstored_requests == 0 and r.problems == []


# Two tiers: DRAM of 2 blocks, NVMe of 4; write-behind copies every stored block down.
TWO_TIER = [[1, 2], [3, 4], [1, 2], [5], [3, 4], [1, 2], [1, 2, 6]]
#
# lru. The replay loads a held prefix in batches of half the top tier (here 1 block), so
# block 1 is loaded (and touched) before block 2; NVMe order follows write-behind landings.
#   r0 [1,2] miss 8. DRAM 1 2 -> write-behind: NVMe 1 2                         (d->n 2 blocks)
#   r1 [3,4] miss 8. DRAM full: evict 2 1 (NVMe copies: dropped); DRAM 4 3;
#        write-behind: NVMe 1 2 3 4 (full)                                         (d->n 4)
#   r2 [1,2] hit 8 from NVMe: TTFT 2 x 3 ms = 6. Promote 1 (evict DRAM 4), then 2
#        (evict 3): DRAM 1 2; NVMe touched: 3 4 1 2                                (n->d 2)
#   r3 [5] miss 4. Evict DRAM 1: DRAM 2 5; write-behind 5: NVMe's LRU block is 3, but it is
#        the last copy of a block whose child (4) is held: dropping it would leave 4
#        unreachable, so 4 goes. NVMe 3 1 2 5                                       (d->n 5)
#   r4 [3,4] hit block 3 on NVMe (3 ms) + 4 recomputed (4 ms) = 7 ms. Promote 3 (evict DRAM 2):
#        DRAM 5 3 (n->d 3); store 4 (evict 5): DRAM 3 4; write-behind 4: NVMe 1 2 5 3 -> 1
#        is 2's parent, 2 goes: NVMe 1 5 3 4                                        (d->n 6)
#   r5 [1,2] hit block 1 on NVMe (3 ms) + 4 recomputed = 7 ms. Promote 1 (evict DRAM 3): DRAM
#        4 1 (n->d 4); store 2 (evict 4): DRAM 1 2; write-behind 2 evicts NVMe 5:
#        NVMe 3 4 1 2                                                               (d->n 7)
#   r6 [1,2,6] hit 8 from DRAM (2 ms) + 4 recomputed (4 ms) = 6 ms. Store 6: evict DRAM 1;
#        write-behind 6: 3 is 4's parent, 4 goes: NVMe 3 1 2 6                       (d->n 8)
#   hits: DRAM 8, NVMe 8 + 4 + 4 = 16 = 24 of 56; compulsory: r0 8, r1 8, r3 4, r6 4 = 24;
#   bytes: DRAM->NVMe 8 blocks = 32,768; NVMe->DRAM 4 blocks = 16,384.
# belady (next uses: 1,2 at r0 r2 r5 r6; 3,4 at r1 r4; 5 at r3; 6 at r6; a victim is the
# farthest next use, the deeper block first among equals; write-behind skips blocks never
# used again):
#   r0 miss 8; DRAM 1 2; NVMe 1 2                                                  (d->n 2)
#   r1 miss 8; evict 2, 1 (both next at r2; 2 deeper); DRAM 3 4; NVMe 1 2 3 4      (d->n 4)
#   r2 hit 8 NVMe (6 ms). Promote 1: evict 4 (3, 4 both next at r4; 4 deeper); promote 2:
#        now 1 (next r5) is farther than 3 (next r4): evict 1. DRAM 3 2             (n->d 2)
#   r3 [5] miss 4: evict 2 (next r5) over 3 (r4): DRAM 3 5; 5 is never used again: no
#        write-behind.
#   r4 [3,4] hit 3 from DRAM + 4 from NVMe: 1 + 3 = 4 ms. Promote 4: 3 and 5 are never
#        used again, equal depth: the lower key, 3, goes (its NVMe copy stays). DRAM 5 4  (n->d 3)
#   r5 [1,2] hit 8 NVMe (6 ms). Promote 1: 4 (never again, deeper) goes; promote 2: 5 (never)
#        goes before 1 (r6), dropped (no NVMe copy, not worth one). DRAM 1 2          (n->d 5)
#   r6 [1,2,6] hit 8 DRAM + 4 recomputed: 6 ms. 6 never used again: no write-behind.
#   hits: DRAM 4 + 8 = 12, NVMe 8 + 4 + 8 = 20 = 32 of 56; bytes: DRAM->NVMe 4 blocks,
#   NVMe->DRAM 5 blocks.
TWO_TIER_EXPECT = {
    "lru": ({"dram": 8, "nvme": 16}, [8, 8, 6, 4, 7, 7, 6], {"dram->nvme": 8 * BLOCK, "nvme->dram": 4 * BLOCK}),
    "belady": ({"dram": 12, "nvme": 20}, [8, 8, 6, 4, 4, 6, 6], {"dram->nvme": 4 * BLOCK, "nvme->dram": 5 * BLOCK}),
}


@pytest.mark.parametrize("policy", ["lru", "belady"])
def test_two_tier_hand_trace(tmp_path, policy):
    trace = open_loop(tmp_path / "t.jsonl", TWO_TIER)
    r = replay(trace, policy, config(dram_blocks=2, nvme_blocks=4))
    by_tier, ttft_ms, moved = TWO_TIER_EXPECT[policy]
    assert r.prompt_tokens == 56
    assert r.hit_tokens_by_tier == by_tier
    assert r.hit_tokens == sum(by_tier.values())
    assert r.recomputed_tokens == 56 - r.hit_tokens
    assert r.compulsory_tokens == 24
    assert r.ttft_s == pytest.approx([t * MS for t in ttft_ms], rel=1e-9)
    assert r.bytes_moved == moved
    assert r.problems == []


@pytest.mark.parametrize("policy", ["lru", "typed", "belady"])
def test_without_pressure_every_policy_misses_only_the_compulsory_tokens(tmp_path, policy):
    # DRAM holds all 6 distinct blocks of ONE_TIER: after the first sight of a block it is
    # always held, so the hits are r2, r4, r5, r6 (8 tokens each) and TTFT 2 ms on them.
    trace = open_loop(tmp_path / "t.jsonl", ONE_TIER)
    r = replay(trace, policy, config(dram_blocks=6))
    assert r.hit_tokens == 32 and r.compulsory_tokens == 24 == r.recomputed_tokens
    assert r.ttft_s == pytest.approx([t * MS for t in (8, 8, 2, 8, 2, 2, 2)], rel=1e-9)
    assert r.bytes_moved == {} and r.problems == []


def test_lru_keeps_a_loaded_prefix_a_prefix(tmp_path):
    # DRAM 3 blocks (load batches of 1 block). Textbook prefix LRU:
    #   r0 [1,2] DRAM 2 1; r1 [3] DRAM 2 1 3; r2 [1,2] hit 8, touch root last: DRAM 3 2 1;
    #   r3 [4] evict 3: DRAM 2 1 4; r4 [5] evict 2: DRAM 1 4 5; r5 [1,2] hit 4 (block 1).
    # kvd touches 1 then 2 in r2 (DRAM 3 1 2), so r4 evicts the root 1 and keeps 2: r5 hits 0.
    trace = open_loop(tmp_path / "t.jsonl", [[1, 2], [3], [1, 2], [4], [5], [1, 2]])
    r = replay(trace, "lru", config(dram_blocks=3))
    assert r.hit_tokens == 8 + 4  # got 8


def test_lru_keeps_an_extended_prefix_a_prefix(tmp_path):
    # DRAM 4 blocks (load batches of 2: one batch, so only the store order matters).
    # Textbook: r0 [1,2] DRAM 2 1; r1 [1,2,3] hit 8, the chain's root most recent: DRAM 3 2 1;
    #   r2 [4,5,6] evicts 3, 2: DRAM 1 6 5 4; r3 [1,2] hits 4 (block 1).
    # kvd: r1 leaves DRAM 2 1 3 (3 stored after the touch); r2 evicts 2 and 1 and keeps the
    #   orphan 3: r3 hits 0.
    trace = open_loop(tmp_path / "t.jsonl", [[1, 2], [1, 2, 3], [4, 5, 6], [1, 2]])
    r = replay(trace, "lru", config(dram_blocks=4))
    assert r.hit_tokens == 8 + 4  # got 8


# -- (b) lru is a textbook prefix LRU -----------------------------------------------------------


def textbook_prefix_lru(trace: Trace, capacity_blocks: int) -> tuple[int, int]:
    """(hit tokens, prompt tokens) of a prefix LRU of ``capacity_blocks`` blocks."""
    held: OrderedDict[int, None] = OrderedDict()  # least recent first
    hits = total = 0
    for r in trace.requests:
        chain = r.hash_ids
        n = 0
        while n < len(chain) and chain[n] in held:
            n += 1
        hits += sum(min(r.block_size, r.input_length - i * r.block_size) for i in range(n))
        total += r.input_length
        for h in reversed(chain):  # touch the held prefix, insert the rest: the root most recent
            held[h] = None
            held.move_to_end(h)
        while len(held) > capacity_blocks:
            held.popitem(last=False)
    return hits, total


# The conversation trace is cut to its first 3,000 requests (of 12,031): a full run takes
# ~6 s a capacity. The synthetic one (3,993 requests, ~2 s) is replayed whole.
TEXTBOOK_CASES = [
    pytest.param("mooncake_conversation", 3000, 400, id="conversation-3000req-400blocks"),
    pytest.param("mooncake_conversation", 3000, 2000, id="conversation-3000req-2000blocks"),
    pytest.param("mooncake_synthetic", None, 400, id="synthetic-400blocks"),
    pytest.param("mooncake_synthetic", None, 2000, id="synthetic-2000blocks"),
]


@pytest.mark.parametrize(("name", "limit", "capacity"), TEXTBOOK_CASES)
def test_lru_equals_a_textbook_prefix_lru(name, limit, capacity):
    full = read_trace(TRACES / f"{name}.jsonl")
    trace = Trace(full.format, full.requests[:limit], full.block_size)
    assert trace.block_size == 512
    expected_hits, expected_total = textbook_prefix_lru(trace, capacity)
    cfg = ReplayConfig(dram_bytes=capacity * 512 * CostModel().bytes_per_token)
    r = replay(trace, "lru", cfg)
    assert r.problems == [] and r.unstored_requests == 0
    assert (r.hit_tokens, r.prompt_tokens) == (expected_hits, expected_total)
    assert r.hit_rate == expected_hits / expected_total
    assert 0 < r.hit_rate < 1


# -- (c) the closed loop ------------------------------------------------------------------------

CLOSED = [
    # Session s: turns 1 and 2 arrive their pause after the previous turn finished; their
    # timestamps (999) are ignored.
    {"timestamp": 0.0, "input_length": 8, "output_length": 10, "hash_ids": [1, 2],
     "block_size": 4, "session_id": "s", "turn": 0},
    {"timestamp": 999.0, "input_length": 12, "output_length": 10, "hash_ids": [1, 2, 3],
     "block_size": 4, "session_id": "s", "turn": 1, "tool": "bash", "pause_s": 5.0},
    {"timestamp": 999.0, "input_length": 16, "output_length": 10, "hash_ids": [1, 2, 3, 4],
     "block_size": 4, "session_id": "s", "turn": 2, "tool": "run_tests", "pause_s": 2.5, "last": True},
    # Session t: one open-loop turn at 1 s.
    {"timestamp": 1.0, "input_length": 4, "output_length": 0, "hash_ids": [9], "block_size": 4,
     "session_id": "t"},
]
# s, turn 0: arrives 0, misses 8 tokens: TTFT 8 ms; finishes 0.008 + 10 x 0.01 = 0.108.
#    turn 1: arrives 0.108 + 5 = 5.108; hits 2 blocks (2 ms) + 4 tokens (4 ms): TTFT 6 ms;
#            finishes 5.108 + 0.006 + 0.1 = 5.214.
#    turn 2: arrives 5.214 + 2.5 = 7.714; hits 3 blocks (3 ms) + 4 tokens: TTFT 7 ms;
#            finishes 7.714 + 0.007 + 0.1 = 7.821: the session took 7.821 s.
# t: arrives 1, TTFT 4 ms, no output: done at 1.004, after 0.004 s (before s finishes).


@pytest.mark.parametrize("policy", ["lru", "typed", "belady"])
def test_closed_loop_turns_arrive_their_pause_after_the_previous_finish(tmp_path, policy):
    trace = read_trace(write_trace(tmp_path / "c.jsonl", CLOSED))
    assert trace.format == "kvd" and trace.closed_loop
    r = replay(trace, policy, config(dram_blocks=16))
    assert r.ttft_s == pytest.approx([8 * MS, 4 * MS, 6 * MS, 7 * MS], rel=1e-9)  # in arrival order
    assert r.session_completion_s == pytest.approx([0.004, 7.821], rel=1e-9)
    assert r.hit_tokens == 8 + 12 and r.compulsory_tokens == 8 + 4 + 4 + 4
    assert r.problems == []


@pytest.mark.parametrize(("hints", "told"), [("none", 0), ("exact", 1)])
def test_exact_pause_hints_tell_the_policy_each_pause(tmp_path, hints, told):
    trace = read_trace(write_trace(tmp_path / "c.jsonl", CLOSED))
    sim = Replay(trace, "typed", dataclasses.replace(config(dram_blocks=16), pause_hints=hints))
    r = sim.run()
    pauses = sim.core.policy.pauses
    assert (pauses.samples("bash"), pauses.samples("run_tests")) == (1, 1)
    assert (pauses.hinted_samples("bash"), pauses.hinted_samples("run_tests")) == (told, told)
    if told:  # each hint was the pause itself: no bias learned
        assert pauses.distribution("bash", expected_s=5.0).median == pytest.approx(5.0)
    assert r.ttft_s == pytest.approx([8 * MS, 4 * MS, 6 * MS, 7 * MS], rel=1e-9)  # hints move no block here


def test_exact_pause_hints_skip_a_pause_no_hint_can_carry(tmp_path):
    lines = [dict(line) for line in CLOSED]
    lines[1]["pause_s"] = 100_000.0  # more than a day: a tool_pause refuses such a hint
    trace = read_trace(write_trace(tmp_path / "c.jsonl", lines))
    sim = Replay(trace, "typed", dataclasses.replace(config(dram_blocks=16), pause_hints="exact"))
    assert sim.run().problems == []
    assert (sim.core.policy.pauses.hinted_samples("bash"), sim.core.policy.pauses.hinted_samples("run_tests")) == (0, 1)
    with pytest.raises(ValueError, match="pause hints must be one of none, exact"):
        ReplayConfig(pause_hints="some")


def kvd_turn(t: float, sid: str, chain: list[int], turn: int = 0, **extra) -> dict:
    return {"timestamp": t, "input_length": 4 * len(chain), "output_length": 1, "hash_ids": chain,
            "block_size": 4, "session_id": sid, "turn": turn, **extra}


def test_a_prompt_bigger_than_the_top_tier_is_stored_whole_in_parts(tmp_path):
    # DRAM of 2 blocks over NVMe of 4, no write-behind, lru, one named session. r0's prompt
    # [1, 2, 3] is stored as a client stores it, in parts that fit DRAM: [1, 2], then [3],
    # whose room comes from demoting 2 (the deeper of the two) to NVMe: DRAM 1 3, NVMe 2.
    # (In one part it would not fit: only its head, [1], would be kept.) r1 [1, 2, 3, 4] finds all
    # three: DRAM 8 tokens, NVMe 4. Its load, a block at a time: 1 touched; 2 promoted (3,
    # the least recently used, demoted); 3 promoted, 2 leaving DRAM for free (its NVMe copy
    # stays; the load touched 1 after 2): DRAM 1 3, NVMe 2 3. Its store: 4 takes 3's DRAM
    # slot (3, older than 1, is on NVMe: a free drop).
    lines = [kvd_turn(0.0, "s", [1, 2, 3]), kvd_turn(10.0, "s", [1, 2, 3, 4], turn=1)]
    trace = read_trace(write_trace(tmp_path / "t.jsonl", lines))
    cfg = dataclasses.replace(config(dram_blocks=2, nvme_blocks=4), write_behind=False)
    sim = Replay(trace, "lru", cfg)
    r = sim.run()
    assert r.hit_tokens_by_tier == {"dram": 8, "nvme": 4}
    assert r.bytes_moved == {"dram->nvme": 2 * BLOCK, "nvme->dram": 2 * BLOCK}
    assert sim.core.lookup("replay", [1, 2, 3, 4]) == ["dram", "nvme", "nvme", "dram"]
    assert r.unstored_requests == 0 and r.problems == []


def test_a_prompt_bigger_than_every_tier_together_counts_as_not_stored_whole(tmp_path):
    # DRAM 2 blocks over NVMe 1: a 5-block prompt goes in parts of 2, and making room for
    # the later parts drops the earlier ones. Every part is granted, but the chain is not
    # held whole afterwards, and the replay says so.
    lines = [kvd_turn(0.0, "s", [1, 2, 3, 4, 5])]
    trace = read_trace(write_trace(tmp_path / "t.jsonl", lines))
    cfg = dataclasses.replace(config(dram_blocks=2, nvme_blocks=1), write_behind=False)
    sim = Replay(trace, "lru", cfg)
    r = sim.run()
    assert len(sim.core.lookup("replay", [1, 2, 3, 4, 5])) < 5
    assert r.unstored_requests == 1 and r.problems == []


def test_a_prompt_without_a_session_id_is_stored_in_one_part(tmp_path):
    # The same prompts without session ids: the core infers sessions from the chain a store
    # names, so the replay stores one part, and a prompt bigger than DRAM keeps its head.
    trace = open_loop(tmp_path / "t.jsonl", [[1, 2, 3], [1, 2, 3, 4]])
    cfg = dataclasses.replace(config(dram_blocks=2, nvme_blocks=4), write_behind=False)
    r = replay(trace, "lru", cfg)
    assert r.hit_tokens_by_tier == {"dram": 4, "nvme": 0}
    assert r.unstored_requests == 2


def test_parts_are_counted_in_slots_not_bytes(tmp_path):
    # 4-token blocks of 4,000 bytes take a 4,096-byte slot each: DRAM of 42 slots holds 42
    # blocks, not 43 (its bytes / the block's). Parts of 43 would never fit.
    lines = [kvd_turn(0.0, "s", list(range(1, 100)))]
    trace = read_trace(write_trace(tmp_path / "t.jsonl", lines))
    cost = dataclasses.replace(COST, bytes_per_token=1000)
    cfg = ReplayConfig(dram_bytes=42 * PAGE, nvme_bytes=200 * PAGE, cost=cost, write_behind=False)
    sim = Replay(trace, "lru", cfg)
    r = sim.run()
    assert r.unstored_requests == 0 and r.problems == []
    assert len(sim.core.lookup("replay", list(range(1, 100)))) == 99


# Session a works on a repository (blocks 1, 2; 3 is its task) and ends after two turns;
# one-turn sessions f, g, h then fill DRAM (4 blocks) three times over; b, the next session on
# the repository, starts from blocks 1, 2. Without write-behind, blocks reach NVMe only when
# pressure demotes them. Typed: at a's end 1-3 (its first turn's prompt) are a shared prefix,
# 4 (the turn it added) is ephemeral. f's store drops 4 and demotes 3; g's drops f's blocks
# (a one-turn session leaves nothing shared) and demotes 2; h's drops g's and demotes 1.
# b finds 1, 2 on NVMe: 8 tokens. Only 1, 2, 3 were ever written down.
REPOSITORY = [
    kvd_turn(0.0, "a", [1, 2, 3]),
    kvd_turn(0.0, "a", [1, 2, 3, 4], turn=1, tool="bash", pause_s=1.0, last=True),
    kvd_turn(10.0, "f", [10, 11]),
    kvd_turn(20.0, "g", [12, 13, 14]),
    kvd_turn(30.0, "h", [15, 16, 17, 18]),
    kvd_turn(40.0, "b", [1, 2, 20]),
]


def test_typed_writes_down_the_context_a_finished_session_started_from_not_its_tail(tmp_path):
    trace = read_trace(write_trace(tmp_path / "r.jsonl", REPOSITORY))
    cfg = dataclasses.replace(config(dram_blocks=4, nvme_blocks=8), write_behind=False)
    sim = Replay(trace, "typed", cfg)
    r = sim.run()
    assert r.hit_tokens_by_tier == {"dram": 12, "nvme": 8}  # a's turn 1 hits 1-3; b hits 1, 2
    assert r.bytes_moved["dram->nvme"] == 3 * BLOCK
    assert sim.core.lookup("replay", [1, 2, 3, 4]) == ["dram", "dram", "nvme"]  # 4 was dropped
    assert r.problems == []


def test_closed_loop_a_slow_cache_delays_the_whole_program(tmp_path):
    # With DRAM of 1 block nothing of s's prefix survives to its next turn ([1, 2] does not
    # fit whole: the replay keeps its head, block 1, then turn 1 stores [1, 2, 3] -> keeps 1).
    # turn 0: TTFT 8 ms, ends 0.108; turn 1 arrives 5.108, hits block 1 (1 ms) + 8 tokens:
    # 9 ms, ends 5.217; turn 2 arrives 7.717, hits block 1 + 12 tokens: 13 ms, ends 7.83.
    lines = [dict(line) for line in CLOSED[:3]]
    trace = read_trace(write_trace(tmp_path / "c.jsonl", lines))
    r = replay(trace, "lru", config(dram_blocks=1))
    assert r.ttft_s == pytest.approx([8 * MS, 9 * MS, 13 * MS], rel=1e-9)
    assert r.unstored_requests == 3  # no prompt was stored whole
    assert r.session_completion_s == pytest.approx([7.83], rel=1e-9)


# Belady in the closed loop: the trace's timestamps say a's next turn comes before b's, the
# replay runs b's first. DRAM of 4 blocks; every turn 1 output token (10 ms).
# a0 arrives 0, misses 8 tokens (8 ms), ends 0.018: a1 is settled at 0.018 + 30 = 30.018.
# b0 arrives 1, misses 8 tokens, ends 1.018: b1 is settled at 1.018 + 3 = 4.018.
# c arrives 2 and needs 2 blocks of DRAM (1 2 5 6): 1 and 2 are next used at 30.018, 5 and 6
#   at 4.018: evict 2, then 1. (By timestamps -- a1 at 5, b1 at 20 -- it would evict 6, 5.)
# b1 arrives 4.018: hits 5 6 (2 ms) + 4 tokens: 6 ms; its store evicts 10 (never used again).
# a1 arrives 30.018: misses 12 tokens. Hits: 8 tokens. (An oracle reading the future by
#   places in the file would score 0: b1 would miss, and once b1 -- placed after a1 -- is
#   served, a1 counts as past, so b1's store would evict 1 and 2 as never used again.)
REORDERED = [
    kvd_turn(0.0, "a", [1, 2]),
    kvd_turn(1.0, "b", [5, 6]),
    kvd_turn(2.0, "c", [9, 10]),
    kvd_turn(5.0, "a", [1, 2, 3], turn=1, tool="bash", pause_s=30.0, last=True),
    kvd_turn(20.0, "b", [5, 6, 7], turn=1, tool="bash", pause_s=3.0, last=True),
]


def test_belady_reads_the_closed_loop_future_in_the_order_the_replay_serves_it(tmp_path):
    trace = read_trace(write_trace(tmp_path / "o.jsonl", REORDERED))
    r = replay(trace, "belady", config(dram_blocks=4))
    assert r.hit_tokens == 8
    assert r.ttft_s == pytest.approx([8 * MS, 8 * MS, 8 * MS, 6 * MS, 12 * MS], rel=1e-9)  # a0 b0 c b1 a1
    assert r.problems == []


# -- (d) the CLI end to end ---------------------------------------------------------------------


def kvd(*args: str, **kwargs) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "kvd.cli.kvd_main", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kwargs,
    )


@pytest.mark.parametrize("flag", ["--json", "--plot"])
def test_an_output_that_cannot_be_written_is_refused_before_the_replay(tmp_path, flag):
    trace = tmp_path / "t.jsonl"
    open_loop(trace, ONE_TIER)
    for out, says in ((tmp_path / "no-such-dir" / "r.out", "no directory"), (tmp_path, "a directory, not a file")):
        proc = kvd("replay", str(trace), "--dram", "4blocks", *COST_FLAGS, flag, str(out), "--no-progress")
        stdout, stderr = proc.communicate(timeout=120)
        assert proc.returncode == 2 and stdout == "", stderr  # no report table: nothing ran
        assert stderr.startswith(f"kvd replay: {flag} {out}: ") and says in stderr, stderr


def test_cli_json_and_plot(tmp_path):
    trace = tmp_path / "t.jsonl"
    open_loop(trace, ONE_TIER)
    out, png = tmp_path / "report.json", tmp_path / "report.png"
    proc = kvd("replay", str(trace), "--policy", "lru,typed,belady", "--dram", "4blocks", *COST_FLAGS,
               "--json", str(out), "--plot", str(png), "--no-progress")
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr
    report = json.loads(out.read_text())
    assert report["requests"] == 7 and report["block_size"] == 4 and report["format"] == "kvd"
    assert report["pause_hints"] == "none"
    assert report["tiers"] == {"dram": {"bytes": 4 * BLOCK, "blocks": 4}}
    assert set(report["policies"]) == {"lru", "typed", "belady"}
    for name, p in report["policies"].items():
        assert set(p) >= {"hit_rate", "hit_rate_by_tier", "recomputed_tokens", "compulsory_tokens",
                          "ttft_s", "session_completion_s", "bytes_moved"}
        assert set(p["ttft_s"]) == {"p50", "p90", "p99"}
        assert set(p["session_completion_s"]) == {"mean", "p90"}
        assert p["check_problems"] == [], name
        assert p["compulsory_tokens"] == 24
    for name in ("lru", "belady"):
        hits, ttft_ms = ONE_TIER_EXPECT[name]
        p = report["policies"][name]
        assert p["hit_rate"] == pytest.approx(hits / 56)
        assert p["hit_rate_by_tier"] == {"dram": pytest.approx(hits / 56)}
        assert p["recomputed_tokens"] == 56 - hits
        assert p["bytes_moved"] == {}
        # numpy's linear percentiles of the 7 TTFTs (sorted: lru 2 2 8 8 8 8 8; belady 2 2 2 2 8 8 8).
        ranked = sorted(ttft_ms)
        for q in (50, 90, 99):
            pos = q / 100 * 6
            lo = int(pos)
            want = ranked[lo] + (pos - lo) * (ranked[min(lo + 1, 6)] - ranked[lo])
            assert p["ttft_s"][f"p{q}"] == pytest.approx(want * MS, rel=1e-9)
        done = [t * MS + 0.01 for t in ttft_ms]
        assert p["session_completion_s"]["mean"] == pytest.approx(sum(done) / 7, rel=1e-6)
    # lru 16/56, belady 24/56: typed closes (typed - lru) / 8 tokens' worth of the gap.
    assert report["gap_closed"]["typed"] == pytest.approx(
        (report["policies"]["typed"]["hit_rate"] - 16 / 56) / (8 / 56)
    )
    assert "lru" in stdout and "belady" in stdout
    # The text report gives tokens (recomputed, compulsory) and explains every column it prints.
    lines = stdout.splitlines()
    head = next(i for i, line in enumerate(lines) if "prompt tokens" in line and "recomputed" in line)
    row = lines[head + 1].split()
    assert row[1:4] == ["56", str(56 - ONE_TIER_EXPECT["lru"][0]), "24"], row
    legend = lines[lines.index("legend:") + 1 :]
    for term in ("hit rate", "KV wait s mean/p90", "TTFT p50/p90/p99 s", "session s mean/p90", "wall s",
                 "recomputed", "compulsory", "floor", "belady"):
        assert any(line.split("  ")[1] == term for line in legend), term
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 1000


def test_cli_two_tiers_json(tmp_path):
    trace = tmp_path / "t.jsonl"
    open_loop(trace, TWO_TIER)
    out = tmp_path / "r.json"
    proc = kvd("replay", str(trace), "--policy", "lru", "--dram", "8KiB", "--nvme", "4blocks", *COST_FLAGS,
               "--json", str(out))
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr
    p = json.loads(out.read_text())["policies"]["lru"]
    assert p["hit_rate_by_tier"] == {"dram": pytest.approx(8 / 56), "nvme": pytest.approx(16 / 56)}
    assert p["bytes_moved"] == {"dram->nvme": 8 * BLOCK, "nvme->dram": 4 * BLOCK}


def test_cli_error_paths_exit_2_with_one_line(tmp_path):
    good = tmp_path / "t.jsonl"
    open_loop(good, ONE_TIER)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(good.read_text().splitlines()[0] + "\n{not json\n")
    cases = {
        "unknown policy": ([str(good), "--policy", "lru,nope"], "unknown policy nope"),
        "bad size": ([str(good), "--dram", "lots"], "invalid size 'lots'"),
        "bad block count": ([str(good), "--dram", "x3blocks"], "whole number of blocks"),
        "tier smaller than a block": ([str(good), "--dram", "4blocks", "--nvme", "100"], "cannot hold one block"),
        "missing file": ([str(tmp_path / "nope.jsonl")], "nope.jsonl"),
        "malformed line": ([str(bad)], "bad.jsonl:2: not valid JSON"),
        "all tiers 0": ([str(good), "--dram", "0"], "every tier has 0 bytes"),
        "unknown pause hints": ([str(good), "--pause-hints", "some"], "--pause-hints: invalid choice: 'some'"),
    }
    procs = {name: kvd("replay", *args, *COST_FLAGS, "--no-progress") for name, (args, _) in cases.items()}
    for name, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=120)
        assert proc.returncode == 2, (name, stderr)
        assert stdout == "", name
        lines = stderr.splitlines()
        assert len(lines) == 1 and lines[0].startswith("kvd replay: "), (name, stderr)
        assert cases[name][1] in lines[0], (name, stderr)


# -- (e) the core passes check() ----------------------------------------------------------------


@pytest.mark.parametrize("policy", ["lru", "typed", "belady"])
def test_replay_core_passes_check_after_every_request(policy):
    full = read_trace(TRACES / "mooncake_conversation.jsonl")
    trace = Trace(full.format, full.requests[:150], full.block_size)
    block = 512 * CostModel().bytes_per_token
    cfg = ReplayConfig(dram_bytes=24 * block, nvme_bytes=64 * block)
    r = replay(trace, policy, cfg, check_every=1)  # raises AssertionError on the first problem
    assert r.problems == [] and r.requests == 150
    assert r.bytes_moved.get("dram->nvme", 0) > 0  # the tiers were under pressure
    assert r.hit_tokens_by_tier["nvme"] > 0


@pytest.mark.parametrize("policy", ["lru", "typed", "belady"])
def test_replay_core_passes_check_on_an_agentic_closed_loop_trace(policy):
    from kvd.replay.workload import AgenticConfig, generate_agentic

    workload = generate_agentic(AgenticConfig(sessions=3, seed=5, block_size=1024))
    trace = workload.trace
    assert trace.closed_loop
    block = trace.block_size * 1024
    cost = CostModel(bytes_per_token=1024)
    cfg = ReplayConfig(dram_bytes=200 * block, nvme_bytes=600 * block, cost=cost)
    r = replay(trace, policy, cfg, check_every=1)
    assert r.problems == [] and r.requests == len(trace.requests)
    assert len(r.session_completion_s) == 3
