"""What the client, the core and the tiers share: tier names, slots and byte buffers.

Dependency-free (the standard library only), so that importing it costs an engine process
nothing: the storage back ends (RocksDB, CUDA) stay behind ``kvd.tiers``' own modules.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class TierName(StrEnum):
    """A tier of the hierarchy. A member is its name as a string (``"dram"``)."""

    HBM = "hbm"
    DRAM = "dram"
    NVME = "nvme"
    CLUSTER = "cluster"  # the cluster tier every node reads (kvd.cluster); not the core's hierarchy


HBM, DRAM, NVME, CLUSTER = TierName.HBM, TierName.DRAM, TierName.NVME, TierName.CLUSTER
TIER_NAMES: tuple[TierName, ...] = (HBM, DRAM, NVME)  # the node's own, fastest first; demotion goes one step right
ALL_TIERS: tuple[TierName, ...] = (*TIER_NAMES, CLUSTER)  # fastest first: the node's own, then the cluster
# Wire codes of the tiers (the kvd.v1.Tier enum's values; 0 is "unspecified").
TIER_CODES: dict[TierName, int] = {HBM: 1, DRAM: 2, NVME: 3, CLUSTER: 4}
TIER_BY_CODE: dict[int, TierName] = {code: tier for tier, code in TIER_CODES.items()}

Buffer = bytes | bytearray | memoryview  # anything exposing the buffer protocol


@dataclass(frozen=True, slots=True)
class Slot:
    """A contiguous byte range of a tier's address space.

    ``offset`` and ``length`` are bytes, both multiples of the tier's page size; ``length``
    is the block's size rounded up to whole pages.
    """

    offset: int
    length: int

    @property
    def end(self) -> int:
        return self.offset + self.length


def byte_view(buf: Buffer, *, writable: bool) -> memoryview:
    """A flat unsigned-byte view of any C-contiguous buffer (ValueError otherwise)."""
    mv = memoryview(buf)
    if writable and mv.readonly:
        raise ValueError("output buffer is read-only")
    if not mv.c_contiguous:
        raise ValueError("buffer must be C-contiguous")
    return mv if mv.format == "B" and mv.ndim == 1 else mv.cast("B")
