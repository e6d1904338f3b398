"""check(): every invariant of the core's state, as a list of problems (empty when healthy).

- every copy's slot is allocated in its tier's space, no two copies share a slot, and the
  bytes of a tier's copies (plus, in the top tier, its quarantined slots) equal the space's
  ``used_bytes``;
- a copy's ``readers`` equals the load leases pinning it plus the transfers and cluster
  exports reading it;
- a namespace's ``visible`` map holds exactly its blocks with a ready copy, at the fastest;
  its ``children`` and ``shadowed`` indexes agree with the blocks;
- every transfer in flight has its destination copy; ``promoting`` files only transfers in
  flight, by their destination copy;
- every pinned key names a held block; the policy tracks exactly the ready copies; the
  session table's own invariants hold.

Reads only; O(blocks + leases + transfers).
"""

from __future__ import annotations

from kvd.core.catalog import BlockKey, Copy
from kvd.core.exports import Exports
from kvd.core.holdings import Holdings
from kvd.core.leases import LeaseTable
from kvd.core.sessions import SessionTable
from kvd.core.transfers import Transfers
from kvd.media import TIER_CODES, TierName


def check(
    holdings: Holdings, leases: LeaseTable, transfers: Transfers, sessions: SessionTable, exports: Exports | None = None
) -> list[str]:
    problems: list[str] = []
    tiers = holdings.tiers
    used = dict.fromkeys(tiers, 0)
    seen: dict[TierName, set[int]] = {t: set() for t in tiers}
    readers: dict[Copy, int] = {}
    held: dict[TierName, set[BlockKey]] = {t: set() for t in tiers}
    for ns in holdings.catalog:
        for h, record in ns.blocks.items():
            if record.hash != h or record.namespace != ns.name:
                problems.append(f"{ns.name}/{h}: filed under the wrong key")
            if not record.copies:
                problems.append(f"{ns.name}/{h}: a block without copies")
            for tier, copy in record.copies.items():
                if tier not in holdings.spaces:
                    problems.append(f"{ns.name}/{h}: copy in absent tier {tier}")
                    continue
                if not holdings.spaces[tier].is_allocated(copy.slot):
                    problems.append(f"{ns.name}/{h}: {tier} slot {copy.slot} is not allocated")
                if copy.slot.offset in seen[tier]:
                    problems.append(f"{ns.name}/{h}: {tier} slot {copy.slot} is shared")
                seen[tier].add(copy.slot.offset)
                used[tier] += copy.slot.length
                readers[copy] = copy.readers
                if copy.readers < 0:
                    problems.append(f"{ns.name}/{h}: {tier} copy has {copy.readers} readers")
                if copy.ready:
                    held[tier].add(record.key)
            if record.origin is not None and record.origin.num_tokens != ns.block_tokens:
                problems.append(f"{ns.name}/{h}: {record.origin.num_tokens} token ids, not {ns.block_tokens}")
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
        shadowed = {tier: {h for h, r in ns.blocks.items() if tier in r.ready_tiers()[1:]} for tier in tiers}
        if any(shadowed[tier] != set(ns.shadowed.get(tier, ())) for tier in tiers):
            problems.append(f"{ns.name}: the copies filed as shadowed are not those a faster tier shadows")
    top = holdings.top
    for slot in leases.quarantined():
        used[top] += slot.length
        if not holdings.spaces[top].is_allocated(slot):
            problems.append(f"quarantined {top} slot {slot} is not allocated")
    for tier in tiers:
        if used[tier] != holdings.spaces[tier].used_bytes:
            problems.append(f"{tier}: copies hold {used[tier]} bytes, the space says {holdings.spaces[tier].used_bytes}")
    problems += _pins_and_reads(holdings, leases, transfers, readers, exports.pins() if exports else {})
    if exports is not None:
        problems += exports.check()
    problems += holdings.policy.check(held)
    problems += sessions.check()
    return problems


def _pins_and_reads(
    holdings: Holdings, leases: LeaseTable, transfers: Transfers, readers: dict[Copy, int], exported: dict[Copy, int]
) -> list[str]:
    """Readers against the leases, transfers and exports that account for them; transfers
    and pins against the catalog."""
    problems = []
    expected: dict[Copy, int] = dict(exported)
    for lease in leases.loads.values():
        for item in lease.items:
            if item is None:
                continue
            if item[0].copies.get(holdings.top) is item[1]:
                expected[item[1]] = expected.get(item[1], 0) + 1
            elif item[1].ready:
                problems.append(f"load lease {lease.id}: a pinned, readable copy was freed")
    for transfer in transfers.inflight.values():
        expected[transfer.src] = expected.get(transfer.src, 0) + 1
        if transfer.record.copies.get(transfer.dst_tier) is not transfer.dst:
            problems.append(f"transfer {transfer.id}: its destination copy is gone")
    for copy, transfer in transfers.promoting.items():
        if transfers.inflight.get(transfer.id) is not transfer or transfer.dst is not copy:
            problems.append(f"promotion {transfer.id}: filed as in flight, but it is not")
    for copy, count in readers.items():
        if expected.get(copy, 0) != count:
            problems.append(f"a copy has {count} readers, leases and transfers account for {expected.get(copy, 0)}")
    live = {(ns.name, h) for ns in holdings.catalog for h in ns.blocks}
    if holdings.pins - live:
        problems.append(f"{len(holdings.pins - live)} pinned keys name no held block")
    return problems
