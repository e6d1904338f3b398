"""kvd.native host gather/scatter between a blocks-first cache and contiguous buffers."""

from __future__ import annotations

import numpy as np
import pytest

from kvd.native import gather_blocks, scatter_blocks


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
