"""kvd.native: gather/scatter between paged per-layer caches and contiguous kvd slots.

Expected bytes come from an independent reference: every layout below is built as a view of
a contiguous *base* array, and a block's bytes in a slot are the base's block in memory
order (``base[index].tobytes()``), layer 0 first. Backends: host (numpy), torch (the
reference), and the CUDA kernels (gpu-marked, against the torch backend).
"""

from __future__ import annotations

import mmap
import random
import subprocess
import sys

import numpy as np
import pytest

from kvd.native import PagedKv, gather_blocks, layout_of, scatter_blocks

torch = pytest.importorskip("torch")

NB, H, N, C, L = 9, 2, 4, 8, 3  # blocks, kv heads, tokens per block, head size, layers


def _base_and_view(kind: str, dtype, device="cpu"):
    """(bases, caches, block_of): caches are what an engine hands over; block_of(l, b) is the
    base's block b of layer l, whose memory-order bytes a slot must hold."""
    def rand(*shape):
        return torch.randn(*shape, device=device).to(dtype)

    if kind == "blocks_first":  # FlashInfer: (num_blocks, 2, block_size, heads, head)
        bases = [rand(NB, 2, N, H, C) for _ in range(L)]
        return bases, bases, lambda l, b: bases[l][b]
    if kind == "kv_first":  # flash-attn: (2, num_blocks, block_size, heads, head)
        bases = [rand(2, NB, N, H, C) for _ in range(L)]
        return bases, bases, lambda l, b: bases[l][:, b]
    if kind == "heads_outside_blocks":  # vLLM LHBNC: physical (H, B, N, C), logical (B, H, N, C)
        bases = [rand(H, NB, N, 2 * C) for _ in range(L)]
        return bases, [x.permute(1, 0, 2, 3) for x in bases], lambda l, b: bases[l][:, b]
    if kind == "tokens_outside_heads":  # vLLM LBNHC: physical (B, N, H, C), logical (B, H, N, C)
        bases = [rand(NB, N, H, 2 * C) for _ in range(L)]
        return bases, [x.permute(0, 2, 1, 3) for x in bases], lambda l, b: bases[l][b]
    if kind == "cross_layer":  # vLLM BLHNC: one buffer, a layer's block stride spans all layers
        base = rand(NB, L, H, N, 2 * C)
        return [base], [base[:, i] for i in range(L)], lambda l, b: base[b, l]
    raise AssertionError(kind)


LAYOUTS = ["blocks_first", "kv_first", "heads_outside_blocks", "tokens_outside_heads", "cross_layer"]


def _expected(block_of, ids) -> bytes:
    return b"".join(
        block_of(l, b).contiguous().view(torch.uint8).cpu().numpy().tobytes() for b in ids for l in range(L)
    )


def _slot_bytes() -> int:
    return L * 2 * N * H * C * 2  # 2-byte dtypes


@pytest.mark.parametrize("backend", ["host", "torch"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("kind", LAYOUTS)
def test_gather_matches_reference_and_scatter_round_trips(kind, dtype, backend):
    _, caches, block_of = _base_and_view(kind, dtype)
    paged = PagedKv(caches, num_blocks=NB if kind in ("heads_outside_blocks", "tokens_outside_heads") else None)
    assert paged.slot_bytes == _slot_bytes()
    ids = [7, 0, 3, 3, 8, 1]  # a repeat is fine in a gather
    staging = torch.full((len(ids) * paged.slot_bytes,), 0xEE, dtype=torch.uint8)
    assert paged.gather(ids, staging, backend=backend) == backend
    assert staging.numpy().tobytes() == _expected(block_of, ids)

    bases2, caches2, block_of2 = _base_and_view(kind, dtype)
    for x in bases2:
        x.zero_()
    targets = [5, 2, 4, 6, 0, 1]
    PagedKv(caches2, num_blocks=NB).scatter(targets, staging, backend=backend)
    for src, dst in zip(ids, targets):
        for layer in range(L):
            assert torch.equal(block_of2(layer, dst), block_of(layer, src))
    for untouched in set(range(NB)) - set(targets):
        assert all(not block_of2(layer, untouched).any() for layer in range(L))


@pytest.mark.parametrize("backend", ["host", "torch"])
def test_arena_slots_at_scattered_offsets(backend):
    """Destination = an mmap (what the connector maps) with slots at arbitrary page offsets."""
    _, caches, block_of = _base_and_view("kv_first", torch.bfloat16)
    paged = PagedKv(caches)
    page = 4096
    pages_per_slot = -(-paged.slot_bytes // page)
    arena = mmap.mmap(-1, 40 * page)
    rng = random.Random(3)
    starts = rng.sample(range(0, 40 - pages_per_slot, pages_per_slot), 4)
    offsets = [s * page for s in starts]
    ids = [rng.randrange(NB) for _ in offsets]
    paged.gather(ids, arena, offsets, backend=backend)
    for off, b in zip(offsets, ids):
        assert arena[off : off + paged.slot_bytes] == _expected(block_of, [b])
    # Back from the arena into a fresh cache.
    _, caches2, block_of2 = _base_and_view("kv_first", torch.bfloat16)
    order = sorted(set(ids))
    first = {b: off for off, b in reversed(list(zip(offsets, ids)))}
    PagedKv(caches2).scatter(order, arena, [first[b] for b in order], backend=backend)
    for b in order:
        assert torch.equal(block_of2(0, b), block_of(0, b)) and torch.equal(block_of2(L - 1, b), block_of(L - 1, b))


def test_a_buffer_per_slot_and_numpy_caches():
    rng = np.random.default_rng(0)
    caches = [rng.standard_normal((NB, 2, N, H, C)).astype(np.float16) for _ in range(L)]
    paged = PagedKv(caches)
    outs = [bytearray(paged.slot_bytes) for _ in range(2)]
    assert paged.gather([4, 2], outs) == "host"
    assert bytes(outs[1]) == b"".join(c[2].tobytes() for c in caches)
    back = [np.zeros_like(c) for c in caches]
    PagedKv(back).scatter([0, 1], [bytes(o) for o in outs])  # read-only sources are fine
    assert np.array_equal(back[2][0], caches[2][4]) and np.array_equal(back[0][1], caches[0][2])


def test_layout_of_reads_strides():
    lay = layout_of((2, 10, 16, 8, 128), (10 * 16 * 8 * 128, 16 * 8 * 128, 8 * 128, 128, 1), 2)
    assert (lay.block_dim, lay.num_blocks, lay.chunks, lay.chunk_bytes) == (1, 10, 2, 16 * 8 * 128 * 2)
    assert lay.chunk_stride == 10 * lay.chunk_bytes and lay.block_stride == lay.chunk_bytes
    assert lay.block_bytes == 2 * 16 * 8 * 128 * 2
    assert layout_of((10, 4), (4, 1), 4).block_bytes == 16


def test_bad_layouts_are_value_errors():
    with pytest.raises(ValueError, match="overlap"):
        PagedKv([torch.zeros(1, 8).expand(NB, 8)])  # every block shares one row
    # Physical (2, H, B, N, C): a block is a 2 x H grid of runs, not one strided series.
    odd = torch.zeros(2, H, NB, N, C).permute(2, 0, 1, 3, 4)
    with pytest.raises(ValueError, match="strided series"):
        PagedKv([odd], block_dim=0)
    with pytest.raises(ValueError, match="several"):
        PagedKv([torch.zeros(4, 4)], num_blocks=4)
    with pytest.raises(ValueError, match="not an axis"):
        PagedKv([torch.zeros(4, 4)], block_dim=2)
    with pytest.raises(ValueError, match="disagree"):
        PagedKv([torch.zeros(4, 8), torch.zeros(5, 8)])
    with pytest.raises(ValueError, match="all be numpy arrays or all torch"):
        PagedKv([torch.zeros(4, 8), np.zeros((4, 8))])
    with pytest.raises(ValueError, match="no caches"):
        PagedKv([])


def test_bad_calls_are_value_errors_and_write_nothing():
    _, caches, _ = _base_and_view("blocks_first", torch.float16)
    paged = PagedKv(caches)
    sb = paged.slot_bytes
    staging = torch.zeros(3 * sb, dtype=torch.uint8)
    with pytest.raises(ValueError, match="outside the cache"):
        paged.gather([0, NB], staging)
    with pytest.raises(ValueError, match="outside the cache"):
        paged.gather([-1], staging)
    with pytest.raises(ValueError, match="overlap"):
        paged.gather([0, 1], staging, [0, sb - 1])
    with pytest.raises(ValueError, match="outside its"):
        paged.gather([0], staging, [2 * sb + 1])
    with pytest.raises(ValueError, match="offsets"):
        paged.gather([0, 1], staging, [0])
    with pytest.raises(ValueError, match="read-only"):
        paged.gather([0], bytes(sb))
    with pytest.raises(ValueError, match="twice in one scatter"):
        paged.scatter([1, 1], staging)
    with pytest.raises(ValueError, match="slot buffers"):
        paged.gather([0], [bytearray(sb), bytearray(sb)])
    with pytest.raises(ValueError, match="backend must be"):
        paged.gather([0], staging, backend="gpu")
    with pytest.raises(ValueError, match="CUDA caches"):
        paged.gather([0], staging, backend="cuda")
    with pytest.raises(ValueError, match="torch tensors"):
        PagedKv([np.zeros((4, 8))]).gather([0], bytearray(32), backend="torch")
    assert not staging.any()


def test_import_and_host_path_without_torch_or_cupy():
    code = (
        "import sys; sys.modules['torch'] = None; sys.modules['cupy'] = None\n"
        "import numpy as np, kvd.native as n\n"
        "c = [np.arange(24, dtype=np.float32).reshape(4, 6)]\n"
        "out = bytearray(24); print(n.PagedKv(c).gather([2], out))\n"
        "assert bytes(out) == c[0][2].tobytes()\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "host"


# -- the single-array helpers -------------------------------------------------------------


def test_gather_then_scatter_round_trips_chosen_blocks():
    rng = np.random.default_rng(1)
    cache = rng.standard_normal((6, 2, 4, 8)).astype(np.float16)  # blocks first
    outs = [bytearray(cache[0].nbytes) for _ in range(3)]
    gather_blocks(cache, [4, 0, 5], outs)
    assert bytes(outs[0]) == cache[4].tobytes() and bytes(outs[2]) == cache[5].tobytes()
    other = np.zeros_like(cache)
    scatter_blocks(other, [1, 2, 3], outs)
    assert np.array_equal(other[1], cache[4]) and np.array_equal(other[3], cache[5])
    assert not other[0].any() and not other[4].any()


def test_bad_arguments_are_value_errors():
    cache = np.zeros((2, 16), dtype=np.float32)
    with pytest.raises(ValueError, match="outside"):
        gather_blocks(cache, [2], [bytearray(64)])
    with pytest.raises(ValueError, match="smaller than a block"):
        gather_blocks(cache, [0], [bytearray(8)])
    with pytest.raises(ValueError, match="block ids but"):
        scatter_blocks(cache, [0, 1], [bytes(64)])
    with pytest.raises(ValueError, match="C-contiguous"):
        gather_blocks(cache.T, [0], [bytearray(64)])


# -- CUDA kernels against the torch reference (skip without a GPU) ------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("kind", LAYOUTS)
def test_cuda_kernel_matches_torch_reference(kind, dtype):
    pytest.importorskip("cupy")
    _, caches, block_of = _base_and_view(kind, dtype, device="cuda")
    paged = PagedKv(caches, num_blocks=NB)
    ids = [7, 0, 3, 3, 8, 1]
    got = torch.zeros(len(ids) * paged.slot_bytes, dtype=torch.uint8, device="cuda")
    ref = torch.zeros_like(got)
    assert paged.gather(ids, got) == "cuda"
    paged.gather(ids, ref, backend="torch")
    assert torch.equal(got, ref)
    assert got.cpu().numpy().tobytes() == _expected(block_of, ids)
    _, caches2, block_of2 = _base_and_view(kind, dtype, device="cuda")
    targets = [5, 2, 4, 6, 0, 1]
    assert PagedKv(caches2, num_blocks=NB).scatter(targets, got) == "cuda"
    for src, dst in zip(ids, targets):
        assert torch.equal(block_of2(L - 1, dst), block_of(L - 1, src))


@pytest.mark.gpu
def test_cuda_kernel_into_pinned_host_arena_and_back():
    pytest.importorskip("cupy")
    from kvd.native.cuda import pin, unpin

    _, caches, block_of = _base_and_view("kv_first", torch.bfloat16, device="cuda")
    paged = PagedKv(caches)
    arena = mmap.mmap(-1, 64 * 4096)
    offsets = [4096 * 3, 4096 * 40, 4096 * 20 + 1]  # the last slot is unaligned: the bytewise loop
    with pytest.raises(ValueError, match="registered"):
        paged.gather([0], arena, [0])
    ptr = pin(arena)
    try:
        assert paged.gather([2, 5, 8], arena, offsets) == "cuda"
        for off, b in zip(offsets, [2, 5, 8]):
            assert arena[off : off + paged.slot_bytes] == _expected(block_of, [b])
        _, caches2, block_of2 = _base_and_view("kv_first", torch.bfloat16, device="cuda")
        PagedKv(caches2).scatter([1, 2, 3], arena, offsets)
        assert torch.equal(block_of2(1, 3), block_of(1, 8))
    finally:
        unpin(ptr)


@pytest.mark.parametrize("runs", ["c", "numpy"])
@pytest.mark.parametrize("kind", LAYOUTS)
def test_host_backend_with_and_without_the_compiled_copy(kind, runs, monkeypatch):
    """The host backend's two paths (kvd.native.copy's compiled copy_runs, numpy per slot)
    gather the reference's bytes into scattered arena slots and scatter them back."""
    from kvd.native import copy as native_copy
    from kvd.native import host

    if runs == "c" and "c" not in native_copy.IMPLEMENTATIONS:
        pytest.skip("the compiled helper kvd.native._copy is not built here")
    monkeypatch.setattr(host, "RUNS", native_copy.IMPLEMENTATIONS["c"].copy_runs if runs == "c" else None)
    _, caches, block_of = _base_and_view(kind, torch.float16)
    nb = NB if kind in ("heads_outside_blocks", "tokens_outside_heads") else None
    paged = PagedKv(caches, num_blocks=nb)
    ids = [3, 8, 0, 5]
    offsets = [i * 2 * paged.slot_bytes + 64 * i for i in (3, 0, 2, 1)]
    arena = np.zeros(8 * paged.slot_bytes, dtype=np.uint8)
    assert paged.gather(ids, arena, offsets, backend="host") == "host"
    for off, b in zip(offsets, ids):
        assert arena[off : off + paged.slot_bytes].tobytes() == _expected(block_of, [b])
    bases2, caches2, block_of2 = _base_and_view(kind, torch.float16)
    for x in bases2:
        x.zero_()
    PagedKv(caches2, num_blocks=NB).scatter(ids, arena, offsets, backend="host")
    for b in ids:
        assert all(torch.equal(block_of2(l, b), block_of(l, b)) for l in range(L))
