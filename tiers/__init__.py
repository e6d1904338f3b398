"""Storage mechanisms (imported as ``kvd.tiers``): bytes and slots, no decisions.

The package exports only the pieces that need no storage back end: the extent allocator,
slots, the tier interface, its error and the tier names and wire codes. The tiers
themselves live in their own modules and are imported from there by whoever runs them
(``kvd.tiers.dram``, ``kvd.tiers.nvme``, ``kvd.tiers.hbm``), so that importing
``kvd.tiers`` loads neither RocksDB nor a GPU library.
"""

from kvd.tiers.alloc import ExtentAllocator, Slot
from kvd.tiers.base import TIER_CODES, TIER_NAMES, CorruptBlockError, Tier

__all__ = [
    "TIER_CODES",
    "TIER_NAMES",
    "CorruptBlockError",
    "ExtentAllocator",
    "Slot",
    "Tier",
]
