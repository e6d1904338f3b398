"""Malformed trace files (`kvd replay`) and config files (`kvd serve --config`, `kvd config
print`): one clear line on stderr, exit 2, nothing on stdout — for hand-picked damage and for
files hypothesis makes up."""

from __future__ import annotations

import contextlib
import io
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvd.cli.kvd_main import main
from kvd.replay.trace import TraceError, read_trace
from kvd.server.config_file import ConfigError, load_config

FUZZ = settings(max_examples=150, deadline=None, derandomize=True, database=None,
                suppress_health_check=list(HealthCheck))
GOOD_LINE = {"timestamp": 0, "input_length": 20, "output_length": 2, "hash_ids": [1, 2]}


def run_main(*argv: str) -> tuple[int, str, str]:
    """`kvd ARGV` in this process: (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(list(argv))
        except SystemExit as exc:  # argparse
            code = exc.code
    return code, out.getvalue(), err.getvalue()


def assert_one_line_exit_2(code: int, stdout: str, stderr: str, prefix: str) -> None:
    assert code == 2, stderr
    assert stdout == ""
    assert stderr.endswith("\n") and stderr.count("\n") == 1 and stderr.startswith(prefix), stderr


def kvd(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kvd.cli.kvd_main", *args], capture_output=True, timeout=60)


# -- traces ----------------------------------------------------------------------------------------

BAD_TRACES = {
    "empty": b"",
    "blank lines only": b"\n  \n\n",
    "binary garbage": b"\x00\xff\xfe\x89PNG\r\n\x1a\n" * 8,
    "truncated line": json.dumps(GOOD_LINE).encode()[:25] + b"\n",
    "a list, not an object": b"[1, 2, 3]\n",
    "wrong types": json.dumps({**GOOD_LINE, "input_length": "20"}).encode() + b"\n",
    "missing field": json.dumps({k: v for k, v in GOOD_LINE.items() if k != "hash_ids"}).encode() + b"\n",
    "nested 100,000 deep": b"[" * 100_000 + b"\n",
    "an object nested 100,000 deep": b'{"a":' * 100_000 + b"\n",
    "infinite length": b'{"timestamp": 0, "input_length": 1e400, "output_length": 1, "hash_ids": [1]}\n',
    "a 5,000-digit number": b'{"timestamp": 0, "input_length": ' + b"9" * 5000 + b', "output_length": 1, "hash_ids": [1]}\n',
    "good then bad UTF-8": json.dumps(GOOD_LINE).encode() + b'\n{"timestamp": "\xff"}\n',
}


@pytest.mark.parametrize("name", BAD_TRACES)
def test_kvd_replay_refuses_a_malformed_trace_in_one_line(tmp_path, name):
    path = tmp_path / "t.jsonl"
    path.write_bytes(BAD_TRACES[name])
    r = kvd("replay", str(path), "--no-progress")
    assert_one_line_exit_2(r.returncode, r.stdout.decode(), r.stderr.decode(errors="replace"), f"kvd replay: {path}:")


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=12,
)
FIELDS = st.sampled_from(
    ["timestamp", "input_length", "output_length", "hash_ids", "session_id", "turn", "tool", "pause_s", "last",
     "block_size", "chat_id", "parent_chat_id", "type"]
)
RECORD = st.dictionaries(FIELDS, JSON_VALUES, max_size=8).map(lambda d: {**GOOD_LINE, **d})
LINE = st.one_of(
    RECORD.map(lambda d: json.dumps(d).encode()),
    RECORD.map(lambda d: json.dumps(d).encode()).flatmap(lambda b: st.integers(0, len(b)).map(lambda k: b[:k])),
    JSON_VALUES.map(lambda v: json.dumps(v).encode()),
    st.binary(max_size=40).map(lambda b: b.replace(b"\n", b"")),
)


@FUZZ
@given(st.lists(LINE, max_size=6))
def test_any_trace_file_parses_or_is_one_trace_error(lines):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "t.jsonl"
        path.write_bytes(b"\n".join(lines) + b"\n")
        try:
            read_trace(path)
        except TraceError as exc:
            assert str(exc).startswith(f"{path}:") and "\n" not in str(exc)
            code, out, err = run_main("replay", str(path), "--no-progress")
            assert_one_line_exit_2(code, out, err, f"kvd replay: {path}:")


# -- config files ------------------------------------------------------------------------------------

BAD_CONFIGS = {
    "not TOML": "dram_bytes = = 1\n",
    "binary garbage": "\x00\x01\x02",
    "a table": "[server]\ndram_bytes = 1\n",
    "an unknown key": "drambytes = 1\n",
    "a string for a number": 'io_threads = "many"\n',
    "a float for an integer": "event_buffer = 1e3\n",
    "a number for a path": "nvme_dir = 3\n",
    "NaN lease": "lease_seconds = nan\n",
    "infinite drain": "drain_seconds = inf\n",
    "NUL in a path": 'socket = "a\\u0000b"\n',
    "part of a page": "dram_bytes = 9223372036854775807\n",
    "an inline table": "policy = { name = 'lru' }\n",
}


@pytest.mark.parametrize("name", BAD_CONFIGS)
def test_a_malformed_config_file_is_one_line_and_exit_2(tmp_path, name):
    path = tmp_path / "kvd.toml"
    path.write_bytes(BAD_CONFIGS[name].encode())
    code, out, err = run_main("config", "print", "--config", str(path))
    assert_one_line_exit_2(code, out, err, "kvd config: ")


def test_kvd_serve_refuses_malformed_config_files_before_serving(tmp_path):
    for name in ("not TOML", "NaN lease", "NUL in a path", "part of a page", "a table"):
        path = tmp_path / "kvd.toml"
        path.write_bytes(BAD_CONFIGS[name].encode())
        r = kvd("serve", "--config", str(path), "--socket", str(tmp_path / "k.sock"), "--shm-dir", str(tmp_path))
        assert_one_line_exit_2(r.returncode, r.stdout.decode(), r.stderr.decode(), "kvd serve: ")
        assert not (tmp_path / "k.sock").exists(), name


TOML_KEYS = st.sampled_from(["dram_bytes", "nvme_bytes", "lease_seconds", "io_threads", "policy", "socket",
                             "write_behind", "tcp", "metrics_port", "nvme_dir", "drain_seconds", "junk"])
TOML_VALUES = st.sampled_from(
    ['"1GiB"', '"lots"', "0", "-1", "1.5", "nan", "inf", "-inf", "true", "[1, 2]", "{a = 1}", '"a\\u0000b"',
     '"127.0.0.1:7000"', "99999999999999999999", "1979-05-27", '""', "'x'"]
)
TOML_LINE = st.one_of(
    st.tuples(TOML_KEYS, TOML_VALUES).map(lambda kv: f"{kv[0]} = {kv[1]}"),
    st.text(max_size=20).map(lambda t: t.replace("\n", " ")),
)


@FUZZ
@given(st.lists(TOML_LINE, max_size=5))
def test_any_config_file_loads_or_is_one_config_error(lines):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "kvd.toml"
        path.write_text("\n".join(lines) + "\n")
        try:
            load_config(path, {})
        except ConfigError as exc:
            assert "\n" not in str(exc)
            code, out, err = run_main("config", "print", "--config", str(path))
            assert_one_line_exit_2(code, out, err, "kvd config: ")
