"""The cuda backend of :class:`kvd.native.paged.PagedKv`: CuPy RawKernels compiled at run time.

One launch moves every (slot, layer, run) of a call: the grid is ``(slots, layers,
max runs a block has)``, and each thread block copies one contiguous run with 16-byte
vector loads/stores when source, destination and length are 16-byte aligned (bytewise
otherwise). Slots live in device memory (an HBM pool, a staging tensor) or in host memory
registered with CUDA (:func:`pin`, e.g. the shared-memory arena), which the kernel reaches
over the bus by its unified address.

The kernel runs on torch's current stream of the caches' device and the call waits for it,
so the bytes are in place on return, as with every backend. CuPy is optional: importing
this module never imports it; :func:`cupy_available` says whether this backend can run.
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np

_SOURCE = r"""
extern "C" __global__ void kvd_copy_runs(
    const unsigned long long* cache_ptrs,   // per layer: address of the cache's first byte
    const long long* block_stride,          // per layer, bytes
    const long long* chunk_stride,          // per layer, bytes
    const long long* chunk_bytes,           // per layer, bytes
    const int* chunks,                      // per layer: runs in one block
    const long long* layer_offset,          // per layer: offset in a slot, bytes
    const long long* block_ids,             // per slot
    const unsigned long long* slot_ptrs,    // per slot: address of the slot's first byte
    const int to_slots)
{
    const int s = blockIdx.x, l = blockIdx.y, j = blockIdx.z;
    if (j >= chunks[l]) return;
    const long long n = chunk_bytes[l];
    char* cache = (char*)cache_ptrs[l] + block_ids[s] * block_stride[l] + j * chunk_stride[l];
    char* slot = (char*)slot_ptrs[s] + layer_offset[l] + j * n;
    const char* src = to_slots ? cache : slot;
    char* dst = to_slots ? slot : cache;
    if ((((unsigned long long)src | (unsigned long long)dst | (unsigned long long)n) & 15) == 0) {
        const int4* s4 = (const int4*)src;
        int4* d4 = (int4*)dst;
        for (long long i = threadIdx.x; i < n / 16; i += blockDim.x) d4[i] = s4[i];
    } else {
        for (long long i = threadIdx.x; i < n; i += blockDim.x) dst[i] = src[i];
    }
}
"""

THREADS = 256  # per thread block: 4 KiB per sweep with 16-byte accesses


@functools.cache
def cupy_available() -> bool:
    """True when CuPy imports and sees a CUDA device."""
    try:
        import cupy
    except ImportError:
        return False
    try:
        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:  # CUDARuntimeError without a driver; any failure means "cannot run"
        return False


@functools.cache
def _kernel():
    import cupy

    return cupy.RawKernel(_SOURCE, "kvd_copy_runs")


def pin(buf: Any) -> int:
    """Register host memory (an mmap, a numpy array) with CUDA so kernels can reach it;
    returns its address. Undo with :func:`unpin` before the memory goes away."""
    import cupy

    arr = np.frombuffer(buf, dtype=np.uint8)
    ptr = arr.ctypes.data
    cupy.cuda.runtime.hostRegister(ptr, arr.nbytes, 0)  # cudaHostRegisterDefault
    return ptr


def unpin(ptr: int) -> None:
    import cupy

    cupy.cuda.runtime.hostUnregister(ptr)


def _device_address(ptr: int) -> int:
    """The address a kernel uses for ``ptr``; ValueError for unregistered host memory."""
    import cupy

    attrs = cupy.cuda.runtime.pointerGetAttributes(ptr)
    if attrs.type == 0:  # cudaMemoryTypeUnregistered
        raise ValueError("slot memory on the host must be registered with CUDA first (kvd.native.cuda.pin)")
    return attrs.devicePointer


def _tables(paged) -> dict:
    import cupy

    lays = paged.layouts
    as64 = functools.partial(cupy.asarray, dtype=cupy.int64)
    return {
        "cache_ptrs": cupy.asarray([c.data_ptr() for c in paged.caches], dtype=cupy.uint64),
        "block_stride": as64([lay.block_stride for lay in lays]),
        "chunk_stride": as64([lay.chunk_stride for lay in lays]),
        "chunk_bytes": as64([lay.chunk_bytes for lay in lays]),
        "chunks": cupy.asarray([lay.chunks for lay in lays], dtype=cupy.int32),
        "layer_offset": as64(paged.layer_offsets),
        "max_chunks": max(lay.chunks for lay in lays),
    }


def copy_cuda(paged, ids: list[int], targets: list, to_slots: bool) -> None:
    import cupy
    import torch

    if not ids:
        return
    device = torch.device(paged.device)
    with cupy.cuda.Device(device.index or 0):
        if paged._cuda is None:
            paged._cuda = _tables(paged)
        t = paged._cuda
        bases: dict[int, int] = {}
        slot_ptrs = []
        for tg in targets:
            ptr = tg.buf.data_ptr()
            if ptr not in bases:
                bases[ptr] = ptr if tg.buf.is_cuda else _device_address(ptr)
            slot_ptrs.append(bases[ptr] + tg.offset)
        stream = torch.cuda.current_stream(device)
        with cupy.cuda.ExternalStream(stream.cuda_stream):
            block_ids = cupy.asarray(np.asarray(ids, dtype=np.int64))
            slots = cupy.asarray(np.asarray(slot_ptrs, dtype=np.uint64))
            _kernel()(
                (len(ids), len(paged.layouts), t["max_chunks"]),
                (THREADS,),
                (t["cache_ptrs"], t["block_stride"], t["chunk_stride"], t["chunk_bytes"], t["chunks"],
                 t["layer_offset"], block_ids, slots, np.int32(1 if to_slots else 0)),
            )
        stream.synchronize()
