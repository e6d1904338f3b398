"""check(): it finds each kind of corrupted state."""

from __future__ import annotations

from core_helpers import (
    NS,
    PAGE,
    make_core,
    store,
)


def test_check_finds_a_shadowed_index_that_disagrees_with_the_copies():
    core, _ = make_core(4)
    store(core, 1, 2)
    core.namespace(NS).shadowed.setdefault("dram", {})[1] = None  # DRAM is the only tier
    assert any("filed as shadowed" in p for p in core.check())


def test_check_finds_a_children_index_that_disagrees_with_the_parents():
    core, _ = make_core(4)
    store(core, 1, 2)
    core.namespace(NS).children[2] = {7}  # 2 has no child
    assert any("children index disagrees" in p for p in core.check())


def test_restore_block_and_check_catches_corruption_of_state():
    core, _ = make_core(2, nvme_blocks=2)
    slot = core.spaces["nvme"].allocate(PAGE)
    core.restore_block(NS, 7, None, PAGE, "nvme", slot)
    assert core.lookup(NS, [7]) == ["nvme"]
    assert core.check() == []
    core.namespace(NS).visible[99] = 2  # break an invariant on purpose
    assert any("visible" in p for p in core.check())
