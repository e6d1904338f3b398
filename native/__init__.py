"""Data movement between an engine's paged KV layout and kvd's contiguous blocks.

Imported as ``kvd.native``. An engine's cache is an array whose first axis is the block id
(vLLM hands its per-layer caches over blocks first); kvd stores one contiguous run of bytes
per block. ``gather_blocks`` packs chosen blocks of such an array into contiguous buffers,
``scatter_blocks`` writes them back. This module is the host (numpy) implementation; GPU
kernels that do the same on device memory load at run time when CUDA is present.
"""

from kvd.native.host import gather_blocks, scatter_blocks

__all__ = ["gather_blocks", "scatter_blocks"]
