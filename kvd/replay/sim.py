"""`kvd replay`: a trace through the daemon's own core over capacity-only tiers and a
simulated clock.

The objects are the daemon's: :class:`~kvd.core.manager.KvCore` with its catalog, session
table and policy, over :class:`~kvd.tiers.alloc.ExtentAllocator` spaces (slot bookkeeping,
no bytes). Only the mover and the engines are simulated:

- a request arrives (open loop at its timestamp; closed loop, its session's previous turn's
  end plus ``pause_s``). With ``engines``, it waits in a FIFO queue for one of them (each
  runs one prefill at a time; decoding overlaps), and the node knows its prompt's hashes
  while it waits (a ``turn_ahead`` event); without, it is served at once;
- served, the held prefix is looked up and loaded (promotions run at once: their time is
  part of the TTFT), the rest is recomputed, and every block of the prompt is stored — in
  parts of at most the top tier, as a client batches it;
- TTFT = queue wait + the KV transfer (the held prefix, per block from the tier it was found
  in) + the prefill of the rest; the turn finishes after its output is decoded;
- demotions a store or load needs run at once (their bytes are counted); write-behind and
  prefetch transfers run in the background on per-link queues at the link's bandwidth, so a
  prefetch helps only if it lands before the turn is served;
- with session ids, the replay sends what an agent framework would: turn start (with the
  prompt's hashes), turn end, a tool pause naming the tool of the next turn, session end
  after the last turn; with ``resume_lead_s``, each turn is announced (``turn_ahead``) that
  long before it arrives; with ``session_end_after_s``, a trace without ``last`` reports
  each conversation's end that long after its last turn. Without session ids the core
  infers sessions from the chains, and announcements and ends name them by their hashes.

Open-loop traces may overlap a session's turns: a turn that arrives before the previous one
finished starts its turn (the core sees the session active again), and the earlier turn's
end sends nothing (the session has moved on); a turn that arrives after its session ended
starts the session anew under the same id. Session events the core refuses anyway (a
session forgotten, ended by idle expiry) are counted in ``refused_session_events``.

The cost model is :class:`~kvd.replay.cost.CostModel`. A :class:`Replay` is one node; several
share one :class:`Timeline` and one :class:`Programs` when a router places the requests
(:mod:`kvd.replay.nodes`).
"""

from __future__ import annotations

import heapq
import itertools
import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Literal

from kvd.core.errors import KvdError, NoSpace
from kvd.core.manager import BlockSpec, CoreConfig, KvCore, Transfer, Wait
from kvd.core.sessions import MAX_EXPECTED_PAUSE_S, SessionConfig, SessionEvent, SessionTable
from kvd.media import TIER_NAMES, TierName
from kvd.policies import Future, make_policy
from kvd.replay.cost import GB, CostModel
from kvd.replay.result import PolicyResult
from kvd.replay.schedule import conversation_ends, expected_order, future_of
from kvd.replay.trace import Trace, TraceRequest
from kvd.tiers.alloc import ExtentAllocator

NAMESPACE = "replay"
PAUSE_HINTS = ("none", "exact")
PAGE = 4096


@dataclass(frozen=True)
class ReplayConfig:
    """Tier capacities in bytes (0: the tier is absent), the cost model, and what the
    simulated node and its clients do. Seconds for times."""

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
    engines: int = 0  # engines on the node, each one prefill at a time (0: every request at once)
    resume_lead_s: float = 0.0  # each turn is announced this long before it arrives (0: never)
    session_end_after_s: float | None = None  # without `last`: a conversation's end, this long after it

    def __post_init__(self) -> None:
        if self.pause_hints not in PAUSE_HINTS:
            raise ValueError(f"pause hints must be one of {', '.join(PAUSE_HINTS)}, not {self.pause_hints!r}")
        if self.engines < 0:
            raise ValueError(f"engines must not be negative, got {self.engines}")
        for name in ("resume_lead_s", "session_end_after_s"):
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and 0 <= value <= MAX_EXPECTED_PAUSE_S):
                raise ValueError(f"{name} must be in [0, {MAX_EXPECTED_PAUSE_S:.0f}] seconds, got {value}")

    def capacities(self) -> dict[str, int]:
        return {t: b for t, b in (("hbm", self.hbm_bytes), ("dram", self.dram_bytes), ("nvme", self.nvme_bytes)) if b}


ARRIVE, FINISH, XFER, TICK, FREE, ANNOUNCE, END = range(7)


class Timeline:
    """The simulated clock (calling it reads the seconds, as the core does) and the events the
    nodes of a replay wait on. An event is (time, kind, data, owner: the node that pushed it);
    they pop in time order, ties in the order they were pushed."""

    def __init__(self) -> None:
        self.now = 0.0
        self._events: list[tuple[float, int, int, object, object]] = []
        self._order = itertools.count()

    def __call__(self) -> float:
        return self.now

    def __bool__(self) -> bool:
        return bool(self._events)

    def push(self, t: float, kind: int, data: object, owner: object) -> None:
        heapq.heappush(self._events, (t, next(self._order), kind, data, owner))

    def pop(self) -> tuple[int, object, object]:
        """The next event's (kind, data, owner); the clock moves to its time (never back)."""
        t, _, kind, data, owner = heapq.heappop(self._events)
        self.now = max(self.now, t)
        return kind, data, owner


class Programs:
    """What a trace's programs do, whichever node serves their turns: each closed-loop turn's
    successor, each session's latest turn (request index), first arrival and completion
    (seconds), the blocks any request brought so far (what an infinite cache would miss), the
    requests that end their conversation (with ``session_end_after_s``) and, for ``belady``,
    each request's place in the expected order and the futures of every node's policy."""

    def __init__(self, trace: Trace, config: ReplayConfig, ranked: bool) -> None:
        self.trace = trace
        self.next_turn: dict[int, TraceRequest] = {}
        self.closed: set[int] = set()  # requests that arrive after their previous turn, not at their timestamp
        by_session: dict[str, list[TraceRequest]] = {}
        for req in trace.requests:
            if req.session_id is not None:
                by_session.setdefault(req.session_id, []).append(req)
        for turns in by_session.values():
            for prev, nxt in zip(turns, turns[1:]):
                self.next_turn[prev.index] = nxt
                if nxt.pause_s is not None:
                    self.closed.add(nxt.index)
        self.latest: dict[str, int] = {}
        self.session_start: dict[str, float] = {}
        self.session_done: list[float] = []
        self.seen: set[int] = set()
        self.arrived = 0  # requests that have reached a node
        has_last = any(r.last for r in trace.requests)
        self.ends = conversation_ends(trace) if config.session_end_after_s is not None and not has_last else set()
        # Request index -> its place in expected order (the future's rank).
        self.rank = {r.index: i for i, r in enumerate(expected_order(trace))} if ranked else {}
        self.futures: list[Future] = []

    def schedule_arrivals(self, timeline: Timeline, lead_s: float, owner: object) -> None:
        """Push the arrival (and, with ``lead_s``, the announcement) of every request that
        arrives at its timestamp; the others follow their previous turn's end."""
        for req in self.trace.requests:
            if req.index not in self.closed:
                timeline.push(req.arrival_s, ARRIVE, req, owner)
                if lead_s:
                    timeline.push(max(0.0, req.arrival_s - lead_s), ANNOUNCE, (req, req.arrival_s), owner)

    def serve(self, req: TraceRequest) -> None:
        """``req`` is served: its uses are past in every future."""
        for future in self.futures:
            future.serve(self.rank[req.index])

    def expect(self, req: TraceRequest, at: float) -> None:
        """Closed-loop ``req`` arrives at ``at`` seconds: every future settles it."""
        for future in self.futures:
            future.schedule(self.rank[req.index], at)


class Replay:
    """One policy's run over one trace: one node. Call :meth:`run` once; or, for several
    nodes, give each the same ``timeline`` and ``programs`` and drive them (:meth:`start`,
    :meth:`arrive`, :meth:`handle`, :meth:`result`)."""

    def __init__(
        self,
        trace: Trace,
        policy: str,
        config: ReplayConfig,
        progress: Callable[[int], None] | None = None,
        check_every: int = 0,
        timeline: Timeline | None = None,
        programs: Programs | None = None,
    ) -> None:
        if not config.capacities():
            raise ValueError("every tier has 0 bytes: give --hbm, --dram or --nvme")
        self.trace = trace
        self.config = config
        self.cost = config.cost
        self.block_bytes = trace.block_size * config.cost.bytes_per_token
        self.clock = timeline if timeline is not None else Timeline()
        self.programs = programs if programs is not None else Programs(trace, config, policy == "belady")
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
        self.future = future_of(trace, NAMESPACE) if policy == "belady" else None
        if self.future is not None:
            self.programs.futures.append(self.future)
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
        self._link_free: dict[tuple[str, str], float] = {}
        self._background: dict[int, Transfer] = {}
        self.bytes_moved: dict[str, int] = {}
        self.ttft: list[float] = []
        self.kv_transfer: list[float] = []
        self.queued: list[float] = []
        self.hit_by_tier: dict[str, int] = {t: 0 for t in self.core.tiers}
        self.prompt_tokens = self.hit_tokens = self.compulsory = 0
        self.unstored = 0
        self.refused = 0
        self.served = 0
        self._arrived: dict[int, float] = {}  # request index -> when it arrived
        self._queue: deque[TraceRequest] = deque()
        self._busy = 0  # engines running a prefill
        self._next_prefetch = 0.0

    # -- the event loop -------------------------------------------------------------------
    def run(self) -> PolicyResult:
        started = time.perf_counter()
        self.programs.schedule_arrivals(self.clock, self.config.resume_lead_s, self)
        self.start()
        while self.clock:
            kind, data, _ = self.clock.pop()
            if kind == ARRIVE:
                self.arrive(data)
            else:
                self.handle(kind, data)
            self.pump()
        self.core.take_events()
        return self.result(time.perf_counter() - started)

    def start(self) -> None:
        """Wake the simulated mover at time 0 (and every ``tick_s`` while requests remain)."""
        if self.trace.requests:
            self._push(0.0, TICK, None)

    def arrive(self, req: TraceRequest) -> None:
        """``req`` reaches this node (see :meth:`_arrive`); checks the core every
        ``check_every`` requests it served."""
        self._arrive(req)
        self.programs.arrived += 1
        self.served += 1
        if self.progress is not None:
            self.progress(self.programs.arrived)
        if self.check_every and self.served % self.check_every == 0:
            problems = self.core.check()
            if problems:
                raise AssertionError(f"after request {self.served}: {problems[:5]}")

    def handle(self, kind: int, data: object) -> None:
        """One of this node's events other than an arrival."""
        if kind == FINISH:
            self._finish(data)
        elif kind == XFER:
            self._landed(data)
        elif kind == TICK:
            self.core.expire_leases()
            if self.programs.arrived < len(self.trace.requests) or self._queue:
                self._push(self.clock.now + self.config.tick_s, TICK, None)
        elif kind == FREE:
            self._busy -= 1
            self._dispatch()
        elif kind == ANNOUNCE:
            req, at = data
            self._announce(req, at - self.clock.now)
        elif kind == END:
            self._session_event(data, SessionEvent.SESSION_END, list(data.hash_ids))

    def result(self, wall_s: float) -> PolicyResult:
        """What this node measured; session completions are every node's."""
        return PolicyResult(
            policy=self.policy_name,
            requests=self.served,
            prompt_tokens=self.prompt_tokens,
            hit_tokens=self.hit_tokens,
            hit_tokens_by_tier=self.hit_by_tier,
            recomputed_tokens=self.prompt_tokens - self.hit_tokens,
            compulsory_tokens=self.compulsory,
            ttft_s=self.ttft,
            session_completion_s=self.programs.session_done,
            bytes_moved=self.bytes_moved,
            unstored_requests=self.unstored,
            wall_s=wall_s,
            problems=self.core.check(),
            kv_transfer_s=self.kv_transfer,
            queue_s=self.queued if self.config.engines else None,
            refused_session_events=self.refused,
        )

    def _push(self, t: float, kind: int, data: object) -> None:
        self.clock.push(t, kind, data, self)

    # -- a request ------------------------------------------------------------------------
    def _arrive(self, req: TraceRequest) -> None:
        """A request reaches the node: served at once, or queued for an engine (the node
        learns its hashes while it waits)."""
        self._arrived[req.index] = self.clock.now
        if req.session_id is not None:
            self.programs.session_start.setdefault(req.session_id, self.clock.now)
        if not self.config.engines:
            self._serve(req)
            return
        self._queue.append(req)
        self._dispatch()
        if self._queue and self._queue[-1] is req:
            self._announce(req, 0.0)

    def _dispatch(self) -> None:
        while self._queue and self._busy < self.config.engines:
            self._busy += 1
            self._serve(self._queue.popleft())

    def _serve(self, req: TraceRequest) -> None:
        core, now = self.core, self.clock.now
        queued = now - self._arrived[req.index]
        programs = self.programs
        if programs.futures:
            programs.serve(req)
        hashes = list(req.hash_ids)
        bs = req.block_size
        last_partial = len(hashes) * bs > req.input_length
        if req.session_id is not None:
            programs.latest[req.session_id] = req.index
            self._session_event(req, SessionEvent.TURN_START, hashes, last_partial=last_partial)
        codes = core.lookup_codes(NAMESPACE, hashes)
        held = len(codes)
        found = [TIER_NAMES[code - 1] for code in codes] + self._beyond(hashes, held)
        load_s = 0.0
        hit_tokens = 0
        for i, tier in enumerate(found):
            tokens = min(bs, req.input_length - i * bs)
            if tokens <= 0:
                break
            hit_tokens += tokens
            self.hit_by_tier[tier] += tokens
            load_s += self.block_bytes * self.cost.load_s_per_byte(tier, core.top)
        self._account_compulsory(hashes, req)
        self.prompt_tokens += req.input_length
        self.hit_tokens += hit_tokens
        if held:
            self._load(hashes[:held])
        if len(found) > held:
            self._bring_in(req, hashes[: len(found)], held)
        if not self._store(req, hashes, last_partial):
            self.unstored += 1
        prefill = load_s + (req.input_length - hit_tokens) / self.cost.prefill_tokens_per_s
        self.ttft.append(queued + prefill)
        self.kv_transfer.append(load_s)
        self.queued.append(queued)
        if self.config.engines:
            self._push(now + prefill, FREE, None)
        finish = now + prefill + req.output_length * self.cost.decode_s_per_token
        self._push(finish, FINISH, req)
        nxt = programs.next_turn.get(req.index)
        if programs.futures and nxt is not None and nxt.pause_s is not None and not req.last:
            programs.expect(nxt, finish + nxt.pause_s)  # settled now

    def _finish(self, req: TraceRequest) -> None:
        now, programs = self.clock.now, self.programs
        if req.index in programs.ends:
            self._push(now + self.config.session_end_after_s, END, req)
        if req.session_id is None:
            programs.session_done.append(now - self._arrived[req.index])  # a request alone is its own program
            return
        nxt = programs.next_turn.get(req.index)
        if programs.latest.get(req.session_id) != req.index:
            return  # a later turn of the session has started: it carries on
        self._session_event(req, SessionEvent.TURN_END)
        if nxt is None or req.last:
            self._session_event(req, SessionEvent.SESSION_END)
            programs.session_done.append(now - programs.session_start.pop(req.session_id))
            return
        if nxt.tool:
            # A pause of 0 or of more than a day is no hint a session event can carry.
            exact = (
                self.config.pause_hints == "exact"
                and nxt.pause_s is not None
                and 0 < nxt.pause_s <= MAX_EXPECTED_PAUSE_S
            )
            self._session_event(req, SessionEvent.TOOL_PAUSE, tool=nxt.tool, expected_s=nxt.pause_s if exact else None)
        if nxt.pause_s is not None:
            arrival = now + nxt.pause_s
            self._push(arrival, ARRIVE, nxt)
            if self.config.resume_lead_s:
                self._push(max(now, arrival - self.config.resume_lead_s), ANNOUNCE, (nxt, arrival))

    def _announce(self, req: TraceRequest, arrives_in_s: float) -> None:
        """Tell the node that ``req`` is coming (named by its session, or by its hashes);
        its mover plans prefetches at once, as the daemon's does when a turn is announced."""
        self._session_event(req, SessionEvent.TURN_AHEAD, list(req.hash_ids), expected_s=max(0.0, arrives_in_s))
        self._next_prefetch = self.clock.now

    def _session_event(self, req: TraceRequest, kind: SessionEvent, hashes=(), **kw) -> None:
        """One session event for ``req``'s session (by its hashes when it has no id); one the
        core refuses is counted, not raised: a trace never stops the replay."""
        try:
            self.core.session_event(NAMESPACE, req.session_id or "", kind, hashes, **kw)
        except KvdError:
            self.refused += 1

    def _account_compulsory(self, hashes: list[int], req: TraceRequest) -> None:
        """Tokens an infinite cache would miss: from the first never-seen block on."""
        seen = self.programs.seen
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

    def _beyond(self, hashes: list[int], held: int) -> list[TierName]:
        """Per block after the node's own prefix of ``hashes`` (its first ``held`` blocks), for
        as long as the chain goes on, the tier outside the node that holds it. A node alone
        reads nothing outside itself: none."""
        return []

    def _bring_in(self, req: TraceRequest, hashes: list[int], held: int) -> None:
        """Copy into the node the blocks of ``hashes`` after its first ``held`` (what its
        lookup found in its own tiers), which :meth:`_beyond` found outside it. A node alone
        finds none, so there is nothing to copy."""

    def _store(self, req: TraceRequest, hashes: list[int], last_partial: bool, share: bool = True) -> bool:
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
        took an earlier part, the prompt is not held whole: returns False (True when it is).
        ``share``: the commits offer the blocks to the cluster tier (not blocks read from it)."""
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
            if self._store_part(req, part, last_partial and lo + step >= len(specs), share) < len(part):
                whole = False
                break
        return whole and len(self.core.lookup_codes(NAMESPACE, hashes)) == len(hashes)

    def _store_part(self, req: TraceRequest, specs: list[BlockSpec], last_partial: bool, share: bool = True) -> int:
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
            core.commit_store(grant.lease_id, share=share)
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

    def pump(self) -> None:
        """The simulated mover's round after every event: planned demotions land at once;
        write-behind and (every ``prefetch_interval_s``) prefetches start on their links."""
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


def replay(
    trace: Trace,
    policy: str,
    config: ReplayConfig,
    progress: Callable[[int], None] | None = None,
    check_every: int = 0,
) -> PolicyResult:
    return Replay(trace, policy, config, progress, check_every).run()


def floor(trace: Trace, config: ReplayConfig) -> PolicyResult:
    """The same trace with nothing ever transferred: one HBM tier holds every block (no
    eviction, no movement between tiers), the same engines, no announcements."""
    blocks = len({h for r in trace.requests for h in r.hash_ids}) + 1
    whole = replace(
        config,
        hbm_bytes=blocks * trace.block_size * config.cost.bytes_per_token + PAGE,
        dram_bytes=0,
        nvme_bytes=0,
        resume_lead_s=0.0,
        session_end_after_s=None,
    )
    return Replay(trace, "lru", whole).run()
