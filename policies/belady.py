"""Belady's offline oracle: evict the block whose next use is farthest in the future.

For replay only: it reads the future from the trace (:class:`Future`), which no daemon has.
A block never used again goes first; among equals the deepest block of a chain goes first,
so a held prefix stays a prefix (a child is never used without its parent, so its next use
is never sooner).

A next use is a time, not a place in the file: in a closed-loop replay a turn arrives
``pause_s`` after its session's previous turn finished, so the order in which requests
arrive is the replay's own doing and differs from the trace's timestamps (by seconds, on
the generated agentic workloads). The replay tells the future each closed-loop turn's
arrival as soon as it is settled (:meth:`Future.schedule`); a session's later turns are
expected as late as its latest one.

Victims come from a heap with lazy deletion: each key's entry is re-pushed whenever its
next use moves (the future names the keys whose next use it moved), and stale entries are
skipped on the way out; iterating pops only as far as the caller reads.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Hashable, Iterator, Sequence, Set

from kvd.core.sessions import Observation, Session
from kvd.policies.base import BlockKey, Policy, Prefetch

NEVER = 1 << 62
NextUse = tuple[float, int]  # (seconds, the request's rank in the trace); sorts by time
NEVER_USED: NextUse = (math.inf, NEVER)


class Future:
    """When each block is used next.

    Requests are given in the trace's order (their ``rank``): ``chains[rank]`` is the
    request's prompt, ``times[rank]`` its timestamp (seconds) and ``groups[rank]`` the
    closed-loop program it belongs to, or None for a request that arrives at its timestamp
    (open loop). Within a group requests arrive in rank order, each at a time the replay
    settles with :meth:`schedule`; until then a request is expected at its timestamp plus
    its group's latest lateness (settled time minus timestamp).

    Invariant: ``next_use(key)`` is the earliest expected arrival among the requests not yet
    served whose prompt holds ``key``; ``take_changed`` returns every key whose next use
    moved since the last call (a superset).
    """

    def __init__(
        self,
        chains: Sequence[Sequence[BlockKey]],
        times: Sequence[float],
        groups: Sequence[Hashable | None],
    ) -> None:
        if not len(chains) == len(times) == len(groups):
            raise ValueError("a future needs one time and one group per request")
        self.chains = chains
        self.times = list(times)
        self.groups = list(groups)
        self.depth: dict[BlockKey, int] = {}
        # key -> group -> ranks of the requests whose prompt holds it, ascending
        self.uses: dict[BlockKey, dict[Hashable | None, list[int]]] = {}
        self._next: dict[tuple[BlockKey, Hashable | None], int] = {}  # -> index into those ranks
        self._served = bytearray(len(chains))
        self._settled: dict[int, float] = {}  # rank -> arrival the replay settled
        self._late: dict[Hashable, float] = {}  # group -> its latest lateness, seconds
        self._changed: list[BlockKey] = []
        self._group_keys: dict[Hashable, set[BlockKey]] = {}  # group -> keys of all its requests
        for rank, chain in enumerate(chains):
            group = self.groups[rank]
            if group is not None:
                self._group_keys.setdefault(group, set()).update(chain)
            for d, key in enumerate(chain):
                by_group = self.uses.get(key)
                if by_group is None:
                    by_group = self.uses[key] = {}
                    self.depth[key] = d
                ranks = by_group.setdefault(group, [])
                if not ranks or ranks[-1] != rank:
                    ranks.append(rank)

    @classmethod
    def from_chains(
        cls,
        namespace: str,
        chains: Sequence[Sequence[int]],
        times: Sequence[float] | None = None,
        groups: Sequence[Hashable | None] | None = None,
    ) -> Future:
        """A future over ``chains`` of hashes in ``namespace``; by default every request is
        open loop and arrives at its rank (seconds)."""
        keyed = [[(namespace, h) for h in chain] for chain in chains]
        return cls(
            keyed,
            [float(i) for i in range(len(chains))] if times is None else times,
            [None] * len(chains) if groups is None else groups,
        )

    def serve(self, rank: int) -> None:
        """The request at ``rank`` arrived: its uses are past."""
        if self._served[rank]:
            return
        self._served[rank] = 1
        self._changed.extend(self.chains[rank])

    def schedule(self, rank: int, at: float) -> None:
        """The closed-loop request at ``rank`` will arrive at ``at`` seconds; its group's
        later requests are expected as late."""
        group = self.groups[rank]
        if group is None:
            raise ValueError(f"request {rank} arrives at its timestamp: it has no schedule to settle")
        self._settled[rank] = at
        late = at - self.times[rank]
        if self._late.get(group, 0.0) != late:
            self._late[group] = late
            # Every later request of the group moved: any key of theirs may have a new next use.
            self._changed.extend(self._group_keys[group])
        else:
            self._changed.extend(self.chains[rank])

    def expected_at(self, rank: int) -> float:
        """When the request at ``rank`` is expected to arrive (seconds)."""
        at = self._settled.get(rank)
        if at is not None:
            return at
        group = self.groups[rank]
        return self.times[rank] + (self._late.get(group, 0.0) if group is not None else 0.0)

    def next_use(self, key: BlockKey) -> NextUse:
        """``(seconds, rank)`` of the first unserved request that uses ``key``, or
        NEVER_USED."""
        by_group = self.uses.get(key)
        if not by_group:
            return NEVER_USED
        best = NEVER_USED
        served = self._served
        for group, ranks in by_group.items():
            i = self._next.get((key, group), 0)
            while i < len(ranks) and served[ranks[i]]:
                i += 1
            self._next[(key, group)] = i
            if i < len(ranks):
                rank = ranks[i]
                use = (self.expected_at(rank), rank)
                if use < best:
                    best = use
        return best

    def take_changed(self) -> list[BlockKey]:
        """Keys whose next use may have moved since the last call."""
        changed, self._changed = self._changed, []
        return changed


class BeladyPolicy(Policy):
    name = "belady"

    def __init__(self, future: Future | None = None) -> None:
        if future is None:
            raise ValueError("the belady policy needs the trace's future: it runs only in `kvd replay`")
        self.future = future
        self._held: dict[str, dict[BlockKey, NextUse]] = {}  # tier -> key -> next use in its heap entry
        # Farthest first: (-seconds, -rank, -depth, key); deeper first among equals.
        self._heaps: dict[str, list[tuple[float, int, int, BlockKey]]] = {}

    def _push(self, tier: str, key: BlockKey) -> None:
        nxt = self.future.next_use(key)
        held = self._held.setdefault(tier, {})
        if held.get(key) == nxt:
            return  # its entry is current
        held[key] = nxt
        heapq.heappush(self._heaps.setdefault(tier, []), (-nxt[0], -nxt[1], -self.future.depth.get(key, 0), key))

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
        """Re-push the held keys whose next use the future moved (requests served,
        arrivals settled)."""
        changed = self.future.take_changed()
        if not changed:
            return
        for tier, held in self._held.items():
            for key in changed:
                if key in held:
                    self._push(tier, key)

    def victims(self, tier: str, now: float) -> Iterator[BlockKey]:
        self._sync()
        return self._pop_in_order(tier)

    def _pop_in_order(self, tier: str) -> Iterator[BlockKey]:
        held = self._held.get(tier, {})
        heap = self._heaps.get(tier, [])
        taken: list[tuple[float, int, int, BlockKey]] = []
        seen: set[BlockKey] = set()
        try:
            while heap:
                entry = heapq.heappop(heap)
                key = entry[3]
                if held.get(key) != (-entry[0], -entry[1]) or key in seen:
                    continue  # stale (removed, or re-pushed with another next use) or a twin
                seen.add(key)
                taken.append(entry)
                yield key
        finally:
            for entry in taken:  # put back what the caller saw; it evicts through on_removed
                heapq.heappush(heap, entry)

    def priority(self, key: BlockKey, tier: str, now: float) -> float:
        """Minus the seconds until the next use (-inf: never used again). A request that
        uses a block uses its ancestors, so none is needed later than its descendants."""
        return -(self.future.next_use(key)[0] - now)

    def prefetches(self, tier: str, now: float) -> Iterator[Prefetch]:
        """The oracle is a bound on hit rate, not on timing: it never prefetches."""
        return iter(())

    def worth_demoting(self, key: BlockKey, tier: str, now: float) -> bool:
        return self.future.next_use(key) != NEVER_USED

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
