"""Prefix-aware LRU: the reference policy.

Per tier, an ordered map from least to most recently used. A chain is touched leaf first and
root last, so within a chain the root is the most recent: eviction takes a chain's tail
before its head and never leaves a held block whose parent is gone while the parent's
descendants stay (a held prefix stays a prefix).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator, Sequence, Set

from kvd.core.sessions import Observation, Session
from kvd.policies.base import BlockKey, Policy


class LruPolicy(Policy):
    name = "lru"

    def __init__(self) -> None:
        self._order: dict[str, OrderedDict[BlockKey, int]] = {}  # key -> tick of last touch
        self._tick = 0

    def _tier(self, tier: str) -> OrderedDict[BlockKey, int]:
        order = self._order.get(tier)
        if order is None:
            order = self._order[tier] = OrderedDict()
        return order

    def on_stored(self, tier: str, keys: Sequence[BlockKey], now: float) -> None:
        order = self._tier(tier)
        for key in reversed(keys):
            self._tick += 1
            order[key] = self._tick
            order.move_to_end(key)

    def on_accessed(self, keys: Sequence[BlockKey], now: float) -> None:
        for order in self._order.values():
            for key in reversed(keys):
                if key in order:
                    self._tick += 1
                    order[key] = self._tick
                    order.move_to_end(key)

    def on_removed(self, tier: str, key: BlockKey) -> None:
        self._tier(tier).pop(key, None)

    def on_sessions(
        self, changed: Sequence[Session], observations: Sequence[Observation], reclassified: Set[BlockKey], now: float
    ) -> None:
        """LRU is the reference that ignores sessions: recency is all it knows."""

    def victims(self, tier: str, now: float) -> Iterator[BlockKey]:
        return iter(self._tier(tier))

    def priority(self, key: BlockKey, tier: str, now: float) -> float:
        """When ``key`` was last touched, as a tick count (higher: more recent)."""
        return float(self._tier(tier).get(key, float("-inf")))

    def prefetches(self, tier: str, now: float) -> Iterator[BlockKey]:
        """LRU has no notion of a future, so it never prefetches."""
        return iter(())

    def worth_demoting(self, key: BlockKey, tier: str, now: float) -> bool:
        """LRU keeps every evicted block one tier down while there is room."""
        return True

    def retention_class(self, key: BlockKey, tier: str) -> str | None:
        """LRU keeps no classes: recency is all it knows."""
        return None

    def check(self, held: dict[str, set[BlockKey]]) -> list[str]:
        problems = []
        for tier, keys in held.items():
            tracked = set(self._tier(tier))
            if tracked != keys:
                problems.append(
                    f"lru[{tier}]: {len(tracked - keys)} tracked but not held, "
                    f"{len(keys - tracked)} held but not tracked"
                )
        return problems
