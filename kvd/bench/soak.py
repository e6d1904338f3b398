"""`kvd bench soak`: many concurrent clients against a real daemon on loopback TCP.

A `kvd serve` process listens on ``127.0.0.1:<free port>`` (``--tcp-insecure``) and on a
private unix socket (Admin calls, which need a token over TCP, go there). ``--clients``
clients, spread over a few worker processes (threads in each, one gRPC channel per client;
the even ones send bytes inline, the odd ones map the shared-memory arena), run agentic
sessions until ``--seconds`` have passed or each made ``--max-ops`` calls:

- a session starts with a shared prefix (a repository context every session reads), then
  each turn: ``turn_start`` with the chain, ``lookup``, ``load`` of the chain (bytes checked
  against the deterministic content of each hash), ``store`` of a few new blocks, then
  (half the turns) ``tool_pause``/``lookup``/``tool_resume``, and ``turn_end``; after a few
  turns, ``session_end``. With ``--session-events lean`` a turn sends one event: the
  ``lookup`` carries the session id (it starts the turn), then a ``tool_pause`` or a
  ``turn_end``;
- every ``--disconnect-every`` turns a client disconnects mid-store instead: a PrepareStore
  on a fresh channel that is closed without CommitStore (its lease, asked for
  ``ABANDON_LEASE_S``, expires), or a StoreInline stream cancelled after half a block (the
  daemon aborts it). Their blocks must never become visible.

``errors`` counts every failed call (any gRPC error outside the two cancelled streams above),
every block loaded with bytes other than those stored, and every abandoned block visible at
the end. ``rss_*`` are the daemon's VmRSS from /proc: ``rss_start_bytes`` sampled after the
warm-up — at least ``--warmup-seconds`` and until every tier is full (``tiers_full_at_rss_start``;
at most half the run), so that the catalog, the Watch ring and the Python heap are at their
bounds and growth from there can only be a leak — ``rss_end_bytes`` when the clients stop;
``rss_growth`` = end / start - 1. At the end,
after the abandoned leases expired and their quarantined slots came back, ``leases_end``
must be 0, ``dram_leaked_bytes`` (DRAM bytes in use beyond the held blocks' slots) 0, and
Admin.Check pass (``check_ok``). Latencies are milliseconds per client call (a store or a
load is every RPC it takes), ``ops_per_s`` completed calls per second of the whole run.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import multiprocessing
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import grpc
import numpy as np
import xxhash

from kvd.bench import run_and_report
from kvd.client import Client, ClientError
from kvd.v1 import engine_pb2, engine_pb2_grpc, types_pb2

NAMESPACE = "soak"
BLOCK_TOKENS = 16
ABANDON_LEASE_S = 1  # lease asked for by an abandoned PrepareStore
TOOLS = ("bash", "pytest", "grep", "web")
MAX_ERROR_SAMPLES = 10
START_TIMEOUT_S = 120.0  # for the daemon and every client process to be ready
SESSION_EVENT_STYLES = ("all", "lean")


@dataclass(frozen=True)
class SoakConfig:
    """Sizes in bytes, times in seconds."""

    clients: int = 64
    seconds: float = 60.0
    block_bytes: int = 32 << 10
    dram_bytes: int = 128 << 20
    # Small enough to fill in the first seconds: from then on every tier, and so the catalog,
    # is at its bound, and RSS growth can only be a leak.
    nvme_bytes: int = 160 << 20
    lease_seconds: float = 5.0  # the daemon's default lease (and quarantine of expired slots)
    # The daemon's Watch ring, in events. Its default of 100,000 takes longer than a 60 s run
    # to fill at this event rate, and its filling would read as growth; this one wraps early.
    event_buffer: int = 10_000
    warmup_seconds: float | None = None  # None: a sixth of the run
    processes: int = 4
    max_ops: int = 1_000_000  # per client
    shared_prefix_blocks: int = 16
    turns_per_session: int = 6
    blocks_per_turn: int = 3
    disconnect_every: int = 10  # turns
    # "all": every event kind, up to four a turn; "lean": one a turn (a tool_pause or a
    # turn_end), the turn started by the Lookup's session_id (docs/retention.md, "Sessions").
    session_events: Literal["all", "lean"] = "all"
    seed: int = 0
    dir: Path = Path("var/bench")

    def validate(self) -> None:
        if min(self.clients, self.processes, self.max_ops, self.disconnect_every) < 1:
            raise ValueError("--clients, --processes, --max-ops and --disconnect-every must be positive")
        if self.seconds <= 0 or self.lease_seconds <= 0:
            raise ValueError("--seconds and --lease-seconds must be positive")
        if self.session_events not in SESSION_EVENT_STYLES:
            raise ValueError(f"--session-events must be one of {', '.join(SESSION_EVENT_STYLES)}")
        if self.block_bytes < 1 or self.block_bytes % 4096:
            raise ValueError("--block-bytes must be a positive multiple of 4096")
        chain = self.shared_prefix_blocks + self.turns_per_session * self.blocks_per_turn
        if self.clients * chain * self.block_bytes > self.dram_bytes:
            # Every client may pin its whole chain at once in a load.
            raise ValueError(
                f"--dram-bytes must hold every client's longest chain ({self.clients} x {chain} blocks)"
            )

    @property
    def warmup(self) -> float:
        return self.seconds / 6 if self.warmup_seconds is None else self.warmup_seconds


def block_data(h: int, nbytes: int) -> bytes:
    """The content of block ``h``: ``nbytes`` pseudo-random bytes determined by the hash."""
    return random.Random(h).randbytes(nbytes)


def block_hash(seed: int, *path: object) -> int:
    """A 64-bit block hash named by ``path`` (client, session, index, ...)."""
    return xxhash.xxh64_intdigest("/".join(map(str, (seed, *path))).encode())


def rss(pid: int) -> dict[str, int]:
    """VmRSS and RssAnon of a process, in bytes."""
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "RssAnon"):
                out[key] = int(value.split()[0]) * 1024  # the kernel reports kB
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class SoakDaemon:
    """`kvd serve` on a unix socket and loopback TCP without TLS, in a private directory."""

    def __init__(self, root: Path, cfg: SoakConfig) -> None:
        self.root = root
        self.socket = root / "kvd.sock"
        self.tcp = f"127.0.0.1:{free_port()}"
        args = [
            sys.executable, "-m", "kvd.cli.kvd_main", "serve",
            "--socket", str(self.socket), "--tcp", self.tcp, "--tcp-insecure",
            "--dram-bytes", str(cfg.dram_bytes), "--nvme-bytes", str(cfg.nvme_bytes),
            "--nvme-dir", str(root / "nvme"), "--shm-dir", str(root / "shm"), "--slab-bytes", str(64 << 20),
            "--lease-seconds", str(cfg.lease_seconds), "--event-buffer", str(cfg.event_buffer),
            "--log-level", "WARNING",
        ]
        self.log_path = root / "kvd.log"
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)
        self.unix = f"unix://{self.socket}"
        try:
            deadline = time.monotonic() + START_TIMEOUT_S
            while not self.socket.exists():
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(
                        f"kvd serve did not start: {self.log_path.read_text(errors='replace')[-2000:]}"
                    )
                time.sleep(0.05)  # polling while the daemon starts
            with Client(self.unix) as probe:
                probe.wait_ready(60)
        except BaseException:
            self.proc.kill()  # a daemon that never served is not left running
            self.proc.wait()
            raise

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


@dataclass
class ClientStats:
    """What one worker process saw; merged by :func:`run`."""

    latencies: dict[str, list[float]] = field(default_factory=dict)  # call -> seconds each
    errors: int = 0
    error_samples: list[str] = field(default_factory=list)
    wrong_bytes: int = 0
    load_found: int = 0
    load_missing: int = 0
    disconnects: int = 0
    sessions: int = 0
    abandoned: list[int] = field(default_factory=list)  # hashes of stores that never committed

    def error(self, what: str) -> None:
        self.errors += 1
        if len(self.error_samples) < MAX_ERROR_SAMPLES:
            self.error_samples.append(what)

    def merge(self, other: ClientStats) -> None:
        for name, values in other.latencies.items():
            self.latencies.setdefault(name, []).extend(values)
        for name in ("errors", "wrong_bytes", "load_found", "load_missing", "disconnects", "sessions"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.error_samples = (self.error_samples + other.error_samples)[:MAX_ERROR_SAMPLES]
        self.abandoned += other.abandoned


class _Session:
    """One client's agent: sessions of a few turns over a shared prefix."""

    def __init__(self, cid: int, cfg: SoakConfig, tcp: str, stats: ClientStats, lock: threading.Lock) -> None:
        self.cid, self.cfg, self.tcp, self.stats, self.lock = cid, cfg, tcp, stats, lock
        self.rng = random.Random(block_hash(cfg.seed, "client", cid))
        self.client = Client(tcp, shared_memory=cid % 2 == 1, timeout=60)
        self.client.register_namespace(NAMESPACE, BLOCK_TOKENS, cfg.block_bytes)
        self.shared = [block_hash(cfg.seed, "shared", i) for i in range(cfg.shared_prefix_blocks)]
        self.session_no = 0
        self.ops = 0
        self.turns = 0

    def timed(self, name: str, fn, *args, **kwargs):
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            dt = time.perf_counter() - t0
            self.ops += 1
            with self.lock:
                self.stats.latencies.setdefault(name, []).append(dt)

    def run(self, stop_at: float) -> None:
        try:
            while time.time() < stop_at and self.ops < self.cfg.max_ops:
                try:
                    self.session(stop_at)
                except ClientError as exc:
                    with self.lock:
                        self.stats.error(f"client {self.cid}: {exc}")
        finally:
            self.client.close()

    def session(self, stop_at: float) -> None:
        sid = f"c{self.cid}-s{self.session_no}"
        self.session_no += 1
        with self.lock:
            self.stats.sessions += 1
        chain = list(self.shared)
        c = self.client
        lean = self.cfg.session_events == "lean"
        for turn in range(self.cfg.turns_per_session):
            if time.time() >= stop_at or self.ops >= self.cfg.max_ops:
                break
            self.turns += 1
            if self.turns % self.cfg.disconnect_every == 0:
                self.disconnect_mid_store(sid, chain)
            new = [block_hash(self.cfg.seed, sid, turn, i) for i in range(self.cfg.blocks_per_turn)]
            if lean:
                self.timed("lookup", c.lookup, NAMESPACE, chain + new, session_id=sid)  # starts the turn
            else:
                self.timed("session_turn_start", c.session_event, NAMESPACE, sid, "turn_start", chain + new)
                self.timed("lookup", c.lookup, NAMESPACE, chain + new)
            self.check_load(chain)
            if turn == 0:  # the first turn (re)stores the shared prefix: most of it is held
                self.timed("store", c.store, NAMESPACE, chain, [block_data(h, self.cfg.block_bytes) for h in chain],
                           session_id=sid)
            data = [block_data(h, self.cfg.block_bytes) for h in new]
            self.timed("store", c.store, NAMESPACE, new, data, parents=[chain[-1], *new[:-1]], session_id=sid)
            chain += new
            if self.rng.random() < 0.5:
                tool = self.rng.choice(TOOLS)
                self.timed("session_tool_pause", c.session_event, NAMESPACE, sid, "tool_pause", tool=tool,
                           expected_pause_s=self.rng.uniform(1, 30))
                if lean:
                    continue  # the pause ended the turn; the next turn's Lookup ends the pause
                self.timed("lookup", c.lookup, NAMESPACE, chain)
                self.timed("session_tool_resume", c.session_event, NAMESPACE, sid, "tool_resume")
            self.timed("session_turn_end", c.session_event, NAMESPACE, sid, "turn_end")
        self.timed("session_session_end", c.session_event, NAMESPACE, sid, "session_end")

    def check_load(self, chain: list[int]) -> None:
        loaded = self.timed("load", self.client.load, NAMESPACE, chain)
        found = missing = wrong = 0
        for h, data in zip(chain, loaded):
            if data is None:
                missing += 1
            elif data != block_data(h, self.cfg.block_bytes):
                wrong += 1
            else:
                found += 1
        with self.lock:
            self.stats.load_found += found
            self.stats.load_missing += missing
            if wrong:
                self.stats.wrong_bytes += wrong
                self.stats.error(f"client {self.cid}: {wrong} blocks loaded with wrong bytes")

    def disconnect_mid_store(self, sid: str, chain: list[int]) -> None:
        """A store whose client goes away before committing: the blocks must never appear."""
        n = self.turns // self.cfg.disconnect_every
        hashes = [block_hash(self.cfg.seed, sid, "abandoned", n, i) for i in range(2)]
        specs = [types_pb2.BlockSpec(hash=h, parent=chain[-1], nbytes=self.cfg.block_bytes) for h in hashes]
        channel = grpc.insecure_channel(self.tcp)
        stub = engine_pb2_grpc.EngineStub(channel)
        try:
            if n % 2:
                req = engine_pb2.PrepareStoreRequest(
                    namespace=NAMESPACE, blocks=specs, lease_seconds=ABANDON_LEASE_S, session_id=sid
                )
                self.timed("prepare_store_abandoned", stub.PrepareStore, req, timeout=60)
            else:
                self.timed("store_inline_cancelled", self._cancelled_stream, stub, specs, sid)
        except grpc.RpcError as exc:
            with self.lock:
                self.stats.error(f"client {self.cid}: abandoned store: {exc.code().name}: {exc.details()}")
        finally:
            channel.close()
        with self.lock:
            self.stats.disconnects += 1
            self.stats.abandoned += hashes

    def _cancelled_stream(self, stub, specs, sid: str) -> None:
        """StoreInline: the header and half of the first block, then the client gives up."""

        class GaveUp(Exception):
            pass

        def requests():
            yield engine_pb2.StoreInlineRequest(
                header=engine_pb2.StoreInlineHeader(namespace=NAMESPACE, blocks=specs, session_id=sid)
            )
            half = bytes(self.cfg.block_bytes // 2)
            yield engine_pb2.StoreInlineRequest(chunk=engine_pb2.BlockChunk(index=0, offset=0, data=half))
            raise GaveUp

        try:
            stub.StoreInline(requests(), timeout=60)
        except grpc.RpcError as exc:
            if exc.code() in (grpc.StatusCode.CANCELLED, grpc.StatusCode.UNKNOWN):
                return  # the stream died as intended
            raise
        raise grpc.RpcError("StoreInline completed although its request stream failed")


_start: tuple = ()  # (ready semaphore, go event) of a worker process, set by _init_worker


def _init_worker(ready, go) -> None:
    global _start
    _start = (ready, go)


def _worker(client_ids: list[int], cfg: SoakConfig, tcp: str) -> ClientStats:
    """One process: a thread per client; connects, says it is ready, starts when every
    process is, and stops ``cfg.seconds`` later."""
    stats = ClientStats()
    lock = threading.Lock()
    sessions = []
    for cid in client_ids:
        try:
            sessions.append(_Session(cid, cfg, tcp, stats, lock))
        except ClientError as exc:
            stats.error(f"client {cid}: connect: {exc}")
    ready, go = _start
    ready.release()
    if not go.wait(START_TIMEOUT_S):
        raise RuntimeError("the other client processes did not start")
    stop_at = time.time() + cfg.seconds
    threads = [threading.Thread(target=s.run, args=(stop_at,), name=f"soak-{s.cid}") for s in sessions]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return stats


def _percentiles(values: list[float], seconds: float) -> dict:
    arr = np.array(values) * 1000
    return {
        "count": len(values),
        "p50_ms": float(np.percentile(arr, 50)),
        "p99_ms": float(np.percentile(arr, 99)),
        "max_ms": float(arr.max()),
        "ops_per_s": len(values) / seconds,
    }


def run(cfg: SoakConfig) -> dict:
    cfg.validate()
    cfg.dir.mkdir(parents=True, exist_ok=True)
    root = Path(tempfile.mkdtemp(prefix="kvd-soak-", dir=cfg.dir)).resolve()  # unix:// needs an absolute path
    daemon = SoakDaemon(root, cfg)
    try:
        return _measure(cfg, daemon)
    finally:
        code = daemon.stop()
        if code != 0:
            log = daemon.log_path.read_text(errors="replace")[-2000:]
            raise RuntimeError(f"the daemon exited with {code} on SIGTERM: {log}")
        shutil.rmtree(root, ignore_errors=True)


def _tiers_full(admin: Client, fraction: float = 0.95) -> bool:
    """Whether every tier of the daemon is at least ``fraction`` used."""
    return all(t.used_bytes >= fraction * t.capacity_bytes for t in admin.status().tiers)


def _measure(cfg: SoakConfig, daemon: SoakDaemon) -> dict:
    pid = daemon.proc.pid
    with Client(daemon.unix) as admin:
        admin.register_namespace(NAMESPACE, BLOCK_TOKENS, cfg.block_bytes)
    processes = min(cfg.processes, cfg.clients)
    groups = [list(range(p, cfg.clients, processes)) for p in range(processes)]
    # spawn, not fork: gRPC's threads do not survive a fork.
    ctx = multiprocessing.get_context("spawn")
    stats = ClientStats()
    rss_samples: list[int] = []
    ready, go = ctx.Semaphore(0), ctx.Event()
    with concurrent.futures.ProcessPoolExecutor(
        processes, mp_context=ctx, initializer=_init_worker, initargs=(ready, go)
    ) as pool:
        futures = [pool.submit(_worker, g, cfg, daemon.tcp) for g in groups]
        waiting, deadline = len(groups), time.monotonic() + START_TIMEOUT_S
        while waiting and time.monotonic() < deadline and not any(f.done() for f in futures):
            if ready.acquire(timeout=0.5):  # a process imported, connected and mapped the arena
                waiting -= 1
        if waiting:
            go.set()  # let the others run out; a failed process's error is in its future
            for f in futures:
                f.result(timeout=START_TIMEOUT_S)
            raise RuntimeError("the client processes did not start")
        start_at = time.time()
        go.set()
        next_sample = start_at
        rss_start = None
        tiers_full = False
        with Client(daemon.unix) as admin:
            while not all(f.done() for f in futures):
                now = time.time()
                if now >= next_sample:
                    rss_samples.append(rss(pid)["VmRSS"])
                    next_sample += 1.0
                    if rss_start is None:
                        tiers_full = _tiers_full(admin)
                # The warm-up ends once it lasted --warmup-seconds and every tier is full (the
                # catalog at its bound), or at half the run, full or not (reported).
                if rss_start is None and now >= start_at + cfg.warmup and (tiers_full or now >= start_at + cfg.seconds / 2):
                    rss_start = rss(pid)
                    warmup_s = now - start_at
                wake_at = next_sample if rss_start is not None else min(next_sample, max(now, start_at + cfg.warmup))
                concurrent.futures.wait(futures, timeout=max(0.01, wake_at - now))
        rss_end = rss(pid)
        ended_at = time.time()
        for f in futures:
            stats.merge(f.result())
    if rss_start is None:  # the run ended before its warm-up did
        rss_start, warmup_s = rss_end, ended_at - start_at
    elapsed = ended_at - start_at
    with Client(daemon.unix) as admin:
        # Abandoned leases expire (ABANDON_LEASE_S), then their slots sit out one quarantine
        # (the daemon's lease period) before they are free again; the reaper runs every 0.5 s.
        deadline = time.monotonic() + ABANDON_LEASE_S + cfg.lease_seconds + 5
        while True:
            st = admin.status()
            (dram,) = [t for t in st.tiers if t.name == "dram"]
            leaked = dram.used_bytes - dram.blocks * cfg.block_bytes
            if (st.leases == 0 and leaked == 0) or time.monotonic() > deadline:
                break
            time.sleep(0.1)  # polling the daemon until the leases and the quarantine are gone
        problems = admin.check()
        visible_abandoned = sum(1 for h in stats.abandoned if admin.lookup(NAMESPACE, [h]))
    if visible_abandoned:
        stats.error(f"{visible_abandoned} blocks of abandoned stores are visible")
    return {
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()},
        "elapsed_s": elapsed,
        "errors": stats.errors,
        "error_samples": stats.error_samples,
        "wrong_bytes": stats.wrong_bytes,
        "load_blocks_found": stats.load_found,
        "load_blocks_missing": stats.load_missing,
        "sessions": stats.sessions,
        "disconnects": stats.disconnects,
        "abandoned_blocks_visible": visible_abandoned,
        "rpc": {name: _percentiles(v, elapsed) for name, v in sorted(stats.latencies.items())},
        "ops_per_s": sum(len(v) for v in stats.latencies.values()) / elapsed,
        "rss_start_bytes": rss_start["VmRSS"],
        "rss_end_bytes": rss_end["VmRSS"],
        "rss_growth": rss_end["VmRSS"] / rss_start["VmRSS"] - 1,
        "warmup_s": warmup_s,
        "tiers_full_at_rss_start": tiers_full,
        "rss_anon_start_bytes": rss_start["RssAnon"],
        "rss_anon_end_bytes": rss_end["RssAnon"],
        "rss_samples_mib": [round(x / (1 << 20), 1) for x in rss_samples],
        "leases_end": st.leases,
        "dram_leaked_bytes": leaked,
        "check_ok": not problems,
        "check_problems": problems,
    }


def add_arguments(p: argparse.ArgumentParser, size) -> None:
    d = SoakConfig()
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--clients", type=int, default=d.clients, help=f"concurrent clients (default {d.clients})")
    p.add_argument("--seconds", type=float, default=d.seconds, help=f"how long they run (default {d.seconds:g})")
    p.add_argument("--max-ops", type=int, default=d.max_ops, help=f"calls per client at most (default {d.max_ops})")
    p.add_argument("--processes", type=int, default=d.processes, help=f"client processes (default {d.processes})")
    p.add_argument("--block-bytes", type=size, default=d.block_bytes, metavar="SIZE", help="block size (default 32KiB)")
    p.add_argument("--dram-bytes", type=size, default=d.dram_bytes, metavar="SIZE", help="daemon DRAM (default 128MiB)")
    p.add_argument("--nvme-bytes", type=size, default=d.nvme_bytes, metavar="SIZE", help="daemon NVMe (default 160MiB: full within seconds)")
    p.add_argument(
        "--lease-seconds", type=float, default=d.lease_seconds,
        help=f"the daemon's lease, also how long an expired lease's slots wait before reuse (default {d.lease_seconds:g})",
    )
    p.add_argument(
        "--event-buffer", type=int, default=d.event_buffer,
        help=f"the daemon's Watch ring, in events (default {d.event_buffer}: it wraps within the warm-up)",
    )
    p.add_argument(
        "--warmup-seconds", type=float, help="rss_start is sampled this late at least, and once every tier is full (default: a sixth of --seconds)",
    )
    p.add_argument(
        "--disconnect-every", type=int, default=d.disconnect_every, help="turns between disconnects mid-store"
    )
    p.add_argument(
        "--session-events", choices=SESSION_EVENT_STYLES, default=d.session_events,
        help="all: every kind, up to four a turn; lean: one a turn (tool_pause or turn_end), "
        "the turn started by Lookup's session_id",
    )
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--dir", type=Path, default=d.dir, help="scratch directory for the daemon (default var/bench)")


def run_cli(args: argparse.Namespace) -> int:
    def measure() -> dict:
        cfg = SoakConfig(
            clients=args.clients, seconds=args.seconds, max_ops=args.max_ops, processes=args.processes,
            block_bytes=args.block_bytes, dram_bytes=args.dram_bytes, nvme_bytes=args.nvme_bytes,
            lease_seconds=args.lease_seconds, event_buffer=args.event_buffer, warmup_seconds=args.warmup_seconds,
            disconnect_every=args.disconnect_every, session_events=args.session_events, seed=args.seed, dir=args.dir,
        )
        return run(cfg)

    return run_and_report("soak", measure, args.json)
