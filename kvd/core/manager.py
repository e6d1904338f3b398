"""KvCore: the node's KV catalog and its decisions, as one public API over the core's parts.

No I/O and no asyncio: every method is a synchronous state transition over in-memory state,
with time from an injected clock. The daemon runs it over real tiers (bytes move in worker
threads between calls); ``kvd replay`` runs the very same object over capacity-only spaces
and a simulated clock.

The parts (each a module of kvd/core):

- ``catalog``: namespaces, blocks, copies; ``chains``: walks along the chains;
- ``holdings``: copies enter and leave here, with their orphans;
- ``placement``: what leaves a tier to make room, and where it goes (one plan, applied whole);
- ``stores``, ``loads``: the two-phase client flows under ``leases``;
- ``transfers``: demotions, write-behind, promotions and prefetches for the mover;
- ``sessions``: programs and their turns; ``operator``: kvctl's actions; ``check``: invariants.

A request that needs room the mover must make first comes back :class:`Wait`: the caller
runs the mover and retries.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

from kvd.core.catalog import BlockKey, BlockRecord, Catalog, Copy, Namespace
from kvd.core.check import check
from kvd.core.errors import InvalidArgument, check_name
from kvd.core.events import Event, EventLog, RemovalReason
from kvd.core.exports import ExportBatch, Exports
from kvd.core.holdings import Holdings
from kvd.core.leases import LeaseTable
from kvd.core.loads import Loads
from kvd.core.operator import Operator
from kvd.core.placement import Planner, Protect
from kvd.core.sessions import SESSION_EVENTS, Session, SessionEvent, SessionState, SessionTable
from kvd.core.stores import Stores
from kvd.core.transfers import Transfers
from kvd.core.types import (
    MAX_BLOCK_TOKENS_KEPT,
    MAX_EXTRA_KEYS_BYTES,
    MAX_UINT64,
    BlockOrigin,
    BlockSpec,
    Cause,
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
from kvd.media import TIER_NAMES, Slot, TierName
from kvd.policies import Policy

__all__ = ["BlockSpec", "CoreConfig", "KvCore", "LoadGrant", "StoreGrant", "Transfer", "Wait"]


class KvCore:
    """The node's KV catalog and its decisions. Single-threaded: call from one thread.

    ``spaces``: tier name -> its slot bookkeeping (at least one tier; the fastest is the top
    tier, where stores land and loads read). ``lease_prefix`` starts every lease id."""

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
        self.tiers: tuple[TierName, ...] = tuple(t for t in TIER_NAMES if t in spaces)  # fastest first
        self.top = self.tiers[0]
        self.spaces: dict[TierName, Space] = {t: spaces[t] for t in self.tiers}
        self.clock = clock
        self.config = config or CoreConfig()
        self.sessions = sessions if sessions is not None else SessionTable()
        self.events = EventLog()
        self.catalog = Catalog(self.config.max_namespace_len, self.config.max_block_bytes)
        self.leases = LeaseTable(self.config, lease_prefix)
        self.holdings = Holdings(self.tiers, self.spaces, self.catalog, policy, self.events, self.leases, clock)
        self.transfers = Transfers(self.holdings, self.config, self.planner)
        self.exports = Exports(self.holdings, self.events)
        self._stores = Stores(self.holdings, self.leases, self.transfers, self.planner, self.exports)
        self._loads = Loads(self.holdings, self.leases, self.transfers, self.planner)
        self._operator = Operator(self.holdings, self.sessions, self.transfers, self.config)

    @property
    def policy(self) -> Policy:
        return self.holdings.policy

    def planner(self, protect: Protect | None = None, cause: Cause = Cause.CAPACITY) -> Planner:
        """A placement planner over the core's state now (see :mod:`kvd.core.placement`):
        it decides and changes nothing; :func:`kvd.core.placement.apply` carries out its plan."""
        held = self.holdings
        return Planner(
            self.tiers, self.spaces, self.catalog, held.deferred_policy, held.pins, self.transfers.moving, self.clock(),
            protect or Protect(), self.transfers.writes_behind, cause,
        )

    # -- namespaces -----------------------------------------------------------------------
    def check_geometry(self, name: str, block_tokens: int, block_bytes: int) -> bool:
        """Whether registering this geometry would create a namespace (True) or confirm one.
        Raises InvalidArgument (bad values, a block that no tier can hold) or
        GeometryConflict (known with another geometry). Changes nothing."""
        self.catalog.validate(name, block_tokens, block_bytes)
        for tier in self.tiers:
            largest = self.spaces[tier].largest_region_bytes
            if self.spaces[tier].slot_bytes(block_bytes) > largest:
                raise InvalidArgument(
                    f"blocks of {block_bytes} bytes do not fit the {tier} tier "
                    f"(its largest contiguous region is {largest} bytes)"
                )
        return not self.catalog.is_registered(name, block_tokens, block_bytes)

    def register_namespace(self, name: str, block_tokens: int, block_bytes: int) -> bool:
        """Register ``name``; True when new. Raises as :meth:`check_geometry`."""
        if not self.check_geometry(name, block_tokens, block_bytes):
            return False
        self.catalog.add(Namespace(name, block_tokens, block_bytes))
        self.events.registered(name, block_tokens, block_bytes, self.clock())
        return True

    def namespace(self, name: str) -> Namespace:
        """The namespace ``name``; raises UnknownNamespace."""
        return self.catalog.get(name)

    def namespaces(self) -> list[Namespace]:
        return self.catalog.by_name()

    # -- lookup ---------------------------------------------------------------------------
    def lookup(self, namespace: str, hashes: Sequence[int], session_id: str | None = None) -> list[TierName]:
        """Fastest tier of each block of the longest held prefix of ``hashes``. Changes
        nothing that is held (an engine may ask again and again; a router may score); see
        :meth:`lookup_codes` for ``session_id``."""
        return [TIER_NAMES[code - 1] for code in self.lookup_codes(namespace, hashes, session_id)]

    def lookup_codes(self, namespace: str, hashes: Sequence[int], session_id: str | None = None) -> list[int]:
        """:meth:`lookup` with tier codes (``TIER_CODES``) instead of names: the hot path.
        With ``session_id``, a lookup also says that session's turn has begun (its tool
        pause is over); asking again during the turn changes nothing."""
        if len(hashes) > self.config.max_lookup_hashes:
            raise InvalidArgument(f"at most {self.config.max_lookup_hashes} hashes per lookup")
        visible = self.namespace(namespace).visible
        if session_id is not None:
            session = self.sessions.get(namespace, session_id)
            if session is None or session.state != SessionState.ACTIVE:
                self.sessions.turn_start(namespace, session_id, hashes, self.clock())
                self._sync_sessions()
        codes = list(map(visible.get, hashes))
        try:
            return codes[: codes.index(None)]  # type: ignore[return-value]
        except ValueError:
            return codes  # type: ignore[return-value]

    # -- stores and loads -----------------------------------------------------------------
    def prepare_store(
        self,
        namespace: str,
        blocks: Sequence[BlockSpec],
        lease_seconds: float = 0,
        session_id: str | None = None,
        last_partial: bool = False,
    ) -> StoreGrant | Wait:
        """Phase 1: top-tier slots for the blocks not yet held, under a lease (all or nothing).

        ``blocks`` is a chain, root first (or the continuation of one: the first block's
        parent). The store is a session's, hinted by ``session_id`` or inferred from the
        chain; ``last_partial`` says the last block holds fewer than block_tokens tokens (it
        will not be re-used as it is). A slot of None: nothing to write (held, or its chain
        was cut while the room was made). Raises InvalidArgument (sizes, duplicates, a
        negative lease), UnknownNamespace, NoSpace."""
        ns = self.namespace(namespace)
        self._validate_blocks(ns, blocks)
        self.leases.duration(lease_seconds)
        now = self.clock()
        session = self.sessions.observe_store(
            namespace, session_id, [b.hash for b in blocks], now, last_partial, blocks[0].parent
        )
        self._sync_sessions()
        return self._stores.grant(ns, blocks, now, session, lease_seconds)

    def commit_store(self, lease_id: str, failed: Iterable[int] = (), abort: bool = False, share: bool = True) -> int:
        """Phase 2: make the written blocks visible; see :meth:`Stores.commit`."""
        return self._stores.commit(lease_id, failed, abort, share)

    def prepare_load(self, namespace: str, hashes: Sequence[int], lease_seconds: float = 0) -> LoadGrant | Wait:
        """Phase 1: pin a top-tier copy of each held block, planning promotions from below.
        The caller runs ``promotions`` (reporting each with :meth:`complete_transfer`) and
        waits for ``awaiting`` before it reads :meth:`load_slots`. Raises InvalidArgument,
        UnknownNamespace, NoSpace."""
        ns = self.namespace(namespace)
        if len(hashes) > self.config.max_batch_blocks:
            raise InvalidArgument(f"at most {self.config.max_batch_blocks} hashes per load")
        self.leases.duration(lease_seconds)
        return self._loads.grant(ns, hashes, lease_seconds)

    def load_slots(self, lease_id: str) -> list[tuple[Slot, int] | None]:
        """(top-tier slot, nbytes) per hash of a load lease; None where the block is not held."""
        return self._loads.slots(lease_id)

    def complete_load(self, lease_id: str) -> None:
        """Phase 2: the client has read the slots; unpin them."""
        self._loads.complete(lease_id)

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
    ) -> Session | None:
        """Apply one :class:`SessionEvent`: turn_start (with the prompt's chained hashes),
        turn_end, tool_pause (tool, optional expected seconds), tool_resume, session_end,
        turn_ahead (the next turn's hashes, arriving in ``expected_s`` seconds). A
        session_end or turn_ahead may name its session by ``hashes`` alone (an empty id: the
        live session whose chain they continue; None when there is none). Raises
        InvalidArgument, UnknownNamespace, UnknownSession, SessionStateError."""
        self.namespace(namespace)
        if kind not in SESSION_EVENTS:
            raise InvalidArgument(f"unknown session event {kind!r}; known: {', '.join(SessionEvent)}")
        event = SessionEvent(kind)
        by_chain = not session_id and event in (SessionEvent.SESSION_END, SessionEvent.TURN_AHEAD)
        if not session_id and not (by_chain and hashes):
            raise InvalidArgument("a session event needs a session id (session_end and turn_ahead: or the hashes)")
        if len(hashes) > self.config.max_lookup_hashes:
            raise InvalidArgument(f"at most {self.config.max_lookup_hashes} hashes per turn")
        now = self.clock()
        table = self.sessions
        if event is SessionEvent.TURN_START:
            session = table.turn_start(namespace, session_id, hashes, now, last_partial)
        elif event is SessionEvent.TURN_END:
            session = table.turn_end(namespace, session_id, now)
        elif event is SessionEvent.TOOL_PAUSE:
            session = table.tool_pause(namespace, session_id, tool or "", expected_s, now)
        elif event is SessionEvent.TOOL_RESUME:
            session = table.tool_resume(namespace, session_id, now)
        elif event is SessionEvent.TURN_AHEAD:
            if expected_s is None:
                raise InvalidArgument("turn_ahead needs the seconds until the turn arrives")
            session = table.expect(namespace, session_id or None, hashes, expected_s, now)
        else:
            found = table.find(namespace, hashes) if by_chain else None
            if by_chain and found is None:
                return None
            session = table.end(namespace, found.id if found is not None else session_id, now)
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

    # -- operator actions -----------------------------------------------------------------
    def clear_namespace(self, name: str) -> int:
        """Drop every readable, unread copy of ``name``'s blocks, and forget those this node
        published to the cluster tier (the daemon removes them there); returns the blocks
        left."""
        self.exports.forget_namespace(name, RemovalReason.CLEARED)
        return self._operator.clear_namespace(name)

    # -- the cluster tier -----------------------------------------------------------------
    def prepare_export(self, max_blocks: int) -> ExportBatch | None:
        """Phase 1 of a put to the cluster tier: see :meth:`Exports.prepare`."""
        return self.exports.prepare(max_blocks)

    def complete_export(self, batch_id: int, landed: Sequence[bool]) -> int:
        """Phase 2: see :meth:`Exports.complete`."""
        return self.exports.complete(batch_id, landed)

    def forget_published(self, keys: Iterable[BlockKey]) -> int:
        """The cluster tier no longer holds ``keys``: see :meth:`Exports.forget`."""
        return self.exports.forget(keys, RemovalReason.GONE)

    def evict_session(self, namespace: str, session_id: str) -> tuple[int, int]:
        """Drop the blocks only ``session_id`` holds; (removed, left)."""
        return self._operator.evict_session(namespace, session_id)

    def evict_all(self) -> tuple[int, int]:
        """Clear every namespace (and forget what this node published); (removed, left)."""
        for ns in self.catalog.by_name():
            self.exports.forget_namespace(ns.name, RemovalReason.CLEARED)
        return self._operator.evict_all()

    def pin(self, namespace: str, hashes: Sequence[int]) -> tuple[int, int]:
        """Keep held blocks where they are; (newly pinned, not held)."""
        return self._operator.pin(namespace, hashes)

    def unpin(self, namespace: str, hashes: Sequence[int]) -> tuple[int, int]:
        """Let the policy decide again; (unpinned, not pinned)."""
        return self._operator.unpin(namespace, hashes)

    @property
    def pinned_count(self) -> int:
        return len(self.holdings.pins)

    def set_policy(self, policy: Policy) -> None:
        """Decide with ``policy`` from now on, handing it every held copy."""
        self._operator.set_policy(policy)

    def start_drain(self) -> int:
        """Queue every block above NVMe without an NVMe copy for writing down; how many."""
        return self._operator.start_drain()

    def stop_drain(self) -> None:
        self._operator.stop_drain()

    @property
    def writes_behind(self) -> bool:
        """Whether committed blocks are queued for NVMe as they are stored: if not, a Sync
        must queue them (:meth:`queue_write_down`)."""
        return self.transfers.writes_behind

    def queue_write_down(self) -> int:
        """Queue every held block above NVMe without an NVMe copy for writing down."""
        return self.transfers.queue_write_down()

    # -- leases ---------------------------------------------------------------------------
    def expire_leases(self) -> int:
        """Abort store leases and release load leases whose time is up; free quarantined
        slots whose time is up; end sessions idle too long. Returns the leases expired."""
        now = self.clock()
        expired = 0
        for lease in self.leases.expired_stores(now):
            self._stores.expire(lease, now)
            expired += 1
        for lease_id in self.leases.expired_loads(now):
            self._loads.complete(lease_id)
            expired += 1
        for slot in self.leases.release_due(now):
            self.spaces[self.top].free(slot)
        if self.sessions.expire(now):
            self._sync_sessions()
        self.holdings.sweep_orphans()
        return expired

    def lease_alive(self, lease_id: str) -> bool:
        """Whether a store or load lease exists and its time is not up (on the core's clock)."""
        return self.leases.alive(lease_id, self.clock())

    @property
    def lease_count(self) -> int:
        return len(self.leases)

    # -- the mover's plan -----------------------------------------------------------------
    def take_demotions(self) -> list[Transfer]:
        """Demotions planned to make room; the mover runs them first."""
        return self.transfers.take_demotions()

    def plan_write_behind(self, max_blocks: int) -> list[Transfer]:
        """Up to ``max_blocks`` transfers copying queued blocks down to NVMe."""
        return self.transfers.plan_write_behind(max_blocks)

    def plan_prefetch(self, max_blocks: int) -> list[Transfer]:
        """Up to ``max_blocks`` transfers moving blocks the policy expects soon one tier up."""
        return self.transfers.plan_prefetch(max_blocks)

    def complete_transfer(self, transfer: Transfer, outcome: Outcome = Outcome.OK) -> None:
        """The mover ran ``transfer``; see :meth:`Transfers.complete`."""
        self.transfers.complete(transfer, outcome)

    def is_inflight(self, transfer: Transfer) -> bool:
        return self.transfers.is_inflight(transfer)

    @property
    def write_behind_pending(self) -> int:
        """Blocks queued or in flight for write-behind (may count a since-evicted one)."""
        return self.transfers.write_behind_pending

    @property
    def has_planned_work(self) -> bool:
        return bool(self.transfers.demotions or self.transfers.write_behind)

    # -- warm restart ---------------------------------------------------------------------
    def restore_block(
        self, namespace: str, h: int, parent: int | None, nbytes: int, tier: TierName, slot: Slot,
        origin: BlockOrigin | None = None,
    ) -> None:
        """Re-enter a block recovered from a persistent tier; ``slot`` is already allocated."""
        ns = self.namespace(namespace)
        if h in ns.blocks:
            raise ValueError(f"block {h} of {namespace!r} restored twice")
        if origin is not None and origin.num_tokens != ns.block_tokens:
            origin = None  # recorded under another geometry: the block stays, its tokens go
        record = BlockRecord(namespace, h, parent, nbytes, origin=origin)
        copy = Copy(slot)
        record.copies[tier] = copy
        ns.add(record)
        now = self.clock()
        self.holdings.make_ready(ns, record, tier, copy, now)
        self.policy.on_stored(tier, [record.key], now)

    # -- introspection --------------------------------------------------------------------
    def take_events(self) -> list[Event]:
        return self.events.take()

    def retention_class(self, key: BlockKey, tier: TierName) -> str | None:
        """The retention class of ``key``'s copy in ``tier`` (``pinned``, or the policy's;
        None: not held there, or the policy keeps no classes). Changes nothing."""
        return self.holdings.retention_class(key, tier)

    def blocks(self, namespace: str | None = None) -> Iterable[BlockRecord]:
        names = [namespace] if namespace else [ns.name for ns in self.catalog.by_name()]
        for name in names:
            yield from self.namespace(name).blocks.values()

    def stats(self) -> CoreStats:
        counts = dict.fromkeys(self.tiers, 0)
        per_ns = []
        for ns in self.catalog:
            held = 0
            for record in ns.blocks.values():
                for tier in record.ready_tiers():
                    counts[tier] += 1
                held += 1 if record.fastest_ready() else 0
            per_ns.append((ns, held))
        tiers = [
            TierUsage(t, self.spaces[t].capacity_bytes, self.spaces[t].used_bytes, counts[t]) for t in self.tiers
        ]
        return CoreStats(tiers, sorted(per_ns, key=lambda p: p[0].name), len(self.leases), self.write_behind_pending)

    def check(self) -> list[str]:
        """Every invariant violation of the core's state; empty when healthy."""
        return check(self.holdings, self.leases, self.transfers, self.sessions, self.exports)

    # -- validation -----------------------------------------------------------------------
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
            if spec.origin is not None:
                _validate_origin(ns, i, spec.origin)
            seen.add(spec.hash)
        # Parents must not make a cycle: within the store (in any order), or through held
        # blocks back into it. Each block's ancestry is walked until a block an earlier walk
        # passed (checked already), so the whole check is linear in the store and the chain.
        parent_of = {spec.hash: spec.parent for spec in blocks}
        # The catalog leads back into the store only through a block held, or named as a
        # held block's parent: otherwise the walks stay within the store.
        into_catalog = any(spec.hash in ns.blocks or spec.hash in ns.children for spec in blocks)
        walked: dict[int, int] = {}  # hash -> the walk that passed it
        for i, spec in enumerate(blocks):
            h: int | None = spec.hash
            while h is not None and h not in walked:
                walked[h] = i
                if h in parent_of:
                    h = parent_of[h]
                else:
                    record = ns.blocks.get(h) if into_catalog else None
                    h = record.parent if record is not None else None
            if h is not None and walked[h] == i:
                raise InvalidArgument(f"block {i}: its parents lead back to itself (a cycle of parents)")


def _validate_origin(ns: Namespace, i: int, origin: BlockOrigin) -> None:
    """A block's tokens fill it exactly; its LoRA name and extra keys are bounded."""
    if origin.num_tokens != ns.block_tokens:
        raise InvalidArgument(
            f"block {i} has {origin.num_tokens} token ids; namespace {ns.name!r} holds {ns.block_tokens} tokens a block"
        )
    if origin.num_tokens > MAX_BLOCK_TOKENS_KEPT:
        raise InvalidArgument(f"block {i}: at most {MAX_BLOCK_TOKENS_KEPT} token ids a block are kept")
    if origin.extra_keys is not None and len(origin.extra_keys) > MAX_EXTRA_KEYS_BYTES:
        raise InvalidArgument(f"block {i}: extra keys of {len(origin.extra_keys)} bytes (at most {MAX_EXTRA_KEYS_BYTES})")
    if origin.lora_name is not None:
        check_name("LoRA", origin.lora_name)
