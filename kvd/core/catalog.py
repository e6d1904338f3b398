"""The catalog: namespaces and their blocks, each block's parent and per-tier copies.

A block is ``(namespace, hash)``. Caching is inclusive: a block may have a copy in several
tiers. A copy is *ready* when its bytes are valid; only ready copies are visible to lookups.
A copy with ``readers > 0`` is being read (a load lease pins it, or a transfer copies from
it) and must not be freed.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

from kvd.core.errors import GeometryConflict, InvalidArgument, UnknownNamespace, check_name
from kvd.core.types import BlockOrigin
from kvd.media import TIER_CODES, TIER_NAMES, Slot, TierName

BlockKey = tuple[str, int]  # (namespace, hash)


@dataclass(slots=True, eq=False)
class Copy:
    """One tier's copy of a block: its slot, whether its bytes are valid, and who reads it."""

    slot: Slot
    ready: bool = False
    readers: int = 0


@dataclass(slots=True, eq=False)
class BlockRecord:
    """A block: its chain link, its size, its copies, and what it was computed from (its
    tokens, when the engine that stored it gave them)."""

    namespace: str
    hash: int
    parent: int | None
    nbytes: int
    copies: dict[TierName, Copy] = field(default_factory=dict)
    origin: BlockOrigin | None = None

    @property
    def key(self) -> BlockKey:
        return (self.namespace, self.hash)

    def fastest_ready(self) -> TierName | None:
        for tier in TIER_NAMES:
            copy = self.copies.get(tier)
            if copy is not None and copy.ready:
                return tier
        return None

    def ready_tiers(self) -> list[TierName]:
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
    shadowed: dict[TierName, dict[int, None]] = field(default_factory=dict)

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


class Catalog:
    """The node's namespaces by name. ``max_name_len``: characters a name may have."""

    def __init__(self, max_name_len: int, max_block_bytes: int) -> None:
        self.max_name_len = max_name_len
        self.max_block_bytes = max_block_bytes
        self._namespaces: dict[str, Namespace] = {}

    def validate(self, name: str, block_tokens: int, block_bytes: int) -> None:
        """Raise InvalidArgument for a name or geometry no namespace may have."""
        check_name("namespace", name, self.max_name_len)
        if block_tokens <= 0:
            raise InvalidArgument("block_tokens must be positive")
        if not 0 < block_bytes <= self.max_block_bytes:
            raise InvalidArgument(f"block_bytes must be in 1..{self.max_block_bytes}")

    def is_registered(self, name: str, block_tokens: int, block_bytes: int) -> bool:
        """Whether ``name`` is registered with this geometry (False: not registered).
        Raises GeometryConflict when it is registered with another."""
        existing = self._namespaces.get(name)
        if existing is None:
            return False
        if (existing.block_tokens, existing.block_bytes) != (block_tokens, block_bytes):
            raise GeometryConflict(
                f"namespace {name!r} is registered with {existing.block_tokens} tokens and "
                f"{existing.block_bytes} bytes per block, not {block_tokens} and {block_bytes}"
            )
        return True

    def add(self, ns: Namespace) -> None:
        self._namespaces[ns.name] = ns

    def get(self, name: str) -> Namespace:
        """The namespace ``name``; raises UnknownNamespace."""
        ns = self._namespaces.get(name)
        if ns is None:
            raise UnknownNamespace(f"namespace {name!r} is not registered")
        return ns

    def find(self, name: str) -> Namespace | None:
        return self._namespaces.get(name)

    def __iter__(self) -> Iterator[Namespace]:
        """Namespaces in registration order."""
        return iter(self._namespaces.values())

    def by_name(self) -> list[Namespace]:
        return [self._namespaces[n] for n in sorted(self._namespaces)]

    def record(self, key: BlockKey) -> BlockRecord | None:
        """The block ``key`` names, when the catalog has it (ready or being written)."""
        ns = self._namespaces.get(key[0])
        return ns.blocks.get(key[1]) if ns is not None else None

    def smallest_block_bytes(self) -> int:
        """The smallest block any namespace stores (1 with no namespace)."""
        return min((ns.block_bytes for ns in self._namespaces.values()), default=1)
