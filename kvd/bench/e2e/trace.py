"""The agentic-code trace the end-to-end benchmark replays, in aiperf's ``multi_turn`` JSONL.

One line per session: ``{"session_id", "turns": [{"role": "system", "text"}?, {"text",
"delay", "output_length"}, ...]}``. aiperf sends each turn with the whole conversation so far
(every earlier user text, the engine's live replies, this turn's text), so each prompt extends
the last one and a session's context grows turn by turn; ``delay`` (milliseconds) is the
pause before a turn: the agent's tool call. All sessions open with the same system text (the
repository context they share). Texts are words of the benchmark model's vocabulary
(:func:`kvd.bench.e2e.model.words`): one word, one token.

    python -m kvd.bench.e2e.trace OUT.jsonl [--sessions 16 --turns 8 ...]
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from kvd.bench.e2e.model import SPECIALS, ModelShape, words

TEMPLATE_TOKENS = 3  # "<|role|>" and "<|end|>" around a message, "<|assistant|>" to answer


@dataclass(frozen=True)
class TraceShape:
    """Sessions x turns; the first prompt ``first_tokens`` long, the last ``last_tokens``
    (the system text included); ``output_tokens`` a reply; ``pause_ms`` +- ``jitter_ms``
    between turns."""

    sessions: int = 16
    turns: int = 8
    first_tokens: int = 1000
    last_tokens: int = 4000
    system_tokens: int = 300
    output_tokens: int = 16
    pause_ms: float = 1500.0
    jitter_ms: float = 500.0
    seed: int = 0


def make_trace(shape: TraceShape, vocab: int = ModelShape().vocab) -> list[dict]:
    """The sessions of ``shape``, the same for the same shape."""
    if shape.sessions <= 0 or shape.turns <= 0 or shape.output_tokens <= 0:
        raise ValueError("sessions, turns and output tokens must be positive")
    if not shape.system_tokens + 2 * TEMPLATE_TOKENS < shape.first_tokens <= shape.last_tokens:
        raise ValueError("need system tokens < first prompt tokens <= last prompt tokens")
    vocabulary = words(vocab - len(SPECIALS))
    rng = random.Random(shape.seed)

    def text(n: int) -> str:
        return " ".join(rng.choice(vocabulary) for _ in range(max(1, n)))

    system = text(shape.system_tokens) if shape.system_tokens else None
    growth = (shape.last_tokens - shape.first_tokens) / max(1, shape.turns - 1)
    first_user = shape.first_tokens - (shape.system_tokens + TEMPLATE_TOKENS if system else 0) - TEMPLATE_TOKENS
    later_user = max(1, int(growth) - shape.output_tokens - 2 * TEMPLATE_TOKENS)
    sessions = []
    for s in range(shape.sessions):
        turns: list[dict] = [{"role": "system", "text": system}] if system else []
        turns.append({"text": text(first_user), "output_length": shape.output_tokens})
        for _ in range(1, shape.turns):
            delay = max(0.0, shape.pause_ms + rng.uniform(-shape.jitter_ms, shape.jitter_ms))
            turns.append({"text": text(later_user), "delay": round(delay), "output_length": shape.output_tokens})
        sessions.append({"session_id": f"agent-{s:03d}", "turns": turns})
    return sessions


def write_trace(path: Path, shape: TraceShape) -> None:
    path.write_text("".join(json.dumps(s) + "\n" for s in make_trace(shape)))


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m kvd.bench.e2e.trace")
    p.add_argument("out", type=Path)
    for name, value in asdict(TraceShape()).items():
        p.add_argument(f"--{name.replace('_', '-')}", type=type(value), default=value)
    args = p.parse_args(argv)
    write_trace(args.out, TraceShape(**{k: getattr(args, k) for k in asdict(TraceShape())}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
