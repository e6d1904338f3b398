"""`kvd replay TRACE`: the command line over :mod:`kvd.replay.sim`."""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Callable
from dataclasses import asdict, fields, replace
from pathlib import Path

from kvd.core.sessions import MAX_EXPECTED_PAUSE_S
from kvd.policies import POLICIES
from kvd.replay.cost import CLUSTER_LINKS, CostModel
from kvd.replay.nodes import NodesConfig, replay_nodes
from kvd.replay.nodes_report import Setting, make_nodes_report, print_nodes_table
from kvd.replay.result import PolicyResult, floor_summary
from kvd.replay.sim import PAUSE_HINTS, ReplayConfig, floor, replay
from kvd.replay.trace import FORMATS, TraceError, read_trace
from kvd.sizes import parse_size

DEFAULT_POLICIES = "lru,typed,belady"


def add_arguments(p: argparse.ArgumentParser) -> None:
    c = CostModel()
    p.add_argument("trace", type=Path, metavar="TRACE", help="a JSONL trace (Mooncake, Bailian or kvd format)")
    p.add_argument("--format", default="auto", choices=("auto", *FORMATS), help="trace format (default auto)")
    p.add_argument("--policy", default=DEFAULT_POLICIES, help=f"policies to compare, comma-separated (default {DEFAULT_POLICIES})")
    for tier, default in (("hbm", "0"), ("dram", "64GiB"), ("nvme", "0")):
        p.add_argument(
            f"--{tier}",
            default=default,
            metavar="SIZE",
            help=f"{tier.upper()} capacity: bytes (e.g. 320GiB) or blocks (e.g. 5000blocks); 0: absent (default {default})",
        )
    p.add_argument("--block-size", type=int, help="tokens per block (default: the trace's)")
    p.add_argument("--bytes-per-token", type=int, default=c.bytes_per_token, help=f"KV bytes per token (default {c.bytes_per_token}, Llama-3.1-8B bf16)")
    p.add_argument("--prefill-tokens-per-s", type=float, default=c.prefill_tokens_per_s, help=f"recompute speed (default {c.prefill_tokens_per_s:g})")
    p.add_argument("--decode-s-per-token", type=float, default=c.decode_s_per_token, help=f"decode time per output token (default {c.decode_s_per_token:g})")
    p.add_argument("--hbm-read-gbps", type=float, default=c.hbm_read_gbps, help=f"kvd HBM pool -> engine (default {c.hbm_read_gbps:g})")
    p.add_argument("--dram-to-hbm-gbps", type=float, default=c.dram_to_hbm_gbps, help=f"(default {c.dram_to_hbm_gbps:g})")
    p.add_argument("--hbm-to-dram-gbps", type=float, default=c.hbm_to_dram_gbps, help=f"(default {c.hbm_to_dram_gbps:g})")
    p.add_argument("--nvme-to-dram-gbps", type=float, default=c.nvme_to_dram_gbps, help=f"(default {c.nvme_to_dram_gbps:g})")
    p.add_argument("--dram-to-nvme-gbps", type=float, default=c.dram_to_nvme_gbps, help=f"(default {c.dram_to_nvme_gbps:g})")
    p.add_argument(
        "--cluster-to-dram-gbps", type=float, default=c.cluster_to_dram_gbps,
        help=f"a get from the cluster tier (default {c.cluster_to_dram_gbps:g}: Mooncake over TCP, measured)",
    )
    p.add_argument(
        "--dram-to-cluster-gbps", type=float, default=c.dram_to_cluster_gbps,
        help=f"a put to the cluster tier, one block at a time (default {c.dram_to_cluster_gbps:g}: measured)",
    )
    p.add_argument(
        "--nodes", type=int, default=1, metavar="N",
        help="N nodes, each with the tiers and engines above, behind a prefix- and load-aware router (default 1)",
    )
    p.add_argument(
        "--cluster", default="0", metavar="SIZE",
        help="with --nodes: a cluster tier (a Mooncake Store every node reads) of SIZE over all nodes, "
        "run beside the same nodes without it; bytes or blocks as --dram (default 0: none)",
    )
    p.add_argument(
        "--migrate-p", type=float, default=0.0, metavar="P",
        help="with --nodes: each resumed turn goes to another node than its previous turn's with probability P "
        "(seed: --seed; default 0)",
    )
    p.add_argument(
        "--pause-hints", default="none", choices=PAUSE_HINTS,
        help="what a tool pause event tells kvd: none (the tool's name; default) or exact (also the pause's true length)",
    )
    p.add_argument(
        "--engines", type=int, default=0, metavar="N",
        help="N engines on the node, each running one prefill at a time from a FIFO queue (default 0: no queueing)",
    )
    p.add_argument(
        "--resume-lead-s", type=float, default=0.0, metavar="S",
        help="the agent framework announces each turn S seconds before it arrives (default 0: never)",
    )
    p.add_argument(
        "--session-end-after", type=float, metavar="S",
        help="for traces without `last`: the application reports a conversation's end S seconds after its last turn",
    )
    p.add_argument(
        "--session-gap-s", type=float, metavar="MEAN",
        help="aiperf traces: start the sessions one after another, exponential gaps of this mean (seed: --seed)",
    )
    p.add_argument("--seed", type=int, default=0, help="the seed of --session-gap-s and --migrate-p (default 0)")
    p.add_argument("--json", type=Path, metavar="FILE", help="write the report as JSON")
    p.add_argument("--plot", type=Path, metavar="FILE.png", help="draw the policies side by side (needs matplotlib)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar, even on a terminal")


def parse_capacity(text: str, block_bytes: int) -> int:
    """Bytes from ``SIZE`` (``parse_size``) or ``Nblocks``."""
    t = text.strip().lower()
    if t.endswith("blocks"):
        count = t[: -len("blocks")].strip()
        if not count.isdigit():
            raise ValueError(f"invalid capacity {text!r}: expected a whole number of blocks, e.g. 5000blocks")
        return int(count) * block_bytes
    return parse_size(text)


def run_cli(args: argparse.Namespace) -> int:
    try:
        return _run(args)
    except (TraceError, ValueError, OSError) as exc:
        print(f"kvd replay: {exc}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    policies = [p.strip() for p in args.policy.split(",") if p.strip()]
    unknown = [p for p in policies if p not in POLICIES]
    if unknown or not policies:
        raise ValueError(f"unknown policy {', '.join(unknown) or '(none)'}; known: {', '.join(sorted(POLICIES))}")
    for f in fields(CostModel):
        value = getattr(args, f.name)
        flag = f"--{f.name.replace('_', '-')}"
        if f.name == "decode_s_per_token":
            if not value >= 0:
                raise ValueError(f"{flag} must not be negative")
        elif not value > 0:
            raise ValueError(f"{flag} must be positive")
    if args.block_size is not None and args.block_size <= 0:
        raise ValueError("--block-size must be positive")
    if args.engines < 0:
        raise ValueError("--engines must not be negative")
    for flag, value in (("--resume-lead-s", args.resume_lead_s), ("--session-end-after", args.session_end_after)):
        if value is not None and not (math.isfinite(value) and 0 <= value <= MAX_EXPECTED_PAUSE_S):
            raise ValueError(f"{flag} must be in [0, {MAX_EXPECTED_PAUSE_S:.0f}] seconds")
    if args.session_gap_s is not None and not (math.isfinite(args.session_gap_s) and args.session_gap_s > 0):
        raise ValueError("--session-gap-s must be a positive number of seconds")
    if args.nodes < 1:
        raise ValueError("--nodes must be at least 1")
    if not 0.0 <= args.migrate_p <= 1.0:
        raise ValueError("--migrate-p must be in [0, 1]")
    if args.nodes < 2:
        if args.migrate_p:
            raise ValueError("--migrate-p needs --nodes 2 or more")
        if parse_capacity(args.cluster, 1):
            raise ValueError("--cluster needs --nodes 2 or more")
    elif args.plot is not None:
        raise ValueError("--plot draws one node's replay: not with --nodes 2 or more")
    for flag, out in (("--json", args.json), ("--plot", args.plot)):
        if out is not None:
            _check_output(flag, out)  # before the replay, not after it ran for minutes
    if args.plot is not None:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise ValueError("--plot needs matplotlib: pip install 'kvd[plot]'") from None
    trace = read_trace(args.trace, args.format, args.block_size, args.session_gap_s, args.seed)
    if not trace.requests:
        raise ValueError(f"{args.trace}: no requests")
    cost = CostModel(**{f.name: getattr(args, f.name) for f in fields(CostModel)})
    block_bytes = trace.block_size * cost.bytes_per_token
    config = ReplayConfig(
        hbm_bytes=parse_capacity(args.hbm, block_bytes),
        dram_bytes=parse_capacity(args.dram, block_bytes),
        nvme_bytes=parse_capacity(args.nvme, block_bytes),
        cost=cost,
        pause_hints=args.pause_hints,
        engines=args.engines,
        resume_lead_s=args.resume_lead_s,
        session_end_after_s=args.session_end_after,
    )
    show = not args.no_progress and sys.stderr.isatty()
    if args.nodes >= 2:
        nodes = NodesConfig(
            config, nodes=args.nodes, cluster_bytes=parse_capacity(args.cluster, block_bytes),
            migrate_p=args.migrate_p, seed=args.seed,
        )
        configs = {Setting.WITHOUT_CLUSTER: replace(nodes, cluster_bytes=0)}
        if nodes.cluster_bytes:
            configs[Setting.WITH_CLUSTER] = nodes
        keys = [(setting, name) for name in policies for setting in configs]
        runs = [
            (f"{name} {setting}", lambda progress, c=configs[setting], name=name: replay_nodes(trace, name, c, progress))
            for setting, name in keys
        ]
        results: dict[Setting, dict] = {setting: {} for setting in configs}
        for (setting, name), result in zip(keys, _each(len(trace.requests), runs, show)):
            results[setting][name] = result
        report = make_nodes_report(args.trace, trace, nodes, results)
        print_nodes_table(report)
        if args.json:
            args.json.write_text(json.dumps(report, indent=2) + "\n")
        return 0
    results = _replay_all(trace, policies, config, show)
    report = make_report(args.trace, trace, config, results, floor(trace, config))
    print_table(report)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    if args.plot:
        plot(report, args.plot)
    return 0


def _replay_all(trace, policies: list[str], config: ReplayConfig, show: bool) -> list[PolicyResult]:
    return _each(len(trace.requests), [(name, lambda progress, name=name: replay(trace, name, config, progress)) for name in policies], show)


def _each(requests: int, runs: list[tuple[str, Callable]], show: bool) -> list:
    """Each ``(label, run)`` in turn, ``run(progress)`` given a callback of the requests it
    served so far (None without a progress bar); their results in order."""
    bar = None
    if show:
        from tqdm import tqdm

        bar = tqdm(total=requests * len(runs), unit="req", file=sys.stderr, leave=False)
    results = []
    try:
        for label, run in runs:
            if bar is not None:
                bar.set_description(label)
            done = [0]

            def progress(n: int, done=done) -> None:
                if n - done[0] >= 200 or n == requests:
                    bar.update(n - done[0])
                    done[0] = n

            results.append(run(progress if bar is not None else None))
    finally:
        if bar is not None:
            bar.close()
    return results


def make_report(
    path: Path, trace, config: ReplayConfig, results: list[PolicyResult], floor_result: PolicyResult | None = None
) -> dict:
    block_bytes = trace.block_size * config.cost.bytes_per_token
    report = {
        "trace": str(path),
        "format": trace.format,
        "requests": len(trace.requests),
        "block_size": trace.block_size,
        "closed_loop": trace.closed_loop,
        "tiers": {t: {"bytes": b, "blocks": b // block_bytes} for t, b in config.capacities().items()},
        "cost_model": {k: v for k, v in asdict(config.cost).items() if k not in CLUSTER_LINKS},
        "pause_hints": config.pause_hints,
        "engines": config.engines,
        "resume_lead_s": config.resume_lead_s,
        "session_end_after_s": config.session_end_after_s,
        "policies": {r.policy: r.summary() for r in results},
    }
    if floor_result is not None:
        report["floor"] = floor_summary(floor_result)
    rates = {r.policy: r.hit_rate for r in results}
    if "lru" in rates and "belady" in rates:
        gap = rates["belady"] - rates["lru"]
        report["gap_closed"] = {
            name: (rate - rates["lru"]) / gap if gap > 0 else None
            for name, rate in rates.items()
            if name not in ("lru", "belady")
        }
    return report


LEGEND = (
    ("hit rate", "prompt tokens found held ÷ prompt tokens (higher is better); by tier: found in that tier"),
    ("HBM share", "reused bytes served from HBM ÷ all reused bytes (higher is better)"),
    ("KV wait s mean/p90", "seconds a turn waits for KV bytes on its critical path (lower is better)"),
    ("TTFT p50/p90/p99 s", "time to first token: queueing + KV wait + prefill of the rest (lower is better)"),
    ("session s mean/p90", "a session's first arrival to the end of its last turn (lower is better)"),
    ("wall s", "real seconds the replay of that policy took (every other time is simulated)"),
    ("recomputed", "prompt tokens prefilled because no tier held them (lower is better)"),
    ("compulsory", "tokens of blocks no earlier request stored: no policy finds them"),
    ("GB a->b", "bytes copied from tier a to tier b, in 10^9 bytes"),
    ("floor", "the same trace with nothing ever transferred (one HBM tier holds all): the limit of placement"),
    ("belady", "the offline oracle: evicts the block used furthest in the future, which no daemon can know"),
)


def print_table(report: dict) -> None:
    """The report for people: the latency table, the tokens and bytes table, and a legend."""
    tiers = ", ".join(f"{t} {v['blocks']} blocks" for t, v in report["tiers"].items())
    setting = []
    if report.get("pause_hints") == "exact":
        setting.append("exact pause hints")
    if report.get("engines"):
        setting.append(f"{report['engines']} engines")
    if report.get("resume_lead_s"):
        setting.append(f"turns announced {report['resume_lead_s']:g} s ahead")
    if report.get("session_end_after_s") is not None:
        setting.append(f"ends reported {report['session_end_after_s']:g} s after")
    extra = "".join(f", {x}" for x in setting)
    print(f"{report['trace']}: {report['requests']} requests ({report['format']}), {tiers}{extra}")
    print(
        f"{'policy':8} {'hit rate':>8} {'by tier':>26} {'HBM share':>9} {'KV wait s mean/p90':>18} "
        f"{'TTFT p50/p90/p99 s':>22} {'session s mean/p90':>20} {'wall s':>7}"
    )
    for name, r in report["policies"].items():
        by_tier = " ".join(f"{t}={v:.3f}" for t, v in r["hit_rate_by_tier"].items())
        ttft = "/".join(f"{r['ttft_s'][q]:.2f}" for q in ("p50", "p90", "p99"))
        done = f"{r['session_completion_s']['mean']:.1f}/{r['session_completion_s']['p90']:.1f}"
        kv = f"{r['kv_transfer_s']['mean']:.3f}/{r['kv_transfer_s']['p90']:.3f}"
        print(
            f"{name:8} {r['hit_rate']:8.4f} {by_tier:>26} {r['hbm_share_reused']:9.3f} {kv:>18} "
            f"{ttft:>22} {done:>20} {r['wall_s']:7.1f}"
        )
    floor_ = report.get("floor")
    if floor_ is not None:
        ttft = "/".join(f"{floor_['ttft_s'][q]:.2f}" for q in ("p50", "p90", "p99"))
        done = f"{floor_['session_completion_s']['mean']:.1f}/{floor_['session_completion_s']['p90']:.1f}"
        print(f"{'floor':8} {'':>8} {'':>26} {'':>9} {'0':>18} {ttft:>22} {done:>20}")
    print()
    _print_tokens_and_bytes(report["policies"])
    for name, closed in report.get("gap_closed", {}).items():
        if closed is not None:
            print(f"{name} closes {closed:.1%} of the hit-rate gap between lru and belady")
    print("legend:")
    width = max(len(term) for term, _ in LEGEND)
    for term, meaning in LEGEND:
        print(f"  {term:{width}}  {meaning}")


def _print_tokens_and_bytes(policies: dict) -> None:
    """Per policy: prompt, recomputed and compulsory tokens, and GB moved over each tier link."""
    links = sorted({link for r in policies.values() for link in r["bytes_moved"]})
    head = f"{'policy':8} {'prompt tokens':>14} {'recomputed':>14} {'compulsory':>14}"
    print(head + "".join(f" {'GB ' + link:>15}" for link in links) + ("" if links else "  GB moved: none"))
    for name, r in policies.items():
        moved = "".join(f" {r['bytes_moved'].get(link, 0) / 1e9:15,.1f}" for link in links)
        print(
            f"{name:8} {r['prompt_tokens']:14,} {r['recomputed_tokens']:14,} {r['compulsory_tokens']:14,}{moved}"
        )


def _check_output(flag: str, out: Path) -> None:
    """ValueError naming ``flag`` when ``out`` cannot be written: a directory, or in a
    directory that does not exist or that this process may not write."""
    if out.is_dir():
        raise ValueError(f"{flag} {out}: a directory, not a file")
    parent = out.parent
    if not parent.is_dir():
        raise ValueError(f"{flag} {out}: no directory {parent}")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"{flag} {out}: {parent} is not writable")


def plot(report: dict, out: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ValueError("--plot needs matplotlib: pip install 'kvd[plot]'") from None
    names = list(report["policies"])
    rows = [report["policies"][n] for n in names]
    labels = [f"{n}\n(offline oracle)" if n == "belady" else n for n in names]
    fig, axes = plt.subplots(1, 3, figsize=(15, 5.6))
    tiers = sorted({t for r in rows for t in r["hit_rate_by_tier"]}, key=["hbm", "dram", "nvme"].index)
    bottom = [0.0] * len(names)
    for tier in tiers:
        values = [r["hit_rate_by_tier"].get(tier, 0.0) for r in rows]
        axes[0].bar(labels, values, bottom=bottom, label=tier)
        bottom = [b + v for b, v in zip(bottom, values)]
    ceiling = 1 - rows[0]["compulsory_tokens"] / rows[0]["prompt_tokens"] if rows[0]["prompt_tokens"] else 1.0
    axes[0].axhline(ceiling, color="black", linestyle=":", linewidth=1, label="ceiling (first uses miss)")
    axes[0].set_title("prefix hit rate, by tier\n(higher is better)")
    axes[0].set_ylabel("share of prompt tokens")
    axes[0].set_ylim(0, 1)
    width = 0.25
    floor_ = report.get("floor")
    for i, q in enumerate(("p50", "p90", "p99")):
        xs = [j + (i - 1) * width for j in range(len(names))]
        axes[1].bar(xs, [r["ttft_s"][q] for r in rows], width, label=q)
        if floor_ is not None:  # the same quantile with nothing ever transferred: no policy goes below it
            axes[1].hlines([floor_["ttft_s"][q]] * len(xs), [x - width / 2 for x in xs], [x + width / 2 for x in xs],
                           color="black", linestyle="--", linewidth=1.5,
                           label="floor: nothing transferred" if i == 0 else None)
    axes[1].set_xticks(range(len(names)), labels)
    axes[1].set_title("TTFT, seconds\n(lower is better)")
    axes[1].set_ylabel("seconds")
    axes[2].bar(labels, [r["session_completion_s"]["mean"] for r in rows])
    axes[2].set_title("mean session completion, seconds\n(lower is better)")
    axes[2].set_ylabel("seconds")
    if floor_ is not None:
        axes[2].axhline(floor_["session_completion_s"]["mean"], color="black", linestyle="--", linewidth=1.5,
                        label="floor: nothing transferred")
    # Legends below the axes, never over a bar.
    for ax in axes:
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=2, frameon=False)
    fig.suptitle(f"{Path(report['trace']).name}: " + ", ".join(f"{t} {v['blocks']} blocks" for t, v in report["tiers"].items()))
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)


__all__ = ["add_arguments", "make_report", "parse_capacity", "run_cli"]
