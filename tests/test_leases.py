"""Leases: expiry on the injected clock, and quarantined slots."""

from __future__ import annotations

import pytest
from core_helpers import (
    NS,
    PAGE,
    make_core,
    specs,
    store,
)

from kvd.core.errors import UnknownLease


def test_leases_expire_on_the_injected_clock():
    core, clock = make_core(2)
    grant = core.prepare_store(NS, specs(1, 2))
    clock.now += 9.9
    assert core.expire_leases() == 0
    clock.now += 0.2
    assert core.expire_leases() == 1
    assert core.lookup(NS, [1]) == []
    with pytest.raises(UnknownLease):
        core.commit_store(grant.lease_id)
    # The slots stay quarantined for one more lease period (a stalled writer may resume).
    assert core.spaces["dram"].used_bytes == 2 * PAGE
    assert core.check() == []
    clock.now += 10
    core.expire_leases()
    assert core.spaces["dram"].used_bytes == 0
    store(core, 1, 2)
    load = core.prepare_load(NS, [1, 2])
    clock.now += 11
    assert core.expire_leases() == 1
    with pytest.raises(UnknownLease):
        core.complete_load(load.lease_id)
    assert core.check() == []
