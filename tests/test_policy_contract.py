"""One contract for every retention policy in kvd.policies (LRU today)."""

from __future__ import annotations

import pytest

from kvd.policies import POLICIES, make_policy

A, B, C, D = ("ns", 1), ("ns", 2), ("ns", 3), ("ns", 4)


@pytest.fixture(params=sorted(POLICIES))
def policy(request):
    return make_policy(request.param)


def test_victims_cover_exactly_the_held_keys(policy):
    policy.on_stored("dram", [A, B, C], now=0)
    policy.on_stored("nvme", [A], now=1)
    assert set(policy.victims("dram", now=2)) == {A, B, C}
    assert set(policy.victims("nvme", now=2)) == {A}
    assert policy.check({"dram": {A, B, C}, "nvme": {A}}) == []


def test_removed_keys_are_never_victims(policy):
    policy.on_stored("dram", [A, B], now=0)
    policy.on_removed("dram", A)
    assert list(policy.victims("dram", now=1)) == [B]
    policy.on_removed("dram", D)  # unknown keys are ignored
    assert policy.check({"dram": {B}}) == []


def test_a_chain_loses_its_tail_before_its_head(policy):
    policy.on_stored("dram", [A, B, C], now=0)
    order = list(policy.victims("dram", now=1))
    assert order.index(C) < order.index(B) < order.index(A)


def test_check_reports_disagreement(policy):
    policy.on_stored("dram", [A], now=0)
    assert policy.check({"dram": {A, B}}) != []


def test_unknown_policy_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown policy 'nope'; known: lru"):
        make_policy("nope")


def test_lru_access_makes_a_chain_most_recent():
    lru = make_policy("lru")
    lru.on_stored("dram", [A, B], now=0)
    lru.on_stored("dram", [C], now=1)
    assert list(lru.victims("dram", now=2)) == [B, A, C]
    lru.on_accessed([A, B], now=3)
    assert list(lru.victims("dram", now=4)) == [C, B, A]
