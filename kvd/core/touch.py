"""A chain's use told to the policy once, however many batches it is loaded in.

A load touches its blocks and the held ancestors of its first (``on_accessed``, root first),
so that a chain's root stays its most recent block. An engine loads a long chain in
batches, each continuing the last: told at once, each batch would touch the whole prefix
again, O(n^2) in the chain's batches.

:class:`ChainTouch` keeps the touch pending until the policy is next used (the holder calls
:meth:`flush` first), and a batch whose first block's parent is the pending touch's last
block (the pending blocks form one chain) joins it. The policy ends as it would have after
each touch in turn: a later touch of a chain touches every key of the earlier one again, in
the same order. Nothing makes blocks held and ready without a
policy call (``on_stored``, ``on_removed``), so a joined prefix is what a walk would find.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from kvd.core.catalog import BlockKey, BlockRecord, Namespace
from kvd.core.chains import held_ancestors
from kvd.policies import Policy


@dataclass(slots=True)
class _Pending:
    namespace: str
    keys: list[BlockKey]  # to touch, root first
    tail: int | None  # the hash a continuing batch's first block names as parent; None: no chain
    now: float


class ChainTouch:
    """The pending touch of one chain; ``policy`` returns the policy to tell (never through
    a path that flushes)."""

    def __init__(self, policy: Callable[[], Policy]) -> None:
        self._policy = policy
        self._pending: _Pending | None = None

    @property
    def pending(self) -> bool:
        return self._pending is not None

    def flush(self) -> None:
        """Tell the policy the pending touch, if any."""
        pending, self._pending = self._pending, None
        if pending is not None and pending.keys:
            self._policy().on_accessed(pending.keys, pending.now)

    def continues(self, ns: Namespace, first: BlockRecord) -> bool:
        """Whether a batch starting at ``first`` continues the pending chain."""
        p = self._pending
        return p is not None and p.namespace == ns.name and p.tail is not None and p.tail == first.parent

    def touch(self, ns: Namespace, records: list[BlockRecord], now: float) -> None:
        """``records`` (a batch's blocks, in the order asked) were used at ``now``: touch
        them and the held ancestors of the first, root first."""
        if not records:
            return
        first = records[0]
        if self.continues(ns, first):
            keys = self._pending.keys
        else:
            self.flush()
            keys = held_ancestors(ns, first)
        expect, chain = first.parent, True
        for record in records:
            chain = chain and record.parent == expect
            expect = record.hash
            keys.append(record.key)
        self._pending = _Pending(ns.name, keys, expect if chain else None, now)
