"""The retention policy interface: a pure object fed events, asked for victims.

A policy owns ordering/value state only. It never frees anything and does no I/O: the core
owns slots, leases and refcounts, and skips victims it cannot evict (pinned, leased, being
moved). Keys are ``(namespace, hash)`` tuples; tiers are names from ``kvd.tiers.TIER_NAMES``;
``now`` is seconds on the core's injected clock.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence, Set
from dataclasses import dataclass
from typing import ClassVar

from kvd.core.sessions import Observation, Session

BlockKey = tuple[str, int]
# What a held copy is to a typed policy (policies/typed.py); ``pinned`` is an operator's pin.
RETENTION_CLASSES = ("pinned", "shared_prefix", "session", "tool_pause", "ephemeral")


@dataclass(frozen=True)
class Prefetch:
    """Blocks that should move up together (one turn's prompt, its chain root first).
    ``announced``: the turn was announced (a client said it is coming), so its blocks may
    displace whatever the policy values below them; a guess displaces only worthless ones."""

    keys: Sequence[BlockKey]
    announced: bool = False


class Policy(ABC):
    """A retention policy. Its :meth:`priority` is a *value*, and the core relies on two
    properties of it:

    - it ranks a block in any tier, held there or not (a block's worth, a next use, a last
      use kept across tiers): the core weighs a block about to be demoted against the tier
      below's victims, so that the hierarchy drops its least valuable block, as one tier of
      the same total would;
    - a block never ranks below its held descendants (a chain's root ranks first): a held
      prefix stays a prefix, and when the core drops a chain's head that everything below
      outranks, its descendants rank lower still and go with it.
    """

    name: ClassVar[str]

    @abstractmethod
    def on_stored(self, tier: str, keys: Sequence[BlockKey], now: float) -> None:
        """``keys`` (a chain, root first) gained a readable copy in ``tier``."""

    @abstractmethod
    def on_accessed(self, keys: Sequence[BlockKey], now: float) -> None:
        """``keys`` (a held prefix, root first) were loaded, in every tier. (Lookups have no
        side effects: an engine may ask again and again, a router may score.)"""

    @abstractmethod
    def on_removed(self, tier: str, key: BlockKey) -> None:
        """The copy of ``key`` in ``tier`` is gone."""

    @abstractmethod
    def on_sessions(
        self,
        changed: Sequence[Session],
        observations: Sequence[Observation],
        reclassified: Set[BlockKey],
        now: float,
    ) -> None:
        """Session news since the last call: sessions whose state changed, what their
        events taught (pauses, turns), and keys whose sharing changed (they may belong to
        another retention class now)."""

    @abstractmethod
    def victims(self, tier: str, now: float) -> Iterator[BlockKey]:
        """Keys with a copy in ``tier``, best victim first.

        The caller must not call on_* methods while it iterates.
        """

    @abstractmethod
    def priority(self, key: BlockKey, tier: str, now: float) -> float:
        """How much ``key`` deserves a place in ``tier``, whether or not ``tier`` holds it:
        lower is evicted first, never below a held descendant's. Compared only with the same
        policy's priorities at the same ``now``; 0 or less means worthless (a prefetch may
        push it out)."""

    @abstractmethod
    def prefetches(self, tier: str, now: float) -> Iterator[Prefetch]:
        """Blocks held only below ``tier`` that should move up into it now, as groups that
        move together or not at all, the most urgent first. The caller must not call on_*
        methods while it iterates."""

    @abstractmethod
    def worth_demoting(self, key: BlockKey, tier: str, now: float) -> bool:
        """Whether ``key``, evicted from ``tier``, should be copied one tier down (True) or
        dropped (False)."""

    def worth_sharing(self, key: BlockKey, tier: str) -> bool:
        """Whether ``key``, held in ``tier``, is worth a copy in the cluster tier, which every
        node reads (a session's chain that may resume elsewhere, a shared prefix): every
        block but an ephemeral one. A policy that keeps no classes shares every block."""
        return self.retention_class(key, tier) != "ephemeral"

    @abstractmethod
    def retention_class(self, key: BlockKey, tier: str) -> str | None:
        """The retention class of ``key``'s copy in ``tier`` (one of ``RETENTION_CLASSES``),
        or None when the copy is not held there or the policy keeps no classes (for
        metrics and operators: it changes nothing)."""

    @abstractmethod
    def check(self, held: dict[str, set[BlockKey]]) -> list[str]:
        """Problems with the policy's state against ``held`` (tier -> keys with a copy)."""
