"""`kvd replay`: a trace through the daemon's own core over capacity-only tiers and a
simulated clock.

The objects are the daemon's: :class:`~kvd.core.manager.KvCore` with its catalog, session
table and policy, over :class:`~kvd.tiers.ExtentAllocator` spaces (slot bookkeeping, no
bytes). Only the mover and the engine are simulated:

- a request arrives (open loop at its timestamp; closed loop, after its session's previous
  turn finished plus ``pause_s``); the held prefix is looked up and loaded (promotions run at
  once: their time is part of the TTFT), the rest is recomputed, and every block of the
  prompt is stored — in parts of at most the top tier, as a client batches it, so the head
  of a named session's prompt bigger than HBM moves down as its tail arrives;
- TTFT = load time of the held prefix (per block, from the tier it was found in) +
  recompute time of the rest; the turn finishes after its output is decoded;
- demotions a store or load needs run at once (their bytes are counted); write-behind and
  prefetch transfers run in the background on per-link queues at the link's bandwidth, so a
  prefetch helps only if it lands before the turn arrives;
- with session ids, the replay sends what an agent framework would: turn start (with the
  prompt's hashes), turn end, a tool pause naming the tool of the next turn, session end
  after the last turn. Without them the core infers sessions from the chains.

Costs (:class:`CostModel`'s defaults): 131,072 KV bytes per token (Llama-3.1-8B bf16),
prefill 12,000 tokens/s, DRAM->HBM 25 GB/s, NVMe->DRAM 6 GB/s, DRAM->NVMe 3 GB/s, decode
12 ms/token; HBM pool to the engine 1,000 GB/s (a device-to-device copy).
"""

from __future__ import annotations

import heapq
import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from kvd.core.errors import NoSpace
from kvd.core.manager import BlockSpec, CoreConfig, KvCore, Transfer, Wait
from kvd.core.sessions import MAX_EXPECTED_PAUSE_S, SessionConfig, SessionTable
from kvd.media import TIER_NAMES
from kvd.policies import Future, make_policy
from kvd.replay.trace import Trace, TraceRequest
from kvd.tiers.alloc import ExtentAllocator

NAMESPACE = "replay"
PAUSE_HINTS = ("none", "exact")
GB = 1e9
PAGE = 4096


@dataclass(frozen=True)
class CostModel:
    """Bytes per token, tokens per second, seconds per token, GB/s (1e9 bytes) per link."""

    bytes_per_token: int = 131_072
    prefill_tokens_per_s: float = 12_000.0
    decode_s_per_token: float = 0.012
    hbm_read_gbps: float = 1000.0
    dram_to_hbm_gbps: float = 25.0
    hbm_to_dram_gbps: float = 25.0
    nvme_to_dram_gbps: float = 6.0
    dram_to_nvme_gbps: float = 3.0

    def link_gbps(self, src: str, dst: str) -> float:
        table = {
            ("dram", "hbm"): self.dram_to_hbm_gbps,
            ("hbm", "dram"): self.hbm_to_dram_gbps,
            ("nvme", "dram"): self.nvme_to_dram_gbps,
            ("dram", "nvme"): self.dram_to_nvme_gbps,
        }
        if (src, dst) in table:
            return table[(src, dst)]
        # Tiers with one absent between them: the path through DRAM, one hop after the other.
        via = [(src, "dram"), ("dram", dst)]
        return 1.0 / sum(1.0 / table[hop] for hop in via)

    def load_s_per_byte(self, tier: str, top: str) -> float:
        """Seconds per byte to bring a block held in ``tier`` into the engine's HBM."""
        if tier == "hbm":
            return 1.0 / (self.hbm_read_gbps * GB)
        if tier == "dram":
            return 1.0 / (self.dram_to_hbm_gbps * GB)
        return 1.0 / (self.nvme_to_dram_gbps * GB) + 1.0 / (self.dram_to_hbm_gbps * GB)


@dataclass(frozen=True)
class ReplayConfig:
    """Tier capacities in bytes (0: the tier is absent) and the cost model."""

    hbm_bytes: int = 0
    dram_bytes: int = 64 << 30
    nvme_bytes: int = 0
    cost: CostModel = field(default_factory=CostModel)
    tick_s: float = 0.25  # how often the simulated mover wakes up when nothing else happens
    prefetch_interval_s: float = 0.25  # how often it plans prefetches (the daemon's mover too)
    batch_blocks: int = 256  # transfers planned per mover round
    write_behind: bool = True
    # What a tool pause event says (sessions with ids and pause_s only): "none", the tool's
    # name alone, as most agent frameworks can; "exact", also the pause's true length as
    # expected_pause_s — a framework that knows its tools' run times (an upper bound).
    pause_hints: Literal["none", "exact"] = "none"

    def __post_init__(self) -> None:
        if self.pause_hints not in PAUSE_HINTS:
            raise ValueError(f"pause hints must be one of {', '.join(PAUSE_HINTS)}, not {self.pause_hints!r}")

    def capacities(self) -> dict[str, int]:
        return {t: b for t, b in (("hbm", self.hbm_bytes), ("dram", self.dram_bytes), ("nvme", self.nvme_bytes)) if b}


@dataclass
class PolicyResult:
    """What one policy's replay measured. Tokens are prompt tokens; seconds simulated."""

    policy: str
    requests: int
    prompt_tokens: int
    hit_tokens: int
    hit_tokens_by_tier: dict[str, int]
    recomputed_tokens: int
    compulsory_tokens: int
    ttft_s: list[float]
    session_completion_s: list[float]
    bytes_moved: dict[str, int]
    # Prompts not held whole right after their store: longer than a lone tier, no room
    # (leases), or making room for a later part dropped an earlier part or its ancestor.
    unstored_requests: int
    wall_s: float
    problems: list[str]

    @property
    def hit_rate(self) -> float:
        return self.hit_tokens / self.prompt_tokens if self.prompt_tokens else 0.0

    def summary(self) -> dict:
        ttft = np.asarray(self.ttft_s or [0.0])
        done = np.asarray(self.session_completion_s or [0.0])
        total = self.prompt_tokens or 1
        return {
            "hit_rate": self.hit_rate,
            "hit_rate_by_tier": {t: n / total for t, n in self.hit_tokens_by_tier.items()},
            "prompt_tokens": self.prompt_tokens,
            "hit_tokens": self.hit_tokens,
            "recomputed_tokens": self.recomputed_tokens,
            "compulsory_tokens": self.compulsory_tokens,
            "ttft_s": {f"p{q}": float(np.percentile(ttft, q)) for q in (50, 90, 99)},
            "session_completion_s": {"mean": float(done.mean()), "p90": float(np.percentile(done, 90))},
            "bytes_moved": dict(sorted(self.bytes_moved.items())),
            "requests": self.requests,
            "unstored_requests": self.unstored_requests,
            "wall_s": self.wall_s,
            "check_problems": self.problems,
        }


class SimClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


ARRIVE, FINISH, XFER, TICK = 0, 1, 2, 3


class Replay:
    """One policy's run over one trace. Call :meth:`run` once."""

    def __init__(
        self,
        trace: Trace,
        policy: str,
        config: ReplayConfig,
        progress: Callable[[int], None] | None = None,
        check_every: int = 0,
    ) -> None:
        if not config.capacities():
            raise ValueError("every tier has 0 bytes: give --hbm, --dram or --nvme")
        self.trace = trace
        self.config = config
        self.cost = config.cost
        self.block_bytes = trace.block_size * config.cost.bytes_per_token
        self.clock = SimClock()
        self.progress = progress
        self.check_every = check_every
        spaces = {}
        for tier, capacity in config.capacities().items():
            capacity -= capacity % PAGE
            if capacity < self.block_bytes:
                raise ValueError(
                    f"the {tier} tier ({capacity} bytes) cannot hold one block of {self.block_bytes} bytes"
                )
            spaces[tier] = ExtentAllocator([(0, capacity)], PAGE)
        self.sessions = SessionTable(SessionConfig())
        self.future = _future_of(trace) if policy == "belady" else None
        self.policy_name = policy
        self.core = KvCore(
            spaces,
            make_policy(policy, self.sessions, self.future),
            self.clock,
            CoreConfig(write_behind=config.write_behind, max_batch_blocks=1 << 20),
            sessions=self.sessions,
        )
        self.core.register_namespace(NAMESPACE, trace.block_size, self.block_bytes)
        top = spaces[self.core.top]
        self._top_blocks = top.capacity_bytes // top.slot_bytes(self.block_bytes)
        self._events: list[tuple[float, int, int, object]] = []
        self._order = itertools.count()
        self._link_free: dict[tuple[str, str], float] = {}
        self._background: dict[int, Transfer] = {}
        self.bytes_moved: dict[str, int] = {}
        self.ttft: list[float] = []
        self.hit_by_tier = {t: 0 for t in self.core.tiers}
        self.prompt_tokens = self.hit_tokens = self.compulsory = 0
        self.unstored = 0
        self._seen: set[int] = set()
        self._session_start: dict[str, float] = {}
        self.session_done: list[float] = []
        self._next_turn: dict[int, TraceRequest] = {}
        # Request index -> its place in expected order (the future's rank).
        self._rank = {r.index: i for i, r in enumerate(_order(trace))} if self.future is not None else {}
        self._next_prefetch = 0.0

    # -- the event loop -------------------------------------------------------------------
    def run(self) -> PolicyResult:
        started = time.perf_counter()
        trace = self.trace
        closed = {}
        by_session: dict[str, list[TraceRequest]] = {}
        for req in trace.requests:
            if req.session_id is not None:
                by_session.setdefault(req.session_id, []).append(req)
        for turns in by_session.values():
            for prev, nxt in zip(turns, turns[1:]):
                self._next_turn[prev.index] = nxt
                if nxt.pause_s is not None:
                    closed[nxt.index] = True
        for req in trace.requests:
            if req.index not in closed:
                self._push(req.arrival_s, ARRIVE, req)
        if trace.requests:
            self._push(0.0, TICK, None)
        served = 0
        while self._events:
            t, _, kind, data = heapq.heappop(self._events)
            self.clock.now = max(self.clock.now, t)
            if kind == ARRIVE:
                self._arrive(data)
                served += 1
                if self.progress is not None:
                    self.progress(served)
                if self.check_every and served % self.check_every == 0:
                    problems = self.core.check()
                    if problems:
                        raise AssertionError(f"after request {served}: {problems[:5]}")
            elif kind == FINISH:
                self._finish(data)
            elif kind == XFER:
                self._landed(data)
            elif kind == TICK:
                self.core.expire_leases()
                if served < len(trace.requests):
                    self._push(self.clock.now + self.config.tick_s, TICK, None)
            self._pump()
        self.core.take_events()
        return PolicyResult(
            policy=self.policy_name,
            requests=served,
            prompt_tokens=self.prompt_tokens,
            hit_tokens=self.hit_tokens,
            hit_tokens_by_tier=self.hit_by_tier,
            recomputed_tokens=self.prompt_tokens - self.hit_tokens,
            compulsory_tokens=self.compulsory,
            ttft_s=self.ttft,
            session_completion_s=self.session_done,
            bytes_moved=self.bytes_moved,
            unstored_requests=self.unstored,
            wall_s=time.perf_counter() - started,
            problems=self.core.check(),
        )

    def _push(self, t: float, kind: int, data: object) -> None:
        heapq.heappush(self._events, (t, next(self._order), kind, data))

    # -- a request ------------------------------------------------------------------------
    def _arrive(self, req: TraceRequest) -> None:
        core, now = self.core, self.clock.now
        if self.future is not None:
            self.future.serve(self._rank[req.index])
        hashes = list(req.hash_ids)
        bs = req.block_size
        last_partial = len(hashes) * bs > req.input_length
        if req.session_id is not None:
            self._session_start.setdefault(req.session_id, now)
            core.session_event(NAMESPACE, req.session_id, "turn_start", hashes, last_partial=last_partial)
        codes = core.lookup_codes(NAMESPACE, hashes)
        held = len(codes)
        load_s = 0.0
        hit_tokens = 0
        for i, code in enumerate(codes):
            tokens = min(bs, req.input_length - i * bs)
            if tokens <= 0:
                break
            tier = TIER_NAMES[code - 1]
            hit_tokens += tokens
            self.hit_by_tier[tier] += tokens
            load_s += self.block_bytes * self.cost.load_s_per_byte(tier, core.top)
        self._account_compulsory(hashes, req)
        self.prompt_tokens += req.input_length
        self.hit_tokens += hit_tokens
        if held:
            self._load(hashes[:held])
        self._store(req, hashes, last_partial)
        ttft = load_s + (req.input_length - hit_tokens) / self.cost.prefill_tokens_per_s
        self.ttft.append(ttft)
        finish = now + ttft + req.output_length * self.cost.decode_s_per_token
        self._push(finish, FINISH, req)
        nxt = self._next_turn.get(req.index)
        if self.future is not None and nxt is not None and nxt.pause_s is not None and not req.last:
            self.future.schedule(self._rank[nxt.index], finish + nxt.pause_s)  # settled now

    def _finish(self, req: TraceRequest) -> None:
        core, now = self.core, self.clock.now
        nxt = self._next_turn.get(req.index)
        if req.session_id is None:
            self.session_done.append(now - req.arrival_s)  # a request alone is its own program
            return
        core.session_event(NAMESPACE, req.session_id, "turn_end")
        if nxt is None or req.last:
            core.session_event(NAMESPACE, req.session_id, "session_end")
            self.session_done.append(now - self._session_start[req.session_id])
            return
        if nxt.tool:
            # A pause of 0 or of more than a day is no hint a session event can carry.
            exact = (
                self.config.pause_hints == "exact"
                and nxt.pause_s is not None
                and 0 < nxt.pause_s <= MAX_EXPECTED_PAUSE_S
            )
            core.session_event(
                NAMESPACE, req.session_id, "tool_pause", tool=nxt.tool, expected_s=nxt.pause_s if exact else None
            )
        if nxt.pause_s is not None:
            self._push(now + nxt.pause_s, ARRIVE, nxt)

    def _account_compulsory(self, hashes: list[int], req: TraceRequest) -> None:
        """Tokens an infinite cache would miss: from the first never-seen block on."""
        seen = self._seen
        possible = 0
        for i, h in enumerate(hashes):
            if h not in seen:
                break
            possible = min((i + 1) * req.block_size, req.input_length)
        self.compulsory += req.input_length - possible
        seen.update(hashes)

    def _load(self, hashes: list[int]) -> None:
        """Load the held prefix as an engine does: in batches that fit the top tier (a
        promotion needs room there), each pinned, promoted and released in turn."""
        core = self.core
        step = max(1, self._top_blocks // 2)
        for lo in range(0, len(hashes), step):
            grant = None
            try:
                for _ in range(64):
                    grant = core.prepare_load(NAMESPACE, hashes[lo : lo + step])
                    if not isinstance(grant, Wait):
                        break
                    self._make_progress()
            except NoSpace:
                return  # the rest of the top tier is pinned: the load time is counted anyway
            if grant is None or isinstance(grant, Wait):
                return
            for transfer in grant.promotions + grant.awaiting:
                if core.is_inflight(transfer):
                    self._land_now(transfer)
            core.complete_load(grant.lease_id)

    def _store(self, req: TraceRequest, hashes: list[int], last_partial: bool) -> None:
        """Store the prompt as a client batches it: in parts of at most the top tier, each
        its own lease, so a prompt bigger than the top tier is stored whole — its earlier
        blocks move down to make room for the later ones. Two cases keep one part:

        - with no tier below, a prompt longer than the tier keeps its head (a tail alone is
          unreachable), cut before the store so that the session table sees one turn;
        - a request without a session id: the core infers its session from the chain a
          store names, and a first part shorter than the last turn's chain would look
          like a new session. (Such a prompt is one part, so it keeps its head when it does
          not fit.)

        A part that does not fit (the tier full of leased blocks) keeps its head, and what
        follows it is not stored. A part whose room-making dropped the block it continues
        is written nothing (the core's answer). Either way, and when a later part's room
        took an earlier part, the prompt counts in ``unstored_requests``."""
        specs = [
            BlockSpec(h, hashes[i - 1] if i else None, self.block_bytes) for i, h in enumerate(hashes)
        ]
        whole = True
        if len(self.core.tiers) == 1 and len(specs) > self._top_blocks:
            specs, last_partial, whole = specs[: self._top_blocks], False, False
        named = req.session_id is not None and len(self.core.tiers) > 1
        step = max(1, self._top_blocks if named else len(specs))
        for lo in range(0, len(specs), step):
            part = specs[lo : lo + step]
            if self._store_part(req, part, last_partial and lo + step >= len(specs)) < len(part):
                whole = False
                break
        if not whole or len(self.core.lookup_codes(NAMESPACE, hashes)) < len(hashes):
            self.unstored += 1

    def _store_part(self, req: TraceRequest, specs: list[BlockSpec], last_partial: bool) -> int:
        """Store a part of a prompt under one lease; returns how many of its blocks (a
        prefix) were stored."""
        core = self.core
        while specs:
            try:
                for _ in range(64):
                    grant = core.prepare_store(NAMESPACE, specs, session_id=req.session_id, last_partial=last_partial)
                    if not isinstance(grant, Wait):
                        break
                    self._make_progress()
                else:
                    return 0
            except NoSpace:
                specs = specs[: len(specs) // 2]
                last_partial = False
                continue
            core.commit_store(grant.lease_id)
            return len(specs)
        return 0

    # -- the simulated mover --------------------------------------------------------------
    def _make_progress(self) -> None:
        """A request waits for room: run the planned demotions now; if none are planned,
        land the background transfers that hold the copies it waits for."""
        demotions = self.core.take_demotions()
        for transfer in demotions:
            self._land_now(transfer)
        if not demotions:
            for transfer in list(self._background.values()):
                self._land_now(transfer)

    def _land_now(self, transfer: Transfer) -> None:
        self._background.pop(transfer.id, None)
        if self.core.is_inflight(transfer):
            self.core.complete_transfer(transfer)
            self._count(transfer)

    def _count(self, transfer: Transfer) -> None:
        link = f"{transfer.src_tier}->{transfer.dst_tier}"
        self.bytes_moved[link] = self.bytes_moved.get(link, 0) + transfer.nbytes

    def _pump(self) -> None:
        core = self.core
        for transfer in core.take_demotions():
            self._land_now(transfer)
        now = self.clock.now
        planned = core.plan_write_behind(self.config.batch_blocks)
        if now >= self._next_prefetch:  # like the daemon's mover: prefetches every interval
            self._next_prefetch = now + self.config.prefetch_interval_s
            planned += core.plan_prefetch(self.config.batch_blocks)
        for transfer in planned:
            link = (transfer.src_tier, transfer.dst_tier)
            start = max(now, self._link_free.get(link, 0.0))
            done = start + transfer.nbytes / (self.cost.link_gbps(*link) * GB)
            self._link_free[link] = done
            self._background[transfer.id] = transfer
            self._push(done, XFER, transfer)
        core.take_events()

    def _landed(self, transfer: Transfer) -> None:
        if self._background.pop(transfer.id, None) is not None and self.core.is_inflight(transfer):
            self.core.complete_transfer(transfer)
            self._count(transfer)


def _order(trace: Trace) -> list[TraceRequest]:
    """The requests in expected arrival order (timestamps; ties in trace order)."""
    return sorted(trace.requests, key=lambda r: (r.arrival_s, r.index))


def _future_of(trace: Trace) -> Future:
    """Belady's future: every request in expected order; a session's closed-loop turns
    (those with ``pause_s``) form a group whose arrivals the replay settles as it goes."""
    order = _order(trace)
    return Future.from_chains(
        NAMESPACE,
        [r.hash_ids for r in order],
        [r.arrival_s for r in order],
        [r.session_id if r.session_id is not None and r.pause_s is not None else None for r in order],
    )


def replay(
    trace: Trace,
    policy: str,
    config: ReplayConfig,
    progress: Callable[[int], None] | None = None,
    check_every: int = 0,
) -> PolicyResult:
    return Replay(trace, policy, config, progress, check_every).run()
