"""Data movement between an engine's paged KV layout and kvd's contiguous blocks.

Imported as ``kvd.native``. An engine hands over one cache per layer; one axis of each
indexes blocks. kvd stores one contiguous *slot* per block: that block's bytes from every
layer, layer 0 first. :class:`PagedKv` (:mod:`kvd.native.paged`) gathers chosen blocks into
slots and scatters them back, on the host (numpy), with torch (the reference; CUDA without
CuPy) or with CUDA kernels CuPy compiles at run time. :func:`layout_of` reads where a
layer's blocks lie from its shape and strides.

``gather_blocks``/``scatter_blocks`` are the single-array host helpers (one C-contiguous,
blocks-first array, a buffer per block). torch and CuPy are optional: nothing here imports
them until a call needs them.
"""

from kvd.native.host import gather_blocks, scatter_blocks
from kvd.native.layout import BlockLayout, layout_of
from kvd.native.paged import BACKENDS, PagedKv

__all__ = ["BACKENDS", "BlockLayout", "PagedKv", "gather_blocks", "layout_of", "scatter_blocks"]
