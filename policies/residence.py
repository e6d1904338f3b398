"""Residence: how long a block stays in a tier, from the tier's own traffic.

Little's law: the blocks a tier held after its latest insertion over its insertion rate
(an exponentially weighted mean, in blocks per second). Typed values a block by the chance
that it is used again within that time. Counted at insertions: while a cascade of evictions
makes room a tier holds fewer blocks for an instant, and values that dipped with it would
rank the victims of one eviction by the order they were asked.
"""

from __future__ import annotations


class Residence:
    """Per tier: insertions per second and blocks held; :meth:`horizon` in seconds."""

    def __init__(self, initial_s: float, scale: float, min_s: float, halflife: int) -> None:
        self.initial_s = initial_s  # the horizon before a tier's rate is known
        self.scale = scale  # the horizon as a multiple of the mean residence time
        self.min_s = min_s
        self.halflife = halflife  # insertions over which the rate estimate decays
        self._rate: dict[str, float] = {}  # tier -> insertions per second
        self._held: dict[str, int] = {}  # tier -> blocks held after its latest insertion
        self._last: dict[str, float] = {}  # tier -> time of its latest counted insertion
        self._pending: dict[str, int] = {}  # tier -> insertions at that same instant, not yet counted

    def stored(self, tier: str, n: int, held: int, now: float) -> None:
        """``n`` blocks were stored into ``tier`` at ``now``; it holds ``held`` blocks."""
        if n:
            self._count(tier, n, now)
        self._held[tier] = held

    def horizon(self, tier: str) -> float:
        """Seconds a block stays in ``tier``."""
        rate = self._rate.get(tier)
        held = self._held.get(tier, 0)
        if not rate or not held:
            return self.initial_s
        return max(self.scale * held / rate, self.min_s)

    def _count(self, tier: str, n: int, now: float) -> None:
        last = self._last.get(tier)
        self._last[tier] = now
        if last is None:
            return
        dt = now - last
        alpha = min(1.0, n / self.halflife)
        if dt <= 0:
            # Several stores at one instant: fold them into the next interval.
            self._pending[tier] = self._pending.get(tier, 0) + n
            self._last[tier] = last
            return
        n += self._pending.pop(tier, 0)
        rate = n / dt
        old = self._rate.get(tier)
        self._rate[tier] = rate if old is None else old + alpha * (rate - old)
