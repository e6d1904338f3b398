"""kvd.replay.workload and `kvd gen-workload agentic`: determinism, the block-id chains, shared
prefixes, the pause and turn statistics, and the command line."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest

from kvd.cli.kvd_main import main
from kvd.replay.trace import TraceRequest, read_trace
from kvd.replay.workload import TOOLS, AgenticConfig, AgenticWorkload, Lognormal, generate_agentic, write_trace


def sessions_of(workload: AgenticWorkload) -> dict[str, list[TraceRequest]]:
    out: dict[str, list[TraceRequest]] = {}
    for r in workload.trace.requests:
        assert r.session_id is not None
        out.setdefault(r.session_id, []).append(r)
    return out


def full_ids(r: TraceRequest) -> tuple[int, ...]:
    """The ids of the request's full blocks (all but a partial last one)."""
    return r.hash_ids if r.input_length % r.block_size == 0 else r.hash_ids[:-1]


@pytest.fixture(scope="module")
def default() -> AgenticWorkload:
    return generate_agentic(AgenticConfig())


# -- determinism -------------------------------------------------------------------------------


def test_the_same_seed_gives_the_same_trace_and_another_seed_another():
    a = generate_agentic(AgenticConfig(sessions=12, seed=7))
    b = generate_agentic(AgenticConfig(sessions=12, seed=7))
    c = generate_agentic(AgenticConfig(sessions=12, seed=8))
    assert a.trace == b.trace and a.repo_tokens == b.repo_tokens and a.session_repo == b.session_repo
    assert a.trace.requests != c.trace.requests


# -- shape of the trace ------------------------------------------------------------------------


def test_every_line_is_a_turn_of_a_session_with_its_fields(default):
    trace = default.trace
    assert trace.format == "kvd" and trace.block_size == 256 and trace.closed_loop
    assert [r.index for r in trace.requests] == list(range(len(trace.requests)))
    times = [r.arrival_s for r in trace.requests]
    assert times == sorted(times)
    sessions = sessions_of(default)
    assert len(sessions) == 60
    tools = {t.name for t in TOOLS}
    for turns in sessions.values():
        assert [r.turn for r in turns] == list(range(len(turns)))
        assert [r.last for r in turns] == [False] * (len(turns) - 1) + [True]
        assert 5 <= len(turns) <= 40
        first, *rest = turns
        assert first.pause_s is None and first.tool is None
        for r in rest:
            assert r.tool in tools and r.pause_s is not None and 1.0 <= r.pause_s <= 100.0
        for r in turns:
            assert r.block_size == 256 and len(r.hash_ids) == math.ceil(r.input_length / 256)
            assert 50 <= r.output_length <= 10_000
            assert r.input_length + r.output_length <= 262_144


def test_each_prompt_is_the_previous_prompt_plus_its_output_plus_new_input(default):
    for turns in sessions_of(default).values():
        for prev, nxt in zip(turns, turns[1:]):
            new = nxt.input_length - prev.input_length - prev.output_length
            assert 100 <= new <= 10_000  # the tool output's clip
            # The turn arrives after the previous one's arrival, decode and the tool's pause.
            assert nxt.arrival_s >= prev.arrival_s + prev.output_length * 0.012 + nxt.pause_s - 0.002


def test_chains_extend_the_previous_turns_full_blocks_and_rehash_its_partial_block(default):
    for turns in sessions_of(default).values():
        for prev, nxt in zip(turns, turns[1:]):
            kept = full_ids(prev)
            assert nxt.hash_ids[: len(kept)] == kept
            if len(kept) < len(prev.hash_ids):  # the partial block got new content: a new id
                assert prev.hash_ids[-1] not in nxt.hash_ids


def test_a_partial_block_id_is_never_used_again(default):
    uses: dict[int, int] = {}
    for r in default.trace.requests:
        for h in r.hash_ids:
            uses[h] = uses.get(h, 0) + 1
    partials = [r.hash_ids[-1] for r in default.trace.requests if r.input_length % r.block_size]
    assert partials and all(uses[h] == 1 for h in partials)


def test_the_system_prompt_is_shared_by_all_and_a_repository_by_its_sessions(default):
    sys_blocks = 3000 // 256
    firsts = {sid: turns[0] for sid, turns in sessions_of(default).items()}
    system = next(iter(firsts.values())).hash_ids[:sys_blocks]
    repo_prefix: dict[int, tuple[int, ...]] = {}
    for sid, first in firsts.items():
        repo = default.session_repo[sid]
        shared = (3000 + default.repo_tokens[repo]) // 256
        assert first.hash_ids[:sys_blocks] == system
        prefix = first.hash_ids[:shared]
        assert repo_prefix.setdefault(repo, prefix) == prefix
    assert len(repo_prefix) >= 2
    # Different repositories part right after the system prompt.
    prefixes = list(repo_prefix.values())
    for a in prefixes:
        for b in prefixes:
            if a is not b:
                assert a[sys_blocks] != b[sys_blocks]


def test_a_sessions_private_blocks_are_its_own(default):
    owner: dict[int, str] = {}
    for sid, turns in sessions_of(default).items():
        repo = default.session_repo[sid]
        shared = (3000 + default.repo_tokens[repo]) // 256
        for r in turns:
            for h in r.hash_ids[shared:]:
                assert owner.setdefault(h, sid) == sid


def test_repository_contexts_follow_the_clipped_lognormal():
    w = generate_agentic(AgenticConfig(sessions=5, repos=400, seed=3))
    sizes = np.array(w.repo_tokens)
    assert sizes.min() >= 10_000 and sizes.max() == 150_000
    assert 0.2 < np.mean(sizes == 150_000) < 0.45  # ~32% of draws reach the clip
    assert 70_000 < np.median(sizes) < 110_000  # the preset's median, ~90K


def test_pauses_average_about_15_seconds_with_a_rare_tail_and_tools_in_order():
    w = generate_agentic(AgenticConfig(sessions=2000, repos=20, seed=11))
    pauses = np.array([r.pause_s for r in w.trace.requests if r.pause_s is not None])
    assert pauses.size > 20_000
    assert 14.0 < pauses.mean() < 16.0
    assert pauses.min() >= 1.0 and pauses.max() == 100.0
    assert 0.005 < np.mean(pauses == 100.0) < 0.05  # the long tail, clipped: rare
    medians = [np.median([r.pause_s for r in w.trace.requests if r.tool == t.name]) for t in TOOLS]
    assert medians == sorted(medians)  # read_file < edit_file < bash < run_tests
    share = np.mean([r.tool == "read_file" for r in w.trace.requests if r.tool is not None])
    assert 0.33 < share < 0.37
    turns = np.array([len(t) for t in sessions_of(w).values()])
    assert turns.min() == 5 and turns.max() == 40 and 13 < turns.mean() < 17
    outputs = np.array([r.output_length for r in w.trace.requests])
    assert 380 < outputs.mean() < 470  # the preset's 425 (clipped 50..10K: ~422)


def test_sessions_start_as_a_poisson_process():
    w = generate_agentic(AgenticConfig(sessions=3000, repos=4, session_rate=0.5, seed=2))
    starts = np.sort([turns[0].arrival_s for turns in sessions_of(w).values()])
    assert starts[0] == 0.0
    gaps = np.diff(starts)
    assert 1.9 < gaps.mean() < 2.1  # 1 / rate
    assert 0.9 < gaps.std() / gaps.mean() < 1.1  # exponential: coefficient of variation 1


def test_a_small_context_window_ends_sessions_early_and_caps_output():
    cap = 173_000  # the smallest window the defaults allow
    w = generate_agentic(AgenticConfig(sessions=200, repos=30, seed=5, max_context_tokens=cap))
    turns = sessions_of(w)
    assert all(r.input_length + r.output_length <= cap for r in w.trace.requests)
    assert all(t[-1].last for t in turns.values())
    # ~20K tokens of room above a 150K repository: ~10 turns of ~1.9K, where the window does not
    # bind sessions average ~15 (5..40).
    at_clip = [len(t) for sid, t in turns.items() if w.repo_tokens[w.session_repo[sid]] == 150_000]
    assert len(at_clip) > 20 and np.mean(at_clip) < 11 and max(at_clip) < 20
    free = generate_agentic(AgenticConfig(sessions=200, repos=30, seed=5))
    assert np.mean([len(t) for t in sessions_of(free).values()]) > 13


def test_a_block_size_of_16_gives_16_token_blocks():
    w = generate_agentic(AgenticConfig(sessions=3, block_size=16, seed=1))
    assert w.trace.block_size == 16
    for r in w.trace.requests:
        assert r.block_size == 16 and len(r.hash_ids) == math.ceil(r.input_length / 16)
    assert all(r.hash_ids[:187] == w.trace.requests[0].hash_ids[:187] for r in w.trace.requests)


@pytest.mark.parametrize(
    ("change", "words"),
    [
        ({"sessions": 0}, "sessions must be positive"),
        ({"block_size": 0}, "block_size must be positive"),
        ({"repos": 0}, "repos must be positive"),
        ({"session_rate": 0.0}, "session_rate must be positive"),
        ({"max_context_tokens": 100_000}, "max_context_tokens must be at least 173000"),
        ({"system_prompt_tokens": -1}, "system_prompt_tokens"),
        ({"turns": Lognormal(15, 10, 0, 40)}, "at least one turn"),
        ({"tools": ()}, "tools need non-negative weights"),
    ],
)
def test_a_bad_configuration_is_a_value_error(change, words):
    with pytest.raises(ValueError, match=words):
        generate_agentic(AgenticConfig(**change))


def test_lognormal_matches_its_own_mean_and_checks_its_parameters():
    x = Lognormal(1500, 1200, 0, 1e12).sample(np.random.default_rng(0), 400_000)
    assert abs(x.mean() - 1500) < 15 and abs(x.std() - 1200) < 40
    with pytest.raises(ValueError):
        Lognormal(0, 1, 0, 1)
    with pytest.raises(ValueError):
        Lognormal(1, 1, 5, 2)


def test_write_trace_writes_optional_fields_only_when_set(tmp_path):
    out = io.StringIO()
    n = write_trace([TraceRequest(0, 1.5, 20, 3, (4, 5), 16)], out)
    assert n == 1
    assert out.getvalue() == '{"timestamp":1.5,"input_length":20,"output_length":3,"hash_ids":[4,5],"block_size":16}\n'


# -- the command line --------------------------------------------------------------------------


def test_the_cli_writes_a_trace_that_reads_back_as_kvd(tmp_path, capsys):
    path = tmp_path / "agentic.jsonl"
    assert main(["gen-workload", "agentic", "--sessions", "6", "--seed", "4", "--repos", "2", "--out", str(path)]) == 0
    trace = read_trace(path)
    assert trace.format == "kvd"
    assert trace == generate_agentic(AgenticConfig(sessions=6, seed=4, repos=2)).trace
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "6 sessions" in err and str(path) in err


def test_the_cli_writes_to_stdout_without_out(tmp_path, capsys):
    assert main(["gen-workload", "agentic", "--sessions", "2", "--block-size", "64"]) == 0
    out = capsys.readouterr().out
    path = tmp_path / "stdout.jsonl"
    path.write_text(out)
    trace = read_trace(path)
    assert trace.block_size == 64 and trace == generate_agentic(AgenticConfig(sessions=2, block_size=64)).trace


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--sessions", "0"], "argument --sessions: must be > 0"),
        (["--sessions", "many"], "argument --sessions: not a number"),
        (["--block-size", "-16"], "argument --block-size: must be > 0"),
        (["--seed", "-1"], "argument --seed: must be >= 0"),
        (["--session-rate", "nan"], "argument --session-rate: must be > 0"),
        (["--bogus"], "unrecognized arguments: --bogus"),
    ],
)
def test_a_bad_option_is_one_line_and_exit_2(args, words, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["gen-workload", "agentic", *args])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and words in err


def test_a_configuration_the_generator_refuses_is_exit_2(capsys):
    assert main(["gen-workload", "agentic", "--max-context-tokens", "1000"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "max_context_tokens must be at least" in err


def test_a_missing_workload_kind_is_exit_2(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["gen-workload"])
    assert exit_.value.code == 2
    assert "required: workload" in capsys.readouterr().err


def test_an_unwritable_out_is_exit_1(tmp_path, capsys):
    assert main(["gen-workload", "agentic", "--sessions", "1", "--out", str(tmp_path / "no" / "such.jsonl")]) == 1
    assert "cannot write" in capsys.readouterr().err
