"""Request traces for `kvd replay`: one reader for four JSONL formats.

- ``mooncake`` — Mooncake's FAST'25 traces (kvcache-ai/Mooncake, ``FAST25-release/traces``;
  traces/ holds the conversation and synthetic ones): ``timestamp`` in
  **milliseconds** from the trace start, ``input_length``, ``output_length`` (tokens),
  ``hash_ids`` (one id per 512 tokens, the last block may be partial). No sessions.
- ``bailian`` — Alibaba Bailian's Qwen traces (alibaba-edu/qwen-bailian-usagetraces-anon,
  ``qwen_traceA_blksz_16.jsonl`` and siblings): ``chat_id``, ``parent_chat_id`` (-1 for a
  first turn), ``timestamp`` in **seconds**, ``input_length``, ``output_length``, ``type``
  (text/search/image/file, not used here), ``turn`` (1-based), ``hash_ids`` (16 tokens a block).
  A request's session is the root of its ``parent_chat_id`` chain; a parent that is not in the
  file ends the chain, so siblings whose parent was cut off still share a session.
- ``kvd`` — kvd's agentic session format (what `kvd gen-workload` writes): ``timestamp`` in
  **seconds**, optional ``block_size`` (default 16), ``session_id``, ``turn`` (0-based),
  ``tool``, ``pause_s`` (seconds, closed loop), ``last``.
- ``aiperf`` — what ``aiperf synthesize agentic-code`` writes: Mooncake-style rows with a
  ``session_id``; a session's later rows carry only the piece a turn adds and its ``delay``
  (:mod:`kvd.replay.aiperf`).

A Mooncake line is also a valid kvd line — but its timestamp is in milliseconds, so a
Mooncake file read as ``kvd`` would run 1000 times slower. ``format="auto"`` therefore reads
a file without any of kvd's own keys as Mooncake.

Every request is checked: a line that is not a JSON object, lacks a required field, has a
field of the wrong type (``true`` is not an int, ``512.0`` is not an int), a negative length,
a non-finite or negative time, or a ``hash_ids`` list whose length is not
``ceil(input_length / block_size)`` raises :class:`TraceError` naming ``file:line``. The
replay relies on that last rule: block ``i`` of a prompt holds
``min(block_size, input_length - i * block_size)`` tokens.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from typing import Any

FORMATS = ("mooncake", "bailian", "kvd", "aiperf")
DEFAULT_BLOCK_SIZE = {"mooncake": 512, "bailian": 16, "kvd": 16, "aiperf": 512}
"""Tokens per hash id when a line does not say (kvd's ``block_size`` field)."""

_BAILIAN_KEYS = frozenset({"chat_id", "parent_chat_id"})
_KVD_KEYS = frozenset({"session_id", "pause_s", "turn", "tool", "last", "block_size"})
_AIPERF_KEYS = frozenset({"delay", "group_id"})
_HASH_LIMIT = 1 << 64  # block ids are the daemon's 64-bit unsigned hashes


class TraceError(ValueError):
    """A trace file that cannot be replayed; the message is ``FILE:LINE: problem``."""

    def __init__(self, path: str | os.PathLike[str], line: int, problem: str) -> None:
        self.path = os.fspath(path)
        self.line = line
        self.problem = problem
        super().__init__(f"{self.path}:{line}: {problem}")


@dataclass(frozen=True, slots=True)
class TraceRequest:
    """One request (one turn of a session, or a request alone).

    ``arrival_s`` is seconds from the trace start (Mooncake's milliseconds converted): the
    open-loop arrival. With ``pause_s`` (seconds) the replay instead starts the turn
    ``pause_s`` after its session's previous turn finished. ``hash_ids`` has one id per
    ``block_size`` tokens of the whole prompt, the last block possibly partial.
    """

    index: int
    arrival_s: float
    input_length: int
    output_length: int
    hash_ids: tuple[int, ...]
    block_size: int
    session_id: str | None = None
    turn: int | None = None
    tool: str | None = None
    pause_s: float | None = None
    last: bool = False


@dataclass(frozen=True)
class Trace:
    """The requests of one file in file order (``requests[i].index == i``)."""

    format: str
    requests: list[TraceRequest]
    block_size: int

    @property
    def closed_loop(self) -> bool:
        """True when any turn is scheduled by its tool pause rather than its timestamp."""
        return any(r.pause_s is not None for r in self.requests)


def read_trace(
    path: str | os.PathLike[str],
    format: str = "auto",
    block_size: int | None = None,
    session_gap_s: float | None = None,
    seed: int = 0,
) -> Trace:
    """Read a JSONL trace.

    ``format``: ``"auto"`` (Bailian when a line has ``chat_id``/``parent_chat_id``, aiperf
    when one has ``delay``/``group_id``, kvd when one has any of
    ``session_id``/``pause_s``/``turn``/``tool``/``last``/``block_size``, otherwise
    Mooncake), or one of :data:`FORMATS`. ``session_gap_s`` (aiperf): start the sessions one
    after another, exponential gaps of this mean (``seed``), not all at their timestamps. ``block_size``: tokens per hash id for
    lines that do not give one (default: 512 Mooncake, 16 Bailian and kvd); a kvd line whose
    ``block_size`` differs from the argument (or, without it, from the first line's) is an
    error — one trace has one geometry.
    Blank lines are skipped. Raises :class:`TraceError` for a bad file, ``ValueError`` for a
    bad argument, ``OSError`` when the file cannot be read.
    """
    if format != "auto" and format not in FORMATS:
        raise ValueError(f"unknown trace format {format!r} (auto, {', '.join(FORMATS)})")
    if block_size is not None and (type(block_size) is not int or block_size < 1):
        raise ValueError(f"block_size must be a positive integer, got {block_size!r}")
    records = _load(path)
    if format == "auto":
        format = _detect(records)
    default_bs = block_size if block_size is not None else DEFAULT_BLOCK_SIZE[format]
    if format == "mooncake":
        requests = _mooncake(path, records, default_bs)
    elif format == "aiperf":
        from kvd.replay.aiperf import read_aiperf  # it builds on this module's line reader

        requests = read_aiperf(path, records, default_bs, session_gap_s, seed)
    elif format == "bailian":
        requests = _bailian(path, records, default_bs)
    else:
        requests = _kvd(path, records, default_bs, fixed=block_size)
    return Trace(format=format, requests=requests, block_size=requests[0].block_size)


# -- parsing ---------------------------------------------------------------------------------

Record = tuple[int, dict[str, Any]]  # (1-based line number, the JSON object)


def _load(path: str | os.PathLike[str]) -> list[Record]:
    records: list[Record] = []
    loads = json.loads
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                obj = loads(raw)
            except ValueError as exc:  # JSONDecodeError, or UnicodeDecodeError for bad UTF-8
                raise TraceError(path, lineno, f"not valid JSON: {exc}") from None
            except RecursionError:  # arrays or objects nested thousands deep
                raise TraceError(path, lineno, "not valid JSON: nested too deeply") from None
            if type(obj) is not dict:
                raise TraceError(path, lineno, f"a request must be a JSON object, got {type(obj).__name__}")
            records.append((lineno, obj))
    if not records:
        raise TraceError(path, 1, "empty trace: no requests")
    return records


def _detect(records: list[Record]) -> str:
    # A whole-file decision: a kvd file's first request may well carry no session fields.
    if any(not _BAILIAN_KEYS.isdisjoint(obj) for _, obj in records):
        return "bailian"
    if any(not _AIPERF_KEYS.isdisjoint(obj) for _, obj in records):
        return "aiperf"
    if any(not _KVD_KEYS.isdisjoint(obj) for _, obj in records):
        return "kvd"
    return "mooncake"


def _show(value: Any) -> str:
    """A field's value as JSON, cut short: an error message quotes it, not a whole list."""
    text = json.dumps(value)
    return text if len(text) <= 60 else text[:57] + "..."


class _Line:
    """Typed field access for one record; every problem names the file and line."""

    __slots__ = ("path", "lineno", "obj")

    def __init__(self, path: str | os.PathLike[str], lineno: int, obj: dict[str, Any]) -> None:
        self.path = path
        self.lineno = lineno
        self.obj = obj

    def fail(self, problem: str) -> TraceError:
        return TraceError(self.path, self.lineno, problem)

    def _get(self, key: str) -> Any:
        try:
            return self.obj[key]
        except KeyError:
            raise self.fail(f"missing required field {key!r}") from None

    def integer(self, key: str, minimum: int = 0) -> int:
        value = self._get(key)
        if type(value) is not int:  # bool is an int subclass: refuse it by exact type
            raise self.fail(f"{key!r} must be an integer, got {_show(value)}")
        if value < minimum:
            raise self.fail(f"{key!r} must be >= {minimum}, got {value}")
        return value

    def seconds(self, key: str, per_second: int = 1) -> float:
        value = self._get(key)
        if type(value) is not int and type(value) is not float:
            raise self.fail(f"{key!r} must be a number, got {_show(value)}")
        try:
            seconds = float(value)  # an int beyond a float's range overflows here
        except OverflowError:
            seconds = math.inf
        if not math.isfinite(seconds) or seconds < 0:
            raise self.fail(f"{key!r} must be a finite number >= 0, got {_show(value)}")
        # Divide rather than multiply by 1e-3: 3536999 / 1000 is exactly 3536.999.
        return seconds / per_second

    def text(self, key: str) -> str:
        value = self._get(key)
        if type(value) is not str or not value:
            raise self.fail(f"{key!r} must be a non-empty string, got {_show(value)}")
        return value

    def flag(self, key: str) -> bool:
        value = self._get(key)
        if type(value) is not bool:
            raise self.fail(f"{key!r} must be true or false, got {_show(value)}")
        return value

    def hash_ids(self, input_length: int, block_size: int) -> tuple[int, ...]:
        value = self._get("hash_ids")
        if type(value) is not list:
            raise self.fail(f"'hash_ids' must be a list of integers, got {type(value).__name__}")
        if value:
            if set(map(type, value)) != {int}:
                bad = next(v for v in value if type(v) is not int)
                raise self.fail(f"'hash_ids' must be a list of integers, holds {_show(bad)}")
            if min(value) < 0 or max(value) >= _HASH_LIMIT:
                raise self.fail("'hash_ids' must be in [0, 2**64)")
        expected = -(-input_length // block_size)
        if len(value) != expected:
            raise self.fail(
                f"{len(value)} hash_ids for input_length {input_length} at {block_size} tokens a block "
                f"(expected {expected})"
            )
        return tuple(value)

    def request(self, index: int, block_size: int, per_second: int = 1, **session: Any) -> TraceRequest:
        """The request of this line: the fields every format has, plus ``session``'s."""
        input_length = self.integer("input_length")
        return TraceRequest(
            index=index,
            arrival_s=self.seconds("timestamp", per_second),
            input_length=input_length,
            output_length=self.integer("output_length"),
            hash_ids=self.hash_ids(input_length, block_size),
            block_size=block_size,
            **session,
        )


def _mooncake(path: str | os.PathLike[str], records: list[Record], block_size: int) -> list[TraceRequest]:
    # Mooncake gives milliseconds.
    return [_Line(path, lineno, obj).request(i, block_size, per_second=1000) for i, (lineno, obj) in enumerate(records)]


def _bailian(path: str | os.PathLike[str], records: list[Record], block_size: int) -> list[TraceRequest]:
    lines = [_Line(path, lineno, obj) for lineno, obj in records]
    parent: dict[int, int] = {}
    for line in lines:
        chat = line.integer("chat_id")
        up = line.integer("parent_chat_id", minimum=-1)
        if chat in parent:
            raise line.fail(f"duplicate chat_id {chat}")
        if up == chat:
            raise line.fail(f"chat_id {chat} is its own parent")
        parent[chat] = up
    root: dict[int, int] = {}
    requests = []
    for index, line in enumerate(lines):
        kind = line.obj.get("type")
        if kind is not None and type(kind) is not str:
            raise line.fail(f"'type' must be a string, got {_show(kind)}")
        session = str(_root_of(line.obj["chat_id"], parent, root, line))
        turn = line.integer("turn", minimum=1) - 1  # Bailian counts turns from 1, kvd from 0
        requests.append(line.request(index, block_size, session_id=session, turn=turn))
    return requests


def _root_of(chat: int, parent: dict[int, int], root: dict[int, int], line: _Line) -> int:
    """The first chat of ``chat``'s chain (memoized in ``root``); iterative, so a chain of
    thousands of turns cannot overflow the stack."""
    path: list[int] = []
    seen: set[int] = set()
    node = chat
    while node not in root:
        if node in seen:
            raise line.fail(f"parent_chat_id chain of chat {chat} loops back to chat {node}")
        seen.add(node)
        path.append(node)
        up = parent.get(node, -1)
        if up == -1 or up not in parent:
            # A first turn, or a parent cut off from the file: the chain starts here — at the
            # missing parent's id, so that its surviving children stay one session.
            top = node if up == -1 else up
            root[node] = top
            break
        node = up
    top = root[node]
    for n in path:
        root[n] = top
    return top


def _kvd(
    path: str | os.PathLike[str], records: list[Record], default_bs: int, fixed: int | None
) -> list[TraceRequest]:
    requests = []
    trace_bs = fixed  # a block size the caller asked for binds every line; else the first line's
    last_turn: dict[str, int] = {}  # session -> its latest turn number (-1: turns not given)
    ended: set[str] = set()
    for index, (lineno, obj) in enumerate(records):
        line = _Line(path, lineno, obj)
        bs = line.integer("block_size", minimum=1) if "block_size" in obj else default_bs
        if trace_bs is None:
            trace_bs = bs
        elif bs != trace_bs:
            raise line.fail(f"block_size {bs} differs from the trace's {trace_bs} (one trace, one geometry)")
        session = line.text("session_id") if "session_id" in obj else None
        turn = line.integer("turn") if "turn" in obj else None
        pause = line.seconds("pause_s") if "pause_s" in obj else None
        last = line.flag("last") if "last" in obj else False
        tool = line.text("tool") if "tool" in obj else None
        if session is None:
            for key in ("turn", "pause_s", "last"):
                if key in obj and (key != "last" or last):
                    raise line.fail(f"{key!r} needs a 'session_id' (it places the request in a session)")
        else:
            # The replay takes a session's turns in file order: refuse files where that order
            # contradicts the turn numbers, or where a session goes on after its last turn.
            if session in ended:
                raise line.fail(f"session {session!r} continues after its 'last' turn")
            if turn is not None:
                previous = last_turn.get(session)
                if previous is not None and turn <= previous:
                    raise line.fail(f"session {session!r}: turn {turn} comes after turn {previous}")
                last_turn[session] = turn
            if last:
                ended.add(session)
        requests.append(line.request(index, bs, session_id=session, turn=turn, tool=tool, pause_s=pause, last=last))
    return requests
