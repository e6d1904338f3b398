"""Transfers: the moves the core plans for the mover, and what happens when they land.

A transfer copies one block from a ready copy (the *source*, read while it moves) to a new
copy in another tier (the *destination*, not ready until it lands):

- a **demotion** moves a victim one tier down to make room (placement plans it); its source
  goes when it lands;
- a **write-behind** copies a committed block to NVMe in the background (DRAM on top, or a
  drain); both copies stay;
- a **promotion** brings a block into the top tier for a load; a **prefetch** moves a block
  one tier up ahead of need, as the policy asks. A load that finds a block's top-tier copy
  still on its way waits for that transfer (``promoting``).

Invariant (checked by :mod:`kvd.core.check`): every transfer in flight is counted once in
its source's ``readers`` and its destination is its record's copy in that tier;
``promoting`` files exactly the promotions and prefetches in flight, by destination copy.
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Callable, Sequence

from kvd.core.catalog import BlockKey, BlockRecord, Copy
from kvd.core.events import RemovalReason
from kvd.core.holdings import Holdings
from kvd.core.placement import Planner, Protect, apply
from kvd.core.types import Cause, CoreConfig, Outcome, Transfer, TransferKind
from kvd.media import DRAM, NVME, TierName
from kvd.policies import Prefetch

UPWARD = (TransferKind.PROMOTE, TransferKind.PREFETCH)


class Transfers:
    """Transfers in flight, demotions waiting for the mover, and the write-behind queue.
    ``planner``: makes a :class:`Planner` over the core's state at this instant."""

    def __init__(self, holdings: Holdings, config: CoreConfig, planner: Callable[..., Planner]) -> None:
        self.holdings = holdings
        self.config = config
        self.planner = planner
        self.inflight: dict[int, Transfer] = {}
        self.demotions: deque[Transfer] = deque()  # planned to make room; the mover runs them first
        self.write_behind: deque[BlockRecord] = deque()
        self.promoting: dict[Copy, Transfer] = {}  # destination copy -> the promotion writing it
        self.draining = False  # write every kept block down, write-behind or not
        self._ids = itertools.count(1)

    # -- the table ------------------------------------------------------------------------
    def start(
        self,
        kind: TransferKind,
        record: BlockRecord,
        src_tier: TierName,
        dst_tier: TierName,
        dst: Copy,
        cause: Cause | None = None,
    ) -> Transfer:
        """Begin moving ``record`` from its copy in ``src_tier`` into ``dst`` (a new copy in
        ``dst_tier``, whose slot the caller allocated)."""
        src = record.copies[src_tier]
        src.readers += 1
        record.copies[dst_tier] = dst
        transfer = Transfer(next(self._ids), kind, record, src_tier, src, dst_tier, dst, cause)
        self.inflight[transfer.id] = transfer
        if kind in UPWARD:
            self.promoting[dst] = transfer  # a load meanwhile waits for it
        return transfer

    def demote(self, record: BlockRecord, src_tier: TierName, dst_tier: TierName, dst: Copy, cause: Cause) -> None:
        """Begin a demotion and queue it for the mover."""
        self.demotions.append(self.start(TransferKind.DEMOTE, record, src_tier, dst_tier, dst, cause))

    def forget(self, transfer: Transfer) -> None:
        """Take ``transfer`` out of flight (its source is read no more). Raises ValueError
        when it is not in flight."""
        if self.inflight.pop(transfer.id, None) is None:
            raise ValueError(f"transfer {transfer.id} is not in flight")
        self.promoting.pop(transfer.dst, None)
        transfer.src.readers -= 1

    def is_inflight(self, transfer: Transfer) -> bool:
        return transfer.id in self.inflight

    def moving(self, tier: TierName) -> bool:
        """Whether a transfer in flight reads or writes a copy in ``tier``."""
        return any(tier in (t.src_tier, t.dst_tier) for t in self.inflight.values())

    def take_demotions(self) -> list[Transfer]:
        out = list(self.demotions)
        self.demotions.clear()
        return out

    @property
    def write_behind_pending(self) -> int:
        """Blocks queued or in flight for write-behind (may count a since-evicted one)."""
        inflight = sum(1 for t in self.inflight.values() if t.kind is TransferKind.WRITE_BEHIND)
        return len(self.write_behind) + inflight

    # -- write-behind ---------------------------------------------------------------------
    @property
    def writes_behind(self) -> bool:
        """Whether committed blocks are queued for NVMe as they are stored: write-behind on
        with DRAM on top, or a drain. (With HBM on top, blocks reach NVMe by demotion.)"""
        if NVME not in self.holdings.spaces:
            return False
        return self.draining or (self.config.write_behind and self.holdings.top == DRAM)

    def queue_write_down(self) -> int:
        """Queue every held block with a copy above NVMe and none on NVMe for writing down
        (a Sync or a drain); returns the blocks queued (0 without an NVMe tier)."""
        if NVME not in self.holdings.spaces:
            return 0
        queued = 0
        for ns in self.holdings.catalog.by_name():
            for record in ns.blocks.values():
                if NVME not in record.copies and self.holdings.above_nvme(record) is not None:
                    self.write_behind.append(record)
                    queued += 1
        return queued

    def plan_write_behind(self, max_blocks: int) -> list[Transfer]:
        """Up to ``max_blocks`` transfers copying queued blocks down to NVMe from their
        fastest copy above it — not those the policy would not keep below (ephemeral ones),
        nor those evicted, replaced or already down since they were queued."""
        held = self.holdings
        out: list[Transfer] = []
        if NVME not in held.spaces:
            self.write_behind.clear()
            return out
        now = held.clock()
        while self.write_behind and len(out) < max_blocks:
            record = self.write_behind[0]
            source = held.above_nvme(record)
            if (
                source is None
                or NVME in record.copies
                or held.catalog.record(record.key) is not record
                or not held.policy.worth_demoting(record.key, source[0], now)
            ):
                self.write_behind.popleft()
                continue
            planner = self.planner(Protect())
            room = planner.slot(NVME, record.nbytes)
            apply(planner.plan, held, self)
            if room is not True:
                break  # NVMe is full of blocks in flight; try again after they land
            self.write_behind.popleft()
            # Making room may have dropped an ancestor's last copy, and this block as its orphan.
            source = held.above_nvme(record) if held.catalog.record(record.key) is record else None
            slot = held.spaces[NVME].allocate(record.nbytes) if source is not None else None
            if slot is not None:
                out.append(self.start(TransferKind.WRITE_BEHIND, record, source[0], NVME, Copy(slot)))
        return out

    # -- prefetch -------------------------------------------------------------------------
    def plan_prefetch(self, max_blocks: int) -> list[Transfer]:
        """Up to ``max_blocks`` transfers moving blocks the policy expects to be needed soon
        one tier up (to the top tier from the next one, and so on), group by group as the
        policy names them (one turn's prompt; the most urgent first). A group moves whole or
        not at all (a part squeezed in is pushed out again before it is used). Its room is
        made only from copies the policy values below every block of the group, never from
        their sources below, and the plan is applied only when it makes the whole room; a
        group whose room waits for demotions to land keeps the less urgent ones out. A guess
        (a turn not announced) makes way only where that loses no block: what it displaces
        goes down, or goes where another tier holds it."""
        held = self.holdings
        out: list[Transfer] = []
        now = held.clock()
        for upper, lower in zip(held.tiers, held.tiers[1:]):
            space = held.spaces[upper]
            seen: set = set()
            for group in _announced_first(held.policy.prefetches(upper, now)):
                due = self._due(group.keys, upper, lower, seen, max_blocks - len(out))
                if not due:
                    continue
                need = sum(space.slot_bytes(record.nbytes) for record in due)
                if space.capacity_bytes - space.used_bytes < need:
                    worth = min(held.policy.priority(r.key, upper, now) for r in due) - 1e-12
                    if not group.announced:
                        worth = min(0.0, worth)  # a guess makes way only from worthless copies
                    sources = frozenset(r.copies[lower] for r in due)
                    planner = self.planner(Protect(copies=sources), Cause.PREFETCH)
                    if not planner.way(upper, need, worth, cascade=group.announced):
                        continue  # no room for it now
                    apply(planner.plan, held, self, keep=sources)
                    if space.capacity_bytes - space.used_bytes < need:
                        break  # its room comes as the demotions land
                self._prefetch_into(upper, lower, due, out)
                if len(out) >= max_blocks:
                    return out
        return out

    def _due(
        self, group: Sequence[BlockKey], upper: TierName, lower: TierName, seen: set, limit: int
    ) -> list[BlockRecord]:
        """The blocks of ``group`` that ``lower`` holds ready and ``upper`` does not, each
        once across the groups of one round (a block several sessions share is named once
        for each), at most ``limit``."""
        due: list[BlockRecord] = []
        for key in group:
            if len(due) >= limit:
                break
            record = self.holdings.catalog.record(key)
            src = record.copies.get(lower) if record is not None else None
            if record is None or key in seen or upper in record.copies or src is None or not src.ready:
                continue
            seen.add(key)
            due.append(record)
        return due

    def _prefetch_into(self, upper: TierName, lower: TierName, due: list[BlockRecord], out: list[Transfer]) -> None:
        """Start the prefetches of ``due`` that free space allows, skipping those making way
        evicted (the block, or its source below)."""
        space = self.holdings.spaces[upper]
        for record in due:
            src = record.copies.get(lower)
            if self.holdings.catalog.record(record.key) is not record or upper in record.copies:
                continue
            if src is None or not src.ready:
                continue
            slot = space.allocate(record.nbytes)
            if slot is None:
                return
            out.append(self.start(TransferKind.PREFETCH, record, lower, upper, Copy(slot)))

    # -- landing --------------------------------------------------------------------------
    def complete(self, transfer: Transfer, outcome: Outcome) -> None:
        """The mover ran ``transfer``. On success the destination is ready (a demotion's
        source goes, unless a load pinned it while it moved: then it stays, a readable copy
        like any other). On failure the destination goes; a corrupt source goes too (its
        slot quarantined when a load pins it in the top tier); a failed write down is
        queued again. Raises ValueError when ``transfer`` is not in flight."""
        self.forget(transfer)
        held = self.holdings
        record, now = transfer.record, held.clock()
        ns = held.catalog.get(record.namespace)
        if outcome is Outcome.OK:
            held.make_ready(ns, record, transfer.dst_tier, transfer.dst, now)
            held.policy.on_stored(transfer.dst_tier, [record.key], now)
            if transfer.kind is TransferKind.DEMOTE and not transfer.src.readers:
                held.drop(record, transfer.src_tier, transfer.src, RemovalReason.DEMOTED, transfer.cause)
            held.sweep_orphans()
            return
        # A failed promotion's copy goes with the load leases' pins still counted on it;
        # their completion then unpins an orphan, which is harmless.
        held.drop(record, transfer.dst_tier, transfer.dst, RemovalReason.DISCARDED)
        if outcome is Outcome.CORRUPT:
            # A load may pin the corrupt copy, its client reading the slot right now: no
            # lookup finds the block any more, and the slot is quarantined for a lease
            # period instead of handed to the next store.
            pinned = transfer.src_tier == held.top and transfer.src.readers > 0
            held.drop(record, transfer.src_tier, transfer.src, RemovalReason.CORRUPT, quarantine=pinned)
        elif transfer.kind not in UPWARD and NVME in held.spaces and held.lower(transfer.src_tier):
            self.write_behind.append(record)
        held.sweep_orphans()


def _announced_first(groups) -> list[Prefetch]:
    """The announced groups one by one, then every guess as one group: guesses move
    together or not at all (one by one, small ones squeezed into a full tier and pushed
    out what the next stores needed)."""
    named = list(groups)
    guesses = [key for g in named if not g.announced for key in g.keys]
    return [g for g in named if g.announced] + ([Prefetch(guesses)] if guesses else [])
