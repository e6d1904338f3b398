"""The retention policy interface: a pure object fed events, asked for victims.

A policy owns ordering/value state only. It never frees anything and does no I/O: the core
owns slots, leases and refcounts, and skips victims it cannot evict (pinned, leased, being
moved). Keys are ``(namespace, hash)`` tuples; tiers are names from ``kvd.tiers.TIER_NAMES``;
``now`` is seconds on the core's injected clock.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from typing import ClassVar

BlockKey = tuple[str, int]


class Policy(ABC):
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
    def victims(self, tier: str, now: float) -> Iterator[BlockKey]:
        """Keys with a copy in ``tier``, best victim first.

        The caller must not call on_* methods while it iterates.
        """

    @abstractmethod
    def check(self, held: dict[str, set[BlockKey]]) -> list[str]:
        """Problems with the policy's state against ``held`` (tier -> keys with a copy)."""
