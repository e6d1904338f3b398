"""The mover against the real core over hand-written NVMe and HBM fakes with failure switches."""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor

import pytest

from kvd.core.manager import BlockSpec, CoreConfig, KvCore
from kvd.core.types import Moved, Outcome, Wait
from kvd.media import DRAM, HBM, NVME
from kvd.policies import LruPolicy
from kvd.server.mover import Mover
from kvd.tiers import CorruptBlockError, ExtentAllocator
from kvd.tiers.dram import DramArena

PAGE = 4096


class FakeSpace:
    """The Space protocol over an allocator of ``blocks`` pages, so the core can allocate
    through a fake as through a tier."""

    def __init__(self, blocks: int) -> None:
        self.space = ExtentAllocator([(0, blocks * PAGE)], PAGE)
        self.data: dict[int, bytes] = {}

    capacity_bytes = property(lambda self: self.space.capacity_bytes)
    used_bytes = property(lambda self: self.space.used_bytes)
    largest_region_bytes = property(lambda self: self.space.largest_region_bytes)

    def __getattr__(self, name):
        return getattr(self.space, name)


class FakeNvme(FakeSpace):
    """Enough of NvmeStore for the mover; ``fail_write``/``fail_persist``/``fail_read``
    switch failures on (an exception instance to raise); a block whose slot offset is in
    ``corrupt`` fails its checksum."""

    def __init__(self, blocks: int) -> None:
        super().__init__(blocks)
        self.persisted: list[bytes] = []
        self.corrupt: set[int] = set()
        self.fail_write: Exception | None = None
        self.fail_persist: Exception | None = None
        self.fail_read: Exception | None = None

    def write_many(self, items):
        if self.fail_write:
            raise self.fail_write
        for slot, data in items:
            self.data[slot.offset] = bytes(data)
        return [0] * len(items)

    def persist(self, entries):
        if self.fail_persist:
            raise self.fail_persist
        self.persisted += [e.key for e in entries]

    def read_many(self, items):
        if self.fail_read:
            raise self.fail_read
        out = []
        for slot, nbytes, buf in items:
            if slot.offset in self.corrupt:
                out.append(CorruptBlockError("checksum"))
                continue
            memoryview(buf)[:nbytes] = self.data[slot.offset][:nbytes]
            out.append(None)
        return out


class FakeHbm(FakeSpace):
    """Enough of HbmPool for the mover, in host memory; ``fail_write`` switches failures on
    (an exception instance to raise)."""

    def __init__(self, blocks: int) -> None:
        super().__init__(blocks)
        self.fail_write: Exception | None = None

    def write(self, slot, data):
        if self.fail_write:
            raise self.fail_write
        self.data[slot.offset] = bytes(data)

    def read_into(self, slot, nbytes, out):
        memoryview(out)[:nbytes] = self.data[slot.offset][:nbytes]


class Landed:
    """A metrics stand-in: every Moved the mover reports, in order."""

    def __init__(self) -> None:
        self.moved: list[Moved] = []

    def landed(self, moved):
        self.moved += moved

    def routes(self, outcome=Outcome.OK) -> set:
        return {(m.transfer.src_tier, m.transfer.dst_tier) for m in self.moved if m.outcome is outcome}


def run_with_mover(tmp_path, scenario, hbm_blocks=0, policy=None):
    """Run ``scenario(core, arena, nvme, mover, now)`` with a started mover over a 4-page
    DRAM arena and an 8-page fake NVMe (under a fake HBM of ``hbm_blocks`` pages, if any);
    ``now[0]`` is the clock."""
    arena = DramArena(tmp_path / "arena", 4 * PAGE)
    nvme = FakeNvme(8)
    hbm = FakeHbm(hbm_blocks) if hbm_blocks else None
    spaces = {"dram": arena, "nvme": nvme} | ({"hbm": hbm} if hbm else {})
    now = [0.0]
    core = KvCore(spaces, policy or LruPolicy(), lambda: now[0], CoreConfig())
    core.register_namespace("m", 16, PAGE)

    async def main():
        with ThreadPoolExecutor(2) as pool:
            mover = Mover(core, arena, nvme, pool, core.take_events, clock=lambda: now[0], hbm=hbm)
            mover.start()
            try:
                await scenario(core, arena, nvme, mover, now)
            finally:
                await mover.stop()

    asyncio.run(main())
    arena.close()


def store(core, arena, h, byte):
    grant = core.prepare_store("m", [BlockSpec(h, None, PAGE)])
    arena.write(grant.slots[0], bytes([byte]) * PAGE)
    core.commit_store(grant.lease_id)


def test_a_failing_manifest_write_strands_nothing_and_is_retried(tmp_path):
    async def scenario(core, arena, nvme, mover, now):
        nvme.fail_persist = Exception("rocksdb: IO error")  # not an OSError
        store(core, arena, 1, 0x11)
        mover.wake()
        assert await mover.wait_progress(0, 5)
        assert core.check() == []
        assert core.lookup("m", [1]) == ["dram"] and nvme.persisted == []
        assert core.write_behind_pending == 1 and mover.errors == 1
        nvme.fail_persist = None
        now[0] += mover.error_backoff_s  # the backoff after an error has passed
        mover.syncs_waiting += 1
        assert await mover.wait_progress(1, 5)
        assert core.write_behind_pending == 0 and nvme.persisted != []
        assert core.check() == []

    run_with_mover(tmp_path, scenario)


def test_a_failing_read_completes_the_promotion_as_a_miss(tmp_path):
    async def scenario(core, arena, nvme, mover, now):
        for h in range(1, 5):
            store(core, arena, h, h)
        mover.syncs_waiting += 1
        mover.wake()
        while core.write_behind_pending:
            await mover.wait_progress(mover.batches_done, 5)
        store(core, arena, 9, 9)  # pushes block 1 out of DRAM
        assert core.lookup("m", [1]) == ["nvme"]
        nvme.fail_read = CorruptBlockError("checksum")  # raised for the whole batch
        grant = core.prepare_load("m", [1])
        await mover.promote(grant.promotions)
        assert core.load_slots(grant.lease_id) == [None]
        core.complete_load(grant.lease_id)
        assert core.check() == []
        assert core.lookup("m", [1]) == ["nvme"]  # an error, not a verdict on the copy

    run_with_mover(tmp_path, scenario)


class DropEverything(LruPolicy):
    """LRU that keeps nothing below DRAM (as typed does for an ended session's blocks)."""

    def worth_demoting(self, key, tier, now):
        return False


def test_a_flush_ends_when_planning_drops_the_whole_queue(tmp_path):
    """A Sync or drain whose queue holds only blocks the policy drops returns at once, not
    after waiting its whole timeout for a batch that never comes."""

    async def scenario(core, arena, nvme, mover, now):
        core.set_policy(DropEverything())
        store(core, arena, 1, 0x11)
        mover.foreground()  # as a store does: write-behind waits for traffic to pause
        mover.wake()
        await asyncio.sleep(0)  # the mover looks, and leaves the queue to a quieter moment
        assert core.write_behind_pending == 1
        pending = await asyncio.wait_for(mover.flush(600), 10)  # the bound catches a hang
        assert (pending, nvme.data) == (0, {})
        assert core.lookup("m", [1]) == ["dram"]
        assert core.check() == []

    run_with_mover(tmp_path, scenario)


ROUTES_THE_CORE_PLANS = {(HBM, DRAM), (DRAM, NVME), (HBM, NVME), (NVME, DRAM), (DRAM, HBM), (NVME, HBM)}


async def until_room(mover, prepare):
    """``prepare()``'s grant, running the mover while it answers Wait (as the Engine does)."""
    while isinstance(grant := prepare(), Wait):
        assert await mover.wait_progress(mover.batches_done, 5)
    return grant


async def store_top(core, arena, mover, h):
    """Store block ``h`` into the top tier, waiting for room as a client would."""
    grant = await until_room(mover, lambda: core.prepare_store("m", [BlockSpec(h, None, PAGE)]))
    (mover.hbm or arena).write(grant.slots[0], block(h))
    core.commit_store(grant.lease_id)


async def load_top(core, arena, mover, h) -> bytes | None:
    """Load block ``h`` through the top tier: its bytes there, or None."""
    grant = await until_room(mover, lambda: core.prepare_load("m", [h]))
    await mover.promote(grant.promotions)
    assert await mover.wait_landed(grant.awaiting, 5)
    (item,) = core.load_slots(grant.lease_id)
    data = None
    if item is not None:
        out = bytearray(PAGE)
        (mover.hbm or arena).read_into(item[0], PAGE, out)
        data = bytes(out)
    core.complete_load(grant.lease_id)
    return data


def held_in(core, tier: str) -> list[int]:
    """The blocks (1 to 8, each a chain's root) whose fastest copy is in ``tier``."""
    return [h for h in range(1, 9) if core.lookup("m", [h]) == [tier]]


def block(h: int) -> bytes:
    return bytes([h]) * PAGE


def test_the_handler_table_covers_every_route_the_core_plans(tmp_path):
    """Each route the core plans has a handler that moves a block's bytes intact: five of
    them under HBM on top, NVMe -> DRAM under DRAM on top (a load's promotion; under HBM,
    a prefetch's)."""
    landed = Landed()

    async def hbm_on_top(core, arena, nvme, mover, now):
        assert set(mover.routes) == ROUTES_THE_CORE_PLANS
        mover.metrics = landed
        for h in range(1, 9):  # 2 stay in HBM; the rest cascade down to DRAM, then NVMe
            await store_top(core, arena, mover, h)
        assert {(HBM, DRAM), (DRAM, NVME)} <= landed.routes()
        h = held_in(core, "nvme")[0]
        assert await load_top(core, arena, mover, h) == block(h)
        h = held_in(core, "dram")[-1]  # the most recent: the load above pushed the oldest down
        assert await load_top(core, arena, mover, h) == block(h)
        assert {(NVME, HBM), (DRAM, HBM)} <= landed.routes()
        core.start_drain()  # blocks only HBM holds go straight down to NVMe
        assert await mover.flush(5) == 0
        assert (HBM, NVME) in landed.routes()
        for h in range(1, 9):
            assert await load_top(core, arena, mover, h) == block(h)
        assert core.check() == []

    async def dram_on_top(core, arena, nvme, mover, now):
        mover.metrics = landed
        for h in range(1, 6):  # write-behind copies each to NVMe; 5 pushes 1 out of DRAM
            await store_top(core, arena, mover, h)
            assert await mover.flush(5) == 0
        assert held_in(core, "nvme") == [1]
        assert await load_top(core, arena, mover, 1) == block(1)
        assert core.check() == []

    (tmp_path / "hbm").mkdir()
    (tmp_path / "dram").mkdir()
    run_with_mover(tmp_path / "hbm", hbm_on_top, hbm_blocks=2)
    run_with_mover(tmp_path / "dram", dram_on_top)
    assert landed.routes() == ROUTES_THE_CORE_PLANS
    assert landed.routes(Outcome.ERROR) == landed.routes(Outcome.CORRUPT) == set()


async def fill(core, arena, mover):
    """Store blocks 1 to 8 under HBM on top: 2 stay in HBM, 4 go down to DRAM, 2 to NVMe."""
    for h in range(1, 9):
        await store_top(core, arena, mover, h)
    assert [len(held_in(core, t)) for t in ("hbm", "dram", "nvme")] == [2, 4, 2]


def errors_logged(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "kvd.mover" and r.levelno >= logging.ERROR]


def test_a_route_without_a_handler_fails_its_transfers_and_logs_at_error(tmp_path, caplog):
    async def scenario(core, arena, nvme, mover, now):
        mover.metrics = landed = Landed()
        del mover.routes[(DRAM, NVME)]
        store(core, arena, 1, 0x11)
        mover.syncs_waiting += 1  # write-behind goes at once
        with caplog.at_level(logging.DEBUG, logger="kvd.mover"):
            assert await mover.wait_progress(0, 5)
        assert [(m.transfer.src_tier, m.transfer.dst_tier, m.outcome) for m in landed.moved] == [
            (DRAM, NVME, Outcome.ERROR)
        ]
        assert errors_logged(caplog) == ["no handler moves blocks from dram to nvme (a bug): 1 transfers failed"]
        assert core.write_behind_pending == 1 and mover.errors == 1  # queued again; the source stays
        assert core.lookup("m", [1]) == ["dram"] and nvme.data == {}
        assert not await mover.wait_progress(1, 0.3)  # write-behind holds back instead of spinning
        mover.syncs_waiting -= 1
        assert core.check() == []

    run_with_mover(tmp_path, scenario)


@pytest.mark.parametrize(
    ("fault", "logged"),
    [(OSError(5, "EIO"), []), (RuntimeError("bad slot"), ["copying 1 blocks from dram to hbm failed: RuntimeError: bad slot"])],
)
def test_a_failing_copy_into_hbm_completes_the_promotion_as_a_miss(tmp_path, caplog, fault, logged):
    """A medium's fault is left to its TierHealth to log; anything else is a bug, logged."""

    async def scenario(core, arena, nvme, mover, now):
        await fill(core, arena, mover)
        mover.metrics = landed = Landed()
        h = held_in(core, "dram")[-1]
        mover.hbm.fail_write = fault
        with caplog.at_level(logging.DEBUG, logger="kvd.mover"):
            assert await load_top(core, arena, mover, h) is None
        assert landed.routes(Outcome.ERROR) == {(DRAM, HBM)} and mover.errors == 1
        assert errors_logged(caplog) == logged
        assert core.lookup("m", [h]) == ["dram"]  # an error, not a verdict on the copy
        mover.hbm.fail_write = None
        assert await load_top(core, arena, mover, h) == block(h)
        assert core.check() == []

    run_with_mover(tmp_path, scenario, hbm_blocks=2)


def test_a_block_corrupt_on_nvme_is_dropped_not_copied_into_hbm(tmp_path, caplog):
    async def scenario(core, arena, nvme, mover, now):
        await fill(core, arena, mover)
        mover.metrics = landed = Landed()
        h = held_in(core, "nvme")[0]
        nvme.corrupt = set(nvme.data)
        with caplog.at_level(logging.DEBUG, logger="kvd.mover"):
            assert await load_top(core, arena, mover, h) is None
        assert landed.routes(Outcome.CORRUPT) == {(NVME, HBM)} and mover.errors == 0
        warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert warned == [f"block m/{h:x} failed its checksum on NVMe: dropped"] and errors_logged(caplog) == []
        assert core.lookup("m", [h]) == []
        assert core.check() == []

    run_with_mover(tmp_path, scenario, hbm_blocks=2)
