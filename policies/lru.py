"""Prefix-aware LRU over the whole hierarchy: the reference policy.

Every block has a last use, a tick taken when a store makes it or a load reads it. Each
tier orders its copies by their block's last use, least recent first. A chain is touched
leaf first and root last, so within a chain the root is the most recent: eviction takes a
chain's tail before its head, and a held prefix stays a prefix.

A copy that moves keeps its block's last use: a block demoted is as old in the tier below as
it was above, not the newest thing there. So ranks compare across tiers and a block never
ranks below its descendants (the two properties :class:`Policy` asks for), and the core
drops a block older than everything it would push down: the hierarchy drops its least
recently used block, as one tier of the same total would.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence, Set

from sortedcontainers import SortedList

from kvd.core.sessions import Observation, Session
from kvd.policies.base import BlockKey, Policy, Prefetch


class LruPolicy(Policy):
    name = "lru"

    def __init__(self) -> None:
        self._last: dict[BlockKey, int] = {}  # key -> tick of its last use, while some tier holds it
        self._held: dict[str, dict[BlockKey, int]] = {}  # tier -> key -> the tick it is filed under
        self._order: dict[str, SortedList] = {}  # tier -> (tick, key), least recent first
        self._tick = 0

    def _tier(self, tier: str) -> tuple[dict[BlockKey, int], SortedList]:
        held = self._held.get(tier)
        if held is None:
            held = self._held[tier] = {}
            self._order[tier] = SortedList()
        return held, self._order[tier]

    def _file(self, tier: str, key: BlockKey, tick: int) -> None:
        held, order = self._tier(tier)
        old = held.get(key)
        if old is not None:
            order.remove((old, key))
        held[key] = tick
        order.add((tick, key))

    def on_stored(self, tier: str, keys: Sequence[BlockKey], now: float) -> None:
        """A new block is used now; a copy that moved keeps its block's last use."""
        for key in reversed(keys):
            tick = self._last.get(key)
            if tick is None:
                self._tick += 1
                tick = self._last[key] = self._tick
            self._file(tier, key, tick)

    def on_accessed(self, keys: Sequence[BlockKey], now: float) -> None:
        for key in reversed(keys):
            if key not in self._last:
                continue
            self._tick += 1
            self._last[key] = self._tick
            for tier, held in self._held.items():
                if key in held:
                    self._file(tier, key, self._tick)

    def on_removed(self, tier: str, key: BlockKey) -> None:
        held, order = self._tier(tier)
        tick = held.pop(key, None)
        if tick is None:
            return
        order.remove((tick, key))
        if not any(key in other for other in self._held.values()):
            del self._last[key]

    def on_sessions(
        self, changed: Sequence[Session], observations: Sequence[Observation], reclassified: Set[BlockKey], now: float
    ) -> None:
        """LRU is the reference that ignores sessions: recency is all it knows."""

    def victims(self, tier: str, now: float) -> Iterator[BlockKey]:
        return (key for _, key in self._tier(tier)[1])

    @property
    def newest_use(self) -> float:
        """The tick of the latest use of any block (what priority ranks highest)."""
        return float(self._tick)

    def priority(self, key: BlockKey, tier: str, now: float) -> float:
        """The tick of the block's last use (higher: more recent), in any tier."""
        return float(self._last.get(key, float("-inf")))

    def prefetches(self, tier: str, now: float) -> Iterator[Prefetch]:
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
            tracked, order = self._tier(tier)
            if set(tracked) != keys:
                problems.append(
                    f"lru[{tier}]: {len(tracked.keys() - keys)} tracked but not held, "
                    f"{len(keys - tracked.keys())} held but not tracked"
                )
            if len(order) != len(tracked) or any(tracked.get(key) != tick for tick, key in order):
                problems.append(f"lru[{tier}]: its order disagrees with its copies' ticks")
            if any(self._last.get(key) != tick for key, tick in tracked.items()):
                problems.append(f"lru[{tier}]: a copy filed under another tick than its block's last use")
        anywhere = set().union(*held.values()) if held else set()
        if self._last.keys() - anywhere:
            problems.append(f"lru: {len(self._last.keys() - anywhere)} last uses kept for blocks no tier holds")
        return problems
