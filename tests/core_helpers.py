"""What the core's unit tests share: tiny tiers, a fake clock, policies with switches,
and short ways to store, load and run the mover."""

from __future__ import annotations

from kvd.core.events import BlockRemoved
from kvd.core.manager import BlockSpec, CoreConfig, KvCore, StoreGrant, Transfer, Wait
from kvd.policies import LruPolicy
from kvd.tiers import ExtentAllocator

PAGE = 4096
NS = "m"


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make_core(
    dram_blocks: int, nvme_blocks: int = 0, write_behind: bool = False, policy: LruPolicy | None = None
) -> tuple[KvCore, FakeClock]:
    clock = FakeClock()
    spaces = {"dram": ExtentAllocator([(0, dram_blocks * PAGE)], PAGE)}
    if nvme_blocks:
        spaces["nvme"] = ExtentAllocator([(0, nvme_blocks * PAGE)], PAGE)
    policy = policy if policy is not None else LruPolicy()
    core = KvCore(spaces, policy, clock, CoreConfig(write_behind=write_behind, lease_seconds=10))
    core.register_namespace(NS, 16, PAGE)
    return core, clock


def specs(*hashes: int, parent: int | None = None) -> list[BlockSpec]:
    out = []
    for h in hashes:
        out.append(BlockSpec(h, parent, PAGE))
        parent = h
    return out


def store(core: KvCore, *hashes: int, parent: int | None = None) -> StoreGrant:
    grant = core.prepare_store(NS, specs(*hashes, parent=parent))
    assert isinstance(grant, StoreGrant)
    core.commit_store(grant.lease_id)
    assert core.check() == []
    return grant


def run_mover(core: KvCore) -> int:
    """Complete every planned transfer successfully, as the daemon's mover would."""
    done = 0
    while True:
        transfers = core.take_demotions() or core.plan_write_behind(100)
        if not transfers:
            return done
        for t in transfers:
            core.complete_transfer(t)
            done += 1


def nvme_only(core: KvCore) -> None:
    """Block 1 on NVMe only, block 2 in DRAM (a one-block DRAM tier with write-behind)."""
    store(core, 1)
    run_mover(core)
    store(core, 2)  # evicts 1 from DRAM: it has an NVMe copy
    run_mover(core)


def removed(events) -> list[tuple[int, str, str]]:
    return [(e.hash, e.tier, e.reason) for e in events if isinstance(e, BlockRemoved)]


class HeadsFirst(LruPolicy):
    """LRU, except that the keys in ``first`` are offered as victims before all others
    (their priorities stay LRU's): a switch, not a mock."""

    def __init__(self, *first: int) -> None:
        super().__init__()
        self.first = [(NS, h) for h in first]

    def victims(self, tier, now):
        held = list(super().victims(tier, now))
        ahead = [k for k in self.first if k in held]
        return iter(ahead + [k for k in held if k not in ahead])


class NotDemoted(LruPolicy):
    """LRU that would not keep the keys in ``dropped`` below (a switch: say, ephemeral)."""

    def __init__(self) -> None:
        super().__init__()
        self.dropped: set[tuple[str, int]] = set()

    def worth_demoting(self, key, tier, now):
        return key not in self.dropped


class Valued(LruPolicy):
    """LRU order, with values the test sets that rank a block in any tier (a switch); a
    test's values rank a parent at or above its children, as Policy asks."""

    def __init__(self, **value: float) -> None:
        super().__init__()
        self.value = {(NS, int(h[1:])): v for h, v in value.items()}

    def priority(self, key, tier, now):
        return self.value.get(key, 0.0)


def restore(core: KvCore, tier: str, h: int, parent: int | None = None) -> None:
    """Block ``h`` held in ``tier`` only, as a warm restart finds it (the policy hears of it
    now: restored blocks are each other's order)."""
    core.restore_block(NS, h, parent, PAGE, tier, core.spaces[tier].allocate(PAGE))


def store_or_wait(core: KvCore, *hashes: int, parent: int | None = None) -> None:
    """Store; when the core asks to wait, run just the demotions it planned, then retry."""
    grant = core.prepare_store(NS, specs(*hashes, parent=parent))
    while isinstance(grant, Wait):
        for transfer in core.take_demotions():
            core.complete_transfer(transfer)
        grant = core.prepare_store(NS, specs(*hashes, parent=parent))
    core.commit_store(grant.lease_id)


def two_tiers(dram: int, nvme: int, policy: LruPolicy, write_behind: bool = False) -> KvCore:
    """A core over DRAM and NVMe of ``dram`` and ``nvme`` blocks."""
    spaces = {"dram": ExtentAllocator([(0, dram * PAGE)], PAGE), "nvme": ExtentAllocator([(0, nvme * PAGE)], PAGE)}
    core = KvCore(spaces, policy, FakeClock(), CoreConfig(write_behind=write_behind))
    core.register_namespace(NS, 16, PAGE)
    return core


def full_two_tiers(policy: LruPolicy) -> KvCore:
    """DRAM holds 3 and 4, NVMe holds 1 and 2 (each block in one tier): both are full."""
    core = two_tiers(2, 2, policy)
    for h in (1, 2, 3, 4):
        store_or_wait(core, h)
    assert [core.lookup(NS, [h]) for h in (1, 2, 3, 4)] == [["nvme"], ["nvme"], ["dram"], ["dram"]]
    core.take_events()
    return core


def child_on_its_way_down() -> tuple[KvCore, Transfer]:
    """DRAM 2 over NVMe 2, heads first: 1 in NVMe, 3 in DRAM, and 1's child 2 being moved
    down into NVMe's other slot (returned: the demotion, not landed)."""
    core, _ = make_core(2, nvme_blocks=2, policy=HeadsFirst(1))
    store(core, 1)
    store(core, 2, parent=1)
    store_or_wait(core, 3)  # 1 goes down
    assert isinstance(core.prepare_store(NS, specs(4)), Wait)  # 2 starts down
    (moving,) = core.take_demotions()
    return core, moving


class Overcounting:
    """A space whose ``free_slots`` counts one slot more than allocation finds while ``lie``
    is set (a switch: the fragmentation of blocks of several sizes), else its allocator's."""

    def __init__(self, inner: ExtentAllocator) -> None:
        self.inner = inner
        self.lie = True

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def free_slots(self, nbytes: int, at_most: int) -> int:
        found = self.inner.free_slots(nbytes, at_most)
        return min(at_most, found + 1) if self.lie else found
