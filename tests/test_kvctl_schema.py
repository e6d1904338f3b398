"""One output schema per kvctl command: against a real daemon, the table form of every command
shows the keys `-o json` and `-o yaml` carry — the same names, hashes in decimal in both."""

from __future__ import annotations

import contextlib
import io
import json
import re

import pytest
import yaml
from conftest import DaemonProcess

from kvd.cli import kvctl
from kvd.cli.render import cell

BLOCK = 4096
HASHES = [2**63 + 5, 300, 7]

COMMANDS = [
    ["status"],
    ["blocks"],
    ["check"],
    ["sessions"],
    ["sessions", "list", "-n", "m"],
    ["sessions", "show", "agent-1", "-n", "m"],
    ["sessions", "ahead", "agent-1", str(HASHES[0]), "-n", "m", "--in", "5"],
    ["pin", "-n", "m", str(HASHES[0])],
    ["unpin", "-n", "m", str(HASHES[0])],
    ["policy", "get"],
    ["policy", "set", "typed"],
    ["health"],
    ["sync"],
    ["watch", "--from-seq", "1", "--count", "8"],
    ["evict", "-n", "m"],
    ["drain"],
    ["resume"],
]


@pytest.fixture(scope="module")
def node(tmp_path_factory):
    d = DaemonProcess(tmp_path_factory.mktemp("schema"))
    d.start()
    yield d
    d.stop()


@pytest.fixture
def seeded(node):
    """The daemon serving, with blocks (a hash above 2**63 among them) and a paused session."""
    with node.client() as c:
        c.resume()
        c.register_namespace("m", 16, BLOCK)
        c.session_event("m", "agent-1", "turn_start", HASHES)
        c.store("m", HASHES, [bytes([i]) * BLOCK for i in range(len(HASHES))], session_id="agent-1")
        c.session_event("m", "agent-1", "tool_pause", tool="pytest", expected_pause_s=30)
    return node


def run(address: str, *args: str) -> str:
    """kvctl in this process; its stdout (stderr is kept apart: notes, not the schema)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = kvctl.main(["--addr", address, *args])
    assert code == 0, err.getvalue()
    return out.getvalue()


HEADER = re.compile(r"[A-Z][A-Z_]*( +[A-Z][A-Z_]*)*")


def table_keys(text: str) -> dict[str | None, list[str]]:
    """The keys a table form shows: the top level's (a record's keys, or a listing's columns)
    under None, and each titled section's columns (``tiers:`` then a header) under its title."""
    keys: dict[str | None, list[str]] = {}
    for block in text.rstrip("\n").split("\n\n"):
        lines = block.splitlines()
        if HEADER.fullmatch(lines[0]):
            keys[None] = lines[0].lower().split()
        elif len(lines) > 1 and lines[0].endswith(":") and HEADER.fullmatch(lines[1]):
            keys[lines[0][:-1]] = lines[1].lower().split()
        else:
            keys[None] = [line.split(":", 1)[0] for line in lines if not line.startswith("  - ")]
    return keys


def data_keys(data) -> dict[str | None, list[str]]:
    """The same for JSON data: nested listings (a list of records, or records by name) are sections."""
    if isinstance(data, list):
        return {None: list(data[0])}
    keys: dict[str | None, list[str]] = {None: []}
    for key, value in data.items():
        if isinstance(value, dict) and value and all(isinstance(v, dict) for v in value.values()):
            keys[key] = list(next(iter(value.values())))
        elif isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            keys[key] = list(value[0])
        else:
            keys[None].append(key)
    return keys


@pytest.mark.parametrize("args", COMMANDS, ids=[" ".join(a[:2]) for a in COMMANDS])
def test_the_table_shows_the_keys_json_and_yaml_carry(seeded, args):
    address = seeded.address
    table = run(address, *args)
    as_json = run(address, *args, "-o", "json")
    as_yaml = run(address, *args, "-o", "yaml")
    if args[0] == "watch":  # a stream: one event a line, a JSON line, a YAML document
        events = [json.loads(line) for line in as_json.splitlines()]
        assert events == [e for e in yaml.safe_load_all(as_yaml)]
        lines = table.splitlines()
        assert len(lines) == len(events) == 8
        for line, event in zip(lines, events):
            shown = dict(pair.split("=", 1) for pair in line.split("  "))
            assert list(shown) == list(event)
            assert shown == {k: cell(k, v) for k, v in event.items()}  # hashes in decimal, as in JSON
        return
    data = json.loads(as_json)
    assert yaml.safe_load(as_yaml) == _comparable(data, yaml.safe_load(as_yaml))
    assert table_keys(table) == data_keys(data)
    if args[0] == "blocks":
        rows = [line.split() for line in table.splitlines()[1:]]
        assert [r[1] for r in rows] == [str(b["hash"]) for b in data] == [str(h) for h in sorted(HASHES)]
        assert [r[2] for r in rows] == [cell("parent", b["parent"]) for b in data]


def _comparable(data, loaded):
    """``data`` with the figures that move between two calls (uptime, idle and pause seconds)
    taken from ``loaded``: the two outputs must agree on everything else."""
    if isinstance(data, dict):
        return {
            k: loaded[k] if k in ("uptime_s", "idle_s", "paused_s") else _comparable(v, loaded[k])
            for k, v in data.items()
        }
    if isinstance(data, list):
        return [_comparable(a, b) for a, b in zip(data, loaded)]
    return data


def test_a_record_and_a_listing_render_every_key_of_their_data():
    from kvd.cli.render import columns, pairs, record

    assert record({"ok": True, "problems": [], "ahead_in_s": None, "available": ["lru", "typed"]}).splitlines() == [
        "ok: yes", "problems: -", "ahead_in_s: -", "available:", "  - lru", "  - typed",
    ]
    assert columns([], ["hash", "nbytes"]) == "HASH  NBYTES"
    assert columns([{"hash": 2**64 - 1, "idle_s": 1.25}], ["hash", "idle_s"]).splitlines()[1].split() == [
        str(2**64 - 1), "1.2",
    ]
    assert pairs({"seq": 3, "unix_time": 1.5, "parent": None}) == "seq=3  unix_time=1.5  parent=-"
