"""The core's boundary types: its configuration, what callers hand it and what it hands back.

Sizes are bytes, times are seconds on the core's clock, counts are blocks or hashes.
"""

from __future__ import annotations

import sys
from array import array
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING, Protocol

from kvd.media import Slot, TierName

if TYPE_CHECKING:
    from kvd.core.catalog import BlockRecord, Copy

MAX_UINT64 = (1 << 64) - 1


class Space(Protocol):
    """What the core needs of a tier: pure slot bookkeeping (a Tier, or a bare ExtentAllocator)."""

    capacity_bytes: int
    used_bytes: int

    def allocate(self, nbytes: int) -> Slot | None: ...
    def allocate_many(self, nbytes: int, count: int) -> list[Slot]: ...
    def free_slots(self, nbytes: int, at_most: int) -> int: ...
    def free(self, slot: Slot) -> None: ...
    def slot_bytes(self, nbytes: int) -> int: ...
    @property
    def largest_region_bytes(self) -> int: ...
    def is_allocated(self, slot: Slot) -> bool: ...


@dataclass(frozen=True)
class CoreConfig:
    """Limits of the core. Seconds for leases; counts for list lengths."""

    lease_seconds: float = 30.0
    max_lease_seconds: float = 600.0
    write_behind: bool = True  # copy every committed block down to NVMe in the background
    max_lookup_hashes: int = 1 << 16  # a lookup's, a turn's, an announcement's, a pin's
    max_batch_blocks: int = 1 << 16
    max_namespace_len: int = 256
    max_block_bytes: int = 1 << 30


MAX_EXTRA_KEYS_BYTES = 1024  # a block's extra keys, as the engine encodes them
MAX_BLOCK_TOKENS_KEPT = 4096  # token ids kept per block (a namespace's tokens per block)


@dataclass(frozen=True, slots=True)
class BlockOrigin:
    """What a block was computed from, as the engine knows it: kept with the block and
    published with its KV events, so a router that keys blocks by their tokens indexes it.

    ``token_ids``: the block's tokens as little-endian uint32 (4 bytes a token; 97 bytes of
    object and data for 16 tokens, where a tuple of ints would take ~640). ``lora_name``:
    the LoRA adapter, if any. ``extra_keys``: the engine's extra hash keys of the block, one
    msgpack array, opaque to kvd. One origin is shared by every copy of the block.
    """

    token_ids: bytes
    lora_name: str | None = None
    extra_keys: bytes | None = None

    @classmethod
    def of(cls, tokens: Sequence[int], lora_name: str | None = None, extra_keys: bytes | None = None) -> BlockOrigin:
        """Pack ``tokens`` (each 0 <= t < 2**32; ValueError otherwise)."""
        try:
            packed = array("I", tokens)
        except (OverflowError, TypeError) as exc:
            raise ValueError(f"token ids must be 32-bit unsigned integers: {exc}") from None
        if sys.byteorder != "little":
            packed.byteswap()
        return cls(packed.tobytes(), lora_name or None, extra_keys or None)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids) // 4

    def tokens(self) -> list[int]:
        out = array("I", self.token_ids)
        if sys.byteorder != "little":
            out.byteswap()
        return out.tolist()


@dataclass(frozen=True, slots=True)
class BlockSpec:
    """A block a store names: its chained hash, its parent's (None for a chain's root), its
    bytes, and (optionally) what it was computed from."""

    hash: int
    parent: int | None
    nbytes: int
    origin: BlockOrigin | None = None


class TransferKind(StrEnum):
    """What a transfer is for; each moves one block's bytes from one tier's slot to another's."""

    DEMOTE = "demote"  # one tier down to make room; the source goes when it lands
    WRITE_BEHIND = "write_behind"  # down to NVMe in the background; both copies stay
    PROMOTE = "promote"  # up into the top tier for a load
    PREFETCH = "prefetch"  # one tier up ahead of need


class Cause(StrEnum):
    """What needed the room an evicted or demoted copy gave up."""

    CAPACITY = "capacity"  # a store, a load's promotion, a demotion or a write-behind
    PREFETCH = "prefetch"  # a prefetch


class Outcome(StrEnum):
    """How a transfer ended, as the mover reports it."""

    OK = "ok"  # the destination holds the bytes
    ERROR = "error"  # the medium failed; the source is intact
    CORRUPT = "corrupt"  # the source failed its checksum: its copy is dropped too


@dataclass(slots=True, eq=False)
class Transfer:
    """A copy of one block from ``src`` (in ``src_tier``) to ``dst`` (in ``dst_tier``), planned
    by the core. While it is in flight ``src`` counts it as a reader and ``dst`` is not
    ready. ``cause``: for a demotion, what needed its room."""

    id: int
    kind: TransferKind
    record: BlockRecord
    src_tier: TierName
    src: Copy
    dst_tier: TierName
    dst: Copy
    cause: Cause | None = None

    @property
    def nbytes(self) -> int:
        return self.record.nbytes


@dataclass(frozen=True, slots=True)
class Moved:
    """A finished transfer and how it ended: what the mover reports to the core and metrics."""

    transfer: Transfer
    outcome: Outcome

    @property
    def ok(self) -> bool:
        return self.outcome is Outcome.OK


@dataclass(frozen=True, slots=True)
class Wait:
    """Room is being made by planned demotions (``demotions``: the bytes they free once they
    land) or by transfers under way: run the mover, then retry the request."""

    demotions: int


@dataclass(frozen=True, slots=True)
class StoreGrant:
    lease_id: str
    expires_at: float
    slots: list[Slot | None]  # None: nothing to write (held, or unreachable: its chain is cut)


@dataclass(frozen=True, slots=True)
class LoadGrant:
    lease_id: str
    expires_at: float
    promotions: list[Transfer]  # to run (into the top tier) before load_slots() is read
    awaiting: list[Transfer] = field(default_factory=list)  # others' promotions to wait for
    # Per requested hash, the tier its copy was found in (None: not held, or not readable yet).
    found: list[TierName | None] = field(default_factory=list)


@dataclass
class TierUsage:
    tier: TierName
    capacity_bytes: int
    used_bytes: int
    blocks: int


@dataclass
class CoreStats:
    tiers: list[TierUsage]
    namespaces: list = field(default_factory=list)  # (Namespace, blocks held) by name
    leases: int = 0
    write_behind_pending: int = 0
