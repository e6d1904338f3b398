"""The worker side's block moves between an engine's paged caches and a kvd daemon.

With the daemon's shared-memory arena mapped (a local daemon), a save gathers the blocks
straight into the slots PrepareStore grants and a load scatters them straight from the slots
PrepareLoad pins: one copy each way, no buffer in between, and only slot offsets travel over
gRPC. When the daemon has an HBM tier, those slots are in its GPU pool (opened through CUDA
IPC by the client) and the copies are device-to-device. On a GPU host the arena's data
pages are registered with CUDA (cudaHostRegister, ``kvd.native.cuda.pin``) once, so the copy
kernels reach them directly by DMA. Without the arena (a remote daemon), block bytes go
inline over gRPC through one host staging buffer.

:class:`BackgroundLoads` runs loads on a thread of their own, for vLLM's asynchronous
loading protocol: the engine keeps stepping other requests while a request's blocks arrive
(e.g. promoted from NVMe by the daemon), and learns of each finished load by request id.
:class:`BackgroundSaves` runs saves on another thread, so a step never waits for kvd: the
engine keeps a finished request's blocks until its saves end, and waits for the saves of a
preempted request before its blocks are reused.

Nothing here imports vLLM; ``torch`` (through :mod:`kvd.connector.paged`) is required.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np

from kvd.client import Client, ClientError
from kvd.connector.paged import PagedCaches
from kvd.connector.plan import SaveOrigin

log = logging.getLogger("vllm.kvd_connector")


class Transfers:
    """Loads and saves of one worker's shard (``namespace``). Thread-safe: a background load
    may run while the engine's thread saves."""

    def __init__(self, client: Client, namespace: str, caches: PagedCaches) -> None:
        self.client = client
        self.namespace = namespace
        self.caches = caches
        self.shared_memory = client.shared_memory
        self._pinned: int | None = None  # address of the arena pages registered with CUDA
        self._pin_lock = threading.Lock()
        if self.shared_memory and caches.on_cuda:
            pages = client.arena_pages()
            if pages is not None:
                self._pin(pages)
            del pages  # a live view would stop the client from unmapping the arena

    # -- loads and saves --------------------------------------------------------------------
    def load(self, hashes: Sequence[int], block_ids: Sequence[int]) -> list[int]:
        """Copy blocks ``hashes[i]`` from kvd into engine blocks ``block_ids[i]``; returns the
        block ids that did not arrive (missing in kvd, failed its checksum, a lease expired
        mid-copy, or the call failed), which the engine must recompute."""
        if len(hashes) != len(block_ids):
            raise ValueError(f"{len(hashes)} hashes but {len(block_ids)} block ids")
        if not hashes:
            return []
        caches = self.caches
        try:
            if self.shared_memory:

                def copy(pages: memoryview, indexes: list[int], offsets: list[int]) -> None:
                    self._ensure_pinned(pages)
                    caches.scatter([block_ids[i] for i in indexes], pages, offsets)

                found = self.client.load_slots(self.namespace, hashes, caches.block_bytes, copy)
            else:
                rows = caches.staging(len(hashes))
                found = self.client.load_into(self.namespace, hashes, list(rows))
                ok = [i for i, f in enumerate(found) if f]
                caches.scatter([block_ids[i] for i in ok], rows, [i * caches.block_bytes for i in ok])
        except ClientError as exc:
            log.warning("kvd load of %d blocks failed; vLLM recomputes them: %s", len(hashes), exc)
            return list(block_ids)
        failed = [b for b, f in zip(block_ids, found) if not f]
        if failed:
            log.warning("kvd: %d of %d blocks failed to load; vLLM recomputes them", len(failed), len(hashes))
        return failed

    def save(
        self,
        hashes: Sequence[int],
        parents: Sequence[int | None],
        block_ids: Sequence[int],
        session_id: str | None,
        origin: SaveOrigin | None = None,
    ) -> bool:
        """Copy engine blocks ``block_ids[i]`` into kvd as ``hashes[i]`` (with ``origin``, what
        they were computed from); True when kvd holds them all afterwards (written now or
        already held). A failed save is logged: kvd is a cache, so a lost save is a later
        miss, never a wrong answer."""
        if len(hashes) != len(block_ids):
            raise ValueError(f"{len(hashes)} hashes but {len(block_ids)} block ids")
        if not hashes:
            return True
        caches = self.caches
        try:
            if self.shared_memory:

                def copy(pages: memoryview, indexes: list[int], offsets: list[int]) -> None:
                    self._ensure_pinned(pages)
                    caches.gather([block_ids[i] for i in indexes], pages, offsets)

                self.client.store_slots(
                    self.namespace, hashes, caches.block_bytes, copy, parents, session_id, **_origin_args(origin)
                )
            else:
                rows = caches.staging(len(hashes))
                caches.gather(block_ids, rows)
                self.client.store(self.namespace, hashes, list(rows), parents, session_id, **_origin_args(origin))
        except ClientError as exc:
            log.warning("kvd save of %d blocks failed: %s", len(hashes), exc)
            return False
        return True

    def close(self) -> None:
        """Unregister the arena from CUDA (before the client unmaps it)."""
        with self._pin_lock:
            if self._pinned is not None:
                from kvd.native.cuda import unpin

                unpin(self._pinned)
                self._pinned = None

    # -- pinning ----------------------------------------------------------------------------
    def _ensure_pinned(self, pages) -> None:
        """On a GPU host, keep the mapped arena registered with CUDA: the client maps a new
        arena when the daemon restarts, and the kernels need the one they copy to. (Slots in
        the daemon's HBM pool come as a device tensor: nothing to register.)"""
        if not isinstance(pages, memoryview):
            return
        if self.caches.on_cuda and _address(pages) != self._pinned:
            self._pin(pages)

    def _pin(self, pages: memoryview) -> None:
        from kvd.native.cuda import cupy_available, pin, unpin

        with self._pin_lock:
            if _address(pages) == self._pinned:
                return
            if not cupy_available():
                # torch's copies still work from pageable memory, through a bounce buffer.
                log.warning("kvd: CuPy is missing, the arena is not registered with CUDA (slower copies)")
                return
            if self._pinned is not None:
                try:
                    unpin(self._pinned)
                except Exception as exc:  # the old mapping is gone already: nothing left to undo
                    log.info("kvd: unregistering the previous arena: %s", exc)
            self._pinned = pin(pages)
            log.info("kvd: arena registered with CUDA (%d bytes)", pages.nbytes)


def _address(pages: memoryview) -> int:
    return np.frombuffer(pages, dtype=np.uint8).ctypes.data


class BackgroundLoads:
    """Loads that run on one background thread, in submission order; the engine polls
    :meth:`finished` for the requests whose load is over (with the blocks that failed)."""

    def __init__(self, transfers: Transfers) -> None:
        self._transfers = transfers
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kvd-load")
        self._running: dict[str, list[tuple[Future, list[int]]]] = {}
        self._lock = threading.Lock()

    def submit(self, req_id: str, hashes: Sequence[int], block_ids: Sequence[int]) -> None:
        ids = list(block_ids)
        future = self._pool.submit(self._transfers.load, list(hashes), ids)
        with self._lock:
            self._running.setdefault(req_id, []).append((future, ids))

    def finished(self) -> dict[str, list[int]]:
        """Requests whose loads are all over since the last call: request id -> failed block
        ids. An unexpected error in a load counts all its blocks as failed (and is logged)."""
        done: dict[str, list[int]] = {}
        with self._lock:
            for req_id, jobs in list(self._running.items()):
                if all(f.done() for f, _ in jobs):
                    del self._running[req_id]
                    done[req_id] = [b for f, ids in jobs for b in self._outcome(f, ids)]
        return done

    @property
    def pending(self) -> int:
        with self._lock:
            return len(self._running)

    def close(self) -> None:
        """Wait for running loads (their blocks must not be freed under them), then stop."""
        self._pool.shutdown(wait=True)

    @staticmethod
    def _outcome(future: Future, block_ids: list[int]) -> list[int]:
        exc = future.exception()
        if exc is None:
            return future.result()
        log.error("kvd background load of %d blocks failed; vLLM recomputes them", len(block_ids), exc_info=exc)
        return block_ids


class BackgroundSaves:
    """Saves that run on one background thread, in submission order. The engine's blocks must
    stay unchanged until a save of them ends: a finished request's blocks are freed only once
    :meth:`finished` reports it (after :meth:`release`), and :meth:`wait` blocks until the
    saves of given requests end (before a preempted request's blocks are reused)."""

    def __init__(self, transfers: Transfers) -> None:
        self._transfers = transfers
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kvd-save")
        self._lock = threading.Lock()
        self._running: dict[str, list[Future]] = {}  # req_id -> its saves not yet reaped
        self._outcomes: dict[int, bool] = {}  # save_id -> stored, for saves over since the last take
        self._released: set[str] = set()  # finished requests whose blocks wait for their saves

    def submit(self, req_id: str, save_id: int, hashes: Sequence[int], parents: Sequence[int | None],
               block_ids: Sequence[int], session_id: str | None, origin: SaveOrigin | None = None) -> None:
        """Start saving one planned save (``save_id`` names its outcome in :meth:`take_outcomes`)."""
        args = (list(hashes), list(parents), list(block_ids), session_id, origin)
        future = self._pool.submit(self._save, save_id, *args)
        with self._lock:
            self._running.setdefault(req_id, []).append(future)

    def release(self, req_ids: Iterable[str]) -> None:
        """These requests finished: report each by :meth:`finished` once its saves end."""
        with self._lock:
            self._released.update(req_ids)

    def finished(self) -> set[str]:
        """Released requests whose saves have all ended, each reported once."""
        with self._lock:
            self._reap()
            done = {r for r in self._released if r not in self._running}
            self._released -= done
        return done

    def wait(self, req_ids: Iterable[str]) -> None:
        """Block until every save of these requests ends."""
        with self._lock:
            futures = [f for r in req_ids for f in self._running.get(r, ())]
        for future in futures:
            future.exception()  # waits; the outcome is recorded by _save

    def take_outcomes(self) -> tuple[set[int], set[int]]:
        """(stored, failed) save ids of the saves over since the last call."""
        with self._lock:
            outcomes, self._outcomes = self._outcomes, {}
        return {i for i, ok in outcomes.items() if ok}, {i for i, ok in outcomes.items() if not ok}

    @property
    def pending(self) -> int:
        """Saves submitted and not yet ended."""
        with self._lock:
            return sum(1 for futures in self._running.values() for f in futures if not f.done())

    def close(self) -> None:
        """Wait for running saves (their blocks must not be freed under them), then stop."""
        self._pool.shutdown(wait=True)

    def _save(self, save_id: int, hashes, parents, block_ids, session_id, origin) -> None:
        try:
            ok = self._transfers.save(hashes, parents, block_ids, session_id, origin)
        except Exception:  # a bug in a copy must not leave the engine waiting for this save
            log.exception("kvd background save of %d blocks failed", len(hashes))
            ok = False
        with self._lock:
            self._outcomes[save_id] = ok

    def _reap(self) -> None:
        for req_id, futures in list(self._running.items()):
            left = [f for f in futures if not f.done()]
            if left:
                self._running[req_id] = left
            else:
                del self._running[req_id]


def _origin_args(origin: SaveOrigin | None) -> dict:
    """The store's keyword arguments that carry ``origin`` (none without one)."""
    if origin is None:
        return {}
    return {"token_ids": origin.token_ids, "lora_name": origin.lora_name, "extra_keys": origin.extra_keys}
