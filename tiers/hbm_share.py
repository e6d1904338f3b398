"""Sharing the HBM pool with engine processes on the node.

The daemon owns the pool; an engine's connector opens it to copy blocks between its paged
cache and the pool's slots on the device, so a block there reaches the engine's paged cache
by a device-to-device copy. Two kinds of pool, one protocol:

- ``cuda_ipc``: a CUDA pool made with ``cudaMalloc`` (CuPy's ``cupy.cuda.Memory``, one
  allocation of its own, so the IPC handle names exactly the pool and offsets need no
  correction); engines open it with ``cudaIpcOpenMemHandle``. The GPU is named by its PCI
  bus id, not by an index (indexes depend on each process's ``CUDA_VISIBLE_DEVICES``).
  torch alone has no public IPC API, so a pool made without CuPy cannot be shared.
- ``file``: a host pool (``device="cpu"``) in a shared-memory file that engines map. It is
  how the tier's whole path — daemon, client, connector — runs on a machine without a GPU.

Both sides see the pool as a 1-D uint8 torch tensor; slot offsets index it directly.

An engine's mapping lives as long as any view of it: :meth:`OpenedPool.close` drops the
pool's tensor, and the CUDA mapping is closed (after the device is synchronized) only when
the last tensor made from it is gone, so a copy running on another thread is never left
reading unmapped memory.
"""

from __future__ import annotations

import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any

KINDS = ("cuda_ipc", "file")


class PoolUnshareable(RuntimeError):
    """The pool cannot be opened by another process (the message says why)."""


@dataclass(frozen=True)
class PoolHandle:
    """How another process on this node opens a pool. ``pool_id``: 16 random bytes of this
    pool (a daemon restart makes a new one); ``path`` for ``file``; ``ipc`` (the 64-byte
    cudaIpcMemHandle) and ``pci_bus_id`` (the GPU) for ``cuda_ipc``. Sizes in bytes."""

    kind: str
    capacity_bytes: int
    pool_id: bytes
    path: str = ""
    ipc: bytes = b""
    pci_bus_id: str = ""


class SharedPool:
    """The daemon's side: the pool's memory, its tensor, and its handle (None: unshareable,
    with ``why``)."""

    def __init__(
        self, tensor: Any, handle: PoolHandle | None, keep: Any = None, path: Path | None = None, why: str = ""
    ) -> None:
        self.tensor = tensor
        self._handle = handle
        self._keep = keep  # the CuPy allocation the tensor views
        self._path = path
        self._why = why

    @property
    def handle(self) -> PoolHandle:
        if self._handle is None:
            raise PoolUnshareable(f"this {self.tensor.device} pool cannot be opened by engines: {self._why}")
        return self._handle

    @classmethod
    def create(cls, torch: Any, capacity_bytes: int, device: str, share_path: Path | None) -> SharedPool:
        """``share_path``: where a host pool's file goes (an existing one is replaced: a
        crashed daemon's). Raises what the allocation raises (out of memory)."""
        pool_id = secrets.token_bytes(16)
        if device.startswith("cuda"):
            return cls._create_cuda(torch, capacity_bytes, device, pool_id)
        if share_path is None:
            return cls(torch.empty(capacity_bytes, dtype=torch.uint8, device=device), None, why="no shared-memory file")
        share_path = Path(share_path)
        share_path.unlink(missing_ok=True)
        fd = os.open(share_path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o660)
        try:
            os.fchmod(fd, 0o660)  # not the umask's: engines of the socket's group map it
            os.posix_fallocate(fd, 0, capacity_bytes)  # reserve now: a full tmpfs fails here, not later
        except OSError:
            os.close(fd)
            share_path.unlink(missing_ok=True)
            raise
        os.close(fd)
        tensor = torch.from_file(str(share_path), shared=True, size=capacity_bytes, dtype=torch.uint8)
        return cls(tensor, PoolHandle("file", capacity_bytes, pool_id, path=str(share_path)), path=share_path)

    @classmethod
    def _create_cuda(cls, torch: Any, capacity_bytes: int, device: str, pool_id: bytes) -> SharedPool:
        index = torch.device(device).index or 0
        cupy = _cupy()
        if cupy is None:
            tensor = torch.empty(capacity_bytes, dtype=torch.uint8, device=device)
            return cls(tensor, None, why="a CUDA pool needs CuPy to be shared (pip install 'kvd[cuda]')")
        with cupy.cuda.Device(index):
            mem = cupy.cuda.Memory(capacity_bytes)
            array = cupy.ndarray((capacity_bytes,), dtype=cupy.uint8, memptr=cupy.cuda.MemoryPointer(mem, 0))
            tensor = torch.from_dlpack(array)
            try:
                ipc = bytes(cupy.cuda.runtime.ipcGetMemHandle(mem.ptr))
                bus = cupy.cuda.runtime.deviceGetPCIBusId(index)
            except Exception as exc:  # noqa: BLE001 - CUDA without IPC (WSL, some drivers): no HBM tier
                return cls(tensor, None, keep=(mem, array), why=f"CUDA IPC is not available ({exc})")
        handle = PoolHandle("cuda_ipc", capacity_bytes, pool_id, ipc=ipc, pci_bus_id=str(bus))
        return cls(tensor, handle, keep=(mem, array))

    def close(self) -> None:
        self.tensor = None
        self._keep = None
        if self._path is not None:
            self._path.unlink(missing_ok=True)
            self._path = None


class _IpcMapping:
    """An opened CUDA IPC mapping; closed when the last memory view of it is gone."""

    def __init__(self, cupy: Any, ptr: int, device: int) -> None:
        self._cupy, self.ptr, self.device = cupy, ptr, device

    def __del__(self) -> None:
        try:
            with self._cupy.cuda.Device(self.device):
                self._cupy.cuda.runtime.deviceSynchronize()  # no copy may still read it
                self._cupy.cuda.runtime.ipcCloseMemHandle(self.ptr)
        except Exception:  # noqa: BLE001 - at exit, or the daemon gone: nothing left to undo
            pass


class OpenedPool:
    """An engine's view of a daemon's pool: ``tensor`` (1-D uint8, the pool's bytes, on its
    device) until :meth:`close`. Raises ValueError for a handle that does not fit, and
    PoolUnshareable (no CuPy) or CUDA's own errors when the pool cannot be opened here."""

    def __init__(self, handle: PoolHandle) -> None:
        if handle.kind not in KINDS:
            raise ValueError(f"unknown pool kind {handle.kind!r}; known: {', '.join(KINDS)}")
        import torch

        self.handle = handle
        if handle.kind == "file":
            size = os.stat(handle.path).st_size
            if size != handle.capacity_bytes:
                raise ValueError(f"{handle.path}: {size} bytes, the daemon says {handle.capacity_bytes}")
            self.tensor = torch.from_file(handle.path, shared=True, size=size, dtype=torch.uint8)
            return
        cupy = _cupy()
        if cupy is None:
            raise PoolUnshareable("opening a CUDA pool needs CuPy (pip install 'kvd[cuda]')")
        rt = cupy.cuda.runtime
        index = rt.deviceGetByPCIBusId(handle.pci_bus_id)  # this process's index of that GPU
        with cupy.cuda.Device(index):
            ptr = rt.ipcOpenMemHandle(handle.ipc, rt.cudaIpcMemLazyEnablePeerAccess)
            mem = cupy.cuda.UnownedMemory(ptr, handle.capacity_bytes, _IpcMapping(cupy, ptr, index), index)
            array = cupy.ndarray((handle.capacity_bytes,), dtype=cupy.uint8, memptr=cupy.cuda.MemoryPointer(mem, 0))
        self.tensor = torch.from_dlpack(array)

    @property
    def pool_id(self) -> bytes:
        return self.handle.pool_id

    def close(self) -> None:
        """Drop this view of the pool; the mapping goes once no tensor made from it is left."""
        self.tensor = None


def _cupy():
    try:
        import cupy
    except ImportError:
        return None
    return cupy
