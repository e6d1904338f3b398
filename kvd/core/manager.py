"""KvCore: the daemon's state machine — catalog, leases, capacity, eviction plan, events.

No I/O and no asyncio: every method is a synchronous state transition over in-memory state,
with time from an injected clock. The daemon runs it over real tiers (bytes move in worker
threads between calls); a simulator can run the very same object over capacity-only spaces
(bare allocators) and a simulated clock.

Capacity: each tier is an :class:`~kvd.tiers.ExtentAllocator`-like *space* (allocate/free,
pure bookkeeping). When a space is full the policy names victims; a victim whose block has a
ready copy one tier down (or that sits in the last tier, or that the policy would not keep
below, or that is worth less than what its demotion would push out of every full tier
below) is dropped at once; otherwise it is *demoted*: the core plans a :class:`Transfer` to
the tier below and the copy stays pinned until the mover reports the transfer done. A
request that needs the room comes back :class:`Wait` and retries after the mover ran.

Invariants (checked by :meth:`check`):
- every copy's slot is allocated in its tier's space, no two copies share a slot, and the
  bytes of all copies in a tier equal the space's ``used_bytes``;
- a copy's ``readers`` equals the load leases pinning it plus the transfers reading it;
- a namespace's ``visible`` map holds exactly its blocks with a ready copy, at the fastest;
- the policy tracks exactly the ready copies.
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

from kvd.core.catalog import BlockRecord, Copy, Namespace
from kvd.core.errors import GeometryConflict, InvalidArgument, NoSpace, UnknownLease, UnknownNamespace, UnknownSession
from kvd.core.events import Event, EventLog
from kvd.core.sessions import SESSION_EVENTS, Session, SessionTable
from kvd.core.types import (
    MAX_UINT64,
    BlockSpec,
    CoreConfig,
    CoreStats,
    LoadGrant,
    Outcome,
    Space,
    StoreGrant,
    TierUsage,
    Transfer,
    Wait,
)
from kvd.media import TIER_CODES, TIER_NAMES, Slot
from kvd.policies import Policy

# Why a block's last copy went, when its held descendants go with it (_drop_orphans): a
# capacity eviction, or a copy that never became readable (a store's abort while an
# earlier orphan of it was still held). An operator's eviction and a cleared namespace
# name their own blocks; "orphaned" drops walk all descendants at once. After a corrupt
# copy the healthy descendants stay: the engine's next store of the chain writes the lost
# block alone and finds the rest held (faults are rare; capacity evictions are not).
ORPHANING_REASONS = frozenset({"evicted", None})


@dataclass(slots=True)
class StoreLease:
    id: str
    namespace: str
    expires_at: float
    session_id: str | None
    # One entry per requested block: (record, new DRAM copy) to write, or None (held).
    items: list[tuple[BlockRecord, Copy] | None]
    # Hashes this store's chain runs through that were held when it was granted: the held
    # blocks it names and the parent it continues. One gone by the commit cuts the chain.
    held: frozenset[int] = frozenset()


@dataclass(slots=True)
class LoadLease:
    id: str
    namespace: str
    expires_at: float
    # One entry per requested hash: (record, pinned DRAM copy), or None (not held).
    items: list[tuple[BlockRecord, Copy] | None]


class KvCore:
    """The node's KV catalog and its decisions. Single-threaded: call from one thread."""

    def __init__(
        self,
        spaces: dict[str, Space],
        policy: Policy,
        clock: Callable[[], float],
        config: CoreConfig | None = None,
        lease_prefix: str = "",
        sessions: SessionTable | None = None,
    ) -> None:
        unknown = set(spaces) - set(TIER_NAMES)
        if unknown:
            raise ValueError(f"unknown tiers {sorted(unknown)}")
        if not spaces:
            raise ValueError("the core needs at least one tier")
        self.tiers = [t for t in TIER_NAMES if t in spaces]  # fastest first
        self.top = self.tiers[0]  # stores land here and loads read from here
        self.spaces = spaces
        self.policy = policy
        self.clock = clock
        self.config = config or CoreConfig()
        self.sessions = sessions if sessions is not None else SessionTable()
        self.events = EventLog()
        self._namespaces: dict[str, Namespace] = {}
        self._store_leases: dict[str, StoreLease] = {}
        self._load_leases: dict[str, LoadLease] = {}
        self._lease_ids = itertools.count(1)
        self._lease_prefix = lease_prefix
        self._transfer_ids = itertools.count(1)
        self._demotions: deque[Transfer] = deque()
        self._inflight: dict[int, Transfer] = {}
        self._write_behind: deque[BlockRecord] = deque()
        self._quarantine: deque[tuple[float, Slot]] = deque()  # (release time, DRAM slot)
        self._promoting: dict[int, Transfer] = {}  # id(DRAM copy being promoted) -> transfer
        self._pinned: set[tuple[str, int]] = set()  # held blocks no policy may evict or demote
        # (namespace, hash) of dropped blocks whose held descendants a read, a write or a
        # move kept when they became orphans: they go when that ends (_sweep_orphans).
        self._orphaned_under: set[tuple[str, int]] = set()
        # The chain a load in progress reads: making its room may move these blocks down;
        # in the top tier they are its last victims, below it never dropped (_keeping).
        self._kept_chain: frozenset[tuple[str, int]] = frozenset()
        self._draining = False  # write every kept DRAM block down, write-behind or not

    # -- namespaces -----------------------------------------------------------------------
    def check_geometry(self, name: str, block_tokens: int, block_bytes: int) -> bool:
        """Whether registering this geometry would create a namespace (True) or confirm one.

        Raises InvalidArgument (bad values, a block that no tier can hold) or
        GeometryConflict (known with another geometry). Changes nothing.
        """
        if not name or len(name) > self.config.max_namespace_len:
            raise InvalidArgument(f"namespace must be 1..{self.config.max_namespace_len} characters")
        if block_tokens <= 0:
            raise InvalidArgument("block_tokens must be positive")
        if not 0 < block_bytes <= self.config.max_block_bytes:
            raise InvalidArgument(f"block_bytes must be in 1..{self.config.max_block_bytes}")
        for tier in self.tiers:
            largest = self.spaces[tier].largest_region_bytes
            if self.spaces[tier].slot_bytes(block_bytes) > largest:
                raise InvalidArgument(
                    f"blocks of {block_bytes} bytes do not fit the {tier} tier "
                    f"(its largest contiguous region is {largest} bytes)"
                )
        existing = self._namespaces.get(name)
        if existing is None:
            return True
        if (existing.block_tokens, existing.block_bytes) != (block_tokens, block_bytes):
            raise GeometryConflict(
                f"namespace {name!r} is registered with {existing.block_tokens} tokens and "
                f"{existing.block_bytes} bytes per block, not {block_tokens} and {block_bytes}"
            )
        return False

    def register_namespace(self, name: str, block_tokens: int, block_bytes: int) -> bool:
        """Register ``name``; True when new. Raises as :meth:`check_geometry`."""
        if not self.check_geometry(name, block_tokens, block_bytes):
            return False
        self._namespaces[name] = Namespace(name, block_tokens, block_bytes)
        self.events.registered(name, block_tokens, block_bytes, self.clock())
        return True

    def namespace(self, name: str) -> Namespace:
        ns = self._namespaces.get(name)
        if ns is None:
            raise UnknownNamespace(f"namespace {name!r} is not registered")
        return ns

    def namespaces(self) -> list[Namespace]:
        return [self._namespaces[n] for n in sorted(self._namespaces)]

    def clear_namespace(self, name: str) -> int:
        """Drop every readable copy of ``name``'s blocks that nothing reads; returns how many
        blocks are left (being written, read or moved: they stay until that ends).

        Emits BlockRemoved (reason ``cleared``) per copy, then NamespaceCleared when no
        block is left. The namespace and its geometry stay registered.
        """
        ns = self.namespace(name)
        self._drop_unread(ns, list(ns.blocks.values()), "cleared")
        if not ns.blocks:
            self.events.cleared(name, self.clock())
        return len(ns.blocks)

    # -- operator actions -----------------------------------------------------------------
    def evict_session(self, namespace: str, session_id: str) -> tuple[int, int]:
        """Drop the blocks only ``session_id`` holds (not a shared prefix, not a block in
        another live session's chain) from every tier. Returns (blocks removed, blocks left
        because a transfer or a load uses them). Raises UnknownNamespace, UnknownSession."""
        ns = self.namespace(namespace)
        session = self.sessions.get(namespace, session_id)
        if session is None:
            raise UnknownSession(f"session {session_id!r} of {namespace!r} is unknown")
        records = []
        for h in dict.fromkeys(session.chain):
            record = ns.blocks.get(h)
            if record is not None and self.sessions.owner(record.key) is session:
                if not self.sessions.is_shared(record.key):
                    records.append(record)
        remaining = self._drop_unread(ns, records, "evicted_by_operator")
        return len(records) - remaining, remaining

    def evict_all(self) -> tuple[int, int]:
        """Drop every block of every namespace (as :meth:`clear_namespace` each).
        Returns (blocks removed, blocks left because a transfer or a load uses them)."""
        removed = remaining = 0
        for ns in self.namespaces():
            before = len(ns.blocks)
            left = self.clear_namespace(ns.name)
            removed, remaining = removed + before - left, remaining + left
        return removed, remaining

    def pin(self, namespace: str, hashes: Sequence[int]) -> tuple[int, int]:
        """Keep the held blocks among ``hashes`` where they are: no tier evicts or demotes a
        pinned copy, whatever the policy says (an operator's evict still drops it). Returns
        (blocks newly pinned, hashes not held). Raises UnknownNamespace, InvalidArgument."""
        ns = self.namespace(namespace)
        self._check_hash_count(hashes)
        changed = missing = 0
        for h in hashes:
            record = ns.blocks.get(h)
            if record is None or record.fastest_ready() is None:
                missing += 1
            elif record.key not in self._pinned:
                self._pinned.add(record.key)
                changed += 1
        return changed, missing

    def unpin(self, namespace: str, hashes: Sequence[int]) -> tuple[int, int]:
        """Let the policy decide about ``hashes`` again. Returns (blocks unpinned, hashes
        that were not pinned)."""
        self.namespace(namespace)
        self._check_hash_count(hashes)
        changed = 0
        for h in set(hashes):
            if (namespace, h) in self._pinned:
                self._pinned.discard((namespace, h))
                changed += 1
        return changed, len(set(hashes)) - changed

    @property
    def pinned_count(self) -> int:
        return len(self._pinned)

    def set_policy(self, policy: Policy) -> None:
        """Hand every held copy to ``policy`` and decide with it from now on. Each tier's
        copies enter least valuable first by the old policy, so a recency policy keeps
        their order; the new policy then hears of every known session."""
        now = self.clock()
        for tier in self.tiers:
            # on_stored takes a chain root first and touches it leaf first: hand the most
            # valuable first so that the least valuable is the least recent.
            keys = list(self.policy.victims(tier, now))[::-1]
            if keys:
                policy.on_stored(tier, keys, now)
        policy.on_sessions(self.sessions.sessions(), [], set(), now)
        self.policy = policy

    def start_drain(self) -> int:
        """Queue every held DRAM (or HBM) block without an NVMe copy for writing down, with or
        without write-behind (the policy's ``worth_demoting`` still filters, at planning);
        stores made while draining are queued too. Returns the blocks queued."""
        self._draining = True
        return self.queue_write_down()

    @property
    def writes_behind(self) -> bool:
        """Whether committed blocks are queued for NVMe as they are stored (write-behind on,
        DRAM on top, or a drain): if not, a Sync must queue them (:meth:`queue_write_down`)."""
        return self._writes_behind

    def queue_write_down(self) -> int:
        """Queue every held block that has a copy above NVMe and none on NVMe for writing
        down (a Sync or a drain); returns the blocks queued (0 without an NVMe tier)."""
        if "nvme" not in self.spaces:
            return 0
        queued = 0
        for ns in self.namespaces():
            for record in ns.blocks.values():
                if "nvme" not in record.copies and self._above_nvme(record) is not None:
                    self._write_behind.append(record)
                    queued += 1
        return queued

    def stop_drain(self) -> None:
        """Back to the configured write-behind (what is queued still goes down)."""
        self._draining = False

    # -- lookup ---------------------------------------------------------------------------
    def lookup(self, namespace: str, hashes: Sequence[int], session_id: str | None = None) -> list[str]:
        """Fastest tier of each block of the longest held prefix of ``hashes``.

        No side effects on what is held (an engine may ask again and again; a router may
        score); see :meth:`lookup_codes` for ``session_id``.
        """
        return [TIER_NAMES[code - 1] for code in self.lookup_codes(namespace, hashes, session_id)]

    def lookup_codes(self, namespace: str, hashes: Sequence[int], session_id: str | None = None) -> list[int]:
        """:meth:`lookup` with tier codes (``TIER_CODES``) instead of names: the hot path.

        With ``session_id``, a lookup also says that session's turn has begun (its tool
        pause is over); asking again during the turn changes nothing.
        """
        if len(hashes) > self.config.max_lookup_hashes:
            raise InvalidArgument(f"at most {self.config.max_lookup_hashes} hashes per lookup")
        visible = self.namespace(namespace).visible
        if session_id is not None:
            session = self.sessions.get(namespace, session_id)
            if session is None or session.state != "active":
                self.sessions.turn_start(namespace, session_id, hashes, self.clock())
                self._sync_sessions()
        codes = list(map(visible.get, hashes))
        try:
            return codes[: codes.index(None)]  # type: ignore[return-value]
        except ValueError:
            return codes  # type: ignore[return-value]

    # -- store ----------------------------------------------------------------------------
    def prepare_store(
        self,
        namespace: str,
        blocks: Sequence[BlockSpec],
        lease_seconds: float = 0,
        session_id: str | None = None,
        last_partial: bool = False,
    ) -> StoreGrant | Wait:
        """Phase 1: slots in the top tier for the blocks not yet held, under a lease (all or
        nothing).

        ``blocks`` is a chain, root first (or the continuation of one: the first block's
        parent). The store is a session's, hinted by ``session_id`` or inferred from the
        chain; ``last_partial`` says the last block holds fewer than block_tokens tokens
        (it will not be re-used as it is). Raises InvalidArgument (sizes, duplicates),
        UnknownNamespace, NoSpace.
        """
        ns = self.namespace(namespace)
        self._validate_blocks(ns, blocks)
        now = self.clock()
        session = self.sessions.observe_store(
            namespace, session_id, [b.hash for b in blocks], now, last_partial, blocks[0].parent
        )
        self._sync_sessions()
        return self._grant_store(ns, blocks, now, session, lease_seconds)

    def _grant_store(
        self, ns: Namespace, blocks: Sequence[BlockSpec], now: float, session: Session, lease_seconds: float
    ) -> StoreGrant | Wait:
        namespace = ns.name
        # The chain this store continues, when every block of it is held now.
        parent = blocks[0].parent if self._reaches_a_root(ns, blocks[0].parent) else None
        # Refuse a store that cannot fit before evicting anything for it: evicting block by
        # block and failing on the last one would empty the tier for nothing.
        top = self.top
        dram = self.spaces[top]
        new = sum(1 for s in blocks if not ((r := ns.blocks.get(s.hash)) is not None and r.copies))
        need = new * dram.slot_bytes(ns.block_bytes)
        if need > dram.capacity_bytes:
            label = top.upper()
            raise NoSpace(f"the store needs {need} bytes of {label}; the {label} tier holds {dram.capacity_bytes}")
        if need and not self._may_fit(top, need):
            if self._may_fit(top, need, landing=True):
                # Transfers into the tier (prefetches) will land as copies that can go:
                # wait for them, evicting nothing meanwhile (slots freed now would only
                # take the mover's next prefetches, and the wait would start over).
                return Wait(0)
            raise NoSpace(
                f"no room for {len(blocks)} blocks of {blocks[0].nbytes} bytes: the {top.upper()} tier is "
                "smaller, or full of blocks protected by leases or pins"
            )
        items: list[tuple[BlockRecord, Copy] | None] = []
        # Free space first, in one allocator pass (all blocks of a namespace have one size).
        free = dram.allocate_many(ns.block_bytes, new)
        if len(free) < new:
            # One pass over the victims for the whole shortfall, not one per block.
            pending = self._evict_bytes(top, (new - len(free)) * dram.slot_bytes(ns.block_bytes))
            free += dram.allocate_many(ns.block_bytes, new - len(free))
            if parent is not None and not self._reaches_a_root(ns, parent):
                self._free_all(top, free)  # making the room cut the chain this store continues
                return self._grant_no_writes(ns, blocks, now, session, lease_seconds)
            if pending and len(free) < new:
                self._free_all(top, free)
                return Wait(pending)
        free_slots = iter(free)
        for spec in blocks:
            record = ns.blocks.get(spec.hash)
            if record is not None and record.copies:
                items.append(None)  # held, or being written under another lease
                continue
            room = next(free_slots, None) or self._make_room(top, spec.nbytes)
            if not isinstance(room, Slot):
                self._undo_store_items(ns, items)
                if isinstance(room, Wait):
                    return room
                raise NoSpace(
                    f"no room for {len(blocks)} blocks of {spec.nbytes} bytes: every tier is full "
                    "of blocks protected by leases"
                )
            record = BlockRecord(namespace, spec.hash, spec.parent, spec.nbytes)
            copy = Copy(room)
            record.copies[top] = copy
            ns.add(record)
            items.append((record, copy))
        held = {spec.hash for spec, item in zip(blocks, items) if item is None}
        if parent is not None:
            held.add(parent)
        lease = StoreLease(
            self._new_lease_id("s"), namespace, now + self._lease_s(lease_seconds), session.id, items, frozenset(held)
        )
        self._store_leases[lease.id] = lease
        return StoreGrant(lease.id, lease.expires_at, [i[1].slot if i else None for i in items])

    def _grant_no_writes(
        self, ns: Namespace, blocks: Sequence[BlockSpec], now: float, session: Session, lease_seconds: float
    ) -> StoreGrant:
        """A lease that writes nothing, for a store whose room-making cut the chain it
        continues: no lookup could reach its blocks (a lookup stops at the first missing
        one), and the engine that stores the chain again from the cut writes them then."""
        lease = StoreLease(
            self._new_lease_id("s"), ns.name, now + self._lease_s(lease_seconds), session.id, [None] * len(blocks)
        )
        self._store_leases[lease.id] = lease
        return StoreGrant(lease.id, lease.expires_at, [None] * len(blocks))

    def commit_store(self, lease_id: str, failed: Iterable[int] = (), abort: bool = False) -> int:
        """Phase 2: make the written blocks visible; discard ``failed`` ones, and the blocks
        of this lease that follow a discarded one in the chain, or a block that was held
        when the store was granted and is gone now (no lookup could reach them: an
        eviction, perhaps one that made this store's room, cut the chain).
        Returns how many were committed."""
        lease = self._store_leases.get(lease_id)
        if lease is None:
            raise UnknownLease(f"store lease {lease_id!r} is unknown or expired")
        failed = set(failed)
        bad = [i for i in failed if not 0 <= i < len(lease.items)]
        if bad:
            raise InvalidArgument(f"failed indexes {bad} are outside the lease's {len(lease.items)} blocks")
        del self._store_leases[lease_id]
        ns = self._namespaces[lease.namespace]
        now = self.clock()
        committed: list[BlockRecord] = []
        written = [(i, item[0], item[1]) for i, item in enumerate(lease.items) if item is not None]
        # Discard before anything becomes readable, whatever order the blocks came in: a
        # discard drops its held descendants, and none of this lease's may be readable yet.
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
        while stack:  # and every block of the lease behind a discarded one
            for h in below.get(stack.pop(), ()):
                if h not in cut:
                    cut.add(h)
                    stack.append(h)
        for _, record, copy in written:
            if record.hash in cut:
                self._drop_copy(ns, record, self.top, copy, reason=None)
        for _, record, copy in written:
            if record.hash in cut:
                continue
            copy.ready = True
            ns.refresh(record)
            committed.append(record)
            self.events.stored(ns.name, record.hash, record.parent, self.top, record.nbytes, now, lease.session_id)
            if self._writes_behind:
                self._write_behind.append(record)
        self.policy.on_stored(self.top, [r.key for r in committed], now)
        if committed:
            # The prefix this store extends was used too, and must stay more recent than
            # its new tail (a held prefix stays a prefix).
            ancestors = self._ancestors(ns, committed[0])
            if ancestors:
                self.policy.on_accessed(ancestors, now)
        self._sweep_orphans()
        return len(committed)

    # -- load -----------------------------------------------------------------------------
    def prepare_load(self, namespace: str, hashes: Sequence[int], lease_seconds: float = 0) -> LoadGrant | Wait:
        """Phase 1: pin a DRAM copy of each held block, planning promotions from NVMe.

        The caller runs ``promotions`` (and reports each with complete_transfer) before it
        reads ``load_slots``. Raises InvalidArgument, UnknownNamespace, NoSpace.
        """
        ns = self.namespace(namespace)
        if len(hashes) > self.config.max_batch_blocks:
            raise InvalidArgument(f"at most {self.config.max_batch_blocks} hashes per load")
        first = ns.blocks.get(hashes[0]) if hashes else None
        with self._keeping(ns, hashes, first.parent if first is not None else None):
            return self._grant_load(ns, hashes, lease_seconds)

    def _grant_load(self, ns: Namespace, hashes: Sequence[int], lease_seconds: float) -> LoadGrant | Wait:
        namespace = ns.name
        now = self.clock()
        room = self._room_for_promotions(ns, hashes)
        if isinstance(room, Wait):
            return room
        free_slots = iter(room)
        items: list[tuple[BlockRecord, Copy] | None] = []
        promotions: list[Transfer] = []
        awaiting: list[Transfer] = []
        found: list[str | None] = []
        for h in hashes:
            record = ns.blocks.get(h)
            tier = record.fastest_ready() if record is not None else None
            if record is None or tier is None:
                items.append(None)
                found.append(None)
                continue
            dram = record.copies.get(self.top)
            if dram is not None and dram.ready:
                dram.readers += 1
                items.append((record, dram))
                found.append(tier)
                continue
            if dram is not None:
                promotion = self._promoting.get(id(dram))
                if promotion is None:  # a store is writing it: not readable yet
                    items.append(None)
                    found.append(None)
                    continue
                dram.readers += 1  # another load is promoting it: pin it and wait for that
                items.append((record, dram))
                found.append(tier)
                awaiting.append(promotion)
                continue
            room = next(free_slots, None) or self._make_room(self.top, record.nbytes)
            if isinstance(room, Slot):
                tier = record.fastest_ready() if ns.blocks.get(h) is record else None
                if tier is None:
                    # Making room dropped an ancestor's last copy, and this block as its orphan.
                    self.spaces[self.top].free(room)
                    items.append(None)
                    found.append(None)
                    continue
            else:
                self._undo_load_items(ns, items, promotions)
                self._free_all(self.top, free_slots)
                # The Wait may have been for this load's own promotions, undone just now:
                # retrying would find the same tier and undo them again.
                if isinstance(room, Wait) and (room.demotions or self._moving(self.top)):
                    return room
                raise NoSpace(
                    f"no {self.top.upper()} room to promote the blocks of a {len(hashes)}-block load: the "
                    f"{self.top.upper()} tier is smaller than the load, or the rest of it is leased"
                )
            dst = Copy(room, readers=1)  # pinned by this lease from the start
            promotion = self._start_transfer("promote", record, tier, self.top, dst)
            self._promoting[id(dst)] = promotion
            promotions.append(promotion)
            items.append((record, dst))
            found.append(tier)
        self._free_all(self.top, free_slots)  # a block dropped meanwhile needs none
        held = [item[0].key for item in items if item is not None]
        # A load may come in batches: touch the held ancestors of this batch as well, so
        # that the root of the chain stays the most recent.
        first = next((item[0] for item in items if item is not None), None)
        self.policy.on_accessed((self._ancestors(ns, first) if first is not None else []) + held, now)
        lease = LoadLease(self._new_lease_id("l"), namespace, now + self._lease_s(lease_seconds), items)
        self._load_leases[lease.id] = lease
        return LoadGrant(lease.id, lease.expires_at, promotions, awaiting, found)

    def _room_for_promotions(self, ns: Namespace, hashes: Sequence[int]) -> list[Slot] | Wait:
        """Top-tier slots for the blocks of a load held only below it, made in one pass over
        the victims for the whole shortfall, as a store does: asked block by block, each
        Wait would plan one block's demotions, and a long load from below took a mover
        round per block (the replay's loads gave up after 64 of them). While the victims
        are picked, every copy of the load's blocks is pinned: the room is not made by
        evicting the blocks it is for. Wait when the demotions must land first; fewer slots
        than promotions when the rest cannot be made now (the caller asks block by block)."""
        top = self.top
        records = {}
        for h in hashes:
            record = ns.blocks.get(h)
            if record is not None and top not in record.copies and record.fastest_ready() is not None:
                records[h] = record
        if not records:
            return []
        space = self.spaces[top]
        free = space.allocate_many(ns.block_bytes, len(records))
        if len(free) == len(records):
            return free
        pins = [copy for h in hashes if (r := ns.blocks.get(h)) is not None for copy in r.copies.values()]
        for copy in pins:
            copy.readers += 1
        try:
            pending = self._evict_bytes(top, (len(records) - len(free)) * space.slot_bytes(ns.block_bytes))
        finally:
            for copy in pins:
                copy.readers -= 1
        free += space.allocate_many(ns.block_bytes, len(records) - len(free))
        if pending and len(free) < len(records):
            self._free_all(top, free)
            return Wait(pending)
        return free

    def _free_all(self, tier: str, slots: Iterable[Slot]) -> None:
        for slot in slots:
            self.spaces[tier].free(slot)

    def load_slots(self, lease_id: str) -> list[tuple[Slot, int] | None]:
        """(DRAM slot, nbytes) per hash of a load lease; None where the block is not held."""
        lease = self._load_leases.get(lease_id)
        if lease is None:
            raise UnknownLease(f"load lease {lease_id!r} is unknown or expired")
        out: list[tuple[Slot, int] | None] = []
        for item in lease.items:
            if item is None:
                out.append(None)
                continue
            record, copy = item
            live = record.copies.get(self.top) is copy and copy.ready
            out.append((copy.slot, record.nbytes) if live else None)
        return out

    def complete_load(self, lease_id: str) -> None:
        """Phase 2: the client has read the slots; unpin them."""
        lease = self._load_leases.pop(lease_id, None)
        if lease is None:
            raise UnknownLease(f"load lease {lease_id!r} is unknown or expired")
        for item in lease.items:
            if item is not None:
                item[1].readers -= 1
        self._sweep_orphans()

    # -- sessions -------------------------------------------------------------------------
    def session_event(
        self,
        namespace: str,
        session_id: str,
        kind: str,
        hashes: Sequence[int] = (),
        tool: str | None = None,
        expected_s: float | None = None,
        last_partial: bool = False,
    ) -> Session:
        """Apply one session event (``SESSION_EVENTS``): turn_start (with the prompt's
        chained hashes), turn_end, tool_pause (tool, optional expected seconds),
        tool_resume, session_end. Raises InvalidArgument, UnknownNamespace,
        UnknownSession, SessionStateError."""
        self.namespace(namespace)
        if not session_id:
            raise InvalidArgument("a session event needs a session id")
        if len(hashes) > self.config.max_lookup_hashes:
            raise InvalidArgument(f"at most {self.config.max_lookup_hashes} hashes per turn")
        now = self.clock()
        table = self.sessions
        if kind == "turn_start":
            session = table.turn_start(namespace, session_id, hashes, now, last_partial)
        elif kind == "turn_end":
            session = table.turn_end(namespace, session_id, now)
        elif kind == "tool_pause":
            session = table.tool_pause(namespace, session_id, tool or "", expected_s, now)
        elif kind == "tool_resume":
            session = table.tool_resume(namespace, session_id, now)
        elif kind == "session_end":
            session = table.end(namespace, session_id, now)
        else:
            raise InvalidArgument(f"unknown session event {kind!r}; known: {', '.join(SESSION_EVENTS)}")
        self._sync_sessions()
        return session

    def _sync_sessions(self) -> None:
        """Hand the session table's news to the policy and the event log."""
        table = self.sessions
        changed = table.take_changes()
        observations = table.take_observations()
        reclassified = table.take_reclassified()
        if not (changed or observations or reclassified):
            return
        now = self.clock()
        self.policy.on_sessions(changed, observations, reclassified, now)
        for session in dict.fromkeys(changed):
            if session.last_reported != (session.state, session.tool):
                session.last_reported = (session.state, session.tool)
                self.events.session_changed(session.namespace, session.id, session.state, session.tool, now)

    def plan_prefetch(self, max_blocks: int) -> list[Transfer]:
        """Up to ``max_blocks`` transfers moving blocks the policy expects to be needed soon
        one tier up (to the top tier from the next one, and so on). Room is made only from
        copies the policy values less than what is due: they are dropped, or demoted (then
        the prefetch follows in a later round, once the demotion landed)."""
        out: list[Transfer] = []
        now = self.clock()
        for upper, lower in zip(self.tiers, self.tiers[1:]):
            due = []
            seen: set[tuple[str, int]] = set()
            for key in self.policy.prefetches(upper, now):
                record = self._record(key)
                src = record.copies.get(lower) if record is not None else None
                # A block several sessions share may be named once for each of them: one
                # transfer, one slot (a second would replace the first's copy and leak it).
                if record is None or key in seen or upper in record.copies or src is None or not src.ready:
                    continue
                seen.add(key)
                due.append((key, record))
                if len(due) >= max_blocks - len(out):
                    break
            if not due:
                continue
            space = self.spaces[upper]
            need = sum(space.slot_bytes(record.nbytes) for _, record in due)
            if space.capacity_bytes - space.used_bytes < need:
                self._make_way(upper, due, now)
            # All or nothing: a part of what is due, squeezed in, is pushed out again by the
            # next store before it is used (churn, not a prefetch).
            if space.capacity_bytes - space.used_bytes >= need:
                self._prefetch_into(upper, lower, due, out)
            if len(out) >= max_blocks:
                break
        return out

    def _prefetch_into(self, upper: str, lower: str, due: list, out: list[Transfer]) -> list:
        """Start the prefetches of ``due`` that free space allows; returns the rest."""
        space = self.spaces[upper]
        due = [
            (key, record)
            for key, record in due
            # Making way may have evicted a source below, or the block itself.
            if self._record(key) is record
            and upper not in record.copies
            and (src := record.copies.get(lower)) is not None
            and src.ready
        ]
        for i, (_, record) in enumerate(due):
            slot = space.allocate(record.nbytes)
            if slot is None:
                return due[i:]
            transfer = self._start_transfer("prefetch", record, lower, upper, Copy(slot))
            self._promoting[id(transfer.dst)] = transfer  # a load meanwhile waits for it
            out.append(transfer)
        return []

    def _make_way(self, tier: str, due: list, now: float) -> None:
        """Evict copies from ``tier`` that the policy values below every block in ``due``,
        enough for them (fewer if too few are worth less): dropped when held below or not
        worth keeping, demoted when the tier below has free room, else left."""
        # Only worthless copies (priority <= 0) make way: a prefetch is a guess about the
        # future and must not push out blocks the policy still values.
        want = min(0.0, min(self.policy.priority(key, tier, now) for key, _ in due) - 1e-12)
        space = self.spaces[tier]
        need = sum(space.slot_bytes(record.nbytes) for _, record in due)
        lower = self._lower(tier)
        for record, copy in self._pick_victims(tier, need, now, max_priority=want):
            if record.copies.get(tier) is not copy:
                continue  # orphaned by an earlier drop: gone already
            ns = self._namespaces[record.namespace]
            below = record.copies.get(lower) if lower else None
            if lower is None or (below is not None and below.ready) or not self.policy.worth_demoting(record.key, tier, now):
                self._drop_copy(ns, record, tier, copy, reason="evicted", cause="prefetch")
            elif below is None and (slot := self.spaces[lower].allocate(record.nbytes)) is not None:
                # Down into free space only: a prefetch never pushes anything out of the
                # tiers below (that would drop blocks nobody weighed against it).
                self._demotions.append(self._start_transfer("demote", record, tier, lower, Copy(slot), "prefetch"))

    # -- leases ---------------------------------------------------------------------------
    def expire_leases(self) -> int:
        """Abort store leases and release load leases whose time is up. Returns how many.

        The slots of an expired store lease are quarantined for another lease period
        before reuse: a client that stalled mid-copy and resumes late then writes into
        space nobody owns, not into another block.
        """
        now = self.clock()
        expired = 0
        for lease_id in [i for i, lease in self._store_leases.items() if lease.expires_at <= now]:
            lease = self._store_leases.pop(lease_id)
            ns = self._namespaces[lease.namespace]
            for item in lease.items:
                if item is not None:
                    record, copy = item
                    del record.copies[self.top]
                    if not record.copies:
                        ns.remove(record)
                        if record.hash in ns.children:  # held orphans its store would have reconnected
                            self._drop_orphans(ns, record.hash)
                    self._quarantine.append((now + self.config.lease_seconds, copy.slot))
            expired += 1
        for lease_id in [i for i, lease in self._load_leases.items() if lease.expires_at <= now]:
            self.complete_load(lease_id)
            expired += 1
        while self._quarantine and self._quarantine[0][0] <= now:
            self.spaces[self.top].free(self._quarantine.popleft()[1])
        if self.sessions.expire(now):
            self._sync_sessions()
        self._sweep_orphans()
        return expired

    def lease_alive(self, lease_id: str) -> bool:
        """Whether a store or load lease exists and its time is not up (on the core's clock)."""
        lease = self._store_leases.get(lease_id) or self._load_leases.get(lease_id)
        return lease is not None and lease.expires_at > self.clock()

    @property
    def lease_count(self) -> int:
        return len(self._store_leases) + len(self._load_leases)

    # -- the mover's plan -----------------------------------------------------------------
    def take_demotions(self) -> list[Transfer]:
        """Demotions planned to make room; the mover runs them first."""
        out = list(self._demotions)
        self._demotions.clear()
        return out

    @property
    def _writes_behind(self) -> bool:
        # With an HBM tier on top, blocks reach NVMe by demotion through DRAM instead; a
        # drain writes them down from whichever tier above NVMe holds them.
        if "nvme" not in self.spaces:
            return False
        return self._draining or (self.config.write_behind and self.top == "dram")

    def _above_nvme(self, record: BlockRecord) -> tuple[str, Copy] | None:
        """The fastest ready copy of ``record`` above NVMe (tier, copy), or None."""
        for tier in self.tiers:
            if tier == "nvme":
                break
            copy = record.copies.get(tier)
            if copy is not None and copy.ready:
                return tier, copy
        return None

    def plan_write_behind(self, max_blocks: int) -> list[Transfer]:
        """Up to ``max_blocks`` transfers copying committed blocks down to NVMe from DRAM
        (from HBM, for a drain, where HBM holds the only copy) — not those the policy
        would not keep below (ephemeral ones)."""
        out: list[Transfer] = []
        if "nvme" not in self.spaces:
            self._write_behind.clear()
            return out
        now = self.clock()
        while self._write_behind and len(out) < max_blocks:
            record = self._write_behind[0]
            source = self._above_nvme(record)
            ns = self._namespaces.get(record.namespace)
            if (
                source is None
                or "nvme" in record.copies
                or ns is None
                or ns.blocks.get(record.hash) is not record
                or not self.policy.worth_demoting(record.key, source[0], now)
            ):
                self._write_behind.popleft()  # evicted, already down, replaced, or not worth it
                continue
            room = self._make_room("nvme", record.nbytes)
            if not isinstance(room, Slot):
                break  # NVMe is full of blocks in flight; try again after they land
            self._write_behind.popleft()
            source = self._above_nvme(record) if ns.blocks.get(record.hash) is record else None
            if source is None:  # making room dropped its ancestor, and it went as an orphan
                self.spaces["nvme"].free(room)
                continue
            out.append(self._start_transfer("write_behind", record, source[0], "nvme", Copy(room)))
        return out

    def complete_transfer(self, transfer: Transfer, outcome: Outcome = Outcome.OK) -> None:
        """The mover ran ``transfer``: on success the destination copy becomes readable; a
        corrupt source's copy is dropped too."""
        ok, corrupt = outcome is Outcome.OK, outcome is Outcome.CORRUPT
        if self._inflight.pop(transfer.id, None) is None:
            raise ValueError(f"transfer {transfer.id} is not in flight")
        self._promoting.pop(id(transfer.dst), None)
        record, now = transfer.record, self.clock()
        ns = self._namespaces[record.namespace]
        transfer.src.readers -= 1
        if ok:
            transfer.dst.ready = True
            ns.refresh(record)
            self.events.stored(ns.name, record.hash, record.parent, transfer.dst_tier, record.nbytes, now)
            self.policy.on_stored(transfer.dst_tier, [record.key], now)
            # A load may have pinned the source while it moved down: then it stays, a
            # readable copy like any other, and a later eviction drops it for free.
            if transfer.kind == "demote" and not transfer.src.readers:
                self._drop_copy(ns, record, transfer.src_tier, transfer.src, reason="demoted", cause=transfer.cause)
            self._sweep_orphans()
            return
        # A failed promotion's copy goes away with the load leases' pins still counted on
        # it; their completion then unpins an orphan, which is harmless.
        self._drop_copy(ns, record, transfer.dst_tier, transfer.dst, reason=None)
        if corrupt:
            # A load may pin the corrupt copy, its client reading the slot right now: no
            # lookup finds the block any more, but the slot is quarantined for a lease
            # period instead of handed to the next store (as an expired store's are).
            pinned = transfer.src_tier == self.top and transfer.src.readers > 0
            self._drop_copy(ns, record, transfer.src_tier, transfer.src, reason="corrupt", quarantine=pinned)
        elif transfer.kind not in ("promote", "prefetch") and "nvme" in self.spaces and self._lower(transfer.src_tier):
            self._write_behind.append(record)  # a failed write down is tried again later
        self._sweep_orphans()

    def is_inflight(self, transfer: Transfer) -> bool:
        return transfer.id in self._inflight

    @property
    def write_behind_pending(self) -> int:
        """Blocks queued or in flight for write-behind (may count a since-evicted one)."""
        inflight = sum(1 for t in self._inflight.values() if t.kind == "write_behind")
        return len(self._write_behind) + inflight

    @property
    def has_planned_work(self) -> bool:
        return bool(self._demotions or self._write_behind)

    # -- warm restart ---------------------------------------------------------------------
    def restore_block(self, namespace: str, h: int, parent: int | None, nbytes: int, tier: str, slot: Slot) -> None:
        """Re-enter a block recovered from a persistent tier; ``slot`` is already allocated."""
        ns = self.namespace(namespace)
        if h in ns.blocks:
            raise ValueError(f"block {h} of {namespace!r} restored twice")
        record = BlockRecord(namespace, h, parent, nbytes)
        record.copies[tier] = Copy(slot, ready=True)
        ns.add(record)
        ns.refresh(record)
        now = self.clock()
        self.events.stored(namespace, h, parent, tier, nbytes, now)
        self.policy.on_stored(tier, [record.key], now)

    # -- introspection --------------------------------------------------------------------
    def take_events(self) -> list[Event]:
        return self.events.take()

    def retention_class(self, key: tuple[str, int], tier: str) -> str | None:
        """The retention class of ``key``'s copy in ``tier``: ``pinned`` while an operator's
        pin holds it (:meth:`pin`), else as the policy sees it (None: not held there, or the
        policy keeps no classes). Changes nothing."""
        if key in self._pinned:
            record = self._record(key)
            copy = record.copies.get(tier) if record is not None else None
            if copy is not None and copy.ready:
                return "pinned"
        return self.policy.retention_class(key, tier)

    def blocks(self, namespace: str | None = None) -> Iterable[BlockRecord]:
        names = [namespace] if namespace else sorted(self._namespaces)
        for name in names:
            yield from self.namespace(name).blocks.values()

    def stats(self) -> CoreStats:
        counts = {t: 0 for t in self.tiers}
        per_ns = []
        for ns in self._namespaces.values():
            held = 0
            for record in ns.blocks.values():
                for tier in record.ready_tiers():
                    counts[tier] += 1
                held += 1 if record.fastest_ready() else 0
            per_ns.append((ns, held))
        tiers = [
            TierUsage(t, self.spaces[t].capacity_bytes, self.spaces[t].used_bytes, counts[t]) for t in self.tiers
        ]
        return CoreStats(tiers, sorted(per_ns, key=lambda p: p[0].name), self.lease_count, self.write_behind_pending)

    def check(self) -> list[str]:
        """Invariant violations of the catalog, leases and policy; empty when healthy."""
        problems: list[str] = []
        used = {t: 0 for t in self.tiers}
        seen: dict[str, set[int]] = {t: set() for t in self.tiers}
        readers: dict[int, int] = {}
        held: dict[str, set[tuple[str, int]]] = {t: set() for t in self.tiers}
        for ns in self._namespaces.values():
            for h, record in ns.blocks.items():
                if record.hash != h or record.namespace != ns.name:
                    problems.append(f"{ns.name}/{h}: filed under the wrong key")
                if not record.copies:
                    problems.append(f"{ns.name}/{h}: a block without copies")
                for tier, copy in record.copies.items():
                    if tier not in self.spaces:
                        problems.append(f"{ns.name}/{h}: copy in absent tier {tier}")
                        continue
                    if not self.spaces[tier].is_allocated(copy.slot):
                        problems.append(f"{ns.name}/{h}: {tier} slot {copy.slot} is not allocated")
                    if copy.slot.offset in seen[tier]:
                        problems.append(f"{ns.name}/{h}: {tier} slot {copy.slot} is shared")
                    seen[tier].add(copy.slot.offset)
                    used[tier] += copy.slot.length
                    readers[id(copy)] = copy.readers
                    if copy.readers < 0:
                        problems.append(f"{ns.name}/{h}: {tier} copy has {copy.readers} readers")
                    if copy.ready:
                        held[tier].add(record.key)
                fastest = record.fastest_ready()
                expect = TIER_CODES[fastest] if fastest else None
                if ns.visible.get(h) != expect:
                    problems.append(f"{ns.name}/{h}: visible as {ns.visible.get(h)}, fastest ready is {expect}")
            stray = set(ns.visible) - set(ns.blocks)
            if stray:
                problems.append(f"{ns.name}: {len(stray)} visible hashes without a block")
            children: dict[int, set[int]] = {}
            for record in ns.blocks.values():
                if record.parent is not None:
                    children.setdefault(record.parent, set()).add(record.hash)
            if children != ns.children:
                problems.append(f"{ns.name}: the children index disagrees with the blocks' parents")
            shadowed = {tier: {h for h, r in ns.blocks.items() if tier in r.ready_tiers()[1:]} for tier in self.tiers}
            if any(shadowed[tier] != set(ns.shadowed.get(tier, ())) for tier in self.tiers):
                problems.append(f"{ns.name}: the copies filed as shadowed are not those a faster tier shadows")
        for _, slot in self._quarantine:
            used[self.top] += slot.length
            if not self.spaces[self.top].is_allocated(slot):
                problems.append(f"quarantined {self.top} slot {slot} is not allocated")
        for tier in self.tiers:
            if used[tier] != self.spaces[tier].used_bytes:
                problems.append(f"{tier}: copies hold {used[tier]} bytes, the space says {self.spaces[tier].used_bytes}")
        expected: dict[int, int] = {}
        for lease in self._load_leases.values():
            for item in lease.items:
                if item is None:
                    continue
                if item[0].copies.get(self.top) is item[1]:
                    expected[id(item[1])] = expected.get(id(item[1]), 0) + 1
                elif item[1].ready:
                    problems.append(f"load lease {lease.id}: a pinned, readable copy was freed")
        for transfer in self._inflight.values():
            expected[id(transfer.src)] = expected.get(id(transfer.src), 0) + 1
            if transfer.record.copies.get(transfer.dst_tier) is not transfer.dst:
                problems.append(f"transfer {transfer.id}: its destination copy is gone")
        for copy_id, transfer in self._promoting.items():
            # A stale entry outlives its copy, and a later copy that reuses the id would
            # make a load wait on a promotion that never lands.
            if self._inflight.get(transfer.id) is not transfer or id(transfer.dst) != copy_id:
                problems.append(f"promotion {transfer.id}: filed as in flight, but it is not")
        for copy_id, count in readers.items():
            if expected.get(copy_id, 0) != count:
                problems.append(f"a copy has {count} readers, leases and transfers account for {expected.get(copy_id, 0)}")
        live = {(ns.name, h) for ns in self._namespaces.values() for h in ns.blocks}
        if self._pinned - live:
            problems.append(f"{len(self._pinned - live)} pinned keys name no held block")
        problems += self.policy.check(held)
        problems += self.sessions.check()
        return problems

    # -- internals ------------------------------------------------------------------------
    def _check_hash_count(self, hashes: Sequence[int]) -> None:
        if not hashes:
            raise InvalidArgument("no hashes given")
        if len(hashes) > self.config.max_lookup_hashes:
            raise InvalidArgument(f"at most {self.config.max_lookup_hashes} hashes per call")

    def _validate_blocks(self, ns: Namespace, blocks: Sequence[BlockSpec]) -> None:
        if not blocks:
            raise InvalidArgument("no blocks given")
        if len(blocks) > self.config.max_batch_blocks:
            raise InvalidArgument(f"at most {self.config.max_batch_blocks} blocks per store")
        seen: set[int] = set()
        for i, spec in enumerate(blocks):
            if spec.nbytes != ns.block_bytes:
                raise InvalidArgument(
                    f"block {i} has {spec.nbytes} bytes; namespace {ns.name!r} stores blocks of {ns.block_bytes}"
                )
            if not 0 <= spec.hash <= MAX_UINT64:
                raise InvalidArgument(f"block {i}: hash {spec.hash} is not a 64-bit unsigned integer")
            if spec.hash in seen:
                raise InvalidArgument(f"block {i}: hash {spec.hash} appears twice")
            if spec.parent == spec.hash:
                raise InvalidArgument(f"block {i}: a block cannot be its own parent")
            seen.add(spec.hash)

    def _lease_s(self, requested: float) -> float:
        if requested < 0:
            raise InvalidArgument("lease_seconds must not be negative")
        return min(requested or self.config.lease_seconds, self.config.max_lease_seconds)

    def _new_lease_id(self, kind: str) -> str:
        return f"{self._lease_prefix}{kind}{next(self._lease_ids)}"

    def _start_transfer(
        self, kind: str, record: BlockRecord, src_tier: str, dst_tier: str, dst: Copy, cause: str | None = None
    ) -> Transfer:
        src = record.copies[src_tier]
        src.readers += 1
        record.copies[dst_tier] = dst
        transfer = Transfer(next(self._transfer_ids), kind, record, src_tier, src, dst_tier, dst, cause)
        self._inflight[transfer.id] = transfer
        return transfer

    def _lower(self, tier: str) -> str | None:
        i = self.tiers.index(tier)
        return self.tiers[i + 1] if i + 1 < len(self.tiers) else None

    def _may_fit(self, tier: str, nbytes: int, landing: bool = False) -> bool:
        """Whether free space plus the ready copies that no load lease and no operator pins
        reach ``nbytes`` (copies read by a transfer count: they are free to go once it
        lands); with ``landing``, also the copies transfers are writing into ``tier`` for no
        lease and no pin (prefetches, demotions: evictable once they land). Evicts nothing.

        Counted from what cannot go — copies being written (stores, transfers), copies a
        load or an operator pins, quarantined slots — so it costs O(leases + transfers +
        pins), not a walk over the policy's victims: a full tier asks this on every store.
        """
        space = self.spaces[tier]
        room = space.capacity_bytes - space.used_bytes
        if room >= nbytes:
            return True
        stuck: dict[int, int] = {}  # id(copy in tier that cannot go now) -> its bytes
        if tier == self.top:
            for leases in (self._store_leases, self._load_leases):
                for lease in leases.values():
                    for item in lease.items:
                        if item is not None and item[0].copies.get(tier) is item[1]:
                            stuck[id(item[1])] = item[1].slot.length
            room -= sum(slot.length for _, slot in self._quarantine)
        for key in self._pinned:
            record = self._record(key)
            copy = record.copies.get(tier) if record is not None else None
            if copy is not None:
                stuck[id(copy)] = copy.slot.length
        landed = 0
        for transfer in self._inflight.values():
            if transfer.dst_tier == tier:
                stuck[id(transfer.dst)] = transfer.dst.slot.length
                if landing and not transfer.dst.readers and transfer.record.key not in self._pinned:
                    landed += transfer.dst.slot.length
        return room + space.used_bytes - sum(stuck.values()) + landed >= nbytes

    def _evict_bytes(self, tier: str, need: int) -> int:
        """Evict at least ``need`` bytes of ``tier`` in one pass over the policy's victims
        (fewer when too few can go): drop, or plan demotions. Returns the bytes that planned
        demotions will free once the mover ran them."""
        lower = self._lower(tier)
        now = self.clock()
        pending = 0
        for record, copy in self._pick_victims(tier, need, now):
            pending += self._evict(tier, lower, record, copy, now)
        return pending

    def _pick_victims(
        self, tier: str, need: int, now: float, max_priority: float | None = None
    ) -> list[tuple[BlockRecord, Copy]]:
        """The policy's first evictable copies in ``tier`` adding up to ``need`` bytes (all
        there are, when fewer), stopping at the first worth more than ``max_priority``.

        A victim that would be dropped — the last copy of a block, in the last tier or not
        worth demoting — whose descendants are held (in any tier) goes only when the rest
        cannot make the room: a lookup stops at the first missing block, and a load promotes
        a long chain head first, so a small top tier pushes the head down before its tail,
        and the last tier dropped it while the tail sat above, unreachable. The policy's
        order is kept otherwise (a demotion loses nothing).

        When the eviction would end in a drop (every tier from here down is full), the
        copies a faster tier shadows go before any of the policy's victims (a lookup never
        reads them): a load promotes a copy and leaves the one below in place, and under
        pressure those duplicates made the last tier drop blocks held nowhere else. While a
        tier below has room, the policy's order stands: its victims go down losing nothing,
        and the shadowed copies save a write when their block leaves the tier above. NVMe
        copies made by write-behind are never taken first: they are the durable copies."""
        last_tier = self._lower(tier) is None
        victims = []
        heads = []
        kept: list[tuple[BlockRecord, Copy]] = []
        leaving: dict[tuple[str, int], int] = {}  # parent key -> its children among the victims
        room = 0
        if not (tier == "nvme" and self._writes_behind) and self._full_from(tier):
            for ns in self._namespaces.values():
                for h in ns.shadowed.get(tier, ()):
                    record = ns.blocks[h]
                    copy = record.copies[tier]
                    if copy.readers or record.key in self._pinned:
                        continue
                    victims.append((record, copy))
                    room += copy.slot.length
                    if room >= need:
                        return victims
        for key in self.policy.victims(tier, now):
            record = self._record(key)
            copy = record.copies.get(tier) if record is not None else None
            if record is None or copy is None or not copy.ready or copy.readers or key in self._pinned:
                continue
            if max_priority is not None and self.policy.priority(key, tier, now) > max_priority:
                break
            if len(record.copies) == 1 and (last_tier or not self.policy.worth_demoting(key, tier, now)):
                if key in self._kept_chain:
                    # The chain a load in progress reads: in the tier it loads into, dropped
                    # last of all (or the load could not be served); below, never — its room
                    # is made another way, or the block moving down is dropped instead.
                    if tier == self.top:
                        kept.append((record, copy))
                    continue
                held = len(self._namespaces[record.namespace].children.get(record.hash, ()))
                if held > leaving.get(key, 0):
                    heads.append((record, copy))
                    continue
                if record.parent is not None:
                    parent = (record.namespace, record.parent)
                    leaving[parent] = leaving.get(parent, 0) + 1
            victims.append((record, copy))
            room += copy.slot.length
            if room >= need:
                return victims
        for record, copy in heads + kept:
            if room >= need:
                break
            victims.append((record, copy))
            room += copy.slot.length
        return victims

    def _evict(self, tier: str, lower: str | None, record: BlockRecord, copy: Copy, now: float) -> int:
        """Drop ``copy`` or plan its demotion; returns the bytes a planned demotion frees later."""
        if record.copies.get(tier) is not copy:
            return 0  # a victim picked before an earlier drop orphaned it: gone already
        ns = self._namespaces[record.namespace]
        below = record.copies.get(lower) if lower else None
        if (
            lower is None
            or (below is not None and below.ready)
            or self._held_above(record, tier)
            or (below is None and not self.policy.worth_demoting(record.key, tier, now))
            or (below is None and self._outranked_below(record, lower, now))
        ):
            self._drop_copy(ns, record, tier, copy, reason="evicted", cause="capacity")
            return 0
        dst_room = self._make_room(lower, record.nbytes) if below is None else None
        if record.copies.get(tier) is not copy:
            # Making room below dropped an ancestor's last copy, and this orphan with it.
            if isinstance(dst_room, Slot):
                self.spaces[lower].free(dst_room)
            return 0
        if isinstance(dst_room, Slot):
            self._demotions.append(self._start_transfer("demote", record, tier, lower, Copy(dst_room), "capacity"))
            return copy.slot.length
        if isinstance(dst_room, Wait):
            return copy.slot.length
        self._drop_copy(ns, record, tier, copy, reason="evicted", cause="capacity")  # nothing below can take it
        return 0

    def _outranked_below(self, record: BlockRecord, lower: str, now: float) -> bool:
        """Whether demoting ``record`` into ``lower`` would only make the last tier drop a
        copy worth more than it: every tier from ``lower`` down is full, and each one's
        first victim (whose eviction would push the chain on) outranks ``record`` there.
        Then the hierarchy drops its least valuable copy, as one tier of the same total
        would, rather than the least valuable of its last tier. Only for a policy whose
        priorities rank a block in a tier that does not hold it (``values_across_tiers``)."""
        if not self.policy.values_across_tiers or record.key in self._kept_chain:
            return False
        if not self.policy.roots_rank_first and self._namespaces[record.namespace].children.get(record.hash):
            return False  # a held chain's head stays reachable: its descendants may be worth more
        tier: str | None = lower
        while tier is not None:
            space = self.spaces[tier]
            if space.capacity_bytes - space.used_bytes >= space.slot_bytes(record.nbytes):
                return False  # the cascade ends in free room: nothing is lost
            victims = self._pick_victims(tier, 1, now)
            if not victims:
                return False
            victim, _ = victims[0]
            below = self._lower(tier)
            if below in victim.copies or (below is None and len(victim.copies) > 1) or self._held_above(victim, tier):
                return False  # it is dropped, and another tier holds it: nothing is lost
            if not self.policy.worth_demoting(victim.key, tier, now):
                return False  # it goes for nothing
            if self.policy.priority(record.key, tier, now) >= self.policy.priority(victim.key, tier, now):
                return False
            tier = below  # it would go down in turn (a copy above does not keep it here)
        return True

    def _full_from(self, tier: str) -> bool:
        """Whether every tier below ``tier`` lacks room for one more block (of the
        smallest slot any namespace uses): an eviction from ``tier`` ends in a drop."""
        below = self.tiers[self.tiers.index(tier) + 1 :]
        need = min((ns.block_bytes for ns in self._namespaces.values()), default=1)
        return all(
            self.spaces[t].capacity_bytes - self.spaces[t].used_bytes < self.spaces[t].slot_bytes(need) for t in below
        )

    def _held_above(self, record: BlockRecord, tier: str) -> bool:
        """Whether a tier faster than ``tier`` holds a ready copy of ``record``."""
        for t in self.tiers:
            if t == tier:
                return False
            copy = record.copies.get(t)
            if copy is not None and copy.ready:
                return True
        return False

    def _make_room(self, tier: str, nbytes: int) -> Slot | Wait | None:
        """A slot in ``tier``: free space, else evict (drop or plan demotions).

        Returns the slot, Wait when demotions were planned or copies are being read by
        transfers (retry after the mover), or None when every copy in the tier is protected.
        """
        space = self.spaces[tier]
        slot = space.allocate(nbytes)
        if slot is not None:
            return slot
        if space.slot_bytes(nbytes) > space.largest_region_bytes:
            return None  # evicting cannot help a block bigger than any region
        lower = self._lower(tier)
        now = self.clock()
        pending = 0  # bytes that planned demotions will free
        while True:
            if pending >= nbytes:
                return Wait(pending)
            victims = self._pick_victims(tier, nbytes - pending, now)
            if not victims:
                # Copies a transfer is reading (write-behind, demotion) or writing (a demotion
                # into this tier) are evictable once it lands: wait for the mover rather than
                # fail — a tier full of demotions under way can take more once they land.
                if pending or self._moving(tier):
                    return Wait(pending)
                return None
            for record, copy in victims:
                pending += self._evict(tier, lower, record, copy, now)
            slot = space.allocate(nbytes)
            if slot is not None:
                return slot

    def _moving(self, tier: str) -> bool:
        """Whether a transfer in flight reads or writes a copy in ``tier``."""
        return any(tier in (t.src_tier, t.dst_tier) for t in self._inflight.values())

    @contextmanager
    def _keeping(self, ns: Namespace, hashes: Sequence[int], parent: int | None) -> Iterator[None]:
        """While a load makes its room, keep a copy of every held block it names and of
        every held ancestor of the chain it reads (from ``parent``): dropping one would cut
        the chain and the load would find less than it came for. Such blocks may still
        move down; in the top tier they are dropped last, when nothing else makes the room.
        A store does not keep its chain this way (measured: in a tight hierarchy that
        pushed out other sessions' blocks worth more); a store whose room cut its chain
        writes nothing instead."""
        kept = {(ns.name, h) for h in hashes if h in ns.blocks}
        kept.update(record.key for record in self._chain_up(ns, parent))
        self._kept_chain = frozenset(kept)
        try:
            yield
        finally:
            self._kept_chain = frozenset()

    @staticmethod
    def _chain_up(ns: Namespace, h: int | None) -> Iterator[BlockRecord]:
        """The records of ``h`` and its ancestors, ``h`` first, while the catalog has them
        (ready or being written); stops at the first missing one, or at a cycle."""
        seen: set[int] = set()
        while h is not None and h not in seen and (record := ns.blocks.get(h)) is not None:
            seen.add(h)
            yield record
            h = record.parent

    def _reaches_a_root(self, ns: Namespace, h: int | None) -> bool:
        """Whether ``h`` and every ancestor of it are in the catalog (ready or being
        written): a lookup of a chain through ``h`` can reach ``h``. Walks the chain."""
        if h is None:
            return True
        last = deque(self._chain_up(ns, h), maxlen=1)
        return bool(last) and last[0].parent is None

    def _ancestors(self, ns: Namespace, record: BlockRecord) -> list[tuple[str, int]]:
        """Keys of ``record``'s held ancestors, root first (stops at the first one missing)."""
        out = []
        seen = {record.hash}
        parent = record.parent
        while parent is not None and parent not in seen:
            rec = ns.blocks.get(parent)
            if rec is None or rec.fastest_ready() is None:
                break
            out.append(rec.key)
            seen.add(parent)
            parent = rec.parent
        out.reverse()
        return out

    def _record(self, key: tuple[str, int]) -> BlockRecord | None:
        ns = self._namespaces.get(key[0])
        return ns.blocks.get(key[1]) if ns is not None else None

    def _drop_copy(
        self,
        ns: Namespace,
        record: BlockRecord,
        tier: str,
        copy: Copy,
        reason: str | None,
        cause: str | None = None,
        quarantine: bool = False,
    ) -> None:
        """Free one copy. ``reason`` None: the copy was never readable (no event); ``cause``:
        see :class:`~kvd.core.events.BlockRemoved`. ``quarantine`` (top tier only): the
        slot is freed a lease period from now, not now, and the copy reads as not ready to
        the leases that still hold it."""
        if record.copies.get(tier) is not copy:
            return
        retention_class = self.retention_class(record.key, tier) if copy.ready else None  # while held
        del record.copies[tier]
        if quarantine:
            self._quarantine.append((self.clock() + self.config.lease_seconds, copy.slot))
        else:
            self.spaces[tier].free(copy.slot)
        if copy.ready:
            self.policy.on_removed(tier, record.key)
            self.events.removed(
                ns.name, record.hash, tier, reason or "discarded", self.clock(), retention_class, cause
            )
            if quarantine:
                copy.ready = False  # what the leases still holding it read: gone
        if not record.copies:
            ns.remove(record)
            self._pinned.discard(record.key)
            if reason in ORPHANING_REASONS and record.hash in ns.children:
                self._drop_orphans(ns, record.hash)
        ns.refresh(record)

    def _drop_orphans(self, ns: Namespace, h: int) -> None:
        """Drop the copies of every held descendant of ``h``, whose last copy just went
        (evicted, corrupt, or never written): a lookup stops at the first missing block,
        so none of them can be found until a store writes ``h`` again, and the engine
        behind that store has re-computed the whole chain from ``h`` (it can write them
        again too). Kept, they would hold slots that reachable blocks could use: a small
        top tier sends a chain's head down before its tail, and the last tier may drop
        the head while the tail sits above. A copy being read, written or moved stays
        until that ends (then :meth:`_sweep_orphans` takes it, wherever the move put it);
        a pinned block stays."""
        kept = []
        stack = list(ns.children.get(h, ()))
        while stack:
            record = ns.blocks.get(stack.pop())
            if record is None:
                continue
            stack.extend(ns.children.get(record.hash, ()))
            if record.key in self._pinned:
                continue
            for tier, copy in list(record.copies.items()):
                if copy.ready and not copy.readers:
                    self._drop_copy(ns, record, tier, copy, reason="orphaned")
            if record.copies:
                kept.append(record)
        for record in kept:
            if record.key not in self._pinned and record.parent not in ns.blocks:
                self._orphaned_under.add((ns.name, record.parent))

    def _sweep_orphans(self) -> None:
        """Drop the orphans :meth:`_drop_orphans` had to leave because a read, a write or
        a move used them, now that those have ended; those still in use wait for the next
        sweep. Called where readers are released and copies become ready. An orphan whose
        missing ancestor a store has written again is reachable again, and stays."""
        if not self._orphaned_under:
            return
        missing, self._orphaned_under = self._orphaned_under, set()
        for name, h in missing:
            ns = self._namespaces.get(name)
            if ns is not None and h not in ns.blocks and h in ns.children:
                self._drop_orphans(ns, h)

    def _drop_unread(self, ns: Namespace, records: Iterable[BlockRecord], reason: str) -> int:
        """Drop every readable copy of ``records`` that nothing reads; returns how many of
        them are left (a copy being written, read or moved stays until that ends)."""
        left = 0
        for record in records:
            for tier, copy in list(record.copies.items()):
                if copy.ready and not copy.readers:
                    self._drop_copy(ns, record, tier, copy, reason=reason)
            left += 1 if record.copies else 0
        return left

    def _undo_store_items(self, ns: Namespace, items: list[tuple[BlockRecord, Copy] | None]) -> None:
        for item in items:
            if item is not None:
                self._drop_copy(ns, item[0], self.top, item[1], reason=None)

    def _undo_load_items(
        self, ns: Namespace, items: list[tuple[BlockRecord, Copy] | None], promotions: list[Transfer]
    ) -> None:
        promoted = {id(t.dst) for t in promotions}
        for item in items:
            if item is not None and id(item[1]) not in promoted:
                item[1].readers -= 1
        for transfer in promotions:
            del self._inflight[transfer.id]
            del self._promoting[id(transfer.dst)]
            transfer.src.readers -= 1
            transfer.dst.readers -= 1
            self._drop_copy(ns, transfer.record, transfer.dst_tier, transfer.dst, reason=None)
