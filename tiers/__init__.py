"""Storage mechanisms (imported as ``kvd.tiers``): bytes and slots, no decisions."""

from kvd.tiers.alloc import ExtentAllocator, Slot
from kvd.tiers.base import TIER_CODES, TIER_NAMES, CorruptBlockError, Tier
from kvd.tiers.dram import HEADER_BYTES, ArenaHeader, ArenaMapping, DramArena, open_arena
from kvd.tiers.nvme import ManifestEntry, NvmeStore

__all__ = [
    "HEADER_BYTES",
    "TIER_CODES",
    "TIER_NAMES",
    "ArenaHeader",
    "ArenaMapping",
    "CorruptBlockError",
    "DramArena",
    "ExtentAllocator",
    "ManifestEntry",
    "NvmeStore",
    "Slot",
    "Tier",
    "open_arena",
]
