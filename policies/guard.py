"""A shadow LRU that tells a policy when plain recency would be doing better.

Typed retention bets on sessions: that a chain's future users are the session that made it.
Some workloads break the bet (many requests sharing prefixes of each other at arbitrary
depths, no multi-turn programs), and then LRU's plain recency wins. The guard keeps a
shadow LRU of the same number of blocks, fed the same accesses, and decayed counts of the
hits each would have had; :attr:`prefer_lru` says when the shadow is ahead by more than a
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
    ahead (a fraction) the shadow must be before recency takes over, and back."""

    def __init__(self, halflife: int = 20_000, margin: float = 0.02) -> None:
        self.decay = 0.5 ** (1.0 / halflife)
        self.margin = margin
        self.capacity = 0
        self.actual_hits = 0.0
        self.shadow_hits = 0.0
        self.prefer_lru = False
        self._shadow: OrderedDict[Hashable, None] = OrderedDict()

    def resize(self, capacity: int) -> None:
        """The number of distinct blocks the real cache holds (the shadow holds as many)."""
        self.capacity = capacity

    def observe(self, keys: Sequence[Hashable], hit: bool) -> None:
        """A request touched ``keys`` (a chain, root first): the real cache held them
        (``hit``) or had to store them."""
        shadow = self._shadow
        decay = self.decay
        actual = self.actual_hits
        ahead = self.shadow_hits
        for key in reversed(keys):  # the root last: the most recent, as in prefix-aware LRU
            actual *= decay
            ahead *= decay
            if hit:
                actual += 1.0
            if key in shadow:
                ahead += 1.0
                shadow.move_to_end(key)
            else:
                shadow[key] = None
        while len(shadow) > self.capacity:
            shadow.popitem(last=False)
        self.actual_hits, self.shadow_hits = actual, ahead
        if self.prefer_lru:
            self.prefer_lru = ahead > actual * (1.0 + self.margin / 2)
        else:
            self.prefer_lru = ahead > actual * (1.0 + self.margin)
