"""Placement: what leaves a tier to make room, and where it goes.

Making room in a tier — for a store, a load's promotions, a write-behind, a prefetch — is
one :class:`Planner`. It reads the core's state and changes nothing: it simulates its own
steps on an overlay (copies it drops, copies it demotes, slots it claims) and returns a
:class:`Plan`, the ordered steps :func:`apply` carries out, or none of them. The policy
ranks; the rules below decide what its ranking cannot:

- :func:`ends_in_drop`: an eviction from a tier whose lower tiers are all full ends in a
  drop: then :func:`shadowed_victims` go first — copies a faster tier also holds, which no
  lookup reads (write-behind's NVMe copies excepted: they are the durable ones).
- :meth:`Planner.victims`, in the policy's order, with two holds: a last copy whose held
  descendants do not all leave with it goes after the rest (*heads last*: dropping it would
  strand them), and the chain a load reads (:attr:`Protect.chain`) goes last of all in the
  top tier and is never dropped below it (*chain last*).
- :func:`fate`: a victim is dropped when another tier holds it ready, when it is the last
  tier, when the policy would not keep it below, or when :func:`outranked_below` finds that
  pushing it down would only drop something worth more from the last tier; otherwise it is
  demoted, once the tier below has made a slot for it (the same planner, one tier down).

Room is counted in slots of the block's size (``Space.free_slots``) where a slot is taken,
and in bytes where a rule asks whether a tier has room for one more block.
"""

from __future__ import annotations

from collections.abc import Callable, Container, Iterable
from dataclasses import dataclass, field
from itertools import islice

from kvd.core.catalog import BlockKey, BlockRecord, Catalog, Copy, Namespace
from kvd.core.chains import descendants
from kvd.core.events import RemovalReason
from kvd.core.types import Cause, Space, TransferKind, Wait
from kvd.media import NVME, Slot, TierName
from kvd.policies import Policy


@dataclass(frozen=True)
class Protect:
    """What making room must leave where it is, beyond what is always kept (copies being
    read, written or moved, and operator pins).

    ``copies``: copies that stay (a load's blocks while the room for its promotions is made).
    ``chain``: the chain a load reads (its blocks and their ancestors): they may move down;
    in the top tier they go last of all, below it they are never dropped."""

    copies: frozenset[Copy] = frozenset()
    chain: Container[BlockKey] = frozenset()  # a frozenset, or a LoadChain (walked when asked)


@dataclass(frozen=True, slots=True)
class Drop:
    """Free ``copy`` of ``record`` in ``tier`` (its held descendants go too when it is the
    block's last copy)."""

    record: BlockRecord
    tier: TierName
    copy: Copy
    cause: Cause


@dataclass(frozen=True, slots=True)
class Demote:
    """Copy ``copy`` of ``record`` from ``tier`` to ``dst`` (one tier down); the source goes
    when the copy lands."""

    record: BlockRecord
    tier: TierName
    copy: Copy
    dst: TierName
    cause: Cause


Step = Drop | Demote


@dataclass
class Plan:
    """The steps of a planner, in order, and what they leave behind: ``orphaned_under``,
    parents whose would-be children (blocks the caller adds after applying) the steps cut
    off; the caller files them with :meth:`Holdings.note_orphans`."""

    steps: list[Step] = field(default_factory=list)
    orphaned_under: set[BlockKey] = field(default_factory=set)
    lost: int = 0  # blocks of some worth whose last copy the steps drop (their orphans not counted)


class Planner:
    """Plans room in the tiers on an overlay of the core's state; changes nothing.

    One planner serves one request at one instant (``now``): the steps of its calls
    accumulate in :attr:`plan`, and each call sees the ones before it as done. ``protect``:
    what the request keeps in place; ``pins``: operator-pinned keys; ``moving``: whether a
    transfer in flight reads or writes a copy in a tier; ``writes_behind``: NVMe copies are
    write-behind's durable copies. The caller's own changes to come (a pin, a promotion, a
    new block) enter the overlay through :meth:`read`, :meth:`write`, :meth:`claim` and
    :meth:`expect_child`, so that later calls see them too."""

    def __init__(
        self,
        tiers: tuple[TierName, ...],
        spaces: dict[TierName, Space],
        catalog: Catalog,
        policy: Policy,
        pins: set[BlockKey],
        moving: Callable[[TierName], bool],
        now: float,
        protect: Protect | None = None,
        writes_behind: bool = False,
        cause: Cause = Cause.CAPACITY,
    ) -> None:
        self.tiers = tiers
        self.top = tiers[0]
        self.spaces = spaces
        self.catalog = catalog
        self.policy = policy
        self.pins = pins
        self._moving = moving
        self.now = now
        self.protect = protect or Protect()
        self.writes_behind = writes_behind
        self.cause = cause  # what the room is for (the removal events name it)
        self.plan = Plan()
        self._gone: set[Copy] = set()
        self._gone_of: dict[BlockRecord, int] = {}  # copies of a record the plan drops
        self._read: dict[Copy, int] = {}  # readers the plan adds (demotion sources)
        self._added: dict[BlockRecord, dict[TierName, Copy]] = {}  # copies the plan writes
        self._freed: dict[TierName, dict[int, int]] = {t: {} for t in tiers}  # slot length -> slots the plan frees
        self._claimed: dict[TierName, int] = dict.fromkeys(tiers, 0)  # bytes the plan takes
        self._moves: set[TierName] = set()  # tiers a planned demotion reads or writes
        self._incoming: dict[tuple[str, int], list[int]] = {}  # parent -> blocks the caller adds below it
        self._dead: dict[TierName, int] = {}  # tier -> leading keys of the policy's order that cannot go

    # -- the overlay ----------------------------------------------------------------------
    def lower(self, tier: TierName) -> TierName | None:
        i = self.tiers.index(tier)
        return self.tiers[i + 1] if i + 1 < len(self.tiers) else None

    def copy_in(self, record: BlockRecord, tier: TierName) -> Copy | None:
        """``record``'s copy in ``tier`` as the plan leaves it (ready or not)."""
        added = self._added.get(record)
        if added is not None and tier in added:
            return added[tier]  # the plan writes a copy only where there is none
        copy = record.copies.get(tier)
        return None if copy is None or copy in self._gone else copy

    def copies(self, record: BlockRecord) -> dict[TierName, Copy]:
        """``record``'s copies as the plan leaves them."""
        out = {t: c for t, c in record.copies.items() if c not in self._gone}
        out.update(self._added.get(record, {}))
        return out

    def count(self, record: BlockRecord) -> int:
        """How many copies ``record`` has once the plan is applied (its own writes never go)."""
        return len(record.copies) - self._gone_of.get(record, 0) + len(self._added.get(record, ()))

    def present(self, record: BlockRecord) -> bool:
        """Whether the catalog still has ``record`` once the plan is applied."""
        return self.count(record) > 0

    def record(self, key: BlockKey) -> BlockRecord | None:
        record = self.catalog.record(key)
        return record if record is not None and self.present(record) else None

    def readers(self, copy: Copy) -> int:
        return copy.readers + self._read.get(copy, 0) + (copy in self.protect.copies)

    def free_bytes(self, tier: TierName) -> int:
        space = self.spaces[tier]
        freed = sum(length * n for length, n in self._freed[tier].items())
        return space.capacity_bytes - space.used_bytes + freed - self._claimed[tier]

    def has_slot(self, tier: TierName, nbytes: int, count: int = 1) -> bool:
        """Whether ``count`` more slots for ``nbytes`` are free once the plan is applied."""
        return self.free_slot_count(tier, nbytes, count) >= count

    def free_slot_count(self, tier: TierName, nbytes: int, at_most: int) -> int:
        space = self.spaces[tier]
        size = space.slot_bytes(nbytes)
        claimed = -(-self._claimed[tier] // size)
        freed = sum(length // size * n for length, n in self._freed[tier].items())
        live = space.free_slots(nbytes, max(0, at_most + claimed - freed))
        return max(0, min(at_most, live + freed - claimed))

    def claim(self, tier: TierName, nbytes: int) -> None:
        """Count a slot for ``nbytes`` in ``tier`` as taken (the caller allocates it)."""
        self._claimed[tier] += self.spaces[tier].slot_bytes(nbytes)

    def unclaim(self, tier: TierName, nbytes: int) -> None:
        self._claimed[tier] -= self.spaces[tier].slot_bytes(nbytes)

    def moving(self, tier: TierName) -> bool:
        return tier in self._moves or self._moving(tier)

    def read(self, copy: Copy) -> None:
        """Count a reader the caller adds to ``copy`` after applying (a pin, a transfer)."""
        self._read[copy] = self._read.get(copy, 0) + 1

    def write(self, record: BlockRecord, tier: TierName) -> Copy:
        """Count a copy the caller writes into ``tier`` after applying (a promotion, into a
        slot it claimed): the tier is moving. Returns the copy's stand-in."""
        copy = self._added.setdefault(record, {})[tier] = Copy(Slot(-1, self.spaces[tier].slot_bytes(record.nbytes)))
        self._moves.add(tier)
        return copy

    def fastest_ready(self, record: BlockRecord) -> TierName | None:
        """The fastest tier holding a ready copy of ``record`` once the plan is applied."""
        for tier in self.tiers:
            copy = self.copy_in(record, tier)
            if copy is not None and copy.ready:
                return tier
        return None

    def reaches_a_root(self, ns: Namespace, h: int | None) -> bool:
        """:func:`kvd.core.chains.reaches_a_root` once the plan is applied."""
        seen: set[int] = set()
        while h is not None:
            record = ns.blocks.get(h)
            if h in seen or record is None or not self.present(record):
                return False
            seen.add(h)
            h = record.parent
        return True

    def expect_child(self, ns: Namespace, parent: int | None, h: int) -> None:
        """Count a block the caller adds below ``parent`` after applying (a store's own)."""
        if parent is not None:
            self._incoming.setdefault((ns.name, parent), []).append(h)

    def held_children(self, ns: Namespace, h: int) -> int:
        present = sum(1 for c in ns.children.get(h, ()) if self.present(ns.blocks[c]))
        return present + len(self._incoming.get((ns.name, h), ()))

    def held_above(self, record: BlockRecord, tier: TierName) -> bool:
        """Whether a tier faster than ``tier`` holds a ready copy of ``record``."""
        for t in self.tiers:
            if t == tier:
                return False
            copy = self.copy_in(record, t)
            if copy is not None and copy.ready:
                return True
        return False

    # -- steps ----------------------------------------------------------------------------
    def drop(self, record: BlockRecord, tier: TierName, copy: Copy, cause: Cause) -> None:
        self.plan.steps.append(Drop(record, tier, copy, cause))
        self._forget(record, tier, copy)
        if not self.present(record):
            if self.policy.priority(record.key, tier, self.now) > 0:
                self.plan.lost += 1
            self._orphan(self.catalog.get(record.namespace), record.hash)

    def _orphan(self, ns: Namespace, h: int) -> None:
        """The copies the drop of ``h``'s last copy takes with it (Holdings.drop_orphans):
        every ready, unread, unpinned copy of every present descendant. Blocks the caller
        adds below the cut are orphans the moment they exist: their parents go in
        ``plan.orphaned_under``."""
        walked = [h]
        for record in descendants(ns, h, self.present):
            walked.append(record.hash)
            if record.key in self.pins:
                continue
            for tier, copy in self.copies(record).items():
                if copy.ready and not self.readers(copy):
                    self._forget(record, tier, copy)
        for parent in walked:
            if self._incoming.get((ns.name, parent)) and not self.present_hash(ns, parent):
                self.plan.orphaned_under.add((ns.name, parent))

    def _forget(self, record: BlockRecord, tier: TierName, copy: Copy) -> None:
        self._gone.add(copy)
        self._gone_of[record] = self._gone_of.get(record, 0) + 1
        freed = self._freed[tier]
        freed[copy.slot.length] = freed.get(copy.slot.length, 0) + 1

    def present_hash(self, ns: Namespace, h: int) -> bool:
        record = ns.blocks.get(h)
        return record is not None and self.present(record)

    def demote(self, record: BlockRecord, tier: TierName, copy: Copy, dst: TierName, cause: Cause) -> None:
        """Plan the demotion; the caller has claimed its slot in ``dst``."""
        self.plan.steps.append(Demote(record, tier, copy, dst, cause))
        self._read[copy] = self._read.get(copy, 0) + 1
        self._added.setdefault(record, {})[dst] = Copy(Slot(-1, self.spaces[dst].slot_bytes(record.nbytes)))
        self._moves.update((tier, dst))

    # -- making room ----------------------------------------------------------------------
    def room(self, tier: TierName, need: int) -> int:
        """Evict at least ``need`` bytes of ``tier`` in one pass over the victims (fewer when
        too few can go). Returns the bytes that planned demotions free once they land."""
        lower = self.lower(tier)
        pending = 0
        for record, copy in self.victims(tier, need):
            pending += self.evict(tier, lower, record, copy)
        return pending

    def slot(self, tier: TierName, nbytes: int) -> bool | Wait | None:
        """Claim a slot for ``nbytes`` in ``tier``: free room, else evict pass after pass.
        True when claimed; Wait when planned demotions or transfers under way must land
        first; None when everything the tier holds is protected."""
        if self.has_slot(tier, nbytes):
            self.claim(tier, nbytes)
            return True
        if self.spaces[tier].slot_bytes(nbytes) > self.spaces[tier].largest_region_bytes:
            return None  # evicting cannot help a block bigger than any region
        lower = self.lower(tier)
        pending = 0
        while True:
            if pending >= nbytes:
                return Wait(pending)
            victims = self.victims(tier, nbytes - pending)
            if not victims:
                # Copies a transfer reads or writes can go once it lands: wait for the
                # mover rather than fail.
                if pending or self.moving(tier):
                    return Wait(pending)
                return None
            for record, copy in victims:
                pending += self.evict(tier, lower, record, copy)
            if self.has_slot(tier, nbytes):
                self.claim(tier, nbytes)
                return True

    def evict(self, tier: TierName, lower: TierName | None, record: BlockRecord, copy: Copy) -> int:
        """Drop ``copy`` or demote it (making its slot below first). Returns the bytes a
        planned demotion frees once it lands (its copy stays until then)."""
        if self.copy_in(record, tier) is not copy:
            return 0  # an earlier drop took it as an orphan
        if fate(self, record, tier, lower) is TransferKind.DEMOTE:
            below = self.slot(lower, record.nbytes)
            if self.copy_in(record, tier) is not copy:
                # Making room below dropped an ancestor's last copy, and this orphan with it.
                if below is True:
                    self.unclaim(lower, record.nbytes)
                return 0
            if below is True:
                self.demote(record, tier, copy, lower, self.cause)  # into the slot claimed
                return copy.slot.length
            if isinstance(below, Wait):
                return copy.slot.length
        self.drop(record, tier, copy, self.cause)
        return 0

    def way(self, tier: TierName, need: int, worth: float, cascade: bool = True) -> bool:
        """Make ``need`` bytes of ``tier`` for prefetches from the copies the policy values
        below ``worth``. With ``cascade`` (an announced turn) each is evicted as a store's
        victim is; without (a guess), each is dropped when held ready below or not worth
        keeping, demoted only into a free slot below (a guess pushes nothing out of the
        tiers below), else left. Returns whether the room is made: free once the plan is
        applied, or once its demotions land. (Apply the plan only then: a part of the room
        made for nothing moved blocks for nothing.)"""
        lower = self.lower(tier)
        short = need - self.free_bytes(tier)
        pending = 0
        if short > 0:
            for record, copy in self.victims(tier, short, max_priority=worth):
                if cascade:
                    pending += self.evict(tier, lower, record, copy)
                elif self.copy_in(record, tier) is copy:
                    pending += self._guess_way(tier, lower, record, copy)
        return self.free_bytes(tier) + pending >= need

    def _guess_way(self, tier: TierName, lower: TierName | None, record: BlockRecord, copy: Copy) -> int:
        below = self.copy_in(record, lower) if lower else None
        if lower is None or (below is not None and below.ready) or not self.worth_demoting(record, tier):
            self.drop(record, tier, copy, self.cause)
        elif below is None and self.has_slot(lower, record.nbytes):
            self.claim(lower, record.nbytes)
            self.demote(record, tier, copy, lower, self.cause)
            return copy.slot.length
        return 0

    # -- victims --------------------------------------------------------------------------
    def worth_demoting(self, record: BlockRecord, tier: TierName) -> bool:
        return self.policy.worth_demoting(record.key, tier, self.now)

    def victims(
        self, tier: TierName, need: int, max_priority: float | None = None
    ) -> list[tuple[BlockRecord, Copy]]:
        """The first evictable copies in ``tier`` adding up to ``need`` bytes (all there are,
        when fewer), stopping at the first the policy values above ``max_priority``:
        shadowed copies first when the eviction ends in a drop, then the policy's order,
        with heads and the protected chain last."""
        victims = shadowed_victims(self, tier, need) if ends_in_drop(self, tier) else []
        room = sum(copy.slot.length for _, copy in victims)
        if room >= need:
            return victims
        last_tier = self.lower(tier) is None
        heads: list[tuple[BlockRecord, Copy]] = []
        chain: list[tuple[BlockRecord, Copy]] = []
        leaving: dict[BlockKey, int] = {}  # parent -> its children among the victims
        gone, read, kept, pins = self._gone, self._read, self.protect.copies, self.pins
        blocks: dict[str, dict[int, BlockRecord]] = {}
        # The policy's order holds while the plan is made (nothing tells it of the plan), and
        # a key skipped for the reasons below stays skipped: a later call starts past the
        # run of them that leads the order, instead of walking it again.
        dead = self._dead.get(tier, 0)
        leading = True
        for key in islice(self.policy.victims(tier, self.now), dead, None):
            name, h = key
            held = blocks.get(name)
            if held is None:
                ns = self.catalog.find(name)
                held = blocks[name] = ns.blocks if ns is not None else {}
            record = held.get(h)
            # The plan's own copies are never ready: a victim is a copy the catalog holds.
            copy = record.copies.get(tier) if record is not None else None
            if (
                copy is None
                or not copy.ready
                or copy.readers
                or copy in gone
                or copy in read
                or copy in kept
                or key in pins
            ):
                if leading:
                    dead += 1
                    self._dead[tier] = dead
                continue
            leading = False
            if max_priority is not None and self.policy.priority(key, tier, self.now) > max_priority:
                break
            if self.count(record) == 1 and (last_tier or not self.worth_demoting(record, tier)):
                # It would be dropped: the chain last, heads last.
                if key in self.protect.chain:
                    if tier == self.top:
                        chain.append((record, copy))
                    continue
                ns = self.catalog.get(record.namespace)
                if self.held_children(ns, record.hash) > leaving.get(key, 0):
                    heads.append((record, copy))
                    continue
                if record.parent is not None:
                    parent = (record.namespace, record.parent)
                    leaving[parent] = leaving.get(parent, 0) + 1
            victims.append((record, copy))
            room += copy.slot.length
            if room >= need:
                return victims
        for record, copy in heads + chain:
            if room >= need:
                break
            victims.append((record, copy))
            room += copy.slot.length
        return victims


# -- the rules ----------------------------------------------------------------------------
def ends_in_drop(view: Planner, tier: TierName) -> bool:
    """Whether an eviction from ``tier`` ends in a drop: every tier below lacks room for one
    more block (of the smallest size any namespace stores), or there is none. Not for NVMe
    under write-behind, whose copies are the durable ones."""
    if tier == NVME and view.writes_behind:
        return False
    below = view.tiers[view.tiers.index(tier) + 1 :]
    smallest = view.catalog.smallest_block_bytes()
    return all(view.free_bytes(t) < view.spaces[t].slot_bytes(smallest) for t in below)


def shadowed_victims(view: Planner, tier: TierName, need: int) -> list[tuple[BlockRecord, Copy]]:
    """The copies in ``tier`` that a faster tier also holds ready, oldest shadowed first,
    adding up to ``need`` bytes: no lookup reads them, so they go for nothing. (A load
    promotes a copy and leaves the one below in place; under pressure those duplicates
    would make the last tier drop blocks held nowhere else.)"""
    out = []
    room = 0
    for ns in view.catalog:
        for h in ns.shadowed.get(tier, ()):
            record = ns.blocks[h]
            copy = view.copy_in(record, tier)
            if copy is None or not copy.ready or not view.held_above(record, tier):
                continue
            if view.readers(copy) or record.key in view.pins:
                continue
            out.append((record, copy))
            room += copy.slot.length
            if room >= need:
                return out
    return out


def fate(view: Planner, record: BlockRecord, tier: TierName, lower: TierName | None) -> TransferKind | None:
    """What evicting ``record``'s copy in ``tier`` does: ``DEMOTE`` (copy it one tier down)
    or None (drop it). Dropped when there is no tier below, when the tier below holds it
    ready or is writing it, when a faster tier holds it, when the policy would not keep it
    below, or when pushing it down would only drop something worth more
    (:func:`outranked_below`)."""
    if lower is None or view.held_above(record, tier):
        return None
    below = view.copy_in(record, lower)
    if below is not None:
        return None  # held below (or being written there): this copy goes for nothing
    if not view.worth_demoting(record, tier) or outranked_below(view, record, lower):
        return None
    return TransferKind.DEMOTE


def outranked_below(view: Planner, record: BlockRecord, lower: TierName) -> bool:
    """Whether demoting ``record`` into ``lower`` would only make the last tier drop a copy
    worth more than it: every tier from ``lower`` down is full, and each one's first victim
    (whose eviction would push the cascade on) outranks ``record`` there. Then the hierarchy
    drops its least valuable copy, as one tier of the same total would. Never for the chain
    a load reads. (Policy.priority ranks a block in any tier, and never below its held
    descendants, so dropping a chain's head this way drops nothing worth more.)"""
    if record.key in view.protect.chain:
        return False
    policy, now = view.policy, view.now
    tier: TierName | None = lower
    while tier is not None:
        if view.free_bytes(tier) >= view.spaces[tier].slot_bytes(record.nbytes):
            return False  # the cascade ends in free room: nothing is lost
        victims = view.victims(tier, 1)
        if not victims:
            return False
        victim, _ = victims[0]
        below = view.lower(tier)
        copies = view.copies(victim)
        if below in copies or (below is None and len(copies) > 1) or view.held_above(victim, tier):
            return False  # it is dropped, and another tier holds it: nothing is lost
        if not view.worth_demoting(victim, tier):
            return False  # it goes for nothing
        if policy.priority(record.key, tier, now) >= policy.priority(victim.key, tier, now):
            return False
        tier = below  # it would go down in turn (a copy above does not keep it here)
    return True


def may_fit(
    space: Space,
    nbytes: int,
    stuck: Iterable[Copy],
    landing: Iterable[Copy] = (),
    quarantined: int = 0,
) -> bool:
    """Whether a tier's free room plus everything in it that may go reaches ``nbytes``.
    ``stuck``: its copies that cannot go now (being written, pinned by a load or an
    operator, destinations of transfers); ``landing``: those among them that can go once
    their transfer lands; ``quarantined``: bytes it holds for expired stores. Counted from
    what cannot go, so it costs O(leases + transfers + pins), not a walk over victims."""
    room = space.capacity_bytes - space.used_bytes
    if room >= nbytes:
        return True
    held = {id(c): c.slot.length for c in stuck}
    landed = sum(c.slot.length for c in landing)
    return room - quarantined + space.used_bytes - sum(held.values()) + landed >= nbytes


def apply(plan: Plan, holdings, transfers, keep: frozenset[Copy] = frozenset()) -> None:
    """Carry out ``plan``'s steps in order: drops through ``holdings`` (``keep``: copies an
    orphan drop leaves, as if read), demotions through ``transfers`` (each queued for the
    mover). A step whose copy is gone, or whose slot below cannot be had, is skipped."""
    for step in plan.steps:
        record, tier, copy = step.record, step.tier, step.copy
        if record.copies.get(tier) is not copy:
            continue
        if isinstance(step, Drop):
            holdings.drop(record, tier, copy, RemovalReason.EVICTED, step.cause, keep=keep)
            continue
        if step.dst in record.copies or not copy.ready:
            continue
        slot = holdings.spaces[step.dst].allocate(record.nbytes)
        if slot is not None:
            transfers.demote(record, tier, step.dst, Copy(slot), step.cause)
