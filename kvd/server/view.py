"""The View gRPC service for routers: Watch (resumable event stream), Snapshot, Score."""

from __future__ import annotations

import asyncio

from kvd.core.events import BlockRemoved, BlockStored, Event, NamespaceCleared, NamespaceRegistered, SessionChanged
from kvd.media import CLUSTER, DRAM, HBM, NVME, TIER_BY_CODE, TIER_CODES, TierName
from kvd.server.listing import block_info, held_page
from kvd.server.state import DaemonState, streaming_rpc, unary_rpc
from kvd.server.tenants import caller
from kvd.v1 import view_pb2, view_pb2_grpc

# The kinds every watcher gets; NamespaceCleared and SessionChanged only when asked for
# (WatchRequest.with_cleared / with_sessions), so clients older than them keep working.
WIRE_EVENTS = (BlockStored, BlockRemoved, NamespaceRegistered)
MAX_BATCH_EVENTS = 1000  # events per WatchResponse
GB = 1e9
CLUSTER_GET_GBPS = 3.3  # GB/s of one get from the cluster's Mooncake Store over TCP, as measured


def load_s_per_byte(
    dram_to_hbm_gbps: float, nvme_to_dram_gbps: float, cluster_get_gbps: float = CLUSTER_GET_GBPS
) -> dict[TierName, float]:
    """Seconds per byte to bring a block from each tier to the engine (HBM): nothing from
    HBM; one copy up from DRAM; from NVMe, a read into DRAM and that copy; from the cluster,
    a get into the node's DRAM and that copy. Rates in GB/s (1e9 bytes a second)."""
    to_hbm = 1 / (dram_to_hbm_gbps * GB)
    return {
        HBM: 0.0,
        DRAM: to_hbm,
        NVME: 1 / (nvme_to_dram_gbps * GB) + to_hbm,
        CLUSTER: 1 / (cluster_get_gbps * GB) + to_hbm,
    }


def event_message(event: Event, unix_offset: float) -> view_pb2.Event:
    msg = view_pb2.Event(seq=event.seq, unix_time=event.ts + unix_offset)
    if isinstance(event, BlockStored):
        msg.stored.namespace = event.namespace
        msg.stored.hash = event.hash
        msg.stored.tier = TIER_CODES[event.tier]
        msg.stored.nbytes = event.nbytes
        if event.parent is not None:
            msg.stored.parent = event.parent
        if event.session_id is not None:
            msg.stored.session_id = event.session_id
    elif isinstance(event, BlockRemoved):
        msg.removed.namespace = event.namespace
        msg.removed.hash = event.hash
        msg.removed.tier = TIER_CODES[event.tier]
        msg.removed.reason = event.reason
    elif isinstance(event, NamespaceRegistered):
        msg.registered.namespace = event.namespace
        msg.registered.block_tokens = event.block_tokens
        msg.registered.block_bytes = event.block_bytes
    elif isinstance(event, NamespaceCleared):
        msg.cleared.namespace = event.namespace
    elif isinstance(event, SessionChanged):
        msg.session.namespace = event.namespace
        msg.session.session_id = event.session_id
        msg.session.state = event.state
        msg.session.tool = event.tool or ""
    else:
        raise TypeError(f"no wire form for {type(event).__name__}")
    return msg


def wire_kinds(request: view_pb2.WatchRequest) -> tuple[type, ...]:
    """The event classes a Watch request receives: the first three always, newer ones on request."""
    kinds = WIRE_EVENTS
    if request.with_cleared:
        kinds += (NamespaceCleared,)
    if request.with_sessions:
        kinds += (SessionChanged,)
    return kinds


class ViewService(view_pb2_grpc.ViewServicer):
    def __init__(
        self,
        state: DaemonState,
        dram_to_hbm_gbps: float,
        nvme_to_dram_gbps: float,
        cluster_get_gbps: float = CLUSTER_GET_GBPS,
    ) -> None:
        """The rates (GB/s) are Score's cost model (:func:`load_s_per_byte`)."""
        self.s = state
        self._load_s_per_byte = load_s_per_byte(dram_to_hbm_gbps, nvme_to_dram_gbps, cluster_get_gbps)

    @streaming_rpc
    async def Watch(self, request, context):
        buffer = self.s.events
        cursor = request.from_seq or buffer.next_seq
        # A position this daemon never reached (another daemon's, or made up) is answered as
        # one it no longer holds: resynchronize, rather than wait for a sequence far ahead.
        beyond = cursor > buffer.next_seq
        if (request.epoch and request.epoch != self.s.epoch) or beyond or buffer.since(cursor) is None:
            yield view_pb2.WatchResponse(epoch=self.s.epoch, resync=True, next_seq=buffer.next_seq)
            return
        namespace = request.namespace
        allows = caller().allows  # a tenant's stream carries its own namespaces' events only
        kinds = wire_kinds(request)
        stream = object()  # this stream's entry in watch_cursors: its lag, for metrics
        self.s.watch_cursors[stream] = cursor
        try:
            while True:
                changed = self.s.events_changed()
                events = buffer.since(cursor)
                if events is None:  # this reader fell behind the buffer while it was streaming
                    yield view_pb2.WatchResponse(epoch=self.s.epoch, resync=True, next_seq=buffer.next_seq)
                    return
                if not events:
                    await changed.wait()
                    continue
                events = events[:MAX_BATCH_EVENTS]
                cursor = events[-1].seq + 1
                chosen = [
                    e for e in events
                    if isinstance(e, kinds) and (not namespace or e.namespace == namespace) and allows(e.namespace)
                ]
                if chosen:
                    yield view_pb2.WatchResponse(
                        epoch=self.s.epoch,
                        events=[event_message(e, self.s.unix_offset) for e in chosen],
                        next_seq=cursor,
                    )
                self.s.watch_cursors[stream] = cursor  # sent: gRPC took the batch (flow control)
                await asyncio.sleep(0)  # let the data path run between batches
        finally:
            del self.s.watch_cursors[stream]

    @unary_rpc
    async def Snapshot(self, request, context):
        as_of = self.s.events.next_seq
        allows = caller().allows
        records, next_token = held_page(self.s.core, request.namespace, request.page_size, request.page_token, allows)
        names = [self.s.core.namespace(request.namespace)] if request.namespace else self.s.core.namespaces()
        names = [n for n in names if allows(n.name)]
        return view_pb2.SnapshotResponse(
            epoch=self.s.epoch,
            as_of_seq=as_of,
            blocks=[block_info(r) for r in records],
            next_page_token=next_token,
            namespaces=[
                view_pb2.NamespaceGeometry(namespace=n.name, block_tokens=n.block_tokens, block_bytes=n.block_bytes)
                for n in names
            ],
        )

    @unary_rpc
    async def Score(self, request, context):
        ns = self.s.core.namespace(request.namespace)
        codes = self.s.core.lookup_codes(request.namespace, request.hashes)
        if self.s.cluster is not None and len(codes) < len(request.hashes):
            more = await self.s.cluster.extend(request.namespace, request.hashes, len(codes))
            codes += [TIER_CODES[CLUSTER]] * more
        counts = {code: codes.count(code) for code in set(codes)}
        load_s = sum(n * ns.block_bytes * self._load_s_per_byte[TIER_BY_CODE[c]] for c, n in counts.items())
        return view_pb2.ScoreResponse(
            matched_blocks=len(codes),
            matched_tokens=len(codes) * ns.block_tokens,
            by_tier=[view_pb2.TierBlocks(tier=c, blocks=n) for c, n in sorted(counts.items())],
            estimated_load_s=load_s,
        )
