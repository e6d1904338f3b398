"""`kvd bench engine`: what kvd's calls cost an engine per request, at a request rate.

``--engines`` processes (default 4) stand for the vLLM engines of one node. Each drives the
node's real daemon (one `kvd serve` on a unix socket, its shared-memory arena mapped) with the
connector's call sequence per request, for agentic turns:

- sessions read one shared repository prefix (``--shared-blocks``, stored once before the
  run) and grow by ``--new-blocks`` a turn; after ``--turns`` turns a session ends and a new
  one starts;
- a request is one turn: ``Lookup`` of the session's whole chain with its session id (about
  2,000 hashes by default), a load into the engine's buffers of the ``--load-blocks`` last
  held blocks (the ones its GPU lost meanwhile), a store of the turn's new blocks, then the
  turn's session event — ``tool_pause`` for half the turns, else ``turn_end``, and
  ``session_end`` after the last turn;
- requests arrive open loop: each engine draws Poisson arrivals at ``rate / engines`` and
  runs each on one of ``--workers`` threads, on the next idle session of its own.

Per rate the report gives each call's latency (milliseconds, p50/p99), and the request's
**control overhead**: its time in kvd calls minus its bytes divided by this run's bulk
memcpy (a numpy copy of one 256 MiB buffer, best of 4) — what kvd adds beyond moving the
bytes at the machine's limit. ``achieved_rps`` is completed requests per second; a rate the
engines could not start on time shows as ``late_ms`` (start minus scheduled arrival, p99).
``daemon_cpu_ms_per_request`` is the daemon's CPU time (user + system) over the rate's run
divided by its requests: its event loop is one thread, so 1,000 over it bounds the rate
one daemon serves.
``max_rps_p99_overhead_le_10ms`` is the highest rate run whose p99 overhead is at most 10 ms
and which was served (achieved at least 95% of it).
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import queue
import random
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from kvd.bench import run_and_report
from kvd.bench.datapath import bulk_memcpy, filled_buffer
from kvd.bench.soak import SoakDaemon, block_hash

NAMESPACE = "engine-bench"
BLOCK_TOKENS = 16
CALLS = ("lookup", "load", "store", "session_event")
OVERHEAD_LIMIT_MS = 10.0
SERVED = 0.95  # a rate counts as served when this share of it completed


@dataclass
class EngineBenchConfig:
    """Sizes in bytes, times in seconds, rates in requests per second (all engines)."""

    engines: int = 4
    rates: list[float] = field(default_factory=lambda: [50.0, 100.0, 150.0, 200.0, 250.0, 300.0])
    seconds: float = 8.0  # per rate
    workers: int = 8  # threads an engine runs requests on
    block_bytes: int = 256 << 10
    shared_blocks: int = 1800
    new_blocks: int = 8
    load_blocks: int = 32
    turns: int = 25
    dram_bytes: int = 2 << 30
    nvme_bytes: int = 0
    lease_seconds: float = 30.0
    event_buffer: int = 100_000
    seed: int = 0
    dir: Path = Path("var/bench")

    def validate(self) -> None:
        if self.engines < 1 or self.workers < 1:
            raise ValueError("--engines and --workers must be at least 1")
        if not self.rates or any(r <= 0 for r in self.rates):
            raise ValueError("--rates must be positive numbers")
        if self.seconds <= 0:
            raise ValueError("--seconds must be positive")
        if min(self.shared_blocks, self.new_blocks, self.load_blocks, self.turns) < 1:
            raise ValueError("--shared-blocks, --new-blocks, --load-blocks and --turns must be at least 1")
        if self.load_blocks > self.shared_blocks:
            raise ValueError("--load-blocks must not exceed --shared-blocks")
        need = (self.shared_blocks + self.turns * self.new_blocks) * self.block_bytes * 2
        if self.dram_bytes < need:
            raise ValueError(f"--dram-bytes must hold the shared prefix and a whole session twice: {need} bytes or more")


def cpu_seconds(pid: int) -> float:
    """User plus system CPU seconds a process has used (/proc/PID/stat)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# -- one engine process -------------------------------------------------------------------------


class _Session:
    def __init__(self, sid: str, shared: list[int]) -> None:
        self.id = sid
        self.chain = list(shared)
        self.turn = 0


class _Engine:
    """One engine's sessions and buffers; requests run on its worker threads."""

    def __init__(self, index: int, cfg: EngineBenchConfig, address: str, shared: list[int]) -> None:
        from kvd.client import Client

        self.index = index
        self.cfg = cfg
        self.client = Client(address, shared_memory=True, timeout=60.0)
        self.shared = shared
        self.idle: queue.SimpleQueue[_Session] = queue.SimpleQueue()
        self.sessions = 0
        self.rng = random.Random(cfg.seed * 1000 + index)
        self.local = threading.local()
        self.lock = threading.Lock()

    def _buffers(self) -> tuple[list[memoryview], list[memoryview]]:
        """This thread's load and store buffers (allocated once)."""
        if not hasattr(self.local, "load"):
            b = self.cfg.block_bytes
            loads = bytearray(self.cfg.load_blocks * b)
            stores = bytearray(np.random.default_rng(self.index).integers(0, 256, self.cfg.new_blocks * b, np.uint8))
            self.local.load = [memoryview(loads)[i * b : (i + 1) * b] for i in range(self.cfg.load_blocks)]
            self.local.store = [memoryview(stores)[i * b : (i + 1) * b] for i in range(self.cfg.new_blocks)]
        return self.local.load, self.local.store

    def _session(self) -> _Session:
        try:
            return self.idle.get_nowait()
        except queue.Empty:
            with self.lock:
                self.sessions += 1
                n = self.sessions
            return _Session(f"e{self.index}-s{n}", self.shared)

    def request(self, scheduled: float) -> dict:
        """One turn; per-call seconds, bytes moved, lateness."""
        start = time.perf_counter()
        cfg = self.cfg
        s = self._session()
        loads, stores = self._buffers()
        s.turn += 1
        new = [block_hash(cfg.seed, s.id, s.turn, i) for i in range(cfg.new_blocks)]
        out: dict = {"late": start - scheduled}
        t = time.perf_counter()
        held = len(self.client.lookup(NAMESPACE, s.chain + new, session_id=s.id))
        out["lookup"] = time.perf_counter() - t
        lo = max(0, held - cfg.load_blocks)
        want = s.chain[lo:held]
        t = time.perf_counter()
        got = self.client.load_into(NAMESPACE, want, loads[: len(want)])
        out["load"] = time.perf_counter() - t
        parents = [s.chain[-1], *new[:-1]]
        t = time.perf_counter()
        self.client.store(NAMESPACE, new, stores, parents=parents, session_id=s.id)
        out["store"] = time.perf_counter() - t
        last = s.turn >= cfg.turns
        kind = "session_end" if last else ("tool_pause" if self.rng.random() < 0.5 else "turn_end")
        t = time.perf_counter()
        self.client.session_event(NAMESPACE, s.id, kind, tool="run_tests" if kind == "tool_pause" else None)
        out["session_event"] = time.perf_counter() - t
        out["bytes"] = (sum(got) + cfg.new_blocks) * cfg.block_bytes
        out["missed"] = len(want) - sum(got)
        s.chain.extend(new)
        if not last:
            self.idle.put(s)
        return out

    def run_rate(self, rate: float, start_at: float, seconds: float) -> list[dict]:
        """Poisson arrivals at ``rate`` from ``start_at`` (perf_counter) for ``seconds``."""
        rng = random.Random(self.rng.random())
        arrivals, t = [], 0.0
        while True:
            t += rng.expovariate(rate)
            if t >= seconds:
                break
            arrivals.append(start_at + t)
        results: list[dict] = []
        errors: list[str] = []

        def one(at: float) -> None:
            try:
                results.append(self.request(at))
            except Exception as exc:  # noqa: BLE001 - counted and reported, the run goes on
                errors.append(f"{type(exc).__name__}: {exc}")

        with ThreadPoolExecutor(self.cfg.workers, thread_name_prefix="engine") as pool:
            for at in arrivals:
                delay = at - time.perf_counter()
                if delay > 0:
                    time.sleep(delay)  # open loop: the schedule, not the answers, sets the pace
                pool.submit(one, at)
        return results + [{"error": e} for e in errors]


def _engine_main(index: int, cfg: EngineBenchConfig, address: str, shared: list[int], commands, results) -> None:
    engine = _Engine(index, cfg, address, shared)
    results.put(("ready", index, None))
    while True:
        command = commands.get()
        if command is None:
            break
        rate, start_in, seconds = command
        # perf_counter is per process: each engine starts its schedule start_in from now.
        results.put(("done", index, engine.run_rate(rate, time.perf_counter() + start_in, seconds)))
    engine.client.close()


# -- the run ------------------------------------------------------------------------------------


def _pct(values: list[float]) -> dict:
    if not values:
        return {"p50": None, "p99": None}
    a = np.asarray(values) * 1e3
    return {"p50": round(float(np.percentile(a, 50)), 3), "p99": round(float(np.percentile(a, 99)), 3)}


def summarize(rate: float, seconds: float, rows: list[dict], bulk_bps: float) -> dict:
    """One rate's figures from its requests' rows (seconds) and the run's bulk memcpy."""
    ok = [r for r in rows if "error" not in r]
    overhead = [sum(r[c] for c in CALLS) - r["bytes"] / bulk_bps for r in ok]
    out = {
        "rate_rps": rate,
        "achieved_rps": round(len(ok) / seconds, 1),
        "requests": len(ok),
        "errors": len(rows) - len(ok),
        "error_samples": sorted({r["error"] for r in rows if "error" in r})[:3],
        "missed_blocks": sum(r["missed"] for r in ok),
        "control_overhead_ms": _pct(overhead),
        "late_ms": _pct([r["late"] for r in ok]),
    }
    for call in CALLS:
        out[f"{call}_ms"] = _pct([r[call] for r in ok])
    return out


def run(cfg: EngineBenchConfig) -> dict:
    cfg.validate()
    directory = cfg.dir.resolve()  # the daemon's unix socket path must not depend on its cwd
    directory.mkdir(parents=True, exist_ok=True)
    src = filled_buffer(256 << 20)
    bulk = bulk_memcpy(src, 4) * 1e9  # bytes per second, the run's limit
    src.close()
    with tempfile.TemporaryDirectory(dir=directory, prefix="engine-") as tmp:
        daemon = SoakDaemon(Path(tmp), cfg)
        try:
            return _measure(cfg, daemon, bulk)
        finally:
            daemon.stop()


def _measure(cfg: EngineBenchConfig, daemon: SoakDaemon, bulk: float) -> dict:
    from kvd.client import Client

    shared = [block_hash(cfg.seed, "shared", i) for i in range(cfg.shared_blocks)]
    with Client(daemon.unix, shared_memory=True) as c:
        c.register_namespace(NAMESPACE, BLOCK_TOKENS, cfg.block_bytes)
        block = bytes(cfg.block_bytes)
        for lo in range(0, len(shared), 256):
            part = shared[lo : lo + 256]
            c.store(NAMESPACE, part, [block] * len(part), parents=[shared[lo - 1] if lo else None, *part[:-1]])
    ctx = multiprocessing.get_context("spawn")
    results = ctx.Queue()
    commands = [ctx.Queue() for _ in range(cfg.engines)]
    procs = [
        ctx.Process(target=_engine_main, args=(i, cfg, daemon.unix, shared, commands[i], results), daemon=True)
        for i in range(cfg.engines)
    ]
    for p in procs:
        p.start()
    try:
        for _ in procs:
            _receive(results, procs)
        per_rate = []
        for rate in cfg.rates:
            for q in commands:
                q.put((rate / cfg.engines, 1.0, cfg.seconds))
            rows: list[dict] = []
            cpu = cpu_seconds(daemon.proc.pid)
            for _ in procs:
                rows.extend(_receive(results, procs)[2])
            figures = summarize(rate, cfg.seconds, rows, bulk)
            # The daemon's event loop is one thread: this bounds the rate one daemon serves.
            cpu = cpu_seconds(daemon.proc.pid) - cpu
            figures["daemon_cpu_ms_per_request"] = round(cpu / max(figures["requests"], 1) * 1e3, 3)
            per_rate.append(figures)
        for q in commands:
            q.put(None)
        for p in procs:
            p.join(timeout=60)
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
    with Client(daemon.unix) as c:
        problems = c.check()
    return report(cfg, per_rate, bulk, problems)


def _receive(results, procs) -> tuple:
    while True:
        try:
            return results.get(timeout=5)
        except queue.Empty:
            dead = [p for p in procs if not p.is_alive()]
            if dead:
                raise RuntimeError(f"an engine process exited with code {dead[0].exitcode}") from None


def report(cfg: EngineBenchConfig, per_rate: list[dict], bulk_bps: float, problems: list[str]) -> dict:
    served = [
        r for r in per_rate
        if r["errors"] == 0 and r["achieved_rps"] >= SERVED * r["rate_rps"]
        and r["control_overhead_ms"]["p99"] is not None and r["control_overhead_ms"]["p99"] <= OVERHEAD_LIMIT_MS
    ]
    out: dict = {
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()},
        "bulk_memcpy_gbps": round(bulk_bps / 1e9, 2),
        "max_rps_p99_overhead_le_10ms": max((r["rate_rps"] for r in served), default=None),
        "check_ok": not problems,
        "rates": per_rate,
    }
    at_100 = next((r for r in per_rate if r["rate_rps"] == 100.0), None)
    if at_100 is not None:
        out["at_100_rps"] = {
            "control_overhead_ms": at_100["control_overhead_ms"],
            "session_event_ms": at_100["session_event_ms"],
            "achieved_rps": at_100["achieved_rps"],
        }
    return out


def add_arguments(p: argparse.ArgumentParser, size) -> None:
    d = EngineBenchConfig()
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--engines", type=int, default=d.engines, help=f"engine processes (default {d.engines})")
    p.add_argument(
        "--rates", default=",".join(f"{r:g}" for r in d.rates), metavar="RPS,...",
        help="request rates of all engines together, one run each (default %(default)s)",
    )
    p.add_argument("--seconds", type=float, default=d.seconds, help=f"seconds per rate (default {d.seconds:g})")
    p.add_argument("--workers", type=int, default=d.workers, help=f"threads per engine (default {d.workers})")
    p.add_argument("--block-bytes", type=size, default=d.block_bytes, metavar="SIZE", help="block size (default 256KiB)")
    p.add_argument("--shared-blocks", type=int, default=d.shared_blocks, help="blocks of the shared prefix")
    p.add_argument("--new-blocks", type=int, default=d.new_blocks, help="blocks a turn stores")
    p.add_argument("--load-blocks", type=int, default=d.load_blocks, help="held blocks a turn loads")
    p.add_argument("--turns", type=int, default=d.turns, help="turns of a session")
    p.add_argument("--dram-bytes", type=size, default=d.dram_bytes, metavar="SIZE", help="daemon DRAM (default 2GiB)")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--dir", type=Path, default=d.dir, help="scratch directory for the daemon (default var/bench)")


def run_cli(args: argparse.Namespace) -> int:
    """Bad settings exit 2 with one line naming the flag, before anything starts."""
    try:
        try:
            rates = [float(r) for r in args.rates.split(",") if r.strip()]
        except ValueError:
            raise ValueError(f"--rates must be numbers separated by commas, got {args.rates!r}") from None
        cfg = EngineBenchConfig(
            engines=args.engines, rates=rates, seconds=args.seconds, workers=args.workers,
            block_bytes=args.block_bytes, shared_blocks=args.shared_blocks, new_blocks=args.new_blocks,
            load_blocks=args.load_blocks, turns=args.turns, dram_bytes=args.dram_bytes, seed=args.seed, dir=args.dir,
        )
        cfg.validate()
    except ValueError as exc:
        print(f"kvd bench engine: {exc}", file=sys.stderr)
        return 2
    return run_and_report("engine", lambda: run(cfg), args.json)
