"""The client's slot copies: block bytes into and out of the slots a daemon grants.

A slot lies in the daemon's shared-memory arena (DRAM; ``SlotRef.offset`` is a file offset
of the :class:`~kvd.tiers.dram.ArenaMapping`) or in its HBM pool (``tier`` TIER_HBM; the
offset is the pool tensor's). A batch's DRAM slots move in one call of
:mod:`kvd.native.copy` (GIL released, large batches streamed past the cache, at about the
machine's bulk memcpy rate); HBM slots one by one through torch. ``pool`` is a callable
that returns the HBM pool's 1-D uint8 tensor (and raises when the daemon announced none).
Sizes are bytes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from kvd.tiers.dram import HEADER_BYTES, ArenaMapping
from kvd.tiers.hbm import host_tensor
from kvd.v1 import types_pb2

Pool = Callable[[], Any]


def fill(arena: ArenaMapping, pool: Pool, slots: Sequence, blocks: Sequence) -> None:
    """Write ``blocks[i]`` into the slot of each StoreSlot ``slots[i]`` marked ``write``."""
    offsets, datas = [], []
    for s, block in zip(slots, blocks):
        if not s.write:
            continue
        if s.slot.tier == types_pb2.TIER_HBM:
            host = host_tensor(block)
            pool()[s.slot.offset : s.slot.offset + host.numel()].copy_(host)
        else:
            offsets.append(s.slot.offset)
            datas.append(block)
    if offsets:
        arena.copy_in_many(offsets, datas)


def drain_into(arena: ArenaMapping, pool: Pool, slots: Sequence, outs: Sequence) -> list[bool]:
    """Copy each found LoadSlot ``slots[i]``'s ``nbytes`` into the writable ``outs[i]``
    (its first ``nbytes``); True where found."""
    offsets, dsts = [], []
    for s, out in zip(slots, outs):
        if not s.found:
            continue
        dst = memoryview(out).cast("B")[: s.nbytes]
        if s.slot.tier == types_pb2.TIER_HBM:
            dst[:] = read(arena, pool, s.slot, s.nbytes)
        else:
            offsets.append(s.slot.offset)
            dsts.append(dst)
    if offsets:
        arena.copy_out_many(offsets, dsts)
    return [s.found for s in slots]


def read(arena: ArenaMapping, pool: Pool, ref, nbytes: int) -> bytes:
    """A new bytes object of the slot's first ``nbytes``."""
    if ref.tier != types_pb2.TIER_HBM:
        return bytes(arena.view(ref.offset, nbytes))
    return pool()[ref.offset : ref.offset + nbytes].cpu().numpy().tobytes()


def copy_slots(arena: ArenaMapping, pool: Pool, copy, picked: list) -> None:
    """Call ``copy`` (a :data:`kvd.client.client.SlotCopy`) once per slot space among
    ``picked`` ((index, SlotRef) pairs): the arena's data pages with offsets from their
    first byte, or the HBM pool's tensor."""
    dram = [(i, ref.offset - HEADER_BYTES) for i, ref in picked if ref.tier != types_pb2.TIER_HBM]
    hbm = [(i, ref.offset) for i, ref in picked if ref.tier == types_pb2.TIER_HBM]
    if dram:
        copy(arena.view(HEADER_BYTES, arena.capacity_bytes), [i for i, _ in dram], [o for _, o in dram])
    if hbm:
        copy(pool(), [i for i, _ in hbm], [o for _, o in hbm])
