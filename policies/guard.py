"""A shadow LRU that tells a policy when plain recency would be doing better.

Typed retention bets on sessions: that a chain's future users are the session that made it.
Some workloads break the bet (many requests sharing prefixes of each other at arbitrary
depths, no multi-turn programs), and then LRU's plain recency wins. The guard keeps a
shadow LRU of the same number of blocks, fed the same accesses, and decayed counts of the
prefix hits each would have had per request; :attr:`prefer_lru` says when the shadow is ahead by more than a
margin, so the policy can order its victims by recency until it is not (the adaptive
expert choice of ARC/LeCaR, made deterministic by simulating the other expert instead of
sampling it).

Pure bookkeeping: keys in, a boolean out; no time.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable, Sequence


class LruGuard:
    """``halflife``: block accesses over which old hits weigh half; ``margin``: how far
    ahead (a fraction) the shadow must be before recency takes over (half of it to hand
    back); ``warmup``: requests the shadow only fills during.

    The margin bounds what typed may lose to LRU before it gives way: 2% of a hit rate is
    well inside the one point it may trail by (docs/decisions.md, "The guard gives way at
    2%")."""

    def __init__(self, halflife: int = 50_000, margin: float = 0.02, warmup: int = 100) -> None:
        self.decay = 0.5 ** (1.0 / halflife)
        self.margin = margin
        self.warmup = warmup  # requests before it judges: the policy's predictors are still learning
        self.requests = 0
        self.capacity = 0
        self.actual_hits = 0.0
        self.shadow_hits = 0.0
        self.prefer_lru = False
        self._shadow: OrderedDict[Hashable, None] = OrderedDict()

    def resize(self, capacity: int) -> None:
        """The number of distinct blocks the real cache holds (the shadow holds as many)."""
        self.capacity = capacity

    def observe(self, chain: Sequence[Hashable], held: int) -> None:
        """A request's prompt ``chain`` (root first) found its first ``held`` blocks in the
        real cache; the shadow finds the longest prefix it holds. Both then hold the chain."""
        shadow = self._shadow
        ahead = 0
        for key in chain:
            if key not in shadow:
                break
            ahead += 1
        for key in reversed(chain):  # the root last: the most recent, as in prefix-aware LRU
            shadow[key] = None
            shadow.move_to_end(key)
        while len(shadow) > self.capacity:
            shadow.popitem(last=False)
        self.requests += 1
        if self.requests <= self.warmup:
            return
        fade = self.decay ** len(chain)
        self.actual_hits = self.actual_hits * fade + held
        self.shadow_hits = self.shadow_hits * fade + ahead
        actual, ahead = self.actual_hits, self.shadow_hits
        if self.prefer_lru:
            self.prefer_lru = ahead > actual * (1.0 + self.margin / 2)
        else:
            self.prefer_lru = ahead > actual * (1.0 + self.margin)
