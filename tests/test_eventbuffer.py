from __future__ import annotations

import pytest

from kvd.core.eventbuffer import EventBuffer
from kvd.core.events import BlockRemoved, BlockStored


def stored(seq: int) -> BlockStored:
    return BlockStored(seq, "m", seq, None, "dram", 4096, 0.0)


def test_since_returns_the_tail_and_none_once_fallen_out():
    buf = EventBuffer(capacity=3, next_seq=5)
    assert (buf.first_seq, buf.next_seq) == (5, 5)
    assert buf.since(5) == [] and buf.since(9) == []
    buf.extend([stored(5), stored(6)])
    assert [e.seq for e in buf.since(5)] == [5, 6]
    assert [e.seq for e in buf.since(6)] == [6]
    buf.extend([stored(7), BlockRemoved(8, "m", 5, "dram", "evicted", 0.0)])
    assert buf.first_seq == 6
    assert buf.since(5) is None
    assert [e.seq for e in buf.since(6)] == [6, 7, 8]


def test_a_gap_in_sequence_numbers_is_refused():
    buf = EventBuffer(capacity=3)
    with pytest.raises(ValueError, match="does not follow"):
        buf.extend([stored(2)])
    with pytest.raises(ValueError):
        EventBuffer(capacity=0)
