"""What an operator does to the core (kvctl): clear, evict, pin, switch policy, drain.

These act on what the node holds whatever the policy says, and never on a copy that is being
read, written or moved: such a copy stays until that ends, and is counted as left.
"""

from __future__ import annotations

from collections.abc import Sequence

from kvd.core.errors import InvalidArgument, UnknownSession
from kvd.core.events import RemovalReason
from kvd.core.holdings import Holdings
from kvd.core.sessions import SessionTable
from kvd.core.transfers import Transfers
from kvd.core.types import CoreConfig
from kvd.policies import Policy


class Operator:
    """Operator actions over ``holdings``."""

    def __init__(self, holdings: Holdings, sessions: SessionTable, transfers: Transfers, config: CoreConfig) -> None:
        self.holdings = holdings
        self.sessions = sessions
        self.transfers = transfers
        self.config = config

    def clear_namespace(self, name: str) -> int:
        """Drop every readable copy of ``name``'s blocks that nothing reads; returns how many
        blocks are left. Emits NamespaceCleared when none is left; the namespace and its
        geometry stay registered. Raises UnknownNamespace."""
        held = self.holdings
        ns = held.catalog.get(name)
        held.drop_unread(list(ns.blocks.values()), RemovalReason.CLEARED)
        if not ns.blocks:
            held.events.cleared(name, held.clock())
        return len(ns.blocks)

    def evict_session(self, namespace: str, session_id: str) -> tuple[int, int]:
        """Drop the blocks only ``session_id`` holds (not a shared prefix, not a block in
        another live session's chain) from every tier. Returns (blocks removed, blocks
        left). Raises UnknownNamespace, UnknownSession."""
        ns = self.holdings.catalog.get(namespace)
        session = self.sessions.get(namespace, session_id)
        if session is None:
            raise UnknownSession(f"session {session_id!r} of {namespace!r} is unknown")
        records = []
        for h in dict.fromkeys(session.chain):
            record = ns.blocks.get(h)
            if record is not None and self.sessions.owner(record.key) is session:
                if not self.sessions.is_shared(record.key):
                    records.append(record)
        remaining = self.holdings.drop_unread(records, RemovalReason.EVICTED_BY_OPERATOR)
        return len(records) - remaining, remaining

    def evict_all(self) -> tuple[int, int]:
        """Clear every namespace. Returns (blocks removed, blocks left)."""
        removed = remaining = 0
        for ns in self.holdings.catalog.by_name():
            before = len(ns.blocks)
            left = self.clear_namespace(ns.name)
            removed, remaining = removed + before - left, remaining + left
        return removed, remaining

    def pin(self, namespace: str, hashes: Sequence[int]) -> tuple[int, int]:
        """Keep the held blocks among ``hashes`` where they are: no eviction or orphan drop
        takes a pinned copy (an operator's evict still does). Returns (blocks newly pinned,
        hashes not held). Raises UnknownNamespace, InvalidArgument."""
        ns = self.holdings.catalog.get(namespace)
        self.check_hashes(hashes)
        pins = self.holdings.pins
        changed = missing = 0
        for h in hashes:
            record = ns.blocks.get(h)
            if record is None or record.fastest_ready() is None:
                missing += 1
            elif record.key not in pins:
                pins.add(record.key)
                changed += 1
        return changed, missing

    def unpin(self, namespace: str, hashes: Sequence[int]) -> tuple[int, int]:
        """Let the policy decide about ``hashes`` again. Returns (blocks unpinned, hashes that
        were not pinned)."""
        self.holdings.catalog.get(namespace)
        self.check_hashes(hashes)
        pins = self.holdings.pins
        changed = 0
        for h in set(hashes):
            if (namespace, h) in pins:
                pins.discard((namespace, h))
                changed += 1
        return changed, len(set(hashes)) - changed

    def set_policy(self, policy: Policy) -> None:
        """Hand every held copy to ``policy`` and decide with it from now on. Each tier's
        copies enter least valuable first by the old policy, so a recency policy keeps their
        order; the new policy then hears of every known session."""
        held = self.holdings
        now = held.clock()
        for tier in held.tiers:
            # on_stored takes a chain root first and touches it leaf first: hand the most
            # valuable first so that the least valuable is the least recent.
            keys = list(held.policy.victims(tier, now))[::-1]
            if keys:
                policy.on_stored(tier, keys, now)
        policy.on_sessions(self.sessions.sessions(), [], set(), now)
        held.policy = policy

    def start_drain(self) -> int:
        """Queue every held block above NVMe without an NVMe copy for writing down, with or
        without write-behind (the policy's ``worth_demoting`` still filters, at planning);
        stores made while draining are queued too. Returns the blocks queued."""
        self.transfers.draining = True
        return self.transfers.queue_write_down()

    def stop_drain(self) -> None:
        """Back to the configured write-behind (what is queued still goes down)."""
        self.transfers.draining = False

    def check_hashes(self, hashes: Sequence[int]) -> None:
        """Raise InvalidArgument for an empty or overlong list of hashes."""
        if not hashes:
            raise InvalidArgument("no hashes given")
        if len(hashes) > self.config.max_lookup_hashes:
            raise InvalidArgument(f"at most {self.config.max_lookup_hashes} hashes per call")
