"""The daemon's cluster tier: puts in the background, lookups and loads that reach past the
node's own tiers, and the health that keeps a failing cluster from failing a request.

Every backend call runs on the tier's own threads (the foreground pool for lookups and
loads, one background thread for puts and audits) under a time bound; a call that fails or
overruns marks the tier down, and requests are answered from the node's own tiers until a
probe finds the master again. Then the tier audits what this node published: a master that
restarted has lost its metadata, and the blocks it no longer has are forgotten (``gone``
events), so the global view never counts them.

What goes to the cluster is the core's decision (:mod:`kvd.core.exports`, the policy's
``worth_sharing``); the tier only moves bytes: a put reads the block's pinned DRAM slot in
place, a load's blocks arrive in DRAM slots of an ordinary store (committed without being
offered back) and are then loaded like any held block.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from kvd.cluster.backend import ClusterBackend
from kvd.cluster.health import JOINING_REASON, ClusterHealth, ClusterState, Signal
from kvd.cluster.values import HEADER_BYTES, Header, cluster_key, cluster_keys, verify
from kvd.core.exports import ExportBatch
from kvd.core.manager import BlockSpec, StoreGrant
from kvd.media import DRAM

if TYPE_CHECKING:
    from kvd.server.state import DaemonState

log = logging.getLogger("kvd.cluster")

IMPORT_LEASE_S = 60.0  # a load's store lease for blocks on their way from the cluster
CLOSE_TIMEOUT_S = 10.0  # stop() waits this long for the backend to leave the cluster
PROBE_KEY = "kvd/.probe"  # an idle tier asks whether it exists: any answer but an error will do


@dataclass(frozen=True)
class ClusterSettings:
    """Bounds of the tier. Seconds for times; counts for blocks."""

    timeout_s: float = 2.0  # a lookup's or a load's wait for the cluster
    put_timeout_s: float = 30.0  # a put batch's
    put_blocks: int = 64  # blocks a put batch carries
    max_lookup: int = 16384  # hashes past the node's own prefix a lookup asks the cluster about
    max_fetch: int = 4096  # blocks one load brings from the cluster
    probe_s: float = 1.0  # how often a joining or down tier retries
    audit_s: float = 30.0  # how often the blocks this node published are checked
    audit_blocks: int = 4096  # keys an audit checks per call
    foreground_threads: int = 4


@dataclass
class ClusterCounters:
    """Totals since start (blocks and bytes)."""

    put_blocks: int = 0
    put_bytes: int = 0
    put_failed: int = 0
    got_blocks: int = 0
    got_bytes: int = 0
    get_failed: int = 0
    corrupt: int = 0
    lookup_hits: int = 0
    timeouts: int = 0
    audited_gone: int = 0


@dataclass(frozen=True)
class ClusterStatus:
    """What kvctl status shows of the tier."""

    state: ClusterState
    since_s: float  # seconds in this state
    reason: str
    master: str
    segment_bytes: int
    published_blocks: int
    pending_blocks: int
    counters: ClusterCounters = field(default_factory=ClusterCounters)


class ClusterTier:
    """One node's view of the cluster. ``connect`` joins it (blocking; raises OSError)."""

    def __init__(
        self,
        connect: Callable[[], ClusterBackend],
        state: DaemonState,
        settings: ClusterSettings | None = None,
        master: str = "",
        segment_bytes: int = 0,
    ) -> None:
        self.connect = connect
        self.s = state
        self.settings = settings or ClusterSettings()
        self.master = master
        self.segment_bytes = segment_bytes
        self.health = ClusterHealth(since=time.monotonic())
        self.counters = ClusterCounters()
        self.backend: ClusterBackend | None = None
        self._fg = ThreadPoolExecutor(self.settings.foreground_threads, thread_name_prefix="kvd-cluster")
        self._bg = ThreadPoolExecutor(1, thread_name_prefix="kvd-cluster-put")
        # Header buffers the backend reads and writes: one per put slot, and one region
        # per foreground thread for loads (a load holds one while its get runs).
        s = self.settings
        self._put_headers = np.zeros((s.put_blocks, HEADER_BYTES), dtype=np.uint8)
        self._get_headers = [np.zeros((s.max_fetch, HEADER_BYTES), dtype=np.uint8) for _ in range(s.foreground_threads)]
        self._free_get_headers: asyncio.Queue | None = None
        self._tasks: list[asyncio.Task] = []
        self._wake: asyncio.Event | None = None
        self._audit_due = 0.0
        self._loads = 0  # loads reading from the cluster now: puts wait for them
        self._arena_address = 0
        self.on_state: Callable[[ClusterState], None] | None = None  # metrics

    # -- life -----------------------------------------------------------------------------
    def start(self) -> None:
        """Join in the background and start the put and audit loops (on the event loop)."""
        self._wake = asyncio.Event()
        self._free_get_headers = asyncio.Queue()
        for i in range(len(self._get_headers)):
            self._free_get_headers.put_nowait(i)
        self._tasks = [asyncio.create_task(self._run(), name="kvd-cluster")]

    async def stop(self) -> None:
        """Leave the cluster: say what stays there, stop the loops, close the backend (its
        segment leaves with it)."""
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        published = len(self.s.core.exports.published)
        log.info(
            "leaving the cluster at %s: %d blocks this node put stay there as replicas on other nodes' segments; "
            "its own segment of %d bytes leaves with it, and a value whose only replica was there becomes a miss",
            self.master, published, self.segment_bytes,
        )
        backend, self.backend = self.backend, None
        if backend is not None:
            try:
                # Its own thread: the put thread may be stuck in a call that never returns.
                await asyncio.wait_for(asyncio.to_thread(backend.close), CLOSE_TIMEOUT_S)
            except TimeoutError:
                log.warning("the cluster backend did not close within %g s; leaving without it", CLOSE_TIMEOUT_S)
        self._fg.shutdown(wait=False, cancel_futures=True)
        self._bg.shutdown(wait=False, cancel_futures=True)

    def wake(self) -> None:
        """New candidates were offered: run the put loop now."""
        if self._wake is not None:
            self._wake.set()

    @property
    def up(self) -> bool:
        return self.health.up and self.backend is not None

    def status(self) -> ClusterStatus:
        core = self.s.core
        return ClusterStatus(
            self.health.state, time.monotonic() - self.health.since, self.health.reason, self.master,
            self.segment_bytes, len(core.exports.published), core.exports.pending, self.counters,
        )

    def _signal(self, signal: Signal, reason: str = "") -> None:
        new = self.health.observe(signal, time.monotonic(), reason)
        if new is None:
            return
        if new is ClusterState.UP:
            log.info("cluster tier up (master %s)", self.master)
            self._audit_due = 0.0  # what this node published may be gone: check it now
        else:
            log.warning("cluster tier %s: %s; serving from this node's tiers", new, reason)
        if self.on_state is not None:
            self.on_state(new)

    async def _call(self, pool: ThreadPoolExecutor, timeout: float, fn, *args):
        """``fn(*args)`` on ``pool``, bounded by ``timeout`` seconds; raises TimeoutError (the
        thread finishes on its own) or what ``fn`` raises."""
        loop = asyncio.get_running_loop()
        future = loop.run_in_executor(pool, fn, *args)
        try:
            return await asyncio.wait_for(asyncio.shield(future), timeout)
        except TimeoutError:
            self.counters.timeouts += 1
            raise

    # -- the loop: join, probe, put, audit --------------------------------------------------
    async def _run(self) -> None:
        while True:
            try:
                if self.backend is None:
                    await self._join()
                elif not self.health.up:
                    await self._probe()
                else:
                    worked = await self._put_batch()
                    if time.monotonic() >= self._audit_due:
                        await self._audit()
                        worked = True
                    if not worked:
                        await self._idle(self.settings.probe_s)
                        if not self._wake.is_set():
                            await self._check_master()  # idle: a master lost shows now, not at the next request
                    continue
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - the tier degrades, the daemon serves on
                self._signal(Signal.FAILED, f"{type(exc).__name__}: {exc}")
            await self._idle(self.settings.probe_s)

    async def _idle(self, seconds: float) -> None:
        self._wake.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), seconds)

    async def _join(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            backend = await loop.run_in_executor(self._bg, self.connect)
        except OSError as exc:
            if self.health.changes == 0 and self.health.reason == JOINING_REASON:
                log.warning("cannot join the cluster yet (%s); serving from this node's tiers and retrying", exc)
            self._signal(Signal.FAILED, str(exc))
            return
        try:
            self._arena_address = self.s.arena.address
            backend.register(self._arena_address, self.s.arena.file_bytes)
            backend.register(self._put_headers.ctypes.data, self._put_headers.nbytes)
            for headers in self._get_headers:
                backend.register(headers.ctypes.data, headers.nbytes)
        except OSError as exc:
            await loop.run_in_executor(self._bg, backend.close)
            self._signal(Signal.FAILED, str(exc))
            return
        self.backend = backend
        self.s.core.exports.enabled = True
        self._signal(Signal.JOINED)

    async def _probe(self) -> None:
        """A down tier is up again when the master answers a call (its client's own health
        flag lags a master that just died, so it is not enough alone)."""
        if not await self._call(self._bg, self.settings.timeout_s, self.backend.healthy):
            return
        codes = await self._call(self._bg, self.settings.timeout_s, self.backend.exists, [PROBE_KEY])
        if codes and codes[0] >= 0:
            self._signal(Signal.ANSWERED)

    async def _check_master(self) -> None:
        codes = await self._call(self._bg, self.settings.timeout_s, self.backend.exists, [PROBE_KEY])
        if codes and codes[0] < 0:
            self._signal(Signal.FAILED, f"the master does not answer (code {codes[0]})")

    async def _put_batch(self) -> bool:
        """Put one batch of candidates; False when there was none. Waits while loads read
        from the cluster: local traffic first."""
        while self._loads:
            await self._idle(0.01)
        core = self.s.core
        batch = core.prepare_export(self.settings.put_blocks)
        self.s.after_core()
        if batch is None:
            return False
        landed = [False] * len(batch.items)
        future = asyncio.get_running_loop().run_in_executor(self._bg, self._put, batch)
        try:
            try:
                landed = await asyncio.wait_for(asyncio.shield(future), self.settings.put_timeout_s)
            except TimeoutError:
                self.counters.timeouts += 1
                self._signal(Signal.FAILED, f"a put of {len(batch.items)} blocks took over {self.settings.put_timeout_s:g} s")
                landed = await future  # the slots stay pinned until the thread is done with them
        except asyncio.CancelledError:
            with contextlib.suppress(Exception):
                await future
            raise
        except Exception as exc:  # noqa: BLE001 - the cluster is a cache: degrade, never fail
            self._signal(Signal.FAILED, f"{type(exc).__name__}: {exc}")
        finally:
            core.complete_export(batch.id, landed)
            self.s.after_core()
        return True

    def _put(self, batch: ExportBatch) -> list[bool]:
        """On the put thread: headers, then one batched put reading the slots in place."""
        arena, backend = self.s.arena, self.backend
        keys, parts = [], []
        for i, item in enumerate(batch.items):
            view = arena.view(item.slot)
            try:
                header = Header.of(item.hash, item.parent, view[: item.nbytes]).pack()
            finally:
                view.release()
            self._put_headers[i] = np.frombuffer(header, dtype=np.uint8)
            keys.append(cluster_key(item.namespace, item.hash))
            parts.append([
                (self._put_headers[i].ctypes.data, HEADER_BYTES),
                (self._arena_address + item.slot.offset, item.nbytes),
            ])
        codes = backend.put(keys, parts)
        landed = [code == 0 for code in codes]
        for item, ok in zip(batch.items, landed, strict=True):
            if ok:
                self.counters.put_blocks += 1
                self.counters.put_bytes += item.nbytes
            else:
                self.counters.put_failed += 1
        if codes and not any(landed) and not backend.healthy():
            raise OSError(f"puts fail (codes {sorted(set(codes))[:4]}) and the master does not answer")
        return landed

    async def _audit(self) -> None:
        """Check up to ``audit_blocks`` keys this node published at a time; forget the gone."""
        self._audit_due = time.monotonic() + self.settings.audit_s
        keys = list(self.s.core.exports.published)
        step = self.settings.audit_blocks
        for i in range(0, len(keys), step):
            chunk = keys[i : i + step]
            codes = await self._call(self._bg, self.settings.timeout_s, self.backend.exists, [cluster_key(*k) for k in chunk])
            if any(c < 0 for c in codes):
                self._signal(Signal.FAILED, f"an audit's existence check failed (code {min(codes)})")
                return
            gone = [k for k, c in zip(chunk, codes, strict=True) if c == 0]
            if gone:
                self.counters.audited_gone += self.s.core.forget_published(gone)
                self.s.after_core()

    # -- lookups and loads -------------------------------------------------------------------
    async def extend(self, namespace: str, hashes: Sequence[int], held: int) -> int:
        """How many blocks after the node's ``held`` first ones the cluster holds, in a run
        (0 while the tier is not up, or when the cluster does not answer in time)."""
        if not self.up or held >= len(hashes) or self.s.core.top != DRAM:
            return 0  # loads read the cluster into DRAM on top only: a lookup says no more
        rest = hashes[held : held + self.settings.max_lookup]
        codes = await self._exists(namespace, rest)
        n = 0
        for code in codes:
            if code != 1:
                break
            n += 1
        self.counters.lookup_hits += n
        return n

    async def _exists(self, namespace: str, hashes: Sequence[int]) -> list[int]:
        keys = cluster_keys(namespace, hashes)
        try:
            codes = await self._call(self._fg, self.settings.timeout_s, self.backend.exists, keys)
        except TimeoutError:
            self._signal(Signal.FAILED, f"an existence check took over {self.settings.timeout_s:g} s")
            return []
        except Exception as exc:  # noqa: BLE001 - the cluster is a cache: degrade, never fail
            self._signal(Signal.FAILED, f"{type(exc).__name__}: {exc}")
            return []
        if codes and codes[0] < 0:
            self._signal(Signal.FAILED, f"an existence check failed (code {codes[0]})")
            return []
        return codes

    async def fetch(self, namespace: str, hashes: Sequence[int], prepare_store) -> int:
        """Bring the blocks of ``hashes`` past the node's held prefix that the cluster holds
        (a run, at most ``max_fetch``) into DRAM; returns how many arrived intact.
        ``prepare_store(namespace, specs, lease_seconds)`` is the engine service's bounded
        store (it waits for room). A block that fails its checks, or is not read in time, is
        not stored (and neither are those after it): the load finds what arrived."""
        core = self.s.core
        if not self.up or core.top != DRAM:
            return 0
        held = len(core.lookup_codes(namespace, hashes))
        if held >= len(hashes):
            return 0
        rest = list(hashes[held : held + self.settings.max_fetch])
        codes = await self._exists(namespace, rest)
        n = next((i for i, c in enumerate(codes) if c != 1), len(codes))
        if n == 0:
            return 0
        block_bytes = core.namespace(namespace).block_bytes
        # A load of a chain's later part (a client splits a long load) starts at a block
        # whose parent the request does not name: it is stored as the head of what arrives.
        parents = [hashes[held - 1] if held else None, *rest[: n - 1]]
        specs = [BlockSpec(h, p, block_bytes) for h, p in zip(rest[:n], parents, strict=True)]
        self._loads += 1
        try:
            grant = await prepare_store(namespace, specs, IMPORT_LEASE_S)
            return await self._read_into(namespace, specs, grant, first_parent_known=held > 0)
        finally:
            self._loads -= 1

    async def _read_into(
        self, namespace: str, specs: list[BlockSpec], grant: StoreGrant, first_parent_known: bool
    ) -> int:
        core = self.s.core
        wanted = [i for i, slot in enumerate(grant.slots) if slot is not None]
        region = await self._free_get_headers.get()
        future = asyncio.get_running_loop().run_in_executor(
            self._fg, self._get, namespace, specs, grant, wanted, region, first_parent_known
        )
        future.add_done_callback(lambda _: self._free_get_headers.put_nowait(region))
        try:
            ok = await asyncio.wait_for(asyncio.shield(future), self.settings.timeout_s)
        except TimeoutError:
            self.counters.timeouts += 1
            self._signal(Signal.FAILED, f"a load of {len(wanted)} blocks took over {self.settings.timeout_s:g} s")
            # Its slots are written until the thread returns: abort the store only then.
            future.add_done_callback(lambda _: self._abort(grant.lease_id))
            return 0
        except Exception as exc:  # noqa: BLE001 - the cluster is a cache: degrade, never fail
            self._signal(Signal.FAILED, f"{type(exc).__name__}: {exc}")
            self._abort(grant.lease_id)
            return 0
        failed = [i for i, good in zip(wanted, ok, strict=True) if not good]
        committed = core.commit_store(grant.lease_id, failed, share=False)
        self.s.after_core()
        return committed

    def _abort(self, lease_id: str) -> None:
        if self.s.core.lease_alive(lease_id):
            self.s.core.commit_store(lease_id, abort=True)
            self.s.after_core()

    def _get(
        self, namespace: str, specs: list[BlockSpec], grant: StoreGrant, wanted: list[int], region: int,
        first_parent_known: bool,
    ) -> list[bool]:
        """On a foreground thread: one batched get into the store's slots, then the checks."""
        headers = self._get_headers[region]
        keys, parts = [], []
        for j, i in enumerate(wanted):
            keys.append(cluster_key(namespace, specs[i].hash))
            parts.append([
                (headers[j].ctypes.data, HEADER_BYTES),
                (self._arena_address + grant.slots[i].offset, specs[i].nbytes),
            ])
        sizes = self.backend.get(keys, parts)
        ok = []
        for j, i in enumerate(wanted):
            spec = specs[i]
            if sizes[j] != HEADER_BYTES + spec.nbytes:
                self.counters.get_failed += 1
                ok.append(False)
                continue
            view = self.s.arena.view(grant.slots[i])
            try:
                known = first_parent_known or i > 0
                why = verify(headers[j].tobytes(), view, spec.hash, spec.parent, spec.nbytes, parent_known=known)
            finally:
                view.release()
            if why is not None:
                self.counters.corrupt += 1
                log.warning("cluster value %s is not served: %s", keys[j], why)
                ok.append(False)
                continue
            self.counters.got_blocks += 1
            self.counters.got_bytes += spec.nbytes
            ok.append(True)
        return ok

    async def remove(self, keys: Sequence[tuple[str, int]]) -> None:
        """Remove blocks this node published from the cluster (their namespace was cleared),
        best effort: a value left behind stays readable by the hash it was stored under,
        and is correct for it (keys are chained hashes), until the cluster evicts it."""
        if not self.up or not keys:
            return
        with contextlib.suppress(Exception):
            await self._call(self._bg, self.settings.put_timeout_s, self.backend.remove, [cluster_key(*k) for k in keys])
