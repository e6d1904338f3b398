"""`kvd replay --nodes N`: a trace over N simulated nodes behind a router, with an optional
cluster tier that every node reads.

Each node is :class:`~kvd.replay.sim.Replay` — the daemon's own core and the simulated mover
and engines — and all of them share one :class:`~kvd.replay.sim.Timeline` (the clock and the
events) and one :class:`~kvd.replay.sim.Programs` (sessions' turns, completion times, the
blocks seen so far). What the nodes add:

- **the router** places each request when it arrives (or when it is announced, with
  ``resume_lead_s``: the node it tells is the node it sends the turn to). A node's score is
  the prefix it can read — its own blocks, continued by the cluster's — each block weighted
  by what reading it saves against recomputing it (``1 - load time / prefill time``, from the
  cost model, never below 0), minus ``load_weight_blocks`` per request in flight or queued on
  it; the best score wins, ties to the least loaded, then the lowest node. With
  ``migrate_p``, a resumed turn (one that continues an earlier request:
  :func:`~kvd.replay.schedule.previous_turns`) is sent, with that probability, to another
  node than its previous turn's (drawn per request from ``seed``, the same draw in every
  configuration and policy), the best of the others by the same score;
- **the cluster tier** (``cluster_bytes`` > 0): :class:`ClusterStore`. Every node's core
  offers its committed blocks (:mod:`kvd.core.exports`); the node's put link takes one batch
  of ``put_batch_blocks`` of them at a time, pinned in DRAM while the put reads them, at
  ``dram_to_cluster_gbps``, and reports which landed. A lookup that ends in the node's own
  tiers continues in the cluster, block by block; those blocks are read at
  ``cluster_to_dram_gbps`` (part of the turn's TTFT, like an NVMe promotion) and stored in
  the node as committed blocks that are not offered back.

What the model leaves out: gets and puts share no link (a put never delays a turn's read,
and the put link is the node's alone); a cluster block is readable the moment its put lands,
on every node; the cluster holds one copy of a block, whichever node put it, and loses none
but by eviction.
"""

from __future__ import annotations

import random
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

from kvd.core.exports import ExportBatch
from kvd.media import CLUSTER, TIER_NAMES, TierName
from kvd.replay.cost import GB
from kvd.replay.result import PolicyResult
from kvd.replay.schedule import previous_turns
from kvd.replay.sim import ANNOUNCE, ARRIVE, END, NAMESPACE, Programs, Replay, ReplayConfig, Timeline
from kvd.replay.trace import Trace, TraceRequest

PUT = END + 1  # a node's put to the cluster tier landed (after sim's own event kinds)


@dataclass(frozen=True)
class NodesConfig:
    """``nodes`` simulated nodes, each with ``node``'s tiers, engines and clients; the cluster
    tier's capacity in bytes over all nodes together (0: no cluster tier); the probability
    that a resumed turn migrates, seeded by ``seed``; the router's load weight (blocks of
    score per request in flight or queued on a node); blocks per put batch."""

    node: ReplayConfig
    nodes: int = 2
    cluster_bytes: int = 0
    migrate_p: float = 0.0
    seed: int = 0
    load_weight_blocks: float = 1.0
    put_batch_blocks: int = 1

    def __post_init__(self) -> None:
        if self.nodes < 1:
            raise ValueError(f"nodes must be at least 1, got {self.nodes}")
        if self.cluster_bytes < 0:
            raise ValueError(f"the cluster tier's bytes must not be negative, got {self.cluster_bytes}")
        if not 0.0 <= self.migrate_p <= 1.0:
            raise ValueError(f"migrate_p must be in [0, 1], got {self.migrate_p}")
        if not self.load_weight_blocks >= 0:
            raise ValueError(f"load_weight_blocks must not be negative, got {self.load_weight_blocks}")
        if self.put_batch_blocks < 1:
            raise ValueError(f"put_batch_blocks must be at least 1, got {self.put_batch_blocks}")


class ClusterStore:
    """The cluster tier as the replay models a Mooncake Store: ``capacity_bytes`` over all
    nodes together, one copy of a block (of the replay's one namespace) whichever node put
    it. A put that needs room evicts the least recently used blocks (put or read) and tells
    the node that put each one (its core forgets it published it). The order is the store's
    own and knows no chains: a head evicted before its tail strands the tail (a lookup
    stops at the first block the cluster lacks) until the tail is evicted too."""

    def __init__(self, capacity_bytes: int) -> None:
        self.capacity_bytes = capacity_bytes
        self.used_bytes = 0
        self._blocks: OrderedDict[int, tuple[int, Node]] = OrderedDict()  # hash -> (bytes, who put it), LRU first
        self.evicted = 0  # blocks evicted to make room
        self.refused = 0  # puts of a block it held already (another node put it first)

    def __contains__(self, h: int) -> bool:
        return h in self._blocks

    def __len__(self) -> int:
        return len(self._blocks)

    def prefix(self, hashes: Sequence[int], start: int) -> int:
        """How many blocks of ``hashes`` from index ``start`` on the store holds, in a row."""
        n = 0
        for h in hashes[start:]:
            if h not in self._blocks:
                break
            n += 1
        return n

    def read(self, hashes: Sequence[int]) -> int:
        """A get of ``hashes`` (all held): each becomes the most recently used, in order;
        returns the bytes read."""
        nbytes = 0
        for h in hashes:
            self._blocks.move_to_end(h)
            nbytes += self._blocks[h][0]
        return nbytes

    def put(self, h: int, nbytes: int, node: Node) -> bool:
        """Store block ``h`` for ``node``, evicting the least recently used until it fits;
        False (nothing stored, nothing evicted) when it is held already or bigger than the
        whole store."""
        if h in self._blocks:
            self.refused += 1
            return False
        if nbytes > self.capacity_bytes:
            return False
        while self.used_bytes + nbytes > self.capacity_bytes:
            gone, (size, owner) = self._blocks.popitem(last=False)
            self.used_bytes -= size
            self.evicted += 1
            owner.core.forget_published([(NAMESPACE, gone)])
        self._blocks[h] = (nbytes, node)
        self.used_bytes += nbytes
        return True


class Node(Replay):
    """One simulated node: a :class:`Replay` over the shared timeline and programs that
    counts the requests it has in flight (for the router) and, with a cluster, reads from it
    and puts to it."""

    def __init__(
        self,
        number: int,
        trace: Trace,
        policy: str,
        config: NodesConfig,
        timeline: Timeline,
        programs: Programs,
        cluster: ClusterStore | None,
        progress: Callable[[int], None] | None = None,
        check_every: int = 0,
    ) -> None:
        super().__init__(trace, policy, config.node, progress, check_every, timeline, programs)
        self.number = number
        self.cluster = cluster
        self.put_batch_blocks = config.put_batch_blocks
        self.load = 0  # requests arrived here and not finished: queued, prefilling or decoding
        self.read_bytes = self.put_bytes = 0
        self._putting: ExportBatch | None = None
        self._put_free = 0.0  # when the put link is next free
        if cluster is not None:
            self.hit_by_tier[CLUSTER] = 0
            self.core.exports.enabled = True  # the node has joined the cluster: its commits are offered

    # -- the router's view ------------------------------------------------------------------
    def readable(self, hashes: Sequence[int]) -> list[TierName]:
        """The tier each block of the prefix of ``hashes`` this node can read comes from: its
        own blocks, then the cluster's. Changes nothing."""
        codes = self.core.lookup_codes(NAMESPACE, hashes)
        return [TIER_NAMES[c - 1] for c in codes] + self._beyond(list(hashes), len(codes))

    # -- a request --------------------------------------------------------------------------
    def _arrive(self, req: TraceRequest) -> None:
        self.load += 1
        super()._arrive(req)

    def _finish(self, req: TraceRequest) -> None:
        self.load -= 1
        super()._finish(req)

    def _beyond(self, hashes: list[int], held: int) -> list[TierName]:
        """The cluster's blocks that continue the node's own prefix."""
        if self.cluster is None:
            return []
        return [CLUSTER] * self.cluster.prefix(hashes, held)

    def _bring_in(self, req: TraceRequest, hashes: list[int], held: int) -> None:
        """Read the cluster's blocks of ``hashes`` (those after the node's own first ``held``)
        and store the prefix in the node, not offered back to the cluster (the turn's own
        store then finds them held). Their read time is already in the turn's TTFT. (A block
        of the node's own prefix that its load's room-making dropped meanwhile is stored
        again here: the engine has read it.)"""
        nbytes = self.cluster.read(hashes[held:])
        self.read_bytes += nbytes
        self.bytes_moved["cluster->dram"] = self.bytes_moved.get("cluster->dram", 0) + nbytes
        self._store(req, hashes, False, share=False)

    # -- the put link -----------------------------------------------------------------------
    def pump(self) -> None:
        """The mover's round, then the next put to the cluster when the put link is idle."""
        super().pump()
        if self.cluster is None or self._putting is not None:
            return
        batch = self.core.prepare_export(self.put_batch_blocks)
        if batch is None:
            return
        self._putting = batch
        nbytes = sum(item.nbytes for item in batch.items)
        start = max(self.clock.now, self._put_free)
        self._put_free = start + nbytes / (self.cost.dram_to_cluster_gbps * GB)
        self._push(self._put_free, PUT, batch)

    def handle(self, kind: int, data: object) -> None:
        if kind != PUT:
            super().handle(kind, data)
            return
        batch: ExportBatch = data  # type: ignore[assignment]
        landed = [self.cluster.put(item.hash, item.nbytes, self) for item in batch.items]
        self._putting = None
        self.core.complete_export(batch.id, landed)
        nbytes = sum(item.nbytes for item, ok in zip(batch.items, landed) if ok)
        self.put_bytes += nbytes
        if nbytes:
            self.bytes_moved["dram->cluster"] = self.bytes_moved.get("dram->cluster", 0) + nbytes


class Router:
    """Places each request on a node (see the module's docstring for the rule) and counts
    the resumed turns that moved: ``migrations`` (served elsewhere than their previous turn),
    ``forced`` (of those, moved by ``migrate_p``)."""

    def __init__(self, trace: Trace, nodes: list[Node], config: NodesConfig) -> None:
        self.nodes = nodes
        self.migrate_p = config.migrate_p
        self.load_weight = config.load_weight_blocks
        self.previous = previous_turns(trace)
        rng = random.Random(config.seed)
        self._draw = [rng.random() for _ in trace.requests]  # per request, whatever the order of arrivals
        self._node_of: dict[int, Node] = {}  # request index -> the node it was sent to
        self.migrations = self.forced = 0
        cost, node = config.node.cost, nodes[0]
        recompute_s = trace.block_size / cost.prefill_tokens_per_s
        tiers = [*node.core.tiers, CLUSTER]
        # A block's weight: the share of its recompute time that reading it saves.
        self.weight = {
            t: max(0.0, 1.0 - node.block_bytes * cost.load_s_per_byte(t, node.core.top) / recompute_s) for t in tiers
        }

    def place(self, req: TraceRequest) -> Node:
        """The node ``req`` goes to (decided once: an announced turn goes where it was
        announced)."""
        node = self._node_of.get(req.index)
        if node is not None:
            return node
        previous = self.previous.get(req.index)
        home = self._node_of.get(previous) if previous is not None else None
        forced = home is not None and len(self.nodes) > 1 and self._draw[req.index] < self.migrate_p
        candidates = [n for n in self.nodes if n is not home] if forced else self.nodes
        hashes = list(req.hash_ids)
        node = max(candidates, key=lambda n: (self.score(n, hashes), -n.load, -n.number))
        if home is not None and node is not home:
            self.migrations += 1
            self.forced += forced
        self._node_of[req.index] = node
        return node

    def score(self, node: Node, hashes: list[int]) -> float:
        """The weighted prefix ``node`` can read, less its load."""
        weight = self.weight
        return sum(weight[t] for t in node.readable(hashes)) - self.load_weight * node.load


@dataclass
class NodesResult:
    """One policy's multi-node replay: every node's figures together (``total``), the
    requests each node served, the router's migrations, and the cluster tier's traffic
    (bytes landed by puts, bytes read by gets), evictions and refused puts."""

    total: PolicyResult
    served_by_node: list[int]
    migrations: int
    forced_migrations: int
    cluster_put_bytes: int = 0
    cluster_read_bytes: int = 0
    cluster_evicted_blocks: int = 0
    cluster_refused_puts: int = 0
    cluster_blocks_held: int = 0

    def summary(self) -> dict:
        out = self.total.summary()
        out["recomputed_share"] = self.total.recomputed_tokens / self.total.prompt_tokens if self.total.prompt_tokens else 0.0
        out["served_by_node"] = self.served_by_node
        out["migrations"] = self.migrations
        out["forced_migrations"] = self.forced_migrations
        out["cluster"] = {
            "put_bytes": self.cluster_put_bytes,
            "read_bytes": self.cluster_read_bytes,
            "evicted_blocks": self.cluster_evicted_blocks,
            "refused_puts": self.cluster_refused_puts,
            "blocks_held": self.cluster_blocks_held,
        }
        return out


def replay_nodes(
    trace: Trace,
    policy: str,
    config: NodesConfig,
    progress: Callable[[int], None] | None = None,
    check_every: int = 0,
) -> NodesResult:
    """Run ``trace`` over ``config.nodes`` nodes with ``policy``; ``check_every``: run each
    node's core's check() every that many requests it serves (AssertionError on a problem)."""
    started = time.perf_counter()
    timeline = Timeline()
    programs = Programs(trace, config.node, policy == "belady")
    cluster = None
    if config.cluster_bytes:
        block_bytes = trace.block_size * config.node.cost.bytes_per_token
        if config.cluster_bytes < block_bytes:
            raise ValueError(f"the cluster tier ({config.cluster_bytes} bytes) cannot hold one block of {block_bytes} bytes")
        cluster = ClusterStore(config.cluster_bytes)
    nodes = [
        Node(i, trace, policy, config, timeline, programs, cluster, progress, check_every) for i in range(config.nodes)
    ]
    router = Router(trace, nodes, config)
    programs.schedule_arrivals(timeline, config.node.resume_lead_s, None)
    for node in nodes:
        node.start()
    while timeline:
        kind, data, owner = timeline.pop()
        if kind == ARRIVE:
            node = router.place(data)
            node.arrive(data)
        elif kind == ANNOUNCE:
            node = router.place(data[0])
            node.handle(kind, data)
        else:
            node = owner
            node.handle(kind, data)
        node.pump()
    wall = time.perf_counter() - started
    results = [n.result(wall) for n in nodes]
    for n in nodes:
        n.core.take_events()
    return NodesResult(
        total=merge(results, wall),
        served_by_node=[r.requests for r in results],
        migrations=router.migrations,
        forced_migrations=router.forced,
        cluster_put_bytes=sum(n.put_bytes for n in nodes),
        cluster_read_bytes=sum(n.read_bytes for n in nodes),
        cluster_evicted_blocks=cluster.evicted if cluster else 0,
        cluster_refused_puts=cluster.refused if cluster else 0,
        cluster_blocks_held=len(cluster) if cluster else 0,
    )


def merge(results: list[PolicyResult], wall_s: float) -> PolicyResult:
    """Nodes' results as one: counts and bytes summed, per-turn times side by side (node by
    node), check() problems named by node; session completions are the programs' (shared)."""
    first = results[0]

    def summed(attr: str) -> dict[str, int]:
        out: dict[str, int] = {}
        for r in results:
            for k, v in getattr(r, attr).items():
                out[k] = out.get(k, 0) + v
        return out

    return replace(
        first,
        requests=sum(r.requests for r in results),
        prompt_tokens=sum(r.prompt_tokens for r in results),
        hit_tokens=sum(r.hit_tokens for r in results),
        hit_tokens_by_tier=summed("hit_tokens_by_tier"),
        recomputed_tokens=sum(r.recomputed_tokens for r in results),
        compulsory_tokens=sum(r.compulsory_tokens for r in results),
        ttft_s=[t for r in results for t in r.ttft_s],
        bytes_moved=summed("bytes_moved"),
        unstored_requests=sum(r.unstored_requests for r in results),
        wall_s=wall_s,
        problems=[f"node {i}: {p}" for i, r in enumerate(results) for p in r.problems],
        kv_transfer_s=[t for r in results for t in r.kv_transfer_s],
        queue_s=None if first.queue_s is None else [t for r in results for t in r.queue_s or ()],
        refused_session_events=sum(r.refused_session_events for r in results),
    )
