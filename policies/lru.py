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

Cost: a use files a copy at the newest end of its tier's order, an ``OrderedDict`` kept in
tick order (O(1) a key: a chain of 2,000 ancestors is touched on every load and store). Only
a copy that moves with an older tick goes behind newer ones; those few wait in a sorted list
beside it, and the victims are the two merged.
"""

from __future__ import annotations

import heapq
from collections import OrderedDict
from collections.abc import Iterator, Sequence, Set

from sortedcontainers import SortedList

from kvd.core.sessions import Observation, Session
from kvd.policies.base import BlockKey, Policy, Prefetch


class LruPolicy(Policy):
    name = "lru"

    def __init__(self) -> None:
        self._last: dict[BlockKey, int] = {}  # key -> tick of its last use, while some tier holds it
        self._held: dict[str, dict[BlockKey, int]] = {}  # tier -> key -> the tick it is filed under
        # tier -> key -> tick, in tick order: every copy filed with a tick newer than all here
        self._newest: dict[str, OrderedDict[BlockKey, int]] = {}
        self._behind: dict[str, SortedList] = {}  # tier -> (tick, key) of copies filed behind newer ones
        self._tick = 0

    def _tier(self, tier: str) -> dict[BlockKey, int]:
        held = self._held.get(tier)
        if held is None:
            held = self._held[tier] = {}
            self._newest[tier] = OrderedDict()
            self._behind[tier] = SortedList()
        return held

    def _unfile(self, tier: str, key: BlockKey, tick: int) -> None:
        newest = self._newest[tier]
        if newest.pop(key, None) is None:
            self._behind[tier].remove((tick, key))

    def _file(self, tier: str, key: BlockKey, tick: int) -> None:
        held = self._tier(tier)
        old = held.get(key)
        if old is not None:
            self._unfile(tier, key, old)
        held[key] = tick
        newest = self._newest[tier]
        if not newest or newest[next(reversed(newest))] < tick:
            newest[key] = tick  # the newest: its place is the end
        else:
            self._behind[tier].add((tick, key))

    def on_stored(self, tier: str, keys: Sequence[BlockKey], now: float) -> None:
        """A new block is used now; a copy that moved keeps its block's last use."""
        for key in reversed(keys):
            tick = self._last.get(key)
            if tick is None:
                self._tick += 1
                tick = self._last[key] = self._tick
            self._file(tier, key, tick)

    def on_accessed(self, keys: Sequence[BlockKey], now: float) -> None:
        # _file, inlined: a use is always the newest tick, so a copy goes to its tier's end.
        last = self._last
        tiers = [(held, self._newest[t], self._behind[t]) for t, held in self._held.items()]
        tick = self._tick
        for key in reversed(keys):
            if key not in last:
                continue
            tick += 1
            last[key] = tick
            for held, newest, behind in tiers:
                old = held.get(key)
                if old is None:
                    continue
                held[key] = tick
                if key in newest:
                    newest.move_to_end(key)
                else:
                    behind.remove((old, key))
                newest[key] = tick
        self._tick = tick

    def on_removed(self, tier: str, key: BlockKey) -> None:
        held = self._tier(tier)
        tick = held.pop(key, None)
        if tick is None:
            return
        self._unfile(tier, key, tick)
        if not any(key in other for other in self._held.values()):
            del self._last[key]

    def on_sessions(
        self, changed: Sequence[Session], observations: Sequence[Observation], reclassified: Set[BlockKey], now: float
    ) -> None:
        """LRU is the reference that ignores sessions: recency is all it knows."""

    def victims(self, tier: str, now: float) -> Iterator[BlockKey]:
        return (key for _, key in self._order(tier))

    def _order(self, tier: str) -> Iterator[tuple[int, BlockKey]]:
        """(tick, key) of the tier's copies, least recent first."""
        self._tier(tier)
        newest = ((tick, key) for key, tick in self._newest[tier].items())
        return heapq.merge(self._behind[tier], newest)

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
            tracked = self._tier(tier)
            order = list(self._order(tier))
            if set(tracked) != keys:
                problems.append(
                    f"lru[{tier}]: {len(tracked.keys() - keys)} tracked but not held, "
                    f"{len(keys - tracked.keys())} held but not tracked"
                )
            if len(order) != len(tracked) or any(tracked.get(key) != tick for tick, key in order):
                problems.append(f"lru[{tier}]: its order disagrees with its copies' ticks")
            ticks = list(self._newest[tier].values())
            if ticks != sorted(ticks) or self._newest[tier].keys() & {key for _, key in self._behind[tier]}:
                problems.append(f"lru[{tier}]: its newest copies are out of tick order, or filed twice")
            if any(self._last.get(key) != tick for key, tick in tracked.items()):
                problems.append(f"lru[{tier}]: a copy filed under another tick than its block's last use")
        anywhere = set().union(*held.values()) if held else set()
        if self._last.keys() - anywhere:
            problems.append(f"lru: {len(self._last.keys() - anywhere)} last uses kept for blocks no tier holds")
        return problems
