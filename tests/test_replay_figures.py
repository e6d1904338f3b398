"""The replay's figures are exactly the recorded ones (tests/data/replay_figures.json).

The fast cases only; `make replay-figures` compares every case. A change that
means to keep behaviour keeps every figure; one that changes it records them again
(`python tests/replay_figures.py record`) and says why in its commit.
"""

from __future__ import annotations

import json

import pytest
from replay_figures import CASES, FIGURES, differences


@pytest.mark.parametrize("case", [c for c in CASES if c.fast], ids=lambda c: c.name)
def test_the_replay_reproduces_its_recorded_figures(case):
    recorded = json.loads(FIGURES.read_text())[case.name]
    assert differences(recorded, case.run()) == []


def test_differences_names_each_changed_leaf():
    before = {"lru": {"hit_rate": 0.25, "ttft_s": {"p50": 1.0, "p90": 2.0}}}
    after = {"lru": {"hit_rate": 0.25, "ttft_s": {"p50": 1.0, "p90": 2.0000000001}}, "typed": {}}
    assert differences(before, after) == ["lru.ttft_s.p90: 2.0 -> 2.0000000001", "typed: '(absent)' -> {}"]
