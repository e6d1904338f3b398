"""Gather an engine's paged blocks into kvd slots, and scatter them back.

:class:`PagedKv` wraps the per-layer caches an engine registers once (numpy arrays or torch
tensors, CPU or CUDA) with their :class:`~kvd.native.layout.BlockLayout`. Then

- ``gather(block_ids, dst, offsets)`` copies block ``block_ids[i]`` of every layer into slot
  ``i``: ``dst[offsets[i] : offsets[i] + slot_bytes]``, layer 0's bytes first;
- ``scatter(block_ids, src, offsets)`` is the reverse.

``dst``/``src`` is one byte buffer with a byte offset per slot (a shared-memory arena mapping
and the daemon's slot offsets; a staging tensor; an HBM pool), one buffer per slot (offsets
omitted), or one staging buffer with offsets omitted (slot ``i`` at ``i * slot_bytes``).

Backends, chosen per call unless one is asked for:

- ``host``: numpy copies of byte views (CPU caches; torch CPU tensors are viewed, not copied);
- ``torch``: torch ``copy_`` per (slot, layer): the correctness reference, and what CUDA
  caches use when CuPy is absent;
- ``cuda``: one CuPy RawKernel launch for all blocks (CUDA caches, CuPy present).

Every backend returns only after the bytes are in place. Errors are ValueError: a block id
outside the cache, a slot past the end of its buffer, slots that overlap (a gather would
race), a block id twice in one scatter, a read-only destination.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from kvd.native.layout import layout_of

BACKENDS = ("auto", "host", "torch", "cuda")


def _is_torch(x: Any) -> bool:
    return type(x).__module__.startswith("torch") and hasattr(x, "data_ptr")


@dataclass(frozen=True, slots=True)
class Target:
    """A slot's buffer, flattened to bytes (numpy uint8 array or 1-D torch uint8 tensor),
    and the slot's byte offset in it."""

    buf: Any
    offset: int


class PagedKv:
    """Per-layer paged caches and their layouts; the engine-side end of kvd's data path.

    ``caches`` must all be numpy arrays, or all torch tensors on one device. ``block_dim``
    and ``num_blocks`` help find the block axis (see :func:`~kvd.native.layout.layout_of`).
    The caches must stay alive and keep their storage while this object is used.
    """

    def __init__(
        self, caches: Sequence[Any], *, block_dim: int | None = None, num_blocks: int | None = None
    ) -> None:
        caches = list(caches)
        if not caches:
            raise ValueError("no caches given")
        self.is_torch = _is_torch(caches[0])
        if any(_is_torch(c) != self.is_torch for c in caches):
            raise ValueError("caches must all be numpy arrays or all torch tensors")
        if self.is_torch:
            devices = {str(c.device) for c in caches}
            if len(devices) != 1:
                raise ValueError(f"caches are on several devices: {sorted(devices)}")
            self.device = devices.pop()
            self.layouts = [
                layout_of(tuple(c.shape), tuple(c.stride()), c.element_size(), block_dim=block_dim,
                          num_blocks=num_blocks)
                for c in caches
            ]
        else:
            self.device = "cpu"
            self.layouts = []
            for c in caches:
                if c.itemsize == 0 or any(s % c.itemsize for s in c.strides):
                    raise ValueError("numpy cache strides must be whole elements")
                elems = tuple(s // c.itemsize for s in c.strides)
                self.layouts.append(
                    layout_of(c.shape, elems, c.itemsize, block_dim=block_dim, num_blocks=num_blocks)
                )
        nb = {lay.num_blocks for lay in self.layouts}
        if len(nb) != 1:
            raise ValueError(f"layers disagree on the number of blocks: {sorted(nb)}")
        self.num_blocks = nb.pop()
        self.caches = caches
        self.layer_offsets: list[int] = []
        off = 0
        for lay in self.layouts:
            self.layer_offsets.append(off)
            off += lay.block_bytes
        self.slot_bytes = off  # one kvd block: this block of every layer
        self._flat: list[Any] | None = None  # byte views of the caches, made on first use
        self._cuda = None  # the compiled kernels' per-layer tables, made on first CUDA call

    @property
    def on_cuda(self) -> bool:
        return self.device.startswith("cuda")

    # -- public API -----------------------------------------------------------------------
    def gather(self, block_ids: Sequence[int], dst: Any, offsets: Sequence[int] | None = None,
               *, backend: str = "auto") -> str:
        """Copy each block into its slot; returns the backend that did it."""
        return self._run(block_ids, dst, offsets, backend, to_slots=True)

    def scatter(self, block_ids: Sequence[int], src: Any, offsets: Sequence[int] | None = None,
                *, backend: str = "auto") -> str:
        """Copy each slot back into its block; returns the backend that did it."""
        return self._run(block_ids, src, offsets, backend, to_slots=False)

    def choose_backend(self, backend: str = "auto") -> str:
        """The backend a call with ``backend`` would use (ValueError when it cannot run)."""
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        if backend == "auto":
            if not self.on_cuda:
                return "host"
            from kvd.native.cuda import cupy_available

            return "cuda" if cupy_available() else "torch"
        if backend == "host" and self.on_cuda:
            raise ValueError("the host backend cannot reach CUDA caches")
        if backend == "torch" and not self.is_torch:
            raise ValueError("the torch backend needs torch tensors")
        if backend == "cuda":
            from kvd.native.cuda import cupy_available

            if not self.on_cuda:
                raise ValueError("the cuda backend needs CUDA caches")
            if not cupy_available():
                raise ValueError("the cuda backend needs CuPy (pip install 'kvd[cuda]')")
        return backend

    # -- internals ------------------------------------------------------------------------
    def _run(self, block_ids: Sequence[int], buf: Any, offsets: Sequence[int] | None, backend: str,
             to_slots: bool) -> str:
        backend = self.choose_backend(backend)
        ids = [int(b) for b in block_ids]
        for b in ids:
            if not 0 <= b < self.num_blocks:
                raise ValueError(f"block id {b} is outside the cache's {self.num_blocks} blocks")
        if not to_slots and len(set(ids)) != len(ids):
            raise ValueError("a block id appears twice in one scatter (which slot wins is undefined)")
        targets = self._targets(buf, offsets, len(ids), writable=to_slots, as_torch=backend != "host")
        if backend == "host":
            from kvd.native.host import copy_host

            copy_host(self, ids, targets, to_slots)
        elif backend == "torch":
            from kvd.native.reference import copy_torch

            copy_torch(self, ids, targets, to_slots)
        else:
            from kvd.native.cuda import copy_cuda

            copy_cuda(self, ids, targets, to_slots)
        return backend

    def flat(self) -> list[Any]:
        """Each cache as a flat byte array/tensor from its first byte (``span_bytes`` long)."""
        if self._flat is None:
            out = []
            for c, lay in zip(self.caches, self.layouts):
                if self.is_torch:
                    itemsize = c.element_size()
                    out.append(c.as_strided((lay.span_bytes // itemsize,), (1,)).view(_torch().uint8))
                else:
                    view = np.lib.stride_tricks.as_strided(c, (lay.span_bytes // c.itemsize,), (c.itemsize,))
                    out.append(view.view(np.uint8))
            self._flat = out
        return self._flat

    def _targets(self, buf: Any, offsets: Sequence[int] | None, n: int, *, writable: bool,
                 as_torch: bool) -> list[Target]:
        if isinstance(buf, list | tuple):
            if offsets is not None:
                raise ValueError("give offsets with one buffer, not with a buffer per slot")
            if len(buf) != n:
                raise ValueError(f"{n} block ids but {len(buf)} slot buffers")
            flats = [_flat_bytes(b, writable, as_torch) for b in buf]
            targets = [Target(f, 0) for f in flats]
        else:
            flat = _flat_bytes(buf, writable, as_torch)
            offs = [i * self.slot_bytes for i in range(n)] if offsets is None else [int(o) for o in offsets]
            if len(offs) != n:
                raise ValueError(f"{n} block ids but {len(offs)} offsets")
            targets = [Target(flat, o) for o in offs]
            if writable:
                ordered = sorted(offs)
                for a, b in zip(ordered, ordered[1:]):
                    if b - a < self.slot_bytes:
                        raise ValueError(f"slots at offsets {a} and {b} overlap ({self.slot_bytes}-byte slots)")
        for t in targets:
            size = t.buf.numel() if as_torch else t.buf.size
            if t.offset < 0 or t.offset + self.slot_bytes > size:
                raise ValueError(
                    f"slot [{t.offset}, {t.offset + self.slot_bytes}) is outside its {size}-byte buffer"
                )
        return targets


def _torch():
    import torch

    return torch


def _flat_bytes(buf: Any, writable: bool, as_torch: bool) -> Any:
    """``buf`` as a flat uint8 numpy array (``as_torch`` False) or 1-D torch tensor."""
    if _is_torch(buf):
        if not buf.is_contiguous():
            raise ValueError("slot buffers must be contiguous")
        t = buf.reshape(-1).view(_torch().uint8)
        if as_torch:
            return t
        if t.device.type != "cpu":
            raise ValueError(f"the host backend cannot reach a buffer on {t.device}")
        return t.numpy()
    if isinstance(buf, np.ndarray):
        if not buf.flags.c_contiguous:
            raise ValueError("slot buffers must be contiguous")
        arr = buf.reshape(-1).view(np.uint8)
    else:
        mv = memoryview(buf)
        if not mv.c_contiguous:
            raise ValueError("slot buffers must be contiguous")
        arr = np.frombuffer(mv.cast("B") if mv.format != "B" or mv.ndim != 1 else mv, dtype=np.uint8)
    if writable and not arr.flags.writeable:
        raise ValueError("the slot buffer is read-only")
    if not as_torch:
        return arr
    with warnings.catch_warnings():
        # torch warns on read-only memory; a scatter source is only read.
        warnings.simplefilter("ignore", UserWarning)
        return _torch().from_numpy(arr)
