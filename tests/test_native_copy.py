"""kvd.native.copy: the compiled helper and the numpy fallback copy the same bytes and refuse
the same bad runs (each test runs with both)."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from kvd.native import copy as native_copy

MiB = 1 << 20


@pytest.fixture(params=["c", "numpy"])
def impl(request):
    if request.param not in native_copy.IMPLEMENTATIONS:
        pytest.skip("the compiled helper kvd.native._copy is not built here")
    return native_copy.IMPLEMENTATIONS[request.param]


def _random(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8)


@pytest.mark.parametrize("total", [3 * 4096 + 5, 4 * MiB + 77])  # below and above the streaming size
def test_copy_runs_moves_each_run_and_joins_adjacent_ones(impl, total):
    src = _random(total)
    dst = np.zeros(total + 64, dtype=np.uint8)
    # runs at odd offsets, some adjacent in both buffers (joined), one of zero bytes
    cut = [0, 1, 4099, total // 2, total // 2, total - 3, total]
    lens = [b - a for a, b in zip(cut, cut[1:])]
    impl.copy_runs(dst, [c + 7 for c in cut[:-1]], src, cut[:-1], lens)
    assert bytes(dst[7 : 7 + total]) == bytes(src)
    assert not dst[:7].any() and not dst[7 + total :].any()


def test_copy_runs_between_separate_places(impl):
    src = _random(8 * MiB, 1)
    dst = np.zeros(8 * MiB, dtype=np.uint8)
    order = [5, 1, 7, 0]
    impl.copy_runs(dst, [i * MiB for i in range(4)], src, [o * MiB for o in order], [MiB] * 4)
    for i, o in enumerate(order):
        assert bytes(dst[i * MiB : (i + 1) * MiB]) == bytes(src[o * MiB : (o + 1) * MiB])


@pytest.mark.parametrize("block", [4096, 256 << 10])
def test_scatter_then_gather_round_trips_blocks(impl, block):
    blocks = [_random(block, i).tobytes() for i in range(9)]  # bytes: read-only sources
    arena = bytearray(12 * block)
    offsets = [i * block for i in (3, 4, 5, 0, 11, 7, 8, 9, 1)]
    impl.scatter(arena, offsets, blocks)
    outs = [memoryview(bytearray(block)) for _ in blocks]
    impl.gather(memoryview(arena), offsets, outs)
    assert [bytes(o) for o in outs] == blocks


def test_runs_outside_a_buffer_are_refused_before_any_copy(impl):
    dst = bytearray(100)
    src = bytes(range(100))
    with pytest.raises(ValueError, match="outside"):
        impl.copy_runs(dst, [0, 90], src, [0, 0], [10, 20])
    with pytest.raises(ValueError, match="outside"):
        impl.copy_runs(dst, [0], src, [95], [10])
    with pytest.raises(ValueError, match="outside"):
        impl.copy_runs(dst, [-1], src, [0], [10])
    assert dst == bytearray(100)  # the first, valid run did not move either
    with pytest.raises(ValueError, match="outside"):
        impl.scatter(dst, [0, 95], [b"x" * 10, b"y" * 10])
    with pytest.raises(ValueError, match="outside"):
        impl.gather(src, [0, 99], [bytearray(10), bytearray(2)])
    assert dst == bytearray(100)


def test_counts_that_disagree_are_refused(impl):
    with pytest.raises(ValueError, match="for 2 runs"):
        impl.copy_runs(bytearray(10), [0], b"0123456789", [0, 1], [1, 1])
    with pytest.raises(ValueError, match="for 1 runs"):
        impl.scatter(bytearray(10), [0, 1], [b"x"])
    with pytest.raises(ValueError, match="for 1 runs"):
        impl.gather(b"0123456789", [], [bytearray(1)])


def test_a_read_only_destination_is_refused(impl):
    with pytest.raises((ValueError, BufferError, TypeError)):
        impl.gather(bytes(10), [0], [b"abc"])


def test_the_numpy_fallback_is_chosen_when_asked_or_the_helper_is_missing():
    code = "from kvd.native import copy; print(copy.BACKEND)"
    env = dict(os.environ, KVD_NATIVE_COPY="numpy")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "numpy"
    # the helper's import failing (not built) falls back the same way
    hide = "import sys; sys.modules['kvd.native._copy'] = None; " + code
    env.pop("KVD_NATIVE_COPY")
    out = subprocess.run([sys.executable, "-c", hide], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "numpy"


def test_arena_batches_copy_in_and_out_and_keep_off_the_header(impl, tmp_path, monkeypatch):
    from kvd.tiers.dram import HEADER_BYTES, DramArena, open_arena

    monkeypatch.setattr(native_copy, "scatter", impl.scatter)
    monkeypatch.setattr(native_copy, "gather", impl.gather)
    block = 64 << 10
    with DramArena(tmp_path / "arena", 8 * block) as daemon_side:
        arena = open_arena(daemon_side.path, daemon_side.arena_id)
        blocks = [_random(block, i).tobytes() for i in range(3)]
        offsets = [HEADER_BYTES + i * block for i in (2, 0, 7)]
        arena.copy_in_many(offsets, blocks)
        outs = [bytearray(block) for _ in blocks]
        arena.copy_out_many(offsets, outs)
        assert outs == blocks
        with pytest.raises(ValueError, match="outside"):
            arena.copy_in_many([HEADER_BYTES - 4096], [blocks[0]])  # the header page
        with pytest.raises(ValueError, match="outside"):
            arena.copy_out_many([HEADER_BYTES + 8 * block - 10], [bytearray(20)])  # past the end
        assert arena.header == daemon_side.header
        arena.close()


def test_offsets_may_come_as_int64_arrays_or_sequences(impl):
    src = _random(4096, 7)
    dst = np.zeros(4096, dtype=np.uint8)
    impl.copy_runs(dst, np.array([2048, 0], dtype=np.int64), src, np.array([0, 2048]), np.array([2048, 2048]))
    assert bytes(dst) == bytes(src[2048:]) + bytes(src[:2048])
    with pytest.raises(ValueError, match="for 2 runs"):
        impl.copy_runs(dst, np.array([0], dtype=np.int64), src, [0, 1], np.array([1, 1]))
