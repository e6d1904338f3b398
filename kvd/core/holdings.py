"""Holdings: copies enter and leave the tiers here, and everything that tracks them follows.

A copy's slot is allocated in its tier's space for as long as the catalog lists the copy;
the namespace's ``visible`` and ``shadowed`` indexes, the policy (``on_removed``) and the
event log follow every drop made here. The policy hears of new ready copies from the
callers, in batches (``on_stored`` takes a chain).

Orphans: a lookup stops at the first missing block, so when a block's last copy goes for a
capacity eviction (or never became readable), its held descendants go too, in every tier —
none can be found until a store writes the block again, and the engine behind that store
has recomputed the chain from it. A descendant's copy that is being read, written or moved
stays until that ends (:meth:`Holdings.sweep_orphans` takes it then, wherever a move put
it); a pinned block stays.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from kvd.core.catalog import BlockKey, BlockRecord, Catalog, Copy, Namespace
from kvd.core.chains import descendants
from kvd.core.events import ORPHANING_REASONS, EventLog, RemovalReason
from kvd.core.leases import LeaseTable
from kvd.core.touch import ChainTouch
from kvd.core.types import Cause, Space
from kvd.media import NVME, TierName
from kvd.policies import Policy


class Holdings:
    """The tiers' copies and their bookkeeping. ``tiers``: fastest first (the first is the
    top tier, where stores land and loads read); ``pins``: keys an operator pinned, which no
    eviction or orphan drop takes."""

    def __init__(
        self,
        tiers: tuple[TierName, ...],
        spaces: dict[TierName, Space],
        catalog: Catalog,
        policy: Policy,
        events: EventLog,
        leases: LeaseTable,
        clock: Callable[[], float],
    ) -> None:
        self.tiers = tiers
        self.top = tiers[0]
        self.spaces = spaces
        self.catalog = catalog
        self._policy = policy
        self._touch = ChainTouch(lambda: self._policy)  # a chain's use, told once (kvd.core.touch)
        self.deferred_policy: Policy = _AfterTouch(self)  # type: ignore[assignment]
        self.events = events
        self.leases = leases
        self.clock = clock
        self.pins: set[BlockKey] = set()
        # Dropped blocks whose held descendants a read, a write or a move kept when they
        # became orphans: they go when that ends (sweep_orphans).
        self._orphaned_under: set[BlockKey] = set()

    @property
    def policy(self) -> Policy:
        """The retention policy, told first of a pending chain touch (:meth:`touch_chain`)."""
        if self._touch.pending:
            self._touch.flush()
        return self._policy

    @policy.setter
    def policy(self, policy: Policy) -> None:
        self._touch.flush()
        self._policy = policy

    def touch_chain(self, ns: Namespace, records: list[BlockRecord], now: float) -> None:
        """Tell the policy that ``records`` (a load's found blocks, in the order asked) and
        the held ancestors of the first were used at ``now`` (root first): told at the
        policy's next use, joined with the batches that continue the chain
        (:class:`kvd.core.touch.ChainTouch`)."""
        self._touch.touch(ns, records, now)

    def lower(self, tier: TierName) -> TierName | None:
        """The tier below ``tier``, or None for the last."""
        i = self.tiers.index(tier)
        return self.tiers[i + 1] if i + 1 < len(self.tiers) else None

    def above_nvme(self, record: BlockRecord) -> tuple[TierName, Copy] | None:
        """The fastest ready copy of ``record`` above NVMe (tier, copy), or None."""
        for tier in self.tiers:
            if tier == NVME:
                break
            copy = record.copies.get(tier)
            if copy is not None and copy.ready:
                return tier, copy
        return None

    def retention_class(self, key: BlockKey, tier: TierName) -> str | None:
        """The retention class of ``key``'s copy in ``tier``: ``pinned`` while an operator's
        pin holds a ready copy there, else as the policy sees it (None: not held there, or
        the policy keeps no classes)."""
        if key in self.pins:
            record = self.catalog.record(key)
            copy = record.copies.get(tier) if record is not None else None
            if copy is not None and copy.ready:
                return "pinned"
        return self.policy.retention_class(key, tier)

    def make_ready(
        self, ns: Namespace, record: BlockRecord, tier: TierName, copy: Copy, now: float, session_id: str | None = None
    ) -> None:
        """``copy`` (``record``'s in ``tier``) holds its bytes: lookups see it from now on.
        The caller tells the policy (``on_stored``)."""
        copy.ready = True
        ns.refresh(record)
        self.events.stored(ns.name, record.hash, record.parent, tier, record.nbytes, now, session_id, record.origin)

    # -- drops ----------------------------------------------------------------------------
    def drop(
        self,
        record: BlockRecord,
        tier: TierName,
        copy: Copy,
        reason: RemovalReason,
        cause: Cause | None = None,
        quarantine: bool = False,
        keep: Iterable[Copy] = frozenset(),
    ) -> None:
        """Free ``record``'s ``copy`` in ``tier`` (nothing when it is not that tier's copy any
        more). A ready copy's drop is an event; a block's last copy takes the block out of
        the catalog and, for an orphaning reason, its held descendants with it (``keep``:
        copies that orphan drop leaves, as if read). ``quarantine`` (top tier): the slot is
        freed a lease period from now, and the leases still holding the copy read it as
        gone."""
        if record.copies.get(tier) is not copy:
            return
        ns = self.catalog.get(record.namespace)
        retention_class = self.retention_class(record.key, tier) if copy.ready else None  # while held
        del record.copies[tier]
        if quarantine:
            self.leases.quarantine(copy.slot, self.clock())
        else:
            self.spaces[tier].free(copy.slot)
        if copy.ready:
            self.policy.on_removed(tier, record.key)
            self.events.removed(ns.name, record.hash, tier, reason, self.clock(), retention_class, cause)
            if quarantine:
                copy.ready = False
        if not record.copies:
            ns.remove(record)
            self.pins.discard(record.key)
            if reason in ORPHANING_REASONS and record.hash in ns.children:
                self.drop_orphans(ns, record.hash, keep)
        ns.refresh(record)

    def drop_orphans(self, ns: Namespace, h: int, keep: Iterable[Copy] = frozenset()) -> None:
        """Drop the copies of every held descendant of ``h``, whose last copy just went;
        those being read, written or moved (or in ``keep``) wait for :meth:`sweep_orphans`,
        and a pinned block stays."""
        keep = keep if isinstance(keep, (set, frozenset)) else frozenset(keep)
        kept = []
        for record in descendants(ns, h):
            if record.key in self.pins:
                continue
            for tier, copy in list(record.copies.items()):
                if copy.ready and not copy.readers and copy not in keep:
                    self.drop(record, tier, copy, RemovalReason.ORPHANED)
            if record.copies:
                kept.append(record)
        for record in kept:
            if record.key not in self.pins and record.parent not in ns.blocks:
                self._orphaned_under.add((ns.name, record.parent))

    def note_orphans(self, parents: Iterable[BlockKey]) -> None:
        """File ``parents`` as dropped blocks whose descendants wait for the next sweep."""
        self._orphaned_under.update(parents)

    def sweep_orphans(self) -> None:
        """Drop the orphans :meth:`drop_orphans` had to leave, now that nothing uses them;
        those still in use wait for the next sweep. An orphan whose missing ancestor a
        store has written again is reachable again, and stays. Called where readers are
        released and copies become ready."""
        if not self._orphaned_under:
            return
        missing, self._orphaned_under = self._orphaned_under, set()
        for name, h in missing:
            ns = self.catalog.find(name)
            if ns is not None and h not in ns.blocks and h in ns.children:
                self.drop_orphans(ns, h)

    def drop_unread(self, records: Iterable[BlockRecord], reason: RemovalReason) -> int:
        """Drop every ready copy of ``records`` that nothing reads; returns how many of them
        are left (a copy being written, read or moved stays until that ends)."""
        left = 0
        for record in records:
            for tier, copy in list(record.copies.items()):
                if copy.ready and not copy.readers:
                    self.drop(record, tier, copy, reason)
            left += 1 if record.copies else 0
        return left


class _AfterTouch:
    """The policy as a planner holds it: any use tells it the pending touch first (so a
    planner made, but not asking the policy anything, leaves a batched load's touch
    pending; see :meth:`Holdings.touch_chain`)."""

    __slots__ = ("_held",)

    def __init__(self, held: Holdings) -> None:
        self._held = held

    def __getattr__(self, name: str):
        return getattr(self._held.policy, name)
