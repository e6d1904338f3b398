"""kvd.replay.trace: the three formats on small hand-written files, auto detection, every
error path, and Mooncake's published conversation and synthetic traces (traces/)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from kvd.replay.trace import Trace, TraceError, TraceRequest, read_trace

TRACES = Path(__file__).resolve().parents[1] / "traces"


def write(tmp_path: Path, *lines: dict | str, name: str = "t.jsonl") -> Path:
    """A JSONL file: dicts are dumped, strings written as they are."""
    path = tmp_path / name
    path.write_text("".join((json.dumps(x) if isinstance(x, dict) else x) + "\n" for x in lines))
    return path


def _raw(line: dict | str | bytes) -> bytes:
    if isinstance(line, bytes):
        return line
    return (json.dumps(line) if isinstance(line, dict) else line).encode()


def moon(ts: int = 0, n: int = 3, out: int = 5, ids: list[int] | None = None) -> dict:
    return {"timestamp": ts, "input_length": n, "output_length": out, "hash_ids": ids if ids is not None else [7]}


# -- formats -----------------------------------------------------------------------------------


def test_mooncake_lines_become_requests_in_seconds(tmp_path):
    path = write(
        tmp_path,
        moon(0, 600, 10, [0, 1]),
        moon(1500, 1024, 3, [0, 2]),
        moon(3536999, 1, 0, [9]),
    )
    trace = read_trace(path)
    assert trace == Trace(
        format="mooncake",
        block_size=512,
        requests=[
            TraceRequest(index=0, arrival_s=0.0, input_length=600, output_length=10, hash_ids=(0, 1), block_size=512),
            TraceRequest(index=1, arrival_s=1.5, input_length=1024, output_length=3, hash_ids=(0, 2), block_size=512),
            TraceRequest(index=2, arrival_s=3536.999, input_length=1, output_length=0, hash_ids=(9,), block_size=512),
        ],
    )
    assert not trace.closed_loop
    assert type(trace.requests[0].arrival_s) is float


def test_kvd_lines_carry_their_session_fields(tmp_path):
    path = write(
        tmp_path,
        {"timestamp": 0.5, "input_length": 9, "output_length": 2, "hash_ids": [1, 2, 3], "block_size": 4,
         "session_id": "a", "turn": 0},
        {"timestamp": 3, "input_length": 14, "output_length": 1, "hash_ids": [1, 2, 4, 5], "block_size": 4,
         "session_id": "a", "turn": 1, "tool": "bash", "pause_s": 2.25, "last": True},
        {"timestamp": 4, "input_length": 4, "output_length": 1, "hash_ids": [8], "block_size": 4},
    )
    trace = read_trace(path)
    assert trace.format == "kvd"
    assert trace.block_size == 4
    assert trace.closed_loop
    assert trace.requests == [
        TraceRequest(0, 0.5, 9, 2, (1, 2, 3), 4, session_id="a", turn=0),
        TraceRequest(1, 3.0, 14, 1, (1, 2, 4, 5), 4, session_id="a", turn=1, tool="bash", pause_s=2.25, last=True),
        TraceRequest(2, 4.0, 4, 1, (8,), 4),
    ]


def test_kvd_block_size_defaults_to_16_and_the_argument_replaces_the_default(tmp_path):
    path = write(tmp_path, {"timestamp": 0, "input_length": 17, "output_length": 1, "hash_ids": [1, 2],
                            "session_id": "s"})
    assert read_trace(path).block_size == 16
    other = write(tmp_path, {"timestamp": 0, "input_length": 17, "output_length": 1, "hash_ids": [1],
                             "session_id": "s"}, name="b.jsonl")
    trace = read_trace(other, block_size=32)
    assert trace.block_size == 32 and trace.requests[0].block_size == 32


def bailian(chat: int, parent: int, turn: int, ts: float = 0.0, n: int = 20, ids: list[int] | None = None) -> dict:
    return {"chat_id": chat, "parent_chat_id": parent, "timestamp": ts, "input_length": n, "output_length": 4,
            "type": "text", "turn": turn, "hash_ids": ids if ids is not None else [chat, chat + 1000]}


def test_bailian_sessions_are_the_roots_of_parent_chains(tmp_path):
    path = write(
        tmp_path,
        bailian(10, -1, 1, 0.25),
        bailian(20, -1, 1, 1.0),
        bailian(11, 10, 2, 2.5),
        bailian(12, 11, 3, 3.0, n=33, ids=[10, 11, 12]),
        bailian(31, 30, 4, 4.0),  # parent 30 is not in the file: 31 and 32 stay one session
        bailian(32, 30, 4, 5.0),
    )
    trace = read_trace(path)
    assert trace.format == "bailian" and trace.block_size == 16 and not trace.closed_loop
    got = [(r.index, r.arrival_s, r.session_id, r.turn, r.input_length, r.hash_ids) for r in trace.requests]
    assert got == [
        (0, 0.25, "10", 0, 20, (10, 1010)),
        (1, 1.0, "20", 0, 20, (20, 1020)),
        (2, 2.5, "10", 1, 20, (11, 1011)),
        (3, 3.0, "10", 2, 33, (10, 11, 12)),
        (4, 4.0, "30", 3, 20, (31, 1031)),
        (5, 5.0, "30", 3, 20, (32, 1032)),
    ]
    assert all(r.tool is None and r.pause_s is None and not r.last and r.output_length == 4 for r in trace.requests)


def test_bailian_child_listed_before_its_parent_still_finds_its_root(tmp_path):
    path = write(tmp_path, bailian(3, 2, 3), bailian(2, 1, 2), bailian(1, -1, 1))
    assert [r.session_id for r in read_trace(path).requests] == ["1", "1", "1"]


def test_blank_lines_are_skipped_but_counted_in_error_line_numbers(tmp_path):
    path = write(tmp_path, moon(0), "", "   ", moon(1))
    assert [r.index for r in read_trace(path).requests] == [0, 1]
    bad = write(tmp_path, moon(0), "", '{"timestamp": 1}', name="bad.jsonl")
    with pytest.raises(TraceError) as err:
        read_trace(bad)
    assert err.value.line == 3


# -- auto detection ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("lines", "expected"),
    [
        ([moon(0), moon(1)], "mooncake"),
        ([moon(0), {**moon(1), "tool": "bash"}], "kvd"),  # one kvd key anywhere makes the file kvd
        ([{**moon(0), "block_size": 512}], "kvd"),
        ([{**moon(0), "last": False}], "kvd"),
        ([bailian(1, -1, 1)], "bailian"),
    ],
    ids=["mooncake", "kvd-tool-on-a-later-line", "kvd-block-size", "kvd-last", "bailian"],
)
def test_auto_detects_the_format(tmp_path, lines, expected):
    assert read_trace(write(tmp_path, *lines)).format == expected


def test_a_mooncake_file_read_as_kvd_keeps_its_numbers_as_seconds(tmp_path):
    path = write(tmp_path, moon(2000, 16, ids=[1]))
    assert read_trace(path).requests[0].arrival_s == 2.0
    as_kvd = read_trace(path, format="kvd")
    assert as_kvd.format == "kvd" and as_kvd.requests[0].arrival_s == 2000.0 and as_kvd.block_size == 16


# -- the real samples --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "count", "last_s"),
    [("mooncake_conversation.jsonl", 12_031, 3536.999), ("mooncake_synthetic.jsonl", 3_993, 1022.025)],
)
def test_the_mooncake_traces_parse(name, count, last_s):
    path = TRACES / name
    started = time.perf_counter()
    trace = read_trace(path)
    elapsed = time.perf_counter() - started
    assert trace.format == "mooncake" and trace.block_size == 512 and not trace.closed_loop
    assert len(trace.requests) == count
    assert [r.index for r in trace.requests] == list(range(count))
    assert trace.requests[0].arrival_s == 0.0 and trace.requests[-1].arrival_s == last_s
    assert all(r.session_id is None for r in trace.requests)
    assert elapsed < 3.0  # ~0.1 s here; the replay's budget for three policies is two minutes


def test_the_first_conversation_request_is_exact():
    path = TRACES / "mooncake_conversation.jsonl"
    if not path.exists():
        pytest.skip(f"{path} is not checked out here")
    first = read_trace(path).requests[0]
    assert first == TraceRequest(0, 0.0, 6758, 500, tuple(range(14)), 512)


# -- errors ------------------------------------------------------------------------------------

K = {"timestamp": 0, "input_length": 16, "output_length": 1, "hash_ids": [1], "session_id": "s"}  # a kvd line
B = bailian(1, -1, 1)

ERRORS = [
    # (id, lines, format, failing line, words in the message)
    ("bad-json", [moon(0), '{"timestamp": 0,'], "auto", 2, "not valid JSON"),
    ("bad-utf8", [moon(0), b'{"x": "\xff"}'], "auto", 2, "not valid JSON"),
    ("not-an-object", [moon(0), "[1, 2]"], "auto", 2, "must be a JSON object, got list"),
    ("missing-timestamp", [{"input_length": 1, "output_length": 1, "hash_ids": [1]}], "auto", 1,
     "missing required field 'timestamp'"),
    ("missing-input", [{"timestamp": 0, "output_length": 1, "hash_ids": [1]}], "auto", 1,
     "missing required field 'input_length'"),
    ("missing-output", [{"timestamp": 0, "input_length": 1, "hash_ids": [1]}], "auto", 1,
     "missing required field 'output_length'"),
    ("missing-hash-ids", [{"timestamp": 0, "input_length": 1, "output_length": 1}], "auto", 1,
     "missing required field 'hash_ids'"),
    ("length-is-a-string", [{**moon(0), "input_length": "3"}], "auto", 1, "'input_length' must be an integer"),
    ("length-is-a-bool", [{**moon(0), "output_length": True}], "auto", 1, "'output_length' must be an integer"),
    ("length-is-a-float", [{**moon(0), "input_length": 3.0}], "auto", 1, "'input_length' must be an integer"),
    ("negative-input", [moon(0), moon(1, n=-1, ids=[])], "auto", 2, "'input_length' must be >= 0"),
    ("negative-output", [moon(0, out=-3)], "auto", 1, "'output_length' must be >= 0"),
    ("negative-timestamp", [moon(-1)], "auto", 1, "'timestamp' must be a finite number >= 0"),
    ("nan-timestamp", ['{"timestamp": NaN, "input_length": 1, "output_length": 1, "hash_ids": [1]}'], "auto", 1,
     "'timestamp' must be a finite number >= 0"),
    ("huge-timestamp", [moon(10**400)], "auto", 1, "'timestamp' must be a finite number >= 0"),
    ("string-timestamp", [{**moon(0), "timestamp": "0"}], "auto", 1, "'timestamp' must be a number"),
    ("hash-ids-not-a-list", [{**moon(0), "hash_ids": 7}], "auto", 1, "'hash_ids' must be a list of integers"),
    ("hash-id-a-string", [moon(0, n=1024, ids=[1, "2"])], "auto", 1, "holds \"2\""),
    ("hash-id-negative", [moon(0, ids=[-1])], "auto", 1, "'hash_ids' must be in [0, 2**64)"),
    ("hash-id-too-big", [moon(0, ids=[1 << 64])], "auto", 1, "'hash_ids' must be in [0, 2**64)"),
    ("too-many-hash-ids", [moon(0, n=512, ids=[1, 2])], "auto", 1, "2 hash_ids for input_length 512"),
    ("too-few-hash-ids", [moon(0, n=513, ids=[1])], "auto", 1, "(expected 2)"),
    ("kvd-empty-session", [{**K, "session_id": ""}], "auto", 1, "'session_id' must be a non-empty string"),
    ("kvd-session-not-a-string", [{**K, "session_id": 5}], "auto", 1, "'session_id' must be a non-empty string"),
    ("kvd-tool-not-a-string", [{**K, "tool": ["bash"]}], "auto", 1, "'tool' must be a non-empty string"),
    ("kvd-negative-turn", [{**K, "turn": -1}], "auto", 1, "'turn' must be >= 0"),
    ("kvd-negative-pause", [{**K, "pause_s": -0.5}], "auto", 1, "'pause_s' must be a finite number >= 0"),
    ("kvd-last-not-a-bool", [{**K, "last": 1}], "auto", 1, "'last' must be true or false"),
    ("kvd-pause-without-session", [{**moon(0, n=16), "pause_s": 1.0}], "auto", 1, "'pause_s' needs a 'session_id'"),
    ("kvd-turn-without-session", [{**moon(0, n=16), "turn": 0}], "auto", 1, "'turn' needs a 'session_id'"),
    ("kvd-last-without-session", [{**moon(0, n=16), "last": True}], "auto", 1, "'last' needs a 'session_id'"),
    ("kvd-zero-block-size", [{**K, "block_size": 0}], "auto", 1, "'block_size' must be >= 1"),
    ("kvd-block-sizes-disagree", [{**K, "block_size": 16}, {**K, "block_size": 32}], "auto", 2,
     "block_size 32 differs from the trace's 16"),
    ("kvd-block-size-missing-on-a-later-line", [{**K, "input_length": 32, "block_size": 32}, K], "auto", 2,
     "block_size 16 differs from the trace's 32"),
    ("kvd-turns-out-of-order", [{**K, "turn": 1}, {**K, "turn": 1}], "auto", 2, "turn 1 comes after turn 1"),
    ("kvd-session-after-last", [{**K, "last": True}, K], "auto", 2, "continues after its 'last' turn"),
    ("bailian-duplicate-chat", [B, bailian(1, -1, 1)], "auto", 2, "duplicate chat_id 1"),
    ("bailian-own-parent", [bailian(4, 4, 2)], "auto", 1, "chat_id 4 is its own parent"),
    ("bailian-cycle", [bailian(1, 2, 2), bailian(2, 1, 2)], "auto", 1, "loops back"),
    ("bailian-parent-below-minus-one", [bailian(1, -2, 1)], "auto", 1, "'parent_chat_id' must be >= -1"),
    ("bailian-turn-zero", [bailian(1, -1, 0)], "auto", 1, "'turn' must be >= 1"),
    ("bailian-type-not-a-string", [{**B, "type": 3}], "auto", 1, "'type' must be a string"),
    ("bailian-missing-chat-id", [B, moon(0, n=16)], "auto", 2, "missing required field 'chat_id'"),
    ("bailian-missing-turn", [{k: v for k, v in B.items() if k != "turn"}], "bailian", 1,
     "missing required field 'turn'"),
]


@pytest.mark.parametrize(("lines", "fmt", "line", "words"), [e[1:] for e in ERRORS], ids=[e[0] for e in ERRORS])
def test_a_bad_line_is_a_trace_error_naming_file_and_line(tmp_path, lines, fmt, line, words):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b"".join(_raw(x) + b"\n" for x in lines))
    with pytest.raises(TraceError) as err:
        read_trace(path, format=fmt)
    assert err.value.line == line
    assert str(err.value).startswith(f"{path}:{line}: ")
    assert words in str(err.value)


@pytest.mark.parametrize("content", ["", "\n\n  \n"], ids=["empty", "blank-lines-only"])
def test_an_empty_file_is_a_trace_error(tmp_path, content):
    path = tmp_path / "empty.jsonl"
    path.write_text(content)
    with pytest.raises(TraceError, match=r"empty\.jsonl:1: empty trace"):
        read_trace(path)


def test_a_block_size_argument_that_a_kvd_line_contradicts_is_an_error(tmp_path):
    path = write(tmp_path, {**K, "block_size": 16})
    with pytest.raises(TraceError, match=r":1: block_size 16 differs from the trace's 64"):
        read_trace(path, block_size=64)


def test_bad_arguments_are_value_errors_not_trace_errors(tmp_path):
    path = write(tmp_path, moon(0))
    with pytest.raises(ValueError, match="unknown trace format 'csv'") as err:
        read_trace(path, format="csv")
    assert not isinstance(err.value, TraceError)
    with pytest.raises(ValueError, match="block_size must be a positive integer"):
        read_trace(path, block_size=0)
    with pytest.raises(FileNotFoundError):
        read_trace(tmp_path / "absent.jsonl")


# -- aiperf's agentic-code trace ---------------------------------------------------------------

AIPERF = [
    {"session_id": "a", "input_length": 1000, "output_length": 300, "hash_ids": [1, 2], "timestamp": 0.0, "group_id": 0},
    {"session_id": "a", "input_length": 600, "output_length": 10, "hash_ids": [3, 4], "delay": 2000.0},
    {"session_id": "b", "input_length": 512, "output_length": 1, "hash_ids": [1], "timestamp": 0.0, "group_id": 0},
    {"session_id": "a", "input_length": 100, "output_length": 5, "hash_ids": [5], "delay": 500.0},
]


def write_lines(path, lines) -> str:
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return str(path)


def test_an_aiperf_turn_is_every_earlier_piece_and_answer_then_its_own(tmp_path):
    t = read_trace(write_lines(tmp_path / "a.jsonl", AIPERF))
    assert t.format == "aiperf" and t.block_size == 512 and t.closed_loop
    a0, a1, a2, b0 = t.requests
    # Answers get fresh ids above the file's (5): 6 for a's first, 7 for its second.
    assert (a0.hash_ids, a0.input_length, a0.pause_s, a0.last) == ((1, 2), 1000, None, False)
    assert (a1.hash_ids, a1.input_length, a1.pause_s) == ((1, 2, 6, 3, 4), 3 * 512 + 600, 2.0)
    assert (a2.hash_ids, a2.input_length, a2.pause_s, a2.last) == ((1, 2, 6, 3, 4, 7, 5), 6 * 512 + 100, 0.5, True)
    assert (b0.session_id, b0.turn, b0.hash_ids, b0.last) == ("b", 0, (1,), True)
    assert [r.index for r in t.requests] == [0, 1, 2, 3] and [r.turn for r in t.requests] == [0, 1, 2, 0]


def test_aiperf_sessions_start_together_or_staggered_by_a_seeded_gap(tmp_path):
    path = write_lines(tmp_path / "a.jsonl", AIPERF)
    assert [r.arrival_s for r in read_trace(path).requests if r.turn == 0] == [0.0, 0.0]
    staggered = [r.arrival_s for r in read_trace(path, session_gap_s=10.0, seed=3).requests if r.turn == 0]
    assert staggered[0] == 0.0 and staggered[1] > 0
    assert staggered == [r.arrival_s for r in read_trace(path, session_gap_s=10.0, seed=3).requests if r.turn == 0]
    with pytest.raises(ValueError, match="session_gap_s"):
        read_trace(path, session_gap_s=0.0)


@pytest.mark.parametrize(
    ("bad", "problem"),
    [
        ({**AIPERF[1], "timestamp": 5.0}, "a later row has a timestamp"),
        ({**AIPERF[1], "hash_ids": [3]}, "1 hash_ids for input_length 600"),
        ({k: v for k, v in AIPERF[1].items() if k != "delay"}, "missing required field 'delay'"),
        ({k: v for k, v in AIPERF[1].items() if k != "session_id"}, "missing required field 'session_id'"),
    ],
)
def test_a_bad_aiperf_row_names_its_line(tmp_path, bad, problem):
    path = write_lines(tmp_path / "a.jsonl", [AIPERF[0], bad])
    with pytest.raises(TraceError, match=problem) as err:
        read_trace(path, format="aiperf")
    assert err.value.line == 2
    first = write_lines(tmp_path / "b.jsonl", [{**AIPERF[0], "delay": 1.0}])
    with pytest.raises(TraceError, match="first row has a delay"):
        read_trace(first)
