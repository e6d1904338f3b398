"""HBM tier: a daemon-owned GPU memory pool, allocated once, cut into slots like the others.

The pool is one ``torch.empty(capacity_bytes, dtype=uint8, device="cuda:N")`` made at start
(so the daemon's HBM use is fixed and visible at once, and never fragments the engine's
allocator); :class:`~kvd.tiers.alloc.ExtentAllocator` hands out page runs of it exactly as
for DRAM and NVMe. ``write``/``read_into`` copy between host buffers and a slot and return
when the copy is done; :meth:`HbmPool.view` gives the slot as a device tensor, which
:class:`kvd.native.PagedKv` gathers into and scatters from with a device-to-device copy.

torch is optional: without it, or without a CUDA device, :class:`HbmPool` raises
:class:`HbmUnavailable` with the reason and the daemon runs without an HBM tier.
``device="cpu"`` builds the same pool in host memory; tests use it to run the tier's own
code on machines without a GPU. All sizes are bytes.

Engines on the node open the pool themselves (:meth:`HbmPool.handle`, :mod:`kvd.tiers.hbm_share`):
a CUDA pool through a CUDA IPC handle, a host pool through a shared-memory file.
"""

from __future__ import annotations

import threading
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from kvd.tiers.alloc import ExtentAllocator, Slot
from kvd.tiers.base import Buffer, Tier, byte_view
from kvd.tiers.hbm_share import PoolHandle, SharedPool


def host_tensor(data: Buffer) -> Any:
    """``data`` as a 1-D uint8 CPU tensor sharing its memory (no copy), to copy from."""
    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # torch warns on read-only memory; it is only read
        return torch.from_numpy(np.frombuffer(byte_view(data, writable=False), dtype=np.uint8))


class HbmUnavailable(RuntimeError):
    """No HBM pool can be made here; the message says why (no torch, no CUDA device)."""


def _torch_for(device: str):
    try:
        import torch
    except ImportError:
        raise HbmUnavailable("torch is not installed (pip install 'kvd[torch]')") from None
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise HbmUnavailable(f"torch {torch.__version__} sees no CUDA device")
        index = torch.device(device).index or 0
        if index >= torch.cuda.device_count():
            raise HbmUnavailable(f"{device} does not exist ({torch.cuda.device_count()} CUDA devices)")
    return torch


class HbmPool(Tier):
    """A pool of ``capacity_bytes`` on ``device`` (a positive multiple of ``page_bytes``).

    Thread safety: allocate/free are serialized by a lock; copies into distinct slots may
    run concurrently. Raises HbmUnavailable when the device cannot be used, and whatever
    torch raises (out of memory) when the pool cannot be allocated.
    """

    name = "hbm"

    def __init__(
        self, capacity_bytes: int, page_bytes: int = 4096, device: str = "cuda", share_path: Path | None = None
    ) -> None:
        if capacity_bytes <= 0 or page_bytes <= 0 or capacity_bytes % page_bytes:
            raise ValueError(
                f"capacity_bytes must be a positive multiple of page_bytes {page_bytes}, got {capacity_bytes}"
            )
        self._torch = _torch_for(device)
        self.space = ExtentAllocator([(0, capacity_bytes)], page_bytes)
        self._lock = threading.Lock()
        self._shared = SharedPool.create(self._torch, capacity_bytes, device, share_path)
        self._pool = self._shared.tensor
        self.device = str(self._pool.device)
        self._closed = False

    def handle(self) -> PoolHandle:
        """What an engine process on this node needs to open the pool (:func:`open_pool`):
        the copies between its paged cache and a slot here are then device-to-device."""
        self._require_open()
        return self._shared.handle

    # -- data -----------------------------------------------------------------------------
    @property
    def pool(self) -> Any:
        """The whole pool as a 1-D uint8 tensor (slot offsets index it directly)."""
        self._require_open()
        return self._pool

    def view(self, slot: Slot) -> Any:
        """The slot as a 1-D uint8 device tensor of ``slot.length`` bytes (no copy)."""
        self._require_allocated(slot)
        return self._pool[slot.offset : slot.end]

    def write(self, slot: Slot, data: Buffer) -> None:
        self._require_allocated(slot)
        self.write_range(slot, 0, self._fitting(slot, data))

    def read_into(self, slot: Slot, nbytes: int, out: Buffer) -> None:
        """Copy the first ``nbytes`` of ``slot`` into ``out`` (HBM keeps no checksums)."""
        self._require_allocated(slot)
        if not 0 <= nbytes <= slot.length:
            raise ValueError(f"nbytes {nbytes} outside {slot}")
        dst = byte_view(out, writable=True)
        if dst.nbytes < nbytes:
            raise ValueError(f"output buffer holds {dst.nbytes} bytes, need {nbytes}")
        if nbytes:
            host = self._torch.from_numpy(np.frombuffer(dst, dtype=np.uint8)[:nbytes])
            host.copy_(self._pool[slot.offset : slot.offset + nbytes])
            self._sync()

    def write_range(self, slot: Slot, offset: int, data: Buffer) -> None:
        """Copy ``data`` into ``slot`` at byte ``offset`` (ValueError outside the slot)."""
        self._require_allocated(slot)
        src = byte_view(data, writable=False)
        if offset < 0 or offset + src.nbytes > slot.length:
            raise ValueError(f"{src.nbytes} bytes at {offset} do not fit in {slot}")
        if src.nbytes:
            start = slot.offset + offset
            self._pool[start : start + src.nbytes].copy_(host_tensor(src))
            self._sync()

    def read_range(self, slot: Slot, offset: int, n: int) -> bytes:
        """``n`` bytes of ``slot`` from byte ``offset`` (ValueError outside the slot)."""
        self._require_allocated(slot)
        if offset < 0 or n < 0 or offset + n > slot.length:
            raise ValueError(f"{n} bytes at {offset} lie outside {slot}")
        start = slot.offset + offset
        return self._pool[start : start + n].cpu().numpy().tobytes()

    # -- health ---------------------------------------------------------------------------
    def check(self) -> list[str]:
        problems = [f"allocator: {p}" for p in self.space.check()]
        if self._closed:
            return problems + ["pool is released"]
        if self._pool.numel() != self.space.capacity_bytes:
            problems.append(f"pool holds {self._pool.numel()} bytes, allocator {self.space.capacity_bytes}")
        for slot in self.space.allocated():
            if slot.end > self._pool.numel():
                problems.append(f"{slot} lies outside the pool")
        return problems

    def close(self) -> None:
        """Release the pool (idempotent). Views handed out keep their memory alive; the
        shared-memory file of a host pool is unlinked."""
        if not self._closed:
            self._closed = True
            self._pool = self._pool.new_empty(0)
            self._shared.close()

    def _sync(self) -> None:
        if self._pool.is_cuda:
            self._torch.cuda.synchronize(self._pool.device)

    def _require_open(self) -> None:
        if self._closed:
            raise ValueError("pool is released")

    def _require_allocated(self, slot: Slot) -> None:
        self._require_open()
        if not self.space.is_allocated(slot):
            raise ValueError(f"{slot} is not allocated")
