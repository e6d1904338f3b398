"""The mover: runs the core's planned transfers (demotions, write-behind, promotions).

Bytes move in worker threads (direct I/O releases the GIL); every core call happens on the
event loop thread, before or after the I/O, so the core stays single-threaded. Requests that
got ``Wait`` from the core block on :meth:`wait_progress` until a batch lands.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from concurrent.futures import Executor

from kvd.core.manager import KvCore, Transfer
from kvd.server.codec import block_key, block_meta
from kvd.tiers import CorruptBlockError
from kvd.tiers.dram import DramArena
from kvd.tiers.nvme import ManifestEntry, NvmeStore

log = logging.getLogger("kvd.mover")


class Mover:
    def __init__(
        self,
        core: KvCore,
        arena: DramArena,
        nvme: NvmeStore | None,
        executor: Executor,
        after_core: Callable[[], None],
        batch_blocks: int = 32,
    ) -> None:
        self.core = core
        self.arena = arena
        self.nvme = nvme
        self.executor = executor
        self.after_core = after_core
        self.batch_blocks = batch_blocks
        self.batches_done = 0
        self.errors = 0
        self._wake = asyncio.Event()
        self._progress = asyncio.Condition()
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="kvd-mover")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass

    def wake(self) -> None:
        self._wake.set()

    async def wait_progress(self, seen: int, timeout: float) -> bool:
        """Wait until more than ``seen`` batches are done; False on timeout."""
        self.wake()
        async with self._progress:
            try:
                await asyncio.wait_for(self._progress.wait_for(lambda: self.batches_done > seen), timeout)
            except TimeoutError:
                return False
        return True

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while True:
                transfers = self.core.take_demotions() or self.core.plan_write_behind(self.batch_blocks)
                if not transfers:
                    break
                await self.write_down(transfers)
                async with self._progress:
                    self.batches_done += 1
                    self._progress.notify_all()

    async def write_down(self, transfers: list[Transfer]) -> None:
        """DRAM -> NVMe: write the batch, one fdatasync per slab file, then the manifest."""
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(self.executor, self._write_batch, transfers)
            ok = True
        except OSError as exc:
            self.errors += 1
            log.error("writing %d blocks to NVMe failed: %s", len(transfers), exc)
            ok = False
        for t in transfers:
            self.core.complete_transfer(t, ok=ok)
        self.after_core()

    def _write_batch(self, transfers: list[Transfer]) -> None:
        if self.nvme is None:
            raise OSError("no NVMe tier")
        views = [self.arena.view(t.src.slot)[: t.nbytes] for t in transfers]
        try:
            checksums = self.nvme.write_many([(t.dst.slot, v) for t, v in zip(transfers, views)])
        finally:
            for v in views:
                v.release()
        self.nvme.persist(
            [
                ManifestEntry(
                    block_key(t.record.namespace, t.record.hash),
                    t.dst.slot,
                    t.nbytes,
                    checksum,
                    block_meta(t.record.parent),
                )
                for t, checksum in zip(transfers, checksums)
            ]
        )

    async def promote(self, transfers: list[Transfer]) -> None:
        """NVMe -> DRAM for a load: read each block straight into its arena slot, verified."""
        loop = asyncio.get_running_loop()
        results = await asyncio.gather(
            *(loop.run_in_executor(self.executor, self._read_one, t) for t in transfers)
        )
        for t, result in zip(transfers, results):
            if result == "corrupt":
                log.warning("block %s/%x failed its checksum on NVMe: dropped", t.record.namespace, t.record.hash)
            self.core.complete_transfer(t, ok=result == "ok", corrupt=result == "corrupt")
        self.after_core()

    def _read_one(self, t: Transfer) -> str:
        if self.nvme is None:
            return "error"
        view = self.arena.view(t.dst.slot)
        try:
            self.nvme.read_into(t.src.slot, t.nbytes, view)
            return "ok"
        except CorruptBlockError:
            return "corrupt"
        except OSError as exc:
            self.errors += 1
            log.error("reading block %x from NVMe failed: %s", t.record.hash, exc)
            return "error"
        finally:
            view.release()
