"""Sharing: which live sessions' chains hold each block, and which blocks are shared.

A block in two or more sessions' chains — at once, or one after another — is a *shared
prefix* (system prompt, repository context), and stays one. Keys are ``(namespace, hash)``.

Invariants (checked through :meth:`SessionTable.check`): ``refs[key]`` is the number of live
sessions whose chain holds ``key`` (keys with none are absent) and ``hinted_refs[key]`` the
number of those an engine named; a key counted as released is in no live chain.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from kvd.core.sessions import Session

BlockKey = tuple[str, int]


class Sharing:
    """Per-block holding counts of the live sessions' chains. ``max_keys``: how many keys it
    remembers as once shared, and as released (the oldest are forgotten)."""

    def __init__(self, max_keys: int) -> None:
        self.max_keys = max_keys
        self.refs: dict[BlockKey, int] = {}
        # Of those, chains of sessions an engine named (not inferred): they say when they
        # end, so a hold of theirs is a promise of reuse; an inferred one may have gone quiet.
        self.hinted_refs: dict[BlockKey, int] = {}
        self._owner: dict[BlockKey, Session] = {}  # the first session to hold a key
        self._latest: dict[BlockKey, Session] = {}  # the last session to take a key into its chain
        # Keys that were once in two sessions' chains: a repository context outlives the
        # sessions that shared it (the next session on that repository wants it again).
        self._ever_shared: OrderedDict[BlockKey, None] = OrderedDict()
        # Keys an ended session's chain left held by no chain, with that session's seq: a key
        # taken up again by another session was in two sessions' chains, one after the other
        # (the next session on a repository after the last one on it ended). Not the keys a
        # live chain moves past (a turn's partial last block, each turn): no one takes them.
        self._released: OrderedDict[BlockKey, int] = OrderedDict()
        self.reclassified: set[BlockKey] = set()  # keys whose holders changed

    def owner(self, key: BlockKey) -> Session | None:
        """The one live session holding ``key`` in its chain; None when shared or orphaned."""
        if self.refs.get(key, 0) != 1:
            return None
        session = self._owner.get(key)
        return session if session is not None and session.live else None

    def latest(self, key: BlockKey) -> Session | None:
        """The session that most recently took ``key`` into its chain."""
        return self._latest.get(key)

    def is_shared(self, key: BlockKey) -> bool:
        """In two or more live chains now, or once was (a shared prefix stays one)."""
        return self.refs.get(key, 0) >= 2 or key in self._ever_shared

    def ref(self, key: BlockKey, session: Session) -> int:
        """``session``'s chain takes ``key``; returns how many chains hold it now."""
        n = self.refs.get(key, 0) + 1
        self.refs[key] = n
        self._latest[key] = session
        self.reclassified.add(key)  # a policy may value a block by its holders
        if not session.inferred:
            self.hinted_refs[key] = self.hinted_refs.get(key, 0) + 1
        if n == 1:
            self._owner[key] = session  # an orphan's copies become this session's
            holder = self._released.pop(key, None)
            if holder is not None and holder != session.seq:
                self.mark_shared(key)
        elif n == 2:
            self.mark_shared(key)
        return n

    def unref(self, key: BlockKey, session: Session) -> None:
        """``session``'s chain lets ``key`` go."""
        n = self.refs.get(key, 0) - 1
        self.reclassified.add(key)
        if not session.inferred:
            hinted = self.hinted_refs.get(key, 0) - 1
            if hinted > 0:
                self.hinted_refs[key] = hinted
            else:
                self.hinted_refs.pop(key, None)
        if n <= 0:
            self.refs.pop(key, None)
            self._owner.pop(key, None)
            self._latest.pop(key, None)
            return
        self.refs[key] = n
        if self._owner.get(key) is session:
            self._owner.pop(key)  # re-found when it is one session's again

    def mark_shared(self, key: BlockKey) -> None:
        self._ever_shared[key] = None
        self._ever_shared.move_to_end(key)
        if len(self._ever_shared) > self.max_keys:
            self._ever_shared.popitem(last=False)

    def release(self, session: Session, keys: list[BlockKey]) -> None:
        """An ended ``session``'s chain lets ``keys`` go; those no other chain holds are
        remembered as released by it."""
        for key in keys:
            self.unref(key, session)
            if key not in self.refs:
                self._released[key] = session.seq
                self._released.move_to_end(key)
                if len(self._released) > self.max_keys:
                    self._released.popitem(last=False)

    def check(self, counts: dict[BlockKey, int], hinted: dict[BlockKey, int]) -> list[str]:
        """Problems with the counts against ``counts`` and ``hinted`` (from the chains)."""
        problems = []
        if counts != self.refs:
            diff = set(counts.items()) ^ set(self.refs.items())
            problems.append(f"sessions: {len(diff)} block reference counts disagree with the chains")
        if hinted != self.hinted_refs:
            diff = set(hinted.items()) ^ set(self.hinted_refs.items())
            problems.append(f"sessions: {len(diff)} hinted reference counts disagree with the chains")
        held = sum(1 for key in self._released if key in self.refs)
        if held:
            problems.append(f"sessions: {held} keys counted as released are in a live chain")
        return problems
