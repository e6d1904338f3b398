"""What the gRPC services share: the core, the tiers, the mover, and the effects of events.

Every core call happens on the event loop thread. After each one the service calls
:meth:`DaemonState.after_core`, which drains the core's events and applies their mechanism
effects (an NVMe copy removed -> its manifest entry deleted) and wakes the mover.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import grpc

from kvd.core.errors import KvdError, Unavailable
from kvd.core.eventbuffer import EventBuffer
from kvd.core.events import BlockRemoved, RemovalReason
from kvd.core.manager import KvCore
from kvd.media import CLUSTER, Slot
from kvd.server.codec import block_key, namespace_key, namespace_value
from kvd.server.logs import REQUEST_ID_HEADER, new_request_id, request_id
from kvd.server.metrics import DaemonMetrics
from kvd.server.mover import Mover
from kvd.tiers.base import Tier
from kvd.tiers.dram import DramArena
from kvd.tiers.hbm import HbmPool
from kvd.tiers.nvme import NvmeStore

if TYPE_CHECKING:
    from kvd.cluster.tier import ClusterTier
    from kvd.server.kv_events import KvEventPublisher  # pyzmq + msgspec: an optional extra

log = logging.getLogger("kvd.server")

STATUS = {
    "INVALID_ARGUMENT": grpc.StatusCode.INVALID_ARGUMENT,
    "NOT_FOUND": grpc.StatusCode.NOT_FOUND,
    "FAILED_PRECONDITION": grpc.StatusCode.FAILED_PRECONDITION,
    "RESOURCE_EXHAUSTED": grpc.StatusCode.RESOURCE_EXHAUSTED,
    "INTERNAL": grpc.StatusCode.INTERNAL,
    "UNAVAILABLE": grpc.StatusCode.UNAVAILABLE,
}


@dataclass
class DaemonState:
    core: KvCore
    arena: DramArena
    nvme: NvmeStore | None
    clock: Callable[[], float]
    policy_name: str
    chunk_bytes: int = 1 << 20  # inline streaming chunk
    started_at: float = field(default_factory=time.monotonic)
    recovered_blocks: int = 0
    dropped_on_recovery: int = 0
    mover: Mover | None = None  # set once the loop runs
    events: EventBuffer | None = None  # what Watch streams read; set by the daemon
    kv_events: KvEventPublisher | None = None  # with --kv-events
    metrics: DaemonMetrics | None = None  # with --metrics-port
    watch_cursors: dict[object, int] = field(default_factory=dict)  # open Watch stream -> next seq it sends
    epoch: bytes = field(default_factory=lambda: secrets.token_bytes(8))  # per daemon start
    unix_offset: float = field(default_factory=lambda: time.time() - time.monotonic())
    draining: bool = False  # stores and loads are refused (UNAVAILABLE) until resumed
    hbm: HbmPool | None = None  # the HBM pool, the core's top tier when present
    cluster: ClusterTier | None = None  # with --cluster-master
    _events_changed: asyncio.Event | None = field(default=None, init=False)
    _background: set = field(default_factory=set, init=False)  # tasks no request waits for
    _core_changed: asyncio.Event | None = field(default=None, init=False)

    def after_core(self) -> None:
        """Apply the mechanism effects of the core's new events, publish them to the
        Watch buffer (and the ZMQ publisher), then wake the mover."""
        if self._core_changed is not None:
            self._core_changed.set()
            self._core_changed = None
        events = self.core.take_events()
        if events and self.events is not None:
            self.events.extend(events)
            if self._events_changed is not None:
                self._events_changed.set()
                self._events_changed = None
        if events and self.kv_events is not None:
            self.kv_events.publish(events)  # never blocks: PUB drops for a full subscriber
        if events and self.metrics is not None:
            self.metrics.on_events(events)
        if self.nvme is not None:
            gone = [
                block_key(e.namespace, e.hash) for e in events if isinstance(e, BlockRemoved) and e.tier == "nvme"
            ]
            if gone:
                self.nvme.forget(gone)
        if self.cluster is not None:
            self._cluster_effects(events)
        if self.mover is not None and self.core.has_planned_work:
            self.mover.wake()

    def _cluster_effects(self, events) -> None:
        """Wake the put loop for new candidates; remove a cleared namespace's published
        blocks from the cluster."""
        if self.core.exports.pending:
            self.cluster.wake()
        cleared = [
            (e.namespace, e.hash) for e in events
            if isinstance(e, BlockRemoved) and e.tier == CLUSTER and e.reason == RemovalReason.CLEARED
        ]
        if cleared:
            task = asyncio.get_running_loop().create_task(self.cluster.remove(cleared))
            self._background.add(task)
            task.add_done_callback(self._background.discard)

    def events_changed(self) -> asyncio.Event:
        """An event set once more events are published (a fresh one after each publish)."""
        if self._events_changed is None:
            self._events_changed = asyncio.Event()
        return self._events_changed

    def core_changed(self) -> asyncio.Event:
        """An event set after the next core call (a fresh one after each)."""
        if self._core_changed is None:
            self._core_changed = asyncio.Event()
        return self._core_changed

    def require_serving(self) -> None:
        """Raise Unavailable while draining: no new store or load may start."""
        if self.draining:
            raise Unavailable("kvd is draining: it takes no new stores or loads (kvctl drain, or shutting down)")

    def register_namespace(self, name: str, block_tokens: int, block_bytes: int) -> bool:
        """Persist a new namespace's geometry first, then make it live: a namespace that
        serves blocks is always one a restart knows."""
        if self.core.check_geometry(name, block_tokens, block_bytes) and self.nvme is not None:
            try:
                self.nvme.meta_put(namespace_key(name), namespace_value(block_tokens, block_bytes))
            except OSError as exc:
                # Not the caller's fault and maybe passing (the manifest's disk): retry later.
                raise Unavailable(
                    f"namespace {name!r} cannot be recorded in the NVMe manifest ({exc.strerror or exc}); retry later"
                ) from None
        created = self.core.register_namespace(name, block_tokens, block_bytes)
        self.after_core()
        return created

    @property
    def top_tier(self) -> Tier:
        """The tier stores land in and loads read from: HBM when present, else DRAM."""
        return self.hbm if self.hbm is not None else self.arena

    def slot_bytes(self, slot: Slot, offset: int, n: int) -> bytes:
        """``n`` bytes from ``offset`` of a top-tier slot (for inline loads)."""
        if self.hbm is not None:
            return self.hbm.read_range(slot, offset, n)
        view = self.arena.view(slot)
        try:
            return bytes(view[offset : offset + n])
        finally:
            view.release()

    def write_slot(self, slot: Slot, offset: int, data: bytes) -> None:
        """Write ``data`` at ``offset`` of a top-tier slot (for inline stores)."""
        if self.hbm is not None:
            self.hbm.write_range(slot, offset, data)
            return
        view = self.arena.view(slot)
        try:
            view[offset : offset + len(data)] = data
        finally:
            view.release()


def _rpc_name(servicer, method) -> str:
    return f"{type(servicer).__name__.removesuffix('Service')}/{method.__name__}"


def _abort_args(exc: BaseException, rpc: str) -> tuple[grpc.StatusCode, str]:
    """The status for ``exc``, logged with the RPC and its request id: a request the core
    refused at INFO, anything else (a bug) at ERROR with its traceback."""
    if isinstance(exc, KvdError):
        log.info("%s: %s: %s", rpc, exc.code, exc, extra={"method": rpc, "code": exc.code})
        return STATUS[exc.code], str(exc)
    log.exception("%s: internal error", rpc, extra={"method": rpc, "code": "INTERNAL"})
    details = f"internal error (request {request_id.get()}): {type(exc).__name__}: {exc}"
    return grpc.StatusCode.INTERNAL, details


def unary_rpc(method):
    """Map the core's errors to gRPC statuses; anything else is INTERNAL and logged. The
    call runs under its request id (see kvd.server.logs); a failure returns it as trailing
    metadata ``x-request-id``."""

    @functools.wraps(method)
    async def wrapper(self, request, context):
        token = request_id.set(new_request_id(context.invocation_metadata()))
        try:
            try:
                return await method(self, request, context)
            except Exception as exc:  # noqa: BLE001 - every failure becomes a status, never a crash
                code, details = _abort_args(exc, _rpc_name(self, method))
            finally:
                self.s.after_core()  # whatever the core did before an error still takes effect
            await context.abort(code, details, trailing_metadata=((REQUEST_ID_HEADER, request_id.get()),))
        finally:
            request_id.reset(token)

    return wrapper


def streaming_rpc(method):
    """unary_rpc for server-streaming methods (async generators)."""

    @functools.wraps(method)
    async def wrapper(self, request, context):
        token = request_id.set(new_request_id(context.invocation_metadata()))
        try:
            try:
                async for item in method(self, request, context):
                    yield item
                return
            except Exception as exc:  # noqa: BLE001 - every failure becomes a status, never a crash
                code, details = _abort_args(exc, _rpc_name(self, method))
            finally:
                self.s.after_core()
            await context.abort(code, details, trailing_metadata=((REQUEST_ID_HEADER, request_id.get()),))
        finally:
            with contextlib.suppress(ValueError):  # a generator closed from another context
                request_id.reset(token)

    return wrapper
