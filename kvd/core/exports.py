"""Exports: which blocks this node puts in the cluster tier, and what it has put there.

The cluster tier (:mod:`kvd.cluster`) is a store that every node reads. The core decides
what goes there and records what this node put; the daemon's cluster tier moves the bytes.

- :meth:`Exports.offer`: committed blocks become candidates, root first (a bounded queue:
  when it is full the oldest candidate goes, the one least likely to resume elsewhere);
- :meth:`Exports.prepare`: up to n candidates the policy still finds worth sharing
  (:meth:`kvd.policies.Policy.worth_sharing`), each with a ready DRAM copy, which is pinned
  (a reader: no eviction frees its slot while its bytes are read) — an :class:`ExportBatch`;
- :meth:`Exports.complete`: unpins, and records the blocks that landed (a ``BlockStored``
  event in tier ``cluster`` each);
- :meth:`Exports.forget`: the cluster no longer holds blocks this node put (an audit found
  them gone, its master restarted empty, their namespace was cleared): a ``BlockRemoved``
  event in tier ``cluster`` each.

The DRAM copy is the source because the daemon registers its arena with the cluster's
transfer engine: a put reads the slot in place. A block held only in HBM or on NVMe when its
turn comes is skipped (``skipped``); it goes to the cluster if a later store offers it again.

Invariant (checked by :func:`kvd.core.check.check`): each pinned source is counted once in
its copy's ``readers``; ``published`` and the batches in flight name distinct blocks.
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from kvd.core.catalog import BlockKey, BlockRecord, Copy
from kvd.core.events import EventLog, RemovalReason
from kvd.core.holdings import Holdings
from kvd.media import CLUSTER, DRAM, Slot

MAX_CANDIDATES = 1 << 16  # blocks queued for the cluster; more push the oldest out


@dataclass(frozen=True, slots=True)
class ExportItem:
    """One block to put: its chain position, its size in bytes and its DRAM slot."""

    namespace: str
    hash: int
    parent: int | None
    nbytes: int
    slot: Slot


@dataclass(frozen=True, slots=True)
class ExportBatch:
    """Blocks whose DRAM copies stay pinned until :meth:`Exports.complete` names ``id``."""

    id: int
    items: tuple[ExportItem, ...]


class Exports:
    """The cluster tier's ledger on this node: candidates, batches in flight, published."""

    def __init__(self, holdings: Holdings, events: EventLog, max_candidates: int = MAX_CANDIDATES) -> None:
        self.holdings = holdings
        self.events = events
        self.enabled = False  # the daemon joined a cluster: commits are offered
        self.candidates: deque[BlockRecord] = deque(maxlen=max_candidates)
        self.published: dict[BlockKey, tuple[int | None, int]] = {}  # key -> (parent, nbytes)
        self.inflight: dict[int, list[tuple[BlockRecord, Copy]]] = {}
        self.skipped = 0  # candidates dropped without a DRAM copy to read
        self._ids = itertools.count(1)

    def offer(self, records: Iterable[BlockRecord]) -> None:
        """Queue committed blocks (root first) for the cluster, when a cluster is joined."""
        if self.enabled:
            self.candidates.extend(records)

    @property
    def pending(self) -> int:
        """Candidates queued (some may be skipped when their turn comes)."""
        return len(self.candidates)

    def prepare(self, max_blocks: int) -> ExportBatch | None:
        """Pin up to ``max_blocks`` candidates' DRAM copies for a put; None when none is due.
        A candidate goes without a put when it is no longer held as it was offered, is
        published or in flight already, or the policy finds it no longer worth sharing."""
        held = self.holdings
        busy = {record.key for batch in self.inflight.values() for record, _ in batch}
        picked: list[tuple[BlockRecord, Copy]] = []
        while self.candidates and len(picked) < max_blocks:
            record = self.candidates.popleft()
            key = record.key
            if held.catalog.record(key) is not record or key in self.published or key in busy:
                continue
            src = record.copies.get(DRAM)
            if src is None or not src.ready:
                self.skipped += 1
                continue
            if not held.policy.worth_sharing(key, DRAM):
                continue
            src.readers += 1
            busy.add(key)
            picked.append((record, src))
        if not picked:
            return None
        batch_id = next(self._ids)
        self.inflight[batch_id] = picked
        items = tuple(ExportItem(r.namespace, r.hash, r.parent, r.nbytes, c.slot) for r, c in picked)
        return ExportBatch(batch_id, items)

    def complete(self, batch_id: int, landed: Sequence[bool]) -> int:
        """Unpin batch ``batch_id``; record its items whose ``landed`` is true as published.
        Returns how many were. Raises ValueError for a batch not in flight or a wrong count."""
        batch = self.inflight.get(batch_id)
        if batch is None:
            raise ValueError(f"export batch {batch_id} is not in flight")
        if len(landed) != len(batch):
            raise ValueError(f"export batch {batch_id} has {len(batch)} blocks, not {len(landed)}")
        del self.inflight[batch_id]
        now = self.holdings.clock()
        published = 0
        for (record, src), ok in zip(batch, landed, strict=True):
            src.readers -= 1
            if ok:
                self.published[record.key] = (record.parent, record.nbytes)
                self.events.stored(record.namespace, record.hash, record.parent, CLUSTER, record.nbytes, now)
                published += 1
        if batch:
            self.holdings.sweep_orphans()  # a pinned copy may have lost its ancestor meanwhile
        return published

    def forget(self, keys: Iterable[BlockKey], reason: RemovalReason) -> int:
        """The cluster no longer holds ``keys`` (those this node published); returns how many
        were published."""
        now = self.holdings.clock()
        gone = 0
        for key in keys:
            if self.published.pop(key, None) is not None:
                self.events.removed(key[0], key[1], CLUSTER, reason, now)
                gone += 1
        return gone

    def forget_namespace(self, namespace: str, reason: RemovalReason) -> list[BlockKey]:
        """Forget every block of ``namespace`` this node published; returns their keys."""
        keys = [key for key in self.published if key[0] == namespace]
        self.forget(keys, reason)
        return keys

    def pins(self) -> dict[Copy, int]:
        """Readers each pinned source owes to the batches in flight (for check())."""
        pins: dict[Copy, int] = {}
        for batch in self.inflight.values():
            for _, copy in batch:
                pins[copy] = pins.get(copy, 0) + 1
        return pins

    def check(self) -> list[str]:
        problems = []
        names = {ns.name for ns in self.holdings.catalog}
        strays = {key[0] for key in self.published} - names
        if strays:
            problems.append(f"exports: blocks published in unknown namespaces {sorted(strays)[:4]}")
        keys = [record.key for batch in self.inflight.values() for record, _ in batch]
        if len(keys) != len(set(keys)):
            problems.append("exports: a block is in two batches in flight")
        if set(keys) & self.published.keys():
            problems.append("exports: a block in flight is published already")
        return problems
