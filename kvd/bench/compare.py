"""Compare a benchmark's figures with a stored earlier run (``--compare BASELINE.json``).

A figure is a number in the result whose key ends in ``_gbps`` (GB/s, higher is better) or
``_ms`` / ``_ms_pNN`` (milliseconds, lower is better), at any depth (``kvd.dram_load_gbps``);
lists, ratios and settings are not figures. Each figure both runs have gets its ratio
``now / baseline``, and whether that is better or worse than the baseline by more than
``noise`` (a fraction). A run on another machine, or on a busy one, moves every figure: read
the limits' ratios first (a bench's limits are measured in the same run).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

_LOWER_IS_BETTER = re.compile(r"_ms(_p\d+)?$")


def figures(result: dict, prefix: str = "") -> dict[str, float]:
    """Every figure of ``result`` by its dotted path."""
    out: dict[str, float] = {}
    for key, value in result.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(figures(value, path + "."))
        elif isinstance(value, int | float) and not isinstance(value, bool):
            if key.endswith("_gbps") or _LOWER_IS_BETTER.search(key):
                out[path] = float(value)
    return out


def load_baseline(path: Path) -> dict:
    """A stored run's JSON (what ``--json`` printed). ValueError naming the file when it
    cannot be read or is not a JSON object."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"--compare {path}: {exc}") from None
    if not isinstance(data, dict):
        raise ValueError(f"--compare {path}: not a JSON object of a benchmark's result")
    return data


def compare(now: dict, baseline: dict, renamed: dict[str, str] | None = None, noise: float = 0.1) -> dict:
    """``{figure: {now, baseline, ratio, verdict}}`` for the figures both runs have, and the
    names each run has alone. ``renamed``: a baseline's old figure names -> today's.
    ``verdict``: ``better``/``worse`` beyond ``noise``, else ``same``."""
    a = figures(now)
    b = {(renamed or {}).get(k, k): v for k, v in figures(baseline).items()}
    rows = {}
    for name in sorted(a.keys() & b.keys()):
        if b[name] == 0:
            continue
        ratio = a[name] / b[name]
        gain = 1 / ratio if _LOWER_IS_BETTER.search(name) and ratio else ratio
        verdict = "better" if gain > 1 + noise else "worse" if gain < 1 - noise else "same"
        rows[name] = {"now": a[name], "baseline": b[name], "ratio": ratio, "verdict": verdict}
    return {
        "figures": rows,
        "only_now": sorted(a.keys() - b.keys()),
        "only_baseline": sorted(b.keys() - a.keys()),
        "baseline_measured": baseline.get("measured"),
    }


def format_table(cmp: dict) -> str:
    """The comparison as text: one line a figure, then the figures only one run has."""
    lines = [f"{'figure':40s} {'now':>10s} {'baseline':>10s} {'ratio':>7s}  verdict"]
    for name, r in cmp["figures"].items():
        lines.append(f"{name:40s} {r['now']:10.3f} {r['baseline']:10.3f} {r['ratio']:7.2f}  {r['verdict']}")
    if cmp["only_now"]:
        lines.append("only in this run: " + ", ".join(cmp["only_now"]))
    if cmp["only_baseline"]:
        lines.append("only in the baseline: " + ", ".join(cmp["only_baseline"]))
    return "\n".join(lines)
