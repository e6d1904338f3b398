"""Sharing the HBM pool with engine processes on the node.

The daemon owns the pool; an engine's connector opens it to copy blocks between its paged
cache and the pool's slots on the device (DESIGN.md: "a block there reaches the engine's
paged cache by a device-to-device copy"). Two kinds of pool, one protocol:

- ``cuda_ipc``: a CUDA pool made with ``cudaMalloc`` (CuPy's ``cupy.cuda.Memory``, one
  allocation of its own, so the IPC handle names exactly the pool and offsets need no
  correction); engines open it with ``cudaIpcOpenMemHandle``. torch alone has no public IPC
  API, so a pool made without CuPy cannot be shared.
- ``file``: a host pool (``device="cpu"``) in a shared-memory file that engines map. It is
  how the tier's whole path — daemon, client, connector — runs where no GPU is lent.

Both sides see the pool as a 1-D uint8 torch tensor; slot offsets index it directly.
"""

from __future__ import annotations

import contextlib
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
    pool (a daemon restart makes a new one); ``path`` for ``file``, ``ipc`` (the 64-byte
    cudaIpcMemHandle) and ``device_index`` for ``cuda_ipc``. Sizes in bytes."""

    kind: str
    capacity_bytes: int
    pool_id: bytes
    path: str = ""
    ipc: bytes = b""
    device_index: int = 0


class SharedPool:
    """The daemon's side: the pool's memory, its tensor, and its handle (None: unshareable)."""

    def __init__(self, tensor: Any, handle: PoolHandle | None, keep: Any = None, path: Path | None = None) -> None:
        self.tensor = tensor
        self._handle = handle
        self._keep = keep  # the CuPy allocation the tensor views
        self._path = path

    @property
    def handle(self) -> PoolHandle:
        if self._handle is None:
            raise PoolUnshareable(
                f"this {self.tensor.device} pool cannot be opened by engines: a CUDA pool needs CuPy "
                "(pip install 'kvd[cuda]'), a host pool a shared-memory directory"
            )
        return self._handle

    @classmethod
    def create(cls, torch: Any, capacity_bytes: int, device: str, share_dir: Path | None) -> SharedPool:
        pool_id = secrets.token_bytes(16)
        if device.startswith("cuda"):
            index = torch.device(device).index or 0
            cupy = _cupy()
            if cupy is None:
                return cls(torch.empty(capacity_bytes, dtype=torch.uint8, device=device), None)
            with cupy.cuda.Device(index):
                mem = cupy.cuda.Memory(capacity_bytes)
                ipc = bytes(cupy.cuda.runtime.ipcGetMemHandle(mem.ptr))
                handle = PoolHandle("cuda_ipc", capacity_bytes, pool_id, ipc=ipc, device_index=index)
                array = cupy.ndarray((capacity_bytes,), dtype=cupy.uint8, memptr=cupy.cuda.MemoryPointer(mem, 0))
            return cls(torch.from_dlpack(array), handle, keep=(mem, array))
        if share_dir is None:
            return cls(torch.empty(capacity_bytes, dtype=torch.uint8, device=device), None)
        path = Path(share_dir) / f"kvd-hbm-{os.getpid()}-{pool_id.hex()[:12]}"
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o660)
        try:
            os.posix_fallocate(fd, 0, capacity_bytes)  # reserve now: a full tmpfs fails here, not later
        except OSError:
            os.close(fd)
            path.unlink(missing_ok=True)
            raise
        os.close(fd)
        tensor = torch.from_file(str(path), shared=True, size=capacity_bytes, dtype=torch.uint8)
        return cls(tensor, PoolHandle("file", capacity_bytes, pool_id, path=str(path)), path=path)

    def close(self) -> None:
        self._keep = None
        if self._path is not None:
            self._path.unlink(missing_ok=True)
            self._path = None


class OpenedPool:
    """An engine's view of a daemon's pool: ``tensor`` (1-D uint8, the pool's bytes, on its
    device) until :meth:`close`. Opening the same handle twice maps it twice."""

    def __init__(self, handle: PoolHandle) -> None:
        if handle.kind not in KINDS:
            raise ValueError(f"unknown pool kind {handle.kind!r}; known: {', '.join(KINDS)}")
        import torch

        self.handle = handle
        self._ptr: int | None = None
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
        with cupy.cuda.Device(handle.device_index):
            self._ptr = rt.ipcOpenMemHandle(handle.ipc, rt.cudaIpcMemLazyEnablePeerAccess)
            mem = cupy.cuda.UnownedMemory(self._ptr, handle.capacity_bytes, self, handle.device_index)
            array = cupy.ndarray((handle.capacity_bytes,), dtype=cupy.uint8, memptr=cupy.cuda.MemoryPointer(mem, 0))
        self.tensor = torch.from_dlpack(array)

    @property
    def pool_id(self) -> bytes:
        return self.handle.pool_id

    def close(self) -> None:
        """Drop the mapping. The caller must hold no views of ``tensor`` any more."""
        self.tensor = None
        if self._ptr is not None:
            with contextlib.suppress(Exception):  # the daemon may be gone: nothing left to undo
                _cupy().cuda.runtime.ipcCloseMemHandle(self._ptr)
            self._ptr = None


def _cupy():
    try:
        import cupy
    except ImportError:
        return None
    return cupy
