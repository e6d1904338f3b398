"""Loads: a client reads held blocks from top-tier slots under a lease, then completes it.

Phase 1 (:meth:`Loads.grant`) pins a top-tier copy of each held block: blocks held only
below are promoted into slots made for them (one placement pass for the whole shortfall,
then slot by slot), and a block another load is promoting is waited for. While a load makes
its room, the chain it reads is kept (:attr:`Protect.chain`): dropping one of its blocks
would cut the chain and the load would find less than it came for. Phase 2 (:meth:`Loads.
complete`) unpins what the client read.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from kvd.core.catalog import BlockRecord, Copy, Namespace
from kvd.core.chains import LoadChain
from kvd.core.errors import NoSpace
from kvd.core.holdings import Holdings
from kvd.core.leases import LeaseTable, LoadLease
from kvd.core.placement import Planner, Protect, apply
from kvd.core.transfers import Transfers
from kvd.core.types import LoadGrant, Transfer, TransferKind, Wait
from kvd.media import Slot, TierName


@dataclass(slots=True)
class _Read:
    """How a load reads one held block: ``copy`` (its top-tier copy, pinned) as it is, after
    ``awaits`` (a promotion under way) lands, or after its own promotion from ``tier``."""

    record: BlockRecord
    tier: TierName
    copy: Copy | None = None  # None: this load promotes it
    awaits: Transfer | BlockRecord | None = None  # a record: this load's own promotion of it


class Loads:
    """Load leases from grant to completion. ``planner``: a :class:`Planner` over the core's
    state at this instant."""

    def __init__(
        self, holdings: Holdings, leases: LeaseTable, transfers: Transfers, planner: Callable[[Protect], Planner]
    ) -> None:
        self.holdings = holdings
        self.leases = leases
        self.transfers = transfers
        self.planner = planner

    def grant(self, ns: Namespace, hashes: Sequence[int], lease_seconds: float) -> LoadGrant | Wait:
        """Pin a top-tier copy of each held block of ``hashes``, planning promotions for those
        held only below. Raises NoSpace when the top tier cannot take them."""
        held = self.holdings
        now = held.clock()
        protect = Protect(chain=LoadChain(ns, hashes))
        free = self._room_for_promotions(ns, hashes, protect)
        if isinstance(free, Wait):
            return free
        reads = self._plan_reads(ns, hashes, protect, free)
        if not isinstance(reads, list):
            return reads
        space = held.spaces[held.top]
        promotions = sum(1 for r in reads if r is not None and r.copy is None)
        slots = space.allocate_many(ns.block_bytes, promotions)
        if len(slots) < promotions:
            # The plan counted room the allocator cannot cut (blocks of several sizes
            # fragment a tier): its evictions stand, the load asks again.
            for slot in slots:
                space.free(slot)
            return Wait(0)
        return self._lease(ns, reads, slots, now, lease_seconds)

    def _room_for_promotions(self, ns: Namespace, hashes: Sequence[int], protect: Protect) -> int | Wait:
        """Free top-tier slots for the blocks held only below, made in one placement pass
        for the whole shortfall while every copy of the load's blocks stays in place (the
        room is not made by evicting the blocks it is for). Returns how many slots are free
        for them now (fewer than needed when the rest cannot be made at once: the blocks
        ask one by one), or Wait when demotions must land first."""
        held = self.holdings
        top = held.top
        below = {
            h: record
            for h in hashes
            if (record := ns.blocks.get(h)) is not None and top not in record.copies and record.fastest_ready()
        }
        if not below:
            return 0
        space = held.spaces[top]
        free = space.free_slots(ns.block_bytes, len(below))
        if free == len(below):
            return free
        pins = frozenset(copy for h in hashes if (r := ns.blocks.get(h)) is not None for copy in r.copies.values())
        planner = self.planner(Protect(pins, protect.chain))
        for _ in range(free):
            planner.claim(top, ns.block_bytes)
        pending = planner.room(top, (len(below) - free) * space.slot_bytes(ns.block_bytes))
        apply(planner.plan, held, self.transfers, keep=pins)
        free = space.free_slots(ns.block_bytes, len(below))
        if pending and free < len(below):
            return Wait(pending)
        return free

    def _plan_reads(self, ns: Namespace, hashes: Sequence[int], protect: Protect, free: int) -> list | Wait:
        """How each hash is read (None: not held, or not readable yet), making room for the
        promotions slot by slot once the ``free`` slots are taken. Applies the room it made,
        whatever the answer; raises NoSpace."""
        held = self.holdings
        top = held.top
        planner = self.planner(protect)
        for _ in range(free):
            planner.claim(top, ns.block_bytes)
        pool = free  # claimed slots not yet given to a promotion
        reads: list[_Read | None] = []
        promoting: set[BlockRecord] = set()
        read: list[Copy] = []
        for h in hashes:
            record = ns.blocks.get(h)
            tier = planner.fastest_ready(record) if record is not None else None
            if record is None or tier is None:
                reads.append(None)
                continue
            copy = planner.copy_in(record, top)
            if copy is not None:
                if copy.ready:
                    reads.append(_Read(record, tier, copy))
                elif record in promoting:
                    reads.append(_Read(record, tier, copy, awaits=record))  # a hash named twice
                elif (transfer := self.transfers.promoting.get(copy)) is not None:
                    reads.append(_Read(record, tier, copy, awaits=transfer))  # another load's
                else:
                    reads.append(None)  # a store is writing it: not readable yet
                    continue
                planner.read(copy)
                read.append(copy)
                continue
            if pool:
                pool -= 1
            else:
                room = planner.slot(top, record.nbytes)
                if room is not True:
                    apply(planner.plan, held, self.transfers, keep=frozenset(read))
                    # A Wait for nothing but this load's own promotions would come back the same.
                    if isinstance(room, Wait) and (room.demotions or self.transfers.moving(top)):
                        return room
                    raise NoSpace(
                        f"no {top.upper()} room to promote the blocks of a {len(hashes)}-block load: the "
                        f"{top.upper()} tier is smaller than the load, or the rest of it is leased"
                    )
            tier = planner.fastest_ready(record)
            if tier is None:
                # Making room dropped an ancestor's last copy, and this block as its orphan.
                planner.unclaim(top, record.nbytes)
                reads.append(None)
                continue
            source = record.copies[tier]
            planner.read(source)
            planner.write(record, top)
            read.append(source)
            promoting.add(record)
            reads.append(_Read(record, tier))
        apply(planner.plan, held, self.transfers, keep=frozenset(read))
        return reads

    def _lease(
        self, ns: Namespace, reads: list[_Read | None], slots: list[Slot], now: float, lease_seconds: float
    ) -> LoadGrant:
        """Pin, start the promotions (into ``slots``), lease; tell the policy the chain was used."""
        held = self.holdings
        top = held.top
        free = iter(slots)
        items: list[tuple[BlockRecord, Copy] | None] = []
        promotions: list[Transfer] = []
        awaiting: list[Transfer] = []
        own: dict[BlockRecord, Transfer] = {}
        for read in reads:
            if read is None:
                items.append(None)
                continue
            if read.copy is None:
                dst = Copy(next(free), readers=1)  # pinned by this lease from the start
                promotion = self.transfers.start(TransferKind.PROMOTE, read.record, read.tier, top, dst)
                own[read.record] = promotion
                promotions.append(promotion)
                items.append((read.record, dst))
                continue
            copy = read.copy
            if isinstance(read.awaits, BlockRecord):
                promotion = own[read.awaits]
                copy = promotion.dst
                awaiting.append(promotion)
            elif read.awaits is not None:
                awaiting.append(read.awaits)
            copy.readers += 1
            items.append((read.record, copy))
        # A load may come in batches: the held ancestors of this batch are touched as well,
        # so that the root of the chain stays the most recent (batches of one chain joined).
        held.touch_chain(ns, [item[0] for item in items if item is not None], now)
        leases = self.leases
        lease = LoadLease(leases.new_id("l"), ns.name, now + leases.duration(lease_seconds), items)
        leases.loads[lease.id] = lease
        return LoadGrant(lease.id, lease.expires_at, promotions, awaiting, [r.tier if r else None for r in reads])

    def slots(self, lease_id: str) -> list[tuple[Slot, int] | None]:
        """(top-tier slot, nbytes) per hash of a load lease; None where the block is not held
        (or its copy went: a failed promotion, a corrupt copy). Raises UnknownLease."""
        top = self.holdings.top
        out: list[tuple[Slot, int] | None] = []
        for item in self.leases.load(lease_id).items:
            if item is None:
                out.append(None)
                continue
            record, copy = item
            live = record.copies.get(top) is copy and copy.ready
            out.append((copy.slot, record.nbytes) if live else None)
        return out

    def complete(self, lease_id: str) -> None:
        """The client has read the slots: unpin them. Raises UnknownLease."""
        lease = self.leases.load(lease_id)
        del self.leases.loads[lease_id]
        for item in lease.items:
            if item is not None:
                item[1].readers -= 1
        self.holdings.sweep_orphans()
