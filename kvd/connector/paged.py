"""The worker side's view of an engine's paged KV caches, over :class:`kvd.native.PagedKv`.

vLLM (0.32, 0.33) hands a connector one tensor per attention layer with its blocks on axis 0:
``num_blocks`` engine blocks, or ``num_blocks * r`` kernel blocks when the attention kernel's
block is ``1/r`` of the engine's (vLLM's own offloading connector relies on the same). The
rest of the shape is the attention backend's business and is read from the strides, never
assumed (:func:`kvd.native.layout_of`).

A kvd block (a *slot*) is the bytes of one engine block in every layer, layer 0 first; with
kernel blocks, engine block ``b``'s slot holds its ``r`` kernel blocks in order inside each
layer's part. Every copy goes straight between the caches and the caller's slots: the
daemon's shared-memory arena at the offsets PrepareStore/PrepareLoad grant, or a staging
buffer when block bytes must travel inline (a remote daemon).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from kvd.native import PagedKv


def blocks_first(name: str, cache: torch.Tensor, num_blocks: int) -> torch.Tensor:
    """``cache`` as ``(num_blocks, ...)`` (a view): kernel blocks grouped under their engine
    block. ValueError when axis 0 is not ``num_blocks`` or a multiple of it."""
    if cache.dim() < 2 or cache.shape[0] % num_blocks:
        raise ValueError(
            f"layer {name}: a cache of shape {tuple(cache.shape)} does not have {num_blocks} blocks "
            f"(or a multiple) on axis 0, as vLLM hands caches to connectors"
        )
    if cache.shape[0] == num_blocks:
        return cache
    return cache.unflatten(0, (num_blocks, cache.shape[0] // num_blocks))


class PagedCaches:
    """The registered caches of one worker: ``num_blocks`` engine blocks of ``block_bytes``
    bytes (all layers). Copies are :class:`PagedKv`'s (host numpy on the CPU, CUDA kernels
    or torch on a GPU) and return once the bytes are in place."""

    def __init__(self, kv_caches: Mapping[str, torch.Tensor], num_blocks: int) -> None:
        if not kv_caches:
            raise ValueError("no KV caches were registered")
        if num_blocks <= 0:
            raise ValueError(f"num_blocks must be positive, got {num_blocks}")
        self.names = list(kv_caches)
        views = [blocks_first(name, cache, num_blocks) for name, cache in kv_caches.items()]
        # block_dim explicit: vLLM puts blocks on axis 0, and inferring the axis by its size
        # is ambiguous when another axis happens to have num_blocks entries.
        self.paged = PagedKv(views, block_dim=0, num_blocks=num_blocks)
        self.num_blocks = num_blocks
        self.block_bytes = self.paged.slot_bytes
        self.on_cuda = self.paged.on_cuda
        self._staging = np.empty((0, self.block_bytes), dtype=np.uint8)

    def geometry(self) -> str:
        """A description of the layout: layer names, shapes, dtypes and block bytes."""
        return ";".join(
            f"{n}:{tuple(c.shape)}:{c.dtype}:{lay.block_bytes}"
            for n, c, lay in zip(self.names, self.paged.caches, self.paged.layouts)
        )

    def gather(self, block_ids: Sequence[int], dst: Any, offsets: Sequence[int] | None = None) -> None:
        """Blocks ``block_ids`` into slots ``dst[offsets[i]:...]`` (or staging rows)."""
        if block_ids:
            self.paged.gather(block_ids, dst, offsets)

    def scatter(self, block_ids: Sequence[int], src: Any, offsets: Sequence[int] | None = None) -> None:
        """Slots ``src[offsets[i]:...]`` (or staging rows) into blocks ``block_ids``."""
        if block_ids:
            self.paged.scatter(block_ids, src, offsets)

    def staging(self, n: int) -> np.ndarray:
        """``n`` rows of ``block_bytes`` host bytes, reused: the inline path's buffer (block
        bytes sent over gRPC when the daemon's arena cannot be mapped)."""
        if self._staging.shape[0] < n:
            self._staging = np.empty((max(n, 2 * self._staging.shape[0]), self.block_bytes), dtype=np.uint8)
        return self._staging[:n]
