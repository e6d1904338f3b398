"""Belady's offline oracle: evict the block whose next use is farthest in the future.

For replay only: it reads the future from the trace (:class:`Future`), which no daemon has.
Next uses are request positions in the trace. A block never used again goes first; among
equals the deepest block of a chain goes first, so a held prefix stays a prefix (a child is
never used without its parent, so its next use is never sooner).

Victims come from a heap with lazy deletion: each key's entry is re-pushed whenever its
next use moves on (the requests the replay has passed name the keys), and stale entries
are skipped on the way out; iterating pops only as far as the caller reads.
"""

from __future__ import annotations

import bisect
import heapq
from collections.abc import Iterator, Sequence, Set

from kvd.core.sessions import Observation, Session
from kvd.policies.base import BlockKey, Policy

NEVER = 1 << 62


class Future:
    """Where each block is used: ``uses[key]`` lists the positions of the requests whose
    prompt holds it, ascending. ``position`` is the request being served; the replay moves
    it forward."""

    def __init__(
        self, uses: dict[BlockKey, list[int]], depth: dict[BlockKey, int], chains: Sequence[Sequence[BlockKey]]
    ) -> None:
        self.uses = uses
        self.depth = depth
        self.chains = chains
        self.position = 0

    @classmethod
    def from_chains(cls, namespace: str, chains: Sequence[Sequence[int]]) -> Future:
        uses: dict[BlockKey, list[int]] = {}
        depth: dict[BlockKey, int] = {}
        keyed = [[(namespace, h) for h in chain] for chain in chains]
        for i, chain in enumerate(keyed):
            for d, key in enumerate(chain):
                positions = uses.get(key)
                if positions is None:
                    uses[key] = [i]
                    depth[key] = d
                elif positions[-1] != i:
                    positions.append(i)
        return cls(uses, depth, keyed)

    def next_use(self, key: BlockKey) -> int:
        """The first request after the current one that uses ``key`` (NEVER if none)."""
        positions = self.uses.get(key)
        if not positions:
            return NEVER
        i = bisect.bisect_right(positions, self.position)
        return positions[i] if i < len(positions) else NEVER


class BeladyPolicy(Policy):
    name = "belady"

    def __init__(self, future: Future | None = None) -> None:
        if future is None:
            raise ValueError("the belady policy needs the trace's future: it runs only in `kvd replay`")
        self.future = future
        self._held: dict[str, dict[BlockKey, int]] = {}  # tier -> key -> next use in its heap entry
        self._heaps: dict[str, list[tuple[int, int, BlockKey]]] = {}
        self._synced = 0  # requests up to this position have re-pushed their keys

    def _push(self, tier: str, key: BlockKey) -> None:
        nxt = self.future.next_use(key)
        held = self._held.setdefault(tier, {})
        if held.get(key) == nxt:
            return  # its entry is current
        held[key] = nxt
        # Farthest first: negate; deeper first among equals.
        heapq.heappush(self._heaps.setdefault(tier, []), (-nxt, -self.future.depth.get(key, 0), key))

    def on_stored(self, tier: str, keys: Sequence[BlockKey], now: float) -> None:
        self._sync()
        for key in keys:
            self._push(tier, key)

    def on_accessed(self, keys: Sequence[BlockKey], now: float) -> None:
        self._sync()
        for tier, held in self._held.items():
            for key in keys:
                if key in held:
                    self._push(tier, key)

    def on_removed(self, tier: str, key: BlockKey) -> None:
        self._held.get(tier, {}).pop(key, None)

    def on_sessions(
        self, changed: Sequence[Session], observations: Sequence[Observation], reclassified: Set[BlockKey], now: float
    ) -> None:
        """The oracle knows every next use already: sessions tell it nothing."""

    def _sync(self) -> None:
        """Re-push the held keys of the requests passed since the last call: their next
        use moved on."""
        future = self.future
        if future.position < self._synced:
            # Served out of expected order (a closed-loop replay): refresh this request's keys.
            self._synced = future.position - 1
        while self._synced < future.position:
            self._synced += 1
            if self._synced < len(future.chains):
                for key in future.chains[self._synced]:
                    for tier, held in self._held.items():
                        if key in held:
                            self._push(tier, key)

    def victims(self, tier: str, now: float) -> Iterator[BlockKey]:
        self._sync()
        return self._pop_in_order(tier)

    def _pop_in_order(self, tier: str) -> Iterator[BlockKey]:
        held = self._held.get(tier, {})
        heap = self._heaps.get(tier, [])
        taken: list[tuple[int, int, BlockKey]] = []
        seen: set[BlockKey] = set()
        try:
            while heap:
                entry = heapq.heappop(heap)
                if held.get(entry[2]) != -entry[0] or entry[2] in seen:
                    continue  # stale (removed, or re-pushed with a later next use) or a twin
                seen.add(entry[2])
                taken.append(entry)
                yield entry[2]
        finally:
            for entry in taken:  # put back what the caller saw; it evicts through on_removed
                heapq.heappush(heap, entry)

    def priority(self, key: BlockKey, tier: str, now: float) -> float:
        return float(-self.future.next_use(key))

    def prefetches(self, tier: str, now: float) -> Iterator[BlockKey]:
        """The oracle is a bound on hit rate, not on timing: it never prefetches."""
        return iter(())

    def worth_demoting(self, key: BlockKey, tier: str, now: float) -> bool:
        return self.future.next_use(key) != NEVER

    def retention_class(self, key: BlockKey, tier: str) -> str | None:
        """Belady keeps no classes: the next use is all it knows."""
        return None

    def check(self, held: dict[str, set[BlockKey]]) -> list[str]:
        problems = []
        for tier in set(held) | set(self._held):
            tracked = set(self._held.get(tier, {}))
            keys = held.get(tier, set())
            if tracked != keys:
                problems.append(
                    f"belady[{tier}]: {len(tracked - keys)} tracked but not held, {len(keys - tracked)} held but not tracked"
                )
        return problems
