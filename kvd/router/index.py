"""The router's index: (namespace, hash) -> which nodes hold the block, in which tiers.

An index is fed the nodes' events (a copy stored in / removed from a tier) and answers, for
a request's chained hashes, how long a prefix each node holds and in which tiers. Tiers are
names from ``kvd.tiers.TIER_NAMES``; nodes are the daemons' addresses.
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from kvd.media import TIER_NAMES

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
    def drop_namespace(self, node: str, namespace: str) -> None:
        """Forget every block a node holds in ``namespace`` (the node cleared it)."""

    @abstractmethod
    def match(self, namespace: str, hashes: Sequence[int], nodes: Iterable[str] | None = None) -> dict[str, NodeMatch]:
        """Per node (only ``nodes`` when given), the longest prefix of ``hashes`` it holds."""

    @abstractmethod
    def blocks_of(self, node: str) -> set[tuple[str, int, str]]:
        """Every ``(namespace, hash, tier)`` the index has for a node (tests, kvctl)."""


class MemoryIndex(BlockIndex):
    """Per node and namespace, a dict from hash to a bitmask of tiers, under one lock.

    Matching walks each node's dict with ``map`` (C speed) and cuts at the first miss;
    dropping a node is one dict deletion.
    """

    def __init__(self) -> None:
        self._nodes: dict[str, dict[str, dict[int, int]]] = {}
        self._lock = threading.Lock()

    def apply(self, node, stored, removed) -> None:
        with self._lock:
            spaces = self._nodes.setdefault(node, {})
            for namespace, h, tier in stored:
                held = spaces.setdefault(namespace, {})
                held[h] = held.get(h, 0) | _BIT[tier]
            for namespace, h, tier in removed:
                held = spaces.get(namespace)
                mask = held.get(h) if held is not None else None
                if mask is None:
                    continue
                mask &= ~_BIT[tier]
                if mask:
                    held[h] = mask
                else:
                    del held[h]

    def drop_node(self, node: str) -> None:
        with self._lock:
            self._nodes.pop(node, None)

    def drop_namespace(self, node: str, namespace: str) -> None:
        with self._lock:
            self._nodes.get(node, {}).pop(namespace, None)

    def match(self, namespace, hashes, nodes=None) -> dict[str, NodeMatch]:
        matches: dict[str, NodeMatch] = {}
        with self._lock:
            for node in self._nodes if nodes is None else nodes:
                held = self._nodes.get(node, {}).get(namespace)
                if not held:
                    continue
                masks = list(map(held.get, hashes))
                try:
                    masks = masks[: masks.index(None)]
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
                for tier in TIER_NAMES
                if mask & _BIT[tier]
            }
