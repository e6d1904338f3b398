"""The report of `kvd replay --nodes N`: per policy, the same nodes without and with the
cluster tier, side by side (:mod:`kvd.replay.nodes`)."""

from __future__ import annotations

from dataclasses import asdict
from enum import StrEnum
from pathlib import Path

from kvd.replay.cost import CLUSTER_LINKS
from kvd.replay.nodes import NodesConfig, NodesResult
from kvd.replay.trace import Trace


class Setting(StrEnum):
    """A configuration of the nodes a report compares."""

    WITHOUT_CLUSTER = "without_cluster"
    WITH_CLUSTER = "with_cluster"


def make_nodes_report(
    path: Path, trace: Trace, config: NodesConfig, results: dict[Setting, dict[str, NodesResult]]
) -> dict:
    """The report as JSON-ready data: the setting, then per configuration and policy its
    summary (:meth:`NodesResult.summary`)."""
    node = config.node
    block_bytes = trace.block_size * node.cost.bytes_per_token
    cost = asdict(node.cost)
    if not config.cluster_bytes:
        cost = {k: v for k, v in cost.items() if k not in CLUSTER_LINKS}
    return {
        "trace": str(path),
        "format": trace.format,
        "requests": len(trace.requests),
        "block_size": trace.block_size,
        "closed_loop": trace.closed_loop,
        "nodes": config.nodes,
        "tiers_per_node": {t: {"bytes": b, "blocks": b // block_bytes} for t, b in node.capacities().items()},
        "cluster": {"bytes": config.cluster_bytes, "blocks": config.cluster_bytes // block_bytes},
        "migrate_p": config.migrate_p,
        "seed": config.seed,
        "load_weight_blocks": config.load_weight_blocks,
        "cost_model": cost,
        "pause_hints": node.pause_hints,
        "engines": node.engines,
        "resume_lead_s": node.resume_lead_s,
        "session_end_after_s": node.session_end_after_s,
        "configurations": {
            str(setting): {name: r.summary() for name, r in by_policy.items()} for setting, by_policy in results.items()
        },
    }


LEGEND = (
    ("cluster", "without: the nodes alone; with: the same nodes and trace with the cluster tier"),
    ("recomputed", "prompt tokens prefilled because no tier a node can read held them; share: of all prompt tokens"),
    ("TTFT p50/p90/p99 s", "time to first token: queueing + KV wait (a cluster block: its get) + prefill of the rest"),
    ("hits by tier", "prompt tokens found in each tier ÷ prompt tokens (cluster: read from the cluster tier)"),
    ("migrations", "resumed turns served on another node than their previous turn (forced by --migrate-p)"),
    ("GB put / read", "bytes landed in the cluster tier by the nodes' puts / read from it by their gets, 10^9 bytes"),
)


def print_nodes_table(report: dict) -> None:
    """The report for people: one row per policy and configuration, then what the cluster
    tier saved, and a legend."""
    tiers = ", ".join(f"{t} {v['blocks']} blocks" for t, v in report["tiers_per_node"].items())
    cluster = report["cluster"]["blocks"]
    head = f"{report['trace']}: {report['requests']} requests ({report['format']}), {report['nodes']} nodes of {tiers}"
    if cluster:
        head += f"; cluster tier {cluster} blocks"
    if report["migrate_p"]:
        head += f"; resumed turns migrate with p={report['migrate_p']:g} (seed {report['seed']})"
    if report.get("engines"):
        head += f", {report['engines']} engines a node"
    print(head)
    print(
        f"{'policy':8} {'cluster':8} {'recomputed':>14} {'share':>6} {'TTFT p50/p90/p99 s':>20}  "
        f"{'hits by tier':<44} {'migrations':>16} {'GB put':>8} {'GB read':>8}"
    )
    configs = report["configurations"]
    names = list(next(iter(configs.values())))
    for name in names:
        for setting, label in ((Setting.WITHOUT_CLUSTER, "without"), (Setting.WITH_CLUSTER, "with")):
            r = configs.get(setting, {}).get(name)
            if r is None:
                continue
            ttft = "/".join(f"{r['ttft_s'][q]:.2f}" for q in ("p50", "p90", "p99"))
            hits = " ".join(f"{t}={v:.3f}" for t, v in r["hit_rate_by_tier"].items())
            moved = f"{r['migrations']:,} ({r['forced_migrations']:,})"
            print(
                f"{name:8} {label:8} {r['recomputed_tokens']:14,} {r['recomputed_share']:6.3f} {ttft:>20}  "
                f"{hits:<44} {moved:>16} {r['cluster']['put_bytes'] / 1e9:8.1f} {r['cluster']['read_bytes'] / 1e9:8.1f}"
            )
    if Setting.WITH_CLUSTER in configs:
        print()
        for name in names:
            before = configs[Setting.WITHOUT_CLUSTER][name]["recomputed_tokens"]
            after = configs[Setting.WITH_CLUSTER][name]["recomputed_tokens"]
            saved = (before - after) / before if before else 0.0
            print(f"{name}: the cluster tier recomputes {saved:.1%} fewer tokens ({before:,} -> {after:,})")
    print("legend:")
    width = max(len(term) for term, _ in LEGEND)
    for term, meaning in LEGEND:
        print(f"  {term:{width}}  {meaning}")
