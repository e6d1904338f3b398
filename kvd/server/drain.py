"""Draining: what SIGTERM and `kvctl drain` do before the daemon stops or pauses.

Order: new stores and loads are refused (UNAVAILABLE) and health reports NOT_SERVING (the
caller's part); leases already granted get until the deadline to commit or complete; then
every block the policy wants kept and that has no NVMe copy is written down; last, the
slabs and the manifest are synced. Whatever the deadline cut short is reported, not hidden.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

from kvd.core.errors import KvdError
from kvd.server.state import DaemonState

log = logging.getLogger("kvd.drain")


class ShuttingDown(KvdError):
    """Resume asked of a daemon that is stopping."""

    code = "FAILED_PRECONDITION"


@dataclass(frozen=True)
class DrainResult:
    """``written``: blocks that got an NVMe copy during the drain; ``pending``: blocks the
    policy keeps that still have none (deadline, full NVMe); ``leases``: leases still open."""

    written: int
    pending: int
    leases: int


def _nvme_blocks(state: DaemonState) -> int:
    return sum(u.blocks for u in state.core.stats().tiers if u.tier == "nvme")


async def drain(state: DaemonState, timeout_s: float) -> DrainResult:
    """Refuse new stores and loads, let leases finish, write kept blocks to NVMe, sync.
    Idempotent: a second drain writes what arrived since (nothing, as stores are refused)."""
    state.draining = True
    loop = asyncio.get_running_loop()
    deadline = state.clock() + timeout_s
    while state.core.lease_count and state.clock() < deadline:
        changed = state.core_changed()
        try:
            await asyncio.wait_for(changed.wait(), max(0.0, deadline - state.clock()))
        except TimeoutError:
            break
    before = _nvme_blocks(state)
    queued = state.core.start_drain()
    state.after_core()
    pending = 0
    if state.nvme is not None:
        pending = await state.mover.flush(max(0.0, deadline - state.clock()))
        await loop.run_in_executor(None, state.nvme.sync)
    result = DrainResult(max(0, _nvme_blocks(state) - before), pending, state.core.lease_count)
    log.info(
        "drained: %d blocks queued for NVMe, %d written, %d still pending, %d leases open",
        queued, result.written, result.pending, result.leases,
    )
    if state.cluster is not None:
        s = state.cluster.status()
        log.info(
            "cluster tier %s: %d blocks this node put stay there (replicas on other nodes survive it), "
            "%d still queued for a put",
            s.state, s.published_blocks, s.pending_blocks,
        )
    return result


def resume(state: DaemonState) -> bool:
    """Take stores and loads again; True when the daemon was draining."""
    was = state.draining
    state.draining = False
    state.core.stop_drain()
    return was
