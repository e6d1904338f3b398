"""Announced turns and tier residence: the two bookkeeping parts typed retention relies on.

Times are seconds; keys are (namespace, hash)."""

from __future__ import annotations

import pytest

from kvd.core.sessions import SessionTable
from kvd.policies.announced import Announced
from kvd.policies.residence import Residence

NS = "ns"


def sessions():
    t = SessionTable()
    a = t.turn_start(NS, "a", [1, 2], now=0)
    b = t.turn_start(NS, "b", [2, 3], now=0)
    return t, a, b


def test_a_filing_maps_its_keys_back_and_a_new_filing_replaces_the_old():
    _, a, b = sessions()
    ann = Announced()
    assert not ann and a not in ann
    ann.file(a, 10.0, [1, 2, 4])
    assert ann and a in ann and ann.arrival(a) == 10.0
    assert ann.session_of((NS, 4)) is a
    ann.file(a, 12.0, [1, 5])
    assert ann.arrival(a) == 12.0 and ann.session_of((NS, 4)) is None and ann.session_of((NS, 5)) is a
    ann.file(b, 11.0, [2])  # b takes key 2 over
    ann.file(a, None)  # a's taken back: b keeps key 2
    assert a not in ann and ann.arrival(a) is None and ann.session_of((NS, 1)) is None
    assert ann.session_of((NS, 2)) is b


def test_within_names_the_keys_of_turns_arriving_inside_the_horizon():
    _, a, b = sessions()
    ann = Announced()
    ann.file(a, 5.0, [1, 2])
    ann.file(b, 50.0, [3])
    assert ann.within("hbm", 10.0, now=0) == {(NS, 1), (NS, 2)}
    assert ann.within("hbm", 10.0, now=45) == {(NS, 1), (NS, 2), (NS, 3)}
    ann.file(b, None)  # a filing clears what was memoized
    assert ann.within("hbm", 10.0, now=45) == {(NS, 1), (NS, 2)}


def test_held_yields_each_chain_tail_first_and_once():
    _, a, b = sessions()
    ann = Announced()
    ann.file(a, 5.0, [1, 2, 3])
    ann.file(b, 6.0, [3, 4])
    here = {(NS, 1): None, (NS, 3): None, (NS, 4): None}
    keys = ann.within("dram", 100.0, now=0)
    assert list(ann.held(here, keys)) == [(NS, 3), (NS, 1), (NS, 4)]


def test_due_lists_the_soonest_first_and_takes_back_ended_sessions():
    t, a, b = sessions()
    ann = Announced()
    ann.file(b, 3.0, [3])
    ann.file(a, 2.0, [1])
    assert ann.due(now=0.5, lead_s=2.0) == [(2.0, a, [(NS, 1)])]
    assert [s for _, s, _ in ann.due(now=1.5, lead_s=2.0)] == [a, b]
    t.end(NS, "a", now=1.6)
    assert [s for _, s, _ in ann.due(now=1.7, lead_s=2.0)] == [b] and a not in ann


def test_residence_is_blocks_held_over_insertions_per_second():
    r = Residence(initial_s=60.0, scale=1.0, min_s=1.0, halflife=1)
    assert r.horizon("dram") == 60.0  # no rate yet
    r.stored("dram", 10, held=100, now=0.0)
    r.stored("dram", 10, held=100, now=1.0)  # 10 blocks a second, 100 held: 10 s
    assert r.horizon("dram") == pytest.approx(10.0)
    r.stored("dram", 10, held=100, now=1.0)  # a second store at the same instant...
    r.stored("dram", 10, held=100, now=2.0)  # ...counts in the next interval: 20 a second
    assert r.horizon("dram") == pytest.approx(5.0)
    r.stored("dram", 0, held=3, now=3.0)  # nothing stored: the rate stands, the count moves
    assert r.horizon("dram") == pytest.approx(1.0)  # 3 / 20 s, floored at min_s
