"""The router's index: (namespace, hash) -> which nodes hold the block, in which tiers.

An index is fed the nodes' events (a copy stored in / removed from a tier) and answers, for
a request's chained hashes, how long a prefix each node can read and from which tiers.
Tiers are names from ``kvd.media.ALL_TIERS``; nodes are the daemons' addresses.

The node's own tiers (``TIER_NAMES``: hbm, dram, nvme) are its alone. The ``cluster`` tier
is the Mooncake Store every node of the view reads: a node announces the blocks it put
there, and such a block is readable from every node at the cluster's cost. So a node's
prefix is its own blocks continued by cluster blocks (any node's announcement), block by
block, for as long as the chain goes on; where a node holds a block itself and the cluster
has it too, its own (faster) tier counts.

**Announcers that leave.** A node's cluster announcements are dropped with the node
(``drop_node``: it left, or it is about to be resynchronized from its snapshot), as are its
own copies. Its values may well outlive it — the store keeps replicas (2 by default) on
other nodes' segments — but nothing can retract an announcement of a node the view no
longer follows, so keeping them would let a block that later leaves the cluster (an audit,
a master restart) be counted forever. Dropping them errs the safe way: a cluster block the
index no longer knows is still read by whichever node the request goes to (a node's own
Lookup asks the cluster), and because the cluster counts the same for every node, missing
it lowers every node's score alike rather than sending requests to the wrong node. The
index therefore always equals what the nodes it follows say, announcer by announcer.
"""

from __future__ import annotations

import operator
import threading
from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from itertools import repeat

from kvd.media import ALL_TIERS, CLUSTER

_BIT = {tier: 1 << i for i, tier in enumerate(ALL_TIERS)}  # fastest tier = lowest bit; the cluster's the highest
_CLUSTER_BIT = _BIT[CLUSTER]


def fastest(mask: int) -> str:
    """The fastest tier of a non-zero bitmask of ``_BIT`` values."""
    return ALL_TIERS[(mask & -mask).bit_length() - 1]


@dataclass
class NodeMatch:
    """How much of a prefix one node can read: blocks per fastest tier, in prefix order.
    ``by_tier["cluster"]`` counts the blocks it reads from the cluster tier."""

    blocks: int = 0
    by_tier: dict[str, int] = field(default_factory=dict)

    @property
    def own_blocks(self) -> int:
        """Blocks of the prefix the node holds in its own tiers (not read from the cluster)."""
        return self.blocks - self.by_tier.get(CLUSTER, 0)


class BlockIndex(ABC):
    """Where blocks are, across nodes. Implementations must be safe to call from several
    threads (one watcher per node writes, routers read).

    A node is *known* from the first copy it is said to hold (any namespace, any tier) until
    it is dropped."""

    @abstractmethod
    def apply(self, node: str, stored: Iterable[tuple[str, int, str]], removed: Iterable[tuple[str, int, str]]) -> None:
        """Record ``(namespace, hash, tier)`` copies a node gained, then those it lost. For
        the cluster tier: the blocks the node announces it put into the cluster, then those
        it says the cluster no longer has."""

    @abstractmethod
    def drop_node(self, node: str) -> None:
        """Forget everything a node holds and every cluster block it announced (it left, or
        is about to be resynchronized); see the module's docstring for why."""

    @abstractmethod
    def drop_namespace(self, node: str, namespace: str) -> None:
        """Forget every block a node holds in ``namespace``, and its cluster announcements
        there (the node cleared it)."""

    @abstractmethod
    def match(self, namespace: str, hashes: Sequence[int], nodes: Iterable[str] | None = None) -> dict[str, NodeMatch]:
        """Per node (``nodes`` when given, else every known node), the longest prefix of
        ``hashes`` it can read: each block from its own fastest tier, else from the cluster
        when any known node announced it there. Nodes that can read no block are left out."""

    @abstractmethod
    def blocks_of(self, node: str) -> set[tuple[str, int, str]]:
        """Every ``(namespace, hash, tier)`` the index has for a node, its cluster
        announcements included (tests, kvctl)."""


class MemoryIndex(BlockIndex):
    """Per node and namespace, a dict from hash to a bitmask of tiers, under one lock; per
    namespace, how many nodes announce each cluster block.

    Matching walks each node's dict with ``map`` (C speed), ORs in the cluster's blocks, and
    cuts at the first miss; dropping a node is one dict deletion plus one decrement per
    cluster block it announced.
    """

    def __init__(self) -> None:
        self._nodes: dict[str, dict[str, dict[int, int]]] = {}
        self._cluster: dict[str, dict[int, int]] = {}  # namespace -> hash -> announcing nodes
        self._lock = threading.Lock()

    def _announce(self, namespace: str, h: int) -> None:
        counts = self._cluster.setdefault(namespace, {})
        counts[h] = counts.get(h, 0) + 1

    def _retract(self, namespace: str, h: int) -> None:
        counts = self._cluster[namespace]
        n = counts[h] - 1
        if n:
            counts[h] = n
        else:
            del counts[h]
            if not counts:
                del self._cluster[namespace]

    def _retract_all(self, namespace: str, held: dict[int, int]) -> None:
        for h, mask in held.items():
            if mask & _CLUSTER_BIT:
                self._retract(namespace, h)

    def apply(self, node, stored, removed) -> None:
        stored = list(stored)
        with self._lock:
            spaces = self._nodes.setdefault(node, {}) if stored else self._nodes.get(node, {})
            for namespace, h, tier in stored:
                bit = _BIT[tier]
                held = spaces.setdefault(namespace, {})
                mask = held.get(h, 0)
                if bit == _CLUSTER_BIT and not mask & bit:
                    self._announce(namespace, h)
                held[h] = mask | bit
            for namespace, h, tier in removed:
                bit = _BIT[tier]
                held = spaces.get(namespace)
                mask = held.get(h) if held is not None else None
                if mask is None or not mask & bit:
                    continue
                if bit == _CLUSTER_BIT:
                    self._retract(namespace, h)
                mask &= ~bit
                if mask:
                    held[h] = mask
                else:
                    del held[h]

    def drop_node(self, node: str) -> None:
        with self._lock:
            for namespace, held in self._nodes.pop(node, {}).items():
                self._retract_all(namespace, held)

    def drop_namespace(self, node: str, namespace: str) -> None:
        with self._lock:
            held = self._nodes.get(node, {}).pop(namespace, None)
            if held:
                self._retract_all(namespace, held)

    def match(self, namespace, hashes, nodes=None) -> dict[str, NodeMatch]:
        matches: dict[str, NodeMatch] = {}
        with self._lock:
            shared = self._cluster.get(namespace)
            # The cluster's part, the same for every node: its bit where it has the block.
            cluster = [_CLUSTER_BIT if c else 0 for c in map(shared.__contains__, hashes)] if shared else []
            if not any(cluster):
                cluster = []
            for node in self._nodes if nodes is None else nodes:
                held = self._nodes.get(node, {}).get(namespace)
                if held:
                    masks = list(map(held.get, hashes, repeat(0)))
                    if cluster:
                        masks = list(map(operator.or_, masks, cluster))
                elif cluster:
                    masks = cluster
                else:
                    continue
                try:
                    masks = masks[: masks.index(0)]
                except ValueError:
                    pass
                if not masks:
                    continue
                by_tier: dict[str, int] = {}
                for mask, n in Counter(masks).items():
                    tier = fastest(mask)
                    by_tier[tier] = by_tier.get(tier, 0) + n
                matches[node] = NodeMatch(len(masks), by_tier)
        return matches

    def blocks_of(self, node: str) -> set[tuple[str, int, str]]:
        with self._lock:
            return {
                (namespace, h, tier)
                for namespace, held in self._nodes.get(node, {}).items()
                for h, mask in held.items()
                for tier in ALL_TIERS
                if mask & _BIT[tier]
            }
