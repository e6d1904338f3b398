"""A chain loaded in batches is told to the policy as one touch (Holdings.touch_chain): the
order it leaves is the order each batch told at once would leave, and a batch that does not
continue the chain tells the pending touch first."""

from __future__ import annotations

from core_helpers import NS, make_core, specs, store

from kvd.policies import LruPolicy


class Recording(LruPolicy):
    """LRU that keeps every on_accessed call's keys (hashes), in call order."""

    def __init__(self) -> None:
        super().__init__()
        self.touches: list[list[int]] = []

    def on_accessed(self, keys, now):
        self.touches.append([h for _, h in keys])
        super().on_accessed(keys, now)


def commit(core, *hashes: int, parent: int | None = None) -> None:
    """A store without the helper's check (which tells the policy any pending touch)."""
    core.commit_store(core.prepare_store(NS, specs(*hashes, parent=parent)).lease_id)


def load(core, *hashes: int) -> None:
    grant = core.prepare_load(NS, list(hashes))
    core.complete_load(grant.lease_id)


def test_batches_of_one_chain_are_one_touch_that_leaves_the_root_most_recent():
    policy = Recording()
    core, _ = make_core(16, policy=policy)
    store(core, 1, 2, 3, 4, 5, 6)
    store(core, 11, 12)  # another chain, stored after: the most recent before the load
    policy.touches.clear()
    load(core, 1, 2)
    load(core, 3, 4)
    load(core, 5, 6)
    assert core.check() == []  # asks the policy: the pending touch is told first
    assert policy.touches == [[1, 2, 3, 4, 5, 6]]
    assert list(policy.victims("dram", 0)) == [(NS, h) for h in (12, 11, 6, 5, 4, 3, 2, 1)]


def test_a_batch_of_another_chain_tells_the_pending_touch_first():
    policy = Recording()
    core, _ = make_core(16, policy=policy)
    store(core, 1, 2, 3)
    store(core, 11, 12)
    policy.touches.clear()
    load(core, 1, 2)
    load(core, 11, 12)
    load(core, 3)  # continues 1, 2, but 11, 12 came between: walks its ancestors again
    core.check()
    assert policy.touches == [[1, 2], [11, 12], [1, 2, 3]]
    assert list(policy.victims("dram", 0)) == [(NS, h) for h in (12, 11, 3, 2, 1)]


def test_a_batch_that_is_no_chain_is_not_joined():
    policy = Recording()
    core, _ = make_core(16, policy=policy)
    store(core, 1, 2, 3, 4)
    policy.touches.clear()
    load(core, 1, 3)  # skips 2: the keys are no chain, so 4's batch cannot join them
    load(core, 4)
    core.check()
    assert policy.touches == [[1, 3], [1, 2, 3, 4]]
    assert list(policy.victims("dram", 0)) == [(NS, h) for h in (4, 3, 2, 1)]


def test_a_commit_of_a_store_tells_the_pending_touch_first():
    """A store changes its session (the policy hears on_sessions): the touch goes first."""
    policy = Recording()
    core, _ = make_core(16, policy=policy)
    commit(core, 1, 2)
    load(core, 1, 2)
    commit(core, 3, parent=2)
    assert policy.touches[0] == [1, 2]
    assert core.check() == []
    assert list(policy.victims("dram", 0)) == [(NS, h) for h in (3, 2, 1)]
