"""The mover: runs the core's planned transfers (demotions, write-behind, promotions).

Bytes move in worker threads (direct I/O releases the GIL); every core call happens on the
event loop thread, before or after the I/O, so the core stays single-threaded. Requests that
got ``Wait`` from the core block on :meth:`wait_progress` until a batch lands.

Write-behind yields to foreground traffic: while stores and loads keep arriving it waits
until they pause for ``quiet_s``, unless DRAM's free space is under ``urgent_free_fraction``
(evictions would otherwise have to demote synchronously) or a Sync is waiting. Demotions
and promotions never wait.

A batch may mix routes (source tier, destination tier): it is split by route and each group
runs through the handler :attr:`Mover.routes` names for it, the groups at once. Every
transfer handed to the mover is reported to the core with an :class:`Outcome`, whatever
fails.

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
from collections.abc import Awaitable, Callable
from concurrent.futures import Executor

from kvd.core.manager import KvCore
from kvd.core.types import Moved, Outcome, Transfer
from kvd.media import DRAM, HBM, NVME, TierName
from kvd.server.codec import block_key, block_meta
from kvd.tiers import CorruptBlockError
from kvd.tiers.dram import DramArena
from kvd.tiers.hbm import HbmPool
from kvd.tiers.nvme import ManifestEntry, NvmeStore

log = logging.getLogger("kvd.mover")

Route = tuple[TierName, TierName]  # (source tier, destination tier)


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
        # What runs each route the core plans; a transfer on any other route is a bug.
        self.routes: dict[Route, Callable[[list[Transfer]], Awaitable[None]]] = {
            (DRAM, NVME): self._write_to_nvme,
            (HBM, NVME): self._write_to_nvme,  # a drain's or a Sync's, of blocks only HBM holds
            (NVME, DRAM): self._read_into_dram,
            (HBM, DRAM): self._copy,
            (DRAM, HBM): self._copy,
            (NVME, HBM): self._copy_from_nvme,
        }
        # How the copies reach a memory tier's bytes, by tier.
        self._readers: dict[TierName, Callable[[Transfer], memoryview]] = {DRAM: self._read_dram, HBM: self._read_hbm}
        self._writers: dict[TierName, Callable[[Transfer, memoryview], None]] = {
            DRAM: self._write_dram,
            HBM: self._write_hbm,
        }

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
                inflight.add(asyncio.create_task(self._run_batch(transfers)))
            if len(inflight) < self.max_inflight:
                # The policy's prefetches: a paused session's blocks back up before it resumes.
                prefetches = self.core.plan_prefetch(self.batch_blocks)
                self.after_core()
                if prefetches:
                    self.prefetched += len(prefetches)
                    inflight.add(asyncio.create_task(self._run_batch(prefetches)))
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

    async def _run_batch(self, transfers: list[Transfer]) -> None:
        """Run a batch the mover planned itself, then count it done for :meth:`wait_progress`."""
        await self.move(transfers)
        async with self._progress:
            self.batches_done += 1
            self._progress.notify_all()

    async def promote(self, transfers: list[Transfer]) -> None:
        """Run a load's promotions into the top tier; returns once the core has heard of each
        (its load_slots() are then current), and wakes :meth:`wait_landed`."""
        await self.move(transfers)
        async with self._progress:
            self._progress.notify_all()

    async def move(self, transfers: list[Transfer]) -> None:
        """Run a batch of the core's transfers of any mix of routes: each route's group by its
        handler in :attr:`routes`, the groups at once. Every transfer is reported to the core
        (and metrics) before this returns, then ``after_core`` applies the core's effects."""
        groups: dict[Route, list[Transfer]] = {}
        for t in transfers:
            groups.setdefault((t.src_tier, t.dst_tier), []).append(t)
        await asyncio.gather(*(self._run_route(route, group) for route, group in groups.items()))
        self.after_core()

    async def _run_route(self, route: Route, transfers: list[Transfer]) -> None:
        handler = self.routes.get(route)
        if handler is None:
            self._no_route(route, transfers)
        else:
            await handler(transfers)

    def _no_route(self, route: Route, transfers: list[Transfer]) -> None:
        """A route without a handler is a bug: its transfers fail, logged at ERROR each time.
        Write-behind holds back as after a disk error, so that one on such a route does not
        spin."""
        self.errors += 1
        self._backoff_until = self.clock() + self.error_backoff_s
        log.error("no handler moves blocks from %s to %s (a bug): %d transfers failed", *route, len(transfers))
        self._report(transfers, [Outcome.ERROR] * len(transfers))

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

    # -- the route handlers: each reports every transfer it is given ---------------------------
    async def _write_to_nvme(self, transfers: list[Transfer]) -> None:
        """Down to NVMe (from DRAM, or from HBM in a drain): write the batch, one fdatasync per
        slab file, then the manifest, so no manifest entry names bytes not yet on disk. A
        failure fails the whole batch and holds write-behind back for ``error_backoff_s``."""
        if not await self._run_parts([transfers], self._write_batch, "writing"):
            self._backoff_until = self.clock() + self.error_backoff_s

    async def _read_into_dram(self, transfers: list[Transfer]) -> None:
        """NVMe -> DRAM: read the blocks straight into their arena slots, in
        ``read_parallelism`` parts at once, each block verified."""
        parts = [transfers[i :: self.read_parallelism] for i in range(self.read_parallelism)]
        await self._run_parts([p for p in parts if p], self._read_batch, "reading")

    async def _copy(self, transfers: list[Transfer]) -> None:
        """Between DRAM and HBM: copy block by block (HBM's bytes through a host buffer)."""
        await self._run_parts([transfers], self._copy_batch, "copying")

    async def _copy_from_nvme(self, transfers: list[Transfer]) -> None:
        """NVMe -> HBM: ``read_parallelism`` parts at once, each a run of slots in order (so
        adjacent slots coalesce into one read) read into a bounce buffer, then copied up."""
        ordered = sorted(transfers, key=lambda t: t.src.slot.offset)
        size = -(-len(ordered) // self.read_parallelism)  # contiguous runs coalesce best
        parts = [ordered[i : i + size] for i in range(0, len(ordered), size)]
        await self._run_parts(parts, self._stage_batch, "reading")

    async def _run_parts(
        self, parts: list[list[Transfer]], io: Callable[[list[Transfer]], list[Outcome]], verb: str
    ) -> bool:
        """Run ``io`` on each part in the executor, all parts at once, and report each part's
        outcomes. A part whose ``io`` raised fails whole, counted and logged. True when no
        part raised."""
        loop = asyncio.get_running_loop()
        results = await asyncio.gather(
            *(loop.run_in_executor(self.executor, io, part) for part in parts), return_exceptions=True
        )
        for part, outcomes in zip(parts, results):
            if isinstance(outcomes, BaseException):  # whatever failed, the core must hear of each
                self.errors += 1
                t = part[0]
                _log_failure(outcomes, "%s %d blocks from %s to %s failed", verb, len(part), t.src_tier, t.dst_tier)
                outcomes = [Outcome.ERROR] * len(part)
            self._report(part, outcomes)
        return not any(isinstance(r, BaseException) for r in results)

    def _report(self, part: list[Transfer], outcomes: list[Outcome]) -> None:
        """Report each transfer of ``part`` with its outcome to the core, then the part to
        metrics. A corrupt block gets a warning of its own: the core drops it."""
        moved = [Moved(t, outcome) for t, outcome in zip(part, outcomes, strict=True)]
        for m in moved:
            if m.outcome is Outcome.CORRUPT:
                record = m.transfer.record
                log.warning("block %s/%x failed its checksum on NVMe: dropped", record.namespace, record.hash)
            self.core.complete_transfer(m.transfer, m.outcome)
        if self.metrics is not None:
            self.metrics.landed(moved)

    # -- the I/O, in worker threads --------------------------------------------------------
    def _write_batch(self, transfers: list[Transfer]) -> list[Outcome]:
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
                    block_meta(t.record.parent, t.record.origin),
                )
                for t, checksum in zip(transfers, checksums)
            ]
        )
        return [Outcome.OK] * len(transfers)

    def _read_batch(self, transfers: list[Transfer]) -> list[Outcome]:
        """One batched read of the blocks from NVMe straight into their arena slots."""
        if self.nvme is None:
            return [Outcome.ERROR] * len(transfers)
        views = [self.arena.view(t.dst.slot) for t in transfers]
        try:
            errors = self.nvme.read_many([(t.src.slot, t.nbytes, v) for t, v in zip(transfers, views)])
        finally:
            for v in views:
                v.release()
        return [self._read_outcome(t, err) for t, err in zip(transfers, errors)]

    def _stage_batch(self, transfers: list[Transfer]) -> list[Outcome]:
        """One batched read of the blocks from NVMe into a page-aligned bounce buffer (NVMe
        reads with direct I/O), then each block that read cleanly copied to its destination."""
        if self.nvme is None:
            return [Outcome.ERROR] * len(transfers)
        bounce = memoryview(mmap.mmap(-1, sum(t.src.slot.length for t in transfers)))  # page-aligned
        views, at = [], 0
        for t in transfers:
            views.append(bounce[at : at + t.src.slot.length])
            at += t.src.slot.length
        try:
            errors = self.nvme.read_many([(t.src.slot, t.nbytes, v) for t, v in zip(transfers, views)])
            outcomes = [self._read_outcome(t, err) for t, err in zip(transfers, errors)]
            for t, view, outcome in zip(transfers, views, outcomes):
                if outcome is Outcome.OK:
                    with view[: t.nbytes] as src:
                        self._put(t, src)
        finally:
            for v in views:
                v.release()
            bounce.release()
        return outcomes

    def _copy_batch(self, transfers: list[Transfer]) -> list[Outcome]:
        """Copy each block from its source copy (DRAM or HBM) to its destination."""
        for t in transfers:
            with self._source(t) as src:
                self._put(t, src)
        return [Outcome.OK] * len(transfers)

    def _read_outcome(self, t: Transfer, err: Exception | None) -> Outcome:
        """How reading ``t``'s source from NVMe went (``err``: what read_many said of it). A
        medium's error is counted and logged here; a bad checksum is CORRUPT."""
        if err is None:
            return Outcome.OK
        if isinstance(err, CorruptBlockError):
            return Outcome.CORRUPT
        self.errors += 1
        _log_failure(err, "reading block %x from NVMe failed", t.record.hash)
        return Outcome.ERROR

    def _source(self, t: Transfer) -> memoryview:
        """The bytes of ``t``'s source copy in DRAM or HBM (HBM's through a host buffer); the
        caller releases the view."""
        return self._readers[t.src_tier](t)

    def _put(self, t: Transfer, data: memoryview) -> None:
        """Write ``data`` into ``t``'s destination copy in DRAM or HBM."""
        self._writers[t.dst_tier](t, data)

    def _read_dram(self, t: Transfer) -> memoryview:
        return self.arena.view(t.src.slot)[: t.nbytes]

    def _read_hbm(self, t: Transfer) -> memoryview:
        buf = bytearray(t.nbytes)
        self._require_hbm().read_into(t.src.slot, t.nbytes, buf)
        return memoryview(buf)

    def _write_dram(self, t: Transfer, data: memoryview) -> None:
        with self.arena.view(t.dst.slot) as dst:
            dst[: t.nbytes] = data

    def _write_hbm(self, t: Transfer, data: memoryview) -> None:
        self._require_hbm().write(t.dst.slot, data)

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
