"""Announced turns: sessions whose next turn is sure to come, the blocks it reads and when.

A turn is announced by ``turn_ahead`` (its prompt's hashes and when it arrives) or by the
policy itself, for a tool pause whose tool's hints have proved sharp (the chain so far, due
at the pause's predicted end). Within a tier's horizon an announced turn's blocks outrank
every guess (:mod:`kvd.policies.typed`). Times are seconds on the policy's clock.

Invariant: every key filed for a session maps back to it in :meth:`session_of` unless a
later filing of another session took the key over; an unfiled session leaves no key.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence

from kvd.core.sessions import Session
from kvd.policies.base import BlockKey

_MEMO_SIZE = 8  # (tier, instant) sets remembered between changes


class Announced:
    """The announced turns, in the order they were filed."""

    def __init__(self) -> None:
        self._keys: dict[Session, list[BlockKey]] = {}  # session -> its announced turn's keys
        self._owner: dict[BlockKey, Session] = {}  # a key of an announced turn -> its session
        self._arrivals: dict[Session, float] = {}  # session -> when its turn arrives
        self._memo: dict[tuple[str, float], frozenset[BlockKey]] = {}

    def __contains__(self, session: Session) -> bool:
        return session in self._keys

    def __bool__(self) -> bool:
        return bool(self._keys)

    def file(self, session: Session, arrives_at: float | None, hashes: Sequence[int] = ()) -> None:
        """``session``'s next turn reads ``hashes`` and arrives at ``arrives_at``; ``None``
        takes back what was filed for it."""
        self._memo.clear()
        for key in self._keys.pop(session, ()):
            if self._owner.get(key) is session:
                del self._owner[key]
        self._arrivals.pop(session, None)
        if arrives_at is None:
            return
        keys = [(session.namespace, h) for h in hashes]
        self._keys[session] = keys
        self._arrivals[session] = arrives_at
        for key in keys:
            self._owner[key] = session

    def arrival(self, session: Session) -> float | None:
        return self._arrivals.get(session)

    def session_of(self, key: BlockKey) -> Session | None:
        return self._owner.get(key)

    def within(self, tier: str, horizon_s: float, now: float) -> frozenset[BlockKey]:
        """The keys of the turns arriving within ``horizon_s`` (memoized per tier and
        instant until a filing changes)."""
        if not self._keys:
            return frozenset()
        memo_key = (tier, now)
        found = self._memo.get(memo_key)
        if found is None:
            found = frozenset(
                key for session, keys in self._keys.items() if self._arrivals[session] - now <= horizon_s for key in keys
            )
            if len(self._memo) > _MEMO_SIZE:
                self._memo.clear()
            self._memo[memo_key] = found
        return found

    def held(self, here: Mapping[BlockKey, object], keys: frozenset[BlockKey]) -> Iterator[BlockKey]:
        """The keys of ``keys`` that ``here`` holds, each announced chain's tail first."""
        seen: set[BlockKey] = set()
        for chain in list(self._keys.values()):
            for key in reversed(chain):
                if key in keys and key in here and key not in seen:
                    seen.add(key)
                    yield key

    def due(self, now: float, lead_s: float) -> list[tuple[float, Session, list[BlockKey]]]:
        """(arrival, session, keys) of the live sessions whose turn arrives within
        ``lead_s``, soonest first; ended sessions' filings are taken back."""
        out = []
        for session, keys in list(self._keys.items()):
            if not session.live:
                self.file(session, None)
            elif now >= self._arrivals[session] - lead_s:
                out.append((self._arrivals[session], session, keys))
        out.sort(key=lambda item: item[0])
        return out
