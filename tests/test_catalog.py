"""The catalog: namespaces, their geometry, and lookups of the longest held prefix."""

from __future__ import annotations

import pytest
from core_helpers import (
    NS,
    PAGE,
    make_core,
    store,
)

from kvd.core.errors import GeometryConflict, InvalidArgument, UnknownNamespace
from kvd.core.events import NamespaceRegistered


def test_register_namespace_is_idempotent_and_rejects_other_geometry():
    core, _ = make_core(4)
    assert core.register_namespace(NS, 16, PAGE) is False
    with pytest.raises(GeometryConflict):
        core.register_namespace(NS, 32, PAGE)
    with pytest.raises(InvalidArgument):
        core.register_namespace("", 16, PAGE)
    with pytest.raises(InvalidArgument):
        core.register_namespace("x", 0, PAGE)
    assert isinstance(core.take_events()[0], NamespaceRegistered)


def test_lookup_longest_prefix_and_unknown_namespace():
    core, _ = make_core(8)
    store(core, 1, 2, 3)
    assert core.lookup(NS, [1, 2, 3, 4]) == ["dram"] * 3
    assert core.lookup(NS, [1, 9, 3]) == ["dram"]
    assert core.lookup(NS, [9, 1]) == []
    assert core.lookup(NS, []) == []
    with pytest.raises(UnknownNamespace):
        core.lookup("nope", [1])


def test_geometry_that_no_tier_can_hold_is_invalid():
    core, _ = make_core(2, nvme_blocks=4)
    with pytest.raises(InvalidArgument, match="do not fit the dram tier"):
        core.register_namespace("big", 16, 3 * PAGE)
    assert core.check_geometry("ok", 16, 2 * PAGE) is True
    assert core.check_geometry(NS, 16, PAGE) is False
