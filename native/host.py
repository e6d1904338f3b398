"""Host implementation of gather/scatter over numpy arrays (no GPU needed).

Units: ``cache`` has shape ``(num_blocks, ...)``; a block's bytes are
``cache[0].nbytes``; every output/input buffer must hold at least that many bytes.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from kvd.native import copy as native_copy


def _block_view(cache: np.ndarray, buf) -> np.ndarray:
    raw = np.frombuffer(buf, dtype=np.uint8)
    need = cache[0].nbytes
    if raw.nbytes < need:
        raise ValueError(f"buffer of {raw.nbytes} bytes is smaller than a block ({need} bytes)")
    return raw[:need].view(cache.dtype).reshape(cache.shape[1:])


def _check(cache: np.ndarray, block_ids: Sequence[int], buffers: Sequence) -> None:
    if cache.ndim < 1 or not cache.flags.c_contiguous:
        raise ValueError("cache must be a C-contiguous array with blocks on the first axis")
    if len(block_ids) != len(buffers):
        raise ValueError(f"{len(block_ids)} block ids but {len(buffers)} buffers")
    for b in block_ids:
        if not 0 <= b < cache.shape[0]:
            raise ValueError(f"block id {b} is outside the cache's {cache.shape[0]} blocks")


def gather_blocks(cache: np.ndarray, block_ids: Sequence[int], outs: Sequence) -> None:
    """Copy ``cache[block_ids[i]]`` into the writable buffer ``outs[i]``."""
    _check(cache, block_ids, outs)
    for b, out in zip(block_ids, outs):
        _block_view(cache, out)[...] = cache[b]


def scatter_blocks(cache: np.ndarray, block_ids: Sequence[int], ins: Sequence) -> None:
    """Copy the buffer ``ins[i]`` into ``cache[block_ids[i]]``."""
    _check(cache, block_ids, ins)
    for b, src in zip(block_ids, ins):
        cache[b] = _block_view(cache, src)


def _block_runs(flat: np.ndarray, lay) -> np.ndarray:
    """``flat`` (one cache's bytes) as ``(num_blocks, chunks, chunk_bytes)``; a view."""
    return np.lib.stride_tricks.as_strided(
        flat, (lay.num_blocks, lay.chunks, lay.chunk_bytes), (lay.block_stride, lay.chunk_stride, 1)
    )


def copy_host(paged, ids: list[int], targets: list, to_slots: bool) -> None:
    """The host backend of :class:`kvd.native.paged.PagedKv`: every (slot, layer) run of
    bytes between the blocks and their slots. Arguments are already checked.

    With the compiled helper (:mod:`kvd.native.copy`, :data:`RUNS` not None) a layer's runs
    of every slot in one buffer go in one call, the GIL released and the bytes streamed past
    the cache; without it, one numpy copy per (slot, layer) (numpy rather than torch: its
    per-copy overhead is lower, docs/decisions.md, "Data path").
    """
    if RUNS is None:
        _copy_numpy(paged, ids, targets, to_slots)
        return
    flats = [_as_numpy(f) for f in paged.flat()]
    by_buffer: dict[int, tuple[object, list[int], list[int]]] = {}
    for b, t in zip(ids, targets):
        entry = by_buffer.setdefault(id(t.buf), (t.buf, [], []))
        entry[1].append(b)
        entry[2].append(t.offset)
    for buf, blocks, offsets in by_buffer.values():
        blocks_at = np.asarray(blocks, dtype=np.int64)[:, None]
        slots_at = np.asarray(offsets, dtype=np.int64)[:, None]
        for flat, lay, loff in zip(flats, paged.layouts, paged.layer_offsets):
            chunk = np.arange(lay.chunks, dtype=np.int64)[None, :]
            in_cache = (blocks_at * lay.block_stride + chunk * lay.chunk_stride).ravel()
            in_slot = (slots_at + loff + chunk * lay.chunk_bytes).ravel()
            lengths = np.full(in_cache.size, lay.chunk_bytes, dtype=np.int64)
            if to_slots:
                RUNS(buf, in_slot, flat, in_cache, lengths)
            else:
                RUNS(flat, in_cache, buf, in_slot, lengths)


def _as_numpy(flat) -> np.ndarray:
    return flat if isinstance(flat, np.ndarray) else flat.numpy()


def _copy_numpy(paged, ids: list[int], targets: list, to_slots: bool) -> None:
    """One numpy copy per (slot, layer) between a block's runs and the slot's bytes."""
    views = [_block_runs(_as_numpy(f), lay) for f, lay in zip(paged.flat(), paged.layouts)]
    shapes = [(lay.chunks, lay.chunk_bytes) for lay in paged.layouts]
    sizes = [lay.block_bytes for lay in paged.layouts]
    for b, t in zip(ids, targets):
        for view, shape, size, loff in zip(views, shapes, sizes, paged.layer_offsets):
            start = t.offset + loff
            slot = t.buf[start : start + size].reshape(shape)
            if to_slots:
                slot[...] = view[b]
            else:
                view[b] = slot


# The compiled helper's copy_runs, or None (the numpy copies): chosen at import, as
# kvd.native.copy chooses (KVD_NATIVE_COPY=numpy forces numpy).
RUNS = getattr(native_copy.IMPLEMENTATIONS.get("c"), "copy_runs", None)
