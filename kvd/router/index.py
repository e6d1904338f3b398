"""The router's index: (namespace, hash) -> which nodes hold the block, in which tiers.

An index is fed the nodes' events (a copy stored in / removed from a tier) and answers, for
a request's chained hashes, how long a prefix each node holds and in which tiers. Tiers are
names from ``kvd.tiers.TIER_NAMES``; nodes are the daemons' addresses.
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from kvd.tiers import TIER_NAMES

_BIT = {tier: 1 << i for i, tier in enumerate(TIER_NAMES)}  # fastest tier = lowest bit


def fastest(mask: int) -> str:
    return TIER_NAMES[(mask & -mask).bit_length() - 1]


@dataclass
class NodeMatch:
    """How much of a prefix one node holds: blocks per fastest tier, in prefix order."""

    blocks: int = 0
    by_tier: dict[str, int] = field(default_factory=dict)


class BlockIndex(ABC):
    """Where blocks are, across nodes. Implementations must be safe to call from several
    threads (one watcher per node writes, routers read)."""

    @abstractmethod
    def apply(self, node: str, stored: Iterable[tuple[str, int, str]], removed: Iterable[tuple[str, int, str]]) -> None:
        """Record ``(namespace, hash, tier)`` copies a node gained, then those it lost."""

    @abstractmethod
    def drop_node(self, node: str) -> None:
        """Forget everything a node holds (it left, or is about to be resynchronized)."""

    @abstractmethod
    def match(self, namespace: str, hashes: Sequence[int], nodes: Iterable[str] | None = None) -> dict[str, NodeMatch]:
        """Per node (only ``nodes`` when given), the longest prefix of ``hashes`` it holds."""

    @abstractmethod
    def blocks_of(self, node: str) -> set[tuple[str, int, str]]:
        """Every ``(namespace, hash, tier)`` the index has for a node (tests, kvctl)."""


class MemoryIndex(BlockIndex):
    """A dict from (namespace, hash) to {node: tier bitmask}, under one lock."""

    def __init__(self) -> None:
        self._blocks: dict[tuple[str, int], dict[str, int]] = {}
        self._lock = threading.Lock()

    def apply(self, node, stored, removed) -> None:
        with self._lock:
            for namespace, h, tier in stored:
                holders = self._blocks.setdefault((namespace, h), {})
                holders[node] = holders.get(node, 0) | _BIT[tier]
            for namespace, h, tier in removed:
                holders = self._blocks.get((namespace, h))
                if holders is None or node not in holders:
                    continue
                mask = holders[node] & ~_BIT[tier]
                if mask:
                    holders[node] = mask
                else:
                    del holders[node]
                    if not holders:
                        del self._blocks[(namespace, h)]

    def drop_node(self, node: str) -> None:
        with self._lock:
            for key in [k for k, holders in self._blocks.items() if node in holders]:
                holders = self._blocks[key]
                del holders[node]
                if not holders:
                    del self._blocks[key]

    def match(self, namespace, hashes, nodes=None) -> dict[str, NodeMatch]:
        wanted = None if nodes is None else set(nodes)
        matches: dict[str, NodeMatch] = {}
        alive: set[str] | None = None  # nodes whose prefix is still unbroken
        with self._lock:
            for h in hashes:
                holders = self._blocks.get((namespace, h))
                if not holders:
                    break
                if alive is None:
                    alive = set(holders) if wanted is None else set(holders) & wanted
                else:
                    alive &= holders.keys()
                if not alive:
                    break
                for node in alive:
                    m = matches.get(node)
                    if m is None:
                        m = matches[node] = NodeMatch()
                    m.blocks += 1
                    tier = fastest(holders[node])
                    m.by_tier[tier] = m.by_tier.get(tier, 0) + 1
        return matches

    def blocks_of(self, node: str) -> set[tuple[str, int, str]]:
        with self._lock:
            return {
                (ns, h, tier)
                for (ns, h), holders in self._blocks.items()
                if node in holders
                for tier in TIER_NAMES
                if holders[node] & _BIT[tier]
            }
