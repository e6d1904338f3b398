"""The torch backend of :class:`kvd.native.paged.PagedKv`: the correctness reference.

One ``Tensor.copy_`` per (slot, layer), between the block's runs (a strided view of the
cache's bytes) and the slot's bytes. It works for any mix of devices torch can copy between
(CUDA caches and a host arena, CPU caches and a CPU staging tensor), so it is also what CUDA
caches use when CuPy is absent. Arguments arrive checked by PagedKv.
"""

from __future__ import annotations


def copy_torch(paged, ids: list[int], targets: list, to_slots: bool) -> None:
    views = [
        flat.as_strided((lay.num_blocks, lay.chunks, lay.chunk_bytes), (lay.block_stride, lay.chunk_stride, 1))
        for flat, lay in zip(paged.flat(), paged.layouts)
    ]
    for b, t in zip(ids, targets):
        for view, lay, loff in zip(views, paged.layouts, paged.layer_offsets):
            start = t.offset + loff
            slot = t.buf[start : start + lay.block_bytes].view(lay.chunks, lay.chunk_bytes)
            if to_slots:
                slot.copy_(view[b])
            else:
                view[b].copy_(slot)
    if paged.on_cuda:
        import torch

        torch.cuda.synchronize(paged.device)  # a copy to or from host memory may still be queued
