"""The trace `aiperf synthesize agentic-code` writes (NVIDIA's agentic coding workload).

Mooncake-style rows (milliseconds, 512 tokens a hash id) with a ``session_id``, a session's
rows in order. A session's first row carries its whole first prompt (``hash_ids``,
``input_length``) and its ``timestamp``; each later row carries only the new piece the turn
adds (the new tokens' ``hash_ids`` and ``input_length``) and its ``delay``, the milliseconds
between the previous answer and this turn.

Replayed as a closed loop: turn k's prompt is every earlier piece and answer, then its own
piece. An earlier answer is ``ceil(output_length / block)`` blocks the trace gives no ids
(fresh ids, above every id in the file); an earlier piece counts as whole blocks (its last,
partial block is the engine's next block boundary). ``delay`` becomes the turn's pause.
Sessions start at their timestamps (aiperf writes 0 for all), or one after another with
exponential gaps of mean ``session_gap_s`` (seeded).
"""

from __future__ import annotations

import itertools
import os

import numpy as np

from kvd.replay.trace import Record, TraceError, TraceRequest, _Line


def read_aiperf(
    path: str | os.PathLike[str],
    records: list[Record],
    block_size: int,
    session_gap_s: float | None = None,
    seed: int = 0,
) -> list[TraceRequest]:
    """The requests of an aiperf agentic-code file, each session's turns in order."""
    lines = [_Line(path, lineno, obj) for lineno, obj in records]
    sessions: dict[str, list[_Line]] = {}
    for line in lines:
        sessions.setdefault(line.text("session_id"), []).append(line)
    top = max((h for line in lines for h in line.obj.get("hash_ids", ()) if type(h) is int), default=-1)
    fresh = itertools.count(top + 1)
    starts = _starts(sessions, session_gap_s, seed)
    out: list[TraceRequest] = []
    for (session, turns), start in zip(sessions.items(), starts):
        chain: list[int] = []
        for k, line in enumerate(turns):
            piece_tokens = line.integer("input_length")
            piece = line.hash_ids(piece_tokens, block_size)
            if k == 0:
                if "delay" in line.obj:
                    raise line.fail(f"session {session!r}: its first row has a delay, not a timestamp")
                arrival = start if start is not None else line.seconds("timestamp", per_second=1000)
                pause = None
            else:
                if "timestamp" in line.obj:
                    raise line.fail(f"session {session!r}: a later row has a timestamp, not a delay")
                previous = turns[k - 1]
                chain += [next(fresh) for _ in range(-(-previous.integer("output_length") // block_size))]
                arrival, pause = out[-1].arrival_s, line.seconds("delay", per_second=1000)
            prompt = len(chain) * block_size + piece_tokens
            chain += piece
            out.append(
                TraceRequest(
                    index=len(out),
                    arrival_s=arrival,
                    input_length=prompt,
                    output_length=line.integer("output_length"),
                    hash_ids=tuple(chain),
                    block_size=block_size,
                    session_id=session,
                    turn=k,
                    pause_s=pause,
                    last=k == len(turns) - 1,
                )
            )
    return out


def _starts(sessions: dict[str, list], session_gap_s: float | None, seed: int) -> list[float | None]:
    """Each session's start in seconds: None (its own timestamp), or staggered."""
    if session_gap_s is None:
        return [None] * len(sessions)
    if not session_gap_s > 0:
        raise ValueError(f"session_gap_s must be positive, got {session_gap_s}")
    gaps = np.random.default_rng(seed).exponential(session_gap_s, len(sessions))
    return [0.0, *np.cumsum(gaps[1:]).tolist()]


__all__ = ["TraceError", "read_aiperf"]
