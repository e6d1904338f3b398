"""The worker side's copies between an engine's paged KV caches and kvd's contiguous blocks.

An engine hands over one tensor per attention layer, its first axis the block id (vLLM 0.32
and 0.33 give per-layer views, blocks first; the rest of the shape is the attention backend's
business and is not looked at). A kvd block is the bytes of that block id in every layer, in
layer order: ``layer_bytes[0]`` bytes of layer 0, then layer 1's, and so on.

``gather`` and ``scatter`` go through a host staging buffer: on a CPU host it is plain memory,
on a GPU host it is pinned so the device copies are DMA. The kvd client then copies between
the staging rows and the daemon's shared-memory arena slots (never inline over gRPC on a
local daemon).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class LayerView:
    name: str
    cache: torch.Tensor  # blocks first: cache[i] is kernel block i of this layer
    block_bytes: int  # bytes of one engine block in this layer (``kernel_blocks`` kernel blocks)


class PagedLayout:
    """The registered caches of one worker. ``num_blocks`` engine blocks; when the attention
    kernel's block is smaller than the engine's, one engine block is ``kernel_blocks``
    consecutive kernel blocks."""

    def __init__(self, kv_caches: Mapping[str, torch.Tensor], num_blocks: int) -> None:
        if not kv_caches:
            raise ValueError("no KV caches were registered")
        if num_blocks <= 0:
            raise ValueError(f"num_blocks must be positive, got {num_blocks}")
        self.num_blocks = num_blocks
        layers: list[LayerView] = []
        ratio = None
        for name, cache in kv_caches.items():
            cache = _blocks_first(name, cache, num_blocks)
            r = cache.shape[0] // num_blocks
            if ratio not in (None, r):
                raise ValueError(f"layer {name}: {r} kernel blocks per block, other layers have {ratio}")
            ratio = r
            layers.append(LayerView(name, cache, r * cache[0].numel() * cache.element_size()))
        self.layers = layers
        self.kernel_blocks = ratio
        self.device = layers[0].cache.device
        self.block_bytes = sum(layer.block_bytes for layer in layers)
        self._staging = torch.empty((0, self.block_bytes), dtype=torch.uint8)

    def geometry(self) -> str:
        """A digest-able description of the layout: layer shapes, dtypes and block bytes."""
        return ";".join(f"{v.name}:{tuple(v.cache.shape)}:{v.cache.dtype}:{v.block_bytes}" for v in self.layers)

    def staging(self, n: int) -> torch.Tensor:
        """``n`` rows of ``block_bytes`` host bytes (reused; pinned on a GPU host)."""
        if self._staging.shape[0] < n:
            pin = self.device.type == "cuda"
            self._staging = torch.empty((max(n, 2 * self._staging.shape[0]), self.block_bytes), dtype=torch.uint8,
                                        pin_memory=pin)
        return self._staging[:n]

    def _kernel_ids(self, block_ids: Sequence[int]) -> torch.Tensor:
        for b in block_ids:
            if not 0 <= b < self.num_blocks:
                raise ValueError(f"block id {b} is outside the cache's {self.num_blocks} blocks")
        r = self.kernel_blocks
        ids = torch.tensor(list(block_ids), dtype=torch.long)
        if r > 1:
            ids = (ids[:, None] * r + torch.arange(r)[None, :]).reshape(-1)
        return ids.to(self.device)

    def gather(self, block_ids: Sequence[int], out: torch.Tensor | None = None) -> torch.Tensor:
        """Blocks ``block_ids`` of every layer into host rows (``out`` or the staging buffer);
        returns the rows, complete (device copies synchronized)."""
        n = len(block_ids)
        rows = self.staging(n) if out is None else out
        if n == 0:
            return rows
        ids = self._kernel_ids(block_ids)
        offset = 0
        for layer in self.layers:
            picked = layer.cache.index_select(0, ids).reshape(n, -1).view(torch.uint8)
            rows[:, offset : offset + layer.block_bytes].copy_(picked, non_blocking=True)
            offset += layer.block_bytes
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()
        return rows

    def scatter(self, block_ids: Sequence[int], rows: torch.Tensor) -> None:
        """Host rows into blocks ``block_ids`` of every layer. On a GPU the copies are queued
        on the current stream, so the forward that follows on it reads the loaded blocks."""
        n = len(block_ids)
        if n == 0:
            return
        if rows.shape[0] != n or rows.shape[1] != self.block_bytes:
            raise ValueError(f"rows of shape {tuple(rows.shape)} for {n} blocks of {self.block_bytes} bytes")
        ids = self._kernel_ids(block_ids)
        offset = 0
        for layer in self.layers:
            cache = layer.cache
            part = rows[:, offset : offset + layer.block_bytes].to(cache.device, non_blocking=True)
            part = part.contiguous().view(cache.dtype).reshape(len(ids), *cache.shape[1:])
            cache.index_copy_(0, ids, part)
            offset += layer.block_bytes


def _blocks_first(name: str, cache: torch.Tensor, num_blocks: int) -> torch.Tensor:
    """``cache`` with the block axis first (a view). vLLM hands caches over blocks first; a
    layout with the block axis elsewhere (e.g. K and V stacked in front) is moved, not copied."""
    if cache.dim() >= 2 and cache.shape[0] >= num_blocks and cache.shape[0] % num_blocks == 0:
        return cache
    axes = [d for d in range(cache.dim()) if cache.shape[d] == num_blocks]
    if len(axes) != 1:
        raise ValueError(
            f"layer {name}: cannot find the block axis of a cache of shape {tuple(cache.shape)} "
            f"({num_blocks} blocks)"
        )
    return cache.movedim(axes[0], 0)
