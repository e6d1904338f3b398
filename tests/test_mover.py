"""The mover against a hand-written NVMe fake with failure switches."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

from kvd.core.manager import BlockSpec, CoreConfig, KvCore
from kvd.policies import LruPolicy
from kvd.server.mover import Mover
from kvd.tiers import CorruptBlockError, ExtentAllocator
from kvd.tiers.dram import DramArena

PAGE = 4096


class FakeNvme:
    """Enough of NvmeStore for the mover; ``fail_write``/``fail_persist``/``fail_read``
    switch failures on (an exception instance to raise)."""

    def __init__(self, blocks: int) -> None:
        self.space = ExtentAllocator([(0, blocks * PAGE)], PAGE)
        self.data: dict[int, bytes] = {}
        self.persisted: list[bytes] = []
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
            memoryview(buf)[:nbytes] = self.data[slot.offset][:nbytes]
            out.append(None)
        return out

    # the Space protocol, so the core can allocate through the fake as through a tier
    capacity_bytes = property(lambda self: self.space.capacity_bytes)
    used_bytes = property(lambda self: self.space.used_bytes)
    largest_region_bytes = property(lambda self: self.space.largest_region_bytes)

    def __getattr__(self, name):
        return getattr(self.space, name)


def run_with_mover(tmp_path, scenario):
    arena = DramArena(tmp_path / "arena", 4 * PAGE)
    nvme = FakeNvme(8)
    now = [0.0]
    core = KvCore({"dram": arena, "nvme": nvme}, LruPolicy(), lambda: now[0], CoreConfig())
    core.register_namespace("m", 16, PAGE)

    async def main():
        with ThreadPoolExecutor(2) as pool:
            mover = Mover(core, arena, nvme, pool, core.take_events, clock=lambda: now[0])
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
    """A Sync or drain whose queue holds only blocks the policy drops returns at once; it
    used to wait for a batch that never came, for its whole timeout."""

    async def scenario(core, arena, nvme, mover, now):
        core.set_policy(DropEverything())
        store(core, arena, 1, 0x11)
        mover.foreground()  # as a store does: write-behind waits for traffic to pause
        mover.wake()
        await asyncio.sleep(0)  # the mover looks, and leaves the queue to a quieter moment
        assert core.write_behind_pending == 1
        pending = await asyncio.wait_for(mover.flush(600), 10)  # the bound catches the hang
        assert (pending, nvme.data) == (0, {})
        assert core.lookup("m", [1]) == ["dram"]
        assert core.check() == []

    run_with_mover(tmp_path, scenario)
