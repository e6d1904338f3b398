"""The catalog: namespaces and their blocks, each block's parent and per-tier copies.

A block is ``(namespace, hash)``. Caching is inclusive: a block may have a copy in several
tiers. A copy is *ready* when its bytes are valid; only ready copies are visible to lookups.
A copy with ``readers > 0`` is being read (a load lease pins it, or a transfer copies from
it) and must not be freed.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from kvd.tiers import TIER_CODES, TIER_NAMES, Slot


@dataclass(slots=True, eq=False)
class Copy:
    """One tier's copy of a block: its slot, whether its bytes are valid, and who reads it."""

    slot: Slot
    ready: bool = False
    readers: int = 0


@dataclass(slots=True, eq=False)
class BlockRecord:
    namespace: str
    hash: int
    parent: int | None
    nbytes: int
    copies: dict[str, Copy] = field(default_factory=dict)

    @property
    def key(self) -> tuple[str, int]:
        return (self.namespace, self.hash)

    def fastest_ready(self) -> str | None:
        for tier in TIER_NAMES:
            copy = self.copies.get(tier)
            if copy is not None and copy.ready:
                return tier
        return None

    def ready_tiers(self) -> list[str]:
        return [t for t in TIER_NAMES if (c := self.copies.get(t)) is not None and c.ready]


@dataclass(slots=True, eq=False)
class Namespace:
    """A namespace's geometry and blocks.

    ``visible`` maps hash -> the code (``TIER_CODES``) of the fastest tier holding a ready
    copy; it holds exactly the blocks a lookup can see, so a lookup is one dict probe per
    hash and its answer goes on the wire as it is.
    """

    name: str
    block_tokens: int
    block_bytes: int
    blocks: dict[int, BlockRecord] = field(default_factory=dict)
    visible: dict[int, int] = field(default_factory=dict)
    children: dict[int, set[int]] = field(default_factory=dict)  # hash -> hashes in ``blocks`` whose parent it is
    # tier -> hashes whose ready copy in that tier sits below a ready copy in a faster tier:
    # a lookup never reads it, so evicting it loses nothing (oldest shadowed first).
    shadowed: dict[str, dict[int, None]] = field(default_factory=dict)

    def add(self, record: BlockRecord) -> None:
        """Enter ``record`` in ``blocks`` (replacing a record of the same hash)."""
        old = self.blocks.get(record.hash)
        if old is not None:
            self.remove(old)
        self.blocks[record.hash] = record
        if record.parent is not None:
            self.children.setdefault(record.parent, set()).add(record.hash)

    def remove(self, record: BlockRecord) -> None:
        """Take ``record`` (it has no copy left) out of ``blocks``."""
        del self.blocks[record.hash]
        for hashes in self.shadowed.values():
            hashes.pop(record.hash, None)
        if record.parent is not None:
            siblings = self.children[record.parent]
            siblings.discard(record.hash)
            if not siblings:
                del self.children[record.parent]

    def refresh(self, record: BlockRecord) -> None:
        """Re-index ``record`` after its copies changed: ``visible`` and ``shadowed``."""
        tier = record.fastest_ready()
        if tier is None:
            self.visible.pop(record.hash, None)
        else:
            self.visible[record.hash] = TIER_CODES[tier]
        above = False
        for t in TIER_NAMES:
            copy = record.copies.get(t)
            ready = copy is not None and copy.ready
            if ready and above:
                self.shadowed.setdefault(t, {})[record.hash] = None
            elif record.hash in self.shadowed.get(t, ()):
                del self.shadowed[t][record.hash]
            above = above or ready
