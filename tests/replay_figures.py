"""Exact replay figures: record them, or replay and compare.

The core's retention and placement decide every figure `kvd replay` reports, and the replay
is deterministic, so a change meant to keep behaviour keeps every figure to the last bit.
``tests/data/replay_figures.json`` holds the figures of each case below (the whole summary
of each policy except its wall time, and with an HBM tier the floor's: the same trace with
nothing ever transferred). The ``fast`` cases run in tests/test_replay_figures.py;
the others take minutes of CPU (``make replay-figures``)::

    python tests/replay_figures.py check [--fast] [--jobs N] [CASE ...]
    python tests/replay_figures.py record [--jobs N] [CASE ...]

``record`` rewrites the named cases (all, by default) and keeps the others.
"""

from __future__ import annotations

import argparse
import json
import sys
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from kvd.replay.cli import parse_capacity
from kvd.replay.sim import ReplayConfig, floor, replay
from kvd.replay.trace import Trace, read_trace
from kvd.replay.workload import AgenticConfig, generate_agentic

HERE = Path(__file__).resolve().parent
FIGURES = HERE / "data" / "replay_figures.json"
TRACES = HERE.parent / "traces"
HEAD = 2000  # requests of the conversation trace in the "head" case
POLICIES = ("lru", "typed", "belady")
TIGHT = {"hbm": "300blocks", "dram": "400blocks", "nvme": "400blocks"}
ROOMY = {"hbm": "1100blocks", "dram": "5500blocks", "nvme": "40000blocks"}
TIGHT_1024 = {"hbm": "75blocks", "dram": "100blocks", "nvme": "100blocks"}
ROOMY_1024 = {"hbm": "275blocks", "dram": "1375blocks", "nvme": "10000blocks"}


@dataclass(frozen=True)
class Case:
    """One replay setting. ``trace``: ``agentic:SESSIONS:SEED[:BLOCK_TOKENS]`` (generated), a
    file in traces/ (its format detected), or ``head`` (the conversation trace's first ``HEAD`` requests)."""

    name: str
    trace: str
    tiers: dict[str, str]
    fast: bool = False
    pause_hints: str = "none"
    resume_lead_s: float = 0.0
    engines: int = 0
    session_end_after_s: float | None = None
    session_gap_s: float | None = None  # aiperf traces: sessions staggered by this mean gap

    def load(self) -> Trace:
        if self.trace.startswith("agentic:"):
            sessions, seed, *block = map(int, self.trace.split(":")[1:])
            return generate_agentic(AgenticConfig(sessions=sessions, seed=seed, block_size=block[0] if block else 256)).trace
        if self.trace == "head":
            whole = read_trace(TRACES / "mooncake_conversation.jsonl")
            return Trace(whole.format, whole.requests[:HEAD], whole.block_size)
        return read_trace(TRACES / self.trace, session_gap_s=self.session_gap_s)

    def run(self) -> dict:
        trace = self.load()
        block_bytes = trace.block_size * ReplayConfig().cost.bytes_per_token
        sizes = {f"{t}_bytes": parse_capacity(self.tiers.get(t, "0"), block_bytes) for t in ("hbm", "dram", "nvme")}
        config = ReplayConfig(
            **sizes,
            pause_hints=self.pause_hints,
            resume_lead_s=self.resume_lead_s,
            engines=self.engines,
            session_end_after_s=self.session_end_after_s,
        )
        out = {}
        for policy in POLICIES:
            summary = replay(trace, policy, config).summary()
            del summary["wall_s"]
            out[policy] = summary
        if self.tiers.get("hbm"):
            # What the same trace costs with nothing ever transferred (placement's limit).
            out["floor"] = floor(trace, config).summary()
            del out["floor"]["wall_s"]
        return out


CASES = [
    Case("head-1000", "head", {"dram": "1000blocks"}, fast=True),
    # The agentic settings below with 1,024-token blocks: a quarter of the blocks, in seconds.
    Case("agentic20-s1-b1024-tight", "agentic:20:1:1024", TIGHT_1024, fast=True),
    Case("agentic20-s1-b1024-roomy", "agentic:20:1:1024", ROOMY_1024, fast=True),
    Case("agentic20-s1-b1024-roomy-exact", "agentic:20:1:1024", ROOMY_1024, fast=True, pause_hints="exact"),
    Case("agentic20-s1-b1024-roomy-lead", "agentic:20:1:1024", ROOMY_1024, fast=True, resume_lead_s=0.5),
    Case("agentic20-s1-b1024-roomy-engines", "agentic:20:1:1024", ROOMY_1024, fast=True, engines=2),
    Case("head-1000-end30", "head", {"dram": "1000blocks"}, fast=True, session_end_after_s=30.0),
    Case("conversation-5000", "mooncake_conversation.jsonl", {"dram": "5000blocks"}),
    Case("conversation-10000", "mooncake_conversation.jsonl", {"dram": "10000blocks"}),
    Case("synthetic-5000", "mooncake_synthetic.jsonl", {"dram": "5000blocks"}),
    *(Case(f"agentic60-s{s}-tight", f"agentic:60:{s}", TIGHT) for s in range(5)),
    *(Case(f"agentic60-s{s}-roomy", f"agentic:60:{s}", ROOMY) for s in range(5)),
    Case("agentic60-s1-one-tier", "agentic:60:1", {"dram": "1100blocks"}),
    Case("agentic60-s1-roomy-exact", "agentic:60:1", ROOMY, pause_hints="exact"),
    *(Case(f"agentic60-s{s}-roomy-lead", f"agentic:60:{s}", ROOMY, resume_lead_s=0.5) for s in range(5)),
    *(Case(f"agentic60-s{s}-roomy-engines", f"agentic:60:{s}", ROOMY, engines=2) for s in range(5)),
    Case("conversation-5000-end30", "mooncake_conversation.jsonl", {"dram": "5000blocks"}, session_end_after_s=30.0),
    Case("conversation-10000-end30", "mooncake_conversation.jsonl", {"dram": "10000blocks"}, session_end_after_s=30.0),
    Case("aiperf300-1000", "aiperf_agentic_code_300.jsonl", {"dram": "1000blocks"}, session_gap_s=2.0),
    Case("aiperf300-2000", "aiperf_agentic_code_300.jsonl", {"dram": "2000blocks"}, session_gap_s=2.0),
]
BY_NAME = {c.name: c for c in CASES}


def differences(expected: dict, got: dict, path: str = "") -> list[str]:
    """Every leaf where ``got`` differs from ``expected`` (floats compared exactly)."""
    if isinstance(expected, dict) and isinstance(got, dict):
        out = []
        for key in sorted(set(expected) | set(got)):
            if key not in got or key not in expected:
                out.append(f"{path}{key}: {expected.get(key, '(absent)')!r} -> {got.get(key, '(absent)')!r}")
            else:
                out += differences(expected[key], got[key], f"{path}{key}.")
        return out
    return [] if expected == got else [f"{path[:-1]}: {expected!r} -> {got!r}"]


def _run(name: str) -> tuple[str, dict]:
    return name, BY_NAME[name].run()


def run_cases(names: list[str], jobs: int) -> dict[str, dict]:
    if jobs <= 1:
        return dict(map(_run, names))
    with ProcessPoolExecutor(jobs) as pool:
        return dict(pool.map(_run, names))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("action", choices=("check", "record"))
    p.add_argument("cases", nargs="*", help="case names (default: all)")
    p.add_argument("--fast", action="store_true", help="only the cases the test suite runs")
    p.add_argument("--jobs", type=int, default=1, help="replays in parallel processes")
    args = p.parse_args(argv)
    unknown = [n for n in args.cases if n not in BY_NAME]
    if unknown:
        print(f"replay_figures: unknown case {', '.join(unknown)}; known: {', '.join(BY_NAME)}", file=sys.stderr)
        return 2
    names = args.cases or [c.name for c in CASES if c.fast or not args.fast]
    stored = json.loads(FIGURES.read_text()) if FIGURES.exists() else {}
    results = run_cases(names, args.jobs)
    failed = False
    for name, figures in results.items():
        if args.action == "record":
            stored[name] = figures
            print(f"{name}: recorded")
        elif name not in stored:
            print(f"{name}: no recorded figures")
            failed = True
        else:
            diff = differences(stored[name], figures)
            print(f"{name}: " + ("identical" if not diff else f"{len(diff)} differences"))
            for line in diff[:20]:
                print(f"  {line}")
            failed = failed or bool(diff)
    if args.action == "record":
        FIGURES.parent.mkdir(exist_ok=True)
        FIGURES.write_text(json.dumps({n: stored[n] for n in BY_NAME if n in stored}, indent=1) + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
