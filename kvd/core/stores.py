"""Stores: a client writes new blocks into top-tier slots under a lease, then commits them.

Phase 1 (:meth:`Stores.grant`) finds the room for every block not yet held, all or nothing:
free slots first, then one placement pass for the whole shortfall, then slot by slot. A
store that cannot fit even after evicting everything that may go is refused before it
evicts anything; one that waits for demotions to land answers :class:`Wait`. Phase 2
(:meth:`Stores.commit`) makes the written blocks visible, except those no lookup could
reach (a failed one and the blocks behind it, or a chain cut since the grant).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

from kvd.core.catalog import BlockRecord, Copy, Namespace
from kvd.core.chains import held_ancestors, reaches_a_root
from kvd.core.errors import InvalidArgument, NoSpace
from kvd.core.events import RemovalReason
from kvd.core.exports import Exports
from kvd.core.holdings import Holdings
from kvd.core.leases import LeaseTable, StoreLease
from kvd.core.placement import Planner, Protect, apply, may_fit
from kvd.core.sessions import Session
from kvd.core.transfers import Transfers
from kvd.core.types import BlockSpec, StoreGrant, Wait
from kvd.media import Slot


class Stores:
    """Store leases from grant to commit. ``planner``: a :class:`Planner` over the core's
    state at this instant."""

    def __init__(
        self,
        holdings: Holdings,
        leases: LeaseTable,
        transfers: Transfers,
        planner: Callable[[Protect], Planner],
        exports: Exports,
    ) -> None:
        self.holdings = holdings
        self.leases = leases
        self.transfers = transfers
        self.planner = planner
        self.exports = exports

    def grant(
        self, ns: Namespace, blocks: Sequence[BlockSpec], now: float, session: Session, lease_seconds: float
    ) -> StoreGrant | Wait:
        """Top-tier slots for ``blocks`` (a chain, root first, or the continuation of one)
        not yet held, under a lease. Raises NoSpace."""
        held = self.holdings
        top = held.top
        space = held.spaces[top]
        # The chain this store continues, when every block of it is held now.
        parent = blocks[0].parent if reaches_a_root(ns, blocks[0].parent) else None
        new = sum(1 for s in blocks if not ((r := ns.blocks.get(s.hash)) is not None and r.copies))
        size = space.slot_bytes(ns.block_bytes)
        need = new * size
        if need > space.capacity_bytes:
            label = top.upper()
            raise NoSpace(f"the store needs {need} bytes of {label}; the {label} tier holds {space.capacity_bytes}")
        if need and not self._may_fit(need):
            if self._may_fit(need, landing=True):
                # Transfers into the tier (prefetches) will land as copies that can go: wait
                # for them, evicting nothing meanwhile (slots freed now would only take the
                # mover's next prefetches, and the wait would start over).
                return Wait(0)
            raise NoSpace(
                f"no room for {len(blocks)} blocks of {blocks[0].nbytes} bytes: the {top.upper()} tier is "
                "smaller, or full of blocks protected by leases or pins"
            )
        free = space.free_slots(ns.block_bytes, new)
        if free < new:
            # One pass over the victims for the whole shortfall, not one per block.
            planner = self.planner(Protect())
            for _ in range(free):
                planner.claim(top, ns.block_bytes)
            pending = planner.room(top, (new - free) * size)
            apply(planner.plan, held, self.transfers)
            if parent is not None and not reaches_a_root(ns, parent):
                return self._lease(ns, [None] * len(blocks), now, session, lease_seconds)  # the room cut the chain
            free = space.free_slots(ns.block_bytes, new)
            if pending and free < new:
                return Wait(pending)
        placed = self._place(ns, blocks, free)
        if not isinstance(placed, list):
            return placed
        slots = space.allocate_many(ns.block_bytes, sum(placed))
        if len(slots) < sum(placed):
            # The plan counted room the allocator cannot cut (blocks of several sizes
            # fragment a tier): its evictions stand, the store asks again.
            for slot in slots:
                space.free(slot)
            return Wait(0)
        items = self._write(ns, blocks, placed, slots)
        held_hashes = {spec.hash for spec, item in zip(blocks, items) if item is None}
        if parent is not None:
            held_hashes.add(parent)
        return self._lease(ns, items, now, session, lease_seconds, frozenset(held_hashes))

    def _place(self, ns: Namespace, blocks: Sequence[BlockSpec], free: int) -> list[bool] | Wait:
        """Which blocks get a slot (True) and which are held (False), making room slot by
        slot once the ``free`` slots are taken: each block placed counts as held below its
        parent from then on. Applies the room it made, whatever the answer; raises NoSpace."""
        top = self.holdings.top
        planner = self.planner(Protect())
        for _ in range(free):
            planner.claim(top, ns.block_bytes)
        placed: list[bool] = []
        taken = 0
        for spec in blocks:
            record = ns.blocks.get(spec.hash)
            if record is not None and planner.present(record):
                placed.append(False)  # held, or being written under another lease
                continue
            if taken >= free:
                room = planner.slot(top, spec.nbytes)
                if room is not True:
                    apply(planner.plan, self.holdings, self.transfers)
                    if isinstance(room, Wait):
                        return room
                    raise NoSpace(
                        f"no room for {len(blocks)} blocks of {spec.nbytes} bytes: every tier is full "
                        "of blocks protected by leases"
                    )
            taken += 1
            planner.expect_child(ns, spec.parent, spec.hash)
            placed.append(True)
        apply(planner.plan, self.holdings, self.transfers)
        self.holdings.note_orphans(planner.plan.orphaned_under)
        return placed

    def _write(
        self, ns: Namespace, blocks: Sequence[BlockSpec], placed: list[bool], slots: list[Slot]
    ) -> list[tuple[BlockRecord, Copy] | None]:
        """A new record and top-tier copy (not ready) for each placed block, in ``slots``."""
        top = self.holdings.top
        free = iter(slots)
        items: list[tuple[BlockRecord, Copy] | None] = []
        for spec, place in zip(blocks, placed):
            if not place:
                held = ns.blocks.get(spec.hash)
                if held is not None and held.origin is None:
                    held.origin = spec.origin  # the same hash names the same tokens
                items.append(None)
                continue
            record = BlockRecord(ns.name, spec.hash, spec.parent, spec.nbytes, origin=spec.origin)
            copy = Copy(next(free))
            record.copies[top] = copy
            ns.add(record)
            items.append((record, copy))
        return items

    def _lease(
        self,
        ns: Namespace,
        items: list[tuple[BlockRecord, Copy] | None],
        now: float,
        session: Session,
        lease_seconds: float,
        held: frozenset[int] = frozenset(),
    ) -> StoreGrant:
        """Lease ``items``; all None for a store whose room-making cut the chain it
        continues: no lookup could reach its blocks, and the engine that stores the chain
        again from the cut writes them then."""
        leases = self.leases
        lease = StoreLease(leases.new_id("s"), ns.name, now + leases.duration(lease_seconds), session.id, items, held)
        leases.stores[lease.id] = lease
        return StoreGrant(lease.id, lease.expires_at, [i[1].slot if i else None for i in items])

    def _may_fit(self, nbytes: int, landing: bool = False) -> bool:
        """Whether the top tier's free room plus the ready copies that no lease, pin or
        transfer holds reach ``nbytes`` (with ``landing``, also the copies transfers are
        writing into it for no lease and no pin: they can go once they land)."""
        held = self.holdings
        top = held.top
        stuck = [copy for record, copy in self.leases.items() if record.copies.get(top) is copy]
        for key in held.pins:
            record = held.catalog.record(key)
            copy = record.copies.get(top) if record is not None else None
            if copy is not None:
                stuck.append(copy)
        arriving = [t for t in self.transfers.inflight.values() if t.dst_tier == top]
        stuck += [t.dst for t in arriving]
        lands = [t.dst for t in arriving if landing and not t.dst.readers and t.record.key not in held.pins]
        quarantined = sum(slot.length for slot in self.leases.quarantined())
        return may_fit(held.spaces[top], nbytes, stuck, lands, quarantined)

    def commit(self, lease_id: str, failed: Iterable[int] = (), abort: bool = False, share: bool = True) -> int:
        """Make the lease's written blocks visible; discard ``failed`` ones (indexes into the
        lease's blocks), and the blocks of this lease that follow a discarded one in the
        chain, or a block that was held when the store was granted and is gone now. Returns
        how many were committed. ``share``: offer them to the cluster tier (not for blocks
        read from it). Raises UnknownLease, InvalidArgument."""
        lease = self.leases.store(lease_id)
        failed = set(failed)
        bad = [i for i in failed if not 0 <= i < len(lease.items)]
        if bad:
            raise InvalidArgument(f"failed indexes {bad} are outside the lease's {len(lease.items)} blocks")
        del self.leases.stores[lease_id]
        held = self.holdings
        ns = held.catalog.get(lease.namespace)
        now = held.clock()
        written = [(i, item[0], item[1]) for i, item in enumerate(lease.items) if item is not None]
        cut = _cut(written, lease, ns, failed, abort)
        # Discard before anything becomes readable, whatever order the blocks came in: a
        # discard drops its held descendants, and none of this lease's may be readable yet.
        for _, record, copy in written:
            if record.hash in cut:
                held.drop(record, held.top, copy, RemovalReason.DISCARDED)
        committed: list[BlockRecord] = []
        for _, record, copy in written:
            if record.hash in cut:
                continue
            held.make_ready(ns, record, held.top, copy, now, lease.session_id)
            committed.append(record)
            if self.transfers.writes_behind:
                self.transfers.write_behind.append(record)
        held.policy.on_stored(held.top, [r.key for r in committed], now)
        if share:
            self.exports.offer(committed)
        if committed:
            # The prefix this store extends was used too, and must stay more recent than
            # its new tail (a held prefix stays a prefix).
            ancestors = held_ancestors(ns, committed[0])
            if ancestors:
                held.policy.on_accessed(ancestors, now)
        held.sweep_orphans()
        return len(committed)

    def expire(self, lease: StoreLease, now: float) -> None:
        """Abort an expired store lease: its blocks go, and their slots are quarantined."""
        held = self.holdings
        ns = held.catalog.get(lease.namespace)
        for item in lease.items:
            if item is None:
                continue
            record, copy = item
            del record.copies[held.top]
            if not record.copies:
                ns.remove(record)
                if record.hash in ns.children:  # held orphans its store would have reconnected
                    held.drop_orphans(ns, record.hash)
            self.leases.quarantine(copy.slot, now)


def _cut(written: list, lease: StoreLease, ns: Namespace, failed: set[int], abort: bool) -> set[int]:
    """Hashes of the lease's blocks no lookup could reach: aborted, failed, continuing a held
    block that is gone, and every block of the lease behind one of those."""
    cut = {
        r.hash
        for i, r, _ in written
        if abort or i in failed or (r.parent in lease.held and r.parent not in ns.blocks)
    }
    below: dict[int, list[int]] = {}
    for _, r, _ in written:
        if r.parent is not None:
            below.setdefault(r.parent, []).append(r.hash)
    stack = list(cut)
    while stack:
        for h in below.get(stack.pop(), ()):
            if h not in cut:
                cut.add(h)
                stack.append(h)
    return cut
