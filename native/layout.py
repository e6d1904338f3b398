"""Where a paged KV cache keeps each block, read from the tensor's own shape and strides.

An engine hands kvd one cache tensor per layer. One axis of it indexes blocks (vLLM: axis 0
for blocks-first layouts such as FlashInfer's ``(num_blocks, 2, block_size, heads, head)``,
axis 1 for ``(2, num_blocks, ...)`` K/V-first ones; vLLM 0.33 may also hand over permuted
views, e.g. heads outside blocks, or a cross-layer buffer whose block stride spans every
layer). Whatever the layout, one block of one layer is ``chunks`` contiguous runs of
``chunk_bytes``, ``chunk_stride`` bytes apart, and block ``b`` starts ``b * block_stride``
bytes after the tensor's first byte. :func:`layout_of` derives that from the strides, so no
shape is hard-coded; layouts that are not expressible so (two or more non-mergeable axes
inside a block, overlapping or negative strides) are a ValueError.

kvd's copy of a block, its *slot*, is every layer's block bytes back to back, layer 0 first:
layer ``l`` of a slot starts at ``sum(block_bytes of layers < l)``. All sizes are bytes.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class BlockLayout:
    """One layer's cache, as bytes: block ``b``'s run ``j`` (``0 <= j < chunks``) is
    ``[b * block_stride + j * chunk_stride, ... + chunk_bytes)`` from the tensor's first byte.

    Invariants (checked by :func:`layout_of`): runs of different ``(b, j)`` never overlap;
    ``span_bytes`` covers every run.
    """

    num_blocks: int
    block_stride: int
    chunks: int
    chunk_stride: int
    chunk_bytes: int
    span_bytes: int  # bytes from the first byte to one past the last byte of the tensor
    block_dim: int  # the tensor axis that indexes blocks

    @property
    def block_bytes(self) -> int:
        """Bytes of one block of this layer (what it takes in a slot)."""
        return self.chunks * self.chunk_bytes


def _infer_block_dim(shape: tuple[int, ...], num_blocks: int | None) -> int:
    if num_blocks is not None:
        dims = [d for d, n in enumerate(shape) if n == num_blocks]
        if len(dims) != 1:
            raise ValueError(
                f"cannot tell the block axis of shape {shape} from num_blocks={num_blocks} "
                f"({'several' if dims else 'no'} axes of that size); pass block_dim"
            )
        return dims[0]
    # vLLM's K/V-first layouts put a size-2 axis before the blocks: (2, num_blocks, ...).
    if len(shape) >= 3 and shape[0] == 2 and shape[1] != 2:
        return 1
    return 0


def layout_of(
    shape: tuple[int, ...],
    strides: tuple[int, ...],
    itemsize: int,
    *,
    block_dim: int | None = None,
    num_blocks: int | None = None,
) -> BlockLayout:
    """The :class:`BlockLayout` of a tensor given its shape, strides (in *elements*, as torch
    reports them) and element size in bytes.

    ``block_dim`` names the block axis; without it, the axis of size ``num_blocks`` when that
    is given, else axis 1 for a ``(2, num_blocks, ...)`` K/V-first shape, else axis 0.
    """
    shape, strides = tuple(int(n) for n in shape), tuple(int(s) for s in strides)
    if len(shape) != len(strides) or not shape:
        raise ValueError(f"shape {shape} and strides {strides} do not describe an array")
    if itemsize <= 0:
        raise ValueError(f"itemsize must be positive, got {itemsize}")
    if any(n <= 0 for n in shape):
        raise ValueError(f"shape {shape} has an empty axis")
    if block_dim is None:
        block_dim = _infer_block_dim(shape, num_blocks)
    if not -len(shape) <= block_dim < len(shape):
        raise ValueError(f"block_dim {block_dim} is not an axis of shape {shape}")
    block_dim %= len(shape)
    if num_blocks is not None and shape[block_dim] != num_blocks:
        raise ValueError(f"axis {block_dim} of shape {shape} has {shape[block_dim]} blocks, not {num_blocks}")
    if any(s < 0 for s in strides):
        raise ValueError(f"negative strides {strides} are not supported")

    # No two elements may share memory (a scatter would race): with the axes sorted by
    # stride, each stride must reach past everything the smaller ones span.
    axes = sorted((s, n) for s, n in zip(strides, shape) if n > 1)
    reach = 1
    for s, n in axes:
        if s < reach:
            raise ValueError(f"strides {strides} of shape {shape} overlap")
        reach = s * n
    span_bytes = (sum((n - 1) * s for s, n in zip(strides, shape)) + 1) * itemsize

    # Inside a block: merge axes into the longest contiguous innermost run; what remains
    # outside it must be at most one axis (the run count and its stride).
    inner = sorted(((s, n) for d, (s, n) in enumerate(zip(strides, shape)) if d != block_dim and n > 1), reverse=True)
    run, chunks, chunk_stride = 1, 1, 0
    while inner and inner[-1][0] == run:
        run *= inner.pop()[1]
    if len(inner) > 1:
        raise ValueError(
            f"a block of shape {shape} with strides {strides} is not one strided series of contiguous runs"
        )
    if inner:
        chunk_stride, chunks = inner[0]
    return BlockLayout(
        num_blocks=shape[block_dim],
        block_stride=strides[block_dim] * itemsize,
        chunks=chunks,
        chunk_stride=chunk_stride * itemsize,
        chunk_bytes=run * itemsize,
        span_bytes=span_bytes,
        block_dim=block_dim,
    )
