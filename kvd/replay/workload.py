"""`kvd gen-workload agentic`: a synthetic trace of coding agents, in kvd's session format.

Modelled on llm-d's agentic code-generation preset — llm-d/llm-d-benchmark,
``workload/profiles/inference-perf/agentic_code_generation.yaml.in`` — which drives
inference-perf's ``conversation_replay`` data generator (kubernetes-sigs/inference-perf,
``inference_perf/datagen/conversation_replay_datagen.py``). Its parameters, all lognormal
with the *lognormal's own* mean and standard deviation (moment-matched, then clipped to
``[min, max]``, as inference-perf's ``sample_from_distribution`` does):

==========================  ===================================  ===================================
preset field                preset value                         here
==========================  ===================================  ===================================
shared_system_prompt_len    3,000 tokens                         the same, shared by every session
dynamic_system_prompt_len   mean 160K, sd 233.6K, 10K..990K      repository context: same mean/sd,
                                                                 clipped to 10K..150K, one length a
                                                                 *repository*, shared by its sessions
input_tokens_per_turn       mean 1,500, sd 1,200, 100..10K       turn 0: the user's task, the same;
                                                                 later turns: tool output, per tool
                                                                 (mixture mean ~1,500, see TOOLS)
output_tokens_per_turn      mean 425, sd 825, 50..10K            the same
tool_call_latency_sec       mean 15, sd 55, 1..100 s             per tool (see TOOLS), mixture mean
                                                                 ~15 s after the clip to 1..100 s
turns_per_conversation      mean 540, sd 48.6K, 1..3,000         mean 15, sd 10, 5..40
max_model_len               262,144                              ``max_context_tokens``
==========================  ===================================  ===================================

Where and why kvd departs from the preset:

- The preset gives every conversation its own "dynamic system prompt". Coding agents share a
  repository: here each of ``repos`` repositories has one context, and each session works on
  one repository picked uniformly — so sessions of a repository share its blocks, typed
  retention's ``shared_prefix`` class. The 150K clip (vs 990K) keeps a repository plus ~40
  turns of ~1.9K tokens inside the 262K window; ~30% of repositories sit at it.
- The preset's tool latency clipped to 1..100 s has mean ~12 s and median ~4 s. kvd's target
  workload has lognormal tool pauses with a mean of ~15 s; kvd also wants the tool to
  *predict* the pause (the ``tool_pause`` class), so each tool has its own lognormal,
  calibrated so that the mixture, after the same clip, has a mean of ~15 s with a rare tail
  at the 100 s cap.
- The preset's turn count (median ~6, a tail clipped at 3,000 that the context window cuts at
  ~130) is replaced by a bounded 5..40 so that a 60-session replay stays small.

Sessions start as a Poisson process (``session_rate`` per second; the first at 0). Turn
``k+1``'s prompt is turn ``k``'s prompt + turn ``k``'s output + the new tool output, so its
``hash_ids`` begin with every *full* block id of turn ``k``. Block ids name prefixes: block
``j``'s id stands for the content of tokens ``[0, (j+1)·block_size)``, so

- the system prompt's full blocks have the same ids in every session;
- a repository's blocks — from the one that straddles the system-prompt boundary to its last
  full block — have the same ids in its sessions; the block that straddles the end of the
  repository holds session tokens, so it is the session's first private block;
- a turn's last, partial block gets a fresh id, never reused: the next turn fills the rest of
  that block with new tokens, its content (and so its hash) changes. An engine that hashes
  only full blocks (vLLM) would not keep the partial block either.

Timestamps: a session's first turn arrives at its start; later turns carry ``pause_s`` (the
tool's run time), and their ``timestamp`` is an *estimate* (the previous turn's arrival, its
new tokens at 12,000 tokens/s, its output at 12 ms a token — `kvd replay`'s cost model — plus
the pause). The replay schedules them closed loop from ``pause_s``; the timestamps only order
the file and inform estimates of the future. Lines are written in timestamp order.

Default block size: 256 tokens (LMCache's default chunk size; vLLM pages are 16). The
replay's cost is per block id: the default 60 sessions (seeds 0-4) average 93K-138K tokens a
prompt, 300K-570K ids in all at 256 tokens a block — about as many as Mooncake's 12,031-request
conversation trace (288K at 512) — and 16 times that at 16 tokens. Larger blocks cost little
fidelity: the partial block a turn re-hashes loses half a block on average, ~128 tokens, next
to ~1,900 new tokens a turn.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import numpy as np

from kvd.replay.trace import Trace, TraceRequest


@dataclass(frozen=True)
class Lognormal:
    """A lognormal given by its own ``mean`` and ``std`` (not the underlying normal's), each
    draw clipped to ``[low, high]`` — inference-perf's parameterisation."""

    mean: float
    std: float
    low: float
    high: float

    def __post_init__(self) -> None:
        if not (self.mean > 0 and self.std >= 0 and 0 <= self.low <= self.high):
            raise ValueError(f"bad lognormal {self}: need mean > 0, std >= 0, 0 <= low <= high")

    def sample(self, rng: np.random.Generator, size: int) -> np.ndarray:
        """``size`` float draws."""
        sigma2 = math.log1p((self.std / self.mean) ** 2)
        mu = math.log(self.mean) - sigma2 / 2
        return np.clip(rng.lognormal(mu, math.sqrt(sigma2), size), self.low, self.high)

    def tokens(self, rng: np.random.Generator, size: int) -> np.ndarray:
        """``size`` integer draws (rounded, as inference-perf does for token counts)."""
        return np.rint(self.sample(rng, size)).astype(np.int64)


@dataclass(frozen=True)
class Tool:
    """A tool an agent calls between turns: how often, how long it runs (seconds), and how
    many tokens of output it appends to the context."""

    name: str
    weight: float
    pause_s: Lognormal
    output_tokens: Lognormal


# kvd's own calibration (the preset has one latency for all tools): reading a file is quick,
# a shell command takes longer, a test run longest and most variable. Output sizes: a file's
# contents and test logs are long, an edit's confirmation short. Mixture: pause mean ~15 s
# after the 1..100 s clip; output mean ~1,500 tokens like the preset's input_tokens_per_turn.
TOOLS: tuple[Tool, ...] = (
    Tool("read_file", 0.35, Lognormal(2.5, 2.0, 1, 100), Lognormal(2000, 1600, 100, 10_000)),
    Tool("edit_file", 0.20, Lognormal(4.0, 3.0, 1, 100), Lognormal(400, 320, 100, 10_000)),
    Tool("bash", 0.30, Lognormal(17.0, 25.0, 1, 100), Lognormal(1200, 960, 100, 10_000)),
    Tool("run_tests", 0.15, Lognormal(62.0, 40.0, 1, 100), Lognormal(2500, 2000, 100, 10_000)),
)


@dataclass(frozen=True)
class AgenticConfig:
    """The generator's parameters; token counts in tokens, times in seconds."""

    sessions: int = 60
    seed: int = 0
    block_size: int = 256
    repos: int = 8
    session_rate: float = 0.1  # session starts per second (Poisson)
    max_context_tokens: int = 262_144  # the preset's max_model_len: prompt + output of a turn
    system_prompt_tokens: int = 3000
    repo_tokens: Lognormal = Lognormal(160_000, 233_600, 10_000, 150_000)
    task_tokens: Lognormal = Lognormal(1500, 1200, 100, 10_000)  # turn 0's new input
    output_tokens: Lognormal = Lognormal(425, 825, 50, 10_000)
    turns: Lognormal = Lognormal(15, 10, 5, 40)
    tools: tuple[Tool, ...] = TOOLS
    prefill_tokens_per_s: float = 12_000.0  # for the timestamp estimates only (kvd replay's CostModel)
    decode_s_per_token: float = 0.012

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first bad parameter."""
        positive = {
            "sessions": self.sessions,
            "block_size": self.block_size,
            "repos": self.repos,
            "session_rate": self.session_rate,
            "prefill_tokens_per_s": self.prefill_tokens_per_s,
        }
        for name, value in positive.items():
            if not value > 0:
                raise ValueError(f"{name} must be positive, got {value}")
        if self.system_prompt_tokens < 0 or self.decode_s_per_token < 0:
            raise ValueError("system_prompt_tokens and decode_s_per_token must be >= 0")
        if not self.tools or any(t.weight < 0 for t in self.tools) or sum(t.weight for t in self.tools) <= 0:
            raise ValueError("tools need non-negative weights with a positive sum")
        if self.turns.low < 1:
            raise ValueError("a session has at least one turn (turns.low >= 1)")
        # Turn 0 must fit even at its largest: the system prompt, the largest repository, the
        # largest task and the largest output. Later turns stop the session when they would not fit.
        first = self.system_prompt_tokens + self.repo_tokens.high + self.task_tokens.high + self.output_tokens.high
        if self.max_context_tokens < first:
            raise ValueError(
                f"max_context_tokens must be at least {int(first)} (system prompt + largest repository "
                f"+ largest first prompt + largest output), got {self.max_context_tokens}"
            )


@dataclass(frozen=True)
class AgenticWorkload:
    """A generated trace and what the generator knows about it (for tests and summaries)."""

    config: AgenticConfig
    trace: Trace
    repo_tokens: tuple[int, ...]  # context length of each repository
    session_repo: dict[str, int] = field(default_factory=dict)  # session id -> repository

    def summary(self) -> dict[str, float | int]:
        """Counts, and token and pause statistics (tokens; seconds)."""
        reqs = self.trace.requests
        by_session: dict[str, list[TraceRequest]] = {}
        for r in reqs:
            by_session.setdefault(r.session_id or "", []).append(r)
        final = np.array([turns[-1].input_length + turns[-1].output_length for turns in by_session.values()])
        turns = np.array([len(t) for t in by_session.values()])
        pauses = np.array([r.pause_s for r in reqs if r.pause_s is not None])
        return {
            "sessions": len(by_session),
            "requests": len(reqs),
            "turns_mean": float(turns.mean()),
            "turns_min": int(turns.min()),
            "turns_max": int(turns.max()),
            "final_context_tokens_mean": float(final.mean()),
            "final_context_tokens_max": int(final.max()),
            "prompt_tokens_mean": float(np.mean([r.input_length for r in reqs])),
            "pause_s_mean": float(pauses.mean()) if pauses.size else 0.0,
            "pause_s_p50": float(np.median(pauses)) if pauses.size else 0.0,
            "pause_s_p99": float(np.percentile(pauses, 99)) if pauses.size else 0.0,
            "unique_blocks": len({h for r in reqs for h in r.hash_ids}),
            "span_s": max(r.arrival_s for r in reqs),
        }


@dataclass
class _Turn:
    session: int
    turn: int
    arrival_s: float
    input_length: int
    output_length: int
    hash_ids: tuple[int, ...]
    tool: str | None
    pause_s: float | None
    last: bool = False


def generate_agentic(config: AgenticConfig | None = None) -> AgenticWorkload:
    """Generate the workload; the same config (seed included) gives the same trace."""
    cfg = config or AgenticConfig()
    cfg.validate()
    rng = np.random.default_rng(cfg.seed)
    bs = cfg.block_size
    next_id = itertools.count().__next__

    system_ids = [next_id() for _ in range(cfg.system_prompt_tokens // bs)]
    repo_tokens = [int(n) for n in cfg.repo_tokens.tokens(rng, cfg.repos)]
    # A repository's blocks are the full blocks of system prompt + repository beyond the
    # system prompt's own (the first straddles the boundary: its content includes repo tokens).
    repo_ids = [
        [next_id() for _ in range((cfg.system_prompt_tokens + n) // bs - len(system_ids))] for n in repo_tokens
    ]
    repo_of = rng.integers(0, cfg.repos, cfg.sessions)
    turn_counts = np.rint(cfg.turns.sample(rng, cfg.sessions)).astype(np.int64)
    gaps = rng.exponential(1.0 / cfg.session_rate, cfg.sessions)
    starts = np.concatenate(([0.0], np.cumsum(gaps[1:])))
    weights = np.array([t.weight for t in cfg.tools], dtype=float)
    weights /= weights.sum()

    turns: list[_Turn] = []
    for s in range(cfg.sessions):
        repo = int(repo_of[s])
        n_turns = int(turn_counts[s])
        tools = rng.choice(len(cfg.tools), size=n_turns, p=weights)
        outputs = cfg.output_tokens.tokens(rng, n_turns)
        full = system_ids + repo_ids[repo]  # ids of the session's full blocks so far
        context = cfg.system_prompt_tokens + repo_tokens[repo]  # tokens before this turn's new input
        arrival = round(float(starts[s]), 3)
        session_turns: list[_Turn] = []
        computed = 0  # tokens the previous turn prefilled with a warm cache (for the estimate)
        for k in range(n_turns):
            if k == 0:
                tool, pause = None, None
                new = int(cfg.task_tokens.tokens(rng, 1)[0])
            else:
                spec = cfg.tools[int(tools[k])]
                tool = spec.name
                pause = round(float(spec.pause_s.sample(rng, 1)[0]), 3)
                new = int(spec.output_tokens.tokens(rng, 1)[0])
            prompt = context + new
            if prompt >= cfg.max_context_tokens:
                break  # no room left for a single output token: the session ends (as in the preset)
            output = min(int(outputs[k]), cfg.max_context_tokens - prompt)
            if k > 0:
                prev = session_turns[-1]
                service = computed / cfg.prefill_tokens_per_s + prev.output_length * cfg.decode_s_per_token
                arrival = round(prev.arrival_s + service + pause, 3)
            while len(full) < prompt // bs:
                full.append(next_id())
            partial = [next_id()] if prompt % bs else []  # changes next turn: a fresh id, never reused
            session_turns.append(_Turn(s, k, arrival, prompt, output, tuple(full) + tuple(partial), tool, pause))
            computed = prompt - (session_turns[-2].input_length if k > 0 else 0)
            context = prompt + output
        session_turns[-1].last = True
        turns.extend(session_turns)

    turns.sort(key=lambda t: (t.arrival_s, t.session, t.turn))
    requests = [
        TraceRequest(
            index=i,
            arrival_s=t.arrival_s,
            input_length=t.input_length,
            output_length=t.output_length,
            hash_ids=t.hash_ids,
            block_size=bs,
            session_id=_session_name(t.session),
            turn=t.turn,
            tool=t.tool,
            pause_s=t.pause_s,
            last=t.last,
        )
        for i, t in enumerate(turns)
    ]
    return AgenticWorkload(
        config=cfg,
        trace=Trace(format="kvd", requests=requests, block_size=bs),
        repo_tokens=tuple(repo_tokens),
        session_repo={_session_name(s): int(repo_of[s]) for s in range(cfg.sessions)},
    )


def _session_name(index: int) -> str:
    return f"agent-{index:04d}"


def write_trace(requests: Iterable[TraceRequest], out: IO[str]) -> int:
    """Write requests as kvd-format JSONL (:mod:`kvd.replay.trace`); returns the number of lines.
    Optional fields are written only when set, ``block_size`` always."""
    n = 0
    for r in requests:
        line: dict[str, object] = {
            "timestamp": r.arrival_s,
            "input_length": r.input_length,
            "output_length": r.output_length,
            "hash_ids": list(r.hash_ids),
            "block_size": r.block_size,
        }
        if r.session_id is not None:
            line["session_id"] = r.session_id
        if r.turn is not None:
            line["turn"] = r.turn
        if r.tool is not None:
            line["tool"] = r.tool
        if r.pause_s is not None:
            line["pause_s"] = r.pause_s
        if r.last:
            line["last"] = True
        out.write(json.dumps(line, separators=(",", ":")))
        out.write("\n")
        n += 1
    return n



# -- the command line -------------------------------------------------------------------------


def _typed(convert: type, check: str) -> Callable[[str], object]:
    """An argparse type: ``convert`` the text, then require ``> 0`` or ``>= 0``."""

    def parse(text: str) -> object:
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if not (value > 0 if check == "positive" else value >= 0) or not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"must be {'> 0' if check == 'positive' else '>= 0'}, got {text}")
        return value

    return parse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``kvd gen-workload agentic``."""
    parser.description = (
        "Write a kvd-format JSONL trace of coding-agent sessions modelled on llm-d's agentic "
        "code-generation preset: a shared 3,000-token system prompt, repository contexts shared by "
        "their sessions, tool outputs and pauses per tool (closed loop, pause_s), chained block ids."
    )
    d = AgenticConfig()
    pos_int, pos_float = _typed(int, "positive"), _typed(float, "positive")
    parser.add_argument("--sessions", type=pos_int, default=d.sessions, help=f"agent sessions (default {d.sessions})")
    parser.add_argument("--seed", type=_typed(int, "non-negative"), default=d.seed, help="random seed (default 0)")
    parser.add_argument(
        "--block-size", type=pos_int, default=d.block_size, help=f"tokens per hash id (default {d.block_size})"
    )
    parser.add_argument("--repos", type=pos_int, default=d.repos, help=f"repositories (default {d.repos})")
    parser.add_argument(
        "--session-rate", type=pos_float, default=d.session_rate, help="session starts per second (default 0.1)"
    )
    parser.add_argument(
        "--max-context-tokens",
        type=pos_int,
        default=d.max_context_tokens,
        help=f"context window: prompt + output of a turn (default {d.max_context_tokens})",
    )
    parser.add_argument("--out", type=Path, metavar="FILE", help="write the trace here (default: stdout)")


def run_cli(args: argparse.Namespace) -> int:
    """Generate, write, and print a one-line summary on stderr. Exit 2 for a bad
    configuration, 1 when the file cannot be written."""
    cfg = AgenticConfig(
        sessions=args.sessions,
        seed=args.seed,
        block_size=args.block_size,
        repos=args.repos,
        session_rate=args.session_rate,
        max_context_tokens=args.max_context_tokens,
    )
    try:
        workload = generate_agentic(cfg)
    except ValueError as exc:
        print(f"kvd gen-workload agentic: error: {exc}", file=sys.stderr)
        return 2
    try:
        if args.out is None:
            write_trace(workload.trace.requests, sys.stdout)
        else:
            with open(args.out, "w", encoding="utf-8") as f:
                write_trace(workload.trace.requests, f)
    except OSError as exc:
        print(f"kvd gen-workload agentic: cannot write {args.out}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    s = workload.summary()
    print(
        f"kvd gen-workload agentic: {s['sessions']} sessions, {s['requests']} requests, "
        f"{s['turns_mean']:.1f} turns a session, {s['prompt_tokens_mean']:,.0f} tokens a prompt, "
        f"mean pause {s['pause_s_mean']:.1f} s, {s['unique_blocks']:,} blocks of {cfg.block_size} tokens"
        + (f" -> {args.out}" if args.out is not None else ""),
        file=sys.stderr,
    )
    return 0
