"""The mover: runs the core's planned transfers (demotions, write-behind, promotions).

Bytes move in worker threads (direct I/O releases the GIL); every core call happens on the
event loop thread, before or after the I/O, so the core stays single-threaded. Requests that
got ``Wait`` from the core block on :meth:`wait_progress` until a batch lands.

Write-behind yields to foreground traffic: while stores and loads keep arriving it waits
until they pause for ``quiet_s``, unless DRAM's free space is under ``urgent_free_fraction``
(evictions would otherwise have to demote synchronously) or a Sync is waiting. Demotions
and promotions never wait.

Logging: a disk or manifest error (OSError) is logged by the NVMe tier's TierHealth, once per
kind of fault until the tier recovers, and counted in metrics; the mover only retries (after
``error_backoff_s`` for write-behind), so a failing disk does not log once per batch. Anything
else that escapes a batch is a bug and is logged each time with its traceback.
"""

from __future__ import annotations

import asyncio
import logging
import mmap
import time
from collections.abc import Callable
from concurrent.futures import Executor

from kvd.core.manager import KvCore
from kvd.core.types import Moved, Outcome, Transfer
from kvd.server.codec import block_key, block_meta
from kvd.tiers import CorruptBlockError
from kvd.tiers.dram import DramArena
from kvd.tiers.hbm import HbmPool
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
        batch_blocks: int = 64,
        max_inflight: int = 4,
        read_parallelism: int = 4,
        quiet_s: float = 0.05,
        urgent_free_fraction: float = 0.1,
        clock: Callable[[], float] = time.monotonic,
        prefetch_interval_s: float = 0.25,
        metrics=None,  # kvd.server.metrics.DaemonMetrics: hears every transfer's outcome
        hbm: HbmPool | None = None,
    ) -> None:
        self.core = core
        self.arena = arena
        self.nvme = nvme
        self.hbm = hbm
        self.executor = executor
        self.after_core = after_core
        self.batch_blocks = batch_blocks
        self.max_inflight = max_inflight
        self.read_parallelism = read_parallelism
        self.quiet_s = quiet_s
        self.urgent_free_fraction = urgent_free_fraction
        self.clock = clock
        self.prefetch_interval_s = prefetch_interval_s
        self.metrics = metrics
        self.syncs_waiting = 0
        self.error_backoff_s = 1.0
        self._backoff_until = 0.0
        self._quiet_at = 0.0
        self.batches_done = 0
        self.prefetched = 0  # blocks moved up ahead of need
        self.errors = 0
        self._wake = asyncio.Event()
        self._progress = asyncio.Condition()
        self._task: asyncio.Task | None = None
        self._inflight: set[asyncio.Task] = set()

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="kvd-mover")

    async def stop(self) -> None:
        """Stop planning new batches; let the batches in flight land (data, then manifest)."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        await asyncio.gather(*self._inflight, return_exceptions=True)

    def wake(self) -> None:
        self._wake.set()

    def foreground(self) -> None:
        """A store or load arrived: hold write-behind back until traffic pauses."""
        self._quiet_at = self.clock() + self.quiet_s

    def _write_behind_delay(self) -> float:
        """Seconds write-behind should still wait (0: go now)."""
        backoff = self._backoff_until - self.clock()
        if backoff > 0:
            return backoff  # the disk just failed: do not spin on it
        if self.syncs_waiting:
            return 0.0
        space = self.core.spaces["dram"]
        if space.capacity_bytes - space.used_bytes < self.urgent_free_fraction * space.capacity_bytes:
            return 0.0
        return max(0.0, self._quiet_at - self.clock())

    async def wait_progress(self, seen: int, timeout: float) -> bool:
        """Wait until more than ``seen`` batches are done; False on timeout."""
        self.wake()
        async with self._progress:
            try:
                await asyncio.wait_for(self._progress.wait_for(lambda: self.batches_done > seen), timeout)
            except TimeoutError:
                return False
        return True

    async def flush(self, timeout: float) -> int:
        """Write down everything write-behind has queued, without waiting for traffic to
        pause, for up to ``timeout`` seconds. Returns the blocks still pending."""
        deadline = self.clock() + timeout
        self.syncs_waiting += 1
        try:
            while self.core.write_behind_pending and self.clock() < deadline:
                seen = self.batches_done
                self.wake()
                async with self._progress:
                    # Planning may empty the queue without a batch (it drops blocks the
                    # policy does not keep below): that ends the wait too.
                    def done(seen: int = seen) -> bool:
                        return self.batches_done > seen or not self.core.write_behind_pending

                    try:
                        await asyncio.wait_for(self._progress.wait_for(done), max(0.0, deadline - self.clock()))
                    except TimeoutError:
                        break
        finally:
            self.syncs_waiting -= 1
        return self.core.write_behind_pending

    async def _run(self) -> None:
        """Keep up to ``max_inflight`` batches moving: the disk stays busy while a batch's
        fdatasync and manifest sync run, and requests waiting for room see each batch land."""
        inflight = self._inflight
        while True:
            delay = None
            while len(inflight) < self.max_inflight:
                transfers = self.core.take_demotions()
                if not transfers:
                    delay = self._write_behind_delay()
                    if delay > 0:
                        break
                    transfers = self.core.plan_write_behind(self.batch_blocks)
                    # Making room on NVMe may have dropped victims: delete their manifest
                    # entries now, before their slots are written with other blocks.
                    self.after_core()
                if not transfers:
                    delay = None
                    if self.syncs_waiting and not self.core.write_behind_pending:
                        async with self._progress:  # a flush waits for this queue to empty
                            self._progress.notify_all()
                    break
                inflight.add(asyncio.create_task(self._land(transfers)))
            if len(inflight) < self.max_inflight:
                # The policy's prefetches: a paused session's blocks back up before it resumes.
                prefetches = self.core.plan_prefetch(self.batch_blocks)
                self.after_core()
                if prefetches:
                    self.prefetched += len(prefetches)
                    inflight.add(asyncio.create_task(self._prefetch(prefetches)))
            wake = asyncio.create_task(self._wake.wait())
            timeout = delay if delay and self.core.write_behind_pending else None
            # Prefetches fall due with time, not with requests: look again every interval.
            timeout = min(timeout, self.prefetch_interval_s) if timeout else self.prefetch_interval_s
            done, _ = await asyncio.wait(
                {wake, *inflight}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
            )
            if wake in done:
                self._wake.clear()
            else:
                wake.cancel()
            inflight -= done

    async def _prefetch(self, transfers: list[Transfer]) -> None:
        await self.promote(transfers)
        async with self._progress:
            self.batches_done += 1
            self._progress.notify_all()

    async def _land(self, transfers: list[Transfer]) -> None:
        await self.write_down(transfers)
        async with self._progress:
            self.batches_done += 1
            self._progress.notify_all()

    async def write_down(self, transfers: list[Transfer]) -> None:
        """Down a tier. To NVMe (from DRAM, or from HBM in a drain): write the batch, one
        fdatasync per slab file, then the manifest. HBM -> DRAM: copy each block."""
        loop = asyncio.get_running_loop()
        to_nvme = [t for t in transfers if t.dst_tier == "nvme"]
        others = [t for t in transfers if t.dst_tier != "nvme"]
        if others:
            await self._run_copies(others, "moving %d blocks down failed")
        if not to_nvme:
            self.after_core()
            return
        try:
            await loop.run_in_executor(self.executor, self._write_batch, to_nvme)
            ok = True
        except Exception as exc:  # a disk or manifest error must not strand the transfers
            self.errors += 1
            self._backoff_until = self.clock() + self.error_backoff_s
            _log_failure(exc, "writing %d blocks to NVMe failed", len(to_nvme))
            ok = False
        for t in to_nvme:
            self.core.complete_transfer(t, Outcome.OK if ok else Outcome.ERROR)
        if self.metrics is not None:
            self.metrics.landed([Moved(t, Outcome.OK if ok else Outcome.ERROR) for t in to_nvme])
        self.after_core()

    def _write_batch(self, transfers: list[Transfer]) -> None:
        if self.nvme is None:
            raise OSError("no NVMe tier")
        views = [self._source(t) for t in transfers]
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
        """Up a tier, for a load or a prefetch. NVMe -> DRAM: read the blocks straight into
        their arena slots, in a few parallel batches (adjacent slots coalesce into one large
        read), each block verified. Into HBM (from DRAM or NVMe): copy each block."""
        others = [t for t in transfers if t.dst_tier != "dram" or t.src_tier != "nvme"]
        if others:
            await self._run_copies(others, "moving %d blocks up failed")
            transfers = [t for t in transfers if t.dst_tier == "dram" and t.src_tier == "nvme"]
            if not transfers:
                self.after_core()
                async with self._progress:
                    self._progress.notify_all()
                return
        loop = asyncio.get_running_loop()
        parts = [transfers[i :: self.read_parallelism] for i in range(self.read_parallelism)]
        parts = [p for p in parts if p]
        outcomes = await asyncio.gather(
            *(loop.run_in_executor(self.executor, self._read_batch, p) for p in parts), return_exceptions=True
        )
        for part, results in zip(parts, outcomes):
            if isinstance(results, BaseException):
                self.errors += 1
                _log_failure(results, "reading %d blocks from NVMe failed", len(part))
                results = ["error"] * len(part)
            for t, result in zip(part, results):
                if result == "corrupt":
                    log.warning(
                        "block %s/%x failed its checksum on NVMe: dropped", t.record.namespace, t.record.hash
                    )
                self.core.complete_transfer(t, Outcome(result))
            if self.metrics is not None:
                self.metrics.landed([Moved(t, Outcome(result)) for t, result in zip(part, results)])
        self.after_core()
        async with self._progress:
            self._progress.notify_all()

    async def wait_landed(self, transfers: list[Transfer], timeout: float) -> bool:
        """Wait until none of ``transfers`` (promotions run by other requests) is in flight."""
        async with self._progress:
            try:
                await asyncio.wait_for(
                    self._progress.wait_for(lambda: not any(map(self.core.is_inflight, transfers))), timeout
                )
            except TimeoutError:
                return False
        return True

    def _read_batch(self, transfers: list[Transfer]) -> list[str]:
        if self.nvme is None:
            return ["error"] * len(transfers)
        views = [self.arena.view(t.dst.slot) for t in transfers]
        try:
            errors = self.nvme.read_many([(t.src.slot, t.nbytes, v) for t, v in zip(transfers, views)])
        finally:
            for v in views:
                v.release()
        out = []
        for t, err in zip(transfers, errors):
            if err is None:
                out.append("ok")
            elif isinstance(err, CorruptBlockError):
                out.append("corrupt")
            else:
                self.errors += 1
                _log_failure(err, "reading block %x from NVMe failed", t.record.hash)
                out.append("error")
        return out


    # -- copies through HBM ------------------------------------------------------------------
    async def _run_copies(self, transfers: list[Transfer], what: str) -> None:
        """Run transfers that involve HBM and report each to the core. Blocks from NVMe are
        read in ``read_parallelism`` parallel parts, each part with one batched read (adjacent
        slots coalesce) into a page-aligned bounce buffer, then copied up block by block."""
        loop = asyncio.get_running_loop()
        from_nvme = sorted((t for t in transfers if t.src_tier == "nvme"), key=lambda t: t.src.slot.offset)
        size = -(-len(from_nvme) // self.read_parallelism)  # contiguous runs coalesce best
        parts = [from_nvme[i : i + size] for i in range(0, len(from_nvme), size)] if from_nvme else []
        rest = [t for t in transfers if t.src_tier != "nvme"]
        if rest:
            parts.append(rest)
        outcomes = await asyncio.gather(
            *(loop.run_in_executor(self.executor, self._copy_batch, p) for p in parts), return_exceptions=True
        )
        for part, results in zip(parts, outcomes):
            if isinstance(results, BaseException):  # the transfers must be reported whatever failed
                self.errors += 1
                _log_failure(results, what, len(part))
                results = ["error"] * len(part)
            for t, result in zip(part, results):
                if result == "corrupt":
                    log.warning("block %s/%x failed its checksum on NVMe: dropped", t.record.namespace, t.record.hash)
                self.core.complete_transfer(t, Outcome(result))
            if self.metrics is not None:
                self.metrics.landed([Moved(t, Outcome(r)) for t, r in zip(part, results)])

    def _copy_batch(self, transfers: list[Transfer]) -> list[str]:
        """Copy each transfer's bytes to its destination (DRAM or HBM): "ok", "error" or
        "corrupt" (an NVMe source that failed its checksum) per transfer."""
        out = ["ok"] * len(transfers)
        staged = self._read_nvme_sources(transfers, out)
        for i, t in enumerate(transfers):
            if out[i] != "ok":
                continue
            src = staged.pop(i) if i in staged else self._source(t)
            try:
                if t.dst_tier == "hbm":
                    self._require_hbm().write(t.dst.slot, src)
                else:
                    dst = self.arena.view(t.dst.slot)
                    try:
                        dst[: t.nbytes] = src
                    finally:
                        dst.release()
            finally:
                src.release()
        return out

    def _read_nvme_sources(self, transfers: list[Transfer], out: list[str]) -> dict[int, memoryview]:
        """Read the NVMe sources among ``transfers`` with one batched read into a bounce
        buffer; their bytes by index. Marks failures in ``out``."""
        picked = [(i, t) for i, t in enumerate(transfers) if t.src_tier == "nvme"]
        if not picked:
            return {}
        if self.nvme is None:
            for i, _ in picked:
                out[i] = "error"
            return {}
        bounce = memoryview(mmap.mmap(-1, sum(t.src.slot.length for _, t in picked)))  # page-aligned
        views, at = [], 0
        for _, t in picked:
            views.append(bounce[at : at + t.src.slot.length])
            at += t.src.slot.length
        errors = self.nvme.read_many([(t.src.slot, t.nbytes, v) for (_, t), v in zip(picked, views)])
        staged = {}
        for (i, t), view, err in zip(picked, views, errors):
            if err is None:
                staged[i] = view[: t.nbytes]
            else:
                out[i] = "corrupt" if isinstance(err, CorruptBlockError) else "error"
                if out[i] == "error":
                    self.errors += 1
                    _log_failure(err, "reading block %x from NVMe failed", t.record.hash)
            view.release()
        return staged

    def _source(self, t: Transfer) -> memoryview:
        """The bytes of a transfer's source copy in DRAM or HBM (HBM's through a host
        buffer); the caller releases the view."""
        if t.src_tier == "dram":
            return self.arena.view(t.src.slot)[: t.nbytes]
        buf = bytearray(t.nbytes)
        self._require_hbm().read_into(t.src.slot, t.nbytes, buf)
        return memoryview(buf)

    def _require_hbm(self) -> HbmPool:
        if self.hbm is None:
            raise RuntimeError("a transfer through HBM, but the mover has no HBM pool")
        return self.hbm


def _log_failure(exc: BaseException, what: str, *args) -> None:
    """A medium's failure (OSError: TierHealth logged its first) at DEBUG; a bug at ERROR."""
    if isinstance(exc, OSError):
        log.debug(what + ": %s", *args, exc)
    else:
        log.error(what + ": %s: %s", *args, type(exc).__name__, exc, exc_info=exc)
